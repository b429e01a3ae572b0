use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

use crate::{AzureIdentity, AzureIdentityBinding};

crd_kind! {
    kind = "AzureAssignedIdentity",
    plural = "azureassignedidentities",
    status = "AzureAssignedIdentityStatus",
    explain = "AzureAssignedIdentity is written by MIC: pod spec.pod in spec.podNamespace uses the embedded AzureIdentity through the embedded AzureIdentityBinding on node spec.nodename.",
    columns = [
        ("Pod", "string", ".spec.pod"),
        ("PodNamespace", "string", ".spec.podNamespace"),
        ("Identity", "string", ".spec.azureIdentityRef.metadata.name"),
        ("Node", "string", ".spec.nodename"),
        ("Status", "string", ".status.status"),
    ],
    /// Written by MIC only: records that a pod uses an identity through a binding
    /// and whether that identity is on the pod's node yet.
    pub struct AzureAssignedIdentitySpec {
        /// Copy of the AzureIdentity the pod uses.
        #[serde(rename = "azureIdentityRef", default)]
        #[schemars(schema_with = "embedded::<AzureIdentity>")]
        pub azure_identity_ref: Option<Box<AzureIdentity>>,

        /// Copy of the AzureIdentityBinding that matched the pod.
        #[serde(rename = "azureBindingRef", default)]
        #[schemars(schema_with = "embedded::<AzureIdentityBinding>")]
        pub azure_binding_ref: Option<Box<AzureIdentityBinding>>,

        /// Name of the pod.
        #[serde(default)]
        pub pod: String,

        /// Namespace of the pod.
        #[serde(rename = "podNamespace", default)]
        pub pod_namespace: String,

        /// Node the pod is scheduled on.
        #[serde(rename = "nodename", default)]
        pub node_name: String,

        /// Kept for compatibility; not read.
        #[serde(default)]
        pub replicas: Option<i32>,
    }
}

/// Where MIC is with an AzureAssignedIdentity.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AzureAssignedIdentityStatus {
    /// Created (recorded, not yet confirmed on the node), Assigned (the node
    /// has the identity, or none is needed) or Unassigned (about to be deleted).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,

    /// MIC sets 1.
    #[serde(rename = "availableReplicas", default)]
    pub available_replicas: i32,
}

/// The values of `status.status` of an AzureAssignedIdentity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AssignedIdentityState {
    /// Recorded; the identity is not yet confirmed on the node.
    Created,
    /// The identity is on the node (or needs no ARM assignment).
    Assigned,
    /// Set just before the object is deleted.
    Unassigned,
}

impl AssignedIdentityState {
    /// The string written in `status.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            AssignedIdentityState::Created => "Created",
            AssignedIdentityState::Assigned => "Assigned",
            AssignedIdentityState::Unassigned => "Unassigned",
        }
    }

    /// Reads `status.status`. Objects from before upstream v1.5 have an empty
    /// status and are treated as Assigned, as upstream does.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "Created" => Some(AssignedIdentityState::Created),
            "Assigned" | "" => Some(AssignedIdentityState::Assigned),
            "Unassigned" => Some(AssignedIdentityState::Unassigned),
            _ => None,
        }
    }
}

impl fmt::Display for AssignedIdentityState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AzureAssignedIdentity {
    /// The AzureAssignedIdentity recording that `pod` of `pod_namespace`, on
    /// `node`, uses `identity` through `binding`: named as upstream names it
    /// ([`crate::assigned_identity_name`]), embedding copies of both objects.
    /// Its namespace, labels, finalizers and status are left to the writer.
    pub fn for_pod(
        identity: &AzureIdentity,
        binding: &AzureIdentityBinding,
        pod: &str,
        pod_namespace: &str,
        node: &str,
    ) -> Self {
        let identity_name = identity.metadata.name.as_deref().unwrap_or_default();
        AzureAssignedIdentity::new(
            &crate::assigned_identity_name(pod, pod_namespace, identity_name),
            AzureAssignedIdentitySpec {
                azure_identity_ref: Some(Box::new(identity.clone())),
                azure_binding_ref: Some(Box::new(binding.clone())),
                pod: pod.into(),
                pod_namespace: pod_namespace.into(),
                node_name: node.into(),
                replicas: None,
            },
        )
    }

    /// The state in `status.status`, if it is one MIC writes (or empty).
    pub fn state(&self) -> Option<AssignedIdentityState> {
        AssignedIdentityState::parse(self.status.as_ref().map_or("", |s| s.status.as_str()))
    }
}

/// Schema of an embedded object: the kind's own schema, marked
/// `x-kubernetes-embedded-resource` so that the API server keeps and checks its
/// `apiVersion`, `kind` and `metadata`.
fn embedded<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<T>();
    schema.insert("x-kubernetes-embedded-resource".into(), true.into());
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_empty_status_counts_as_assigned() {
        assert_eq!(
            AssignedIdentityState::parse(""),
            Some(AssignedIdentityState::Assigned)
        );
        assert_eq!(
            AssignedIdentityState::parse("Created"),
            Some(AssignedIdentityState::Created)
        );
        assert_eq!(AssignedIdentityState::parse("assigned"), None);
    }

    #[test]
    fn for_pod_names_and_embeds_as_mic_writes() {
        let mut id = AzureIdentity::new("kv", Default::default());
        id.metadata.namespace = Some("team".into());
        let binding = AzureIdentityBinding::new("kv-bind", Default::default());
        let aai = AzureAssignedIdentity::for_pod(&id, &binding, "web", "prod", "node1");
        assert_eq!(aai.metadata.name.as_deref(), Some("web-prod-kv"));
        assert_eq!(aai.metadata.namespace, None);
        assert_eq!(aai.status, None);
        assert_eq!(aai.spec.pod, "web");
        assert_eq!(aai.spec.pod_namespace, "prod");
        assert_eq!(aai.spec.node_name, "node1");
        assert_eq!(aai.spec.replicas, None);
        assert_eq!(aai.spec.azure_identity_ref.as_deref(), Some(&id));
        assert_eq!(aai.spec.azure_binding_ref.as_deref(), Some(&binding));
    }

    #[test]
    fn embedded_refs_keep_api_version_and_kind() {
        let id = AzureIdentity::new("id", Default::default());
        let aai = AzureAssignedIdentity::new(
            "p-ns-id",
            AzureAssignedIdentitySpec {
                azure_identity_ref: Some(Box::new(id)),
                pod: "p".into(),
                pod_namespace: "ns".into(),
                node_name: "n".into(),
                ..Default::default()
            },
        );
        let v = serde_json::to_value(&aai).unwrap();
        assert_eq!(
            v["spec"]["azureIdentityRef"]["apiVersion"],
            "aadpodidentity.k8s.io/v1"
        );
        assert_eq!(v["spec"]["azureIdentityRef"]["kind"], "AzureIdentity");
        assert_eq!(v["spec"]["nodename"], "n");
    }
}
