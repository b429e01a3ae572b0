use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

crd_kind! {
    kind = "AzureIdentityBinding",
    plural = "azureidentitybindings",
    status = "AzureIdentityBindingStatus",
    explain = "AzureIdentityBinding lets the pods whose aadpodidbinding label equals spec.selector use the AzureIdentity named in spec.azureIdentity.",
    columns = [
        ("AzureIdentity", "string", ".spec.azureIdentity"),
        ("Selector", "string", ".spec.selector"),
    ],
    /// Binds an AzureIdentity to the pods whose `aadpodidbinding` label equals `selector`.
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
