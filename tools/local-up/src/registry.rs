//! What must be undone, kept where the teardown finds it however the demo
//! ends (finished, failed, or stopped by a signal in the middle of a step),
//! and the teardown itself.
//!
//! The parts the demo starts are the test kit's [`WorldBuilder`]'s: it sits
//! in the registry while the steps run, and the teardown takes it back and
//! asks it to stop everything ([`WorldBuilder::teardown`]). What the world
//! does not own is the shared cluster's etcd and kube-apiserver, children of
//! this process: the teardown stops them after the world.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aadpodid_testkit::world::WorldBuilder;
use aadpodid_testkit::world::teardown::{Report, child_pids, netns_of, summarize};

use crate::say::info;

/// Set once the demo is stopping: failures of half-started parts are expected
/// then and need no panic report.
pub static STOPPING: AtomicBool = AtomicBool::new(false);

/// Everything the demo started or created.
#[derive(Debug, Default)]
pub struct Registry {
    /// The world, step by step (locked by the running steps; a signal drops
    /// them, which releases it).
    pub world: tokio::sync::Mutex<Option<WorldBuilder>>,
    /// `--keep` reached its wait: a signal then is the normal end.
    pub keeping: AtomicBool,
}

/// The registry, shared by the steps and the teardown.
pub type Reg = Arc<Registry>;

/// The last lines of the mic and nmi logs, to explain a failure.
pub fn print_logs(registry: &Reg) {
    let Some(dir) = registry
        .world
        .try_lock()
        .ok()
        .and_then(|w| w.as_ref().map(|w| w.dir().to_path_buf()))
    else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
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

/// The shared cluster's folder: the one its kubeconfig is in, else the test
/// kit's folder name for this process (also when the cluster never answered).
fn cluster_dir(world: Option<&WorldBuilder>) -> PathBuf {
    world
        .and_then(|w| w.cluster_ref().ok())
        .and_then(|c| c.kubeconfig().parent().map(Path::to_path_buf))
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("aadpodid-cluster-{}", std::process::id()))
        })
}

/// Stops the world (mic, nmi, relays, emulator; its namespaces and folders),
/// then the shared cluster, removes the cluster's folder, and checks that
/// nothing of this run is left.
pub async fn teardown(registry: &Reg) {
    println!("\nCleaning up");
    let world = registry.world.lock().await.take();
    let cluster_dir = cluster_dir(world.as_ref());
    let mut report = match world {
        Some(w) => w.teardown().await,
        None => Report::default(),
    };
    stop_the_rest(&mut report.stopped).await;
    info(&format!(
        "stopped {} processes: {}",
        report.total_stopped(),
        summarize(&report.stopped)
    ));
    info(&format!(
        "deleted {} network namespaces",
        report.netns_deleted
    ));
    let _ = std::fs::remove_dir_all(&cluster_dir);
    if !cluster_dir.exists() {
        report.removed.push(cluster_dir.display().to_string());
    }
    info(&format!(
        "removed temporary folders: {}",
        report.removed.join(" ")
    ));
    let left_procs = child_pids();
    let left_ns = netns_of(std::process::id());
    if left_procs.is_empty() && left_ns.is_empty() && report.left.is_empty() {
        info("nothing left running");
    } else {
        info(&format!(
            "LEFT BEHIND: processes {left_procs:?}, network namespaces {left_ns:?}, {:?}",
            report.left
        ));
    }
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

/// Marks that `--keep` reached its wait.
pub fn keeping(registry: &Reg) {
    registry.keeping.store(true, Ordering::SeqCst);
}

/// Whether `--keep` reached its wait.
pub fn is_keeping(registry: &Reg) -> bool {
    registry.keeping.load(Ordering::SeqCst)
}
