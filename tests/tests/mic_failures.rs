//! MIC failure tests on a cluster of their own (its kube-apiserver is stopped
//! and started again) and the Azure emulator over HTTPS.
//!
//! As in `mic_lifecycle.rs`, the Azure SDK trusts the emulator's test CA only
//! through `SSL_CERT_FILE`, so the parent test re-runs this binary on the
//! `child_` tests with the variable set. Each child builds its world
//! (`aadpodid_tests::mic_world`) on a private cluster, so nothing else
//! shares its apiserver.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use aadpodid_tests::http::http_get;
use aadpodid_tests::mic_world::{MicWorld, WAIT, scrape};
use aadpodid_tests::tenant::{APP_CLIENT, APP_RG, APP2_CLIENT, NODE_RG, uai_id};
use aadpodid_tests::wait_for;
use anyhow::Context as _;
use azure_emulator::faults::{Fault, FaultAction};
use azure_emulator::observe::Service;

aadpodid_tests::emulator_ca_parent_test!(
    mic_failures_against_cluster_and_emulator,
    "MICFAIL",
    2,
    600
);

/// A world on a private cluster, the emulator's clock at 10x: a 45 s
/// scale-set write is still running (4.5 s) when the test acts.
async fn world(prefix: &str) -> anyhow::Result<MicWorld> {
    MicWorld::private("MICFAIL", prefix)
        .speed(10.0)
        .logs()
        .build()
        .await
}

/// ARM ID of identity `name` in `rg`, lower case as ARM reports it.
fn uai(rg: &str, name: &str) -> String {
    uai_id(rg, name).to_lowercase()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

/// The `mic` command of this test crate.
fn mic_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_e2e-mic"))
}

/// The AAIs of [`workload`]: pods `a` (node 0) and `c` (the VM) use app-id;
/// pod `b` (node 1) uses app-id and app-2.
const WORKLOAD_AAIS: [(&str, &str); 4] = [
    ("a", "app-id"),
    ("b", "app-id"),
    ("b", "app-2"),
    ("c", "app-id"),
];

/// The identities, bindings and pods both tests use.
async fn workload(w: &MicWorld) -> anyhow::Result<()> {
    w.identity("app-id", &uai_id(APP_RG, "app-id"), APP_CLIENT)
        .await?;
    w.identity("app-2", &uai_id(APP_RG, "app-2"), APP2_CLIENT)
        .await?;
    w.binding("b-one", "app-id", "one").await?;
    w.binding("b-two", "app-2", "two").await?;
    w.binding("b-two-also", "app-id", "two").await?;
    w.pod("a", "one", &w.nodes[0]).await?;
    w.pod("b", "two", &w.nodes[1]).await?;
    w.pod("c", "one", &w.vm_node).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_failures_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_apiserver_restart_mid_run_converges() -> anyhow::Result<()> {
    let w = world("restart").await?;
    // A lease longer than the outage: this replica keeps leading through it
    // (renew deadline 30 s) and must pick its work up where it stopped.
    let mic = w
        .start_mic("mic-restart", &["--leader-election-duration=60s"])
        .await?;
    mic.wait_leading().await?;
    let kubelet = uai(NODE_RG, "kubelet");
    let (app, app2) = (uai(APP_RG, "app-id"), uai(APP_RG, "app-2"));
    let status_errors = "aadpodidentity_kubernetes_api_operations_errors_count{operation_type=\"update_azure_assigned_identity_status\"}";
    let metrics = mic.handles.metrics_addr;
    let cluster = w.private_cluster()?;
    workload(&w).await?;

    // 1. ARM took the scale-set PATCH (its model lists the identity) and the
    // operation runs (4.5 s): the apiserver goes.
    wait_for("the scale-set PATCH accepted", WAIT, || async {
        w.vmss_identities().contains(&app2).then_some(())
    })
    .await?;
    cluster.stop_apiserver().await?;
    // MIC finishes the write and fails to record it on the AAIs.
    wait_for("MIC failing to write an AAI status", WAIT, || async {
        (scrape(metrics, status_errors).await >= 1.0).then_some(())
    })
    .await?;
    cluster.start_apiserver().await?;

    // 2. It converges: every AAI Assigned once, the identities exactly there.
    w.wait_exactly_assigned(&WORKLOAD_AAIS).await?;
    w.wait_identities(&set(&[&kubelet, &app, &app2]), &set(&[&app]))
        .await?;
    assert!(mic.leading(), "still the leader");
    assert!(
        !mic.task.is_finished(),
        "MIC kept running through the outage"
    );
    assert_eq!(
        scrape(metrics, "aadpodidentity_assigned_identity_addition_count").await,
        4.0,
        "each AAI created once"
    );

    // 3. Removal, with the apiserver gone while the PATCH runs.
    let patches = w.vmss_patches();
    let errors = scrape(metrics, status_errors).await;
    w.delete_pods(&["a", "b", "c"]).await?;
    let sent = wait_for("the removal PATCH sent", WAIT, || async {
        (w.vmss_patches() > patches).then_some(())
    })
    .await;
    if let Err(e) = sent {
        anyhow::bail!(
            "{e}; AAIs: {:?}; MIC metrics:\n{}",
            w.aai_states().await?,
            http_get(metrics, "/metrics").await.unwrap_or_default()
        );
    }
    cluster.stop_apiserver().await?;
    // MIC finishes the removal and fails to mark the AAIs Unassigned.
    wait_for("MIC failing to retire an AAI", WAIT, || async {
        (scrape(metrics, status_errors).await > errors).then_some(())
    })
    .await?;
    cluster.start_apiserver().await?;
    w.wait_no_aais().await?;
    w.wait_identities(&set(&[&kubelet]), &BTreeSet::new())
        .await?;
    assert!(
        !mic.task.is_finished(),
        "MIC kept running through the outage"
    );

    mic.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_failures_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_leader_killed_mid_patch_standby_takes_over() -> anyhow::Result<()> {
    let w = world("kill").await?;
    let lease = ["--leader-election-duration=4s"];
    let a = w.spawn_mic_process(mic_bin(), "mic-a", &lease)?;
    wait_for("mic-a holds the lease", WAIT, || async {
        (w.lease_holder().await.as_deref() == Some("mic-a")).then_some(())
    })
    .await
    .with_context(|| a.log_tail())?;
    let b = w.spawn_mic_process(mic_bin(), "mic-b", &lease)?;
    wait_for("mic-b up and standing by", WAIT, || async {
        (b.healthz().await.as_deref() == Some("Not Active")).then_some(())
    })
    .await
    .with_context(|| b.log_tail())?;

    // The leader's first scale-set PATCH is held by ARM for 3 s (30 virtual
    // seconds). Whether ARM still carries it out once its sender is gone
    // does not matter: the standby must converge either way.
    w.emu.inject(
        Fault::new(Service::Arm, FaultAction::Delay { seconds: 30.0 })
            .method("PATCH")
            .path_contains(&w.vmss)
            .times(1),
    );
    workload(&w).await?;
    wait_for("mic-a's PATCH in flight", WAIT, || async {
        (w.emu.counters().faults_fired >= 1).then_some(())
    })
    .await
    .with_context(|| a.log_tail())?;
    a.kill().await?;
    // (Pod c is on the standalone VM, whose write was not held.)
    let states = w.aai_states().await?;
    assert!(
        states
            .iter()
            .filter(|(name, _)| !name.starts_with("c-"))
            .all(|(_, s)| s.as_deref() != Some("Assigned")),
        "killed before any scale-set AAI was Assigned: {states:?}"
    );

    // The standby takes over and finishes the work.
    wait_for("mic-b takes the lease", WAIT, || async {
        (w.lease_holder().await.as_deref() == Some("mic-b")).then_some(())
    })
    .await
    .with_context(|| b.log_tail())?;
    w.wait_exactly_assigned(&WORKLOAD_AAIS).await?;
    let kubelet = uai(NODE_RG, "kubelet");
    let (app, app2) = (uai(APP_RG, "app-id"), uai(APP_RG, "app-2"));
    w.wait_identities(&set(&[&kubelet, &app, &app2]), &set(&[&app]))
        .await?;
    wait_for("mic-b healthz Active", WAIT, || async {
        (b.healthz().await.as_deref() == Some("Active")).then_some(())
    })
    .await?;
    // Nothing flips back: a little later the same AAIs are still all Assigned.
    tokio::time::sleep(Duration::from_secs(2)).await;
    w.wait_exactly_assigned(&WORKLOAD_AAIS).await?;

    // Every identity leaves with its pods, none is orphaned.
    w.delete_pods(&["a", "b", "c"]).await?;
    w.wait_no_aais().await?;
    w.wait_identities(&set(&[&kubelet]), &BTreeSet::new())
        .await?;
    // On stdout, which the parent test prints.
    println!(
        "kill: vmss PATCHes={} operations started={} faults fired={} AAIs created by mic-b={}",
        w.vmss_patches(),
        w.emu.counters().lro_started,
        w.emu.counters().faults_fired,
        b.metric("aadpodidentity_assigned_identity_addition_count")
            .await,
    );
    b.terminate().await
}
