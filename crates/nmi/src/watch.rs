//! Watches that keep the [`Index`](crate::index::Index) current: pods on this
//! node (field selector `spec.nodeName`), AzureAssignedIdentities labelled
//! with this node (standard mode), every binding and identity (managed mode
//! serves from them; standard mode checks each AzureAssignedIdentity against
//! them), and exceptions. Malformed custom objects are skipped with a warning (and
//! dropped from the index, so a broken object never grants anything); they
//! never stop a watch.

use std::sync::Arc;

use aadpodid_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException,
    LABEL_NODENAME,
};
use aadpodid_runtime::watch::{self as runtime_watch, Sink};
use k8s_openapi::api::core::v1::Pod;
use kube::core::DeserializeGuard;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use aadpodid_runtime::Shutdown;

use crate::args::OperationMode;
use crate::index::{Index, Kept};
use crate::metrics::Metrics;
use crate::server::State;

/// Which watches have listed everything once (readiness, the first-sync
/// wait and the startup taint all await [`Synced::wait_all`]).
pub use aadpodid_runtime::watch::Synced;

/// How one kind is put into the index.
struct Ops<K> {
    apply: fn(&mut Index, &K),
    delete: fn(&mut Index, &str, &str),
    reset: fn(&mut Index, &[K]),
}

fn valid<K: Clone>(items: &[DeserializeGuard<K>]) -> Vec<K> {
    items
        .iter()
        .filter_map(|g| g.0.as_ref().ok().cloned())
        .collect()
}

/// How a custom kind goes into its place in the index: a malformed object
/// is skipped with a warning and dropped from the index.
fn guarded<K: Kept + Resource<DynamicType = ()>>() -> Ops<DeserializeGuard<K>> {
    Ops {
        apply: |i, g| match &g.0 {
            Ok(o) => i.apply(o),
            Err(bad) => {
                let namespace = bad.metadata.namespace.as_deref().unwrap_or("");
                let name = bad.metadata.name.as_deref().unwrap_or("");
                tracing::warn!(
                    kind = K::kind(&()).as_ref(),
                    namespace,
                    name,
                    error = %bad.error,
                    "skipping malformed object"
                );
                i.delete::<K>(namespace, name);
            }
        },
        delete: |i, ns, n| i.delete::<K>(ns, n),
        reset: |i, all| i.reset(&valid(all)),
    }
}

/// One kind's watch writing into the shared index; `operation` labels the
/// Kubernetes error metric.
struct IndexSink<K> {
    state: Arc<State>,
    ops: Ops<K>,
    metrics: Metrics,
    operation: &'static str,
}

impl<K: Resource> Sink<K> for IndexSink<K> {
    fn reset(&mut self, all: Vec<K>) -> bool {
        self.state.update(|i| (self.ops.reset)(i, &all));
        true
    }

    fn apply(&mut self, obj: K) -> bool {
        self.state.update(|i| (self.ops.apply)(i, &obj));
        true
    }

    fn delete(&mut self, obj: K) -> bool {
        let (ns, name) = (obj.namespace().unwrap_or_default(), obj.name_any());
        self.state.update(|i| (self.ops.delete)(i, &ns, &name));
        true
    }

    fn failed(&mut self, _error: &watcher::Error) {
        self.metrics
            .kubernetes_errors
            .with_label_values(&[self.operation])
            .inc();
    }
}

/// What every watch of this node shares.
struct Watches<'a> {
    client: &'a Client,
    state: &'a Arc<State>,
    metrics: &'a Metrics,
    shutdown: &'a Shutdown,
    synced: Synced,
}

impl Watches<'_> {
    fn start<K>(&self, config: watcher::Config, ops: Ops<K>, operation: &'static str)
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
        K: 'static,
    {
        let sink = IndexSink {
            state: Arc::clone(self.state),
            ops,
            metrics: self.metrics.clone(),
            operation,
        };
        let events = runtime_watch::events(Api::<K>::all(self.client.clone()), config);
        runtime_watch::spawn(events, sink, &self.synced, self.shutdown);
    }
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
    let w = Watches {
        client,
        state,
        metrics,
        shutdown,
        synced: Synced::default(),
    };
    let all = watcher::Config::default;
    let pods = Ops::<Pod> {
        apply: |i, p| i.apply_pod(p),
        delete: |i, ns, n| i.delete_pod(ns, n),
        reset: |i, all| i.reset_pods(all),
    };
    w.start(
        all().fields(&format!("spec.nodeName={node}")),
        pods,
        "get_pod_list",
    );
    w.start(
        all(),
        guarded::<AzurePodIdentityException>(),
        "list_exceptions",
    );
    if mode == OperationMode::Standard {
        let cfg = if scale_features {
            all().labels(&format!("{LABEL_NODENAME}={node}"))
        } else {
            all()
        };
        w.start(
            cfg,
            guarded::<AzureAssignedIdentity>(),
            "list_assigned_identities",
        );
    }
    w.start(all(), guarded::<AzureIdentityBinding>(), "list_bindings");
    w.start(all(), guarded::<AzureIdentity>(), "list_identities");
    w.synced
}
