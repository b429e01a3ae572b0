//! Watches that keep the [`Index`] current, on the runtime's watch helper.
//! Objects that do not parse are skipped with a warning, an Event and a
//! metric, and never stop a watch; one that turns bad is dropped from the
//! index.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use aadpodid_api::{AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, POD_LABEL_BINDING};
use aadpodid_runtime::watch::{self as runtime_watch, Sink, Synced};
use k8s_openapi::api::core::v1::{Event, Namespace, Node, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::DeserializeGuard;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use aadpodid_runtime::Shutdown;

use crate::drift;
use crate::events::{self, Events};
use crate::index::{AssignedInfo, Index, Key, Replaced};
use crate::metrics::Metrics;

/// The index, a wake-up for the control loop, and the watches' sync flags.
/// The index is copy-on-write: a [`Shared::snapshot`] shares it, and the
/// first watch event after one copies its maps (of `Arc`s), never an object.
#[derive(Debug, Default)]
pub struct Shared {
    index: Mutex<Arc<Index>>,
    pub changed: Notify,
    synced: Synced,
    /// Nodes whose resource a watch event asks a drift check of
    /// ([`crate::drift`]), until the control loop takes them.
    drift_nodes: Mutex<BTreeSet<String>>,
    /// Wakes the control loop when `drift_nodes` gained one.
    pub drift_wanted: Notify,
    /// Each node's [`drift::node_mark`], to tell a reboot or reimage.
    node_marks: Mutex<HashMap<String, u64>>,
}

impl Shared {
    /// Every watch [`spawn`] started has listed its objects once.
    pub fn synced(&self) -> bool {
        self.synced.all()
    }

    /// The index as it is now; later events do not change it.
    pub fn snapshot(&self) -> Arc<Index> {
        Arc::clone(&self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Arc<Index>> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// MIC's own write of an AAI, which replaced `replaced`, as the
    /// apiserver answered it: into the index at once, so that its echo from
    /// the watch changes nothing and starts no cycle. Starts none either.
    pub fn own_write(&self, kept: AssignedInfo, replaced: Replaced<'_>) {
        self.update(|ix| ix.own_write(kept, replaced));
    }

    /// [`Shared::own_write`] for an answer kept as the index keeps AAIs.
    pub fn own_answer(&self, answer: &AzureAssignedIdentity, replaced: Replaced<'_>) {
        self.update(|ix| {
            let kept = AssignedInfo::indexed(answer, ix);
            ix.own_write(kept, replaced)
        });
    }

    /// Asks for a drift check of `node`'s resource.
    fn want_drift(&self, node: String) {
        tracing::debug!(%node, "drift check asked for");
        lock(&self.drift_nodes).insert(node);
        self.drift_wanted.notify_one();
    }

    /// The nodes asked for since the last call.
    pub fn take_drift_nodes(&self) -> BTreeSet<String> {
        std::mem::take(&mut *lock(&self.drift_nodes))
    }

    /// Runs `f` on the index, copying it first if a snapshot shares it.
    fn update<R>(&self, f: impl FnOnce(&mut Index) -> R) -> R {
        f(Arc::make_mut(&mut self.lock()))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a watch saw, for [`Kind::observe`].
enum Seen<'a, K> {
    Listed(Vec<&'a K>),
    Applied(&'a K),
    Deleted(&'a Key),
}

/// For kinds that ask for no drift check.
fn unobserved<K>(_: &Shared, _: Seen<'_, K>) {}

/// Keeps each node's [`drift::node_mark`] and asks for a drift check of a
/// node whose mark changed, also across a re-list (a change while the watch
/// was down).
fn observe_node(shared: &Shared, seen: Seen<'_, Node>) {
    let mut marks = lock(&shared.node_marks);
    let note = |marks: &mut HashMap<String, u64>, node: &Node| {
        let name = node.name_any();
        let mark = drift::node_mark(node);
        if drift::node_changed(marks.get(&name).copied(), mark) {
            shared.want_drift(name.clone());
        }
        match mark {
            Some(m) => marks.insert(name, m),
            None => marks.remove(&name),
        };
    };
    match seen {
        Seen::Listed(all) => {
            let mut fresh = HashMap::with_capacity(all.len());
            for node in all {
                if let Some(m) = marks.remove(&node.name_any()) {
                    fresh.insert(node.name_any(), m);
                }
                note(&mut fresh, node);
            }
            *marks = fresh;
        }
        Seen::Applied(node) => note(&mut marks, node),
        Seen::Deleted(key) => {
            marks.remove(&key.1);
        }
    }
}

/// How one kind goes into the index.
struct Kind<K> {
    apply: fn(&mut Index, &K) -> bool,
    delete: fn(&mut Index, &Key) -> bool,
    clear: fn(&mut Index),
    /// Drops what the index does not read, before an object is buffered
    /// (a first list is held whole until it is complete).
    trim: fn(&mut K),
    /// Sees every object the watch delivers (nodes: event-driven drift
    /// checks).
    observe: fn(&Shared, Seen<'_, K>),
}

/// Keeps of a pod what [`crate::index::PodInfo`] reads: namespace, name,
/// labels, `spec.nodeName` and `status.phase`. A restarted MIC lists every
/// labelled pod at once, and a whole Pod is kilobytes.
fn trim_pod(pod: &mut Pod) {
    let m = &mut pod.metadata;
    *m = ObjectMeta {
        name: m.name.take(),
        namespace: m.namespace.take(),
        labels: m.labels.take(),
        ..ObjectMeta::default()
    };
    pod.spec = pod.spec.as_mut().map(|s| PodSpec {
        node_name: s.node_name.take(),
        ..PodSpec::default()
    });
    pod.status = pod.status.as_mut().map(|s| PodStatus {
        phase: s.phase.take(),
        ..PodStatus::default()
    });
}

/// For kinds kept as they are.
fn keep<K>(_: &mut K) {}

fn meta_key<K: Resource>(obj: &K) -> Key {
    (
        obj.meta().namespace.clone().unwrap_or_default(),
        obj.meta().name.clone().unwrap_or_default(),
    )
}

/// Drops `metadata.managedFields` before an object is buffered or indexed
/// (and, by the kind's `trim`, whatever else the index does not read).
/// MIC never reads them, and on an AzureAssignedIdentity (whose spec embeds
/// an identity and a binding) the apiserver's field sets are most of the
/// object's memory. No write sends an indexed object whole
/// (status and finalizers are patches; updates are rebuilt by the plan).
fn slim<K: Resource>(obj: &mut DeserializeGuard<K>) {
    if let Ok(o) = &mut obj.0 {
        o.meta_mut().managed_fields = None;
    }
}

struct Ctx {
    shared: Arc<Shared>,
    metrics: Metrics,
    events: Events,
    /// Standby replicas write nothing, Events included.
    leading: tokio::sync::watch::Receiver<bool>,
}

/// One kind's watch writing into the shared index.
struct IndexSink<K> {
    kind: Kind<K>,
    ctx: Arc<Ctx>,
}

impl<K> IndexSink<K>
where
    K: Resource<DynamicType = ()> + Clone,
{
    /// Applies one object; an unparseable one is reported and removed.
    fn apply_to(&self, ix: &mut Index, obj: DeserializeGuard<K>) -> bool {
        let key = meta_key(&obj);
        let invalid = match obj.0 {
            Ok(o) => return (self.kind.apply)(ix, &o),
            Err(invalid) => invalid,
        };
        let kind = K::kind(&());
        tracing::warn!(%kind, namespace = %key.0, name = %key.1, error = %invalid.error, "skipping an object that does not parse");
        self.ctx
            .metrics
            .invalid_objects_count
            .with_label_values(&[kind.as_ref()])
            .inc();
        if *self.ctx.leading.borrow() {
            let reference = k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some(K::api_version(&()).into_owned()),
                kind: Some(kind.into_owned()),
                namespace: invalid.metadata.namespace.clone(),
                name: invalid.metadata.name.clone(),
                uid: invalid.metadata.uid.clone(),
                ..Default::default()
            };
            self.ctx.events.publish(
                true,
                events::REASON_INVALID_OBJECT,
                format!("ignored: {}", invalid.error),
                reference,
            );
        }
        (self.kind.delete)(ix, &key)
    }
}

impl<K> Sink<DeserializeGuard<K>> for IndexSink<K>
where
    K: Resource<DynamicType = ()> + Clone,
{
    fn reset(&mut self, all: Vec<DeserializeGuard<K>>) -> bool {
        let parsed: Vec<&K> = all.iter().filter_map(|o| o.0.as_ref().ok()).collect();
        (self.kind.observe)(&self.ctx.shared, Seen::Listed(parsed));
        self.ctx.shared.update(|ix| {
            (self.kind.clear)(ix);
            for obj in all {
                self.apply_to(ix, obj);
            }
        });
        true
    }

    fn apply(&mut self, obj: DeserializeGuard<K>) -> bool {
        if let Ok(o) = &obj.0 {
            (self.kind.observe)(&self.ctx.shared, Seen::Applied(o));
        }
        self.ctx.shared.update(|ix| self.apply_to(ix, obj))
    }

    fn delete(&mut self, obj: DeserializeGuard<K>) -> bool {
        let key = meta_key(&obj);
        (self.kind.observe)(&self.ctx.shared, Seen::Deleted(&key));
        self.ctx.shared.update(|ix| (self.kind.delete)(ix, &key))
    }

    fn changed(&mut self) {
        self.ctx.shared.changed.notify_one();
    }
}

/// Starts one kind's watch; its sync flag counts from now.
fn start<K>(
    client: &Client,
    config: watcher::Config,
    kind: Kind<K>,
    ctx: &Arc<Ctx>,
    shutdown: &Shutdown,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
{
    let api = Api::<DeserializeGuard<K>>::all(client.clone());
    let trim = kind.trim;
    let events = runtime_watch::events(api, config).modify(move |obj| {
        slim(obj);
        if let Ok(o) = &mut obj.0 {
            trim(o);
        }
    });
    let sink = IndexSink {
        kind,
        ctx: Arc::clone(ctx),
    };
    runtime_watch::spawn(events, sink, &ctx.shared.synced, shutdown);
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
    let ctx = Arc::new(Ctx {
        shared,
        metrics,
        events,
        leading,
    });
    let all = watcher::Config::default;
    let c = &client;
    // Only pods with the binding label are ever assigned an identity; a pod
    // losing the label arrives as a deletion.
    let pods = Kind::<Pod> {
        apply: |ix, p| ix.apply_pod(p),
        delete: |ix, k| ix.pods.remove(k).is_some(),
        clear: |ix| ix.pods.clear(),
        trim: trim_pod,
        observe: unobserved,
    };
    start(c, all().labels(POD_LABEL_BINDING), pods, &ctx, &shutdown);
    let nodes = Kind::<Node> {
        apply: |ix, n| ix.apply_node(n),
        delete: |ix, k| ix.nodes.remove(&k.1).is_some(),
        clear: |ix| ix.nodes.clear(),
        trim: keep,
        observe: observe_node,
    };
    start(c, all(), nodes, &ctx, &shutdown);
    let identities = Kind::<AzureIdentity> {
        apply: |ix, o| ix.apply_identity(o),
        delete: |ix, k| ix.delete_identity(k),
        clear: |ix| ix.identities.clear(),
        trim: keep,
        observe: unobserved,
    };
    start(c, all(), identities, &ctx, &shutdown);
    let bindings = Kind::<AzureIdentityBinding> {
        apply: |ix, o| ix.apply_binding(o),
        delete: |ix, k| ix.delete_binding(k),
        clear: |ix| ix.bindings.clear(),
        trim: keep,
        observe: unobserved,
    };
    start(c, all(), bindings, &ctx, &shutdown);
    if watch_namespaces {
        let namespaces = Kind::<Namespace> {
            apply: |ix, n| ix.apply_namespace(n),
            delete: |ix, k| ix.delete_namespace(&k.1),
            clear: |ix| ix.namespaces.clear(),
            trim: keep,
            observe: unobserved,
        };
        start(c, all(), namespaces, &ctx, &shutdown);
    }
    let assigned = Kind::<AzureAssignedIdentity> {
        apply: |ix, o| ix.deliver_assigned(o),
        delete: |ix, k| ix.delete_assigned(k),
        clear: |ix| ix.clear_assigned(),
        trim: keep,
        observe: unobserved,
    };
    start(c, all(), assigned, &ctx, &shutdown);
}

/// At most this many Events are remembered (by UID and resource version) to
/// tell, after a re-list, which ones are new; over it the memory starts
/// afresh (a repeated request is merged by [`drift::Gate`]).
const MAX_REMEMBERED_EVENTS: usize = 4096;

/// The Events asking for drift checks, in MIC's own namespace.
struct DriftEvents {
    shared: Arc<Shared>,
    /// Resource version of each Event seen, by UID.
    seen: HashMap<String, String>,
    /// The first list is in: Events it held were published before this MIC
    /// started, and MIC's first drift check covers them.
    listed: bool,
}

impl DriftEvents {
    /// Remembers `event`; whether it is new or changed since last seen.
    fn remember(seen: &mut HashMap<String, String>, event: &Event) -> bool {
        let uid = event.metadata.uid.clone().unwrap_or_default();
        let version = event.metadata.resource_version.clone().unwrap_or_default();
        if seen.len() >= MAX_REMEMBERED_EVENTS && !seen.contains_key(&uid) {
            seen.clear();
        }
        seen.insert(uid, version.clone()) != Some(version)
    }

    fn ask(&self, event: &Event) {
        if let Some(node) = drift::event_node(event) {
            tracing::info!(%node, note = event.message.as_deref().unwrap_or_default(), "NMI reports an identity missing on a node; checking its resource");
            self.shared.want_drift(node.to_string());
        }
    }
}

impl Sink<DeserializeGuard<Event>> for DriftEvents {
    fn reset(&mut self, all: Vec<DeserializeGuard<Event>>) -> bool {
        let mut fresh = HashMap::with_capacity(all.len());
        for event in all.iter().filter_map(|e| e.0.as_ref().ok()) {
            let uid = event.metadata.uid.clone().unwrap_or_default();
            let new = self.seen.get(&uid) != event.metadata.resource_version.as_ref();
            DriftEvents::remember(&mut fresh, event);
            if self.listed && new {
                self.ask(event);
            }
        }
        self.seen = fresh;
        self.listed = true;
        false
    }

    fn apply(&mut self, obj: DeserializeGuard<Event>) -> bool {
        if let Ok(event) = &obj.0
            && DriftEvents::remember(&mut self.seen, event)
        {
            self.ask(event);
        }
        false
    }

    fn delete(&mut self, obj: DeserializeGuard<Event>) -> bool {
        if let Ok(event) = &obj.0 {
            self.seen
                .remove(event.metadata.uid.as_deref().unwrap_or_default());
        }
        false
    }
}

/// Watches the Events NMI publishes when IMDS does not know an identity of
/// an Assigned AzureAssignedIdentity ([`drift::REASON_IDENTITY_NOT_ON_NODE`]),
/// in `namespace` only (MIC's own, the release namespace: only the
/// components and the cluster's administrators write Events there, so a
/// namespace user cannot make MIC call ARM), and asks for a drift check of
/// each one's node. Not counted in [`Shared::synced`]: without the right to
/// list Events there, MIC still works, with the periodic check only.
pub fn spawn_drift_events(
    client: Client,
    namespace: &str,
    shared: Arc<Shared>,
    shutdown: &Shutdown,
) {
    let api = Api::<DeserializeGuard<Event>>::namespaced(client, namespace);
    let config = watcher::Config::default()
        .fields(&format!("reason={}", drift::REASON_IDENTITY_NOT_ON_NODE));
    let events = runtime_watch::events(api, config).modify(|e| {
        if let Ok(e) = &mut e.0 {
            e.metadata.managed_fields = None;
        }
    });
    let sink = DriftEvents {
        shared,
        seen: HashMap::new(),
        listed: false,
    };
    // A set of its own: this watch never holds MIC back from leading.
    let own = Synced::default();
    tokio::spawn(runtime_watch::feed(
        events,
        sink,
        own.flag(),
        shutdown.clone(),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::PodInfo;
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
        let mut guard = DeserializeGuard(Ok(aai));
        slim(&mut guard);
        assert_eq!(guard.0.ok(), Some(expected));
    }

    #[test]
    fn a_trimmed_pod_gives_the_same_pod_info() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web", "namespace": "apps", "uid": "u", "resourceVersion": "9",
                "labels": {"aadpodidbinding": "sel", "app": "web"},
                "annotations": {"a": "b"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "ReplicaSet", "name": "rs", "uid": "r"}]
            },
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1"}
        }))
        .unwrap();
        let mut trimmed = pod.clone();
        trim_pod(&mut trimmed);
        assert_eq!(PodInfo::from_pod(&trimmed), PodInfo::from_pod(&pod));
        assert_eq!(trimmed.metadata.labels, pod.metadata.labels);
        assert!(trimmed.metadata.annotations.is_none() && trimmed.metadata.uid.is_none());
        assert!(trimmed.spec.unwrap().containers.is_empty());
        assert!(trimmed.status.unwrap().pod_ip.is_none());
        // An unscheduled pod without a status stays so.
        let mut bare = Pod::default();
        trim_pod(&mut bare);
        assert_eq!(bare, Pod::default());
    }

    #[test]
    fn a_snapshot_keeps_what_it_saw_while_the_index_goes_on() {
        let shared = Shared::default();
        let ns = |name: &str, allowed: &str| {
            let mut n = Namespace::default();
            n.metadata.name = Some(name.into());
            n.metadata.annotations = Some(
                [(
                    aadpodid_api::policy::ANNOTATION_ALLOWED_IDENTITIES.to_string(),
                    allowed.to_string(),
                )]
                .into(),
            );
            n
        };
        shared.update(|ix| ix.apply_namespace(&ns("a", "x")));
        let first = shared.snapshot();
        // Nothing changed since: the same index, not a copy.
        assert!(Arc::ptr_eq(&first, &shared.snapshot()));
        shared.update(|ix| ix.apply_namespace(&ns("b", "y")));
        let second = shared.snapshot();
        assert_eq!(first.namespaces, [("a".into(), "x".into())].into());
        assert_eq!(
            second.namespaces,
            [("a".into(), "x".into()), ("b".into(), "y".into())].into()
        );
        // With no snapshot held, an update changes the index in place.
        drop((first, second));
        let before = Arc::as_ptr(&shared.snapshot());
        shared.update(|ix| ix.delete_namespace("a"));
        assert_eq!(Arc::as_ptr(&shared.snapshot()), before);
    }
}
