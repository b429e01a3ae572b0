//! Tools built from pinned Go modules by a build script (the cluster
//! binaries, helm, upstream's mic and nmi): the script builds on first use,
//! caches under `$HOME/.cache/aadpodid` and prints the folder of the result.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Runs the bash script `script` (stdin closed, stderr passed through) for at
/// most `timeout` (then kills it) and returns the folder it prints on stdout.
pub fn run_build_script(script: &Path, timeout: Duration) -> anyhow::Result<PathBuf> {
    let mut child = Command::new("bash")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("run {}", script.display()))?;
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} did not finish within {timeout:?}", script.display());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}
