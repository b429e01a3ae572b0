//! Service-principal identities (AzureIdentity types 1 and 2): the credential
//! read from the referenced Secret, AAD's v1 client-credentials request, and
//! its answer (the v1 endpoint and client assertions:
//! docs/upstream-behaviour.md#entra-id-token-endpoint).
//!
//! The wire format is upstream's (go-autorest adal): `POST
//! {adEndpoint}{tenant}/oauth2/token?api-version=1.0` with `resource` (not a v2
//! `scope`), a client secret or an RS256 client assertion whose header carries
//! `x5t` (padded base64url SHA-1 of the certificate). A small client of our own
//! does it (hyper + rustls, trusting a configurable CA bundle) rather than
//! `azure_identity`'s credentials: those speak only v2 (the audience would
//! become a `scope`), the certificate credential needs OpenSSL, each credential
//! keeps its own token cache, and a custom CA needs a custom transport anyway.
//!
//! Everything except [`AadClient::token`] is pure and unit-tested.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine as _;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::Full;
use hyper::body::Bytes;

use crate::http_client;
use crate::response::Token;
use crate::secret::Secret;
use crate::token::{TokenBody, TokenError};

/// Upstream's default authority (`adEndpoint` empty).
pub const DEFAULT_AD_ENDPOINT: &str = "https://login.microsoftonline.com/";
/// adal's api-version on the v1 endpoint.
const AAD_API_VERSION: &str = "1.0";
/// Secret keys of a type-2 identity.
pub const KEY_CERTIFICATE: &str = "certificate";
/// See [`KEY_CERTIFICATE`].
pub const KEY_PASSWORD: &str = "password";
/// The key preferred for a type-1 secret holding several keys.
pub const KEY_CLIENT_SECRET: &str = "clientSecret";
/// One AAD exchange, connect to last byte.
const AAD_TIMEOUT: Duration = Duration::from_secs(15);
/// Lifetime of a client assertion (Entra's guidance: minutes, not adal's 24 h).
const ASSERTION_LIFETIME_SECS: u64 = 600;
pub(crate) const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A certificate credential: the RSA key and the certificate's thumbprint.
pub struct CertKey {
    key: RsaKeyPair,
    /// `x5t`: padded base64url of the SHA-1 of the certificate DER (as adal).
    x5t: String,
}

impl fmt::Debug for CertKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertKey")
            .field("x5t", &self.x5t)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl CertKey {
    /// From a PKCS#8 RSA key and the certificate DER.
    pub fn from_pkcs8(key_pkcs8: &[u8], cert_der: &[u8]) -> Result<Self, String> {
        let key = RsaKeyPair::from_pkcs8(key_pkcs8)
            .map_err(|e| format!("the certificate's key is not a usable RSA key: {e}"))?;
        let sha1 = digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, cert_der);
        Ok(CertKey {
            key,
            x5t: base64::engine::general_purpose::URL_SAFE.encode(sha1.as_ref()),
        })
    }

    /// From PKCS#12 bytes (the Secret's `certificate`) and its password: the
    /// first key with its leaf certificate.
    pub fn from_pkcs12(p12: &[u8], password: &str) -> Result<Self, String> {
        let store = p12_keystore::KeyStore::from_pkcs12(
            p12,
            password,
            p12_keystore::Pkcs12ImportPolicy::Relaxed,
        )
        .map_err(|e| format!("reading the PKCS#12 certificate: {e}"))?;
        let (_, chain) = store
            .private_key_chain()
            .ok_or_else(|| "the PKCS#12 certificate holds no private key".to_string())?;
        let cert = chain
            .certs()
            .first()
            .ok_or_else(|| "the PKCS#12 certificate holds no certificate".to_string())?;
        Self::from_pkcs8(chain.key().as_der(), cert.as_der())
    }

    /// The `x5t` header value.
    pub fn x5t(&self) -> &str {
        &self.x5t
    }
}

/// How a service principal proves itself.
#[derive(Clone, Debug)]
pub enum Credential {
    /// Type 1.
    Secret(Secret),
    /// Type 2.
    Certificate(Arc<CertKey>),
}

/// A credential read from a Secret, with a digest of the material it came
/// from (part of the cache key: a cached token is only served to a request
/// whose identity references the very same credential).
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The credential.
    pub credential: Credential,
    /// Hex SHA-256 of the Secret material used.
    pub digest: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    hex(ctx.finish().as_ref())
}

/// The credential of a type-1 (`certificate == false`) or type-2 identity from
/// its Secret's data. Type 1: the only key's value (upstream took the first
/// key of a random-order map; with several keys we take `clientSecret` or
/// refuse). Type 2: `certificate` (PKCS#12) and `password` (may be absent).
pub fn credential_from_secret(
    data: &BTreeMap<String, Vec<u8>>,
    certificate: bool,
) -> Result<Loaded, String> {
    if certificate {
        let p12 = data
            .get(KEY_CERTIFICATE)
            .ok_or_else(|| format!("the secret has no '{KEY_CERTIFICATE}' key"))?;
        let password = data.get(KEY_PASSWORD).map(Vec::as_slice).unwrap_or(b"");
        let password_text = std::str::from_utf8(password)
            .map_err(|_| format!("the secret's '{KEY_PASSWORD}' is not UTF-8"))?;
        let key = CertKey::from_pkcs12(p12, password_text)?;
        return Ok(Loaded {
            credential: Credential::Certificate(Arc::new(key)),
            digest: sha256_hex(&[b"cert", p12, password]),
        });
    }
    let value = match data.len() {
        0 => return Err("the secret is empty".into()),
        1 => data.values().next(),
        _ => data.get(KEY_CLIENT_SECRET),
    }
    .ok_or_else(|| format!("the secret holds several keys and none is '{KEY_CLIENT_SECRET}'"))?;
    let text =
        std::str::from_utf8(value).map_err(|_| "the client secret is not UTF-8".to_string())?;
    Ok(Loaded {
        credential: Credential::Secret(Secret::new(text)),
        digest: sha256_hex(&[b"secret", value]),
    })
}

/// Whether an identity in `identity_ns` may use a Secret in `secret_ns`:
/// only its own namespace unless `--allowed-secret-namespaces` lists the
/// Secret's namespace or `*` (upstream read any namespace:
/// docs/upstream-behaviour.md#h10-secrets-read-across-namespaces).
pub fn secret_namespace_allowed(identity_ns: &str, secret_ns: &str, allowed: &[String]) -> bool {
    secret_ns == identity_ns || allowed.iter().any(|a| a == "*" || a == secret_ns)
}

/// `{adEndpoint}{tenant}/oauth2/token?api-version=1.0`, refusing tenants that
/// could change the path.
pub fn token_url(ad_endpoint: &str, tenant: &str) -> Result<String, String> {
    Ok(format!(
        "{}/oauth2/token?api-version={AAD_API_VERSION}",
        tenant_authority(ad_endpoint, tenant)?
    ))
}

/// `{adEndpoint}{tenant}/oauth2/v2.0/token` (Entra's v2 endpoint, which
/// takes a `scope`), with the checks of [`token_url`].
pub fn v2_token_url(ad_endpoint: &str, tenant: &str) -> Result<String, String> {
    Ok(format!(
        "{}/oauth2/v2.0/token",
        tenant_authority(ad_endpoint, tenant)?
    ))
}

/// `{adEndpoint}{tenant}` (the public cloud's authority when `ad_endpoint`
/// is empty): an https URL without query, and a tenant that cannot change
/// the path.
fn tenant_authority(ad_endpoint: &str, tenant: &str) -> Result<String, String> {
    let tenant_ok = !tenant.is_empty()
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !tenant_ok {
        return Err(format!("invalid tenant ID '{tenant}'"));
    }
    let base = if ad_endpoint.is_empty() {
        DEFAULT_AD_ENDPOINT
    } else {
        ad_endpoint
    };
    let uri: Uri = base
        .parse()
        .map_err(|e| format!("invalid adEndpoint '{base}': {e}"))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none() || uri.query().is_some() {
        return Err(format!(
            "invalid adEndpoint '{base}': an https URL without query is required"
        ));
    }
    let sep = if base.ends_with('/') { "" } else { "/" };
    Ok(format!("{base}{sep}{tenant}"))
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An RS256 client assertion for `client_id` with audience `aud` (the token
/// URL), valid from `now` for ten minutes.
pub fn client_assertion(
    key: &CertKey,
    client_id: &str,
    aud: &str,
    now: u64,
    jti: &str,
) -> Result<String, String> {
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t": key.x5t});
    let claims = serde_json::json!({
        "aud": aud,
        "iss": client_id,
        "sub": client_id,
        "jti": jti,
        "nbf": now,
        "exp": now + ASSERTION_LIFETIME_SECS,
    });
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let mut sig = vec![0u8; key.key.public_modulus_len()];
    key.key
        .sign(
            &RSA_PKCS1_SHA256,
            &SystemRandom::new(),
            signing_input.as_bytes(),
            &mut sig,
        )
        .map_err(|e| format!("signing the client assertion: {e}"))?;
    Ok(format!("{signing_input}.{}", b64url(&sig)))
}

/// The form body of the client-credentials request. `assertion` is the signed
/// JWT for a certificate credential.
pub fn form_body(
    client_id: &str,
    resource: &str,
    credential: &Credential,
    assertion: Option<&str>,
) -> Secret {
    let mut f = form_urlencoded::Serializer::new(String::new());
    f.append_pair("grant_type", "client_credentials");
    f.append_pair("client_id", client_id);
    f.append_pair("resource", resource);
    match (credential, assertion) {
        (Credential::Secret(s), _) => {
            f.append_pair("client_secret", s.expose());
        }
        (Credential::Certificate(_), a) => {
            f.append_pair("client_assertion_type", JWT_BEARER);
            f.append_pair("client_assertion", a.unwrap_or(""));
        }
    }
    Secret::new(f.finish())
}

/// AAD's answer as a [`Token`]: a non-200 is upstream's `TokenRefreshError`
/// (403 to the pod, AAD's error text kept); a 200 without a token or expiry
/// is unusable (503).
pub fn parse_token_response(
    status: StatusCode,
    body: &[u8],
    client_id: &str,
    resource: &str,
    now: u64,
) -> Result<Token, TokenError> {
    if status != StatusCode::OK {
        return Err(TokenError::Refused {
            status: status.as_u16(),
            body: String::from_utf8_lossy(body).chars().take(1024).collect(),
        });
    }
    let b: TokenBody = serde_json::from_slice(body)
        .map_err(|e| TokenError::Unavailable(format!("malformed AAD token response: {e}")))?;
    b.into_token("AAD", resource, client_id.to_string(), now)
}

/// Reads a PEM bundle into a root store.
pub fn roots_from_pem_file(path: &Path) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("reading {}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("a certificate in {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(roots)
}

/// The HTTPS client NMI uses for AAD.
#[derive(Clone)]
pub struct AadClient {
    tls: Arc<rustls::ClientConfig>,
    user_agent: String,
}

impl fmt::Debug for AadClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AadClient")
            .field("user_agent", &self.user_agent)
            .finish_non_exhaustive()
    }
}

impl AadClient {
    /// Trusting the CAs in `ca_bundle`, or the system's roots without one.
    pub fn new(ca_bundle: Option<&Path>, user_agent: &str) -> Result<Self, String> {
        let roots = match ca_bundle {
            Some(p) => roots_from_pem_file(p)?,
            None => {
                let found = rustls_native_certs::load_native_certs();
                let mut roots = rustls::RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    tracing::warn!(errors = ?found.errors, "no system root certificates found; AAD identities will fail (set --aad-ca-file)");
                }
                roots
            }
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(AadClient {
            tls: Arc::new(tls),
            user_agent: user_agent.to_string(),
        })
    }

    /// A token for `resource` from `tenant` at `ad_endpoint`.
    pub async fn token(
        &self,
        ad_endpoint: &str,
        tenant: &str,
        client_id: &str,
        credential: &Credential,
        resource: &str,
    ) -> Result<Token, TokenError> {
        let url = token_url(ad_endpoint, tenant).map_err(TokenError::Unavailable)?;
        let now = crate::token::now_secs();
        let assertion = match credential {
            Credential::Secret(_) => None,
            Credential::Certificate(key) => {
                let mut jti = [0u8; 16];
                aws_lc_rs::rand::fill(&mut jti)
                    .map_err(|e| TokenError::Unavailable(e.to_string()))?;
                Some(
                    client_assertion(key, client_id, &url, now, &hex(&jti))
                        .map_err(TokenError::Unavailable)?,
                )
            }
        };
        let body = form_body(client_id, resource, credential, assertion.as_deref());
        let resp = self.post_form(&url, &body).await?;
        parse_token_response(resp.status(), resp.body(), client_id, resource, now)
    }

    /// POSTs the form `body` to `url` (an https token endpoint) and reads
    /// the whole answer, within 15 s; no answer is 503.
    pub async fn post_form(
        &self,
        url: &str,
        body: &Secret,
    ) -> Result<http::Response<Bytes>, TokenError> {
        let uri: Uri = url
            .parse()
            .map_err(|e| TokenError::Unavailable(format!("{url}: {e}")))?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .header(
                header::HOST,
                uri.authority().map(|a| a.as_str()).unwrap_or(""),
            )
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, &self.user_agent)
            .body(Full::new(Bytes::from(body.expose().to_string())))
            .map_err(|e| TokenError::Unavailable(e.to_string()))?;
        http_client::send_tls(&uri, Arc::clone(&self.tls), req, AAD_TIMEOUT)
            .await
            .map_err(|e| TokenError::Unavailable(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate key, the certificate DER and the RSA public key (PKCS#1).
    fn cert_with_public() -> (CertKey, Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["sp".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().to_vec();
        (
            CertKey::from_pkcs8(&key.serialize_der(), &der).unwrap(),
            der,
            key.public_key_raw().to_vec(),
        )
    }

    fn cert() -> (CertKey, Vec<u8>) {
        let (k, d, _) = cert_with_public();
        (k, d)
    }

    #[test]
    fn type_1_takes_the_only_key_or_client_secret() {
        let one: BTreeMap<String, Vec<u8>> = [("anything".into(), b"s3cr3t".to_vec())].into();
        let Credential::Secret(s) = credential_from_secret(&one, false).unwrap().credential else {
            panic!("not a secret")
        };
        assert_eq!(s.expose(), "s3cr3t");
        let two: BTreeMap<String, Vec<u8>> = [
            ("a".into(), b"x".to_vec()),
            (KEY_CLIENT_SECRET.into(), b"y".to_vec()),
        ]
        .into();
        let Credential::Secret(s) = credential_from_secret(&two, false).unwrap().credential else {
            panic!("not a secret")
        };
        assert_eq!(s.expose(), "y");
        let ambiguous: BTreeMap<String, Vec<u8>> =
            [("a".into(), b"x".to_vec()), ("b".into(), b"y".to_vec())].into();
        assert!(credential_from_secret(&ambiguous, false).is_err());
        assert!(credential_from_secret(&BTreeMap::new(), false).is_err());
        // Same material, same digest; other material, other digest.
        let d1 = credential_from_secret(&one, false).unwrap().digest;
        let d2 = credential_from_secret(&[("k".into(), b"s3cr3t".to_vec())].into(), false)
            .unwrap()
            .digest;
        let d3 = credential_from_secret(&[("k".into(), b"other".to_vec())].into(), false)
            .unwrap()
            .digest;
        assert_eq!(d1, d2);
        assert_ne!(d1, d3);
    }

    #[test]
    fn type_2_needs_a_readable_pkcs12() {
        let no_cert: BTreeMap<String, Vec<u8>> = [(KEY_PASSWORD.into(), b"p".to_vec())].into();
        assert!(
            credential_from_secret(&no_cert, true)
                .unwrap_err()
                .contains("'certificate'")
        );
        let garbage: BTreeMap<String, Vec<u8>> =
            [(KEY_CERTIFICATE.into(), b"not pkcs12".to_vec())].into();
        assert!(credential_from_secret(&garbage, true).is_err());
    }

    #[test]
    fn secrets_stay_in_their_namespace_unless_allowed() {
        let none: Vec<String> = Vec::new();
        assert!(secret_namespace_allowed("app", "app", &none));
        assert!(!secret_namespace_allowed("app", "kube-system", &none));
        assert!(secret_namespace_allowed(
            "app",
            "shared",
            &["shared".to_string()]
        ));
        assert!(!secret_namespace_allowed(
            "app",
            "other",
            &["shared".to_string()]
        ));
        assert!(secret_namespace_allowed("app", "other", &["*".to_string()]));
    }

    #[test]
    fn token_urls_are_adals() {
        assert_eq!(
            token_url("", "t-1").unwrap(),
            "https://login.microsoftonline.com/t-1/oauth2/token?api-version=1.0"
        );
        assert_eq!(
            token_url("https://login.microsoftonline.us", "t").unwrap(),
            "https://login.microsoftonline.us/t/oauth2/token?api-version=1.0"
        );
        assert_eq!(
            token_url("https://127.0.0.1:8443/", "t").unwrap(),
            "https://127.0.0.1:8443/t/oauth2/token?api-version=1.0"
        );
        for bad_tenant in ["", "a/b", "a?b", "../x", "a#b", "a b"] {
            assert!(token_url("", bad_tenant).is_err(), "{bad_tenant}");
        }
        for bad_ep in [
            "http://login.microsoftonline.com/",
            "login",
            "https://x/?a=b",
        ] {
            assert!(token_url(bad_ep, "t").is_err(), "{bad_ep}");
        }
    }

    #[test]
    fn form_bodies() {
        let s = Credential::Secret(Secret::new("p&ss=word"));
        let body = form_body("c1", "https://management.azure.com/", &s, None);
        let pairs: BTreeMap<String, String> = form_urlencoded::parse(body.expose().as_bytes())
            .into_owned()
            .collect();
        assert_eq!(pairs["grant_type"], "client_credentials");
        assert_eq!(pairs["client_id"], "c1");
        assert_eq!(pairs["resource"], "https://management.azure.com/");
        assert_eq!(pairs["client_secret"], "p&ss=word");
        assert_eq!(format!("{body:?}"), "<redacted>");
        let (key, _) = cert();
        let c = Credential::Certificate(Arc::new(key));
        let body = form_body("c1", "r", &c, Some("jwt"));
        let pairs: BTreeMap<String, String> = form_urlencoded::parse(body.expose().as_bytes())
            .into_owned()
            .collect();
        assert_eq!(pairs["client_assertion"], "jwt");
        assert_eq!(pairs["client_assertion_type"], JWT_BEARER);
        assert!(!pairs.contains_key("client_secret"));
        assert!(!format!("{c:?}").contains("BEGIN"), "{c:?}");
    }

    #[test]
    fn assertions_are_rs256_with_adal_x5t() {
        let (key, der, public) = cert_with_public();
        let jwt = client_assertion(
            &key,
            "app",
            "https://h/t/oauth2/token?api-version=1.0",
            100,
            "j",
        )
        .unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let dec = |s: &str| -> serde_json::Value {
            serde_json::from_slice(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(s)
                    .unwrap(),
            )
            .unwrap()
        };
        let h = dec(parts[0]);
        let c = dec(parts[1]);
        assert_eq!(h["alg"], "RS256");
        let sha1 = digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, &der);
        assert_eq!(
            h["x5t"],
            base64::engine::general_purpose::URL_SAFE.encode(sha1.as_ref())
        );
        assert_eq!(
            (c["iss"].as_str(), c["sub"].as_str()),
            (Some("app"), Some("app"))
        );
        assert_eq!(
            (c["nbf"].as_u64(), c["exp"].as_u64()),
            (Some(100), Some(700))
        );
        // The signature verifies with the certificate's public key.
        let pk = aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
            public,
        );
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[2])
            .unwrap();
        pk.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .unwrap();
    }

    #[test]
    fn aad_answers() {
        let ok = br#"{"token_type":"Bearer","expires_in":"3599","ext_expires_in":"3599","expires_on":"1700003599","not_before":"1699999699","resource":"https://management.azure.com/","access_token":"eyJ0"}"#;
        let t = parse_token_response(StatusCode::OK, ok, "c1", "r", 0).unwrap();
        assert_eq!(
            (
                t.expires_on,
                t.not_before,
                t.resource.as_str(),
                t.client_id.as_str()
            ),
            (
                1_700_003_599,
                Some(1_699_999_699),
                "https://management.azure.com/",
                "c1"
            )
        );
        // v2-style numbers and no expires_on.
        let v2 = br#"{"token_type":"Bearer","expires_in":3599,"access_token":"eyJ0"}"#;
        let t = parse_token_response(StatusCode::OK, v2, "c1", "r", 1000).unwrap();
        assert_eq!((t.expires_on, t.resource.as_str()), (4599, "r"));
        let err = parse_token_response(
            StatusCode::UNAUTHORIZED,
            br#"{"error":"invalid_client"}"#,
            "c1",
            "r",
            0,
        )
        .unwrap_err();
        assert_eq!(err.status(), StatusCode::FORBIDDEN);
        assert!(err.to_string().contains("invalid_client"), "{err}");
        for bad in [&b"{}"[..], b"not json", br#"{"access_token":"x"}"#] {
            let e = parse_token_response(StatusCode::OK, bad, "c", "r", 0).unwrap_err();
            assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
    }
}
