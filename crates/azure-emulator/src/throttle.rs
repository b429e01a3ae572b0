//! Token buckets on the virtual clock, as Microsoft.Compute keeps them: one per
//! resource and one per subscription for each policy, refilled per minute
//! (docs/upstream-behaviour.md#azure-throttling), plus the ARM subscription
//! layer.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use crate::clock::{VirtualTime, arm_timestamp};
use crate::config::BucketConfig;
use crate::error::ArmError;

#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    last: VirtualTime,
    /// Requests counted in the current minute, for the 429 details.
    window_start: VirtualTime,
    measured: u64,
}

/// All buckets, keyed by (bucket name, scope key).
#[derive(Debug, Default)]
pub struct Buckets {
    map: HashMap<(String, String), Bucket>,
}

/// One bucket to charge: its configuration and the scope it is kept for.
#[derive(Debug, Clone)]
pub struct Charge<'a> {
    pub config: &'a BucketConfig,
    pub scope: String,
}

/// What a charge tells the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Remaining {
    pub name: String,
    pub remaining: u64,
}

/// A refused charge.
#[derive(Debug, Clone)]
pub struct Refused {
    pub name: String,
    pub wait: Duration,
    pub allowed: u64,
    pub measured: u64,
    pub window_start: VirtualTime,
}

impl Buckets {
    fn refill(b: &mut Bucket, cfg: &BucketConfig, now: VirtualTime) {
        let elapsed = now.saturating_sub(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * cfg.per_minute / 60.0).min(cfg.burst);
        b.last = now;
        if now.saturating_sub(b.window_start) >= Duration::from_secs(60) {
            b.window_start = now;
            b.measured = 0;
        }
    }

    /// Takes one token from every bucket, or none if any is empty.
    pub fn charge(
        &mut self,
        charges: &[Charge<'_>],
        now: VirtualTime,
    ) -> Result<Vec<Remaining>, Refused> {
        for c in charges {
            let b = self
                .map
                .entry((c.config.name.clone(), c.scope.clone()))
                .or_insert_with(|| Bucket {
                    tokens: c.config.burst,
                    last: now,
                    window_start: now,
                    measured: 0,
                });
            Self::refill(b, c.config, now);
            b.measured += 1;
        }
        for c in charges {
            let Some(b) = self.map.get(&(c.config.name.clone(), c.scope.clone())) else {
                continue;
            };
            if b.tokens < 1.0 {
                let missing = 1.0 - b.tokens;
                let secs = if c.config.per_minute > 0.0 {
                    missing * 60.0 / c.config.per_minute
                } else {
                    3600.0
                };
                return Err(Refused {
                    name: c.config.name.clone(),
                    wait: Duration::from_secs_f64(secs.max(0.001)),
                    allowed: c.config.burst as u64,
                    measured: b.measured,
                    window_start: b.window_start,
                });
            }
        }
        let mut out = Vec::new();
        for c in charges {
            if let Some(b) = self.map.get_mut(&(c.config.name.clone(), c.scope.clone())) {
                b.tokens -= 1.0;
                out.push(Remaining {
                    name: c.config.name.clone(),
                    remaining: b.tokens.floor().max(0.0) as u64,
                });
            }
        }
        Ok(out)
    }

    /// Drops every bucket (admin reset).
    pub fn reset(&mut self) {
        self.map.clear();
    }
}

/// Compute's 429 body (`OperationNotAllowed` with a `TooManyRequests` detail
/// naming the policy; wrapped in `error`, with the
/// `TooManyRequestsReceived` inner error).
pub fn throttled(refused: &Refused, retry_after_secs: u64) -> ArmError {
    let detail_msg = json!({
        "operationGroup": refused.name,
        "startTime": arm_timestamp(refused.window_start),
        "endTime": arm_timestamp(refused.window_start + Duration::from_secs(60)),
        "allowedRequestCount": refused.allowed,
        "measuredRequestCount": refused.measured,
    })
    .to_string();
    let mut e = ArmError::new(
        429,
        "OperationNotAllowed",
        "The server rejected the request because too many requests have been received for this subscription.",
    )
    .header("Retry-After", retry_after_secs.to_string());
    e.more.details =
        vec![json!({"code": "TooManyRequests", "target": refused.name, "message": detail_msg})];
    e.more.innererror = Some(json!({"internalErrorCode": "TooManyRequestsReceived"}));
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str, burst: f64, per_minute: f64) -> BucketConfig {
        BucketConfig {
            name: name.into(),
            burst,
            per_minute,
        }
    }

    #[test]
    fn burst_then_refill_per_minute() {
        let res = cfg("PutVMScaleSetResource", 12.0, 4.0);
        let sub = cfg("PutVMScaleSetSubscriptionMaximum", 1500.0, 500.0);
        let mut b = Buckets::default();
        let t0 = Duration::from_secs(1000);
        let charges = [
            Charge {
                config: &res,
                scope: "v1".into(),
            },
            Charge {
                config: &sub,
                scope: "s".into(),
            },
        ];
        for i in 0..12 {
            let r = b.charge(&charges, t0).expect("within burst");
            assert_eq!(r[0].remaining, 11 - i);
        }
        let refused = b.charge(&charges, t0).expect_err("empty");
        assert_eq!(refused.name, "PutVMScaleSetResource");
        assert_eq!(refused.wait, Duration::from_secs(15));
        // The subscription bucket was not charged by the refused request.
        assert!(
            b.charge(
                &[Charge {
                    config: &sub,
                    scope: "s".into()
                }],
                t0
            )
            .is_ok_and(|r| r[0].remaining == 1500 - 13)
        );
        // 15 virtual seconds later one token is back, not two.
        let t1 = t0 + Duration::from_secs(15);
        assert!(b.charge(&charges, t1).is_ok());
        assert!(b.charge(&charges, t1).is_err());
        // Another scale set has its own bucket.
        assert!(
            b.charge(
                &[Charge {
                    config: &res,
                    scope: "v2".into()
                }],
                t1
            )
            .is_ok()
        );
    }

    #[test]
    fn throttled_body_is_crp_shaped() {
        let e = throttled(
            &Refused {
                name: "GetVMScaleSetResource".into(),
                wait: Duration::from_secs(5),
                allowed: 36,
                measured: 37,
                window_start: Duration::ZERO,
            },
            5,
        );
        let body = e.body();
        assert_eq!(body["error"]["code"], "OperationNotAllowed");
        assert_eq!(body["error"]["details"][0]["code"], "TooManyRequests");
        assert_eq!(
            body["error"]["details"][0]["target"],
            "GetVMScaleSetResource"
        );
        let inner: serde_json::Value = serde_json::from_str(
            body["error"]["details"][0]["message"]
                .as_str()
                .unwrap_or(""),
        )
        .expect("json");
        assert_eq!(inner["allowedRequestCount"], 36);
        assert_eq!(
            body["error"]["innererror"]["internalErrorCode"],
            "TooManyRequestsReceived"
        );
        assert!(e.more.headers.contains(&("Retry-After".into(), "5".into())));
    }
}
