//! Types 1 and 2 against the emulator's Entra ID over HTTPS (in-process, on
//! loopback): NMI's own AAD client, trusting the emulator's test CA
//! explicitly, gets v1 tokens whose `appid` is the service principal.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: failing loudly is the point"
)]

use std::collections::BTreeMap;

use azure_emulator::config::{SecretSeed, ServicePrincipalSeed};
use azure_emulator::{Config, Emulator};
use nmi::aad::{AadClient, CertKey, Credential, credential_from_secret};
use nmi::secret::Secret;

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const ARM: &str = "https://management.azure.com/";

struct Sp {
    pem: String,
    p12: Vec<u8>,
}

/// A self-signed RSA certificate and its PKCS#12 (password `pw`).
fn certificate() -> Sp {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["sp-cert".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let chain = p12_keystore::PrivateKeyChain::new(
        p12_keystore::LocalKeyId(vec![1, 2, 3, 4]),
        p12_keystore::PrivateKey::from_der(&key.serialize_der()).unwrap(),
        [p12_keystore::Certificate::from_der(cert.der()).unwrap()],
    );
    let mut store = p12_keystore::KeyStore::new();
    store.add_entry("sp", p12_keystore::KeyStoreEntry::PrivateKeyChain(chain));
    Sp {
        pem: cert.pem(),
        p12: store.writer("pw").write().unwrap(),
    }
}

async fn emulator(cert_pem: &str) -> Emulator {
    let mut cfg = Config::new(TENANT, "00000000-0000-0000-0000-0000000000aa");
    let seed = |client_id: &str, secrets: Vec<SecretSeed>, certificates: Vec<String>| {
        ServicePrincipalSeed {
            client_id: client_id.into(),
            object_id: None,
            secrets,
            certificates,
            federated_credentials: Vec::new(),
            permissions: Default::default(),
        }
    };
    cfg.service_principals = vec![
        seed(
            "sp-secret",
            vec![SecretSeed::Plain("s3cr3t".into())],
            vec![],
        ),
        seed("sp-cert", vec![], vec![cert_pem.to_string()]),
    ];
    Emulator::start(cfg).await.unwrap()
}

/// `sp-secret`'s token for ARM with its right secret, asked by `client` of
/// `emu`'s AAD in `tenant`.
async fn secret_token(
    client: &AadClient,
    emu: &Emulator,
    tenant: &str,
) -> Result<nmi::response::Token, nmi::token::TokenError> {
    let cred = Credential::Secret(Secret::new("s3cr3t"));
    client
        .token(&emu.aad_url(), tenant, "sp-secret", &cred, ARM)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_principals_get_tokens_from_aad() {
    let sp = certificate();
    let emu = emulator(&sp.pem).await;
    let client = AadClient::new(Some(emu.ca_bundle_path()), "nmi-test").unwrap();

    // Type 1: a secret's only key.
    let data: BTreeMap<String, Vec<u8>> = [("k".into(), b"s3cr3t".to_vec())].into();
    let cred = credential_from_secret(&data, false).unwrap().credential;
    let t = client
        .token(&emu.aad_url(), TENANT, "sp-secret", &cred, ARM)
        .await
        .unwrap();
    let claims = emu.verify_token(t.access_token.expose()).unwrap();
    assert_eq!(claims.appid, "sp-secret");
    assert_eq!(t.resource, ARM);
    assert!(t.expires_on > nmi::token::now_secs());

    // A wrong secret is AAD's refusal: 403 to the pod with AAD's text.
    let wrong = Credential::Secret(Secret::new("nope"));
    let e = client
        .token(&emu.aad_url(), TENANT, "sp-secret", &wrong, ARM)
        .await
        .unwrap_err();
    assert_eq!(e.status(), 403);
    assert!(e.to_string().contains("AADSTS7000215"), "{e}");

    // Type 2: PKCS#12 and password from the Secret.
    let data: BTreeMap<String, Vec<u8>> = [
        ("certificate".into(), sp.p12.clone()),
        ("password".into(), b"pw".to_vec()),
    ]
    .into();
    let cred = credential_from_secret(&data, true).unwrap().credential;
    let t = client
        .token(&emu.aad_url(), TENANT, "sp-cert", &cred, ARM)
        .await
        .unwrap();
    assert_eq!(
        emu.verify_token(t.access_token.expose()).unwrap().appid,
        "sp-cert"
    );
    // A wrong PKCS#12 password never reaches AAD.
    assert!(CertKey::from_pkcs12(&sp.p12, "wrong").is_err());

    // Another tenant is AAD's refusal too (the emulator knows one tenant).
    let e = secret_token(&client, &emu, "other-tenant")
        .await
        .unwrap_err();
    assert_eq!(e.status(), 403, "{e}");

    // Trusting another CA, the TLS handshake fails: 503, nothing sent.
    let other = certificate();
    let path = std::env::temp_dir().join(format!("nmi-other-ca-{}.pem", std::process::id()));
    std::fs::write(&path, &other.pem).unwrap();
    let untrusting = AadClient::new(Some(&path), "nmi-test").unwrap();
    std::fs::remove_file(&path).unwrap();
    let e = secret_token(&untrusting, &emu, TENANT).await.unwrap_err();
    assert_eq!(e.status(), 503, "{e}");
}

/// A PKCS#12 written by the `openssl` command (AES-256 and legacy 3DES), as
/// users create them, is read too. Skipped without `openssl`.
#[test]
fn openssl_pkcs12_files_are_read() {
    let dir = std::env::temp_dir().join(format!("nmi-p12-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["x".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    for extra in [&[][..], &["-legacy"][..]] {
        let out = std::process::Command::new("openssl")
            .args(["pkcs12", "-export", "-passout", "pass:pw", "-inkey"])
            .arg(dir.join("key.pem"))
            .arg("-in")
            .arg(dir.join("cert.pem"))
            .arg("-out")
            .arg(dir.join("c.p12"))
            .args(extra)
            .output();
        let Ok(out) = out else {
            eprintln!("openssl not found; skipped");
            break;
        };
        if !out.status.success() {
            eprintln!(
                "openssl {extra:?} failed (skipped): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            continue;
        }
        let p12 = std::fs::read(dir.join("c.p12")).unwrap();
        let k = CertKey::from_pkcs12(&p12, "pw").unwrap_or_else(|e| panic!("{extra:?}: {e}"));
        assert!(!k.x5t().is_empty());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
