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
//! Beyond upstream (which cached nothing): tokens are cached per identity
//! ([`IdentityKey`]: resource ID and client ID for a user-assigned one) and
//! token ([`TokenKey`]), concurrent misses share one upstream call, entries
//! are refreshed well before expiry and dropped when no pod on the node uses
//! the identity. The cache sits *behind* the access check: the server decides
//! which identity a pod may use on every request, from the live index, before
//! it asks the cache, so a pod that loses its binding loses access at once.
//! A client-side limiter keeps NMI inside IMDS's documented per-VM budget of
//! 20 token requests per second and 5 concurrent, shared fairly between the
//! pods that ask ([`crate::fair`]).
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
//!
//! | file | holds |
//! | --- | --- |
//! | `error.rs` | [`TokenError`] and the status each gives the pod |
//! | `imds.rs` | the IMDS client ([`Imds`]) and its wire types |
//! | `retry.rs` | transient statuses, `Retry-After`, [`RetryPolicy`] and the retry loop |
//! | `verify.rs` | JWT claims and the client-ID and cluster-identity checks |
//! | `key.rs` | the typed cache keys ([`IdentityKey`], [`TokenKey`]) |
//! | `budget.rs` | the limiter's settings for IMDS's per-VM budget |
//! | `slots.rs` | the cache's entries, their leases and eviction |
//! | `cache.rs` | [`TokenCache`], which puts these together |
//! | `testing.rs` | fake token sources for tests (feature `test-support`) |

use std::future::Future;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::response::Token;

mod budget;
mod cache;
mod error;
mod imds;
mod key;
mod retry;
mod slots;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
mod verify;

pub use budget::{DEFAULT_MAX_PENDING_PER_POD, spacing_for};
pub use cache::TokenCache;
pub use error::TokenError;
pub(crate) use imds::TokenBody;
pub use imds::{Imds, ImdsIdentity};
pub use key::{IdentityKey, TokenKey};
pub use retry::{RetryPolicy, is_transient, parse_retry_after};
pub use slots::{DEFAULT_MAX_CACHED_TOKENS, EntryState, pick_victim};
pub use verify::{
    ClientIdMismatch, check_imds_token, jwt_appid, jwt_claim, jwt_oid, verify_client_id,
};

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

/// Epoch seconds now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
