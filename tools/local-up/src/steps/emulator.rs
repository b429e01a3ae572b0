//! Step 2: the Azure emulator (ARM compute, Entra ID, one IMDS per machine)
//! with the demo's tenant, and mic's configuration files (azure.json with
//! mic's service principal, the custom-cloud file that points it at the
//! emulator).

use aadpodid_testkit::tenant::MicCloud;
use aadpodid_testkit::world::WorldBuilder;
use aadpodid_testkit::{SUB, TENANT};

use crate::say::{done, info, step};
use crate::tenant::{APP_RG, CLOCK_SPEED, NODE_RG, SEED002, SEED004, VM, VMSS, demo_tenant};

/// Starts the emulator and writes mic's files.
pub async fn start(world: &mut WorldBuilder) -> anyhow::Result<()> {
    let t = step(
        2,
        "Azure emulator: ARM (compute), Entra ID and one IMDS per machine",
    );
    world.tenant(demo_tenant()).await?;
    world.host_files(&MicCloud::standard())?;
    let emu = world.emu()?;
    info(&format!("tenant {TENANT}, subscription {SUB}"));
    info(&format!(
        "scale set {VMSS} (instances 0 and 1) and VM {VM} in {NODE_RG}"
    ));
    info(&format!(
        "identities: kubelet (the cluster's own, on the scale set); {}, uai-reports, uai-dns in {APP_RG}; {} in {}",
        SEED002.name, SEED004.name, SEED004.resource_group
    ));
    info(&format!(
        "ARM {}  Entra ID {}  (a 45 s scale-set write takes {:.1} s here: the clock runs {CLOCK_SPEED}x)",
        emu.arm_url(),
        emu.aad_url(),
        45.0 / CLOCK_SPEED
    ));
    done(t);
    Ok(())
}
