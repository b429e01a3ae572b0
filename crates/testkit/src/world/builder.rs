//! The world built one step at a time: [`WorldBuilder`].
//!
//! [`World::start`](super::World::start) runs every step with the end-to-end
//! defaults; a caller that shows or records each part (the local demo) runs
//! them itself, in this order:
//!
//! | step | what |
//! | --- | --- |
//! | [`WorldBuilder::cluster`] | a [`ClusterChoice::Private`] cluster or the process's [`ClusterChoice::Shared`] one |
//! | [`WorldBuilder::tenant`] | the Azure emulator with the caller's [`Tenant`] |
//! | [`WorldBuilder::host_files`] | azure.json and the custom-cloud file (a node's files) |
//! | [`WorldBuilder::chart`] | with [`ArgsSource::Chart`]: the chart rendered and applied |
//! | [`WorldBuilder::nodes`] | Node objects, network namespaces, IMDS and nmi's process per [`NodeSpec`] |
//! | [`WorldBuilder::node_with`] | one such node whose relay differs ([`NodeLinks`]), its nmi the caller's |
//! | [`WorldBuilder::node_objects`] | Node objects alone (no namespace, no nmi) |
//! | [`WorldBuilder::mic`] | mic replicas, a network namespace each |
//! | [`WorldBuilder::host_mic`] | with [`ArgsSource::Flags`]: one mic in the calling process's namespace, no relay |
//! | [`WorldBuilder::start_mics`], [`WorldBuilder::start_host_mic`], [`WorldBuilder::start_nmi`] | processes started and probed |
//! | [`WorldBuilder::finish`] or [`WorldBuilder::teardown`] | the [`World`], or everything stopped with a [`Report`] |
//!
//! mic's and nmi's arguments come from the rendered chart
//! ([`ArgsSource::Chart`], as a kubelet would run the Deployment and the
//! DaemonSet) or from plain flags ([`ArgsSource::Flags`]: mic's standard
//! arguments of [`crate::tenant::mic_args`], nmi's `--node` and
//! `--kubeconfig`), which need no helm.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use azure_emulator::Emulator;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::Api;

use super::azure::HostFiles;
use super::chart::{Launch, Release, Workload};
use super::nodes::{MicReplica, NodeBase, NodeNet, WorldNode, create_node_object, socket_of};
use super::options::Dialect;
use super::processes::Proc;
use super::teardown::{Report, remove_unless_kept};
use super::{LEASE, NODE_RG, Options, PROCESS_START, Program, World, vmss_name};
use crate::tenant::{self, CloudEnvironment, MicCloud, MicCloudFiles, Tenant};
use crate::{Cluster, PrivateCluster, free_ports, wait_for};

/// Which cluster the world runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterChoice {
    /// A cluster of its own ([`PrivateCluster`]): restartable, no other
    /// test's objects.
    Private,
    /// The process's shared cluster ([`Cluster::shared`]), started on first use.
    Shared,
}

/// The cluster a builder runs on.
#[derive(Debug)]
pub enum WorldCluster {
    /// See [`ClusterChoice::Private`].
    Private(PrivateCluster),
    /// See [`ClusterChoice::Shared`].
    Shared(&'static Cluster),
}

impl std::ops::Deref for WorldCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        match self {
            WorldCluster::Private(c) => c,
            WorldCluster::Shared(c) => c,
        }
    }
}

/// Where mic's and nmi's arguments come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgsSource {
    /// The chart rendered with `helm template` ([`WorldBuilder::chart`]):
    /// the container's args and env, its ServiceAccount's token.
    Chart,
    /// Plain flags: mic's standard arguments and environment
    /// ([`crate::tenant::mic_args`], [`crate::tenant::mic_env`]) and nmi's
    /// `--node`, each with the cluster's admin kubeconfig.
    Flags,
}

/// mic's probe and metrics ports with [`ArgsSource::Flags`] (each replica
/// has a network namespace of its own).
const FLAGS_MIC_PORTS: (u16, u16) = (8080, 8888);
/// nmi's probe port with [`ArgsSource::Flags`] (inside the node namespace).
const FLAGS_NMI_PROBE: u16 = 8085;
/// Probe path of mic and nmi.
const PROBE_PATH: &str = "/healthz";

/// One emulated machine that becomes a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// The Node object's name.
    pub name: String,
    /// Its `spec.providerID`.
    pub provider_id: String,
    /// The emulator's name of the machine for its IMDS (`vmss/<set>/<i>`,
    /// `vm/<name>`).
    pub machine: String,
    /// The scale set or VM carrying its identities.
    pub vmss: String,
    /// Pod network namespaces on it.
    pub pods: u8,
}

impl NodeSpec {
    /// Instance `i` of scale set `vmss` in resource group `rg`, named as AKS
    /// names it (`<vmss><i:06>`).
    pub fn scale_set(rg: &str, vmss: &str, i: usize, pods: u8) -> NodeSpec {
        NodeSpec {
            name: format!("{vmss}{i:06}"),
            provider_id: tenant::vmss_provider_id(rg, vmss, i),
            machine: format!("vmss/{vmss}/{i}"),
            vmss: vmss.into(),
            pods,
        }
    }

    /// Standalone VM `vm` in resource group `rg` (the providerID spells the
    /// group as given).
    pub fn vm(rg: &str, vm: &str, pods: u8) -> NodeSpec {
        NodeSpec {
            name: vm.into(),
            provider_id: tenant::vm_provider_id(rg, vm),
            machine: format!("vm/{vm}"),
            vmss: vm.into(),
            pods,
        }
    }

    /// The nodes of `opts`: every instance of every scale set, in order.
    pub fn of_options(opts: &Options) -> Vec<NodeSpec> {
        (0..opts.scale_sets)
            .flat_map(|s| {
                (0..opts.instances).map(move |i| {
                    NodeSpec::scale_set(NODE_RG, &vmss_name(s), i, opts.pods_per_node)
                })
            })
            .collect()
    }
}

/// How a node of [`WorldBuilder::node_with`] differs from one of
/// [`WorldBuilder::nodes`] (the default: the apiserver inside the node at its
/// own address, always reachable; IMDS from the builder's emulator; nothing
/// else).
#[derive(Debug, Default)]
pub struct NodeLinks {
    /// Where the apiserver answers inside the node instead of its own
    /// address (a kubeconfig written for that address).
    pub apiserver_at: Option<SocketAddr>,
    /// A gate on the node's way to the apiserver
    /// ([`crate::relay::gated_forward`]): while it holds `false`, new
    /// connections wait (those open stay open).
    pub api_gate: Option<tokio::sync::watch::Receiver<bool>>,
    /// More `(address inside the node, loopback address here)` pairs the
    /// node's relay carries (an emulator's Entra ID, say).
    pub extra: Vec<(SocketAddr, SocketAddr)>,
    /// No IMDS from the builder's emulator (the builder then needs none):
    /// the caller runs one inside the node on 169.254.169.254:80.
    pub imds_in_node: bool,
    /// The pods' network `10.244.<n>.0/24` (see [`crate::netns::Node::with_pods_in`])
    /// instead of the node's own (its index plus one).
    pub pod_subnet: Option<u8>,
}

/// How one process of the world gets its arguments.
pub(super) enum Source<'a> {
    /// A rendered workload.
    Chart(&'a Workload),
    /// Plain flags for mic or nmi.
    Flags {
        /// mic (its cloud files) or nmi (`None`).
        mic: Option<&'a MicCloudFiles>,
        /// mic's namespace ([`Options::mic_namespace`]).
        namespace: &'a str,
        program: &'a Program,
        kubeconfig: &'a Path,
    },
}

impl Source<'_> {
    /// The program it starts.
    pub(super) fn program(&self) -> &Program {
        match self {
            Source::Chart(w) => &w.program,
            Source::Flags { program, .. } => program,
        }
    }

    /// Pod name of nmi on node `index` named `node`.
    pub(super) fn nmi_name(&self, index: usize, node: &str) -> String {
        match self {
            Source::Chart(_) => format!("aad-pod-identity-nmi-{index}"),
            Source::Flags { .. } => format!("nmi-{node}"),
        }
    }

    /// Pod name of mic replica `r`.
    pub(super) fn mic_name(&self, r: usize) -> String {
        match self {
            Source::Chart(_) => format!("aad-pod-identity-mic-{r}"),
            Source::Flags { .. } => format!("mic-{r}"),
        }
    }
}

/// A process's command line: arguments, environment, probe (port, path).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct CommandLine {
    args: Vec<String>,
    env: Vec<(String, String)>,
    probe: (u16, String),
}

/// Which process a plain command line is for.
#[derive(Clone, Copy, Debug)]
pub(super) enum FlagsRole<'a> {
    /// mic, with its cloud files, answering on (probe, metrics) ports, its
    /// leader election and `MIC_POD_NAMESPACE` in a namespace.
    Mic(&'a MicCloudFiles, (u16, u16), &'a str),
    /// nmi.
    Nmi,
}

/// The plain command lines of [`ArgsSource::Flags`], as `dialect` spells them.
pub(super) fn flags_command(
    role: FlagsRole<'_>,
    kubeconfig: &Path,
    pod_name: &str,
    node: &str,
    dialect: Dialect,
) -> CommandLine {
    let mut env = vec![("NO_COLOR".to_string(), "1".to_string())];
    match role {
        FlagsRole::Mic(files, (probe, metrics), namespace) => {
            let mut args = tenant::mic_args(files, kubeconfig, pod_name, namespace);
            args.push(format!("--http-probe-port={probe}"));
            args.push(format!("--prometheus-port={metrics}"));
            env.extend(tenant::mic_env(files, namespace));
            CommandLine {
                args,
                env,
                probe: (probe, PROBE_PATH.into()),
            }
        }
        FlagsRole::Nmi => {
            let mut args = vec![format!("--node={node}")];
            match dialect {
                Dialect::ThisProject => {
                    args.push(format!("--kubeconfig={}", kubeconfig.display()));
                }
                // No such flag upstream: client-go reads the variable.
                Dialect::Upstream => env.extend([
                    ("KUBECONFIG".into(), kubeconfig.display().to_string()),
                    ("NODE_NAME".into(), node.into()),
                ]),
            }
            args.push(format!("--http-probe-port={FLAGS_NMI_PROBE}"));
            args.push("--allow-network-plugin-kubenet=true".into());
            CommandLine {
                args,
                env,
                probe: (FLAGS_NMI_PROBE, PROBE_PATH.into()),
            }
        }
    }
}

impl Launch<'_> {
    /// The process of pod `pod_name` on node `node` from `source` (with the
    /// chart, its Pod object is created too), not started yet.
    pub(super) async fn process_of(
        &self,
        source: &Source<'_>,
        pod_name: &str,
        node: &str,
    ) -> anyhow::Result<Proc> {
        let (mic, program, kubeconfig) = match source {
            Source::Chart(w) => return self.process(w, pod_name, node).await,
            Source::Flags {
                mic,
                namespace,
                program,
                kubeconfig,
            } => (mic.map(|m| (m, *namespace)), *program, *kubeconfig),
        };
        let role = mic.map_or(FlagsRole::Nmi, |(files, namespace)| {
            FlagsRole::Mic(files, FLAGS_MIC_PORTS, namespace)
        });
        Ok(self.flags_process(role, program, kubeconfig, pod_name, node))
    }

    /// The process of `program` for `role` with plain flags, not started yet.
    pub(super) fn flags_process(
        &self,
        role: FlagsRole<'_>,
        program: &Program,
        kubeconfig: &Path,
        pod_name: &str,
        node: &str,
    ) -> Proc {
        let CommandLine { args, env, probe } =
            flags_command(role, kubeconfig, pod_name, node, program.dialect);
        self.proc(pod_name, program, args, env, probe)
    }
}

/// The world under construction; see the module documentation.
pub struct WorldBuilder {
    opts: Options,
    args: ArgsSource,
    dir: PathBuf,
    started: Instant,
    cluster: Option<WorldCluster>,
    /// Set while the shared cluster starts on a blocking thread (it goes on
    /// when the step is abandoned; [`WorldBuilder::teardown`] waits for it).
    cluster_starting: Arc<AtomicBool>,
    admin: Option<Client>,
    emu: Option<Emulator>,
    host: Option<HostFiles>,
    release: Option<Release>,
    /// Nodes created so far.
    pub nodes: Vec<WorldNode>,
    /// mic replicas created so far.
    pub mics: Vec<MicReplica>,
    /// Nodes that are Node objects alone ([`WorldBuilder::node_objects`]).
    pub node_objects: Vec<NodeSpec>,
    /// The mic of [`WorldBuilder::host_mic`], with its probe's address.
    pub host_mic: Option<(Proc, SocketAddr)>,
    /// Keep the folder (logs) when dropped ([`WorldBuilder::keep_logs`]).
    keep_logs: bool,
}

impl std::fmt::Debug for WorldBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorldBuilder")
            .field("args", &self.args)
            .field("dir", &self.dir)
            .field("cluster", &self.cluster)
            .field("emu", &self.emu.as_ref().map(Emulator::arm_url))
            .field("nodes", &self.nodes)
            .field("mics", &self.mics)
            .field("node_objects", &self.node_objects)
            .field("host_mic", &self.host_mic)
            .finish_non_exhaustive()
    }
}

/// Clears a flag when dropped, however the scope ends.
struct ClearOnDrop(Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl WorldBuilder {
    /// A builder for `opts` (its `mic` and `nmi` programs, its chart `set`s
    /// and identities when [`ArgsSource::Chart`]) writing logs and files in
    /// `dir` (created; removed by [`WorldBuilder::teardown`] or the world).
    pub fn new(opts: Options, args: ArgsSource, dir: PathBuf) -> anyhow::Result<WorldBuilder> {
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(WorldBuilder {
            opts,
            args,
            dir,
            started: Instant::now(),
            cluster: None,
            cluster_starting: Arc::new(AtomicBool::new(false)),
            admin: None,
            emu: None,
            host: None,
            release: None,
            nodes: Vec::new(),
            mics: Vec::new(),
            node_objects: Vec::new(),
            host_mic: None,
            keep_logs: false,
        })
    }

    /// Keep the world's folder (every process's log) when the builder is
    /// dropped, and say where it is.
    pub fn keep_logs(&mut self, keep: bool) {
        self.keep_logs = keep;
    }

    /// The options, to change between steps (each step reads them when it
    /// runs: for example [`Options::mic_namespace`] once a namespace exists).
    pub fn opts_mut(&mut self) -> &mut Options {
        &mut self.opts
    }

    /// The world's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cluster ([`WorldBuilder::cluster`] ran).
    pub fn cluster_ref(&self) -> anyhow::Result<&Cluster> {
        self.cluster.as_deref().context("no cluster yet")
    }

    /// The process's shared cluster, when the world runs on it.
    pub fn shared_cluster(&self) -> Option<&'static Cluster> {
        match self.cluster {
            Some(WorldCluster::Shared(c)) => Some(c),
            _ => None,
        }
    }

    /// The cluster of [`ClusterChoice::Private`] (its apiserver can be
    /// stopped and started), when the world runs on one.
    pub fn private_cluster(&self) -> Option<&PrivateCluster> {
        match &self.cluster {
            Some(WorldCluster::Private(c)) => Some(c),
            _ => None,
        }
    }

    /// An admin client of the cluster ([`WorldBuilder::cluster`] ran).
    pub fn client(&self) -> anyhow::Result<&Client> {
        self.admin.as_ref().context("no cluster yet")
    }

    /// The emulator ([`WorldBuilder::tenant`] ran).
    pub fn emu(&self) -> anyhow::Result<&Emulator> {
        self.emu.as_ref().context("no tenant yet")
    }

    /// Step: the cluster, and an admin client of it.
    pub async fn cluster(&mut self, choice: ClusterChoice) -> anyhow::Result<&Cluster> {
        let cluster = match choice {
            ClusterChoice::Private => WorldCluster::Private(PrivateCluster::start().await?),
            ClusterChoice::Shared => {
                let starting = self.cluster_starting.clone();
                starting.store(true, Ordering::SeqCst);
                let shared = tokio::task::spawn_blocking(move || {
                    // Cleared however the start ends (the kit panics on failure).
                    let _started = ClearOnDrop(starting);
                    Cluster::shared()
                })
                .await?;
                WorldCluster::Shared(shared)
            }
        };
        self.admin = Some(cluster.admin_client().await?);
        Ok(&**self.cluster.insert(cluster))
    }

    /// Step: the Azure emulator with `tenant`.
    pub async fn tenant(&mut self, tenant: Tenant) -> anyhow::Result<&Emulator> {
        let emu = tenant.start().await?;
        Ok(self.emu.insert(emu))
    }

    /// Step: the files a node holds (mic's azure.json from `cloud`, the
    /// custom-cloud file naming the emulator, the kubelet's flags).
    pub fn host_files(&mut self, cloud: &MicCloud) -> anyhow::Result<()> {
        let env = CloudEnvironment::of(self.emu()?);
        self.host_files_with(cloud, &env)
    }

    /// [`WorldBuilder::host_files`] with the custom-cloud file written from
    /// `env` (for example without a token audience, as upstream's mic is
    /// given it).
    pub fn host_files_with(
        &mut self,
        cloud: &MicCloud,
        env: &CloudEnvironment,
    ) -> anyhow::Result<()> {
        let host = HostFiles::write(&self.dir, cloud, env)?;
        self.host = Some(host);
        Ok(())
    }

    /// Step (with [`ArgsSource::Chart`]): the chart rendered for the options
    /// and applied, with the release's and the applications' namespaces.
    pub async fn chart(&mut self) -> anyhow::Result<()> {
        if self.args != ArgsSource::Chart {
            bail!("the chart step needs ArgsSource::Chart");
        }
        let cluster = self.cluster.as_ref().context("no cluster yet")?;
        let admin = self.admin.as_ref().context("no cluster yet")?;
        let release = Release::install(cluster, admin, &self.opts, &self.dir).await?;
        self.release = Some(release);
        Ok(())
    }

    /// mic replicas the rendered Deployment asks for ([`WorldBuilder::chart`] ran).
    pub fn chart_mic_replicas(&self) -> anyhow::Result<usize> {
        Ok(self
            .release
            .as_ref()
            .context("no chart yet")?
            .mic_replicas())
    }

    /// The rendered chart's documents (empty with [`ArgsSource::Flags`]).
    pub fn rendered(&self) -> &[serde_json::Value] {
        self.release.as_ref().map_or(&[], |r| &r.rendered)
    }

    /// What starts mic (`true`) or nmi.
    fn source(&self, mic: bool) -> anyhow::Result<Source<'_>> {
        match self.args {
            ArgsSource::Chart => {
                let release = self.release.as_ref().context("no chart yet")?;
                Ok(Source::Chart(if mic {
                    release
                        .mic
                        .as_ref()
                        .context("the chart renders no mic (operationMode=managed)")?
                } else {
                    &release.nmi
                }))
            }
            ArgsSource::Flags => Ok(Source::Flags {
                mic: if mic {
                    Some(self.host.as_ref().context("no host files yet")?.mic_files())
                } else {
                    None
                },
                namespace: &self.opts.mic_namespace,
                program: if mic { &self.opts.mic } else { &self.opts.nmi },
                kubeconfig: self.cluster_ref()?.kubeconfig(),
            }),
        }
    }

    /// Step: one node per spec (Node object, network namespaces, IMDS,
    /// relay, nmi's process not started yet), appended to
    /// [`WorldBuilder::nodes`].
    pub async fn nodes(&mut self, specs: &[NodeSpec]) -> anyhow::Result<()> {
        let mut added = Vec::new();
        {
            let launch = self.launch()?;
            let source = self.source(false)?;
            for spec in specs {
                let index = self.nodes.len() + added.len();
                added.push(WorldNode::add(&launch, &source, spec, index).await?);
            }
        }
        self.nodes.extend(added);
        Ok(())
    }

    /// Step: one node as [`WorldBuilder::nodes`] makes it, its relay as
    /// `links` says and `nmi` as its nmi's process (not started yet: the
    /// caller runs nmi its own way), appended to [`WorldBuilder::nodes`].
    /// Needs no host files, and no emulator with `links.imds_in_node`.
    pub async fn node_with(
        &mut self,
        spec: &NodeSpec,
        links: NodeLinks,
        nmi: Proc,
    ) -> anyhow::Result<&mut WorldNode> {
        let emu = if links.imds_in_node {
            None
        } else {
            Some(self.emu()?)
        };
        let base = NodeBase {
            client: self.client()?,
            dir: &self.dir,
            apiserver: socket_of(self.cluster_ref()?.server())?,
            relay: self.opts.relay.as_ref(),
        };
        let upstream = self.opts.nmi.dialect == Dialect::Upstream;
        let index = self.nodes.len();
        let net = NodeNet::build(&base, spec, index, emu, upstream, links).await?;
        self.nodes.push(net.with_nmi(spec, nmi));
        Ok(&mut self.nodes[index])
    }

    /// Step: the Node objects of `specs` alone (no network namespace, IMDS
    /// or nmi: machines whose pods are Pod objects only), appended to
    /// [`WorldBuilder::node_objects`].
    pub async fn node_objects(&mut self, specs: &[NodeSpec]) -> anyhow::Result<()> {
        let client = self.client()?.clone();
        for spec in specs {
            create_node_object(&client, spec).await?;
            self.node_objects.push(spec.clone());
        }
        Ok(())
    }

    /// Step: `replicas` mic replicas (processes not started yet), their pods
    /// on the nodes in turn, appended to [`WorldBuilder::mics`].
    pub async fn mic(&mut self, replicas: usize) -> anyhow::Result<()> {
        if replicas == 0 {
            return Ok(());
        }
        let mut added = Vec::new();
        {
            let launch = self.launch()?;
            let source = self.source(true)?;
            for r in self.mics.len()..self.mics.len() + replicas {
                let node = self
                    .nodes
                    .get(r % self.nodes.len().max(1))
                    .map(|n| n.name.clone())
                    .unwrap_or_default();
                added.push(MicReplica::add(&launch, &source, r, &node).await?);
            }
        }
        self.mics.extend(added);
        Ok(())
    }

    /// Step (with [`ArgsSource::Flags`]): one mic in the calling process's
    /// network namespace (no relay: it reaches the apiserver and the emulator
    /// on loopback directly), its probe and metrics on free loopback ports,
    /// as [`WorldBuilder::host_mic`] (not started yet).
    pub fn host_mic(&mut self) -> anyhow::Result<()> {
        if self.args != ArgsSource::Flags {
            bail!("a mic on the host needs ArgsSource::Flags");
        }
        let ports = free_ports()?;
        let [probe, _] = ports;
        let files = self.host.as_ref().context("no host files yet")?.mic_files();
        let role = FlagsRole::Mic(files, ports.into(), &self.opts.mic_namespace);
        let kubeconfig = self.cluster_ref()?.kubeconfig();
        let proc = self
            .launch()?
            .flags_process(role, &self.opts.mic, kubeconfig, "mic-host", "");
        self.host_mic = Some((proc, SocketAddr::from(([127, 0, 0, 1], probe))));
        Ok(())
    }

    /// Starts the mic of [`WorldBuilder::host_mic`] and waits until its
    /// probe answers.
    pub async fn start_host_mic(&mut self) -> anyhow::Result<()> {
        let (proc, _) = self.host_mic.as_mut().context("no mic on the host")?;
        proc.spawn_in(None)?;
        proc.wait_probe_in(None).await
    }

    fn launch(&self) -> anyhow::Result<Launch<'_>> {
        let cluster = self.cluster_ref()?;
        Ok(Launch {
            client: self.client()?,
            dir: &self.dir,
            host: self.host.as_ref().context("no host files yet")?,
            emu: self.emu()?,
            apiserver: socket_of(cluster.server())?,
            relay: self.opts.relay.as_ref(),
            pod_bound_tokens: self.opts.pod_bound_tokens,
        })
    }

    /// Starts every process not running yet (nmi on every node, then every
    /// mic replica), then waits until each one's probe answers.
    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        for n in &mut self.nodes {
            if n.nmi.pid().is_none() {
                n.nmi.spawn(&n.net.node)?;
            }
        }
        for m in &mut self.mics {
            if m.proc.pid().is_none() {
                m.proc.spawn(&m.net)?;
            }
        }
        for n in &mut self.nodes {
            n.nmi.wait_probe(&n.net.node).await?;
        }
        for m in &mut self.mics {
            m.proc.wait_probe(&m.net).await?;
        }
        Ok(())
    }

    /// Starts every mic replica and waits until their probes answer; returns
    /// the name of the replica holding the Lease once one does.
    pub async fn start_mics(&mut self) -> anyhow::Result<String> {
        for m in &mut self.mics {
            m.proc.spawn(&m.net)?;
        }
        for m in &mut self.mics {
            m.proc.wait_probe(&m.net).await?;
        }
        let namespace = match self.args {
            ArgsSource::Chart => LEASE.0,
            ArgsSource::Flags => &self.opts.mic_namespace,
        };
        let r = leader(self.client()?, &self.mics, namespace).await?;
        Ok(self
            .mics
            .get(r)
            .map(|m| m.proc.name.clone())
            .unwrap_or_default())
    }

    /// Starts nmi on node `n` and waits until its probe answers.
    pub async fn start_nmi(&mut self, n: usize) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(n).context("no such node")?;
        node.nmi.spawn(&node.net.node)?;
        node.nmi.wait_probe(&node.net.node).await
    }

    /// Kills nmi on node `n` (if it runs), starts it again with the same
    /// args and env, and waits until its probe answers.
    pub async fn restart_nmi(&mut self, n: usize) -> anyhow::Result<()> {
        self.nodes.get_mut(n).context("no such node")?.nmi.kill();
        self.start_nmi(n).await
    }

    /// Kills every process it started (mic and nmi; relays, namespaces and
    /// the emulator stay), for example before clearing the shared cluster.
    pub fn stop_processes(&mut self) {
        if let Some((proc, _)) = &mut self.host_mic {
            proc.kill();
        }
        for m in &mut self.mics {
            m.proc.kill();
        }
        for n in &mut self.nodes {
            n.nmi.kill();
        }
    }

    /// The [`World`] (one run at a time: `one` is the guard of
    /// [`World::start`]'s lock); needs a [`ClusterChoice::Private`] cluster.
    pub(super) fn finish(
        mut self,
        one: tokio::sync::MutexGuard<'static, ()>,
    ) -> anyhow::Result<World> {
        let cluster = match self.cluster.take() {
            Some(WorldCluster::Private(c)) => c,
            _ => bail!("a World needs a private cluster"),
        };
        Ok(World {
            cluster,
            emu: self.emu.take().context("no tenant yet")?,
            nodes: std::mem::take(&mut self.nodes),
            mics: std::mem::take(&mut self.mics),
            rendered: self.release.take().map(|r| r.rendered).unwrap_or_default(),
            opts: self.opts.clone(),
            host: self.host.take(),
            dir: std::mem::take(&mut self.dir),
            started: self.started,
            _one: one,
        })
    }

    /// Stops everything it started and removes its folders; says what it
    /// stopped, deleted and removed, and what is left (see [`Report`]).
    /// The shared cluster is not stopped (other users may share it).
    pub async fn teardown(mut self) -> Report {
        // A shared cluster still starting would spawn etcd/kube-apiserver
        // after the cleanup; it takes seconds, so wait (bounded).
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.cluster_starting.load(Ordering::SeqCst) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut report = Report::default();
        if let Some((mut proc, _)) = self.host_mic.take() {
            if proc.pid().is_some() {
                report.count("mic");
            }
            proc.kill();
        }
        super::teardown::stop_parts(
            &mut report,
            std::mem::take(&mut self.mics),
            std::mem::take(&mut self.nodes),
        );
        let emulator_dir = self.emu.take().and_then(|emu| {
            emu.shutdown();
            let dir = super::teardown::emulator_dir(&emu);
            drop(emu);
            dir
        });
        let dir = std::mem::take(&mut self.dir);
        for d in emulator_dir.iter().chain([&dir]) {
            let _ = std::fs::remove_dir_all(d);
            if d.exists() {
                report.left.push(d.display().to_string());
            } else {
                report.removed.push(d.display().to_string());
            }
        }
        // A private cluster stops (and removes its folder) when dropped.
        if let Some(WorldCluster::Private(c)) = self.cluster.take() {
            drop(c);
            *report.stopped.entry("cluster".into()).or_default() += 1;
        }
        report
    }
}

impl Drop for WorldBuilder {
    /// A builder dropped before [`WorldBuilder::finish`] or
    /// [`WorldBuilder::teardown`] (a step failed) stops what it started.
    fn drop(&mut self) {
        if let Some((proc, _)) = &mut self.host_mic {
            proc.kill();
        }
        super::teardown::stop_all(&mut self.mics, &mut self.nodes, self.emu.as_ref());
        if !self.dir.as_os_str().is_empty() {
            remove_unless_kept(&self.dir, self.keep_logs, "logs");
        }
    }
}

/// The mic replica holding the Lease (its index), waiting (bounded) for one.
/// `namespace` is where its Lease is.
pub(super) async fn leader(
    client: &Client,
    mics: &[MicReplica],
    namespace: &str,
) -> anyhow::Result<usize> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    wait_for("a mic replica to hold the Lease", PROCESS_START, || {
        let leases = leases.clone();
        async move {
            let holder = leases.get_opt(LEASE.1).await.ok()??.spec?.holder_identity?;
            mics.iter()
                .position(|m| m.proc.name == holder && m.proc.pid().is_some())
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_specs_name_scale_set_instances_and_vms() {
        let ss = NodeSpec::scale_set("rg", "pool-vmss", 3, 2);
        assert_eq!(ss.name, "pool-vmss000003");
        assert_eq!(ss.machine, "vmss/pool-vmss/3");
        assert_eq!(ss.vmss, "pool-vmss");
        assert_eq!(
            ss.provider_id,
            tenant::vmss_provider_id("rg", "pool-vmss", 3)
        );
        let vm = NodeSpec::vm("rg", "vm-0", 1);
        assert_eq!((vm.name.as_str(), vm.machine.as_str()), ("vm-0", "vm/vm-0"));
        assert_eq!(vm.provider_id, tenant::vm_provider_id("rg", "vm-0"));
        let opts = Options::new("/m", "/n");
        let names: Vec<String> = NodeSpec::of_options(&opts)
            .into_iter()
            .map(|n| n.name)
            .collect();
        assert_eq!(
            names,
            [
                "aks-pool0-12345678-vmss000000",
                "aks-pool0-12345678-vmss000001",
                "aks-pool1-12345678-vmss000000",
                "aks-pool1-12345678-vmss000001"
            ]
        );
    }

    #[test]
    fn flags_give_mic_its_standard_arguments_and_nmi_its_node() {
        let files = MicCloudFiles {
            azure_json: "/w/azure.json".into(),
            environment: "/w/cloud.json".into(),
        };
        let kubeconfig = Path::new("/w/kubeconfig");
        let mic = FlagsRole::Mic(&files, FLAGS_MIC_PORTS, LEASE.0);
        let CommandLine { args, env, probe } =
            flags_command(mic, kubeconfig, "mic-1", "node-a", Dialect::ThisProject);
        let mut want = tenant::mic_args(&files, kubeconfig, "mic-1", LEASE.0);
        want.extend([
            "--http-probe-port=8080".into(),
            "--prometheus-port=8888".into(),
        ]);
        assert_eq!(args, want);
        for kv in tenant::mic_env(&files, LEASE.0) {
            assert!(env.contains(&kv), "{kv:?} in {env:?}");
        }
        assert_eq!(probe, (8080, "/healthz".to_string()));
        let CommandLine { args, probe, .. } = flags_command(
            FlagsRole::Nmi,
            kubeconfig,
            "nmi-node-a",
            "node-a",
            Dialect::ThisProject,
        );
        assert_eq!(
            args,
            [
                "--node=node-a",
                "--kubeconfig=/w/kubeconfig",
                "--http-probe-port=8085",
                "--allow-network-plugin-kubenet=true"
            ]
        );
        assert_eq!(probe, (8085, "/healthz".to_string()));
    }

    #[test]
    fn upstream_nmi_takes_its_kubeconfig_and_node_from_the_environment() {
        let kubeconfig = Path::new("/w/kubeconfig");
        let nmi = flags_command(FlagsRole::Nmi, kubeconfig, "p", "node-a", Dialect::Upstream);
        assert_eq!(
            nmi.args,
            [
                "--node=node-a",
                "--http-probe-port=8085",
                "--allow-network-plugin-kubenet=true"
            ]
        );
        for kv in [("KUBECONFIG", "/w/kubeconfig"), ("NODE_NAME", "node-a")] {
            assert!(nmi.env.contains(&(kv.0.into(), kv.1.into())), "{kv:?}");
        }
        // mic's flags are the same in both dialects.
        let files = MicCloudFiles {
            azure_json: "/w/azure.json".into(),
            environment: "/w/cloud.json".into(),
        };
        let mic = |d| flags_command(FlagsRole::Mic(&files, (1, 2), "ns"), kubeconfig, "m", "", d);
        assert_eq!(mic(Dialect::Upstream), mic(Dialect::ThisProject));
        assert_eq!(mic(Dialect::Upstream).probe, (1, "/healthz".to_string()));
        assert!(
            mic(Dialect::Upstream)
                .args
                .contains(&"--leader-election-namespace=ns".into())
        );
    }
}
