//! Fuzz-style robustness of request parsing, without extra tooling: bounded
//! loops over generated hostile inputs (random bytes, path tricks, huge and
//! duplicate parameters, odd headers) through the pure parsers and through the
//! real HTTP server on loopback. Each input must give a typed answer: no
//! panic, and never the token route for a path that a lenient server could
//! read as the token endpoint unless it is the canonical one
//! (CVE-2022-23551). Deterministic (fixed seeds), so a failure reproduces;
//! `crates/nmi/fuzz/` has a cargo-fuzz target for open-ended runs.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: failing loudly is the point"
)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use nmi::request::{self, MAX_QUERY_LEN, MAX_VALUE_LEN, Rejection, Route, Selector, TOKEN_PATH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// xorshift64*: small, deterministic, good enough to generate inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
}

const PATH_PIECES: &[&str] = &[
    "/", "//", "\\", "metadata", "Metadata", "METADATA", "identity", "Identity", "oauth2",
    "OAuth2", "token", "Token", "host", "instance", "..", ".", "%2F", "%2f", "%5C", "%5c", "%2E",
    "%2e%2e", "%69", "%25", "%252F", "%00", "?", "#", ";", "é", "\u{ff0f}", " ", "%", "%G1", "~",
    "*",
];

/// A path built from pieces that are close to the token path.
fn tricky_path(r: &mut Rng) -> String {
    let mut p = String::new();
    if r.below(8) != 0 {
        p.push('/');
    }
    for _ in 0..r.below(10) {
        p.push_str(r.pick(PATH_PIECES));
    }
    if r.below(4) == 0 {
        // A near-miss of the real path.
        let mut base: Vec<char> = TOKEN_PATH.chars().collect();
        let i = r.below(base.len());
        match r.below(4) {
            0 => base[i] = '\\',
            1 => base[i] = base[i].to_ascii_uppercase(),
            2 => base.insert(i, '/'),
            _ => base.insert(i, '.'),
        }
        p = base.into_iter().collect();
    }
    p
}

fn unhex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn percent_decode_once(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (unhex(b[i + 1]), unhex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the most lenient server could make of `path`: percent-decoded once,
/// backslashes as slashes, lower case, empty and dot segments resolved.
fn lenient(path: &str) -> String {
    let p = percent_decode_once(path)
        .replace('\\', "/")
        .to_ascii_lowercase();
    let mut segs: Vec<&str> = Vec::new();
    for s in p.split('/') {
        match s {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    format!("/{}", segs.join("/"))
}

fn check_route(path: &str) {
    let policies = [
        request::ProxyPolicy::default(),
        request::ProxyPolicy {
            block_instance_metadata: true,
            allow_scheduled_events_post: true,
            extra_paths: vec!["/metadata/loadbalancer".into()],
        },
    ];
    for policy in &policies {
        for method in [http::Method::GET, http::Method::POST, http::Method::PUT] {
            check_route_with(&method, path, policy);
        }
    }
}

fn check_route_with(method: &http::Method, path: &str, policy: &request::ProxyPolicy) {
    match request::route(method, path, policy) {
        Ok(Route::Token) => {
            let trimmed = path.strip_suffix('/').unwrap_or(path);
            assert!(
                trimmed.len() == TOKEN_PATH.len()
                    && trimmed[1..].split_once('/').map(|x| x.1)
                        == TOKEN_PATH[1..].split_once('/').map(|x| x.1),
                "non-canonical token route: {path:?}"
            );
        }
        Ok(Route::Proxy) => {
            // Only canonical paths reach IMDS: what the most lenient server
            // makes of it is the path itself (so never the token endpoint).
            let l = lenient(path);
            let trimmed = path.strip_suffix('/').unwrap_or(path);
            assert_eq!(l, trimmed, "proxied a non-canonical path: {path:?}");
            assert!(
                !l.contains("oauth2") && !l.contains("token"),
                "proxied a token path: {path:?}"
            );
            assert!(
                l.starts_with("/metadata/"),
                "proxied outside /metadata: {path:?}"
            );
            assert!(
                *method == http::Method::GET
                    || (*method == http::Method::POST && l == "/metadata/scheduledevents"),
                "proxied {method} {path:?}"
            );
        }
        Ok(Route::HostToken) => {
            assert!(path == "/host/token" || path == "/host/token/", "{path:?}")
        }
        Err(
            Rejection::InvalidPath
            | Rejection::BlockedInstanceMetadata
            | Rejection::PathNotAllowed
            | Rejection::MethodNotAllowed,
        ) => {}
        Err(other) => panic!("unexpected rejection {other:?} for path {path:?}"),
    }
}

fn check_query(q: &str) {
    match request::parse_token_query(Some(q)) {
        Ok(t) => {
            assert!(!t.resource.is_empty(), "{q:.200}");
            assert!(t.resource.len() <= MAX_VALUE_LEN, "{q:.200}");
            assert!(q.len() <= MAX_QUERY_LEN);
            if let Selector::ClientId(v) | Selector::ResourceId(v) | Selector::ObjectId(v) =
                &t.selector
            {
                assert!(!v.is_empty() && v.len() <= MAX_VALUE_LEN);
            }
        }
        Err(e) => {
            assert!(
                matches!(
                    e,
                    Rejection::EmptyResource
                        | Rejection::DuplicateParameter(_)
                        | Rejection::ConflictingSelectors
                        | Rejection::QueryTooLong
                ),
                "{e:?}"
            );
            assert_eq!(e.status(), 400);
            if q.len() > MAX_QUERY_LEN {
                assert_eq!(e, Rejection::QueryTooLong);
            }
        }
    }
}

const KEYS: &[&str] = &[
    "resource",
    "client_id",
    "msi_res_id",
    "mi_res_id",
    "object_id",
    "api-version",
    "bypass_cache",
    "authority",
    "RESOURCE",
    "resource%00",
    "res%6Furce",
    "",
    "=",
];

fn tricky_query(r: &mut Rng) -> String {
    let mut parts = Vec::new();
    for _ in 0..r.below(8) {
        let k = r.pick(KEYS);
        let v = match r.below(6) {
            0 => String::new(),
            1 => "x".repeat(r.below(3 * MAX_VALUE_LEN)),
            2 => String::from_utf8_lossy(&r.bytes(40)).into_owned(),
            3 => "%ZZ%%%2".into(),
            _ => "https%3A%2F%2Fmanagement.azure.com%2F".into(),
        };
        parts.push(format!("{k}={v}"));
    }
    if r.below(20) == 0 {
        // Many parameters.
        for i in 0..r.below(2000) {
            parts.push(format!("p{i}=v"));
        }
    }
    let sep = if r.below(10) == 0 { ";" } else { "&" };
    parts.join(sep)
}

#[test]
fn pure_parsers_survive_hostile_input() {
    let mut r = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..20_000 {
        let raw = String::from_utf8_lossy(&r.bytes(64)).into_owned();
        check_route(&raw);
        check_route(&tricky_path(&mut r));
        check_query(&raw);
        check_query(&tricky_query(&mut r));
    }
    // Regression cases, whatever the generator found.
    for p in [
        "/metadata/identity\\oauth2\\token",
        "/metadata/identity%5Coauth2%5Ctoken",
        "/metadata/identity/oauth2/token/..",
        "/x/../metadata/identity/oauth2/token",
        "/METADATA/IDENTITY/OAUTH2/TOKEN",
        "",
        "%",
        "/%",
        "/%2",
    ] {
        check_route(p);
    }
    // Huge query: refused before decoding.
    let q = format!("resource=r&{}", "a=b&".repeat(MAX_QUERY_LEN));
    assert_eq!(
        request::parse_token_query(Some(&q)),
        Err(Rejection::QueryTooLong)
    );
}

#[test]
fn header_checks_survive_hostile_input() {
    let mut r = Rng(42);
    for _ in 0..5_000 {
        let mut h = HeaderMap::new();
        let mut metadata_values = Vec::new();
        for _ in 0..r.below(4) {
            let v = match r.below(4) {
                0 => b"true".to_vec(),
                1 => b"TRUE".to_vec(),
                _ => r.bytes(16),
            };
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                metadata_values.push(v.as_bytes().to_vec());
                h.append("metadata", v);
            }
        }
        let want = metadata_values.len() == 1 && metadata_values[0] == b"true";
        assert_eq!(
            request::has_metadata_header(&h),
            want,
            "{metadata_values:?}"
        );
        if let Ok(v) = HeaderValue::from_bytes(&r.bytes(20)) {
            h.insert("podns", v);
        }
        let _ = request::host_pod_headers(&h);
    }
}

/// A token source that is never reached by these requests' happy path.
struct NoTokens;

impl nmi::token::TokenSource for NoTokens {
    async fn imds_token(
        &self,
        _identity: &nmi::token::ImdsIdentity,
        _resource: &str,
    ) -> Result<nmi::response::Token, nmi::token::TokenError> {
        Err(nmi::token::TokenError::Unavailable(
            "no IMDS in this test".into(),
        ))
    }
}

/// Sends `bytes` and reads until the server closes. With `half_close` the
/// write side is shut after sending (random bytes: the server must give up on
/// an incomplete request); otherwise the request asks for `Connection: close`.
async fn raw_exchange(addr: SocketAddr, bytes: Vec<u8>, half_close: bool) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before reading everything.
    let _ = s.write_all(&bytes).await;
    if half_close {
        let _ = s.shutdown().await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_answers_hostile_requests_and_stays_up() {
    let state = Arc::new(nmi::server::State::default());
    // Nothing listens here: proxied requests fail fast with 500.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let server = common::server(
        state,
        nmi::token::TokenCache::new(NoTokens),
        common::config(dead_addr),
    );
    let (addr, shutdown) = common::serve(Arc::new(server)).await;

    let mut r = Rng(7);
    let mut answered = 0;
    for batch in 0..16 {
        let mut set = tokio::task::JoinSet::new();
        for j in 0..25 {
            let i = batch * 25 + j;
            let (req, half_close): (Vec<u8>, bool) = match i % 4 {
                // Random bytes.
                0 => (r.bytes(512), true),
                // A request line with a tricky path and query, random headers.
                1 | 2 => {
                    let path = tricky_path(&mut r);
                    let q = tricky_query(&mut r);
                    let q = &q[..q.len().min(20_000)];
                    let md = if r.below(2) == 0 {
                        "Metadata: true\r\n"
                    } else {
                        ""
                    };
                    let junk = String::from_utf8_lossy(&r.bytes(30)).replace(['\r', '\n'], "");
                    (
                        format!("GET {path}?{q} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{md}X-J: {junk}\r\n\r\n")
                            .into_bytes(),
                        false,
                    )
                }
                // Huge or duplicated headers.
                _ => {
                    let n = r.below(200_000);
                    (
                        format!(
                            "GET /metadata/identity/oauth2/token?resource=r HTTP/1.1\r\nHost: x\r\nConnection: close\r\nMetadata: true\r\nMetadata: true\r\nX-Big: {}\r\n\r\n",
                            "a".repeat(n)
                        )
                        .into_bytes(),
                        false,
                    )
                }
            };
            set.spawn(async move { (i, raw_exchange(addr, req, half_close).await) });
        }
        while let Some(done) = set.join_next().await {
            let (i, resp) = done.unwrap();
            if resp.is_empty() {
                // Closed without an answer (an incomplete random request).
                assert_eq!(i % 4, 0, "request {i} got no answer");
                continue;
            }
            answered += 1;
            let head = String::from_utf8_lossy(&resp[..resp.len().min(64)]).into_owned();
            assert!(head.starts_with("HTTP/1.1 "), "request {i}: {head:?}");
            let status: u16 = head[9..12].parse().unwrap();
            assert!(
                matches!(status, 400 | 403 | 404 | 405 | 413 | 414 | 431 | 500 | 503),
                "request {i}: status {status}"
            );
            // No token, ever.
            assert!(!String::from_utf8_lossy(&resp).contains("access_token"));
        }
    }
    assert!(answered >= 300, "only {answered} of 400 answered");
    // Still serving: a well-formed request without the header gets the fast 400.
    let resp = raw_exchange(
        addr,
        b"GET /metadata/identity/oauth2/token?resource=r HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        false,
    )
    .await;
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(
        text.contains("Required metadata header not specified"),
        "{text}"
    );
    shutdown.trigger();
}
