//! Tools the tests run that a script builds or installs on first use (the
//! cluster binaries, helm and upstream's mic and nmi from pinned Go modules,
//! the Python SDK's virtualenv): the script caches its result under
//! `$HOME/.cache/aadpodid` and prints where it is. [`BuiltTool`] asks once per
//! process, or takes the folder an environment variable names. Also
//! [`last_line_json`], the answer of a helper program that prints its result
//! as the last line of its standard output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::de::DeserializeOwned;

/// Runs the bash script `script` (stdin closed, stderr passed through) for at
/// most `timeout` (then kills it) and returns the path it prints on stdout.
pub fn run_build_script(script: &Path, timeout: Duration) -> anyhow::Result<PathBuf> {
    let what = script.display().to_string();
    let mut cmd = Command::new("bash");
    cmd.arg(script).stderr(Stdio::inherit());
    let out = output_within(&mut cmd, &what, timeout)?;
    if !out.status.success() {
        bail!("{what} failed ({})", out.status);
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// Runs `cmd` (stdin closed, stdout captured; stderr as the caller set it:
/// captured only when piped) for at most `timeout`, then kills it: a process
/// under test that hangs fails the test instead of holding it. The pipes are
/// drained while the child runs, so a talkative child cannot block on a full
/// pipe.
pub fn output_within(cmd: &mut Command, what: &str, timeout: Duration) -> anyhow::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {what}"))?;
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// A tool a build script makes, found once per process: the folder (or file)
/// the script prints, or the folder an environment variable names instead.
///
/// ```no_run
/// # use std::time::Duration;
/// use aadpodid_testkit::tools::BuiltTool;
/// static HELM: BuiltTool = BuiltTool::new("tests/helm/build.sh", Duration::from_secs(1800))
///     .named_by("AADPODID_HELM_BIN", &["helm"]);
/// # fn demo() -> anyhow::Result<()> {
/// let helm = HELM.path()?.join("helm");
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct BuiltTool {
    script: &'static str,
    timeout: Duration,
    env: Option<(&'static str, &'static [&'static str])>,
    found: OnceLock<Result<PathBuf, String>>,
}

impl BuiltTool {
    /// Built by `script` (relative to the repository root), given at most
    /// `timeout` when nothing is cached yet.
    pub const fn new(script: &'static str, timeout: Duration) -> BuiltTool {
        BuiltTool {
            script,
            timeout,
            env: None,
            found: OnceLock::new(),
        }
    }

    /// Taken from the folder environment variable `var` names when it is set
    /// and not empty; that folder must hold `files`.
    pub const fn named_by(
        mut self,
        var: &'static str,
        files: &'static [&'static str],
    ) -> BuiltTool {
        self.env = Some((var, files));
        self
    }

    /// The path: asked for once per process (an error is kept, too).
    pub fn path(&self) -> anyhow::Result<PathBuf> {
        self.found
            .get_or_init(|| self.find().map_err(|e| format!("{e:#}")))
            .clone()
            .map_err(anyhow::Error::msg)
    }

    fn find(&self) -> anyhow::Result<PathBuf> {
        if let Some((var, files)) = self.env
            && let Some(dir) = named_folder(var, std::env::var_os(var), files)
        {
            return dir;
        }
        run_build_script(&crate::repo_root().join(self.script), self.timeout)
    }
}

/// The folder `value` of environment variable `var` names, when set and not
/// empty, checked to hold `files`.
fn named_folder(
    var: &str,
    value: Option<std::ffi::OsString>,
    files: &[&str],
) -> Option<anyhow::Result<PathBuf>> {
    let dir = PathBuf::from(value.filter(|d| !d.is_empty())?);
    Some(match files.iter().find(|f| !dir.join(f).is_file()) {
        Some(missing) => Err(anyhow::anyhow!(
            "{var}={} holds no {missing}",
            dir.display()
        )),
        None => Ok(dir),
    })
}

/// The result a helper program `what` printed as the last line of its
/// standard output, read as JSON; the error quotes everything it printed.
pub fn last_line_json<T: DeserializeOwned>(what: &str, out: &Output) -> anyhow::Result<T> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| {
        format!(
            "{what} printed no JSON result: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt as _;

    fn output(stdout: &str, stderr: &str) -> Output {
        Output {
            status: std::process::ExitStatus::from_raw(0),
            stdout: stdout.as_bytes().to_vec(),
            stderr: stderr.as_bytes().to_vec(),
        }
    }

    #[test]
    fn output_within_drains_both_pipes_and_kills_a_hung_child() {
        // More than a pipe holds on each stream: the child must not block.
        let big = output_within(
            Command::new("sh")
                .args([
                    "-c",
                    "head -c 200000 /dev/zero; head -c 100000 /dev/zero >&2",
                ])
                .stderr(Stdio::piped()),
            "big",
            Duration::from_secs(30),
        )
        .unwrap();
        assert!(big.status.success());
        assert_eq!((big.stdout.len(), big.stderr.len()), (200_000, 100_000));

        let started = Instant::now();
        let hung = output_within(
            Command::new("sleep").arg("30"),
            "sleep",
            Duration::from_millis(300),
        );
        let err = hung.unwrap_err().to_string();
        assert!(err.contains("sleep did not finish within"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the child was not killed"
        );
    }

    #[test]
    fn last_line_json_reads_only_the_last_line() {
        let v: serde_json::Value =
            last_line_json("x", &output("progress\n{\"ok\":1}\n", "")).unwrap();
        assert_eq!(v, serde_json::json!({"ok": 1}));
        let err = last_line_json::<serde_json::Value>("x", &output("{\"ok\":1}\ndone\n", "why"))
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.starts_with("x printed no JSON result: {\"ok\":1}\ndone\nwhy"),
            "{text}"
        );
        assert!(last_line_json::<serde_json::Value>("x", &output("", "")).is_err());
    }

    #[test]
    fn a_named_folder_must_hold_the_files() {
        let dir = std::env::temp_dir().join(format!("aadpodid-tool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a"), "").unwrap();
        let value = Some(dir.clone().into_os_string());
        assert_eq!(named_folder("V", None, &["a"]).map(|r| r.is_ok()), None);
        assert_eq!(
            named_folder("V", Some("".into()), &["a"]).map(|r| r.is_ok()),
            None
        );
        assert_eq!(
            named_folder("V", value.clone(), &["a"]).unwrap().unwrap(),
            dir
        );
        let err = named_folder("V", value, &["a", "b"]).unwrap().unwrap_err();
        assert_eq!(err.to_string(), format!("V={} holds no b", dir.display()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
