//! Watches that keep the [`Index`](crate::index::Index) current: pods on this
//! node (field selector `spec.nodeName`), AzureAssignedIdentities labelled
//! with this node (standard mode), every binding and identity (managed mode
//! serves from them; standard mode checks each AzureAssignedIdentity against
//! them), and exceptions. Malformed custom objects are skipped with a warning (and
//! dropped from the index, so a broken object never grants anything); they
//! never stop a watch.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use aadpodid_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException,
    LABEL_NODENAME,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::core::DeserializeGuard;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use aadpodid_runtime::Shutdown;

use crate::args::OperationMode;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::server::State;

/// How one kind is put into the index.
struct Ops<K> {
    apply: fn(&mut Index, &K),
    delete: fn(&mut Index, &str, &str),
    reset: fn(&mut Index, &[K]),
}

/// Which watches have listed everything once.
#[derive(Clone, Debug, Default)]
pub struct Synced(Arc<Vec<AtomicBool>>);

impl Synced {
    /// Whether every watch has synced.
    pub fn all(&self) -> bool {
        self.0.iter().all(|s| s.load(Ordering::Acquire))
    }
}

fn valid<K: Clone>(items: &[DeserializeGuard<K>]) -> Vec<K> {
    items
        .iter()
        .filter_map(|g| g.0.as_ref().ok().cloned())
        .collect()
}

macro_rules! guarded_ops {
    ($k:ty, $apply:ident, $delete:ident, $reset:ident) => {
        Ops::<DeserializeGuard<$k>> {
            apply: |i, g| match &g.0 {
                Ok(o) => i.$apply(o),
                Err(bad) => {
                    tracing::warn!(
                        kind = <$k as Resource>::kind(&()).as_ref(),
                        namespace = bad.metadata.namespace.as_deref().unwrap_or(""),
                        name = bad.metadata.name.as_deref().unwrap_or(""),
                        error = %bad.error,
                        "skipping malformed object"
                    );
                    i.$delete(
                        bad.metadata.namespace.as_deref().unwrap_or(""),
                        bad.metadata.name.as_deref().unwrap_or(""),
                    );
                }
            },
            delete: |i, ns, n| i.$delete(ns, n),
            reset: |i, all| i.$reset(&valid(all)),
        }
    };
}

/// Starts the watches for `mode`; returns their sync flags.
pub fn spawn(
    client: &Client,
    node: &str,
    mode: OperationMode,
    scale_features: bool,
    state: &Arc<State>,
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> Synced {
    let mut n = 0;
    let mut next = || {
        n += 1;
        n - 1
    };
    let flags_needed = match mode {
        OperationMode::Standard => 5,
        OperationMode::Managed => 4,
    };
    let synced = Synced(Arc::new(
        (0..flags_needed).map(|_| AtomicBool::new(false)).collect(),
    ));
    let ctx = |i: usize| {
        (
            Arc::clone(state),
            synced.clone(),
            i,
            metrics.clone(),
            shutdown.clone(),
        )
    };

    let pods = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let ops = Ops::<Pod> {
        apply: |i, p| i.apply_pod(p),
        delete: |i, ns, n| i.delete_pod(ns, n),
        reset: |i, all| i.reset_pods(all),
    };
    tokio::spawn(run(
        Api::<Pod>::all(client.clone()),
        pods,
        ops,
        "get_pod_list",
        ctx(next()),
    ));

    let exc = guarded_ops!(
        AzurePodIdentityException,
        apply_exception,
        delete_exception,
        reset_exceptions
    );
    tokio::spawn(run(
        Api::all(client.clone()),
        watcher::Config::default(),
        exc,
        "list_exceptions",
        ctx(next()),
    ));

    if mode == OperationMode::Standard {
        let cfg = if scale_features {
            watcher::Config::default().labels(&format!("{LABEL_NODENAME}={node}"))
        } else {
            watcher::Config::default()
        };
        let ops = guarded_ops!(AzureAssignedIdentity, apply_aai, delete_aai, reset_aais);
        tokio::spawn(run(
            Api::all(client.clone()),
            cfg,
            ops,
            "list_assigned_identities",
            ctx(next()),
        ));
    }
    let ops = guarded_ops!(
        AzureIdentityBinding,
        apply_binding,
        delete_binding,
        reset_bindings
    );
    tokio::spawn(run(
        Api::all(client.clone()),
        watcher::Config::default(),
        ops,
        "list_bindings",
        ctx(next()),
    ));
    let ops = guarded_ops!(
        AzureIdentity,
        apply_identity,
        delete_identity,
        reset_identities
    );
    tokio::spawn(run(
        Api::all(client.clone()),
        watcher::Config::default(),
        ops,
        "list_identities",
        ctx(next()),
    ));
    synced
}

async fn run<K>(
    api: Api<K>,
    config: watcher::Config,
    ops: Ops<K>,
    operation: &'static str,
    (state, synced, slot, metrics, shutdown): (Arc<State>, Synced, usize, Metrics, Shutdown),
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let stream = watcher::watcher(api, config).default_backoff();
    tokio::pin!(stream);
    let mut buffer: Vec<K> = Vec::new();
    loop {
        let event = tokio::select! {
            _ = shutdown.signaled() => return,
            e = stream.next() => e,
        };
        match event {
            None => return,
            Some(Err(error)) => {
                metrics
                    .kubernetes_errors
                    .with_label_values(&[operation])
                    .inc();
                tracing::warn!(%error, operation, "watch failed; retrying with backoff");
            }
            Some(Ok(Event::Init)) => buffer.clear(),
            Some(Ok(Event::InitApply(o))) => buffer.push(o),
            Some(Ok(Event::InitDone)) => {
                let all = std::mem::take(&mut buffer);
                state.update(|i| (ops.reset)(i, &all));
                if let Some(flag) = synced.0.get(slot) {
                    flag.store(true, Ordering::Release);
                }
            }
            Some(Ok(Event::Apply(o))) => {
                tracing::debug!(operation, ns = ?o.namespace(), name = %o.name_any(), "watch: applied");
                state.update(|i| (ops.apply)(i, &o));
            }
            Some(Ok(Event::Delete(o))) => {
                let ns = o.namespace().unwrap_or_default();
                let name = o.name_any();
                tracing::debug!(operation, %ns, %name, "watch: deleted");
                state.update(|i| (ops.delete)(i, &ns, &name));
            }
        }
    }
}
