//! The `aadpodidentity.k8s.io/v1` custom resources of aad-pod-identity and the
//! names (labels, annotations, finalizer) that MIC, NMI and users share.
//!
//! Field names, JSON types and `omitempty` behaviour follow upstream v1.8.17
//! (`pkg/apis/aadpodidentity/v1/types.go`), so manifests written for the Go
//! release deserialize unchanged. Documentation comments on the spec types become
//! the `kubectl explain` text of the generated CRDs.

/// Declares the spec type of one kind of this API with the attributes every
/// kind shares: the `CustomResource` derive and its `#[kube(..)]` (group,
/// version, namespaced, the `api-approved` annotation, `PartialEq` and
/// `Default` on the kind, an `Age` column last). Each kind gives its name,
/// plural, status type, `kubectl explain` text and columns before `Age`
/// (name, type, JSON path), then its doc comment and spec struct.
macro_rules! crd_kind {
    (
        kind = $kind:tt,
        plural = $plural:tt,
        status = $status:tt,
        explain = $explain:tt,
        columns = [$(($column:tt, $type:tt, $path:tt)),* $(,)?],
        $(#[$meta:meta])*
        pub struct $spec:ident { $($body:tt)* }
    ) => {
        $(#[$meta])*
        #[allow(
            clippy::duplicated_attributes,
            reason = "each kube printcolumn(..) names its own type_"
        )]
        #[derive(
            kube::CustomResource,
            Clone,
            Debug,
            Default,
            PartialEq,
            serde::Serialize,
            serde::Deserialize,
            schemars::JsonSchema,
        )]
        #[kube(
            group = "aadpodidentity.k8s.io",
            version = "v1",
            kind = $kind,
            plural = $plural,
            namespaced,
            derive = "PartialEq",
            derive = "Default",
            status = $status,
            doc = $explain,
            annotation("api-approved.kubernetes.io", "unapproved"),
            $(printcolumn(name = $column, type_ = $type, json_path = $path),)*
            printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
        )]
        pub struct $spec { $($body)* }
    };
}

mod assigned_identity;
mod binding;
pub mod crd;
mod exception;
mod identity;
pub mod policy;
mod token_source;

pub use assigned_identity::{
    AssignedIdentityState, AzureAssignedIdentity, AzureAssignedIdentitySpec,
    AzureAssignedIdentityStatus,
};
pub use binding::{AzureIdentityBinding, AzureIdentityBindingSpec, AzureIdentityBindingStatus};
pub use exception::{
    AzurePodIdentityException, AzurePodIdentityExceptionSpec, AzurePodIdentityExceptionStatus,
};
pub use identity::{AzureIdentity, AzureIdentitySpec, AzureIdentityStatus, IdentityType};
pub use policy::{ANNOTATION_ALLOWED_IDENTITIES, PolicyMode, identity_granted};
pub use token_source::{
    ANNOTATION_TOKEN_SOURCE, FEDERATED_TOKEN_AUDIENCE, TokenSource, UnknownTokenSource,
    token_source, token_source_of,
};

/// API group of all four kinds.
pub const GROUP: &str = "aadpodidentity.k8s.io";
/// The one served and stored version.
pub const VERSION: &str = "v1";
/// `apiVersion` of all four kinds.
pub const API_VERSION: &str = "aadpodidentity.k8s.io/v1";

/// Reason of the Warning Event NMI publishes in its own namespace (the
/// release namespace, which namespace users cannot write), about its Node,
/// when IMDS answers "Identity not found" for an identity whose
/// AzureAssignedIdentity is Assigned. MIC watches Events of this reason in
/// its namespace and checks that node's VMSS/VM at once instead of at its
/// next periodic drift check.
pub const REASON_IDENTITY_NOT_ON_NODE: &str = "IdentityNotOnNode";

/// Pod label whose value is compared, byte for byte, with a binding's `selector`.
pub const POD_LABEL_BINDING: &str = "aadpodidbinding";
/// Label MIC puts on every AzureAssignedIdentity: the name of the pod's node.
/// NMI filters its AzureAssignedIdentity watch with it.
pub const LABEL_NODENAME: &str = "nodename";
/// Annotation that makes one AzureIdentity match only pods and bindings of its own namespace.
pub const ANNOTATION_BEHAVIOR: &str = "aadpodidentity.k8s.io/Behavior";
/// The only value of [`ANNOTATION_BEHAVIOR`] that has an effect.
pub const BEHAVIOR_NAMESPACED: &str = "namespaced";
/// Finalizer MIC adds to each AzureAssignedIdentity so that it can take the
/// identity off the node before the object goes.
pub const ASSIGNED_IDENTITY_FINALIZER: &str =
    "azureassignedidentity.finalizers.aadpodidentity.k8s.io";
/// Environment variable that turns on namespaced mode in both binaries (exact value `true`).
pub const ENV_FORCE_NAMESPACED: &str = "FORCENAMESPACED";
/// Label of the pods of AKS-managed add-ons, excepted by the chart's `aks-addon-exception`.
pub const LABEL_AKS_MANAGED_BY: &str = "kubernetes.azure.com/managedby";
/// Annotation MIC puts on an AzureAssignedIdentity it will not mark Assigned,
/// saying why (the client ID Azure reports differs from the AzureIdentity's,
/// the identity belongs to the cluster, or the identity policy refuses it).
/// Removed once the assignment goes through.
pub const ANNOTATION_ASSIGNMENT_ERROR: &str = "aadpodidentity.k8s.io/assignment-error";
/// Component name MIC and NMI report Events under.
pub const EVENT_SOURCE_COMPONENT: &str = "aadpodidentity.k8s.io";

/// Whether `identity` matches only pods and bindings of its own namespace, either
/// because namespaced mode is forced or because it carries the
/// `aadpodidentity.k8s.io/Behavior: namespaced` annotation.
pub fn is_namespaced(identity: &AzureIdentity, force_namespaced: bool) -> bool {
    force_namespaced
        || identity
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_BEHAVIOR))
            .is_some_and(|v| v == BEHAVIOR_NAMESPACED)
}

/// Upstream's name for the AzureAssignedIdentity of `pod` in `pod_namespace` and
/// the identity `identity_name`: `<pod>-<podNamespace>-<identity>`.
pub fn assigned_identity_name(pod: &str, pod_namespace: &str, identity_name: &str) -> String {
    format!("{pod}-{pod_namespace}-{identity_name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assigned_identity_name_matches_upstream_layout() {
        assert_eq!(
            assigned_identity_name("web", "prod", "kv-reader"),
            "web-prod-kv-reader"
        );
    }

    #[test]
    fn namespaced_only_for_exact_annotation_value_or_force() {
        let mut id = AzureIdentity::new("id", AzureIdentitySpec::default());
        assert!(!is_namespaced(&id, false));
        assert!(is_namespaced(&id, true));
        id.metadata.annotations =
            Some([(ANNOTATION_BEHAVIOR.to_string(), "Namespaced".to_string())].into());
        assert!(
            !is_namespaced(&id, false),
            "value is case-sensitive upstream"
        );
        id.metadata.annotations = Some(
            [(
                ANNOTATION_BEHAVIOR.to_string(),
                BEHAVIOR_NAMESPACED.to_string(),
            )]
            .into(),
        );
        assert!(is_namespaced(&id, false));
    }
}
