//! Types 1 and 2 against the emulator's Entra ID over HTTPS (in-process, on
//! loopback): NMI's own AAD client, trusting the emulator's test CA
//! explicitly, gets v1 tokens whose `appid` is the service principal.

use std::collections::BTreeMap;

use anyhow::{Context as _, anyhow};
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
fn certificate() -> anyhow::Result<Sp> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)?;
    let cert = rcgen::CertificateParams::new(vec!["sp-cert".into()])?.self_signed(&key)?;
    let p12_err = |e| anyhow!("PKCS#12: {e:?}");
    let chain = p12_keystore::PrivateKeyChain::new(
        p12_keystore::LocalKeyId(vec![1, 2, 3, 4]),
        p12_keystore::PrivateKey::from_der(&key.serialize_der()).map_err(p12_err)?,
        [p12_keystore::Certificate::from_der(cert.der()).map_err(p12_err)?],
    );
    let mut store = p12_keystore::KeyStore::new();
    store.add_entry("sp", p12_keystore::KeyStoreEntry::PrivateKeyChain(chain));
    Ok(Sp {
        pem: cert.pem(),
        p12: store.writer("pw").write().map_err(p12_err)?,
    })
}

/// The emulator with two service principals: `sp-secret` (secret
/// `s3cr3t`) and `sp-cert` (certificate `cert_pem`).
async fn emulator(cert_pem: &str) -> anyhow::Result<Emulator> {
    let mut cfg = Config::new(TENANT, "00000000-0000-0000-0000-0000000000aa");
    cfg.service_principals = serde_json::from_value(serde_json::json!([
        {"clientId": "sp-secret", "secrets": ["s3cr3t"]},
        {"clientId": "sp-cert", "certificates": [cert_pem]},
    ]))?;
    Ok(Emulator::start(cfg).await?)
}

/// `client`'s request to `emu`'s AAD in `tenant` for an ARM token of the
/// service principal `sp` with `cred`.
async fn ask(
    client: &AadClient,
    emu: &Emulator,
    tenant: &str,
    sp: &str,
    cred: &Credential,
) -> Result<nmi::response::Token, nmi::token::TokenError> {
    client.token(&emu.aad_url(), tenant, sp, cred, ARM).await
}

/// The credential NMI reads from a Secret holding `data` (a certificate
/// when `certificate`).
fn from_secret(data: &[(&str, &[u8])], certificate: bool) -> anyhow::Result<Credential> {
    let data: BTreeMap<String, Vec<u8>> = data
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect();
    let read = credential_from_secret(&data, certificate).map_err(|e| anyhow!(e))?;
    Ok(read.credential)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_principals_get_tokens_from_aad() -> anyhow::Result<()> {
    let sp = certificate()?;
    let emu = emulator(&sp.pem).await?;
    let client = AadClient::new(Some(emu.ca_bundle_path()), "nmi-test").map_err(|e| anyhow!(e))?;
    let verified = |token: &nmi::response::Token| {
        emu.verify_token(token.access_token.expose())
            .map_err(|e| anyhow!("{e:?}"))
    };
    let refused =
        |answer: Result<nmi::response::Token, _>| answer.err().context("AAD gave a token");

    // Type 1: a secret's only key.
    let cred = from_secret(&[("k", b"s3cr3t")], false)?;
    let t = ask(&client, &emu, TENANT, "sp-secret", &cred).await?;
    assert_eq!(verified(&t)?.appid, "sp-secret");
    assert_eq!(t.resource, ARM);
    assert!(t.expires_on > nmi::token::now_secs());

    // A wrong secret is AAD's refusal: 403 to the pod with AAD's text.
    let wrong = Credential::Secret(Secret::new("nope"));
    let e = refused(ask(&client, &emu, TENANT, "sp-secret", &wrong).await)?;
    assert_eq!(e.status(), 403);
    assert!(e.to_string().contains("AADSTS7000215"), "{e}");

    // Type 2: PKCS#12 and password from the Secret.
    let cred = from_secret(&[("certificate", &sp.p12), ("password", b"pw")], true)?;
    let t = ask(&client, &emu, TENANT, "sp-cert", &cred).await?;
    assert_eq!(verified(&t)?.appid, "sp-cert");
    // A wrong PKCS#12 password never reaches AAD.
    assert!(CertKey::from_pkcs12(&sp.p12, "wrong").is_err());

    // Another tenant is AAD's refusal too (the emulator knows one tenant).
    let secret = Credential::Secret(Secret::new("s3cr3t"));
    let e = refused(ask(&client, &emu, "other-tenant", "sp-secret", &secret).await)?;
    assert_eq!(e.status(), 403, "{e}");

    // Trusting another CA, the TLS handshake fails: 503, nothing sent.
    let other = certificate()?;
    let path = std::env::temp_dir().join(format!("nmi-other-ca-{}.pem", std::process::id()));
    std::fs::write(&path, &other.pem)?;
    let untrusting = AadClient::new(Some(&path), "nmi-test").map_err(|e| anyhow!(e))?;
    std::fs::remove_file(&path)?;
    let e = refused(ask(&untrusting, &emu, TENANT, "sp-secret", &secret).await)?;
    assert_eq!(e.status(), 503, "{e}");
    Ok(())
}

/// A PKCS#12 written by the `openssl` command (AES-256 and legacy 3DES), as
/// users create them, is read too. Skipped without `openssl`.
#[test]
fn openssl_pkcs12_files_are_read() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("nmi-p12-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)?;
    let cert = rcgen::CertificateParams::new(vec!["x".into()])?.self_signed(&key)?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    std::fs::write(dir.join("cert.pem"), cert.pem())?;
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
        let p12 = std::fs::read(dir.join("c.p12"))?;
        let k = CertKey::from_pkcs12(&p12, "pw").map_err(|e| anyhow!("{extra:?}: {e}"))?;
        assert!(!k.x5t().is_empty());
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
