//! Federated identities in the world: the emulator's Entra ID trusting the
//! cluster's own ServiceAccount issuer (read from the apiserver's discovery
//! document and JWKS, as Entra reads a real cluster's), AzureIdentities
//! annotated `aadpodidentity.k8s.io/token-source: federated`, federated
//! credentials on the emulator's identities, ServiceAccounts and pods that
//! run as them.

use std::collections::BTreeMap;

use aadpodid_api::{
    ANNOTATION_TOKEN_SOURCE, AssignedIdentityState, AzureAssignedIdentity,
    AzureAssignedIdentitySpec, AzureAssignedIdentityStatus, AzureIdentity, AzureIdentityBinding,
    AzureIdentitySpec, FEDERATED_TOKEN_AUDIENCE,
};
use anyhow::{Context as _, bail};
use azure_emulator::{Emulator, FederatedCredentialSeed};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

use super::pods::{app_pod, create_identity_and_binding};
use super::{PodRef, World, id_client, id_name, id_resource};
use crate::Cluster;

/// The cluster's ServiceAccount issuer as Entra ID sees it.
#[derive(Clone, Debug)]
pub struct ClusterIssuer {
    /// The discovery document's `issuer` (the `iss` of every ServiceAccount token).
    pub issuer: String,
    /// The keys served at `/openid/v1/jwks`.
    pub jwks: Value,
    /// How many of them the emulator took.
    pub keys: usize,
}

/// Makes the emulator's Entra ID trust `cluster`'s ServiceAccount issuer:
/// reads the apiserver's `/.well-known/openid-configuration` and
/// `/openid/v1/jwks` (what Entra fetches from a cluster's OIDC issuer URL;
/// here `kubectl get --raw`, as an administrator) and gives the keys to
/// `emu` for that issuer. Needs a multi-threaded Tokio runtime (kubectl runs
/// in place).
pub async fn trust_cluster_issuer(
    cluster: &Cluster,
    emu: &Emulator,
) -> anyhow::Result<ClusterIssuer> {
    let get = |path: &'static str| {
        let out =
            tokio::task::block_in_place(|| cluster.kubectl_run(&["get", "--raw", path], None))?;
        if !out.success {
            bail!("kubectl get --raw {path}: {}", out.stderr);
        }
        serde_json::from_str::<Value>(&out.stdout)
            .with_context(|| format!("{path}: {}", out.stdout))
    };
    let discovery = get("/.well-known/openid-configuration")?;
    let issuer = discovery["issuer"]
        .as_str()
        .with_context(|| format!("no issuer in {discovery}"))?
        .to_string();
    let jwks = get("/openid/v1/jwks")?;
    let keys = emu
        .set_issuer_jwks(&issuer, &jwks)
        .map_err(|e| anyhow::anyhow!("the cluster's JWKS: {e:?}"))?;
    if keys == 0 {
        bail!("the cluster publishes no keys: {jwks}");
    }
    Ok(ClusterIssuer { issuer, jwks, keys })
}

impl World {
    /// [`trust_cluster_issuer`] for the world's cluster and emulator.
    pub async fn trust_cluster_issuer(&self) -> anyhow::Result<ClusterIssuer> {
        trust_cluster_issuer(&self.cluster, &self.emu).await
    }

    /// Creates AzureIdentity `ns/name` for the emulator's identity `j` (its
    /// client ID and resource ID) with the token source `source` (the
    /// annotation's value, `None` for no annotation), the emulator's Entra ID
    /// as `adEndpoint` and no `tenantID` (nmi then uses azure.json's), and
    /// its binding `<name>-binding` to `selector`.
    pub async fn create_identity_with_source(
        &self,
        ns: &str,
        name: &str,
        j: usize,
        source: Option<&str>,
        selector: &str,
    ) -> anyhow::Result<()> {
        let client = self.client().await?;
        let mut id = AzureIdentity::new(
            name,
            AzureIdentitySpec {
                resource_id: id_resource(&id_name(j)),
                client_id: id_client(j),
                ad_endpoint: self.emu.aad_url(),
                ..Default::default()
            },
        );
        id.metadata.namespace = Some(ns.into());
        id.metadata.annotations =
            source.map(|s| BTreeMap::from([(ANNOTATION_TOKEN_SOURCE.to_string(), s.to_string())]));
        create_identity_and_binding(&client, &id, selector).await
    }

    /// Adds to the emulator's identity `j` a federated credential trusting
    /// `issuer` for ServiceAccount `ns/sa` (audience
    /// `api://AzureADTokenExchange`), as `az identity federated-credential
    /// create` would.
    pub fn add_federated_credential(
        &self,
        j: usize,
        issuer: &str,
        ns: &str,
        sa: &str,
    ) -> anyhow::Result<()> {
        let credential = FederatedCredentialSeed {
            issuer: issuer.into(),
            subject: format!("system:serviceaccount:{ns}:{sa}"),
            audience: FEDERATED_TOKEN_AUDIENCE.into(),
        };
        if !self.emu.add_federated_credential(&id_name(j), credential) {
            bail!("the emulator has no identity {}", id_name(j));
        }
        Ok(())
    }

    /// Creates ServiceAccount `ns/name` (nothing in the world's cluster
    /// creates a namespace's ServiceAccounts).
    pub async fn create_service_account(&self, ns: &str, name: &str) -> anyhow::Result<()> {
        let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}}))?;
        Api::<ServiceAccount>::namespaced(self.client().await?, ns)
            .create(&PostParams::default(), &sa)
            .await
            .with_context(|| format!("create ServiceAccount {ns}/{name}"))?;
        Ok(())
    }

    /// Creates Pod `ns/name` running as ServiceAccount `sa` (`None`: none
    /// named, the pod runs as `default`) with `labels` on the node of pod
    /// index `i` (see [`World::create_pods`]), and runs it there.
    pub async fn create_pod_as_service_account(
        &self,
        ns: &str,
        name: &str,
        sa: Option<&str>,
        labels: &[(&str, &str)],
        i: usize,
    ) -> anyhow::Result<PodRef> {
        let (node, _, _) = self.place(i)?;
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let mut pod = app_pod(name, &labels, &self.nodes[node].name)?;
        if let Some(spec) = pod.spec.as_mut() {
            spec.service_account_name = sa.map(str::to_string);
        }
        Api::<Pod>::namespaced(self.client().await?, ns)
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("create pod {ns}/{name}"))?;
        self.run_pod(ns, name, i).await
    }

    /// A client with the credentials nmi on node `node` runs with (its
    /// `--kubeconfig`).
    pub async fn nmi_client(&self, node: usize) -> anyhow::Result<kube::Client> {
        let nmi = &self.nodes.get(node).context("no such node")?.nmi;
        let path = nmi.flag("kubeconfig").context("nmi has no --kubeconfig")?;
        crate::kubectl::client_from_kubeconfig(std::path::Path::new(path)).await
    }

    /// Asks, with `client`, for a token of ServiceAccount `pod.namespace/sa`
    /// bound to `pod` for the exchange audience, as nmi asks for it: the
    /// token, or the API server's refusal.
    pub async fn pod_token_as(
        &self,
        client: &kube::Client,
        pod: &PodRef,
        sa: &str,
    ) -> anyhow::Result<Result<String, String>> {
        let uid = Api::<Pod>::namespaced(self.client().await?, &pod.namespace)
            .get(&pod.name)
            .await?
            .metadata
            .uid
            .unwrap_or_default();
        let request: k8s_openapi::api::authentication::v1::TokenRequest =
            serde_json::from_value(json!({"spec": {
                "audiences": [FEDERATED_TOKEN_AUDIENCE],
                "expirationSeconds": 600,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod.name, "uid": uid},
            }}))?;
        let answer = Api::<ServiceAccount>::namespaced(client.clone(), &pod.namespace)
            .create_token_request(sa, &PostParams::default(), &request)
            .await;
        Ok(match answer {
            Ok(t) => Ok(t.status.map(|s| s.token).unwrap_or_default()),
            Err(e) => Err(e.to_string()),
        })
    }

    /// Writes, as an administrator, the AzureAssignedIdentity MIC writes for
    /// `pod` and AzureIdentity `ns/identity` with its binding
    /// `<identity>-binding`, already `Assigned` (for a test that keeps MIC
    /// out of the way).
    pub async fn write_assigned(
        &self,
        pod: &PodRef,
        ns: &str,
        identity: &str,
    ) -> anyhow::Result<()> {
        let client = self.client().await?;
        let mut id = Api::<AzureIdentity>::namespaced(client.clone(), ns)
            .get(identity)
            .await?;
        let mut binding = Api::<AzureIdentityBinding>::namespaced(client.clone(), ns)
            .get(&format!("{identity}-binding"))
            .await?;
        id.metadata.managed_fields = None;
        binding.metadata.managed_fields = None;
        let node = self.nodes[pod.node].name.clone();
        let mut aai = AzureAssignedIdentity::new(
            &format!("{}-{}-{identity}", pod.name, pod.namespace),
            AzureAssignedIdentitySpec {
                azure_identity_ref: Some(Box::new(id)),
                azure_binding_ref: Some(Box::new(binding)),
                pod: pod.name.clone(),
                pod_namespace: pod.namespace.clone(),
                node_name: node.clone(),
                replicas: None,
            },
        );
        aai.metadata.namespace = Some("default".into());
        aai.metadata.labels = Some(BTreeMap::from([("nodename".to_string(), node)]));
        aai.status = Some(AzureAssignedIdentityStatus {
            status: AssignedIdentityState::Assigned.as_str().into(),
            available_replicas: 1,
        });
        Api::<AzureAssignedIdentity>::namespaced(client, "default")
            .create(&PostParams::default(), &aai)
            .await
            .with_context(|| format!("write the AzureAssignedIdentity of {}", pod.name))?;
        Ok(())
    }
}
