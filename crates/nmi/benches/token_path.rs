//! Token-path benchmark: latency p50/p99 and throughput of NMI's token
//! endpoint at 1 and 64 concurrent clients, cached and uncached, against the
//! Azure emulator's IMDS, everything in-process on loopback. Bounded counts;
//! runs only with `cargo bench -p nmi --bench token_path` (harness = false),
//! never under `cargo test`.
//!
//! Cases:
//! - cached: every request names the same resource; after the first, NMI
//!   answers from its cache (the access check still runs on every request).
//! - uncached, IMDS limits: a new resource per request, so every request goes
//!   to IMDS through NMI's client-side limiter (5 concurrent, 20/s per VM, as
//!   IMDS allows): throughput is capped at 20/s by design.
//! - uncached, no limiter: the same with the limiter (and the emulator's
//!   throttling) lifted, showing NMI's plus the emulator's own cost per miss.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "benchmark driver: failing loudly is the point"
)]

// The integration tests' scaffold (server, loopback serve, emulator).
#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aadpodid_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec,
    AzureIdentitySpec,
};
use azure_emulator::Emulator;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;

const CLIENT: &str = "aaaaaaaa-0000-4000-8000-00000000000a";
const NS: &str = "bench";
const POD: &str = "app";

fn pod() -> Pod {
    common::pod(POD, NS, "a", "127.0.0.1")
}

/// The live identity and binding, and the AzureAssignedIdentity MIC writes
/// for them (NMI checks the one against the others).
fn objects() -> (AzureIdentity, AzureIdentityBinding, AzureAssignedIdentity) {
    let mut id = AzureIdentity::new(
        "id-a",
        AzureIdentitySpec {
            client_id: CLIENT.into(),
            resource_id: "/subscriptions/00000000-0000-0000-0000-0000000000aa/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-a".into(),
            ..Default::default()
        },
    );
    id.metadata.namespace = Some(NS.into());
    id.metadata.uid = Some("uid-id-a".into());
    let mut binding = AzureIdentityBinding::new(
        "bind-a",
        AzureIdentityBindingSpec {
            azure_identity: "id-a".into(),
            selector: "a".into(),
            ..Default::default()
        },
    );
    binding.metadata.namespace = Some(NS.into());
    binding.metadata.uid = Some("uid-bind-a".into());
    let aai = common::assigned(&id, &binding, POD, NS);
    (id, binding, aai)
}

/// The emulator with the VM `node` holding `id-a`, tokens for any
/// resource, and (when `unthrottled`) IMDS's limits lifted.
async fn emulator(unthrottled: bool) -> (Emulator, SocketAddr) {
    let id_a = common::identity_seed("id-a", CLIENT, None);
    common::emulator(vec![id_a], false, |cfg| {
        cfg.aad.any_resource = true;
        if unthrottled {
            cfg.imds.token_requests_per_second = 1_000_000;
            cfg.imds.token_concurrency = 10_000;
        }
    })
    .await
}

/// Starts NMI's token server over the emulator's IMDS; returns its address.
async fn nmi(imds: SocketAddr, limits: (usize, u32)) -> (SocketAddr, aadpodid_runtime::Shutdown) {
    let source = nmi::token::Imds::new(&format!("http://{imds}"), "bench").unwrap();
    let state = Arc::new(nmi::server::State::default());
    let (id, binding, aai) = objects();
    state.update(|i| {
        i.apply_pod(&pod());
        i.reset(&[id]);
        i.reset(&[binding]);
        i.apply(&aai);
    });
    // One pod plays every client: its queue and connection bounds are
    // lifted (a real node bounds them per pod and per address).
    let cache = nmi::token::TokenCache::with_limits(source, limits.0, limits.1)
        .with_bounds(1024, nmi::token::DEFAULT_MAX_CACHED_TOKENS);
    let config = nmi::server::Config {
        retry_attempts_for_created: 16,
        retry_attempts_for_assigned: 4,
        retry_interval_secs: 5,
        limits: nmi::server::Limits {
            max_connections_per_ip: 1024,
            ..Default::default()
        },
        ..common::config(imds)
    };
    let (addr, shutdown) = common::serve(Arc::new(common::server(state, cache, config))).await;
    (addr, shutdown)
}

/// One client: a keep-alive connection sending `n` requests; returns latencies.
async fn client(
    addr: SocketAddr,
    n: usize,
    resource: Arc<dyn Fn(usize) -> String + Send + Sync>,
    seq: Arc<AtomicUsize>,
) -> Vec<Duration> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let r = resource(seq.fetch_add(1, Ordering::Relaxed));
        let q: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("api-version", "2018-02-01")
            .append_pair("resource", &r)
            .finish();
        let req = http::Request::get(format!("/metadata/identity/oauth2/token?{q}"))
            .header("host", "169.254.169.254")
            .header("metadata", "true")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let t = Instant::now();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        out.push(t.elapsed());
    }
    out
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn run_case(
    name: &str,
    addr: SocketAddr,
    clients: usize,
    per_client: usize,
    resource: Arc<dyn Fn(usize) -> String + Send + Sync>,
) {
    // Warm-up (fills the cache in the cached case; not measured).
    let seq = Arc::new(AtomicUsize::new(1_000_000));
    client(addr, 1, Arc::clone(&resource), Arc::clone(&seq)).await;
    let seq = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        tasks.push(tokio::spawn(client(
            addr,
            per_client,
            Arc::clone(&resource),
            Arc::clone(&seq),
        )));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let wall = started.elapsed();
    all.sort();
    println!(
        "{name:<34} clients={clients:>2} requests={:>5}  p50={:>9.3?}  p99={:>9.3?}  throughput={:>8.0} req/s",
        all.len(),
        pct(&all, 0.50),
        pct(&all, 0.99),
        all.len() as f64 / wall.as_secs_f64()
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let same: Arc<dyn Fn(usize) -> String + Send + Sync> =
            Arc::new(|_| "https://management.azure.com/".to_string());
        let fresh: Arc<dyn Fn(usize) -> String + Send + Sync> =
            Arc::new(|i| format!("https://bench-{i}.example.com/"));

        // IMDS's real limits, enforced by NMI's limiter.
        let (emu, imds) = emulator(false).await;
        let (addr, stop) = nmi(imds, (5, 20)).await;
        run_case("cached", addr, 1, 2_000, Arc::clone(&same)).await;
        run_case("cached", addr, 64, 100, Arc::clone(&same)).await;
        run_case(
            "uncached, IMDS limits (20/s)",
            addr,
            1,
            20,
            Arc::clone(&fresh),
        )
        .await;
        let fresh2: Arc<dyn Fn(usize) -> String + Send + Sync> =
            Arc::new(|i| format!("https://bench-b{i}.example.com/"));
        run_case("uncached, IMDS limits (20/s)", addr, 64, 1, fresh2).await;
        stop.trigger();
        drop(emu);

        // Limiter and emulator throttling lifted: NMI's own cost per miss.
        let (emu, imds) = emulator(true).await;
        let (addr, stop) = nmi(imds, (10_000, 1_000_000)).await;
        run_case("uncached, no limiter", addr, 1, 500, Arc::clone(&fresh)).await;
        let fresh3: Arc<dyn Fn(usize) -> String + Send + Sync> =
            Arc::new(|i| format!("https://bench-c{i}.example.com/"));
        run_case("uncached, no limiter", addr, 64, 20, fresh3).await;
        stop.trigger();
        drop(emu);
    });
}
