//! The roles the bench binary plays when re-executed with
//! [`ROLE_ENV`](super::ROLE_ENV): `relay` (inside a node namespace: TCP
//! listeners forwarded to Unix sockets of the bench process), `load`
//! (inside a pod namespace, on one core: IMDS token requests at a fixed
//! rate, open loop; prints one JSON line) and `flood` (inside a pod
//! namespace: one of the floods of [`aadpodid_testkit::flood`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aadpodid_testkit::relay::tcp_to_unix;
use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

/// Runs role `role` of this process; argv holds the role's own arguments.
pub fn run(role: &str) -> anyhow::Result<()> {
    // The load generator runs on one core: one thread.
    let rt = if role == "load" {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    };
    match role {
        "relay" => rt.block_on(relay(std::env::args().skip(1).collect())),
        "load" => {
            let args: Vec<String> = std::env::args().skip(1).collect();
            let spec: LoadSpec = serde_json::from_str(args.first().map_or("", |s| s.as_str()))
                .context("load: the first argument is the JSON LoadSpec")?;
            let out = rt.block_on(load(spec))?;
            println!("{}", serde_json::to_string(&out)?);
            Ok(())
        }
        // Its plan is in the environment; it runs its own runtime.
        "flood" => aadpodid_testkit::flood::child_main(),
        other => bail!("unknown bench role {other:?}"),
    }
}

/// `addr=unix-path` pairs: listens on each TCP `addr` (inside the namespace
/// this runs in) and carries every connection to the Unix socket.
async fn relay(specs: Vec<String>) -> anyhow::Result<()> {
    for spec in specs {
        let (addr, path) = spec
            .split_once('=')
            .with_context(|| format!("relay spec {spec:?}"))?;
        let addr: SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
        tcp_to_unix(addr, PathBuf::from(path)).await?;
    }
    println!("READY");
    // Runs until killed (the bench kills it; pdeathsig covers a crash).
    std::future::pending::<()>().await;
    Ok(())
}

/// What the load role does: an open-loop generator. Request `i` is due at
/// `start + i / rate`; a free connection takes the next due request, waits
/// for its time and sends it; latency counts from the time it was due, so a
/// slow answer delays the requests behind it in the figures too (no
/// coordinated omission). The connections bound the requests in flight.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LoadSpec {
    /// `ip:port` of IMDS as the pod sees it (169.254.169.254:80).
    pub target: SocketAddr,
    /// Path and query of the token request.
    pub path: String,
    /// Requests per second.
    pub rate: f64,
    /// How long requests are sent.
    pub duration: Duration,
    /// Keep-alive connections, opened before the first request is due.
    pub connections: usize,
    /// Bound on one request (an error past it; the connection is reopened).
    pub timeout: Duration,
}

/// What the load role measured.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct LoadResult {
    /// Requests due in the run (`rate` × `duration`).
    pub due: u64,
    /// Requests answered 200.
    pub ok: u64,
    /// Other answers, I/O errors and timeouts.
    pub errors: u64,
    /// Due requests not answered when the run ended (duration plus one
    /// timeout).
    pub unfinished: u64,
    /// Latency from the time due to the answer, of the 200 answers, µs.
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// p99 of how late requests were sent after they were due, µs: the
    /// generator's own delay (no free connection, or its core busy).
    pub send_lag_p99_us: u64,
    /// 200 answers per second from the first due time to the last answer
    /// (at least `duration`).
    pub achieved: f64,
    /// That span, seconds.
    pub seconds: f64,
}

impl LoadResult {
    /// Whether the rate was sustained: every request answered 200, the
    /// achieved rate at least 95 % of the rate asked, and p99 at most
    /// `p99_bound` (a generator falling behind makes latencies grow without
    /// bound, since they count from the time due).
    pub fn sustained(&self, rate: f64, p99_bound: Duration) -> bool {
        self.errors == 0
            && self.unfinished == 0
            && self.ok == self.due
            && self.achieved >= 0.95 * rate
            && self.p99_us <= p99_bound.as_micros() as u64
    }
}

/// What one connection of the generator saw.
#[derive(Debug, Default)]
struct Lane {
    latencies: Vec<u32>,
    lags: Vec<u32>,
    errors: u64,
    unfinished: u64,
    last_answer: Option<Instant>,
}

async fn load(spec: LoadSpec) -> anyhow::Result<LoadResult> {
    if !(spec.rate > 0.0 && spec.rate.is_finite()) || spec.connections == 0 {
        bail!(
            "load: rate {} with {} connections",
            spec.rate,
            spec.connections
        );
    }
    let due = (spec.rate * spec.duration.as_secs_f64()).round() as u64;
    let mut conns = Vec::with_capacity(spec.connections);
    for _ in 0..spec.connections {
        let c = tokio::time::timeout(spec.timeout, TcpStream::connect(spec.target)).await;
        conns.push(c.ok().and_then(Result::ok).map(BufReader::new));
    }
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + spec.duration + spec.timeout;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for conn in conns {
        let (spec, next) = (spec.clone(), next.clone());
        set.spawn(async move { lane(&spec, conn, &next, due, start, end).await });
    }
    let mut all = Lane::default();
    while let Some(l) = set.join_next().await {
        let l = l?;
        all.latencies.extend(l.latencies);
        all.lags.extend(l.lags);
        all.errors += l.errors;
        all.unfinished += l.unfinished;
        all.last_answer = all.last_answer.max(l.last_answer);
    }
    all.latencies.sort_unstable();
    all.lags.sort_unstable();
    let pct = |v: &[u32], p: f64| {
        v.get(crate::stats::rank(v.len(), p))
            .map_or(0, |x| u64::from(*x))
    };
    let span = all
        .last_answer
        .map_or(Duration::ZERO, |t| t.saturating_duration_since(start))
        .max(spec.duration);
    let ok = all.latencies.len() as u64;
    Ok(LoadResult {
        due,
        ok,
        errors: all.errors,
        unfinished: all.unfinished,
        p50_us: pct(&all.latencies, 50.0),
        p99_us: pct(&all.latencies, 99.0),
        max_us: all.latencies.last().map_or(0, |x| u64::from(*x)),
        send_lag_p99_us: pct(&all.lags, 99.0),
        achieved: ok as f64 / span.as_secs_f64(),
        seconds: span.as_secs_f64(),
    })
}

/// One keep-alive connection taking due requests until none is left.
async fn lane(
    spec: &LoadSpec,
    mut conn: Option<BufReader<TcpStream>>,
    next: &std::sync::atomic::AtomicU64,
    due: u64,
    start: Instant,
    end: Instant,
) -> Lane {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nMetadata: true\r\n\r\n",
        spec.path,
        spec.target.ip()
    );
    let micros = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
    let mut lane = Lane::default();
    loop {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if i >= due {
            return lane;
        }
        let at = start + Duration::from_secs_f64(i as f64 / spec.rate);
        let now = Instant::now();
        if now >= end {
            lane.unfinished += 1;
            continue;
        }
        wait_until(at).await;
        let sent = Instant::now();
        lane.lags.push(micros(sent - at));
        let once = async {
            let stream = match conn.take() {
                Some(c) => c,
                None => BufReader::new(TcpStream::connect(spec.target).await?),
            };
            exchange(stream, request.as_bytes()).await
        };
        let bound = spec.timeout.min(end.saturating_duration_since(sent));
        match tokio::time::timeout(bound, once).await {
            Ok(Ok((status, keep))) => {
                let done = Instant::now();
                if status == 200 {
                    lane.latencies.push(micros(done - at));
                    lane.last_answer = Some(done);
                } else {
                    lane.errors += 1;
                }
                conn = keep;
            }
            Ok(Err(_)) => lane.errors += 1,
            Err(_) if Instant::now() >= end => lane.unfinished += 1,
            Err(_) => lane.errors += 1,
        }
    }
}

/// Waits until `at`: a timer until shortly before, then yielding in a
/// loop, since timers here fire on millisecond ticks and the generator has
/// its core to itself.
async fn wait_until(at: Instant) {
    let early = Duration::from_micros(1500);
    if let Some(left) = at.checked_duration_since(Instant::now())
        && left > early
    {
        tokio::time::sleep_until((at - early).into()).await;
    }
    while Instant::now() < at {
        tokio::task::yield_now().await;
    }
}

/// Sends one request and reads one response (Content-Length bodies);
/// returns the status and the connection when it may be reused.
async fn exchange(
    mut c: BufReader<TcpStream>,
    request: &[u8],
) -> anyhow::Result<(u16, Option<BufReader<TcpStream>>)> {
    c.get_mut().write_all(request).await?;
    let mut line = String::new();
    c.read_line(&mut line).await?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .context("status line")?
        .parse()?;
    let mut length = None;
    let mut close = false;
    loop {
        line.clear();
        if c.read_line(&mut line).await? == 0 {
            bail!("connection closed in the head");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                length = Some(v.parse::<usize>()?);
            } else if k == "connection" && v.eq_ignore_ascii_case("close") {
                close = true;
            }
        }
    }
    let length = length.context("no Content-Length")?;
    let mut body = vec![0; length];
    c.read_exact(&mut body).await?;
    Ok((status, (!close).then_some(c)))
}
