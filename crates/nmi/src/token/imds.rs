//! The IMDS client: how NMI asks IMDS for a managed-identity token, and the
//! v1 token body that IMDS and AAD both answer.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Method, Request, StatusCode, header};
use http_body_util::Full;
use hyper::body::Bytes;
use serde::Deserialize;

use super::retry::{is_transient, parse_retry_after};
use super::{TokenError, TokenSource, now_secs};
use crate::http_client;
use crate::response::Token;
use crate::secret::Secret;

/// Which identity to ask IMDS for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImdsIdentity {
    /// By ARM resource ID (`msi_res_id`): the ID MIC assigned to the node.
    ResourceId(String),
}

/// IMDS's managed-identity endpoint.
#[derive(Clone, Debug)]
pub struct Imds {
    addr: SocketAddr,
    host: String,
    user_agent: String,
}

/// IMDS's SLA is 10 s per request.
const IMDS_TIMEOUT: Duration = Duration::from_secs(10);
/// NMI's own api-version, the one upstream's adal library sends.
const IMDS_API_VERSION: &str = "2018-02-01";

/// A token body in the v1 shape that both IMDS and AAD's v1 endpoint answer
/// (numbers accepted as strings or numbers).
#[derive(Deserialize)]
pub(crate) struct TokenBody {
    access_token: String,
    #[serde(default)]
    expires_on: Option<serde_json::Value>,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    not_before: Option<serde_json::Value>,
    #[serde(default)]
    resource: Option<String>,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    client_id: Option<String>,
}

impl TokenBody {
    /// The [`Token`]: expiry from `expires_on`, else `now + expires_in`; a body
    /// with neither is unusable. `source` names the server in that error.
    pub(crate) fn into_token(
        self,
        source: &str,
        resource: &str,
        client_id: String,
        now: u64,
    ) -> Result<Token, TokenError> {
        let expires_on = self
            .expires_on
            .as_ref()
            .and_then(as_u64)
            .or_else(|| self.expires_in.as_ref().and_then(as_u64).map(|s| now + s))
            .ok_or_else(|| {
                TokenError::Unavailable(format!("{source} token response without expiry"))
            })?;
        Ok(Token {
            access_token: Secret::new(self.access_token),
            expires_on,
            not_before: self.not_before.as_ref().and_then(as_u64),
            resource: self.resource.unwrap_or_else(|| resource.to_string()),
            token_type: self.token_type.unwrap_or_else(|| "Bearer".into()),
            client_id,
        })
    }
}

fn as_u64(v: &serde_json::Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

impl Imds {
    /// IMDS at `base`, e.g. `http://169.254.169.254` (host must be an IP address).
    pub fn new(base: &str, user_agent: &str) -> Result<Self, String> {
        let uri: http::Uri = base.parse().map_err(|e| format!("{base}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("{base}: IMDS is plain http"));
        }
        let host = uri.host().ok_or_else(|| format!("{base}: no host"))?;
        let ip: std::net::IpAddr = host
            .trim_matches(|c| c == '[' || c == ']')
            .parse()
            .map_err(|_| format!("{base}: the host must be an IP address"))?;
        let addr = SocketAddr::new(ip, uri.port_u16().unwrap_or(80));
        Ok(Imds {
            addr,
            host: uri.authority().map(|a| a.to_string()).unwrap_or_default(),
            user_agent: user_agent.to_string(),
        })
    }

    /// Where requests go.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl TokenSource for Imds {
    async fn imds_token(
        &self,
        identity: &ImdsIdentity,
        resource: &str,
    ) -> Result<Token, TokenError> {
        // The serializer is not Send: finish it before any await.
        let query = {
            let mut q = form_urlencoded::Serializer::new(String::new());
            q.append_pair("api-version", IMDS_API_VERSION);
            q.append_pair("resource", resource);
            match identity {
                ImdsIdentity::ResourceId(r) => q.append_pair("msi_res_id", r),
            };
            q.finish()
        };
        let uri = format!("/metadata/identity/oauth2/token?{query}");
        let req = Request::builder()
            .method(Method::GET)
            .uri(uri)
            .header(header::HOST, &self.host)
            .header("Metadata", "true")
            .header(header::USER_AGENT, &self.user_agent)
            .body(Full::new(Bytes::new()))
            .map_err(|e| TokenError::Unavailable(e.to_string()))?;
        let resp = http_client::send(self.addr, req, IMDS_TIMEOUT)
            .await
            .map_err(|e| TokenError::Unavailable(e.to_string()))?;
        let status = resp.status().as_u16();
        if is_transient(status) {
            return Err(TokenError::Transient {
                status,
                body: String::from_utf8_lossy(resp.body())
                    .chars()
                    .take(1024)
                    .collect(),
                retry_after: parse_retry_after(resp.headers().get(header::RETRY_AFTER)),
                attempts: 1,
            });
        }
        if resp.status() != StatusCode::OK {
            return Err(TokenError::Refused {
                status: resp.status().as_u16(),
                body: String::from_utf8_lossy(resp.body())
                    .chars()
                    .take(1024)
                    .collect(),
            });
        }
        let mut body: TokenBody = serde_json::from_slice(resp.body())
            .map_err(|e| TokenError::Unavailable(format!("malformed IMDS token response: {e}")))?;
        // Exactly what IMDS said (empty when nothing): the caller checks it.
        let client_id = body.client_id.take().unwrap_or_default();
        body.into_token("IMDS", resource, client_id, now_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imds_base_must_be_an_ip() {
        assert_eq!(
            Imds::new("http://169.254.169.254", "ua")
                .unwrap()
                .addr()
                .to_string(),
            "169.254.169.254:80"
        );
        assert_eq!(
            Imds::new("http://127.0.0.1:9999/", "ua")
                .unwrap()
                .addr()
                .port(),
            9999
        );
        assert!(Imds::new("https://169.254.169.254", "ua").is_err());
        assert!(Imds::new("http://metadata.internal", "ua").is_err());
    }
}
