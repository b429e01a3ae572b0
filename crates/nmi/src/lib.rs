//! NMI, the Node Managed Identity agent: a host-network DaemonSet that
//! redirects pod traffic for IMDS (169.254.169.254:80) to itself and answers
//! token requests in IMDS's format, only for identities the calling pod is
//! bound to (what upstream's NMI did and where we differ:
//! docs/upstream-behaviour.md).
//!
//! Decisions are pure and tested table-driven: [`request`] (routes, header,
//! query), [`index`] (what this node's pods and identities are), [`select`]
//! (which identity a pod gets), [`response`] (bodies) and [`iptables`]'s
//! expected rules. The executors around them are thin: [`server`], [`watch`],
//! [`token`] and [`iptables::Runner`]. Service-principal identities (types 1
//! and 2) are [`sp`] (which Secret and tenants, checked as
//! docs/upstream-behaviour.md#h10-secrets-read-across-namespaces says) over [`aad`] (the
//! credential, AAD's v1 request and answer, an HTTPS client of our own).

pub mod aad;
pub mod args;
pub mod cluster;
pub mod conntrack;
pub mod fair;
pub mod federated;
pub mod http_client;
pub mod index;
pub mod iptables;
pub mod limits;
pub mod metrics;
pub mod request;
pub mod response;
pub mod secret;
pub mod select;
pub mod server;
pub mod sp;
pub mod taint;
pub mod token;
pub mod uninstall;
pub mod watch;

pub use args::Args;

/// The `nmi` command: parses the process arguments, then [`cli_run`]. A
/// wrapper binary (the test crate's `e2e-nmi`) runs this on a runtime of its
/// own, so it runs the same code as `src/main.rs`.
pub async fn cli_main() -> anyhow::Result<()> {
    use clap::Parser;
    cli_run(Args::parse(), None).await
}

/// The `nmi` command once its flags are parsed: sets up logging, logs the
/// runtime's size (`runtime`: how `src/main.rs` sized it; `None` for a
/// runtime built elsewhere, whose threads are read from the runtime) and
/// runs until SIGTERM/SIGINT.
pub async fn cli_run(args: Args, runtime: Option<args::RuntimeSize>) -> anyhow::Result<()> {
    let format = args
        .log_format
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    aadpodid_runtime::logging::init(format, "info");
    if let Some(w) = args.klog_warning() {
        tracing::warn!("{w}");
    }
    if args.version {
        println!("nmi {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    match runtime {
        Some(size) => tracing::info!(threads = size.threads, "async runtime: {size}"),
        None => {
            let handle = tokio::runtime::Handle::current();
            let threads = handle.metrics().num_workers();
            tracing::info!(
                threads,
                "async runtime: {threads} thread(s), {:?}, built by the caller",
                handle.runtime_flavor()
            );
        }
    }
    let shutdown = aadpodid_runtime::Shutdown::on_signals()?;
    run(args, shutdown).await?;
    Ok(())
}

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aadpodid_runtime::Health;
use aadpodid_runtime::Shutdown;
use aadpodid_runtime::admin::spawn_probe_and_metrics;

/// Why NMI could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The kubelet uses kubenet and `--allow-network-plugin-kubenet` is off.
    #[error("{0}")]
    KubenetCheck(String),
    /// Managed mode without namespaced mode (upstream's message, typo kept).
    #[error("managed mode not intialized in force namespaced mode")]
    ManagedNeedsNamespaced,
    /// `--node` is empty.
    #[error("--node (or NODE_NAME) is required")]
    MissingNode,
    /// `--aad-ca-file` is unusable.
    #[error("--aad-ca-file: {0}")]
    AadCa(String),
    /// `--imds-endpoint` is unusable.
    #[error("--imds-endpoint: {0}")]
    ImdsEndpoint(String),
    /// The Kubernetes client could not be built.
    #[error(transparent)]
    KubeClient(#[from] aadpodid_runtime::client::ClientError),
    /// Metrics could not be registered.
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A listener could not be bound.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// Which server.
        what: &'static str,
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// SIGTERM/SIGINT came while NMI waited for a port (not an error: NMI
    /// stops as it would after serving).
    #[error("stopped while waiting for a port")]
    StoppedWhileBinding,
    /// The first iptables sync, or the cleanup, failed.
    #[error(transparent)]
    Iptables(#[from] iptables::IptablesError),
}

/// Upstream's kubenet check (docs/upstream-behaviour.md#kubenet-check):
/// reading `path` must succeed and it must not contain
/// `--network-plugin=kubenet`.
pub fn kubenet_check(path: &std::path::Path, allow: bool) -> Result<(), RunError> {
    if allow {
        return Ok(());
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| RunError::KubenetCheck(format!("reading {}: {e}", path.display())))?;
    if text.contains("--network-plugin=kubenet") {
        return Err(RunError::KubenetCheck(
            "kubenet is not supported (pods could ARP-spoof each other, CVE-2021-1677); set --allow-network-plugin-kubenet=true to run anyway".into(),
        ));
    }
    Ok(())
}

/// How often a port held by another process is tried again.
pub const BIND_RETRY_EVERY: Duration = Duration::from_millis(10);
/// How long NMI waits for a port another process holds before it gives up
/// (and exits, to be restarted): longer than the NMI it replaces takes to
/// stop (upstream's sleeps 10 s after SIGTERM, within a 30 s grace period).
pub const BIND_WAIT_MAX: Duration = Duration::from_secs(300);

/// What to do after a failed bind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindStep {
    /// The port is in use and the wait is not over: try again.
    Retry,
    /// Any other error, or the wait is over.
    GiveUp,
}

/// The decision after a failed bind: only "address in use" is waited for
/// (the NMI being replaced still runs on this node, as during a DaemonSet
/// rolling update with surge), for [`BIND_WAIT_MAX`] since the first try.
pub fn bind_step(kind: std::io::ErrorKind, waited: Duration) -> BindStep {
    if kind == std::io::ErrorKind::AddrInUse && waited < BIND_WAIT_MAX {
        BindStep::Retry
    } else {
        BindStep::GiveUp
    }
}

/// Binds `addr`, waiting while another process holds it ([`bind_step`]);
/// [`RunError::StoppedWhileBinding`] when `shutdown` came first.
async fn bind_when_free(
    what: &'static str,
    addr: SocketAddr,
    shutdown: &Shutdown,
) -> Result<tokio::net::TcpListener, RunError> {
    let started = std::time::Instant::now();
    let mut said = false;
    loop {
        let source = match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                if said {
                    tracing::info!(%addr, waited_ms = started.elapsed().as_millis() as u64, "bound {what}: the port is free");
                }
                return Ok(listener);
            }
            Err(source) => source,
        };
        if bind_step(source.kind(), started.elapsed()) == BindStep::GiveUp {
            return Err(RunError::Bind { what, addr, source });
        }
        if !said {
            said = true;
            tracing::warn!(%addr, "{what}: the port is in use (the NMI being replaced still runs); the redirect is in place, trying again every {} ms for up to {} s", BIND_RETRY_EVERY.as_millis(), BIND_WAIT_MAX.as_secs());
        }
        tokio::select! {
            _ = shutdown.signaled() => return Err(RunError::StoppedWhileBinding),
            _ = tokio::time::sleep(BIND_RETRY_EVERY) => {}
        }
    }
}

/// Runs NMI until `shutdown`.
pub async fn run(args: Args, shutdown: Shutdown) -> Result<(), RunError> {
    let redirect = iptables::Redirect {
        metadata_ip: args.metadata_ip,
        metadata_port: args.metadata_port,
        target_ip: args.dnat_target(),
        target_port: args.nmi_port,
    };
    let runner = iptables::Runner::new(&args.iptables_path);
    if args.cleanup_iptables {
        runner.cleanup().await?;
        tracing::info!("iptables chain and jump removed");
        return Ok(());
    }
    kubenet_check(&args.kubelet_config, args.allow_network_plugin_kubenet)?;
    let namespaced = args.namespaced(std::env::var(args::ENV_FORCE_NAMESPACED).ok().as_deref());
    if args.operation_mode == args::OperationMode::Managed && !namespaced {
        return Err(RunError::ManagedNeedsNamespaced);
    }
    if args.node.is_empty() {
        return Err(RunError::MissingNode);
    }
    // The redirect goes in first, before NMI binds any port or talks to
    // the apiserver. The first sync must succeed (upstream exits too); later
    // failures are logged and retried at the next interval. So must, with
    // --enable-conntrack-deletion, the first cut of connections opened
    // before the redirect (NMI exits rather than run with a window it was
    // asked to close), and route_localnet when the redirect needs it (a
    // read-only /proc/sys is named with its fixes). From here on pods never
    // reach the real IMDS: until NMI listens they are refused, or answered
    // by the NMI this one replaces while it still holds the port (a rolling
    // update with surge); even when NMI then exits, the rules stay.
    let runner = if args.enable_conntrack_deletion {
        runner.with_conntrack(conntrack::Conntrack::new(&args.conntrack_path))
    } else {
        runner
    };
    let actions = runner.sync(&redirect).await?;
    if actions.is_empty() {
        // The rules were there already (fail-closed across restarts); cut
        // anyway, in case they were missing a moment before NMI started.
        runner.cut_old_connections(&redirect).await?;
    }
    tracing::info!(
        ?actions,
        conntrack_deletion = args.enable_conntrack_deletion,
        "iptables in place"
    );
    iptables::ensure_route_localnet(&redirect, args.set_route_localnet)?;
    // From here on the rules are checked and repaired, also while NMI waits
    // for its ports below.
    let checks = tokio::spawn(keep_rules(
        runner.clone(),
        redirect.clone(),
        Duration::from_secs(args.ipt_update_interval_sec.max(1)),
        shutdown.clone(),
    ));

    if args.enable_profile {
        tracing::warn!("--enableProfile is accepted but this NMI serves no pprof");
    }
    let user_agent = if args.custom_user_agent.is_empty() {
        format!("aad-pod-identity/NMI/{}", env!("CARGO_PKG_VERSION"))
    } else {
        format!(
            "aad-pod-identity/NMI/{} {}",
            env!("CARGO_PKG_VERSION"),
            args.custom_user_agent
        )
    };
    let imds =
        token::Imds::new(&args.imds_endpoint, &user_agent).map_err(RunError::ImdsEndpoint)?;
    let (cluster, warning) = cluster::from_flags(
        &args.cloudconfig,
        &args.immutable_user_msis,
        args.serve_cluster_identities,
        |p| std::fs::read_to_string(p),
    );
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    if cluster.serves() {
        tracing::warn!(
            client_ids = cluster.len(),
            "--serve-cluster-identities: pods bound to the cluster's own identities get their tokens"
        );
    } else {
        tracing::info!(
            client_ids = cluster.len(),
            "the cluster's own identities are not served to pods"
        );
    }
    let aad =
        aad::AadClient::new(args.aad_ca_file.as_deref(), &user_agent).map_err(RunError::AadCa)?;
    let cluster_tenant =
        cluster::tenant_from_flags(&args.cloudconfig, |p| std::fs::read_to_string(p));
    let client =
        aadpodid_runtime::client::kube_client(args.kubeconfig.as_deref(), &user_agent).await?;
    let owner = if args.cleanup_on_uninstall {
        match uninstall::OwnerWatch::start(&client, &args.pod_namespace, &args.pod_name, &shutdown)
            .await
        {
            Ok(w) => Some(w),
            Err(error) => {
                tracing::error!(%error, "--cleanup-on-uninstall is off: the redirect will stay after uninstall");
                None
            }
        }
    } else {
        None
    };
    let metrics = metrics::Metrics::new()?;
    let state = Arc::new(server::State::default());
    let synced = watch::spawn(
        &client,
        &args.node,
        args.operation_mode,
        args.enable_scale_features,
        &state,
        &metrics,
        &shutdown,
    );

    // The ports: the token service's first. While the NMI being replaced
    // still holds them, pods are redirected to it.
    let health = Health::new();
    let any = std::net::IpAddr::from([0u8, 0, 0, 0]);
    let token_addr = SocketAddr::new(args.nmi_listen_address, args.nmi_port);
    let ports = async {
        let token = bind_when_free("the token service", token_addr, &shutdown).await?;
        let probe = SocketAddr::new(any, args.http_probe_port);
        let probe = bind_when_free("the health probe", probe, &shutdown).await?;
        let prom = SocketAddr::new(any, args.prometheus_port);
        let prom = bind_when_free("metrics", prom, &shutdown).await?;
        Ok::<_, RunError>((token, probe, prom))
    };
    let (token_listener, probe, prom) = match ports.await {
        Ok(ports) => ports,
        Err(RunError::StoppedWhileBinding) => {
            let _ = checks.await;
            return stop(&args, &runner, owner.as_ref()).await;
        }
        Err(error) => return Err(error),
    };
    spawn_probe_and_metrics(probe, &health, prom, &metrics.registry, &shutdown);

    let server = Arc::new(server::Server {
        state: Arc::clone(&state),
        cache: token::TokenCache::new(imds)
            .with_cluster_identities(cluster)
            .with_bounds(
                args.max_pending_fetches_per_pod as usize,
                args.max_cached_tokens as usize,
            ),
        federated: federated::Federated::new(Some(client.clone()), aad.clone(), &cluster_tenant)
            .with_max_pending_per_pod(args.max_pending_fetches_per_pod as usize),
        sp: sp::ServicePrincipals::new(
            Some(client.clone()),
            aad,
            args.allowed_secret_namespaces
                .iter()
                .filter(|n| !n.is_empty())
                .cloned()
                .collect(),
        ),
        config: server::Config {
            mode: args.operation_mode,
            namespaced,
            metadata_header_required: args.metadata_header_required,
            proxy: request::ProxyPolicy {
                block_instance_metadata: args.block_instance_metadata,
                allow_scheduled_events_post: args.allow_scheduled_events_post,
                extra_paths: args.proxy_allowed_paths.clone(),
            },
            set_retry_after_header: args.set_retry_after_header,
            retry_attempts_for_created: args.retry_attempts_for_created,
            retry_attempts_for_assigned: args.retry_attempts_for_assigned,
            retry_interval_secs: args.find_identity_retry_interval,
            mic_namespace: args.mic_namespace.clone(),
            node_name: args.node.clone(),
            event_namespace: args.pod_namespace.clone(),
            mic_service_accounts: args.mic_service_accounts.clone(),
            metadata_addr: SocketAddr::new(args.metadata_ip.into(), args.metadata_port),
            limits: server::Limits {
                max_connections: args.max_connections,
                max_connections_per_ip: args.max_connections_per_ip,
                first_sync_wait: Duration::from_secs(args.first_sync_wait_sec),
                ..Default::default()
            },
            default_token_source: args.default_token_source,
        },
        metrics,
        events: aadpodid_runtime::events::EventPublisher::new(
            client.clone(),
            aadpodid_api::EVENT_SOURCE_COMPONENT,
            Some(if args.pod_name.is_empty() {
                format!("nmi-{}", args.node)
            } else {
                args.pod_name.clone()
            }),
        ),
        first_sync: server::FirstSync::after(&synced, shutdown.clone()),
    });
    tokio::spawn(server::serve(
        token_listener,
        Arc::clone(&server),
        shutdown.clone(),
    ));
    tracing::info!(%token_addr, node = %args.node, "token service listening");

    // --node-startup-taint: off the Node once the redirect is in place (it
    // is, from here on) and every watch has synced. Never blocks serving.
    if !args.node_startup_taint.is_empty() {
        tokio::spawn(taint::remove_when_ready(
            client.clone(),
            args.node.clone(),
            args.node_startup_taint.clone(),
            synced.wait_all(),
            shutdown.clone(),
        ));
    }

    // Readiness: Active once iptables is in place (it is, from here on) and
    // every watch has listed; a synced set stays synced.
    {
        let health = health.clone();
        let shutdown = shutdown.clone();
        let all = synced.wait_all();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.signaled() => {}
                _ = all => health.set_active(true),
            }
        });
    }
    // Drop cached tokens of identities no pod here uses.
    {
        let server = Arc::clone(&server);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = shutdown.signaled() => return,
                    _ = tick.tick() => {
                        let live = server.state.index().token_keys_in_use();
                        server.cache.retain(|k| live.contains(k));
                    }
                }
            }
        });
    }

    shutdown.signaled().await;
    let _ = checks.await;
    stop(&args, &runner, owner.as_ref()).await
}

/// Checks the rules every `interval` and repairs them until `shutdown`.
async fn keep_rules(
    runner: iptables::Runner,
    redirect: iptables::Redirect,
    interval: Duration,
    shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            _ = shutdown.signaled() => return,
            _ = tokio::time::sleep(interval) => {
                match runner.sync(&redirect).await {
                    Ok(actions) if !actions.is_empty() => tracing::warn!(?actions, "iptables repaired"),
                    Ok(_) => {}
                    Err(error) => tracing::error!(%error, "iptables check failed"),
                }
            }
        }
    }
}

/// What NMI does with the redirect when it stops: removes it when asked
/// (`--remove-iptables-on-exit`) or when its DaemonSet is being uninstalled,
/// else leaves it in place (fail-closed).
async fn stop(
    args: &Args,
    runner: &iptables::Runner,
    owner: Option<&uninstall::OwnerWatch>,
) -> Result<(), RunError> {
    let uninstalling = match owner {
        Some(w) => w.decide_on_exit().await == uninstall::ExitAction::RemoveRules,
        None => false,
    };
    if args.remove_iptables_on_exit {
        runner.cleanup().await?;
        tracing::info!("iptables removed on exit (--remove-iptables-on-exit)");
    } else if uninstalling {
        runner.cleanup().await?;
        tracing::info!("iptables removed: the NMI DaemonSet is being uninstalled");
    } else {
        tracing::info!("leaving the iptables redirect in place (fail-closed)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubenet_check_is_upstreams() {
        let dir = std::env::temp_dir().join(format!("nmi-kubenet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kubenet = dir.join("kubenet");
        std::fs::write(
            &kubenet,
            "KUBELET_FLAGS=--network-plugin=kubenet --max-pods=110",
        )
        .unwrap();
        let cni = dir.join("cni");
        std::fs::write(&cni, "KUBELET_FLAGS=--network-plugin=cni").unwrap();
        assert!(kubenet_check(&kubenet, false).is_err());
        assert!(kubenet_check(&kubenet, true).is_ok());
        assert!(kubenet_check(&cni, false).is_ok());
        assert!(
            kubenet_check(&dir.join("missing"), false).is_err(),
            "a missing file is fatal"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
