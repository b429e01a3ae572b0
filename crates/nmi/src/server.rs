//! The token service: routes → request parsing → pod lookup → selection →
//! token → response. Thin: every decision is in `request`, `index`, `select`,
//! `response`, `limits` and `fair`.
//!
//! **Bounded.** Connections: at most `--max-connections` in all and
//! `--max-connections-per-ip` from one address (others are closed at once);
//! one descriptor each; a request head must arrive within
//! [`Limits::header_read_timeout`], which also closes a keep-alive
//! connection that sends no next request; a connection takes no new request
//! after [`Limits::max_connection_age`]. Requests: heads of at most 64 KiB;
//! a token request (or a proxied GET) declaring a body is answered 400 at
//! once and its connection closed, without reading the body; a forwarded
//! POST body is at most 64 KiB and must arrive within
//! [`Limits::body_read_timeout`]. A caller that goes away cancels its
//! request (hyper sees the end of the stream and drops the handler), and
//! with it its place in the IMDS queue. Memory is thus bounded by the
//! connection caps times one request each, plus the token cache's bound
//! ([`crate::token`]), and returns to its resting size when callers stop.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use aadpodid_api::{AzureIdentity, IdentityType};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use kube::ResourceExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use aadpodid_runtime::events::{self, EventPublisher, Severity};
use aadpodid_runtime::watch::Synced;
use aadpodid_runtime::{Shutdown, admin};

use crate::args::OperationMode;
use crate::fair::RequesterKey;
use crate::federated::Federated;
use crate::http_client;
use crate::index::{Index, PodEntry, PodLookup};
use crate::limits::{self, Connections, LogGate};
use crate::metrics::{
    IMDS_OP_USER_ASSIGNED, Metrics, REFUSED_CLIENT_ID_MISMATCH, REFUSED_CLUSTER_IDENTITY,
    REFUSED_FEDERATED_EXCHANGE, REFUSED_INCOMPLETE_IDENTITY, REFUSED_UNKNOWN_TOKEN_SOURCE,
    REQUEST_REFUSED_BODY, REQUEST_REFUSED_BODY_TIMEOUT, REQUEST_REFUSED_FIRST_SYNC,
    REQUEST_REFUSED_PENDING_FETCHES, operation_type,
};
use crate::request::{self, Rejection, Route, Selector, TokenQuery};
use crate::response::{self, Token};
use crate::select::{self, Outcome};
use crate::sp::ServicePrincipals;
use crate::token::{TokenCache, TokenError, TokenSource, jwt_oid, now_secs};

/// Event reason on an AzureIdentity whose `clientID` is not the client ID of
/// the managed identity IMDS returns for its `resourceID`.
pub const REASON_CLIENT_ID_MISMATCH: &str = "client id mismatch";
/// Event reason on an AzureIdentity naming one of the cluster's own
/// identities (the kubelet identity or one in `--immutable-user-msis`) while
/// `--serve-cluster-identities` is off.
pub const REASON_CLUSTER_IDENTITY: &str = "cluster identity";
/// Event reason on a type-0 AzureIdentity without `clientID` or `resourceID`.
pub const REASON_INCOMPLETE_IDENTITY: &str = "incomplete identity";
/// Event reason on an AzureIdentity whose token-source annotation names no
/// known source.
pub const REASON_UNKNOWN_TOKEN_SOURCE: &str = "unknown token source";
/// Event reason on a federated AzureIdentity whose exchange Entra ID refused
/// (the note says which federated credential to create or fix).
pub const REASON_FEDERATED_REFUSED: &str = "federated exchange refused";
/// Event reason, in NMI's own namespace and about NMI's Node, when IMDS
/// answers "Identity not found" for an identity whose AzureAssignedIdentity
/// is Assigned: it was removed from the node's VMSS/VM behind MIC's back
/// (the constant MIC's Event watch selects on).
pub use aadpodid_api::REASON_IDENTITY_NOT_ON_NODE;
/// The Events' `action`.
const EVENT_ACTION: &str = "GetToken";

/// Whether IMDS refused a token because the identity is not on this VM:
/// 400 with the description `Identity not found`.
fn identity_not_found(error: &TokenError) -> bool {
    matches!(error, TokenError::Refused { status: 400, body } if body.contains("Identity not found"))
}

/// The index and a version that changes whenever it does (waiters wake on it).
#[derive(Debug)]
pub struct State {
    index: Mutex<Index>,
    version: watch::Sender<u64>,
}

impl Default for State {
    fn default() -> Self {
        State {
            index: Mutex::new(Index::new()),
            version: watch::Sender::new(0),
        }
    }
}

impl State {
    /// Reads the index.
    pub fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the index and wakes every waiting request.
    pub fn update(&self, f: impl FnOnce(&mut Index)) {
        f(&mut self.index());
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

/// Behaviour switches from the flags.
#[derive(Clone, Debug)]
pub struct Config {
    /// Standard or managed.
    pub mode: OperationMode,
    /// Namespaced mode.
    pub namespaced: bool,
    /// `--metadata-header-required`.
    pub metadata_header_required: bool,
    /// Which IMDS endpoints are forwarded (`--block-instance-metadata`,
    /// `--allow-scheduled-events-post`).
    pub proxy: request::ProxyPolicy,
    /// `--set-retry-after-header`.
    pub set_retry_after_header: bool,
    /// `--retry-attempts-for-created`.
    pub retry_attempts_for_created: u32,
    /// `--retry-attempts-for-assigned`.
    pub retry_attempts_for_assigned: u32,
    /// `--find-identity-retry-interval`, seconds.
    pub retry_interval_secs: u64,
    /// `--MICNamespace`.
    pub mic_namespace: String,
    /// This node's name, and NMI's own namespace (`POD_NAMESPACE`): where
    /// [`REASON_IDENTITY_NOT_ON_NODE`] Events go (none when either is empty).
    pub node_name: String,
    pub event_namespace: String,
    /// `--mic-service-accounts`.
    pub mic_service_accounts: Vec<String>,
    /// Where other paths (and excepted pods' requests) are proxied.
    pub metadata_addr: SocketAddr,
    /// Bounds on connections, timeouts and the first-sync wait.
    pub limits: Limits,
    /// `--default-token-source`: the source of an AzureIdentity without
    /// the token-source annotation.
    pub default_token_source: aadpodid_api::TokenSource,
}

/// Bounds on what callers can make NMI hold, and how long.
#[derive(Clone, Debug)]
pub struct Limits {
    /// `--max-connections`: open connections in all.
    pub max_connections: u32,
    /// `--max-connections-per-ip`: open connections from one address.
    pub max_connections_per_ip: u32,
    /// A request head must arrive within this after the connection opens or
    /// the previous answer was sent (so it also bounds idle keep-alive).
    pub header_read_timeout: Duration,
    /// A connection takes no new request after this (the one in progress is
    /// answered).
    pub max_connection_age: Duration,
    /// A forwarded POST body must arrive within this.
    pub body_read_timeout: Duration,
    /// `--first-sync-wait-sec`: how long a token request made before every
    /// watch has listed waits for them.
    pub first_sync_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_connections_per_ip: 32,
            header_read_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(600),
            body_read_timeout: Duration::from_secs(10),
            first_sync_wait: Duration::from_secs(20),
        }
    }
}

/// Whether every watch has listed once since NMI started: token requests
/// wait (bounded) for it instead of failing on an empty index.
#[derive(Clone, Debug)]
pub struct FirstSync(watch::Receiver<bool>);

impl FirstSync {
    /// Already synced (tests and benchmarks that fill the index themselves).
    pub fn done() -> Self {
        FirstSync(watch::channel(true).1)
    }

    /// Follows `rx` (true once synced).
    pub fn new(rx: watch::Receiver<bool>) -> Self {
        FirstSync(rx)
    }

    /// Follows `synced`: done once every watch in it has synced (a task
    /// awaits [`Synced::wait_all`], or `shutdown`).
    pub fn after(synced: &Synced, shutdown: Shutdown) -> Self {
        let (tx, rx) = watch::channel(synced.all());
        if !*rx.borrow() {
            let all = synced.wait_all();
            tokio::spawn(async move {
                tokio::select! {
                    _ = shutdown.signaled() => {}
                    _ = all => { let _ = tx.send(true); }
                }
            });
        }
        FirstSync(rx)
    }

    /// Waits up to `wait` for the sync; whether it came. Once synced, this
    /// returns at once without arming a timer (every token request asks).
    async fn wait(&self, wait: Duration) -> bool {
        if *self.0.borrow() {
            return true;
        }
        let mut rx = self.0.clone();
        matches!(
            tokio::time::timeout(wait, rx.wait_for(|synced| *synced)).await,
            Ok(Ok(_))
        )
    }
}

impl Config {
    fn budget(&self, created: bool) -> (Duration, u32) {
        let attempts = if created {
            self.retry_attempts_for_created
                .saturating_add(self.retry_attempts_for_assigned)
        } else {
            self.retry_attempts_for_created
        };
        (
            Duration::from_secs(u64::from(attempts).saturating_mul(self.retry_interval_secs)),
            attempts,
        )
    }
}

/// Everything a request handler needs.
#[derive(Debug)]
pub struct Server<S> {
    /// The index.
    pub state: Arc<State>,
    /// Tokens.
    pub cache: TokenCache<S>,
    /// Service-principal identities (types 1 and 2).
    pub sp: ServicePrincipals,
    /// Federated identities (token source `federated`, any type).
    pub federated: Federated,
    /// Flags.
    pub config: Config,
    /// Metrics.
    pub metrics: Metrics,
    /// Events on AzureIdentities NMI refuses to serve.
    pub events: EventPublisher,
    /// Whether the watches have listed once.
    pub first_sync: FirstSync,
}

/// `Retry-After` of a token request that waited `--first-sync-wait-sec` for
/// the first sync in vain.
const FIRST_SYNC_RETRY_AFTER_SECS: u64 = 5;
/// How often a refused connection is logged at most.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// Largest request head hyper buffers (huge headers get 431).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest proxied request body.
const MAX_PROXY_BODY: usize = 64 * 1024;
/// How long a request from an address not yet in the pod cache waits for the
/// watch to catch up (upstream: 5 lookups 300 ms apart).
const POD_LOOKUP_WAIT: Duration = Duration::from_millis(1500);
/// IMDS's SLA: 10 s per request.
const PROXY_TIMEOUT: Duration = Duration::from_secs(10);
/// Upstream's `Retry-After` with `--set-retry-after-header`.
const RETRY_AFTER_SECS: u64 = 20;
/// Most identities one `object_id` request fetches tokens for (one second of
/// IMDS's per-VM budget), however many the pod is bound to.
pub const MAX_OBJECT_ID_CANDIDATES: usize = 20;
/// How long after a request starts a refusal resting on an AzureAssignedIdentity
/// that does not match the cached identity, binding or pod is final (the
/// caches may still be catching up with it).
const SETTLE: Duration = Duration::from_secs(2);

/// An error answer.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    message: String,
    /// `Retry-After` seconds to send, if any.
    retry_after: Option<u64>,
    /// Close the connection after the answer (its request body is unread).
    close: bool,
}

impl Reply {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Reply {
            status,
            message: message.into(),
            retry_after: None,
            close: false,
        }
    }

    fn closing(mut self) -> Self {
        self.close = true;
        self
    }
}

impl From<Rejection> for Reply {
    fn from(r: Rejection) -> Self {
        Reply::new(r.status(), r.to_string())
    }
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// A token endpoint's answer with the metric labels it earned: the pod's
/// namespace and the resource (empty until the checks passed).
type Answer = (String, String, Response<Full<Bytes>>);

/// An error answer with no labels (the pod is not known yet).
fn unlabelled(reply: &Reply) -> Answer {
    (String::new(), String::new(), error_response(reply))
}

fn error_response(reply: &Reply) -> Response<Full<Bytes>> {
    let mut resp = json(
        reply.status,
        response::error_body(reply.status, &reply.message),
    );
    if let Some(secs) = reply.retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if reply.close {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// One admitted connection: counted until its task ends.
struct ConnGuard {
    connections: Arc<Mutex<Connections>>,
    ip: IpAddr,
    metrics: Metrics,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut c = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        c.release(self.ip);
        self.metrics.connections.set(i64::from(c.open()));
    }
}

/// Accepts connections on `listener` until `shutdown`, within the
/// connection caps of [`Limits`].
pub async fn serve<S: TokenSource>(
    listener: TcpListener,
    server: Arc<Server<S>>,
    shutdown: Shutdown,
) {
    let limits = &server.config.limits;
    let connections = Arc::new(Mutex::new(Connections::new(
        limits.max_connections,
        limits.max_connections_per_ip,
    )));
    let mut log_gate = LogGate::new(REFUSAL_LOG_EVERY);
    while let Some((stream, peer)) =
        admin::accept(&listener, &shutdown, "token", Duration::from_millis(50)).await
    {
        let admitted = {
            let mut c = connections.lock().unwrap_or_else(|e| e.into_inner());
            let admitted = c.admit(peer.ip());
            server.metrics.connections.set(i64::from(c.open()));
            admitted
        };
        if let Err(refusal) = admitted {
            server
                .metrics
                .connections_refused
                .with_label_values(&[refusal.label()])
                .inc();
            if let Some(held_back) = log_gate.allow(Instant::now()) {
                tracing::warn!(peer = %peer.ip(), reason = refusal.label(), held_back, "connection refused: too many open connections");
            }
            // Closed at once, unread.
            drop(stream);
            continue;
        }
        let guard = ConnGuard {
            connections: Arc::clone(&connections),
            ip: peer.ip(),
            metrics: server.metrics.clone(),
        };
        let server = Arc::clone(&server);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            connection(stream, peer, server, shutdown).await;
            drop(guard);
        });
    }
}

async fn connection<S: TokenSource>(
    stream: TcpStream,
    peer: SocketAddr,
    server: Arc<Server<S>>,
    shutdown: Shutdown,
) {
    let limits = server.config.limits.clone();
    let service = service_fn(move |req| {
        let server = Arc::clone(&server);
        async move { Ok::<_, Infallible>(server.handle(req, peer).await) }
    });
    // hyper restarts the header timer whenever it waits for a request head,
    // including on an idle keep-alive connection; and while a request is in
    // progress it watches the socket, ending the connection (and dropping
    // the handler) when the caller closes it.
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let age = tokio::time::sleep(limits.max_connection_age);
    tokio::pin!(age);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = shutdown.signaled() => {
            conn.as_mut().graceful_shutdown();
            return;
        }
        _ = &mut age => {}
    }
    // Old enough: the request in progress (bounded by its own budget) is
    // answered, then the connection closes.
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.signaled() => {}
    }
}

impl<S: TokenSource> Server<S> {
    /// Answers one request. Dropping the future (the caller went away)
    /// cancels everything it waits for.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let route = request::route(req.method(), req.uri().path(), &self.config.proxy);
        // Only a forwarded POST may carry a body; any other request that
        // declares one is answered at once, and its connection closed rather
        // than waiting for (or reading) the body.
        let body_allowed = matches!(route, Ok(Route::Proxy)) && req.method() == http::Method::POST;
        let declared_body = limits::declares_body(req.headers());
        let (op, namespace, resource, resp) = match route {
            Err(r) => {
                let mut reply = Reply::from(r);
                reply.close = declared_body;
                (
                    "invalid",
                    String::new(),
                    String::new(),
                    error_response(&reply),
                )
            }
            Ok(_) if declared_body && !body_allowed => {
                self.metrics.request_refused(REQUEST_REFUSED_BODY);
                let reply = Reply::new(
                    StatusCode::BAD_REQUEST,
                    "this request must not carry a body",
                )
                .closing();
                (
                    "invalid",
                    String::new(),
                    String::new(),
                    error_response(&reply),
                )
            }
            Ok(Route::Token) => {
                let (ns, res, resp) = self.token(req, peer).await;
                (request::TOKEN_PATH, ns, res, resp)
            }
            Ok(Route::HostToken) => {
                let (ns, res, resp) = self.host_token(req, peer).await;
                (request::HOST_TOKEN_PATH, ns, res, resp)
            }
            Ok(Route::Proxy) => (
                "proxy",
                String::new(),
                String::new(),
                self.proxy_checked(req).await,
            ),
        };
        let status = resp.status().as_u16().to_string();
        let resource = self.metrics.resource_label(&resource);
        self.metrics
            .nmi_operations
            .with_label_values(&[op, &status, &namespace, &resource])
            .observe(started.elapsed().as_secs_f64());
        let (waiting, in_flight) = self.cache.pending_fetches();
        self.metrics.set_load(self.cache.len(), waiting, in_flight);
        resp
    }

    /// The token query of `req`, once the caches have synced: what both
    /// token endpoints check after their own header checks.
    async fn query_when_synced(&self, req: &Request<Incoming>) -> Result<TokenQuery, Reply> {
        let query = request::parse_token_query(req.uri().query())?;
        self.first_sync().await?;
        Ok(query)
    }

    /// Waits (bounded) for the first sync; the answer to give when it does
    /// not come.
    async fn first_sync(&self) -> Result<(), Reply> {
        if self
            .first_sync
            .wait(self.config.limits.first_sync_wait)
            .await
        {
            return Ok(());
        }
        self.metrics.request_refused(REQUEST_REFUSED_FIRST_SYNC);
        let mut reply = Reply::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "NMI is starting: its caches have not synced yet",
        );
        reply.retry_after = Some(FIRST_SYNC_RETRY_AFTER_SECS);
        Err(reply)
    }

    /// The token endpoint. Returns the pod's namespace and, on success, the
    /// resource (metric labels limited to values that passed the checks).
    async fn token(&self, req: Request<Incoming>, peer: SocketAddr) -> Answer {
        // Checked first and answered at once: SDK probes send no header and
        // give up after about a second.
        if self.config.metadata_header_required && !request::has_metadata_header(req.headers()) {
            return unlabelled(&Rejection::MissingMetadataHeader.into());
        }
        tracing::debug!(peer = %peer, "token request");
        let query = match self.query_when_synced(&req).await {
            Ok(q) => q,
            Err(reply) => return unlabelled(&reply),
        };
        let pod = match self.pod_by_ip(peer.ip()).await {
            Ok(p) => p,
            Err(reply) => return unlabelled(&reply),
        };
        let excepted = {
            let index = self.state.index();
            index.is_excepted(&pod)
        } || select::is_mic(
            &pod,
            &self.config.mic_namespace,
            &self.config.mic_service_accounts,
        );
        if excepted {
            // Excepted pods (and MIC) talk to IMDS as if NMI were not there:
            // the request goes through unchanged and IMDS's answer comes back
            // unchanged (upstream re-fetched and turned IMDS's 400 into a
            // 403).
            let resp = self.proxy(req).await;
            return (pod.namespace.clone(), String::new(), resp);
        }
        let requester = RequesterKey::pod(&pod.namespace, &pod.name);
        match self
            .resolve(&pod, &query, &requester, self.config.set_retry_after_header)
            .await
        {
            Ok(tokens) => {
                let body = response::token_body(&tokens, now_secs());
                (
                    pod.namespace.clone(),
                    query.resource.clone(),
                    json(StatusCode::OK, body),
                )
            }
            Err(reply) => (pod.namespace.clone(), String::new(), error_response(&reply)),
        }
    }

    /// `/host/token`: host-network callers name a pod in the `podns` and
    /// `podname` headers.
    async fn host_token(&self, req: Request<Incoming>, peer: SocketAddr) -> Answer {
        let (ns, name) = match request::host_pod_headers(req.headers()) {
            Ok(v) => v,
            Err(r) => return unlabelled(&r.into()),
        };
        // The node itself, over IPv4 or IPv6 loopback (a pod's packets never
        // carry a loopback source: the kernel drops them as martians).
        let from_host = matches!(
            peer.ip().to_canonical(),
            IpAddr::V4(Ipv4Addr::LOCALHOST) | IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
        );
        if !from_host {
            return unlabelled(&Rejection::NotFromHost.into());
        }
        let query = match self.query_when_synced(&req).await {
            Ok(q) => q,
            Err(reply) => return unlabelled(&reply),
        };
        let pod = {
            let index = self.state.index();
            index.pod(&ns, &name).cloned()
        };
        let Some(pod) = pod else {
            let reply = Reply::new(
                StatusCode::NOT_FOUND,
                format!("failed to get pod {ns}/{name}"),
            );
            return unlabelled(&reply);
        };
        let requester = RequesterKey::host(peer.ip());
        match self.resolve(&pod, &query, &requester, false).await {
            Ok(tokens) => {
                let Some(token) = tokens.first() else {
                    let reply = Reply::new(StatusCode::INTERNAL_SERVER_ERROR, "no token");
                    return (pod.namespace.clone(), String::new(), error_response(&reply));
                };
                (
                    pod.namespace.clone(),
                    query.resource.clone(),
                    json(StatusCode::OK, response::host_token_body(token, now_secs())),
                )
            }
            Err(reply) => (pod.namespace.clone(), String::new(), error_response(&reply)),
        }
    }

    /// The one live pod with `ip`, waiting briefly for the watch to catch up.
    async fn pod_by_ip(&self, ip: IpAddr) -> Result<Arc<PodEntry>, Reply> {
        let deadline = Instant::now() + POD_LOOKUP_WAIT;
        let mut rx = self.state.subscribe();
        loop {
            rx.borrow_and_update();
            let found = self.state.index().pod_by_ip(ip).cloned();
            match found {
                Ok(p) => return Ok(p),
                Err(e @ PodLookup::Ambiguous { .. }) => {
                    return Err(Reply::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()));
                }
                Err(e @ PodLookup::Unknown) => {
                    let woke = tokio::time::timeout_at(deadline, rx.changed()).await;
                    if !matches!(woke, Ok(Ok(()))) {
                        return Err(Reply::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()));
                    }
                }
            }
        }
    }

    /// Selection, waiting for MIC (driven by the watch) within upstream's
    /// budget, then the token. The access decision is made from the live
    /// index on every call, before the cache is consulted.
    async fn resolve(
        &self,
        pod: &PodEntry,
        query: &TokenQuery,
        requester: &RequesterKey,
        retry_after: bool,
    ) -> Result<Vec<Token>, Reply> {
        let started = Instant::now();
        let mut rx = self.state.subscribe();
        let outcome = loop {
            rx.borrow_and_update();
            let outcome = {
                let index = self.state.index();
                match self.config.mode {
                    OperationMode::Standard => {
                        // A pod deleted while its request waits gets nothing;
                        // its labels are read afresh (the binding selector).
                        let Some(current) = index.pod(&pod.namespace, &pod.name) else {
                            return Err(Reply::new(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                PodLookup::Unknown.to_string(),
                            ));
                        };
                        let outcome = select::standard(
                            current,
                            &query.selector,
                            &index,
                            self.config.namespaced,
                        );
                        let rejected = if outcome == Outcome::Deny {
                            select::rejected_aais(current, &index, self.config.namespaced)
                        } else {
                            Vec::new()
                        };
                        (outcome, rejected)
                    }
                    OperationMode::Managed => {
                        let ids = index.managed_identities_for(pod);
                        (select::managed(&query.selector, &ids), Vec::new())
                    }
                }
            };
            let (outcome, rejected) = outcome;
            if !rejected.is_empty() {
                // The watches of AAIs, identities, bindings and pods are
                // separate streams: a genuine AAI can arrive before the
                // binding or identity it embeds. A refusal that rests on a
                // rejected AAI is given only after SETTLE, re-checked on
                // every change meanwhile.
                let settle = started + SETTLE;
                if Instant::now() < settle {
                    tokio::select! {
                        changed = rx.changed() => {
                            if changed.is_err() {
                                return Err(Reply::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"));
                            }
                        }
                        _ = tokio::time::sleep_until(settle) => {}
                    }
                    continue;
                }
                tracing::info!(pod = %pod.name, namespace = %pod.namespace, ?rejected, "refused: the pod's AzureAssignedIdentities do not match the live identities, bindings or pod labels");
            }
            let Outcome::Wait { created } = outcome else {
                break outcome;
            };
            tracing::debug!(pod = %pod.name, namespace = %pod.namespace, created, "token request waits for its identity");
            let (budget, attempts) = self.config.budget(created);
            let deadline = started + budget;
            if Instant::now() >= deadline {
                let mut reply = Reply::new(
                    StatusCode::NOT_FOUND,
                    select::wait_expired_message(
                        pod,
                        created,
                        attempts,
                        self.config.retry_interval_secs,
                    ),
                );
                if retry_after {
                    reply.status = StatusCode::SERVICE_UNAVAILABLE;
                    reply.retry_after = Some(RETRY_AFTER_SECS);
                }
                return Err(reply);
            }
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Err(Reply::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {}
            }
        };
        let no_match = |status| {
            let mut r = Reply::new(status, select::no_match_message(&query.selector));
            if retry_after {
                r.status = StatusCode::SERVICE_UNAVAILABLE;
                r.retry_after = Some(RETRY_AFTER_SECS);
            }
            r
        };
        // The operation_type label: by the identity's type and token source
        // (an object_id request's: its first candidate's).
        let default_source = self.config.default_token_source;
        let operation = match &outcome {
            Outcome::Use(identity) => operation_type(identity, default_source),
            Outcome::ByObjectId(candidates) => candidates
                .first()
                .map_or(IMDS_OP_USER_ASSIGNED, |i| operation_type(i, default_source)),
            _ => IMDS_OP_USER_ASSIGNED,
        };
        let started_fetch = Instant::now();
        let result = match outcome {
            Outcome::Use(identity) => {
                let fetched = self.fetch(&identity, pod, &query.resource, requester).await;
                if let Err(e) = &fetched
                    && identity_not_found(e)
                {
                    self.identity_not_on_node(&identity);
                }
                fetched
            }
            Outcome::ByObjectId(candidates) if !candidates.is_empty() => {
                let Selector::ObjectId(oid) = &query.selector else {
                    return Err(no_match(StatusCode::NOT_FOUND));
                };
                self.by_object_id(&candidates, pod, oid, &query.resource, requester)
                    .await
                    .map(|t| vec![t])
            }
            Outcome::ByObjectId(_) | Outcome::Deny | Outcome::Wait { .. } => {
                return Err(no_match(StatusCode::NOT_FOUND));
            }
        };
        self.metrics
            .imds_operations
            .with_label_values(&[operation])
            .observe(started_fetch.elapsed().as_secs_f64());
        result.map_err(|e| {
            if matches!(e, TokenError::Throttled { .. }) {
                self.metrics
                    .request_refused(REQUEST_REFUSED_PENDING_FETCHES);
            } else if !matches!(
                e,
                TokenError::NotBound
                    | TokenError::ClientIdMismatch { .. }
                    | TokenError::ClusterIdentity { .. }
            ) {
                self.metrics
                    .imds_errors
                    .with_label_values(&[operation])
                    .inc();
            }
            match e {
                TokenError::NotBound => no_match(StatusCode::NOT_FOUND),
                other => {
                    let mut reply = Reply::new(other.status(), other.to_string());
                    // IMDS's own Retry-After, after NMI's bounded retries.
                    reply.retry_after = other.retry_after().map(|d| d.as_secs());
                    reply
                }
            }
        })
    }

    /// An `object_id` request: each candidate's token (by its resource ID,
    /// checked against its client ID, cached), in the candidates' order,
    /// until one has the requested object ID in its `oid` claim. Bounded by
    /// the candidates (the pod's own identities), at most
    /// [`MAX_OBJECT_ID_CANDIDATES`]. When none has it: the first failure if a
    /// candidate could not be fetched, else upstream's 404.
    async fn by_object_id(
        &self,
        candidates: &[Arc<AzureIdentity>],
        pod: &PodEntry,
        object_id: &str,
        resource: &str,
        requester: &RequesterKey,
    ) -> Result<Token, TokenError> {
        if candidates.len() > MAX_OBJECT_ID_CANDIDATES {
            tracing::warn!(
                candidates = candidates.len(),
                max = MAX_OBJECT_ID_CANDIDATES,
                "object_id request: only the first identities are tried"
            );
        }
        let mut failure = None;
        for identity in candidates.iter().take(MAX_OBJECT_ID_CANDIDATES) {
            let fetched = match self.source_of(identity) {
                Ok(aadpodid_api::TokenSource::Federated) => {
                    self.fetch_federated(identity, pod, resource, requester)
                        .await
                }
                Ok(aadpodid_api::TokenSource::Imds) => {
                    self.fetch_msi(identity, resource, requester).await
                }
                Err(e) => Err(e),
            };
            match fetched {
                Ok(token) => {
                    if jwt_oid(token.access_token.expose())
                        .is_some_and(|o| o.eq_ignore_ascii_case(object_id))
                    {
                        return Ok(token);
                    }
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        Err(failure.unwrap_or(TokenError::NotBound))
    }

    /// A user-assigned identity's token: asked of IMDS by its resource ID and
    /// served only for its client ID. A refusal is published as an Event on
    /// the AzureIdentity and counted.
    async fn fetch_msi(
        &self,
        identity: &AzureIdentity,
        resource: &str,
        requester: &RequesterKey,
    ) -> Result<Token, TokenError> {
        let spec = &identity.spec;
        let ns = identity.namespace().unwrap_or_default();
        let name = identity.name_any();
        if spec.client_id.trim().is_empty() || spec.resource_id.trim().is_empty() {
            let note = format!(
                "AzureIdentity {ns}/{name} is of type 0 (user-assigned managed identity) and needs both spec.resourceID and spec.clientID; NMI serves no token for it"
            );
            self.refused(
                identity,
                REASON_INCOMPLETE_IDENTITY,
                REFUSED_INCOMPLETE_IDENTITY,
                &note,
            );
            return Err(TokenError::Forbidden(note));
        }
        let result = self
            .cache
            .by_resource_id(&spec.resource_id, &spec.client_id, resource, requester)
            .await;
        if let Err(e) = &result {
            self.report(identity, e);
        }
        result
    }

    /// The token source of `identity`; an annotation naming no known source
    /// is refused (403, an Event on the AzureIdentity and the metric).
    fn source_of(&self, identity: &AzureIdentity) -> Result<aadpodid_api::TokenSource, TokenError> {
        aadpodid_api::token_source(identity, self.config.default_token_source).map_err(|e| {
            let note = format!(
                "AzureIdentity {}/{}: {e}; NMI serves no token for it",
                identity.namespace().unwrap_or_default(),
                identity.name_any()
            );
            self.refused(
                identity,
                REASON_UNKNOWN_TOKEN_SOURCE,
                REFUSED_UNKNOWN_TOKEN_SOURCE,
                &note,
            );
            TokenError::Forbidden(note)
        })
    }

    /// A federated identity's token for `pod` ([`crate::federated`]): never
    /// one of the cluster's own identities unless they are served; Entra's
    /// refusals are published as Events on the AzureIdentity and counted.
    async fn fetch_federated(
        &self,
        identity: &AzureIdentity,
        pod: &PodEntry,
        resource: &str,
        requester: &RequesterKey,
    ) -> Result<Token, TokenError> {
        let result = match self.cache.refuse_cluster_identity(&identity.spec.client_id) {
            Ok(()) => {
                self.federated
                    .token(&self.cache, identity, pod, resource, requester)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            self.report(identity, e);
        }
        result
    }

    /// Publishes the refusals a user must act on as Events on `identity`.
    fn report(&self, identity: &AzureIdentity, error: &TokenError) {
        let spec = &identity.spec;
        let ns = identity.namespace().unwrap_or_default();
        let name = identity.name_any();
        match error {
            TokenError::ClientIdMismatch { .. } => {
                let note = format!(
                    "AzureIdentity {ns}/{name}: the managed identity with resourceID {} does not have clientID {}; NMI serves no token for it. Set spec.clientID to that identity's client ID, or spec.resourceID to the identity you meant",
                    spec.resource_id, spec.client_id
                );
                self.refused(
                    identity,
                    REASON_CLIENT_ID_MISMATCH,
                    REFUSED_CLIENT_ID_MISMATCH,
                    &note,
                );
            }
            TokenError::ClusterIdentity { client_id } => {
                let note = format!(
                    "AzureIdentity {ns}/{name}: the managed identity with clientID {client_id} is one of the cluster's own identities (the kubelet identity or one listed in --immutable-user-msis); nmi serves it only with --serve-cluster-identities"
                );
                self.refused(
                    identity,
                    REASON_CLUSTER_IDENTITY,
                    REFUSED_CLUSTER_IDENTITY,
                    &note,
                );
            }
            TokenError::Federated { message, .. } if error.status() == StatusCode::FORBIDDEN => {
                self.refused(
                    identity,
                    REASON_FEDERATED_REFUSED,
                    REFUSED_FEDERATED_EXCHANGE,
                    message,
                );
            }
            _ => {}
        }
    }

    /// Standard mode: IMDS does not know `identity`, which an Assigned
    /// AzureAssignedIdentity says is on this node. A Warning Event about this
    /// Node in NMI's own namespace asks MIC to check the node's VMSS/VM (the
    /// publisher's throttle: at most one per node every 30 s).
    fn identity_not_on_node(&self, identity: &AzureIdentity) {
        let c = &self.config;
        if c.mode != OperationMode::Standard
            || c.node_name.is_empty()
            || c.event_namespace.is_empty()
        {
            return;
        }
        let note = format!(
            "IMDS on node {} does not know identity {} (AzureIdentity {}/{}) although its AzureAssignedIdentity is Assigned",
            c.node_name,
            identity.spec.resource_id,
            identity.namespace().unwrap_or_default(),
            identity.name_any()
        );
        tracing::warn!("{note}; asking MIC to check the node");
        // A Node is cluster-scoped; the namespace puts the Event where MIC
        // watches for it (the API server accepts a reference whose namespace
        // is the Event's).
        let regarding = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(c.node_name.clone()),
            namespace: Some(c.event_namespace.clone()),
            ..Default::default()
        };
        self.events.publish(
            Severity::Warning,
            REASON_IDENTITY_NOT_ON_NODE,
            EVENT_ACTION,
            &note,
            regarding,
        );
    }

    fn refused(&self, identity: &AzureIdentity, reason: &str, metric_reason: &str, note: &str) {
        tracing::warn!(
            namespace = identity.namespace().unwrap_or_default(),
            name = identity.name_any(),
            reason,
            "{note}"
        );
        self.metrics
            .identity_refused
            .with_label_values(&[&identity.namespace().unwrap_or_default(), metric_reason])
            .inc();
        self.events.publish(
            Severity::Warning,
            reason,
            EVENT_ACTION,
            note,
            events::reference(identity),
        );
    }

    async fn fetch(
        &self,
        identity: &AzureIdentity,
        pod: &PodEntry,
        resource: &str,
        requester: &RequesterKey,
    ) -> Result<Vec<Token>, TokenError> {
        if self.source_of(identity)? == aadpodid_api::TokenSource::Federated {
            return self
                .fetch_federated(identity, pod, resource, requester)
                .await
                .map(|t| vec![t]);
        }
        match identity.spec.r#type {
            IdentityType::UserAssignedMsi => self
                .fetch_msi(identity, resource, requester)
                .await
                .map(|t| vec![t]),
            IdentityType::ServicePrincipal | IdentityType::ServicePrincipalCertificate => {
                self.sp.tokens(&self.cache, identity, resource).await
            }
            // Upstream answered 503 for an identity type it could not use.
            other => Err(TokenError::Unavailable(format!(
                "identity {}/{} of type {} is not supported by this NMI",
                identity.namespace().unwrap_or_default(),
                identity.name_any(),
                other.as_i64()
            ))),
        }
    }

    async fn proxy_checked(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if self.config.metadata_header_required && !request::has_metadata_header(req.headers()) {
            return error_response(&Rejection::MissingMetadataHeader.into());
        }
        self.proxy(req).await
    }

    /// Passes the request to IMDS and its answer back (the route the token
    /// paths do not take).
    async fn proxy(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let collect = Limited::new(body, MAX_PROXY_BODY).collect();
        let body = match tokio::time::timeout(self.config.limits.body_read_timeout, collect).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(_)) => {
                self.metrics.request_refused(REQUEST_REFUSED_BODY);
                return error_response(
                    &Reply::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large").closing(),
                );
            }
            Err(_) => {
                self.metrics.request_refused(REQUEST_REFUSED_BODY_TIMEOUT);
                return error_response(
                    &Reply::new(StatusCode::REQUEST_TIMEOUT, "request body too slow").closing(),
                );
            }
        };
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let mut out = Request::new(Full::new(body));
        *out.method_mut() = parts.method.clone();
        *out.uri_mut() = match path.parse() {
            Ok(u) => u,
            Err(_) => return error_response(&Rejection::InvalidPath.into()),
        };
        *out.headers_mut() = end_to_end(&parts.headers);
        if let Ok(host) = HeaderValue::from_str(&self.config.metadata_addr.ip().to_string()) {
            out.headers_mut().insert(header::HOST, host);
        }
        match http_client::send(self.config.metadata_addr, out, PROXY_TIMEOUT).await {
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                let mut back = Response::new(Full::new(body));
                *back.status_mut() = parts.status;
                *back.headers_mut() = end_to_end(&parts.headers);
                back
            }
            Err(e) => error_response(&Reply::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                e.to_string(),
            )),
        }
    }
}

/// Headers without hop-by-hop ones (the list below); bodies are re-framed.
fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    const HOP: &[&str] = &[
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    ];
    let mut out = headers.clone();
    for h in HOP {
        out.remove(*h);
    }
    out
}

#[cfg(test)]
mod identity_not_found_tests {
    use super::*;

    #[test]
    fn only_imds_identity_not_found_asks_mic_for_a_check() {
        let refused = |status: u16, body: &str| TokenError::Refused {
            status,
            body: body.into(),
        };
        let imds = r#"{"error":"invalid_request","error_description":"Identity not found"}"#;
        let cases = [
            (refused(400, imds), true),
            (refused(400, "Identity not found"), true),
            (
                refused(
                    400,
                    r#"{"error":"invalid_request","error_description":"Multiple user assigned identities exist"}"#,
                ),
                false,
            ),
            (refused(404, imds), false),
            (TokenError::Unavailable("Identity not found".into()), false),
            (TokenError::NotBound, false),
        ];
        for (i, (error, want)) in cases.iter().enumerate() {
            assert_eq!(identity_not_found(error), *want, "case {i}: {error}");
        }
    }
}
