//! The roles the bench binary plays when re-executed with
//! [`ROLE_ENV`](super::ROLE_ENV): `mic` and `nmi` (exactly the commands),
//! `relay` (inside a node namespace: TCP listeners forwarded to Unix sockets
//! of the bench process), `load` (inside a pod namespace: concurrent IMDS
//! token clients, prints one JSON line) and `flood` (inside a pod namespace:
//! one of the floods of [`aadpodid_testkit::flood`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aadpodid_testkit::relay::tcp_to_unix;
use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

/// Runs role `role` of this process; argv holds the role's own arguments.
pub fn run(role: &str) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match role {
        "mic" => rt.block_on(mic::cli_main()),
        "nmi" => rt.block_on(nmi::cli_main()),
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

/// What the load role does.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LoadSpec {
    /// `ip:port` of IMDS as the pod sees it (169.254.169.254:80).
    pub target: SocketAddr,
    /// Path and query of the token request.
    pub path: String,
    /// Concurrent keep-alive connections.
    pub clients: usize,
    /// Requests per client (a bound).
    pub requests: usize,
    /// Wall-time bound for the whole run.
    pub max: Duration,
}

/// What the load role measured.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LoadResult {
    /// Requests answered 200.
    pub ok: u64,
    /// Other answers and I/O errors.
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    /// Wall time of the whole run.
    pub seconds: f64,
}

async fn load(spec: LoadSpec) -> anyhow::Result<LoadResult> {
    let started = Instant::now();
    let deadline = started + spec.max;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..spec.clients {
        let spec = spec.clone();
        set.spawn(async move { one_client(&spec, deadline).await });
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    while let Some(r) = set.join_next().await {
        let (l, e) = r?;
        lat.extend(l);
        errors += e;
    }
    let seconds = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: usize| {
        lat.get((lat.len() * p / 100).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Ok(LoadResult {
        ok: lat.len() as u64,
        errors,
        p50_us: pct(50),
        p99_us: pct(99),
        seconds,
    })
}

/// One keep-alive client: (latencies of 200 answers in µs, errors).
async fn one_client(spec: &LoadSpec, deadline: Instant) -> (Vec<u64>, u64) {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nMetadata: true\r\n\r\n",
        spec.path,
        spec.target.ip()
    );
    let mut lat = Vec::with_capacity(spec.requests);
    let mut errors = 0;
    let mut conn: Option<BufReader<TcpStream>> = None;
    for _ in 0..spec.requests {
        if Instant::now() >= deadline {
            break;
        }
        let t = Instant::now();
        let once = async {
            let stream = match conn.take() {
                Some(c) => c,
                None => BufReader::new(TcpStream::connect(spec.target).await?),
            };
            exchange(stream, request.as_bytes()).await
        };
        match tokio::time::timeout(Duration::from_secs(30), once).await {
            Ok(Ok((status, keep))) => {
                if status == 200 {
                    lat.push(t.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
                conn = keep;
            }
            _ => errors += 1,
        }
    }
    (lat, errors)
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
