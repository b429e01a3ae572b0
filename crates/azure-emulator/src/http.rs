//! The HTTP(S) accept loop shared by ARM, AAD, IMDS and admin, and small
//! request/response helpers.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

pub type Resp = Response<Full<Bytes>>;
pub type BoxFuture = Pin<Box<dyn Future<Output = Resp> + Send>>;
/// A request handler: the request and the peer address.
pub type HandlerFn = Arc<dyn Fn(Request<Incoming>, SocketAddr) -> BoxFuture + Send + Sync>;

/// Accepts connections until `shutdown` flips, serving HTTP/1.1 (over TLS when
/// `tls` is set). Each connection is dropped on shutdown, which also ends
/// requests held by a hang fault.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: HandlerFn,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let tls = tls.clone();
        let mut sd = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let h = handler.clone();
                async move { Ok::<_, Infallible>(h(req, peer).await) }
            });
            let builder = http1::Builder::new();
            match tls {
                Some(acceptor) => {
                    let hs = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream));
                    let Ok(Ok(stream)) = hs.await else { return };
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    tokio::select! { _ = conn => {}, _ = sd.changed() => {} }
                }
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    tokio::select! { _ = conn => {}, _ = sd.changed() => {} }
                }
            }
        });
    }
}

#[derive(Debug)]
pub enum BodyError {
    TooLarge,
    Read,
}

/// Reads the whole body, refusing more than `limit` bytes.
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<(Parts, Bytes), BodyError> {
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge);
    }
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok((parts, c.to_bytes())),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(BodyError::TooLarge)
        }
        Err(_) => Err(BodyError::Read),
    }
}

/// Form-urlencoded pairs (`+` is a space: Go and Rust clients encode spaces so).
pub fn form_pairs(text: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(text.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

pub fn first<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Query parameter lookup with ARM's case-insensitive names.
pub fn first_ci<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

pub fn header<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts.headers.get(name).and_then(|v| v.to_str().ok())
}

/// Media type of `Content-Type`, lower-cased, parameters dropped.
pub fn media_type(parts: &Parts) -> Option<String> {
    header(parts, CONTENT_TYPE.as_str()).map(|v| {
        v.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    })
}

pub fn response(
    status: u16,
    content_type: &str,
    body: impl Into<Bytes>,
    headers: &[(String, String)],
) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if !content_type.is_empty() {
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_str(content_type)
                .unwrap_or(HeaderValue::from_static("application/octet-stream")),
        );
    }
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            r.headers_mut().append(k, v);
        }
    }
    r
}

pub fn json(status: u16, body: &Value, headers: &[(String, String)]) -> Resp {
    response(
        status,
        "application/json; charset=utf-8",
        body.to_string(),
        headers,
    )
}

/// Serializes a typed body (field order kept, which matters for AAD v1).
pub fn json_typed<T: serde::Serialize>(
    status: u16,
    body: &T,
    headers: &[(String, String)],
) -> Resp {
    match serde_json::to_string(body) {
        Ok(s) => response(status, "application/json; charset=utf-8", s, headers),
        Err(_) => response(500, "text/plain", "serialization failed", &[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding_treats_plus_as_space_and_keeps_duplicates() {
        let p = form_pairs("resource=https%3A%2F%2Fmanagement.azure.com%2F&a=b+c&a=d");
        assert_eq!(first(&p, "resource"), Some("https://management.azure.com/"));
        assert_eq!(first(&p, "a"), Some("b c"));
        assert_eq!(p.len(), 3);
        assert_eq!(
            first_ci(&p, "RESOURCE"),
            Some("https://management.azure.com/")
        );
    }
}
