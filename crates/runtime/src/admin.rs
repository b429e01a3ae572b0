//! The probe and metrics HTTP server.
//!
//! Upstream compatibility: `/healthz` always answers 200 with the body `Active`
//! or `Not Active` (upstream `pkg/probes/probes.go`; charts use it as a liveness
//! probe), and `/metrics` serves the Prometheus text format. Nothing else is
//! served: upstream's accidental `/debug/pprof` exposure is not repeated.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::Shutdown;

/// Body of `/healthz` when the process is doing its job.
pub const HEALTH_ACTIVE: &str = "Active";
/// Body of `/healthz` otherwise (standby MIC, NMI before its first iptables sync).
pub const HEALTH_NOT_ACTIVE: &str = "Not Active";

/// Whether the process reports `Active`; cloneable, shared with the server.
#[derive(Clone, Debug, Default)]
pub struct Health(Arc<AtomicBool>);

impl Health {
    /// A health flag that starts as `Not Active`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the flag.
    pub fn set_active(&self, active: bool) {
        self.0.store(active, Ordering::Release);
    }

    /// Reads the flag.
    pub fn is_active(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What one admin listener serves.
#[derive(Clone, Debug, Default)]
pub struct AdminRoutes {
    /// Serve `/healthz` from this flag.
    pub health: Option<Health>,
    /// Serve `/metrics` from this registry.
    pub metrics: Option<prometheus::Registry>,
}

/// Slow or idle clients are cut off after this long without a full request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The next connection on `listener`, or `None` once `shutdown` starts. A
/// failed accept (out of file descriptors, say) is logged with `server`'s
/// name and retried after `retry`, so a server never stops on one.
pub async fn accept(
    listener: &TcpListener,
    shutdown: &Shutdown,
    server: &str,
    retry: Duration,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.signaled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(a) => return Some(a),
                Err(error) => {
                    tracing::warn!(%error, server, "accept failed; retrying");
                    tokio::time::sleep(retry).await;
                }
            },
        }
    }
}

/// Serves `routes` on `listener` until `shutdown`. Bind first (so a port clash is
/// reported at start-up by the caller), then hand the listener here.
pub async fn serve_admin(listener: TcpListener, routes: AdminRoutes, shutdown: Shutdown) {
    let routes = Arc::new(routes);
    while let Some((stream, _peer)) =
        accept(&listener, &shutdown, "admin", Duration::from_millis(100)).await
    {
        let routes = Arc::clone(&routes);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let routes = Arc::clone(&routes);
                async move { Ok::<_, Infallible>(handle(&routes, &req)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.signaled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}

/// Serves `/healthz` from `health` on `probe` and `/metrics` from `registry`
/// on `metrics` (two ports, as upstream), each in a task, until `shutdown`.
pub fn spawn_probe_and_metrics(
    probe: TcpListener,
    health: &Health,
    metrics: TcpListener,
    registry: &prometheus::Registry,
    shutdown: &Shutdown,
) {
    tokio::spawn(serve_admin(
        probe,
        AdminRoutes {
            health: Some(health.clone()),
            metrics: None,
        },
        shutdown.clone(),
    ));
    tokio::spawn(serve_admin(
        metrics,
        AdminRoutes {
            health: None,
            metrics: Some(registry.clone()),
        },
        shutdown.clone(),
    ));
}

fn handle(routes: &AdminRoutes, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        );
    }
    match (req.uri().path(), &routes.health, &routes.metrics) {
        ("/healthz", Some(health), _) => {
            let body = if health.is_active() {
                HEALTH_ACTIVE
            } else {
                HEALTH_NOT_ACTIVE
            };
            text(StatusCode::OK, body.into())
        }
        ("/metrics", _, Some(registry)) => {
            let mut buf = String::new();
            match prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut buf) {
                Ok(()) => {
                    let mut resp = text(StatusCode::OK, buf);
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    resp
                }
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding metrics: {e}\n"),
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn healthz_follows_the_flag_and_metrics_render() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Health::new();
        let registry = prometheus::Registry::new();
        let counter =
            prometheus::IntCounter::new("aadpodidentity_mic_cycle_count", "cycles").unwrap();
        registry.register(Box::new(counter.clone())).unwrap();
        counter.inc();
        let shutdown = Shutdown::new();
        let routes = AdminRoutes {
            health: Some(health.clone()),
            metrics: Some(registry),
        };
        let server = tokio::spawn(serve_admin(listener, routes, shutdown.clone()));

        let r = get(addr, "/healthz").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.ends_with("\r\n\r\nNot Active"), "{r}");
        health.set_active(true);
        assert!(get(addr, "/healthz").await.ends_with("\r\n\r\nActive"));

        let m = get(addr, "/metrics").await;
        assert!(m.contains("\naadpodidentity_mic_cycle_count 1\n"), "{m}");
        assert!(get(addr, "/debug/pprof/").await.starts_with("HTTP/1.1 404"));

        shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }
}
