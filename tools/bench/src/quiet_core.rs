//! Row 3 measures nmi on a core of its own. nmi is pinned to its core from
//! the start, but the benchmark's other processes (this process with the
//! emulator, etcd, the apiserver, mic, the namespace relays) may run on any
//! core, and each time one of them is scheduled on nmi's core it holds nmi
//! off for up to a scheduler slice (milliseconds): that shows in nmi's tail
//! latency although nmi did not cause it. For the load runs they are moved
//! to the load generator's core (`taskset -a -p`, every thread), and moved
//! back to every core afterwards. The kernel's own work and processes
//! outside the benchmark are not moved.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use aadpodid_testkit::procfs;

/// `root` and its descendants, as `children` lists each process's
/// children, in pid order, without `skip` and its descendants.
pub fn tree_without(root: u32, skip: u32, children: impl Fn(u32) -> Vec<u32>) -> Vec<u32> {
    let mut out = BTreeSet::new();
    let mut todo = vec![root];
    // Each pid is visited once: a cycle (impossible in /proc, possible in a
    // table) cannot loop.
    while let Some(pid) = todo.pop() {
        if pid == skip || !out.insert(pid) {
            continue;
        }
        todo.extend(children(pid));
    }
    out.into_iter().collect()
}

/// While alive, the benchmark's processes other than nmi run on one core.
#[derive(Debug)]
pub struct QuietCore {
    moved: Vec<u32>,
    all: String,
}

impl QuietCore {
    /// Moves this process and its descendants, except `nmi` and its
    /// descendants, to `core`; `None` (nothing moved) without a core.
    /// Processes that end meanwhile are skipped.
    pub fn keep_off(nmi: u32, core: Option<usize>) -> Option<QuietCore> {
        let core = core?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let all = format!("0-{}", cpus.saturating_sub(1));
        let pids = tree_without(std::process::id(), nmi, procfs::children);
        let moved = pids
            .into_iter()
            .filter(|&p| set_affinity(p, &core.to_string()))
            .collect();
        Some(QuietCore { moved, all })
    }

    /// How many processes were moved.
    pub fn moved(&self) -> usize {
        self.moved.len()
    }
}

impl Drop for QuietCore {
    fn drop(&mut self) {
        for &pid in &self.moved {
            set_affinity(pid, &self.all);
        }
    }
}

/// `taskset -a -p -c <cpus> <pid>`: whether it succeeded.
fn set_affinity(pid: u32, cpus: &str) -> bool {
    Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The children of each pid in `edges` (pid, parent pid).
    fn children_of(edges: &[(u32, u32)]) -> impl Fn(u32) -> Vec<u32> {
        let mut map: std::collections::BTreeMap<u32, Vec<u32>> = Default::default();
        for &(pid, ppid) in edges {
            map.entry(ppid).or_default().push(pid);
        }
        move |pid| map.get(&pid).cloned().unwrap_or_default()
    }

    #[test]
    fn tree_without_skips_the_subtree() {
        // 1 ─ 10 ─ 11 ─ 12
        //   └ 20 ─ 21
        //   └ 30 (nmi) ─ 31
        // 99 is not under 1.
        let procs = [
            (10, 1),
            (11, 10),
            (12, 11),
            (20, 1),
            (21, 20),
            (30, 1),
            (31, 30),
            (99, 2),
        ];
        let table: [(u32, u32, Vec<u32>); 5] = [
            (1, 30, vec![1, 10, 11, 12, 20, 21]),
            (1, 12, vec![1, 10, 11, 20, 21, 30, 31]),
            (10, 30, vec![10, 11, 12]),
            (30, 30, vec![]),
            (1, 77, vec![1, 10, 11, 12, 20, 21, 30, 31]),
        ];
        for (root, skip, want) in table {
            assert_eq!(
                tree_without(root, skip, children_of(&procs)),
                want,
                "root {root}, skip {skip}"
            );
        }
    }

    #[test]
    fn tree_without_survives_cycles() {
        assert_eq!(
            tree_without(2, 0, children_of(&[(2, 3), (3, 2)])),
            vec![2, 3]
        );
        assert_eq!(tree_without(5, 0, children_of(&[(5, 5)])), vec![5]);
    }

    #[test]
    fn this_process_finds_its_child() {
        let mut child = Command::new("sleep").arg("5").spawn().unwrap();
        let tree = tree_without(std::process::id(), 0, procfs::children);
        let _ = child.kill();
        let _ = child.wait();
        assert!(tree.contains(&std::process::id()));
        assert!(tree.contains(&child.id()), "{tree:?} lacks {}", child.id());
    }
}
