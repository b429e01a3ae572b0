//! Step 5: one nmi per node (this binary in the nmi role), each inside the
//! node's own network namespace, where the test kit's relay carries the
//! node's `127.0.0.1:6443` to the apiserver and `169.254.169.254:80` to that
//! machine's emulated IMDS.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use aadpodid_testkit::Cluster;
use aadpodid_testkit::netns::{IMDS_ADDRESS, Node};
use aadpodid_testkit::world::curl_in;
use anyhow::Context as _;
use azure_emulator::Emulator;

use crate::registry::{Reg, reg};
use crate::role::Role;
use crate::say::{done, info, step};
use crate::steps::{spawn_logged, wait};
use crate::tenant::Machine;

/// Port of the apiserver inside each node namespace (relayed).
const NODE_API_PORT: u16 = 6443;
/// nmi's probe port inside each node namespace.
const NMI_PROBE_PORT: u16 = 8085;

/// Pod namespaces of node `i`: the pods of step 7 run on the first scale-set
/// node (10.244.0.10) and on the VM; the VM's node gets two and its pod uses
/// the second (10.244.0.11), so the two pods' IPs differ as in a real cluster.
pub fn pods_on_node(i: usize) -> u8 {
    match i {
        0 => 1,
        2 => 2,
        _ => 0,
    }
}

/// Starts nmi on every machine's node; returns the nodes' namespaces, in
/// the order of `machines`.
pub async fn start(
    registry: &Reg,
    dir: &Path,
    cluster: &Cluster,
    emu: &Emulator,
    machines: &[Machine],
) -> anyhow::Result<Vec<Arc<Node>>> {
    let t = step(
        5,
        "nmi: one per node, each in the node's own network namespace",
    );
    let api_addr: SocketAddr = cluster
        .server()
        .trim_start_matches("https://")
        .parse()
        .context("apiserver address")?;
    let node_api: SocketAddr = ([127, 0, 0, 1], NODE_API_PORT).into();
    let node_kubeconfig = dir.join("node.kubeconfig");
    std::fs::write(
        &node_kubeconfig,
        std::fs::read_to_string(cluster.kubeconfig())?
            .replace(cluster.server(), &format!("https://{node_api}")),
    )?;
    let nmi = Role::Nmi.program()?;
    let mut homes = Vec::new();
    for (i, m) in machines.iter().enumerate() {
        let node = Arc::new(Node::with_pods(pods_on_node(i))?);
        {
            let mut r = reg(registry);
            r.netns.push(node.node.name().to_string());
            r.netns
                .extend(node.pods.iter().map(|(p, _)| p.name().to_string()));
            r.nodes.push(node.clone());
        }
        node.node.add_local_address(IMDS_ADDRESS)?;
        let imds = emu.add_imds(&m.imds, "127.0.0.1:0".parse()?).await?;
        // One folder per node: the relay names its sockets by position.
        let sockets = dir.join(format!("relay-{i}"));
        std::fs::create_dir_all(&sockets)?;
        let relay = node
            .node
            .relay_many(
                &[(node_api, api_addr), ((IMDS_ADDRESS, 80).into(), imds)],
                &sockets,
            )
            .await?;
        reg(registry)
            .children
            .push((format!("relay-{}", m.node), relay));
        let mut cmd = node.node.command(&nmi.path);
        cmd.envs(nmi.env.iter().cloned())
            .arg(format!("--node={}", m.node))
            .arg(format!("--kubeconfig={}", node_kubeconfig.display()))
            .arg(format!("--http-probe-port={NMI_PROBE_PORT}"))
            .arg("--allow-network-plugin-kubenet=true");
        spawn_logged(registry, dir, &format!("nmi-{}", m.node), &mut cmd)?;
        let url = format!("http://127.0.0.1:{NMI_PROBE_PORT}/healthz");
        wait(&format!("nmi on {} to be Active", m.node), || {
            let node = node.clone();
            let url = url.clone();
            async move {
                let (_, body) = curl_in(&node.node, &url, &[], 1).await.ok()?;
                (body == "Active").then_some(())
            }
        })
        .await?;
        info(&format!(
            "{:<36} netns {}, IMDS {IMDS_ADDRESS} -> {}; pods' {IMDS_ADDRESS}:80 redirected to nmi",
            m.node,
            node.node.name(),
            m.imds
        ));
        homes.push(node);
    }
    done(t);
    Ok(homes)
}
