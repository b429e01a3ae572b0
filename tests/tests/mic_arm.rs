//! MIC's ARM client (`mic::cloud::arm`) against the emulator over HTTPS:
//! GET and PATCH of VMSS/VM identities, Azure-AsyncOperation polling,
//! CloudError parsing, Retry-After, service-principal credentials.
//!
//! Like `mic_lifecycle.rs`, the parent test re-runs this binary with
//! `SSL_CERT_FILE` pointing at a bundle with the emulator's test CA.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::time::Duration;

use aadpodid_tests::children::ChildEnv;
use aadpodid_tests::tenant::{
    APP_RG, APP2_CLIENT, APP2_ID, CloudEnvironment, KUBELET, KUBELET_CLIENT, MIC_SECRET, MicCloud,
    NODE_RG, Tenant, uai_id as uai,
};
use anyhow::{Context as _, bail};
use azure_emulator::{Emulator, Fault, Service};
use mic::cloud::arm::{ArmCloud, ArmOptions};
use mic::cloud::config::{self, CloudConfig};
use mic::cloud::{Cloud, CloudError, ResourceRef, identity_patches};

const ENV: &str = "MICARM";
const VMSS: &str = "aks-nodepool1-12345678-vmss";
const VM: &str = "aks-standalone-vm";

aadpodid_tests::emulator_ca_parent_test!(arm_client_against_the_emulator, "MICARM", 2, 300);

fn luai(rg: &str, name: &str) -> String {
    uai(rg, name).to_lowercase()
}

/// The tenant: a scale set with one instance carrying the kubelet identity,
/// a VM with only a system identity, two app identities.
async fn emulator() -> anyhow::Result<Emulator> {
    let child = ChildEnv::get(ENV)
        .context("needs the environment arm_client_against_the_emulator sets; run that test")?;
    Tenant::standard()
        .identity(APP2_ID, APP_RG, APP2_CLIENT)
        .scale_set(VMSS, 1, &[KUBELET])
        .vm(VM, true, &[])
        .test_ca(child.test_ca())
        .start()
        .await
}

/// The cloud config MIC would build from azure.json + a custom cloud file.
fn cloud_config(emu: &Emulator, secret: &str) -> anyhow::Result<CloudConfig> {
    let env_file = CloudEnvironment::of(emu).json().to_string();
    let azure_json = MicCloud {
        client_secret: secret.into(),
        vm_type: None,
        user_assigned_identity_id: None,
        ..MicCloud::standard()
    }
    .azure_json()
    .to_string();
    let env = |k: &str| (k == config::ENV_AZURE_ENVIRONMENT_FILEPATH).then(|| "/env.json".into());
    let read = |_: &str| Ok(env_file.clone());
    Ok(config::load(
        Some(("azure.json", &azure_json)),
        &env,
        &read,
    )?)
}

fn client(emu: &Emulator, secret: &str) -> anyhow::Result<ArmCloud> {
    let options = ArmOptions {
        user_agent: "aad-pod-identity/MIC/test".into(),
        poll_interval: Duration::from_millis(100),
        ..ArmOptions::default()
    };
    Ok(ArmCloud::new(&cloud_config(emu, secret)?, options)?)
}

/// The emulator, MIC's client, the scale set and its identities now.
async fn arm_and_vmss() -> anyhow::Result<(Emulator, ArmCloud, ResourceRef)> {
    let emu = emulator().await?;
    let arm = client(&emu, MIC_SECRET)?;
    Ok((emu, arm, ResourceRef::vmss(VMSS)))
}

fn set(ids: &[String]) -> BTreeSet<String> {
    ids.iter().cloned().collect()
}

/// The error of a call that must fail.
fn failure<T: Debug, E>(r: Result<T, E>) -> anyhow::Result<E> {
    match r {
        Ok(v) => bail!("succeeded where it must fail: {v:?}"),
        Err(e) => Ok(e),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by arm_client_against_the_emulator in a child process that trusts the emulator CA"]
async fn child_get_patch_and_lro_round_trip() -> anyhow::Result<()> {
    let (emu, arm, vmss) = arm_and_vmss().await?;

    let cur = arm.get_identities(&vmss).await?;
    assert_eq!(cur.user_assigned, set(&[luai(NODE_RG, "kubelet")]));
    assert_eq!(cur.type_, "UserAssigned");
    // ARM's client ID of each identity, which MIC checks AzureIdentities against.
    assert_eq!(
        cur.client_id(&uai(NODE_RG, "kubelet")),
        Some(KUBELET_CLIENT)
    );
    assert!(cur.reported.values().all(|a| !a.principal_id.is_empty()));

    // Add two (mixed case in, lower case on the wire), through the async LRO.
    let add = set(&[uai(APP_RG, "app-id"), uai(APP_RG, "APP-2")]);
    for p in identity_patches(&cur, &add, &BTreeSet::new()) {
        arm.update_identities(&vmss, &p).await?;
    }
    let cur = arm.get_identities(&vmss).await?;
    assert_eq!(
        cur.user_assigned,
        set(&[
            luai(NODE_RG, "kubelet"),
            luai(APP_RG, "app-id"),
            luai(APP_RG, "app-2")
        ])
    );
    assert_eq!(cur.provisioning_state, "Succeeded");
    assert_eq!(cur.client_id(&uai(APP_RG, "APP-2")), Some(APP2_CLIENT));

    // Remove one; the others stay.
    let remove = set(&[luai(APP_RG, "app-2")]);
    for p in identity_patches(&cur, &BTreeSet::new(), &remove) {
        arm.update_identities(&vmss, &p).await?;
    }
    let mut on = emu.assigned_identities(VMSS).context("the scale set")?;
    on.sort();
    assert_eq!(on, vec![luai(APP_RG, "app-id"), luai(NODE_RG, "kubelet")]);

    // A VM with only a system identity: add and remove keep SystemAssigned.
    let vm = ResourceRef::vm(VM);
    let cur = arm.get_identities(&vm).await?;
    assert!(cur.has_system_assigned());
    for p in identity_patches(&cur, &set(&[luai(APP_RG, "app-id")]), &BTreeSet::new()) {
        arm.update_identities(&vm, &p).await?;
    }
    let cur = arm.get_identities(&vm).await?;
    for p in identity_patches(&cur, &BTreeSet::new(), &set(&[luai(APP_RG, "app-id")])) {
        arm.update_identities(&vm, &p).await?;
    }
    assert_eq!(emu.assigned_identities(VM), Some(vec![]));
    assert_eq!(emu.has_system_identity(VM), Some(true));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by arm_client_against_the_emulator in a child process that trusts the emulator CA"]
async fn child_arm_errors_are_typed() -> anyhow::Result<()> {
    let (emu, arm, vmss) = arm_and_vmss().await?;
    let cur = arm.get_identities(&vmss).await?;

    // An identity that does not exist: FailedIdentityOperation naming it.
    let ghost = uai(APP_RG, "ghost");
    let p = identity_patches(&cur, &set(std::slice::from_ref(&ghost)), &BTreeSet::new());
    let err = failure(arm.update_identities(&vmss, &p[0]).await)?;
    let CloudError::UpdateIdentities { resource, source } = &err else {
        bail!("{err:?}")
    };
    assert_eq!(resource, &vmss);
    assert_eq!(source.status, Some(400));
    assert!(source.is_identity_failure(), "{source:?}");
    assert_eq!(source.named_identity_ids(), set(&[ghost.to_lowercase()]));

    // Missing resource.
    let err = failure(arm.get_identities(&ResourceRef::vmss("no-such-vmss")).await)?;
    let arm_err = err.arm().context("an ARM error")?;
    assert_eq!(
        (arm_err.status, arm_err.code.as_str()),
        (Some(404), "ResourceNotFound")
    );

    // Throttled: no retry inside the client; the Retry-After is handed back.
    emu.inject(
        Fault::status(Service::Arm, 429, Some(7))
            .method("GET")
            .times(1),
    );
    let err = failure(arm.get_identities(&vmss).await)?;
    assert_eq!(err.arm().context("an ARM error")?.status, Some(429));
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
    assert!(arm.get_identities(&vmss).await.is_ok());

    // A long-running operation that ends Failed.
    emu.fail_next_operations(1);
    let p = identity_patches(&cur, &set(&[uai(APP_RG, "app-id")]), &BTreeSet::new());
    let err = failure(arm.update_identities(&vmss, &p[0]).await)?;
    assert!(
        matches!(err, CloudError::UpdateIdentities { .. }),
        "{err:?}"
    );

    // Wrong secret: the credential fails and nothing is sent to ARM.
    let bad = client(&emu, "wrong")?;
    let err = failure(bad.get_identities(&vmss).await)?;
    assert!(format!("{err}").contains("AADSTS7000215"), "{err}");
    Ok(())
}
