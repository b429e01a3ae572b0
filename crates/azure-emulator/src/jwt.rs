//! Compact JWS (RS256) signing and verification.
//!
//! Hand-written on aws-lc-rs instead of a JWT crate: the emulator needs exactly
//! RS256 issuance, RS256 verification of its own tokens, RS256/PS256
//! verification against an X.509 certificate (client assertions),
//! RS256/PS256/ES256 verification against a workload issuer's JWKS or PEM
//! keys (federated assertions) and a JWKS of its
//! own signing key (OpenID discovery); all of it is a few base64 and
//! signature calls on the crypto library the workspace already links.

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, KeyPair as _, ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256,
    RSA_PKCS1_SHA256, RSA_PSS_2048_8192_SHA256, RsaPublicKeyComponents, RsaSubjectPublicKey,
    UnparsedPublicKey,
};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde_json::{Map, Value, json};

use crate::ids::{b64_any, b64std, b64url};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("the token is not a compact JWS")]
    Malformed,
    #[error("unsupported alg '{0}'")]
    Algorithm(String),
    #[error("signature does not verify")]
    Signature,
    #[error("signing failed")]
    Sign,
}

/// A decoded, not yet verified JWT.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub header: Map<String, Value>,
    pub claims: Map<String, Value>,
    signing_input: String,
    signature: Vec<u8>,
}

impl Parsed {
    pub fn alg(&self) -> &str {
        self.header.get("alg").and_then(Value::as_str).unwrap_or("")
    }
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header.get(name).and_then(Value::as_str)
    }
    pub fn claim_str(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }
    pub fn claim_u64(&self, name: &str) -> Option<u64> {
        let v = self.claims.get(name)?;
        v.as_u64()
            .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
    }

    /// Verifies the signature with the public key of an X.509 certificate (DER).
    /// RS256 (adal, the Rust SDK) and PS256 (Entra's current documentation)
    /// are accepted.
    pub fn verify_with_cert(&self, cert_der: &[u8]) -> Result<(), JwtError> {
        let alg: &dyn rustls::pki_types::SignatureVerificationAlgorithm = match self.alg() {
            "RS256" => webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA256,
            "PS256" => webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
            other => return Err(JwtError::Algorithm(other.to_string())),
        };
        let der = CertificateDer::from(cert_der);
        let cert = webpki::EndEntityCert::try_from(&der).map_err(|_| JwtError::Signature)?;
        cert.verify_signature(alg, self.signing_input.as_bytes(), &self.signature)
            .map_err(|_| JwtError::Signature)
    }

    /// Verifies the signature with an issuer's key. The header `alg` must be
    /// one the key type supports (RS256/PS256 for RSA, ES256 for P-256) and,
    /// when the key names an `alg`, that one.
    pub fn verify_with_key(&self, key: &VerifyKey) -> Result<(), JwtError> {
        let alg = self.alg();
        if key.alg.as_deref().is_some_and(|a| a != alg) {
            return Err(JwtError::Algorithm(alg.to_string()));
        }
        let (msg, sig) = (self.signing_input.as_bytes(), self.signature.as_slice());
        let rsa = match alg {
            "RS256" => Some(&RSA_PKCS1_2048_8192_SHA256),
            "PS256" => Some(&RSA_PSS_2048_8192_SHA256),
            _ => None,
        };
        let ok = match (&key.material, rsa, alg) {
            (Material::RsaComponents { n, e }, Some(params), _) => {
                RsaPublicKeyComponents { n, e }.verify(params, msg, sig)
            }
            (Material::RsaDer(der), Some(params), _) => {
                UnparsedPublicKey::new(params, der).verify(msg, sig)
            }
            (Material::EcP256(der), None, "ES256") => {
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, der).verify(msg, sig)
            }
            _ => return Err(JwtError::Algorithm(alg.to_string())),
        };
        ok.map_err(|_| JwtError::Signature)
    }
}

/// A key that may sign federated assertions of one issuer: from its JWKS
/// (`kty` RSA or EC P-256) or from a PEM public key.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifyKey {
    /// `kid` the signed token must name; `None` (a PEM key given without one)
    /// matches any token.
    pub kid: Option<String>,
    /// The JWK's `alg`, when it pins one.
    pub alg: Option<String>,
    material: Material,
}

#[derive(Clone, PartialEq, Eq)]
enum Material {
    /// Big-endian modulus and exponent, without leading zeros.
    RsaComponents { n: Vec<u8>, e: Vec<u8> },
    /// PKCS#1 `RSAPublicKey` or SubjectPublicKeyInfo DER.
    RsaDer(Vec<u8>),
    /// SubjectPublicKeyInfo DER or an uncompressed SEC1 point.
    EcP256(Vec<u8>),
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.material {
            Material::RsaComponents { .. } | Material::RsaDer(_) => "RSA",
            Material::EcP256(_) => "EC P-256",
        };
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kty", &kind)
            .finish()
    }
}

/// Why a configured issuer key was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct KeyError(pub String);

fn strip_zeros(b: Vec<u8>) -> Vec<u8> {
    let first = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    b[first..].to_vec()
}

impl VerifyKey {
    /// One JWK. `Ok(None)` for keys that are not for signatures (`use`
    /// other than `sig`) or of a type the emulator does not verify with.
    pub fn from_jwk(jwk: &Map<String, Value>) -> Result<Option<Self>, KeyError> {
        let field = |name: &str| jwk.get(name).and_then(Value::as_str);
        if field("use").is_some_and(|u| u != "sig") {
            return Ok(None);
        }
        let kid = field("kid").map(str::to_string);
        let alg = field("alg").map(str::to_string);
        let label = kid.clone().unwrap_or_else(|| "(no kid)".into());
        let bytes = |name: &str| {
            field(name)
                .and_then(b64_any)
                .filter(|b| !b.is_empty())
                .ok_or_else(|| {
                    KeyError(format!("JWK {label}: '{name}' is missing or not base64url"))
                })
        };
        let material = match field("kty") {
            Some("RSA") => {
                let (n, e) = (strip_zeros(bytes("n")?), strip_zeros(bytes("e")?));
                RsaPublicKeyComponents { n: &n, e: &e }
                    .to_parsed_public_key(&RSA_PKCS1_2048_8192_SHA256)
                    .map_err(|e| KeyError(format!("JWK {label}: not a usable RSA key ({e})")))?;
                Material::RsaComponents { n, e }
            }
            Some("EC") => {
                if field("crv") != Some("P-256") {
                    return Ok(None);
                }
                let (x, y) = (bytes("x")?, bytes("y")?);
                if x.len() != 32 || y.len() != 32 {
                    return Err(KeyError(format!(
                        "JWK {label}: P-256 'x'/'y' must be 32 bytes"
                    )));
                }
                let point = [&[4u8][..], &x, &y].concat();
                ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
                    .map_err(|e| KeyError(format!("JWK {label}: not a P-256 point ({e})")))?;
                Material::EcP256(point)
            }
            _ => return Ok(None),
        };
        Ok(Some(Self { kid, alg, material }))
    }

    /// A PEM `PUBLIC KEY` (SubjectPublicKeyInfo, RSA or EC P-256) or `RSA
    /// PUBLIC KEY` (PKCS#1), named `kid` (or matching any `kid` without one).
    pub fn from_pem(pem: &str, kid: Option<String>) -> Result<Self, KeyError> {
        let label = pem
            .split_once("-----BEGIN ")
            .and_then(|(_, r)| r.split_once("-----"))
            .map(|(l, _)| l.trim().to_string())
            .ok_or_else(|| KeyError("not a PEM block".into()))?;
        let der = crate::tls::pem_to_der(pem)
            .ok_or_else(|| KeyError(format!("PEM {label}: body is not base64")))?;
        let material = match label.as_str() {
            "PUBLIC KEY" | "RSA PUBLIC KEY" if RsaSubjectPublicKey::from_der(&der).is_ok() => {
                Material::RsaDer(der)
            }
            "PUBLIC KEY" if ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &der).is_ok() => {
                Material::EcP256(der)
            }
            "PUBLIC KEY" | "RSA PUBLIC KEY" => {
                return Err(KeyError(format!(
                    "PEM {label}: neither an RSA nor an EC P-256 public key"
                )));
            }
            other => {
                return Err(KeyError(format!(
                    "PEM {other}: want 'PUBLIC KEY' or 'RSA PUBLIC KEY'"
                )));
            }
        };
        Ok(Self {
            kid,
            alg: None,
            material,
        })
    }

    /// Every signing key of a JWKS document (`{"keys": [...]}`), given as a
    /// JSON value or as JSON text.
    pub fn from_jwks(doc: &Value) -> Result<Vec<Self>, KeyError> {
        if let Value::String(text) = doc {
            let parsed: Value = serde_json::from_str(text)
                .map_err(|e| KeyError(format!("the JWKS text is not JSON: {e}")))?;
            return Self::from_jwks(&parsed);
        }
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| KeyError("a JWKS needs a 'keys' array".into()))?;
        let mut out = Vec::new();
        for k in keys {
            let obj = k
                .as_object()
                .ok_or_else(|| KeyError("a JWKS key is not an object".into()))?;
            out.extend(Self::from_jwk(obj)?);
        }
        Ok(out)
    }
}

/// Splits and decodes a compact JWS without checking anything.
pub fn parse(token: &str) -> Result<Parsed, JwtError> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let decode_obj = |part: &str| -> Result<Map<String, Value>, JwtError> {
        let bytes = b64_any(part).ok_or(JwtError::Malformed)?;
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(JwtError::Malformed),
        }
    };
    Ok(Parsed {
        header: decode_obj(h)?,
        claims: decode_obj(c)?,
        signing_input: format!("{h}.{c}"),
        signature: b64_any(s).ok_or(JwtError::Malformed)?,
    })
}

/// The emulator's token-signing key (RSA 2048, like Entra's), with a
/// self-signed certificate so the JWKS can carry `x5c` and an `x5t`
/// thumbprint as Entra's does.
pub struct Signer {
    key: KeyPair,
    kid: String,
    cert_der: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl Signer {
    pub fn generate() -> Result<Self, JwtError> {
        let key = KeyPair::generate(KeySize::Rsa2048).map_err(|_| JwtError::Sign)?;
        let pkcs8: Pkcs8V1Der = key.as_der().map_err(|_| JwtError::Sign)?;
        let rc = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(pkcs8.as_ref().to_vec()),
            &rcgen::PKCS_RSA_SHA256,
        )
        .map_err(|_| JwtError::Sign)?;
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "azure-emulator token signing");
        let cert_der = params
            .self_signed(&rc)
            .map_err(|_| JwtError::Sign)?
            .der()
            .to_vec();
        // Entra's kid and x5t are both the base64url SHA-1 of the certificate.
        let (sha1, _) = thumbprints(&cert_der);
        Ok(Self {
            key,
            kid: b64url(&sha1),
            cert_der,
        })
    }

    /// The process-wide key. RSA generation takes a few hundred milliseconds
    /// in debug builds, and test suites start many emulators; sharing the key
    /// means a token from one emulator in this process verifies on another,
    /// which still rejects it unless the tenant matches.
    pub fn shared() -> Result<std::sync::Arc<Self>, JwtError> {
        static KEY: std::sync::OnceLock<std::sync::Arc<Signer>> = std::sync::OnceLock::new();
        if let Some(k) = KEY.get() {
            return Ok(k.clone());
        }
        let fresh = std::sync::Arc::new(Self::generate()?);
        Ok(KEY.get_or_init(|| fresh).clone())
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK, shaped like an entry of Entra's
    /// `discovery/keys`: `kty`, `use`, `kid`, `x5t`, `n`, `e`, `x5c`.
    pub fn jwk(&self) -> Map<String, Value> {
        let pk = self.key.public_key();
        let mut m = Map::new();
        for (k, v) in [
            ("kty", json!("RSA")),
            ("use", json!("sig")),
            ("kid", json!(self.kid)),
            ("x5t", json!(self.kid)),
            (
                "n",
                json!(b64url(pk.modulus().big_endian_without_leading_zero())),
            ),
            (
                "e",
                json!(b64url(pk.exponent().big_endian_without_leading_zero())),
            ),
            ("x5c", json!([b64std(&self.cert_der)])),
        ] {
            m.insert(k.to_string(), v);
        }
        m
    }

    /// `{"keys": [<jwk>]}`: what a test seeds as a workload issuer's JWKS when
    /// it signs service-account tokens with this key.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.jwk()] })
    }

    /// The self-signed certificate (DER) carrying the public key.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// Signs `claims` as RS256 with `typ`, `alg`, `kid` and `x5t` headers, as Entra's
    /// access tokens carry.
    pub fn sign(&self, claims: &Map<String, Value>) -> Result<String, JwtError> {
        let header =
            serde_json::json!({"typ": "JWT", "alg": "RS256", "x5t": self.kid, "kid": self.kid});
        self.sign_with_header(&header, claims)
    }

    /// Signs `claims` as RS256 with only `alg` and `kid` headers, as a
    /// Kubernetes service-account issuer does: what a test sends as a
    /// federated assertion after seeding [`Signer::jwks`] as the issuer's keys.
    /// (An `x5t` header would make the token endpoint treat it as a
    /// certificate assertion.)
    pub fn sign_as_issuer(&self, claims: &Map<String, Value>) -> Result<String, JwtError> {
        self.sign_with_header(&json!({"alg": "RS256", "kid": self.kid}), claims)
    }

    fn sign_with_header(
        &self,
        header: &Value,
        claims: &Map<String, Value>,
    ) -> Result<String, JwtError> {
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(Value::Object(claims.clone()).to_string().as_bytes())
        );
        let mut sig = vec![0u8; self.key.public_modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| JwtError::Sign)?;
        Ok(format!("{input}.{}", b64url(&sig)))
    }

    /// Parses `token` and checks that this key signed it.
    pub fn verify(&self, token: &str) -> Result<Parsed, JwtError> {
        let parsed = parse(token)?;
        if parsed.alg() != "RS256" {
            return Err(JwtError::Algorithm(parsed.alg().to_string()));
        }
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, self.key.public_key().as_ref())
            .verify(parsed.signing_input.as_bytes(), &parsed.signature)
            .map_err(|_| JwtError::Signature)?;
        Ok(parsed)
    }
}

/// SHA-1 and SHA-256 of a certificate, the two thumbprints clients name in
/// `x5t` and `x5t#S256`.
pub fn thumbprints(cert_der: &[u8]) -> (Vec<u8>, Vec<u8>) {
    use aws_lc_rs::digest::{SHA1_FOR_LEGACY_USE_ONLY, SHA256, digest};
    (
        digest(&SHA1_FOR_LEGACY_USE_ONLY, cert_der)
            .as_ref()
            .to_vec(),
        digest(&SHA256, cert_der).as_ref().to_vec(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_then_verify_round_trips_and_tampering_fails() {
        let s = Signer::generate().expect("key");
        let mut claims = Map::new();
        claims.insert("aud".into(), "https://management.azure.com/".into());
        claims.insert("exp".into(), 2_000_000_000u64.into());
        let tok = s.sign(&claims).expect("sign");
        let p = s.verify(&tok).expect("verify");
        assert_eq!(p.claim_str("aud"), Some("https://management.azure.com/"));
        assert_eq!(p.claim_u64("exp"), Some(2_000_000_000));
        assert_eq!(p.header_str("kid"), Some(s.kid()));

        let other = Signer::generate().expect("key");
        assert_eq!(other.verify(&tok).err(), Some(JwtError::Signature));
        let mut parts: Vec<&str> = tok.split('.').collect();
        let forged = b64url(br#"{"aud":"x"}"#);
        parts[1] = &forged;
        assert_eq!(s.verify(&parts.join(".")).err(), Some(JwtError::Signature));
        assert_eq!(s.verify("a.b").err(), Some(JwtError::Malformed));
    }

    fn pem(label: &str, der: &[u8]) -> String {
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            crate::ids::b64std(der)
        )
    }

    #[test]
    fn issuer_keys_from_jwks_and_pem_verify_only_their_signatures() {
        let s = Signer::generate().expect("key");
        let other = Signer::generate().expect("key");
        let mut claims = Map::new();
        claims.insert("sub".into(), "system:serviceaccount:a:b".into());
        let tok = parse(&s.sign_as_issuer(&claims).expect("sign")).expect("parse");
        assert_eq!(tok.header_str("x5t"), None);
        assert_eq!(tok.header_str("kid"), Some(s.kid()));

        let keys = VerifyKey::from_jwks(&s.jwks()).expect("jwks");
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some(s.kid()));
        assert_eq!(tok.verify_with_key(&keys[0]), Ok(()));
        let wrong = VerifyKey::from_jwks(&other.jwks()).expect("jwks");
        assert_eq!(tok.verify_with_key(&wrong[0]), Err(JwtError::Signature));
        // JSON text works too.
        let text = Value::String(s.jwks().to_string());
        assert_eq!(VerifyKey::from_jwks(&text).expect("text").len(), 1);

        // PEM: SubjectPublicKeyInfo and PKCS#1.
        let spki: aws_lc_rs::encoding::PublicKeyX509Der =
            s.key.public_key().as_der().expect("spki");
        let k = VerifyKey::from_pem(&pem("PUBLIC KEY", spki.as_ref()), None).expect("spki pem");
        assert_eq!(tok.verify_with_key(&k), Ok(()));
        let k = VerifyKey::from_pem(&pem("RSA PUBLIC KEY", s.key.public_key().as_ref()), None)
            .expect("pkcs1 pem");
        assert_eq!(tok.verify_with_key(&k), Ok(()));
        assert!(VerifyKey::from_pem(&pem("CERTIFICATE", s.cert_der()), None).is_err());
        assert!(VerifyKey::from_pem(&pem("PUBLIC KEY", b"junk"), None).is_err());

        // Skipped, refused and pinned keys.
        let mut jwk = s.jwk();
        jwk.insert("use".into(), "enc".into());
        assert_eq!(VerifyKey::from_jwk(&jwk), Ok(None));
        let okp = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": "AA"});
        assert_eq!(
            VerifyKey::from_jwks(&serde_json::json!({"keys": [okp]})),
            Ok(vec![])
        );
        let mut jwk = s.jwk();
        jwk.remove("e");
        assert!(VerifyKey::from_jwk(&jwk).is_err());
        let mut jwk = s.jwk();
        jwk.insert("alg".into(), "PS256".into());
        let pinned = VerifyKey::from_jwk(&jwk).expect("jwk").expect("key");
        assert_eq!(
            tok.verify_with_key(&pinned),
            Err(JwtError::Algorithm("RS256".into()))
        );
        assert!(VerifyKey::from_jwks(&serde_json::json!({"nokeys": []})).is_err());
    }

    #[test]
    fn jwk_matches_the_signing_key_and_certificate() {
        let s = Signer::generate().expect("key");
        let jwk = s.jwk();
        assert_eq!(jwk["kty"], "RSA");
        assert_eq!(jwk["use"], "sig");
        assert_eq!(jwk["e"], "AQAB");
        assert_eq!(jwk["kid"], jwk["x5t"]);
        let (sha1, _) = thumbprints(s.cert_der());
        assert_eq!(jwk["x5t"].as_str(), Some(b64url(&sha1).as_str()));
        let n = b64_any(jwk["n"].as_str().unwrap_or("")).unwrap_or_default();
        assert_eq!(n.len(), 256);
    }
}
