//! The README's first command, end to end: runs the `local-up` demo binary
//! (test cluster, Azure emulator, mic x2, nmi per node in network namespaces, the
//! seed manifests, pods getting tokens from both sources) and checks what it
//! shows and that it leaves nothing behind, after a full run and after a
//! SIGINT. Needs root.

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use aadpodid_local_up::leftovers::netns_of;
use aadpodid_local_up::tenant::{FEDERATED, SEED002, SEED004};
use anyhow::{Context as _, bail};

/// Bound on one demo run (the cluster binaries are built before tests run).
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// Each run brings up a whole system; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A running demo whose stdout lines arrive on a channel.
struct Demo {
    child: Child,
    lines: Receiver<String>,
    out: Vec<String>,
}

impl Demo {
    fn start(args: &[&str]) -> anyhow::Result<Demo> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_local-up"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start local-up")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                println!("local-up| {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Demo {
            child,
            lines,
            out: Vec::new(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads lines until one satisfies `pred`, within `deadline`.
    fn until(&mut self, deadline: Instant, pred: impl Fn(&str) -> bool) -> anyhow::Result<()> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = pred(&line);
                    self.out.push(line);
                    if hit {
                        return Ok(());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!("timed out; output so far:\n{}", self.text())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("output ended early:\n{}", self.text())
                }
            }
        }
    }

    /// Waits for the exit within `deadline` (killing it after), collecting all output.
    fn finish(&mut self, deadline: Instant) -> anyhow::Result<Option<i32>> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                // The reader thread ends with the pipe; take what is left.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
                    self.out.push(line);
                }
                return Ok(status.code());
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "local-up did not end within its bound; output:\n{}",
                    self.text()
                );
            }
            while let Ok(line) = self.lines.try_recv() {
                self.out.push(line);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn text(&self) -> String {
        self.out.join("\n")
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Nothing of the run with process ID `pid` is left: no network namespace it
/// named, no process whose command line names its folders, no folder.
fn assert_nothing_left(pid: u32, out: &str) -> anyhow::Result<()> {
    let netns = netns_of(pid);
    assert!(netns.is_empty(), "network namespaces left: {netns:?}");

    let tmp = std::env::temp_dir();
    let demo_dir = tmp.join(format!("aadpodid-local-up-{pid}"));
    let cluster_dir = tmp.join(format!("aadpodid-cluster-{pid}"));
    let markers = [
        demo_dir.display().to_string(),
        cluster_dir.display().to_string(),
    ];
    let mut left = Vec::new();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.parse::<u32>().is_err() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if markers.iter().any(|m| cmdline.contains(m.as_str())) {
            left.push(format!("{name}: {cmdline}"));
        }
    }
    assert!(left.is_empty(), "processes left: {left:#?}");

    assert!(!demo_dir.exists(), "{} left", demo_dir.display());
    assert!(!cluster_dir.exists(), "{} left", cluster_dir.display());
    // The emulator's folder, as the demo reports it.
    let removed = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("removed temporary folders: "))
        .with_context(|| format!("no folder report:\n{out}"))?;
    assert!(removed.contains("azure-emulator-"), "{removed}");
    for d in removed.split_whitespace() {
        assert!(!Path::new(d).exists(), "{d} left");
    }
    assert!(out.contains("nothing left running"), "{out}");
    Ok(())
}

#[test]
fn local_up_shows_assign_token_and_release() -> anyhow::Result<()> {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut demo = Demo::start(&[])?;
    let code = demo.finish(Instant::now() + RUN_TIMEOUT)?;
    let out = demo.text();
    assert_eq!(code, Some(0), "{out}");
    // Each AzureAssignedIdentity goes Created -> Assigned.
    for aai in [
        "nginx-secrets-store-inline-default-uai-kv",
        "demo-my-app-my-pod-identity",
    ] {
        let created = out
            .find(&format!("{aai}: Created (+"))
            .with_context(|| format!("{aai} not Created:\n{out}"))?;
        let assigned = out
            .find(&format!("{aai}: Assigned (+"))
            .with_context(|| format!("{aai} not Assigned:\n{out}"))?;
        assert!(created < assigned, "{out}");
    }
    // The identities are on the scale set and the VM (ARM GET), each pod's
    // SDK client gets a token for its identity, and after the pods are
    // deleted the identities are released.
    for line in [
        "aks-nodepool1-12345678-vmss: userAssignedIdentities = [kubelet, uai-kv]\n",
        "aks-agentpool-12345678-0: userAssignedIdentities = [application-identity]\n",
        &format!("claims: appid={} (uai-kv)", SEED002.client_id),
        &format!("claims: appid={} (application-identity)", SEED004.client_id),
        "signature verified with the emulated Entra ID's key",
        "AzureAssignedIdentity of default/nginx-secrets-store-inline: gone (+",
        "AzureAssignedIdentity of my-app/demo: gone (+",
        "aks-nodepool1-12345678-vmss: userAssignedIdentities = [kubelet]  (uai-kv released",
        "aks-agentpool-12345678-0: userAssignedIdentities = []  (application-identity released",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    assert!(out.contains("leader: mic-"), "{out}");
    // The federated pod: Assigned, its token from Entra ID's exchange, no
    // ARM write and no IMDS token request, its identity on no machine.
    for line in [
        "AzureAssignedIdentity default/web-app-web-uai-web: Assigned (+",
        "ARM writes since the pod was created: 0, IMDS token requests: 0",
        &format!("claims: appid={} (uai-web)", FEDERATED.client_id),
        "-> API server TokenRequest for ServiceAccount web/web-app (bound to the pod) -> Entra ID exchange",
        "AzureAssignedIdentity of web/web-app: gone (+",
        "uai-web was never on a machine: nothing to release",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    // Side by side: the seeds' pods caused ARM writes, the federated one none.
    let cells = |label: &str| -> Vec<String> {
        out.lines()
            .find(|l| l.trim_start().starts_with(label))
            .map(|l| {
                l.trim()
                    .split("  ")
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let sources = cells("token source");
    assert_eq!(sources.len(), 4, "{sources:?}\n{out}");
    assert!(
        sources[1].starts_with("imds") && sources[2].starts_with("imds"),
        "{sources:?}"
    );
    assert_eq!(sources[3], "federated", "{sources:?}");
    let writes = cells("ARM writes caused");
    assert_eq!(writes.len(), 4, "{writes:?}\n{out}");
    for w in &writes[1..3] {
        assert!(w.parse::<u64>().is_ok_and(|n| n > 0), "{writes:?}");
    }
    assert_eq!(writes[3], "0", "{writes:?}");
    assert_eq!(
        cells("appid").get(3).map(String::as_str),
        Some(FEDERATED.client_id)
    );
    assert_eq!(cells("first token").len(), 4, "{out}");
    assert_nothing_left(demo.pid(), &out)
}

#[test]
fn local_up_cleans_up_after_sigint() -> anyhow::Result<()> {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut demo = Demo::start(&[])?;
    // Right after the token step, with everything up.
    demo.until(deadline, |l| l.starts_with("[8/9]"))?;
    demo.until(deadline, |l| l.trim_start().starts_with("ok ("))?;
    let status = Command::new("kill")
        .args(["-INT", &demo.pid().to_string()])
        .status()?;
    assert!(status.success());
    let code = demo.finish(deadline)?;
    let out = demo.text();
    assert!(out.contains("claims: appid="), "{out}");
    assert!(out.contains("SIGINT received"), "{out}");
    assert_eq!(code, Some(130), "{out}");
    assert_nothing_left(demo.pid(), &out)
}
