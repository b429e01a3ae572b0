//! Token acquisition: the [`TokenSource`] trait, its implementation over IMDS
//! ([`Imds`]), and the [`TokenCache`] in front of it.
//!
//! **One identity, checked end to end.** A user-assigned identity is asked
//! for by its resource ID (`msi_res_id`), the ID MIC assigns to the node, not
//! by the client ID the user typed into the AzureIdentity; the token is handed
//! out only if IMDS's `client_id` and the token's `appid` (or `azp`) both equal
//! the AzureIdentity's `clientID`, ignoring case ([`verify_client_id`]).
//! Otherwise an AzureIdentity naming an assignable resource ID and another
//! identity's client ID (the kubelet identity's, say) would get that other
//! identity's token. Upstream asked by client ID and checked nothing.
//!
//! Beyond upstream (which cached nothing, statement 71): tokens are cached per
//! (resource ID, client ID, resource), concurrent misses share one upstream call, entries
//! are refreshed well before expiry and dropped when no pod on the node uses
//! the identity. The cache sits *behind* the access check: the server decides
//! which identity a pod may use on every request, from the live index, before
//! it asks the cache, so a pod that loses its binding loses access at once.
//! A client-side limiter keeps NMI inside IMDS's per-VM budget of 20 token
//! requests per second and 5 concurrent (azure-protocols.md §1.6), shared
//! fairly between the pods that ask ([`crate::fair`]).
//!
//! **Bounded.** The cache holds at most `max_cached_tokens` idle entries
//! (inserting beyond that evicts an empty or expired entry first, else the
//! least recently used one); entries in use by a request in progress are never
//! evicted, so the map holds at most `max_cached_tokens` plus one entry per
//! request in progress (itself bounded by the server's connection caps, one
//! request per connection). An entry without a token (a failed or abandoned
//! fetch) is removed as soon as no request holds it, so once callers stop the
//! map holds only tokens, at most `max_cached_tokens`.
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
use tokio::time::Instant;

use crate::cluster::ClusterIdentities;
use crate::fair::{FairLimiter, RequesterKey};
use crate::http_client;
use crate::response::Token;
use crate::secret::Secret;

/// Which identity to ask IMDS for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImdsIdentity {
    /// By ARM resource ID (`msi_res_id`): the ID MIC assigned to the node.
    ResourceId(String),
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
    /// IMDS's identity for the AzureIdentity's resource ID has another client
    /// ID than the AzureIdentity says: answered 403, the token is never
    /// handed out.
    #[error(
        "the managed identity with resourceID {resource_id} is not the one with clientID {expected} named by the AzureIdentity; no token is returned"
    )]
    ClientIdMismatch {
        /// The AzureIdentity's `resourceID` (what IMDS was asked for).
        resource_id: String,
        /// The AzureIdentity's `clientID`.
        expected: String,
    },
    /// The identity is one of the cluster's own (the kubelet identity or one
    /// in `--immutable-user-msis`) and `--serve-cluster-identities` is off:
    /// answered 403, the token is never handed out nor cached.
    #[error(
        "the managed identity with clientID {client_id} is one of the cluster's own identities; nmi serves it only with --serve-cluster-identities"
    )]
    ClusterIdentity {
        /// The client ID that matched.
        client_id: String,
    },
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
    /// The pod already has the most IMDS calls waiting that NMI queues for
    /// one pod: answered 429 with `Retry-After`, IMDS's own answer when its
    /// budget is exceeded.
    #[error(
        "too many token requests from this pod are waiting for IMDS; retry after {} s",
        retry_after.as_secs()
    )]
    Throttled {
        /// When the pod should ask again.
        retry_after: Duration,
    },
}

impl TokenError {
    /// Upstream's status (statement 55).
    pub fn status(&self) -> StatusCode {
        match self {
            TokenError::Refused { .. }
            | TokenError::Forbidden(_)
            | TokenError::ClientIdMismatch { .. }
            | TokenError::ClusterIdentity { .. } => StatusCode::FORBIDDEN,
            TokenError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            TokenError::NotBound => StatusCode::NOT_FOUND,
            TokenError::Transient { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
            TokenError::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The `Retry-After` to pass on to the pod, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TokenError::Transient { retry_after, .. } => *retry_after,
            TokenError::Throttled { retry_after } => Some(*retry_after),
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

/// The claims of a JWT (unverified: the token came from IMDS over the
/// node's own link and is only read to check which identity it is for).
fn jwt_claims(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The client ID a JWT was issued to: its `appid` claim (v1 tokens), or
/// `azp` when there is no `appid` (v2 tokens).
pub fn jwt_appid(token: &str) -> Option<String> {
    let claims = jwt_claims(token)?;
    match claims.get("appid") {
        Some(appid) => appid.as_str().map(str::to_owned),
        None => claims.get("azp")?.as_str().map(str::to_owned),
    }
}

/// The `oid` claim of a JWT: the object (principal) ID of its identity.
pub fn jwt_oid(token: &str) -> Option<String> {
    jwt_claims(token)?.get("oid")?.as_str().map(str::to_owned)
}

/// Why a token is not for the expected client ID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdMismatch {
    /// `client_id` of IMDS's answer (empty when it had none).
    pub imds_client_id: String,
    /// The token's `appid` (or `azp`), if it could be read.
    pub token_client_id: Option<String>,
}

/// Whether a token from IMDS is for `expected` (an AzureIdentity's
/// `clientID`): IMDS's `client_id` field and the token's `appid` (or `azp`
/// when it has no `appid`) must both equal it, ignoring ASCII case. An empty
/// `expected`, a missing field or an unreadable token never match.
pub fn verify_client_id(
    expected: &str,
    imds_client_id: &str,
    access_token: &str,
) -> Result<(), ClientIdMismatch> {
    let token_client_id = jwt_appid(access_token);
    let same = |c: &str| !expected.is_empty() && c.eq_ignore_ascii_case(expected);
    if same(imds_client_id) && token_client_id.as_deref().is_some_and(same) {
        return Ok(());
    }
    Err(ClientIdMismatch {
        imds_client_id: imds_client_id.to_string(),
        token_client_id,
    })
}

/// The cache's key for one identity: a user-assigned identity by (resource
/// ID, client ID), both lower-cased, so that a token checked for one pair is
/// never served for another; a service principal by client ID (its entries
/// also carry the digest of the Secret, see [`crate::sp`]).
pub fn identity_cache_key(spec: &aadpodid_api::AzureIdentitySpec) -> String {
    match spec.r#type {
        aadpodid_api::IdentityType::UserAssignedMsi => {
            msi_cache_key(&spec.resource_id, &spec.client_id)
        }
        _ => format!("sp\n{}", spec.client_id.to_ascii_lowercase()),
    }
}

fn msi_cache_key(resource_id: &str, client_id: &str) -> String {
    format!(
        "msi\n{}\n{}",
        resource_id.to_ascii_lowercase(),
        client_id.to_ascii_lowercase()
    )
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

/// Time between request starts for `per_second`, 5% wider than `1 s /
/// per_second`: IMDS (and the emulator) count a sliding one-second window, and
/// with exact spacing the 1st and the 21st start may both fall inside one
/// window once arrival jitter is added (seen as 429s in the benchmark).
pub fn spacing_for(per_second: u32) -> Duration {
    Duration::from_micros(1_050_000 / u64::from(per_second.max(1)))
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
type SlotKey = (String, String);

/// Default `--max-pending-fetches-per-pod`.
pub const DEFAULT_MAX_PENDING_PER_POD: usize = 16;
/// Default `--max-cached-tokens`.
pub const DEFAULT_MAX_CACHED_TOKENS: usize = 4096;

#[derive(Debug)]
struct Entry {
    slot: Slot,
    /// When it was last asked for (a counter, not a clock).
    used: u64,
}

#[derive(Debug, Default)]
struct Slots {
    map: HashMap<SlotKey, Entry>,
    tick: u64,
}

/// What eviction needs to know of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryState {
    /// A request holds it: never evicted.
    Busy,
    /// No token (a failed or abandoned fetch).
    Empty,
    /// A token too close to expiry to be served.
    Expired,
    /// A token that would be served.
    Live,
}

/// Which entry to evict: never a busy one; empty and expired entries before
/// live ones; the least recently used (`used`, smaller is older) among
/// equals. `None` when every entry is busy.
pub fn pick_victim<K>(entries: impl IntoIterator<Item = (K, EntryState, u64)>) -> Option<K> {
    entries
        .into_iter()
        .filter_map(|(k, state, used)| {
            let class = match state {
                EntryState::Busy => return None,
                EntryState::Empty | EntryState::Expired => 0u8,
                EntryState::Live => 1,
            };
            Some(((class, used), k))
        })
        .min_by_key(|(rank, _)| *rank)
        .map(|(_, k)| k)
}

/// A request's hold on one entry: when the last holder lets go of an entry
/// without a token, the entry leaves the map.
struct Lease<'a> {
    slots: &'a Mutex<Slots>,
    key: SlotKey,
    slot: Slot,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let ours = slots
            .map
            .get(&self.key)
            .is_some_and(|e| Arc::ptr_eq(&e.slot, &self.slot));
        // Two references: the map's and ours; the map lock keeps others from
        // taking one meanwhile.
        if ours
            && Arc::strong_count(&self.slot) == 2
            && self.slot.try_lock().is_ok_and(|s| s.token.is_none())
        {
            slots.map.remove(&self.key);
        }
    }
}

/// The token cache in front of a [`TokenSource`].
#[derive(Debug)]
pub struct TokenCache<S> {
    source: S,
    slots: Mutex<Slots>,
    max_entries: usize,
    limiter: FairLimiter<RequesterKey>,
    concurrency: usize,
    spacing: Duration,
    retry: RetryPolicy,
    cluster: ClusterIdentities,
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
        let spacing = spacing_for(per_second);
        TokenCache {
            source,
            slots: Mutex::new(Slots::default()),
            max_entries: DEFAULT_MAX_CACHED_TOKENS,
            limiter: FairLimiter::new(concurrent, spacing, DEFAULT_MAX_PENDING_PER_POD),
            concurrency: concurrent,
            spacing,
            retry: RetryPolicy::default(),
            cluster: ClusterIdentities::default(),
        }
    }

    /// The same cache with at most `max_pending_per_pod` IMDS calls waiting
    /// per pod (`--max-pending-fetches-per-pod`) and at most
    /// `max_cached_tokens` idle entries (`--max-cached-tokens`).
    pub fn with_bounds(mut self, max_pending_per_pod: usize, max_cached_tokens: usize) -> Self {
        self.limiter = FairLimiter::new(self.concurrency, self.spacing, max_pending_per_pod);
        self.max_entries = max_cached_tokens.max(1);
        self
    }

    /// IMDS calls (waiting for a start slot, holding one).
    pub fn pending_fetches(&self) -> (usize, usize) {
        self.limiter.load()
    }

    /// The same cache refusing the cluster's own identities
    /// ([`ClusterIdentities`]) in [`TokenCache::by_resource_id`].
    pub fn with_cluster_identities(mut self, cluster: ClusterIdentities) -> Self {
        self.cluster = cluster;
        self
    }

    /// The same cache with another retry policy for transient IMDS answers.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// One IMDS token, each request inside the limiter, transient answers
    /// retried per the [`RetryPolicy`] (the waits hold no limiter permit).
    async fn imds(
        &self,
        id: &ImdsIdentity,
        resource: &str,
        requester: &RequesterKey,
    ) -> Result<Token, TokenError> {
        let mut waited = Duration::ZERO;
        let mut attempts = 1u32;
        loop {
            let result = self
                .limiter
                .run(
                    requester,
                    attempts > 1,
                    self.source.imds_token(id, resource),
                )
                .await
                .map_err(|full| TokenError::Throttled {
                    retry_after: full.retry_after,
                })?;
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

    /// The entry for (`identity_key`, `key`), created (evicting another when
    /// the cache is full) if there is none.
    fn lease(&self, identity_key: &str, key: &str) -> Lease<'_> {
        let key = (identity_key.to_string(), key.to_string());
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.tick += 1;
        let tick = slots.tick;
        if let Some(e) = slots.map.get_mut(&key) {
            e.used = tick;
            let slot = Arc::clone(&e.slot);
            return Lease {
                slots: &self.slots,
                key,
                slot,
            };
        }
        while slots.map.len() >= self.max_entries {
            let now = now_secs();
            let victim = pick_victim(slots.map.iter().map(|(k, e)| {
                let state = if Arc::strong_count(&e.slot) > 1 {
                    EntryState::Busy
                } else {
                    match e.slot.try_lock() {
                        Err(_) => EntryState::Busy,
                        Ok(s) => match &s.token {
                            None => EntryState::Empty,
                            Some(t) if t.expires_on <= now + REFRESH_MARGIN_SECS => {
                                EntryState::Expired
                            }
                            Some(_) => EntryState::Live,
                        },
                    }
                };
                (k, state, e.used)
            }))
            .cloned();
            match victim {
                Some(k) => {
                    slots.map.remove(&k);
                }
                // Every entry is held by a request in progress.
                None => break,
            }
        }
        let slot = Slot::default();
        slots.map.insert(
            key.clone(),
            Entry {
                slot: Arc::clone(&slot),
                used: tick,
            },
        );
        Lease {
            slots: &self.slots,
            key,
            slot,
        }
    }

    /// A token for the user-assigned identity with `resource_id`, asked of
    /// IMDS by that resource ID and handed out only if it is for `client_id`
    /// ([`verify_client_id`]). The caller has already decided that the pod
    /// may use the identity. Cached under both IDs; a token that fails the
    /// check is never cached.
    ///
    /// A cluster identity ([`ClusterIdentities::refused`]) is refused before
    /// IMDS is asked when `client_id` names one, and after, should IMDS's
    /// `client_id` or the token's `appid` name one; it is never cached.
    ///
    /// The IMDS call waits in `requester`'s queue ([`crate::fair`]).
    pub async fn by_resource_id(
        &self,
        resource_id: &str,
        client_id: &str,
        resource: &str,
        requester: &RequesterKey,
    ) -> Result<Token, TokenError> {
        if resource_id.trim().is_empty() || client_id.trim().is_empty() {
            return Err(TokenError::Forbidden(
                "a user-assigned identity needs both resourceID and clientID".into(),
            ));
        }
        if let Some(c) = self.cluster.refused([client_id]) {
            return Err(TokenError::ClusterIdentity {
                client_id: c.to_string(),
            });
        }
        let lease = self.lease(&msi_cache_key(resource_id, client_id), resource);
        let arrived = Instant::now();
        // Holding the slot's lock across the fetch makes concurrent misses
        // share one upstream call. A caller that goes away drops the fetch
        // with the lock; the next waiter (if any) starts its own.
        let mut guard = lease.slot.lock().await;
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
        let id = ImdsIdentity::ResourceId(resource_id.to_string());
        let result = self.imds(&id, resource, requester).await.and_then(|token| {
            match verify_client_id(client_id, &token.client_id, token.access_token.expose()) {
                Ok(()) => {
                    let appid = jwt_appid(token.access_token.expose());
                    let seen = [Some(token.client_id.as_str()), appid.as_deref()];
                    match self.cluster.refused(seen.into_iter().flatten()) {
                        Some(c) => Err(TokenError::ClusterIdentity {
                            client_id: c.to_string(),
                        }),
                        None => Ok(token),
                    }
                }
                Err(mismatch) => {
                    tracing::warn!(
                        resource_id,
                        expected_client_id = client_id,
                        imds_client_id = %mismatch.imds_client_id,
                        token_client_id = ?mismatch.token_client_id,
                        "IMDS's identity for the resource ID has another client ID; token withheld"
                    );
                    Err(TokenError::ClientIdMismatch {
                        resource_id: resource_id.to_string(),
                        expected: client_id.to_string(),
                    })
                }
            }
        });
        match result {
            Ok(token) => {
                guard.token = Some(token.clone());
                guard.failed = None;
                Ok(token)
            }
            Err(e) => {
                if matches!(
                    e,
                    TokenError::Transient { .. } | TokenError::ClientIdMismatch { .. }
                ) {
                    guard.failed = Some((Instant::now(), e.clone()));
                }
                Err(e)
            }
        }
    }

    /// A token cached under (`identity_key`, `key`), fetched by `fetch` on a
    /// miss (no IMDS limiter: for AAD). Concurrent misses share one fetch.
    /// `identity_key` is [`identity_cache_key`] of the identity.
    pub async fn cached<F, Fut>(
        &self,
        identity_key: &str,
        key: String,
        fetch: F,
    ) -> Result<Token, TokenError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Token, TokenError>>,
    {
        let lease = self.lease(identity_key, &key);
        let mut guard = lease.slot.lock().await;
        if let Some(t) = guard.token.as_ref()
            && t.expires_on > now_secs() + REFRESH_MARGIN_SECS
        {
            return Ok(t.clone());
        }
        let token = fetch().await?;
        guard.token = Some(token.clone());
        Ok(token)
    }

    /// The source, for uncached calls.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Drops entries for identities no pod on the node uses any more
    /// (`in_use` holds [`identity_cache_key`]s), and the map's spare room
    /// after a burst.
    pub fn retain(&self, in_use: &HashSet<String>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .map
            .retain(|(identity, _), _| in_use.contains(identity));
        // Give back what a burst grew (the map never shrinks by itself).
        if slots.map.capacity() > 2 * slots.map.len() + 64 {
            slots.map.shrink_to_fit();
        }
    }

    /// Number of cached (identity, resource) entries.
    pub fn len(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .len()
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

    fn who() -> RequesterKey {
        RequesterKey::internal("test")
    }

    /// IMDS with one identity per resource ID: client ID `app-of-<rid>`,
    /// object ID `oid-of-<rid>` (lower case), unless `reports` says IMDS
    /// answers with another client ID.
    #[derive(Default)]
    struct Fake {
        calls: AtomicUsize,
        lifetime: u64,
        reports: Option<&'static str>,
    }

    fn jwt(claims: serde_json::Value) -> String {
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            b.encode(br#"{"alg":"none"}"#),
            b.encode(claims.to_string())
        )
    }

    fn jwt_app(appid: &str) -> String {
        jwt(serde_json::json!({"appid": appid}))
    }

    impl TokenSource for Fake {
        async fn imds_token(
            &self,
            identity: &ImdsIdentity,
            resource: &str,
        ) -> Result<Token, TokenError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            let ImdsIdentity::ResourceId(rid) = identity;
            let rid = rid.to_ascii_lowercase();
            let client = match self.reports {
                Some(c) => c.to_string(),
                None => format!("app-of-{rid}"),
            };
            Ok(Token {
                access_token: Secret::new(jwt(
                    serde_json::json!({"appid": client, "oid": format!("oid-of-{rid}")}),
                )),
                expires_on: now_secs() + self.lifetime,
                not_before: None,
                resource: resource.into(),
                token_type: "Bearer".into(),
                client_id: client,
            })
        }
    }

    fn long_lived() -> Fake {
        Fake {
            lifetime: 86_399,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_call_and_hits_make_none() {
        let cache = Arc::new(TokenCache::new(long_lived()));
        let mut tasks = Vec::new();
        for i in 0..16 {
            let cache = Arc::clone(&cache);
            // Case differences share the entry.
            let (rid, cid) = if i % 2 == 0 {
                ("RID-A", "APP-OF-RID-A")
            } else {
                ("rid-a", "app-of-rid-a")
            };
            tasks.push(tokio::spawn(async move {
                cache.by_resource_id(rid, cid, "r", &who()).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 1);
        cache
            .by_resource_id("rid-a", "app-of-rid-a", "other-resource", &who())
            .await
            .unwrap();
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn short_lived_tokens_are_refetched() {
        let cache = TokenCache::new(Fake {
            lifetime: 60,
            ..Default::default()
        });
        cache
            .by_resource_id("c", "app-of-c", "r", &who())
            .await
            .unwrap();
        cache
            .by_resource_id("c", "app-of-c", "r", &who())
            .await
            .unwrap();
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn retain_drops_unused_identities() {
        let cache = TokenCache::new(long_lived());
        cache
            .by_resource_id("a", "app-of-a", "r", &who())
            .await
            .unwrap();
        cache
            .by_resource_id("b", "app-of-b", "r", &who())
            .await
            .unwrap();
        cache.retain(&[msi_cache_key("A", "APP-OF-A")].into_iter().collect());
        assert_eq!(cache.len(), 1);
        cache
            .by_resource_id("a", "app-of-a", "r", &who())
            .await
            .unwrap();
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 2, "a kept");
    }

    #[tokio::test]
    async fn a_token_for_another_client_id_is_refused_and_never_cached() {
        // The resource ID of one identity with the client ID of another (the
        // kubelet identity's, say): IMDS answers for the resource ID.
        let cache = TokenCache::new(long_lived());
        for _ in 0..2 {
            let got = cache
                .by_resource_id("rid-a", "kubelet-client", "r", &who())
                .await;
            match got {
                Err(TokenError::ClientIdMismatch {
                    resource_id,
                    expected,
                }) => {
                    assert_eq!(
                        (resource_id.as_str(), expected.as_str()),
                        ("rid-a", "kubelet-client")
                    );
                }
                other => panic!("want a mismatch, got {other:?}"),
            }
        }
        assert_eq!(
            cache.source().calls.load(Ordering::SeqCst),
            2,
            "a refused token is not cached"
        );
        // The honest pair is cached on its own key: the refusal did not
        // poison it, and it does not answer for the forged pair.
        cache
            .by_resource_id("rid-a", "app-of-rid-a", "r", &who())
            .await
            .unwrap();
        cache
            .by_resource_id("rid-a", "app-of-rid-a", "r", &who())
            .await
            .unwrap();
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 3);
        let again = cache
            .by_resource_id("rid-a", "kubelet-client", "r", &who())
            .await;
        assert!(matches!(again, Err(TokenError::ClientIdMismatch { .. })));
        assert_eq!(again.unwrap_err().status(), StatusCode::FORBIDDEN);
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 4);

        // IMDS itself reporting another client ID for the resource ID.
        let lying = TokenCache::new(Fake {
            lifetime: 86_399,
            reports: Some("someone-else"),
            ..Default::default()
        });
        let got = lying
            .by_resource_id("rid-a", "app-of-rid-a", "r", &who())
            .await;
        assert!(
            matches!(got, Err(TokenError::ClientIdMismatch { .. })),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn cluster_identities_are_refused_without_asking_imds_unless_served() {
        // The Fake's identity for resource ID `kubelet` has client ID
        // `app-of-kubelet`: the AzureIdentity names it correctly.
        let cluster = ["APP-OF-KUBELET", "app-of-immutable"];
        let cache = TokenCache::new(long_lived())
            .with_cluster_identities(ClusterIdentities::new(cluster, false));
        for (rid, cid) in [
            ("kubelet", "app-of-kubelet"),
            ("KUBELET", "App-Of-Kubelet"),
            ("kubelet", " app-of-kubelet "),
            ("immutable", "app-of-immutable"),
            // A forged resource ID changes nothing: the client ID decides first.
            ("rid-a", "app-of-kubelet"),
        ] {
            let got = cache.by_resource_id(rid, cid, "r", &who()).await;
            match got {
                Err(e @ TokenError::ClusterIdentity { .. }) => {
                    assert_eq!(e.status(), StatusCode::FORBIDDEN);
                    assert!(
                        e.to_string().contains("one of the cluster's own identities; nmi serves it only with --serve-cluster-identities"),
                        "{e}"
                    );
                }
                other => panic!("{rid}/{cid}: want a cluster-identity refusal, got {other:?}"),
            }
        }
        assert_eq!(
            cache.source().calls.load(Ordering::SeqCst),
            0,
            "IMDS never asked"
        );
        assert!(cache.is_empty(), "nothing cached");
        // Other identities are served as before.
        cache
            .by_resource_id("rid-a", "app-of-rid-a", "r", &who())
            .await
            .unwrap();
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 1);

        let served = TokenCache::new(long_lived())
            .with_cluster_identities(ClusterIdentities::new(cluster, true));
        let token = served
            .by_resource_id("kubelet", "app-of-kubelet", "r", &who())
            .await
            .unwrap();
        assert_eq!(token.client_id, "app-of-kubelet");
        served
            .by_resource_id("kubelet", "app-of-kubelet", "r", &who())
            .await
            .unwrap();
        assert_eq!(
            served.source().calls.load(Ordering::SeqCst),
            1,
            "cached when served"
        );
    }

    #[tokio::test]
    async fn empty_ids_are_refused_without_asking_imds() {
        let cache = TokenCache::new(long_lived());
        for (rid, cid) in [("", "c"), ("r", ""), (" ", "c"), ("", "")] {
            let got = cache.by_resource_id(rid, cid, "r", &who()).await;
            assert!(
                matches!(got, Err(TokenError::Forbidden(_))),
                "{rid:?} {cid:?}"
            );
        }
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn client_id_check_table() {
        let c = "11111111-aaaa-4000-8000-000000000001";
        let upper = c.to_ascii_uppercase();
        let other = "22222222-bbbb-4000-8000-000000000002";
        let cases: Vec<(&str, &str, &str, String, bool)> = vec![
            ("both agree", c, c, jwt_app(c), true),
            ("case ignored", c, &upper, jwt_app(&upper), true),
            (
                "azp when no appid",
                c,
                c,
                jwt(serde_json::json!({"azp": c})),
                true,
            ),
            (
                "appid wins over azp",
                c,
                c,
                jwt(serde_json::json!({"appid": other, "azp": c})),
                false,
            ),
            ("imds reports another", c, other, jwt_app(c), false),
            ("token for another", c, c, jwt_app(other), false),
            ("imds gave no client_id", c, "", jwt_app(c), false),
            ("unreadable token", c, c, "not-a-jwt".into(), false),
            (
                "token without appid or azp",
                c,
                c,
                jwt(serde_json::json!({"oid": "o"})),
                false,
            ),
            (
                "non-string appid",
                c,
                c,
                jwt(serde_json::json!({"appid": 1})),
                false,
            ),
            ("empty expected", "", "", jwt_app(""), false),
            ("prefix is no match", "1111", c, jwt_app(c), false),
        ];
        for (name, expected, imds, token, want) in cases {
            assert_eq!(
                verify_client_id(expected, imds, &token).is_ok(),
                want,
                "{name}"
            );
        }
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
                    access_token: Secret::new(jwt_app("c")),
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
            let got = cache.by_resource_id("rid", "c", "r", &who()).await;
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
                cache
                    .by_resource_id("rid", "c", "r", &who())
                    .await
                    .map(|_| ())
            }));
        }
        for t in tasks {
            let e = t.await.unwrap().unwrap_err();
            assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR, "{e}");
        }
        // One round (four requests), not one per waiting request.
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 4);
        // A request made after the failure tries again.
        let _ = cache.by_resource_id("rid", "c", "r", &who()).await;
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 8);
    }

    #[tokio::test]
    async fn retry_after_stretches_the_wait() {
        let cache = TokenCache::new(Scripted::new(vec![Err((429, Some(1))), Ok(())]))
            .with_retry(fast_policy());
        let started = Instant::now();
        cache.by_resource_id("rid", "c", "r", &who()).await.unwrap();
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
    fn eviction_table() {
        use EntryState::*;
        type Entries = Vec<(&'static str, EntryState, u64)>;
        let cases: Vec<(&str, Entries, Option<&str>)> = vec![
            ("nothing", vec![], None),
            ("all busy", vec![("a", Busy, 1), ("b", Busy, 2)], None),
            (
                "least recently used live",
                vec![("a", Live, 5), ("b", Live, 2), ("c", Live, 9)],
                Some("b"),
            ),
            (
                "expired before an older live one",
                vec![("a", Live, 1), ("b", Expired, 7)],
                Some("b"),
            ),
            (
                "empty before an older live one",
                vec![("a", Live, 1), ("b", Empty, 8)],
                Some("b"),
            ),
            (
                "oldest among empty and expired",
                vec![("a", Empty, 4), ("b", Expired, 3), ("c", Live, 0)],
                Some("b"),
            ),
            (
                "busy never, however old",
                vec![("a", Busy, 0), ("b", Live, 9)],
                Some("b"),
            ),
        ];
        for (name, entries, want) in cases {
            assert_eq!(pick_victim(entries), want, "{name}");
        }
    }

    /// A source whose calls take `delay` (forever when `None`) and fail
    /// (IMDS's 400) when `fail`.
    struct Slow {
        calls: AtomicUsize,
        delay: Option<Duration>,
        fail: bool,
    }

    impl Slow {
        fn new(delay: Option<Duration>, fail: bool) -> Self {
            Slow {
                calls: AtomicUsize::new(0),
                delay,
                fail,
            }
        }
    }

    impl TokenSource for Slow {
        async fn imds_token(
            &self,
            identity: &ImdsIdentity,
            resource: &str,
        ) -> Result<Token, TokenError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            match self.delay {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending::<()>().await,
            }
            if self.fail {
                return Err(TokenError::Refused {
                    status: 400,
                    body: "Identity not found".into(),
                });
            }
            let ImdsIdentity::ResourceId(rid) = identity;
            let client = format!("app-of-{rid}");
            Ok(Token {
                access_token: Secret::new(jwt_app(&client)),
                expires_on: now_secs() + 86_399,
                not_before: None,
                resource: resource.into(),
                token_type: "Bearer".into(),
                client_id: client,
            })
        }
    }

    #[tokio::test]
    async fn the_cache_stays_within_its_bound_and_keeps_recent_entries() {
        let cache = TokenCache::with_limits(Slow::new(Some(Duration::ZERO), false), 5, 1000)
            .with_bounds(16, 3);
        for i in 0..10 {
            cache
                .by_resource_id("a", "app-of-a", &format!("r{i}"), &who())
                .await
                .unwrap();
            assert!(cache.len() <= 3, "{} entries after {i}", cache.len());
        }
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 10);
        // The last three are cached; an older one was evicted.
        for i in 7..10 {
            cache
                .by_resource_id("a", "app-of-a", &format!("r{i}"), &who())
                .await
                .unwrap();
        }
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 10);
        cache
            .by_resource_id("a", "app-of-a", "r0", &who())
            .await
            .unwrap();
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 11);
        assert_eq!(cache.len(), 3);
    }

    #[tokio::test]
    async fn failed_and_abandoned_fetches_leave_no_entry() {
        // Refused by IMDS.
        let cache = TokenCache::with_limits(Slow::new(Some(Duration::ZERO), true), 5, 1000);
        for i in 0..20 {
            let got = cache
                .by_resource_id("a", "app-of-a", &format!("r{i}"), &who())
                .await;
            assert!(matches!(got, Err(TokenError::Refused { .. })), "{got:?}");
        }
        assert_eq!(cache.len(), 0);
        // A forged client ID (refused after the call).
        let cache = TokenCache::new(long_lived());
        let got = cache.by_resource_id("a", "not-a", "r", &who()).await;
        assert!(matches!(got, Err(TokenError::ClientIdMismatch { .. })));
        assert_eq!(cache.len(), 0);
        // Callers that go away while their call waits or runs.
        let cache = Arc::new(TokenCache::with_limits(Slow::new(None, false), 2, 1000));
        let mut tasks = Vec::new();
        for i in 0..6 {
            let cache = Arc::clone(&cache);
            tasks.push(tokio::spawn(async move {
                cache
                    .by_resource_id("a", "app-of-a", &format!("r{}", i % 3), &who())
                    .await
            }));
        }
        while cache.pending_fetches() != (1, 2) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(cache.len(), 3);
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        assert_eq!(cache.len(), 0, "abandoned entries removed");
        assert_eq!(cache.pending_fetches(), (0, 0), "queue entries freed");
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_leaves_the_fetch_to_the_next_waiter() {
        let cache = Arc::new(TokenCache::with_limits(
            Slow::new(Some(Duration::from_millis(200)), false),
            5,
            1000,
        ));
        let first = {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move {
                cache
                    .by_resource_id("a", "app-of-a", "r", &RequesterKey::pod("ns", "one"))
                    .await
            })
        };
        while cache.pending_fetches().1 != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let second = {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move {
                cache
                    .by_resource_id("a", "app-of-a", "r", &RequesterKey::pod("ns", "two"))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        first.abort();
        let _ = first.await;
        // The first call was dropped with its caller; the waiter made its own.
        second.await.unwrap().unwrap();
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 2);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.pending_fetches(), (0, 0));
    }

    #[tokio::test]
    async fn a_pod_beyond_its_pending_bound_gets_429_with_retry_after() {
        let cache =
            Arc::new(TokenCache::with_limits(Slow::new(None, false), 1, 1000).with_bounds(2, 100));
        let busy = RequesterKey::pod("ns", "busy");
        let mut tasks = Vec::new();
        for i in 0..3 {
            let cache = Arc::clone(&cache);
            let busy = busy.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .by_resource_id("a", "app-of-a", &format!("r{i}"), &busy)
                    .await
            }));
        }
        while cache.pending_fetches() != (2, 1) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let got = cache.by_resource_id("a", "app-of-a", "r9", &busy).await;
        match got {
            Err(e @ TokenError::Throttled { .. }) => {
                assert_eq!(e.status(), StatusCode::TOO_MANY_REQUESTS);
                assert!(e.retry_after().is_some_and(|d| d >= Duration::from_secs(1)));
            }
            other => panic!("want 429, got {other:?}"),
        }
        assert_eq!(cache.len(), 3, "the refused request left no entry");
        for t in tasks {
            t.abort();
        }
    }

    #[tokio::test]
    async fn a_quiet_pod_is_not_held_behind_a_busy_one() {
        let call = Duration::from_millis(20);
        let cache = Arc::new(
            TokenCache::with_limits(Slow::new(Some(call), false), 5, 20).with_bounds(1000, 4096),
        );
        let busy = RequesterKey::pod("ns", "busy");
        let mut tasks = Vec::new();
        for i in 0..200 {
            let cache = Arc::clone(&cache);
            let busy = busy.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .by_resource_id("a", "app-of-a", &format!("r{i}"), &busy)
                    .await
            }));
        }
        while cache.pending_fetches().0 < 190 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let started = Instant::now();
        cache
            .by_resource_id("b", "app-of-b", "r", &RequesterKey::pod("ns", "quiet"))
            .await
            .unwrap();
        let waited = started.elapsed();
        // The bound: one call plus (concurrency + 1) spacings.
        let bound = call + spacing_for(20) * 6;
        eprintln!(
            "quiet pod waited {waited:?} (bound {bound:?}) behind {} queued calls",
            cache.pending_fetches().0
        );
        assert!(waited <= bound * 3, "{waited:?} > 3 × {bound:?}");
        for t in tasks {
            t.abort();
        }
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
        assert_eq!(jwt_appid(&jwt_app("c1")).as_deref(), Some("c1"));
        assert_eq!(jwt_appid("not-a-jwt"), None);
        assert_eq!(
            jwt_oid(&jwt(serde_json::json!({"oid": "o1"}))).as_deref(),
            Some("o1")
        );
        assert_eq!(jwt_oid(&jwt_app("c1")), None);
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
