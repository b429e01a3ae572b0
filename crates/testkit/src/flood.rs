//! Floods one pod can send to NMI, as any pod can: plain TCP to
//! 169.254.169.254:80 from the pod's own network namespace, nothing else.
//!
//! A flood runs in a child process placed in the attacker pod's namespace
//! (a test binary or the bench re-executed with [`PLAN_ENV`] holding the
//! JSON [`Plan`]; it calls [`child_main`]). The child opens its
//! connections, prints `READY`, holds them until a line (or end of file)
//! on its stdin or [`Plan::hold_max`], closes them all and prints
//! `FLOOD-OUTCOME <json>` ([`Outcome`]). The caller drives it with
//! [`Flood::spawn`] and [`Flood::stop`], and measures NMI meanwhile with
//! [`Sampler`].
//!
//! Every flood is bounded: [`Plan::connections`] connections, opened within
//! [`Plan::open_within`], held at most [`Plan::hold_max`].

use std::collections::BTreeMap;
use std::io::{BufRead as _, Write as _};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Environment variable holding the JSON [`Plan`] of a flood child.
pub const PLAN_ENV: &str = "AADPODID_FLOOD_PLAN";
/// Prefix of the child's last stdout line.
const OUTCOME_PREFIX: &str = "FLOOD-OUTCOME ";
/// Bound on one connection's connect plus the write of its request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the attacker pod sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// Each connection sends a token request head for its own `resource`
    /// declaring `Content-Length: 65536`, then nothing.
    SlowBodies,
    /// Each connection sends a complete token request for its own
    /// `resource` and waits for the answer.
    DistinctResources,
    /// Each connection is opened and sends nothing.
    IdleConnections,
}

impl Kind {
    /// The three floods, in the order tests and the bench run them.
    pub const ALL: [Kind; 3] = [
        Kind::SlowBodies,
        Kind::DistinctResources,
        Kind::IdleConnections,
    ];

    /// A short name for tables.
    pub fn title(self) -> &'static str {
        match self {
            Kind::SlowBodies => "slow bodies",
            Kind::DistinctResources => "distinct resources",
            Kind::IdleConnections => "idle connections",
        }
    }

    /// A name usable in a URL host label.
    pub fn slug(self) -> &'static str {
        match self {
            Kind::SlowBodies => "slow",
            Kind::DistinctResources => "distinct",
            Kind::IdleConnections => "idle",
        }
    }
}

/// One flood.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    /// What each connection sends.
    pub kind: Kind,
    /// IMDS as the pod sees it (169.254.169.254:80).
    pub target: SocketAddr,
    /// Connections opened (each one request at most).
    pub connections: usize,
    /// Connections being opened at the same time.
    pub connect_concurrency: usize,
    /// Bound on opening every connection; `READY` comes after it at the latest.
    pub open_within: Duration,
    /// Bound on holding the connections after `READY`.
    pub hold_max: Duration,
    /// Prefix of the `resource` host names, so runs never share a resource.
    pub tag: String,
}

/// The `resource` connection `i` of a flood asks for.
pub fn resource(tag: &str, i: usize) -> String {
    format!("https://{tag}-{i}.example/")
}

/// Token path for `resource`, percent-encoded as SDKs send it.
pub fn token_path(resource: &str) -> String {
    let enc: String = resource
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("/metadata/identity/oauth2/token?api-version=2018-02-01&resource={enc}")
}

/// The bytes connection `i` of a `kind` flood sends (before holding).
pub fn request_bytes(kind: Kind, tag: &str, i: usize, host: &str) -> Vec<u8> {
    let path = token_path(&resource(tag, i));
    match kind {
        Kind::SlowBodies => format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nMetadata: true\r\nContent-Length: 65536\r\n\r\n"
        )
        .into_bytes(),
        Kind::DistinctResources => {
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nMetadata: true\r\n\r\n").into_bytes()
        }
        Kind::IdleConnections => Vec::new(),
    }
}

/// The status code of an HTTP/1 response whose first bytes are `head`,
/// once its status line is complete.
pub fn status_of(head: &[u8]) -> Option<u16> {
    let end = head.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&head[..end]).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    (code.len() == 3).then_some(())?;
    code.parse().ok()
}

/// What happened to the flood's connections.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Connections established (and their request written).
    pub connected: usize,
    /// Connections that could not be established or written in time.
    pub connect_failed: usize,
    /// Answers before the flood stopped, by status code.
    pub answered: BTreeMap<u16, usize>,
    /// Connections NMI closed (or reset) without an answer.
    pub closed_unanswered: usize,
    /// Connections still open, unanswered, when the flood stopped.
    pub open_at_stop: usize,
    /// Wall time to open every connection, in milliseconds.
    pub open_ms: u64,
}

impl Outcome {
    /// `200×12 429×3000`-style summary of [`Outcome::answered`].
    pub fn answered_text(&self) -> String {
        if self.answered.is_empty() {
            return "none".into();
        }
        self.answered
            .iter()
            .map(|(code, n)| format!("{code}×{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// How one connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    ConnectFailed,
    Answered(u16),
    ClosedUnanswered,
    OpenAtStop,
}

/// Entry point of a flood child: runs the [`Plan`] of [`PLAN_ENV`].
pub fn child_main() -> anyhow::Result<()> {
    let plan: Plan = serde_json::from_str(
        &std::env::var(PLAN_ENV).with_context(|| format!("{PLAN_ENV} not set"))?,
    )
    .context("flood plan")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let outcome = rt.block_on(run(plan));
    // The stdin reader may still block when the hold ended at its bound.
    rt.shutdown_background();
    println!("{OUTCOME_PREFIX}{}", serde_json::to_string(&outcome?)?);
    std::io::stdout().flush()?;
    Ok(())
}

async fn run(plan: Plan) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let opened = Arc::new(AtomicUsize::new(0));
    let connecting = Arc::new(tokio::sync::Semaphore::new(plan.connect_concurrency.max(1)));
    let host = plan.target.ip().to_string();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..plan.connections {
        let bytes = request_bytes(plan.kind, &plan.tag, i, &host);
        let (target, opened, connecting, stop) = (
            plan.target,
            opened.clone(),
            connecting.clone(),
            stop_rx.clone(),
        );
        set.spawn(async move { one(target, bytes, opened, connecting, stop).await });
    }
    // Ready when every connection has been tried, or at the bound.
    let open_deadline = started + plan.open_within;
    while opened.load(Ordering::Relaxed) < plan.connections && Instant::now() < open_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let open_ms = started.elapsed().as_millis() as u64;
    println!("\nREADY");
    std::io::stdout().flush()?;
    // Hold until the caller says stop (a line or end of file) or the bound.
    let stdin_line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
    });
    let _ = tokio::time::timeout(plan.hold_max, stdin_line).await;
    let _ = stop_tx.send(true);
    let mut out = Outcome {
        open_ms,
        ..Outcome::default()
    };
    while let Some(end) = set.join_next().await {
        match end? {
            End::ConnectFailed => out.connect_failed += 1,
            End::Answered(code) => {
                out.connected += 1;
                *out.answered.entry(code).or_default() += 1;
            }
            End::ClosedUnanswered => {
                out.connected += 1;
                out.closed_unanswered += 1;
            }
            End::OpenAtStop => {
                out.connected += 1;
                out.open_at_stop += 1;
            }
        }
    }
    Ok(out)
}

/// One connection: connect and write (counted in `opened` either way), then
/// read until an answer, a close, or the stop.
async fn one(
    target: SocketAddr,
    bytes: Vec<u8>,
    opened: Arc<AtomicUsize>,
    connecting: Arc<tokio::sync::Semaphore>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> End {
    let connect = async {
        let _permit = connecting.acquire().await.ok()?;
        let mut s = TcpStream::connect(target).await.ok()?;
        if !bytes.is_empty() {
            s.write_all(&bytes).await.ok()?;
        }
        Some(s)
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .ok()
        .flatten();
    opened.fetch_add(1, Ordering::Relaxed);
    let Some(mut stream) = stream else {
        return End::ConnectFailed;
    };
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            // A close that has already arrived counts as a close, not as
            // open at the stop.
            biased;
            r = stream.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    return status_of(&head).map_or(End::ClosedUnanswered, End::Answered);
                }
                Ok(n) => {
                    if head.len() < 512 {
                        head.extend_from_slice(&buf[..n]);
                    }
                    if let Some(code) = status_of(&head) {
                        // A client that has its answer goes away.
                        return End::Answered(code);
                    }
                }
            },
            _ = stop.changed() => return End::OpenAtStop,
        }
    }
}

/// A running flood child (see the module docs).
#[derive(Debug)]
pub struct Flood {
    child: Child,
    stdout: std::io::BufReader<ChildStdout>,
    /// Lines the child printed before `READY`.
    pub preamble: Vec<String>,
}

impl Flood {
    /// Starts `cmd` (a command that ends in [`child_main`], placed in the
    /// attacker's namespace) with `plan` and waits until it says `READY`.
    /// Blocking: call it from `spawn_blocking` or `block_in_place`.
    pub fn spawn(cmd: Command, plan: &Plan) -> anyhow::Result<Flood> {
        Flood::spawn_with(cmd, plan, |mut c| Ok(c.spawn()?))
    }

    /// [`Flood::spawn`] with `spawn` starting the prepared command (for
    /// callers that spawn their children from a thread of their own).
    pub fn spawn_with(
        mut cmd: Command,
        plan: &Plan,
        spawn: impl FnOnce(Command) -> anyhow::Result<Child>,
    ) -> anyhow::Result<Flood> {
        cmd.env(PLAN_ENV, serde_json::to_string(plan)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = spawn(cmd).context("start the flood")?;
        let out = child.stdout.take().context("flood stdout")?;
        let mut stdout = std::io::BufReader::new(out);
        let mut preamble = Vec::new();
        loop {
            let mut line = String::new();
            if stdout.read_line(&mut line)? == 0 || preamble.len() > 50 {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the flood did not start: {preamble:?}");
            }
            if line.trim_end().ends_with("READY") {
                break;
            }
            preamble.push(line.trim_end().to_string());
        }
        Ok(Flood {
            child,
            stdout,
            preamble,
        })
    }

    /// Tells the child to close everything, and returns what it saw.
    /// Blocking, bounded by the plan's `hold_max` on the child's side.
    pub fn stop(mut self) -> anyhow::Result<Outcome> {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"STOP\n");
        }
        let mut found = None;
        let mut seen = Vec::new();
        let mut line = String::new();
        while found.is_none() && self.stdout.read_line(&mut line)? > 0 {
            if let Some((_, json)) = line.split_once(OUTCOME_PREFIX) {
                found = Some(serde_json::from_str::<Outcome>(json.trim())?);
            } else if seen.len() < 50 {
                seen.push(line.trim_end().to_string());
            }
            line.clear();
        }
        let _ = self.child.wait();
        found.with_context(|| format!("the flood printed no outcome: {seen:?}"))
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (soft, hard) `Max open files` of this process.
pub fn nofile_limits() -> anyhow::Result<(usize, usize)> {
    let text = std::fs::read_to_string("/proc/self/limits")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("Max open files")?;
    let mut f = line.split_whitespace().skip(3);
    let mut num = || -> anyhow::Result<usize> {
        let v = f.next().context("limit field")?;
        Ok(if v == "unlimited" {
            usize::MAX
        } else {
            v.parse()?
        })
    };
    Ok((num()?, num()?))
}

/// Raises this process's soft descriptor limit to `want` (and the hard
/// one when below it) with `prlimit`; returns the soft limit after.
pub fn raise_nofile(want: usize) -> anyhow::Result<usize> {
    let (soft, hard) = nofile_limits()?;
    if soft >= want {
        return Ok(soft);
    }
    let spec = if hard >= want {
        format!("--nofile={want}:")
    } else {
        format!("--nofile={want}:{want}")
    };
    let _ = std::process::Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string(), &spec])
        .status();
    Ok(nofile_limits()?.0)
}

/// Open file descriptors of `pid` (entries of `/proc/<pid>/fd`).
pub fn open_fds(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("read /proc/{pid}/fd"))?
        .count())
}

/// `VmRSS` of `pid`, KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    Ok(crate::procfs::memory(pid)?.now_kib)
}

/// `VmHWM` (peak RSS over the process's life) of `pid`, KiB.
pub fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    Ok(crate::procfs::memory(pid)?.peak_kib)
}

/// Peaks of a process's descriptors and RSS, sampled every 100 ms.
#[derive(Debug)]
pub struct Sampler {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Peaks>,
}

/// What a [`Sampler`] saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peaks {
    /// Most descriptors seen at once.
    pub fds: usize,
    /// Highest `VmRSS` seen, KiB.
    pub rss_kib: u64,
    /// Samples taken.
    pub samples: usize,
}

impl Sampler {
    /// Starts sampling `pid` on the current runtime.
    pub fn start(pid: u32) -> Sampler {
        let (stop, mut rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut p = Peaks::default();
            loop {
                if let Ok(n) = open_fds(pid) {
                    p.fds = p.fds.max(n);
                }
                if let Ok(r) = rss_kib(pid) {
                    p.rss_kib = p.rss_kib.max(r);
                }
                p.samples += 1;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = rx.changed() => return p,
                }
            }
        });
        Sampler { stop, task }
    }

    /// Stops sampling; returns the peaks.
    pub async fn finish(self) -> Peaks {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        for (head, want) in [
            (&b"HTTP/1.1 200 OK\r\n"[..], Some(200)),
            (
                b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\n",
                Some(429),
            ),
            (b"HTTP/1.0 400 Bad Request\n", Some(400)),
            (b"HTTP/1.1 200 OK", None),
            (b"HTTP/1.1 20 OK\r\n", None),
            (b"HTTP/2 200\r\n", None),
            (b"garbage\r\n", None),
            (b"", None),
        ] {
            assert_eq!(status_of(head), want, "{:?}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn requests_per_kind() {
        let slow =
            String::from_utf8(request_bytes(Kind::SlowBodies, "t", 7, "169.254.169.254")).unwrap();
        assert!(slow.starts_with(
            "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Ft-7.example%2F HTTP/1.1\r\n"
        ));
        assert!(slow.ends_with("Content-Length: 65536\r\n\r\n"), "{slow}");
        let full = String::from_utf8(request_bytes(
            Kind::DistinctResources,
            "t",
            8,
            "169.254.169.254",
        ))
        .unwrap();
        assert!(full.contains("t-8.example") && full.contains("Metadata: true\r\n\r\n"));
        assert!(!full.contains("Content-Length"));
        assert!(request_bytes(Kind::IdleConnections, "t", 1, "h").is_empty());
        assert_ne!(resource("t", 1), resource("t", 2));
    }
}
