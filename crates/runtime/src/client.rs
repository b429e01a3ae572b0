//! The Kubernetes client both binaries use, and upstream MIC's client-side
//! rate limit (`--clientQps`).
//!
//! Upstream MIC set client-go's `QPS` to `--clientQps` and `Burst` to its
//! integer part, which gave it two token buckets: one for its CRD client
//! (the `aadpodidentity.k8s.io` kinds) and one for its clientset (pods,
//! nodes, Events, ConfigMaps). Here the same two buckets are a tower layer
//! under kube's client ([`RateLimitLayer`]); every request of a bucket takes
//! one token, first come first served, as client-go's limiter does.
//!
//! Two kinds of request take no token ([`route`]). Watches (`watch=true`):
//! a watch is one long-lived request whose events cost the apiserver
//! nothing more, a watch queued behind a burst of writes would leave MIC's
//! caches stale exactly while it writes, and re-established watches are
//! already paced by kube-runtime's back-off. Leader election (Leases and
//! the Endpoints lock): a renewal that waited behind a cycle's writes could
//! let the lock expire, and losing it stops MIC.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tokio::time::Instant;

/// Why a client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The kubeconfig file could not be read or parsed.
    #[error("reading kubeconfig {path}: {source}")]
    ReadKubeconfig {
        /// The file.
        path: String,
        /// What went wrong.
        source: kube::config::KubeconfigError,
    },
    /// Neither in-cluster configuration nor a default kubeconfig was usable.
    #[error("inferring the Kubernetes configuration: {0}")]
    Infer(#[from] kube::config::InferConfigError),
    /// The configuration was read but a client could not be built from it.
    #[error("building the Kubernetes client: {0}")]
    Build(#[from] kube::Error),
}

/// A client from `kubeconfig` when given (upstream's `--kubeconfig`), else the
/// in-cluster service account or `$KUBECONFIG`. `user_agent` names the binary.
pub async fn kube_client(
    kubeconfig: Option<&Path>,
    user_agent: &str,
) -> Result<Client, ClientError> {
    kube_client_with_limit(kubeconfig, user_agent, None).await
}

/// [`kube_client`] whose requests other than watches wait on `limit`'s
/// token bucket (none: no limit).
pub async fn kube_client_with_limit(
    kubeconfig: Option<&Path>,
    user_agent: &str,
    limit: Option<RateLimit>,
) -> Result<Client, ClientError> {
    let config = kube_config(kubeconfig, user_agent).await?;
    let builder = kube::client::ClientBuilder::try_from(config)?;
    Ok(match limit {
        Some(limit) => builder.with_layer(&RateLimitLayer::new(limit)).build(),
        None => builder.build(),
    })
}

async fn kube_config(kubeconfig: Option<&Path>, user_agent: &str) -> Result<Config, ClientError> {
    let mut config = match kubeconfig {
        Some(path) => {
            let read_err = |source| ClientError::ReadKubeconfig {
                path: path.display().to_string(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(read_err)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(read_err)?
        }
        None => Config::infer().await?,
    };
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_str(user_agent)
            .unwrap_or_else(|_| http::HeaderValue::from_static("aad-pod-identity")),
    ));
    Ok(config)
}

/// client-go's default QPS, used when `--clientQps` is 0.
const DEFAULT_QPS: f64 = 5.0;
/// client-go's default burst, used when the burst is 0.
const DEFAULT_BURST: u32 = 10;

/// A token bucket: `qps` tokens a second, at most `burst` saved up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Refill, tokens per second (> 0).
    pub qps: f64,
    /// Capacity, and the tokens at start (>= 1).
    pub burst: u32,
}

impl RateLimit {
    /// What client-go made of upstream MIC's `QPS = clientQps,
    /// Burst = int(clientQps)`: a QPS of 0 is client-go's 5, a burst of 0 its
    /// 10, and a QPS that is negative, infinite or NaN means no limit.
    pub fn from_client_qps(client_qps: f64) -> Option<RateLimit> {
        // Go's float-to-int conversion truncates toward zero.
        let burst = if client_qps.is_finite() {
            client_qps.trunc().clamp(0.0, f64::from(u32::MAX)) as u32
        } else {
            0
        };
        let qps = if client_qps == 0.0 {
            DEFAULT_QPS
        } else {
            client_qps
        };
        if !(qps > 0.0 && qps.is_finite()) {
            return None;
        }
        Some(RateLimit {
            qps,
            burst: if burst == 0 { DEFAULT_BURST } else { burst },
        })
    }
}

/// The bucket's state, as golang.org/x/time/rate keeps it: a request
/// reserves a token at once (the count may go below zero) and waits until
/// the refill has paid for it, so waiters are served in arrival order.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenBucket {
    limit: RateLimit,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        TokenBucket {
            limit,
            tokens: f64::from(limit.burst),
            last: now,
        }
    }

    /// Takes one token at `now`; how long the request must wait before it
    /// is sent (zero when a token was there).
    pub fn reserve(&mut self, now: Instant) -> Duration {
        let burst = f64::from(self.limit.burst);
        if now > self.last {
            let refill = now.duration_since(self.last).as_secs_f64() * self.limit.qps;
            self.tokens = (self.tokens + refill).min(burst);
            self.last = now;
        }
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.limit.qps)
        }
    }
}

/// Which bucket a request takes its token from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// No token: a watch, or leader election.
    Free,
    /// The `aadpodidentity.k8s.io` kinds (upstream's CRD client).
    Crd,
    /// Everything else (upstream's clientset).
    Core,
}

/// The bucket of a request to `uri` (see the module's documentation).
pub fn route(uri: &http::Uri) -> Route {
    let path = uri.path();
    let leader_election = path.starts_with("/apis/coordination.k8s.io/")
        || path
            .strip_prefix("/api/v1/namespaces/")
            .and_then(|rest| rest.split('/').nth(1))
            == Some("endpoints");
    if is_watch(uri) || leader_election {
        Route::Free
    } else if path.starts_with("/apis/aadpodidentity.k8s.io/") {
        Route::Crd
    } else {
        Route::Core
    }
}

/// Whether a request is a watch (`watch=true`, or any of Go's true
/// spellings, in the query).
pub fn is_watch(uri: &http::Uri) -> bool {
    uri.query().is_some_and(|q| {
        q.split('&').any(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            k == "watch" && crate::flags::parse_go_bool(v) == Ok(true)
        })
    })
}

/// The two buckets of [`Route::Crd`] and [`Route::Core`].
#[derive(Clone, Debug, PartialEq)]
pub struct Buckets {
    crd: TokenBucket,
    core: TokenBucket,
}

impl Buckets {
    /// Two full buckets of `limit` at `now`.
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        Buckets {
            crd: TokenBucket::new(limit, now),
            core: TokenBucket::new(limit, now),
        }
    }
}

/// How long a request to `uri` must wait before it is sent: [`Route::Free`]
/// never waits, the others take a token from their bucket.
pub fn pace(uri: &http::Uri, buckets: &mut Buckets, now: Instant) -> Duration {
    match route(uri) {
        Route::Free => Duration::ZERO,
        Route::Crd => buckets.crd.reserve(now),
        Route::Core => buckets.core.reserve(now),
    }
}

/// The tower layer of [`RateLimit`] (the same buckets for every service it
/// wraps).
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    bucket: Arc<Mutex<Buckets>>,
}

impl RateLimitLayer {
    /// A layer with full buckets.
    pub fn new(limit: RateLimit) -> Self {
        RateLimitLayer {
            bucket: Arc::new(Mutex::new(Buckets::new(limit, Instant::now()))),
        }
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimited {
            inner: Arc::new(tokio::sync::Mutex::new(inner)),
            bucket: self.bucket.clone(),
        }
    }
}

/// A service whose requests wait on [`Buckets`] (see [`pace`]).
/// The inner service is shared so that a waiting request holds nothing:
/// it is called only once the wait is over.
#[derive(Debug)]
pub struct RateLimited<S> {
    inner: Arc<tokio::sync::Mutex<S>>,
    bucket: Arc<Mutex<Buckets>>,
}

impl<S> Clone for RateLimited<S> {
    fn clone(&self) -> Self {
        RateLimited {
            inner: self.inner.clone(),
            bucket: self.bucket.clone(),
        }
    }
}

impl<S, B> tower::Service<http::Request<B>> for RateLimited<S>
where
    S: tower::Service<http::Request<B>> + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness of the inner service is awaited in the call, after the wait.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let wait = {
            let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            pace(req.uri(), &mut bucket, Instant::now())
        };
        let inner = self.inner.clone();
        Box::pin(async move {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let sent = {
                let mut svc = inner.lock().await;
                std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
                svc.call(req)
            };
            sent.await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn client_qps_as_client_go_takes_it() {
        let l = |qps, burst| Some(RateLimit { qps, burst });
        let cases: &[(f64, Option<RateLimit>)] = &[
            (5.0, l(5.0, 5)),
            (20.0, l(20.0, 20)),
            (1.0, l(1.0, 1)),
            (2.5, l(2.5, 2)),
            // int(0.5) is 0: client-go's default burst.
            (0.5, l(0.5, 10)),
            // 0 is client-go's defaults.
            (0.0, l(5.0, 10)),
            (-1.0, None),
            (f64::NAN, None),
            (f64::INFINITY, None),
            (f64::NEG_INFINITY, None),
            (1e12, l(1e12, u32::MAX)),
        ];
        for (qps, want) in cases {
            assert_eq!(RateLimit::from_client_qps(*qps), *want, "{qps}");
        }
    }

    #[test]
    fn the_bucket_pays_out_its_burst_then_paces_at_qps() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = TokenBucket::new(RateLimit { qps: 5.0, burst: 2 }, t0);
        // (offset from t0, wait expected)
        let cases: &[(u64, Duration)] = &[
            (0, ms(0)),
            (0, ms(0)),
            // Empty: the third waits one refill (200 ms), the fourth two.
            (0, ms(200)),
            (0, ms(400)),
            // 100 ms later: 0.5 token more, still three owed before it.
            (100, ms(500)),
            // Long idle: the bucket refills to its burst, never beyond.
            (10_000, ms(0)),
            (10_000, ms(0)),
            (10_000, ms(200)),
        ];
        for (i, (at, want)) in cases.iter().enumerate() {
            let got = b.reserve(t0 + ms(*at));
            assert!(
                got.abs_diff(*want) < Duration::from_micros(10),
                "request {i} at {at} ms: waits {got:?}, want {want:?}"
            );
        }
    }

    #[test]
    fn routes() {
        let cases: &[(&str, Route)] = &[
            ("/api/v1/pods?watch=true&resourceVersion=1", Route::Free),
            (
                "/apis/aadpodidentity.k8s.io/v1/azureidentities?watch=1",
                Route::Free,
            ),
            (
                "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/aad-pod-identity-mic",
                Route::Free,
            ),
            (
                "/api/v1/namespaces/kube-system/endpoints/aad-pod-identity-mic",
                Route::Free,
            ),
            ("/api/v1/namespaces/kube-system/endpoints", Route::Free),
            (
                "/apis/aadpodidentity.k8s.io/v1/namespaces/d/azureassignedidentities/x",
                Route::Crd,
            ),
            (
                "/apis/aadpodidentity.k8s.io/v1/azureidentitybindings?limit=500",
                Route::Crd,
            ),
            ("/api/v1/pods?limit=500", Route::Core),
            ("/api/v1/namespaces/d/events", Route::Core),
            ("/apis/events.k8s.io/v1/namespaces/d/events", Route::Core),
            (
                "/api/v1/namespaces/d/configmaps/aad-pod-identity-mic-owned",
                Route::Core,
            ),
            ("/api/v1/namespaces/endpoints/pods", Route::Core),
            ("/api/v1/nodes", Route::Core),
        ];
        for (u, want) in cases {
            assert_eq!(route(&u.parse().unwrap()), *want, "{u}");
        }
    }

    #[test]
    fn watches_take_no_token() {
        let t0 = Instant::now();
        let mut b = Buckets::new(RateLimit { qps: 1.0, burst: 1 }, t0);
        let uri = |s: &str| s.parse::<http::Uri>().unwrap();
        let cases: &[(&str, bool)] = &[
            ("/api/v1/pods?watch=true&resourceVersion=1", true),
            ("/api/v1/pods?resourceVersion=1&watch=1", true),
            ("/api/v1/pods?watch=True", true),
            ("/api/v1/pods?watch=false", false),
            ("/api/v1/pods?watch", false),
            ("/api/v1/pods?allowWatchBookmarks=true", false),
            ("/api/v1/pods?xwatch=true", false),
            ("/api/v1/pods", false),
            (
                "/apis/aadpodidentity.k8s.io/v1/azureassignedidentities",
                false,
            ),
        ];
        for (u, watch) in cases {
            assert_eq!(is_watch(&uri(u)), *watch, "{u}");
        }
        // The one token of each bucket goes to its first request; watches
        // and the Lease around them never wait.
        assert_eq!(
            pace(&uri("/api/v1/pods?watch=true"), &mut b, t0),
            Duration::ZERO
        );
        assert_eq!(pace(&uri("/api/v1/pods"), &mut b, t0), Duration::ZERO);
        let crd = "/apis/aadpodidentity.k8s.io/v1/azureassignedidentities";
        assert_eq!(pace(&uri(crd), &mut b, t0), Duration::ZERO);
        for _ in 0..100 {
            assert_eq!(
                pace(&uri("/api/v1/nodes?watch=1"), &mut b, t0),
                Duration::ZERO
            );
            let lease = "/apis/coordination.k8s.io/v1/namespaces/d/leases/l";
            assert_eq!(pace(&uri(lease), &mut b, t0), Duration::ZERO);
        }
        assert_eq!(
            pace(&uri("/api/v1/nodes"), &mut b, t0),
            Duration::from_secs(1)
        );
        assert_eq!(pace(&uri(crd), &mut b, t0), Duration::from_secs(1));
        assert_eq!(pace(&uri(crd), &mut b, t0), Duration::from_secs(2));
    }

    /// A service that counts the requests it is called with.
    #[derive(Clone, Default)]
    struct Counting(Arc<AtomicU64>);

    impl tower::Service<http::Request<()>> for Counting {
        type Response = ();
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<(), Self::Error>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _req: http::Request<()>) -> Self::Future {
            self.0.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(()))
        }
    }

    /// On tokio's paused clock: 20 requests at once with `--clientQps=5`
    /// reach the inner service 5 at once, then one every 200 ms; a watch
    /// sent behind them goes through at once.
    #[tokio::test(start_paused = true)]
    async fn requests_are_paced_and_watches_are_not() {
        use tower::{Layer, Service};
        let counting = Counting::default();
        let sent = counting.0.clone();
        let layer = RateLimitLayer::new(RateLimit::from_client_qps(5.0).unwrap());
        let svc = layer.layer(counting);
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let mut svc = svc.clone();
            let fut = svc.call(http::Request::get("/api/v1/pods").body(()).unwrap());
            tasks.push(tokio::spawn(fut));
        }
        let mut watch_svc = svc.clone();
        let watch = watch_svc.call(
            http::Request::get("/api/v1/pods?watch=true")
                .body(())
                .unwrap(),
        );
        tokio::time::timeout(Duration::from_millis(1), watch)
            .await
            .expect("a watch never waits for a token")
            .unwrap();
        tokio::task::yield_now().await;
        // 5 plus the watch.
        assert_eq!(sent.load(Ordering::SeqCst), 6);
        let mut seen = vec![];
        for _ in 0..15 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            seen.push(sent.load(Ordering::SeqCst));
        }
        assert_eq!(seen, (7..=21).collect::<Vec<u64>>());
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    }
}
