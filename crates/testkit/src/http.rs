//! A plain HTTP/1.1 GET on loopback, for the probe and metrics servers of the
//! processes under test.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Bound on one whole exchange (connect, request, answer).
const BOUND: Duration = Duration::from_secs(10);

/// GETs `path` on `addr` (at most 10 s, `Connection: close`); the body of the
/// answer, whatever its status.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(request(addr, path).as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        anyhow::Ok(body(&String::from_utf8_lossy(&out)).to_string())
    };
    tokio::time::timeout(BOUND, exchange)
        .await
        .with_context(|| format!("GET {path} on {addr}: no answer within {BOUND:?}"))?
        .with_context(|| format!("GET {path} on {addr}"))
}

fn request(addr: SocketAddr, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
}

/// What follows the head of an HTTP answer (empty when there is no head).
fn body(answer: &str) -> &str {
    answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_follows_the_first_blank_line() {
        for (answer, want) in [
            ("HTTP/1.1 200 OK\r\nA: b\r\n\r\nActive", "Active"),
            ("HTTP/1.1 200 OK\r\n\r\na\r\n\r\nb", "a\r\n\r\nb"),
            ("HTTP/1.1 200 OK\r\n\r\n", ""),
            ("", ""),
        ] {
            assert_eq!(body(answer), want, "{answer:?}");
        }
    }

    #[tokio::test]
    async fn gets_a_body_and_fails_where_nothing_listens() -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await?;
            let mut head = vec![0u8; 1024];
            let n = s.read(&mut head).await?;
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await?;
            anyhow::Ok(String::from_utf8_lossy(&head[..n]).into_owned())
        });
        assert_eq!(http_get(addr, "/healthz").await?, "ok");
        assert_eq!(server.await??, request(addr, "/healthz"));
        assert!(http_get(addr, "/healthz").await.is_err());
        Ok(())
    }
}
