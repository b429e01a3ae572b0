//! The decision: from the cluster view to the AzureAssignedIdentity (AAI)
//! writes and the per-VMSS/VM identity deltas, following upstream's sync cycle
//! (docs/upstream-behaviour.md#mic-sync-cycle) minus its hazards (the
//! H sections of that page).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use aadpodid_api::policy::{PolicyMode, identity_granted};
use aadpodid_api::{
    ANNOTATION_TOKEN_SOURCE, ASSIGNED_IDENTITY_FINALIZER, AssignedIdentityState,
    AzureAssignedIdentity, AzureAssignedIdentitySpec, AzureAssignedIdentityStatus, AzureIdentity,
    AzureIdentityBinding, IdentityType, LABEL_NODENAME, TokenSource, UnknownTokenSource,
    assigned_identity_name, is_namespaced, token_source,
};
use kube::ResourceExt;

use crate::cloud::{ResourceRef, is_valid_identity_id, normalize_id};
use crate::index::{AssignedInfo, AssignedSpec, Index, Key, PodInfo};

/// AAIs live here unless the identity is namespaced (upstream's "back compat").
pub const DEFAULT_AAI_NAMESPACE: &str = "default";

/// Settings the plan depends on.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `--forceNamespaced` or `FORCENAMESPACED=true`.
    pub force_namespaced: bool,
    /// Client IDs never removed from a VM/VMSS, lower-cased: `--immutable-user-msis`
    /// plus the cluster identity of azure.json (as upstream).
    pub immutable_client_ids: BTreeSet<String>,
    /// Upstream behaviour: Succeeded/Failed pods keep their identities.
    pub keep_completed_pod_identities: bool,
    /// `--identity-policy`: whether a type-0 identity must be granted to its
    /// namespace (Namespace annotation `aadpodidentity.k8s.io/allowed-identities`).
    pub policy: PolicyMode,
    /// `--default-token-source`: the token source of identities without the
    /// token-source annotation.
    pub default_token_source: TokenSource,
}

/// Something wrong with the user's objects; reported, never fatal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Warning {
    /// A binding names an identity that does not exist in its namespace.
    IdentityNotFound { binding: Key, identity: Key },
    /// A type-0 identity whose resourceID is not a user-assigned identity ID.
    InvalidResourceId { identity: Key, resource_id: String },
    /// `spec.type` outside 0..=2.
    UnknownIdentityType { identity: Key, value: i64 },
    /// Two matches produce the same AAI name; the first by sorted binding wins (as upstream).
    DuplicateAssignedIdentity { name: Key, binding: Key },
    /// A namespaced identity matched across namespaces; skipped.
    NamespaceMismatch { binding: Key, pod: Key },
    /// The identity policy does not grant the identity's resource ID to
    /// `namespace` (the identity's own, or that of a pod a binding reaches
    /// from another namespace); under `enforce` it gets no AAI, under `warn`
    /// it still does.
    IdentityNotGranted {
        identity: Key,
        namespace: String,
        resource_id: String,
        enforced: bool,
    },
    /// The identity's token-source annotation names no source: no pod is
    /// given it (no AAI, no ARM write) until it is fixed, and the AAIs it
    /// had are retired.
    UnknownTokenSource {
        identity: Key,
        error: UnknownTokenSource,
    },
}

/// Identity work on one VMSS or VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceWork {
    /// Lower-cased identity IDs that must be on the resource.
    pub add: BTreeSet<String>,
    /// Lower-cased identity IDs to take off; nothing desired uses them here.
    pub remove: BTreeSet<String>,
    /// AAIs (with their identity ID) that become Assigned once the ID is on the resource.
    pub assign_on_success: Vec<(Key, String)>,
    /// AAIs (with their identity ID) to delete once the ID is off the resource.
    pub delete_on_success: Vec<(Key, String)>,
}

/// What one cycle should do.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// New AAIs, status Created.
    pub create: Vec<PlannedAai>,
    /// Existing AAIs whose spec must change (identity/binding edited, pod moved);
    /// status back to Created.
    pub update: Vec<PlannedAai>,
    /// AAIs to mark Assigned with no ARM call (service principals, as upstream).
    pub assign_now: Vec<Key>,
    /// AAIs to delete with no ARM call (still in use elsewhere, immutable, type 1/2,
    /// node gone, never assigned).
    pub delete_now: Vec<Key>,
    /// Per-VMSS/VM deltas and the AAIs waiting on them.
    pub resources: BTreeMap<ResourceRef, ResourceWork>,
    pub warnings: Vec<Warning>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.create.is_empty()
            && self.update.is_empty()
            && self.assign_now.is_empty()
            && self.delete_now.is_empty()
            && self.resources.is_empty()
    }

    /// Assigns `d` (the desired AAI `key`): its identity added to its
    /// resource, the AAI Assigned once that lands; or Assigned at once when
    /// there is nothing to add (service principals, federated identities).
    fn assign(&mut self, key: &Key, d: &Desired) {
        match &d.identity_id {
            Some(id) => {
                let w = self.resources.entry(d.resource.clone()).or_default();
                w.add.insert(id.clone());
                w.assign_on_success.push((key.clone(), id.clone()));
            }
            None => self.assign_now.push(key.clone()),
        }
    }
}

fn identity_key(binding: &AzureIdentityBinding) -> Key {
    // Looked up only in the binding's namespace (as upstream).
    (
        binding.namespace().unwrap_or_default(),
        binding.spec.azure_identity.clone(),
    )
}

/// The embedded copy drops managedFields, which only inflate the AAI.
fn embed<K: Clone + kube::Resource>(obj: &K) -> Box<K> {
    let mut copy = obj.clone();
    copy.meta_mut().managed_fields = None;
    Box::new(copy)
}

/// An AAI the plan writes, as the index's objects it is made of: built
/// whole ([`PlannedAai::aai`]) only when it is written, so that a cycle
/// creating thousands of AAIs does not hold them all at once.
#[derive(Clone, Debug)]
pub struct PlannedAai {
    /// Its namespace and name.
    pub key: Key,
    pod: Arc<PodInfo>,
    identity: Arc<AzureIdentity>,
    binding: Arc<AzureIdentityBinding>,
    /// Recorded on the AAI when federated ([`recorded_token_source`]).
    source: TokenSource,
    /// The existing AAI's, for an update.
    resource_version: Option<String>,
}

/// Adds to an AAI's `annotations` the token-source annotation when `source`
/// is federated; none otherwise (AAIs without it, upstream's included, are
/// `imds`).
fn record_token_source(annotations: &mut Option<BTreeMap<String, String>>, source: TokenSource) {
    if source == TokenSource::Federated {
        annotations.get_or_insert_default().insert(
            ANNOTATION_TOKEN_SOURCE.to_string(),
            source.as_str().to_string(),
        );
    }
}

/// The token source MIC decided for an existing AAI, from its own
/// token-source annotation: `federated` only for that exact value, `imds`
/// otherwise (AAIs written by upstream or before the annotation existed).
/// An `imds` AAI may hold its identity on the node's VMSS/VM; a `federated`
/// one never does.
pub fn recorded_token_source(aai: &AssignedInfo) -> TokenSource {
    match aai
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_TOKEN_SOURCE))
    {
        Some(v) if v == TokenSource::Federated.as_str() => TokenSource::Federated,
        _ => TokenSource::Imds,
    }
}

impl PlannedAai {
    /// The AAI to write: status Created, MIC's finalizer, the node label.
    pub fn aai(&self) -> AzureAssignedIdentity {
        let (namespace, name) = &self.key;
        let mut aai = AzureAssignedIdentity::new(
            name,
            AzureAssignedIdentitySpec {
                azure_identity_ref: Some(embed(&*self.identity)),
                azure_binding_ref: Some(embed(&*self.binding)),
                pod: self.pod.name.clone(),
                pod_namespace: self.pod.namespace.clone(),
                node_name: self.pod.node.clone(),
                replicas: None,
            },
        );
        aai.metadata.namespace = Some(namespace.clone());
        aai.metadata.resource_version = self.resource_version.clone();
        // The derived `new` puts the CRD's own `api-approved` annotation on
        // every object; an AAI carries only what MIC means (as upstream's:
        // none but the token source's).
        aai.metadata.annotations = None;
        record_token_source(&mut aai.metadata.annotations, self.source);
        aai.metadata.labels = Some([(LABEL_NODENAME.to_string(), self.pod.node.clone())].into());
        aai.metadata.finalizers = Some(vec![ASSIGNED_IDENTITY_FINALIZER.to_string()]);
        aai.status = Some(AzureAssignedIdentityStatus {
            status: AssignedIdentityState::Created.as_str().into(),
            available_replicas: 1,
        });
        aai
    }
}

impl PlannedAai {
    /// What the index would keep of this AAI once written, the apiserver
    /// having given it `uid` and `resource_version`: the executor keeps
    /// this much of each AAI it writes, rather than the apiserver's answer.
    pub fn kept(&self, uid: Option<String>, resource_version: Option<String>) -> AssignedInfo {
        let (namespace, name) = &self.key;
        // The annotations the AAI is made with ([`PlannedAai::aai`]).
        let mut annotations = None;
        record_token_source(&mut annotations, self.source);
        AssignedInfo {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                uid,
                resource_version,
                finalizers: Some(vec![ASSIGNED_IDENTITY_FINALIZER.to_string()]),
                annotations,
                ..Default::default()
            },
            spec: AssignedSpec {
                identity: Some(Arc::clone(&self.identity)),
                binding: Some(Arc::clone(&self.binding)),
                pod: self.pod.name.clone(),
                pod_namespace: self.pod.namespace.clone(),
                node_name: self.pod.node.clone(),
                replicas: None,
            },
            status: Some(AzureAssignedIdentityStatus {
                status: AssignedIdentityState::Created.as_str().into(),
                available_replicas: 1,
            }),
        }
    }
}

/// A desired AAI, by reference into the index, with its token source and
/// the identity ID it needs on the node's VMSS/VM, if any (type 0, `imds`).
struct Desired<'a> {
    pod: &'a Arc<PodInfo>,
    identity: &'a Arc<AzureIdentity>,
    binding: &'a Arc<AzureIdentityBinding>,
    resource: &'a ResourceRef,
    source: TokenSource,
    identity_id: Option<String>,
}

impl Desired<'_> {
    /// The AAI `key` to write; `resource_version` that of the AAI it updates.
    fn planned(&self, key: &Key, resource_version: Option<String>) -> PlannedAai {
        PlannedAai {
            key: key.clone(),
            pod: Arc::clone(self.pod),
            identity: Arc::clone(self.identity),
            binding: Arc::clone(self.binding),
            source: self.source,
            resource_version,
        }
    }

    /// What [`same_assignment`] compares, without building the AAI.
    fn assignment(&self) -> Assignment<'_> {
        Assignment {
            pod: &self.pod.name,
            pod_namespace: &self.pod.namespace,
            node_name: &self.pod.node,
            identity: Some(self.identity),
            binding: Some(self.binding),
        }
    }

    /// Whether `existing` already makes this assignment, from the same
    /// token source.
    fn made_by(&self, existing: &AssignedInfo) -> bool {
        recorded_token_source(existing) == self.source
            && Assignment::of_kept(&existing.spec).same(&self.assignment())
    }
}

fn desired_set<'a>(
    index: &'a Index,
    opts: &Options,
    warnings: &mut Vec<Warning>,
) -> BTreeMap<Key, Desired<'a>> {
    let mut by_selector: BTreeMap<&str, Vec<(&Key, &Arc<AzureIdentityBinding>)>> = BTreeMap::new();
    // BTreeMap order = sorted by (namespace, name), as upstream sorts matches.
    for (k, b) in &index.bindings {
        by_selector
            .entry(b.spec.selector.as_str())
            .or_default()
            .push((k, b));
    }
    let mut reported: BTreeSet<Key> = BTreeSet::new();
    let mut not_granted: BTreeSet<(String, Key)> = BTreeSet::new();
    let mut out: BTreeMap<Key, Desired> = BTreeMap::new();
    for pod in index.pods.values() {
        if pod.binding_label.is_empty() || pod.node.is_empty() {
            continue;
        }
        if pod.is_completed() && !opts.keep_completed_pod_identities {
            continue;
        }
        // A node not (yet) in the cache: wait for it (upstream drops the creates for the cycle).
        let Some(node) = index.nodes.get(&pod.node) else {
            continue;
        };
        let pod_key = (pod.namespace.clone(), pod.name.clone());
        for (bkey, binding) in by_selector
            .get(pod.binding_label.as_str())
            .into_iter()
            .flatten()
        {
            let ikey = identity_key(binding);
            let Some(identity) = index.identities.get(&ikey) else {
                if reported.insert((*bkey).clone()) {
                    warnings.push(Warning::IdentityNotFound {
                        binding: (*bkey).clone(),
                        identity: ikey,
                    });
                }
                continue;
            };
            // A value naming no source: the identity is used by nobody,
            // never by the default source in its place.
            let source = match token_source(identity, opts.default_token_source) {
                Ok(source) => source,
                Err(error) => {
                    if reported.insert(ikey.clone()) {
                        warnings.push(Warning::UnknownTokenSource {
                            identity: ikey.clone(),
                            error,
                        });
                    }
                    continue;
                }
            };
            let identity_id = match identity.spec.r#type {
                IdentityType::UserAssignedMsi => {
                    if !is_valid_identity_id(&identity.spec.resource_id) {
                        if reported.insert(ikey.clone()) {
                            warnings.push(Warning::InvalidResourceId {
                                identity: ikey.clone(),
                                resource_id: identity.spec.resource_id.clone(),
                            });
                        }
                        continue;
                    }
                    // The identity must be granted to its own namespace and,
                    // when a binding reaches across namespaces (upstream's
                    // default mode), to the pod's namespace as well: a pod
                    // uses only identities granted where it runs.
                    let ungranted = if opts.policy == PolicyMode::Off {
                        None
                    } else {
                        [ikey.0.as_str(), pod.namespace.as_str()]
                            .into_iter()
                            .find(|ns| {
                                !identity_granted(
                                    index.namespaces.get(*ns).map(String::as_str),
                                    &identity.spec.resource_id,
                                )
                            })
                    };
                    if let Some(ns) = ungranted {
                        let enforced = opts.policy == PolicyMode::Enforce;
                        if not_granted.insert((ns.to_string(), ikey.clone())) {
                            warnings.push(Warning::IdentityNotGranted {
                                identity: ikey.clone(),
                                namespace: ns.to_string(),
                                resource_id: identity.spec.resource_id.clone(),
                                enforced,
                            });
                        }
                        if enforced {
                            continue;
                        }
                    }
                    // A federated identity is never written to ARM; its
                    // resource ID still names it to the identity policy.
                    (source == TokenSource::Imds).then(|| normalize_id(&identity.spec.resource_id))
                }
                IdentityType::ServicePrincipal | IdentityType::ServicePrincipalCertificate => None,
                IdentityType::Unknown(value) => {
                    if reported.insert(ikey.clone()) {
                        warnings.push(Warning::UnknownIdentityType {
                            identity: ikey.clone(),
                            value,
                        });
                    }
                    continue;
                }
            };
            let namespaced = is_namespaced(identity, opts.force_namespaced);
            if namespaced && !(ikey.0 == bkey.0 && bkey.0 == pod.namespace) {
                warnings.push(Warning::NamespaceMismatch {
                    binding: (*bkey).clone(),
                    pod: pod_key.clone(),
                });
                continue;
            }
            let name = assigned_identity_name(&pod.name, &pod.namespace, &ikey.1);
            let namespace = if namespaced {
                ikey.0.clone()
            } else {
                DEFAULT_AAI_NAMESPACE.to_string()
            };
            let key = (namespace, name);
            if out.contains_key(&key) {
                warnings.push(Warning::DuplicateAssignedIdentity {
                    name: key,
                    binding: (*bkey).clone(),
                });
                continue;
            }
            out.insert(
                key,
                Desired {
                    pod,
                    identity,
                    binding,
                    resource: &node.resource,
                    source,
                    identity_id,
                },
            );
        }
    }
    out
}

/// Namespace, name and UID of an embedded object.
type Identifiers<'a> = (Option<&'a str>, Option<&'a str>, Option<&'a str>);

fn ns_name<K: kube::Resource>(obj: Option<&K>) -> Option<Identifiers<'_>> {
    obj.map(|o| {
        (
            o.meta().namespace.as_deref(),
            o.meta().name.as_deref(),
            o.meta().uid.as_deref(),
        )
    })
}

/// What makes an assignment, borrowed from an AAI's spec or from the
/// index's objects a desired AAI is made of.
struct Assignment<'a> {
    pod: &'a str,
    pod_namespace: &'a str,
    node_name: &'a str,
    identity: Option<&'a AzureIdentity>,
    binding: Option<&'a AzureIdentityBinding>,
}

impl<'a> Assignment<'a> {
    fn of(spec: &'a AzureAssignedIdentitySpec) -> Self {
        Assignment {
            pod: &spec.pod,
            pod_namespace: &spec.pod_namespace,
            node_name: &spec.node_name,
            identity: spec.azure_identity_ref.as_deref(),
            binding: spec.azure_binding_ref.as_deref(),
        }
    }

    fn of_kept(spec: &'a AssignedSpec) -> Self {
        Assignment {
            pod: &spec.pod,
            pod_namespace: &spec.pod_namespace,
            node_name: &spec.node_name,
            identity: spec.identity.as_deref(),
            binding: spec.binding.as_deref(),
        }
    }

    /// See [`same_assignment`].
    fn same(&self, other: &Assignment<'_>) -> bool {
        self.pod == other.pod
            && self.pod_namespace == other.pod_namespace
            && self.node_name == other.node_name
            && ns_name(self.identity) == ns_name(other.identity)
            && ns_name(self.binding) == ns_name(other.binding)
            && self.identity.map(|i| i.spec.canonical())
                == other.identity.map(|i| i.spec.canonical())
            && self.binding.map(|b| &b.spec) == other.binding.map(|b| &b.spec)
    }
}

/// Same assignment: same pod, node, identity and binding (by name, UID and
/// spec, never resourceVersion, so metadata edits cause no churn;
/// docs/upstream-behaviour.md#h5-metadata-edits-cause-token-gaps).
/// The UID matters: nmi accepts an AAI only while the objects it embeds are
/// the live ones, so an identity or binding deleted and made again under the
/// same name must be embedded anew.
/// Identity specs are compared in their canonical form
/// ([`AzureIdentitySpec::canonical`](aadpodid_api::AzureIdentitySpec::canonical)):
/// upstream's Go MIC embeds an unset `clientPassword` as `{}`, and taking
/// over its AAIs must not see each of them as changed (which would send
/// every one back through `Created`: a token gap for every running pod).
/// Fields Go's types do not have (the embedded `spec.metadata` Go writes is
/// not read into these types) cannot differ.
pub fn same_assignment(a: &AzureAssignedIdentitySpec, b: &AzureAssignedIdentitySpec) -> bool {
    Assignment::of(a).same(&Assignment::of(b))
}

/// Type-0 identity ID (lower-cased) of an AAI's embedded identity, when
/// the AAI is `imds` ([`recorded_token_source`]): the identity the AAI may
/// hold on its node's VMSS/VM.
pub fn assigned_identity_id(aai: &AssignedInfo) -> Option<String> {
    if recorded_token_source(aai) != TokenSource::Imds {
        return None;
    }
    let id = aai.spec.identity.as_ref()?;
    (id.spec.r#type == IdentityType::UserAssignedMsi && is_valid_identity_id(&id.spec.resource_id))
        .then(|| normalize_id(&id.spec.resource_id))
}

/// The AzureIdentity client ID embedded in an AAI, as typed.
pub fn assigned_client_id(aai: &AssignedInfo) -> String {
    aai.spec
        .identity
        .as_ref()
        .map(|i| i.spec.client_id.clone())
        .unwrap_or_default()
}

/// Computes the cycle's work. Pure.
pub fn plan(index: &Index, opts: &Options) -> Plan {
    let mut p = Plan::default();
    let desired = desired_set(index, opts, &mut p.warnings);

    // Identities in use per resource: nothing desired there may lose them
    // (compares namespace and name of the pod, unlike upstream:
    // docs/upstream-behaviour.md#h2-in-use-check-ignores-namespaces).
    let in_use: BTreeSet<(ResourceRef, String)> = desired
        .values()
        .filter_map(|d| d.identity_id.clone().map(|id| (d.resource.clone(), id)))
        .collect();

    // Existing AAIs that leave: removed from ARM first when they held an
    // identity nobody else needs there.
    // Unlike upstream, a `Created` AAI is retired like an Assigned one: its
    // status may lag what happened on ARM (MIC's own `Assigned` write not yet
    // seen through the watch, say after an apiserver restart, or a leader
    // killed between its PATCH and the status write), and deleting it without
    // a removal would orphan the identity on the VMSS/VM. The removal costs a
    // GET at most: an identity that is not there is not sent (so the system
    // identity is never stripped: docs/upstream-behaviour.md#h1-system-identity-stripped).
    // The identity an existing AAI holds on its node's resource, when it may
    // come off: nothing desired uses it there and it is not immutable.
    let removable = |aai: &AssignedInfo| -> Option<(ResourceRef, String)> {
        let id = assigned_identity_id(aai)?;
        let resource = index.nodes.get(&aai.spec.node_name)?.resource.clone();
        (!in_use.contains(&(resource.clone(), id.clone()))
            && !opts
                .immutable_client_ids
                .contains(&assigned_client_id(aai).to_lowercase()))
        .then_some((resource, id))
    };
    let retire = |key: &Key, aai: &AssignedInfo, p: &mut Plan| match removable(aai) {
        Some((resource, id)) => {
            let w = p.resources.entry(resource).or_default();
            w.remove.insert(id.clone());
            w.delete_on_success.push((key.clone(), id));
        }
        None => p.delete_now.push(key.clone()),
    };

    for (key, aai) in &index.assigned {
        let terminating = aai.metadata.deletion_timestamp.is_some();
        match desired.get(key) {
            Some(d) if !terminating && d.made_by(aai) => {
                if aai.state() == Some(AssignedIdentityState::Created) {
                    p.assign(key, d);
                }
            }
            Some(d) if !terminating => {
                // Edited identity/binding or moved pod: take the old assignment
                // away (unless still used) and make the new one.
                if let Some((resource, id)) = removable(aai) {
                    p.resources.entry(resource).or_default().remove.insert(id);
                }
                p.update
                    .push(d.planned(key, aai.metadata.resource_version.clone()));
                p.assign(key, d);
            }
            _ => retire(key, aai, &mut p),
        }
    }

    for (key, d) in desired {
        if index.assigned.contains_key(&key) {
            // Matched above, or terminating: recreated once it is gone.
            continue;
        }
        p.assign(&key, &d);
        p.create.push(d.planned(&key, None));
    }

    // Adds win over removes on the same resource (as upstream).
    for w in p.resources.values_mut() {
        let add = w.add.clone();
        w.remove.retain(|id| !add.contains(id));
    }
    p
}

/// Identities that Assigned AAIs say must be on each resource; the drift
/// check re-adds whatever is missing and never removes (as upstream). Only AAIs
/// still desired count: one whose pod is gone is on its way out, and its
/// identity may already be removed while the AAI is not deleted yet (the
/// apiserver may be down meanwhile); re-adding it would orphan it.
pub fn expected_assignments(
    index: &Index,
    opts: &Options,
) -> BTreeMap<ResourceRef, BTreeSet<String>> {
    let desired = desired_set(index, opts, &mut Vec::new());
    let mut out: BTreeMap<ResourceRef, BTreeSet<String>> = BTreeMap::new();
    for (key, aai) in &index.assigned {
        if aai.metadata.deletion_timestamp.is_some()
            || !matches!(aai.state(), Some(AssignedIdentityState::Assigned))
            || !desired.get(key).is_some_and(|d| d.made_by(aai))
        {
            continue;
        }
        if let (Some(id), Some(node)) = (
            assigned_identity_id(aai),
            index.nodes.get(&aai.spec.node_name),
        ) {
            out.entry(node.resource.clone()).or_default().insert(id);
        }
    }
    out
}

/// Assigned type-0 AAIs (not being deleted) per resource of their node,
/// with their identity ID: what the drift check verifies against ARM.
pub fn assigned_by_resource(index: &Index) -> BTreeMap<ResourceRef, Vec<(Key, String)>> {
    let mut out: BTreeMap<ResourceRef, Vec<(Key, String)>> = BTreeMap::new();
    for (key, aai) in &index.assigned {
        if aai.metadata.deletion_timestamp.is_some()
            || aai.state() != Some(AssignedIdentityState::Assigned)
        {
            continue;
        }
        if let (Some(id), Some(node)) = (
            assigned_identity_id(aai),
            index.nodes.get(&aai.spec.node_name),
        ) {
            out.entry(node.resource.clone())
                .or_default()
                .push((key.clone(), id));
        }
    }
    out
}

/// The AAI's identity and binding, for Events.
pub fn refs(aai: &AssignedInfo) -> (Option<&AzureIdentity>, Option<&AzureIdentityBinding>) {
    (aai.spec.identity.as_deref(), aai.spec.binding.as_deref())
}

#[cfg(test)]
pub(crate) mod tests;
