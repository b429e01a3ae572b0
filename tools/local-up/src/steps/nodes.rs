//! Step 3: one node per emulated machine: its Node object (the providerID
//! pointing at the machine), its network namespace with the pods' namespaces,
//! the machine's IMDS at 169.254.169.254 inside it, and nmi ready to start.

use aadpodid_testkit::world::WorldBuilder;

use crate::say::{done, info, step};
use crate::tenant::machines;

/// Creates the nodes.
pub async fn create(world: &mut WorldBuilder) -> anyhow::Result<()> {
    let t = step(
        3,
        "Nodes: three Node objects whose providerIDs point at the emulated machines",
    );
    let machines = machines();
    world.nodes(&machines).await?;
    for m in &machines {
        info(&format!("{:<36} {}", m.name, m.provider_id));
    }
    done(t);
    Ok(())
}
