//! One in-place upgrade from upstream v1.8.17 to this project and the
//! rollback, end to end, counting everything together (the kit's
//! [`aadpodid_tests::e2e::upgrade::run`]).
//!
//! On a cluster of its own and the Azure emulator: two nodes (network
//! namespaces with real iptables, IMDS inside each), upstream's real Go mic
//! (two replicas) and Go nmi first, four pods asking for tokens throughout.
//! Upgrade: this project's nmi surged on each node, this project's mic
//! replicas beside Go mic's, Go mic stopped. Rollback: Go nmi back on each
//! node (delete first, as upstream's chart rolls), Go mic back, ours stopped.
//! Both mics run with a 4 s leader lease; mic's and nmi's arguments are the
//! kit's plain flags, and they act as the apiserver's admin.
//!
//! Three tests, one per way the objects come: processes only; Helm (upstream's
//! chart 4.1.18 installed before Go starts, this project's CRDs and `helm
//! upgrade` right before the processes are swapped, `helm rollback` before
//! they are swapped back); flat manifests (`kubectl apply` of upstream's
//! `deploy/infra/deployment-rbac.yaml`, of this project's, of upstream's
//! again and the deletes docs/migration.md names). Each object step fails the
//! run if an object was deleted and created again or a second nmi DaemonSet
//! or mic Deployment appeared; its duration is printed with the figures.
//!
//! Asserted in both directions: never two mics acting at once (the ARM
//! request log by api-version against the Endpoints lock and the Lease,
//! sampled every 100 ms), no identity removed from a scale set while a pod
//! needed it, no ARM write and no AzureAssignedIdentity written by the mic
//! taking over (everything was assigned already), every pod with its
//! token before and after, and in the surge upgrade no pod request reaching
//! IMDS around nmi. Token errors during the swaps are counted and printed.
//!
//! `AADPODID_UPGRADE_NMI_ORDER=delete-first` runs the upgrade with Go nmi
//! stopped before ours starts (the order of upstream's chart) instead: the
//! IMDS-direct assertion is then expected to fail.

use std::time::Instant;

use aadpodid_tests::e2e::upgrade::{
    self, NmiOrder, ObjectStep, Side, Sides, UpgradePath, UpgradePlan,
};
use aadpodid_tests::e2e::{Options, Program};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrade_from_upstream_and_rollback() -> anyhow::Result<()> {
    upgrade_and_rollback(UpgradePath::Processes).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn helm_upgrade_from_upstream_chart_and_rollback() -> anyhow::Result<()> {
    upgrade_and_rollback(UpgradePath::Helm).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manifests_upgrade_from_upstream_and_rollback() -> anyhow::Result<()> {
    upgrade_and_rollback(UpgradePath::Manifests).await
}

/// The run on `path`, asserted.
async fn upgrade_and_rollback(path: UpgradePath) -> anyhow::Result<()> {
    let t = Instant::now();
    let sides = Sides {
        upstream_mic: Program::upstream("mic")?,
        upstream_nmi: Program::upstream("nmi")?,
        our_mic: Program::binary(env!("CARGO_BIN_EXE_e2e-mic")),
        our_nmi: Program::binary(env!("CARGO_BIN_EXE_e2e-nmi")),
    };
    let mut plan = UpgradePlan::new(sides);
    plan.path = path;
    if std::env::var("AADPODID_UPGRADE_NMI_ORDER").as_deref() == Ok("delete-first") {
        plan.upgrade_nmi = NmiOrder::DeleteFirst;
    }
    let mut opts = Options::new("/unused", "/unused");
    opts.scale_sets = 2;
    opts.instances = 1;
    opts.pods_per_node = 2;
    opts.identities = 3;
    let run = upgrade::run(opts, &plan).await?;
    eprintln!("{}", run.blocks());
    eprintln!("{}: wall {:.1?}", path.name(), t.elapsed());
    let mut bad = run.upgrade.violations(Side::Ours);
    bad.extend(run.rollback.violations(Side::Upstream));
    if run.upgrade.imds_direct != 0 {
        bad.push(format!(
            "upgrade: {} pod requests reached IMDS around nmi",
            run.upgrade.imds_direct
        ));
    }
    if path != UpgradePath::Processes {
        // The workloads' images as the apiserver held them after the install,
        // the upgrade and the rollback: upstream's, ours, upstream's.
        let last = |steps: &[ObjectStep]| steps.last().map(|o| o.images.clone());
        let images = [
            run.install.as_ref().map(|o| o.images.clone()),
            last(&run.upgrade.objects),
            last(&run.rollback.objects),
        ];
        let upstream = |i: &Option<Vec<String>>| {
            i.as_ref()
                .is_some_and(|i| i.len() == 2 && i.iter().all(|i| i.ends_with(":v1.8.17")))
        };
        let ours = |i: &Option<Vec<String>>| {
            i.as_ref()
                .is_some_and(|i| i.len() == 2 && i.iter().all(|i| i.ends_with("-rs.0")))
        };
        if !(upstream(&images[0]) && ours(&images[1]) && upstream(&images[2])) {
            bad.push(format!(
                "{}: workload images after install, upgrade, rollback: {images:?}",
                path.name()
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    Ok(())
}
