//! ARM writes per scale set, from the emulator's request log: how many,
//! how they were answered, and how many were in flight at once.

use std::collections::BTreeMap;

use azure_emulator::state::OperationSpan;
use azure_emulator::{RequestRecord, Service};

/// The writes one scale set received.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmssWrites {
    /// Lower-cased scale set name.
    pub name: String,
    /// PUT and PATCH requests, whatever their answer.
    pub writes: u64,
    /// Of which answered 2xx (each starts an operation).
    pub accepted: u64,
    /// The others, per status.
    pub refused: BTreeMap<u16, u64>,
    /// Most writes in flight at once: an accepted write counts while its
    /// operation runs, a refused one at the instant of its answer (a
    /// request sent while an operation ran).
    pub max_in_flight: u64,
}

impl VmssWrites {
    /// One line: `name: writes W (A accepted, 409×C), at most M in flight`.
    pub fn line(&self) -> String {
        let refused: Vec<String> = self
            .refused
            .iter()
            .map(|(s, n)| format!(", {s}×{n}"))
            .collect();
        format!(
            "{}: writes {} ({} accepted{}), at most {} in flight",
            self.name,
            self.writes,
            self.accepted,
            refused.concat(),
            self.max_in_flight
        )
    }
}

/// The scale set a request's URI writes to (the scale set itself, not a
/// resource under it), lower-cased.
fn scale_set_of(uri: &str) -> Option<String> {
    let path = uri.split('?').next()?.to_ascii_lowercase();
    let (_, rest) = path.split_once("/providers/microsoft.compute/virtualmachinescalesets/")?;
    let name = rest.trim_end_matches('/');
    (!name.is_empty() && !name.contains('/')).then(|| name.to_string())
}

/// Writes per scale set among `records`, by name, with the operations the
/// accepted ones started (`ops`, those of the same span).
pub fn per_scale_set(records: &[RequestRecord], ops: &[OperationSpan]) -> Vec<VmssWrites> {
    // (time, +1 start / -1 end) per scale set.
    let mut events: BTreeMap<String, Vec<(u64, i64)>> = BTreeMap::new();
    let mut by_name: BTreeMap<String, VmssWrites> = BTreeMap::new();
    for r in records {
        if r.service != Service::Arm || !matches!(r.method.as_str(), "PUT" | "PATCH") {
            continue;
        }
        let Some(name) = scale_set_of(&r.uri) else {
            continue;
        };
        let w = by_name.entry(name.clone()).or_insert_with(|| VmssWrites {
            name: name.clone(),
            ..Default::default()
        });
        w.writes += 1;
        if (200..300).contains(&r.status) {
            w.accepted += 1;
        } else {
            *w.refused.entry(r.status).or_default() += 1;
            let e = events.entry(name).or_default();
            e.push((r.at_ms, 1));
            e.push((r.at_ms + 1, -1));
        }
    }
    for op in ops {
        let Some(name) = scale_set_of(&op.resource_key) else {
            continue;
        };
        if by_name.contains_key(&name) {
            let e = events.entry(name).or_default();
            e.push((op.start_ms, 1));
            e.push((op.end_ms.max(op.start_ms + 1), -1));
        }
    }
    for (name, mut e) in events {
        // Ends before starts at the same instant: an operation over at t
        // is not in flight with one started at t.
        e.sort_unstable();
        let (mut now, mut max) = (0_i64, 0_i64);
        for (_, d) in e {
            now += d;
            max = max.max(now);
        }
        if let Some(w) = by_name.get_mut(&name) {
            w.max_in_flight = max as u64;
        }
    }
    by_name.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(method: &str, uri: &str, status: u16, at_ms: u64) -> RequestRecord {
        RequestRecord::answered(Service::Arm, method.into(), uri.into(), status, at_ms)
    }

    fn op(uri: &str, start_ms: u64, end_ms: u64) -> OperationSpan {
        OperationSpan {
            resource_key: uri
                .split('?')
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase(),
            start_ms,
            end_ms,
        }
    }

    const A: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/VMSS-A?api-version=2022-03-01";
    const B: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/vmss-b?api-version=2022-03-01";
    const C: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/vmss-c";

    #[test]
    fn writes_are_counted_per_scale_set_with_the_most_in_flight() {
        let records = vec![
            rec("PATCH", A, 200, 1000),
            // Refused while A's first operation runs: two in flight.
            rec("PATCH", A, 409, 2000),
            // Starts as the first ends: never two running.
            rec("PATCH", A, 200, 46_000),
            rec("GET", A, 200, 3000),
            rec("PUT", B, 200, 1000),
            // Refused while B's operation runs (its drawn duration).
            rec("PATCH", B, 429, 50_000),
            // A virtual machine of the scale set, not the scale set.
            rec(
                "PUT",
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/vmss-b/virtualMachines/0",
                200,
                2000,
            ),
        ];
        let ops = [
            op(A, 1000, 46_000),
            op(A, 46_000, 88_000),
            op(B, 1000, 59_000),
            // A scale set no write of the span reached.
            op(C, 5000, 50_000),
        ];
        let w = per_scale_set(&records, &ops);
        assert_eq!(w.len(), 2);
        assert_eq!(
            w[0],
            VmssWrites {
                name: "vmss-a".into(),
                writes: 3,
                accepted: 2,
                refused: BTreeMap::from([(409, 1)]),
                max_in_flight: 2,
            }
        );
        assert_eq!(w[1].writes, 2);
        assert_eq!(w[1].max_in_flight, 2);
        assert_eq!(
            w[0].line(),
            "vmss-a: writes 3 (2 accepted, 409×1), at most 2 in flight"
        );
    }
}
