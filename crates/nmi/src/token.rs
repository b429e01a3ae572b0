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
//!
//! IMDS's transient answers (404 "updating", 410, 429, 5xx) are retried a
//! bounded number of times, each wait stretched to IMDS's `Retry-After`
//! ([`RetryPolicy`]); if they persist, the pod gets IMDS's own status and
//! `Retry-After` ([`TokenError::Transient`]), so its SDK backs off as it
//! would against IMDS. Requests queued behind such a failure share it
//! instead of each retrying again.

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
#[derive(Clone, Debug, thiserror::Error)]
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
    /// IMDS kept answering a transient status (404, 410, 429, 5xx) through
    /// NMI's bounded retries, or asked for a longer wait than NMI holds a
    /// request: answered with IMDS's own status (and its `Retry-After`), so
    /// the pod's SDK retries as it would against IMDS. Upstream turned these
    /// into 403, which SDKs do not retry.
    #[error(
        "failed to get token from IMDS after {attempts} attempt(s): status {status}, response body: {body}"
    )]
    Transient {
        /// IMDS's last status.
        status: u16,
        /// IMDS's last body (an error description, never a token).
        body: String,
        /// IMDS's last `Retry-After`, if any.
        retry_after: Option<Duration>,
        /// Requests made.
        attempts: u32,
    },
}

impl TokenError {
    /// Upstream's status (statement 55).
    pub fn status(&self) -> StatusCode {
        match self {
            TokenError::Refused { .. } | TokenError::Forbidden(_) => StatusCode::FORBIDDEN,
            TokenError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            TokenError::NotBound => StatusCode::NOT_FOUND,
            TokenError::Transient { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
        }
    }

    /// The `Retry-After` to pass on to the pod, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TokenError::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Statuses IMDS documents as transient and safe to retry: 404 ("IMDS
/// endpoint is updating"), 410 (updating, back within 70 s), 429 and 5xx
/// (azure-protocols.md §1.4-1.5, from Microsoft's "how to use VM token" retry
/// guidance).
pub fn is_transient(status: u16) -> bool {
    matches!(status, 404 | 410 | 429) || (500..=599).contains(&status)
}

/// `Retry-After` as delay-seconds (RFC 9110 §10.2.3); IMDS sends no dates.
pub fn parse_retry_after(value: Option<&http::HeaderValue>) -> Option<Duration> {
    let secs: u64 = value?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// How NMI retries transient IMDS answers before giving the pod IMDS's
/// status. Bounded so a pod's request is not held much longer than one IMDS
/// SLA (10 s): the SDK in the pod retries on its own after that.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Waits before the 2nd, 3rd, ... request; their count bounds the retries.
    pub backoff: Vec<Duration>,
    /// A `Retry-After` longer than this ends the retries at once (it is
    /// passed on to the pod instead).
    pub max_retry_after: Duration,
    /// Total waiting between requests never exceeds this.
    pub max_total_wait: Duration,
}

impl Default for RetryPolicy {
    /// Three retries after 1, 2 and 4 s (IMDS: "safe to retry after waiting
    /// for at least 1 second"), each stretched to IMDS's `Retry-After`; at most
    /// 8 s of waiting in all.
    fn default() -> Self {
        RetryPolicy {
            backoff: vec![
                Duration::from_secs(1),
                Duration::from_secs(2),
                Duration::from_secs(4),
            ],
            max_retry_after: Duration::from_secs(8),
            max_total_wait: Duration::from_secs(8),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (0-based) after `error`, given
    /// `waited` so far; `None` when NMI stops and answers the pod.
    pub fn next_wait(
        &self,
        retry: usize,
        error: &TokenError,
        waited: Duration,
    ) -> Option<Duration> {
        let TokenError::Transient { retry_after, .. } = error else {
            return None;
        };
        let base = *self.backoff.get(retry)?;
        if retry_after.is_some_and(|r| r > self.max_retry_after) {
            return None;
        }
        let wait = base.max(retry_after.unwrap_or_default());
        (waited + wait <= self.max_total_wait).then_some(wait)
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

#[derive(Debug, Default)]
struct SlotState {
    token: Option<Token>,
    /// The last fetch's transient failure, and when it came: requests that
    /// were already waiting for that fetch get it too, rather than each
    /// starting its own round of retries against a failing IMDS. Requests
    /// that arrive later try again.
    failed: Option<(Instant, TokenError)>,
}

type Slot = Arc<tokio::sync::Mutex<SlotState>>;

/// The token cache in front of a [`TokenSource`].
#[derive(Debug)]
pub struct TokenCache<S> {
    source: S,
    slots: Mutex<HashMap<(String, String), Slot>>,
    limiter: Limiter,
    retry: RetryPolicy,
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
            retry: RetryPolicy::default(),
        }
    }

    /// The same cache with another retry policy for transient IMDS answers.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// One IMDS token, each request inside the limiter, transient answers
    /// retried per the [`RetryPolicy`] (the waits hold no limiter permit).
    async fn imds(&self, id: &ImdsIdentity, resource: &str) -> Result<Token, TokenError> {
        let mut waited = Duration::ZERO;
        let mut attempts = 1u32;
        loop {
            let result = self.limiter.run(self.source.imds_token(id, resource)).await;
            let error = match result {
                Ok(token) => return Ok(token),
                Err(e) => e,
            };
            let Some(wait) = self.retry.next_wait(attempts as usize - 1, &error, waited) else {
                return Err(match error {
                    TokenError::Transient {
                        status,
                        body,
                        retry_after,
                        ..
                    } => TokenError::Transient {
                        status,
                        body,
                        retry_after,
                        attempts,
                    },
                    other => other,
                });
            };
            tracing::warn!(%error, ?wait, attempts, "IMDS answered a transient error; retrying");
            tokio::time::sleep(wait).await;
            waited += wait;
            attempts += 1;
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
        let arrived = Instant::now();
        // Holding the slot's lock across the fetch makes concurrent misses
        // share one upstream call.
        let mut guard = slot.lock().await;
        if let Some(t) = guard.token.as_ref()
            && t.expires_on > now_secs() + REFRESH_MARGIN_SECS
        {
            return Ok(t.clone());
        }
        // Concurrent misses share failures too.
        if let Some((at, e)) = guard.failed.as_ref()
            && *at >= arrived
        {
            return Err(e.clone());
        }
        let id = ImdsIdentity::ClientId(client_id.to_string());
        match self.imds(&id, resource).await {
            Ok(token) => {
                guard.token = Some(token.clone());
                guard.failed = None;
                Ok(token)
            }
            Err(e) => {
                if matches!(e, TokenError::Transient { .. }) {
                    guard.failed = Some((Instant::now(), e.clone()));
                }
                Err(e)
            }
        }
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
        if let Some(t) = guard.token.as_ref()
            && t.expires_on > now_secs() + REFRESH_MARGIN_SECS
        {
            return Ok(t.clone());
        }
        let token = fetch().await?;
        guard.token = Some(token.clone());
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
        let token = self.imds(&id, resource).await?;
        let appid =
            jwt_appid(token.access_token.expose()).unwrap_or_else(|| token.client_id.clone());
        if !allowed_client_ids
            .iter()
            .any(|c| c.eq_ignore_ascii_case(&appid))
        {
            return Err(TokenError::NotBound);
        }
        let slot = self.slot(&appid, resource);
        slot.lock().await.token = Some(token.clone());
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

    /// A scripted answer: a token, or (status, Retry-After seconds).
    type Answer = Result<(), (u16, Option<u64>)>;

    /// Answers from a script, in order; the last answer repeats.
    struct Scripted {
        answers: Mutex<Vec<Answer>>,
        calls: AtomicUsize,
    }

    impl Scripted {
        fn new(answers: Vec<Answer>) -> Self {
            Scripted {
                answers: Mutex::new(answers),
                calls: AtomicUsize::new(0),
            }
        }
    }

    impl TokenSource for Scripted {
        async fn imds_token(
            &self,
            _identity: &ImdsIdentity,
            resource: &str,
        ) -> Result<Token, TokenError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let answer = {
                let answers = self.answers.lock().unwrap();
                answers[n.min(answers.len() - 1)]
            };
            match answer {
                Ok(()) => Ok(Token {
                    access_token: Secret::new(jwt("c")),
                    expires_on: now_secs() + 86_399,
                    not_before: None,
                    resource: resource.into(),
                    token_type: "Bearer".into(),
                    client_id: "c".into(),
                }),
                Err((400, _)) => Err(TokenError::Refused {
                    status: 400,
                    body: "Identity not found".into(),
                }),
                Err((status, retry_after)) => Err(TokenError::Transient {
                    status,
                    body: format!("{{\"error\":\"{status}\"}}"),
                    retry_after: retry_after.map(Duration::from_secs),
                    attempts: 1,
                }),
            }
        }
    }

    fn fast_policy() -> RetryPolicy {
        RetryPolicy {
            backoff: vec![
                Duration::from_millis(10),
                Duration::from_millis(20),
                Duration::from_millis(40),
            ],
            max_retry_after: Duration::from_secs(2),
            max_total_wait: Duration::from_secs(3),
        }
    }

    #[tokio::test]
    async fn transient_imds_answers_are_retried_boundedly_then_passed_on() {
        struct Case {
            name: &'static str,
            script: Vec<Answer>,
            calls: usize,
            /// `None`: a token; else (status to the pod, Retry-After to the pod).
            want_error: Option<(u16, Option<u64>)>,
        }
        let cases = [
            Case {
                name: "429 then 503 then a token",
                script: vec![Err((429, None)), Err((503, None)), Ok(())],
                calls: 3,
                want_error: None,
            },
            Case {
                name: "404 (updating) and 410 are transient too",
                script: vec![Err((404, None)), Err((410, None)), Ok(())],
                calls: 3,
                want_error: None,
            },
            Case {
                name: "500 on every attempt: four requests, then IMDS's 500",
                script: vec![Err((500, None))],
                calls: 4,
                want_error: Some((500, None)),
            },
            Case {
                name: "a Retry-After beyond NMI's bound is passed on at once",
                script: vec![Err((429, Some(30))), Ok(())],
                calls: 1,
                want_error: Some((429, Some(30))),
            },
            Case {
                name: "a design-time error is not retried (upstream's 403)",
                script: vec![Err((400, None)), Ok(())],
                calls: 1,
                want_error: Some((403, None)),
            },
        ];
        for case in cases {
            let cache = TokenCache::new(Scripted::new(case.script)).with_retry(fast_policy());
            let got = cache.by_client_id("c", "r").await;
            assert_eq!(
                cache.source().calls.load(Ordering::SeqCst),
                case.calls,
                "{}",
                case.name
            );
            match (got, case.want_error) {
                (Ok(_), None) => {}
                (Err(e), Some((status, retry_after))) => {
                    assert_eq!(e.status().as_u16(), status, "{}: {e}", case.name);
                    assert_eq!(
                        e.retry_after(),
                        retry_after.map(Duration::from_secs),
                        "{}",
                        case.name
                    );
                    if let TokenError::Transient { attempts, .. } = e {
                        assert_eq!(attempts as usize, case.calls, "{}", case.name);
                    }
                }
                (got, want) => panic!("{}: got {got:?}, want error {want:?}", case.name),
            }
        }
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_round_of_retries() {
        let cache = Arc::new(
            TokenCache::new(Scripted::new(vec![Err((500, None))])).with_retry(fast_policy()),
        );
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let cache = Arc::clone(&cache);
            tasks.push(tokio::spawn(async move {
                cache.by_client_id("c", "r").await.map(|_| ())
            }));
        }
        for t in tasks {
            let e = t.await.unwrap().unwrap_err();
            assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR, "{e}");
        }
        // One round (four requests), not one per waiting request.
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 4);
        // A request made after the failure tries again.
        let _ = cache.by_client_id("c", "r").await;
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 8);
    }

    #[tokio::test]
    async fn retry_after_stretches_the_wait() {
        let cache = TokenCache::new(Scripted::new(vec![Err((429, Some(1))), Ok(())]))
            .with_retry(fast_policy());
        let started = Instant::now();
        cache.by_client_id("c", "r").await.unwrap();
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 2);
        // The 10 ms backoff was stretched to IMDS's one second.
        assert!(started.elapsed() >= Duration::from_secs(1));
    }

    #[test]
    fn default_policy_waits() {
        let p = RetryPolicy::default();
        let t = |retry_after: Option<u64>| TokenError::Transient {
            status: 429,
            body: String::new(),
            retry_after: retry_after.map(Duration::from_secs),
            attempts: 1,
        };
        let s = Duration::from_secs;
        assert_eq!(p.next_wait(0, &t(None), s(0)), Some(s(1)));
        assert_eq!(p.next_wait(1, &t(None), s(1)), Some(s(2)));
        assert_eq!(p.next_wait(2, &t(None), s(3)), Some(s(4)));
        assert_eq!(
            p.next_wait(3, &t(None), s(7)),
            None,
            "three retries at most"
        );
        assert_eq!(p.next_wait(0, &t(Some(5)), s(0)), Some(s(5)));
        assert_eq!(
            p.next_wait(1, &t(Some(5)), s(5)),
            None,
            "8 s of waiting at most"
        );
        assert_eq!(p.next_wait(0, &t(Some(9)), s(0)), None);
        let refused = TokenError::Refused {
            status: 400,
            body: String::new(),
        };
        assert_eq!(p.next_wait(0, &refused, s(0)), None);
        assert!(is_transient(404) && is_transient(410) && is_transient(429));
        assert!(is_transient(500) && is_transient(503) && !is_transient(400));
        assert!(!is_transient(403) && !is_transient(200));
        assert_eq!(
            parse_retry_after(Some(&http::HeaderValue::from_static(" 7 "))),
            Some(s(7))
        );
        assert_eq!(
            parse_retry_after(Some(&http::HeaderValue::from_static(
                "Wed, 21 Oct 2015 07:28:00 GMT"
            ))),
            None
        );
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
