//! Events with upstream's reasons (research/aad-pod-identity.md §2.6),
//! reported by component `aadpodidentity.k8s.io`. Best effort: a failed
//! Event is logged and never holds up the cycle.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
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

#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Events")
    }
}

impl Events {
    pub fn new(client: Client, instance: &str) -> Self {
        let reporter = Reporter {
            controller: aadpodid_api::EVENT_SOURCE_COMPONENT.into(),
            instance: Some(instance.into()),
        };
        Events {
            recorder: Recorder::new(client, reporter),
        }
    }

    /// Publishes in the background.
    pub fn publish(&self, warning: bool, reason: &str, note: String, regarding: ObjectReference) {
        let recorder = self.recorder.clone();
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: "Sync".into(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(error) = recorder.publish(&event, &regarding).await {
                tracing::debug!(%error, reason = %event.reason, "publishing an event");
            }
        });
    }
}

/// A reference for an object that may lack a uid (embedded copies keep theirs).
pub fn reference<K: Resource<DynamicType = ()>>(obj: &K) -> ObjectReference {
    obj.object_ref(&())
}
