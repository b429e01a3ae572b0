//! Before the steps: what the demo is, the root check, and the run's folder
//! (logs, mic's configuration files, the relays' sockets).

use std::path::PathBuf;

use anyhow::bail;

/// Prints the introduction, checks for root; returns the run's folder (the
/// world creates it).
pub fn prepare() -> anyhow::Result<PathBuf> {
    println!("aad-pod-identity, running locally");
    println!(
        "  A test Kubernetes control plane, an emulated Azure tenant, mic (2 replicas) and nmi"
    );
    println!("  (one per node, each node a network namespace) work together to give pods Azure AD");
    println!("  tokens for user-assigned managed identities, with no secret in any pod: two pods");
    println!(
        "  whose identities mic puts on their machines through ARM, and one whose identity is"
    );
    println!(
        "  federated (its ServiceAccount's token exchanged at Entra ID, nothing written to ARM)."
    );
    if !is_root() {
        bail!("needs root: it creates network namespaces and iptables rules inside them");
    }
    Ok(std::env::temp_dir().join(format!("aadpodid-local-up-{}", std::process::id())))
}

/// Effective user ID 0, from `/proc/self/status` (`Uid: real effective ...`).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| effective_uid_is_root(&s))
}

/// Whether a `/proc/<pid>/status` text has effective user ID 0.
fn effective_uid_is_root(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|u| u.split_whitespace().nth(1).map(|e| e == "0"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_the_effective_user_id() {
        for (status, root) in [
            ("Name:\tx\nUid:\t0\t0\t0\t0\n", true),
            ("Uid:\t1000\t0\t0\t0\n", true),
            ("Uid:\t0\t1000\t1000\t1000\n", false),
            ("Name:\tx\n", false),
        ] {
            assert_eq!(effective_uid_is_root(status), root, "{status:?}");
        }
    }
}
