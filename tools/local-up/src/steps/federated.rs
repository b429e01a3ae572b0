//! The federated identity next to the seeds' (steps 6 and 7): the emulated
//! Entra ID trusts the test apiserver's ServiceAccount issuer (its discovery
//! document and JWKS, read as Entra reads a cluster's OIDC issuer URL), the
//! identity gets a federated credential for one ServiceAccount (what `az
//! identity federated-credential create` does), and its AzureIdentity is
//! annotated `aadpodidentity.k8s.io/token-source: federated`: mic marks its
//! pod's AzureAssignedIdentity Assigned with no ARM write, and nmi exchanges
//! a token of the pod's ServiceAccount, bound to the pod, at Entra ID.

use aadpodid_api::{ANNOTATION_TOKEN_SOURCE, FEDERATED_TOKEN_AUDIENCE, TokenSource};
use aadpodid_testkit::world::{ClusterIssuer, WorldNode, trust_cluster_issuer};
use aadpodid_testkit::{Cluster, TENANT};
use anyhow::{Context as _, bail};
use azure_emulator::{Emulator, FederatedCredentialSeed};

use crate::say::info;
use crate::steps::kubectl_apply;
use crate::steps::pods::{DemoPod, place};
use crate::tenant::{FED_NAMESPACE, FED_SERVICE_ACCOUNT, FEDERATED, Resource};

/// The federated pod's name (and its binding's selector).
pub const FED_POD: &str = "web-app";

/// What the federated identity needs in the emulator: its ARM resource ID
/// and client ID, and the cluster issuer Entra ID trusts.
#[derive(Clone, Debug)]
pub struct Federated {
    pub resource_id: String,
    pub client_id: String,
    pub issuer: String,
}

/// Makes the emulated Entra ID trust the cluster's ServiceAccount issuer and
/// gives the federated identity a credential for
/// `system:serviceaccount:FED_NAMESPACE:FED_SERVICE_ACCOUNT`; returns the
/// issuer and the number of keys.
async fn trust(cluster: &'static Cluster, emu: &Emulator) -> anyhow::Result<(String, usize)> {
    let ClusterIssuer { issuer, keys, .. } = trust_cluster_issuer(cluster, emu).await?;
    let credential = FederatedCredentialSeed {
        issuer: issuer.clone(),
        subject: subject(),
        audience: FEDERATED_TOKEN_AUDIENCE.into(),
    };
    if !emu.add_federated_credential(FEDERATED.name, credential) {
        bail!("the emulator has no identity {}", FEDERATED.name);
    }
    Ok((issuer, keys))
}

/// The federated credential's subject.
pub fn subject() -> String {
    format!("system:serviceaccount:{FED_NAMESPACE}:{FED_SERVICE_ACCOUNT}")
}

/// The namespace, the ServiceAccount, the annotated AzureIdentity (with the
/// tenant and the emulated Entra ID's address `ad_endpoint`, as a cloud
/// other than Azure's public one needs) and its binding (selector
/// [`FED_POD`]).
pub fn identity_manifest(fed: &Federated, ad_endpoint: &str) -> String {
    let (ns, sa, name) = (FED_NAMESPACE, FED_SERVICE_ACCOUNT, FEDERATED.name);
    let source = TokenSource::Federated.as_str();
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {sa}\n  namespace: {ns}\n---\napiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations:\n    {ANNOTATION_TOKEN_SOURCE}: {source}\nspec:\n  type: 0\n  resourceID: {}\n  clientID: {}\n  tenantID: {TENANT}\n  adEndpoint: {ad_endpoint}\n---\napiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentityBinding\nmetadata:\n  name: {name}-binding\n  namespace: {ns}\nspec:\n  azureIdentity: {name}\n  selector: {FED_POD}\n",
        fed.resource_id, fed.client_id
    )
}

/// The federated pod: runs as [`FED_SERVICE_ACCOUNT`], labelled for the
/// binding.
pub fn pod_manifest() -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {FED_POD}\n  namespace: {FED_NAMESPACE}\n  labels:\n    aadpodidbinding: {FED_POD}\nspec:\n  serviceAccountName: {FED_SERVICE_ACCOUNT}\n  containers:\n  - name: app\n    image: mcr.microsoft.com/azure-cli\n    command: [sleep, infinity]\n"
    )
}

/// Step 6's part: Entra ID trusts the cluster's issuer, the identity's
/// federated credential, then the objects of [`identity_manifest`] applied
/// with `kubectl apply`.
pub async fn apply(cluster: &'static Cluster, emu: &Emulator) -> anyhow::Result<Federated> {
    let uai = emu
        .identity(FEDERATED.name)
        .context("the federated identity is in the emulator")?;
    let (issuer, keys) = trust(cluster, emu).await?;
    info(&format!(
        "a federated identity, {} (never written to a machine): Entra ID trusts the cluster's ServiceAccount issuer {issuer} ({keys} key(s) from its /openid/v1/jwks)",
        FEDERATED.name
    ));
    info(&format!(
        "  as `az identity federated-credential create --name {FED_SERVICE_ACCOUNT} --identity-name {} --resource-group {} --issuer {issuer} --subject {} --audiences {FEDERATED_TOKEN_AUDIENCE}` would",
        FEDERATED.name,
        FEDERATED.resource_group,
        subject()
    ));
    let fed = Federated {
        resource_id: uai.id,
        client_id: uai.client_id,
        issuer,
    };
    let manifest = identity_manifest(&fed, &emu.aad_url());
    for line in kubectl_apply(cluster, FED_NAMESPACE, &manifest)
        .await?
        .lines()
    {
        info(&format!("  {line}"));
    }
    info(&format!(
        "  (the AzureIdentity is annotated {ANNOTATION_TOKEN_SOURCE}: federated)"
    ));
    Ok(fed)
}

/// The federated pod, on the second scale-set node (its only pod
/// namespace).
pub fn demo_pod(fed: &Federated, nodes: &[WorldNode]) -> anyhow::Result<DemoPod> {
    let (node, netns, ip) = place(nodes, 1, 0)?;
    Ok(DemoPod {
        fixture: "(the federated pod)",
        manifest: pod_manifest(),
        namespace: FED_NAMESPACE,
        name: FED_POD,
        node,
        node_index: 1,
        pod_index: 0,
        netns,
        ip,
        resource: Resource::ScaleSet,
        identity: FEDERATED.name,
        client_id: fed.client_id.clone(),
        source: TokenSource::Federated,
        first_token: None,
        arm_writes: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_name_the_source_the_subject_and_the_service_account() {
        let fed = Federated {
            resource_id: "/subscriptions/s/x/uai-web".into(),
            client_id: FEDERATED.client_id.into(),
            issuer: "https://kubernetes.default.svc.cluster.local".into(),
        };
        let ids = identity_manifest(&fed, "https://127.0.0.1:1/");
        for text in [
            "aadpodidentity.k8s.io/token-source: federated",
            "kind: ServiceAccount\nmetadata:\n  name: web-app\n  namespace: web",
            "clientID: c0000000-0000-4000-8000-000000000004",
            "adEndpoint: https://127.0.0.1:1/",
            "selector: web-app",
        ] {
            assert!(ids.contains(text), "{text:?} not in {ids}");
        }
        assert!(pod_manifest().contains("serviceAccountName: web-app"));
        assert!(pod_manifest().contains("aadpodidbinding: web-app"));
        assert_eq!(subject(), "system:serviceaccount:web:web-app");
    }
}
