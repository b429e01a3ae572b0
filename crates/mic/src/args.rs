//! Command line and environment, with upstream's spellings and defaults
//! (docs/upstream-behaviour.md#flags-and-defaults). Upstream parses with Go's `flag`
//! package, so booleans take `--x`, `--x=true` and `--x=false` (never
//! `--x false`) and durations use Go's syntax (`3600s`, `3m`, `1h30m`).

use std::time::Duration;

use aadpodid_api::TokenSource;
use aadpodid_api::policy::PolicyMode;
use clap::Parser;

/// Upstream reads this exact string (`== "true"`) in both binaries.
pub const ENV_FORCE_NAMESPACED: &str = aadpodid_api::ENV_FORCE_NAMESPACED;
/// MIC's own namespace; upstream exits when it is empty.
pub const ENV_MIC_POD_NAMESPACE: &str = "MIC_POD_NAMESPACE";

/// MIC's flags. Names are upstream's, camelCase included.
/// Booleans take Go's syntax ([`go_bool_syntax`]).
#[derive(Clone, Debug, PartialEq, Parser)]
#[command(name = "mic", about = "aad-pod-identity Managed Identity Controller")]
#[command(mut_args = go_bool_syntax)]
pub struct Args {
    /// Path to a kubeconfig; empty means in-cluster.
    #[arg(long, default_value = "")]
    pub kubeconfig: String,

    /// Path to azure.json; empty means the environment variables.
    #[arg(long, default_value = "")]
    pub cloudconfig: String,

    /// Identities, bindings and pods must share a namespace (OR-ed with FORCENAMESPACED=true).
    #[arg(long = "forceNamespaced", default_value = "false")]
    pub force_namespaced: bool,

    /// Print the version and exit.
    #[arg(long, default_value = "false")]
    pub version: bool,

    /// Period of the full resync.
    #[arg(long = "syncRetryDuration", value_parser = parse_go_duration, default_value = "3600s")]
    pub sync_retry_duration: Duration,

    /// Holder identity in the Lease; empty means the host name.
    #[arg(long = "leader-election-instance", default_value = "")]
    pub leader_election_instance: String,

    #[arg(long = "leader-election-namespace", default_value = "default")]
    pub leader_election_namespace: String,

    #[arg(long = "leader-election-name", default_value = "aad-pod-identity-mic")]
    pub leader_election_name: String,

    /// Also hold upstream v1.8.17's Endpoints lock of the same namespace and
    /// name, and act only while holding both it and the Lease, so that an
    /// upstream mic and this one are never leaders together during a
    /// migration. `false` once no upstream mic can run in the cluster.
    #[arg(long = "leader-election-endpoints-lock", default_value = "true")]
    pub leader_election_endpoints_lock: bool,

    /// Lease duration; renew deadline is half of it, retry period a quarter (upstream).
    #[arg(long = "leader-election-duration", value_parser = parse_go_duration, default_value = "15s")]
    pub leader_election_duration: Duration,

    #[arg(long = "http-probe-port", default_value_t = 8080)]
    pub http_probe_port: u16,

    #[arg(long = "prometheus-port", default_value_t = 8888)]
    pub prometheus_port: u16,

    /// Upstream serves pprof on localhost:6060; accepted and ignored here.
    #[arg(long = "enableProfile", default_value = "false")]
    pub enable_profile: bool,

    /// Deprecated no-op in upstream MIC too.
    #[arg(long = "enableScaleFeatures", default_value = "false")]
    pub enable_scale_features: bool,

    /// Concurrent Kubernetes writes per cycle.
    #[arg(long = "createDeleteBatch", default_value_t = 20)]
    pub create_delete_batch: i64,

    /// Kubernetes client requests per second, paced on the client as
    /// client-go paces them (burst = the integer part). Unset: no client-side
    /// limit (upstream's default of 5 made a burst of 1,000 pods wait about
    /// 400 s on its own client; the apiserver's priority and fairness limits
    /// still apply).
    #[arg(long = "clientQps")]
    pub client_qps: Option<f32>,

    /// Comma-separated client IDs that are never removed from a VM/VMSS.
    #[arg(long = "immutable-user-msis", default_value = "")]
    pub immutable_user_msis: String,

    #[arg(long = "config-map-name", default_value = "aad-pod-identity-config")]
    pub config_map_name: String,

    #[arg(
        long = "type-upgrade-status-key",
        default_value = "type-upgrade-status"
    )]
    pub type_upgrade_status_key: String,

    /// Upstream's pre-1.6 field migration; there is nothing to migrate here.
    #[arg(long = "enable-type-upgrade", default_value = "true")]
    pub enable_type_upgrade: bool,

    #[arg(long = "update-user-msi-max-retry", default_value_t = 2)]
    pub update_user_msi_max_retry: u32,

    #[arg(long = "update-user-msi-retry-interval", value_parser = parse_go_duration, default_value = "1s")]
    pub update_user_msi_retry_interval: Duration,

    /// Beyond upstream: the identity policy at run time, `off`, `warn` or
    /// `enforce`. When not `off`, MIC watches Namespaces and checks each
    /// type-0 AzureIdentity's resourceID against its namespace's
    /// `aadpodidentity.k8s.io/allowed-identities` annotation: `warn` logs and
    /// publishes an Event but still assigns, `enforce` assigns nothing.
    #[arg(long = "identity-policy", value_parser = parse_policy_mode, default_value = "off")]
    pub identity_policy: PolicyMode,

    /// Beyond upstream: AzureAssignedIdentities of the cluster's own
    /// identities (the kubelet identity, `--immutable-user-msis`, and every
    /// identity that was on a VMSS/VM before MIC added it) may be marked
    /// Assigned. Off by default: such identities are never served to pods.
    /// They are never removed either way.
    #[arg(long = "serve-cluster-identities", default_value = "false")]
    pub serve_cluster_identities: bool,

    /// Beyond upstream: the ConfigMap, in MIC's namespace (`MIC_POD_NAMESPACE`),
    /// that records which identities MIC added to each VMSS/VM; MIC removes
    /// only those.
    #[arg(long = "owned-identities-configmap", default_value = crate::ledger::DEFAULT_CONFIGMAP)]
    pub owned_identities_configmap: String,

    /// Period of the drift check that re-adds identities removed behind MIC's
    /// back: a safety net, 30m by default (upstream: 3m). Between two, MIC
    /// checks a VMSS/VM only when a Node's boot or image changes or NMI
    /// reports an identity missing on a node ([`crate::drift`]); an explicit
    /// value is honoured.
    #[arg(long = "identity-assignment-reconcile-interval", value_parser = parse_go_duration, default_value = "30m")]
    pub identity_assignment_reconcile_interval: Duration,

    /// `text` or `json`.
    #[arg(long = "log-format", default_value = "text")]
    pub log_format: String,

    /// Appended to the User-Agent.
    #[arg(long = "custom-user-agent", default_value = "")]
    pub custom_user_agent: String,

    /// Succeeded/Failed pods keep their identities, as upstream did (finished
    /// Job pods then pile identities up on the nodes); by default they release them.
    #[arg(long = "keep-completed-pod-identities", default_value = "false")]
    pub keep_completed_pod_identities: bool,

    /// Beyond upstream: write tokens per VMSS/VM when its bucket is full
    /// (Compute's "VMSS Update"/"VM Update" per-resource burst of 12, refilled at 4 a
    /// minute: docs/upstream-behaviour.md#azure-throttling). MIC keeps a local mirror
    /// of the bucket, corrected from `x-ms-ratelimit-remaining-resource` and
    /// `Retry-After`, and waits instead of sending a PATCH the bucket cannot pay for;
    /// pending adds and removes are folded into that next PATCH.
    #[arg(long = "arm-resource-write-burst", default_value_t = 12.0)]
    pub arm_resource_write_burst: f64,

    /// Beyond upstream: refill of the per-VMSS/VM write bucket, tokens per minute.
    #[arg(long = "arm-resource-writes-per-minute", default_value_t = 4.0)]
    pub arm_resource_writes_per_minute: f64,

    /// Beyond upstream: write tokens of the subscription's Compute bucket
    /// when full. The budget is shared with AKS, the autoscaler and every other
    /// tool, so lower it to leave them room.
    #[arg(long = "arm-subscription-write-burst", default_value_t = 1500.0)]
    pub arm_subscription_write_burst: f64,

    /// Beyond upstream: refill of the subscription write bucket, tokens per minute.
    #[arg(long = "arm-subscription-writes-per-minute", default_value_t = 500.0)]
    pub arm_subscription_writes_per_minute: f64,

    /// Beyond upstream (lazy removal): an identity no pod needs any more on a
    /// VMSS/VM stays there this long before MIC removes it, and its
    /// AzureAssignedIdentity stays until then; a pod that needs it again within
    /// the linger (a CronJob's next run) costs no ARM write. `0` (the default)
    /// removes at once, as upstream does.
    #[arg(long = "identity-removal-linger", value_parser = parse_go_duration, default_value = "0s")]
    pub identity_removal_linger: Duration,

    /// Beyond upstream: the token source of AzureIdentities without the
    /// annotation `aadpodidentity.k8s.io/token-source`: `imds` (upstream's
    /// way: MIC assigns the identity to the node's VMSS/VM) or `federated`
    /// (nothing is written to ARM; NMI exchanges the pod's ServiceAccount
    /// token at Entra ID). NMI must be given the same value.
    #[arg(long = "default-token-source", value_parser = parse_token_source, default_value = "imds")]
    pub default_token_source: TokenSource,

    // klog flags the chart and manifests pass; logs always go to stderr here.
    // klog's default for `--logtostderr` is true.
    #[arg(long, default_value = "true")]
    pub logtostderr: bool,

    #[arg(long, default_value = "false")]
    pub alsologtostderr: bool,

    /// klog verbosity: 0 is info, higher values turn on debug logs.
    #[arg(short = 'v', long = "v", default_value_t = 0)]
    pub verbosity: i32,

    /// klog's other flags, accepted as upstream's `klog.InitFlags` took them
    /// and named in one warning at start: they change nothing here.
    #[command(flatten)]
    pub klog: KlogFlags,

    /// Beyond upstream: the Compute api-version of every VMSS/VM request.
    /// Empty: chosen by the cloud in azure.json (`AzureStackCloud`: the
    /// Azure Stack Hub profile's; any other: the public cloud's).
    #[arg(long = "compute-api-version", value_parser = parse_api_version, default_value = "")]
    pub compute_api_version: String,

    /// Beyond upstream: threads of MIC's async runtime; 0 sizes it from the
    /// container's CPU limit (the cgroup's CPU quota, rounded up: the
    /// chart's 200m gives one thread), or one thread without a limit. One
    /// thread runs everything on the calling thread (a current-thread
    /// runtime).
    #[arg(long = "worker-threads", env = "MIC_WORKER_THREADS", default_value = "0", value_parser = clap::value_parser!(u32).range(0..=64))]
    pub worker_threads: u32,
}

/// Threads of MIC's runtime without a flag or a CPU limit. MIC's work is one
/// control loop, its watches and the ARM and Kubernetes requests it waits
/// on; a current-thread runtime keeps every allocation in one glibc arena.
/// With a worker per CPU, the ARM jobs and the watches allocated in the
/// workers' arenas: at 10,000 pods over 1,000 identities the peak RSS was
/// 64-83 MiB on 2 CPUs against 59-66 MiB on one thread
/// (docs/mic-performance.md).
pub const DEFAULT_WORKER_THREADS: usize = 1;

impl Args {
    /// `--forceNamespaced` OR-ed with `FORCENAMESPACED`, which upstream compares
    /// with the exact string `true`.
    pub fn force_namespaced_with_env(&self, env_value: Option<&str>) -> bool {
        self.force_namespaced || env_value == Some("true")
    }

    /// The `--immutable-user-msis` client IDs, lower-cased as upstream loads them.
    pub fn immutable_client_ids(&self) -> Vec<String> {
        aadpodid_runtime::azure_json::client_id_list(&self.immutable_user_msis)
    }

    /// Parses the process's arguments in Go's `flag` syntax, as upstream MIC
    /// took them: `-name` and `--name` alike, values after `=` or as the next
    /// word (booleans only after `=`). Exits with clap's message on an error.
    pub fn parse_go_style() -> Self {
        Self::parse_go_style_from(std::env::args_os())
    }

    /// [`Args::parse_go_style`] of `args` (program name first).
    pub fn parse_go_style_from<I: IntoIterator<Item = std::ffi::OsString>>(args: I) -> Self {
        use clap::CommandFactory;
        let args = go_flag_args_for(&Self::command(), args.into_iter().collect());
        Self::parse_from(args)
    }

    /// [`Args::parse_go_style_from`] that returns clap's error.
    pub fn try_parse_go_style_from<I: IntoIterator<Item = std::ffi::OsString>>(
        args: I,
    ) -> Result<Self, clap::Error> {
        use clap::CommandFactory;
        let args = go_flag_args_for(&Self::command(), args.into_iter().collect());
        Self::try_parse_from(args)
    }

    /// The warning naming the klog flags given that change nothing (MIC
    /// honours `-v`); `None` when there are none.
    pub fn klog_warning(&self) -> Option<String> {
        klog_warning(&klog_without_effect(
            &self.klog,
            KlogCommon {
                logtostderr: self.logtostderr,
                verbosity: self.verbosity,
                verbosity_honoured: true,
            },
        ))
    }
}

/// A Compute api-version (`YYYY-MM-DD`, optionally `-preview`), or empty
/// for the cloud's own.
pub fn parse_api_version(s: &str) -> Result<String, String> {
    let date = s.strip_suffix("-preview").unwrap_or(s);
    let b = date.as_bytes();
    let shaped = b.len() == 10
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        });
    if s.is_empty() || shaped {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid api-version {s:?}: use YYYY-MM-DD or YYYY-MM-DD-preview"
        ))
    }
}

/// `imds` or `federated`, exactly.
pub fn parse_token_source(s: &str) -> Result<TokenSource, String> {
    TokenSource::parse(s)
        .map_err(|_| format!("invalid token source {s:?}: use \"imds\" or \"federated\""))
}

/// `off`, `warn` or `enforce`.
pub fn parse_policy_mode(s: &str) -> Result<PolicyMode, String> {
    s.parse()
        .map_err(|e: aadpodid_api::policy::ParsePolicyModeError| e.to_string())
}

/// Go's `strconv.ParseBool` (shared with nmi).
pub use aadpodid_runtime::flags::parse_go_bool;
use aadpodid_runtime::flags::{
    KlogCommon, KlogFlags, go_bool_syntax, go_flag_args_for, klog_warning, klog_without_effect,
};

/// Go's `time.ParseDuration`: a sequence of decimal numbers with units
/// `ns`, `us`/`µs`, `ms`, `s`, `m`, `h` (`"0"` alone is allowed). Negative
/// durations make no sense for any MIC flag and are refused.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_len == 0 {
            return Err(bad());
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(bad()),
        };
        total += value * nanos_per_unit;
        rest = &rest[unit_len..];
    }
    if !total.is_finite() || total > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(Duration::from_nanos(total as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `args` after the program name, in Go's `flag` syntax as MIC takes
    /// them (clap's `--name` spellings included).
    fn try_parse(args: &[&str]) -> Result<Args, clap::Error> {
        let words = args.iter().map(std::ffi::OsString::from);
        Args::try_parse_go_style_from(std::iter::once("mic".into()).chain(words))
    }

    fn parse(args: &[&str]) -> Args {
        try_parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// The runtime's size itself is table-tested in `aadpodid_runtime::size`.
    #[test]
    fn worker_threads_flag() {
        assert_eq!(
            parse(&[]).worker_threads,
            0,
            "sized from the limit by default"
        );
        for (args, want) in [
            (&["--worker-threads=2"][..], 2),
            (&["-worker-threads", "3"][..], 3),
        ] {
            assert_eq!(parse(args).worker_threads, want, "{args:?}");
        }
        for bad in [
            "--worker-threads=65",
            "--worker-threads=-1",
            "--worker-threads=x",
        ] {
            assert!(try_parse(&[bad]).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn defaults_are_upstreams() {
        let a = parse(&[]);
        assert_eq!(a.kubeconfig, "");
        assert_eq!(a.cloudconfig, "");
        assert!(!a.force_namespaced);
        assert_eq!(a.sync_retry_duration, Duration::from_secs(3600));
        assert_eq!(a.leader_election_namespace, "default");
        assert_eq!(a.leader_election_name, "aad-pod-identity-mic");
        assert_eq!(a.leader_election_duration, Duration::from_secs(15));
        assert_eq!(a.http_probe_port, 8080);
        assert_eq!(a.prometheus_port, 8888);
        assert_eq!(a.create_delete_batch, 20);
        assert_eq!(a.client_qps, None);
        assert_eq!(a.config_map_name, "aad-pod-identity-config");
        assert_eq!(a.type_upgrade_status_key, "type-upgrade-status");
        assert!(a.enable_type_upgrade);
        assert_eq!(a.update_user_msi_max_retry, 2);
        assert_eq!(a.update_user_msi_retry_interval, Duration::from_secs(1));
        // 30 minutes, not upstream's 3: a safety net beside event-driven checks.
        assert_eq!(
            a.identity_assignment_reconcile_interval,
            Duration::from_secs(1800)
        );
        assert_eq!(a.log_format, "text");
        assert!(!a.keep_completed_pod_identities);
        assert_eq!(a.arm_resource_write_burst, 12.0);
        assert_eq!(a.arm_resource_writes_per_minute, 4.0);
        assert_eq!(a.arm_subscription_write_burst, 1500.0);
        assert_eq!(a.arm_subscription_writes_per_minute, 500.0);
        assert_eq!(a.identity_removal_linger, Duration::ZERO);
        assert_eq!(a.identity_policy, PolicyMode::Off);
        assert!(!a.serve_cluster_identities);
        assert_eq!(a.owned_identities_configmap, "aad-pod-identity-mic-owned");
        assert_eq!(a.default_token_source, TokenSource::Imds);
    }

    #[test]
    fn the_default_token_source_flag() {
        for (args, want) in [
            (
                &["--default-token-source=federated"][..],
                TokenSource::Federated,
            ),
            (
                &["-default-token-source", "federated"][..],
                TokenSource::Federated,
            ),
            (&["--default-token-source", "imds"][..], TokenSource::Imds),
        ] {
            assert_eq!(parse(args).default_token_source, want, "{args:?}");
        }
        for bad in ["Federated", "", "workload-identity"] {
            let e = try_parse(&[&format!("--default-token-source={bad}")]).unwrap_err();
            assert!(
                e.to_string().contains("use \"imds\" or \"federated\""),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn entitlement_flags_parse() {
        let a = parse(&[
            "--identity-policy=enforce",
            "--serve-cluster-identities",
            "--owned-identities-configmap=ledger",
        ]);
        assert_eq!(a.identity_policy, PolicyMode::Enforce);
        assert!(a.serve_cluster_identities);
        assert_eq!(a.owned_identities_configmap, "ledger");
        assert_eq!(
            parse(&["--identity-policy=warn"]).identity_policy,
            PolicyMode::Warn
        );
        assert!(Args::try_parse_from(["mic", "--identity-policy=Enforce"]).is_err());
        assert!(Args::try_parse_from(["mic", "--identity-policy=on"]).is_err());
    }

    #[test]
    fn scheduler_flags_parse() {
        let a = parse(&[
            "--arm-resource-write-burst=6",
            "--arm-resource-writes-per-minute=2",
            "--arm-subscription-write-burst=100",
            "--arm-subscription-writes-per-minute=50",
            "--identity-removal-linger=10m",
        ]);
        assert_eq!(a.arm_resource_write_burst, 6.0);
        assert_eq!(a.arm_resource_writes_per_minute, 2.0);
        assert_eq!(a.arm_subscription_write_burst, 100.0);
        assert_eq!(a.arm_subscription_writes_per_minute, 50.0);
        assert_eq!(a.identity_removal_linger, Duration::from_secs(600));
    }

    /// The args of upstream's plain manifest `deploy/infra/deployment-rbac.yaml`
    /// and of the chart's `mic-deployment.yaml` with every optional value set.
    #[test]
    fn upstream_manifest_and_chart_args_parse() {
        let a = parse(&["--cloudconfig=/etc/kubernetes/azure.json", "--logtostderr"]);
        assert_eq!(a.cloudconfig, "/etc/kubernetes/azure.json");
        assert!(a.logtostderr);

        let a = parse(&[
            "--cloudconfig=/etc/kubernetes/azure.json",
            "--logtostderr",
            "--v=4",
            "--leader-election-instance=mic-1",
            "--leader-election-namespace=kube-system",
            "--leader-election-name=my-lock",
            "--leader-election-duration=30s",
            "--http-probe-port=9080",
            "--syncRetryDuration=1h30m",
            "--immutable-user-msis=AAAA-1,bbbb-2",
            "--createDeleteBatch=10",
            "--clientQps=20",
            "--prometheus-port=9888",
            "--update-user-msi-max-retry=5",
            "--update-user-msi-retry-interval=2s",
            "--identity-assignment-reconcile-interval=5m",
            "--log-format=json",
            "--custom-user-agent=my-agent",
            "--enableScaleFeatures=true",
            "--forceNamespaced",
        ]);
        // Each flag given sets its field; every other field keeps its default.
        assert_eq!(
            a,
            Args {
                cloudconfig: "/etc/kubernetes/azure.json".into(),
                logtostderr: true,
                verbosity: 4,
                leader_election_instance: "mic-1".into(),
                leader_election_namespace: "kube-system".into(),
                leader_election_name: "my-lock".into(),
                leader_election_duration: Duration::from_secs(30),
                http_probe_port: 9080,
                sync_retry_duration: Duration::from_secs(5400),
                immutable_user_msis: "AAAA-1,bbbb-2".into(),
                create_delete_batch: 10,
                client_qps: Some(20.0),
                prometheus_port: 9888,
                update_user_msi_max_retry: 5,
                update_user_msi_retry_interval: Duration::from_secs(2),
                identity_assignment_reconcile_interval: Duration::from_secs(300),
                log_format: "json".into(),
                custom_user_agent: "my-agent".into(),
                enable_scale_features: true,
                force_namespaced: true,
                ..parse(&[])
            }
        );
        assert_eq!(a.immutable_client_ids(), vec!["aaaa-1", "bbbb-2"]);
    }

    /// Every flag klog v2.30's `InitFlags` registers, in Go's single- and
    /// double-dash spellings, with `=` and with the value as the next word.
    #[test]
    fn klog_flags_in_go_syntax_start_mic_and_are_named_once() {
        let a = parse(&[
            "-cloudconfig",
            "/etc/kubernetes/azure.json",
            "-logtostderr",
            "-alsologtostderr=true",
            "-v",
            "4",
            "-log_dir=/var/log/mic",
            "--log_file",
            "/var/log/mic.log",
            "-log_file_max_size",
            "0x10",
            "-add_dir_header",
            "--skip_headers=false",
            "-skip_log_headers=1",
            "-one_output",
            "-stderrthreshold",
            "info",
            "-vmodule=mic*=4",
            "--log_backtrace_at",
            "mic.go:10",
            "-forceNamespaced",
            "-syncRetryDuration=1m",
        ]);
        assert_eq!(
            a.klog_warning(),
            klog_warning(&aadpodid_runtime::flags::KLOG_FLAG_NAMES)
        );
        assert_eq!(a.cloudconfig, "/etc/kubernetes/azure.json");
        assert_eq!(a.verbosity, 4);
        assert!(a.logtostderr && a.alsologtostderr && a.force_namespaced);
        assert_eq!(a.sync_retry_duration, Duration::from_secs(60));
        assert_eq!(a.klog.log_file_max_size, Some(16));
        assert_eq!(a.klog.skip_headers, Some(false));
        // Upstream's own manifests: nothing to warn about.
        assert_eq!(
            parse(&["--cloudconfig=/x", "--logtostderr", "--v=2"]).klog_warning(),
            None
        );
        assert_eq!(parse(&["-v=2"]).klog_warning(), None);
        assert_eq!(
            parse(&["--logtostderr=false"]).klog_warning(),
            klog_warning(&["--logtostderr"])
        );
        // Go's `flag` refuses these too.
        for bad in [
            &["-nosuchflag"][..],
            &["-stderrthreshold=DEBUG"],
            &["-logtostderr", "false"],
        ] {
            assert!(try_parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn compute_api_versions() {
        assert_eq!(parse(&[]).compute_api_version, "");
        assert_eq!(
            parse(&["--compute-api-version=2020-06-01"]).compute_api_version,
            "2020-06-01"
        );
        for (s, ok) in [
            ("", true),
            ("2019-12-01", true),
            ("2025-04-01-preview", true),
            ("2019-12-1", false),
            ("latest", false),
            ("2019/12/01", false),
            ("2019-12-01-beta", false),
            ("2019-12-01&x=1", false),
        ] {
            assert_eq!(parse_api_version(s).is_ok(), ok, "{s}");
        }
    }

    #[test]
    fn go_booleans() {
        assert!(parse(&["--forceNamespaced"]).force_namespaced);
        assert!(parse(&["--forceNamespaced=true"]).force_namespaced);
        assert!(parse(&["--forceNamespaced=1"]).force_namespaced);
        assert!(!parse(&["--forceNamespaced=false"]).force_namespaced);
        assert!(!parse(&["--enable-type-upgrade=false"]).enable_type_upgrade);
        assert!(Args::try_parse_from(["mic", "--forceNamespaced=yes"]).is_err());
        // Go's flag package never takes the next word as a boolean's value.
        assert!(Args::try_parse_from(["mic", "--forceNamespaced", "false"]).is_err());
    }

    #[test]
    fn force_namespaced_env_must_be_exactly_true() {
        let a = parse(&[]);
        assert!(a.force_namespaced_with_env(Some("true")));
        assert!(!a.force_namespaced_with_env(Some("True")));
        assert!(!a.force_namespaced_with_env(None));
        assert!(parse(&["--forceNamespaced"]).force_namespaced_with_env(Some("false")));
    }

    #[test]
    fn go_durations() {
        for (s, d) in [
            ("0", Duration::ZERO),
            ("3600s", Duration::from_secs(3600)),
            ("3m", Duration::from_secs(180)),
            ("1h30m", Duration::from_secs(5400)),
            ("100ms", Duration::from_millis(100)),
            ("1.5s", Duration::from_millis(1500)),
            ("2us", Duration::from_micros(2)),
        ] {
            assert_eq!(parse_go_duration(s), Ok(d), "{s}");
        }
        for s in ["", "3", "s", "1x", "-1s", "1..5s"] {
            assert!(parse_go_duration(s).is_err(), "{s}");
        }
    }
}
