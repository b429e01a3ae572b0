//! Step 6: the user's manifests, applied unchanged with `kubectl apply`:
//! seed 002's AzureIdentity and binding (variables filled as its Terraform
//! does), for seed 004 the two objects `az aks pod-identity add` creates,
//! and the federated identity's objects (see [`federated`]).

use aadpodid_testkit::{Cluster, fill_template, fixture};
use anyhow::Context as _;
use azure_emulator::Emulator;

use crate::say::{done, info, step};
use crate::steps::federated::{self, Federated};
use crate::steps::kubectl_apply;
use crate::tenant::{KV_NAME, SEED002, SEED004, SEED4_NAMESPACE, SEED4_POD_IDENTITY};

/// What the emulated tenant says about the seeds' identities.
#[derive(Clone, Debug)]
pub struct Seeds {
    /// Seed 002's identity: ARM resource ID and client ID.
    pub uai_id: String,
    pub uai_client: String,
    /// Seed 004's identity: ARM resource ID and client ID.
    pub app_id: String,
    pub app_client: String,
    /// The federated identity (once applied).
    pub federated: Option<Federated>,
}

impl Seeds {
    /// Seed 002's template variables.
    pub fn vars002(&self) -> [(&str, &str); 4] {
        [
            ("UAIName", SEED002.name),
            ("UAIId", &self.uai_id),
            ("UAIClientId", &self.uai_client),
            ("KVName", KV_NAME),
        ]
    }
}

/// The objects `az aks pod-identity add --namespace NS --name NAME` creates
/// for the identity with `resource_id` and `client_id`: the namespace, the
/// AzureIdentity and its binding (selector `NAME`).
pub fn pod_identity_add(resource_id: &str, client_id: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {SEED4_NAMESPACE}\n---\napiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\nmetadata:\n  name: {SEED4_POD_IDENTITY}\n  namespace: {SEED4_NAMESPACE}\nspec:\n  type: 0\n  resourceID: {resource_id}\n  clientID: {client_id}\n---\napiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentityBinding\nmetadata:\n  name: {SEED4_POD_IDENTITY}-binding\n  namespace: {SEED4_NAMESPACE}\nspec:\n  azureIdentity: {SEED4_POD_IDENTITY}\n  selector: {SEED4_POD_IDENTITY}\n"
    )
}

/// Applies both seeds' identities and bindings, and the federated one's.
pub async fn apply(cluster: &'static Cluster, emu: &Emulator) -> anyhow::Result<Seeds> {
    let t = step(
        6,
        "The user's manifests, applied unchanged with kubectl apply",
    );
    let uai = emu
        .identity(SEED002.name)
        .context("the seed's identity is in the emulator")?;
    let app = emu
        .identity(SEED004.name)
        .context("seed 004's identity is in the emulator")?;
    let mut seeds = Seeds {
        uai_id: uai.id,
        uai_client: uai.client_id,
        app_id: app.id,
        app_client: app.client_id,
        federated: None,
    };
    info("seed 002 (a blog post; Terraform's templatefile fills the variables):");
    info(&format!(
        "  ${{UAIName}}={}  ${{UAIClientId}}={}  ${{UAIId}}=<its ARM resource ID>",
        SEED002.name, seeds.uai_client
    ));
    for file in [
        "seed002-azureidentity.yaml",
        "seed002-azureidentitybinding.yaml",
    ] {
        let manifest = fill_template(&fixture(file)?, &seeds.vars002());
        let out = kubectl_apply(cluster, "default", &manifest).await?;
        info(&format!("  tests/fixtures/{file}: {}", out.trim()));
    }
    info(&format!(
        "seed 004 (an AKS walkthrough): `az aks pod-identity add --namespace {SEED4_NAMESPACE} --name {SEED4_POD_IDENTITY}` creates these two objects:"
    ));
    let addon = pod_identity_add(&seeds.app_id, &seeds.app_client);
    for line in kubectl_apply(cluster, SEED4_NAMESPACE, &addon)
        .await?
        .lines()
    {
        info(&format!("  {line}"));
    }
    seeds.federated = Some(federated::apply(cluster, emu).await?);
    done(t);
    Ok(seeds)
}
