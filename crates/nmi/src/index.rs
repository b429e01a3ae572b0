//! The node's view of the cluster, kept by the watches and read by the request
//! handlers: pods on this node by IP, AzureAssignedIdentities by pod,
//! exceptions, and every binding and identity (managed mode serves from them;
//! standard mode checks each AzureAssignedIdentity against them). Pure and
//! synchronous: watches call `apply`/`delete`/`reset`, tests call the same.
//!
//! **Slim.** The index keeps only what NMI decides on: a pod's
//! [`PodEntry`], and of each custom object the fields [`Kept::slim`] copies
//! (names, UIDs, the identity's namespaced-behaviour annotation, specs, the
//! AzureAssignedIdentity's status word), never managed fields, other
//! annotations, labels or owner references. Entries are behind [`Arc`]s, so
//! a request takes its pod and identity without copying them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use aadpodid_api::{
    AzureAssignedIdentity, AzureAssignedIdentitySpec, AzureAssignedIdentityStatus, AzureIdentity,
    AzureIdentityBinding, AzurePodIdentityException,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

use crate::token::IdentityKey;

/// `(namespace, name)`.
pub type Key = (String, String);

/// What NMI needs to know about one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEntry {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels (the binding label and exception labels are read from here).
    pub labels: BTreeMap<String, String>,
    /// `spec.serviceAccountName` (identifies the real MIC pods; a federated
    /// identity's token is that ServiceAccount's).
    pub service_account: String,
    /// `metadata.uid` (a federated identity's ServiceAccount token is bound
    /// to the pod by name and UID).
    pub uid: String,
    /// Addresses that map to this pod: empty unless the pod is Pending or
    /// Running and not terminating. A terminating pod loses its addresses at
    /// once so that a reused IP never gets its identity (upstream's IP-reuse
    /// hazard: docs/upstream-behaviour.md#h6-pod-ip-reused).
    pub ips: Vec<IpAddr>,
}

impl PodEntry {
    /// Reads a pod.
    pub fn from_pod(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        let phase_ok = matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Pending" | "Running")
        );
        let live = phase_ok && pod.metadata.deletion_timestamp.is_none();
        let mut ips: Vec<IpAddr> = Vec::new();
        if live {
            let listed = status
                .and_then(|s| s.pod_ips.as_ref())
                .into_iter()
                .flatten()
                .map(|p| p.ip.as_str());
            for ip in status
                .and_then(|s| s.pod_ip.as_deref())
                .into_iter()
                .chain(listed)
            {
                if let Ok(ip) = ip.parse::<IpAddr>() {
                    let ip = ip.to_canonical();
                    if !ips.contains(&ip) {
                        ips.push(ip);
                    }
                }
            }
        }
        PodEntry {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            labels: pod.labels().clone(),
            service_account: pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            ips,
        }
    }

    fn key(&self) -> Key {
        (self.namespace.clone(), self.name.clone())
    }
}

/// Why no single pod owns an address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PodLookup {
    /// No live pod on this node has the address (upstream's wording).
    #[error("pod list is empty")]
    Unknown,
    /// Several live pods claim it; none gets an identity.
    #[error("failed to match pod IP {ip} with {pods:?}")]
    Ambiguous {
        /// The address.
        ip: IpAddr,
        /// `ns/name` of each claimant.
        pods: Vec<String>,
    },
}

/// The node's cluster view.
#[derive(Debug, Default)]
pub struct Index {
    pods: HashMap<Key, Arc<PodEntry>>,
    by_ip: HashMap<IpAddr, BTreeSet<Key>>,
    aais: Objects<AzureAssignedIdentity>,
    exceptions: Objects<AzurePodIdentityException>,
    bindings: Objects<AzureIdentityBinding>,
    identities: Objects<AzureIdentity>,
}

/// The objects of one custom kind by `(namespace, name)`, as its watch
/// reports them, and whether that watch has listed them all once.
#[derive(Debug)]
pub struct Objects<K> {
    by_key: HashMap<Key, Arc<K>>,
    listed: bool,
}

impl<K> Default for Objects<K> {
    fn default() -> Self {
        Objects {
            by_key: HashMap::new(),
            listed: false,
        }
    }
}

impl<K> std::ops::Deref for Objects<K> {
    type Target = HashMap<Key, Arc<K>>;

    fn deref(&self) -> &Self::Target {
        &self.by_key
    }
}

impl<K: Kept> Objects<K> {
    /// Adds or replaces `obj` (its slim copy).
    pub(crate) fn apply(&mut self, obj: &K) {
        self.by_key.insert(key_of(obj), Arc::new(obj.slim()));
    }

    /// Removes `namespace/name`.
    pub(crate) fn delete(&mut self, namespace: &str, name: &str) {
        self.by_key
            .remove(&(namespace.to_string(), name.to_string()));
    }

    /// Replaces everything with `all`, a complete list.
    pub(crate) fn reset(&mut self, all: &[K]) {
        self.by_key = all
            .iter()
            .map(|o| (key_of(o), Arc::new(o.slim())))
            .collect();
        self.listed = true;
    }

    /// `namespace/name`, or whether its absence means anything yet.
    fn lookup(&self, namespace: &str, name: &str) -> Cached<'_, Arc<K>> {
        match self.by_key.get(&(namespace.to_string(), name.to_string())) {
            Some(o) => Cached::Found(o),
            None if self.listed => Cached::Missing,
            None => Cached::NotListed,
        }
    }
}

/// A custom kind the index keeps (AzureAssignedIdentity, exception, binding,
/// identity), and where: [`Index::apply`], [`Index::delete`],
/// [`Index::reset`] and [`Index::lookup`] reach it through this.
pub trait Kept: ResourceExt + Clone {
    /// The copy the index keeps: the fields NMI reads, nothing else.
    fn slim(&self) -> Self;
    /// This kind's objects in `index`.
    fn objects(index: &Index) -> &Objects<Self>;
    /// The same, to change.
    fn objects_mut(index: &mut Index) -> &mut Objects<Self>;
}

macro_rules! kept {
    ($($kind:ty => $field:ident, $slim:ident);* $(;)?) => {$(
        impl Kept for $kind {
            fn slim(&self) -> Self {
                $slim(self)
            }
            fn objects(index: &Index) -> &Objects<Self> {
                &index.$field
            }
            fn objects_mut(index: &mut Index) -> &mut Objects<Self> {
                &mut index.$field
            }
        }
    )*};
}

kept!(
    AzureAssignedIdentity => aais, slim_aai;
    AzurePodIdentityException => exceptions, slim_exception;
    AzureIdentityBinding => bindings, slim_binding;
    AzureIdentity => identities, slim_identity;
);

/// The metadata NMI reads of any object: namespace, name, UID and resource
/// version (an Event's reference to the object names them).
fn slim_meta(meta: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
        generate_name: meta
            .name
            .is_none()
            .then(|| meta.generate_name.clone())
            .flatten(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        ..Default::default()
    }
}

/// An AzureIdentity with [`slim_meta`], the two annotations NMI reads
/// (namespaced behaviour and token source) and its spec.
pub fn slim_identity(id: &AzureIdentity) -> AzureIdentity {
    let mut metadata = slim_meta(&id.metadata);
    let kept: BTreeMap<String, String> = id
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| {
            *k == aadpodid_api::ANNOTATION_BEHAVIOR || *k == aadpodid_api::ANNOTATION_TOKEN_SOURCE
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.annotations = (!kept.is_empty()).then_some(kept);
    AzureIdentity {
        metadata,
        spec: id.spec.clone(),
        status: None,
    }
}

/// A binding with [`slim_meta`] and its spec.
pub fn slim_binding(b: &AzureIdentityBinding) -> AzureIdentityBinding {
    AzureIdentityBinding {
        metadata: slim_meta(&b.metadata),
        spec: b.spec.clone(),
        status: None,
    }
}

/// An exception with its namespace, name and spec.
pub fn slim_exception(e: &AzurePodIdentityException) -> AzurePodIdentityException {
    AzurePodIdentityException {
        metadata: slim_meta(&e.metadata),
        spec: e.spec.clone(),
        status: None,
    }
}

/// An AzureAssignedIdentity with [`slim_meta`], the pod it names, its
/// embedded identity and binding (slim) and its status word.
pub fn slim_aai(a: &AzureAssignedIdentity) -> AzureAssignedIdentity {
    AzureAssignedIdentity {
        metadata: slim_meta(&a.metadata),
        spec: AzureAssignedIdentitySpec {
            azure_identity_ref: a
                .spec
                .azure_identity_ref
                .as_deref()
                .map(|i| Box::new(slim_identity(i))),
            azure_binding_ref: a
                .spec
                .azure_binding_ref
                .as_deref()
                .map(|b| Box::new(slim_binding(b))),
            pod: a.spec.pod.clone(),
            pod_namespace: a.spec.pod_namespace.clone(),
            node_name: String::new(),
            replicas: None,
        },
        status: a.status.as_ref().map(|s| AzureAssignedIdentityStatus {
            status: s.status.clone(),
            available_replicas: 0,
        }),
    }
}

/// What a cache says about an object looked up by name.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cached<'a, T> {
    /// It is there.
    Found(&'a T),
    /// The cache has listed everything and it is not there.
    Missing,
    /// The cache has not listed yet: nothing can be concluded.
    NotListed,
}

fn key_of<K: ResourceExt>(obj: &K) -> Key {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

impl Index {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a pod.
    pub fn apply_pod(&mut self, pod: &Pod) {
        let entry = PodEntry::from_pod(pod);
        let key = entry.key();
        self.unlink_ips(&key);
        for ip in &entry.ips {
            self.by_ip.entry(*ip).or_default().insert(key.clone());
        }
        self.pods.insert(key, Arc::new(entry));
    }

    /// Removes a pod.
    pub fn delete_pod(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        self.unlink_ips(&key);
        self.pods.remove(&key);
    }

    /// Replaces every pod (after a watch restart).
    pub fn reset_pods(&mut self, pods: &[Pod]) {
        self.pods.clear();
        self.by_ip.clear();
        for p in pods {
            self.apply_pod(p);
        }
    }

    fn unlink_ips(&mut self, key: &Key) {
        let Some(old) = self.pods.get(key) else {
            return;
        };
        for ip in &old.ips {
            if let Some(set) = self.by_ip.get_mut(ip) {
                set.remove(key);
                if set.is_empty() {
                    self.by_ip.remove(ip);
                }
            }
        }
    }

    /// The one live pod with address `ip`.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Result<&Arc<PodEntry>, PodLookup> {
        let ip = ip.to_canonical();
        let keys = self.by_ip.get(&ip).ok_or(PodLookup::Unknown)?;
        let mut it = keys.iter();
        match (it.next(), it.next()) {
            (Some(k), None) => self.pods.get(k).ok_or(PodLookup::Unknown),
            (None, _) => Err(PodLookup::Unknown),
            (Some(_), Some(_)) => Err(PodLookup::Ambiguous {
                ip,
                pods: keys.iter().map(|(ns, n)| format!("{ns}/{n}")).collect(),
            }),
        }
    }

    /// A pod by name, whatever its phase (for `/host/token`).
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Arc<PodEntry>> {
        self.pods.get(&(namespace.to_string(), name.to_string()))
    }

    /// Number of pods known.
    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// Adds or replaces an object of a kept kind.
    pub fn apply<K: Kept>(&mut self, obj: &K) {
        K::objects_mut(self).apply(obj);
    }
    /// Removes the `K` named `namespace/name`.
    pub fn delete<K: Kept>(&mut self, namespace: &str, name: &str) {
        K::objects_mut(self).delete(namespace, name);
    }
    /// Replaces every `K` with `all`, a complete list.
    pub fn reset<K: Kept>(&mut self, all: &[K]) {
        K::objects_mut(self).reset(all);
    }
    /// The `K` named `namespace/name`.
    pub fn lookup<K: Kept>(&self, namespace: &str, name: &str) -> Cached<'_, Arc<K>> {
        K::objects(self).lookup(namespace, name)
    }

    /// The AzureAssignedIdentities naming this pod, in name order.
    pub fn aais_for_pod(&self, namespace: &str, name: &str) -> Vec<&AzureAssignedIdentity> {
        let mut out: Vec<(&Key, &Arc<AzureAssignedIdentity>)> = self
            .aais
            .iter()
            .filter(|(_, a)| a.spec.pod == name && a.spec.pod_namespace == namespace)
            .collect();
        out.sort_by(|a, b| a.0.cmp(b.0));
        out.into_iter().map(|(_, a)| &**a).collect()
    }

    /// Whether an exception in the pod's namespace lists one of its labels
    /// with a value equal ignoring case (upstream's rule:
    /// docs/upstream-behaviour.md#exception-list).
    pub fn is_excepted(&self, pod: &PodEntry) -> bool {
        self.exceptions
            .values()
            .filter(|e| e.metadata.namespace.as_deref() == Some(pod.namespace.as_str()))
            .flat_map(|e| e.spec.pod_labels.iter())
            .any(|(k, v)| {
                pod.labels
                    .get(k)
                    .is_some_and(|pv| pv.eq_ignore_ascii_case(v))
            })
    }

    /// Managed mode: identities named by bindings in the pod's namespace whose
    /// selector equals the pod's `aadpodidbinding` label, looked up in the same
    /// namespace (as upstream's managed mode), in (binding name) order, without duplicates.
    pub fn managed_identities_for(&self, pod: &PodEntry) -> Vec<&Arc<AzureIdentity>> {
        let Some(label) = pod.labels.get(aadpodid_api::POD_LABEL_BINDING) else {
            return Vec::new();
        };
        let mut bindings: Vec<(&Key, &Arc<AzureIdentityBinding>)> = self
            .bindings
            .iter()
            .filter(|((ns, _), b)| *ns == pod.namespace && b.spec.selector == *label)
            .collect();
        bindings.sort_by(|a, b| a.0.cmp(b.0));
        let mut seen = HashSet::new();
        bindings
            .into_iter()
            .filter_map(|(_, b)| {
                let key = (pod.namespace.clone(), b.spec.azure_identity.clone());
                if !seen.insert(key.clone()) {
                    return None;
                }
                self.identities.get(&key)
            })
            .collect()
    }

    /// The token cache's keys ([`IdentityKey`]) of the identities
    /// some pod on this node may currently use; the cache drops everything
    /// else.
    pub fn token_keys_in_use(&self) -> HashSet<IdentityKey> {
        let from_aais = self
            .aais
            .values()
            .filter_map(|a| a.spec.azure_identity_ref.as_ref())
            .map(|i| IdentityKey::of(&i.spec));
        let from_managed = self
            .pods
            .values()
            .flat_map(|p| self.managed_identities_for(p))
            .map(|i| IdentityKey::of(&i.spec));
        from_aais.chain(from_managed).collect()
    }
}

/// Builders for tests (here, in `select` and in `limits`).
#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// An address written as text.
    pub fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    use aadpodid_api::{
        AzureAssignedIdentityStatus, AzureIdentityBindingSpec, AzureIdentitySpec,
        AzurePodIdentityExceptionSpec,
    };
    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    /// `(key, value)` pairs as an owned map.
    fn owned<C: FromIterator<(String, String)>>(pairs: &[(&str, &str)]) -> C {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub fn mk_pod(ns: &str, name: &str, ip: &str, phase: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                labels: Some(owned(labels)),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node1".into()),
                service_account_name: Some("default".into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: (!ip.is_empty()).then(|| ip.to_string()),
                pod_ips: (!ip.is_empty()).then(|| vec![PodIP { ip: ip.into() }]),
                ..Default::default()
            }),
        }
    }

    pub fn terminating(mut pod: Pod) -> Pod {
        pod.metadata.deletion_timestamp = Some(Time(Default::default()));
        pod
    }

    /// `obj` in namespace `ns`, with a uid naming its kind, namespace and name
    /// (as a live object has one).
    fn live<K: ResourceExt>(mut obj: K, ns: &str, kind: &str) -> K {
        let name = obj.name_any();
        obj.meta_mut().namespace = Some(ns.into());
        obj.meta_mut().uid = Some(format!("uid-{kind}-{ns}-{name}"));
        obj
    }

    pub fn mk_identity(ns: &str, name: &str, client_id: &str) -> AzureIdentity {
        let spec = AzureIdentitySpec {
            client_id: client_id.into(),
            resource_id: format!(
                "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
            ),
            ..Default::default()
        };
        live(AzureIdentity::new(name, spec), ns, "identity")
    }

    /// The AzureAssignedIdentity MIC writes for `pod` with `identity` through
    /// `binding`: in "default", or in the identity's namespace when the
    /// identity is namespaced (by annotation).
    pub fn mk_aai(
        pod_ns: &str,
        pod: &str,
        identity: &AzureIdentity,
        binding: &AzureIdentityBinding,
        status: &str,
    ) -> AzureAssignedIdentity {
        let mut a = AzureAssignedIdentity::for_pod(identity, binding, pod, pod_ns, "node1");
        a.metadata.namespace = Some(if aadpodid_api::is_namespaced(identity, false) {
            identity.namespace().unwrap_or_default()
        } else {
            "default".into()
        });
        a.status = Some(AzureAssignedIdentityStatus {
            status: status.into(),
            ..Default::default()
        });
        a
    }

    pub fn mk_binding(ns: &str, name: &str, id: &str, selector: &str) -> AzureIdentityBinding {
        let spec = AzureIdentityBindingSpec {
            azure_identity: id.into(),
            selector: selector.into(),
            ..Default::default()
        };
        live(AzureIdentityBinding::new(name, spec), ns, "binding")
    }

    pub fn mk_exception(
        ns: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> AzurePodIdentityException {
        let spec = AzurePodIdentityExceptionSpec {
            pod_labels: owned(labels),
        };
        let mut e = AzurePodIdentityException::new(name, spec);
        e.metadata.namespace = Some(ns.into());
        e
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn pods_by_ip() {
        struct Case {
            name: &'static str,
            pods: Vec<Pod>,
            ip: &'static str,
            want: Result<&'static str, &'static str>,
        }
        let cases = vec![
            Case {
                name: "running pod found",
                pods: vec![mk_pod("a", "p1", "10.0.0.1", "Running", &[])],
                ip: "10.0.0.1",
                want: Ok("a/p1"),
            },
            Case {
                name: "pending pod found",
                pods: vec![mk_pod("a", "p1", "10.0.0.1", "Pending", &[])],
                ip: "10.0.0.1",
                want: Ok("a/p1"),
            },
            Case {
                name: "unknown ip",
                pods: vec![mk_pod("a", "p1", "10.0.0.1", "Running", &[])],
                ip: "10.0.0.2",
                want: Err("unknown"),
            },
            Case {
                name: "succeeded pod's ip is free",
                pods: vec![
                    mk_pod("a", "old", "10.0.0.1", "Succeeded", &[]),
                    mk_pod("a", "new", "10.0.0.1", "Running", &[]),
                ],
                ip: "10.0.0.1",
                want: Ok("a/new"),
            },
            Case {
                name: "terminating pod loses its ip at once (ip reuse)",
                pods: vec![terminating(mk_pod("a", "old", "10.0.0.1", "Running", &[]))],
                ip: "10.0.0.1",
                want: Err("unknown"),
            },
            Case {
                name: "terminating pod does not shadow the ip's new owner",
                pods: vec![
                    terminating(mk_pod("a", "old", "10.0.0.1", "Running", &[])),
                    mk_pod("b", "new", "10.0.0.1", "Pending", &[]),
                ],
                ip: "10.0.0.1",
                want: Ok("b/new"),
            },
            Case {
                name: "two live pods on one ip: nobody",
                pods: vec![
                    mk_pod("a", "p1", "10.0.0.1", "Running", &[]),
                    mk_pod("b", "p2", "10.0.0.1", "Running", &[]),
                ],
                ip: "10.0.0.1",
                want: Err("ambiguous"),
            },
            Case {
                name: "ipv6 pod",
                pods: vec![mk_pod("a", "p6", "fd00::5", "Running", &[])],
                ip: "fd00::5",
                want: Ok("a/p6"),
            },
            Case {
                name: "ipv4-mapped caller matches the ipv4 pod",
                pods: vec![mk_pod("a", "p1", "10.0.0.1", "Running", &[])],
                ip: "::ffff:10.0.0.1",
                want: Ok("a/p1"),
            },
        ];
        for c in cases {
            let mut idx = Index::new();
            idx.reset_pods(&c.pods);
            let got = idx
                .pod_by_ip(ip(c.ip))
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .map_err(|e| match e {
                    PodLookup::Unknown => "unknown",
                    PodLookup::Ambiguous { .. } => "ambiguous",
                });
            assert_eq!(got.as_deref().map_err(|e| *e), c.want, "{}", c.name);
        }
    }

    #[test]
    fn updates_move_ips_and_deletes_forget() {
        let mut idx = Index::new();
        idx.apply_pod(&mk_pod("a", "p", "10.0.0.1", "Running", &[]));
        idx.apply_pod(&mk_pod("a", "p", "10.0.0.2", "Running", &[]));
        assert_eq!(idx.pod_by_ip(ip("10.0.0.1")), Err(PodLookup::Unknown));
        assert!(idx.pod_by_ip(ip("10.0.0.2")).is_ok());
        idx.apply_pod(&terminating(mk_pod("a", "p", "10.0.0.2", "Running", &[])));
        assert_eq!(idx.pod_by_ip(ip("10.0.0.2")), Err(PodLookup::Unknown));
        assert!(idx.pod("a", "p").is_some(), "still known by name");
        idx.delete_pod("a", "p");
        assert!(idx.pod("a", "p").is_none());
        assert_eq!(idx.pod_count(), 0);
    }

    #[test]
    fn exceptions_match_any_label_ignoring_value_case_in_pod_namespace() {
        let mut idx = Index::new();
        idx.apply(&mk_exception(
            "ops",
            "e",
            &[("app", "Agent"), ("tier", "x")],
        ));
        let cases = [
            ("ops", &[("app", "agent")][..], true),
            ("ops", &[("app", "AGENT")][..], true),
            ("ops", &[("tier", "X"), ("app", "other")][..], true),
            ("ops", &[("App", "agent")][..], false),
            ("ops", &[("app", "agents")][..], false),
            ("other", &[("app", "agent")][..], false),
            ("ops", &[][..], false),
        ];
        for (ns, labels, want) in cases {
            let pod = PodEntry::from_pod(&mk_pod(ns, "p", "10.0.0.1", "Running", labels));
            assert_eq!(idx.is_excepted(&pod), want, "{ns} {labels:?}");
        }
        idx.delete::<AzurePodIdentityException>("ops", "e");
        let pod = PodEntry::from_pod(&mk_pod(
            "ops",
            "p",
            "10.0.0.1",
            "Running",
            &[("app", "agent")],
        ));
        assert!(!idx.is_excepted(&pod));
    }

    #[test]
    fn aais_by_pod_and_token_keys_in_use() {
        let a = mk_identity("default", "a", "CID-A");
        let b = mk_identity("default", "b", "cid-b");
        let ba = mk_binding("default", "ba", "a", "sel");
        let bb = mk_binding("default", "bb", "b", "sel");
        let mut idx = Index::new();
        idx.reset(&[
            mk_aai("ns", "p", &a, &ba, "Assigned"),
            mk_aai("ns", "p", &b, &bb, "Created"),
            mk_aai("ns", "q", &b, &bb, "Assigned"),
            mk_aai("other", "p", &a, &ba, "Assigned"),
        ]);
        let names: Vec<String> = idx
            .aais_for_pod("ns", "p")
            .iter()
            .map(|a| a.name_any())
            .collect();
        assert_eq!(names, ["p-ns-a", "p-ns-b"]);
        let keys = idx.token_keys_in_use();
        assert!(
            keys.contains(&IdentityKey::of(&a.spec)) && keys.contains(&IdentityKey::of(&b.spec)),
            "{keys:?}"
        );
        assert!(
            keys.iter().any(|k| matches!(
                k,
                IdentityKey::UserAssigned { resource_id, client_id }
                    if client_id.contains("cid-a") && resource_id.contains("/a")
            )),
            "lower-cased, with the resource ID: {keys:?}"
        );
        idx.delete::<AzureAssignedIdentity>("default", "p-ns-a");
        assert_eq!(idx.aais_for_pod("ns", "p").len(), 1);
    }

    #[test]
    fn the_index_keeps_only_what_nmi_reads() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
        let noise = |m: &mut ObjectMeta| {
            m.labels = Some([("team".to_string(), "x".to_string())].into());
            m.managed_fields = Some(vec![ManagedFieldsEntry::default(); 3]);
            m.finalizers = Some(vec!["f".into()]);
            m.resource_version = Some("7".into());
        };
        let mut id = mk_identity("ns", "a", "c");
        noise(&mut id.metadata);
        id.metadata.annotations = Some(
            [
                (
                    aadpodid_api::ANNOTATION_BEHAVIOR.to_string(),
                    "namespaced".to_string(),
                ),
                (
                    aadpodid_api::ANNOTATION_TOKEN_SOURCE.to_string(),
                    "federated".to_string(),
                ),
                (
                    "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                    "{}".to_string(),
                ),
            ]
            .into(),
        );
        let mut binding = mk_binding("ns", "b", "a", "sel");
        noise(&mut binding.metadata);
        let mut aai = mk_aai("ns", "p", &id, &binding, "Created");
        noise(&mut aai.metadata);
        let slim = slim_aai(&aai);
        let embedded = slim.spec.azure_identity_ref.as_deref().map(|i| &i.metadata);
        let want_id = ObjectMeta {
            namespace: Some("ns".into()),
            name: Some("a".into()),
            uid: Some("uid-identity-ns-a".into()),
            resource_version: Some("7".into()),
            annotations: Some(
                [
                    (
                        aadpodid_api::ANNOTATION_BEHAVIOR.to_string(),
                        "namespaced".to_string(),
                    ),
                    (
                        aadpodid_api::ANNOTATION_TOKEN_SOURCE.to_string(),
                        "federated".to_string(),
                    ),
                ]
                .into(),
            ),
            ..Default::default()
        };
        assert_eq!(slim_identity(&id).metadata, want_id);
        assert_eq!(embedded, Some(&want_id));
        assert_eq!(slim_identity(&id).spec, id.spec);
        let b = slim.spec.azure_binding_ref.as_deref();
        assert_eq!(b.map(|b| &b.spec), Some(&binding.spec));
        assert_eq!(
            b.and_then(|b| b.metadata.uid.as_deref()),
            Some("uid-binding-ns-b")
        );
        assert!(
            b.is_some_and(|b| b.metadata.labels.is_none() && b.metadata.managed_fields.is_none())
        );
        assert_eq!(
            (slim.spec.pod.as_str(), slim.spec.pod_namespace.as_str()),
            ("p", "ns")
        );
        assert_eq!(slim.status.map(|s| s.status), Some("Created".into()));
        assert_eq!(slim.metadata.name, aai.metadata.name);
        assert!(slim.metadata.managed_fields.is_none() && slim.metadata.labels.is_none());
        let ex = slim_exception(&mk_exception("ns", "e", &[("app", "x")]));
        assert_eq!(ex.spec.pod_labels.len(), 1);
    }

    #[test]
    fn lookups_tell_missing_from_not_listed() {
        let mut idx = Index::new();
        assert_eq!(idx.lookup::<AzureIdentity>("ns", "a"), Cached::NotListed);
        assert_eq!(
            idx.lookup::<AzureIdentityBinding>("ns", "b"),
            Cached::NotListed
        );
        idx.apply(&mk_identity("ns", "a", "c"));
        assert!(matches!(
            idx.lookup::<AzureIdentity>("ns", "a"),
            Cached::Found(_)
        ));
        assert_eq!(idx.lookup::<AzureIdentity>("ns", "x"), Cached::NotListed);
        idx.reset::<AzureIdentity>(&[]);
        idx.reset(&[mk_binding("ns", "b", "a", "s")]);
        assert_eq!(idx.lookup::<AzureIdentity>("ns", "a"), Cached::Missing);
        assert!(matches!(
            idx.lookup::<AzureIdentityBinding>("ns", "b"),
            Cached::Found(_)
        ));
        assert_eq!(
            idx.lookup::<AzureIdentityBinding>("other", "b"),
            Cached::Missing
        );
    }

    #[test]
    fn managed_identities_come_from_the_pods_namespace_only() {
        let mut idx = Index::new();
        idx.reset(&[
            mk_identity("ns", "id1", "c1"),
            mk_identity("other", "id2", "c2"),
        ]);
        idx.reset(&[
            mk_binding("ns", "b1", "id1", "sel"),
            mk_binding("ns", "b1dup", "id1", "sel"),
            mk_binding("ns", "b2", "id2", "sel"),
            mk_binding("other", "b3", "id2", "sel"),
            mk_binding("ns", "b4", "id1", "Sel"),
        ]);
        let pod = PodEntry::from_pod(&mk_pod(
            "ns",
            "p",
            "10.0.0.1",
            "Running",
            &[("aadpodidbinding", "sel")],
        ));
        let ids: Vec<String> = idx
            .managed_identities_for(&pod)
            .iter()
            .map(|i| i.name_any())
            .collect();
        assert_eq!(
            ids,
            ["id1"],
            "id2 lives in another namespace; selector is exact"
        );
        let unlabelled = PodEntry::from_pod(&mk_pod("ns", "u", "10.0.0.2", "Running", &[]));
        assert!(idx.managed_identities_for(&unlabelled).is_empty());
    }
}
