//! A minimal HTTP/1.1 client for plain-HTTP IMDS (and, over TLS, AAD): one connection per request
//! (IMDS is link-local and cheap to reach; no pool to go stale), bounded in
//! time and in response size.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// Largest response body accepted from IMDS.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Why a request to IMDS failed without an HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// TCP connect failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// HTTP exchange failed.
    #[error("exchanging with {addr}: {source}")]
    Exchange {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: hyper::Error,
    },
    /// The body was too large or broken.
    #[error("reading the response body from {addr}: {message}")]
    Body {
        /// Where.
        addr: SocketAddr,
        /// Why.
        message: String,
    },
    /// No full answer in time.
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout {
        /// Where.
        addr: SocketAddr,
        /// The budget.
        timeout: Duration,
    },
}

/// Sends `req` to `addr` and reads the whole response within `timeout`.
pub async fn send(
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<Response<Bytes>, SendError> {
    tokio::time::timeout(timeout, send_inner(addr, req))
        .await
        .unwrap_or(Err(SendError::Timeout { addr, timeout }))
}

async fn send_inner(
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
) -> Result<Response<Bytes>, SendError> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| SendError::Connect { addr, source })?;
    exchange(stream, addr, req).await
}

/// Sends `req` over TLS to the host and port of `uri` (an `https` URL), trusting
/// what `tls` trusts, and reads the whole response within `timeout`.
pub async fn send_tls(
    uri: &http::Uri,
    tls: std::sync::Arc<rustls::ClientConfig>,
    req: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<Response<Bytes>, SendError> {
    let host = uri
        .host()
        .unwrap_or("")
        .trim_matches(|c| c == '[' || c == ']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let unspecified = SocketAddr::from(([0, 0, 0, 0], port));
    let work = async {
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|source| SendError::Connect {
                addr: unspecified,
                source,
            })?
            .next()
            .ok_or_else(|| SendError::Connect {
                addr: unspecified,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{host}: no address"),
                ),
            })?;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| SendError::Connect { addr, source })?;
        let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| {
            SendError::Connect {
                addr,
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            }
        })?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|source| SendError::Connect { addr, source })?;
        exchange(stream, addr, req).await
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(SendError::Timeout {
            addr: unspecified,
            timeout,
        }))
}

async fn exchange<IO>(
    stream: IO,
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
) -> Result<Response<Bytes>, SendError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| SendError::Exchange { addr, source })?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender
        .send_request(req)
        .await
        .map_err(|source| SendError::Exchange { addr, source });
    let out = match resp {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            match Limited::new(body, MAX_RESPONSE_BYTES).collect().await {
                Ok(b) => Ok(Response::from_parts(parts, b.to_bytes())),
                Err(e) => Err(SendError::Body {
                    addr,
                    message: e.to_string(),
                }),
            }
        }
        Err(e) => Err(e),
    };
    driver.abort();
    out
}
