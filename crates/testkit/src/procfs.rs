//! What `/proc/<pid>` says about a child: peak and current RSS, CPU time.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

/// Memory of a process from `/proc/<pid>/status`, in KiB.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    /// `VmHWM`: peak resident set size.
    pub peak_kib: u64,
    /// `VmRSS`: resident set size now.
    pub now_kib: u64,
}

/// Reads `VmHWM` and `VmRSS` of `pid`.
pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("{name} in /proc/{pid}/status"))
    };
    Ok(Memory {
        peak_kib: field("VmHWM:")?,
        now_kib: field("VmRSS:")?,
    })
}

/// User plus system CPU time of `pid` (`utime + stime` of `/proc/<pid>/stat`).
pub fn cpu(pid: u32) -> anyhow::Result<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // The command name may hold spaces; fields resume after its last ')'.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')' the first field is #3 (state): utime is #14, stime #15.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("field {} of /proc/{pid}/stat", i + 3))
    };
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_secs_f64(total as f64 / clock_ticks() as f64))
}

/// `sysconf(_SC_CLK_TCK)` through `getconf` (no libc binding here); 100 when unknown.
fn clock_ticks() -> u64 {
    static TCK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

/// The process that runs `exe` among `pid` and its descendants (a child may
/// sit behind `ip netns exec` and `setpriv`, which normally exec in place).
pub fn find_exe(pid: u32, exe: &Path) -> Option<u32> {
    let mut todo = vec![pid];
    let mut seen = 0;
    while let Some(p) = todo.pop() {
        seen += 1;
        if seen > 64 {
            break;
        }
        if std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == exe) {
            return Some(p);
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            if let Ok(children) = std::fs::read_to_string(t.path().join("children")) {
                todo.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    None
}
