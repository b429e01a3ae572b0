//! Real Azure SDK clients against the emulator: `azure_identity` 1.x
//! `ClientSecretCredential` on the AAD endpoint, and a thin ARM client over
//! `azure_core`'s `Pipeline` with `BearerTokenAuthorizationPolicy` doing a
//! PATCH + LRO round trip (the client MIC will use).
//!
//! The SDK trusts the test CA only through `SSL_CERT_FILE`, which is
//! process-wide and cannot be set from a test without `unsafe`; so the parent
//! test writes the CA and bundle, then re-runs this test binary on the child
//! test with the variable set.

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::{Secret, TokenCredential};
use azure_core::http::headers::HeaderName;
use azure_core::http::policies::auth::BearerTokenAuthorizationPolicy;
use azure_core::http::{ClientOptions, Context, Method, Pipeline, RawResponse, Request, Url};
use azure_emulator::{Emulator, Fault, Service};
use azure_identity::{ClientSecretCredential, ClientSecretCredentialOptions};
use common::*;
use serde_json::{Value, json};

const ENV: &str = "AZEMU_SDK";

aadpodid_testkit::emulator_ca_parent_test!(sdk_clients_against_the_emulator, "AZEMU_SDK", 1, 180);

fn credential(emu: &Emulator, secret: &str) -> anyhow::Result<Arc<ClientSecretCredential>> {
    let mut custom = CustomConfiguration::default();
    custom.authority_host = emu.aad_url();
    let mut options = ClientSecretCredentialOptions::default();
    options.client_options.cloud = Some(Arc::new(CloudConfiguration::Custom(custom)));
    Ok(ClientSecretCredential::new(
        TENANT,
        MIC.to_string(),
        Secret::new(secret.to_string()),
        Some(options),
    )?)
}

/// The thin ARM client: one pipeline, bearer policy with the ARM scope.
struct ArmClient {
    pipeline: Pipeline,
    base: String,
}

impl ArmClient {
    fn new(emu: &Emulator, cred: Arc<ClientSecretCredential>) -> Self {
        let bearer =
            BearerTokenAuthorizationPolicy::new(cred, ["https://management.azure.com/.default"]);
        let pipeline = Pipeline::new(
            Some("azemu-test"),
            Some("0.1.0"),
            ClientOptions::default(),
            vec![],
            vec![Arc::new(bearer)],
            None,
        );
        Self {
            pipeline,
            base: emu.arm_url(),
        }
    }

    async fn try_send(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<azure_core::Result<RawResponse>> {
        let mut req = Request::new(Url::parse(url)?, method);
        if let Some(b) = body {
            req.insert_header("content-type", "application/json");
            req.set_body(serde_json::to_vec(b)?);
        }
        // Non-2xx answers become errors carrying ARM's `error.code` and message.
        Ok(self.pipeline.send(&Context::new(), &mut req, None).await)
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, RawResponse)> {
        let resp = self.try_send(method, url, body).await??;
        Ok((u16::from(resp.status()), resp))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}?api-version={API}", self.base)
    }
}

fn body_json(r: &RawResponse) -> anyhow::Result<Value> {
    Ok(serde_json::from_slice(r.body())?)
}

#[tokio::test]
#[ignore = "run by sdk_clients_against_the_emulator in a child process that trusts the emulator CA"]
async fn child_sdk_round_trip() -> anyhow::Result<()> {
    let child = aadpodid_testkit::children::ChildEnv::get(ENV)
        .context("needs the environment sdk_clients_against_the_emulator sets; run that test")?;
    let mut cfg = config();
    // 1000x: the 45 s scale-set write takes 45 ms of real time.
    cfg.clock.speed = 1000.0;
    cfg.listen.ca_cert_pem_file = Some(child.ca_cert);
    cfg.listen.ca_key_pem_file = Some(child.ca_key);
    let emu = Emulator::start(cfg).await?;

    // Client secret credential, v2 endpoint, numeric expires_in.
    let cred = credential(&emu, MIC_SECRET)?;
    let token = cred
        .get_token(&["https://management.azure.com/.default"], None)
        .await
        .context("token from emulator AAD")?;
    let claims = emu
        .verify_token(token.token.secret())
        .map_err(|e| anyhow!("ARM refuses the SDK's token: {e:?}"))?;
    assert_eq!(claims.appid, MIC);
    let bad = credential(&emu, "wrong")?
        .get_token(&["https://management.azure.com/.default"], None)
        .await;
    let Err(bad) = bad else {
        bail!("a wrong secret got a token");
    };
    let msg = format!("{bad:?}");
    assert!(msg.contains("AADSTS7000215"), "{msg}");

    // GET, PATCH (null-valued removal and {} addition), LRO polling.
    let arm = ArmClient::new(&emu, cred);
    let (status, got) = arm
        .send(Method::Get, &arm.url(&vmss_path(VMSS)), None)
        .await?;
    assert_eq!(status, 200);
    let rate = got
        .headers()
        .get_optional_str(&HeaderName::from_static(
            "x-ms-ratelimit-remaining-resource",
        ))
        .map(String::from);
    assert!(rate.is_some_and(|r| r.contains("GetVMScaleSetResource")));
    assert_eq!(
        uai_keys(&body_json(&got)?),
        uai_ids(&[(NODE_RG, "kubelet")])
    );

    let patch = json!({"identity": {"type": "UserAssigned", "userAssignedIdentities": {
        uai(APP_RG, "app-id"): {}, uai(APP_RG, "app-2"): {}, uai(NODE_RG, "kubelet"): null }}});
    let (status, resp) = arm
        .send(Method::Patch, &arm.url(&vmss_path(VMSS)), Some(&patch))
        .await?;
    assert_eq!(status, 200, "{:?}", String::from_utf8_lossy(resp.body()));
    assert_eq!(
        body_json(&resp)?["properties"]["provisioningState"],
        "Updating"
    );
    let op = resp
        .headers()
        .get_optional_str(&HeaderName::from_static("azure-asyncoperation"))
        .context("Azure-AsyncOperation")?
        .to_string();
    let mut final_status = String::new();
    for _ in 0..500 {
        let (s, r) = arm.send(Method::Get, &op, None).await?;
        assert_eq!(s, 200);
        final_status = body_json(&r)?["status"].as_str().unwrap_or("").to_string();
        if final_status != "InProgress" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(final_status, "Succeeded");
    let (_, got) = arm
        .send(Method::Get, &arm.url(&vmss_path(VMSS)), None)
        .await?;
    let b = body_json(&got)?;
    assert_eq!(b["properties"]["provisioningState"], "Succeeded");
    assert_eq!(
        uai_keys(&b),
        uai_ids(&[(APP_RG, "app-2"), (APP_RG, "app-id")])
    );

    // ARM errors come back as responses the client can parse.
    let ghost = json!({"identity": {"type": "UserAssigned", "userAssignedIdentities": {uai(APP_RG, "ghost"): {}}}});
    let err = arm
        .try_send(Method::Patch, &arm.url(&vmss_path(VMSS)), Some(&ghost))
        .await?;
    let Err(err) = err else {
        bail!("the ghost identity was accepted");
    };
    let text = format!("{err:?}");
    assert!(
        text.contains("status: BadRequest") && text.contains("FailedIdentityOperation"),
        "{text}"
    );

    // The pipeline retries a throttled GET after Retry-After (1 s, real).
    emu.inject(
        Fault::status(Service::Arm, 429, Some(1))
            .method("GET")
            .times(1),
    );
    let (status, _) = arm
        .send(Method::Get, &arm.url(&vmss_path(VMSS)), None)
        .await?;
    assert_eq!(status, 200);
    assert_eq!(emu.counters().arm_throttled, 1);
    Ok(())
}
