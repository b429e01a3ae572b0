//! Entra ID token endpoint (docs/upstream-behaviour.md#entra-id-token-endpoint):
//! client secret, certificate assertion and federated assertion (signature
//! checked against the issuer's configured keys), v1 and v2; and the OpenID
//! discovery documents and JWKS of the emulator's own tokens.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test helpers outside #[test] fns

mod common;

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _, RSA_PKCS1_2048_8192_SHA256,
    RSA_PKCS1_SHA256, RSA_PSS_SHA256, RsaEncoding, RsaPublicKeyComponents,
};
use azure_emulator::config::{
    FederatedCredentialSeed, IssuerSeed, PermissionsSeed, PublicKeySeed, SecretSeed,
    ServicePrincipalSeed,
};
use azure_emulator::ids::{b64_any, b64std, b64url};
use azure_emulator::jwt::{Signer, thumbprints};
use azure_emulator::{Emulator, Fault, Service};
use base64::Engine as _;
use common::*;
use rustls::pki_types::PrivatePkcs8KeyDer;
use serde_json::{Value, json};

const CERT_APP: &str = "app-cert";
const WI_APP: &str = "app-wi";
const ISSUER: &str = "https://oidc.cluster.example/abc";
const SUBJECT: &str = "system:serviceaccount:default:workload";
/// Trusted through a PEM public key instead of a JWKS.
const ISSUER_PEM: &str = "https://oidc.cluster.example/pem";
/// Trusted through a JWKS holding an EC P-256 key (ES256).
const ISSUER_EC: &str = "https://oidc.cluster.example/ec";
/// Named by a federated credential, but no keys are configured for it.
const ISSUER_NO_KEYS: &str = "https://oidc.cluster.example/no-keys";
const TOKEN_EXCHANGE: &str = "api://AzureADTokenExchange";

/// The cluster issuer's service-account signing key (one per test process:
/// RSA generation is slow in debug builds).
fn issuer_key() -> &'static Signer {
    static KEY: std::sync::OnceLock<Signer> = std::sync::OnceLock::new();
    KEY.get_or_init(|| Signer::generate().expect("issuer key"))
}

/// The RSA key behind `ISSUER_PEM`.
fn pem_issuer_key() -> &'static KeyPair {
    static KEY: std::sync::OnceLock<KeyPair> = std::sync::OnceLock::new();
    KEY.get_or_init(|| KeyPair::generate(KeySize::Rsa2048).expect("rsa"))
}

/// The P-256 key behind `ISSUER_EC`.
fn ec_issuer_key() -> &'static EcdsaKeyPair {
    static KEY: std::sync::OnceLock<EcdsaKeyPair> = std::sync::OnceLock::new();
    KEY.get_or_init(|| EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("ec"))
}

fn spki_pem(key: &KeyPair) -> String {
    let der: aws_lc_rs::encoding::PublicKeyX509Der = key.public_key().as_der().expect("spki");
    let b64 = b64std(der.as_ref());
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect();
    format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        lines.join("\n")
    )
}

fn ec_jwks() -> Value {
    let point = ec_issuer_key().public_key().as_ref().to_vec();
    json!({"keys": [{"kty": "EC", "crv": "P-256", "use": "sig", "kid": "ec-1",
        "x": b64url(&point[1..33]), "y": b64url(&point[33..65])}]})
}

fn sign_es256(header: &Value, claims: &Value) -> String {
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let sig = ec_issuer_key()
        .sign(&SystemRandom::new(), input.as_bytes())
        .expect("sign");
    format!("{input}.{}", b64url(sig.as_ref()))
}

/// Service-account token claims: issuer, subject, audience, valid now.
fn sa_claims(iss: &str, sub: &str, aud: &str) -> Value {
    let t = now();
    json!({"iss": iss, "sub": sub, "aud": [aud], "nbf": t, "iat": t, "exp": t + 3600})
}

/// A service-account token signed by the cluster issuer's key (JWKS-trusted).
fn sa_signed(claims: &Value) -> String {
    let Value::Object(m) = claims else {
        panic!("claims must be an object")
    };
    issuer_key().sign_as_issuer(m).expect("sign")
}

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

/// `token` with its payload replaced by `claims`, keeping its header and
/// signature (a tampered token).
fn with_payload(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!(
        "{}.{}.{}",
        parts[0],
        b64url(claims.to_string().as_bytes()),
        parts[2]
    )
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
        federated_credentials: [ISSUER, ISSUER_PEM, ISSUER_EC, ISSUER_NO_KEYS]
            .into_iter()
            .map(|iss| FederatedCredentialSeed {
                issuer: iss.into(),
                subject: SUBJECT.into(),
                audience: TOKEN_EXCHANGE.into(),
            })
            .collect(),
        permissions: PermissionsSeed::default(),
    });
    cfg.issuers = vec![
        IssuerSeed::with_jwks(ISSUER, issuer_key().jwks()),
        IssuerSeed {
            issuer: ISSUER_PEM.into(),
            jwks: None,
            jwks_file: None,
            public_keys: vec![PublicKeySeed::Plain(spki_pem(pem_issuer_key()))],
        },
        // JSON text form of a JWKS.
        IssuerSeed::with_jwks(ISSUER_EC, Value::String(ec_jwks().to_string())),
    ];
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

/// A v1 client-credentials form with a client secret, for ARM.
fn v1_secret_form(client: &'static str, secret: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("grant_type", "client_credentials"),
        ("client_id", client),
        ("client_secret", secret),
        ("resource", ARM_RESOURCE),
    ]
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
        let r = post(&emu, &url, &v1_secret_form(MIC, MIC_SECRET)).await;
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
    let r = post(&emu, &v1u, &v1_secret_form(MIC, "wrong")).await;
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
    let wrong_tenant = format!("{}other-tenant/oauth2/token", emu.aad_url());
    let mut bad_resource = v1_secret_form(MIC, MIC_SECRET);
    bad_resource[3] = ("resource", "https://nothing.example/");
    let grant = ("grant_type", "client_credentials");
    let (client, secret) = (("client_id", MIC), ("client_secret", MIC_SECRET));
    // (endpoint, form, (status, error, AADSTS code))
    #[rustfmt::skip]
    let cases = vec![
        (&v1u, v1_secret_form("nobody", "x"), (400, "unauthorized_client", 700_016)),
        (&v1u, v1_secret_form(CERT_APP, "old"), (401, "invalid_client", 7_000_222)),
        (&wrong_tenant, v1_secret_form(MIC, MIC_SECRET), (400, "invalid_request", 90_002)),
        (&v1u, bad_resource, (400, "invalid_resource", 500_011)),
        (&v2u, vec![grant, client, secret, ("scope", "https://management.azure.com/user_impersonation")], (400, "invalid_scope", 70_011)),
        (&v2u, vec![client, secret, ("scope", "https://management.azure.com/.default")], (400, "invalid_request", 900_144)),
        (&v2u, vec![("grant_type", "password"), client], (400, "unsupported_grant_type", 70_003)),
        (&v1u, vec![grant, client, ("resource", ARM_RESOURCE)], (401, "invalid_client", 7_000_218)),
    ];
    for (url, form, (status, error, code)) in cases {
        assert_eq!(
            aad(&post(&emu, url, &form).await),
            (status, error.to_string(), code),
            "{url} {form:?}"
        );
    }
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
        // Rust azure_identity 1.0: standard padded base64 x5t.
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

/// An AADSTS refusal: the error triple, after checking no token came with it.
fn refused(r: &Reply) -> (u16, String, u64) {
    assert_ne!(r.status, 200, "{}", r.text());
    assert!(
        r.json().get("access_token").is_none(),
        "a refusal carries no token: {}",
        r.text()
    );
    aad(r)
}

#[tokio::test]
async fn federated_assertion_matches_issuer_subject_audience() {
    let (emu, _) = setup().await;
    let t = now();
    let sa = |iss: &str, sub: &str, aud: &str| sa_signed(&sa_claims(iss, sub, aud));
    let ok = with_assertion(
        &emu,
        &v2(&emu),
        WI_APP,
        &sa(ISSUER, SUBJECT, TOKEN_EXCHANGE),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let c = claims(ok.json()["access_token"].as_str().unwrap_or(""));
    assert_eq!(c["appid"].as_str(), Some(WI_APP));
    // Issuer named by no federated credential.
    let r = with_assertion(
        &emu,
        &v2(&emu),
        WI_APP,
        &sa("https://evil.example", SUBJECT, TOKEN_EXCHANGE),
    )
    .await;
    assert_eq!(refused(&r), (401, "invalid_client".into(), 700_211));
    // Wrong subject.
    let r = with_assertion(
        &emu,
        &v2(&emu),
        WI_APP,
        &sa(
            ISSUER,
            "system:serviceaccount:default:other",
            TOKEN_EXCHANGE,
        ),
    )
    .await;
    assert_eq!(refused(&r), (401, "invalid_client".into(), 700_213));
    // Wrong audience.
    let r = with_assertion(&emu, &v2(&emu), WI_APP, &sa(ISSUER, SUBJECT, "api://Other")).await;
    assert_eq!(refused(&r), (401, "invalid_client".into(), 700_212));
    // Subject matching is case-sensitive.
    let r = with_assertion(
        &emu,
        &v2(&emu),
        WI_APP,
        &sa(ISSUER, &SUBJECT.to_uppercase(), TOKEN_EXCHANGE),
    )
    .await;
    assert_eq!(refused(&r).2, 700_213);
    // Expired (well past the 300 s skew), correctly signed.
    let old = sa_signed(
        &json!({"iss": ISSUER, "sub": SUBJECT, "aud": TOKEN_EXCHANGE, "nbf": t - 7200, "exp": t - 3600}),
    );
    assert_eq!(
        refused(&with_assertion(&emu, &v2(&emu), WI_APP, &old).await),
        (400, "invalid_client".into(), 700_024)
    );
    // A UAI with a federated credential gets a token naming it.
    let app = emu.identity("app-id").expect("uai");
    let r = with_assertion(
        &emu,
        &v2(&emu),
        &app.client_id,
        &sa(ISSUER, "system:serviceaccount:apps:uai", TOKEN_EXCHANGE),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let c = claims(r.json()["access_token"].as_str().unwrap_or(""));
    assert_eq!(c["oid"].as_str(), Some(app.principal_id.as_str()));
    assert_eq!(c["xms_mirid"].as_str(), Some(app.id.as_str()));
    // A credential added at run time (az identity federated-credential
    // create) is trusted from then on; an unknown identity gets none.
    let other_sa = "system:serviceaccount:apps:added";
    let assertion = sa(ISSUER, other_sa, TOKEN_EXCHANGE);
    let r = with_assertion(&emu, &v2(&emu), &app.client_id, &assertion).await;
    assert_eq!(refused(&r).2, 700_213);
    let added = FederatedCredentialSeed {
        issuer: ISSUER.into(),
        subject: other_sa.into(),
        audience: TOKEN_EXCHANGE.into(),
    };
    assert!(emu.add_federated_credential("app-id", added.clone()));
    assert!(emu.add_federated_credential("app-id", added.clone()));
    assert!(!emu.add_federated_credential("no-such-identity", added));
    let r = with_assertion(&emu, &v2(&emu), &app.client_id, &assertion).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let fics = emu.identity("app-id").expect("uai").federated_credentials;
    assert_eq!(fics.len(), 2, "{fics:?}");
}

#[tokio::test]
async fn federated_assertion_signature_is_checked_against_issuer_keys() {
    let (emu, _) = setup().await;
    let url = v2(&emu);
    let good = sa_claims(ISSUER, SUBJECT, TOKEN_EXCHANGE);
    let kid = issuer_key().kid().to_string();
    let send = |a: String| {
        let (emu, url) = (&emu, url.clone());
        async move { with_assertion(emu, &url, WI_APP, &a).await }
    };
    // Wrong key naming the issuer's kid: the signature does not verify.
    let intruder = KeyPair::generate(KeySize::Rsa2048).expect("rsa");
    let forged = sign(
        &intruder,
        &json!({"alg": "RS256", "typ": "JWT", "kid": kid}),
        &good,
        &RSA_PKCS1_SHA256,
    );
    assert_eq!(
        refused(&send(forged).await),
        (401, "invalid_client".into(), 700_027)
    );
    // Wrong key with its own kid: the issuer publishes no such key.
    let other = Signer::generate().expect("key");
    let Value::Object(m) = &good else {
        unreachable!()
    };
    let r = send(other.sign_as_issuer(m).expect("sign")).await;
    assert_eq!(refused(&r), (401, "invalid_client".into(), 7_000_272));
    assert!(
        r.json()["error_description"]
            .as_str()
            .unwrap_or("")
            .contains(other.kid())
    );
    // No kid at all against a JWKS whose keys all have one.
    let no_kid = sign(
        &intruder,
        &json!({"alg": "RS256", "typ": "JWT"}),
        &good,
        &RSA_PKCS1_SHA256,
    );
    assert_eq!(refused(&send(no_kid).await).2, 7_000_272);
    // Garbage signature under the right kid; an unsigned token naming an
    // unknown kid; alg none.
    let garbage = format!(
        "{}.{}.{}",
        b64url(json!({"alg": "RS256", "kid": kid}).to_string().as_bytes()),
        b64url(good.to_string().as_bytes()),
        b64url(b"sig")
    );
    assert_eq!(refused(&send(garbage).await).2, 700_027);
    assert_eq!(refused(&send(unsigned(&good)).await).2, 7_000_272);
    let none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(good.to_string().as_bytes())
    );
    assert_eq!(refused(&send(none).await).2, 700_027);
    // A tampered payload under a genuine signature.
    let mut evil = good.clone();
    evil["sub"] = json!("system:serviceaccount:kube-system:admin");
    let tampered = with_payload(&sa_signed(&good), &evil);
    assert_eq!(refused(&send(tampered).await).2, 700_027);
    // Not yet valid: beyond the skew refused, within it accepted.
    let mut early = good.clone();
    early["nbf"] = json!(now() + 3600);
    assert_eq!(refused(&send(sa_signed(&early)).await).2, 700_024);
    early["nbf"] = json!(now() + 60);
    let r = send(sa_signed(&early)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Expired just inside the skew is still accepted; no exp at all is malformed.
    let mut late = good.clone();
    late["exp"] = json!(now() - 60);
    assert_eq!(send(sa_signed(&late)).await.status, 200);
    let mut no_exp = good.clone();
    no_exp.as_object_mut().expect("object").remove("exp");
    assert_eq!(
        refused(&send(sa_signed(&no_exp)).await),
        (400, "invalid_request".into(), 50_027)
    );

    // An issuer trusted through a PEM key: any kid, RS256 and PS256.
    let pem_claims = sa_claims(ISSUER_PEM, SUBJECT, TOKEN_EXCHANGE);
    for (h, alg) in [
        (
            json!({"alg": "RS256", "kid": "whatever"}),
            &RSA_PKCS1_SHA256 as &'static dyn RsaEncoding,
        ),
        (json!({"alg": "PS256"}), &RSA_PSS_SHA256),
    ] {
        let r = send(sign(pem_issuer_key(), &h, &pem_claims, alg)).await;
        assert_eq!(r.status, 200, "{h}: {}", r.text());
    }
    let r = send(sign(
        &intruder,
        &json!({"alg": "RS256"}),
        &pem_claims,
        &RSA_PKCS1_SHA256,
    ))
    .await;
    assert_eq!(refused(&r).2, 700_027);
    // The PEM issuer's key does not vouch for the JWKS issuer.
    let r = send(sign(
        pem_issuer_key(),
        &json!({"alg": "RS256", "kid": kid}),
        &good,
        &RSA_PKCS1_SHA256,
    ))
    .await;
    assert_eq!(refused(&r).2, 700_027);

    // An EC issuer (JWKS given as JSON text): ES256.
    let ec_claims = sa_claims(ISSUER_EC, SUBJECT, TOKEN_EXCHANGE);
    let r = send(sign_es256(
        &json!({"alg": "ES256", "kid": "ec-1"}),
        &ec_claims,
    ))
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // RS256 claimed against an EC key.
    let r = send(sign(
        &intruder,
        &json!({"alg": "RS256", "kid": "ec-1"}),
        &ec_claims,
        &RSA_PKCS1_SHA256,
    ))
    .await;
    assert_eq!(refused(&r).2, 700_027);

    // A federated credential's issuer with no keys configured.
    let r = send(sa_signed(&sa_claims(
        ISSUER_NO_KEYS,
        SUBJECT,
        TOKEN_EXCHANGE,
    )))
    .await;
    assert_eq!(refused(&r), (400, "invalid_request".into(), 50_166));
    assert!(
        r.json()["error_description"]
            .as_str()
            .unwrap_or("")
            .starts_with("AADSTS50166: Request to External OIDC endpoint failed.")
    );

    // Key rotation: the old key's tokens stop working, the new key's work;
    // dropping every key brings back AADSTS50166.
    let rotated = Signer::generate().expect("key");
    assert_eq!(emu.set_issuer_jwks(ISSUER, &rotated.jwks()), Ok(1));
    assert_eq!(refused(&send(sa_signed(&good)).await).2, 7_000_272);
    let r = send(rotated.sign_as_issuer(m).expect("sign")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(emu.set_issuer_jwks(ISSUER, &json!({"keys": []})), Ok(0));
    assert_eq!(
        refused(&send(rotated.sign_as_issuer(m).expect("sign")).await).2,
        50_166
    );
    assert!(emu.set_issuer_jwks(ISSUER, &json!({"nokeys": 1})).is_err());
}

#[tokio::test]
async fn bad_issuer_keys_fail_the_start() {
    let mut cfg = config();
    cfg.issuers = vec![IssuerSeed::with_jwks(
        ISSUER,
        json!({"keys": [{"kty": "RSA", "kid": "k", "n": "AQAB"}]}),
    )];
    let err = Emulator::start(cfg).await.expect_err("missing 'e'");
    assert!(err.to_string().contains(ISSUER), "{err}");
    let mut cfg = config();
    cfg.issuers = vec![IssuerSeed {
        issuer: ISSUER.into(),
        jwks: None,
        jwks_file: None,
        public_keys: vec![PublicKeySeed::Plain(
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
        )],
    }];
    assert!(Emulator::start(cfg).await.is_err());
    // A JWKS file, as `kubectl get --raw /openid/v1/jwks` writes it.
    let dir = std::env::temp_dir().join(format!("emu-jwks-{}", azure_emulator::ids::new_guid()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("jwks.json");
    std::fs::write(&file, issuer_key().jwks().to_string()).expect("write");
    let mut cfg = config();
    cfg.issuers = vec![IssuerSeed {
        issuer: ISSUER.into(),
        jwks: None,
        jwks_file: Some(file),
        public_keys: vec![],
    }];
    cfg.service_principals.push(ServicePrincipalSeed {
        client_id: WI_APP.into(),
        object_id: None,
        secrets: vec![],
        certificates: vec![],
        federated_credentials: vec![FederatedCredentialSeed {
            issuer: ISSUER.into(),
            subject: SUBJECT.into(),
            audience: TOKEN_EXCHANGE.into(),
        }],
        permissions: PermissionsSeed::default(),
    });
    let emu = start(cfg).await;
    let r = with_assertion(
        &emu,
        &v2(&emu),
        WI_APP,
        &sa_signed(&sa_claims(ISSUER, SUBJECT, TOKEN_EXCHANGE)),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let _ = std::fs::remove_dir_all(&dir);
}

async fn get_json(emu: &Emulator, url: &str) -> Value {
    let r = Call::new("GET", url).send(emu.ca_pem()).await;
    assert_eq!(r.status, 200, "{url}: {}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{url}"
    );
    r.json()
}

/// Verifies an RS256 JWT against a JWKS fetched from the emulator, the way a
/// resource server would: pick the key by `kid`, rebuild it from `n`/`e`.
fn verify_with_jwks(token: &str, jwks: &Value) -> Result<(), String> {
    let parts: Vec<&str> = token.split('.').collect();
    let [h, c, sig] = parts.as_slice() else {
        return Err("not a compact JWS".into());
    };
    let header: Value =
        serde_json::from_slice(&b64_any(h).ok_or("header b64")?).map_err(|e| e.to_string())?;
    if header["alg"] != "RS256" {
        return Err(format!("alg {}", header["alg"]));
    }
    let kid = header["kid"].as_str().ok_or("no kid")?;
    let jwk = jwks["keys"]
        .as_array()
        .ok_or("no keys")?
        .iter()
        .find(|k| k["kid"] == kid)
        .ok_or("kid not published")?;
    let n = b64_any(jwk["n"].as_str().ok_or("n")?).ok_or("n b64")?;
    let e = b64_any(jwk["e"].as_str().ok_or("e")?).ok_or("e b64")?;
    RsaPublicKeyComponents { n: &n, e: &e }
        .verify(
            &RSA_PKCS1_2048_8192_SHA256,
            format!("{h}.{c}").as_bytes(),
            &b64_any(sig).ok_or("sig b64")?,
        )
        .map_err(|_| "signature does not verify".to_string())
}

#[tokio::test]
async fn openid_discovery_publishes_the_signing_key() {
    let (emu, _) = setup().await;
    let base = emu.aad_url();
    // A token from the v1 endpoint.
    let r = post(&emu, &v1(&emu), &v1_secret_form(MIC, MIC_SECRET)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let token = r.json()["access_token"].as_str().unwrap_or("").to_string();
    let c = claims(&token);

    // v1 document: its issuer is the one the tokens carry.
    let v1doc = get_json(
        &emu,
        &format!("{base}{TENANT}/.well-known/openid-configuration"),
    )
    .await;
    assert_eq!(
        v1doc["issuer"],
        format!("https://sts.windows.net/{TENANT}/")
    );
    assert_eq!(v1doc["issuer"], c["iss"]);
    assert_eq!(v1doc["token_endpoint"], v1(&emu));
    assert_eq!(v1doc["jwks_uri"], format!("{base}common/discovery/keys"));
    // v2 document (tenant ID matched case-insensitively).
    let v2doc = get_json(
        &emu,
        &format!(
            "{base}{}/v2.0/.well-known/openid-configuration",
            TENANT.to_uppercase()
        ),
    )
    .await;
    assert_eq!(v2doc["issuer"], format!("{base}{TENANT}/v2.0"));
    assert_eq!(v2doc["token_endpoint"], v2(&emu));
    assert_eq!(
        v2doc["jwks_uri"],
        format!("{base}{TENANT}/discovery/v2.0/keys")
    );
    assert_eq!(
        v2doc["id_token_signing_alg_values_supported"],
        json!(["RS256"])
    );
    // The multi-tenant alias names the issuer with a placeholder, as Entra does.
    let common = get_json(
        &emu,
        &format!("{base}common/v2.0/.well-known/openid-configuration"),
    )
    .await;
    assert_eq!(common["issuer"], format!("{base}{{tenantid}}/v2.0"));

    // Every keys path serves the same key; fetch each over HTTPS and verify.
    for jwks_url in [
        v1doc["jwks_uri"].as_str().unwrap_or("").to_string(),
        v2doc["jwks_uri"].as_str().unwrap_or("").to_string(),
        format!("{base}common/discovery/v2.0/keys"),
        format!("{base}{TENANT}/discovery/keys"),
    ] {
        let jwks = get_json(&emu, &jwks_url).await;
        let keys = jwks["keys"].as_array().expect("keys");
        assert_eq!(keys.len(), 1, "{jwks}");
        let k = &keys[0];
        assert_eq!(
            (k["kty"].as_str(), k["use"].as_str()),
            (Some("RSA"), Some("sig"))
        );
        assert_eq!(k["e"], "AQAB");
        assert_eq!(k["x5t"], k["kid"]);
        // x5t is the base64url SHA-1 of the x5c certificate, as at Entra.
        let cert = b64_any(k["x5c"][0].as_str().expect("x5c")).expect("x5c b64");
        assert_eq!(
            k["x5t"].as_str(),
            Some(b64url(&thumbprints(&cert).0).as_str())
        );
        verify_with_jwks(&token, &jwks).unwrap_or_else(|e| panic!("{jwks_url}: {e}"));
        // A token with a changed payload does not verify with the key.
        let mut forged = c.clone();
        forged["oid"] = json!("00000000-0000-0000-0000-000000000000");
        let forged = with_payload(&token, &forged);
        assert!(verify_with_jwks(&forged, &jwks).is_err());
    }
    assert_eq!(
        emu.signing_jwks()["keys"][0]["kid"],
        get_json(&emu, &format!("{base}{TENANT}/discovery/v2.0/keys")).await["keys"][0]["kid"]
    );
    // v2 keys name their issuer.
    let v2keys = get_json(&emu, &format!("{base}{TENANT}/discovery/v2.0/keys")).await;
    assert_eq!(v2keys["keys"][0]["issuer"], format!("{base}{TENANT}/v2.0"));

    // Unknown tenant; wrong verb.
    let r = Call::new(
        "GET",
        format!("{base}other-tenant/v2.0/.well-known/openid-configuration"),
    )
    .send(emu.ca_pem())
    .await;
    assert_eq!(aad(&r), (400, "invalid_tenant".into(), 90_002));
    let r = Call::new("POST", format!("{base}{TENANT}/discovery/v2.0/keys"))
        .send(emu.ca_pem())
        .await;
    assert_eq!(r.status, 405);
    // A Host the client reached us by (a rewritten authority) is kept in URLs.
    let r = Call::new(
        "GET",
        format!("{base}{TENANT}/v2.0/.well-known/openid-configuration"),
    )
    .header("host", "login.microsoftonline.com")
    .send(emu.ca_pem())
    .await;
    assert_eq!(
        r.json()["token_endpoint"],
        format!("https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token")
    );
}

#[tokio::test]
async fn injected_aad_faults() {
    let (emu, _) = setup().await;
    emu.inject(Fault::status(Service::Aad, 503, Some(3)).times(1));
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
