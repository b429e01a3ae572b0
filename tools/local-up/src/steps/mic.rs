//! Step 4: two mic replicas (this binary in the mic role) with leader
//! election, configured as on AKS: azure.json with mic's service principal,
//! and the custom-cloud file that points it at the emulator.

use std::path::Path;

use aadpodid_testkit::tenant::{
    CloudEnvironment, MicCloud, mic_args, mic_env, write_mic_cloud_files,
};
use aadpodid_testkit::{Cluster, free_ports};
use azure_emulator::Emulator;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::Api;

use crate::registry::Reg;
use crate::role::Role;
use crate::say::{done, info, step};
use crate::steps::{spawn_logged, wait};

/// The Lease mic's leader holds (mic's default name, in the namespace given).
const LEASE: (&str, &str) = ("default", "aad-pod-identity-mic");

/// Writes mic's configuration files under `dir`, starts the replicas and
/// waits for one to hold the Lease.
pub async fn start(
    registry: &Reg,
    dir: &Path,
    cluster: &Cluster,
    client: &Client,
    emu: &Emulator,
) -> anyhow::Result<()> {
    let t = step(4, "mic: 2 replicas (processes) with leader election");
    let files = write_mic_cloud_files(dir, "", &MicCloud::standard(), &CloudEnvironment::of(emu))?;
    let mic = Role::Mic.program()?;
    for i in 0..2 {
        let [probe, metrics] = free_ports()?;
        let instance = format!("mic-{i}");
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"])
            .arg(&mic.path)
            .envs(mic.env.iter().cloned())
            .args(mic_args(&files, cluster.kubeconfig(), &instance, LEASE.0))
            .arg(format!("--http-probe-port={probe}"))
            .arg(format!("--prometheus-port={metrics}"))
            .envs(mic_env(&files, LEASE.0))
            .env("SSL_CERT_FILE", emu.ca_bundle_path())
            .env("NO_PROXY", "127.0.0.1,localhost");
        let pid = spawn_logged(registry, dir, &instance, &mut cmd)?;
        info(&format!(
            "{instance}: pid {pid}, probes on 127.0.0.1:{probe}"
        ));
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE.0);
    let leader = wait("a mic replica to take the lease", || async {
        leases
            .get_opt(LEASE.1)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    })
    .await?;
    info(&format!(
        "leader: {leader} (Lease {}/{}); the other replica stands by",
        LEASE.0, LEASE.1
    ));
    done(t);
    Ok(())
}
