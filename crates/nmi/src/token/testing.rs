//! Fake token sources and helpers for tests: this module's unit tests and,
//! through the `test-support` feature (which only nmi's own dev-dependency on
//! itself turns on), the crate's integration tests. Not in release builds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use tokio::task::JoinHandle;

use super::{ImdsIdentity, RetryPolicy, TokenCache, TokenError, TokenSource, now_secs};
use crate::fair::RequesterKey;
use crate::response::Token;
use crate::secret::Secret;

pub fn who() -> RequesterKey {
    RequesterKey::internal("test")
}

/// A token for the test requester, which must be had.
#[allow(
    clippy::unwrap_used,
    reason = "a test helper: a refused token fails the test that asked"
)]
pub async fn fetch<S: TokenSource>(
    cache: &TokenCache<S>,
    resource_id: &str,
    client_id: &str,
    resource: &str,
) -> Token {
    cache
        .by_resource_id(resource_id, client_id, resource, &who())
        .await
        .unwrap()
}

/// `n` requests from `requester` for identity `a`, each for another
/// resource (`r0`, `r1`, ...), left running.
pub fn spawn_fetches<S: TokenSource>(
    cache: &Arc<TokenCache<S>>,
    requester: &RequesterKey,
    n: usize,
) -> Vec<JoinHandle<Result<Token, TokenError>>> {
    (0..n)
        .map(|i| {
            let cache = Arc::clone(cache);
            let requester = requester.clone();
            tokio::spawn(async move {
                cache
                    .by_resource_id("a", "app-of-a", &format!("r{i}"), &requester)
                    .await
            })
        })
        .collect()
}

/// IMDS with one identity per resource ID: client ID `app-of-<rid>`,
/// object ID `oid-of-<rid>` (lower case), unless `reports` says IMDS
/// answers with another client ID. A call takes `delay` (forever when
/// `None`; 20 ms by default) and ends in IMDS's 400 when `fail`, or when the
/// resource starts with `refused_prefix`. `calls` counts the calls made,
/// `live` those in progress (a call whose caller went away is no longer).
#[derive(Debug)]
pub struct Fake {
    pub calls: AtomicUsize,
    pub live: AtomicUsize,
    pub lifetime: u64,
    pub reports: Option<&'static str>,
    pub delay: Option<Duration>,
    pub fail: bool,
    pub refused_prefix: Option<&'static str>,
}

impl Default for Fake {
    fn default() -> Self {
        Fake {
            calls: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            lifetime: 0,
            reports: None,
            delay: Some(Duration::from_millis(20)),
            fail: false,
            refused_prefix: None,
        }
    }
}

/// Counts one call in progress while it lives.
struct Live<'a>(&'a AtomicUsize);

impl<'a> Live<'a> {
    fn start(gauge: &'a AtomicUsize) -> Self {
        gauge.fetch_add(1, Ordering::SeqCst);
        Live(gauge)
    }
}

impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub fn jwt(claims: serde_json::Value) -> String {
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.sig",
        b.encode(br#"{"alg":"none"}"#),
        b.encode(claims.to_string())
    )
}

pub fn jwt_app(appid: &str) -> String {
    jwt(serde_json::json!({"appid": appid}))
}

/// A token as IMDS gives it: `access_token` for `client_id`, valid for
/// `lifetime` seconds from now.
pub fn token(access_token: String, client_id: String, lifetime: u64, resource: &str) -> Token {
    Token {
        access_token: Secret::new(access_token),
        expires_on: now_secs() + lifetime,
        not_before: None,
        resource: resource.into(),
        token_type: "Bearer".into(),
        client_id,
    }
}

/// IMDS's answer for an identity not on the VM.
fn not_found() -> TokenError {
    TokenError::Refused {
        status: 400,
        body: "Identity not found".into(),
    }
}

impl TokenSource for Fake {
    async fn imds_token(
        &self,
        identity: &ImdsIdentity,
        resource: &str,
    ) -> Result<Token, TokenError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let _live = Live::start(&self.live);
        match self.delay {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending::<()>().await,
        }
        let refused = self.refused_prefix.is_some_and(|p| resource.starts_with(p));
        if self.fail || refused {
            return Err(not_found());
        }
        let ImdsIdentity::ResourceId(rid) = identity;
        let rid = rid.to_ascii_lowercase();
        let client = match self.reports {
            Some(c) => c.to_string(),
            None => format!("app-of-{rid}"),
        };
        let claims = serde_json::json!({"appid": client, "oid": format!("oid-of-{rid}")});
        Ok(token(jwt(claims), client, self.lifetime, resource))
    }
}

pub fn long_lived() -> Fake {
    Fake {
        lifetime: 86_399,
        ..Default::default()
    }
}

/// A scripted answer: a token, or (status, Retry-After seconds).
pub type Answer = Result<(), (u16, Option<u64>)>;

/// Answers from a script (not empty), in order; the last answer repeats.
#[derive(Debug)]
pub struct Scripted {
    answers: Mutex<Vec<Answer>>,
    pub calls: AtomicUsize,
}

impl Scripted {
    pub fn new(answers: Vec<Answer>) -> Self {
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
            let answers = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
            answers[n.min(answers.len() - 1)]
        };
        match answer {
            Ok(()) => Ok(token(jwt_app("c"), "c".into(), 86_399, resource)),
            Err((400, _)) => Err(not_found()),
            Err((status, retry_after)) => Err(TokenError::Transient {
                status,
                body: format!("{{\"error\":\"{status}\"}}"),
                retry_after: retry_after.map(Duration::from_secs),
                attempts: 1,
            }),
        }
    }
}

pub fn fast_policy() -> RetryPolicy {
    RetryPolicy {
        backoff: [10, 20, 40].map(Duration::from_millis).to_vec(),
        max_retry_after: Duration::from_secs(2),
        max_total_wait: Duration::from_secs(3),
    }
}

/// A long-lived [`Fake`] whose calls take `delay` (forever when `None`)
/// and fail (IMDS's 400) when `fail`.
pub type Slow = Fake;

impl Fake {
    pub fn new(delay: Option<Duration>, fail: bool) -> Self {
        Fake {
            delay,
            fail,
            ..long_lived()
        }
    }
}
