//! AzureAssignedIdentities written as mic writes them, for tests that run
//! nmi without mic: nmi accepts an AzureAssignedIdentity only when it embeds
//! the live AzureIdentity and AzureIdentityBinding (same UIDs and specs) and
//! sits where mic writes it.

use aadpodid_api::{
    AzureAssignedIdentity, AzureAssignedIdentitySpec, AzureAssignedIdentityStatus, AzureIdentity,
    AzureIdentityBinding, AzureIdentityBindingSpec,
};
use kube::api::{Api, PostParams};

/// Creates `obj` unless an object of its name exists; returns the stored object.
pub async fn get_or_create<K>(client: &kube::Client, ns: &str, obj: &K) -> anyhow::Result<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let api = Api::<K>::namespaced(client.clone(), ns);
    let name = obj.meta().name.clone().unwrap_or_default();
    if let Some(existing) = api.get_opt(&name).await? {
        return Ok(existing);
    }
    Ok(api.create(&PostParams::default(), obj).await?)
}

/// What mic writes for `pod` (in `pod_ns`, on `node`) with identity `id`:
/// creates the AzureIdentity and a binding `<identity>-<selector>` selecting
/// `selector` in the identity's namespace (unless they exist), and returns
/// the Assigned AzureAssignedIdentity embedding both with their UIDs, in
/// `default` (or the identity's namespace when `namespaced`), not yet
/// created, so that a test can change it first.
pub async fn mic_aai(
    client: &kube::Client,
    pod_ns: &str,
    node: &str,
    pod: &str,
    id: &AzureIdentity,
    selector: &str,
    namespaced: bool,
) -> anyhow::Result<AzureAssignedIdentity> {
    let id_ns = id.metadata.namespace.clone().unwrap_or_default();
    let id_name = id.metadata.name.clone().unwrap_or_default();
    let live_id = get_or_create(client, &id_ns, id).await?;
    let mut binding = AzureIdentityBinding::new(
        &format!("{id_name}-{selector}"),
        AzureIdentityBindingSpec {
            azure_identity: id_name.clone(),
            selector: selector.into(),
            ..Default::default()
        },
    );
    binding.metadata.namespace = Some(id_ns.clone());
    let live_binding = get_or_create(client, &id_ns, &binding).await?;
    let mut aai = AzureAssignedIdentity::new(
        &aadpodid_api::assigned_identity_name(pod, pod_ns, &id_name),
        AzureAssignedIdentitySpec {
            azure_identity_ref: Some(Box::new(live_id)),
            azure_binding_ref: Some(Box::new(live_binding)),
            pod: pod.into(),
            pod_namespace: pod_ns.into(),
            node_name: node.into(),
            replicas: None,
        },
    );
    aai.metadata.namespace = Some(if namespaced { id_ns } else { "default".into() });
    aai.metadata.labels =
        Some([(aadpodid_api::LABEL_NODENAME.to_string(), node.to_string())].into());
    aai.status = Some(AzureAssignedIdentityStatus {
        status: "Assigned".into(),
        ..Default::default()
    });
    Ok(aai)
}

/// Creates `aai` in its namespace; returns (namespace, name).
pub async fn create_aai(
    client: &kube::Client,
    aai: &AzureAssignedIdentity,
) -> anyhow::Result<(String, String)> {
    let ns = aai.metadata.namespace.clone().unwrap_or_default();
    let created = Api::<AzureAssignedIdentity>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), aai)
        .await?;
    Ok((ns, created.metadata.name.unwrap_or_default()))
}
