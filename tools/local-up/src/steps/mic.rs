//! Step 4: two mic replicas (this binary in the mic role, started with
//! mic's plain flags) with leader election, each in a network namespace of
//! its own.

use aadpodid_testkit::world::WorldBuilder;

use crate::say::{done, info, step};

/// The Lease mic's leader holds (mic's default name, in the namespace given).
const LEASE: (&str, &str) = ("default", "aad-pod-identity-mic");

/// Starts the replicas and waits for one to hold the Lease.
pub async fn start(world: &mut WorldBuilder) -> anyhow::Result<()> {
    let t = step(4, "mic: 2 replicas (processes) with leader election");
    world.mic(2).await?;
    let leader = world.start_mics().await?;
    for m in &world.mics {
        info(&format!(
            "{}: pid {}, netns {}, probe {}",
            m.proc.name,
            m.proc.pid().unwrap_or_default(),
            m.net.name(),
            m.proc.probe_url()
        ));
    }
    info(&format!(
        "leader: {leader} (Lease {}/{}); the other replica stands by",
        LEASE.0, LEASE.1
    ));
    done(t);
    Ok(())
}
