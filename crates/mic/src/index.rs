//! The cluster as MIC sees it: plain maps that watches update with
//! `apply`/`delete`/`reset`, and that [`crate::plan::plan`] reads. No I/O.

use std::collections::BTreeMap;
use std::sync::Arc;

use aadpodid_api::policy::ANNOTATION_ALLOWED_IDENTITIES;
use aadpodid_api::{AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, POD_LABEL_BINDING};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::ResourceExt;

use crate::cloud::{ResourceRef, resource_for_node};

/// `(namespace, name)`.
pub type Key = (String, String);

fn key_of<K: ResourceExt>(obj: &K) -> Key {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

/// What MIC keeps of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    /// Value of the `aadpodidbinding` label.
    pub binding_label: String,
    /// `spec.nodeName`; empty until scheduled.
    pub node: String,
    /// `status.phase`.
    pub phase: String,
}

impl PodInfo {
    pub fn from_pod(pod: &Pod) -> Self {
        PodInfo {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            binding_label: pod
                .labels()
                .get(POD_LABEL_BINDING)
                .cloned()
                .unwrap_or_default(),
            node: pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
            phase: pod
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default(),
        }
    }

    /// Succeeded or Failed: its containers will not run again.
    pub fn is_completed(&self) -> bool {
        self.phase == "Succeeded" || self.phase == "Failed"
    }
}

/// What MIC keeps of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub resource: ResourceRef,
    /// The providerID was set but did not parse; the node is addressed as a VM.
    pub malformed_provider_id: bool,
}

impl NodeInfo {
    pub fn from_node(node: &Node) -> Self {
        let name = node.name_any();
        let provider_id = node
            .spec
            .as_ref()
            .and_then(|s| s.provider_id.clone())
            .unwrap_or_default();
        let (resource, malformed_provider_id) = resource_for_node(&name, &provider_id);
        NodeInfo {
            name,
            resource,
            malformed_provider_id,
        }
    }
}

/// The in-memory view. Objects are shared by `Arc`: a clone of the index
/// (the copy a cycle plans on while the watches go on) copies the maps'
/// keys and pointers, never an object.
#[derive(Clone, Debug, Default)]
pub struct Index {
    pub pods: BTreeMap<Key, Arc<PodInfo>>,
    pub nodes: BTreeMap<String, Arc<NodeInfo>>,
    pub identities: BTreeMap<Key, Arc<AzureIdentity>>,
    pub bindings: BTreeMap<Key, Arc<AzureIdentityBinding>>,
    pub assigned: BTreeMap<Key, Arc<AzureAssignedIdentity>>,
    /// Identity policy: namespace → its `allowed-identities` annotation.
    /// Only namespaces carrying it are kept (watched only when the policy is on).
    pub namespaces: BTreeMap<String, String>,
}

/// Whether an apply changed anything MIC decides on; unchanged resyncs and
/// status-only pod updates cost no cycle (upstream ran a full cycle for each
/// such event: docs/upstream-behaviour.md#h9-sync-storms).
pub type Changed = bool;

impl Index {
    pub fn apply_pod(&mut self, pod: &Pod) -> Changed {
        let info = PodInfo::from_pod(pod);
        let key = (info.namespace.clone(), info.name.clone());
        if info.binding_label.is_empty() {
            return self.pods.remove(&key).is_some();
        }
        if self.pods.get(&key).is_some_and(|old| **old == info) {
            return false;
        }
        self.pods.insert(key, Arc::new(info));
        true
    }

    pub fn delete_pod(&mut self, pod: &Pod) -> Changed {
        self.pods.remove(&key_of(pod)).is_some()
    }

    pub fn apply_node(&mut self, node: &Node) -> Changed {
        let info = NodeInfo::from_node(node);
        if self.nodes.get(&info.name).is_some_and(|old| **old == info) {
            return false;
        }
        self.nodes.insert(info.name.clone(), Arc::new(info));
        true
    }

    pub fn delete_node(&mut self, node: &Node) -> Changed {
        self.nodes.remove(&node.name_any()).is_some()
    }

    pub fn apply_identity(&mut self, obj: &AzureIdentity) -> Changed {
        let old = self.identities.insert(key_of(obj), Arc::new(obj.clone()));
        // Metadata-only edits (labels, resourceVersion) change nothing MIC
        // decides on (docs/upstream-behaviour.md#h5-metadata-edits-cause-token-gaps);
        // the annotation does (namespaced).
        old.is_none_or(|o| o.spec != obj.spec || o.annotations() != obj.annotations())
    }

    pub fn delete_identity(&mut self, key: &Key) -> Changed {
        self.identities.remove(key).is_some()
    }

    pub fn apply_binding(&mut self, obj: &AzureIdentityBinding) -> Changed {
        let old = self.bindings.insert(key_of(obj), Arc::new(obj.clone()));
        old.is_none_or(|o| o.spec != obj.spec)
    }

    pub fn delete_binding(&mut self, key: &Key) -> Changed {
        self.bindings.remove(key).is_some()
    }

    pub fn apply_assigned(&mut self, obj: &AzureAssignedIdentity) -> Changed {
        let old = self.assigned.insert(key_of(obj), Arc::new(obj.clone()));
        old.is_none_or(|o| {
            o.spec != obj.spec
                || o.status != obj.status
                || o.metadata.deletion_timestamp != obj.metadata.deletion_timestamp
                || o.metadata.finalizers != obj.metadata.finalizers
        })
    }

    pub fn delete_assigned(&mut self, key: &Key) -> Changed {
        self.assigned.remove(key).is_some()
    }

    /// Keeps only the namespace's `allowed-identities` annotation.
    pub fn apply_namespace(&mut self, ns: &Namespace) -> Changed {
        let name = ns.name_any();
        match ns.annotations().get(ANNOTATION_ALLOWED_IDENTITIES) {
            Some(v) => self.namespaces.insert(name, v.clone()).as_ref() != Some(v),
            None => self.namespaces.remove(&name).is_some(),
        }
    }

    pub fn delete_namespace(&mut self, name: &str) -> Changed {
        self.namespaces.remove(name).is_some()
    }
}

/// Key of a namespaced object.
pub fn key<K: ResourceExt>(obj: &K) -> Key {
    key_of(obj)
}
