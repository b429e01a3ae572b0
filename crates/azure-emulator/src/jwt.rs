//! Compact JWS (RS256) signing and verification.
//!
//! Hand-written on aws-lc-rs instead of a JWT crate: the emulator needs exactly
//! RS256 issuance, RS256 verification of its own tokens and RS256/PS256
//! verification against an X.509 certificate (client assertions,
//! azure-apis.md §2.3); all of it is a few base64 and signature calls on the
//! crypto library the workspace already links.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{
    KeyPair as _, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256, UnparsedPublicKey,
};
use rustls::pki_types::CertificateDer;
use serde_json::{Map, Value};

use crate::ids::{b64_any, b64url};

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
    /// RS256 and PS256 are accepted (azure-protocols.md §7 point 30).
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

/// The emulator's token-signing key (RSA 2048, like Entra's).
pub struct Signer {
    key: KeyPair,
    kid: String,
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
        let digest = aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
            key.public_key().as_ref(),
        );
        Ok(Self {
            key,
            kid: b64url(digest.as_ref()),
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

    /// Signs `claims` as RS256 with `typ`, `alg`, `kid` and `x5t` headers, as Entra's
    /// access tokens carry.
    pub fn sign(&self, claims: &Map<String, Value>) -> Result<String, JwtError> {
        let header =
            serde_json::json!({"typ": "JWT", "alg": "RS256", "x5t": self.kid, "kid": self.kid});
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
}
