//! MIC, the Managed Identity Controller: turns AzureIdentity, AzureIdentityBinding
//! and pods labelled `aadpodidbinding` into AzureAssignedIdentity objects and
//! assigns the identities to the nodes' VMSS/VMs through ARM.
//!
//! Decisions live in the pure [`plan`] over the in-memory [`index`], and in
//! the pure [`guard`] over what ARM reports for each VMSS/VM and the
//! ownership [`ledger`]; I/O lives in thin executors ([`apply`], [`watch`],
//! [`leader`]).

pub mod apply;
pub mod args;
pub mod cloud;
pub mod drift;
pub mod events;
pub mod guard;
pub mod index;
pub mod leader;
pub mod ledger;
pub mod metrics;
pub mod plan;
pub mod schedule;
pub mod watch;
mod writes;

/// The `mic` command: parses the process arguments and environment, builds
/// its async runtime (sized by `--worker-threads`, else the container's CPU
/// limit, else [`args::DEFAULT_WORKER_THREADS`]), sets up logging and runs
/// until SIGTERM/SIGINT. `src/main.rs` is this and nothing else, so a
/// wrapper binary (the test crate's `e2e-mic`) runs the same code on the
/// same runtime.
pub fn cli_main() -> anyhow::Result<()> {
    let args = args::Args::parse_go_style();
    let size = aadpodid_runtime::size::RuntimeSize::of_process(
        args.worker_threads,
        args::DEFAULT_WORKER_THREADS,
    );
    size.builder().build()?.block_on(cli_run(args, size))
}

/// [`cli_main`] on its runtime: `args` parsed, the runtime sized as `size`
/// says (logged at start).
async fn cli_run(
    args: args::Args,
    size: aadpodid_runtime::size::RuntimeSize,
) -> anyhow::Result<()> {
    let format: aadpodid_runtime::logging::LogFormat =
        args.log_format.parse().map_err(anyhow::Error::msg)?;
    aadpodid_runtime::logging::init(format, if args.verbosity > 0 { "debug" } else { "info" });
    if let Some(warning) = args.klog_warning() {
        tracing::warn!("{warning}");
    }
    let env = |k: &str| std::env::var(k).ok();
    // Upstream checks MIC_POD_NAMESPACE before --version.
    if env(args::ENV_MIC_POD_NAMESPACE).is_none_or(|v| v.is_empty()) {
        anyhow::bail!("{} must be set", args::ENV_MIC_POD_NAMESPACE);
    }
    if args.version {
        println!("{VERSION}");
        return Ok(());
    }
    if args.enable_scale_features {
        tracing::info!("--enableScaleFeatures is deprecated and has no effect");
    }
    let settings = Settings::from_args(&args, &env)?;
    tracing::info!(version = VERSION, lease = %settings.leader.name, identity = %settings.leader.identity, "starting MIC");
    tracing::info!(threads = size.threads, "async runtime: {size}");
    let shutdown = aadpodid_runtime::Shutdown::on_signals()?;
    run(settings, shutdown, None).await?;
    Ok(())
}

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aadpodid_runtime::admin::spawn_probe_and_metrics;
use aadpodid_runtime::{Health, Shutdown};
use tokio::sync::watch as tokio_watch;
use tokio::time::Instant;

use crate::apply::{Executor, ExecutorOptions};
use crate::cloud::arm::{ArmCloud, ArmOptions};
use crate::cloud::config::{self as cloud_config, CloudConfig};
use crate::leader::LeaderConfig;

/// The version printed by `--version` and sent in the User-Agent.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Work that arrives within this of a cycle's start is folded into the next
/// cycle (a change after a quiet spell starts one at once).
const DEBOUNCE: Duration = Duration::from_millis(50);
/// How long a shutdown waits for running ARM work.
const JOB_DRAIN: Duration = Duration::from_secs(10);

/// Everything `run` needs, resolved from flags and environment.
#[derive(Clone, Debug)]
pub struct Settings {
    pub kubeconfig: Option<PathBuf>,
    pub cloud: CloudConfig,
    pub plan: plan::Options,
    pub leader: LeaderConfig,
    pub probe_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub sync_retry_duration: Duration,
    pub reconcile_interval: Duration,
    pub executor: ExecutorOptions,
    pub arm: ArmOptions,
    /// `--identity-removal-linger`.
    pub removal_linger: Duration,
    /// `--clientQps` as upstream's client-go took it; `None`: no limit.
    pub kube_rate_limit: Option<aadpodid_runtime::client::RateLimit>,
}

/// The client-side limit `--clientQps` asks for: none unless it is given,
/// else what client-go made of upstream's `QPS = clientQps, Burst = int(clientQps)`.
/// A drift check of `only` (every resource when `None`) against what the
/// plan expects of the current index; losing the lease stops it at once.
async fn drift_check<C: cloud::Cloud>(
    executor: &Executor<C>,
    shared: &watch::Shared,
    plan: &plan::Options,
    leading: &tokio_watch::Receiver<bool>,
    only: Option<&BTreeSet<cloud::ResourceRef>>,
) {
    let index = shared.snapshot();
    let expected = plan::expected_assignments(&index, plan);
    let mut lost = leading.clone();
    tokio::select! {
        r = executor.reconcile_drift(&expected, &index, only) => if let Err(error) = r {
            tracing::warn!(%error, "drift check stopped");
        },
        _ = lost.wait_for(|l| !*l) => {}
    }
}

fn kube_rate_limit(client_qps: Option<f32>) -> Option<aadpodid_runtime::client::RateLimit> {
    client_qps.and_then(|q| aadpodid_runtime::client::RateLimit::from_client_qps(f64::from(q)))
}

#[cfg(test)]
mod kube_rate_limit_tests {
    use super::kube_rate_limit;
    use aadpodid_runtime::client::RateLimit;

    #[test]
    fn only_a_given_client_qps_limits() {
        let cases = [
            (None, None),
            (Some(5.0), Some(RateLimit { qps: 5.0, burst: 5 })),
            (
                Some(20.0),
                Some(RateLimit {
                    qps: 20.0,
                    burst: 20,
                }),
            ),
            (
                Some(0.0),
                Some(RateLimit {
                    qps: 5.0,
                    burst: 10,
                }),
            ),
            (Some(-1.0), None),
        ];
        for (given, want) in cases {
            assert_eq!(kube_rate_limit(given), want, "{given:?}");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{} must be set", args::ENV_MIC_POD_NAMESPACE)]
    MissingPodNamespace,
    #[error("reading cloud config {path}: {source}")]
    ReadCloudConfig {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    CloudConfig(#[from] cloud_config::CloudConfigError),
}

impl Settings {
    /// Resolves flags and environment as upstream's `main` does.
    pub fn from_args(
        a: &args::Args,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, SettingsError> {
        // Exhaustive on purpose: a new flag that is not wired is a compile error.
        let args::Args {
            kubeconfig,
            cloudconfig,
            force_namespaced: _,
            version: _,
            sync_retry_duration,
            leader_election_instance,
            leader_election_namespace,
            leader_election_name,
            leader_election_duration,
            leader_election_endpoints_lock,
            http_probe_port,
            prometheus_port,
            enable_profile: _,
            enable_scale_features: _,
            create_delete_batch,
            client_qps,
            immutable_user_msis: _,
            config_map_name: _,
            type_upgrade_status_key: _,
            enable_type_upgrade: _,
            update_user_msi_max_retry,
            update_user_msi_retry_interval,
            identity_assignment_reconcile_interval,
            log_format: _,
            custom_user_agent,
            keep_completed_pod_identities,
            arm_resource_write_burst,
            arm_resource_writes_per_minute,
            arm_subscription_write_burst,
            arm_subscription_writes_per_minute,
            identity_removal_linger,
            default_token_source,
            identity_policy,
            serve_cluster_identities,
            owned_identities_configmap,
            logtostderr: _,
            alsologtostderr: _,
            verbosity: _,
            klog: _,
            compute_api_version,
            // Read by `cli_main`, before the runtime exists.
            worker_threads: _,
        } = a;
        let pod_namespace = env(args::ENV_MIC_POD_NAMESPACE)
            .filter(|v| !v.is_empty())
            .ok_or(SettingsError::MissingPodNamespace)?;
        let read_file = |p: &str| std::fs::read_to_string(p).map_err(|e| e.to_string());
        let cloud = if cloudconfig.is_empty() {
            cloud_config::load(None, env, &read_file)?
        } else {
            let text = std::fs::read_to_string(cloudconfig).map_err(|source| {
                SettingsError::ReadCloudConfig {
                    path: cloudconfig.clone(),
                    source,
                }
            })?;
            cloud_config::load(Some((cloudconfig, &text)), env, &read_file)?
        };
        let mut immutable: BTreeSet<String> = a.immutable_client_ids().into_iter().collect();
        if !cloud.user_assigned_identity_id.is_empty() {
            immutable.insert(cloud.user_assigned_identity_id.to_lowercase());
        }
        let identity = if leader_election_instance.is_empty() {
            env("HOSTNAME")
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|| "mic".into())
        } else {
            leader_election_instance.clone()
        };
        let user_agent = if custom_user_agent.is_empty() {
            format!("aad-pod-identity/MIC/{VERSION}")
        } else {
            format!("aad-pod-identity/MIC/{VERSION} {custom_user_agent}")
        };
        Ok(Settings {
            kubeconfig: (!kubeconfig.is_empty()).then(|| PathBuf::from(kubeconfig)),
            cloud,
            plan: plan::Options {
                force_namespaced: a
                    .force_namespaced_with_env(env(args::ENV_FORCE_NAMESPACED).as_deref()),
                immutable_client_ids: immutable.clone(),
                keep_completed_pod_identities: *keep_completed_pod_identities,
                policy: *identity_policy,
                default_token_source: *default_token_source,
            },
            leader: LeaderConfig {
                namespace: leader_election_namespace.clone(),
                name: leader_election_name.clone(),
                identity,
                lease_duration: *leader_election_duration,
                endpoints_lock: *leader_election_endpoints_lock,
            },
            probe_addr: SocketAddr::from(([0, 0, 0, 0], *http_probe_port)),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], *prometheus_port)),
            sync_retry_duration: *sync_retry_duration,
            reconcile_interval: *identity_assignment_reconcile_interval,
            executor: ExecutorOptions {
                batch: usize::try_from(*create_delete_batch).unwrap_or(1).max(1),
                max_retry: *update_user_msi_max_retry,
                retry_interval: *update_user_msi_retry_interval,
                limits: schedule::Limits {
                    resource: schedule::BucketSpec {
                        burst: arm_resource_write_burst.max(1.0),
                        per_minute: arm_resource_writes_per_minute.max(0.0),
                    },
                    subscription: schedule::BucketSpec {
                        burst: arm_subscription_write_burst.max(1.0),
                        per_minute: arm_subscription_writes_per_minute.max(0.0),
                    },
                },
                protection: guard::Protection {
                    cluster_client_ids: immutable,
                    serve_cluster_identities: *serve_cluster_identities,
                },
                ledger_namespace: pod_namespace,
                ledger_name: owned_identities_configmap.clone(),
            },
            removal_linger: *identity_removal_linger,
            kube_rate_limit: kube_rate_limit(*client_qps),
            arm: ArmOptions {
                user_agent,
                compute_api_version: Some(compute_api_version.clone()).filter(|v| !v.is_empty()),
                // Upstream re-read azure.json when it changed; the
                // environment variables are read once.
                reload: (!cloudconfig.is_empty()).then(|| cloud::arm::CloudConfigFile {
                    path: PathBuf::from(cloudconfig),
                    environment_file: env(cloud_config::ENV_AZURE_ENVIRONMENT_FILEPATH),
                }),
                ..ArmOptions::default()
            },
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("building the Kubernetes client: {0}")]
    KubeClient(#[from] aadpodid_runtime::client::ClientError),
    #[error("building the ARM client: {0}")]
    Cloud(#[from] cloud::CloudError),
    #[error(transparent)]
    Metrics(#[from] metrics::RegisterMetrics),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Leader(#[from] leader::LeaderError),
}

/// Handles of a running MIC, for tests and `main`.
#[derive(Debug, Clone)]
pub struct Handles {
    pub health: Health,
    pub probe_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub leading: tokio_watch::Receiver<bool>,
}

/// Runs MIC with the ARM client until `shutdown` (Ok) or a lost lease (Err).
pub async fn run(
    settings: Settings,
    shutdown: Shutdown,
    ready: Option<tokio::sync::oneshot::Sender<Handles>>,
) -> Result<(), RunError> {
    let cloud = ArmCloud::new(&settings.cloud, settings.arm.clone())?;
    run_with_cloud(settings, Arc::new(cloud), shutdown, ready).await
}

/// Runs MIC against any [`cloud::Cloud`].
pub async fn run_with_cloud<C: cloud::Cloud>(
    settings: Settings,
    cloud: Arc<C>,
    shutdown: Shutdown,
    ready: Option<tokio::sync::oneshot::Sender<Handles>>,
) -> Result<(), RunError> {
    let client = aadpodid_runtime::client::kube_client_with_limit(
        settings.kubeconfig.as_deref(),
        &settings.arm.user_agent,
        settings.kube_rate_limit,
    )
    .await?;
    let metrics = metrics::Metrics::new()?;
    // Upstream counts at process start, not when leadership is gained.
    metrics.mic_new_leader_election_count.inc();
    let health = Health::new();

    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Listen { addr, source })
    };
    let probe = bind(settings.probe_addr).await?;
    let probe_addr = probe.local_addr().map_err(|source| RunError::Listen {
        addr: settings.probe_addr,
        source,
    })?;
    let metrics_listener = bind(settings.metrics_addr).await?;
    let metrics_addr = metrics_listener
        .local_addr()
        .map_err(|source| RunError::Listen {
            addr: settings.metrics_addr,
            source,
        })?;
    spawn_probe_and_metrics(
        probe,
        &health,
        metrics_listener,
        &metrics.registry,
        &shutdown,
    );

    let events = events::Events::new(client.clone(), &settings.leader.identity);
    let (leading_tx, leading) = tokio_watch::channel(false);
    let shared = Arc::new(watch::Shared::default());
    watch::spawn(
        client.clone(),
        shared.clone(),
        metrics.clone(),
        events.clone(),
        leading.clone(),
        shutdown.clone(),
        settings.plan.policy != aadpodid_api::PolicyMode::Off,
    );
    watch::spawn_drift_events(
        client.clone(),
        &settings.executor.ledger_namespace,
        shared.clone(),
        &shutdown,
    );

    let mut election = tokio::spawn(leader::run(
        client.clone(),
        settings.leader.clone(),
        leading_tx,
        shutdown.clone(),
    ));
    if let Some(tx) = ready {
        let _ = tx.send(Handles {
            health: health.clone(),
            probe_addr,
            metrics_addr,
            leading: leading.clone(),
        });
    }

    let executor = Arc::new(Executor::new(
        apply::Deps {
            client,
            cloud,
            events,
            metrics: metrics.clone(),
            leading: leading.clone(),
            shared: shared.clone(),
        },
        settings.executor.clone(),
    ));
    // The running ARM work, one job per VMSS/VM at most.
    let mut jobs: tokio::task::JoinSet<apply::JobDone> = tokio::task::JoinSet::new();
    // Each running job's resource, so that one that panics frees it.
    let mut job_resources: std::collections::BTreeMap<tokio::task::Id, cloud::ResourceRef> =
        std::collections::BTreeMap::new();
    // When a job asked for its resource to be tried again.
    let mut job_retry_at: Option<Instant> = None;
    let mut leading_rx = leading.clone();
    let mut next_full = Instant::now() + settings.sync_retry_duration;
    // The first drift check (which also checks Assigned AAIs against ARM)
    // runs as soon as this replica leads with synced caches.
    let mut next_drift = Instant::now();
    let mut retry_at: Option<Instant> = None;
    let mut dirty = true;
    let mut linger = schedule::Linger::new(settings.removal_linger);
    // Event-driven drift checks of one resource each, at most one per
    // resource per drift::MIN_GAP.
    let mut gate = drift::Gate::new(drift::MIN_GAP);
    let origin = Instant::now();
    // When the last cycle started (since `origin`), and how long it took.
    let mut last_cycle: Option<(Duration, Duration)> = None;
    loop {
        let active = *leading.borrow() && shared.synced();
        health.set_active(active);
        if active && dirty {
            dirty = false;
            let cycle_start = Instant::now();
            let index = shared.snapshot();
            let mut plan = plan::plan(&index, &settings.plan);
            let linger_wake = linger
                .hold(&mut plan, Instant::now() - origin)
                .map(|d| Instant::now() + d);
            tracing::debug!(
                pods = index.pods.len(),
                assigned = index.assigned.len(),
                create = plan.create.len(),
                update = plan.update.len(),
                assign_now = plan.assign_now.len(),
                delete_now = plan.delete_now.len(),
                resources = plan.resources.len(),
                "cycle planned"
            );
            if plan.is_empty() {
                // Still report warnings once, so bad input is visible when idle.
                executor.report_warnings(&plan.warnings, &index);
                retry_at = linger_wake;
            } else {
                let start = std::time::Instant::now();
                let mut lost = leading.clone();
                let result = tokio::select! {
                    r = executor.execute(plan, &index) => Some(r),
                    // Losing the lease cancels in-flight writes at once.
                    _ = lost.wait_for(|l| !*l) => None,
                };
                metrics.mic_cycle_count.inc();
                metrics
                    .mic_cycle_duration_seconds
                    .observe(start.elapsed().as_secs_f64());
                match result {
                    Some(Ok((outcome, started))) => {
                        for (resource, job) in started {
                            let handle = jobs.spawn(job);
                            job_resources.insert(handle.id(), resource);
                        }
                        retry_at = match (outcome.retry_at, linger_wake) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        }
                    }
                    Some(Err(error)) => tracing::warn!(%error, "cycle stopped"),
                    None => tracing::warn!("cycle cancelled: leadership lost"),
                }
            }
            last_cycle = Some((cycle_start - origin, cycle_start.elapsed()));
        }
        let wake_retry = match (retry_at, job_retry_at) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(next_full),
        };
        let gate_wake = gate.next_at().map(|d| origin + d);
        tokio::select! {
            _ = shutdown.signaled() => break,
            Some(joined) = jobs.join_next_with_id(), if !jobs.is_empty() => match joined {
                Ok((id, done)) => {
                    job_resources.remove(&id);
                    match done.result {
                        Ok(Some(at)) => {
                            job_retry_at = Some(job_retry_at.map_or(at, |t| t.min(at)));
                        }
                        Ok(None) => {}
                        Err(error) => tracing::warn!(resource = %done.resource, %error, "resource work stopped"),
                    }
                    dirty |= done.replan;
                }
                // Only a panic ends a job this way here (aborts happen below,
                // with the set emptied at once): its resource is free again
                // and planned anew.
                Err(error) => {
                    if let Some(resource) = job_resources.remove(&error.id()) {
                        tracing::error!(%resource, %error, "resource work ended abnormally");
                        executor.job_lost(&resource);
                        dirty = true;
                    }
                }
            },
            r = &mut election => {
                health.set_active(false);
                return match r {
                    Ok(r) => r.map_err(RunError::from),
                    // The election task only ends by returning.
                    Err(_) => Ok(()),
                };
            }
            _ = shared.changed.notified() => {
                let at = schedule::cycle_at(last_cycle, Instant::now() - origin, DEBOUNCE);
                tokio::time::sleep_until(origin + at).await;
                dirty = true;
            }
            _ = leading_rx.changed() => {
                dirty = true;
                // A new term reads the ledger afresh; the writes of the last
                // one stop at once.
                if !*leading_rx.borrow() {
                    jobs.abort_all();
                    while jobs.join_next().await.is_some() {}
                    job_resources.clear();
                    executor.clear_jobs();
                    job_retry_at = None;
                    gate.clear_pending();
                    executor.forget_ledger().await;
                }
            }
            _ = shared.drift_wanted.notified() => {
                let nodes = shared.take_drift_nodes();
                // A replica that is not active yet checks every resource
                // first when it becomes so.
                if *leading.borrow() && shared.synced() {
                    let index = shared.snapshot();
                    let now = Instant::now() - origin;
                    for node in &nodes {
                        match index.nodes.get(node) {
                            Some(info) => gate.request(info.resource.clone(), now),
                            None => tracing::debug!(%node, "drift check asked for an unknown node"),
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(gate_wake.unwrap_or(next_full)), if gate_wake.is_some() => {
                let due: BTreeSet<cloud::ResourceRef> =
                    gate.due(Instant::now() - origin).into_iter().collect();
                if *leading.borrow() && shared.synced() && !due.is_empty() {
                    tracing::info!(resources = ?due, "event-driven drift check");
                    drift_check(&executor, &shared, &settings.plan, &leading, Some(&due)).await;
                }
            }
            _ = tokio::time::sleep_until(wake_retry.min(next_full)) => {
                if Instant::now() >= next_full {
                    next_full = Instant::now() + settings.sync_retry_duration;
                }
                retry_at = None;
                job_retry_at = None;
                dirty = true;
            }
            _ = tokio::time::sleep_until(next_drift) => {
                let ready = *leading.borrow() && shared.synced();
                next_drift = Instant::now()
                    + if ready {
                        settings.reconcile_interval
                    } else {
                        settings.reconcile_interval.min(Duration::from_secs(1))
                    };
                if ready {
                    // Once per interval (30 minutes by default): the line
                    // tells a safety-net check's ARM reads from others.
                    tracing::info!(interval = ?settings.reconcile_interval, "periodic drift check (safety net)");
                    drift_check(&executor, &shared, &settings.plan, &leading, None).await;
                }
            }
        }
    }
    health.set_active(false);
    // Running operations are followed to their end for a while, so their
    // AAIs are settled before the lease is handed over.
    let drain = async { while jobs.join_next().await.is_some() {} };
    if tokio::time::timeout(JOB_DRAIN, drain).await.is_err() {
        tracing::warn!(
            "shutting down with ARM operations still running; the next leader settles their AAIs"
        );
    }
    jobs.abort_all();
    // Let the election hand the lease over.
    let _ = tokio::time::timeout(Duration::from_secs(5), election).await;
    Ok(())
}
