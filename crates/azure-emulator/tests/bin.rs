//! The `azure-emulator --config FILE` binary and its admin endpoint, driven as
//! another process would: stdout for the URLs, HTTP for everything else.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test helpers outside #[test] fns

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

const CONFIG: &str = r#"
tenantId: 72f988bf-86f1-41af-91ab-2d7cd011db47
subscriptionId: 0b1f6471-1bf0-4dda-aec3-cb9272f09590
resourceGroups: [MC_rg_cluster_eastus, app-rg]
identities:
  - { name: kubelet, resourceGroup: MC_rg_cluster_eastus, clientId: c0000000-0000-4000-8000-00000000000k }
  - { name: app-id, resourceGroup: app-rg, clientId: c0000000-0000-4000-8000-000000000001 }
scaleSets:
  - name: aks-nodepool1-12345678-vmss
    resourceGroup: MC_rg_cluster_eastus
    instances: ["0"]
    identity: { userAssigned: [kubelet] }
servicePrincipals:
  - { clientId: 5b1c2c4e-0000-4000-8000-00000000c1d1, secrets: [s3cr3t] }
clock: { speed: 0 }
imds:
  listeners:
    - { machine: vmss/aks-nodepool1-12345678-vmss/0, address: "127.0.0.1:0" }
"#;

/// The status of an IMDS request (with the Metadata header) to `url`.
async fn imds_status(url: &str) -> u16 {
    Call::new("GET", url)
        .header("Metadata", "true")
        .send("")
        .await
        .status
}

/// A GET on the admin endpoint (plain HTTP).
async fn admin_get(admin: &str, path: &str) -> Reply {
    Call::new("GET", format!("{admin}{path}")).send("").await
}

/// A POST of a JSON body to the admin endpoint.
async fn admin_post(admin: &str, path: &str, body: &serde_json::Value) -> Reply {
    Call::new("POST", format!("{admin}{path}"))
        .json(body)
        .send("")
        .await
}

/// Runs the binary with these arguments (at most 30 s).
async fn run_binary(args: &[&str]) -> std::process::Output {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_azure-emulator"))
        .args(args)
        .output();
    tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("exits")
        .expect("runs")
}

fn last_pem_cert(bundle: &str) -> String {
    let start = bundle
        .rfind("-----BEGIN CERTIFICATE-----")
        .expect("a certificate");
    bundle[start..].to_string()
}

#[tokio::test]
async fn binary_prints_urls_and_serves_admin_aad_imds() {
    let dir = std::env::temp_dir().join(format!("azemu-bin-{}", azure_emulator::ids::new_guid()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg_path = dir.join("emulator.yaml");
    std::fs::write(&cfg_path, CONFIG).expect("config");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_azure-emulator"))
        .arg("--config")
        .arg(&cfg_path)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut vars = HashMap::new();
    let read = async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line == "READY" {
                break;
            }
            if let Some((k, v)) = line.split_once('=') {
                vars.insert(k.to_string(), v.to_string());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("READY within 60 s");
    let (arm, aad, admin, bundle) = (
        &vars["ARM_URL"],
        &vars["AAD_URL"],
        &vars["ADMIN_URL"],
        &vars["CA_BUNDLE"],
    );
    let imds = &vars[&format!("IMDS vmss/{VMSS}/0")];
    assert!(
        arm.starts_with("https://127.0.0.1:")
            && aad.starts_with("https://127.0.0.1:")
            && admin.starts_with("http://127.0.0.1:")
    );
    let ca = last_pem_cert(&std::fs::read_to_string(bundle).expect("bundle"));

    let urls = admin_get(admin, "/urls").await.json();
    assert_eq!(urls["arm"], arm.as_str());

    // AAD -> token -> ARM.
    let r = Call::new("POST", format!("{aad}{TENANT}/oauth2/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", MIC),
            ("client_secret", MIC_SECRET),
            ("resource", ARM_RESOURCE),
        ])
        .send(&ca)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let token = r.json()["access_token"].as_str().unwrap_or("").to_string();
    let r = Call::new("GET", format!("{arm}{}?api-version={API}", vmss_path(VMSS)))
        .bearer(&token)
        .send(&ca)
        .await;
    assert_eq!(r.status, 200);

    // IMDS on its own listener.
    let q = format!(
        "{imds}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/"
    );
    assert_eq!(imds_status(&q).await, 200);

    // Faults through the admin endpoint.
    let f = json!({"service": "imds", "action": {"kind": "status", "status": 503}, "count": 1});
    assert_eq!(admin_post(admin, "/faults", &f).await.status, 200);
    assert_eq!(imds_status(&q).await, 503);
    assert_eq!(imds_status(&q).await, 200);
    assert_eq!(
        Call::new("POST", format!("{admin}/faults"))
            .raw("application/json", "{")
            .send("")
            .await
            .status,
        400
    );

    let r = admin_post(
        admin,
        "/actions",
        &json!({"action": "stripIdentities", "resource": VMSS}),
    )
    .await;
    assert_eq!(r.json()["removed"], 1);
    assert_eq!(imds_status(&q).await, 400);
    let r = admin_post(
        admin,
        "/actions",
        &json!({"action": "assignIdentities", "resource": VMSS, "identities": ["app-id"]}),
    )
    .await;
    assert_eq!(r.json()["assigned"], 1);
    let r = admin_post(
        admin,
        "/actions",
        &json!({"action": "setDeleting", "resource": VMSS}),
    )
    .await;
    assert_eq!(r.json()["found"], true);
    let r = admin_post(
        admin,
        "/actions",
        &json!({"action": "advanceClock", "seconds": 60}),
    )
    .await;
    assert!(r.json()["virtualTimeMs"].is_u64());
    assert_eq!(
        admin_post(admin, "/actions", &json!({"action": "bogus"}))
            .await
            .status,
        400
    );

    let state = admin_get(admin, "/state").await.json();
    assert_eq!(state["compute"][0]["provisioningState"], "Deleting");
    let counters = admin_get(admin, "/counters").await.json();
    assert_eq!(counters["imdsTokenRequests"][format!("vmss/{VMSS}/0")], 4);
    assert_eq!(counters["faultsFired"], 1);
    let log = admin_get(admin, "/requests?since=0").await.json();
    assert!(log.as_array().is_some_and(|l| l.len() >= 6));
    assert_eq!(admin_get(admin, "/nope").await.status, 404);

    child.start_kill().expect("kill");
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn binary_rejects_bad_arguments() {
    let out = run_binary(&[]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config is required"));
    let out = run_binary(&["--config", "/nonexistent.yaml"]).await;
    assert!(!out.status.success());
}
