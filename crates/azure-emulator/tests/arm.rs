//! ARM compute behaviour (docs/upstream-behaviour.md#arm-identity-api) checked
//! by requests.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test helpers outside #[test] fns

mod common;

use std::time::Duration;

use azure_emulator::config::ConcurrentWrites;
use azure_emulator::{Fault, FaultAction, Service};
use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn get_vmss_has_the_documented_shape() {
    let emu = start(config()).await;
    let arm = Arm::new(&emu);
    let r = arm.get(&vmss_path(VMSS), API).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let b = r.json();
    assert_eq!(b["id"], vmss_path(VMSS));
    assert_eq!(b["name"], VMSS);
    assert_eq!(b["type"], "Microsoft.Compute/virtualMachineScaleSets");
    assert_eq!(b["location"], "eastus");
    assert_eq!(b["etag"], "\"1\"");
    assert_eq!(b["properties"]["provisioningState"], "Succeeded");
    assert_eq!(b["identity"]["type"], "UserAssigned");
    assert!(
        b["identity"].get("principalId").is_none(),
        "no system identity fields: {b}"
    );
    let v = &b["identity"]["userAssignedIdentities"][uai(NODE_RG, "kubelet")];
    assert_eq!(v["clientId"], "c0000000-0000-4000-8000-00000000000k");
    assert!(v["principalId"].as_str().is_some_and(|p| p.len() == 36));
    // Throttle headers on every Compute answer.
    let res = r
        .header("x-ms-ratelimit-remaining-resource")
        .expect("resource header");
    assert!(res.starts_with("Microsoft.Compute/GetVMScaleSetResource;35,Microsoft.Compute/GetVMScaleSetSubscriptionMaximum;"), "{res}");
    assert!(
        r.header("x-ms-ratelimit-remaining-subscription-reads")
            .is_some()
    );

    // 2019-12-01 (upstream MIC) has no etag.
    let old = arm.get(&vmss_path(VMSS), OLD_API).await;
    assert_eq!(old.status, 200);
    assert!(old.json().get("etag").is_none());
}

#[tokio::test]
async fn system_identity_shows_principal_and_tenant() {
    let emu = start(config()).await;
    let b = Arm::new(&emu).get(&vm_path(VM), API).await.json();
    assert_eq!(b["type"], "Microsoft.Compute/virtualMachines");
    assert_eq!(b["identity"]["type"], "SystemAssigned");
    assert_eq!(b["identity"]["tenantId"], TENANT);
    assert!(b["identity"]["principalId"].is_string());
    assert!(b["identity"].get("userAssignedIdentities").is_none());
}

#[tokio::test]
async fn paths_are_case_insensitive_and_keep_stored_casing() {
    let emu = start(config()).await;
    let arm = Arm::new(&emu);
    let shouty = vmss_path(VMSS)
        .to_uppercase()
        .replace("/SUBSCRIPTIONS/", "/subscriptions/");
    let r = arm.get(&shouty, API).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["name"], VMSS);
    assert_eq!(r.json()["id"], vmss_path(VMSS));
    // API-version parameter name is case-insensitive too.
    let url = format!("{}{}?API-VERSION={API}", emu.arm_url(), vmss_path(VMSS));
    assert_eq!(
        Call::new("GET", url)
            .bearer(&arm.token)
            .send(emu.ca_pem())
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn bearer_token_is_required_and_checked() {
    let emu = start(config()).await;
    let url = format!("{}{}?api-version={API}", emu.arm_url(), vmss_path(VMSS));
    let r = Call::new("GET", &url).send(emu.ca_pem()).await;
    r.assert_error(401, "AuthenticationFailed");
    assert!(
        r.header("www-authenticate")
            .is_some_and(|h| h.starts_with("Bearer authorization_uri="))
    );
    let r = Call::new("GET", &url)
        .header("authorization", "Basic abc")
        .send(emu.ca_pem())
        .await;
    r.assert_error(401, "AuthenticationFailed");
    let r = Call::new("GET", &url)
        .bearer("not.a.jwt")
        .send(emu.ca_pem())
        .await;
    r.assert_error(401, "InvalidAuthenticationToken");
    let vault = emu
        .issue_token(MIC, "https://vault.azure.net")
        .expect("token");
    let r = Call::new("GET", &url)
        .bearer(&vault)
        .send(emu.ca_pem())
        .await;
    r.assert_error(401, "InvalidAuthenticationTokenAudience");
    // Both ARM audiences, with or without the slash.
    for aud in [
        "https://management.azure.com",
        "https://management.azure.com/",
        "https://management.core.windows.net/",
        "https://management.core.windows.net",
    ] {
        let t = emu.issue_token(MIC, aud).expect("token");
        assert_eq!(
            Call::new("GET", &url)
                .bearer(&t)
                .send(emu.ca_pem())
                .await
                .status,
            200,
            "{aud}"
        );
    }
}

#[tokio::test]
async fn api_version_is_required_and_checked() {
    let emu = start(config()).await;
    let arm = Arm::new(&emu);
    let url = format!("{}{}", emu.arm_url(), vmss_path(VMSS));
    let r = Call::new("GET", url)
        .bearer(&arm.token)
        .send(emu.ca_pem())
        .await;
    r.assert_error_message(
        400,
        "MissingApiVersionParameter",
        "The api-version query parameter (?api-version=) is required for all requests.",
    );
    let r = arm.get(&vmss_path(VMSS), "2001-01-01").await;
    r.assert_error(400, "NoRegisteredProviderFound");
    for v in [
        "2019-12-01",
        "2023-09-01",
        "2024-07-01",
        "2024-11-01",
        "2025-04-01",
        "2025-11-01",
        "2026-04-01",
    ] {
        assert_eq!(arm.get(&vmss_path(VMSS), v).await.status, 200, "{v}");
    }
}

#[tokio::test]
async fn missing_things_are_404_with_arm_codes() {
    let emu = start(config()).await;
    let arm = Arm::new(&emu);
    let r = arm.get(&vmss_path("nope"), API).await;
    r.assert_error(404, "ResourceNotFound");
    assert!(r.error_message().starts_with(&format!(
        "The Resource 'Microsoft.Compute/virtualMachineScaleSets/nope' under resource group '{NODE_RG}' was not found."
    )));
    let r = arm.patch(&vm_path("nope"), API, &json!({})).await;
    r.assert_error(404, "ResourceNotFound");
    let r = arm.get(&format!("/subscriptions/{SUB}/resourceGroups/no-rg/providers/Microsoft.Compute/virtualMachineScaleSets/x"), API).await;
    r.assert_error_message(
        404,
        "ResourceGroupNotFound",
        "Resource group 'no-rg' could not be found.",
    );
    let r = arm
        .get("/subscriptions/other-sub/resourceGroups/x", API)
        .await;
    r.assert_error(404, "SubscriptionNotFound");
    // Error bodies always carry code, message and details.
    let e = &r.json()["error"];
    assert!(e["code"].is_string() && e["message"].is_string() && e["details"].is_array());
}

#[tokio::test]
async fn patch_merges_user_assigned_identities_through_an_lro() {
    let emu = start(config()).await;
    let arm = Arm::new(&emu);
    let app = uai(APP_RG, "app-id");
    let r = arm.assign(&vmss_path(VMSS), &app).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let b = r.json();
    assert_eq!(b["properties"]["provisioningState"], "Updating");
    assert_eq!(
        uai_keys(&b),
        uai_ids(&[(APP_RG, "app-id"), (NODE_RG, "kubelet")])
    );
    let op_url = r
        .header("azure-asyncoperation")
        .expect("Azure-AsyncOperation");
    assert!(
        op_url.contains(&format!(
            "/subscriptions/{SUB}/providers/Microsoft.Compute/locations/eastus/operations/"
        )),
        "{op_url}"
    );
    assert!(op_url.ends_with(&format!("?api-version={API}")));
    assert!(r.header("location").is_some());
    assert!(r.header("retry-after").is_some());
    assert_eq!(emu.counters().lro_started, 1);

    let poll = arm.get_abs(&op_url).await;
    assert_eq!(poll.status, 200);
    assert_eq!(poll.json()["status"], "InProgress");
    assert!(poll.json()["startTime"].is_string());
    assert_eq!(arm.provisioning_state(&vmss_path(VMSS)).await, "Updating");

    emu.clock().advance(Duration::from_secs(45));
    let done = arm.get_abs(&op_url).await.json();
    assert_eq!(done["status"], "Succeeded");
    assert!(done["endTime"].is_string());
    let got = arm.get(&vmss_path(VMSS), API).await.json();
    assert_eq!(got["properties"]["provisioningState"], "Succeeded");
    assert_eq!(got["etag"], "\"2\"");

    // null removes, absent keys are kept.
    let r = arm.unassign(&vmss_path(VMSS), &app).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(uai_keys(&r.json()), uai_ids(&[(NODE_RG, "kubelet")]));
    emu.clock().advance(Duration::from_secs(45));
    // A PATCH without identity keeps it.
    let r = arm
        .patch(&vmss_path(VMSS), API, &json!({"tags": {"a": "b"}}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(uai_keys(&r.json()), uai_ids(&[(NODE_RG, "kubelet")]));
    assert_eq!(r.json()["tags"]["a"], "b");
    assert_eq!(emu.counters().arm_writes.values().sum::<u64>(), 3);
}

#[tokio::test]
async fn location_header_polls_202_then_the_resource() {
    let emu = start(config()).await;
    let arm = Arm::new(&emu);
    let r = arm.assign(&vmss_path(VMSS), &uai(APP_RG, "app-id")).await;
    let loc = r.header("location").expect("Location");
    let p = arm.get_abs(&loc).await;
    assert_eq!(p.status, 202);
    assert!(p.header("location").is_some());
    emu.clock().advance(Duration::from_secs(60));
    let p = arm.get_abs(&loc).await;
    assert_eq!(p.status, 200);
    assert_eq!(p.json()["name"], VMSS);
}

#[tokio::test]
async fn failed_operation_reports_an_error() {
    let emu = start(config()).await;
    let arm = Arm::new(&emu);
    emu.fail_next_operations(1);
    let r = arm.assign(&vmss_path(VMSS), &uai(APP_RG, "app-id")).await;
    let op = r.header("azure-asyncoperation").expect("op");
    emu.clock().advance(Duration::from_secs(46));
    let b = arm.get_abs(&op).await.json();
    assert_eq!(b["status"], "Failed");
    assert!(b["error"]["code"].is_string() && b["error"]["message"].is_string());
    assert_eq!(arm.provisioning_state(&vmss_path(VMSS)).await, "Failed");
}

#[tokio::test]
async fn none_and_system_assigned_transitions() {
    let emu = start(sync_config()).await;
    let arm = Arm::new(&emu);
    let app = uai(APP_RG, "app-id");
    // VM with a system identity: add a UAI keeping the system one.
    let r = arm
        .patch_identities(&vm_path(VM), "SystemAssigned,UserAssigned", &[(&app, true)])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["identity"]["type"], "SystemAssigned, UserAssigned");
    assert_eq!(r.json()["properties"]["provisioningState"], "Succeeded");
    assert!(
        r.header("azure-asyncoperation").is_none(),
        "sync mode has no LRO headers"
    );
    // SystemAssigned drops every UAI.
    let r = arm
        .patch(
            &vm_path(VM),
            API,
            &json!({"identity": {"type": "SystemAssigned"}}),
        )
        .await;
    assert_eq!(r.json()["identity"]["type"], "SystemAssigned");
    assert_eq!(emu.assigned_identities(VM), Some(vec![]));
    // None removes everything; the identity member disappears.
    let r = arm
        .patch(&vm_path(VM), API, &json!({"identity": {"type": "None"}}))
        .await;
    assert_eq!(r.status, 200);
    assert!(r.json().get("identity").is_none());
    assert_eq!(emu.has_system_identity(VM), Some(false));
    // UserAssigned on a scale set: removing the last one needs type None.
    let r = arm
        .unassign(&vmss_path(VMSS), &uai(NODE_RG, "kubelet"))
        .await;
    r.assert_error_message(
        400,
        "InvalidParameter",
        "The identity ids must not be null or empty for 'UserAssigned' identity type.",
    );
    // Type spelled loosely is accepted and echoed canonically.
    let r = arm
        .patch_identities(&vmss_path(VMSS), "userAssigned", &[(&app, true)])
        .await;
    assert_eq!(r.json()["identity"]["type"], "UserAssigned");
}

#[tokio::test]
async fn identity_errors_follow_the_contract() {
    let emu = start(sync_config()).await;
    let arm = Arm::new(&emu);
    let p = vmss_path(VMSS);

    let r = arm
        .patch(
            &p,
            API,
            &json!({"identity": {"userAssignedIdentities": {}}}),
        )
        .await;
    r.assert_error(400, "InvalidRequestContent");
    assert!(
        r.error_message()
            .contains("Required property 'type' not found in JSON. Path 'identity'.")
    );

    let r = arm
        .patch_identities(&p, "SystemAssigned", &[(&uai(APP_RG, "app-id"), true)])
        .await;
    r.assert_error(400, "InvalidParameter");

    let missing = format!(
        "/subscriptions/{SUB}/resourceGroups/App-RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/Ghost"
    );
    let r = arm.assign(&p, &missing).await;
    r.assert_error(400, "FailedIdentityOperation");
    let msg = r.error_message();
    assert!(
        msg.contains(&format!(
            "Resource '{}' was not found.",
            missing.to_lowercase()
        )),
        "{msg}"
    );

    let many: Vec<String> = (0..151).map(|i| uai(APP_RG, &format!("x{i}"))).collect();
    let changes: Vec<(&str, bool)> = many.iter().map(|s| (s.as_str(), true)).collect();
    let r = arm.patch_identities(&p, "UserAssigned", &changes).await;
    r.assert_error(400, "FailedIdentityOperation");
    assert!(r.error_message().contains(
        "User Assigned Identities Number '151' Assign exceed limit '150' in one request."
    ));

    // Nothing changed by any of the failures.
    let b = arm.get(&p, API).await.json();
    assert_eq!(b["etag"], "\"1\"");
    assert_eq!(uai_keys(&b), uai_ids(&[(NODE_RG, "kubelet")]));
}

#[tokio::test]
async fn missing_assign_right_is_linked_authorization_failed() {
    let emu = start(sync_config()).await;
    let limited = Arm::as_client(&emu, LIMITED);
    let (a2, other) = (uai(APP_RG, "app-2"), uai(APP_RG, "other-id"));
    let r = limited
        .patch_identities(
            &vmss_path(VMSS),
            "UserAssigned",
            &[(&a2, true), (&other, true)],
        )
        .await;
    r.assert_error(403, "LinkedAuthorizationFailed");
    let msg = r.error_message();
    assert!(msg.contains("'Microsoft.ManagedIdentity/userAssignedIdentities/assign/action' on the linked scope(s) '"), "{msg}");
    assert!(
        msg.contains(&format!("'{a2},{other}'")),
        "IDs comma-separated in quotes: {msg}"
    );
    // The identity it may assign works.
    let ok = limited
        .assign(&vmss_path(VMSS), &uai(APP_RG, "app-id"))
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    // Revoking the right on app-id for everyone (fault) blocks MIC too.
    emu.set_assign_revoked("app-2", true);
    let r = Arm::new(&emu).assign(&vmss_path(VMSS), &a2).await;
    r.assert_error(403, "LinkedAuthorizationFailed");
    // Missing write right is AuthorizationFailed.
    emu.set_write_revoked(MIC_OID, true);
    let r = Arm::new(&emu)
        .patch(&vmss_path(VMSS), API, &json!({"tags": {}}))
        .await;
    r.assert_error(403, "AuthorizationFailed");
}

#[tokio::test]
async fn deleting_scale_set_refuses_writes() {
    let emu = start(config()).await;
    let arm = Arm::new(&emu);
    assert!(emu.set_deleting(VMSS, true));
    let r = arm.assign(&vmss_path(VMSS), &uai(APP_RG, "app-id")).await;
    r.assert_error(409, "OperationNotAllowed");
    assert!(r.error_message().contains("marked for deletion"));
    assert_eq!(arm.provisioning_state(&vmss_path(VMSS)).await, "Deleting");
}

#[tokio::test]
async fn second_write_in_flight_conflicts() {
    let emu = start(config()).await;
    let arm = Arm::new(&emu);
    let body = identity_patch("UserAssigned", &[(&uai(APP_RG, "app-id"), true)]);
    assert_eq!(arm.patch(&vmss_path(VMSS), API, &body).await.status, 200);
    let r = arm.patch(&vmss_path(VMSS), API, &body).await;
    r.assert_error(409, "Conflict");
    assert!(
        r.error_message()
            .starts_with("The request failed due to conflict with a concurrent request.")
    );
    // Another scale set is independent.
    assert_eq!(arm.patch(&vmss_path(VMSS2), API, &body).await.status, 200);
    emu.clock().advance(Duration::from_secs(45));
    assert_eq!(arm.patch(&vmss_path(VMSS), API, &body).await.status, 200);
}

#[tokio::test]
async fn second_write_queues_when_configured() {
    let mut cfg = config();
    cfg.arm.concurrent_writes = ConcurrentWrites::Queue;
    let emu = start(cfg).await;
    let arm = Arm::new(&emu);
    let first = arm.assign(&vmss_path(VMSS), &uai(APP_RG, "app-id")).await;
    assert_eq!(first.status, 200);
    let second_body = identity_patch("UserAssigned", &[(&uai(APP_RG, "app-2"), true)]);
    let path = vmss_path(VMSS);
    let second = arm.patch(&path, API, &second_body);
    let advance = async {
        // Once the second write waits in the queue, end the first one.
        until_counters(&emu, |c| c.arm_queued_writes >= 1).await;
        assert_eq!(emu.counters().arm_queued_writes, 1);
        emu.clock().advance(Duration::from_secs(45));
    };
    let (r, ()) = tokio::join!(second, advance);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(uai_keys(&r.json()).len(), 3);
}

#[tokio::test]
async fn etag_and_if_match() {
    let emu = start(sync_config()).await;
    let arm = Arm::new(&emu);
    let url = arm.url(&vmss_path(VMSS), API);
    let tags = json!({"tags": {}});
    // `method` on `url` with the precondition header `(name, value)`.
    let conditional = |method, url, (name, value), body| {
        arm.send(arm.call(method, url).header(name, value).json(body))
    };
    let r = conditional("PATCH", &url, ("if-match", "\"7\""), &tags).await;
    r.assert_error_message(
        412,
        "PreconditionFailed",
        "Etag provided in if-match header \"7\" does not match etag \"1\" of resource.",
    );
    let r = conditional("PATCH", &url, ("if-match", "\"1\""), &tags).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["etag"], "\"2\"");
    let create = json!({"location": "eastus"});
    let r = conditional("PUT", &url, ("if-none-match", "*"), &create).await;
    assert_eq!(r.status, 412);
    // Old api-versions ignore If-Match.
    let old = arm.url(&vmss_path(VMSS), OLD_API);
    let r = conditional("PATCH", &old, ("if-match", "\"99\""), &tags).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn put_creates_201_updates_200_and_rejects_echoed_read_only_values() {
    let emu = start(sync_config()).await;
    let arm = Arm::new(&emu);
    let body = json!({"location": "eastus", "identity": {"type": "UserAssigned", "userAssignedIdentities": {uai(APP_RG, "app-id"): {}}}});
    let r = arm.put(&vmss_path("new-vmss"), API, &body).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["etag"], "\"1\"");
    let r = arm.put(&vmss_path("new-vmss"), API, &body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["etag"], "\"2\"");
    // A GET body sent back as-is carries principalId/clientId.
    let got = arm.get(&vmss_path(VMSS), API).await.json();
    let r = arm.put(&vmss_path(VMSS), API, &got).await;
    r.assert_error(400, "InvalidIdentityValues");
    let r = arm.put(&vmss_path("no-location"), API, &json!({})).await;
    r.assert_error(400, "LocationRequired");
}

#[tokio::test]
async fn bad_input_gets_azure_errors_and_leaves_state_alone() {
    let mut cfg = config();
    cfg.arm.max_body_bytes = 64 * 1024;
    let emu = start(cfg).await;
    let arm = Arm::new(&emu);
    let url = arm.url(&vmss_path(VMSS), API);
    let huge = format!("{{\"tags\":{{\"a\":\"{}\"}}}}", "x".repeat(100 * 1024));
    let (json, bad_list) = (
        "application/json",
        "{\"identity\":{\"type\":\"UserAssigned\",\"userAssignedIdentities\":[]}}",
    );
    // (method, content type and body, status, ARM error code when one is checked)
    #[rustfmt::skip]
    let cases = [
        ("PATCH", Some((json, "{\"identity\": ")), 400, Some("InvalidRequestContent")),
        ("PATCH", Some((json, "[1,2]")), 400, Some("InvalidRequestContent")),
        ("PATCH", Some(("text/plain", "{}")), 415, Some("UnsupportedMediaType")),
        ("PATCH", None, 415, None),
        ("PATCH", Some((json, huge.as_str())), 413, Some("RequestEntityTooLarge")),
        ("DELETE", None, 405, None),
        ("PATCH", Some((json, bad_list)), 400, Some("InvalidRequestContent")),
    ];
    for (i, (method, body, status, code)) in cases.into_iter().enumerate() {
        let mut call = arm.call(method, &url);
        if let Some((content_type, body)) = body {
            call = call.raw(content_type, body);
        }
        let r = arm.send(call).await;
        match code {
            Some(code) => r.assert_error(status, code),
            None => assert_eq!(r.status, status, "case {i}"),
        }
    }
    let b = arm.get(&vmss_path(VMSS), API).await.json();
    assert_eq!(b["etag"], "\"1\"");
    assert_eq!(b["properties"]["provisioningState"], "Succeeded");
    assert_eq!(uai_keys(&b), uai_ids(&[(NODE_RG, "kubelet")]));
    assert_eq!(emu.counters().lro_started, 0);
}

#[tokio::test]
async fn writes_are_throttled_per_scale_set() {
    let emu = start(sync_config()).await;
    let arm = Arm::new(&emu);
    let p = vmss_path(VMSS);
    for i in 0..12u32 {
        let r = arm
            .patch(&p, API, &json!({"tags": {"i": i.to_string()}}))
            .await;
        assert_eq!(r.status, 200, "write {i}: {}", r.text());
        let h = r
            .header("x-ms-ratelimit-remaining-resource")
            .expect("header");
        assert!(
            h.starts_with(&format!(
                "Microsoft.Compute/PutVMScaleSetResource;{},",
                11 - i
            )),
            "{h}"
        );
        assert!(
            r.header("x-ms-ratelimit-remaining-subscription-writes")
                .is_some()
        );
    }
    let r = arm.patch(&p, API, &json!({"tags": {}})).await;
    r.assert_error(429, "OperationNotAllowed");
    // Refill is 4 per minute: one token after 15 virtual seconds (clock is manual).
    assert_eq!(r.header("retry-after").as_deref(), Some("15"));
    let e = &r.json()["error"];
    assert_eq!(e["details"][0]["code"], "TooManyRequests");
    assert_eq!(e["details"][0]["target"], "PutVMScaleSetResource");
    assert_eq!(
        e["innererror"]["internalErrorCode"],
        "TooManyRequestsReceived"
    );
    // The other scale set has its own bucket; GETs their own policy.
    assert_eq!(
        arm.patch(&vmss_path(VMSS2), API, &json!({"tags": {}}))
            .await
            .status,
        200
    );
    assert_eq!(arm.get(&p, API).await.status, 200);
    emu.clock().advance(Duration::from_secs(15));
    assert_eq!(arm.patch(&p, API, &json!({"tags": {}})).await.status, 200);
    assert_eq!(arm.patch(&p, API, &json!({"tags": {}})).await.status, 429);
    assert_eq!(emu.counters().arm_throttled, 2);
}

#[tokio::test]
async fn gets_are_throttled_by_their_own_bucket() {
    let emu = start(config()).await;
    let arm = Arm::new(&emu);
    for _ in 0..36 {
        assert_eq!(arm.get(&vmss_path(VMSS), API).await.status, 200);
    }
    let r = arm.get(&vmss_path(VMSS), API).await;
    assert_eq!(r.status, 429);
    assert_eq!(
        r.json()["error"]["details"][0]["target"],
        "GetVMScaleSetResource"
    );
    assert_eq!(r.header("retry-after").as_deref(), Some("5"));
    emu.reset_throttling();
    assert_eq!(arm.get(&vmss_path(VMSS), API).await.status, 200);
}

#[tokio::test]
async fn instances_and_identities_read_back() {
    let emu = start(config()).await;
    let arm = Arm::new(&emu);
    let r = arm
        .get(&format!("{}/virtualMachines/1", vmss_path(VMSS)), API)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["properties"]["latestModelApplied"], true);
    assert_eq!(r.json()["name"], format!("{VMSS}_1"));
    let r = arm.assign(&vmss_path(VMSS), &uai(APP_RG, "app-id")).await;
    assert_eq!(r.status, 200);
    emu.clock().advance(Duration::from_secs(60));
    let r = arm
        .get(&format!("{}/virtualMachines/1", vmss_path(VMSS)), API)
        .await;
    assert_eq!(
        r.json()["properties"]["latestModelApplied"],
        true,
        "identity changes keep instances on the latest model"
    );
    let r = arm
        .get(&format!("{}/virtualMachines/9", vmss_path(VMSS)), API)
        .await;
    assert_eq!(r.status, 404);

    let u = arm.get(&uai(APP_RG, "app-id"), "2024-11-30").await;
    assert_eq!(u.status, 200, "{}", u.text());
    let b = u.json();
    assert_eq!(
        b["type"],
        "Microsoft.ManagedIdentity/userAssignedIdentities"
    );
    assert_eq!(
        b["properties"]["clientId"],
        "c0000000-0000-4000-8000-000000000001"
    );
    assert_eq!(b["properties"]["tenantId"], TENANT);
    assert_eq!(b["properties"]["isolationScope"], "None");
    assert_eq!(
        arm.get(&uai(APP_RG, "ghost"), "2024-11-30").await.status,
        404
    );
}

#[tokio::test]
async fn identities_stripped_or_deleted_behind_the_clients_back() {
    let emu = start(sync_config()).await;
    let arm = Arm::new(&emu);
    assert_eq!(emu.assign_identities(VMSS, &["app-id", "app-2"]), 2);
    assert_eq!(
        uai_keys(&arm.get(&vmss_path(VMSS), API).await.json()).len(),
        3
    );
    assert_eq!(emu.strip_identities(VMSS, Some(&["app-id"])), 1);
    assert_eq!(
        uai_keys(&arm.get(&vmss_path(VMSS), API).await.json()).len(),
        2
    );
    // A deleted identity stays on the scale set but cannot be (re)assigned.
    assert!(emu.delete_identity("app-2"));
    assert_eq!(
        uai_keys(&arm.get(&vmss_path(VMSS), API).await.json()).len(),
        2
    );
    let r = arm.assign(&vmss_path(VMSS), &uai(APP_RG, "app-2")).await;
    assert_eq!(r.error_code(), "FailedIdentityOperation");
    // Removing it still works.
    let r = arm.unassign(&vmss_path(VMSS), &uai(APP_RG, "app-2")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(emu.strip_identities(VMSS, None), 1);
    assert!(
        arm.get(&vmss_path(VMSS), API)
            .await
            .json()
            .get("identity")
            .is_none()
    );
}

#[tokio::test]
async fn injected_faults_storms_errors_hangs_and_slow_gets() {
    let emu = start(config()).await;
    let arm = Arm::new(&emu);
    let p = vmss_path(VMSS);
    emu.inject(
        Fault::status(Service::Arm, 429, Some(7))
            .method("GET")
            .times(3),
    );
    for _ in 0..3 {
        let r = arm.get(&p, API).await;
        assert_eq!(
            (r.status, r.header("retry-after").as_deref()),
            (429, Some("7"))
        );
        assert_eq!(r.json()["error"]["details"][0]["code"], "TooManyRequests");
    }
    assert_eq!(arm.get(&p, API).await.status, 200);
    emu.inject(Fault::status(Service::Arm, 500, None).times(1));
    assert_eq!(arm.get(&p, API).await.error_code(), "InternalServerError");
    emu.inject(Fault::status(Service::Arm, 503, Some(2)).times(1));
    assert_eq!(arm.get(&p, API).await.status, 503);

    // A slow GET completes only once 30 virtual seconds pass.
    emu.inject(
        Fault::new(Service::Arm, FaultAction::Delay { seconds: 30.0 })
            .method("GET")
            .times(1),
    );
    let slow = arm.get(&p, API);
    let nudge = async {
        // The fault fires (and its virtual sleep starts) in one poll; wait for it.
        until_counters(&emu, |c| c.faults_fired >= 6).await;
        let done_early = emu.requests(0).iter().filter(|r| r.status == 200).count();
        emu.clock().advance(Duration::from_secs(30));
        done_early
    };
    let (r, done_early) = tokio::join!(slow, nudge);
    assert_eq!(r.status, 200);
    assert_eq!(
        done_early, 1,
        "the slow GET was still pending before the clock moved"
    );

    // A hang never answers.
    emu.inject(Fault::new(Service::Arm, FaultAction::Hang).times(1));
    let hung = tokio::time::timeout(Duration::from_millis(300), arm.get(&p, API)).await;
    assert!(hung.is_err(), "hung request must not complete");
    assert_eq!(arm.get(&p, API).await.status, 200);
    assert_eq!(emu.counters().faults_fired, 7);
}

#[tokio::test]
async fn request_log_and_counters_observe_traffic() {
    let emu = start(config()).await;
    let arm = Arm::new(&emu);
    arm.get(&vmss_path(VMSS), API).await;
    arm.get(&vmss_path("nope"), API).await;
    let log = emu.requests(0);
    assert_eq!(log.len(), 2);
    assert_eq!((log[0].status, log[1].status), (200, 404));
    assert_eq!(log[0].method, "GET");
    assert!(log[0].uri.contains(VMSS));
    let c = emu.counters();
    assert_eq!(c.arm_reads.get(&vmss_path(VMSS).to_lowercase()), Some(&1));
    assert_eq!(c.arm_errors, 1);
    assert_eq!(emu.requests(log[0].seq).len(), 1);
    let _: Value = json!(c);
}

#[tokio::test]
async fn expired_token_is_rejected() {
    let mut cfg = config();
    cfg.aad.token_lifetime_seconds = 0;
    let emu = start(cfg).await;
    let r = Arm::new(&emu).get(&vmss_path(VMSS), API).await;
    r.assert_error(401, "ExpiredAuthenticationToken");
}

#[tokio::test]
async fn write_durations_are_drawn_from_the_configured_range_in_seed_order() {
    let mut cfg = config();
    cfg.arm.vmss_write_seconds = 40.0;
    cfg.arm.vmss_write_seconds_max = Some(60.0);
    cfg.arm.vm_write_seconds = 10.0;
    cfg.arm.vm_write_seconds_max = Some(20.0);
    cfg.arm.write_seconds_seed = 5;
    let emu = start(cfg.clone()).await;
    let arm = Arm::new(&emu);
    // A scale set, a VM, the other scale set: each write draws its own.
    let writes = [
        (vmss_path(VMSS), true),
        (vm_path(VM), false),
        (vmss_path(VMSS2), true),
    ];
    for (path, _) in &writes {
        let r = arm.assign(path, &uai(APP_RG, "app-id")).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let ops = emu.operations();
    assert_eq!(ops.len(), 3, "{ops:?}");
    let mut expected = azure_emulator::draw::WriteDurations::new(5);
    let mut seen = Vec::new();
    for (path, scale_set) in &writes {
        let name = path.rsplit('/').next().unwrap_or_default();
        let op = ops
            .iter()
            .find(|o| {
                if *scale_set {
                    o.on_scale_set(name)
                } else {
                    o.on_vm(name)
                }
            })
            .unwrap_or_else(|| panic!("no operation on {name}: {ops:?}"));
        let want = expected.write(&cfg.arm, *scale_set);
        // Whole milliseconds of virtual time on both ends: the draw within 1 ms.
        let diff = op.duration().as_secs_f64() - want.as_secs_f64();
        assert!(diff.abs() <= 0.001, "{name}: {op:?} against {want:?}");
        let range = if *scale_set { 40.0..60.0 } else { 10.0..20.0 };
        assert!(range.contains(&op.duration().as_secs_f64()), "{op:?}");
        seen.push(op.duration());
    }
    // The scale set is Updating until its own operation's end, Succeeded after.
    let op_url = arm
        .assign(&vmss_path(VMSS), &uai(APP_RG, "app-2"))
        .await
        .header("azure-asyncoperation");
    assert!(
        op_url.is_none(),
        "a second write to a busy scale set conflicts"
    );
    emu.clock().advance(seen[0] - Duration::from_millis(1));
    assert_eq!(arm.provisioning_state(&vmss_path(VMSS)).await, "Updating");
    emu.clock().advance(Duration::from_millis(2));
    assert_eq!(arm.provisioning_state(&vmss_path(VMSS)).await, "Succeeded");
}
