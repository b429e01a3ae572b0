//! Request-level fault injection: status storms, hangs and slow answers, matched
//! by service, method, path and (for IMDS) machine. State-level faults (identity
//! deleted, assign right revoked, scale set deleting, identities stripped) are
//! methods on [`crate::Emulator`].

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::lock;
use crate::observe::Service;

/// What a matching request gets.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "camelCase", deny_unknown_fields)]
pub enum FaultAction {
    /// Answer with this status and the service's error body for it (ARM 429:
    /// the CRP throttling body with `Retry-After`).
    Status {
        status: u16,
        /// `Retry-After` seconds as sent (429/503); ARM 429 defaults to 1.
        #[serde(default, rename = "retryAfter")]
        retry_after: Option<u64>,
    },
    /// Never answer (the connection stays open until the client gives up or
    /// the emulator stops).
    Hang,
    /// Wait this many *virtual* seconds, then answer normally.
    Delay { seconds: f64 },
}

/// One injected fault.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    pub service: Service,
    /// HTTP method to match (any when absent), e.g. `GET`.
    #[serde(default)]
    pub method: Option<String>,
    /// Case-insensitive substring of the path (any when absent).
    #[serde(default)]
    pub path_contains: Option<String>,
    /// IMDS only: `vmss/<name>/<id>` or `vm/<name>` (any when absent).
    #[serde(default)]
    pub machine: Option<String>,
    pub action: FaultAction,
    /// How many requests it applies to; forever when absent.
    #[serde(default)]
    pub count: Option<u32>,
}

impl Fault {
    pub fn new(service: Service, action: FaultAction) -> Self {
        Self {
            service,
            method: None,
            path_contains: None,
            machine: None,
            action,
            count: None,
        }
    }
    /// Answer with `status` (and `Retry-After: retry_after` when given).
    pub fn status(service: Service, status: u16, retry_after: Option<u64>) -> Self {
        Self::new(
            service,
            FaultAction::Status {
                status,
                retry_after,
            },
        )
    }
    pub fn method(mut self, m: &str) -> Self {
        self.method = Some(m.to_string());
        self
    }
    pub fn path_contains(mut self, p: &str) -> Self {
        self.path_contains = Some(p.to_string());
        self
    }
    pub fn machine(mut self, m: &str) -> Self {
        self.machine = Some(m.to_string());
        self
    }
    pub fn times(mut self, n: u32) -> Self {
        self.count = Some(n);
        self
    }

    fn matches(&self, service: Service, method: &str, path: &str, machine: Option<&str>) -> bool {
        self.service == service
            && self
                .method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && self
                .path_contains
                .as_deref()
                .is_none_or(|p| path.to_ascii_lowercase().contains(&p.to_ascii_lowercase()))
            && self
                .machine
                .as_deref()
                .is_none_or(|m| machine.is_some_and(|x| x.eq_ignore_ascii_case(m)))
    }
}

#[derive(Debug, Default)]
pub struct Faults {
    list: Mutex<Vec<Fault>>,
}

impl Faults {
    pub fn add(&self, f: Fault) {
        lock(&self.list).push(f);
    }

    pub fn clear(&self) {
        lock(&self.list).clear();
    }

    pub fn list(&self) -> Vec<Fault> {
        lock(&self.list).clone()
    }

    /// The first matching fault's action, consuming one use of it.
    pub fn take(
        &self,
        service: Service,
        method: &str,
        path: &str,
        machine: Option<&str>,
    ) -> Option<FaultAction> {
        let mut list = lock(&self.list);
        let idx = list
            .iter()
            .position(|f| f.matches(service, method, path, machine))?;
        let action = list[idx].action.clone();
        if let Some(n) = list[idx].count.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                list.remove(idx);
            }
        }
        Some(action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_match_and_count_down() {
        let f = Faults::default();
        f.add(
            Fault::new(
                Service::Arm,
                FaultAction::Status {
                    status: 500,
                    retry_after: None,
                },
            )
            .method("PATCH")
            .times(2),
        );
        f.add(Fault::new(Service::Imds, FaultAction::Hang).machine("vm/a"));
        assert_eq!(f.take(Service::Arm, "GET", "/x", None), None);
        assert!(f.take(Service::Arm, "patch", "/x", None).is_some());
        assert!(f.take(Service::Arm, "PATCH", "/x", None).is_some());
        assert_eq!(f.take(Service::Arm, "PATCH", "/x", None), None);
        assert_eq!(f.take(Service::Imds, "GET", "/m", Some("vm/b")), None);
        assert_eq!(
            f.take(Service::Imds, "GET", "/m", Some("VM/A")),
            Some(FaultAction::Hang)
        );
        assert_eq!(
            f.take(Service::Imds, "GET", "/m", Some("vm/a")),
            Some(FaultAction::Hang)
        );
    }

    #[test]
    fn faults_deserialize_from_admin_json() {
        let f: Fault = serde_json::from_str(
            r#"{"service":"arm","method":"GET","pathContains":"virtualMachineScaleSets","action":{"kind":"status","status":429,"retryAfter":3},"count":5}"#,
        )
        .expect("json");
        assert_eq!(
            f.action,
            FaultAction::Status {
                status: 429,
                retry_after: Some(3)
            }
        );
        let d: FaultAction =
            serde_json::from_str(r#"{"kind":"delay","seconds":30}"#).expect("json");
        assert_eq!(d, FaultAction::Delay { seconds: 30.0 });
    }
}
