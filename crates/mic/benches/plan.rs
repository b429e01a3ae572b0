//! Plan time over an in-memory index of N pods spread over K scale sets with
//! M identities (one binding each). Prints figures; asserts nothing about time.
//!
//!     cargo bench -p mic --bench plan
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it does nothing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "a benchmark binary reports by printing and may stop on a broken setup"
)]

use std::time::{Duration, Instant};

use aadpodid_api::{
    AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec, AzureIdentitySpec, IdentityType,
};
use k8s_openapi::api::core::v1::{Node, NodeSpec, Pod, PodSpec, PodStatus};
use mic::index::Index;
use mic::plan::{Options, plan};

const NS: &str = "bench";
const IDENTITIES: usize = 50;
const SCALE_SETS: usize = 10;
const NODES_PER_SCALE_SET: usize = 10;

fn rid(name: &str) -> String {
    format!(
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

fn cluster(pods: usize) -> Index {
    let mut ix = Index::default();
    for s in 0..SCALE_SETS {
        for n in 0..NODES_PER_SCALE_SET {
            let mut node = Node::default();
            node.metadata.name = Some(format!("node-{s}-{n}"));
            node.spec = Some(NodeSpec {
                provider_id: Some(format!(
                    "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/vmss-{s}/virtualMachines/{n}"
                )),
                ..Default::default()
            });
            ix.apply_node(&node);
        }
    }
    for i in 0..IDENTITIES {
        let name = format!("id-{i}");
        let mut id = AzureIdentity::new(
            &name,
            AzureIdentitySpec {
                r#type: IdentityType::UserAssignedMsi,
                resource_id: rid(&name),
                client_id: format!("client-{i}"),
                ..Default::default()
            },
        );
        id.metadata.namespace = Some(NS.into());
        ix.apply_identity(&id);
        let mut b = AzureIdentityBinding::new(
            &format!("b-{i}"),
            AzureIdentityBindingSpec {
                azure_identity: name,
                selector: format!("sel-{i}"),
                weight: 0,
            },
        );
        b.metadata.namespace = Some(NS.into());
        ix.apply_binding(&b);
    }
    let nodes = SCALE_SETS * NODES_PER_SCALE_SET;
    for p in 0..pods {
        let mut pod = Pod::default();
        pod.metadata.namespace = Some(NS.into());
        pod.metadata.name = Some(format!("pod-{p}"));
        pod.metadata.labels = Some(
            [(
                "aadpodidbinding".to_string(),
                format!("sel-{}", p % IDENTITIES),
            )]
            .into(),
        );
        pod.spec = Some(PodSpec {
            node_name: Some(format!(
                "node-{}-{}",
                p % nodes / NODES_PER_SCALE_SET,
                p % NODES_PER_SCALE_SET
            )),
            ..Default::default()
        });
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            ..Default::default()
        });
        ix.apply_pod(&pod);
    }
    ix
}

/// The index after a fully successful cycle: every AAI exists and is Assigned.
fn settled(mut ix: Index) -> Index {
    let p = plan(&ix, &Options::default());
    for aai in &p.create {
        let mut a = aai.aai();
        a.status.get_or_insert_default().status = "Assigned".into();
        ix.apply_assigned(&a);
    }
    ix
}

/// Median of `runs` timings of `f`.
fn median(runs: usize, mut f: impl FnMut() -> usize) -> (Duration, usize) {
    let mut times = Vec::with_capacity(runs);
    let mut out = 0;
    for _ in 0..runs {
        let start = Instant::now();
        out = std::hint::black_box(f());
        times.push(start.elapsed());
    }
    times.sort();
    (times[times.len() / 2], out)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("plan benchmark: run with `cargo bench -p mic --bench plan`");
        return;
    }
    let opts = Options::default();
    println!(
        "plan over {IDENTITIES} identities/bindings, {SCALE_SETS} scale sets x {NODES_PER_SCALE_SET} nodes (median)"
    );
    println!(
        "{:>7} {:>12} {:>10} {:>12} {:>10} {:>14} {:>10}",
        "pods", "cold plan", "creates", "steady plan", "work", "1% pods gone", "retired"
    );
    for (pods, runs) in [(100, 21), (1_000, 11), (10_000, 5)] {
        let cold = cluster(pods);
        let (t_cold, creates) = median(runs, || plan(&cold, &opts).create.len());
        let steady = settled(cold.clone());
        let (t_steady, work) = median(runs, || {
            let p = plan(&steady, &opts);
            usize::from(!p.is_empty())
        });
        let mut churn = steady.clone();
        let gone: Vec<_> = churn.pods.keys().take(pods / 100).cloned().collect();
        for k in &gone {
            churn.pods.remove(k);
        }
        let (t_churn, removals) = median(runs, || {
            let p = plan(&churn, &opts);
            p.resources.values().map(|w| w.remove.len()).sum::<usize>() + p.delete_now.len()
        });
        println!(
            "{pods:>7} {:>12?} {creates:>10} {:>12?} {work:>10} {:>14?} {removals:>10}",
            t_cold, t_steady, t_churn
        );
    }
}
