//! RBAC proof for the chart, MIC: the real command `e2e-mic` runs with the
//! container args the chart renders, authenticated as the chart's
//! ServiceAccount (a TokenRequest token) and authorized only by the chart's
//! rendered ClusterRole/Roles and bindings, against the RBAC-enabled test
//! apiserver:
//! - MIC does its whole job: pod + binding -> AzureAssignedIdentity Assigned
//!   and the identity on the emulated scale set, recorded in the ConfigMap
//!   the chart's Role covers, then removed again.
//! - One verb taken out of the rendered ClusterRole makes the job fail.
//!
//! NMI's half of the proof is the test binary `chart_rbac_nmi`.
//!
//! MIC acts on every pod and AzureAssignedIdentity of the cluster, so it
//! would retire the AzureAssignedIdentities the NMI tests write by hand: the
//! two halves are separate test binaries, which cargo runs one after the
//! other, never at the same time.

use std::path::Path;

use aadpodid_api::AzureAssignedIdentity;
use aadpodid_tests::chart_release::{
    Release, WAIT, apply_identity_binding_pod, kubectl_in, log_of, with_log, without_verb,
};
use aadpodid_tests::mic_world::MicWorld;
use aadpodid_tests::tenant::APP_ID;
use aadpodid_tests::{Cluster, free_ports, wait_for};
use azure_emulator::config::LroMode;

/// The AzureAssignedIdentity MIC makes for pod `web` in `ns` (None also
/// when it cannot be read).
async fn aai(world: &MicWorld, ns: &str) -> Option<AzureAssignedIdentity> {
    world.aai(&format!("web-{ns}-app-id")).await.ok()?
}

/// Deletes pod `web` at once (no kubelet runs to finish a graceful deletion).
const FORCE_DELETE_WEB: [&str; 5] = ["delete", "pod", "web", "--grace-period=0", "--force"];

/// MIC with exactly the chart's rules does its whole job; without `create`
/// on AzureAssignedIdentities it cannot. One test: two MICs at once would
/// both act on every pod of the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mic_does_its_job_with_the_chart_rbac_and_fails_without_one_verb() -> anyhow::Result<()> {
    // No lock against the NMI tests: they are the other test binary
    // (chart_rbac_nmi), and cargo runs test binaries one at a time.
    let cluster = Cluster::shared();
    // Standalone: MIC runs only as a process, which is given the
    // emulator's CA; ARM's writes complete in their first answer.
    let world = MicWorld::standalone("rbac-mic")
        .tenant(|cfg| cfg.arm.lro_mode = LroMode::Sync)
        .build()
        .await?;
    for (case, broken) in [("full", false), ("no-create", true)] {
        let ports = free_ports()?;
        let [probe, metrics] = ports.map(|p| p.to_string());
        let rel = Release::render(
            &format!("rbac-mic-{case}"),
            &[("mic.probePort", &probe), ("mic.prometheusPort", &metrics)],
        )
        .await?;
        if broken {
            rel.apply_rbac("mic", without_verb("azureassignedidentities", "create"))?;
        } else {
            rel.apply_rbac("mic", |_| Ok(()))?;
        }
        let kubeconfig = rel.sa_kubeconfig("mic", None, world.dir()).await?;
        // The rendered args (azure.json at the test's path), as the chart's
        // ServiceAccount, with the env the pod gets.
        let pod = format!("{}-0", rel.mic());
        let line = world.chart_mic_command_line(
            &rel.get("Deployment", &rel.mic())?,
            &pod,
            rel.ns.name(),
            &kubeconfig,
            &["--identity-assignment-reconcile-interval=2s"],
        )?;
        let mic = world.spawn_mic(Path::new(env!("CARGO_BIN_EXE_e2e-mic")), &pod, line, ports)?;
        let log = mic.log.clone();
        apply_identity_binding_pod(cluster, rel.ns.name(), "web", "rbac-app", &world.nodes[0])?;
        let ns = rel.ns.name().to_string();
        if !broken {
            let r = wait_for("AAI Assigned", WAIT, || async {
                aai(&world, &ns)
                    .await
                    .filter(|a| a.status.as_ref().is_some_and(|s| s.status == "Assigned"))
            })
            .await;
            // (On an error MIC is killed as it is dropped.)
            with_log(r, "MIC", &log)?;
            assert!(world.on_vmss(APP_ID), "identity on the scale set");
            // What MIC added is recorded in the one ConfigMap its Role covers.
            let owned = kubectl_in(
                cluster,
                &ns,
                &[
                    "get",
                    "configmap",
                    "aad-pod-identity-mic-owned",
                    "-o",
                    "name",
                ],
            )?;
            assert!(
                owned.success,
                "{}\nMIC log:\n{}",
                owned.stderr,
                log_of(&log)
            );
            // The Lease is in the namespace the chart's Role covers.
            let lease = kubectl_in(
                cluster,
                &ns,
                &["get", "lease", "aad-pod-identity-mic", "-o", "name"],
            )?;
            assert!(lease.success, "{}", lease.stderr);
            // NMI's IdentityNotOnNode Events: MIC reads them in its own
            // namespace only.
            let mic_can = |args: &[&str]| -> anyhow::Result<bool> {
                let who = format!("--as=system:serviceaccount:{ns}:{}", rel.mic());
                let mut all = vec!["auth", "can-i"];
                all.extend_from_slice(args);
                all.push(&who);
                Ok(rel.cluster.kubectl_run(&all, None)?.stdout.trim() == "yes")
            };
            assert!(mic_can(&["watch", "events", "-n", &ns])?);
            assert!(!mic_can(&["list", "events", "-n", "default"])?);
            assert!(!mic_can(&["list", "events", "-A"])?);
            let del = kubectl_in(cluster, &ns, &FORCE_DELETE_WEB)?;
            assert!(del.success, "{}", del.stderr);
            let r = wait_for("identity removed", WAIT, || async {
                (aai(&world, &ns).await.is_none() && !world.on_vmss(APP_ID)).then_some(())
            })
            .await;
            mic.kill().await?;
            with_log(r, "MIC", &log)?;
            assert!(!log_of(&log).contains("forbidden"), "{}", log_of(&log));
        } else {
            // The apiserver refuses the create; nothing is assigned.
            let r = wait_for("MIC's create refused", WAIT, || async {
                log_of(&log).contains("forbidden").then_some(())
            })
            .await;
            mic.kill().await?;
            with_log(r, "MIC", &log)?;
            assert!(
                aai(&world, &ns).await.is_none(),
                "no AzureAssignedIdentity without create"
            );
            let _ = kubectl_in(cluster, &ns, &FORCE_DELETE_WEB);
        }
        rel.delete_cluster_scoped();
    }
    world.cleanup().await;
    Ok(())
}
