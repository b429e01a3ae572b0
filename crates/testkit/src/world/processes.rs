//! The world's processes (mic replicas and nmi): started in a network
//! namespace (or, for a mic on the host, in the calling one) with a
//! container's args and environment, probed, signalled and started again;
//! [`spawn_kept`]; and `curl` inside a namespace.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::{PROCESS_START, Program};
use crate::netns::NetNs;

/// Bound on a process's exit after a signal (upstream's nmi sleeps 10 s
/// after SIGTERM).
const EXIT_WAIT: Duration = Duration::from_secs(20);

/// A process of the world (mic replica or nmi), with how to start it again.
#[derive(Debug)]
pub struct Proc {
    /// Pod name it stands for (`HOSTNAME`).
    pub name: String,
    program: Program,
    args: Vec<String>,
    env: Vec<(String, String)>,
    probe: (u16, String),
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// A process not started yet: `program` with `args` and the container's
    /// `env`, answering on `probe` (port, path) when up, logging to `log`.
    pub fn new(
        name: &str,
        program: Program,
        args: Vec<String>,
        env: Vec<(String, String)>,
        probe: (u16, String),
        log: PathBuf,
    ) -> Proc {
        Proc {
            name: name.into(),
            program,
            args,
            env,
            probe,
            log,
            child: None,
        }
    }

    /// The value of its flag `--<name>=<value>` (the last one given).
    pub fn flag(&self, name: &str) -> Option<&str> {
        let prefix = format!("--{name}=");
        self.args
            .iter()
            .rev()
            .find_map(|a| a.strip_prefix(prefix.as_str()))
    }

    /// Its log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Its whole log (empty before it wrote one).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Its process ID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its probe's URL, inside its namespace.
    pub fn probe_url(&self) -> String {
        format!("http://127.0.0.1:{}{}", self.probe.0, self.probe.1)
    }

    /// Starts it in `ns`, its output appended to its log.
    pub fn spawn(&mut self, ns: &NetNs) -> anyhow::Result<()> {
        self.spawn_in(Some(ns))
    }

    /// Starts it in `ns`, or in the calling process's namespace for `None`,
    /// its output appended to its log; spawned by [`spawn_kept`].
    pub fn spawn_in(&mut self, ns: Option<&NetNs>) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = match ns {
            Some(ns) => ns.command(&self.program.path),
            // In the calling process's namespace, killed when the spawning
            // thread ends as `NetNs::command` does; `setpriv` execs the
            // program, so the child's PID is the program's.
            None => {
                let mut cmd = Command::new("setpriv");
                cmd.args(["--pdeathsig", "KILL", "--"])
                    .arg(&self.program.path)
                    .stdin(Stdio::null());
                cmd
            }
        };
        // The container's environment only, plus PATH (iptables) for the wrapper.
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .args(&self.args)
            .args(&self.program.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(
                self.program
                    .env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(spawn_kept(cmd).with_context(|| format!("start {}", self.name))?);
        Ok(())
    }

    /// Its exit status once it has exited (`None` while it runs or when it
    /// was never started).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Kills it (if it runs) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its child process (`None` when never started or killed), for a test
    /// that stops it or waits for its exit itself.
    pub fn into_child(mut self) -> Option<Child> {
        self.child.take()
    }

    /// Sends `signal` (`TERM`, `KILL`) and waits (bounded) until it exits.
    pub(super) fn signal(&mut self, signal: &str) -> anyhow::Result<()> {
        match self.send(signal)? {
            Some(c) => wait_exit(c, &self.name, signal).map(drop),
            None => Ok(()),
        }
    }

    /// [`Proc::signal`] without blocking the calling task (the bounded wait
    /// runs on a blocking thread); its exit status, `None` when it did not
    /// run.
    pub async fn terminate(&mut self, signal: &str) -> anyhow::Result<Option<ExitStatus>> {
        let Some(c) = self.send(signal)? else {
            return Ok(None);
        };
        let (name, signal) = (self.name.clone(), signal.to_string());
        tokio::task::spawn_blocking(move || wait_exit(c, &name, &signal))
            .await
            .context("the wait for the exit")?
            .map(Some)
    }

    /// Sends `signal` to the running process and takes its child (`None`
    /// when it does not run).
    fn send(&mut self, signal: &str) -> anyhow::Result<Option<Child>> {
        let Some(c) = self.child.take() else {
            return Ok(None);
        };
        // `ip netns exec` and `setpriv` exec the program: the child's PID is its PID.
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &c.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -{signal} {} failed", self.name);
        }
        Ok(Some(c))
    }

    /// Moves the running process out into a new [`Proc`] with the same
    /// command line; this one is left not running.
    pub(super) fn take(&mut self) -> Proc {
        Proc {
            name: self.name.clone(),
            program: self.program.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
            probe: self.probe.clone(),
            log: self.log.clone(),
            child: self.child.take(),
        }
    }

    /// Polls its probe with `curl` inside `ns` until it answers 200 (any
    /// body), bounded by [`PROCESS_START`]; fails at once when it exits.
    pub(super) async fn wait_probe(&mut self, ns: &NetNs) -> anyhow::Result<()> {
        self.wait_probe_in(Some(ns)).await
    }

    /// [`Proc::wait_probe`] inside `ns`, or in the calling process's
    /// namespace for `None`.
    pub(super) async fn wait_probe_in(&mut self, ns: Option<&NetNs>) -> anyhow::Result<()> {
        let url = self.probe_url();
        let deadline = Instant::now() + PROCESS_START;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!(
                    "{} exited ({status}) before its probe answered:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            let answer = run_curl(curl_command(ns, &url, &[], 2)).await;
            if matches!(answer, Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: {url} not answering 200 after {PROCESS_START:?}:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Waits, polling, until `c` (process `name`, sent `signal`) exits; its
/// exit status. Past [`EXIT_WAIT`] it is killed and this fails.
fn wait_exit(mut c: Child, name: &str, signal: &str) -> anyhow::Result<ExitStatus> {
    let deadline = Instant::now() + EXIT_WAIT;
    loop {
        if let Some(status) = c.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = c.kill();
            let _ = c.wait();
            bail!("{name} did not exit within {EXIT_WAIT:?} of SIG{signal}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the world adds to the container environment of pod `pod_name`'s
/// process: `HOSTNAME`, `SSL_CERT_FILE` (the emulator's CA bundle
/// `ca_bundle`) and `NO_PROXY` (loopback).
pub fn pod_env(pod_name: &str, ca_bundle: &Path) -> Vec<(String, String)> {
    vec![
        ("HOSTNAME".into(), pod_name.into()),
        ("SSL_CERT_FILE".into(), ca_bundle.display().to_string()),
        ("NO_PROXY".into(), "127.0.0.1,localhost".into()),
    ]
}

type SpawnJob = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from one thread that lives as long as the process, so that
/// the `setpriv --pdeathsig KILL` of a child fires when the process ends,
/// not when the (possibly short-lived) thread of the caller does: a tokio
/// worker that entered `block_in_place` may end later while the world runs.
pub fn spawn_kept(mut cmd: Command) -> anyhow::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        let _ = std::thread::Builder::new()
            .name("kit-spawner".into())
            .spawn(move || {
                while let Ok((mut cmd, back)) = rx.recv() {
                    let _ = back.send(cmd.spawn());
                }
                // The senders live in a static: this is reached only if
                // the channel breaks; the thread must still not end.
                loop {
                    std::thread::park();
                }
            });
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    keeper
        .lock()
        .map_err(|_| anyhow::anyhow!("spawner lock poisoned"))?
        .send((std::mem::replace(&mut cmd, Command::new("true")), tx))
        .map_err(|_| anyhow::anyhow!("spawner thread is gone"))?;
    Ok(rx.recv().context("spawner thread is gone")??)
}

/// `curl` inside `ns`: (status, body); status 0 when no HTTP answer came.
pub async fn curl_in(
    ns: &NetNs,
    url: &str,
    headers: &[&str],
    max_time: u32,
) -> anyhow::Result<(u16, String)> {
    run_curl(curl_command(Some(ns), url, headers, max_time)).await
}

/// `curl -i` inside `ns`, keeping hostile URLs as written (`-g`,
/// `--path-as-is`): (status, response headers, body); status 0 when no
/// HTTP answer came.
pub async fn curl_head_in(
    ns: &NetNs,
    url: &str,
    headers: &[&str],
    max_time: u32,
) -> anyhow::Result<(u16, String, String)> {
    let mut cmd = curl_command(Some(ns), url, headers, max_time);
    cmd.args(["-g", "-i", "--path-as-is"]);
    let (status, all) = run_curl(cmd).await?;
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
    Ok((status, head.to_string(), body.to_string()))
}

/// The `curl` command of [`curl_in`] (in the calling process's namespace for
/// `None`), to run later with [`run_curl`].
pub(super) fn curl_command(
    ns: Option<&NetNs>,
    url: &str,
    headers: &[&str],
    max_time: u32,
) -> Command {
    let mut cmd = match ns {
        Some(ns) => ns.command("curl"),
        // Loopback of the calling namespace: never through a proxy.
        None => {
            let mut cmd = Command::new("curl");
            cmd.args(["--noproxy", "*"]);
            cmd
        }
    };
    cmd.args(["-s", "--max-time", &max_time.to_string()])
        .args(["-w", "\n%{http_code}"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    cmd
}

/// Runs a [`curl_command`]: (status, body); status 0 when no HTTP answer came.
pub(super) async fn run_curl(cmd: Command) -> anyhow::Result<(u16, String)> {
    let out = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .output()
        .await?;
    Ok(status_and_body(&String::from_utf8_lossy(&out.stdout)))
}

/// Splits what `curl -w '\n%{http_code}'` printed into (status, body).
fn status_and_body(text: &str) -> (u16, String) {
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curl_output_splits_into_status_and_body() {
        assert_eq!(status_and_body("{\"a\":1}\n200"), (200, "{\"a\":1}".into()));
        assert_eq!(
            status_and_body("line\nline 2\n404"),
            (404, "line\nline 2".into())
        );
        assert_eq!(status_and_body("\n000"), (0, String::new()));
        assert_eq!(status_and_body(""), (0, String::new()));
    }

    #[test]
    fn flags_are_read_back_last_one_winning() {
        let args = ["--a=1", "--kubeconfig=/x", "--b", "--kubeconfig=/y"];
        let p = Proc::new(
            "p",
            Program::binary("/bin/true"),
            args.iter().map(|a| a.to_string()).collect(),
            vec![],
            (0, String::new()),
            "/tmp/p.log".into(),
        );
        assert_eq!(p.flag("kubeconfig"), Some("/y"));
        assert_eq!(p.flag("a"), Some("1"));
        assert_eq!(p.flag("b"), None);
        assert_eq!(p.flag("c"), None);
    }
}
