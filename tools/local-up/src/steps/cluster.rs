//! Step 1: the test kit's shared cluster (etcd + kube-apiserver with RBAC and
//! the CRDs) on loopback.

use aadpodid_testkit::world::{ClusterChoice, WorldBuilder};
use aadpodid_testkit::{ETCD_VERSION, KUBERNETES_VERSION};

use crate::say::{done, info, step};

/// Starts the cluster (the world's first step).
pub async fn start(world: &mut WorldBuilder) -> anyhow::Result<()> {
    let t = step(
        1,
        "Test cluster: etcd + kube-apiserver with RBAC and the aad-pod-identity CRDs",
    );
    let cluster = world.cluster(ClusterChoice::Shared).await?;
    info(&format!(
        "kube-apiserver {KUBERNETES_VERSION} and etcd {ETCD_VERSION} at {}",
        cluster.server()
    ));
    done(t);
    Ok(())
}
