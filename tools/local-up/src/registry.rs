//! What must be undone, registered as soon as it exists so that the teardown
//! finds it however the demo ends (finished, failed, or stopped by a signal in
//! the middle of a step), and the teardown itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use aadpodid_testkit::netns::Node;
use azure_emulator::Emulator;

use crate::leftovers::{child_pids, netns_of};
use crate::say::info;

/// Set once the demo is stopping: failures of half-started parts are expected
/// then and need no panic report.
pub static STOPPING: AtomicBool = AtomicBool::new(false);

/// Everything the demo started or created.
#[derive(Debug, Default)]
pub struct Registry {
    /// Processes with a name whose first `-`-separated word is their kind
    /// (`mic-0`, `nmi-<node>`, `relay-<node>`).
    pub children: Vec<(String, Child)>,
    /// Network namespaces (deleted by name, also when their guard is held).
    pub netns: Vec<String>,
    pub nodes: Vec<Arc<Node>>,
    pub dirs: Vec<PathBuf>,
    pub emulator: Option<Arc<Emulator>>,
    pub cluster_dir: Option<PathBuf>,
    /// `--keep` reached its wait: a signal then is the normal end.
    pub keeping: bool,
    /// Set while the test kit starts the cluster on a blocking thread.
    pub cluster_starting: Arc<AtomicBool>,
}

/// The registry, shared by the steps and the teardown.
pub type Reg = Arc<Mutex<Registry>>;

/// Locks the registry (a panicked step does not make it unusable).
pub fn reg(r: &Reg) -> MutexGuard<'_, Registry> {
    r.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Clears a flag when dropped, however the scope ends.
#[derive(Debug)]
pub struct ClearOnDrop(pub Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// The last lines of the mic and nmi logs, to explain a failure.
pub fn print_logs(registry: &Reg) {
    let dirs = reg(registry).dirs.clone();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                println!("\n--- last lines of {} ---", p.display());
                for l in &lines[lines.len().saturating_sub(15)..] {
                    println!("{l}");
                }
            }
        }
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

/// Stops every process, deletes every network namespace and folder, then
/// checks that nothing of this run is left.
pub async fn teardown(registry: &Reg) {
    println!("\nCleaning up");
    // A cluster still starting would spawn etcd/kube-apiserver after the
    // cleanup; it takes seconds (its binaries are built beforehand), so wait.
    let starting = reg(registry).cluster_starting.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while starting.load(Ordering::SeqCst) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (children, netns, nodes, dirs, emulator, cluster_dir) = {
        let mut r = reg(registry);
        (
            std::mem::take(&mut r.children),
            std::mem::take(&mut r.netns),
            std::mem::take(&mut r.nodes),
            std::mem::take(&mut r.dirs),
            r.emulator.take(),
            // The test kit's folder name for this process, also when the
            // cluster never answered.
            r.cluster_dir.take().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("aadpodid-cluster-{}", std::process::id()))
            }),
        )
    };
    let mut stopped = stop_children(children).await;
    stop_the_rest(&mut stopped).await;
    let total: usize = stopped.values().sum();
    info(&format!(
        "stopped {total} processes: {}",
        summarize(&stopped)
    ));
    for name in &netns {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    drop(nodes);
    info(&format!("deleted {} network namespaces", netns.len()));
    let removed = remove_folders(emulator, &dirs, &cluster_dir);
    info(&format!("removed temporary folders: {}", removed.join(" ")));
    let left_procs = child_pids();
    let left_ns = netns_of(std::process::id());
    if left_procs.is_empty() && left_ns.is_empty() {
        info("nothing left running");
    } else {
        info(&format!(
            "LEFT BEHIND: processes {left_procs:?}, network namespaces {left_ns:?}"
        ));
    }
}

/// Kills the registered processes, newest first; counts those that ended
/// within 10 s each, by kind.
async fn stop_children(children: Vec<(String, Child)>) -> BTreeMap<String, usize> {
    let mut stopped = BTreeMap::new();
    for (name, mut c) in children.into_iter().rev() {
        let _ = c.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        let ended = loop {
            match c.try_wait() {
                Ok(Some(_)) => break true,
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => break false,
            }
        };
        if ended {
            let kind = name.split('-').next().unwrap_or(&name).to_string();
            *stopped.entry(kind).or_default() += 1;
        }
    }
    stopped
}

/// The cluster's etcd and kube-apiserver (the test kit started them) and any
/// helper still running: every remaining child of this process, by command name.
async fn stop_the_rest(stopped: &mut BTreeMap<String, usize>) {
    for pid in child_pids() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        *stopped.entry(comm.trim().to_string()).or_default() += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !child_pids().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Removes the emulator's folder (its CA bundle, named `azure-emulator-<guid>`),
/// the demo's folders and the cluster's; returns those that are gone.
fn remove_folders(
    emulator: Option<Arc<Emulator>>,
    dirs: &[PathBuf],
    cluster_dir: &Path,
) -> Vec<String> {
    let emulator_dir = emulator.and_then(|emu| {
        emu.shutdown();
        emu.ca_bundle_path()
            .parent()
            .filter(|d| {
                d.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("azure-emulator-"))
            })
            .map(Path::to_path_buf)
    });
    // (The emulator removes its own folder when dropped, just above.)
    let mut removed = Vec::new();
    for d in emulator_dir
        .iter()
        .chain(dirs)
        .chain([&cluster_dir.to_path_buf()])
    {
        let _ = std::fs::remove_dir_all(d);
        if !d.exists() {
            removed.push(d.display().to_string());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_counts_kinds_seen_more_than_once() {
        let mut stopped = BTreeMap::new();
        assert_eq!(summarize(&stopped), "");
        stopped.insert("nmi".to_string(), 3);
        stopped.insert("etcd".to_string(), 1);
        stopped.insert("mic".to_string(), 2);
        assert_eq!(summarize(&stopped), "etcd, mic x2, nmi x3");
    }
}
