//! Command-line flags, spelled and defaulted as upstream NMI v1.8.17
//! (docs/upstream-behaviour.md#flags-and-defaults), so the upstream chart's and
//! manifests' container args keep working. Upstream parses with pflag and Go's
//! `flag`: booleans take `--x`, `--x=true` or `--x=false` (never a separate
//! value word), which [`go_bool_syntax`] gives every boolean flag.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// `true` when upstream's environment variable turns namespaced mode on.
pub const ENV_FORCE_NAMESPACED: &str = aadpodid_api::ENV_FORCE_NAMESPACED;

/// How NMI decides which identities a pod may use (`--operation-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperationMode {
    /// MIC writes AzureAssignedIdentities; NMI serves the pod's Assigned ones.
    Standard,
    /// No MIC: bindings and identities in the pod's namespace decide, with no
    /// waiting.
    Managed,
}

// Go's boolean flag syntax (shared with mic).
use aadpodid_runtime::flags::go_bool_syntax;

/// A taint key as Kubernetes validates it (a qualified name: an optional
/// DNS-subdomain prefix and `/`, then 1-63 characters of `[A-Za-z0-9._-]`
/// starting and ending with an alphanumeric), or empty for "off".
pub fn taint_key(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Ok(String::new());
    }
    let bad = || {
        format!(
            "invalid taint key {s:?}: want [prefix/]name, name 1-63 of [A-Za-z0-9._-] starting and ending alphanumeric"
        )
    };
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let edge_ok = |t: &str| {
        t.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && t.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
    };
    if name.is_empty()
        || name.len() > 63
        || !edge_ok(name)
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(bad());
    }
    if let Some(p) = prefix
        && (p.is_empty()
            || p.len() > 253
            || !p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && edge_ok(l)
                    && l.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            }))
    {
        return Err(bad());
    }
    Ok(s.to_string())
}

fn token_source(s: &str) -> Result<aadpodid_api::TokenSource, String> {
    aadpodid_api::TokenSource::parse(s)
        .map_err(|e| format!("invalid token source {:?}: use imds or federated", e.0))
}

fn operation_mode(s: &str) -> Result<OperationMode, String> {
    // Upstream lower-cases the value before comparing.
    match s.to_ascii_lowercase().as_str() {
        "standard" => Ok(OperationMode::Standard),
        "managed" => Ok(OperationMode::Managed),
        other => Err(format!(
            "invalid operation mode {other:?}: use standard or managed"
        )),
    }
}

/// NMI's flags. Field names follow the flag; upstream's camelCase spellings are
/// kept verbatim in `long = ...`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "nmi",
    about = "Node Managed Identity agent",
    disable_version_flag = true,
    mut_args = go_bool_syntax
)]
pub struct Args {
    /// Print the version and exit.
    #[arg(long, default_value = "false")]
    pub version: bool,

    /// Address the token service listens on (and the DNAT target; 0.0.0.0 means 127.0.0.1 for the rule).
    #[arg(long = "nmi-listen-address", default_value = "127.0.0.1")]
    pub nmi_listen_address: IpAddr,

    /// Port of the token service.
    #[arg(long = "nmi-port", default_value_t = 2579)]
    pub nmi_port: u16,

    /// IMDS address that the iptables rule redirects and other paths are proxied to.
    #[arg(long = "metadata-ip", default_value = "169.254.169.254")]
    pub metadata_ip: Ipv4Addr,

    /// IMDS port that the iptables rule redirects and other paths are proxied to.
    #[arg(long = "metadata-port", default_value_t = 80)]
    pub metadata_port: u16,

    /// This node's name (the chart passes `$(NODE_NAME)`).
    #[arg(long, default_value = "", env = "NODE_NAME")]
    pub node: String,

    /// Seconds between iptables checks.
    #[arg(long = "ipt-update-interval-sec", default_value_t = 60)]
    pub ipt_update_interval_sec: u64,

    /// Identities, bindings and pods must share a namespace (also env FORCENAMESPACED=true).
    #[arg(long = "forceNamespaced", default_value = "false")]
    pub force_namespaced: bool,

    /// Namespace of the MIC pods, which get node-level tokens.
    #[arg(long = "MICNamespace", default_value = "default")]
    pub mic_namespace: String,

    /// Port of `/healthz` (the chart uses 8085).
    #[arg(long = "http-probe-port", default_value_t = 8080)]
    pub http_probe_port: u16,

    /// Upstream's wait budget, in intervals, for an identity MIC has not created yet.
    #[arg(long = "retry-attempts-for-created", default_value_t = 16)]
    pub retry_attempts_for_created: u32,

    /// Additional intervals to wait for a Created identity to become Assigned.
    #[arg(long = "retry-attempts-for-assigned", default_value_t = 4)]
    pub retry_attempts_for_assigned: u32,

    /// Seconds per interval of the two budgets above.
    #[arg(long = "find-identity-retry-interval", default_value_t = 5)]
    pub find_identity_retry_interval: u64,

    /// Accepted for compatibility; this NMI serves no pprof.
    #[arg(long = "enableProfile", default_value = "false")]
    pub enable_profile: bool,

    /// Watch only AzureAssignedIdentities labelled `nodename=<node>`.
    #[arg(long = "enableScaleFeatures", default_value = "true")]
    pub enable_scale_features: bool,

    /// Answer `/metadata/instance*` with 403.
    #[arg(long = "block-instance-metadata", default_value = "false")]
    pub block_instance_metadata: bool,

    /// Forward `POST /metadata/scheduledevents` (acknowledging, and so
    /// expediting, the node's scheduled events) to IMDS; refused by default.
    #[arg(long = "allow-scheduled-events-post", default_value = "false")]
    pub allow_scheduled_events_post: bool,

    /// More IMDS paths (with their sub-paths) forwarded by GET,
    /// comma-separated, e.g. `/metadata/loadbalancer`. Each must be canonical,
    /// under `/metadata/` and outside `/metadata/identity`.
    #[arg(long = "proxy-allowed-paths", value_delimiter = ',', value_parser = crate::request::extra_proxy_path)]
    pub proxy_allowed_paths: Vec<String>,

    /// Require `Metadata: true` on token and proxied requests.
    #[arg(long = "metadata-header-required", default_value = "true")]
    pub metadata_header_required: bool,

    /// Port of `/metrics`.
    #[arg(long = "prometheus-port", default_value_t = 9090)]
    pub prometheus_port: u16,

    /// `standard` or `managed` (case-insensitive).
    #[arg(long = "operation-mode", default_value = "standard", value_parser = operation_mode)]
    pub operation_mode: OperationMode,

    /// Start even when the kubelet uses kubenet (ARP spoofing risk, CVE-2021-1677).
    #[arg(long = "allow-network-plugin-kubenet", default_value = "false")]
    pub allow_network_plugin_kubenet: bool,

    /// The kubelet's flags file, checked for `--network-plugin=kubenet`.
    #[arg(long = "kubelet-config", default_value = "/etc/default/kubelet")]
    pub kubelet_config: PathBuf,

    /// Identity lookup failures become 503 with `Retry-After: 20` instead of 404.
    #[arg(long = "set-retry-after-header", default_value = "false")]
    pub set_retry_after_header: bool,

    /// Delete conntrack entries to the metadata address after the first iptables sync.
    #[arg(long = "enable-conntrack-deletion", default_value = "false")]
    pub enable_conntrack_deletion: bool,

    /// `text` or `json`.
    #[arg(long = "log-format", default_value = "text")]
    pub log_format: String,

    /// Appended to the User-Agent of NMI's own requests.
    #[arg(long = "custom-user-agent", default_value = "")]
    pub custom_user_agent: String,

    /// klog verbosity; accepted for compatibility (use RUST_LOG).
    #[arg(short = 'v', long = "v", default_value_t = 0, hide = true)]
    pub verbosity: i32,

    /// klog flag; accepted for compatibility (logs always go to stderr).
    #[arg(long = "logtostderr", default_value = "true", hide = true)]
    pub logtostderr: bool,

    /// klog flag; accepted for compatibility (logs always go to stderr).
    #[arg(long = "alsologtostderr", default_value = "false", hide = true)]
    pub alsologtostderr: bool,

    /// klog's other flags, accepted as upstream's `klog.InitFlags` (added
    /// to pflag) took them and named in one warning at start.
    #[command(flatten)]
    pub klog: aadpodid_runtime::flags::KlogFlags,

    // ---- beyond upstream ----
    /// Kubeconfig file (default: in-cluster, else $KUBECONFIG).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,

    /// Base URL of IMDS for NMI's own token requests (upstream hard-codes it; tests point it elsewhere).
    #[arg(long = "imds-endpoint", default_value = "http://169.254.169.254")]
    pub imds_endpoint: String,

    /// Remove the iptables chain and jump, then exit (the chart's uninstall hook).
    /// Without it NMI leaves the redirect in place when it stops, so pods never
    /// reach the real IMDS while NMI restarts (fail-closed).
    #[arg(long = "cleanup-iptables", default_value = "false")]
    pub cleanup_iptables: bool,

    /// Upstream's behaviour: remove the redirect on SIGTERM (fail-open during restarts).
    #[arg(long = "remove-iptables-on-exit", default_value = "false")]
    pub remove_iptables_on_exit: bool,

    /// Set `net.ipv4.conf.all.route_localnet=1` when the DNAT target is a loopback
    /// address; without it the kernel silently drops the redirected packets
    /// (upstream relied on kube-proxy setting it).
    #[arg(long = "set-route-localnet", default_value = "true")]
    pub set_route_localnet: bool,

    /// Service accounts of the real MIC pods (in `--MICNamespace`), comma-separated.
    /// Replaces upstream's "ReplicaSet name starts with mic" test, which any
    /// Deployment named `mic…` passed
    /// (docs/upstream-behaviour.md#h4-mic-found-by-replicaset-name).
    #[arg(
        long = "mic-service-accounts",
        value_delimiter = ',',
        default_value = "aad-pod-identity-mic,aad-pod-id-mic-service-account"
    )]
    pub mic_service_accounts: Vec<String>,

    /// Namespaces, besides an AzureIdentity's own, whose Secrets a type 1/2
    /// identity may reference in `clientPassword` (comma-separated; `*` for any,
    /// upstream's behaviour). Default: none, so an identity can only use a
    /// Secret in its own namespace (otherwise whoever may create an AzureIdentity
    /// could use a service principal stored where they cannot read).
    #[arg(long = "allowed-secret-namespaces", value_delimiter = ',')]
    pub allowed_secret_namespaces: Vec<String>,

    /// PEM bundle of the CAs trusted for AAD (types 1 and 2); default: the
    /// system's roots.
    #[arg(long = "aad-ca-file")]
    pub aad_ca_file: Option<PathBuf>,

    /// The `iptables` program to run.
    #[arg(long = "iptables-path", default_value = "iptables")]
    pub iptables_path: PathBuf,

    /// On SIGTERM, remove the iptables redirect when the DaemonSet that owns
    /// this pod is gone or being deleted (`helm uninstall`); a restart or
    /// rolling update keeps it ([`crate::uninstall`]). Needs `--pod-name` and
    /// `--pod-namespace` and `get`/`list`/`watch` on that DaemonSet.
    #[arg(long = "cleanup-on-uninstall", default_value = "false")]
    pub cleanup_on_uninstall: bool,

    /// Client IDs of the cluster's own identities, comma-separated (MIC's
    /// flag, same spelling): NMI never serves their tokens to pods unless
    /// `--serve-cluster-identities` is set ([`crate::cluster`]).
    #[arg(long = "immutable-user-msis", default_value = "")]
    pub immutable_user_msis: String,

    /// Path to azure.json; its `userAssignedIdentityID` (the kubelet
    /// identity) is one of the cluster's own identities. Empty: none. A file
    /// that cannot be read is logged and skipped (`--immutable-user-msis`
    /// still applies).
    #[arg(long, default_value = "")]
    pub cloudconfig: String,

    /// Serve the cluster's own identities (the kubelet identity and
    /// `--immutable-user-msis`) to pods bound to them. Off by default: such a
    /// request gets 403, an Event on the AzureIdentity and the metric.
    #[arg(long = "serve-cluster-identities", default_value = "false")]
    pub serve_cluster_identities: bool,

    /// This pod's name (downward API `POD_NAME`), for `--cleanup-on-uninstall`.
    #[arg(long = "pod-name", default_value = "", env = "POD_NAME")]
    pub pod_name: String,

    /// This pod's namespace (downward API `POD_NAMESPACE`), for `--cleanup-on-uninstall`.
    #[arg(long = "pod-namespace", default_value = "", env = "POD_NAMESPACE")]
    pub pod_namespace: String,

    /// Most connections the token service holds open at once; a connection
    /// over the cap is closed as soon as it is accepted.
    #[arg(long = "max-connections", default_value = "1024", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections: u32,

    /// Most connections one source IP (one pod, or the node itself) holds
    /// open at once; over the cap, a new connection is closed at once.
    #[arg(long = "max-connections-per-ip", default_value = "32", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections_per_ip: u32,

    /// Most distinct token fetches one pod may have waiting for the node's
    /// IMDS budget; over it the request gets 429 with `Retry-After`.
    #[arg(long = "max-pending-fetches-per-pod", default_value = "16", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_pending_fetches_per_pod: u32,

    /// Most (identity, resource) entries in the token cache.
    #[arg(long = "max-cached-tokens", default_value = "4096", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_cached_tokens: u32,

    /// Longest a request waits, after a start or restart, for NMI's caches
    /// to finish their first sync before it gets 503 with `Retry-After`.
    #[arg(long = "first-sync-wait-sec", default_value = "20", value_parser = clap::value_parser!(u64).range(0..=300))]
    pub first_sync_wait_sec: u64,

    /// The `conntrack` program run by `--enable-conntrack-deletion`.
    #[arg(long = "conntrack-path", default_value = "conntrack")]
    pub conntrack_path: PathBuf,

    /// A taint key (for example `aadpodidentity.k8s.io/nmi-not-ready`) that
    /// NMI removes from its own Node, whatever the effect, once its redirect
    /// is in place and its caches have synced. Empty: off. Set the taint on
    /// the node pool at creation so no pod runs there before NMI is ready.
    #[arg(long = "node-startup-taint", default_value = "", value_parser = taint_key)]
    pub node_startup_taint: String,

    /// The token source of an AzureIdentity without the
    /// `aadpodidentity.k8s.io/token-source` annotation: `imds` (assigned to
    /// the node through ARM, upstream's way) or `federated` (the pod's
    /// ServiceAccount token exchanged at Entra ID). Give MIC the same value.
    #[arg(long = "default-token-source", default_value = "imds", value_parser = token_source)]
    pub default_token_source: aadpodid_api::TokenSource,

    /// Threads of NMI's async runtime; 0 sizes it from the container's CPU
    /// limit (the cgroup's CPU quota, rounded up: the chart's 200m gives one
    /// thread), or 2 without a limit. One thread runs everything on the
    /// calling thread (a current-thread runtime).
    #[arg(long = "worker-threads", env = "NMI_WORKER_THREADS", default_value = "0", value_parser = clap::value_parser!(u32).range(0..=64))]
    pub worker_threads: u32,
}

/// The runtime's size (in `aadpodid_runtime::size`, which MIC sizes its
/// runtime with too).
pub use aadpodid_runtime::size::RuntimeSize;

/// Threads without a CPU limit: NMI serves one node; two threads keep a
/// slow task (a list of many pods, a TLS handshake) from delaying tokens.
pub const DEFAULT_WORKER_THREADS: usize = 2;

impl Args {
    /// Parses flags (without the program name), for embedding and tests.
    pub fn try_from_args<I: IntoIterator<Item = String>>(args: I) -> Result<Self, clap::Error> {
        Self::try_parse_from(std::iter::once("nmi".to_string()).chain(args))
    }

    /// The warning naming the klog flags given that change nothing here
    /// (NMI's level comes from `RUST_LOG`, so a non-zero `-v` is named);
    /// `None` when there are none.
    pub fn klog_warning(&self) -> Option<String> {
        aadpodid_runtime::flags::klog_warning(&self.klog_without_effect())
    }

    /// The klog flags given that change nothing here.
    pub fn klog_without_effect(&self) -> Vec<&'static str> {
        aadpodid_runtime::flags::klog_without_effect(
            &self.klog,
            aadpodid_runtime::flags::KlogCommon {
                logtostderr: self.logtostderr,
                verbosity: self.verbosity,
                verbosity_honoured: false,
            },
        )
    }

    /// Namespaced mode: the flag OR-ed with `FORCENAMESPACED=true`, as upstream.
    pub fn namespaced(&self, env_force_namespaced: Option<&str>) -> bool {
        self.force_namespaced || env_force_namespaced == Some("true")
    }

    /// The address the DNAT rule sends traffic to: the listen address, or
    /// 127.0.0.1 when listening on every address (as upstream).
    pub fn dnat_target(&self) -> IpAddr {
        if self.nmi_listen_address.is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            self.nmi_listen_address
        }
    }

    /// The `--immutable-user-msis` client IDs, lower-cased as MIC reads them.
    pub fn immutable_client_ids(&self) -> Vec<String> {
        aadpodid_runtime::azure_json::client_id_list(&self.immutable_user_msis)
    }

    /// Longest wait for an identity MIC has not even created (upstream: 16 × 5 s).
    pub fn created_budget(&self) -> Duration {
        Duration::from_secs(
            u64::from(self.retry_attempts_for_created)
                .saturating_mul(self.find_identity_retry_interval),
        )
    }

    /// Longest wait for a Created identity to become Assigned (upstream: 20 × 5 s).
    pub fn assigned_budget(&self) -> Duration {
        Duration::from_secs(
            u64::from(
                self.retry_attempts_for_created
                    .saturating_add(self.retry_attempts_for_assigned),
            )
            .saturating_mul(self.find_identity_retry_interval),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("nmi").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// The runtime's size itself is table-tested with it in
    /// `aadpodid_runtime::size`.
    #[test]
    fn worker_threads_flag() {
        let a = parse(&[]);
        assert_eq!(a.worker_threads, 0, "sized from the limit by default");
        assert_eq!(parse(&["--worker-threads=1"]).worker_threads, 1);
    }

    #[test]
    fn defaults_are_upstreams() {
        let a = parse(&[]);
        assert_eq!(a.nmi_listen_address.to_string(), "127.0.0.1");
        assert_eq!(a.nmi_port, 2579);
        assert_eq!(a.metadata_ip.to_string(), "169.254.169.254");
        assert_eq!(a.metadata_port, 80);
        assert_eq!(a.ipt_update_interval_sec, 60);
        assert!(!a.force_namespaced);
        assert_eq!(a.mic_namespace, "default");
        assert_eq!(a.http_probe_port, 8080);
        assert_eq!(a.retry_attempts_for_created, 16);
        assert_eq!(a.retry_attempts_for_assigned, 4);
        assert_eq!(a.find_identity_retry_interval, 5);
        assert!(a.enable_scale_features);
        assert!(!a.block_instance_metadata);
        assert!(!a.allow_scheduled_events_post);
        assert!(a.proxy_allowed_paths.is_empty());
        let a = parse(&[
            "--node=n",
            "--proxy-allowed-paths=/metadata/loadbalancer/,/metadata/x",
        ]);
        assert_eq!(
            a.proxy_allowed_paths,
            ["/metadata/loadbalancer", "/metadata/x"]
        );
        for bad in [
            "--proxy-allowed-paths=/metadata/identity/oauth2/token",
            "--proxy-allowed-paths=/metadata/x,/metadata/%2e%2e",
            "--proxy-allowed-paths=/",
        ] {
            assert!(
                Args::try_parse_from(["nmi", "--node=n", bad]).is_err(),
                "{bad}"
            );
        }
        assert!(a.metadata_header_required);
        assert_eq!(a.prometheus_port, 9090);
        assert_eq!(a.operation_mode, OperationMode::Standard);
        assert!(!a.allow_network_plugin_kubenet);
        assert_eq!(a.kubelet_config, PathBuf::from("/etc/default/kubelet"));
        assert!(!a.set_retry_after_header);
        assert!(!a.enable_conntrack_deletion);
        assert_eq!(a.log_format, "text");
        assert_eq!(a.created_budget(), Duration::from_secs(80));
        assert_eq!(a.assigned_budget(), Duration::from_secs(100));
        assert!(!a.cleanup_iptables && !a.remove_iptables_on_exit);
        assert!(a.immutable_client_ids().is_empty());
        assert_eq!(a.cloudconfig, "");
        assert!(!a.serve_cluster_identities);
    }

    #[test]
    fn hardening_flags_parse_and_are_bounded() {
        let a = parse(&[]);
        assert_eq!(a.max_connections, 1024);
        assert_eq!(a.max_connections_per_ip, 32);
        assert_eq!(a.max_pending_fetches_per_pod, 16);
        assert_eq!(a.max_cached_tokens, 4096);
        assert_eq!(a.first_sync_wait_sec, 20);
        assert_eq!(a.conntrack_path, PathBuf::from("conntrack"));
        assert_eq!(a.node_startup_taint, "");
        let a = parse(&[
            "--max-connections=10",
            "--max-connections-per-ip=2",
            "--node-startup-taint=aadpodidentity.k8s.io/nmi-not-ready",
        ]);
        assert_eq!((a.max_connections, a.max_connections_per_ip), (10, 2));
        assert_eq!(a.node_startup_taint, "aadpodidentity.k8s.io/nmi-not-ready");
        for bad in [
            "--max-connections=0",
            "--max-connections-per-ip=0",
            "--max-pending-fetches-per-pod=0",
            "--max-cached-tokens=0",
            "--first-sync-wait-sec=301",
            "--node-startup-taint=/x",
            "--node-startup-taint=Bad.Prefix/x",
            "--node-startup-taint=a/b/c",
            "--node-startup-taint=-x",
            "--node-startup-taint=x:NoSchedule",
        ] {
            assert!(Args::try_parse_from(["nmi", bad]).is_err(), "{bad}");
        }
        for good in ["nmi-not-ready", "example.com/nmi_not.ready", "a"] {
            assert_eq!(taint_key(good).as_deref(), Ok(good));
        }
    }

    #[test]
    fn cluster_identity_flags_parse() {
        // The chart's nmi-daemonset.yaml, as MIC gets the same values.
        let a = parse(&[
            "--immutable-user-msis=AAAA-1, bbbb-2,",
            "--cloudconfig=/etc/kubernetes/azure.json",
            "--serve-cluster-identities",
        ]);
        assert_eq!(a.immutable_client_ids(), vec!["aaaa-1", "bbbb-2"]);
        assert_eq!(a.cloudconfig, "/etc/kubernetes/azure.json");
        assert!(a.serve_cluster_identities);
        assert!(!parse(&["--serve-cluster-identities=false"]).serve_cluster_identities);
        assert!(parse(&["--serve-cluster-identities=true"]).serve_cluster_identities);
        assert!(Args::try_parse_from(["nmi", "--serve-cluster-identities", "true"]).is_err());
    }

    /// Every flag klog v2.30's `InitFlags` registers, as pflag took them
    /// (`AddGoFlagSet`): two dashes, a value after `=` or as the next word
    /// (booleans only after `=`), `-v` also as a short flag.
    #[test]
    fn klog_flags_in_pflag_syntax_are_accepted_and_named() {
        let a = parse(&[
            "--logtostderr=false",
            "--alsologtostderr",
            "-v",
            "5",
            "--log_dir=/var/log/nmi",
            "--log_file",
            "/var/log/nmi.log",
            "--log_file_max_size=100",
            "--add_dir_header=true",
            "--skip_headers",
            "--one_output=false",
            "--skip_log_headers",
            "--stderrthreshold=ERROR",
            "--vmodule",
            "server=4",
            "--log_backtrace_at=server.go:99",
        ]);
        assert_eq!(a.verbosity, 5);
        assert!(a.alsologtostderr && !a.logtostderr);
        assert_eq!(a.klog.vmodule.as_deref(), Some("server=4"));
        // Everything: NMI's level comes from RUST_LOG, so `-v` is named too.
        let mut all = aadpodid_runtime::flags::KLOG_FLAG_NAMES.to_vec();
        all.splice(3..3, ["--logtostderr", "-v"]);
        assert_eq!(a.klog_without_effect(), all);
        assert!(
            a.klog_warning()
                .is_some_and(|w| w.ends_with("--vmodule, --log_backtrace_at"))
        );
        for v in [&["-v=3"][..], &["-v3"], &["--v", "3"], &["--v=3"]] {
            assert_eq!(parse(v).verbosity, 3, "{v:?}");
        }
        // The chart's own arguments: nothing to warn about.
        assert_eq!(parse(&["--logtostderr", "--v=0"]).klog_warning(), None);
        assert!(Args::try_from_args(["--vmodule=server".to_string()]).is_err());
        assert!(Args::try_from_args(["--log_file_max_size=-1".to_string()]).is_err());
    }

    #[test]
    fn upstream_chart_args_parse() {
        // charts/aad-pod-identity/templates/nmi-daemonset.yaml with every optional
        // value set, in the chart's order.
        let a = parse(&[
            "--node=aks-nodepool1-0",
            "--http-probe-port=8085",
            "--enableScaleFeatures=true",
            "--metadata-header-required=true",
            "--operation-mode=managed",
            "--kubelet-config=/etc/default/kubelet",
            "--forceNamespaced",
            "--ipt-update-interval-sec=30",
            "--MICNamespace=kube-system",
            "--retry-attempts-for-created=8",
            "--retry-attempts-for-assigned=2",
            "--find-identity-retry-interval=3",
            "--prometheus-port=9091",
            "--block-instance-metadata=true",
            "--allow-network-plugin-kubenet=false",
            "--set-retry-after-header=true",
            "--enable-conntrack-deletion=false",
            "--log-format=json",
            "--custom-user-agent=my-agent",
            "--v=2",
        ]);
        assert_eq!(a.node, "aks-nodepool1-0");
        assert_eq!(a.http_probe_port, 8085);
        assert_eq!(a.operation_mode, OperationMode::Managed);
        assert!(a.force_namespaced);
        assert_eq!(a.mic_namespace, "kube-system");
        assert_eq!(a.created_budget(), Duration::from_secs(24));
        assert_eq!(a.assigned_budget(), Duration::from_secs(30));
        assert!(a.block_instance_metadata && a.set_retry_after_header);
        assert_eq!(a.verbosity, 2);
    }

    #[test]
    fn upstream_flat_manifest_args_parse() {
        // Upstream's plain manifest deploy/infra/deployment-rbac.yaml.
        let a = parse(&[
            "--node=$(NODE_NAME)",
            "--http-probe-port=8085",
            "--enableScaleFeatures=true",
            "--metadata-header-required=true",
        ]);
        assert_eq!(a.http_probe_port, 8085);
        // managed-mode-deployment.yaml
        let m = parse(&["--node=n", "--operation-mode=managed", "--forceNamespaced"]);
        assert_eq!(m.operation_mode, OperationMode::Managed);
        assert!(m.force_namespaced);
    }

    #[test]
    fn booleans_are_go_style() {
        for (arg, want) in [
            ("--block-instance-metadata", true),
            ("--block-instance-metadata=true", true),
            ("--block-instance-metadata=True", true),
            ("--block-instance-metadata=1", true),
            ("--block-instance-metadata=false", false),
            ("--block-instance-metadata=F", false),
        ] {
            assert_eq!(parse(&[arg]).block_instance_metadata, want, "{arg}");
        }
        assert!(!parse(&["--metadata-header-required=false"]).metadata_header_required);
        assert!(Args::try_parse_from(["nmi", "--forceNamespaced=yes"]).is_err());
        // pflag never takes a boolean's value from the next word.
        assert!(Args::try_parse_from(["nmi", "--forceNamespaced", "false"]).is_err());
    }

    #[test]
    fn default_token_source_is_exact() {
        use aadpodid_api::TokenSource;
        assert_eq!(parse(&[]).default_token_source, TokenSource::Imds);
        assert_eq!(
            parse(&["--default-token-source=federated"]).default_token_source,
            TokenSource::Federated
        );
        for bad in ["Federated", "wi", ""] {
            let flag = format!("--default-token-source={bad}");
            assert!(
                Args::try_parse_from(["nmi", flag.as_str()]).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn operation_mode_is_case_insensitive_and_strict() {
        assert_eq!(
            parse(&["--operation-mode=Managed"]).operation_mode,
            OperationMode::Managed
        );
        assert!(Args::try_parse_from(["nmi", "--operation-mode=other"]).is_err());
    }

    #[test]
    fn namespaced_from_flag_or_env() {
        let a = parse(&[]);
        assert!(!a.namespaced(None));
        assert!(!a.namespaced(Some("TRUE")), "upstream compares exactly");
        assert!(a.namespaced(Some("true")));
        assert!(parse(&["--forceNamespaced=true"]).namespaced(None));
    }

    #[test]
    fn dnat_target_maps_unspecified_to_loopback() {
        assert_eq!(
            parse(&["--nmi-listen-address=0.0.0.0"])
                .dnat_target()
                .to_string(),
            "127.0.0.1"
        );
        assert_eq!(
            parse(&["--nmi-listen-address=10.0.0.4"])
                .dnat_target()
                .to_string(),
            "10.0.0.4"
        );
    }
}
