use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

crd_kind! {
    kind = "AzurePodIdentityException",
    plural = "azurepodidentityexceptions",
    status = "AzurePodIdentityExceptionStatus",
    explain = "AzurePodIdentityException exempts pods of its namespace that carry any of spec.podLabels from NMI's identity checks: their requests go to the node's IMDS unchanged.",
    columns = [
    ],
    /// Pods of this namespace that carry any one of `podLabels` (value compared
    /// ignoring case) get their token requests passed straight to the node's IMDS.
    pub struct AzurePodIdentityExceptionSpec {
        /// Labels, any one of which (value compared ignoring case) exempts a pod.
        #[serde(rename = "podLabels", default)]
        pub pod_labels: BTreeMap<String, String>,
    }
}

/// Status of an AzurePodIdentityException; kept for compatibility and not written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AzurePodIdentityExceptionStatus {
    /// Kept for compatibility; not written.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,
}
