//! Events with upstream's reasons (`binding applied`, `binding apply error`,
//! `status update error`, `binding removed`, `binding remove error`),
//! reported by component `aadpodidentity.k8s.io`. Best effort: a failed
//! Event is logged and never holds up the cycle.

use std::time::Duration;

use crate::index::AssignedInfo;
use aadpodid_runtime::events::{EventPublisher, Severity};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{Client, Resource, ResourceExt};

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

/// An Event to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct EventNote {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
    pub regarding: ObjectReference,
}

/// Upstream's Event for deleting `aai` when its node is gone (upstream's
/// `cleanUpAllAssignedIdentitiesOnNode`, the one place it recorded these
/// reasons): `binding removed` (Normal) once the AzureAssignedIdentity is
/// deleted, `binding remove error` (Warning) with the apiserver's error when
/// it is not, both about the binding embedded in the AzureAssignedIdentity,
/// with upstream's messages. `None` while the node exists or when the
/// AzureAssignedIdentity embeds no binding.
pub fn node_gone_removal(
    aai: &AssignedInfo,
    node_exists: bool,
    result: Result<&(), &String>,
) -> Option<EventNote> {
    if node_exists {
        return None;
    }
    let binding = aai.spec.binding.as_deref()?;
    let (warning, reason, note) = match result {
        Ok(()) => (
            false,
            REASON_BINDING_REMOVED,
            format!(
                "Binding {} removed from node {} for pod {}",
                binding.name_any(),
                aai.spec.node_name,
                aai.spec.pod
            ),
        ),
        Err(error) => (
            true,
            REASON_BINDING_REMOVE_ERROR,
            format!(
                "failed to remove AzureIdentityBinding {}/{} from node {} for pod {}/{}, error: {error}",
                binding.namespace().unwrap_or_default(),
                binding.name_any(),
                aai.spec.node_name,
                aai.spec.pod_namespace,
                aai.spec.pod
            ),
        ),
    };
    Some(EventNote {
        warning,
        reason,
        note,
        regarding: reference(binding),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Index;
    use crate::plan::tests::mk_binding;
    use aadpodid_api::{AzureAssignedIdentity, AzureIdentity};

    fn mk_aai(with_binding: bool) -> AssignedInfo {
        let mut binding = mk_binding("apps", "web-binding", "app-id", "web");
        binding.metadata.uid = Some("b-uid".into());
        let identity = AzureIdentity::new("app-id", Default::default());
        let mut aai =
            AzureAssignedIdentity::for_pod(&identity, &binding, "web-1", "apps", "node-a");
        if !with_binding {
            aai.spec.azure_binding_ref = None;
        }
        AssignedInfo::new(&aai, &Index::default())
    }

    #[test]
    fn upstreams_removal_events_for_a_node_that_is_gone() {
        /// (warning, reason, note) of the Event.
        type Want = Option<(bool, &'static str, String)>;
        let err = "the server could not find the requested resource".to_string();
        // (node exists, AAI embeds its binding, deletion result, Event)
        let cases: Vec<(bool, bool, Result<&(), &String>, Want)> = vec![
            (true, true, Ok(&()), None),
            (true, true, Err(&err), None),
            (false, false, Ok(&()), None),
            (
                false,
                true,
                Ok(&()),
                Some((
                    false,
                    "binding removed",
                    "Binding web-binding removed from node node-a for pod web-1".into(),
                )),
            ),
            (
                false,
                true,
                Err(&err),
                Some((
                    true,
                    "binding remove error",
                    format!(
                        "failed to remove AzureIdentityBinding apps/web-binding from node node-a for pod apps/web-1, error: {err}"
                    ),
                )),
            ),
        ];
        for (node_exists, with_binding, result, want) in cases {
            let got = node_gone_removal(&mk_aai(with_binding), node_exists, result);
            let got_plain = got.as_ref().map(|e| (e.warning, e.reason, e.note.clone()));
            assert_eq!(
                got_plain, want,
                "node exists {node_exists}, binding {with_binding}, {result:?}"
            );
            if let Some(e) = got {
                assert_eq!(e.regarding.kind.as_deref(), Some("AzureIdentityBinding"));
                assert_eq!(e.regarding.name.as_deref(), Some("web-binding"));
                assert_eq!(e.regarding.namespace.as_deref(), Some("apps"));
                assert_eq!(e.regarding.uid.as_deref(), Some("b-uid"));
            }
        }
    }
}
