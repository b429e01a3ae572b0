//! Events with upstream's reasons (`binding applied`, `binding apply error`,
//! `status update error`, `binding removed`, `binding remove error`),
//! reported by component `aadpodidentity.k8s.io`. Best effort: a failed
//! Event is logged and never holds up the cycle.

use std::time::Duration;

use aadpodid_runtime::events::{EventPublisher, Severity};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{Client, Resource};

pub const REASON_BINDING_APPLIED: &str = "binding applied";
pub const REASON_BINDING_APPLY_ERROR: &str = "binding apply error";
pub const REASON_STATUS_UPDATE_ERROR: &str = "status update error";
pub const REASON_BINDING_REMOVED: &str = "binding removed";
pub const REASON_BINDING_REMOVE_ERROR: &str = "binding remove error";
/// Beyond upstream: an object a watch could not parse, or one the plan ignores.
pub const REASON_INVALID_OBJECT: &str = "invalid object";
/// Beyond upstream: the identity policy does not grant an AzureIdentity's
/// resourceID to its namespace.
pub const REASON_IDENTITY_NOT_GRANTED: &str = "IdentityNotGranted";
/// Beyond upstream: ARM's client ID for the identity differs from the
/// AzureIdentity's clientID; the AzureAssignedIdentity is not Assigned.
pub const REASON_CLIENT_ID_MISMATCH: &str = crate::guard::REASON_CLIENT_ID_MISMATCH;
/// Beyond upstream: a cluster identity (kubelet, immutable, or on the
/// VMSS/VM before MIC) is not served without `--serve-cluster-identities`.
pub const REASON_CLUSTER_IDENTITY_REFUSED: &str = crate::guard::REASON_CLUSTER_IDENTITY;

/// MIC's Events: the shared publisher with no throttling (each cycle reports
/// a warning once already) and upstream's action.
#[derive(Clone, Debug)]
pub struct Events {
    publisher: EventPublisher,
}

impl Events {
    pub fn new(client: Client, instance: &str) -> Self {
        Events {
            publisher: EventPublisher::new(
                client,
                aadpodid_api::EVENT_SOURCE_COMPONENT,
                Some(instance.into()),
            )
            .with_min_interval(Duration::ZERO),
        }
    }

    /// Publishes in the background.
    pub fn publish(&self, warning: bool, reason: &str, note: String, regarding: ObjectReference) {
        let severity = if warning {
            Severity::Warning
        } else {
            Severity::Normal
        };
        self.publisher
            .publish(severity, reason, "Sync", &note, regarding);
    }
}

/// A reference for an object that may lack a uid (embedded copies keep theirs).
pub fn reference<K: Resource<DynamicType = ()>>(obj: &K) -> ObjectReference {
    obj.object_ref(&())
}
