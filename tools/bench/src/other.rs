//! Row 7: whether a scale set's running write delays pods elsewhere. A pod
//! A on one of the burst's scale sets asks for an identity the scale set
//! does not have; a quarter into that write (LRO), a pod B on NMI's node
//! (another scale set) and a pod C on the standalone VM's node (its own
//! NMI) ask for identities of their own. B's and C's time to a token in
//! their pods, minus their own writes, tells whether they waited for A's.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use aadpodid_testkit::world::vmss_name;
use anyhow::{Context as _, bail};
use azure_emulator::state::OperationSpan;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;

use crate::report::{Figures, Metric};
use crate::stats::Summary;
use crate::subject::{move_pod_ip_in, own_lro, token_after};
use crate::world::{NMI_VMSS, Target, World};

/// One sample: A's write, and B's and C's waits and writes.
#[derive(Clone, Debug)]
struct Sample {
    a_vmss: String,
    a: OperationSpan,
    b: Timed,
    c: Timed,
}

/// A timed pod: its wait for a token (wall) and its own write.
#[derive(Clone, Debug)]
struct Timed {
    took: Duration,
    lro: Duration,
    write: OperationSpan,
}

impl Timed {
    /// Time to its token minus its own write, wall ms.
    fn beyond_ms(&self) -> f64 {
        (self.took.as_secs_f64() - self.lro.as_secs_f64()) * 1000.0
    }
}

impl Sample {
    /// One line of details: each pod's figure, L, and when its write began
    /// against the end of A's (emulated s; negative: while A's ran).
    fn line(&self, k: usize) -> String {
        let rel = |p: &Timed| (p.write.start_ms as f64 - self.a.end_ms as f64) / 1000.0;
        format!(
            "sample {k}: A on {} (L {:.1} emulated s); B {:.0} ms (L {:.0} wall ms, its write began {:+.1} emulated s after A's ended); C {:.0} ms (L {:.0} wall ms, its write began {:+.1} emulated s after A's ended)",
            self.a_vmss,
            self.a.duration().as_secs_f64(),
            self.b.beyond_ms(),
            self.b.lro.as_secs_f64() * 1000.0,
            rel(&self.b),
            self.c.beyond_ms(),
            self.c.lro.as_secs_f64() * 1000.0,
            rel(&self.c),
        )
    }
}

/// The row: `other_samples` samples, then B's and C's medians, minima and
/// maxima, with a line of details per sample.
pub(crate) async fn row(w: &mut World, f: &mut Figures) -> anyhow::Result<()> {
    let n = w.scale.other_samples.max(1);
    let first = w.scale.other_first_identity();
    w.ensure_identities(first + 3 * n).await?;
    w.start_vm_nmi().await?;
    let mut samples = Vec::with_capacity(n);
    for k in 0..n {
        samples.push(sample(w, k, first + 3 * k).await?);
    }
    let b: Vec<f64> = samples.iter().map(|s| s.b.beyond_ms()).collect();
    let c: Vec<f64> = samples.iter().map(|s| s.c.beyond_ms()).collect();
    let (b, c) = (
        Summary::of(&b).context("no sample")?,
        Summary::of(&c).context("no sample")?,
    );
    f.set(Metric::OtherScaleSet, b.median);
    f.set(Metric::OtherScaleSetMin, b.min);
    f.set(Metric::OtherScaleSetMax, b.max);
    f.set(Metric::OtherVm, c.median);
    f.set(Metric::OtherVmMin, c.min);
    f.set(Metric::OtherVmMax, c.max);
    let lines: Vec<String> = samples.iter().enumerate().map(|(k, s)| s.line(k)).collect();
    f.note(format!(
        "another scale set or VM while one write runs (ms, minus each pod's own L): {}",
        lines.join("; ")
    ));
    Ok(())
}

/// Sample `k` with identities `j` (A), `j + 1` (B) and `j + 2` (C); every
/// pod of the row Assigned before it returns, so the next sample starts
/// with no write running.
async fn sample(w: &mut World, k: usize, j: usize) -> anyhow::Result<Sample> {
    let ns = w.ns_other.name().to_string();
    let (ip_b, ip_c) = (w.node_pod(0, 0)?.1, w.node_pod(1, 0)?.1);
    vacate(w, &[ip_b, ip_c], k).await?;
    let s = k % w.scale.vmss.max(1);
    let a_vmss = vmss_name(s);
    let node_a = w
        .nodes
        .get(s * w.scale.nodes_per_vmss)
        .context("no node of the scale set")?
        .clone();
    let since = w.emulated_ms()?;
    w.create_pods(&ns, vec![(format!("other-a-{k}"), node_a, j, None)])
        .await?;
    let a = first_write(w, Target::ScaleSet(&a_vmss), since).await?;
    // A quarter into A's write, on the emulated clock.
    let at = a.start_ms + a.duration().as_millis() as u64 / 4;
    let now = w.emulated_ms()?;
    if at > now {
        tokio::time::sleep(w.scale.wall(Duration::from_millis(at - now))).await;
    }
    let since = w.emulated_ms()?;
    let t0 = Instant::now();
    let pods = vec![
        (
            format!("other-b-{k}"),
            w.nmi_node.clone(),
            j + 1,
            Some(ip_b),
        ),
        (format!("other-c-{k}"), w.vm_node.clone(), j + 2, Some(ip_c)),
    ];
    w.create_pods(&ns, pods).await?;
    let (b, c) = tokio::join!(
        token_after(w.node_pod(0, 0)?.0, t0, "B"),
        token_after(w.node_pod(1, 0)?.0, t0, "C")
    );
    let (b, c) = (b?, c?);
    let pod = |took, target, name: &str| -> anyhow::Result<Timed> {
        let writes = w.writes_since(target, since)?;
        Ok(Timed {
            took,
            lro: own_lro(w, &writes, name)?,
            write: writes.first().context("no write")?.clone(),
        })
    };
    let b = pod(b, Target::ScaleSet(NMI_VMSS), "B")?;
    let vm = w.vm_node.clone();
    let c = pod(c, Target::Vm(&vm), "C")?;
    w.wait_assigned(&ns, 3 * (k + 1), Duration::from_millis(100))
        .await?;
    Ok(Sample { a_vmss, a, b, c })
}

/// The first write to `target` started at `since_ms` or later, once there
/// is one (60 s wall at most).
async fn first_write(
    w: &mut World,
    target: Target<'_>,
    since_ms: u64,
) -> anyhow::Result<OperationSpan> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(op) = w.writes_since(target, since_ms)?.into_iter().next() {
            return Ok(op);
        }
        let mic = w.mic()?;
        if let Some(status) = mic.exited() {
            bail!("MIC exited ({status}): {}", mic.log_tail(20));
        }
        if Instant::now() >= deadline {
            bail!("no write to {target:?} within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pods of NMI's namespace or this row's at one of `ips` reported at
/// addresses no namespace backs (`10.246.1.x`), so that the next pods are
/// alone at them; then time for the NMIs' watches to see it.
async fn vacate(w: &World, ips: &[Ipv4Addr], k: usize) -> anyhow::Result<()> {
    let mut moved = 0;
    for ns in [w.ns_nmi.name(), w.ns_other.name()] {
        let pods = Api::<Pod>::namespaced(w.client.clone(), ns)
            .list(&Default::default())
            .await?;
        for p in pods.items {
            let ip = p.status.as_ref().and_then(|s| s.pod_ip.as_deref());
            if !ips.iter().any(|a| Some(a.to_string().as_str()) == ip) {
                continue;
            }
            let name = p.metadata.name.clone().unwrap_or_default();
            let away = Ipv4Addr::new(10, 246, 1, ((2 * k + moved) % 250 + 1) as u8);
            move_pod_ip_in(w, ns, &name, away).await?;
            moved += 1;
        }
    }
    if moved > 0 {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}
