//! Why a token could not be had, and what the pod is answered.

use std::time::Duration;

use http::StatusCode;

/// Why a token could not be had.
#[derive(Clone, Debug, thiserror::Error)]
pub enum TokenError {
    /// IMDS (or AAD) answered with an error: upstream's adal
    /// `TokenRefreshError`, answered 403 as upstream did.
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
    /// namespace, which could be another tenant's): answered 403.
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
    /// A federated identity's exchange failed: the API server would not
    /// issue the ServiceAccount token, or Entra ID refused it. `message`
    /// says what to fix. Answered 403 when either refused (4xx but 429: a
    /// configuration the user must change), else 503 (retried by SDKs).
    #[error("{message}")]
    Federated {
        /// The refusing server's status: the API server's for the
        /// TokenRequest, else Entra ID's (0: neither answered).
        status: u16,
        /// The AADSTS code, when Entra gave one.
        code: Option<u32>,
        /// What went wrong and the fix.
        message: String,
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
    /// The status the pod gets: upstream's, except for NMI's own refusals.
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
            TokenError::Federated { status, .. } => {
                if (400..500).contains(status) && *status != 429 {
                    StatusCode::FORBIDDEN
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            }
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
