//! NMI under hostile load, in process on loopback (no cluster, no root):
//! its token server over a fake IMDS, two pods on 127.0.0.2 ("busy") and
//! 127.0.0.3 ("quiet"). Connections over the caps are closed at once and
//! descriptors return to their resting count; declared bodies are refused at
//! once; slow and idle connections are cut; a pod asking for hundreds of
//! distinct resources does not delay the other pod's first token beyond the
//! stated bound; callers that go away free their IMDS queue entries and
//! calls; the cache stays within its bound and keeps no failed entry;
//! requests made before the first sync wait for it. Figures are printed.
//!
//! The tests count the process's descriptors, so they run one at a time.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: failing loudly is the point"
)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use aadpodid_api::{AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding};
use k8s_openapi::api::core::v1::Pod;
use nmi::token::testing::Fake;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const NS: &str = "team";
const BUSY_IP: &str = "127.0.0.2";
const QUIET_IP: &str = "127.0.0.3";

/// Pod `pod`'s identity `id-<pod>` (client ID `app-of-rid-<pod>`, as
/// [`Fake`] answers for resource ID `rid-<pod>`).
fn identity(pod: &str) -> AzureIdentity {
    common::identity(
        NS,
        &format!("id-{pod}"),
        &format!("app-of-rid-{pod}"),
        &format!("rid-{pod}"),
    )
}

/// The binding of `identity(pod)`, selecting `sel-<pod>`.
fn binding(pod: &str) -> AzureIdentityBinding {
    common::binding(&identity(pod), &format!("sel-{pod}"))
}

fn aai(pod: &str) -> AzureAssignedIdentity {
    common::assigned(&identity(pod), &binding(pod), pod, NS)
}

fn pod(name: &str, ip: &str) -> Pod {
    common::pod(name, NS, &format!("sel-{name}"), ip)
}

fn fill(state: &nmi::server::State) {
    state.update(|i| {
        i.apply_pod(&pod("busy", BUSY_IP));
        i.apply_pod(&pod("quiet", QUIET_IP));
        i.reset(&[identity("busy"), identity("quiet")]);
        i.reset(&[binding("busy"), binding("quiet")]);
        i.reset(&[aai("busy"), aai("quiet")]);
    });
}

struct Opts {
    delay: Option<Duration>,
    /// (concurrent, per second).
    imds_limits: (usize, u32),
    max_pending_per_pod: usize,
    max_cached_tokens: usize,
    limits: nmi::server::Limits,
    /// `None`: synced from the start.
    first_sync: Option<tokio::sync::watch::Receiver<bool>>,
    /// Fill the index before serving.
    filled: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            delay: Some(Duration::from_millis(20)),
            imds_limits: (5, 20),
            max_pending_per_pod: 16,
            max_cached_tokens: 4096,
            limits: Default::default(),
            first_sync: None,
            filled: true,
        }
    }
}

impl Opts {
    /// These options with NMI's limits changed by `change`.
    fn limits(mut self, change: impl FnOnce(&mut nmi::server::Limits)) -> Self {
        change(&mut self.limits);
        self
    }

    /// An empty index, its first sync done when `synced` says so.
    fn unsynced(synced: tokio::sync::watch::Receiver<bool>) -> Self {
        Opts {
            first_sync: Some(synced),
            filled: false,
            ..Default::default()
        }
    }
}

/// NMI's server as a test runs it; the test holds [`SERIAL`] while it lives.
struct Nmi {
    addr: SocketAddr,
    server: Arc<nmi::server::Server<Fake>>,
    _shutdown: aadpodid_runtime::Shutdown,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl Nmi {
    /// The fake IMDS behind NMI's cache.
    fn imds(&self) -> &Fake {
        self.server.cache.source()
    }

    /// Whether NMI's count of open connections becomes `n` within `within`.
    async fn connections_become(&self, n: i64, within: Duration) -> bool {
        eventually(within, || self.server.metrics.connections.get() == n).await
    }
}

/// Waits for the other tests of this file to end (they count the process's
/// descriptors), then starts NMI's server as `opts` say.
async fn start(opts: Opts) -> Nmi {
    let serial = SERIAL.lock().await;
    // Resources starting with `bad` are refused (IMDS's 400).
    let source = Fake {
        refused_prefix: Some("bad"),
        ..Fake::new(opts.delay, false)
    };
    let state = Arc::new(nmi::server::State::default());
    if opts.filled {
        fill(&state);
    }
    let cache = nmi::token::TokenCache::with_limits(source, opts.imds_limits.0, opts.imds_limits.1)
        .with_bounds(opts.max_pending_per_pod, opts.max_cached_tokens);
    // Nothing listens at 127.0.0.1:9: proxied requests are not what is tested.
    let config = nmi::server::Config {
        limits: opts.limits,
        ..common::config("127.0.0.1:9".parse().unwrap())
    };
    let mut server = common::server(state, cache, config);
    if let Some(rx) = opts.first_sync {
        server.first_sync = nmi::server::FirstSync::new(rx);
    }
    let server = Arc::new(server);
    let (addr, shutdown) = common::serve(Arc::clone(&server)).await;
    Nmi {
        addr,
        server,
        _shutdown: shutdown,
        _serial: serial,
    }
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Waits (bounded) until `f` holds; whether it did.
async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn connect_from(src: &str, addr: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(src.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    sock.connect(addr).await.unwrap()
}

fn token_target(resource: &str) -> String {
    format!("/metadata/identity/oauth2/token?api-version=2018-02-01&resource={resource}")
}

fn head(method: &str, target: &str, extra: &str) -> String {
    format!("{method} {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n{extra}\r\n")
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response (head, then `Content-Length` bytes of body).
async fn read_response(s: &mut TcpStream) -> Option<Resp> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let status = lines.next()?.get(9..12)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[end..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

async fn exchange(s: &mut TcpStream, request: &str) -> Option<Resp> {
    s.write_all(request.as_bytes()).await.ok()?;
    read_response(s).await
}

/// Whether the server closes `s` within `d` (reading and discarding
/// anything it still sends).
async fn closed_within(s: &mut TcpStream, d: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + d;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

async fn quiet_token(addr: SocketAddr, resource: &str) -> Resp {
    let mut s = connect_from(QUIET_IP, addr).await;
    exchange(&mut s, &head("GET", &token_target(resource), ""))
        .await
        .unwrap()
}

fn refused(nmi: &Nmi, family: &str, reason: &str) -> u64 {
    let m = &nmi.server.metrics;
    match family {
        "connections" => m.connections_refused.with_label_values(&[reason]).get(),
        _ => m.requests_refused.with_label_values(&[reason]).get(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_caps_are_closed_at_once_and_descriptors_return_to_baseline() {
    let nmi = start(Opts::default().limits(|l| {
        l.max_connections = 64;
        l.max_connections_per_ip = 8;
        l.header_read_timeout = Duration::from_secs(30);
    }))
    .await;
    // A first exchange so that lazily created runtime descriptors exist.
    assert_eq!(quiet_token(nmi.addr, "warm").await.status, 200);
    let baseline = fds();

    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(connect_from(BUSY_IP, nmi.addr).await);
    }
    assert!(nmi.connections_become(8, Duration::from_secs(5)).await);
    let started = Instant::now();
    for i in 0..20 {
        let mut s = connect_from(BUSY_IP, nmi.addr).await;
        assert!(
            closed_within(&mut s, Duration::from_secs(2)).await,
            "connection {i} over the per-address cap stays open"
        );
    }
    let refusing = started.elapsed();
    assert_eq!(refused(&nmi, "connections", "max_connections_per_ip"), 20);
    // Another address is still served.
    assert_eq!(quiet_token(nmi.addr, "r").await.status, 200);

    // The slow-body flood: connections that declare a 64 KiB body and
    // send none, each for another resource, from ten addresses.
    let mut flood = Vec::new();
    for a in 0..10u8 {
        for i in 0..30 {
            let src = format!("127.0.1.{a}");
            let mut s = connect_from(&src, nmi.addr).await;
            let _ = s
                .write_all(
                    head(
                        "GET",
                        &token_target(&format!("f{a}-{i}")),
                        "Content-Length: 65536\r\n",
                    )
                    .as_bytes(),
                )
                .await;
            flood.push(s);
        }
    }
    let peak_fds = fds();
    let peak_conns = nmi.server.metrics.connections.get();
    let mut answered_400 = 0;
    let mut closed = 0;
    for s in &mut flood {
        match tokio::time::timeout(Duration::from_secs(2), read_response(s)).await {
            Ok(Some(r)) => {
                assert_eq!(r.status, 400, "{r:?}");
                assert_eq!(r.header("connection"), Some("close"));
                answered_400 += 1;
            }
            Ok(None) => closed += 1,
            Err(_) => panic!("a flood connection is neither answered nor closed"),
        }
    }
    assert!(closed_within(&mut flood[0], Duration::from_secs(2)).await);
    drop(flood);
    drop(held);
    let settled = eventually(Duration::from_secs(5), || {
        fds() <= baseline && nmi.server.metrics.connections.get() == 0
    })
    .await;
    let after = fds();
    eprintln!(
        "descriptors: baseline {baseline}, flood peak {peak_fds} (client and server ends; {peak_conns} server connections open), after {after}; 20 refusals over the per-address cap in {refusing:?}; flood: {answered_400} answered 400, {closed} closed unanswered; refused: per address {}, total {}",
        refused(&nmi, "connections", "max_connections_per_ip"),
        refused(&nmi, "connections", "max_connections"),
    );
    assert!(
        peak_conns <= 64,
        "at most --max-connections open: {peak_conns}"
    );
    assert!(settled, "descriptors {after} > baseline {baseline}");
    assert_eq!(nmi.server.cache.pending_fetches(), (0, 0));
    assert_eq!(nmi.imds().live.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_body_gets_400_at_once_and_the_connection_closes() {
    let nmi = start(Opts {
        delay: None,
        ..Default::default()
    })
    .await;
    let cases = [
        (
            "token, Content-Length",
            head("GET", &token_target("r"), "Content-Length: 65536\r\n"),
        ),
        (
            "token, chunked",
            head("GET", &token_target("r"), "Transfer-Encoding: chunked\r\n"),
        ),
        (
            "host token",
            head(
                "GET",
                "/host/token/?resource=r",
                "podname: quiet\r\npodns: team\r\nContent-Length: 10\r\n",
            ),
        ),
        (
            "instance metadata",
            head(
                "GET",
                "/metadata/instance?api-version=2021-02-01",
                "Content-Length: 1\r\n",
            ),
        ),
    ];
    for (name, request) in cases {
        let mut s = connect_from(QUIET_IP, nmi.addr).await;
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(1), exchange(&mut s, &request))
            .await
            .unwrap_or_else(|_| panic!("{name}: no answer within 1 s"))
            .unwrap_or_else(|| panic!("{name}: closed without an answer"));
        assert_eq!(r.status, 400, "{name}: {r:?}");
        assert_eq!(r.header("connection"), Some("close"), "{name}");
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert!(
            v["error"].is_string() && v["error_description"].is_string(),
            "{name}: {v}"
        );
        assert!(
            closed_within(&mut s, Duration::from_secs(1)).await,
            "{name}: connection left open"
        );
        eprintln!("{name}: 400 in {:?}", started.elapsed());
    }
    assert_eq!(refused(&nmi, "requests", "body"), 4);
    assert_eq!(
        nmi.imds().live.load(Ordering::SeqCst),
        0,
        "IMDS never asked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_and_idle_keep_alive_connections_are_cut() {
    let timeout = Duration::from_millis(500);
    let nmi = start(Opts::default().limits(|l| l.header_read_timeout = timeout)).await;
    // A head that never ends.
    let mut slow = connect_from(QUIET_IP, nmi.addr).await;
    slow.write_all(b"GET /metadata/identity/oauth2/token HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // A connection that sends nothing.
    let mut silent = connect_from(QUIET_IP, nmi.addr).await;
    // A keep-alive connection that goes idle after one answer.
    let mut idle = connect_from(QUIET_IP, nmi.addr).await;
    let r = exchange(&mut idle, &head("GET", &token_target("r"), ""))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let started = Instant::now();
    for (name, s) in [
        ("slow head", &mut slow),
        ("silent", &mut silent),
        ("idle keep-alive", &mut idle),
    ] {
        assert!(
            closed_within(s, timeout * 6).await,
            "{name}: still open after {:?}",
            started.elapsed()
        );
        eprintln!("{name}: cut after {:?}", started.elapsed());
    }
    assert!(nmi.connections_become(0, Duration::from_secs(2)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_connection_takes_no_new_request() {
    let age = Duration::from_millis(400);
    let nmi = start(Opts::default().limits(|l| l.max_connection_age = age)).await;
    let mut s = connect_from(QUIET_IP, nmi.addr).await;
    let started = Instant::now();
    let mut answered = 0;
    let ended = loop {
        match exchange(&mut s, &head("GET", &token_target("r"), "")).await {
            Some(r) if r.header("connection") == Some("close") => {
                answered += 1;
                break started.elapsed();
            }
            Some(r) => {
                assert_eq!(r.status, 200, "{r:?}");
                answered += 1;
            }
            None => break started.elapsed(),
        }
        assert!(
            started.elapsed() < age * 10,
            "still serving after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "a busy keep-alive connection ended after {ended:?} and {answered} answers (age bound {age:?})"
    );
    assert!(ended >= age);
}

/// Starts `n` token requests from the busy pod, each for another resource,
/// each on its own connection; returns the connections' tasks.
fn busy_flood(
    addr: SocketAddr,
    n: usize,
    prefix: &str,
) -> Vec<tokio::task::JoinHandle<Option<Resp>>> {
    (0..n)
        .map(|i| {
            let target = token_target(&format!("{prefix}{i}"));
            tokio::spawn(async move {
                let mut s = connect_from(BUSY_IP, addr).await;
                exchange(&mut s, &head("GET", &target, "")).await
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_pod_does_not_delay_another_pods_first_token_and_its_abandoned_calls_are_dropped() {
    let call = Duration::from_millis(20);
    let nmi = start(
        Opts {
            delay: Some(call),
            max_pending_per_pod: 1000,
            max_cached_tokens: 50,
            ..Default::default()
        }
        .limits(|l| {
            l.max_connections = 1024;
            l.max_connections_per_ip = 600;
        }),
    )
    .await;
    assert_eq!(quiet_token(nmi.addr, "warm").await.status, 200);
    let baseline = fds();
    let flood = busy_flood(nmi.addr, 500, "r");
    assert!(
        eventually(Duration::from_secs(20), || nmi
            .server
            .cache
            .pending_fetches()
            .0
            >= 450)
        .await,
        "the busy pod's calls did not queue: {:?}",
        nmi.server.cache.pending_fetches()
    );
    let queued = nmi.server.cache.pending_fetches();
    let started = Instant::now();
    let r = quiet_token(nmi.addr, "first").await;
    let waited = started.elapsed();
    assert_eq!(r.status, 200, "{r:?}");
    // The stated bound (crate::fair): one IMDS call plus (concurrency + 1)
    // spacings of 52.5 ms.
    let bound = call + Duration::from_micros(52_500) * 6;
    let fifo = Duration::from_micros(52_500) * u32::try_from(queued.0).unwrap();
    eprintln!(
        "quiet pod's first token: {waited:?} behind {} queued and {} in-flight calls of the busy pod (stated bound {bound:?}; a FIFO queue would take about {fifo:?})",
        queued.0, queued.1
    );
    assert!(waited <= bound * 4, "{waited:?} > 4 × {bound:?}");
    let entries_during = nmi.server.cache.len();

    // The busy pod goes away: its waiting and running calls are dropped.
    for t in &flood {
        t.abort();
    }
    let completed = flood.len();
    for t in flood {
        let _ = t.await;
    }
    let drained = eventually(Duration::from_secs(5), || {
        nmi.server.cache.pending_fetches() == (0, 0) && nmi.imds().live.load(Ordering::SeqCst) == 0
    })
    .await;
    let calls = nmi.imds().calls.load(Ordering::SeqCst);
    assert!(
        drained,
        "queue {:?}, IMDS calls in progress {}",
        nmi.server.cache.pending_fetches(),
        nmi.imds().live.load(Ordering::SeqCst)
    );
    assert!(
        calls < 200,
        "{calls} IMDS calls made for {completed} requests abandoned after a moment"
    );
    let fds_settled = eventually(Duration::from_secs(5), || fds() <= baseline).await;
    let entries_after = nmi.server.cache.len();
    eprintln!(
        "after the busy pod left: {calls} IMDS calls made in all, cache entries {entries_during} during, {entries_after} after (bound 50), descriptors {} (baseline {baseline})",
        fds()
    );
    // Entries held by requests in progress are never evicted: the map holds
    // at most the bound plus one entry per request in progress.
    assert!(
        entries_during <= 50 + 500 + 1,
        "{entries_during} cache entries during the flood"
    );
    assert!(entries_after <= 50, "{entries_after} cache entries");
    assert!(fds_settled, "descriptors {} > {baseline}", fds());
    assert_eq!(nmi.server.metrics.connections.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_its_pending_bound_a_pod_gets_429_and_failed_fetches_leave_no_entry() {
    let nmi = start(Opts {
        delay: Some(Duration::from_millis(50)),
        imds_limits: (1, 20),
        max_pending_per_pod: 4,
        ..Default::default()
    })
    .await;
    let flood = busy_flood(nmi.addr, 20, "r");
    let mut statuses = Vec::new();
    for t in flood {
        let r = t.await.unwrap().unwrap();
        if r.status == 429 {
            let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
            assert!(secs >= 1, "{r:?}");
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            assert!(v["error"].is_string(), "{v}");
        }
        statuses.push(r.status);
    }
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    let served = statuses.iter().filter(|s| **s == 200).count();
    eprintln!("20 concurrent calls with 4 pending allowed: {served} served, {throttled} got 429");
    assert_eq!(served + throttled, 20, "{statuses:?}");
    assert!(throttled >= 10, "{statuses:?}");
    assert_eq!(
        refused(&nmi, "requests", "pending_fetches"),
        throttled as u64
    );
    let entries = nmi.server.cache.len();
    assert_eq!(entries, served, "only tokens are kept");
    // Refused by IMDS: nothing stays.
    for i in 0..10 {
        let r = quiet_token(nmi.addr, &format!("bad{i}")).await;
        assert_eq!(r.status, 403, "{r:?}");
    }
    assert_eq!(
        nmi.server.cache.len(),
        entries,
        "failed fetches left entries"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_the_first_sync_wait_for_it() {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let nmi =
        start(Opts::unsynced(rx).limits(|l| l.first_sync_wait = Duration::from_secs(10))).await;
    let addr = nmi.addr;
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        (quiet_token(addr, "r").await, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "answered before the sync");
    fill(&nmi.server.state);
    tx.send(true).unwrap();
    let (r, waited) = waiting.await.unwrap();
    eprintln!(
        "a request made before the sync: {} after {waited:?}",
        r.status
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(waited >= Duration::from_millis(500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_sync_in_time_the_request_gets_503_with_retry_after() {
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let nmi =
        start(Opts::unsynced(rx).limits(|l| l.first_sync_wait = Duration::from_millis(300))).await;
    let started = Instant::now();
    let r = quiet_token(nmi.addr, "r").await;
    let waited = started.elapsed();
    eprintln!("no sync: {} after {waited:?}", r.status);
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.header("retry-after").is_some(), "{r:?}");
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(3));
    assert_eq!(refused(&nmi, "requests", "first_sync"), 1);
}
