//! [`TokenCache`]: the cache in front of a [`TokenSource`], which asks
//! through the fair limiter, retries transient answers, checks what IMDS
//! gave, and shares one fetch between concurrent misses.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::budget::{IMDS_CONCURRENT, IMDS_PER_SECOND};
use super::retry::with_retries;
use super::slots::{Lease, SlotMap};
use super::verify::check_imds_token;
use super::{
    DEFAULT_MAX_CACHED_TOKENS, DEFAULT_MAX_PENDING_PER_POD, IdentityKey, ImdsIdentity, RetryPolicy,
    TokenError, TokenKey, TokenSource, spacing_for,
};
use crate::cluster::ClusterIdentities;
use crate::fair::{FairLimiter, RequesterKey};
use crate::response::Token;

/// The token cache in front of a [`TokenSource`].
#[derive(Debug)]
pub struct TokenCache<S> {
    source: S,
    slots: SlotMap,
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
        Self::with_limits(source, IMDS_CONCURRENT, IMDS_PER_SECOND)
    }

    /// A cache over `source` with other limits (benchmarks measure NMI's own
    /// overhead with the limiter lifted).
    pub fn with_limits(source: S, concurrent: usize, per_second: u32) -> Self {
        let spacing = spacing_for(per_second);
        TokenCache {
            source,
            slots: SlotMap::default(),
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

    /// [`TokenError::ClusterIdentity`] when `client_id` is one of the
    /// cluster's own identities and NMI may not serve it (checked before any
    /// token is asked for, whatever its source).
    pub fn refuse_cluster_identity(&self, client_id: &str) -> Result<(), TokenError> {
        match self.cluster.refused([client_id]) {
            Some(c) => Err(TokenError::ClusterIdentity {
                client_id: c.to_string(),
            }),
            None => Ok(()),
        }
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
        with_retries(&self.retry, |retry| async move {
            self.limiter
                .run(requester, retry, self.source.imds_token(id, resource))
                .await
                .map_err(|full| TokenError::Throttled {
                    retry_after: full.retry_after,
                })?
        })
        .await
    }

    /// The entry for (`identity`, `token`), created (evicting another when
    /// the cache is full) if there is none.
    fn lease(&self, identity: IdentityKey, token: TokenKey) -> Lease<'_> {
        self.slots.lease(identity, token, self.max_entries)
    }

    /// A token for the user-assigned identity with `resource_id`, asked of
    /// IMDS by that resource ID and handed out only if it is for `client_id`
    /// ([`super::verify_client_id`]). The caller has already decided that
    /// the pod may use the identity. Cached under both IDs
    /// ([`IdentityKey::UserAssigned`]); a token that fails the check is never
    /// cached.
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
        self.refuse_cluster_identity(client_id)?;
        let lease = self.lease(
            IdentityKey::user_assigned(resource_id, client_id),
            TokenKey::imds(resource),
        );
        let arrived = Instant::now();
        // Holding the slot's lock across the fetch makes concurrent misses
        // share one upstream call. A caller that goes away drops the fetch
        // with the lock; the next waiter (if any) starts its own.
        let mut guard = lease.slot.lock().await;
        if let Some(t) = guard.fresh_token() {
            return Ok(t.clone());
        }
        // Concurrent misses share failures too.
        if let Some((at, e)) = guard.failed.as_ref()
            && *at >= arrived
        {
            return Err(e.clone());
        }
        let id = ImdsIdentity::ResourceId(resource_id.to_string());
        let result = self
            .imds(&id, resource, requester)
            .await
            .and_then(|token| check_imds_token(&self.cluster, resource_id, client_id, token));
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

    /// A token cached under (`identity`, `token`), fetched by `fetch` on a
    /// miss (no IMDS limiter: for AAD and federated exchanges). Concurrent
    /// misses share one fetch, and its failure: a request that was waiting
    /// when the fetch failed gets that failure instead of fetching again
    /// (except a 429 for the fetching pod's full queue).
    pub async fn cached<F, Fut>(
        &self,
        identity: IdentityKey,
        token: TokenKey,
        fetch: F,
    ) -> Result<Token, TokenError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Token, TokenError>>,
    {
        let lease = self.lease(identity, token);
        let arrived = Instant::now();
        let mut guard = lease.slot.lock().await;
        if let Some(t) = guard.fresh_token() {
            return Ok(t.clone());
        }
        if let Some((at, e)) = guard.failed.as_ref()
            && *at >= arrived
        {
            return Err(e.clone());
        }
        match fetch().await {
            Ok(token) => {
                guard.token = Some(token.clone());
                guard.failed = None;
                Ok(token)
            }
            Err(e) => {
                // One pod's full queue is not another's.
                if !matches!(e, TokenError::Throttled { .. }) {
                    guard.failed = Some((Instant::now(), e.clone()));
                }
                Err(e)
            }
        }
    }

    /// The source, for uncached calls.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Drops the entries of identities no pod on the node uses any more
    /// (those `in_use` says no to), and the map's spare room after a burst.
    pub fn retain(&self, in_use: impl FnMut(&IdentityKey) -> bool) {
        self.slots.retain(in_use);
    }

    /// Number of cached (identity, token) entries.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::token::testing::{Fake, Slow, fetch, long_lived, who};

    /// Asks `cache`, in a task, for identity `a`'s token for `resource`, as
    /// `requester`.
    fn spawn_fetch(
        cache: &Arc<TokenCache<Slow>>,
        resource: String,
        requester: RequesterKey,
    ) -> tokio::task::JoinHandle<Result<Token, TokenError>> {
        let cache = Arc::clone(cache);
        tokio::spawn(async move {
            cache
                .by_resource_id("a", "app-of-a", &resource, &requester)
                .await
        })
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
        fetch(&cache, "rid-a", "app-of-rid-a", "other-resource").await;
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn short_lived_tokens_are_refetched() {
        let cache = TokenCache::new(Fake {
            lifetime: 60,
            ..Default::default()
        });
        fetch(&cache, "c", "app-of-c", "r").await;
        fetch(&cache, "c", "app-of-c", "r").await;
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn retain_drops_unused_identities() {
        let cache = TokenCache::new(long_lived());
        fetch(&cache, "a", "app-of-a", "r").await;
        fetch(&cache, "b", "app-of-b", "r").await;
        let in_use = IdentityKey::user_assigned("A", "APP-OF-A");
        cache.retain(|k| *k == in_use);
        assert_eq!(cache.len(), 1);
        fetch(&cache, "a", "app-of-a", "r").await;
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 2, "a kept");
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
        fetch(&cache, "a", "app-of-a", "r0").await;
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
            tasks.push(spawn_fetch(&cache, format!("r{}", i % 3), who()));
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
    async fn concurrent_misses_of_a_cached_fetch_share_its_failure() {
        use std::sync::atomic::AtomicUsize;
        let cache = Arc::new(TokenCache::new(long_lived()));
        let calls = Arc::new(AtomicUsize::new(0));
        let ask = |cache: Arc<TokenCache<Fake>>, calls: Arc<AtomicUsize>| async move {
            cache
                .cached(
                    IdentityKey::service_principal("app"),
                    TokenKey::federated("https://login/", "t", "ns", "sa", "r"),
                    || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Err::<Token, _>(TokenError::Forbidden("no credential".into()))
                    },
                )
                .await
        };
        let tasks: Vec<_> = (0..8)
            .map(|_| tokio::spawn(ask(Arc::clone(&cache), Arc::clone(&calls))))
            .collect();
        for t in tasks {
            assert!(matches!(t.await.unwrap(), Err(TokenError::Forbidden(_))));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one fetch for 8 waiters");
        // A request after the failure fetches again.
        assert!(ask(Arc::clone(&cache), Arc::clone(&calls)).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(cache.len(), 0, "a failure leaves no entry");
        // A 429 (the fetching pod's full queue) is not shared: each waiter
        // fetches in turn.
        let throttled = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let (cache, throttled) = (Arc::clone(&cache), Arc::clone(&throttled));
                tokio::spawn(async move {
                    let fetch = || async {
                        throttled.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Err::<Token, _>(TokenError::Throttled {
                            retry_after: Duration::from_secs(1),
                        })
                    };
                    let key = TokenKey::federated("https://login/", "t", "ns", "sa", "r2");
                    let who = IdentityKey::service_principal("app");
                    cache.cached(who, key, fetch).await
                })
            })
            .collect();
        for t in tasks {
            assert!(matches!(
                t.await.unwrap(),
                Err(TokenError::Throttled { .. })
            ));
        }
        assert_eq!(throttled.load(Ordering::SeqCst), 3, "one fetch per waiter");
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_leaves_the_fetch_to_the_next_waiter() {
        let cache = Arc::new(TokenCache::with_limits(
            Slow::new(Some(Duration::from_millis(200)), false),
            5,
            1000,
        ));
        let first = spawn_fetch(&cache, "r".into(), RequesterKey::pod("ns", "one"));
        while cache.pending_fetches().1 != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let second = spawn_fetch(&cache, "r".into(), RequesterKey::pod("ns", "two"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        first.abort();
        let _ = first.await;
        // The first call was dropped with its caller; the waiter made its own.
        second.await.unwrap().unwrap();
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 2);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.pending_fetches(), (0, 0));
    }
}
