//! A real node: kubelet, containerd, runc and a CNI bridge in a network
//! namespace of the test's own, joined to the test apiserver, with
//! kube-controller-manager and kube-scheduler beside the apiserver. A
//! Deployment's pod, placed by the scheduler, runs there; with two such
//! nodes (on a cluster of their own), two replicas that may not share a node
//! run one on each and, once a fabric joins the nodes, reach each other.
//! Teardown leaves nothing, whether the node is dropped with a pod running
//! or crashes and is cleaned up after.
//!
//! Needs root and Debian's containerd, runc and containernetworking-plugins
//! (installed on first use when missing); the node binaries come from
//! `tests/cluster/build-node.sh` (or `$AADPODID_NODE_BIN`).

use std::path::Path;
use std::time::{Duration, Instant};

use aadpodid_testkit::Cluster;
use aadpodid_testkit::realnode::{
    ControlPlane, Fabric, IDLE_IMAGE, RealNode, image_of_binary, node_bin_dir,
};
use aadpodid_testkit::wait_for;
use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
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
    // The kubelet is the node itself to the apiserver, not an admin.
    let whoami = aadpodid_testkit::run_kubectl(
        cluster.kubectl_with(&node.kubeconfig()),
        &["auth", "whoami", "-o", "json"],
        None,
    )?;
    let review: serde_json::Value = serde_json::from_str(&whoami.stdout)
        .with_context(|| format!("kubectl auth whoami: {whoami:?}"))?;
    let user = &review["status"]["userInfo"];
    assert_eq!(
        user["username"].as_str(),
        Some(format!("system:node:{}", node.name()).as_str()),
        "{review}"
    );
    assert_eq!(user["groups"][0].as_str(), Some("system:nodes"), "{review}");
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
    let deployment = idle_deployment("idle", 1, None)?;
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .context("create the Deployment")?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let running = running_pods(&pods, "app=idle", 1, &mut plane, &[&node])
        .await?
        .remove(0);
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

    // The `kubernetes` Service's address leads to the apiserver, from the
    // pod and from the node itself (as for a host-network pod): TLS verified
    // with the cluster's CA (under the name the certificate has), and the
    // apiserver answers (401: no credentials are sent).
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let service = services.get("kubernetes").await?;
    let service_ip = service
        .spec
        .and_then(|s| s.cluster_ip)
        .context("no cluster IP")?;
    let ca = cluster
        .kubeconfig()
        .parent()
        .context("kubeconfig folder")?
        .join("ca.crt");
    let pod_netns = node.pod_netns_files();
    let [pod_netns] = pod_netns.as_slice() else {
        anyhow::bail!("one pod network namespace expected: {pod_netns:?}");
    };
    let from_pod = https_status_line(Some(pod_netns), &node, &service_ip, &ca)?;
    let from_node = https_status_line(None, &node, &service_ip, &ca)?;
    for answer in [&from_pod, &from_node] {
        assert!(
            answer.starts_with("HTTP/1.1 401"),
            "{from_pod:?} {from_node:?}"
        );
    }

    // Deleting the Deployment: the kubelet stops the container, releases the
    // address and removes the sandbox.
    deployments
        .delete("idle", &DeleteParams::foreground())
        .await
        .context("delete the Deployment")?;
    node.wait_no_pods(&client, GONE_TIMEOUT).await?;
    let gone_after = started.elapsed();

    // A host-network pod (as nmi's) runs in the node's own namespace: its
    // address is the node's.
    let host = json!({
        "hostNetwork": true,
        "automountServiceAccountToken": false,
        "containers": [{"name": "idle", "image": IDLE_IMAGE, "imagePullPolicy": "Never"}],
    });
    let host = run_pod(&pods, "host-network", host, &mut plane, &node).await?;
    let host_ip = host.status.as_ref().and_then(|s| s.pod_ip.clone());
    assert_eq!(host_ip, Some(node.node_ip().to_string()), "{host:?}");

    // An image the test imports runs too (made of the same static binary,
    // under a name of its own).
    let image = "aadpodid.test/imported:1";
    let archive = node.dir().join("imported.oci.tar");
    image_of_binary(&node_bin_dir()?.join("pause"), image, &archive)?;
    node.import_image(&archive)?;
    let images = node.images()?;
    assert!(images.iter().any(|i| i == image), "{images:?}");

    // A plain Pod without a node name is scheduled too; the node is then
    // dropped with it running: its teardown kills the pod's processes and
    // shims and removes the pod's network namespace, cgroups and folder.
    let left = json!({
        "automountServiceAccountToken": false,
        // Made by the controller manager in every namespace.
        "serviceAccountName": "default",
        "containers": [{
            "name": "idle",
            "image": image,
            "imagePullPolicy": "Never",
            "volumeMounts": [{"name": "token", "mountPath": "/var/run/secrets/tokens"}],
        }],
        // A token the kubelet asks for and mounts (the apiserver's
        // ServiceAccount admission is off, so the pod names it).
        "volumes": [{"name": "token", "projected": {"sources": [{
            "serviceAccountToken": {"path": "token", "expirationSeconds": 3600},
        }]}}],
    });
    let left = run_pod(&pods, "left-running", left, &mut plane, &node).await?;
    let spec = left.spec.as_ref().context("pod without spec")?;
    assert_eq!(spec.node_name.as_deref(), Some(node.name()), "{left:?}");
    plane.check_running()?;
    let netns_files = node.pod_netns_files();
    assert!(!netns_files.is_empty(), "no pod network namespace");
    // The kubelet's volume mount reached the container: its token, seen
    // through the container's root, is the pod's ServiceAccount's.
    let token = node
        .pod_processes()
        .into_iter()
        .find_map(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/root/var/run/secrets/tokens/token")).ok()
        })
        .context("no container sees the token")?;
    let claims = token.split('.').nth(1).context("not a JWT")?;
    let claims: serde_json::Value = serde_json::from_slice(&base64::Engine::decode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        claims,
    )?)?;
    assert_eq!(
        claims["sub"].as_str(),
        Some(format!("system:serviceaccount:{}:default", ns.name()).as_str()),
        "{claims}"
    );
    // The node's identity was enough for everything the kubelet did.
    let kubelet_log = std::fs::read_to_string(node.dir().join("kubelet.log"))?;
    let refused: Vec<&str> = kubelet_log
        .lines()
        .filter(|l| l.contains("forbidden"))
        .take(5)
        .collect();
    assert!(refused.is_empty(), "{refused:#?}");
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

/// Asks `https://<ip>:443/version` from the pod network namespace file
/// `pod_netns` (the node's namespace when `None`), verifying the server with
/// `ca` under the name `localhost`; returns the answer's status line.
fn https_status_line(
    pod_netns: Option<&Path>,
    node: &RealNode,
    ip: &str,
    ca: &Path,
) -> anyhow::Result<String> {
    const SCRIPT: &str = r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
with socket.create_connection((sys.argv[1], 443), timeout=10) as s:
    with ctx.wrap_socket(s, server_hostname="localhost") as t:
        t.sendall(b"GET /version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        print(t.recv(200).split(b"\r\n")[0].decode())
"#;
    let ca = ca.display().to_string();
    match pod_netns {
        Some(file) => python_in_pod(file, SCRIPT, &[ip, &ca]),
        None => Ok(node
            .netns()
            .run("python3", &["-c", SCRIPT, ip, &ca])?
            .trim()
            .to_string()),
    }
}

/// Runs the Python `script` with `args` in the pod network namespace file
/// `pod_netns` (at most 30 s); returns its trimmed stdout.
fn python_in_pod(pod_netns: &Path, script: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", pod_netns.display()))
        .args(["--", "timeout", "30", "python3", "-c", script])
        .args(args)
        .output()
        .context("run nsenter")?;
    anyhow::ensure!(
        out.status.success(),
        "python3 in {} failed: {}",
        pod_netns.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// How a TCP connection from the pod network namespace file `pod_netns` to
/// `ip:80` ends within 5 s: `refused` (the address answered; nothing listens
/// there), `open`, or the error.
fn tcp_probe(pod_netns: &Path, ip: &str) -> anyhow::Result<String> {
    const SCRIPT: &str = r#"
import socket, sys
s = socket.socket()
s.settimeout(5)
try:
    s.connect((sys.argv[1], 80))
    print("open")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print("error", e)
"#;
    python_in_pod(pod_netns, SCRIPT, &[ip])
}

/// Creates Pod `name` (label `app=<name>`) with `spec` and waits until it
/// runs (see [`running_pods`]).
async fn run_pod(
    pods: &Api<Pod>,
    name: &str,
    spec: serde_json::Value,
    plane: &mut ControlPlane,
    node: &RealNode,
) -> anyhow::Result<Pod> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": spec,
    }))?;
    pods.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("create Pod {name}"))?;
    let mut running = running_pods(pods, &format!("app={name}"), 1, plane, &[node]).await?;
    Ok(running.remove(0))
}

/// A Deployment `name` of `replicas` idle pods labelled `app=<name>`, with
/// `affinity` when given; no node named.
fn idle_deployment(
    name: &str,
    replicas: i32,
    affinity: Option<serde_json::Value>,
) -> anyhow::Result<Deployment> {
    let mut spec = json!({
        "automountServiceAccountToken": false,
        "terminationGracePeriodSeconds": 2,
        "containers": [{"name": "idle", "image": IDLE_IMAGE, "imagePullPolicy": "Never"}],
    });
    if let Some(a) = affinity {
        spec["affinity"] = a;
    }
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
        },
    }))?)
}

/// Waits (at most [`RUNNING_TIMEOUT`]) for `count` pods with the labels
/// `selector` to be Running with every container ready; on failure, says
/// what the pods, the control plane and the nodes' logs show.
async fn running_pods(
    pods: &Api<Pod>,
    selector: &str,
    count: usize,
    plane: &mut ControlPlane,
    nodes: &[&RealNode],
) -> anyhow::Result<Vec<Pod>> {
    let what = format!("{count} pods {selector} Running");
    let running = wait_for(&what, RUNNING_TIMEOUT, || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels(selector))
                .await
                .ok()?;
            let running: Vec<Pod> = list
                .items
                .into_iter()
                .filter(|p| {
                    let status = p.status.as_ref();
                    status.and_then(|s| s.phase.as_deref()) == Some("Running")
                        && status
                            .and_then(|s| s.container_statuses.as_ref())
                            .is_some_and(|c| c.iter().all(|c| c.ready))
                })
                .collect();
            (running.len() == count).then_some(running)
        }
    })
    .await;
    match running {
        Ok(p) => Ok(p),
        Err(e) => {
            let listed = pods.list(&ListParams::default()).await.ok();
            let plane_state = plane.check_running().err();
            let logs: Vec<String> = nodes.iter().map(|n| n.logs(40)).collect();
            Err(e.context(format!(
                "pods: {listed:?}\ncontrol plane: {plane_state:?}\n{}",
                logs.join("\n")
            )))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_real_nodes_each_run_a_replica() -> anyhow::Result<()> {
    let cluster = aadpodid_testkit::PrivateCluster::start().await?;
    let client = cluster.admin_client().await?;
    let started = Instant::now();
    let mut plane = ControlPlane::start(&cluster)?;
    let mut first = RealNode::start(&cluster, 0).await?;
    let mut second = RealNode::start(&cluster, 1).await?;
    first.wait_ready(&client, READY_TIMEOUT).await?;
    second.wait_ready(&client, READY_TIMEOUT).await?;
    let ready_after = started.elapsed();

    // Two replicas that may not share a node: one lands on each.
    let ns = cluster.temp_namespace("realnodes").await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns.name());
    let deployment = idle_deployment(
        "spread",
        2,
        Some(
            json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
                "labelSelector": {"matchLabels": {"app": "spread"}},
                "topologyKey": "kubernetes.io/hostname",
            }]}}),
        ),
    )?;
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .context("create the Deployment")?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let running = running_pods(&pods, "app=spread", 2, &mut plane, &[&first, &second]).await?;
    let mut placed: Vec<String> = running
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    placed.sort();
    let mut want = vec![first.name().to_string(), second.name().to_string()];
    want.sort();
    assert_eq!(placed, want);
    // Each pod has an address of its own node's range.
    for pod in &running {
        let node = [&first, &second]
            .into_iter()
            .find(|n| pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(n.name()))
            .context("pod on no test node")?;
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref());
        let prefix = node.pod_cidr().trim_end_matches("0/24");
        assert!(
            ip.is_some_and(|ip| ip.starts_with(prefix)),
            "{ip:?} not in {}",
            node.pod_cidr()
        );
    }
    let running_after = started.elapsed();

    // Alone, a node has no way to the other's pods; joined by a fabric, each
    // routes to the other's pod range and a pod reaches the pod on the
    // other node (which refuses the connection: nothing listens, but its
    // address answers).
    let ip_of = |node: &RealNode| {
        running
            .iter()
            .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.name()))
            .and_then(|p| p.status.as_ref()?.pod_ip.clone())
            .context("no pod IP")
    };
    let (first_ip, second_ip) = (ip_of(&first)?, ip_of(&second)?);
    let first_netns = first.pod_netns_files();
    let second_netns = second.pod_netns_files();
    let (Some(from_first), Some(from_second)) = (first_netns.first(), second_netns.first()) else {
        anyhow::bail!("pod network namespaces: {first_netns:?} {second_netns:?}");
    };
    let alone = tcp_probe(from_first, &second_ip)?;
    assert!(alone.starts_with("error"), "{alone}");
    let fabric = Fabric::join(&[&first, &second])?;
    assert_eq!(tcp_probe(from_first, &second_ip)?, "refused");
    assert_eq!(tcp_probe(from_second, &first_ip)?, "refused");

    // The second node crashes with its replica running (its kubelet and
    // containerd die as with the test process): the pod's processes, cgroups
    // and network namespace stay until the clean-up a later start does.
    let remains = second.crash();
    let pod_netns = remains.pod_netns_files();
    assert!(
        !pod_netns.is_empty(),
        "no pod network namespace after the crash"
    );
    assert!(!remains.leftovers().is_empty(), "a crash left nothing");
    let dir = remains.dir.clone();
    let cgroup_root = remains.cgroup_root.clone();
    remains.clean_up();
    let leftovers = RealNode::leftovers(&dir, &cgroup_root);
    assert!(leftovers.is_empty(), "{leftovers:?}");
    for file in &pod_netns {
        assert!(!file.exists(), "{} is still there", file.display());
    }

    deployments
        .delete("spread", &DeleteParams::foreground())
        .await
        .context("delete the Deployment")?;
    first.wait_no_pods(&client, GONE_TIMEOUT).await?;
    let (dir, cgroup_root) = (first.dir().to_path_buf(), first.cgroup_root().to_string());
    drop(first);
    drop(fabric);
    let leftovers = RealNode::leftovers(&dir, &cgroup_root);
    assert!(leftovers.is_empty(), "{leftovers:?}");
    eprintln!(
        "two real nodes: Ready after {ready_after:?}, both replicas running after \
         {running_after:?}, done after {:?}",
        started.elapsed()
    );
    drop(plane);
    Ok(())
}
