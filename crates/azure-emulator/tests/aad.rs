//! Entra ID token endpoint contract (azure-protocols.md §7 points 27-34):
//! client secret, certificate assertion and federated assertion, v1 and v2.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test helpers outside #[test] fns

mod common;

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RSA_PSS_SHA256, RsaEncoding};
use azure_emulator::config::{
    FederatedCredentialSeed, PermissionsSeed, SecretSeed, ServicePrincipalSeed,
};
use azure_emulator::ids::{b64std, b64url};
use azure_emulator::jwt::thumbprints;
use azure_emulator::{Emulator, Fault, FaultAction, Service};
use base64::Engine as _;
use common::*;
use rustls::pki_types::PrivatePkcs8KeyDer;
use serde_json::{Value, json};

const CERT_APP: &str = "app-cert";
const WI_APP: &str = "app-wi";
const ISSUER: &str = "https://oidc.cluster.example/abc";
const SUBJECT: &str = "system:serviceaccount:default:workload";

struct CertKey {
    key: KeyPair,
    der: Vec<u8>,
    pem: String,
}

fn cert_key() -> CertKey {
    let key = KeyPair::generate(KeySize::Rsa2048).expect("rsa");
    let pkcs8: Pkcs8V1Der = key.as_der().expect("pkcs8");
    let rc = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(pkcs8.as_ref().to_vec()),
        &rcgen::PKCS_RSA_SHA256,
    )
    .expect("rcgen key");
    let cert = rcgen::CertificateParams::new(vec!["app-cert".to_string()])
        .expect("params")
        .self_signed(&rc)
        .expect("cert");
    CertKey {
        key,
        der: cert.der().to_vec(),
        pem: cert.pem(),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn sign(key: &KeyPair, header: &Value, claims: &Value, alg: &'static dyn RsaEncoding) -> String {
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let mut sig = vec![0u8; key.public_modulus_len()];
    key.sign(alg, &SystemRandom::new(), input.as_bytes(), &mut sig)
        .expect("sign");
    format!("{input}.{}", b64url(&sig))
}

fn unsigned(claims: &Value) -> String {
    format!(
        "{}.{}.{}",
        b64url(br#"{"alg":"RS256","typ":"JWT","kid":"sa-key"}"#),
        b64url(claims.to_string().as_bytes()),
        b64url(b"sig")
    )
}

async fn setup() -> (Emulator, CertKey) {
    let ck = cert_key();
    let mut cfg = config();
    cfg.service_principals.push(ServicePrincipalSeed {
        client_id: CERT_APP.into(),
        object_id: None,
        secrets: vec![SecretSeed::Detailed {
            value: "old".into(),
            expires_on: Some(1),
        }],
        certificates: vec![ck.pem.clone()],
        federated_credentials: vec![],
        permissions: PermissionsSeed::default(),
    });
    cfg.service_principals.push(ServicePrincipalSeed {
        client_id: WI_APP.into(),
        object_id: None,
        secrets: vec![],
        certificates: vec![],
        federated_credentials: vec![FederatedCredentialSeed {
            issuer: ISSUER.into(),
            subject: SUBJECT.into(),
            audience: "api://AzureADTokenExchange".into(),
        }],
        permissions: PermissionsSeed::default(),
    });
    cfg.identities[1]
        .federated_credentials
        .push(FederatedCredentialSeed {
            issuer: ISSUER.into(),
            subject: "system:serviceaccount:apps:uai".into(),
            audience: "api://AzureADTokenExchange".into(),
        });
    (start(cfg).await, ck)
}

fn v1(emu: &Emulator) -> String {
    format!("{}{TENANT}/oauth2/token", emu.aad_url())
}
fn v2(emu: &Emulator) -> String {
    format!("{}{TENANT}/oauth2/v2.0/token", emu.aad_url())
}

async fn post(emu: &Emulator, url: &str, form: &[(&str, &str)]) -> Reply {
    Call::new("POST", url).form(form).send(emu.ca_pem()).await
}

fn aad(r: &Reply) -> (u16, String, u64) {
    let b = r.json();
    (
        r.status,
        b["error"].as_str().unwrap_or("").into(),
        b["error_codes"][0].as_u64().unwrap_or(0),
    )
}

#[tokio::test]
async fn v1_secret_success_is_all_strings_in_order() {
    let (emu, _) = setup().await;
    for url in [v1(&emu), format!("{}?api-version=1.0", v1(&emu))] {
        let r = post(
            &emu,
            &url,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", MIC),
                ("client_secret", MIC_SECRET),
                ("resource", ARM_RESOURCE),
            ],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let text = r.text();
        let order: Vec<usize> = [
            "token_type",
            "expires_in",
            "ext_expires_in",
            "expires_on",
            "not_before",
            "resource",
            "access_token",
        ]
        .iter()
        .map(|f| text.find(&format!("\"{f}\"")).expect("field present"))
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "field order: {text}");
        let b = r.json();
        assert!(
            b.as_object()
                .is_some_and(|m| m.values().all(Value::is_string)),
            "{b}"
        );
        assert_eq!(b["resource"], ARM_RESOURCE);
        assert_eq!(b["expires_in"], "3599");
        let c = claims(b["access_token"].as_str().unwrap_or(""));
        for f in ["aud", "tid", "oid", "appid", "iat", "nbf", "exp"] {
            assert!(!c[f].is_null(), "claim {f}");
        }
        assert_eq!(
            (
                c["aud"].as_str(),
                c["tid"].as_str(),
                c["appid"].as_str(),
                c["oid"].as_str()
            ),
            (Some(ARM_RESOURCE), Some(TENANT), Some(MIC), Some(MIC_OID))
        );
        assert_eq!(
            b["expires_on"].as_str(),
            Some(c["exp"].to_string().as_str())
        );
        let verified = emu
            .verify_token(b["access_token"].as_str().unwrap_or(""))
            .expect("ARM accepts it");
        assert_eq!(verified.oid, MIC_OID);
    }
}

#[tokio::test]
async fn v2_secret_success_has_numbers_and_no_resource() {
    let (emu, _) = setup().await;
    let r = post(
        &emu,
        &v2(&emu),
        &[
            ("client_id", MIC),
            ("client_secret", MIC_SECRET),
            ("grant_type", "client_credentials"),
            ("scope", "https://management.azure.com/.default"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let b = r.json();
    assert_eq!(b["token_type"], "Bearer");
    assert!(b["expires_in"].is_u64() && b["ext_expires_in"].is_u64());
    for absent in ["resource", "expires_on", "not_before"] {
        assert!(
            b.get(absent).is_none(),
            "{absent} must not be in a v2 answer"
        );
    }
    let c = claims(b["access_token"].as_str().unwrap_or(""));
    assert_eq!(c["aud"], "https://management.azure.com");
    assert!(
        emu.verify_token(b["access_token"].as_str().unwrap_or(""))
            .is_ok()
    );
    // HTTP Basic client authentication.
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{MIC}:{MIC_SECRET}"));
    let r = Call::new("POST", v2(&emu))
        .header("authorization", &format!("Basic {basic}"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", "https://management.azure.com/.default"),
        ])
        .send(emu.ca_pem())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(emu.counters().aad_token_requests.get(MIC), Some(&2));
}

#[tokio::test]
async fn errors_have_aadsts_codes_and_the_full_shape() {
    let (emu, _) = setup().await;
    let (v1u, v2u) = (v1(&emu), v2(&emu));
    let base = |id: &'static str, secret: &'static str| {
        vec![
            ("grant_type", "client_credentials"),
            ("client_id", id),
            ("client_secret", secret),
            ("resource", ARM_RESOURCE),
        ]
    };
    let r = post(&emu, &v1u, &base(MIC, "wrong")).await;
    assert_eq!(aad(&r), (401, "invalid_client".into(), 7_000_215));
    let b = r.json();
    for f in [
        "error_description",
        "timestamp",
        "trace_id",
        "correlation_id",
        "error_uri",
    ] {
        assert!(b[f].is_string(), "{f}");
    }
    assert!(
        b["error_description"]
            .as_str()
            .unwrap_or("")
            .starts_with("AADSTS7000215: Invalid client secret provided.")
    );
    assert_eq!(
        aad(&post(&emu, &v1u, &base("nobody", "x")).await),
        (400, "unauthorized_client".into(), 700_016)
    );
    assert_eq!(
        aad(&post(&emu, &v1u, &base(CERT_APP, "old")).await),
        (401, "invalid_client".into(), 7_000_222)
    );
    let wrong_tenant = format!("{}other-tenant/oauth2/token", emu.aad_url());
    assert_eq!(
        aad(&post(&emu, &wrong_tenant, &base(MIC, MIC_SECRET)).await),
        (400, "invalid_request".into(), 90_002)
    );
    let mut f = base(MIC, MIC_SECRET);
    f[3] = ("resource", "https://nothing.example/");
    assert_eq!(
        aad(&post(&emu, &v1u, &f).await),
        (400, "invalid_resource".into(), 500_011)
    );
    let r = post(
        &emu,
        &v2u,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", MIC),
            ("client_secret", MIC_SECRET),
            ("scope", "https://management.azure.com/user_impersonation"),
        ],
    )
    .await;
    assert_eq!(aad(&r), (400, "invalid_scope".into(), 70_011));
    let r = post(
        &emu,
        &v2u,
        &[
            ("client_id", MIC),
            ("client_secret", MIC_SECRET),
            ("scope", "https://management.azure.com/.default"),
        ],
    )
    .await;
    assert_eq!(aad(&r), (400, "invalid_request".into(), 900_144));
    let r = post(
        &emu,
        &v2u,
        &[("grant_type", "password"), ("client_id", MIC)],
    )
    .await;
    assert_eq!(aad(&r), (400, "unsupported_grant_type".into(), 70_003));
    let r = post(
        &emu,
        &v1u,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", MIC),
            ("resource", ARM_RESOURCE),
        ],
    )
    .await;
    assert_eq!(aad(&r), (401, "invalid_client".into(), 7_000_218));
    // Bad input: wrong content type, GET, oversized body.
    let r = Call::new("POST", &v1u)
        .raw(
            "application/json",
            "{\"grant_type\":\"client_credentials\"}",
        )
        .send(emu.ca_pem())
        .await;
    assert_eq!(aad(&r).0, 400);
    let r = Call::new("GET", &v1u).send(emu.ca_pem()).await;
    assert_eq!(aad(&r), (400, "invalid_request".into(), 900_561));
    let r = Call::new("POST", &v1u)
        .raw(
            "application/x-www-form-urlencoded",
            vec![b'a'; 2 * 1024 * 1024],
        )
        .send(emu.ca_pem())
        .await;
    assert_eq!(r.status, 413);
    assert!(emu.counters().aad_errors >= 12);
}

fn assertion_claims(aud: &str, iss: &str) -> Value {
    let t = now();
    json!({"aud": aud, "iss": iss, "sub": iss, "jti": "7fe8c31d", "nbf": t, "exp": t + 300})
}

async fn with_assertion(emu: &Emulator, url: &str, client: &str, assertion: &str) -> Reply {
    post(
        emu,
        url,
        &[
            ("client_id", client),
            ("scope", "https://management.azure.com/.default"),
            ("resource", ARM_RESOURCE),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
            ("grant_type", "client_credentials"),
        ],
    )
    .await
}

#[tokio::test]
async fn certificate_assertion_in_every_thumbprint_form() {
    let (emu, ck) = setup().await;
    let (sha1, sha256) = thumbprints(&ck.der);
    let aud_v2 = format!("https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token");
    let aud_v1 = format!("https://login.microsoftonline.com/{TENANT}/oauth2/token?api-version=1.0");
    let cases: Vec<(Value, &'static dyn RsaEncoding, &str, String)> = vec![
        // Rust azure_identity 1.0: standard padded base64 x5t (azure-apis.md §2.3).
        (
            json!({"alg": "RS256", "typ": "JWT", "x5t": b64std(&sha1)}),
            &RSA_PKCS1_SHA256,
            "v2",
            aud_v2.clone(),
        ),
        // adal: padded base64url, v1 aud with ?api-version=1.0.
        (
            json!({"alg": "RS256", "x5t": base64::engine::general_purpose::URL_SAFE.encode(&sha1)}),
            &RSA_PKCS1_SHA256,
            "v1",
            aud_v1,
        ),
        // Current docs: PS256 + x5t#S256.
        (
            json!({"alg": "PS256", "typ": "JWT", "x5t#S256": b64url(&sha256)}),
            &RSA_PSS_SHA256,
            "v2",
            aud_v2.clone(),
        ),
    ];
    for (header, alg, ver, aud) in cases {
        let a = sign(&ck.key, &header, &assertion_claims(&aud, CERT_APP), alg);
        let url = if ver == "v1" { v1(&emu) } else { v2(&emu) };
        let r = with_assertion(&emu, &url, CERT_APP, &a).await;
        assert_eq!(r.status, 200, "{header}: {}", r.text());
    }
    let h = json!({"alg": "RS256", "typ": "JWT", "x5t": b64std(&sha1)});
    // Signed by another key.
    let other = cert_key();
    let bad = sign(
        &other.key,
        &h,
        &assertion_claims(&aud_v2, CERT_APP),
        &RSA_PKCS1_SHA256,
    );
    assert_eq!(
        aad(&with_assertion(&emu, &v2(&emu), CERT_APP, &bad).await),
        (401, "invalid_client".into(), 700_027)
    );
    // Unknown thumbprint.
    let (osha1, _) = thumbprints(&other.der);
    let unknown = sign(
        &other.key,
        &json!({"alg": "RS256", "x5t": b64std(&osha1)}),
        &assertion_claims(&aud_v2, CERT_APP),
        &RSA_PKCS1_SHA256,
    );
    let r = with_assertion(&emu, &v2(&emu), CERT_APP, &unknown).await;
    assert_eq!(aad(&r), (401, "invalid_client".into(), 700_027));
    // iss/sub not the client.
    let wrong_iss = sign(
        &ck.key,
        &h,
        &assertion_claims(&aud_v2, "someone"),
        &RSA_PKCS1_SHA256,
    );
    assert_eq!(
        aad(&with_assertion(&emu, &v2(&emu), CERT_APP, &wrong_iss).await).2,
        700_021
    );
    // Expired.
    let mut c = assertion_claims(&aud_v2, CERT_APP);
    c["nbf"] = json!(now() - 7200);
    c["exp"] = json!(now() - 3600);
    let expired = sign(&ck.key, &h, &c, &RSA_PKCS1_SHA256);
    assert_eq!(
        aad(&with_assertion(&emu, &v2(&emu), CERT_APP, &expired).await).2,
        700_024
    );
    // Audience of another tenant.
    let elsewhere = sign(
        &ck.key,
        &h,
        &assertion_claims(
            "https://login.microsoftonline.com/other/oauth2/v2.0/token",
            CERT_APP,
        ),
        &RSA_PKCS1_SHA256,
    );
    assert_eq!(
        aad(&with_assertion(&emu, &v2(&emu), CERT_APP, &elsewhere).await).0,
        400
    );
    // Malformed.
    assert_eq!(
        aad(&with_assertion(&emu, &v2(&emu), CERT_APP, "garbage").await),
        (400, "invalid_request".into(), 50_027)
    );
}

#[tokio::test]
async fn federated_assertion_matches_issuer_subject_audience() {
    let (emu, _) = setup().await;
    let t = now();
    let sa = |iss: &str, sub: &str, aud: &str| {
        unsigned(
            &json!({"iss": iss, "sub": sub, "aud": [aud], "nbf": t, "iat": t, "exp": t + 3600}),
        )
    };
    let ok = with_assertion(
        &emu,
        &v2(&emu),
        WI_APP,
        &sa(ISSUER, SUBJECT, "api://AzureADTokenExchange"),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let r = with_assertion(
        &emu,
        &v2(&emu),
        WI_APP,
        &sa(
            "https://evil.example",
            SUBJECT,
            "api://AzureADTokenExchange",
        ),
    )
    .await;
    assert_eq!(aad(&r), (401, "invalid_client".into(), 700_211));
    let r = with_assertion(
        &emu,
        &v2(&emu),
        WI_APP,
        &sa(
            ISSUER,
            "system:serviceaccount:default:other",
            "api://AzureADTokenExchange",
        ),
    )
    .await;
    assert_eq!(aad(&r).2, 700_213);
    let r = with_assertion(&emu, &v2(&emu), WI_APP, &sa(ISSUER, SUBJECT, "api://Other")).await;
    assert_eq!(aad(&r).2, 700_212);
    // Subject matching is case-sensitive.
    let r = with_assertion(
        &emu,
        &v2(&emu),
        WI_APP,
        &sa(
            ISSUER,
            &SUBJECT.to_uppercase(),
            "api://AzureADTokenExchange",
        ),
    )
    .await;
    assert_eq!(aad(&r).2, 700_213);
    let old = unsigned(
        &json!({"iss": ISSUER, "sub": SUBJECT, "aud": "api://AzureADTokenExchange", "nbf": t - 7200, "exp": t - 3600}),
    );
    assert_eq!(
        aad(&with_assertion(&emu, &v2(&emu), WI_APP, &old).await).2,
        700_024
    );
    // A UAI with a federated credential gets a token naming it.
    let app = emu.identity("app-id").expect("uai");
    let r = with_assertion(
        &emu,
        &v2(&emu),
        &app.client_id,
        &sa(
            ISSUER,
            "system:serviceaccount:apps:uai",
            "api://AzureADTokenExchange",
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let c = claims(r.json()["access_token"].as_str().unwrap_or(""));
    assert_eq!(c["oid"].as_str(), Some(app.principal_id.as_str()));
    assert_eq!(c["xms_mirid"].as_str(), Some(app.id.as_str()));
}

#[tokio::test]
async fn injected_aad_faults() {
    let (emu, _) = setup().await;
    emu.inject(
        Fault::new(
            Service::Aad,
            FaultAction::Status {
                status: 503,
                retry_after: Some(3),
            },
        )
        .times(1),
    );
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", MIC),
        ("client_secret", MIC_SECRET),
        ("resource", ARM_RESOURCE),
    ];
    let r = post(&emu, &v1(&emu), &form).await;
    assert_eq!(
        (r.status, r.header("retry-after").as_deref()),
        (503, Some("3"))
    );
    assert_eq!(r.json()["error"], "temporarily_unavailable");
    assert_eq!(post(&emu, &v1(&emu), &form).await.status, 200);
}
