//! Upstream aad-pod-identity v1.8.17's own Go `mic` and `nmi`, built from their
//! Go module and run against the harness's apiserver and the Azure emulator, for
//! the side-by-side benchmark (`tools/bench`) and `tests/tests/upstream.rs`.
//!
//! # What upstream needs here (found by running it)
//!
//! - **Binaries**: `tests/upstream/build.sh` builds `cmd/mic` and `cmd/nmi` from
//!   the module pinned in `tests/upstream/go.mod` (no replace directives are
//!   needed: upstream's go.mod has none) into `$HOME/.cache/aadpodid/upstream`.
//!   [`upstream_bin_dir`] runs it once per process; `AADPODID_UPSTREAM_BIN`
//!   names a folder holding `mic` and `nmi` instead.
//! - **mic**: `--kubeconfig` (client-go, any kubeconfig), `--cloudconfig` (an
//!   azure.json read as YAML: `cloud`, `tenantId`, `aadClientId`,
//!   `aadClientSecret`, `subscriptionId`, `resourceGroup`, ...), environment
//!   `MIC_POD_NAMESPACE` (required: namespace of its ConfigMap),
//!   `AZURE_ENVIRONMENT_FILEPATH` (go-autorest's custom-cloud JSON, read because
//!   `cloud` is `AzureStackCloud`: `resourceManagerEndpoint`,
//!   `activeDirectoryEndpoint`) and `SSL_CERT_FILE` (Go's root CAs: the
//!   emulator's test CA). Its leader lock is an **Endpoints** object in
//!   `--leader-election-namespace`. Its probe and metrics servers listen on all
//!   interfaces (`:<port>`), so each instance needs its own two ports. It asks
//!   AAD for a token whose resource is the environment's
//!   `resourceManagerEndpoint` (not `tokenAudience`), so the emulator's ARM
//!   accepts tokens for its own base URL.
//! - **nmi**: no `--kubeconfig` flag; client-go reads `KUBECONFIG` and falls
//!   back to the in-cluster config (`pkg/k8s/client.go`). `--node` names the
//!   node; `--allow-network-plugin-kubenet` skips reading
//!   `/etc/default/kubelet`. It runs the `iptables` binary of `PATH` (inside the
//!   node namespace it is started in) and DNATs pods' 169.254.169.254:80 to
//!   127.0.0.1:2579, which needs `net.ipv4.conf.all.route_localnet=1` on the
//!   node: upstream never sets it (kube-proxy does on a real node), so
//!   [`upstream_nmi_command`] sets it in the node namespace. Its own IMDS calls
//!   go to 169.254.169.254:80 from the node (not redirected: PREROUTING only).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

use crate::env::PROXY_VARS;
use crate::netns::NetNs;
use crate::tenant::{ENV_AZURE_ENVIRONMENT_FILEPATH, ENV_MIC_POD_NAMESPACE};
use crate::tools::BuiltTool;

/// Upstream's folder: built by `tests/upstream/build.sh` (given 30 minutes
/// when not cached yet: a cold build took 6m42s on 2 busy cores) or named by
/// `$AADPODID_UPSTREAM_BIN`.
static UPSTREAM: BuiltTool =
    BuiltTool::new("tests/upstream/build.sh", Duration::from_secs(30 * 60))
        .named_by("AADPODID_UPSTREAM_BIN", &["mic", "nmi"]);

/// Upstream's release these binaries are built from (`tests/upstream/go.mod`).
pub const UPSTREAM_VERSION: &str = "v1.8.17";

/// Folder holding upstream's `mic` and `nmi`: `$AADPODID_UPSTREAM_BIN` when
/// set, otherwise what `tests/upstream/build.sh` prints (building on first use,
/// cached across runs; once per process).
pub fn upstream_bin_dir() -> anyhow::Result<PathBuf> {
    UPSTREAM.path()
}

/// What upstream MIC is started with. This project's mic takes the same
/// flags and environment ([`MicOptions::flags`], [`MicOptions::env`]).
#[derive(Clone, Debug)]
pub struct MicOptions {
    /// Admin kubeconfig of the cluster (MIC needs endpoints, configmaps, CRDs,
    /// events, pods and nodes).
    pub kubeconfig: PathBuf,
    /// From [`crate::tenant::write_mic_cloud_files`] or any
    /// upstream-compatible azure.json.
    pub azure_json: PathBuf,
    /// go-autorest environment file (`AZURE_ENVIRONMENT_FILEPATH`).
    pub cloud_env_file: PathBuf,
    /// Trusted roots for ARM and AAD (`SSL_CERT_FILE`): the emulator's bundle.
    pub ca_bundle: PathBuf,
    /// `MIC_POD_NAMESPACE` and `--leader-election-namespace`.
    pub namespace: String,
    /// `--leader-election-instance`.
    pub instance: String,
    /// `--http-probe-port` (listens on all interfaces).
    pub probe_port: u16,
    /// `--prometheus-port` (listens on all interfaces).
    pub metrics_port: u16,
    /// Further upstream flags, e.g. `--leader-election-duration=4s` or
    /// `--identity-assignment-reconcile-interval=2s` (Go durations).
    pub extra_args: Vec<String>,
}

impl MicOptions {
    /// The flags every MIC takes: kubeconfig, cloud config, leader election,
    /// probe and metrics ports (not [`MicOptions::extra_args`]).
    pub fn flags(&self) -> [String; 6] {
        [
            format!("--kubeconfig={}", self.kubeconfig.display()),
            format!("--cloudconfig={}", self.azure_json.display()),
            format!("--leader-election-namespace={}", self.namespace),
            format!("--leader-election-instance={}", self.instance),
            format!("--http-probe-port={}", self.probe_port),
            format!("--prometheus-port={}", self.metrics_port),
        ]
    }

    /// MIC's environment: its namespace, the custom-cloud file and the roots
    /// it trusts.
    pub fn env(&self) -> [(&'static str, &OsStr); 3] {
        [
            (ENV_MIC_POD_NAMESPACE, self.namespace.as_ref()),
            (ENV_AZURE_ENVIRONMENT_FILEPATH, self.cloud_env_file.as_ref()),
            ("SSL_CERT_FILE", self.ca_bundle.as_ref()),
        ]
    }
}

/// Upstream MIC's command line and environment, not yet spawned (stdio is the
/// caller's). It dies with the thread that spawns it (`setpriv --pdeathsig`).
pub fn upstream_mic_command(o: &MicOptions) -> anyhow::Result<Command> {
    let bin = upstream_bin_dir()?.join("mic");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--"])
        .arg(bin)
        .args(o.flags())
        .arg("--logtostderr")
        .args(&o.extra_args)
        .envs(o.env())
        .stdin(Stdio::null());
    clean_env(&mut cmd);
    Ok(cmd)
}

/// What upstream NMI is started with.
#[derive(Clone, Debug)]
pub struct NmiOptions {
    /// `--node` (and `NODE_NAME`).
    pub node: String,
    /// A kubeconfig whose server is reachable from inside the node namespace
    /// (passed as `KUBECONFIG`: upstream NMI has no `--kubeconfig` flag).
    pub kubeconfig: PathBuf,
    /// `--http-probe-port` inside the node namespace (the chart uses 8085).
    pub probe_port: u16,
    /// Further upstream flags, e.g. `--retry-attempts-for-created=1`.
    pub extra_args: Vec<String>,
}

/// Upstream NMI's command inside `node`, not yet spawned. Sets the node's
/// `route_localnet` first (see the module docs). It dies with the thread that
/// spawns it.
pub fn upstream_nmi_command(node: &NetNs, o: &NmiOptions) -> anyhow::Result<Command> {
    let bin = upstream_bin_dir()?.join("nmi");
    node.run(
        "sysctl",
        &["-q", "-w", "net.ipv4.conf.all.route_localnet=1"],
    )?;
    let mut cmd = node.command(bin);
    cmd.arg(format!("--node={}", o.node))
        .arg(format!("--http-probe-port={}", o.probe_port))
        .arg("--allow-network-plugin-kubenet")
        .arg("--logtostderr")
        .args(&o.extra_args)
        .env("KUBECONFIG", &o.kubeconfig)
        .env("NODE_NAME", &o.node);
    clean_env(&mut cmd);
    Ok(cmd)
}

/// The last `n` lines of an upstream process's log `text`, without
/// client-go's warning that upstream mic's leader lock (an Endpoints object)
/// is deprecated, which it logs at every renewal.
pub fn log_tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("Endpoints is deprecated"))
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Removes what would send upstream's HTTP elsewhere: proxies (Go honours
/// them, client-go included) and the managed-identity variables adal checks
/// before IMDS.
fn clean_env(cmd: &mut Command) {
    let identity_vars = [
        "MSI_ENDPOINT",
        "MSI_SECRET",
        "IDENTITY_ENDPOINT",
        "IDENTITY_HEADER",
    ];
    for var in PROXY_VARS.into_iter().chain(identity_vars) {
        cmd.env_remove(var);
    }
    cmd.env("NO_PROXY", "127.0.0.1,localhost");
}

/// A running upstream process whose output goes to a log file; killed on drop.
#[derive(Debug)]
pub struct UpstreamChild {
    child: Child,
    log: PathBuf,
}

impl UpstreamChild {
    /// Process ID (for `/proc/<pid>` figures). With `setpriv` and `ip netns
    /// exec` in front this is the upstream binary itself: both exec it.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// What the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Kills the process and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for UpstreamChild {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_logged(mut cmd: Command, log: &Path) -> anyhow::Result<UpstreamChild> {
    let file = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let child = cmd
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .context("spawn upstream binary")?;
    Ok(UpstreamChild {
        child,
        log: log.to_path_buf(),
    })
}

/// Starts upstream MIC ([`upstream_mic_command`]) logging to `log`.
pub fn spawn_upstream_mic(o: &MicOptions, log: &Path) -> anyhow::Result<UpstreamChild> {
    spawn_logged(upstream_mic_command(o)?, log)
}

/// Starts upstream NMI in `node` ([`upstream_nmi_command`]) logging to `log`.
pub fn spawn_upstream_nmi(
    node: &NetNs,
    o: &NmiOptions,
    log: &Path,
) -> anyhow::Result<UpstreamChild> {
    spawn_logged(upstream_nmi_command(node, o)?, log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tails_skip_the_endpoints_warning() {
        let text = "a\nW warnings.go:70] v1 Endpoints is deprecated in v1.33+\nb\nc";
        assert_eq!(log_tail(text, 2), "b\nc");
        assert_eq!(log_tail(text, 9), "a\nb\nc");
        assert_eq!(log_tail("", 3), "");
    }

    #[test]
    fn mic_flags_and_environment() {
        let o = MicOptions {
            kubeconfig: "/k".into(),
            azure_json: "/d/azure.json".into(),
            cloud_env_file: "/d/cloud.json".into(),
            ca_bundle: "/d/ca.pem".into(),
            namespace: "ns".into(),
            instance: "mic-0".into(),
            probe_port: 8080,
            metrics_port: 8888,
            extra_args: vec!["--x".into()],
        };
        assert_eq!(
            o.flags(),
            [
                "--kubeconfig=/k",
                "--cloudconfig=/d/azure.json",
                "--leader-election-namespace=ns",
                "--leader-election-instance=mic-0",
                "--http-probe-port=8080",
                "--prometheus-port=8888",
            ]
        );
        assert_eq!(
            o.env(),
            [
                ("MIC_POD_NAMESPACE", OsStr::new("ns")),
                ("AZURE_ENVIRONMENT_FILEPATH", OsStr::new("/d/cloud.json")),
                ("SSL_CERT_FILE", OsStr::new("/d/ca.pem")),
            ]
        );
    }
}
