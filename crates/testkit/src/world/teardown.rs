//! Taking a world down with a report ([`Report`]), and what a process could
//! leave behind: its live child processes and the network namespaces the kit
//! named after its process ID.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use azure_emulator::Emulator;

use super::nodes::{MicReplica, WorldNode};

/// What [`super::WorldBuilder::teardown`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Processes stopped, by kind (`mic`, `nmi`, `relay`, `cluster`).
    pub stopped: BTreeMap<String, usize>,
    /// Network namespaces deleted.
    pub netns_deleted: usize,
    /// Folders removed.
    pub removed: Vec<String>,
    /// Network namespaces and folders still there afterwards.
    pub left: Vec<String>,
}

impl Report {
    /// Processes stopped in all.
    pub fn total_stopped(&self) -> usize {
        self.stopped.values().sum()
    }

    /// One more process of `kind` stopped.
    pub fn count(&mut self, kind: &str) {
        *self.stopped.entry(kind.to_string()).or_default() += 1;
    }
}

/// `kind x<n>` for every kind stopped more than once, sorted by kind.
pub fn summarize(stopped: &BTreeMap<String, usize>) -> String {
    stopped
        .iter()
        .map(|(k, n)| {
            if *n > 1 {
                format!("{k} x{n}")
            } else {
                k.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Stops every mic replica and node (their processes and relays) and the
/// emulator, without a report (a world or builder dropped).
pub(super) fn stop_all(mics: &mut [MicReplica], nodes: &mut [WorldNode], emu: Option<&Emulator>) {
    for m in mics {
        m.stop();
    }
    for n in nodes {
        n.stop();
    }
    if let Some(emu) = emu {
        emu.shutdown();
    }
}

/// Stops every mic replica and node (their processes and relays, counted in
/// `report`), then deletes their network namespaces.
pub(super) fn stop_parts(report: &mut Report, mics: Vec<MicReplica>, nodes: Vec<WorldNode>) {
    let mut names = Vec::new();
    for mut m in mics.into_iter().rev() {
        if m.proc.pid().is_some() {
            report.count("mic");
        }
        m.stop();
        report.count("relay");
        names.push(m.net.name().to_string());
    }
    for mut n in nodes.into_iter().rev() {
        if n.nmi.pid().is_some() {
            report.count("nmi");
        }
        n.stop();
        report.count("relay");
        names.push(n.net.node.name().to_string());
        names.extend(n.net.pods.iter().map(|(p, _)| p.name().to_string()));
    }
    // Their namespaces are deleted as they drop (above).
    for name in names {
        if Path::new("/run/netns").join(&name).exists() {
            report.left.push(format!("network namespace {name}"));
        } else {
            report.netns_deleted += 1;
        }
    }
}

/// Removes a world's folder `dir`, unless `keep`: then says where `what`
/// (its logs) are kept.
pub fn remove_unless_kept(dir: &Path, keep: bool, what: &str) {
    if keep {
        eprintln!("{what} kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The emulator's own folder (its CA bundle's, `azure-emulator-<guid>`).
pub(super) fn emulator_dir(emu: &Emulator) -> Option<PathBuf> {
    emu.ca_bundle_path()
        .parent()
        .filter(|d| {
            d.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("azure-emulator-"))
        })
        .map(Path::to_path_buf)
}

/// Network namespaces in `/run/netns` that the process `pid` created (the kit
/// names them `aadpodid-<pid>-...`).
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

    #[test]
    fn the_summary_counts_kinds_seen_more_than_once() {
        let mut report = Report::default();
        assert_eq!(summarize(&report.stopped), "");
        for kind in ["nmi", "etcd", "mic", "nmi", "mic", "nmi"] {
            report.count(kind);
        }
        assert_eq!(summarize(&report.stopped), "etcd, mic x2, nmi x3");
        assert_eq!(report.total_stopped(), 6);
    }
}
