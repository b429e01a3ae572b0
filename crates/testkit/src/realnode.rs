//! A real node on this machine: kubelet, containerd, runc and a CNI bridge in
//! a network namespace of the test's own, registered with the test apiserver
//! ([`RealNode`]), and the control-plane pieces that serve nodes and
//! workloads, kube-controller-manager and kube-scheduler ([`ControlPlane`]).
//!
//! # Isolation
//!
//! Everything a node makes on the host is its own: the network namespace (the
//! kubelet, containerd, the CNI bridge `cni0` and the pods' links live in it;
//! the root namespace's links, routes and iptables are never touched), a folder
//! `aadpodid-realnode-<pid>-<n>` under the temporary folder (containerd's root,
//! state and sockets, runc's state, the kubelet's root folder and pod logs, the
//! CNI configuration and address leases), and a cgroup parent of the same name
//! at the top of every cgroup hierarchy. The kubelet and containerd run in
//! the host's mount namespace (the kubelet's volume mounts reach the
//! containers). The kubelet reaches the apiserver, which listens on the root
//! namespace's loopback, through the kit's relay (a Unix socket between
//! namespaces), as `system:node:<name>` with a certificate of its own; the
//! `kubernetes` Service's address leads there too (DNAT in the node's
//! namespace). [`Fabric`] joins nodes so their pods reach each other.
//!
//! # Images
//!
//! No registry is reachable: the sandbox image and the workload image are one
//! static binary each, made into an OCI archive by `tests/realnode/oci-image.sh`
//! and imported into the node's containerd. containerd is told the sandbox
//! image's name and pods name theirs with `imagePullPolicy: Never`.
//!
//! # Teardown
//!
//! Dropping a [`RealNode`] kills the kubelet, every process in its cgroup
//! parent, its containerd shims and containerd, unmounts what is mounted under
//! its folder, deletes the pods' network namespaces, removes the cgroups, the
//! folder and the node's namespace. A test deletes its workloads first when it
//! wants the kubelet's own teardown ([`RealNode::wait_no_pods`]). What a test
//! process that died left behind (the kubelet and containerd die with it;
//! shims, containers and the pods' network namespaces do not) is removed by
//! the next [`RealNode::start`]; [`RealNode::crash`] leaves the same for a
//! test to check.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::Client;
use kube::api::{Api, ListParams, PostParams};

use crate::cluster::{Cluster, remove_dead_owners};
use crate::fixtures::{fill_template, repo_root};
use crate::ids::unique_name;
use crate::kubectl::kubeconfig_yaml;
use crate::netns::NetNs;
use crate::tools::{BuiltTool, output_within};
use crate::wait_for;

/// The folder of the node binaries (`kubelet`, `kube-controller-manager`,
/// `kube-scheduler`, `pause`): built by `tests/cluster/build-node.sh` from the
/// apiserver's Kubernetes release (given 60 minutes when not cached yet) or
/// named by `$AADPODID_NODE_BIN`.
static NODE_BIN: BuiltTool =
    BuiltTool::new("tests/cluster/build-node.sh", Duration::from_secs(60 * 60)).named_by(
        "AADPODID_NODE_BIN",
        &[
            "kubelet",
            "kube-controller-manager",
            "kube-scheduler",
            "pause",
        ],
    );

/// The sandbox ("pause") image every real node's containerd is told to use;
/// imported at start, never pulled.
pub const SANDBOX_IMAGE: &str = "aadpodid.test/pause:1";

/// An image a pod can run on a real node (with `imagePullPolicy: Never`): the
/// same static `pause` binary, which runs until it is stopped.
pub const IDLE_IMAGE: &str = SANDBOX_IMAGE;

const DIR_PREFIX: &str = "aadpodid-realnode-";
const CONTAINERD_NS: &str = "k8s.io";
/// Where Debian's containernetworking-plugins put the CNI plugins.
const CNI_BIN: &str = "/usr/lib/cni";
/// The Debian packages a real node needs on the host.
const PACKAGES: [&str; 3] = ["containerd", "runc", "containernetworking-plugins"];
/// Bound on one `ctr`, `umount`, `openssl`, `ip` or `oci-image.sh` call.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on installing the packages when missing.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

/// The folder of the node binaries, built on first use.
pub fn node_bin_dir() -> anyhow::Result<PathBuf> {
    NODE_BIN.path()
}

/// kube-controller-manager and kube-scheduler for a [`Cluster`], on the root
/// namespace's loopback with the admin kubeconfig, no serving port and no
/// leader election. Killed on drop (and with the thread that started them).
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    children: Vec<Child>,
}

impl ControlPlane {
    /// Starts both; they run until the guard drops. Their logs go to
    /// `kube-controller-manager.log` and `kube-scheduler.log` in
    /// [`ControlPlane::dir`].
    pub fn start(cluster: &Cluster) -> anyhow::Result<ControlPlane> {
        let bin = node_bin_dir()?;
        let kubeconfig = cluster.kubeconfig();
        let certs = kubeconfig
            .parent()
            .context("the cluster's kubeconfig has no folder")?;
        let dir = std::env::temp_dir().join(unique_name("aadpodid-control-plane"));
        std::fs::create_dir_all(&dir)?;
        let mut plane = ControlPlane {
            dir,
            children: Vec::new(),
        };
        let kc = format!("--kubeconfig={}", kubeconfig.display());
        // No serving port (nothing here calls them), no leader election (one
        // of each).
        let common = [
            kc.as_str(),
            "--secure-port=0",
            "--leader-elect=false",
            "--v=1",
        ];
        let flex = format!(
            "--flex-volume-plugin-dir={}",
            plane.dir.join("flexvolume").display()
        );
        let root_ca = format!("--root-ca-file={}", certs.join("ca.crt").display());
        let sa_key = format!(
            "--service-account-private-key-file={}",
            certs.join("sa.key").display()
        );
        let controller_manager = plane.spawn(
            &bin.join("kube-controller-manager"),
            &[
                &common[..],
                &[
                    "--use-service-account-credentials=false",
                    // Its default is a host folder it would create.
                    &flex,
                    &root_ca,
                    &sa_key,
                ],
            ]
            .concat(),
        )?;
        plane.children.push(controller_manager);
        let scheduler = plane.spawn(&bin.join("kube-scheduler"), &common)?;
        plane.children.push(scheduler);
        Ok(plane)
    }

    /// The folder of the logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn spawn(&self, program: &Path, args: &[&str]) -> anyhow::Result<Child> {
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {name}"))
    }

    /// Fails when one of the processes has exited, with its log's tail.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        for (child, name) in self
            .children
            .iter_mut()
            .zip(["kube-controller-manager", "kube-scheduler"])
        {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{name} exited ({status}): {}",
                    log_tail(&self.dir.join(format!("{name}.log")), 20)
                );
            }
        }
        Ok(())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for c in &mut self.children {
            stop(c);
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One real node: its network namespace, containerd and kubelet, registered
/// with the cluster as [`RealNode::name`].
#[derive(Debug)]
pub struct RealNode {
    name: String,
    pod_cidr: String,
    node_ip: Ipv4Addr,
    dir: PathBuf,
    cgroup_root: String,
    relay: Child,
    containerd: Child,
    kubelet: Option<Child>,
    /// Set by [`RealNode::crash`]: the drop leaves the remains.
    crashed: bool,
    // Last: the namespace goes after everything that ran in it.
    ns: NetNs,
}

/// A network joining real nodes, as a cluster's node network and pod routes
/// would: a namespace of its own with a bridge, each node linked to it by a
/// veth pair (`uplink` in the node, `10.251.0.<n>/24` where the node's
/// address is `10.250.0.<n>`), and in each node a route to every other
/// node's pod range through that node's uplink. Deleted on drop (its
/// namespace, and with it every link).
#[derive(Debug)]
pub struct Fabric {
    ns: NetNs,
}

impl Fabric {
    /// Joins `nodes` (each at most once, and to one fabric).
    pub fn join(nodes: &[&RealNode]) -> anyhow::Result<Fabric> {
        let ns = NetNs::new("fabric")?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        for (i, node) in nodes.iter().enumerate() {
            let port = format!("port{i}");
            // Both ends are made inside test namespaces: the root namespace
            // never sees them.
            run_ok(
                Command::new("ip").args([
                    "link",
                    "add",
                    "name",
                    &port,
                    "netns",
                    ns.name(),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "uplink",
                    "netns",
                    node.ns.name(),
                ]),
                "ip link add",
                TOOL_TIMEOUT,
            )?;
            ns.ip(&["link", "set", &port, "master", "br0", "up"])?;
            let addr = format!("{}/24", node.uplink_ip());
            node.ns.ip(&["addr", "add", &addr, "dev", "uplink"])?;
            node.ns.ip(&["link", "set", "uplink", "up"])?;
        }
        for node in nodes {
            for other in nodes.iter().filter(|o| o.name != node.name) {
                let via = other.uplink_ip().to_string();
                node.ns
                    .ip(&["route", "add", other.pod_cidr(), "via", &via])?;
            }
        }
        Ok(Fabric { ns })
    }

    /// The fabric's namespace.
    pub fn netns(&self) -> &NetNs {
        &self.ns
    }
}

/// What a node that crashed left on the host ([`RealNode::crash`]).
#[derive(Debug)]
pub struct Remains {
    /// The node's folder.
    pub dir: PathBuf,
    /// The node's cgroup parent.
    pub cgroup_root: String,
}

impl Remains {
    /// What is left: see [`RealNode::leftovers`].
    pub fn leftovers(&self) -> Vec<String> {
        RealNode::leftovers(&self.dir, &self.cgroup_root)
    }

    /// The network namespace files of the pods still running in the node's
    /// cgroups.
    pub fn pod_netns_files(&self) -> Vec<PathBuf> {
        netns_files_of(&cgroup_processes(&self.cgroup_root))
    }

    /// Removes them as the next [`RealNode::start`] does for a node whose
    /// test process died.
    pub fn clean_up(self) {
        teardown(&self.dir, &self.cgroup_root);
        remove_host_folders();
    }
}

impl RealNode {
    /// Starts node `index` (0-199) of `cluster`: pods in `10.244.<100+index>.0/24`,
    /// the node's own address `10.250.0.<10+index>` inside its namespace.
    /// Returns when the kubelet runs; [`RealNode::wait_ready`] waits for the
    /// Node to be Ready. Installs the Debian packages when missing.
    pub async fn start(cluster: &Cluster, index: u8) -> anyhow::Result<RealNode> {
        RealNode::start_as(cluster, index, None).await
    }

    /// [`RealNode::start`] with the Node's `spec.providerID` (the kubelet's
    /// `providerID`) set to `provider_id` when given: the cloud machine the
    /// node is, as a cloud's node image sets it.
    pub async fn start_as(
        cluster: &Cluster,
        index: u8,
        provider_id: Option<&str>,
    ) -> anyhow::Result<RealNode> {
        if index >= 200 {
            bail!("at most 200 real nodes");
        }
        ensure_packages()?;
        let bin = node_bin_dir()?;
        remove_stale();

        // `aadpodid-realnode-<pid>-<n>`: the process ID tells a stale one.
        let base = unique_name(DIR_PREFIX.trim_end_matches('-'));
        let dir = std::env::temp_dir().join(&base);
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["cni/net.d", "kubelet", "pod-logs", "relay"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let cgroup_root = format!("/{base}");
        make_cgroups(&cgroup_root)?;

        let ns = match NetNs::new("realnode") {
            Ok(ns) => ns,
            Err(e) => {
                teardown(&dir, &cgroup_root);
                return Err(e);
            }
        };
        let name = unique_name("realnode");
        let pod_cidr = format!("10.244.{}.0/24", 100 + u16::from(index));
        let node_ip = Ipv4Addr::new(10, 250, 0, 10 + index);
        let parts = Parts {
            bin: &bin,
            dir: &dir,
            cgroup_root: &cgroup_root,
            name: &name,
            pod_cidr: &pod_cidr,
            node_ip,
            provider_id,
        };
        note_host_folders();
        match boot(cluster, &ns, &parts).await {
            Ok((relay, containerd, kubelet)) => Ok(RealNode {
                name,
                pod_cidr,
                node_ip,
                dir,
                cgroup_root,
                relay,
                containerd,
                kubelet: Some(kubelet),
                crashed: false,
                ns,
            }),
            Err(e) => {
                let logs = ["containerd.log", "kubelet.log"]
                    .map(|l| format!("{l}: {}", log_tail(&dir.join(l), 15)))
                    .join("\n");
                teardown(&dir, &cgroup_root);
                remove_host_folders();
                Err(e.context(logs))
            }
        }
    }

    /// The Node object's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pods' address range (the CNI bridge's).
    pub fn pod_cidr(&self) -> &str {
        &self.pod_cidr
    }

    /// The node's address (inside its namespace).
    pub fn node_ip(&self) -> Ipv4Addr {
        self.node_ip
    }

    /// The kubelet's kubeconfig: a client certificate for
    /// `system:node:<name>` (group `system:nodes`, bound to the ClusterRole
    /// `system:node`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubelet.kubeconfig")
    }

    /// The node's address on a [`Fabric`]: `10.251.0.<n>` for `10.250.0.<n>`.
    pub fn uplink_ip(&self) -> Ipv4Addr {
        let [_, _, _, n] = self.node_ip.octets();
        Ipv4Addr::new(10, 251, 0, n)
    }

    /// The node's network namespace.
    pub fn netns(&self) -> &NetNs {
        &self.ns
    }

    /// Imports the image archive `archive` (OCI layout, as `podman save
    /// --format oci-archive` or [`image_of_binary`] write it; its reference
    /// from its annotations) into the node's containerd, so pods can run it
    /// with `imagePullPolicy: Never`.
    pub fn import_image(&self, archive: &Path) -> anyhow::Result<()> {
        import_archive(&self.dir.join("containerd.sock"), archive)
    }

    /// The image references the node's containerd holds.
    pub fn images(&self) -> anyhow::Result<Vec<String>> {
        let out = ctr(&self.dir.join("containerd.sock"), &["images", "ls", "-q"])?;
        Ok(out.lines().map(str::to_string).collect())
    }

    /// The processes in the node's cgroups: its pods' sandboxes and
    /// containers.
    pub fn pod_processes(&self) -> Vec<u32> {
        cgroup_processes(&self.cgroup_root)
    }

    /// The node's cgroup parent (`/<name>` in every hierarchy).
    pub fn cgroup_root(&self) -> &str {
        &self.cgroup_root
    }

    /// The network namespace files of the pods containerd holds now.
    pub fn pod_netns_files(&self) -> Vec<PathBuf> {
        pod_network_namespaces(&self.dir.join("containerd.sock"))
    }

    /// What is left of a node that was dropped, given its folder and cgroup
    /// parent: the folder, its cgroups, processes whose command line names
    /// the folder (shims, containerd, the kubelet) and processes in its cgroups.
    pub fn leftovers(dir: &Path, cgroup_root: &str) -> Vec<String> {
        let mut out = Vec::new();
        if dir.exists() {
            out.push(format!("folder {}", dir.display()));
        }
        let rel = cgroup_root.trim_start_matches('/');
        for mount in cgroup_mounts() {
            if mount.join(rel).exists() {
                out.push(format!("cgroup {}", mount.join(rel).display()));
            }
        }
        for pid in cgroup_processes(cgroup_root) {
            out.push(format!("process {pid} in the cgroups"));
        }
        for pid in processes_naming(dir) {
            out.push(format!("process {pid} naming the folder"));
        }
        out
    }

    /// The node's folder (logs: `kubelet.log`, `containerd.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last `lines` lines of the kubelet's and containerd's logs.
    pub fn logs(&self, lines: usize) -> String {
        ["kubelet.log", "containerd.log"]
            .map(|l| format!("--- {l}\n{}", log_tail(&self.dir.join(l), lines)))
            .join("\n")
    }

    /// Waits (at most `timeout`) until the Node reports Ready; fails early,
    /// with the logs' tails, when the kubelet or containerd exits.
    pub async fn wait_ready(&mut self, client: &Client, timeout: Duration) -> anyhow::Result<Node> {
        let nodes: Api<Node> = Api::all(client.clone());
        let name = self.name.clone();
        let result = wait_for(&format!("node {name} Ready"), timeout, || {
            let nodes = nodes.clone();
            let name = name.clone();
            let exited = self.exited();
            async move {
                if let Some(e) = exited {
                    return Some(Err(anyhow::Error::msg(e)));
                }
                let node = nodes.get_opt(&name).await.ok().flatten()?;
                let ready = node
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                ready.then_some(Ok(node))
            }
        })
        .await;
        match result {
            Ok(Ok(node)) => Ok(node),
            Ok(Err(e)) => Err(e.context(self.logs(30))),
            Err(e) => Err(e.context(self.logs(30))),
        }
    }

    /// Waits (at most `timeout`) until the cluster lists no pod bound to this
    /// node and containerd runs no task (container or sandbox): the kubelet has stopped
    /// every pod (its containers, addresses and network namespaces).
    pub async fn wait_no_pods(&mut self, client: &Client, timeout: Duration) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::all(client.clone());
        let params = ListParams::default().fields(&format!("spec.nodeName={}", self.name));
        let sock = self.dir.join("containerd.sock");
        let result = wait_for(&format!("no pods on node {}", self.name), timeout, || {
            let pods = pods.clone();
            let params = params.clone();
            let sock = sock.clone();
            async move {
                let bound = pods.list(&params).await.ok()?;
                if !bound.items.is_empty() {
                    return None;
                }
                let tasks = ctr(&sock, &["tasks", "ls", "-q"]).ok()?;
                tasks.trim().is_empty().then_some(())
            }
        })
        .await;
        result.map_err(|e| e.context(self.logs(30)))
    }

    /// What ended, when the kubelet or containerd is no longer running.
    fn exited(&mut self) -> Option<String> {
        let dir = self.dir.clone();
        let check = |child: &mut Child, name: &str| {
            child.try_wait().ok().flatten().map(|status| {
                format!(
                    "{name} exited ({status}): {}",
                    log_tail(&dir.join(format!("{name}.log")), 20)
                )
            })
        };
        if let Some(k) = self.kubelet.as_mut()
            && let Some(e) = check(k, "kubelet")
        {
            return Some(e);
        }
        check(&mut self.containerd, "containerd")
    }
}

impl RealNode {
    /// Kills the kubelet, containerd and the relay (SIGKILL), as the death of
    /// the test process would, and leaves the rest: the shims, the pods'
    /// processes, cgroups and network namespaces, the folder. The node's
    /// network namespace goes.
    pub fn crash(mut self) -> Remains {
        self.crashed = true;
        self.stop_processes();
        Remains {
            dir: self.dir.clone(),
            cgroup_root: self.cgroup_root.clone(),
        }
    }
}

impl RealNode {
    /// Stops the kubelet (when still running), containerd and the relay.
    fn stop_processes(&mut self) {
        if let Some(mut k) = self.kubelet.take() {
            stop(&mut k);
        }
        stop(&mut self.containerd);
        stop(&mut self.relay);
    }
}

/// Kills `child` (SIGKILL) and reaps it.
fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for RealNode {
    fn drop(&mut self) {
        if self.crashed {
            return;
        }
        if let Some(mut k) = self.kubelet.take() {
            stop(&mut k);
        }
        // The pods' network namespaces, while containerd can still name them.
        let pod_netns = pod_network_namespaces(&self.dir.join("containerd.sock"));
        kill_containers(&self.dir, &self.cgroup_root);
        self.stop_processes();
        for path in pod_netns {
            remove_netns_file(&path);
        }
        teardown(&self.dir, &self.cgroup_root);
        remove_host_folders();
    }
}

/// Host folders a kubelet or containerd shim uses whatever it is told: the
/// kubelet's device-plugin socket and checkpoint, its container log links
/// (removed with their containers) and the shims' sockets (removed with
/// their tasks).
const HOST_FOLDERS: [&str; 4] = [
    "/var/lib/kubelet/device-plugins",
    "/var/lib/kubelet",
    "/var/log/containers",
    "/run/containerd/s",
];
/// Files of those folders a stopped kubelet leaves.
const KUBELET_LEFTOVERS: [&str; 2] = [
    "/var/lib/kubelet/device-plugins/kubelet.sock",
    "/var/lib/kubelet/device-plugins/kubelet_internal_checkpoint",
];

/// The [`HOST_FOLDERS`] (and `/run/containerd`) that did not exist before
/// this process started its first node, so that they are this process's own.
static CREATED_HOST_FOLDERS: std::sync::OnceLock<Vec<PathBuf>> = std::sync::OnceLock::new();
/// Nodes of this process that have started and not yet stopped.
static LIVE_NODES: std::sync::Mutex<usize> = std::sync::Mutex::new(0);

fn note_host_folders() {
    CREATED_HOST_FOLDERS.get_or_init(|| {
        HOST_FOLDERS
            .iter()
            .chain(&["/run/containerd"])
            .map(PathBuf::from)
            .filter(|p| !p.exists())
            .collect()
    });
    if let Ok(mut live) = LIVE_NODES.lock() {
        *live += 1;
    }
}

/// When the last node of this process stops: removes what the nodes left in
/// the host folders this process created, and those folders when empty.
fn remove_host_folders() {
    let Ok(mut live) = LIVE_NODES.lock() else {
        return;
    };
    *live = live.saturating_sub(1);
    if *live > 0 {
        return;
    }
    let Some(created) = CREATED_HOST_FOLDERS.get() else {
        return;
    };
    if created
        .iter()
        .any(|c| c == Path::new("/var/lib/kubelet/device-plugins"))
    {
        for file in KUBELET_LEFTOVERS {
            let _ = std::fs::remove_file(file);
        }
    }
    // Deepest first (the list is ordered so), and only when empty.
    for dir in HOST_FOLDERS.iter().chain(&["/run/containerd"]) {
        if created.iter().any(|c| c == Path::new(dir)) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A template's variable: (name, value).
type Var<'a> = (&'a str, &'a str);

/// What [`boot`] starts a node from.
struct Parts<'a> {
    bin: &'a Path,
    dir: &'a Path,
    cgroup_root: &'a str,
    name: &'a str,
    pod_cidr: &'a str,
    node_ip: Ipv4Addr,
    provider_id: Option<&'a str>,
}

/// The node's address, its relay to the apiserver, containerd (with the
/// images imported) and the kubelet, in that order.
async fn boot(
    cluster: &Cluster,
    ns: &NetNs,
    parts: &Parts<'_>,
) -> anyhow::Result<(Child, Child, Child)> {
    let dir = parts.dir;
    // The node's own address: on one end of a veth pair whose both ends stay
    // inside the node's namespace (the kubelet needs an address that is not
    // loopback to report).
    ns.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0-peer",
    ])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/24", parts.node_ip),
        "dev",
        "eth0",
    ])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["link", "set", "eth0-peer", "up"])?;
    // A node has a default route (the Service address must route before the
    // DNAT of locally sent packets applies); nothing answers behind it.
    ns.ip(&["route", "add", "default", "dev", "eth0"])?;
    ns.run("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"])?;

    // The apiserver at the same address inside the namespace as outside, so
    // kubeconfigs name one server and its certificate (127.0.0.1) fits.
    let api: SocketAddr = cluster
        .server()
        .trim_start_matches("https://")
        .parse()
        .context("the apiserver's address")?;
    // Also on the node's address, where the `kubernetes` Service leads.
    let on_node = SocketAddr::from((parts.node_ip, api.port()));
    let mut relay = ns
        .relay_many(&[(api, api), (on_node, api)], &dir.join("relay"))
        .await?;
    let mut prepared = kubernetes_service(cluster, ns, on_node).await;
    if prepared.is_ok() {
        prepared = node_credentials(cluster, parts).await;
    }
    let result = prepared.and_then(|()| start_runtime_and_kubelet(ns, parts));
    match result {
        Ok((containerd, kubelet)) => Ok((relay, containerd, kubelet)),
        Err(e) => {
            stop(&mut relay);
            Err(e)
        }
    }
}

/// Makes the `kubernetes` Service's address lead to the apiserver on this
/// node, as kube-proxy would (no kube-proxy runs): DNAT rules in the node's
/// namespace, for pods (PREROUTING) and for the node's own processes and
/// host-network pods (OUTPUT), to the relay on the node's address `on_node`.
/// The apiserver's certificate names 127.0.0.1 and localhost only, so a
/// client verifies it under one of those names.
async fn kubernetes_service(
    cluster: &Cluster,
    ns: &NetNs,
    on_node: SocketAddr,
) -> anyhow::Result<()> {
    let services: Api<Service> = Api::namespaced(cluster.admin_client().await?, "default");
    let service = services
        .get("kubernetes")
        .await
        .context("get Service default/kubernetes")?;
    let spec = service.spec.context("the kubernetes Service has no spec")?;
    let ip = spec
        .cluster_ip
        .context("the kubernetes Service has no cluster IP")?;
    let port = spec
        .ports
        .and_then(|p| p.first().map(|p| p.port))
        .context("the kubernetes Service has no port")?;
    for chain in ["PREROUTING", "OUTPUT"] {
        ns.run(
            "iptables",
            &[
                "-w",
                "-t",
                "nat",
                "-A",
                chain,
                "-d",
                &format!("{ip}/32"),
                "-p",
                "tcp",
                "--dport",
                &port.to_string(),
                "-j",
                "DNAT",
                "--to-destination",
                &on_node.to_string(),
            ],
        )?;
    }
    Ok(())
}

/// Name of the ClusterRoleBinding that gives the group `system:nodes` the
/// ClusterRole `system:node` (the test apiserver authorizes with RBAC only,
/// with no Node authorizer).
const NODES_BINDING: &str = "aadpodid-real-nodes";

/// The kubelet's own identity: a client certificate for
/// `system:node:<name>` in group `system:nodes`, signed by the cluster's CA,
/// in `kubelet.kubeconfig` of the node's folder; and the binding of that
/// group to the ClusterRole `system:node` (made once per cluster).
async fn node_credentials(cluster: &Cluster, parts: &Parts<'_>) -> anyhow::Result<()> {
    let certs = cluster
        .kubeconfig()
        .parent()
        .context("the cluster's kubeconfig has no folder")?;
    let dir = parts.dir;
    let (key, csr, crt, ext) = (
        dir.join("kubelet-client.key"),
        dir.join("kubelet-client.csr"),
        dir.join("kubelet-client.crt"),
        dir.join("kubelet-client.ext"),
    );
    std::fs::write(&ext, "extendedKeyUsage=clientAuth\n")?;
    let subject = format!("/O=system:nodes/CN=system:node:{}", parts.name);
    let openssl = |args: &[&str]| {
        run_ok(Command::new("openssl").args(args), "openssl", TOOL_TIMEOUT).map(drop)
    };
    let path = |p: &Path| p.display().to_string();
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &path(&key),
        "-out",
        &path(&csr),
        "-subj",
        &subject,
    ])?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &path(&csr),
        "-CA",
        &path(&certs.join("ca.crt")),
        "-CAkey",
        &path(&certs.join("ca.key")),
        "-CAcreateserial",
        "-CAserial",
        &path(&dir.join("ca.srl")),
        "-days",
        "2",
        "-out",
        &path(&crt),
        "-extfile",
        &path(&ext),
    ])?;
    std::fs::write(
        dir.join("kubelet.kubeconfig"),
        kubeconfig_yaml(
            cluster.server(),
            &certs.join("ca.crt"),
            &format!("system:node:{}", parts.name),
            &format!(
                "client-certificate: {}\n    client-key: {}",
                path(&crt),
                path(&key)
            ),
        ),
    )?;

    let bindings: Api<ClusterRoleBinding> = Api::all(cluster.admin_client().await?);
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": NODES_BINDING},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}],
    }))?;
    match bindings.create(&PostParams::default(), &binding).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context("create the nodes' ClusterRoleBinding")),
    }
}

fn start_runtime_and_kubelet(ns: &NetNs, parts: &Parts<'_>) -> anyhow::Result<(Child, Child)> {
    let dir = parts.dir;
    let dir_s = dir.display().to_string();
    let runc = which("runc")?;
    let runc = runc.display().to_string();
    let files: [(&str, &str, &[Var<'_>]); 3] = [
        (
            "containerd.toml",
            "containerd.toml",
            &[
                ("DIR", &dir_s),
                ("SANDBOX_IMAGE", SANDBOX_IMAGE),
                ("RUNC", &runc),
                ("CNI_BIN", CNI_BIN),
            ],
        ),
        (
            "cni.conflist",
            "cni/net.d/10-bridge.conflist",
            &[("DIR", &dir_s), ("POD_CIDR", parts.pod_cidr)],
        ),
        (
            "kubelet.yaml",
            "kubelet.yaml",
            &[("DIR", &dir_s), ("CGROUP_ROOT", parts.cgroup_root)],
        ),
    ];
    for (name, to, vars) in files {
        let path = repo_root().join("tests/realnode").join(name);
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        std::fs::write(dir.join(to), fill_template(&text, vars))?;
    }
    if let Some(id) = parts.provider_id {
        let config = dir.join("kubelet.yaml");
        let mut text = std::fs::read_to_string(&config)?;
        text.push_str(&format!("providerID: {}\n", serde_json::json!(id)));
        std::fs::write(&config, text)?;
    }

    let sock = dir.join("containerd.sock");
    let log = std::fs::File::create(dir.join("containerd.log"))?;
    let mut containerd = in_node_network(ns, Path::new("containerd"))
        .arg("--config")
        .arg(dir.join("containerd.toml"))
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("start containerd")?;
    let images = (|| -> anyhow::Result<()> {
        wait_for_socket(&mut containerd, &sock, Duration::from_secs(30))?;
        let archive = dir.join("pause.oci.tar");
        image_of_binary(&parts.bin.join("pause"), SANDBOX_IMAGE, &archive)?;
        import_archive(&sock, &archive)
    })();
    if let Err(e) = images {
        stop(&mut containerd);
        return Err(e);
    }

    let log = std::fs::File::create(dir.join("kubelet.log"))?;
    let kubelet = in_node_network(ns, &parts.bin.join("kubelet"))
        .arg(format!("--config={}", dir.join("kubelet.yaml").display()))
        .arg(format!(
            "--kubeconfig={}",
            dir.join("kubelet.kubeconfig").display()
        ))
        .arg(format!("--root-dir={}", dir.join("kubelet").display()))
        .arg(format!("--cert-dir={}", dir.join("kubelet/pki").display()))
        .arg(format!(
            "--volume-plugin-dir={}",
            dir.join("volume-plugins").display()
        ))
        .arg(format!("--hostname-override={}", parts.name))
        .arg(format!("--node-ip={}", parts.node_ip))
        .arg("--v=2")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn();
    match kubelet {
        Ok(k) => Ok((containerd, k)),
        Err(e) => {
            stop(&mut containerd);
            Err(anyhow::Error::new(e).context("start kubelet"))
        }
    }
}

/// A command that runs `program` in the node's network namespace but in the
/// host's mount namespace (`ip netns exec` would give it a mount namespace
/// of its own, with a `/sys` that has no cgroup mounts, and the kubelet's
/// volume mounts would not reach containerd). The process gets SIGKILL when
/// the thread that spawns it ends.
fn in_node_network(ns: &NetNs, program: &Path) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", ns.name()))
        .args(["--", "setpriv", "--pdeathsig", "KILL", "--"])
        .arg(program)
        .stdin(Stdio::null());
    cmd
}

/// Waits until containerd's socket exists (at most `timeout`), failing early
/// when containerd exits.
fn wait_for_socket(containerd: &mut Child, sock: &Path, timeout: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while !sock.exists() {
        if let Some(status) = containerd.try_wait()? {
            bail!("containerd exited ({status})");
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "containerd's socket {} not there after {timeout:?}",
                sock.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Writes an OCI image archive `archive` of the static binary `binary`
/// (a FROM-scratch image whose entrypoint it is) named `reference`
/// (`tests/realnode/oci-image.sh`).
pub fn image_of_binary(binary: &Path, reference: &str, archive: &Path) -> anyhow::Result<()> {
    run_ok(
        Command::new("bash")
            .arg(repo_root().join("tests/realnode/oci-image.sh"))
            .arg(binary)
            .arg(reference)
            .arg(archive),
        "oci-image.sh",
        TOOL_TIMEOUT,
    )
    .map(drop)
}

/// Imports the OCI (or Docker) image archive `archive` into the containerd
/// at `sock`, unpacked for the CRI's snapshotter.
fn import_archive(sock: &Path, archive: &Path) -> anyhow::Result<()> {
    ctr(
        sock,
        &[
            "images",
            "import",
            "--snapshotter",
            "native",
            &archive.display().to_string(),
        ],
    )
    .map(drop)
}

/// Runs `ctr` against the node's containerd in its Kubernetes namespace.
fn ctr(sock: &Path, args: &[&str]) -> anyhow::Result<String> {
    run_ok(
        Command::new("ctr")
            .arg("--address")
            .arg(sock)
            .args(["--namespace", CONTAINERD_NS])
            .args(args),
        &format!("ctr {args:?}"),
        TOOL_TIMEOUT,
    )
}

/// Runs `cmd` (at most `timeout`) and returns its stdout; fails with its
/// stderr when it does not succeed.
fn run_ok(cmd: &mut Command, what: &str, timeout: Duration) -> anyhow::Result<String> {
    let out = output_within(cmd.stderr(Stdio::piped()), what, timeout)?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The absolute path of `program` on `$PATH` (or in `/usr/sbin`, `/sbin`).
fn which(program: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not found"))
}

/// Installs the Debian packages a real node needs when one of its programs
/// is missing (once per process).
fn ensure_packages() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| install_packages().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn install_packages() -> anyhow::Result<()> {
    let present = which("containerd").is_ok()
        && which("containerd-shim-runc-v2").is_ok()
        && which("ctr").is_ok()
        && which("runc").is_ok()
        && Path::new(CNI_BIN).join("bridge").is_file()
        && Path::new(CNI_BIN).join("host-local").is_file();
    if present {
        return Ok(());
    }
    eprintln!("real node: installing {}", PACKAGES.join(" "));
    let apt = |args: &[&str]| -> anyhow::Result<()> {
        run_ok(
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            &format!("apt-get {args:?}"),
            INSTALL_TIMEOUT,
        )
        .map(drop)
    };
    apt(&["update", "-q"])?;
    apt(&[
        &["install", "-y", "-q", "--no-install-recommends"][..],
        &PACKAGES[..],
    ]
    .concat())
}

/// The cgroup hierarchies mounted under `/sys/fs/cgroup` (v1 controllers, the
/// named `systemd` one and, on a hybrid host, `unified`), or the root itself
/// on a v2-only host.
fn cgroup_mounts() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()];
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists())
        .collect();
    out.sort();
    out
}

/// Creates the node's cgroup parent `root` in every hierarchy (the kubelet
/// checks that it exists); a new cpuset gets its parent's CPUs and memory
/// nodes, or nothing could join it.
fn make_cgroups(root: &str) -> anyhow::Result<()> {
    let rel = root.trim_start_matches('/');
    for mount in cgroup_mounts() {
        let dir = mount.join(rel);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(v) = std::fs::read_to_string(mount.join(file)) {
                std::fs::write(dir.join(file), v.trim())
                    .with_context(|| format!("write {}", dir.join(file).display()))?;
            }
        }
    }
    Ok(())
}

/// The cgroups at and under `root` in every hierarchy, each after its
/// parent. Bounded: a node's tree is a few levels of a few cgroups.
fn cgroup_dirs(root: &str) -> Vec<PathBuf> {
    let rel = root.trim_start_matches('/');
    let mut dirs = Vec::new();
    for mount in cgroup_mounts() {
        let mut todo = vec![mount.join(rel)];
        while let Some(dir) = todo.pop() {
            if dirs.len() > 10_000 {
                break;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            todo.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
            dirs.push(dir);
        }
    }
    dirs
}

/// Every process in the cgroups under `root` (in any hierarchy).
fn cgroup_processes(root: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = cgroup_dirs(root)
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Removes the cgroups under `root` in every hierarchy, deepest first.
fn remove_cgroups(root: &str) {
    for dir in cgroup_dirs(root).iter().rev() {
        let _ = std::fs::remove_dir(dir);
    }
}

/// The processes whose command line has an argument that names `dir` or a
/// path under it, and whose program matches `program` (any when `None`).
fn processes_matching(dir: &Path, program: Option<&str>) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<_> = c.split(|b| *b == 0).map(String::from_utf8_lossy).collect();
                let names_dir = args.iter().any(|a| {
                    a.split('=')
                        .any(|part| !part.is_empty() && Path::new(part).starts_with(dir))
                });
                let runs = program.is_none_or(|p| args.first().is_some_and(|a| a.contains(p)));
                names_dir && runs
            })
        })
        .collect()
}

/// Processes whose command line names `dir` or a path under it.
fn processes_naming(dir: &Path) -> Vec<u32> {
    processes_matching(dir, None)
}

/// The containerd shims serving the containerd whose socket is under `dir`
/// (their command line names that socket).
fn shims_of(dir: &Path) -> Vec<u32> {
    processes_matching(dir, Some("containerd-shim"))
}

/// Kills (SIGKILL) every process in the node's cgroups and its containerd
/// shims, then waits (at most 10 s) until they are gone, and removes the
/// shims' sockets.
fn kill_containers(dir: &Path, cgroup_root: &str) {
    let mut sockets = Vec::new();
    let netns_files = netns_files_of(&cgroup_processes(cgroup_root));
    for _ in 0..100 {
        let shims = shims_of(dir);
        sockets.extend(shims.iter().filter_map(|pid| shim_socket(*pid)));
        let mut pids = cgroup_processes(cgroup_root);
        pids.extend(shims);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for socket in sockets {
        let _ = std::fs::remove_file(socket);
    }
    for file in netns_files {
        remove_netns_file(&file);
    }
}

/// The files in `/run/netns` that name the network namespace of one of
/// `pids` (same namespace inode), other than the kit's own namespaces: the
/// pods' namespaces containerd made, found without containerd.
fn netns_files_of(pids: &[u32]) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let inodes: std::collections::BTreeSet<(u64, u64)> = pids
        .iter()
        .filter_map(|pid| std::fs::metadata(format!("/proc/{pid}/ns/net")).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("cni-"))
        })
        .filter(|e| std::fs::metadata(e.path()).is_ok_and(|m| inodes.contains(&(m.dev(), m.ino()))))
        .map(|e| e.path())
        .collect()
}

/// The socket a containerd 1.6 shim listens on: under `/run/containerd/s`,
/// named by the SHA-256 of `<containerd address>/<namespace>/<id>` (read
/// from the shim's `-address`, `-namespace` and `-id` arguments).
fn shim_socket(pid: u32) -> Option<PathBuf> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let key = format!(
        "{}/{}/{}",
        flag("-address")?,
        flag("-namespace")?,
        flag("-id")?
    );
    let out = Command::new("sh")
        .args(["-c", "printf %s \"$1\" | sha256sum", "sh", &key])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let sum = text.split_whitespace().next()?;
    Some(Path::new("/run/containerd/s").join(sum))
}

/// Removes the kubelet's links in `/var/log/containers` to logs under `dir`
/// (it removes them itself only with their containers).
fn remove_log_links(dir: &Path) {
    let Ok(entries) = std::fs::read_dir("/var/log/containers") else {
        return;
    };
    for entry in entries.flatten() {
        if std::fs::read_link(entry.path()).is_ok_and(|t| t.starts_with(dir)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The network namespace files of the pods containerd knows (the sandboxes'
/// `network` namespace paths), read before containerd stops.
fn pod_network_namespaces(sock: &Path) -> Vec<PathBuf> {
    let Ok(ids) = ctr(sock, &["containers", "ls", "-q"]) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for id in ids.split_whitespace().take(1000) {
        let Ok(info) = ctr(sock, &["containers", "info", id]) else {
            continue;
        };
        let Ok(info) = serde_json::from_str::<serde_json::Value>(&info) else {
            continue;
        };
        let namespaces = info
            .pointer("/Spec/linux/namespaces")
            .and_then(|n| n.as_array())
            .cloned()
            .unwrap_or_default();
        for n in namespaces {
            if n.get("type").and_then(|t| t.as_str()) == Some("network")
                && let Some(path) = n.get("path").and_then(|p| p.as_str())
                && !path.is_empty()
                && !path.starts_with("/proc/")
            {
                out.push(PathBuf::from(path));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Unmounts and removes a pod's network namespace file.
fn remove_netns_file(path: &Path) {
    umount(path);
    let _ = std::fs::remove_file(path);
}

fn umount(path: &Path) {
    let _ = output_within(
        Command::new("umount")
            .arg("--lazy")
            .arg(path)
            .stderr(Stdio::null()),
        "umount",
        TOOL_TIMEOUT,
    );
}

/// What is mounted at or under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

/// Removes what a node left on the host once its kubelet and containerd are
/// gone: its containers, shims and their sockets, its container log links,
/// mounts under its folder, its cgroups and the folder.
fn teardown(dir: &Path, cgroup_root: &str) {
    kill_containers(dir, cgroup_root);
    remove_log_links(dir);
    for m in mounts_under(dir) {
        umount(&m);
    }
    remove_cgroups(cgroup_root);
    let _ = std::fs::remove_dir_all(dir);
}

/// Tears down the nodes of test processes that no longer run (their folder
/// and cgroup parent carry the process ID).
fn remove_stale() {
    remove_dead_owners(&std::env::temp_dir(), DIR_PREFIX, |path, name| {
        teardown(path, &format!("/{name}"));
    });
}

/// The last `lines` lines of the file at `path` (empty when unreadable).
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_tail_keeps_the_last_lines() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(unique_name("realnode-log"));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("a.log");
        std::fs::write(&path, "1\n2\n3\n")?;
        assert_eq!(log_tail(&path, 2), "2\n3");
        assert_eq!(log_tail(&path, 10), "1\n2\n3");
        assert_eq!(log_tail(&dir.join("missing.log"), 2), "");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
