//! Watches that keep the [`Index`] current. Objects that do not parse are
//! skipped with a warning, an Event and a metric, and never stop a watch
//! (style rule 4); one that turns bad is dropped from the index.

use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use aadpodid_api::{AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, POD_LABEL_BINDING};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::core::DeserializeGuard;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use aadpodid_runtime::Shutdown;

use crate::events::{self, Events};
use crate::index::{Index, Key};
use crate::metrics::Metrics;

/// The index, a wake-up for the control loop, and per-watch sync flags.
#[derive(Debug, Default)]
pub struct Shared {
    pub index: Mutex<Index>,
    pub changed: Notify,
    synced: [AtomicBool; 6],
}

impl Shared {
    /// Every watch has listed its objects once.
    pub fn synced(&self) -> bool {
        self.synced.iter().all(|s| s.load(Ordering::Acquire))
    }

    pub fn snapshot(&self) -> Index {
        self.index.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// How one kind goes into the index.
struct Kind<K> {
    name: &'static str,
    slot: usize,
    apply: fn(&mut Index, &K) -> bool,
    delete: fn(&mut Index, &Key) -> bool,
    clear: fn(&mut Index),
}

fn meta_key<K: Resource>(obj: &K) -> Key {
    (
        obj.meta().namespace.clone().unwrap_or_default(),
        obj.meta().name.clone().unwrap_or_default(),
    )
}

/// Drops `metadata.managedFields` before an object is buffered or indexed.
/// MIC never reads them, and on an AzureAssignedIdentity (whose spec embeds
/// an identity and a binding) the apiserver's field sets are most of the
/// object's memory, and the index is copied per cycle. No write sends an indexed object whole
/// (status and finalizers are patches; updates are rebuilt by the plan).
fn slim<K: Resource>(mut obj: DeserializeGuard<K>) -> DeserializeGuard<K> {
    if let Ok(o) = &mut obj.0 {
        o.meta_mut().managed_fields = None;
    }
    obj
}

struct Ctx {
    shared: Arc<Shared>,
    metrics: Metrics,
    events: Events,
    /// Standby replicas write nothing, Events included.
    leading: tokio::sync::watch::Receiver<bool>,
}

impl Ctx {
    /// Applies one object; an unparseable one is reported and removed.
    fn apply<K>(&self, kind: &Kind<K>, ix: &mut Index, obj: DeserializeGuard<K>) -> bool
    where
        K: Resource<DynamicType = ()> + Clone,
    {
        let key = meta_key(&obj);
        match obj.0 {
            Ok(o) => (kind.apply)(ix, &o),
            Err(invalid) => {
                tracing::warn!(kind = kind.name, namespace = %key.0, name = %key.1, error = %invalid.error, "skipping an object that does not parse");
                self.metrics
                    .invalid_objects_count
                    .with_label_values(&[kind.name])
                    .inc();
                let reference = k8s_openapi::api::core::v1::ObjectReference {
                    api_version: Some(K::api_version(&()).into_owned()),
                    kind: Some(K::kind(&()).into_owned()),
                    namespace: invalid.metadata.namespace.clone(),
                    name: invalid.metadata.name.clone(),
                    uid: invalid.metadata.uid.clone(),
                    ..Default::default()
                };
                if *self.leading.borrow() {
                    self.events.publish(
                        true,
                        events::REASON_INVALID_OBJECT,
                        format!("ignored: {}", invalid.error),
                        reference,
                    );
                }
                (kind.delete)(ix, &key)
            }
        }
    }
}

async fn run_watch<K>(
    api: Api<DeserializeGuard<K>>,
    config: watcher::Config,
    kind: Kind<K>,
    ctx: Arc<Ctx>,
    shutdown: Shutdown,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let stream = watcher::watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    let mut buffer: Vec<DeserializeGuard<K>> = Vec::new();
    loop {
        let event = tokio::select! {
            _ = shutdown.signaled() => return,
            e = stream.next() => e,
        };
        let Some(event) = event else { return };
        let changed = match event {
            Err(error) => {
                tracing::warn!(kind = kind.name, %error, "watch error; retrying");
                false
            }
            Ok(Event::Init) => {
                buffer.clear();
                false
            }
            Ok(Event::InitApply(o)) => {
                buffer.push(slim(o));
                false
            }
            Ok(Event::InitDone) => {
                let mut ix = ctx.shared.index.lock().unwrap_or_else(|p| p.into_inner());
                (kind.clear)(&mut ix);
                for o in buffer.drain(..) {
                    ctx.apply(&kind, &mut ix, o);
                }
                // The initial list may be large (every labelled pod); keep no
                // capacity for it once it is indexed.
                buffer.shrink_to_fit();
                ctx.shared.synced[kind.slot].store(true, Ordering::Release);
                true
            }
            Ok(Event::Apply(o)) => {
                let o = slim(o);
                let mut ix = ctx.shared.index.lock().unwrap_or_else(|p| p.into_inner());
                ctx.apply(&kind, &mut ix, o)
            }
            Ok(Event::Delete(o)) => {
                let mut ix = ctx.shared.index.lock().unwrap_or_else(|p| p.into_inner());
                (kind.delete)(&mut ix, &meta_key(&o))
            }
        };
        if changed {
            ctx.shared.changed.notify_one();
        }
    }
}

/// Starts the five watches (pods with the binding label, nodes, identities,
/// bindings, AAIs), and a sixth on Namespaces when `watch_namespaces` (the
/// identity policy is on). They run until shutdown. The Namespace watch
/// counts for [`Shared::synced`] like the others: if MIC may not list
/// Namespaces it never becomes active, rather than run the policy blind.
pub fn spawn(
    client: Client,
    shared: Arc<Shared>,
    metrics: Metrics,
    events: Events,
    leading: tokio::sync::watch::Receiver<bool>,
    shutdown: Shutdown,
    watch_namespaces: bool,
) {
    if !watch_namespaces {
        shared.synced[5].store(true, Ordering::Release);
    }
    let ctx = Arc::new(Ctx {
        shared,
        metrics,
        events,
        leading,
    });
    let cfg = watcher::Config::default;
    tokio::spawn(run_watch(
        Api::<DeserializeGuard<Pod>>::all(client.clone()),
        // Only labelled pods matter (§2.5 step 1); a pod losing the label
        // arrives as a deletion.
        cfg().labels(POD_LABEL_BINDING),
        Kind {
            name: "Pod",
            slot: 0,
            apply: |ix, p| ix.apply_pod(p),
            delete: |ix, k| ix.pods.remove(k).is_some(),
            clear: |ix| ix.pods.clear(),
        },
        ctx.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(run_watch(
        Api::<DeserializeGuard<Node>>::all(client.clone()),
        cfg(),
        Kind {
            name: "Node",
            slot: 1,
            apply: |ix, n| ix.apply_node(n),
            delete: |ix, k| ix.nodes.remove(&k.1).is_some(),
            clear: |ix| ix.nodes.clear(),
        },
        ctx.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(run_watch(
        Api::<DeserializeGuard<AzureIdentity>>::all(client.clone()),
        cfg(),
        Kind {
            name: "AzureIdentity",
            slot: 2,
            apply: |ix, o| ix.apply_identity(o),
            delete: |ix, k| ix.delete_identity(k),
            clear: |ix| ix.identities.clear(),
        },
        ctx.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(run_watch(
        Api::<DeserializeGuard<AzureIdentityBinding>>::all(client.clone()),
        cfg(),
        Kind {
            name: "AzureIdentityBinding",
            slot: 3,
            apply: |ix, o| ix.apply_binding(o),
            delete: |ix, k| ix.delete_binding(k),
            clear: |ix| ix.bindings.clear(),
        },
        ctx.clone(),
        shutdown.clone(),
    ));
    if watch_namespaces {
        tokio::spawn(run_watch(
            Api::<DeserializeGuard<Namespace>>::all(client.clone()),
            cfg(),
            Kind {
                name: "Namespace",
                slot: 5,
                apply: |ix, n| ix.apply_namespace(n),
                delete: |ix, k| ix.delete_namespace(&k.1),
                clear: |ix| ix.namespaces.clear(),
            },
            ctx.clone(),
            shutdown.clone(),
        ));
    }
    tokio::spawn(run_watch(
        Api::<DeserializeGuard<AzureAssignedIdentity>>::all(client),
        cfg(),
        Kind {
            name: "AzureAssignedIdentity",
            slot: 4,
            apply: |ix, o| ix.apply_assigned(o),
            delete: |ix, k| ix.delete_assigned(k),
            clear: |ix| ix.assigned.clear(),
        },
        ctx,
        shutdown,
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use aadpodid_api::AzureAssignedIdentitySpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    #[test]
    fn slim_drops_managed_fields_only() {
        let mut aai = AzureAssignedIdentity::new("a", AzureAssignedIdentitySpec::default());
        aai.metadata.namespace = Some("default".into());
        aai.metadata.resource_version = Some("7".into());
        aai.metadata.finalizers = Some(vec!["f".into()]);
        aai.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some("mic".into()),
            ..Default::default()
        }]);
        let mut expected = aai.clone();
        expected.metadata.managed_fields = None;
        assert_eq!(slim(DeserializeGuard(Ok(aai))).0.ok(), Some(expected));
    }
}
