//! The world's application pods: Pod objects bound to a node and run (a pod
//! network namespace's address), and the AzureAssignedIdentities mic makes for
//! them.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use aadpodid_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec,
    AzureIdentitySpec,
};
use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::{APP_NS, World, id_client, id_name, id_resource, selector};
use crate::netns::NetNs;
use crate::wait_for;

/// A pod of the world: a Pod object bound to a node, and its namespace.
#[derive(Clone, Debug)]
pub struct PodRef {
    /// Pod name.
    pub name: String,
    /// Its Kubernetes namespace ([`APP_NS`] for [`World::create_pods`]).
    pub namespace: String,
    /// Index into [`World::nodes`].
    pub node: usize,
    /// Index of its namespace among the node's pods.
    pub slot: usize,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Identity index it is bound to (label `aadpodidbinding: sel-<j>`), or
    /// `None` for the invalid identity.
    pub identity: Option<usize>,
}

/// An application Pod `name` with `labels` on node `node`.
pub(super) fn app_pod(
    name: &str,
    labels: &BTreeMap<&str, &str>,
    node: &str,
) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "app", "image": "app"}],
        },
    }))?)
}

/// What the kubelet reports for a started pod: Running, at the addresses
/// `ips` (the first is `podIP`; all are `podIPs`).
async fn mark_running(api: &Api<Pod>, name: &str, ips: &[IpAddr]) -> anyhow::Result<()> {
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({
            "status": {"phase": "Running", "podIP": ips.first().map(IpAddr::to_string), "podIPs": pod_ips}
        })),
    )
    .await?;
    Ok(())
}

/// Creates Pod `name` with `labels` on node `node` through `api`, and
/// with an address reports it Running at `ip` (as the kubelet would for a
/// started pod); without one it stays a Pod object only (mic needs no more;
/// nmi maps callers by address).
pub async fn create_pod(
    api: &Api<Pod>,
    name: &str,
    labels: &BTreeMap<&str, &str>,
    node: &str,
    ip: Option<Ipv4Addr>,
) -> anyhow::Result<()> {
    let ips: Vec<IpAddr> = ip.map(IpAddr::V4).into_iter().collect();
    create_pod_at(api, name, labels, node, &ips).await
}

/// [`create_pod`] reported Running at every address of `ips` (the first is
/// `podIP`; all are `podIPs`: dual-stack and IPv6-only pods too); with no
/// address it stays a Pod object only.
pub async fn create_pod_at(
    api: &Api<Pod>,
    name: &str,
    labels: &BTreeMap<&str, &str>,
    node: &str,
    ips: &[IpAddr],
) -> anyhow::Result<()> {
    api.create(&PostParams::default(), &app_pod(name, labels, node)?)
        .await
        .with_context(|| format!("create pod {name}"))?;
    if !ips.is_empty() {
        mark_running(api, name, ips)
            .await
            .with_context(|| format!("status of pod {name}"))?;
    }
    Ok(())
}

/// Creates identity `j`'s AzureIdentity ([`id_name`], [`id_client`], in
/// [`super::APP_RG`]) and its binding to selector [`selector`]`(j)` in
/// namespace `ns`: what the chart's `azureIdentities` makes, for a world
/// without the chart.
pub async fn create_identity(client: &Client, ns: &str, j: usize) -> anyhow::Result<()> {
    let name = id_name(j);
    let mut id = AzureIdentity::new(
        &name,
        AzureIdentitySpec {
            resource_id: id_resource(&name),
            client_id: id_client(j),
            ..Default::default()
        },
    );
    id.metadata.namespace = Some(ns.into());
    create_identity_and_binding(client, &id, &selector(j)).await
}

/// Creates AzureIdentity `id` and its binding `<name>-binding` (in its
/// namespace) to `selector`.
pub(super) async fn create_identity_and_binding(
    client: &Client,
    id: &AzureIdentity,
    selector: &str,
) -> anyhow::Result<()> {
    let ns = id.metadata.namespace.clone().unwrap_or_default();
    let name = id.metadata.name.clone().unwrap_or_default();
    Api::<AzureIdentity>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), id)
        .await
        .with_context(|| format!("create AzureIdentity {ns}/{name}"))?;
    let binding = format!("{name}-binding");
    let mut b = AzureIdentityBinding::new(
        &binding,
        AzureIdentityBindingSpec {
            azure_identity: name,
            selector: selector.into(),
            weight: 0,
        },
    );
    b.metadata.namespace = Some(ns.clone());
    Api::<AzureIdentityBinding>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &b)
        .await
        .with_context(|| format!("create AzureIdentityBinding {ns}/{binding}"))?;
    Ok(())
}

impl World {
    /// Creates `count` pods, pod `i` on node `i % nodes` in the next free pod
    /// namespace there, bound to identity `identity_of(i)` (`None`: the invalid
    /// identity's selector), Running with its podIP.
    pub async fn create_pods(
        &self,
        first: usize,
        count: usize,
        identity_of: impl Fn(usize) -> Option<usize>,
    ) -> anyhow::Result<Vec<PodRef>> {
        let api: Api<Pod> = Api::namespaced(self.client().await?, APP_NS);
        let mut out = Vec::with_capacity(count);
        for i in first..first + count {
            let (node, slot, ip) = self.place(i)?;
            let identity = identity_of(i);
            let sel = identity.map_or_else(|| "sel-invalid".to_string(), selector);
            let name = format!("app-{i}");
            let labels = BTreeMap::from([("aadpodidbinding", sel.as_str())]);
            create_pod(&api, &name, &labels, &self.nodes[node].name, Some(ip)).await?;
            out.push(PodRef {
                name,
                namespace: APP_NS.into(),
                node,
                slot,
                ip,
                identity,
            });
        }
        Ok(out)
    }

    /// Deletes pods (grace period 0, as the kubelet confirms at once).
    pub async fn delete_pods(&self, pods: &[PodRef]) -> anyhow::Result<()> {
        let client = self.client().await?;
        for p in pods {
            let api: Api<Pod> = Api::namespaced(client.clone(), &p.namespace);
            api.delete(&p.name, &DeleteParams::default().grace_period(0))
                .await?;
        }
        Ok(())
    }

    /// Node, slot and address of pod index `i` (as [`World::create_pods`]
    /// places it: node `i % nodes`, its pod namespace `i / nodes`).
    pub(super) fn place(&self, i: usize) -> anyhow::Result<(usize, usize, Ipv4Addr)> {
        let nodes = self.nodes.len().max(1);
        let (node, slot) = (i % nodes, i / nodes);
        let (_, ip) = self
            .nodes
            .get(node)
            .and_then(|n| n.net.pods.get(slot))
            .with_context(|| format!("node {node} has no pod namespace {slot}"))?;
        Ok((node, slot, *ip))
    }

    /// Creates Pod `namespace/name` with `labels` through `client` (a
    /// user's, or the admin's), on the node of pod index `i` (see
    /// [`World::create_pods`]; do not mix indexes of both), then does what
    /// the kubelet would: Running with the address of that pod namespace.
    pub async fn create_pod_as(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        i: usize,
    ) -> anyhow::Result<PodRef> {
        let (node, _, _) = self.place(i)?;
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let pod = app_pod(name, &labels, &self.nodes[node].name)?;
        Api::<Pod>::namespaced(client.clone(), namespace)
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("create pod {namespace}/{name}"))?;
        self.run_pod(namespace, name, i).await
    }

    /// What the scheduler and the kubelet do for an existing Pod (for
    /// example one applied with kubectl): bind it to the node of pod index
    /// `i` unless it names a node, and report it Running with the address of
    /// that pod namespace.
    pub async fn run_pod(&self, namespace: &str, name: &str, i: usize) -> anyhow::Result<PodRef> {
        let (node, slot, ip) = self.place(i)?;
        let api: Api<Pod> = Api::namespaced(self.client().await?, namespace);
        let pod = api.get(name).await?;
        let on = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        match on {
            Some(n) if n != self.nodes[node].name => {
                bail!("pod {namespace}/{name} is on {n}, not on node {node}")
            }
            Some(_) => {}
            None => {
                api.create_subresource::<_, Value>(
                    "binding",
                    name,
                    &PostParams::default(),
                    &json!({
                        "apiVersion": "v1", "kind": "Binding",
                        "metadata": {"name": name},
                        "target": {"apiVersion": "v1", "kind": "Node", "name": self.nodes[node].name},
                    }),
                )
                .await
                .with_context(|| format!("bind pod {namespace}/{name}"))?;
            }
        }
        mark_running(&api, name, &[IpAddr::V4(ip)]).await?;
        Ok(PodRef {
            name: name.into(),
            namespace: namespace.into(),
            node,
            slot,
            ip,
            identity: None,
        })
    }

    /// The pod's network namespace.
    pub fn pod_ns(&self, p: &PodRef) -> anyhow::Result<&NetNs> {
        self.nodes
            .get(p.node)
            .and_then(|n| n.net.pods.get(p.slot))
            .map(|(ns, _)| ns)
            .context("pod namespace")
    }

    /// Every AzureAssignedIdentity (any namespace) for pods of namespace
    /// `namespace`, and of pod `pod` when given.
    async fn assigned_in(
        &self,
        namespace: &str,
        pod: Option<&str>,
    ) -> anyhow::Result<Vec<AzureAssignedIdentity>> {
        // MIC keeps AAIs in `default` (upstream's place) unless namespaced.
        let api: Api<AzureAssignedIdentity> = Api::all(self.client().await?);
        Ok(api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|a| a.spec.pod_namespace == namespace && pod.is_none_or(|p| a.spec.pod == p))
            .collect())
    }

    /// The AzureAssignedIdentities of pods of [`APP_NS`]: (pod, identity name, status).
    pub async fn assigned(&self) -> anyhow::Result<Vec<(String, String, String)>> {
        Ok(self
            .assigned_in(APP_NS, None)
            .await?
            .into_iter()
            .map(|a| {
                let id = a.spec.azure_identity_ref.and_then(|r| r.metadata.name);
                let status = a.status.map(|s| s.status);
                (
                    a.spec.pod,
                    id.unwrap_or_default(),
                    status.unwrap_or_default(),
                )
            })
            .collect())
    }

    /// Every AzureAssignedIdentity (any namespace) for pod `namespace/pod`.
    pub async fn assigned_to(
        &self,
        namespace: &str,
        pod: &str,
    ) -> anyhow::Result<Vec<AzureAssignedIdentity>> {
        self.assigned_in(namespace, Some(pod)).await
    }

    /// Waits (bounded) until the AzureAssignedIdentities of [`APP_NS`] are
    /// exactly one `Assigned` per pod in `pods` with a valid identity (and
    /// one per pod of the invalid identity, in any other state).
    pub async fn wait_assigned(&self, pods: &[PodRef], timeout: Duration) -> anyhow::Result<()> {
        let want: BTreeMap<String, String> = pods
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    p.identity.map_or_else(|| "id-missing".into(), id_name),
                )
            })
            .collect();
        let r = wait_for("every pod's identity Assigned", timeout, || async {
            let aais = self.assigned().await.ok()?;
            if aais.len() != want.len() {
                return None;
            }
            let ok = aais.iter().all(|(pod, id, status)| {
                want.get(pod) == Some(id) && ((id == "id-missing") != (status == "Assigned"))
            });
            ok.then_some(())
        })
        .await;
        self.with_dump(r).await
    }

    /// Waits (bounded) until [`APP_NS`] has no AzureAssignedIdentity.
    pub async fn wait_no_assigned(&self, timeout: Duration) -> anyhow::Result<()> {
        let r = wait_for("no AzureAssignedIdentity left", timeout, || async {
            self.assigned().await.ok()?.is_empty().then_some(())
        })
        .await;
        self.with_dump(r).await
    }
}
