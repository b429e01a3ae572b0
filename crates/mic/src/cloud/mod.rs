//! The one seam to Azure: read and update the user-assigned identities of a
//! VMSS or VM. The trait is implemented over ARM in [`arm`]; everything else
//! here is pure (node → resource, PATCH bodies, error classification).

pub mod arm;
pub mod config;
pub mod poll;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::time::Duration;

use serde::Serialize;

/// Upstream splits deltas into PATCHes of at most this many identities; ARM
/// refuses more in one request (`FailedIdentityOperation`, "exceed limit '150'").
pub const MAX_IDENTITIES_PER_REQUEST: usize = 150;

/// Kind of compute resource a node runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    Vmss,
    Vm,
}

/// A VMSS or VM in the cloud config's subscription and resource group (every
/// ARM call uses those, never the providerID's, as upstream).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceRef {
    pub kind: ResourceKind,
    pub name: String,
}

impl ResourceRef {
    pub fn vmss(name: impl Into<String>) -> Self {
        ResourceRef {
            kind: ResourceKind::Vmss,
            name: name.into(),
        }
    }

    pub fn vm(name: impl Into<String>) -> Self {
        ResourceRef {
            kind: ResourceKind::Vm,
            name: name.into(),
        }
    }
}

impl fmt::Display for ResourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ResourceKind::Vmss => write!(f, "vmss/{}", self.name),
            ResourceKind::Vm => write!(f, "vm/{}", self.name),
        }
    }
}

/// Where a node's identities live, from `spec.providerID`
/// (`azure:///subscriptions/…/virtualMachineScaleSets/<vmss>/virtualMachines/<n>`
/// for a scale-set instance). A VMSS instance maps to its scale set; anything
/// else, even a providerID that does not parse, is addressed as the VM named
/// after the node, as upstream does. The second value says the providerID was not empty
/// yet did not parse.
pub fn resource_for_node(node_name: &str, provider_id: &str) -> (ResourceRef, bool) {
    let path = provider_id
        .strip_prefix("azure://")
        .unwrap_or(provider_id)
        .trim_start_matches('/');
    let segs: Vec<&str> = path.split('/').collect();
    let well_formed = segs.len() >= 8
        && segs[0].eq_ignore_ascii_case("subscriptions")
        && segs[2].eq_ignore_ascii_case("resourceGroups")
        && segs[4].eq_ignore_ascii_case("providers")
        && segs[5].eq_ignore_ascii_case("Microsoft.Compute")
        && segs[1..8].iter().all(|s| !s.is_empty());
    if well_formed && segs[6].eq_ignore_ascii_case("virtualMachineScaleSets") {
        return (ResourceRef::vmss(segs[7]), false);
    }
    let vm_id = well_formed && segs[6].eq_ignore_ascii_case("virtualMachines") && segs.len() == 8;
    let malformed = !provider_id.is_empty() && !vm_id;
    (ResourceRef::vm(node_name), malformed)
}

/// Lower-cases a user-assigned identity ID; ARM compares them case-insensitively
/// and upstream sends them lower-cased.
pub fn normalize_id(id: &str) -> String {
    id.to_lowercase()
}

/// Whether `id` is a user-assigned identity resource ID (upstream's
/// `ValidateResourceID`; case-insensitive).
pub fn is_valid_identity_id(id: &str) -> bool {
    let lower = id.to_lowercase();
    let segs: Vec<&str> = lower.split('/').collect();
    segs.len() == 9
        && segs[0].is_empty()
        && segs[1] == "subscriptions"
        && segs[3] == "resourcegroups"
        && segs[5] == "providers"
        && segs[6] == "microsoft.managedidentity"
        && segs[7] == "userassignedidentities"
        && [2, 4, 8].iter().all(|&i| !segs[i].is_empty())
}

/// What ARM reports for one user-assigned identity on a VMSS or VM: the
/// pair that names the identity in tokens, learned from Azure rather than
/// from what a user typed into an AzureIdentity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArmIdentity {
    /// `clientId`, lower-cased; empty when ARM did not say.
    pub client_id: String,
    /// `principalId`, lower-cased; empty when ARM did not say.
    pub principal_id: String,
}

/// The identity block of a VMSS or VM as read from ARM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceIdentity {
    /// `identity.type` as ARM returned it (empty when there is no block).
    pub type_: String,
    /// Keys of `identity.userAssignedIdentities`, lower-cased.
    pub user_assigned: BTreeSet<String>,
    /// `properties.provisioningState`.
    pub provisioning_state: String,
    /// ARM's `clientId`/`principalId` per key of `user_assigned` (lower-cased
    /// ID); an identity ARM listed without them has no entry.
    pub reported: BTreeMap<String, ArmIdentity>,
}

impl ResourceIdentity {
    /// ARM's client ID of the identity `id` on this resource, lower-cased;
    /// `None` when the identity is not there or ARM did not report it.
    pub fn client_id(&self, id: &str) -> Option<&str> {
        self.reported
            .get(&normalize_id(id))
            .map(|a| a.client_id.as_str())
            .filter(|c| !c.is_empty())
    }

    /// ARM writes `SystemAssigned, UserAssigned`; accept any spacing and case.
    pub fn has_system_assigned(&self) -> bool {
        self.type_
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("SystemAssigned"))
    }
}

/// One PATCH body: `{"identity":{"type":..,"userAssignedIdentities":{id:{}|null}}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IdentityPatch {
    pub identity: IdentityPatchBody,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IdentityPatchBody {
    #[serde(rename = "type")]
    pub type_: String,
    /// `Some(Empty)` serializes as `{}` (add), `None` as `null` (remove).
    #[serde(
        rename = "userAssignedIdentities",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub user_assigned: BTreeMap<String, Option<Empty>>,
}

/// Serializes as `{}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Empty {}

impl IdentityPatch {
    pub fn adds(&self) -> impl Iterator<Item = &str> {
        self.identity
            .user_assigned
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| k.as_str())
    }
}

/// The PATCHes that take `current` to `current + add - remove`, sending only
/// the delta: IDs already present are not re-added and IDs absent are
/// not removed, so a removal of something already gone sends nothing (where
/// upstream stripped the system identity:
/// docs/upstream-behaviour.md#h1-system-identity-stripped). An ID in
/// both lists is added. At most [`MAX_IDENTITIES_PER_REQUEST`] IDs per PATCH;
/// each PATCH's `type` is computed from the state the earlier ones left, and
/// keeps `SystemAssigned` whenever the resource has it (a type without it
/// removes the system identity).
pub fn identity_patches(
    current: &ResourceIdentity,
    add: &BTreeSet<String>,
    remove: &BTreeSet<String>,
) -> Vec<IdentityPatch> {
    let add: BTreeSet<String> = add.iter().map(|s| normalize_id(s)).collect();
    let adds: Vec<String> = add
        .iter()
        .filter(|id| !current.user_assigned.contains(*id))
        .cloned()
        .collect();
    let removes: Vec<String> = remove
        .iter()
        .map(|s| normalize_id(s))
        .filter(|id| current.user_assigned.contains(id) && !add.contains(id))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let system = current.has_system_assigned();
    let mut state = current.user_assigned.clone();
    let entries: Vec<(String, bool)> = adds
        .into_iter()
        .map(|id| (id, true))
        .chain(removes.into_iter().map(|id| (id, false)))
        .collect();
    entries
        .chunks(MAX_IDENTITIES_PER_REQUEST)
        .map(|chunk| {
            let mut map = BTreeMap::new();
            for (id, is_add) in chunk {
                if *is_add {
                    state.insert(id.clone());
                    map.insert(id.clone(), Some(Empty {}));
                } else {
                    state.remove(id);
                    map.insert(id.clone(), None);
                }
            }
            let type_ = match (state.is_empty(), system) {
                (true, true) => "SystemAssigned",
                (true, false) => "None",
                (false, true) => "SystemAssigned, UserAssigned",
                (false, false) => "UserAssigned",
            };
            if state.is_empty() {
                // A user-assigned map with no identity left is refused; the
                // type alone removes the rest.
                map.clear();
            }
            IdentityPatch {
                identity: IdentityPatchBody {
                    type_: type_.into(),
                    user_assigned: map,
                },
            }
        })
        .collect()
}

/// What ARM answered when a call failed.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{}{code}: {message}", status.map(|s| format!("HTTP {s} ")).unwrap_or_default())]
pub struct ArmError {
    /// HTTP status; `None` when the request never got an answer.
    pub status: Option<u16>,
    /// ARM `error.code` (or a short description when there was no body).
    pub code: String,
    pub message: String,
    /// `Retry-After` of the answer.
    pub retry_after: Option<Duration>,
}

impl ArmError {
    /// Identity IDs named in the message, lower-cased. ARM quotes them in
    /// `FailedIdentityOperation` and `LinkedAuthorizationFailed` messages
    /// (inside single quotes, comma-separated), which upstream parses to retry
    /// without them.
    pub fn named_identity_ids(&self) -> BTreeSet<String> {
        let lower = self.message.to_lowercase();
        let mut out = BTreeSet::new();
        let mut rest = lower.as_str();
        while let Some(i) = rest.find("/subscriptions/") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| c.is_whitespace() || "'\",;)]}".contains(c))
                .unwrap_or(tail.len());
            let id = &tail[..end];
            if is_valid_identity_id(id) {
                out.insert(id.to_string());
            }
            rest = &tail[end..];
        }
        out
    }

    /// The identity itself is at fault (upstream retries without those IDs).
    pub fn is_identity_failure(&self) -> bool {
        self.code == "FailedIdentityOperation"
            || self.code == "LinkedAuthorizationFailed"
            || self.message.contains("FailedIdentityOperation")
            || self.message.contains("LinkedAuthorizationFailed")
    }
}

/// A failed Cloud operation, named after what was tried.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CloudError {
    #[error("reading the identities of {resource}: {source}")]
    GetIdentities {
        resource: ResourceRef,
        source: ArmError,
    },
    #[error("updating the identities of {resource}: {source}")]
    UpdateIdentities {
        resource: ResourceRef,
        source: ArmError,
    },
    #[error("{resource} is being deleted; not updating it")]
    ResourceDeleting { resource: ResourceRef },
    #[error("building the ARM client: {message}")]
    BuildClient { message: String },
}

impl CloudError {
    pub fn arm(&self) -> Option<&ArmError> {
        match self {
            CloudError::GetIdentities { source, .. }
            | CloudError::UpdateIdentities { source, .. } => Some(source),
            _ => None,
        }
    }

    /// `Retry-After` of the failed call.
    pub fn retry_after(&self) -> Option<Duration> {
        self.arm().and_then(|e| e.retry_after)
    }
}

/// Azure as MIC sees it.
pub trait Cloud: Send + Sync + 'static {
    /// GET the identity block of a VMSS or VM.
    fn get_identities(
        &self,
        resource: &ResourceRef,
    ) -> impl Future<Output = Result<ResourceIdentity, CloudError>> + Send;

    /// PATCH one body and wait for the long-running operation to finish.
    fn update_identities(
        &self,
        resource: &ResourceRef,
        patch: &IdentityPatch,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;

    /// The `x-ms-ratelimit-remaining-resource` value of the last answer (a
    /// GET or a write) about `resource` (taken: each value is seen once).
    /// Feeds the scheduler's mirror of Compute's buckets; `None` when unknown.
    fn take_remaining(&self, resource: &ResourceRef) -> Option<String> {
        let _ = resource;
        None
    }

    /// The `x-ms-ratelimit-remaining-subscription-writes` value of the last
    /// answer to a write (taken), ARM's own per-subscription write budget.
    fn take_remaining_subscription_writes(&self) -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUB: &str = "/subscriptions/s/resourceGroups/rg/providers";

    fn id(n: &str) -> String {
        format!(
            "/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/{n}"
        )
    }

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|n| id(n)).collect()
    }

    fn current(type_: &str, ids: &[&str]) -> ResourceIdentity {
        ResourceIdentity {
            type_: type_.into(),
            user_assigned: set(ids),
            provisioning_state: "Succeeded".into(),
            ..Default::default()
        }
    }

    #[test]
    fn provider_ids() {
        let vmss = |name: &str| (ResourceRef::vmss(name), false);
        // A VM is named after its node; `true`: the provider ID is malformed.
        let vm = |malformed: bool| (ResourceRef::vm("node"), malformed);
        let cases = [
            (
                format!(
                    "azure://{SUB}/Microsoft.Compute/virtualMachineScaleSets/aks-np-vmss/virtualMachines/3"
                ),
                vmss("aks-np-vmss"),
            ),
            (
                "azure:///subscriptions/s/resourcegroups/rg/providers/microsoft.compute/virtualmachinescalesets/lower-vmss/virtualmachines/0".to_string(),
                vmss("lower-vmss"),
            ),
            (
                format!("azure://{SUB}/Microsoft.Compute/virtualMachines/some-vm"),
                vm(false),
            ),
            // A node without a provider ID (kind).
            (String::new(), vm(false)),
            ("aws:///us-east-1a/i-0123".into(), vm(true)),
            ("azure:///subscriptions/s".into(), vm(true)),
        ];
        for (pid, want) in cases {
            assert_eq!(resource_for_node("node", &pid), want, "{pid}");
        }
    }

    #[test]
    fn identity_id_validation() {
        assert!(is_valid_identity_id(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x"
        ));
        for bad in [
            "",
            "x",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/x",
            "subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x",
        ] {
            assert!(!is_valid_identity_id(bad), "{bad}");
        }
    }

    fn body(p: &IdentityPatch) -> serde_json::Value {
        serde_json::to_value(p).unwrap()
    }

    #[test]
    fn patch_sends_only_the_delta_lower_cased() {
        let cur = current("UserAssigned", &["kubelet", "a"]);
        let add: BTreeSet<String> = [id("A"), id("B").to_uppercase()].into();
        let p = identity_patches(&cur, &add, &set(&["gone", "kubelet"]));
        assert_eq!(p.len(), 1);
        assert_eq!(
            body(&p[0]),
            serde_json::json!({"identity": {"type": "UserAssigned", "userAssignedIdentities": {
                id("b"): {}, id("kubelet"): null }}})
        );
    }

    #[test]
    fn nothing_to_do_sends_nothing() {
        let cur = current("SystemAssigned", &[]);
        // Removing an identity that is already gone must not strip the system identity.
        assert!(identity_patches(&cur, &BTreeSet::new(), &set(&["x"])).is_empty());
        let cur = current("UserAssigned", &["a"]);
        assert!(identity_patches(&cur, &set(&["a"]), &BTreeSet::new()).is_empty());
    }

    #[test]
    fn add_wins_over_remove() {
        let cur = current("UserAssigned", &["a"]);
        assert!(identity_patches(&cur, &set(&["a"]), &set(&["a"])).is_empty());
    }

    #[test]
    fn system_identity_is_kept_in_the_type() {
        let cur = current("SystemAssigned,UserAssigned", &["a"]);
        let p = identity_patches(&cur, &set(&["b"]), &BTreeSet::new());
        assert_eq!(p[0].identity.type_, "SystemAssigned, UserAssigned");
        let p = identity_patches(&cur, &BTreeSet::new(), &set(&["a"]));
        assert_eq!(
            body(&p[0]),
            serde_json::json!({"identity": {"type": "SystemAssigned"}})
        );
        let cur = current("SystemAssigned", &[]);
        let p = identity_patches(&cur, &set(&["b"]), &BTreeSet::new());
        assert_eq!(p[0].identity.type_, "SystemAssigned, UserAssigned");
    }

    #[test]
    fn removing_the_last_identity_sends_none() {
        let cur = current("UserAssigned", &["a"]);
        let p = identity_patches(&cur, &BTreeSet::new(), &set(&["a"]));
        assert_eq!(
            body(&p[0]),
            serde_json::json!({"identity": {"type": "None"}})
        );
        let p = identity_patches(&ResourceIdentity::default(), &set(&["a"]), &BTreeSet::new());
        assert_eq!(p[0].identity.type_, "UserAssigned");
    }

    #[test]
    fn at_most_150_per_patch() {
        let names: Vec<String> = (0..320).map(|i| format!("id{i:03}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let p = identity_patches(&current("", &[]), &set(&refs), &BTreeSet::new());
        assert_eq!(
            p.iter()
                .map(|p| p.identity.user_assigned.len())
                .collect::<Vec<_>>(),
            vec![150, 150, 20]
        );
        assert!(p.iter().all(|p| p.identity.type_ == "UserAssigned"));
    }

    #[test]
    fn identity_ids_are_pulled_out_of_arm_messages() {
        let e = ArmError {
            status: Some(400),
            code: "FailedIdentityOperation".into(),
            message: format!(
                "Identity operation for resource 'x' failed with error 'Failed to perform resource identity operation. Status: 'BadRequest'. Response: '{{\"error\":{{\"code\":\"BadRequest\",\"message\":\"Resource '{}' was not found.\"}}}}'.'.",
                id("Ghost")
            ),
            retry_after: None,
        };
        assert!(e.is_identity_failure());
        assert_eq!(e.named_identity_ids(), set(&["ghost"]));
        let e = ArmError {
            status: Some(403),
            code: "LinkedAuthorizationFailed".into(),
            message: format!(
                "The client has permission to perform action on scope 'vmss'; however, it does not have permission to perform action(s) 'Microsoft.ManagedIdentity/userAssignedIdentities/assign/action' on the linked scope(s) '{},{}' (respectively)",
                id("a"),
                id("b")
            ),
            retry_after: None,
        };
        assert_eq!(e.named_identity_ids(), set(&["a", "b"]));
    }
}
