//! The identity objects tests write, and AzureAssignedIdentities written as
//! mic writes them, for tests that run nmi without mic: nmi accepts an
//! AzureAssignedIdentity only when it embeds the live AzureIdentity and
//! AzureIdentityBinding (same UIDs and specs) and sits where mic writes it.

use aadpodid_api::{
    AzureAssignedIdentity, AzureAssignedIdentitySpec, AzureAssignedIdentityStatus, AzureIdentity,
    AzureIdentityBinding, AzureIdentityBindingSpec, AzureIdentitySpec,
};
use kube::ResourceExt as _;
use kube::api::{Api, PostParams};

use crate::nmi_node::SUBSCRIPTION;

/// `obj` placed in namespace `ns`.
pub fn in_namespace<K: kube::Resource>(mut obj: K, ns: &str) -> K {
    obj.meta_mut().namespace = Some(ns.into());
    obj
}

/// The ARM resource ID of the user-assigned identity `name` in the
/// emulator's subscription and resource group `rg`.
pub fn user_assigned_id(name: &str) -> String {
    format!(
        "/subscriptions/{SUBSCRIPTION}/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

/// A user-assigned AzureIdentity `name` in `ns` for `client_id` (resource
/// ID [`user_assigned_id`]).
pub fn identity(ns: &str, name: &str, client_id: &str) -> AzureIdentity {
    let spec = AzureIdentitySpec {
        client_id: client_id.into(),
        resource_id: user_assigned_id(name),
        ..Default::default()
    };
    in_namespace(AzureIdentity::new(name, spec), ns)
}

/// An AzureIdentityBinding `name` in `ns` selecting `selector` for the
/// AzureIdentity `identity`.
pub fn binding(ns: &str, name: &str, identity: &str, selector: &str) -> AzureIdentityBinding {
    let spec = AzureIdentityBindingSpec {
        azure_identity: identity.into(),
        selector: selector.into(),
        ..Default::default()
    };
    in_namespace(AzureIdentityBinding::new(name, spec), ns)
}

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
    if let Some(existing) = api.get_opt(&obj.name_any()).await? {
        return Ok(existing);
    }
    Ok(api.create(&PostParams::default(), obj).await?)
}

/// What mic writes when it binds pod `pod` (of `pod_ns`, on `node`) to an
/// identity through a binding selecting `selector`: see [`Assignment::build`].
#[derive(Clone, Debug)]
pub struct Assignment<'a> {
    /// The pod's namespace.
    pub pod_ns: &'a str,
    /// The pod's node.
    pub node: &'a str,
    /// The pod's name.
    pub pod: &'a str,
    /// The identity (its namespace is the binding's).
    pub identity: &'a AzureIdentity,
    /// The binding's selector.
    pub selector: &'a str,
    /// In the identity's namespace (where mic writes it in namespaced mode)
    /// instead of `default`.
    pub namespaced: bool,
    /// The status (`Assigned` unless changed).
    pub status: &'a str,
}

impl<'a> Assignment<'a> {
    /// Pod `pod` of `pod_ns` on `node`, bound to `identity` through a binding
    /// selecting `selector`: Assigned, in `default`.
    pub fn new(
        pod_ns: &'a str,
        node: &'a str,
        pod: &'a str,
        identity: &'a AzureIdentity,
        selector: &'a str,
    ) -> Self {
        Assignment {
            pod_ns,
            node,
            pod,
            identity,
            selector,
            namespaced: false,
            status: "Assigned",
        }
    }

    /// The same with status `status` (for example `Created`).
    pub fn status(mut self, status: &'a str) -> Self {
        self.status = status;
        self
    }

    /// The same in the identity's namespace (mic's namespaced mode).
    pub fn namespaced(mut self) -> Self {
        self.namespaced = true;
        self
    }

    /// Creates the AzureIdentity and a binding `<identity>-<selector>` in
    /// the identity's namespace (unless they exist), and returns the
    /// AzureAssignedIdentity embedding both with their UIDs, not yet
    /// created, so that a test can change it first.
    pub async fn build(self, client: &kube::Client) -> anyhow::Result<AzureAssignedIdentity> {
        let id_ns = self.identity.namespace().unwrap_or_default();
        let id_name = self.identity.name_any();
        let live_id = get_or_create(client, &id_ns, self.identity).await?;
        let wanted = binding(
            &id_ns,
            &format!("{id_name}-{}", self.selector),
            &id_name,
            self.selector,
        );
        let live_binding = get_or_create(client, &id_ns, &wanted).await?;
        let spec = AzureAssignedIdentitySpec {
            azure_identity_ref: Some(Box::new(live_id)),
            azure_binding_ref: Some(Box::new(live_binding)),
            pod: self.pod.into(),
            pod_namespace: self.pod_ns.into(),
            node_name: self.node.into(),
            replicas: None,
        };
        let name = aadpodid_api::assigned_identity_name(self.pod, self.pod_ns, &id_name);
        let aai_ns = if self.namespaced { &id_ns } else { "default" };
        let mut aai = in_namespace(AzureAssignedIdentity::new(&name, spec), aai_ns);
        aai.metadata.labels = Some(
            [(
                aadpodid_api::LABEL_NODENAME.to_string(),
                self.node.to_string(),
            )]
            .into(),
        );
        aai.status = Some(AzureAssignedIdentityStatus {
            status: self.status.into(),
            ..Default::default()
        });
        Ok(aai)
    }

    /// [`Assignment::build`], created; returns the AzureAssignedIdentity's
    /// (namespace, name).
    pub async fn create(self, client: &kube::Client) -> anyhow::Result<(String, String)> {
        create_aai(client, &self.build(client).await?).await
    }
}

/// Creates `aai` in its namespace; returns (namespace, name).
pub async fn create_aai(
    client: &kube::Client,
    aai: &AzureAssignedIdentity,
) -> anyhow::Result<(String, String)> {
    let ns = aai.namespace().unwrap_or_default();
    let created = Api::<AzureAssignedIdentity>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), aai)
        .await?;
    Ok((ns, created.name_any()))
}
