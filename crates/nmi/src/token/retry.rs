//! Which IMDS answers are worth another try, how long to wait, and the loop
//! that tries.

use std::future::Future;
use std::time::Duration;

use super::TokenError;
use crate::response::Token;

/// Statuses IMDS documents as transient and safe to retry: 404 ("IMDS
/// endpoint is updating"), 410 (updating, back within 70 s), 429 and 5xx,
/// as Microsoft's retry guidance for IMDS tokens lists them.
pub fn is_transient(status: u16) -> bool {
    matches!(status, 404 | 410 | 429) || (500..=599).contains(&status)
}

/// `Retry-After` as delay-seconds (HTTP also allows a date; IMDS sends none).
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

/// Runs `attempt` until it gives a token, an error that is not transient, or
/// `policy` says stop; `attempt` is told whether it is a retry. A transient
/// error that ends the loop carries the number of requests made.
pub(super) async fn with_retries<F, Fut>(
    policy: &RetryPolicy,
    mut attempt: F,
) -> Result<Token, TokenError>
where
    F: FnMut(bool) -> Fut,
    Fut: Future<Output = Result<Token, TokenError>>,
{
    let mut waited = Duration::ZERO;
    let mut attempts = 1u32;
    loop {
        let error = match attempt(attempts > 1).await {
            Ok(token) => return Ok(token),
            Err(e) => e,
        };
        let Some(wait) = policy.next_wait(attempts as usize - 1, &error, waited) else {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use http::StatusCode;
    use tokio::time::Instant;

    use super::*;
    use crate::token::TokenCache;
    use crate::token::testing::{Answer, Scripted, fast_policy, who};

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
}
