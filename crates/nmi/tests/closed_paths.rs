//! Closed paths, in process: NMI's server over the Azure emulator's IMDS on
//! loopback (no cluster, no root). The emulator's IMDS is lenient (it matches
//! paths ignoring case), so it plays an IMDS that might decode what NMI
//! forwards. Every hostile (method, path) gets NMI's own answer and never
//! appears in the emulator's request log; every allow-listed one does.
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

use azure_emulator::Emulator;
use nmi::request::ProxyPolicy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The emulator with the VM `node` and only its system-assigned identity.
async fn emulator() -> (Emulator, SocketAddr) {
    common::emulator(Vec::new(), true, |_| {}).await
}

struct Nmi {
    addr: SocketAddr,
    _shutdown: aadpodid_runtime::Shutdown,
}

async fn nmi(imds: SocketAddr, proxy: ProxyPolicy) -> Nmi {
    let source = nmi::token::Imds::new(&format!("http://{imds}"), "test").unwrap();
    let config = nmi::server::Config {
        proxy,
        ..common::config(imds)
    };
    let server = common::server(
        Arc::new(nmi::server::State::default()),
        nmi::token::TokenCache::new(source),
        config,
    );
    let (addr, shutdown) = common::serve(Arc::new(server)).await;
    Nmi {
        addr,
        _shutdown: shutdown,
    }
}

/// Sends `method target` as raw bytes (so any path reaches the server as
/// written) and returns (status, body).
async fn send(addr: SocketAddr, method: &str, target: &[u8]) -> (u16, String) {
    let mut req = Vec::new();
    req.extend_from_slice(method.as_bytes());
    req.push(b' ');
    req.extend_from_slice(target);
    req.extend_from_slice(
        b" HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(text.starts_with("HTTP/1.1 "), "{text:?}");
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The (method, uri) pairs IMDS has been asked, in order.
fn imds_log(emu: &Emulator) -> Vec<(String, String)> {
    emu.requests(0)
        .into_iter()
        .map(|r| (r.method, r.uri))
        .collect()
}

/// Sends `method target` to NMI at `addr` and checks that IMDS got exactly
/// that request, unchanged; returns NMI's status.
async fn forwarded(emu: &Emulator, addr: SocketAddr, method: &str, target: &str) -> u16 {
    let before = imds_log(emu).len();
    let (status, _) = send(addr, method, target.as_bytes()).await;
    assert_eq!(
        imds_log(emu).get(before..),
        Some(&[(method.to_string(), target.to_string())][..]),
        "{method} {target}: IMDS got exactly this request (status {status})"
    );
    status
}

/// Hostile requests: (method, raw target, expected status from NMI).
fn hostile() -> Vec<(&'static str, Vec<u8>, u16)> {
    // (method, NMI's status, targets).
    let groups: [(&'static str, u16, &[&str]); 5] = [
        (
            "GET",
            400,
            &[
                // CVE-2022-23551 class: encodings a lenient IMDS might decode.
                "/metadata/%u0069dentity/oauth2/token?resource=r",
                "/metadata/identity/oauth2/%2574oken?resource=r",
                "/metadata/identity/oauth2/to%E2%84%AAen?resource=r",
                "/metadata/%69dentity/oauth2/token?resource=r",
                "/metadata/%2e%2e/identity/oauth2/token?resource=r",
                "/metadata/instance/%2e%2e/%2e%2e/metadata/versions",
                "/metadata/instance/../versions",
                "/metadata/./instance?api-version=2021-02-01",
                "/metadata\\instance?api-version=2021-02-01",
                "/metadata/identity\\oauth2\\token?resource=r",
                "/metadata/identity%5Coauth2%5Ctoken?resource=r",
                "//metadata/instance?api-version=2021-02-01",
                "/metadata//versions",
                "/metadata/instance%00?api-version=2021-02-01",
                "/metadata/versions;x=y",
                "/metadata/instance;jsessionid=1?api-version=2021-02-01",
                "/metadata/v%C3%A9rsions",
                "/metadata/instanc%65?api-version=2021-02-01",
                // Token-like spellings NMI does not answer itself.
                "/metadata/Identity/oauth2/token?resource=r",
                "/metadata/identity/OAuth2/token?resource=r",
            ],
        ),
        (
            "GET",
            404,
            &[
                // Case variants of allowed paths: not canonical, not forwarded.
                "/METADATA/instance?api-version=2021-02-01",
                "/Metadata/versions",
                "/metadata/ScheduledEvents?api-version=2020-07-01",
                "/metadata/INSTANCE/compute?api-version=2021-02-01",
                // Unknown endpoints.
                "/metadata/loadbalancer?api-version=2020-10-01",
                "/metadata/identity/oauth3/token?resource=r",
                "/metadata",
                "/",
                "/whatever",
            ],
        ),
        // Methods.
        (
            "POST",
            405,
            &[
                "/metadata/scheduledevents?api-version=2020-07-01",
                "/metadata/attested/document?api-version=2020-09-01",
            ],
        ),
        (
            "PUT",
            405,
            &["/metadata/scheduledevents?api-version=2020-07-01"],
        ),
        (
            "DELETE",
            405,
            &["/metadata/instance?api-version=2021-02-01"],
        ),
    ];
    let mut all: Vec<_> = groups
        .iter()
        .flat_map(|(method, want, targets)| {
            targets
                .iter()
                .map(move |t| (*method, t.as_bytes().to_vec(), *want))
        })
        .collect();
    all.push(("HEAD", b"/metadata/versions".to_vec(), 405));
    all
}

/// Allowed requests: (method, target); each must reach IMDS unchanged.
const ALLOWED: &[(&str, &str)] = &[
    ("GET", "/metadata/instance?api-version=2021-02-01"),
    (
        "GET",
        "/metadata/instance/compute/name?api-version=2021-02-01&format=text",
    ),
    ("GET", "/metadata/versions"),
    ("GET", "/metadata/scheduledevents?api-version=2020-07-01"),
    ("GET", "/metadata/attested/document?api-version=2020-09-01"),
    ("GET", "/metadata/identity/info?api-version=2018-02-01"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_paths_never_reach_imds_and_allowed_ones_do() {
    let (emu, imds) = emulator().await;
    let nmi = nmi(imds, ProxyPolicy::default()).await;
    let mut failures = Vec::new();
    for (method, target, want) in hostile() {
        let before = imds_log(&emu);
        let (status, body) = send(nmi.addr, method, &target).await;
        let after = imds_log(&emu);
        let shown = String::from_utf8_lossy(&target).into_owned();
        if after != before {
            failures.push(format!(
                "{method} {shown}: reached IMDS ({:?})",
                &after[before.len()..]
            ));
        }
        if status != want {
            failures.push(format!("{method} {shown}: status {status}, want {want}"));
        }
        // NMI's own answer: its JSON error body (HEAD carries none).
        if method != "HEAD" {
            let v: serde_json::Value = serde_json::from_str(&body)
                .unwrap_or_else(|_| panic!("{method} {shown}: not JSON: {body:?}"));
            assert!(v.get("error").is_some(), "{method} {shown}: {v}");
        }
        println!("{method:6} {shown:70} -> {status} (IMDS not asked)");
    }
    assert!(failures.is_empty(), "{failures:#?}");

    for (method, target) in ALLOWED {
        let status = forwarded(&emu, nmi.addr, method, target).await;
        println!("{method:6} {target:70} -> {status} (forwarded)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flags_block_instance_metadata_and_open_scheduled_events_post() {
    let (emu, imds) = emulator().await;
    let nmi = nmi(
        imds,
        ProxyPolicy {
            block_instance_metadata: true,
            allow_scheduled_events_post: true,
            extra_paths: vec!["/metadata/loadbalancer".into()],
        },
    )
    .await;
    for target in [
        "/metadata/instance?api-version=2021-02-01",
        "/metadata/instance/compute?api-version=2021-02-01",
        "/Metadata/Instance?api-version=2021-02-01",
    ] {
        let before = imds_log(&emu);
        let (status, body) = send(nmi.addr, "GET", target.as_bytes()).await;
        assert_eq!(status, 403, "{target}: {body}");
        assert_eq!(imds_log(&emu), before, "{target} reached IMDS");
    }
    let target = "/metadata/scheduledevents?api-version=2020-07-01";
    forwarded(&emu, nmi.addr, "POST", target).await;
    // --proxy-allowed-paths: that path by GET, nothing else.
    let target = "/metadata/loadbalancer?api-version=2020-10-01";
    forwarded(&emu, nmi.addr, "GET", target).await;
    // Only those: other methods, spellings and paths stay closed.
    for (method, target) in [
        ("POST", "/metadata/loadbalancer"),
        ("GET", "/metadata/LoadBalancer"),
        ("GET", "/metadata/loadbalancer/%2e%2e/identity/oauth2/token"),
        ("PUT", "/metadata/scheduledevents"),
        ("POST", "/metadata/versions"),
        ("POST", "/metadata/%73cheduledevents"),
    ] {
        let before = imds_log(&emu);
        let (status, _) = send(nmi.addr, method, target.as_bytes()).await;
        assert!(
            matches!(status, 400 | 404 | 405),
            "{method} {target}: {status}"
        );
        assert_eq!(imds_log(&emu), before, "{method} {target} reached IMDS");
    }
}
