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

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use aadpodid_api::AzureAssignedIdentity;
use aadpodid_tests::chart_release::{
    Release, WAIT, apply_identity_binding_pod, kubectl_in, log_of, submit, with_log, without_verb,
};
use aadpodid_tests::helm;
use aadpodid_tests::tenant::{
    self, APP_ID, APP_RG, CloudEnvironment, KUBELET, MicCloud, MicCloudFiles, Tenant,
};
use aadpodid_tests::{Cluster, free_ports, unique_name, wait_for};
use anyhow::Context as _;
use azure_emulator::Emulator;
use azure_emulator::config::LroMode;
use kube::Api;
use serde_json::json;

/// The emulated tenant MIC works on: one scale-set node, MIC's files.
struct MicWorld {
    emu: Emulator,
    dir: PathBuf,
    files: MicCloudFiles,
    vmss: String,
    node: String,
}

impl MicWorld {
    async fn new(cluster: &Cluster) -> anyhow::Result<MicWorld> {
        let dir = std::env::temp_dir().join(unique_name("chart-rbac-mic"));
        std::fs::create_dir_all(&dir)?;
        let vmss = unique_name("rbac-vmss");
        let mut seeds = Tenant::standard().scale_set(&vmss, 1, &[KUBELET]);
        seeds.config_mut().arm.lro_mode = LroMode::Sync;
        let emu = seeds.start().await?;
        let files = tenant::write_mic_cloud_files(
            &dir,
            "",
            &MicCloud::standard(),
            &CloudEnvironment::of(&emu),
        )?;
        let node = unique_name("rbac-node");
        let provider_id = tenant::vmss_provider_id(tenant::NODE_RG, &vmss, 0);
        let object = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node},
            "spec": {"providerID": provider_id},
        });
        submit(cluster, &["apply"], &object)?;
        Ok(MicWorld {
            emu,
            dir,
            files,
            vmss,
            node,
        })
    }

    fn on_vmss(&self) -> bool {
        self.emu
            .assigned_identities(&self.vmss)
            .unwrap_or_default()
            .contains(&tenant::uai_id(APP_RG, APP_ID).to_lowercase())
    }

    /// Starts `e2e-mic` with the rendered args (azure.json at the test's
    /// path), as the chart's ServiceAccount.
    fn start_mic(&self, rel: &Release, kubeconfig: &Path, log: &Path) -> anyhow::Result<Child> {
        let deploy = rel.get("Deployment", &rel.mic())?;
        let args: Vec<String> = helm::container_args(&deploy)
            .into_iter()
            .map(|a| {
                if a.starts_with("--cloudconfig=") {
                    format!("--cloudconfig={}", self.files.azure_json.display())
                } else {
                    a
                }
            })
            .chain([
                format!("--kubeconfig={}", kubeconfig.display()),
                "--identity-assignment-reconcile-interval=2s".into(),
            ])
            .collect();
        Command::new(env!("CARGO_BIN_EXE_e2e-mic"))
            .args(&args)
            // What the pod gets: the downward API and the custom-cloud file.
            .env("MIC_POD_NAMESPACE", rel.ns.name())
            .env("FORCENAMESPACED", "false")
            .env("HOSTNAME", format!("{}-0", rel.mic()))
            .env(
                tenant::ENV_AZURE_ENVIRONMENT_FILEPATH,
                &self.files.environment,
            )
            .env("SSL_CERT_FILE", self.emu.ca_bundle_path())
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .context("e2e-mic")
    }

    fn cleanup(&self, cluster: &Cluster) {
        let _ = cluster.kubectl_run(&["delete", "node", &self.node, "--ignore-not-found"], None);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn aai(ns: &str) -> Option<AzureAssignedIdentity> {
    let client = Cluster::shared().admin_client().await.ok()?;
    Api::<AzureAssignedIdentity>::namespaced(client, "default")
        .get_opt(&format!("web-{ns}-app-id"))
        .await
        .ok()?
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
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
    let world = MicWorld::new(cluster).await?;
    for (case, broken) in [("full", false), ("no-create", true)] {
        let [probe, metrics] = free_ports()?.map(|p| p.to_string());
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
        let kubeconfig = rel.sa_kubeconfig("mic", None, &world.dir).await?;
        let log = world.dir.join(format!("mic-{case}.log"));
        let mut mic = world.start_mic(&rel, &kubeconfig, &log)?;
        apply_identity_binding_pod(cluster, rel.ns.name(), "web", "rbac-app", &world.node)?;
        let ns = rel.ns.name().to_string();
        if !broken {
            let r = wait_for("AAI Assigned", WAIT, || async {
                aai(&ns)
                    .await
                    .filter(|a| a.status.as_ref().is_some_and(|s| s.status == "Assigned"))
            })
            .await;
            if r.is_err() {
                stop(&mut mic);
            }
            with_log(r, "MIC", &log)?;
            assert!(world.on_vmss(), "identity on the scale set");
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
            let del = kubectl_in(cluster, &ns, &FORCE_DELETE_WEB)?;
            assert!(del.success, "{}", del.stderr);
            let r = wait_for("identity removed", WAIT, || async {
                (aai(&ns).await.is_none() && !world.on_vmss()).then_some(())
            })
            .await;
            stop(&mut mic);
            with_log(r, "MIC", &log)?;
            assert!(!log_of(&log).contains("forbidden"), "{}", log_of(&log));
        } else {
            // The apiserver refuses the create; nothing is assigned.
            let r = wait_for("MIC's create refused", WAIT, || async {
                log_of(&log).contains("forbidden").then_some(())
            })
            .await;
            stop(&mut mic);
            with_log(r, "MIC", &log)?;
            assert!(
                aai(&ns).await.is_none(),
                "no AzureAssignedIdentity without create"
            );
            let _ = kubectl_in(cluster, &ns, &FORCE_DELETE_WEB);
        }
        rel.delete_cluster_scoped();
    }
    world.cleanup(cluster);
    Ok(())
}
