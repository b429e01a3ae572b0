//! One subject's world, built with the test kit's [`WorldBuilder`] (plain
//! flags, the process's shared cluster): an emulator with Compute's real
//! throttle buckets on a sped-up clock, Node objects for the burst's scale
//! sets, NMI's node (a node namespace with two pod namespaces, its IMDS and
//! the apiserver carried in by this binary's own relay role), and MIC on the
//! host, reaching the apiserver and the emulator on loopback without a relay.
//!
//! What is the bench's own: its namespaces, identities created as the rows
//! need them, pods created 32 at a time, AAI counts and the wait for
//! Assigned, the wait for `Active`, and clearing the cluster for the next
//! subject.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aadpodid_api::{AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding};
use aadpodid_testkit::http::http_get;
use aadpodid_testkit::netns::{IMDS_ADDRESS, NetNs};
use aadpodid_testkit::tenant::{CloudEnvironment, MicCloud, Tenant};
use aadpodid_testkit::world::{
    self, ArgsSource, ClusterChoice, KUBELET, KUBELET_CLIENT, NODE_RG, NodeSpec, Options, Proc,
    Program, WorldBuilder, create_identity, create_pod, curl_in, selector, tenant_of,
};
use aadpodid_testkit::{TempNamespace, unique_name};
use anyhow::{Context as _, bail};
use azure_emulator::Emulator;
use azure_emulator::state::OperationSpan;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;

use crate::{ROLE_ENV, Scale};

/// The token request every client makes (ARM, as the Azure SDKs do).
pub(crate) use aadpodid_testkit::world::TOKEN_PATH;

/// The one-instance scale set NMI's node belongs to (apart from the burst's
/// scale sets, so that its pods' identities never count in the burst's
/// writes).
pub(crate) const NMI_VMSS: &str = "aks-nmi-12345678-vmss";

/// The standalone VM of row 7's third pod (a node with its own NMI), after
/// the subject's tag: MIC finds a VM by its node's name, so the names match.
const BENCH_VM: &str = "aks-bench-vm";

/// The running bench's own executable (children are this binary), through
/// `/proc/<pid>/exe`: it still runs this very binary when a rebuild has
/// replaced the file meanwhile (other builds share the target directory).
pub(crate) fn self_exe() -> PathBuf {
    PathBuf::from(format!("/proc/{}/exe", std::process::id()))
}

/// This binary in `role` (see [`crate::child`]).
pub(crate) fn role(role: &str) -> Program {
    Program::role(self_exe(), ROLE_ENV, role)
}

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

/// A scale set or a standalone VM, by name.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Target<'a> {
    ScaleSet(&'a str),
    Vm(&'a str),
}

/// How one subject's world starts MIC and NMI, and what its MIC's
/// custom-cloud file says.
#[derive(Clone, Debug)]
pub(crate) struct Launchers {
    pub mic: Program,
    pub nmi: Program,
    /// Name the ARM token audience in the custom-cloud file (upstream asks
    /// for tokens for the ARM endpoint itself and gets none).
    pub token_audience: bool,
}

pub(crate) struct World {
    pub scale: Scale,
    /// The kit's world: cluster, emulator, nodes, MIC and NMI.
    pub kit: WorldBuilder,
    pub client: Client,
    /// Pods of NMI's node (rows 1, 3, 4).
    pub ns_nmi: TempNamespace,
    /// Pods of the burst (row 2).
    pub ns_burst: TempNamespace,
    /// Pods added for MIC's 10,000 (row 4).
    pub ns_big: TempNamespace,
    /// Identities and bindings.
    pub ns_ids: TempNamespace,
    /// Pods of row 7 (on a burst scale set, NMI's node and the VM's node).
    pub ns_other: TempNamespace,
    /// Nodes of the scale sets: `nodes[k * nodes_per_vmss + i]` is instance i of vmss k.
    pub nodes: Vec<String>,
    nmi_spec: NodeSpec,
    pub nmi_node: String,
    /// The standalone VM's node, named as the VM (row 7; started by
    /// [`World::start_vm_nmi`]).
    vm_spec: NodeSpec,
    pub vm_node: String,
    pub ids_created: usize,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("kit", &self.kit)
            .field("nmi_node", &self.nmi_node)
            .finish_non_exhaustive()
    }
}

impl World {
    /// The world of subject `tag`: emulator, Node objects of the scale sets,
    /// namespaces, MIC's files and its process (not started); NMI's node
    /// comes with [`World::start_nmi`].
    pub async fn new(
        tag: &str,
        scale: &Scale,
        launchers: Launchers,
        keep_logs: bool,
    ) -> anyhow::Result<World> {
        let mut opts = Options::with_programs(launchers.mic, launchers.nmi);
        opts.scale_sets = scale.vmss;
        opts.instances = scale.nodes_per_vmss;
        opts.identities = scale.tenant_identities();
        opts.clock_speed = scale.speed;
        opts.relay = Some(role("relay"));
        let vm_name = format!("{tag}-{BENCH_VM}");
        let tenant = emulator_config(&opts, scale, &vm_name);
        let dir = std::env::temp_dir().join(unique_name(&format!("bench-{tag}")));
        let mut kit = WorldBuilder::new(opts.clone(), ArgsSource::Flags, dir)?;
        kit.keep_logs(keep_logs);
        let cluster = kit.cluster(ClusterChoice::Shared).await?;
        let namespace = |what: &str| {
            let name = format!("bench-{tag}-{what}");
            async move { cluster.temp_namespace(&name).await }
        };
        let (ns_nmi, ns_burst) = (namespace("nmi").await?, namespace("burst").await?);
        let (ns_big, ns_ids) = (namespace("big").await?, namespace("ids").await?);
        let ns_other = namespace("other").await?;
        let client = kit.client()?.clone();
        // MIC's leader election in a namespace of this subject's, as each
        // subject's MIC finds the cluster: a lock the previous subject's
        // killed MIC still holds elsewhere does not delay it.
        kit.opts_mut().mic_namespace = ns_ids.name().to_string();
        kit.tenant(tenant).await?;
        let mut env = CloudEnvironment::of(kit.emu()?);
        if !launchers.token_audience {
            env.token_audience = None;
        }
        let cloud = MicCloud {
            user_assigned_identity_id: Some(KUBELET_CLIENT.into()),
            ..MicCloud::standard()
        };
        kit.host_files_with(&cloud, &env)?;
        // Names carry the subject: both subjects' Node objects meet in the
        // shared cluster (the first's are deleted before the second starts).
        let tagged = |mut spec: NodeSpec| {
            spec.name = format!("{tag}-{}", spec.name);
            spec
        };
        let specs: Vec<NodeSpec> = NodeSpec::of_options(&opts)
            .into_iter()
            .map(|s| tagged(NodeSpec { pods: 0, ..s }))
            .collect();
        kit.node_objects(&specs).await?;
        kit.host_mic()?;
        let nmi_spec = tagged(NodeSpec::scale_set(NODE_RG, NMI_VMSS, 0, 2));
        let vm_spec = NodeSpec::vm(NODE_RG, &vm_name, 1);
        Ok(World {
            scale: scale.clone(),
            kit,
            client,
            ns_nmi,
            ns_burst,
            ns_big,
            ns_ids,
            nodes: specs.into_iter().map(|s| s.name).collect(),
            nmi_node: nmi_spec.name.clone(),
            nmi_spec,
            vm_node: vm_spec.name.clone(),
            vm_spec,
            ns_other,
            ids_created: 0,
        })
    }

    pub fn emu(&self) -> anyhow::Result<&Emulator> {
        self.kit.emu()
    }

    /// The emulator's clock now, virtual milliseconds.
    pub fn emulated_ms(&self) -> anyhow::Result<u64> {
        Ok(self.emu()?.clock().now().as_millis() as u64)
    }

    /// The writes to `target` whose operations started at `since_ms`
    /// (emulated) or later, by start.
    pub fn writes_since(
        &self,
        target: Target<'_>,
        since_ms: u64,
    ) -> anyhow::Result<Vec<OperationSpan>> {
        Ok(self
            .emu()?
            .operations()
            .into_iter()
            .filter(|o| o.start_ms >= since_ms)
            .filter(|o| match target {
                Target::ScaleSet(name) => o.on_scale_set(name),
                Target::Vm(name) => o.on_vm(name),
            })
            .collect())
    }

    /// MIC's process.
    pub fn mic(&mut self) -> anyhow::Result<&mut Proc> {
        Ok(&mut self.kit.host_mic.as_mut().context("no MIC")?.0)
    }

    /// MIC's process ID.
    pub fn mic_pid(&mut self) -> anyhow::Result<u32> {
        self.mic()?.pid().context("MIC is not running")
    }

    /// NMI's process.
    pub fn nmi(&mut self) -> anyhow::Result<&mut Proc> {
        Ok(&mut self
            .kit
            .nodes
            .first_mut()
            .context("NMI is not running")?
            .nmi)
    }

    /// NMI's process ID.
    pub fn nmi_pid(&mut self) -> anyhow::Result<u32> {
        self.nmi()?.pid().context("NMI is not running")
    }

    /// Pod namespace `i` of NMI's node and its address.
    pub fn pod(&self, i: usize) -> anyhow::Result<(&NetNs, Ipv4Addr)> {
        self.node_pod(0, i)
    }

    /// Pod namespace `i` of node `n` (0: NMI's node, 1: the VM's) and its
    /// address.
    pub fn node_pod(&self, n: usize, i: usize) -> anyhow::Result<(&NetNs, Ipv4Addr)> {
        self.kit
            .nodes
            .get(n)
            .context("no NMI on that node")?
            .net
            .pods
            .get(i)
            .map(|(ns, ip)| (ns, *ip))
            .context("no such pod namespace")
    }

    /// Starts MIC and waits until its `/healthz` says Active.
    pub async fn start_mic(&mut self) -> anyhow::Result<()> {
        self.kit.start_host_mic().await?;
        let (_, probe) = *self.kit.host_mic.as_ref().context("no MIC")?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if http_get(probe, "/healthz")
                .await
                .is_ok_and(|b| b.trim() == "Active")
            {
                return Ok(());
            }
            self.fail_if_exited(None, deadline)?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Fails when MIC (`None`) or node `n`'s NMI (`Some(n)`) exited, or when
    /// `deadline` passed.
    fn fail_if_exited(&mut self, nmi_of: Option<usize>, deadline: Instant) -> anyhow::Result<()> {
        let (what, proc) = match nmi_of {
            None => ("MIC", self.mic()?),
            Some(n) => (
                if n == 0 { "NMI" } else { "the VM's NMI" },
                &mut self.kit.nodes.get_mut(n).context("NMI is not running")?.nmi,
            ),
        };
        if let Some(status) = proc.exited() {
            bail!("{what} exited ({status}): {}", proc.log_tail(20));
        }
        if Instant::now() >= deadline {
            bail!("{what} not Active in time: {}", proc.log_tail(20));
        }
        Ok(())
    }

    /// NMI's node (Node object, namespaces, IMDS of its scale set's
    /// instance, relay) and NMI started on it, Active.
    pub async fn start_nmi(&mut self) -> anyhow::Result<()> {
        self.kit.nodes(std::slice::from_ref(&self.nmi_spec)).await?;
        self.kit.start_nmi(0).await?;
        self.wait_nmi_active(0).await
    }

    /// NMI's node as [`World::start_nmi`] makes it, unless it runs already.
    pub async fn ensure_nmi(&mut self) -> anyhow::Result<()> {
        if self.kit.nodes.is_empty() {
            self.start_nmi().await?;
        }
        Ok(())
    }

    /// The VM's node (after NMI's: node 1) with its NMI, Active.
    pub async fn start_vm_nmi(&mut self) -> anyhow::Result<()> {
        self.ensure_nmi().await?;
        if self.kit.nodes.len() < 2 {
            self.kit.nodes(std::slice::from_ref(&self.vm_spec)).await?;
            self.kit.start_nmi(1).await?;
        }
        self.wait_nmi_active(1).await
    }

    /// NMI killed and started again on the same node, Active.
    pub async fn restart_nmi(&mut self) -> anyhow::Result<()> {
        self.kit.restart_nmi(0).await?;
        self.wait_nmi_active(0).await
    }

    /// Waits until NMI's `/healthz` in node `n` says Active.
    async fn wait_nmi_active(&mut self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let node = self.kit.nodes.get(n).context("NMI is not running")?;
            let url = node.nmi.probe_url();
            if let Ok((_, body)) = curl_in(&node.net.node, &url, &[], 1).await
                && body == "Active"
            {
                return Ok(());
            }
            self.fail_if_exited(Some(n), deadline)?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Deletes what this world put in the cluster (pods, identities,
    /// bindings, AAIs, nodes) so that the next subject's MIC starts from an
    /// empty cluster; best effort. Stops MIC and NMI first.
    pub async fn clear(&mut self) {
        self.kit.stop_processes();
        let pod_namespaces = [
            self.ns_nmi.name().to_string(),
            self.ns_burst.name().to_string(),
            self.ns_big.name().to_string(),
            self.ns_other.name().to_string(),
        ];
        let now = DeleteParams::default().grace_period(0);
        let all = ListParams::default();
        for ns in &pod_namespaces {
            let _ = Api::<Pod>::namespaced(self.client.clone(), ns)
                .delete_collection(&now, &all)
                .await;
        }
        // Identities and bindings of every namespace of the run: row 8's
        // federated identity lives with its pods, and a binding left behind
        // would still select the next run's pods by label (bindings are not
        // namespaced by default), handing them a dead Entra endpoint. The
        // test cluster has no namespace controller to empty a deleted
        // namespace.
        for ns in pod_namespaces
            .iter()
            .map(String::as_str)
            .chain([self.ns_ids.name()])
        {
            let _ = Api::<AzureIdentityBinding>::namespaced(self.client.clone(), ns)
                .delete_collection(&now, &all)
                .await;
            let _ = Api::<AzureIdentity>::namespaced(self.client.clone(), ns)
                .delete_collection(&now, &all)
                .await;
        }
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
    async fn delete_nodes(&self) {
        let api = Api::<Node>::all(self.client.clone());
        let nmi = self.kit.nodes.iter().map(|n| &n.name);
        for n in self.nodes.iter().chain(nmi) {
            let _ = api.delete(n, &Default::default()).await;
        }
    }

    /// AzureIdentity `id-j` and its binding to `sel-j` for every j below `n`.
    pub async fn ensure_identities(&mut self, n: usize) -> anyhow::Result<()> {
        let ns = self.ns_ids.name().to_string();
        let client = self.client.clone();
        for_each_concurrent(self.ids_created..n, 16, |j| {
            let (client, ns) = (client.clone(), ns.clone());
            async move { create_identity(&client, &ns, j).await }
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
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        for_each_concurrent(pods, 32, |(name, node, j, ip)| {
            let api = api.clone();
            async move {
                let sel = selector(j);
                let labels = BTreeMap::from([("aadpodidbinding", sel.as_str())]);
                create_pod(&api, &name, &labels, &node, ip).await
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
        &mut self,
        pod_ns: &str,
        expected: usize,
        every: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.scale.converge_timeout;
        let mut last = (0, 0);
        loop {
            last = self.aai_counts(pod_ns).await.unwrap_or(last);
            if last.0 == expected && last.1 == expected {
                return Ok(());
            }
            let mic = self.mic()?;
            if let Some(status) = mic.exited() {
                bail!("MIC exited ({status}): {}", mic.log_tail(20));
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
}

/// The emulator of one subject: the kit's tenant for `opts` (the kubelet
/// identity and `big_ids` pod identities, the scale sets of
/// `nodes_per_vmss` instances, MIC's service principal, the scale's clock)
/// with NMI's one-instance scale set, Compute's real throttle buckets and
/// the scale's LRO durations; and row 7's standalone VM `vm`.
fn emulator_config(opts: &Options, scale: &Scale, vm: &str) -> Tenant {
    let mut t = tenant_of(opts)
        .scale_set(NMI_VMSS, 1, &[KUBELET])
        .vm(vm, false, &[KUBELET]);
    let cfg = t.config_mut();
    // Each write's duration drawn from a realistic range, reproducibly.
    (cfg.arm.vmss_write_seconds, cfg.arm.vmss_write_seconds_max) =
        (scale.lro_seconds.0, Some(scale.lro_seconds.1));
    (cfg.arm.vm_write_seconds, cfg.arm.vm_write_seconds_max) =
        (scale.vm_lro_seconds.0, Some(scale.vm_lro_seconds.1));
    cfg.arm.write_seconds_seed = scale.lro_seed;
    // Realistic Compute limits: the emulator's default buckets (Compute's
    // scale-set write bucket: burst 12, 4 a minute per scale set;
    // docs/upstream-behaviour.md#azure-throttling).
    cfg.throttle.enabled = true;
    // Tokens for any resource: in the distinct-resources flood every
    // resource then costs NMI a real IMDS call and a cache entry.
    cfg.aad.any_resource = true;
    t
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

/// One token request with `curl` from pod namespace `ns` through
/// 169.254.169.254; the HTTP status (0 when curl itself failed).
pub(crate) async fn curl_token(ns: &NetNs, max_secs: u32) -> anyhow::Result<u16> {
    Ok(curl_imds(ns, TOKEN_PATH, max_secs).await?.0)
}

/// A kit helper the flood is spawned with (children must outlive the
/// threads of the runtime).
pub(crate) use world::spawn_kept;
