//! NMI's rollout from upstream's Go NMI (v1.8.17) to this NMI and back, on one
//! test node (a network namespace with real iptables) with pods asking for
//! tokens throughout.
//!
//! The node runs upstream's real Go NMI (built from its module) and this NMI
//! as the DaemonSet controller would run them, one after the other or side by
//! side; the emulator's IMDS runs inside the node, so its request log names
//! every caller: a request from a pod's address reached the real IMDS around
//! NMI. Each pod runs a bounded loop of token requests (one connection each)
//! and records each outcome: a token, another HTTP answer, refused, or failed.
//!
//! The sequences:
//! - rollout, delete first (`maxUnavailable: 1`, upstream's chart and ours
//!   before): SIGTERM upstream's NMI, wait for it to exit, start ours;
//! - rollout with surge (`maxSurge: 1, maxUnavailable: 0`): start ours beside
//!   upstream's, wait until its redirect is in place (the readiness the chart
//!   probes), SIGTERM upstream's, wait for it to exit;
//! - a later upgrade of ours with surge;
//! - rollback, delete first (upstream's chart): SIGTERM ours, wait, start
//!   upstream's;
//! - upstream's NMI restarting on the rolled-back node;
//! - the rules left after a later uninstall of upstream, and their removal.
//!
//! With `AADPODID_NMI_BEFORE_BIN` naming a build of NMI from before the
//! guard chain, the two rollouts run with it first, for the before figures.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aadpodid_tests::Cluster;
use aadpodid_tests::assigned::identity;
use aadpodid_tests::netns::IMDS_ADDRESS;
use aadpodid_tests::nmi_node::{
    CLIENT_A, GUARD_JUMP, GUARD_RULE, Imds, NmiNode, Options, PROBE_PORT, REDIRECT_JUMP,
    emulator_child_main, nmi_bin, test_child,
};
use aadpodid_tests::upstream::{NmiOptions, UpstreamChild, spawn_upstream_nmi, upstream_bin_dir};
use anyhow::{Context as _, bail};
use serde_json::Value;

/// Environment variable holding the JSON [`LoadPlan`] of a pod's load child.
const LOAD_ENV: &str = "AADPODID_MIGRATION_LOAD";
/// Environment variable naming a directory: when set, the node's rule
/// changes (`xtables-monitor -e`) and new connections to IMDS (`conntrack
/// -E`, with whether each was redirected) are written there as they happen,
/// to read a failed run against.
const TRACE_ENV: &str = "AADPODID_MIGRATION_TRACE";
/// Environment variable naming an NMI build from before this change.
const BEFORE_BIN_ENV: &str = "AADPODID_NMI_BEFORE_BIN";
/// Pods asking for tokens.
const PODS: u8 = 3;
/// NMI's token port.
const NMI_PORT: u16 = 2579;
/// How long the load runs before a sequence starts and after it ends.
const STEADY: Duration = Duration::from_millis(1500);
/// Bound on any process start or exit the sequences wait for (upstream's
/// NMI sleeps 10 s after SIGTERM).
const PROCESS_WAIT: Duration = Duration::from_secs(40);

/// The emulator inside the node ([`Imds::InNode`]), run by [`NmiNode::start`].
#[test]
#[ignore = "run by the test below inside the node network namespace"]
fn emulator_child_process() -> anyhow::Result<()> {
    emulator_child_main()
}

/// What one pod's load child does.
#[derive(serde::Serialize, serde::Deserialize)]
struct LoadPlan {
    /// Stop when this file exists.
    stop: PathBuf,
    /// At most this many requests.
    max_requests: usize,
    /// For at most this long.
    max_secs: u64,
    /// The identity asked for.
    client_id: String,
}

/// One request's outcome as the pod saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Outcome {
    /// 200 with an access token.
    Token,
    /// Another HTTP answer.
    Http(u16),
    /// Connection refused (nothing listens on the DNAT target).
    Refused,
    /// Any other failure (reset, timeout, unreadable answer).
    Failed,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn one_request(client_id: &str) -> Outcome {
    let addr = SocketAddr::from((IMDS_ADDRESS, 80));
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Outcome::Refused,
        Err(_) => return Outcome::Failed,
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    let req = format!(
        "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F&client_id={client_id} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).is_err() {
        return Outcome::Failed;
    }
    let mut buf = Vec::new();
    if s.read_to_end(&mut buf).is_err() && buf.is_empty() {
        return Outcome::Failed;
    }
    let text = String::from_utf8_lossy(&buf);
    let Some(status) = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
    else {
        return Outcome::Failed;
    };
    if status == 200 && text.contains("\"access_token\"") {
        Outcome::Token
    } else {
        Outcome::Http(status)
    }
}

/// A pod's side: token requests one after the other until the stop file,
/// the count or the time bound; prints `LOAD-OUTCOME <json>` with each
/// request's start (ms since the epoch) and outcome.
#[test]
#[ignore = "run by the test below inside a pod network namespace"]
fn pod_load_child() -> anyhow::Result<()> {
    let Some(plan) = std::env::var_os(LOAD_ENV) else {
        return Ok(());
    };
    let plan: LoadPlan = serde_json::from_str(&plan.to_string_lossy())?;
    let started = Instant::now();
    let mut out: Vec<(u64, Outcome)> = Vec::new();
    while out.len() < plan.max_requests
        && started.elapsed() < Duration::from_secs(plan.max_secs)
        && !plan.stop.exists()
    {
        let at = now_ms();
        out.push((at, one_request(&plan.client_id)));
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("LOAD-OUTCOME {}", serde_json::to_string(&out)?);
    Ok(())
}

/// The pods' load children.
struct Load {
    children: Vec<Child>,
    stop: PathBuf,
}

impl Load {
    fn start(f: &NmiNode, tag: &str) -> anyhow::Result<Load> {
        let stop = f.dir().join(format!("stop-{tag}"));
        let plan = LoadPlan {
            stop: stop.clone(),
            max_requests: 6000,
            max_secs: 120,
            client_id: CLIENT_A.into(),
        };
        let plan = serde_json::to_string(&plan)?;
        let mut children = Vec::new();
        for i in 0..usize::from(PODS) {
            let child = test_child(f.pod_ns(i), "pod_load_child")?
                .env(LOAD_ENV, &plan)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?;
            children.push(child);
        }
        Ok(Load { children, stop })
    }

    /// Stops every child and returns all outcomes, ordered by time.
    fn finish(mut self) -> anyhow::Result<Vec<(u64, Outcome)>> {
        std::fs::write(&self.stop, b"stop")?;
        let mut all = Vec::new();
        for child in std::mem::take(&mut self.children) {
            let out = child.wait_with_output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            // The test harness prints the test's name on the same line.
            let line = text
                .lines()
                .find_map(|l| l.split_once("LOAD-OUTCOME ").map(|(_, json)| json))
                .with_context(|| format!("a load child printed no outcome: {text}"))?;
            let v: Vec<(u64, Outcome)> = serde_json::from_str(line)?;
            all.extend(v);
        }
        all.sort_by_key(|(t, _)| *t);
        Ok(all)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.stop, b"stop");
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What one sequence gave.
#[derive(Debug, Default)]
struct Figures {
    name: String,
    requests: usize,
    tokens: usize,
    refused: usize,
    other_http: usize,
    failed: usize,
    /// Pod requests the real IMDS answered (its log, by caller address).
    imds_direct: usize,
    /// First to last of them (ms), 0 when none.
    direct_window_ms: u64,
    /// First to last refused or failed request (ms), 0 when none.
    failure_window_ms: u64,
    /// Old NMI's SIGTERM to its exit (ms).
    old_stopping_ms: u64,
    /// Old NMI's exit to the new one listening (ms).
    handover_ms: u64,
    /// The outcomes in runs, the IMDS-direct answers and the events, in ms
    /// from the first request.
    timeline: String,
}

impl Figures {
    fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} | {} ({} ms) | {} ms | {} ms | {} ms |",
            self.name,
            self.requests,
            self.tokens,
            self.refused,
            self.failed,
            self.other_http,
            self.imds_direct,
            self.direct_window_ms,
            self.failure_window_ms,
            self.old_stopping_ms,
            self.handover_ms,
        )
    }
}

const HEADER: &str = "| sequence | requests | tokens | refused | failed | other HTTP | IMDS-direct (window) | failure window | old NMI stopping | exit to new listening |\n|---|---|---|---|---|---|---|---|---|---|";

fn span(times: &[u64]) -> u64 {
    match (times.iter().min(), times.iter().max()) {
        (Some(a), Some(b)) => b - a,
        _ => 0,
    }
}

/// Whether the IMDS `record` came from one of the `pods`' addresses.
fn is_pod_peer(record: &Value, pods: &[std::net::IpAddr]) -> bool {
    let peer = record["peer"].as_str().unwrap_or("");
    let ip = peer
        .parse::<SocketAddr>()
        .map(|s| s.ip())
        .or_else(|_| peer.parse::<std::net::IpAddr>());
    ip.is_ok_and(|ip| pods.contains(&ip))
}

async fn figures(
    f: &NmiNode,
    name: &str,
    since: u64,
    outcomes: &[(u64, Outcome)],
    events: &[(&str, u64)],
) -> anyhow::Result<Figures> {
    let pods: Vec<std::net::IpAddr> = (0..usize::from(PODS))
        .map(|i| f.pod_ip(i).parse())
        .collect::<Result<_, _>>()?;
    let direct_records: Vec<Value> = f
        .imds_requests(since)
        .await?
        .into_iter()
        .filter(|r| is_pod_peer(r, &pods))
        .collect();
    let direct: Vec<u64> = direct_records
        .iter()
        .filter_map(|r| r["atMs"].as_u64())
        .collect();
    let count = |want: fn(&Outcome) -> bool| outcomes.iter().filter(|(_, o)| want(o)).count();
    let failure_times: Vec<u64> = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Refused | Outcome::Failed))
        .map(|(t, _)| *t)
        .collect();
    let t0 = outcomes.first().map(|(t, _)| *t).unwrap_or(0);
    let rel = |t: u64| t as i64 - t0 as i64;
    let mut runs: Vec<(Outcome, u64, u64, usize)> = Vec::new();
    for (t, o) in outcomes {
        match runs.last_mut() {
            Some(r) if r.0 == *o => {
                r.2 = *t;
                r.3 += 1;
            }
            _ => runs.push((*o, *t, *t, 1)),
        }
    }
    let mut timeline: Vec<String> = runs
        .iter()
        .map(|(o, a, b, n)| format!("{o:?}x{n}@{}..{}", rel(*a), rel(*b)))
        .collect();
    if let (Some(a), Some(b)) = (direct.iter().min(), direct.iter().max()) {
        timeline.push(format!("imds-direct@{}..{}", rel(*a), rel(*b)));
    }
    for (what, t) in events {
        timeline.push(format!("{what}@{}", rel(*t)));
    }
    // Each direct request whole (caller, path and query, time): a pod's own
    // request and one an NMI forwarded differ in their query's order.
    // At most the first few: a delete-first rollout has hundreds.
    for r in direct_records.iter().take(4) {
        timeline.push(format!(
            "direct[{} {} @{}]",
            r["peer"].as_str().unwrap_or("?"),
            r["uri"].as_str().unwrap_or("?"),
            r["atMs"].as_u64().map_or(0, rel)
        ));
    }
    Ok(Figures {
        timeline: timeline.join(" "),
        name: name.into(),
        requests: outcomes.len(),
        tokens: count(|o| *o == Outcome::Token),
        refused: count(|o| *o == Outcome::Refused),
        other_http: count(|o| matches!(o, Outcome::Http(_))),
        failed: count(|o| *o == Outcome::Failed),
        imds_direct: direct.len(),
        direct_window_ms: span(&direct),
        failure_window_ms: span(&failure_times),
        ..Figures::default()
    })
}

fn sigterm(pid: u32) -> anyhow::Result<()> {
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    if !st.success() {
        bail!("kill -TERM {pid}: {st}");
    }
    Ok(())
}

/// Whether something listens on NMI's token port inside the node.
fn token_port_bound(f: &NmiNode) -> bool {
    f.node_ns()
        .run("ss", &["-Hltn", &format!("sport = :{NMI_PORT}")])
        .is_ok_and(|out| !out.trim().is_empty())
}

async fn wait_until(
    what: &str,
    bound: Duration,
    mut check: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let until = Instant::now() + bound;
    while Instant::now() < until {
        if check() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("{what}: not within {bound:?}")
}

fn start_upstream(f: &NmiNode, log: &Path) -> anyhow::Result<UpstreamChild> {
    spawn_upstream_nmi(
        f.node_ns(),
        &NmiOptions {
            node: f.node_name.clone(),
            kubeconfig: f.kubeconfig().to_path_buf(),
            probe_port: PROBE_PORT,
            extra_args: vec!["--retry-attempts-for-created=1".into()],
        },
        log,
    )
}

/// When an old NMI got SIGTERM and when it had exited.
struct Stopped {
    term_at: u64,
    exit_at: u64,
    exited: Instant,
    stopping: Duration,
}

/// Sends SIGTERM to `pid` and waits until `exited` says so.
async fn stop(
    what: &str,
    pid: u32,
    mut exited: impl FnMut() -> bool,
    log: impl Fn() -> String,
) -> anyhow::Result<Stopped> {
    let term_at = now_ms();
    let t = Instant::now();
    sigterm(pid)?;
    wait_until(what, PROCESS_WAIT, &mut exited)
        .await
        .with_context(log)?;
    Ok(Stopped {
        term_at,
        exit_at: now_ms(),
        exited: Instant::now(),
        stopping: t.elapsed(),
    })
}

/// Sends SIGTERM to upstream's NMI and waits for its exit.
async fn stop_upstream(go: &mut UpstreamChild) -> anyhow::Result<Stopped> {
    let pid = go.id();
    let log = go.log_path().to_path_buf();
    stop(
        "upstream NMI's exit",
        pid,
        || matches!(go.exited(), Ok(Some(_))),
        || std::fs::read_to_string(&log).unwrap_or_default(),
    )
    .await
}

/// Sends SIGTERM to the NMI `child` and waits for its exit.
async fn stop_child(f: &NmiNode, pid: u32, child: &mut Reap) -> anyhow::Result<Stopped> {
    stop(
        "our NMI's exit",
        pid,
        || matches!(child.0.try_wait(), Ok(Some(_))),
        || f.log(),
    )
    .await
}

/// A measured sequence: the IMDS log position and the pods' load.
struct Phase {
    since: u64,
    load: Load,
}

impl Phase {
    /// Starts the load and lets it run steadily.
    async fn begin(f: &NmiNode, tag: &str) -> anyhow::Result<Phase> {
        let since = f.last_seq().await?;
        let load = Load::start(f, tag)?;
        tokio::time::sleep(STEADY).await;
        Ok(Phase { since, load })
    }

    /// Waits (bounded) until `listening`, lets the load run steadily, stops
    /// it and counts.
    async fn end(
        self,
        f: &NmiNode,
        name: &str,
        stopped: &Stopped,
        listening: impl FnMut() -> bool,
    ) -> anyhow::Result<(Figures, u64)> {
        wait_until("the new NMI listening", PROCESS_WAIT, listening)
            .await
            .with_context(|| f.log())?;
        let handover = stopped.exited.elapsed();
        let listen_at = now_ms();
        tokio::time::sleep(STEADY).await;
        let outcomes = self.load.finish()?;
        let events = [
            ("sigterm", stopped.term_at),
            ("exit", stopped.exit_at),
            ("listening", listen_at),
        ];
        let mut fig = figures(f, name, self.since, &outcomes, &events).await?;
        fig.old_stopping_ms = stopped.stopping.as_millis() as u64;
        fig.handover_ms = handover.as_millis() as u64;
        let tokens_after = outcomes
            .iter()
            .filter(|(t, o)| *t > listen_at + 200 && *o == Outcome::Token)
            .count();
        Ok((fig, tokens_after as u64))
    }
}

/// Upstream's NMI serving the pods (a token through it from pod 0, before
/// any load runs).
async fn wait_upstream_serving(f: &NmiNode, go: &UpstreamChild) -> anyhow::Result<()> {
    let path = format!(
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F&client_id={CLIENT_A}"
    );
    aadpodid_tests::wait_for("upstream NMI serving", Duration::from_secs(60), || async {
        let redirected = f
            .nat_rules(Some("PREROUTING"))
            .is_ok_and(|out| out.lines().any(|l| l.trim() == REDIRECT_JUMP));
        if !token_port_bound(f) || !redirected {
            return None;
        }
        let (code, body) = f.curl(0, &path, &["Metadata: true"]).await.ok()?;
        (code == 200 && body.contains("access_token")).then_some(())
    })
    .await
    .with_context(|| go.log())
}

/// Delete-first rollout from upstream's NMI (`go`, serving) to the node's
/// NMI binary.
async fn rollout_delete_first(
    f: &mut NmiNode,
    go: &mut UpstreamChild,
    name: &str,
    tag: &str,
) -> anyhow::Result<Figures> {
    let phase = Phase::begin(f, tag).await?;
    let stopped = stop_upstream(go).await?;
    f.start_nmi()?;
    let (fig, _) = phase.end(f, name, &stopped, || token_port_bound(f)).await?;
    Ok(fig)
}

/// Whether the jump to the guard chain is in PREROUTING: the readiness the
/// chart probes.
fn guard_ready(f: &NmiNode) -> bool {
    f.nat_rules(Some("PREROUTING"))
        .is_ok_and(|out| out.lines().any(|l| l.trim() == GUARD_JUMP))
}

/// Rollout with surge from upstream's NMI (`go`, serving) to this NMI:
/// ours starts beside it; once its redirect (the guard) is in place the old
/// one is stopped.
async fn rollout_surge(
    f: &mut NmiNode,
    go: &mut UpstreamChild,
    name: &str,
) -> anyhow::Result<Figures> {
    let phase = Phase::begin(f, "surge").await?;
    f.start_nmi()?;
    wait_until(
        "our redirect beside upstream's NMI",
        Duration::from_secs(20),
        || guard_ready(f),
    )
    .await
    .with_context(|| f.start_log())?;
    assert!(
        f.nmi_running(),
        "our NMI waits for the port:\n{}",
        f.start_log()
    );
    let stopped = stop_upstream(go).await?;
    let (fig, _) = phase.end(f, name, &stopped, || token_port_bound(f)).await?;
    Ok(fig)
}

/// The event monitors of [`TRACE_ENV`], killed and reaped on drop.
struct Trace {
    _monitors: Vec<Reap>,
}

impl Trace {
    fn start(f: &NmiNode) -> anyhow::Result<Trace> {
        let Some(dir) = std::env::var_os(TRACE_ENV).filter(|v| !v.is_empty()) else {
            return Ok(Trace {
                _monitors: Vec::new(),
            });
        };
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir)?;
        // Line-buffered (`stdbuf -oL`): the monitors are killed at the end.
        let monitors: [(&str, &[&str]); 2] = [
            ("xtables-monitor", &["-oL", "xtables-monitor", "-e", "-4"]),
            (
                "conntrack",
                &[
                    "-E",
                    "-o",
                    "timestamp",
                    "-p",
                    "tcp",
                    "--orig-dst",
                    "169.254.169.254",
                ],
            ),
        ];
        let mut children = Vec::new();
        for (name, args) in monitors {
            let program = if name == "conntrack" { name } else { "stdbuf" };
            let mut out = std::fs::File::create(dir.join(format!("{name}.log")))?;
            let mut child = f
                .node_ns()
                .command(program)
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("start {name}"))?;
            // Each line with the time it was read (ms since the epoch, the
            // clock of the pods' outcomes); ends when the monitor is killed.
            let lines = child.stdout.take().context("piped")?;
            std::thread::spawn(move || {
                use std::io::BufRead as _;
                for line in std::io::BufReader::new(lines).lines().map_while(Result::ok) {
                    let _ = writeln!(out, "{} {line}", now_ms());
                }
            });
            children.push(Reap(child));
        }
        eprintln!(
            "tracing rule changes and IMDS connections into {}",
            dir.display()
        );
        Ok(Trace {
            _monitors: children,
        })
    }
}

/// A process killed and reaped on drop (an NMI taken from the node).
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// PREROUTING's `-A` lines.
fn prerouting(f: &NmiNode) -> anyhow::Result<Vec<String>> {
    Ok(f.nat_rules(Some("PREROUTING"))?
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_owned)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nmi_rollout_from_upstream_and_back() -> anyhow::Result<()> {
    let bins = tokio::task::spawn_blocking(upstream_bin_dir).await??;
    eprintln!("upstream binaries in {}", bins.display());
    let ours = nmi_bin(env!("CARGO_BIN_EXE_e2e-nmi"));
    // Conntrack deletion on, as the chart sets by default. The delete-first
    // rollout below lets pods reach IMDS until ours starts, and the node's
    // connection tracking keeps entries of those connections; a pod that
    // later opens a connection from the same source port is sent along the
    // old entry, past both redirects, to IMDS (seen here: 29 s later, with
    // every rule in place). Ours deletes such entries when it starts and
    // after each repair.
    let mut opts = Options::new(PODS, ours.clone()).args([
        "--retry-attempts-for-assigned=1",
        "--enable-conntrack-deletion=true",
    ]);
    opts.start_nmi = false;
    opts.imds = Imds::InNode {
        child_test: "emulator_child_process",
    };
    // Upstream's NMI keeps no token cache: each pod request is an IMDS
    // request. IMDS's limits (20 per second, 5 at once) would make it hold
    // pods' requests for seconds under this load and hide the windows
    // measured here, so the emulator's IMDS takes them all.
    opts.emulator = |c| {
        c.imds.token_requests_per_second = 100_000;
        c.imds.token_concurrency = 10_000;
    };
    opts.namespace = "migration-nmi";
    let mut f = NmiNode::start(opts).await?;
    let id_a = identity(f.ns(), "id-a", CLIENT_A);
    for i in 0..usize::from(PODS) {
        f.create_bound_pod(&format!("app-{i}"), i, &id_a, "a")
            .await?;
    }
    let logs = f.dir().to_path_buf();
    let _trace = Trace::start(&f)?;
    let flush = "iptables -w 5 -t nat -F; iptables -w 5 -t nat -X";
    let mut rows: Vec<Figures> = Vec::new();

    // Before: an NMI build from before the guard chain, when given.
    if let Some(before) = std::env::var_os(BEFORE_BIN_ENV).filter(|v| !v.is_empty()) {
        f.set_nmi_bin(PathBuf::from(before));
        let mut go = start_upstream(&f, &logs.join("go-before-1.log"))?;
        wait_upstream_serving(&f, &go).await?;
        let name = "before: rollout, delete first";
        rows.push(rollout_delete_first(&mut f, &mut go, name, "before").await?);
        // Side by side: the earlier NMI binds before its redirect and exits
        // when the port is taken, so a surge cannot hand over.
        f.stop_nmi();
        let mut go = start_upstream(&f, &logs.join("go-before-2.log"))?;
        wait_upstream_serving(&f, &go).await?;
        f.start_nmi()?;
        let exited = wait_until("the earlier NMI's exit", Duration::from_secs(20), || {
            !f.nmi_running()
        })
        .await;
        let said = f.start_log();
        let said = said
            .lines()
            .rev()
            .find(|l| l.contains("in use"))
            .unwrap_or("");
        eprintln!(
            "before, surge: exited beside upstream's NMI: {} ({said})",
            exited.is_ok()
        );
        stop_upstream(&mut go).await?;
        f.stop_nmi();
        f.set_nmi_bin(ours.clone());
    }
    // Each rollout starts from a node upstream's NMI alone has run.
    f.node_ns().run("sh", &["-c", flush])?;

    // 1. Rollout, delete first (upstream's chart strategy).
    let mut go = start_upstream(&f, &logs.join("go-1.log"))?;
    wait_upstream_serving(&f, &go).await?;
    let name = "after: rollout, delete first";
    let delete_first = rollout_delete_first(&mut f, &mut go, name, "after").await?;
    assert!(f.redirect_in_place(), "{}", f.start_log());

    // 2. Rollout with surge: ours beside upstream's until it has exited.
    f.stop_nmi();
    f.node_ns().run("sh", &["-c", flush])?;
    let mut go = start_upstream(&f, &logs.join("go-2.log"))?;
    wait_upstream_serving(&f, &go).await?;
    let surge = rollout_surge(&mut f, &mut go, "after: rollout with surge").await?;
    assert!(go.log().contains("received SIGTERM"), "{}", go.log());
    assert!(
        f.start_log().contains("the port is in use"),
        "{}",
        f.start_log()
    );
    // Ours put aad-metadata back after upstream's cleanup deleted it.
    wait_until("aad-metadata back", Duration::from_secs(10), || {
        f.redirect_in_place()
    })
    .await
    .with_context(|| f.start_log())?;

    // 2b. A later upgrade of ours with surge: the new NMI beside the old
    // one, which keeps its rules when it stops.
    let phase = Phase::begin(&f, "ours-surge").await?;
    let old_pid = f.nmi_pid().context("our NMI runs")?;
    let mut old = Reap(f.take_nmi().context("our NMI runs")?);
    f.start_nmi()?;
    wait_until("the new NMI waiting", Duration::from_secs(20), || {
        f.start_log().contains("the port is in use")
    })
    .await
    .with_context(|| f.start_log())?;
    let stopped = stop_child(&f, old_pid, &mut old).await?;
    let bound = "bound the token service: the port is free";
    let (ours_surge, _) = phase
        .end(&f, "ours to ours, surge", &stopped, || {
            f.start_log().contains(bound)
        })
        .await?;

    // 3. Rollback, delete first: ours stops (rules stay), upstream's starts.
    let phase = Phase::begin(&f, "rollback").await?;
    let pid = f.nmi_pid().context("our NMI runs")?;
    let mut ours_child = Reap(f.take_nmi().context("our NMI runs")?);
    let stopped = stop_child(&f, pid, &mut ours_child).await?;
    let go = start_upstream(&f, &logs.join("go-3.log"))?;
    let (rollback, tokens_from_go) = phase
        .end(&f, "rollback, delete first", &stopped, || {
            token_port_bound(&f)
        })
        .await?;
    // Upstream's jump is first (it adopted aad-metadata unchanged); the
    // guard, second, is never reached while upstream's chain is there.
    let pre = prerouting(&f)?;
    assert_eq!(
        pre.first().map(String::as_str),
        Some(REDIRECT_JUMP),
        "{pre:?}"
    );
    assert_eq!(pre.get(1).map(String::as_str), Some(GUARD_JUMP), "{pre:?}");
    assert!(
        !go.log().contains("flushing iptables"),
        "upstream's NMI kept aad-metadata as it found it: {}",
        go.log()
    );

    // 4. Upstream's NMI restarting on the rolled-back node.
    let mut go = go;
    let phase = Phase::begin(&f, "restart").await?;
    let stopped = stop_upstream(&mut go).await?;
    let mut go = start_upstream(&f, &logs.join("go-4.log"))?;
    let (restart, _) = phase
        .end(&f, "upstream restart after rollback", &stopped, || {
            token_port_bound(&f)
        })
        .await?;

    // 5. Upstream uninstalled later: its chain goes, the guard stays (pods
    // refused) until removed by hand, as the migration guide says.
    stop_upstream(&mut go).await?;
    let left = f.nat_rules(None)?;
    assert!(
        left.lines().any(|l| l.trim() == GUARD_RULE)
            && left.lines().any(|l| l.trim() == GUARD_JUMP)
            && !left.lines().any(|l| l.trim() == REDIRECT_JUMP),
        "{left}"
    );
    f.node_ns().run(
        "sh",
        &[
            "-c",
            "iptables -w 5 -t nat -D PREROUTING -j aad-metadata-guard && iptables -w 5 -t nat -F aad-metadata-guard && iptables -w 5 -t nat -X aad-metadata-guard",
        ],
    )?;
    assert!(!f.any_redirect_jump());
    assert!(!f.nat_rules(None)?.contains("aad-metadata"));

    println!("{HEADER}");
    let after = [&delete_first, &surge, &ours_surge, &rollback, &restart];
    for r in rows.iter().chain(after) {
        println!("{}", r.row());
    }
    for r in rows.iter().chain(after) {
        println!("{}: {}", r.name, r.timeline);
    }
    println!("rollback: {tokens_from_go} tokens from upstream's NMI after it listened");

    // What remains with delete first: upstream's NMI removes its redirect
    // on SIGTERM, so pods reach the real IMDS until ours starts (the
    // counting can see it).
    assert!(delete_first.imds_direct > 0, "{}", delete_first.row());
    // With surge: none reaches IMDS, and the requests that fail are those
    // between the old NMI's exit and the new one's bind.
    for r in [&surge, &ours_surge] {
        assert_eq!(r.imds_direct, 0, "{}\n{}", r.row(), f.start_log());
        assert!(r.tokens > 0 && r.other_http == 0, "{}", r.row());
        assert!(r.failure_window_ms <= 1000, "{}", r.row());
    }
    // Rollback: nothing reaches IMDS (our rules stay until upstream's own
    // are in), and upstream's NMI serves afterwards.
    assert_eq!(rollback.imds_direct, 0, "{}", rollback.row());
    assert!(tokens_from_go > 0, "{}", rollback.row());
    // Upstream restarting on the rolled-back node: the guard keeps pods off
    // IMDS while upstream's NMI has removed its own redirect.
    assert_eq!(restart.imds_direct, 0, "{}", restart.row());
    Ok(())
}

/// What the chart's surge settings rest on, asked of the real apiserver
/// (server-side dry run): a DaemonSet takes `maxSurge` only with
/// `maxUnavailable: 0`, and a host-network pod's declared container port
/// becomes a host port (which would keep the surge pod off a node where the
/// old pod declares the same port), while a pod that declares none has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn surge_settings_the_apiserver_accepts() -> anyhow::Result<()> {
    use k8s_openapi::api::apps::v1::DaemonSet;
    use k8s_openapi::api::core::v1::Pod;
    use kube::Api;
    use kube::api::PostParams;
    use serde_json::json;
    let cluster = Cluster::shared();
    let client = cluster.admin_client().await?;
    let ns_guard = cluster.temp_namespace("surge-dry-run").await?;
    let ns = ns_guard.name();
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let container = |ports: Value| {
        json!({"name": "nmi", "image": "nmi", "ports": ports,
               "readinessProbe": {"exec": {"command": ["iptables", "-w", "5", "-t", "nat", "-C", "PREROUTING", "-j", "aad-metadata-guard"]}}})
    };
    let ds = |strategy: Value, ports: Value| -> anyhow::Result<DaemonSet> {
        Ok(serde_json::from_value(json!({
            "metadata": {"name": "nmi"},
            "spec": {
                "selector": {"matchLabels": {"app": "nmi"}},
                "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": strategy},
                "template": {
                    "metadata": {"labels": {"app": "nmi"}},
                    "spec": {"hostNetwork": true, "containers": [container(ports)]},
                },
            },
        }))?)
    };
    let dss: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
    dss.create(
        &dry,
        &ds(json!({"maxSurge": 1, "maxUnavailable": 0}), json!([]))?,
    )
    .await
    .context("maxSurge 1 with maxUnavailable 0")?;
    let both = dss
        .create(
            &dry,
            &ds(json!({"maxSurge": 1, "maxUnavailable": 1}), json!([]))?,
        )
        .await;
    let err = both.expect_err("maxSurge with a non-zero maxUnavailable is refused");
    assert!(
        err.to_string().contains("maxUnavailable"),
        "the refusal names maxUnavailable: {err}"
    );
    let pods: Api<Pod> = Api::namespaced(client, ns);
    let pod = |ports: Value| -> anyhow::Result<Pod> {
        Ok(serde_json::from_value(json!({
            "metadata": {"name": "nmi-x"},
            "spec": {"hostNetwork": true, "containers": [container(ports)]},
        }))?)
    };
    let declared = pods
        .create(
            &dry,
            &pod(json!([{"name": "http-probe", "containerPort": 8085}]))?,
        )
        .await?;
    let host_ports: Vec<Option<i32>> = declared
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .map(|p| p.host_port)
        .collect();
    assert_eq!(host_ports, [Some(8085)], "a declared port is a host port");
    let undeclared = pods.create(&dry, &pod(json!([]))?).await?;
    let none: usize = undeclared
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| c.ports.as_ref().map_or(0, Vec::len))
        .sum();
    assert_eq!(none, 0);
    Ok(())
}
