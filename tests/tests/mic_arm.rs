//! MIC's ARM client (`mic::cloud::arm`) against the emulator over HTTPS:
//! GET and PATCH of VMSS/VM identities, Azure-AsyncOperation polling,
//! CloudError parsing, Retry-After, service-principal credentials.
//!
//! Like `mic_lifecycle.rs`, the parent test re-runs this binary with
//! `SSL_CERT_FILE` pointing at a bundle with the emulator's test CA.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers outside #[test] functions fail the test by panicking"
)]

use std::collections::BTreeSet;
use std::time::Duration;

use aadpodid_tests::{SUB, TENANT, run_children_trusting_emulator_ca};
use azure_emulator::config::{
    IdentityAssignmentSeed, IdentitySeed, PermissionsSeed, ScaleSetSeed, SecretSeed,
    ServicePrincipalSeed, VmSeed,
};
use azure_emulator::{Config, Emulator, Fault, FaultAction, Service};
use mic::cloud::arm::{ArmCloud, ArmOptions};
use mic::cloud::config::{self, CloudConfig};
use mic::cloud::{Cloud, CloudError, ResourceRef, identity_patches};
use serde_json::json;

const CHILD_ENV: &str = "MICARM_CHILD";
const NODE_RG: &str = "MC_rg_cluster_eastus";
const APP_RG: &str = "app-rg";
const VMSS: &str = "aks-nodepool1-12345678-vmss";
const VM: &str = "aks-standalone-vm";
const MIC_CLIENT: &str = "5b1c2c4e-0000-4000-8000-00000000c1d1";
const MIC_SECRET: &str = "s3cr3t";

#[tokio::test]
async fn arm_client_against_the_emulator() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    run_children_trusting_emulator_ca("child_", "MICARM", 2, Duration::from_secs(300))
        .await
        .unwrap();
}

fn uai(rg: &str, name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

fn luai(rg: &str, name: &str) -> String {
    uai(rg, name).to_lowercase()
}

fn ident(name: &str, rg: &str, client: &str) -> IdentitySeed {
    IdentitySeed {
        name: name.into(),
        resource_group: rg.into(),
        client_id: Some(client.into()),
        principal_id: None,
        federated_credentials: vec![],
        permissions: PermissionsSeed::default(),
    }
}

async fn emulator() -> Option<Emulator> {
    let cert = std::env::var_os("MICARM_CA_CERT")?;
    let key = std::env::var_os("MICARM_CA_KEY")?;
    let mut cfg = Config::new(TENANT, SUB);
    cfg.resource_groups = vec![NODE_RG.into(), APP_RG.into()];
    cfg.identities = vec![
        ident("kubelet", NODE_RG, "c0000000-0000-4000-8000-00000000000k"),
        ident("app-id", APP_RG, "c0000000-0000-4000-8000-000000000001"),
        ident("app-2", APP_RG, "c0000000-0000-4000-8000-000000000002"),
    ];
    cfg.scale_sets = vec![ScaleSetSeed {
        name: VMSS.into(),
        resource_group: NODE_RG.into(),
        instances: vec!["0".into()],
        identity: IdentityAssignmentSeed {
            system_assigned: false,
            user_assigned: vec!["kubelet".into()],
        },
    }];
    cfg.virtual_machines = vec![VmSeed {
        name: VM.into(),
        resource_group: NODE_RG.into(),
        identity: IdentityAssignmentSeed {
            system_assigned: true,
            user_assigned: vec![],
        },
    }];
    cfg.service_principals = vec![ServicePrincipalSeed {
        client_id: MIC_CLIENT.into(),
        object_id: None,
        secrets: vec![SecretSeed::Plain(MIC_SECRET.into())],
        certificates: vec![],
        federated_credentials: vec![],
        permissions: PermissionsSeed::default(),
    }];
    cfg.clock.speed = 100.0;
    cfg.listen.ca_cert_pem_file = Some(cert.into());
    cfg.listen.ca_key_pem_file = Some(key.into());
    Some(Emulator::start(cfg).await.expect("emulator starts"))
}

/// The cloud config MIC would build from azure.json + a custom cloud file.
fn cloud_config(emu: &Emulator, secret: &str) -> CloudConfig {
    let env_file = json!({
        "name": "AzureStackCloud",
        "resourceManagerEndpoint": emu.arm_url(),
        "activeDirectoryEndpoint": emu.aad_url(),
        "tokenAudience": "https://management.azure.com/",
    })
    .to_string();
    let azure_json = json!({
        "cloud": "AzureStackCloud", "tenantId": TENANT, "aadClientId": MIC_CLIENT,
        "aadClientSecret": secret, "subscriptionId": SUB, "resourceGroup": NODE_RG,
    })
    .to_string();
    let env = |k: &str| (k == config::ENV_AZURE_ENVIRONMENT_FILEPATH).then(|| "/env.json".into());
    let read = |_: &str| Ok(env_file.clone());
    config::load(Some(("azure.json", &azure_json)), &env, &read).unwrap()
}

fn client(emu: &Emulator, secret: &str) -> ArmCloud {
    let options = ArmOptions {
        user_agent: "aad-pod-identity/MIC/test".into(),
        poll_interval: Duration::from_millis(100),
        ..ArmOptions::default()
    };
    ArmCloud::new(&cloud_config(emu, secret), options).unwrap()
}

fn set(ids: &[String]) -> BTreeSet<String> {
    ids.iter().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by arm_client_against_the_emulator in a child process that trusts the emulator CA"]
async fn child_get_patch_and_lro_round_trip() {
    let Some(emu) = emulator().await else {
        panic!("needs the environment arm_client_against_the_emulator sets; run that test");
    };
    let arm = client(&emu, MIC_SECRET);
    let vmss = ResourceRef::vmss(VMSS);

    let cur = arm.get_identities(&vmss).await.unwrap();
    assert_eq!(cur.user_assigned, set(&[luai(NODE_RG, "kubelet")]));
    assert_eq!(cur.type_, "UserAssigned");
    // ARM's client ID of each identity, which MIC checks AzureIdentities against.
    assert_eq!(
        cur.client_id(&uai(NODE_RG, "kubelet")),
        Some("c0000000-0000-4000-8000-00000000000k")
    );
    assert!(cur.reported.values().all(|a| !a.principal_id.is_empty()));

    // Add two (mixed case in, lower case on the wire), through the async LRO.
    let add = set(&[uai(APP_RG, "app-id"), uai(APP_RG, "APP-2")]);
    for p in identity_patches(&cur, &add, &BTreeSet::new()) {
        arm.update_identities(&vmss, &p).await.unwrap();
    }
    let cur = arm.get_identities(&vmss).await.unwrap();
    assert_eq!(
        cur.user_assigned,
        set(&[
            luai(NODE_RG, "kubelet"),
            luai(APP_RG, "app-id"),
            luai(APP_RG, "app-2")
        ])
    );
    assert_eq!(cur.provisioning_state, "Succeeded");
    assert_eq!(
        cur.client_id(&uai(APP_RG, "APP-2")),
        Some("c0000000-0000-4000-8000-000000000002")
    );

    // Remove one; the others stay.
    let remove = set(&[luai(APP_RG, "app-2")]);
    for p in identity_patches(&cur, &BTreeSet::new(), &remove) {
        arm.update_identities(&vmss, &p).await.unwrap();
    }
    let mut on = emu.assigned_identities(VMSS).unwrap();
    on.sort();
    assert_eq!(on, vec![luai(APP_RG, "app-id"), luai(NODE_RG, "kubelet")]);

    // A VM with only a system identity: add and remove keep SystemAssigned.
    let vm = ResourceRef::vm(VM);
    let cur = arm.get_identities(&vm).await.unwrap();
    assert!(cur.has_system_assigned());
    for p in identity_patches(&cur, &set(&[luai(APP_RG, "app-id")]), &BTreeSet::new()) {
        arm.update_identities(&vm, &p).await.unwrap();
    }
    let cur = arm.get_identities(&vm).await.unwrap();
    for p in identity_patches(&cur, &BTreeSet::new(), &set(&[luai(APP_RG, "app-id")])) {
        arm.update_identities(&vm, &p).await.unwrap();
    }
    assert_eq!(emu.assigned_identities(VM), Some(vec![]));
    assert_eq!(emu.has_system_identity(VM), Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by arm_client_against_the_emulator in a child process that trusts the emulator CA"]
async fn child_arm_errors_are_typed() {
    let Some(emu) = emulator().await else {
        panic!("needs the environment arm_client_against_the_emulator sets; run that test");
    };
    let arm = client(&emu, MIC_SECRET);
    let vmss = ResourceRef::vmss(VMSS);
    let cur = arm.get_identities(&vmss).await.unwrap();

    // An identity that does not exist: FailedIdentityOperation naming it.
    let ghost = uai(APP_RG, "ghost");
    let p = identity_patches(&cur, &set(std::slice::from_ref(&ghost)), &BTreeSet::new());
    let err = arm.update_identities(&vmss, &p[0]).await.unwrap_err();
    let CloudError::UpdateIdentities { resource, source } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(resource, &vmss);
    assert_eq!(source.status, Some(400));
    assert!(source.is_identity_failure(), "{source:?}");
    assert_eq!(source.named_identity_ids(), set(&[ghost.to_lowercase()]));

    // Missing resource.
    let err = arm
        .get_identities(&ResourceRef::vmss("no-such-vmss"))
        .await
        .unwrap_err();
    let arm_err = err.arm().unwrap();
    assert_eq!(
        (arm_err.status, arm_err.code.as_str()),
        (Some(404), "ResourceNotFound")
    );

    // Throttled: no retry inside the client; the Retry-After is handed back.
    emu.inject(
        Fault::new(
            Service::Arm,
            FaultAction::Status {
                status: 429,
                retry_after: Some(7),
            },
        )
        .method("GET")
        .times(1),
    );
    let err = arm.get_identities(&vmss).await.unwrap_err();
    assert_eq!(err.arm().unwrap().status, Some(429));
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
    assert!(arm.get_identities(&vmss).await.is_ok());

    // A long-running operation that ends Failed.
    emu.fail_next_operations(1);
    let p = identity_patches(&cur, &set(&[uai(APP_RG, "app-id")]), &BTreeSet::new());
    let err = arm.update_identities(&vmss, &p[0]).await.unwrap_err();
    assert!(
        matches!(err, CloudError::UpdateIdentities { .. }),
        "{err:?}"
    );

    // Wrong secret: the credential fails and nothing is sent to ARM.
    let bad = client(&emu, "wrong");
    let err = bad.get_identities(&vmss).await.unwrap_err();
    assert!(format!("{err}").contains("AADSTS7000215"), "{err}");
}
