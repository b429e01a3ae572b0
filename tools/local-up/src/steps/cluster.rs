//! Step 1: the test kit's cluster (etcd + kube-apiserver with RBAC and the
//! CRDs) on loopback.

use std::sync::atomic::Ordering;

use aadpodid_testkit::{Cluster, ETCD_VERSION, KUBERNETES_VERSION};
use anyhow::Context as _;
use kube::Client;

use crate::registry::{ClearOnDrop, Reg, reg};
use crate::say::{done, info, step};

/// Starts the cluster and registers its folder; returns it with an admin client.
pub async fn start(registry: &Reg) -> anyhow::Result<(&'static Cluster, Client)> {
    let t = step(
        1,
        "Test cluster: etcd + kube-apiserver with RBAC and the aad-pod-identity CRDs",
    );
    let starting = reg(registry).cluster_starting.clone();
    starting.store(true, Ordering::SeqCst);
    let cluster = tokio::task::spawn_blocking(move || {
        // Cleared however the start ends (the test kit panics on failure).
        let _started = ClearOnDrop(starting);
        Cluster::shared()
    })
    .await?;
    let cluster_dir = cluster
        .kubeconfig()
        .parent()
        .context("kubeconfig has no folder")?
        .to_path_buf();
    reg(registry).cluster_dir = Some(cluster_dir);
    let client = cluster.admin_client().await?;
    info(&format!(
        "kube-apiserver {KUBERNETES_VERSION} and etcd {ETCD_VERSION} at {}",
        cluster.server()
    ));
    done(t);
    Ok((cluster, client))
}
