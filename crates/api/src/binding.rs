use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Binds an AzureIdentity to the pods whose `aadpodidbinding` label equals `selector`.
#[allow(
    clippy::duplicated_attributes,
    reason = "each kube printcolumn(..) names its own type_"
)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureIdentityBinding",
    plural = "azureidentitybindings",
    namespaced,
    derive = "PartialEq",
    derive = "Default",
    status = "AzureIdentityBindingStatus",
    doc = "AzureIdentityBinding lets the pods whose aadpodidbinding label equals spec.selector use the AzureIdentity named in spec.azureIdentity.",
    annotation("api-approved.kubernetes.io", "unapproved"),
    printcolumn(
        name = "AzureIdentity",
        type_ = "string",
        json_path = ".spec.azureIdentity"
    ),
    printcolumn(name = "Selector", type_ = "string", json_path = ".spec.selector"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct AzureIdentityBindingSpec {
    /// Name of an AzureIdentity in the binding's own namespace.
    #[serde(
        rename = "azureIdentity",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub azure_identity: String,

    /// Compared byte for byte with the value of the pod label aadpodidbinding.
    /// A plain string, not a label selector.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,

    /// Kept for compatibility; not read.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub weight: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// Status of an AzureIdentityBinding; kept for compatibility and not written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AzureIdentityBindingStatus {
    /// Kept for compatibility; not written.
    #[serde(rename = "availableReplicas", default)]
    pub available_replicas: i32,
}
