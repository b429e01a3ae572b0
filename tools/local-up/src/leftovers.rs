//! What a run could leave behind: its child processes and the network
//! namespaces the test kit named after its process ID. The teardown reports
//! them and the end-to-end test checks them.

/// Network namespaces in `/run/netns` that the process `pid` created (the test
/// kit names them `aadpodid-<pid>-...`).
pub fn netns_of(pid: u32) -> Vec<String> {
    let prefix = format!("aadpodid-{pid}-");
    std::fs::read_dir("/run/netns")
        .map(|es| {
            es.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Live (not zombie) child processes of this process, from every thread.
pub fn child_pids() -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for pid in text
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if is_live(&stat) {
                out.push(pid);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Whether a `/proc/<pid>/stat` line is of a process that is not a zombie:
/// the state letter follows the parenthesised command name (which may itself
/// hold parentheses and spaces).
pub fn is_live(stat: &str) -> bool {
    let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
    matches!(state, Some(s) if s != 'Z')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_live_unless_a_zombie_or_unreadable() {
        for (stat, live) in [
            ("42 (etcd) S 1 42 42 0", true),
            ("42 (kube-apiserver) R 1", true),
            ("42 (local-up) Z 1 42", false),
            ("42 (odd) name) S 1", true),
            ("42 (odd) name) Z 1", false),
            ("", false),
        ] {
            assert_eq!(is_live(stat), live, "{stat:?}");
        }
    }
}
