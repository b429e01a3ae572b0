//! The emulated tenant: identities, scale sets, VMs, principals, operations.
//! Every map is keyed by lower-cased ARM ID; display spellings are kept beside
//! (ARM names compare ignoring case; answers keep the stored casing).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde::Serialize;

use crate::clock::VirtualTime;
use crate::config::{
    Config, FederatedCredentialSeed, IdentityAssignmentSeed, PermissionsSeed, SecretSeed,
};
use crate::draw::WriteDurations;
use crate::ids::{key, new_guid, parse_uai_id, uai_id, vm_id, vmss_id};
use crate::jwt::thumbprints;
use crate::tls::pem_to_der;

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("identity '{0}' named on {1} is not defined")]
    UnknownIdentity(String, String),
    #[error("certificate {index} of service principal '{client_id}' is not PEM")]
    BadCertificate { client_id: String, index: usize },
    #[error(
        "IMDS machine '{0}' is not a VMSS instance or VM in the seed (want vmss/<name>/<id> or vm/<name>)"
    )]
    UnknownMachine(String),
}

/// ARM rights of a principal.
#[derive(Debug, Clone, Serialize)]
pub struct Permissions {
    pub write: bool,
    /// Lower-cased UAI IDs or names; `*` for all.
    pub assign: Vec<String>,
}

impl From<&PermissionsSeed> for Permissions {
    fn from(p: &PermissionsSeed) -> Self {
        Self {
            write: p.write,
            assign: p.assign.iter().map(|s| key(s)).collect(),
        }
    }
}

impl Permissions {
    pub fn may_assign(&self, lower_id: &str) -> bool {
        let name = lower_id.rsplit('/').next().unwrap_or("");
        self.assign
            .iter()
            .any(|a| a == "*" || a == lower_id || a == name)
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Uai {
    pub id: String,
    pub name: String,
    pub resource_group: String,
    pub client_id: String,
    pub principal_id: String,
    pub federated_credentials: Vec<FederatedCredentialSeed>,
    #[serde(skip)]
    pub permissions: Permissions,
}

/// A UAI as recorded on a VM/VMSS.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Assigned {
    /// The ID as the assigning request spelled it.
    pub id: String,
    pub client_id: String,
    pub principal_id: String,
    /// Virtual time from which IMDS serves it.
    pub visible_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Kind {
    ScaleSet,
    Vm,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    pub instance_id: String,
    pub vm_id: String,
    pub computer_name: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Compute {
    pub kind: Kind,
    pub id: String,
    pub name: String,
    pub resource_group: String,
    pub location: String,
    /// Principal ID of the system-assigned identity, when there is one.
    pub system_principal_id: Option<String>,
    pub user: BTreeMap<String, Assigned>,
    pub etag: u64,
    pub deleting: bool,
    pub instances: Vec<Instance>,
    /// `vmId` of a standalone VM / `uniqueId` of a scale set.
    pub unique_id: String,
    pub sku: Option<serde_json::Value>,
    pub tags: serde_json::Value,
    /// The last write's operation.
    pub last_operation: Option<String>,
}

impl Compute {
    /// The UAI map as the identity planner sees it (lower ID -> spelling).
    pub fn user_spellings(&self) -> BTreeMap<String, String> {
        self.user
            .iter()
            .map(|(k, v)| (k.clone(), v.id.clone()))
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct Certificate {
    pub der: Vec<u8>,
    pub sha1: Vec<u8>,
    pub sha256: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct ServicePrincipal {
    pub client_id: String,
    pub object_id: String,
    pub secrets: Vec<SecretSeed>,
    pub certificates: Vec<Certificate>,
    pub federated_credentials: Vec<FederatedCredentialSeed>,
    pub permissions: Permissions,
}

/// A long-running operation.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    pub id: String,
    pub resource_key: String,
    pub start: VirtualTime,
    pub end: VirtualTime,
    /// `(code, message)` when it ends Failed.
    pub failure: Option<(String, String)>,
}

/// A long-running operation as [`State::operation_spans`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperationSpan {
    /// Lower-cased ARM ID of the VM or scale set written.
    pub resource_key: String,
    /// Virtual times of its start and end, milliseconds since the Unix epoch.
    pub start_ms: u64,
    pub end_ms: u64,
}

impl OperationSpan {
    /// How long it runs, virtual.
    pub fn duration(&self) -> Duration {
        Duration::from_millis(self.end_ms.saturating_sub(self.start_ms))
    }

    /// Whether it writes the scale set `name` (any casing).
    pub fn on_scale_set(&self, name: &str) -> bool {
        self.resource_key.ends_with(&format!(
            "/providers/microsoft.compute/virtualmachinescalesets/{}",
            name.to_ascii_lowercase()
        ))
    }

    /// Whether it writes the VM `name` (any casing).
    pub fn on_vm(&self, name: &str) -> bool {
        self.resource_key.ends_with(&format!(
            "/providers/microsoft.compute/virtualmachines/{}",
            name.to_ascii_lowercase()
        ))
    }
}

impl Operation {
    pub fn status(&self, now: VirtualTime) -> &'static str {
        if now < self.end {
            "InProgress"
        } else if self.failure.is_some() {
            "Failed"
        } else {
            "Succeeded"
        }
    }
}

/// The machine an IMDS listener stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    /// Lower-cased ID of the VM or scale set.
    pub resource_key: String,
    pub instance_id: Option<String>,
    /// `vmss/<name>/<id>` or `vm/<name>`, as used in counters and faults.
    pub label: String,
}

/// An identity an IMDS request may get a token for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineIdentity {
    /// The UAI's ARM ID; `None` for the system-assigned identity.
    pub resource_id: Option<String>,
    pub client_id: String,
    pub principal_id: String,
}

/// Who may call the AAD token endpoint as `client_id`.
#[derive(Debug, Clone)]
pub enum AadClient {
    Sp(ServicePrincipal),
    /// A UAI, through federated credentials only.
    Uai(Uai),
}

#[derive(Debug)]
pub struct State {
    pub tenant_id: String,
    pub subscription_id: String,
    pub location: String,
    pub resource_groups: BTreeMap<String, String>,
    pub uais: BTreeMap<String, Uai>,
    pub compute: BTreeMap<String, Compute>,
    pub principals: Vec<ServicePrincipal>,
    pub operations: HashMap<String, Operation>,
    /// UAIs whose assign right is revoked for every caller (fault).
    pub revoked_assign: BTreeSet<String>,
    /// Principals (object IDs) whose write right is revoked (fault).
    pub revoked_write: BTreeSet<String>,
    /// Fail the next N operations (fault).
    pub fail_next_operations: u32,
    /// How long each accepted write runs.
    pub write_durations: WriteDurations,
}

fn base36(mut n: u64) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(digits[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// AKS node name of a VMSS instance: the prefix plus a 6-character base-36
/// instance number, as AKS names scale-set nodes.
fn computer_name(vmss: &str, instance: &str) -> String {
    match instance.parse::<u64>() {
        Ok(n) => format!("{vmss}{:0>6}", base36(n)),
        Err(_) => format!("{vmss}{instance}"),
    }
}

impl State {
    /// The VM or scale set with this name, in any casing.
    pub fn compute_named(&self, name: &str) -> Option<&Compute> {
        self.compute
            .values()
            .find(|c| c.name.eq_ignore_ascii_case(name))
    }

    pub fn compute_named_mut(&mut self, name: &str) -> Option<&mut Compute> {
        self.compute
            .values_mut()
            .find(|c| c.name.eq_ignore_ascii_case(name))
    }

    /// The key (lower-cased ID) of the UAI with this name, in any casing.
    pub fn uai_key_named(&self, name: &str) -> Option<String> {
        self.uais
            .iter()
            .find(|(_, u)| u.name.eq_ignore_ascii_case(name))
            .map(|(k, _)| k.clone())
    }

    pub fn seed(cfg: &Config, now: VirtualTime) -> Result<Self, SeedError> {
        let sub = cfg.subscription_id.clone();
        let mut st = State {
            tenant_id: cfg.tenant_id.clone(),
            subscription_id: sub.clone(),
            location: cfg.location.clone(),
            resource_groups: BTreeMap::new(),
            uais: BTreeMap::new(),
            compute: BTreeMap::new(),
            principals: Vec::new(),
            operations: HashMap::new(),
            revoked_assign: BTreeSet::new(),
            revoked_write: BTreeSet::new(),
            fail_next_operations: 0,
            write_durations: WriteDurations::new(cfg.arm.write_seconds_seed),
        };
        let add_rg = |st: &mut State, rg: &str| {
            st.resource_groups
                .entry(rg.to_ascii_lowercase())
                .or_insert_with(|| rg.to_string());
        };
        for rg in &cfg.resource_groups {
            add_rg(&mut st, rg);
        }
        for i in &cfg.identities {
            add_rg(&mut st, &i.resource_group);
            let id = uai_id(&sub, &i.resource_group, &i.name);
            st.uais.insert(
                key(&id),
                Uai {
                    id,
                    name: i.name.clone(),
                    resource_group: i.resource_group.clone(),
                    client_id: i.client_id.clone().unwrap_or_else(new_guid),
                    principal_id: i.principal_id.clone().unwrap_or_else(new_guid),
                    federated_credentials: i.federated_credentials.clone(),
                    permissions: (&i.permissions).into(),
                },
            );
        }
        let now_ms = now.as_millis() as u64;
        for s in &cfg.scale_sets {
            add_rg(&mut st, &s.resource_group);
            let id = vmss_id(&sub, &s.resource_group, &s.name);
            let (system, user) = st.seed_identities(&s.identity, &id, now_ms)?;
            let instances = s
                .instances
                .iter()
                .map(|i| Instance {
                    instance_id: i.clone(),
                    vm_id: new_guid(),
                    computer_name: computer_name(&s.name, i),
                })
                .collect::<Vec<_>>();
            let capacity = instances.len();
            st.compute.insert(
                key(&id),
                Compute {
                    kind: Kind::ScaleSet,
                    id,
                    name: s.name.clone(),
                    resource_group: s.resource_group.clone(),
                    location: cfg.location.clone(),
                    system_principal_id: system,
                    user,
                    etag: 1,
                    deleting: false,
                    instances,
                    unique_id: new_guid(),
                    sku: Some(serde_json::json!({"name": "Standard_D2s_v3", "tier": "Standard", "capacity": capacity})),
                    tags: serde_json::json!({}),
                    last_operation: None,
                },
            );
        }
        for v in &cfg.virtual_machines {
            add_rg(&mut st, &v.resource_group);
            let id = vm_id(&sub, &v.resource_group, &v.name);
            let (system, user) = st.seed_identities(&v.identity, &id, now_ms)?;
            st.compute.insert(
                key(&id),
                Compute {
                    kind: Kind::Vm,
                    id,
                    name: v.name.clone(),
                    resource_group: v.resource_group.clone(),
                    location: cfg.location.clone(),
                    system_principal_id: system,
                    user,
                    etag: 1,
                    deleting: false,
                    instances: Vec::new(),
                    unique_id: new_guid(),
                    sku: None,
                    tags: serde_json::json!({}),
                    last_operation: None,
                },
            );
        }
        for sp in &cfg.service_principals {
            let mut certificates = Vec::new();
            for (index, pem) in sp.certificates.iter().enumerate() {
                let der = pem_to_der(pem).ok_or_else(|| SeedError::BadCertificate {
                    client_id: sp.client_id.clone(),
                    index,
                })?;
                let (sha1, sha256) = thumbprints(&der);
                certificates.push(Certificate { der, sha1, sha256 });
            }
            st.principals.push(ServicePrincipal {
                client_id: sp.client_id.clone(),
                object_id: sp.object_id.clone().unwrap_or_else(new_guid),
                secrets: sp.secrets.clone(),
                certificates,
                federated_credentials: sp.federated_credentials.clone(),
                permissions: (&sp.permissions).into(),
            });
        }
        Ok(st)
    }

    fn seed_identities(
        &self,
        seed: &IdentityAssignmentSeed,
        owner: &str,
        now_ms: u64,
    ) -> Result<(Option<String>, BTreeMap<String, Assigned>), SeedError> {
        let mut user = BTreeMap::new();
        for name in &seed.user_assigned {
            let uai = if parse_uai_id(name).is_some() {
                self.uais.get(&key(name))
            } else {
                self.uais
                    .values()
                    .find(|u| u.name.eq_ignore_ascii_case(name))
            }
            .ok_or_else(|| SeedError::UnknownIdentity(name.clone(), owner.to_string()))?;
            user.insert(
                key(&uai.id),
                Assigned {
                    id: uai.id.clone(),
                    client_id: uai.client_id.clone(),
                    principal_id: uai.principal_id.clone(),
                    visible_at_ms: now_ms,
                },
            );
        }
        Ok((seed.system_assigned.then(new_guid), user))
    }

    /// Resolves `vmss/<name>/<instance>` or `vm/<name>`.
    pub fn machine(&self, label: &str) -> Result<Machine, SeedError> {
        let lower = label.to_ascii_lowercase();
        let parts: Vec<&str> = lower.split('/').collect();
        let found = match parts.as_slice() {
            ["vmss", name, inst] => self
                .compute
                .values()
                .find(|c| {
                    c.kind == Kind::ScaleSet
                        && c.name.eq_ignore_ascii_case(name)
                        && c.instances
                            .iter()
                            .any(|i| i.instance_id.eq_ignore_ascii_case(inst))
                })
                .map(|c| Machine {
                    resource_key: key(&c.id),
                    instance_id: Some((*inst).to_string()),
                    label: format!("vmss/{}/{inst}", c.name),
                }),
            ["vm", name] => self
                .compute
                .values()
                .find(|c| c.kind == Kind::Vm && c.name.eq_ignore_ascii_case(name))
                .map(|c| Machine {
                    resource_key: key(&c.id),
                    instance_id: None,
                    label: format!("vm/{}", c.name),
                }),
            _ => None,
        };
        found.ok_or_else(|| SeedError::UnknownMachine(label.to_string()))
    }

    /// Identities IMDS on `machine` serves now: the system identity and the
    /// UAIs whose assignment has become visible and that still exist.
    pub fn machine_identities(&self, machine: &Machine, now: VirtualTime) -> Vec<MachineIdentity> {
        let Some(c) = self.compute.get(&machine.resource_key) else {
            return Vec::new();
        };
        let now_ms = now.as_millis() as u64;
        let mut out = Vec::new();
        if let Some(p) = &c.system_principal_id {
            // The system identity's client ID is not shown by ARM; derive a stable one.
            out.push(MachineIdentity {
                resource_id: None,
                client_id: system_client_id(p),
                principal_id: p.clone(),
            });
        }
        for (k, a) in &c.user {
            // A UAI deleted (or recreated: new principal) is "Identity not found"
            // until reassigned, as real IMDS does.
            let live = self
                .uais
                .get(k)
                .is_some_and(|u| u.principal_id == a.principal_id);
            if a.visible_at_ms <= now_ms && live {
                out.push(MachineIdentity {
                    resource_id: Some(a.id.clone()),
                    client_id: a.client_id.clone(),
                    principal_id: a.principal_id.clone(),
                });
            }
        }
        out
    }

    pub fn aad_client(&self, client_id: &str) -> Option<AadClient> {
        if let Some(sp) = self
            .principals
            .iter()
            .find(|p| p.client_id.eq_ignore_ascii_case(client_id))
        {
            return Some(AadClient::Sp(sp.clone()));
        }
        self.uais
            .values()
            .find(|u| u.client_id.eq_ignore_ascii_case(client_id))
            .cloned()
            .map(AadClient::Uai)
    }

    /// Rights of the principal with object ID `oid`; unknown principals
    /// (e.g. a system-assigned identity) get full rights.
    pub fn permissions(&self, oid: &str) -> Permissions {
        let mut p = self
            .principals
            .iter()
            .find(|p| p.object_id.eq_ignore_ascii_case(oid))
            .map(|p| p.permissions.clone())
            .or_else(|| {
                self.uais
                    .values()
                    .find(|u| u.principal_id.eq_ignore_ascii_case(oid))
                    .map(|u| u.permissions.clone())
            })
            .unwrap_or(Permissions {
                write: true,
                assign: vec!["*".into()],
            });
        if self.revoked_write.contains(&oid.to_ascii_lowercase()) {
            p.write = false;
        }
        p
    }

    pub fn provisioning_state(&self, c: &Compute, now: VirtualTime) -> &'static str {
        if c.deleting {
            return "Deleting";
        }
        match c
            .last_operation
            .as_ref()
            .and_then(|o| self.operations.get(o))
            .map(|o| o.status(now))
        {
            Some("InProgress") => "Updating",
            Some("Failed") => "Failed",
            _ => "Succeeded",
        }
    }

    /// End of the write in flight on `resource_key`, if any.
    pub fn busy_until(&self, resource_key: &str, now: VirtualTime) -> Option<VirtualTime> {
        let c = self.compute.get(resource_key)?;
        let op = self.operations.get(c.last_operation.as_ref()?)?;
        (now < op.end).then_some(op.end)
    }

    /// The operations kept (those of the last hour of virtual time at
    /// least), by start.
    pub fn operation_spans(&self) -> Vec<OperationSpan> {
        let mut v: Vec<OperationSpan> = self
            .operations
            .values()
            .map(|o| OperationSpan {
                resource_key: o.resource_key.clone(),
                start_ms: o.start.as_millis() as u64,
                end_ms: o.end.as_millis() as u64,
            })
            .collect();
        v.sort_by(|a, b| (a.start_ms, &a.resource_key).cmp(&(b.start_ms, &b.resource_key)));
        v
    }

    /// Drops finished operations older than an hour of virtual time.
    pub fn gc_operations(&mut self, now: VirtualTime) {
        let keep = Duration::from_secs(3600);
        self.operations.retain(|_, o| now < o.end + keep);
    }
}

/// The client ID IMDS reports for a system-assigned identity: derived from its
/// principal ID so it stays stable across restarts of the same seed.
pub fn system_client_id(principal_id: &str) -> String {
    let mut chars: Vec<char> = principal_id.chars().collect();
    chars.reverse();
    let s: String = chars.into_iter().filter(|c| *c != '-').collect();
    if s.len() >= 32 {
        format!(
            "{}-{}-{}-{}-{}",
            &s[0..8],
            &s[8..12],
            &s[12..16],
            &s[16..20],
            &s[20..32]
        )
    } else {
        principal_id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{IdentitySeed, ScaleSetSeed, VmSeed};

    fn cfg() -> Config {
        let mut c = Config::new("t", "s");
        c.identities.push(IdentitySeed {
            name: "app-id".into(),
            resource_group: "app-rg".into(),
            client_id: Some("c1".into()),
            principal_id: Some("p1".into()),
            federated_credentials: vec![],
            permissions: Default::default(),
        });
        c.scale_sets.push(ScaleSetSeed {
            name: "aks-np-vmss".into(),
            resource_group: "MC_rg".into(),
            instances: vec!["0".into(), "37".into()],
            identity: IdentityAssignmentSeed {
                system_assigned: true,
                user_assigned: vec!["APP-ID".into()],
            },
        });
        c.virtual_machines.push(VmSeed {
            name: "vm1".into(),
            resource_group: "MC_rg".into(),
            identity: Default::default(),
        });
        c
    }

    #[test]
    fn seed_builds_the_model_case_insensitively() {
        let st = State::seed(&cfg(), Duration::from_secs(10)).expect("seed");
        assert_eq!(
            st.resource_groups.get("mc_rg").map(String::as_str),
            Some("MC_rg")
        );
        let m = st.machine("VMSS/AKS-NP-VMSS/37").expect("machine");
        assert_eq!(m.label, "vmss/aks-np-vmss/37");
        let c = &st.compute[&m.resource_key];
        assert_eq!(c.instances[1].computer_name, "aks-np-vmss000011");
        let ids = st.machine_identities(&m, Duration::from_secs(10));
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[1].client_id, "c1");
        assert!(st.machine("vm/vm1").is_ok());
        assert!(st.machine("vm/nope").is_err());
    }

    #[test]
    fn unknown_seed_identity_is_an_error() {
        let mut c = cfg();
        c.scale_sets[0].identity.user_assigned.push("ghost".into());
        assert!(matches!(
            State::seed(&c, Duration::ZERO),
            Err(SeedError::UnknownIdentity(..))
        ));
    }

    #[test]
    fn deleted_or_recreated_identity_is_not_served() {
        let mut st = State::seed(&cfg(), Duration::from_secs(10)).expect("seed");
        let m = st.machine("vmss/aks-np-vmss/0").expect("machine");
        let k = key(&uai_id("s", "app-rg", "app-id"));
        if let Some(u) = st.uais.get_mut(&k) {
            u.principal_id = "p2".into();
        }
        assert_eq!(st.machine_identities(&m, Duration::from_secs(10)).len(), 1);
    }

    #[test]
    fn permissions_match_ids_names_and_star() {
        let p = Permissions {
            write: true,
            assign: vec![key(&uai_id("s", "rg", "a")), "b".into()],
        };
        assert!(p.may_assign(&key(&uai_id("s", "rg", "a"))));
        assert!(p.may_assign(&key(&uai_id("s", "rg2", "b"))));
        assert!(!p.may_assign(&key(&uai_id("s", "rg", "c"))));
    }
}
