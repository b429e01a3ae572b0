//! Open-loop benchmark of NMI's cached token path on one core: NMI's server
//! runs on a current-thread runtime in a thread pinned to CPU 0, the load
//! generator on another current-thread runtime pinned to CPU 1. Requests are
//! sent at a fixed rate on a schedule that does not wait for answers; each
//! latency is measured from the request's scheduled time, so a server that
//! falls behind shows it in the latencies (no coordinated omission).
//!
//! The index holds a node's worth of pods (110 with their
//! AzureAssignedIdentities, each bound to one of ten identities); every
//! request comes from one of them (127.0.0.1) and names the same resource,
//! so after the first one NMI answers from its token cache (the access check
//! still runs on every request).
//!
//! `cargo bench -p nmi --bench open_loop` (harness = false, never run under
//! `cargo test`). Environment: `OPEN_LOOP_RATES` (requests per second,
//! comma-separated; default `10000,20000,30000,40000,50000`),
//! `OPEN_LOOP_SECS` (seconds per rate, default 10), `OPEN_LOOP_CONNECTIONS`
//! (keep-alive connections the generator spreads requests over, default 256).
//! Bounded: every rate runs for its seconds plus at most 5 s to drain.
#![allow(
    clippy::unwrap_used,
    reason = "a benchmark driver stops at its first failure"
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

const NS: &str = "bench";
/// Pods on the node (the chart's 110-pod node).
const PODS: usize = 110;
/// Identities the pods are bound to.
const IDENTITIES: usize = 10;
/// How long a rate may take to drain after its last scheduled request.
const DRAIN: Duration = Duration::from_secs(5);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Pins the calling thread to `cpu` with `taskset` (best effort: says so
/// when it cannot).
fn pin(cpu: usize) {
    let ok = std::process::Command::new("taskset")
        .args(["-pc", &cpu.to_string(), &gettid().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("could not pin a thread to CPU {cpu}; running unpinned");
    }
}

/// Nanoseconds of CPU the thread `tid` of this process has run
/// (`/proc/self/task/<tid>/schedstat`).
fn thread_cpu_ns(tid: u64) -> u64 {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The calling thread's id (`/proc/thread-self` is `<pid>/task/<tid>`).
fn gettid() -> u64 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}

/// NMI's index and server over the emulator's IMDS at `imds`.
fn server(imds: SocketAddr) -> Arc<nmi::server::Server<nmi::token::Imds>> {
    let source = nmi::token::Imds::new(&format!("http://{imds}"), "bench").unwrap();
    let state = Arc::new(nmi::server::State::default());
    let ids: Vec<_> = (0..IDENTITIES)
        .map(|i| {
            common::identity(
                NS,
                &format!("id-{i}"),
                &client_id(i),
                &common::resource_id(&format!("id-{i}")),
            )
        })
        .collect();
    let bindings: Vec<_> = ids.iter().map(|i| common::binding(i, "sel")).collect();
    state.update(|index| {
        index.reset(&ids);
        index.reset(&bindings);
        let mut pods = Vec::new();
        let mut aais = Vec::new();
        for p in 0..PODS {
            let name = format!("pod-{p}");
            // Pod 0 is the caller; the others only fill the index.
            let ip = if p == 0 {
                "127.0.0.1".to_string()
            } else {
                format!("10.244.{}.{}", p / 250, p % 250 + 1)
            };
            pods.push(common::pod(&name, NS, "sel", &ip));
            let i = p % IDENTITIES;
            aais.push(common::assigned(&ids[i], &bindings[i], &name, NS));
        }
        index.reset_pods(&pods);
        index.reset(&aais);
    });
    let cache = nmi::token::TokenCache::new(source);
    let config = nmi::server::Config {
        limits: nmi::server::Limits {
            max_connections: 4096,
            max_connections_per_ip: 4096,
            ..Default::default()
        },
        ..common::config(imds)
    };
    Arc::new(common::server(state, cache, config))
}

fn client_id(i: usize) -> String {
    format!("aaaaaaaa-0000-4000-8000-{i:012}")
}

/// Starts the emulator and NMI in a thread pinned to CPU 0; returns NMI's
/// address and that thread's id.
fn start_nmi() -> (SocketAddr, u64) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        pin(0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let seeds = (0..IDENTITIES)
                .map(|i| common::identity_seed(&format!("id-{i}"), &client_id(i), None))
                .collect();
            let (_emu, imds) = common::emulator(seeds, false, |cfg| {
                cfg.aad.any_resource = true;
            })
            .await;
            let (addr, _stop) = common::serve(server(imds)).await;
            tx.send((addr, gettid())).unwrap();
            // Serves until the process ends.
            std::future::pending::<()>().await;
        });
    });
    rx.recv().unwrap()
}

/// One request on `sender`; whether it got a 200.
async fn one(sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>) -> bool {
    let req = common::token_request(common::ARM, "");
    match sender.send_request(req).await {
        Ok(resp) => {
            let ok = resp.status() == 200;
            ok && resp.into_body().collect().await.is_ok()
        }
        Err(_) => false,
    }
}

async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::task::spawn_local(conn);
    sender
}

/// What one rate gave.
struct Run {
    rate: u64,
    sent: usize,
    ok: usize,
    errors: usize,
    late: usize,
    wall: Duration,
    /// Sorted latencies from the scheduled send time.
    latencies: Vec<Duration>,
    nmi_cpu: Duration,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Sends `rate` requests per second for `secs` over `connections`
/// keep-alive connections: a dispatcher queues each request at its
/// scheduled time; a connection takes the next one as soon as it is free.
async fn run_rate(addr: SocketAddr, nmi_tid: u64, rate: u64, secs: u64, connections: usize) -> Run {
    let total = (rate * secs) as usize;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut workers = Vec::new();
    for _ in 0..connections {
        let mut sender = connect(addr).await;
        let rx = Arc::clone(&rx);
        workers.push(tokio::task::spawn_local(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            loop {
                let next = rx.lock().await.recv().await;
                let Some(scheduled) = next else { break };
                if one(&mut sender).await {
                    lat.push(scheduled.elapsed());
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let cpu_before = thread_cpu_ns(nmi_tid);
    let start = Instant::now() + Duration::from_millis(20);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut late = 0usize;
    for i in 0..total {
        let at = start + interval.mul_f64(i as f64);
        // The timer's resolution is a millisecond: sleep until just before
        // the time due, then yield (letting the connections run) until it.
        let early = at.checked_sub(Duration::from_millis(2));
        if let Some(early) = early.filter(|e| *e > Instant::now()) {
            tokio::time::sleep_until(early.into()).await;
        }
        while Instant::now() < at {
            tokio::task::yield_now().await;
        }
        if at.elapsed() > Duration::from_millis(1) {
            // The generator itself fell behind its schedule.
            late += 1;
        }
        tx.send(at).unwrap();
    }
    drop(tx);
    let deadline = tokio::time::Instant::now() + DRAIN;
    let mut latencies = Vec::with_capacity(total);
    let mut errors = 0;
    for w in workers {
        match tokio::time::timeout_at(deadline, w).await {
            Ok(Ok((l, e))) => {
                latencies.extend(l);
                errors += e;
            }
            _ => errors += 1,
        }
    }
    let wall = start.elapsed();
    let nmi_cpu = Duration::from_nanos(thread_cpu_ns(nmi_tid).saturating_sub(cpu_before));
    latencies.sort();
    Run {
        rate,
        sent: total,
        ok: latencies.len(),
        errors,
        late,
        wall,
        latencies,
        nmi_cpu,
    }
}

fn main() {
    let rates: Vec<u64> = std::env::var("OPEN_LOOP_RATES")
        .unwrap_or_else(|_| "10000,20000,30000,40000,50000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let secs: u64 = env_or("OPEN_LOOP_SECS", 10);
    let connections: usize = env_or("OPEN_LOOP_CONNECTIONS", 256);
    let (addr, nmi_tid) = start_nmi();
    pin(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        // Warm-up: fills the token cache.
        let mut s = connect(addr).await;
        assert!(one(&mut s).await, "warm-up token request failed");
        println!(
            "open loop, nmi on CPU 0 (current-thread runtime), generator on CPU 1, {connections} connections, {secs} s per rate, {PODS} pods in the index"
        );
        for rate in rates {
            let r = run_rate(addr, nmi_tid, rate, secs, connections).await;
            let achieved = r.ok as f64 / r.wall.as_secs_f64();
            let cpu_per_req_us = r.nmi_cpu.as_secs_f64() * 1e6 / r.ok.max(1) as f64;
            println!(
                "rate {:>6}/s  sent {:>7}  ok {:>7}  errors {:>4}  achieved {:>8.0}/s  p50 {:>9.3?}  p99 {:>9.3?}  p99.9 {:>9.3?}  max {:>9.3?}  nmi cpu {:>5.1} us/req ({:>4.0}% of a core)  generator late {}",
                r.rate,
                r.sent,
                r.ok,
                r.errors,
                achieved,
                pct(&r.latencies, 0.50),
                pct(&r.latencies, 0.99),
                pct(&r.latencies, 0.999),
                r.latencies.last().copied().unwrap_or_default(),
                cpu_per_req_us,
                r.nmi_cpu.as_secs_f64() * 100.0 / r.wall.as_secs_f64(),
                r.late,
            );
        }
    });
}
