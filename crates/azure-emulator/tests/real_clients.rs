//! Real managed-identity clients against the emulator's IMDS:
//! - Python azure-identity's `ManagedIdentityCredential`, pointed at a loopback
//!   IMDS listener through the SDK's own `AZURE_POD_IDENTITY_AUTHORITY_HOST`;
//! - Rust azure_identity's `ManagedIdentityCredential`, whose IMDS address is
//!   fixed at 169.254.169.254: the emulator binary runs in a test "node" network
//!   namespace that holds that address, and the client runs in a "pod" namespace
//!   routed through the node (this test binary re-runs itself there).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use aadpodid_testkit::netns::{IMDS_ADDRESS, Node};
use aadpodid_testkit::tenant::APP_CLIENT;
use aadpodid_testkit::{IdentitySelector, SUB, TENANT, python_imds_token};
use azure_emulator::{Config, Emulator};

const APP_PRINCIPAL: &str = "d0000000-0000-4000-8000-000000000001";
const KUBELET_CLIENT: &str = "c0000000-0000-4000-8000-00000000000b";
const OTHER_CLIENT: &str = "c0000000-0000-4000-8000-000000000003";
const ARM_SCOPE: &str = "https://management.azure.com/.default";
const MACHINE: &str = "vmss/aks-np-vmss/0";

fn app_resource_id() -> String {
    format!(
        "/subscriptions/{SUB}/resourcegroups/app-rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/app-id"
    )
}

/// The node's scale set carries the kubelet identity and `app-id`; `other-id`
/// exists but is on no machine.
fn config_yaml(imds_listener: Option<SocketAddr>) -> String {
    let imds = imds_listener
        .map(|a| format!("imds:\n  listeners: [{{ machine: {MACHINE}, address: \"{a}\" }}]\n"))
        .unwrap_or_default();
    format!(
        "tenantId: {TENANT}
subscriptionId: {SUB}
identities:
  - {{ name: kubelet, resourceGroup: MC_rg, clientId: {KUBELET_CLIENT} }}
  - {{ name: app-id, resourceGroup: app-rg, clientId: {APP_CLIENT}, principalId: {APP_PRINCIPAL} }}
  - {{ name: other-id, resourceGroup: app-rg, clientId: {OTHER_CLIENT} }}
scaleSets:
  - {{ name: aks-np-vmss, resourceGroup: MC_rg, instances: [\"0\"], identity: {{ userAssigned: [kubelet, app-id] }} }}
{imds}"
    )
}

/// The claims of a JWT, without checking its signature.
fn claims(token: &str) -> anyhow::Result<serde_json::Value> {
    let parsed = azure_emulator::jwt::parse(token)
        .map_err(|e| anyhow::anyhow!("not a JWT ({e:?}): {token}"))?;
    Ok(serde_json::Value::Object(parsed.claims))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_managed_identity_credential_against_imds() {
    let cfg = Config::from_yaml(&config_yaml(None)).unwrap();
    let emu = Emulator::start(cfg).await.unwrap();
    let addr = emu
        .add_imds(MACHINE, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let base = format!("http://{addr}");

    let ask = |selector: IdentitySelector<'static>| {
        let base = base.clone();
        tokio::task::spawn_blocking(move || {
            python_imds_token(Some(&base), ARM_SCOPE, selector, None).unwrap()
        })
    };

    // By client ID: a token for that identity, which ARM would accept.
    let out = ask(IdentitySelector::ClientId(APP_CLIENT)).await.unwrap();
    let token = out["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {out}"));
    let c = emu
        .verify_token(token)
        .expect("emulator accepts its own IMDS token");
    assert_eq!(c.appid, APP_CLIENT);
    assert_eq!(c.oid, APP_PRINCIPAL);
    assert_eq!(c.tid, TENANT);
    assert!(out["expires_on"].as_u64().unwrap() > 0, "{out}");

    // By ARM resource ID (sent as msi_res_id) and by object ID.
    let rid: &'static str = Box::leak(app_resource_id().into_boxed_str());
    for selector in [
        IdentitySelector::ResourceId(rid),
        IdentitySelector::ObjectId(APP_PRINCIPAL),
    ] {
        let out = ask(selector).await.unwrap();
        let token = out["token"]
            .as_str()
            .unwrap_or_else(|| panic!("{selector:?}: {out}"));
        assert_eq!(claims(token).unwrap()["appid"], APP_CLIENT, "{selector:?}");
    }

    for (selector, error) in [
        // An identity that is not on this machine: the SDK surfaces IMDS's error.
        (
            IdentitySelector::ClientId(OTHER_CLIENT),
            "Identity not found",
        ),
        // Two identities on the machine and none named.
        (
            IdentitySelector::Default,
            "Multiple user assigned identities",
        ),
    ] {
        let out = ask(selector).await.unwrap();
        assert!(out.get("token").is_none(), "{out}");
        assert!(out["error"].as_str().unwrap().contains(error), "{out}");
    }

    emu.shutdown();
}

/// Env var that turns `rust_credential_child` into the pod-side half.
const CHILD_CLIENT_ID: &str = "EMULATOR_TEST_CHILD_CLIENT_ID";

#[test]
fn rust_managed_identity_credential_from_a_pod_namespace() {
    let node = Node::with_pods(1).unwrap();
    node.node.add_local_address(IMDS_ADDRESS).unwrap();
    let dir = std::env::temp_dir().join(aadpodid_testkit::unique_name("emulator-netns"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("emulator.yaml");
    let listener = SocketAddr::from((IMDS_ADDRESS, 80));
    std::fs::write(&config, config_yaml(Some(listener))).unwrap();

    let mut emulator = node
        .node
        .command(env!("CARGO_BIN_EXE_azure-emulator"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = emulator.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut printed = Vec::new();
    while !printed.iter().any(|l: &String| l == "READY") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => printed.push(line),
            Err(_) => panic!("emulator not ready in the node namespace: {printed:?}"),
        }
    }
    assert!(
        printed.contains(&format!("IMDS {MACHINE}=http://{listener}")),
        "{printed:?}"
    );

    let run_child = |client_id: &str| {
        let out = node.pods[0]
            .0
            .command(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "rust_credential_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_CLIENT_ID, client_id)
            .env_remove("IDENTITY_ENDPOINT")
            .env_remove("IDENTITY_HEADER")
            .env_remove("IMDS_ENDPOINT")
            .env_remove("MSI_ENDPOINT")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let out = run_child(APP_CLIENT);
    let token = out
        .lines()
        .find_map(|l| l.split_once("TOKEN_OK ").map(|(_, t)| t))
        .unwrap_or_else(|| panic!("pod got no token: {out}"));
    let c = claims(token).unwrap();
    assert_eq!(c["appid"], APP_CLIENT);
    assert_eq!(c["tid"], TENANT);
    // The SDK turns the scope into resource "https://management.azure.com".
    assert_eq!(c["aud"], "https://management.azure.com");

    let out = run_child(OTHER_CLIENT);
    let err = out
        .lines()
        .find_map(|l| l.split_once("TOKEN_ERR ").map(|(_, e)| e))
        .unwrap_or_else(|| panic!("unassigned identity was served: {out}"));
    assert!(
        err.contains("not been assigned") || err.contains("Identity not found"),
        "{err}"
    );

    let _ = emulator.kill();
    let _ = emulator.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pod-side half of the test above; it does nothing useful on its own.
#[tokio::test]
#[ignore = "run by rust_managed_identity_credential_from_a_pod_namespace inside a pod namespace"]
async fn rust_credential_child() {
    use azure_core::credentials::TokenCredential as _;
    use azure_identity::{
        ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId,
    };

    let client_id = std::env::var(CHILD_CLIENT_ID).expect("started by the parent test");
    let options = ManagedIdentityCredentialOptions {
        user_assigned_id: Some(UserAssignedId::ClientId(client_id)),
        ..Default::default()
    };
    let credential = ManagedIdentityCredential::new(Some(options)).unwrap();
    match tokio::time::timeout(
        Duration::from_secs(60),
        credential.get_token(&[ARM_SCOPE], None),
    )
    .await
    {
        Ok(Ok(token)) => println!("TOKEN_OK {}", token.token.secret()),
        Ok(Err(e)) => println!("TOKEN_ERR {e}"),
        Err(_) => println!("TOKEN_ERR timed out"),
    }
}
