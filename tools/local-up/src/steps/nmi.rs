//! Step 5: one nmi per node (this binary in the nmi role), each inside the
//! node's own network namespace, where the test kit's relay carries the
//! apiserver's address and `169.254.169.254:80` to that machine's emulated
//! IMDS.

use aadpodid_testkit::netns::IMDS_ADDRESS;
use aadpodid_testkit::world::{WorldBuilder, curl_in};
use anyhow::Context as _;

use crate::say::{done, info, step};
use crate::steps::wait;

/// Starts nmi on every node, one after the other, each until it is Active.
pub async fn start(world: &mut WorldBuilder) -> anyhow::Result<()> {
    let t = step(
        5,
        "nmi: one per node, each in the node's own network namespace",
    );
    for i in 0..world.nodes.len() {
        world.start_nmi(i).await?;
        let node = world.nodes.get(i).context("node")?;
        let url = node.nmi.probe_url();
        wait(&format!("nmi on {} to be Active", node.name), || async {
            let (_, body) = curl_in(&node.net.node, &url, &[], 1).await.ok()?;
            (body == "Active").then_some(())
        })
        .await?;
        info(&format!(
            "{:<36} netns {}, IMDS {IMDS_ADDRESS} -> {}; pods' {IMDS_ADDRESS}:80 redirected to nmi",
            node.name,
            node.net.node.name(),
            node.machine
        ));
    }
    done(t);
    Ok(())
}
