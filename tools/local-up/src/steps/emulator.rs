//! Step 2: the Azure emulator (ARM compute, Entra ID, one IMDS per machine)
//! with the demo's tenant.

use std::sync::Arc;

use aadpodid_testkit::{SUB, TENANT};
use azure_emulator::Emulator;

use crate::registry::{Reg, reg};
use crate::say::{done, info, step};
use crate::tenant::{APP_RG, CLOCK_SPEED, NODE_RG, SEED002, SEED004, VM, VMSS, emulator_config};

/// Starts the emulator and registers it.
pub async fn start(registry: &Reg) -> anyhow::Result<Arc<Emulator>> {
    let t = step(
        2,
        "Azure emulator: ARM (compute), Entra ID and one IMDS per machine",
    );
    let emu = Arc::new(Emulator::start(emulator_config()).await?);
    reg(registry).emulator = Some(emu.clone());
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
    Ok(emu)
}
