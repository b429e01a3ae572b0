//! IMDS behaviour (docs/upstream-behaviour.md#imds-wire-format) checked by plain HTTP
//! requests to per-machine listeners on 127.0.0.1.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test helpers outside #[test] fns

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use aadpodid_testkit::tenant::{APP_CLIENT, KUBELET_CLIENT};
use azure_emulator::{Config, Emulator, Fault, FaultAction, Service};
use common::*;
use serde_json::Value;

async fn with_imds(cfg: Config, machine: &str) -> (Emulator, String) {
    let emu = start(cfg).await;
    let addr = emu
        .add_imds(machine, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("listener");
    (emu, format!("http://{addr}"))
}

fn node() -> String {
    format!("vmss/{VMSS}/0")
}

async fn get(base: &str, path_query: &str) -> Reply {
    Call::new("GET", format!("{base}{path_query}"))
        .header("Metadata", "true")
        .send("")
        .await
}

fn token_q(extra: &str) -> String {
    format!(
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F{extra}"
    )
}

fn oauth(r: &Reply) -> (u16, String, String) {
    let b = r.json();
    (
        r.status,
        b["error"].as_str().unwrap_or("").into(),
        b["error_description"].as_str().unwrap_or("").into(),
    )
}

#[tokio::test]
async fn metadata_header_is_checked_first() {
    let (_emu, base) = with_imds(config(), &node()).await;
    // No header, no query, even the wrong verb: the header error comes first.
    for (method, pq) in [
        ("GET", "/metadata/identity/oauth2/token"),
        ("POST", "/metadata/identity/oauth2/token?x=1"),
        ("GET", &token_q("")[..]),
    ] {
        let r = Call::new(method, format!("{base}{pq}")).send("").await;
        assert_eq!(
            oauth(&r),
            (
                400,
                "invalid_request".into(),
                "Required metadata header not specified".into()
            )
        );
    }
    let r = Call::new("GET", format!("{base}{}", token_q("")))
        .header("metadata", "TRUE")
        .send("")
        .await;
    assert_eq!(r.status, 400, "value must be exactly 'true'");
    // The instance endpoint uses its own error shape.
    let r = Call::new(
        "GET",
        format!("{base}/metadata/instance?api-version=2021-02-01"),
    )
    .send("")
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error"],
        "Bad request: . Required metadata header not specified"
    );
}

#[tokio::test]
async fn request_validation() {
    let (_emu, base) = with_imds(config(), &node()).await;
    let r = Call::new("POST", format!("{base}{}", token_q("")))
        .header("Metadata", "true")
        .send("")
        .await;
    assert_eq!(r.status, 405);
    let r = Call::new("GET", format!("{base}{}", token_q("")))
        .header("Metadata", "true")
        .header("X-Forwarded-For", "10.0.0.1")
        .send("")
        .await;
    assert_eq!(oauth(&r).0, 400);
    assert_eq!(
        oauth(&get(&base, &token_q("&client_id=a&client_id=b")).await).0,
        400
    );
    let r = get(
        &base,
        "/metadata/identity/oauth2/token?resource=https://management.azure.com/",
    )
    .await;
    assert_eq!((r.status, oauth(&r).1.as_str()), (400, "invalid_request"));
    let r = get(
        &base,
        "/metadata/identity/oauth2/token?api-version=2018-02-01",
    )
    .await;
    assert_eq!(
        oauth(&r),
        (
            400,
            "invalid_request".into(),
            "Required audience parameter not specified".into()
        )
    );
    let r = get(
        &base,
        &token_q(&format!("&client_id={KUBELET_CLIENT}&object_id=x")),
    )
    .await;
    assert_eq!(oauth(&r).0, 400);
    let r = get(
        &base,
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://unknown.example/",
    )
    .await;
    assert_eq!((r.status, oauth(&r).1.as_str()), (400, "invalid_resource"));
}

#[tokio::test]
async fn token_for_an_assigned_identity_is_string_typed_and_consistent() {
    let (emu, base) = with_imds(config(), &node()).await;
    // The Rust SDK's exact query: 2019-08-01, resource without the slash.
    let r = get(&base, &format!("/metadata/identity/oauth2/token?api-version=2019-08-01&resource=https%3A%2F%2Fmanagement.azure.com&client_id={KUBELET_CLIENT}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("retry-after").is_none(),
        "never Retry-After on a 200"
    );
    let b = r.json();
    for f in [
        "access_token",
        "client_id",
        "expires_in",
        "expires_on",
        "ext_expires_in",
        "not_before",
        "resource",
        "token_type",
    ] {
        assert!(b[f].is_string(), "{f} must be a JSON string: {b}");
    }
    assert_eq!(b["token_type"], "Bearer");
    assert_eq!(b["resource"], "https://management.azure.com");
    assert_eq!(b["client_id"], KUBELET_CLIENT);
    let c = claims(b["access_token"].as_str().unwrap_or(""));
    assert_eq!(
        b["expires_on"].as_str(),
        Some(c["exp"].to_string().as_str())
    );
    assert_eq!(
        b["not_before"].as_str(),
        Some(c["nbf"].to_string().as_str())
    );
    let exp_in: u64 = b["expires_in"]
        .as_str()
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    assert!((86_390..=86_399).contains(&exp_in), "{exp_in}");
    assert_eq!(c["aud"], "https://management.azure.com");
    assert_eq!(c["tid"], TENANT);
    assert_eq!(c["appid"], KUBELET_CLIENT);
    assert!(c["oid"].is_string() && c["iat"].is_u64());
    assert_eq!(c["xms_mirid"], uai(NODE_RG, "kubelet"));
    // ARM accepts it.
    let arm_get = Call::new(
        "GET",
        format!("{}{}?api-version={API}", emu.arm_url(), vmss_path(VMSS)),
    )
    .bearer(b["access_token"].as_str().unwrap_or(""))
    .send(emu.ca_pem())
    .await;
    assert_eq!(arm_get.status, 200);
    assert_eq!(emu.counters().imds_token_requests.get(&node()), Some(&1));
}

#[tokio::test]
async fn identity_selection_rules() {
    let mut cfg = config();
    cfg.scale_sets[0]
        .identity
        .user_assigned
        .push("app-id".into());
    let (emu, base) = with_imds(cfg, &node()).await;
    let app = emu.identity("app-id").expect("app-id");
    let by_object = get(
        &base,
        &token_q(&format!("&object_id={}", app.principal_id.to_uppercase())),
    )
    .await;
    assert_eq!(by_object.status, 200, "{}", by_object.text());
    assert_eq!(by_object.json()["client_id"], APP_CLIENT);
    let res_id = uai(APP_RG, "APP-ID")
        .to_uppercase()
        .replace("/SUBSCRIPTIONS/", "/subscriptions/");
    let by_res = get(&base, &token_q(&format!("&msi_res_id={}", urlenc(&res_id)))).await;
    assert_eq!(by_res.status, 200, "{}", by_res.text());
    assert_eq!(by_res.json()["msi_res_id"], res_id);
    // Two UAIs, no system identity, no selector.
    let r = get(&base, &token_q("")).await;
    assert_eq!(oauth(&r), (400, "invalid_request".into(), "Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request".into()));
    // mi_res_id is not an IMDS selector (ignored by default).
    let r = get(
        &base,
        &token_q(&format!("&mi_res_id={}", urlenc(&uai(APP_RG, "app-id")))),
    )
    .await;
    assert_eq!(r.status, 400);
    // Identity on another scale set, or unknown: not found on this machine.
    for cid in ["c0000000-0000-4000-8000-000000000003", "nope"] {
        let r = get(&base, &token_q(&format!("&client_id={cid}"))).await;
        assert_eq!(
            oauth(&r),
            (400, "invalid_request".into(), "Identity not found".into())
        );
    }
}

fn urlenc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn default_identity_system_or_single_uai() {
    let mut cfg = config();
    cfg.imds.mi_res_id = azure_emulator::config::MiResIdMode::Alias;
    let emu = start(cfg).await;
    let vm = emu
        .add_imds(&format!("vm/{VM}"), SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("vm listener");
    let node = emu
        .add_imds(&node(), SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("node listener");
    let r = get(&format!("http://{vm}"), &token_q("")).await;
    assert_eq!(r.status, 200, "system identity by default: {}", r.text());
    let r = get(&format!("http://{node}"), &token_q("")).await;
    assert_eq!(
        r.json()["client_id"],
        KUBELET_CLIENT,
        "the only UAI by default"
    );
    // mi_res_id as an alias when configured.
    let r = get(
        &format!("http://{node}"),
        &token_q(&format!("&mi_res_id={}", urlenc(&uai(NODE_RG, "kubelet")))),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(emu.imds_listeners().len(), 2);
}

#[tokio::test]
async fn tokens_are_cached_unless_bypassed() {
    let (_emu, base) = with_imds(config(), &node()).await;
    let q = token_q(&format!("&client_id={KUBELET_CLIENT}"));
    let a = get(&base, &q).await.json();
    let b = get(&base, &q).await.json();
    assert_eq!(a["access_token"], b["access_token"]);
    let c = get(&base, &format!("{q}&bypass_cache=true")).await.json();
    assert_ne!(a["access_token"], c["access_token"]);
}

#[tokio::test]
async fn twenty_token_requests_per_virtual_second() {
    let (emu, base) = with_imds(config(), &node()).await;
    let q = token_q(&format!("&client_id={KUBELET_CLIENT}"));
    for i in 0..20 {
        assert_eq!(get(&base, &q).await.status, 200, "request {i}");
    }
    let r = get(&base, &q).await;
    assert_eq!(oauth(&r).0, 429);
    assert!(r.header("retry-after").is_none());
    emu.clock().advance(Duration::from_secs(1));
    assert_eq!(get(&base, &q).await.status, 200);
    assert_eq!(emu.counters().imds_throttled, 1);
    // The instance category has its own 5/s budget.
    let instance = "/metadata/instance?api-version=2021-02-01";
    for _ in 0..5 {
        assert_eq!(get(&base, instance).await.status, 200);
    }
    assert_eq!(get(&base, instance).await.status, 429);
}

#[tokio::test]
async fn five_concurrent_token_requests() {
    let mut cfg = config();
    cfg.imds.token_latency_seconds = 2.0;
    let (emu, base) = with_imds(cfg, &node()).await;
    let q = token_q(&format!("&client_id={KUBELET_CLIENT}&bypass_cache=true"));
    let pending: Vec<_> = (0..5)
        .map(|_| {
            tokio::spawn({
                let (b, q) = (base.clone(), q.clone());
                async move { get(&b, &q).await.status }
            })
        })
        .collect();
    // Wait (bounded) until the five hold their slots; then a sixth is refused.
    until_counters(&emu, |c| c.imds_token_in_flight.get(&node()) == Some(&5)).await;
    assert_eq!(emu.counters().imds_token_in_flight.get(&node()), Some(&5));
    let r = get(&base, &q).await;
    assert_eq!(
        oauth(&r).1,
        "too_many_requests",
        "a sixth concurrent request is throttled"
    );
    emu.clock().advance(Duration::from_secs(2));
    for p in pending {
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(10), p)
                .await
                .expect("done")
                .expect("task"),
            200
        );
    }
}

#[tokio::test]
async fn assignment_becomes_visible_after_the_configured_delay() {
    let mut cfg = sync_config();
    cfg.imds.assignment_delay_seconds = 30.0;
    let (emu, base) = with_imds(cfg, &node()).await;
    let arm = Arm::new(&emu);
    let r = arm.assign(&vmss_path(VMSS), &uai(APP_RG, "app-id")).await;
    assert_eq!(r.status, 200);
    let q = token_q(&format!("&client_id={APP_CLIENT}"));
    assert_eq!(oauth(&get(&base, &q).await).2, "Identity not found");
    emu.clock().advance(Duration::from_secs(30));
    assert_eq!(get(&base, &q).await.status, 200);
}

#[tokio::test]
async fn async_assignment_is_visible_when_the_operation_ends() {
    let (emu, base) = with_imds(config(), &node()).await;
    let arm = Arm::new(&emu);
    arm.assign(&vmss_path(VMSS), &uai(APP_RG, "app-id")).await;
    let q = token_q(&format!("&client_id={APP_CLIENT}"));
    assert_eq!(get(&base, &q).await.status, 400);
    emu.clock().advance(Duration::from_secs(45));
    assert_eq!(get(&base, &q).await.status, 200);
    // Removal is immediate; a deleted identity is not served either.
    emu.delete_identity("kubelet");
    assert_eq!(
        oauth(&get(&base, &token_q(&format!("&client_id={KUBELET_CLIENT}"))).await).2,
        "Identity not found"
    );
}

#[tokio::test]
async fn instance_metadata_versions_and_info() {
    let (emu, base) = with_imds(config(), &node()).await;
    let r = get(&base, "/metadata/instance?api-version=2021-02-01").await;
    assert_eq!(r.status, 200);
    let b = r.json();
    fn all_strings(v: &Value) -> bool {
        match v {
            Value::String(_) => true,
            Value::Object(m) => m.values().all(all_strings),
            Value::Array(a) => a.iter().all(all_strings),
            _ => false,
        }
    }
    assert!(all_strings(&b), "every primitive is a string: {b}");
    assert_eq!(b["compute"]["vmScaleSetName"], VMSS);
    assert_eq!(b["compute"]["subscriptionId"], SUB);
    assert_eq!(b["compute"]["resourceGroupName"], NODE_RG);
    assert_eq!(
        b["compute"]["resourceId"],
        format!("{}/virtualMachines/0", vmss_path(VMSS))
    );
    assert_eq!(
        b["compute"]["osProfile"]["computerName"],
        format!("{VMSS}000000")
    );
    assert_eq!(b["compute"]["zone"], "");
    let r = get(&base, "/metadata/instance/compute?api-version=2021-02-01").await;
    assert_eq!(r.json()["name"], format!("{VMSS}_0"));
    let r = get(
        &base,
        "/metadata/instance/compute/name?api-version=2021-02-01&format=text",
    )
    .await;
    assert_eq!((r.status, r.text()), (200, format!("{VMSS}_0")));
    assert_eq!(
        get(
            &base,
            "/metadata/instance/compute/name?api-version=2021-02-01"
        )
        .await
        .status,
        400
    );
    assert_eq!(
        get(
            &base,
            "/metadata/instance/compute/nope?api-version=2021-02-01"
        )
        .await
        .status,
        404
    );
    emu.clock().advance(Duration::from_secs(1));
    let r = get(&base, "/metadata/instance").await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("Bad request. api-version is invalid or was not specified")
    );
    assert!(r.json()["newest-versions"].is_array());
    let r = get(&base, "/metadata/versions").await;
    assert!(
        r.json()["apiVersions"]
            .as_array()
            .is_some_and(|a| a.iter().any(|v| v == "2018-02-01"))
    );
    let r = get(&base, "/metadata/identity/info?api-version=2018-02-01").await;
    assert_eq!(r.json()["tenantId"], TENANT);

    let vm_addr = emu
        .add_imds(&format!("vm/{VM}"), SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("vm");
    let r = get(
        &format!("http://{vm_addr}"),
        "/metadata/instance/compute?api-version=2021-02-01",
    )
    .await;
    assert_eq!(r.json()["vmScaleSetName"], "");
    assert_eq!(r.json()["name"], VM);
}

#[tokio::test]
async fn injected_imds_faults() {
    let (emu, base) = with_imds(config(), &node()).await;
    let q = token_q(&format!("&client_id={KUBELET_CLIENT}"));
    emu.inject(
        Fault::status(Service::Imds, 410, None)
            .machine(&node())
            .times(1),
    );
    assert_eq!(get(&base, &q).await.status, 410);
    emu.inject(Fault::status(Service::Imds, 500, None).times(1));
    let r = get(&base, &q).await;
    assert_eq!(oauth(&r).1, "unknown");
    assert!(
        oauth(&r)
            .2
            .starts_with("Failed to retrieve token from the Active directory.")
    );
    emu.inject(Fault::status(Service::Imds, 404, None).times(1));
    assert_eq!(get(&base, &q).await.status, 404);
    emu.inject(Fault::status(Service::Imds, 429, None).times(1));
    assert_eq!(oauth(&get(&base, &q).await).1, "too_many_requests");
    emu.inject(Fault::new(Service::Imds, FaultAction::Hang).times(1));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), get(&base, &q))
            .await
            .is_err()
    );
    // A fault for another machine does not fire here.
    emu.inject(Fault::status(Service::Imds, 503, None).machine("vm/x"));
    assert_eq!(get(&base, &q).await.status, 200);
}
