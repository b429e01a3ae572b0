//! The test CA, the server certificate for 127.0.0.1/localhost, and the CA bundle.
//!
//! ARM and AAD must be HTTPS: the Azure SDK 1.x refuses plain-HTTP authorities
//! and bearer tokens over plain HTTP, and trusts a test CA through
//! `SSL_CERT_FILE` (which replaces the system store when set). Certificates are made with rcgen
//! rather than the openssl CLI: no child process, no temp key files, and the
//! same aws-lc-rs crypto the workspace already links.

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Subject of every CA this crate makes; loading a CA relies on it (see [`TestCa::from_pem`]).
const CA_COMMON_NAME: &str = "azure-emulator test CA";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("building the TLS server config: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("writing the CA bundle {path}: {source}")]
    WriteBundle {
        path: String,
        source: std::io::Error,
    },
}

/// A certificate authority whose certificate clients trust and whose key signs
/// the server certificate. Its key never leaves the process except through
/// [`TestCa::key_pem`], which exists so several emulators (or runs) can share one CA.
pub struct TestCa {
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, "azure-emulator");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl TestCa {
    /// A fresh CA with an ECDSA P-256 key.
    pub fn generate() -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let cert = ca_params().self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// Loads a CA made by [`TestCa::generate`] (its certificate and PKCS#8 key PEM).
    /// The issuer name is rebuilt from this crate's fixed CA subject rather than
    /// parsed out of the certificate, so a foreign CA with another subject would
    /// produce server certificates that do not chain.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            key: KeyPair::from_pem(key_pem)?,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A rustls server config presenting a fresh certificate for
    /// `localhost`, `127.0.0.1` and `::1`, signed by this CA, using the
    /// aws-lc-rs provider (the one kube and azure_core use in this workspace).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let leaf_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "azure-emulator");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let issuer = Issuer::new(ca_params(), &self.key);
        let leaf = params.signed_by(&leaf_key, &issuer)?;
        let ca_der = pem_to_der(&self.cert_pem).unwrap_or_default();
        let chain = vec![leaf.der().clone(), CertificateDer::from(ca_der)];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        // HTTP/1.1 only: the servers speak hyper's http1.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// First PEM block's DER bytes.
pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    let start = pem.find("-----BEGIN ")?;
    let rest = &pem[start..];
    let body_start = rest.find('\n')? + 1;
    let body_end = rest.find("-----END ")?;
    let b64: String = rest[body_start..body_end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    crate::ids::b64_any(&b64)
}

/// The system trust store followed by the test CA, so one `SSL_CERT_FILE` serves
/// both real hosts and the emulator. The system store is `$SSL_CERT_FILE` when set
/// (unless it is the target itself), else the Debian bundle.
pub fn write_bundle(ca_pem: &str, path: &Path) -> Result<(), TlsError> {
    let mut bundle = String::new();
    let system = std::env::var_os("SSL_CERT_FILE")
        .map(std::path::PathBuf::from)
        .filter(|p| p != path)
        .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
    if let Ok(text) = std::fs::read_to_string(&system) {
        // An earlier emulator's bundle may be the "system" one: do not repeat CAs.
        bundle.push_str(&text);
        if !bundle.ends_with('\n') {
            bundle.push('\n');
        }
    }
    if !bundle.contains(ca_pem.trim()) {
        bundle.push_str(ca_pem);
    }
    let err = |source| TlsError::WriteBundle {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    std::fs::write(path, bundle).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_round_trips_through_pem_and_issues_server_configs() {
        let ca = TestCa::generate().expect("ca");
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let again = TestCa::from_pem(ca.cert_pem(), &ca.key_pem()).expect("load");
        again.server_config().expect("server config");
        assert!(pem_to_der(ca.cert_pem()).is_some_and(|d| d.len() > 100));
    }

    #[test]
    fn bundle_appends_the_test_ca_once() {
        let ca = TestCa::generate().expect("ca");
        let dir = std::env::temp_dir().join(format!("azemu-tls-{}", crate::ids::new_guid()));
        let path = dir.join("bundle.pem");
        write_bundle(ca.cert_pem(), &path).expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.ends_with(ca.cert_pem()));
        assert_eq!(text.matches(ca.cert_pem().trim()).count(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }
}
