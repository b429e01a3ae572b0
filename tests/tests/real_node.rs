//! A real node: kubelet, containerd, runc and a CNI bridge in a network
//! namespace of the test's own, joined to the test apiserver, with
//! kube-controller-manager and kube-scheduler beside the apiserver. A
//! Deployment's pod, placed by the scheduler, runs there.
//!
//! Needs root and Debian's containerd, runc and containernetworking-plugins
//! (installed on first use when missing); the node binaries come from
//! `tests/cluster/build-node.sh` (or `$AADPODID_NODE_BIN`).

use std::time::{Duration, Instant};

use aadpodid_testkit::Cluster;
use aadpodid_testkit::realnode::{ControlPlane, IDLE_IMAGE, RealNode};
use aadpodid_testkit::wait_for;
use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

/// Bound on the node's registering Ready (the kubelet's start, the runtime's
/// and the network's readiness, the controller manager lifting the
/// not-ready taint).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on the pod's running (scheduling, sandbox, CNI, container start).
const RUNNING_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound on the kubelet's removing the pod after the Deployment is deleted.
const GONE_TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_pod_runs_on_a_real_node() -> anyhow::Result<()> {
    let cluster = Cluster::shared();
    let client = cluster.admin_client().await?;
    let started = Instant::now();
    let mut plane = ControlPlane::start(cluster)?;
    let mut node = RealNode::start(cluster, 0).await?;
    let booted = started.elapsed();

    let ready = node.wait_ready(&client, READY_TIMEOUT).await?;
    let ready_after = started.elapsed();
    let info = ready.status.as_ref().and_then(|s| s.node_info.as_ref());
    let runtime = info.map(|i| i.container_runtime_version.clone());
    let kubelet = info.map(|i| i.kubelet_version.clone());
    assert_eq!(
        kubelet.as_deref(),
        Some(aadpodid_testkit::KUBERNETES_VERSION),
        "{ready:?}"
    );
    assert!(
        runtime
            .as_deref()
            .is_some_and(|r| r.starts_with("containerd://")),
        "{runtime:?}"
    );
    let addresses = ready
        .status
        .as_ref()
        .and_then(|s| s.addresses.clone())
        .unwrap_or_default();
    assert!(
        addresses
            .iter()
            .any(|a| a.type_ == "InternalIP" && a.address == node.node_ip().to_string()),
        "{addresses:?}"
    );

    // A Deployment without a node name: the controller manager makes its
    // ReplicaSet and pod, the scheduler binds the pod, the kubelet runs it.
    let ns = cluster.temp_namespace("realnode").await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns.name());
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "idle"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "idle"}},
            "template": {
                "metadata": {"labels": {"app": "idle"}},
                "spec": {
                    "automountServiceAccountToken": false,
                    "terminationGracePeriodSeconds": 2,
                    "containers": [{
                        "name": "idle",
                        "image": IDLE_IMAGE,
                        "imagePullPolicy": "Never",
                    }],
                },
            },
        },
    }))?;
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .context("create the Deployment")?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let running = running_pod(&pods, "app=idle", &mut plane, &node).await?;
    let running_after = started.elapsed();

    let spec = running.spec.as_ref().context("pod without spec")?;
    assert_eq!(spec.node_name.as_deref(), Some(node.name()), "{running:?}");
    let status = running.status.as_ref().context("pod without status")?;
    let pod_ip = status.pod_ip.as_deref().unwrap_or_default();
    let prefix = node.pod_cidr().trim_end_matches("0/24");
    assert!(
        pod_ip.starts_with(prefix),
        "pod IP {pod_ip} not in {}",
        node.pod_cidr()
    );
    let container = status
        .container_statuses
        .as_ref()
        .and_then(|c| c.first())
        .context("no container status")?;
    assert!(
        container
            .state
            .as_ref()
            .and_then(|s| s.running.as_ref())
            .is_some(),
        "{container:?}"
    );
    // The pod's address is on the node's bridge network: the node reaches it.
    let route = node.netns().run("ip", &["route", "get", pod_ip])?;
    assert!(route.contains("dev cni0"), "{route}");

    // Deleting the Deployment: the kubelet stops the container, releases the
    // address and removes the sandbox.
    deployments
        .delete("idle", &DeleteParams::foreground())
        .await
        .context("delete the Deployment")?;
    node.wait_no_pods(&client, GONE_TIMEOUT).await?;
    let gone_after = started.elapsed();

    // A plain Pod without a node name is scheduled too; the node is then
    // dropped with it running: its teardown kills the pod's processes and
    // shims and removes the pod's network namespace, cgroups and folder.
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "left-running", "labels": {"app": "left-running"}},
        "spec": {
            "automountServiceAccountToken": false,
            "containers": [{"name": "idle", "image": IDLE_IMAGE, "imagePullPolicy": "Never"}],
        },
    }))?;
    pods.create(&PostParams::default(), &pod)
        .await
        .context("create the Pod")?;
    let left = running_pod(&pods, "app=left-running", &mut plane, &node).await?;
    let spec = left.spec.as_ref().context("pod without spec")?;
    assert_eq!(spec.node_name.as_deref(), Some(node.name()), "{left:?}");
    plane.check_running()?;
    let netns_files = node.pod_netns_files();
    assert!(!netns_files.is_empty(), "no pod network namespace");
    let (dir, cgroup_root) = (node.dir().to_path_buf(), node.cgroup_root().to_string());
    drop(node);
    let leftovers = RealNode::leftovers(&dir, &cgroup_root);
    assert!(leftovers.is_empty(), "{leftovers:?}");
    for file in &netns_files {
        assert!(!file.exists(), "{} is still there", file.display());
    }
    eprintln!(
        "real node: started in {booted:?}, Ready after {ready_after:?}, pod running after \
         {running_after:?}, pod gone after {gone_after:?}, torn down after {:?}",
        started.elapsed()
    );
    drop(plane);
    Ok(())
}

/// Waits (at most [`RUNNING_TIMEOUT`]) for a pod with the labels `selector`
/// to be Running with every container ready; on failure, says what the
/// pods, the control plane and the node's logs show.
async fn running_pod(
    pods: &Api<Pod>,
    selector: &str,
    plane: &mut ControlPlane,
    node: &RealNode,
) -> anyhow::Result<Pod> {
    let running = wait_for(
        &format!("a pod {selector} Running"),
        RUNNING_TIMEOUT,
        || {
            let pods = pods.clone();
            async move {
                let list = pods
                    .list(&ListParams::default().labels(selector))
                    .await
                    .ok()?;
                list.items.into_iter().find(|p| {
                    let status = p.status.as_ref();
                    status.and_then(|s| s.phase.as_deref()) == Some("Running")
                        && status
                            .and_then(|s| s.container_statuses.as_ref())
                            .is_some_and(|c| c.iter().all(|c| c.ready))
                })
            }
        },
    )
    .await;
    match running {
        Ok(p) => Ok(p),
        Err(e) => {
            let listed = pods.list(&ListParams::default()).await.ok();
            let plane_state = plane.check_running().err();
            Err(e.context(format!(
                "pods: {listed:?}\ncontrol plane: {plane_state:?}\n{}",
                node.logs(40)
            )))
        }
    }
}
