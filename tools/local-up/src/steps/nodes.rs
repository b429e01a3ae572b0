//! Step 3: one Node object per emulated machine, its providerID pointing at it.

use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;

use crate::say::{done, info, step};
use crate::tenant::{Machine, machines};

/// Creates the Node objects; returns the machines they stand for.
pub async fn create(client: &Client) -> anyhow::Result<Vec<Machine>> {
    let t = step(
        3,
        "Nodes: three Node objects whose providerIDs point at the emulated machines",
    );
    let machines = machines();
    let nodes_api: Api<KubeNode> = Api::all(client.clone());
    for m in &machines {
        let node: KubeNode = serde_json::from_value(json!({
            "metadata": {"name": m.node, "labels": {"kubernetes.io/os": "linux"}},
            "spec": {"providerID": m.provider_id},
        }))?;
        nodes_api.create(&PostParams::default(), &node).await?;
        info(&format!("{:<36} {}", m.node, m.provider_id));
    }
    done(t);
    Ok(machines)
}
