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
    let field = |name: &str| {
        kib_field(&text, name).with_context(|| format!("{name} in /proc/{pid}/status"))
    };
    Ok(Memory {
        peak_kib: field("VmHWM:")?,
        now_kib: field("VmRSS:")?,
    })
}

/// The value of the line `name` (colon included, e.g. `VmHWM:`) in a
/// `/proc` file of `Name:   1234 kB` lines (`/proc/<pid>/status`,
/// `/proc/meminfo`), in KiB.
pub fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User plus system CPU time of `pid` (`utime + stime` of `/proc/<pid>/stat`).
pub fn cpu(pid: u32) -> anyhow::Result<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    let ticks =
        stat_cpu_ticks(&text).with_context(|| format!("utime and stime in /proc/{pid}/stat"))?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

/// `utime + stime`, in clock ticks, from the text of `/proc/<pid>/stat`.
pub fn stat_cpu_ticks(text: &str) -> Option<u64> {
    // The command name may hold spaces; fields resume after its last ')'.
    let rest = text.rsplit_once(')').map(|(_, r)| r)?;
    // After ')' the first field is #3 (state): utime is #14, stime #15.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
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
        todo.extend(children(p));
    }
    None
}

/// The children of `pid`, from the `children` file of each of its threads
/// (`/proc/<pid>/task/<tid>/children`); empty when it is gone.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        if let Ok(children) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kib_fields_are_read_by_name() {
        let status = "Name:\tnmi\nVmHWM:\t   30512 kB\nVmRSS:\t   29008 kB\n";
        let meminfo = "MemTotal:        8039784 kB\n";
        for (text, name, want) in [
            (status, "VmHWM:", Some(30512)),
            (status, "VmRSS:", Some(29008)),
            (status, "VmSwap:", None),
            (status, "Name:", None),
            (meminfo, "MemTotal:", Some(8039784)),
        ] {
            assert_eq!(kib_field(text, name), want, "{name} in {text:?}");
        }
    }

    #[test]
    fn cpu_ticks_skip_a_command_name_with_spaces_and_parentheses() {
        let fields = "S 1 2 3 4 5 6 7 8 9 10 250 75 0 0 20 0 1 0";
        for (comm, want) in [
            ("(nmi)", Some(325)),
            ("(a b) c)", Some(325)),
            ("no parenthesis", None),
        ] {
            let text = format!("42 {comm} {fields}");
            assert_eq!(stat_cpu_ticks(&text), want, "{text}");
        }
        assert_eq!(stat_cpu_ticks("42 (nmi) S 1 2"), None);
    }

    #[test]
    fn this_process_can_be_read() -> anyhow::Result<()> {
        let me = std::process::id();
        let m = memory(me)?;
        assert!(m.peak_kib >= m.now_kib && m.now_kib > 0, "{m:?}");
        cpu(me)?;
        Ok(())
    }
}
