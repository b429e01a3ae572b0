//! The demo's emulated tenant: a scale set with two instances and a
//! standalone VM (the three nodes), the kubelet identity, the identities the
//! seed manifests name, and mic's service principal; and reading a machine's
//! identities back through ARM as an operator would.

use std::process::Stdio;

pub use aadpodid_testkit::tenant::{APP_RG, NODE_RG};
use aadpodid_testkit::tenant::{
    ARM_AUDIENCE, KUBELET, KUBELET_CLIENT, MIC_CLIENT, MIC_SECRET, Tenant,
};
use aadpodid_testkit::world::NodeSpec;
use aadpodid_testkit::{SUB, TENANT};
use anyhow::{Context as _, bail};
use azure_emulator::Emulator;
use tokio::process::Command;

/// The scale set of the first two nodes.
pub const VMSS: &str = "aks-nodepool1-12345678-vmss";
/// A standalone VM node (availability-set naming).
pub const VM: &str = "aks-agentpool-12345678-0";

/// An identity a seed document names, as the emulated tenant holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeedIdentity {
    pub name: &'static str,
    pub resource_group: &'static str,
    pub client_id: &'static str,
}

/// Seed 002 (a blog post): its manifests name the identity `${UAIName}`,
/// which its Terraform creates among the application identities.
pub const SEED002: SeedIdentity = SeedIdentity {
    name: "uai-kv",
    resource_group: APP_RG,
    client_id: "7c8e5e33-2b4a-4a36-8a3c-5d0b6e1f2a9d",
};
/// Seed 002's `${KVName}` (only the pod's CSI volume names it).
pub const KV_NAME: &str = "kv-demo";

/// Seed 004 (an AKS walkthrough): `az identity create` in
/// `${IDENTITY_RESOURCE_GROUP}`, then `az aks pod-identity add` binds it as
/// `${POD_IDENTITY_NAME}` ([`SEED4_POD_IDENTITY`]) in
/// `${POD_IDENTITY_NAMESPACE}` ([`SEED4_NAMESPACE`]).
pub const SEED004: SeedIdentity = SeedIdentity {
    name: "application-identity",
    resource_group: "myIdentityResourceGroup",
    client_id: "4e2d1c1b-6a0f-4f55-9a43-2f1f3c7b9e11",
};
pub const SEED4_POD_IDENTITY: &str = "my-pod-identity";
pub const SEED4_NAMESPACE: &str = "my-app";

/// The demo's federated identity: its AzureIdentity is annotated
/// `aadpodidentity.k8s.io/token-source: federated`, so it is never put on a
/// machine; Entra ID trusts the cluster's ServiceAccount tokens for
/// [`FED_NAMESPACE`]/[`FED_SERVICE_ACCOUNT`] instead.
pub const FEDERATED: SeedIdentity = SeedIdentity {
    name: "uai-web",
    resource_group: APP_RG,
    client_id: "c0000000-0000-4000-8000-000000000004",
};
/// Namespace of the federated identity, its ServiceAccount and its pod.
pub const FED_NAMESPACE: &str = "web";
/// The ServiceAccount the federated pod runs as (the federated credential's subject).
pub const FED_SERVICE_ACCOUNT: &str = "web-app";

/// The tenant's user-assigned identities, (name, resource group, client ID):
/// the cluster's own, the seeds', two more the demo does not use and the
/// federated one.
pub const IDENTITIES: [(&str, &str, &str); 6] = [
    (KUBELET, NODE_RG, KUBELET_CLIENT),
    (SEED002.name, SEED002.resource_group, SEED002.client_id),
    (
        "uai-reports",
        APP_RG,
        "c0000000-0000-4000-8000-000000000002",
    ),
    ("uai-dns", APP_RG, "c0000000-0000-4000-8000-000000000003"),
    (SEED004.name, SEED004.resource_group, SEED004.client_id),
    (
        FEDERATED.name,
        FEDERATED.resource_group,
        FEDERATED.client_id,
    ),
];
/// Virtual seconds per real second: a 45 s scale-set write takes 1.5 s.
pub const CLOCK_SPEED: f64 = 30.0;

/// Pod namespaces of node `i`: the seeds' pods of step 7 run on the first
/// scale-set node and on the VM, the federated pod on the second scale-set
/// node; the VM's node gets two and its pod uses the second, so the pods'
/// IPs differ as in a real cluster.
pub fn pods_on_node(i: usize) -> u8 {
    match i {
        0 | 1 => 1,
        2 => 2,
        _ => 0,
    }
}

/// The three nodes: scale-set instances 0 and 1, then the VM (its
/// providerID's resource group in lower case, as AKS writes it), each with
/// [`pods_on_node`] pod namespaces.
pub fn machines() -> Vec<NodeSpec> {
    let mut out: Vec<NodeSpec> = (0..2)
        .map(|i| NodeSpec::scale_set(NODE_RG, VMSS, i, pods_on_node(i)))
        .collect();
    out.push(NodeSpec::vm(&NODE_RG.to_lowercase(), VM, pods_on_node(2)));
    out
}

/// Where a node's identities live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    ScaleSet,
    Vm,
}

impl Resource {
    /// The machine's name in ARM.
    pub fn name(self) -> &'static str {
        match self {
            Resource::ScaleSet => VMSS,
            Resource::Vm => VM,
        }
    }

    /// Its path under `Microsoft.Compute/`.
    pub fn arm_path(self) -> String {
        match self {
            Resource::ScaleSet => format!("virtualMachineScaleSets/{VMSS}"),
            Resource::Vm => format!("virtualMachines/{VM}"),
        }
    }
}

/// The demo's tenant: the test kit's (its resource groups and mic's service
/// principal) with the machines, the identities (the kubelet identity on the
/// scale set; the seeds' and two more unused ones), seed 004's resource
/// group, the clock [`CLOCK_SPEED`] times real time.
pub fn demo_tenant() -> Tenant {
    let mut tenant = Tenant::new()
        .scale_set(VMSS, 2, &[KUBELET])
        .vm(VM, true, &[])
        .speed(CLOCK_SPEED);
    for (name, rg, client) in IDENTITIES {
        tenant = tenant.identity(name, rg, client);
    }
    tenant
        .config_mut()
        .resource_groups
        .push(SEED004.resource_group.into());
    tenant
}

/// An ARM request path without the subscription prefix and the query.
pub fn short_arm_path(uri: &str) -> String {
    let path = uri.split('?').next().unwrap_or(uri);
    let rest = path.split_once("/providers/").map_or(path, |(_, r)| r);
    format!(".../{rest}")
}

/// The names in an ARM machine's `identity.userAssignedIdentities` (none at
/// all once the last one is removed).
pub fn identity_names(machine: &serde_json::Value) -> Vec<String> {
    machine["identity"]["userAssignedIdentities"]
        .as_object()
        .map(|ids| {
            ids.keys()
                .map(|k| k.rsplit('/').next().unwrap_or(k).to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Reads a machine through ARM, as an operator would: a client-credentials
/// token from the emulated Entra ID, then `GET` on the resource. Returns the
/// names of its user-assigned identities.
pub async fn arm_identities(emu: &Emulator, resource: Resource) -> anyhow::Result<Vec<String>> {
    let ca = emu.ca_bundle_path().display().to_string();
    let token_url = format!("{}{TENANT}/oauth2/token", emu.aad_url());
    let body = curl(&[
        "--cacert",
        &ca,
        "-d",
        "grant_type=client_credentials",
        "-d",
        &format!("client_id={MIC_CLIENT}"),
        "-d",
        &format!("client_secret={MIC_SECRET}"),
        "--data-urlencode",
        &format!("resource={ARM_AUDIENCE}"),
        &token_url,
    ])
    .await?;
    let token = body["access_token"]
        .as_str()
        .with_context(|| format!("no ARM token from Entra ID: {body}"))?
        .to_string();
    let url = format!(
        "{}/subscriptions/{SUB}/resourceGroups/{NODE_RG}/providers/Microsoft.Compute/{}?api-version=2024-11-01",
        emu.arm_url(),
        resource.arm_path()
    );
    let machine = curl(&[
        "--cacert",
        &ca,
        "-H",
        &format!("Authorization: Bearer {token}"),
        &url,
    ])
    .await?;
    if machine["id"].as_str().is_none() {
        bail!("ARM GET {}: {machine}", resource.name());
    }
    Ok(identity_names(&machine))
}

/// `curl -sS` with `args` (no proxy, 10 s at most); its JSON answer.
async fn curl(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--noproxy", "*"])
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("run curl")?;
    if !out.status.success() {
        bail!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "curl printed no JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_point_at_the_emulated_machines() {
        let m = machines();
        let names: Vec<&str> = m.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "aks-nodepool1-12345678-vmss000000",
                "aks-nodepool1-12345678-vmss000001",
                "aks-agentpool-12345678-0"
            ]
        );
        assert_eq!(
            m[1].provider_id,
            format!(
                "azure:///subscriptions/{SUB}/resourceGroups/mc_rg_cluster_eastus/providers/Microsoft.Compute/virtualMachineScaleSets/{VMSS}/virtualMachines/1"
            )
        );
        assert_eq!(m[2].machine, format!("vm/{VM}"));
        assert_eq!(
            m[2].provider_id,
            format!(
                "azure:///subscriptions/{SUB}/resourceGroups/mc_rg_cluster_eastus/providers/Microsoft.Compute/virtualMachines/{VM}"
            )
        );
        let pods: Vec<u8> = m.iter().map(|m| m.pods).collect();
        assert_eq!(pods, [1, 1, 2]);
    }

    #[test]
    fn the_tenant_holds_the_seeds_identities_and_the_machines() {
        let cfg = demo_tenant().config();
        assert_eq!(
            cfg.resource_groups,
            [NODE_RG, APP_RG, SEED004.resource_group]
        );
        let names: Vec<&str> = cfg.identities.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "kubelet",
                "uai-kv",
                "uai-reports",
                "uai-dns",
                "application-identity",
                "uai-web"
            ]
        );
        assert_eq!(cfg.identities[4].resource_group, SEED004.resource_group);
        assert_eq!(cfg.scale_sets[0].instances, ["0", "1"]);
        assert_eq!(cfg.scale_sets[0].identity.user_assigned, ["kubelet"]);
        assert!(cfg.virtual_machines[0].identity.system_assigned);
        assert!(cfg.virtual_machines[0].identity.user_assigned.is_empty());
        assert_eq!(cfg.service_principals[0].client_id, MIC_CLIENT);
        assert_eq!(cfg.clock.speed, CLOCK_SPEED);
    }

    #[test]
    fn arm_paths_are_shortened_and_identities_named() {
        assert_eq!(
            short_arm_path(
                "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/v?api-version=1"
            ),
            ".../Microsoft.Compute/virtualMachines/v"
        );
        assert_eq!(
            short_arm_path("/subscriptions/s/providers/Microsoft.Compute/locations/l/operations/1"),
            ".../Microsoft.Compute/locations/l/operations/1"
        );
        let machine = serde_json::json!({"identity": {"userAssignedIdentities": {
            "/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/kubelet": {},
            "/x/uai-kv": {},
        }}});
        let mut names = identity_names(&machine);
        names.sort();
        assert_eq!(names, ["kubelet", "uai-kv"]);
        assert!(identity_names(&serde_json::json!({"identity": {}})).is_empty());
    }
}
