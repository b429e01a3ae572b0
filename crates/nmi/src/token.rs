//! Token acquisition: the [`TokenSource`] trait, its implementation over IMDS
//! ([`Imds`]), and the [`TokenCache`] in front of it.
//!
//! Beyond upstream (which cached nothing, statement 71): tokens are cached per
//! (client ID, resource), concurrent misses share one upstream call, entries
//! are refreshed well before expiry and dropped when no pod on the node uses
//! the identity. The cache sits *behind* the access check: the server decides
//! which identity a pod may use on every request, from the live index, before
//! it asks the cache, so a pod that loses its binding loses access at once.
//! A client-side limiter keeps NMI inside IMDS's per-VM budget of 20 token
//! requests per second and 5 concurrent (azure-protocols.md §1.6).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http::{Method, Request, StatusCode, header};
use http_body_util::Full;
use hyper::body::Bytes;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::http_client;
use crate::response::Token;
use crate::secret::Secret;

/// Which identity to ask IMDS for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImdsIdentity {
    /// By client ID.
    ClientId(String),
    /// By object (principal) ID.
    ObjectId(String),
}

/// Why a token could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// IMDS (or AAD) answered with an error: upstream's adal
    /// `TokenRefreshError`, answered 403 (statement 55).
    #[error("failed to refresh token, error: status {status}, response body: {body}")]
    Refused {
        /// The upstream status.
        status: u16,
        /// The upstream body (an error description, never a token).
        body: String,
    },
    /// No usable answer (network, timeout, malformed 200): answered 503.
    #[error("failed to get token: {0}")]
    Unavailable(String),
    /// A configuration NMI refuses to use (a Secret outside the identity's
    /// namespace, hazard H10): answered 403.
    #[error("{0}")]
    Forbidden(String),
    /// An `object_id` request resolved to an identity the pod is not bound to.
    #[error("the identity with the requested object ID is not bound to this pod")]
    NotBound,
}

impl TokenError {
    /// Upstream's status (statement 55).
    pub fn status(&self) -> StatusCode {
        match self {
            TokenError::Refused { .. } | TokenError::Forbidden(_) => StatusCode::FORBIDDEN,
            TokenError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            TokenError::NotBound => StatusCode::NOT_FOUND,
        }
    }
}

/// Where tokens come from. One small trait, owned by its consumer; the real
/// implementation talks to IMDS, tests may substitute their own.
pub trait TokenSource: Send + Sync + 'static {
    /// A managed-identity token for `resource`.
    fn imds_token(
        &self,
        identity: &ImdsIdentity,
        resource: &str,
    ) -> impl Future<Output = Result<Token, TokenError>> + Send;
}

/// IMDS's managed-identity endpoint.
#[derive(Clone, Debug)]
pub struct Imds {
    addr: SocketAddr,
    host: String,
    user_agent: String,
}

/// IMDS's SLA is 10 s per request (azure-protocols.md §1.5).
const IMDS_TIMEOUT: Duration = Duration::from_secs(10);
/// NMI's own api-version, as upstream's adal (statement 52).
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

/// Epoch seconds now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The `appid` claim of a JWT (unverified: the token came from IMDS over the
/// node's own link and is only used to check which identity it is for).
pub fn jwt_appid(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims
        .get("appid")
        .or_else(|| claims.get("azp"))
        .and_then(|v| v.as_str())
        .map(str::to_owned)
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
                ImdsIdentity::ClientId(c) => q.append_pair("client_id", c),
                ImdsIdentity::ObjectId(o) => q.append_pair("object_id", o),
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
        let client_id = match (body.client_id.take(), identity) {
            (Some(c), _) if !c.is_empty() => c,
            (_, ImdsIdentity::ClientId(c)) => c.clone(),
            (_, ImdsIdentity::ObjectId(_)) => jwt_appid(&body.access_token).unwrap_or_default(),
        };
        body.into_token("IMDS", resource, client_id, now_secs())
    }
}

/// Time between request starts for `per_second`, 5% wider than `1 s /
/// per_second`: IMDS (and the emulator) count a sliding one-second window, and
/// with exact spacing the 1st and the 21st start may both fall inside one
/// window once arrival jitter is added (seen as 429s in the benchmark).
fn spacing_for(per_second: u32) -> Duration {
    Duration::from_micros(1_050_000 / u64::from(per_second.max(1)))
}

/// Keeps requests to IMDS within 5 concurrent and 20 per second.
#[derive(Debug)]
struct Limiter {
    concurrent: Semaphore,
    next_start: Mutex<Instant>,
    spacing: Duration,
}

impl Limiter {
    fn new(concurrent: usize, per_second: u32) -> Self {
        Limiter {
            concurrent: Semaphore::new(concurrent),
            next_start: Mutex::new(Instant::now()),
            spacing: spacing_for(per_second),
        }
    }

    async fn run<T>(&self, f: impl Future<Output = T>) -> T {
        let _permit = self.concurrent.acquire().await;
        let start = {
            let mut next = self.next_start.lock().unwrap_or_else(|e| e.into_inner());
            let start = (*next).max(Instant::now());
            *next = start + self.spacing;
            start
        };
        tokio::time::sleep_until(start).await;
        f.await
    }
}

/// A token is served from cache only while it has more than this left; SDKs
/// treat under 5 minutes as expired (azure-protocols.md §8 point 10).
const REFRESH_MARGIN_SECS: u64 = 15 * 60;

type Slot = Arc<tokio::sync::Mutex<Option<Token>>>;

/// The token cache in front of a [`TokenSource`].
#[derive(Debug)]
pub struct TokenCache<S> {
    source: S,
    slots: Mutex<HashMap<(String, String), Slot>>,
    limiter: Limiter,
}

impl<S: TokenSource> TokenCache<S> {
    /// A cache over `source`, keeping calls within IMDS's per-VM budget
    /// (5 concurrent, 20 per second).
    pub fn new(source: S) -> Self {
        Self::with_limits(source, 5, 20)
    }

    /// A cache over `source` with other limits (benchmarks measure NMI's own
    /// overhead with the limiter lifted).
    pub fn with_limits(source: S, concurrent: usize, per_second: u32) -> Self {
        TokenCache {
            source,
            slots: Mutex::new(HashMap::new()),
            limiter: Limiter::new(concurrent, per_second),
        }
    }

    fn slot(&self, client_id: &str, resource: &str) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            slots
                .entry((client_id.to_ascii_lowercase(), resource.to_string()))
                .or_default(),
        )
    }

    /// A token for the identity with `client_id`. The caller has already
    /// decided that the pod may use it.
    pub async fn by_client_id(&self, client_id: &str, resource: &str) -> Result<Token, TokenError> {
        let slot = self.slot(client_id, resource);
        // Holding the slot's lock across the fetch makes concurrent misses
        // share one upstream call.
        let mut guard = slot.lock().await;
        if let Some(t) = guard.as_ref()
            && t.expires_on > now_secs() + REFRESH_MARGIN_SECS
        {
            return Ok(t.clone());
        }
        let id = ImdsIdentity::ClientId(client_id.to_string());
        let token = self
            .limiter
            .run(self.source.imds_token(&id, resource))
            .await?;
        *guard = Some(token.clone());
        Ok(token)
    }

    /// A token cached under (`client_id`, `key`), fetched by `fetch` on a miss
    /// (no IMDS limiter: for AAD). Concurrent misses share one fetch.
    pub async fn cached<F, Fut>(
        &self,
        client_id: &str,
        key: String,
        fetch: F,
    ) -> Result<Token, TokenError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Token, TokenError>>,
    {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(
                slots
                    .entry((client_id.to_ascii_lowercase(), key))
                    .or_default(),
            )
        };
        let mut guard = slot.lock().await;
        if let Some(t) = guard.as_ref()
            && t.expires_on > now_secs() + REFRESH_MARGIN_SECS
        {
            return Ok(t.clone());
        }
        let token = fetch().await?;
        *guard = Some(token.clone());
        Ok(token)
    }

    /// A token by `object_id`, accepted only if it is for one of
    /// `allowed_client_ids` (ignoring case); then cached under its client ID.
    pub async fn by_object_id(
        &self,
        object_id: &str,
        resource: &str,
        allowed_client_ids: &[String],
    ) -> Result<Token, TokenError> {
        let id = ImdsIdentity::ObjectId(object_id.to_string());
        let token = self
            .limiter
            .run(self.source.imds_token(&id, resource))
            .await?;
        let appid =
            jwt_appid(token.access_token.expose()).unwrap_or_else(|| token.client_id.clone());
        if !allowed_client_ids
            .iter()
            .any(|c| c.eq_ignore_ascii_case(&appid))
        {
            return Err(TokenError::NotBound);
        }
        let slot = self.slot(&appid, resource);
        *slot.lock().await = Some(token.clone());
        Ok(token)
    }

    /// The source, for uncached calls.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Drops entries for identities no pod on the node uses any more.
    pub fn retain(&self, client_ids_in_use: &HashSet<String>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|(client, _), _| client_ids_in_use.contains(client));
    }

    /// Number of cached (identity, resource) entries.
    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Fake {
        calls: AtomicUsize,
        lifetime: u64,
    }

    fn jwt(appid: &str) -> String {
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            b.encode(br#"{"alg":"none"}"#),
            b.encode(serde_json::json!({"appid": appid}).to_string())
        )
    }

    impl TokenSource for Fake {
        async fn imds_token(
            &self,
            identity: &ImdsIdentity,
            resource: &str,
        ) -> Result<Token, TokenError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            let client = match identity {
                ImdsIdentity::ClientId(c) => c.clone(),
                ImdsIdentity::ObjectId(o) => format!("app-of-{o}"),
            };
            Ok(Token {
                access_token: Secret::new(jwt(&client)),
                expires_on: now_secs() + self.lifetime,
                not_before: None,
                resource: resource.into(),
                token_type: "Bearer".into(),
                client_id: client,
            })
        }
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_call_and_hits_make_none() {
        let cache = Arc::new(TokenCache::new(Fake {
            lifetime: 86_399,
            ..Default::default()
        }));
        let mut tasks = Vec::new();
        for i in 0..16 {
            let cache = Arc::clone(&cache);
            // Case differences share the entry.
            let id = if i % 2 == 0 { "CID-A" } else { "cid-a" };
            tasks.push(tokio::spawn(
                async move { cache.by_client_id(id, "r").await },
            ));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 1);
        cache.by_client_id("cid-a", "other-resource").await.unwrap();
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn short_lived_tokens_are_refetched() {
        let cache = TokenCache::new(Fake {
            lifetime: 60,
            ..Default::default()
        });
        cache.by_client_id("c", "r").await.unwrap();
        cache.by_client_id("c", "r").await.unwrap();
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn retain_drops_unused_identities() {
        let cache = TokenCache::new(Fake {
            lifetime: 86_399,
            ..Default::default()
        });
        cache.by_client_id("a", "r").await.unwrap();
        cache.by_client_id("b", "r").await.unwrap();
        cache.retain(&["a".to_string()].into_iter().collect());
        assert_eq!(cache.len(), 1);
    }

    #[tokio::test]
    async fn object_id_is_checked_against_the_bound_identities() {
        let cache = TokenCache::new(Fake {
            lifetime: 86_399,
            ..Default::default()
        });
        let ok = cache
            .by_object_id("o1", "r", &["APP-OF-O1".to_string(), "x".to_string()])
            .await
            .unwrap();
        assert_eq!(ok.client_id, "app-of-o1");
        let denied = cache
            .by_object_id("o2", "r", &["app-of-o1".to_string()])
            .await;
        assert!(matches!(denied, Err(TokenError::NotBound)));
    }

    #[test]
    fn limiter_spacing_keeps_a_margin_below_the_rate() {
        for per_second in [1u32, 5, 20, 1000] {
            let span = spacing_for(per_second) * per_second;
            assert!(
                span >= Duration::from_millis(1040),
                "{per_second}: {span:?}"
            );
            assert!(
                span <= Duration::from_millis(1060),
                "{per_second}: {span:?}"
            );
        }
        assert_eq!(spacing_for(0), Duration::from_micros(1_050_000));
    }

    #[test]
    fn appid_from_jwt_and_statuses() {
        assert_eq!(jwt_appid(&jwt("c1")).as_deref(), Some("c1"));
        assert_eq!(jwt_appid("not-a-jwt"), None);
        assert_eq!(
            TokenError::Refused {
                status: 400,
                body: String::new()
            }
            .status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(TokenError::Unavailable(String::new()).status(), 503);
    }

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
