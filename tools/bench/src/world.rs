//! One subject's world: an emulator (realistic Compute buckets, sped-up
//! clock), Node objects for its scale sets, namespaces, identities and
//! bindings, the child processes, and NMI's node namespace.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use aadpodid_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec,
    AzureIdentitySpec,
};
use aadpodid_testkit::netns::{self, IMDS_ADDRESS, NetNs};
use aadpodid_testkit::procfs;
use aadpodid_testkit::relay::{read_until_ready, unix_to_tcp};
use aadpodid_testkit::tenant::{self, CloudEnvironment, MicCloud, MicCloudFiles, Tenant};
use aadpodid_testkit::world::curl_in;
use aadpodid_testkit::{Cluster, TempNamespace, unique_name};
use anyhow::{Context as _, bail};
use azure_emulator::Emulator;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::{ROLE_ENV, Scale};

// The bench's own tenant names: its node group and identity group, MIC's
// service principal and the kubelet identity's client ID.
pub(crate) const NODE_RG: &str = "MC_bench_cluster_eastus";
pub(crate) const APP_RG: &str = "bench-ids";
pub(crate) const MIC_CLIENT: &str = "5b1c2c4e-0000-4000-8000-00000000b3c4";
pub(crate) const MIC_SECRET: &str = "bench-s3cr3t";
pub(crate) const KUBELET_CLIENT: &str = "c0000000-0000-4000-8000-0000000000bb";
/// The token request every client makes (ARM, as the Azure SDKs do).
pub(crate) use aadpodid_testkit::world::TOKEN_PATH;
/// NMI's probe port inside its node namespace.
pub(crate) const NMI_PROBE_PORT: u16 = 8085;
const API_RELAY_PORT: u16 = 6443;

pub(crate) fn id_name(j: usize) -> String {
    format!("id-{j}")
}

pub(crate) fn id_client(j: usize) -> String {
    format!("c0000000-0000-4000-8000-{j:012}")
}

pub(crate) fn selector(j: usize) -> String {
    format!("sel-{j}")
}

/// A child process killed when dropped; `pid` is the program itself (not
/// the `ip netns exec`/`setpriv` wrapper, which normally execs in place).
#[derive(Debug)]
pub(crate) struct Proc {
    child: Child,
    pub pid: u32,
    pub log: PathBuf,
}

impl Proc {
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.pid != self.child.id() {
            let _ = Command::new("kill")
                .arg(self.pid.to_string())
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type SpawnJob = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from one thread that lives as long as the bench, so the
/// `setpriv --pdeathsig KILL` of a child fires only when the bench ends.
pub(crate) fn spawn_kept(mut cmd: Command) -> anyhow::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        let _ = std::thread::Builder::new()
            .name("bench-spawner".into())
            .spawn(move || {
                while let Ok((mut cmd, back)) = rx.recv() {
                    let _ = back.send(cmd.spawn());
                }
                loop {
                    std::thread::park();
                }
            });
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    keeper
        .lock()
        .map_err(|_| anyhow::anyhow!("spawner lock poisoned"))?
        .send((std::mem::replace(&mut cmd, Command::new("true")), tx))
        .map_err(|_| anyhow::anyhow!("spawner thread is gone"))?;
    Ok(rx.recv().context("spawner thread is gone")??)
}

/// Spawns a kept child with its stderr in `log`, and finds the pid of `exe`.
pub(crate) fn start_proc(mut cmd: Command, exe: &Path, log: PathBuf) -> anyhow::Result<Proc> {
    let file = std::fs::File::create(&log)?;
    cmd.stdout(Stdio::null()).stderr(file);
    let child = spawn_kept(cmd)?;
    let wrapper = child.id();
    // Give the wrappers a moment to exec.
    let mut pid = None;
    for _ in 0..50 {
        pid = procfs::find_exe(wrapper, exe);
        if pid.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Proc {
        child,
        pid: pid.unwrap_or(wrapper),
        log,
    })
}

/// The running bench's own executable (children are this binary), through
/// `/proc/<pid>/exe`: it still runs this very binary when a rebuild has
/// replaced the file meanwhile (other builds share the target directory).
pub(crate) fn self_exe() -> anyhow::Result<PathBuf> {
    Ok(PathBuf::from(format!("/proc/{}/exe", std::process::id())))
}

/// Keep each world's folder (logs of MIC and NMI) after the run.
pub(crate) static KEEP_LOGS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Runs `f` on up to `limit` items at a time.
pub(crate) async fn for_each_concurrent<I, F, Fut>(
    items: I,
    limit: usize,
    f: F,
) -> anyhow::Result<()>
where
    I: IntoIterator,
    F: Fn(I::Item) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for item in items {
        if set.len() >= limit
            && let Some(r) = set.join_next().await
        {
            r??;
        }
        set.spawn(f(item));
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

pub(crate) struct World {
    pub scale: Scale,
    pub cluster: &'static Cluster,
    pub client: Client,
    pub dir: PathBuf,
    pub emu: Emulator,
    /// Pods of NMI's node (rows 1, 3, 4).
    pub ns_nmi: TempNamespace,
    /// Pods of the burst (row 2).
    pub ns_burst: TempNamespace,
    /// Pods added for MIC's 10,000 (row 4).
    pub ns_big: TempNamespace,
    /// Identities and bindings.
    pub ns_ids: TempNamespace,
    pub vmss: Vec<String>,
    /// Nodes of the scale sets: `nodes[k * nodes_per_vmss + i]` is instance i of vmss k.
    pub nodes: Vec<String>,
    pub nmi_vmss: String,
    pub nmi_node: String,
    pub ids_created: usize,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("dir", &self.dir)
            .field("vmss", &self.vmss)
            .field("nmi_node", &self.nmi_node)
            .finish_non_exhaustive()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if KEEP_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!("logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl World {
    pub async fn new(tag: &str, scale: &Scale) -> anyhow::Result<World> {
        let cluster = Cluster::shared();
        let client = cluster.admin_client().await?;
        let dir = std::env::temp_dir().join(unique_name(&format!("bench-{tag}")));
        std::fs::create_dir_all(&dir)?;
        let vmss: Vec<String> = (0..scale.vmss).map(|k| format!("{tag}-vmss{k}")).collect();
        let nmi_vmss = format!("{tag}-nmi");
        let emu = emulator_config(scale, &vmss, &nmi_vmss).start().await?;
        let nodes = vmss
            .iter()
            .flat_map(|v| (0..scale.nodes_per_vmss).map(move |i| format!("{v}-{i}")))
            .collect();
        let namespace = |what: &str| {
            let name = format!("bench-{tag}-{what}");
            async move { cluster.temp_namespace(&name).await }
        };
        let w = World {
            scale: scale.clone(),
            cluster,
            client,
            dir,
            emu,
            ns_nmi: namespace("nmi").await?,
            ns_burst: namespace("burst").await?,
            ns_big: namespace("big").await?,
            ns_ids: namespace("ids").await?,
            nmi_node: format!("{nmi_vmss}-0"),
            vmss,
            nodes,
            nmi_vmss,
            ids_created: 0,
        };
        w.create_nodes().await?;
        Ok(w)
    }

    /// The Node objects of every scale set's instances and NMI's node.
    async fn create_nodes(&self) -> anyhow::Result<()> {
        let per_vmss = self.scale.nodes_per_vmss;
        for (n, node) in self.nodes.iter().enumerate() {
            self.create_node(node, &self.vmss[n / per_vmss], n % per_vmss)
                .await?;
        }
        self.create_node(&self.nmi_node, &self.nmi_vmss, 0).await
    }

    async fn create_node(&self, name: &str, vmss: &str, instance: usize) -> anyhow::Result<()> {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"providerID": tenant::vmss_provider_id(NODE_RG, vmss, instance)},
        }))?;
        Api::<Node>::all(self.client.clone())
            .create(&PostParams::default(), &node)
            .await
            .with_context(|| format!("create node {name}"))?;
        Ok(())
    }

    /// Deletes what this world put in the cluster (pods, identities,
    /// bindings, AAIs, nodes) so that the next subject's MIC starts from an
    /// empty cluster; best effort. Call with MIC stopped.
    pub async fn clear(&self) {
        let pod_namespaces = [
            self.ns_nmi.name().to_string(),
            self.ns_burst.name().to_string(),
            self.ns_big.name().to_string(),
        ];
        let now = DeleteParams::default().grace_period(0);
        let all = ListParams::default();
        for ns in &pod_namespaces {
            let _ = Api::<Pod>::namespaced(self.client.clone(), ns)
                .delete_collection(&now, &all)
                .await;
        }
        let ids = self.ns_ids.name();
        let _ = Api::<AzureIdentityBinding>::namespaced(self.client.clone(), ids)
            .delete_collection(&now, &all)
            .await;
        let _ = Api::<AzureIdentity>::namespaced(self.client.clone(), ids)
            .delete_collection(&now, &all)
            .await;
        self.delete_aais(&pod_namespaces).await;
        self.delete_nodes().await;
        self.wait_cleared(&pod_namespaces).await;
    }

    /// Deletes the AAIs of pods in `pod_namespaces`, finalizers first.
    async fn delete_aais(&self, pod_namespaces: &[String]) {
        let Ok(list) = Api::<AzureAssignedIdentity>::all(self.client.clone())
            .list(&ListParams::default())
            .await
        else {
            return;
        };
        let mine: Vec<(String, String)> = list
            .items
            .into_iter()
            .filter(|a| pod_namespaces.contains(&a.spec.pod_namespace))
            .filter_map(|a| Some((a.metadata.namespace?, a.metadata.name?)))
            .collect();
        let client = self.client.clone();
        let _ = for_each_concurrent(mine, 32, |(ns, name)| {
            let api = Api::<AzureAssignedIdentity>::namespaced(client.clone(), &ns);
            async move {
                // Both MICs put a finalizer on AAIs; with MIC stopped, take
                // it off so the delete completes.
                let _ = api
                    .patch(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                    )
                    .await;
                let _ = api.delete(&name, &DeleteParams::default()).await;
                Ok(())
            }
        })
        .await;
    }

    /// Waits (120 s at most) until no pod or AAI of `pod_namespaces` is
    /// listed any more, so that the next MIC cannot see any of them.
    async fn wait_cleared(&self, pod_namespaces: &[String]) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let mut left = 0;
            for ns in pod_namespaces {
                let pods = Api::<Pod>::namespaced(self.client.clone(), ns)
                    .list(&ListParams::default().limit(1))
                    .await
                    .map_or(1, |l| l.items.len());
                let aais = self.aai_counts(ns).await.map_or(1, |c| c.0);
                if std::env::var_os("BENCH_DEBUG").is_some() {
                    eprintln!("clearing {ns}: pods {pods}, AAIs {aais}");
                }
                left += pods + aais;
            }
            if left == 0 {
                break;
            }
            if Instant::now() + Duration::from_millis(600) >= deadline {
                eprintln!("clearing: {left} objects still listed after 120 s");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Deletes the Node objects (so a later subject's MIC ignores them).
    pub async fn delete_nodes(&self) {
        let api = Api::<Node>::all(self.client.clone());
        for n in self.nodes.iter().chain(std::iter::once(&self.nmi_node)) {
            let _ = api.delete(n, &Default::default()).await;
        }
    }

    /// AzureIdentity `id-j` and binding `sel-j` for every j below `n`.
    pub async fn ensure_identities(&mut self, n: usize) -> anyhow::Result<()> {
        let ns = self.ns_ids.name().to_string();
        let client = self.client.clone();
        for_each_concurrent(self.ids_created..n, 16, |j| {
            let (client, ns) = (client.clone(), ns.clone());
            async move {
                let mut id = AzureIdentity::new(
                    &id_name(j),
                    AzureIdentitySpec {
                        resource_id: tenant::uai_id(APP_RG, &id_name(j)),
                        client_id: id_client(j),
                        ..Default::default()
                    },
                );
                id.metadata.namespace = Some(ns.clone());
                Api::<AzureIdentity>::namespaced(client.clone(), &ns)
                    .create(&PostParams::default(), &id)
                    .await
                    .with_context(|| format!("create AzureIdentity {}", id_name(j)))?;
                let mut b = AzureIdentityBinding::new(
                    &format!("b-{j}"),
                    AzureIdentityBindingSpec {
                        azure_identity: id_name(j),
                        selector: selector(j),
                        weight: 0,
                    },
                );
                b.metadata.namespace = Some(ns.clone());
                Api::<AzureIdentityBinding>::namespaced(client, &ns)
                    .create(&PostParams::default(), &b)
                    .await
                    .with_context(|| format!("create binding b-{j}"))?;
                Ok(())
            }
        })
        .await?;
        self.ids_created = self.ids_created.max(n);
        Ok(())
    }

    /// Creates pods `(name, node, identity index, pod IP)` in `ns`, 32 at a
    /// time; a pod with an IP also gets `Running` and its IP through the
    /// status subresource (NMI maps callers by IP; MIC needs neither).
    pub async fn create_pods(
        &self,
        ns: &str,
        pods: Vec<(String, String, usize, Option<Ipv4Addr>)>,
    ) -> anyhow::Result<()> {
        let client = self.client.clone();
        let ns = ns.to_string();
        for_each_concurrent(pods, 32, |(name, node, j, ip)| {
            let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
            async move {
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": name, "labels": {"aadpodidbinding": selector(j)}},
                    "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}]},
                }))?;
                api.create(&PostParams::default(), &pod)
                    .await
                    .with_context(|| format!("create pod {name}"))?;
                if let Some(ip) = ip {
                    api.patch_status(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({
                            "status": {"phase": "Running", "podIP": ip.to_string(),
                                       "podIPs": [{"ip": ip.to_string()}]}
                        })),
                    )
                    .await
                    .with_context(|| format!("status of pod {name}"))?;
                }
                Ok(())
            }
        })
        .await
    }

    /// (AAIs of pods in `pod_ns`, of which Assigned).
    pub async fn aai_counts(&self, pod_ns: &str) -> anyhow::Result<(usize, usize)> {
        let list = Api::<AzureAssignedIdentity>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .context("list AzureAssignedIdentities")?;
        let mine = list.items.iter().filter(|a| a.spec.pod_namespace == pod_ns);
        let (mut total, mut assigned) = (0, 0);
        for a in mine {
            total += 1;
            if a.status.as_ref().is_some_and(|s| s.status == "Assigned") {
                assigned += 1;
            }
        }
        Ok((total, assigned))
    }

    /// Waits until `expected` AAIs of `pod_ns` exist and are all Assigned,
    /// polling every `every`; bounded by the scale's convergence timeout.
    pub async fn wait_assigned(
        &self,
        pod_ns: &str,
        expected: usize,
        every: Duration,
        mic: &mut Proc,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.scale.converge_timeout;
        let mut last = (0, 0);
        loop {
            last = self.aai_counts(pod_ns).await.unwrap_or(last);
            if last.0 == expected && last.1 == expected {
                return Ok(());
            }
            if let Some(status) = mic.exited() {
                bail!("MIC exited ({status}): {}", mic.log_tail());
            }
            if Instant::now() >= deadline {
                bail!(
                    "timeout after {:?}: {} of {expected} AAIs exist, {} Assigned",
                    self.scale.converge_timeout,
                    last.0,
                    last.1
                );
            }
            tokio::time::sleep(every).await;
        }
    }

    /// MIC's azure.json and the custom-cloud file pointing at the emulator,
    /// named `<prefix>azure.json` and `<prefix>cloud.json`; the file names
    /// the audience of ARM tokens when `token_audience` says so.
    pub fn write_cloud_files(
        &self,
        prefix: &str,
        token_audience: bool,
    ) -> anyhow::Result<MicCloudFiles> {
        let cloud = MicCloud {
            resource_group: NODE_RG.into(),
            client_id: MIC_CLIENT.into(),
            client_secret: MIC_SECRET.into(),
            user_assigned_identity_id: Some(KUBELET_CLIENT.into()),
            ..MicCloud::standard()
        };
        let mut env = CloudEnvironment::of(&self.emu);
        if !token_audience {
            env.token_audience = None;
        }
        tenant::write_mic_cloud_files(&self.dir, prefix, &cloud, &env)
    }
}

/// The emulator of one subject: the kubelet identity and `big_ids` pod
/// identities, the scale sets `vmss` of `nodes_per_vmss` instances and
/// NMI's one-instance scale set, MIC's service principal, Compute's real
/// throttle buckets and the scale's clock.
fn emulator_config(scale: &Scale, vmss: &[String], nmi_vmss: &str) -> Tenant {
    let kubelet = [tenant::KUBELET];
    let mut t =
        Tenant::in_groups(NODE_RG, APP_RG).identity(tenant::KUBELET, NODE_RG, KUBELET_CLIENT);
    for j in 0..scale.big_ids {
        t = t.identity(&id_name(j), APP_RG, &id_client(j));
    }
    for v in vmss {
        t = t.scale_set(v, scale.nodes_per_vmss, &kubelet);
    }
    let mut t = t
        .scale_set(nmi_vmss, 1, &kubelet)
        .service_principal(MIC_CLIENT, MIC_SECRET)
        .speed(scale.speed);
    let cfg = t.config_mut();
    cfg.arm.vmss_write_seconds = scale.lro_seconds;
    // Realistic Compute limits: the emulator's default buckets (Compute's
    // scale-set write bucket: burst 12, 4 a minute per scale set;
    // docs/upstream-behaviour.md#azure-throttling).
    cfg.throttle.enabled = true;
    // Tokens for any resource: in the distinct-resources flood every
    // resource then costs NMI a real IMDS call and a cache entry.
    cfg.aad.any_resource = true;
    t
}

/// NMI's node: a node namespace with two pod namespaces, IMDS of the
/// node's VMSS instance at 169.254.169.254:80 inside it, and the apiserver
/// at 127.0.0.1:6443 inside it (both relayed over Unix sockets).
#[derive(Debug)]
pub(crate) struct NmiNode {
    pub node: netns::Node,
    _relay: Proc,
    pub kubeconfig: PathBuf,
}

impl NmiNode {
    pub async fn start(w: &World) -> anyhow::Result<NmiNode> {
        let node = netns::Node::with_pods(2)?;
        node.node.add_local_address(IMDS_ADDRESS)?;
        let relay = start_relay(w, &node.node).await?;
        let kubeconfig = w.dir.join("nmi.kubeconfig");
        let text = std::fs::read_to_string(w.cluster.kubeconfig())?.replace(
            w.cluster.server(),
            &format!("https://127.0.0.1:{API_RELAY_PORT}"),
        );
        std::fs::write(&kubeconfig, text)?;
        Ok(NmiNode {
            node,
            _relay: relay,
            kubeconfig,
        })
    }

    pub fn pod(&self, i: usize) -> anyhow::Result<(&NetNs, Ipv4Addr)> {
        self.node
            .pods
            .get(i)
            .map(|(ns, ip)| (ns, *ip))
            .context("no such pod namespace")
    }

    /// Waits until NMI's `/healthz` in the node says Active.
    pub async fn wait_active(&self, nmi: &mut Proc) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        let url = format!("http://127.0.0.1:{NMI_PROBE_PORT}/healthz");
        loop {
            let out = tokio::task::block_in_place(|| {
                self.node
                    .node
                    .run("curl", &["-s", "--max-time", "1", &url])
                    .unwrap_or_default()
            });
            if out == "Active" {
                return Ok(());
            }
            if let Some(status) = nmi.exited() {
                bail!("NMI exited ({status}): {}", nmi.log_tail());
            }
            if Instant::now() >= deadline {
                bail!("NMI not Active after 90 s: {}", nmi.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The relay role inside node namespace `ns`: the apiserver at
/// 127.0.0.1:6443 and the node's IMDS at 169.254.169.254:80 there, each
/// carried over a Unix socket to loopback of the bench's namespace; running
/// when this returns.
async fn start_relay(w: &World, ns: &NetNs) -> anyhow::Result<Proc> {
    let imds = w
        .emu
        .add_imds(&format!("vmss/{}/0", w.nmi_vmss), "127.0.0.1:0".parse()?)
        .await?;
    let api: SocketAddr = w
        .cluster
        .server()
        .trim_start_matches("https://")
        .parse()
        .context("apiserver address")?;
    let (api_sock, imds_sock) = (w.dir.join("api.sock"), w.dir.join("imds.sock"));
    unix_to_tcp(api_sock.clone(), api).await?;
    unix_to_tcp(imds_sock.clone(), imds).await?;
    let mut cmd = ns.command(self_exe()?);
    cmd.env(ROLE_ENV, "relay")
        .arg(format!("127.0.0.1:{API_RELAY_PORT}={}", api_sock.display()))
        .arg(format!("{IMDS_ADDRESS}:80={}", imds_sock.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let child = spawn_kept(cmd)?;
    // A Proc from here on, so that a relay that never gets ready is killed.
    let mut relay = Proc {
        pid: child.id(),
        child,
        log: PathBuf::new(),
    };
    tokio::task::block_in_place(|| read_until_ready(&mut relay.child, "relay"))?;
    Ok(relay)
}

/// One token request with `curl` from pod namespace `ns` through
/// 169.254.169.254; the HTTP status (0 when curl itself failed).
pub(crate) async fn curl_token(ns: &NetNs, max_secs: u32) -> anyhow::Result<u16> {
    Ok(curl_imds(ns, TOKEN_PATH, max_secs).await?.0)
}

/// `curl` inside `ns` for `path` on 169.254.169.254 with `Metadata: true`,
/// `max_secs` at most: (status, body); status 0 when no HTTP answer came.
pub(crate) async fn curl_imds(
    ns: &NetNs,
    path: &str,
    max_secs: u32,
) -> anyhow::Result<(u16, String)> {
    let url = format!("http://{IMDS_ADDRESS}{path}");
    curl_in(ns, &url, &["Metadata: true"], max_secs).await
}
