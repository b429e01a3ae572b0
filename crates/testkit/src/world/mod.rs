//! The end-to-end world: the whole system as a user runs it.
//!
//! [`World::start`] brings up, for one test:
//! - a cluster of its own ([`PrivateCluster`]: etcd + kube-apiserver with RBAC,
//!   restartable), so mic never sees another test's pods;
//! - the Azure emulator (ARM, Entra ID, one IMDS per machine) with a tenant of
//!   scale sets, each carrying the cluster's own (kubelet) identity, and
//!   user-assigned identities `id-0..`;
//! - the chart rendered with `helm template` (values: the identities and
//!   bindings through the chart's own `azureIdentities`, the custom cloud
//!   switched on, plus the test's `--set`s) and applied with `kubectl apply`:
//!   CRDs, ServiceAccounts, (Cluster)Roles and bindings, the MIC exception,
//!   the Deployment and DaemonSet objects;
//! - Node objects whose providerIDs point at the scale-set instances;
//! - mic as the rendered Deployment configures it: its replicas are processes
//!   of [`Options::mic`] (a [`Program`]), each in a network namespace of its
//!   own (a pod network, so every replica has the chart's ports), with the
//!   container's args and env (downward-API values filled in as the kubelet
//!   would, `HOSTNAME` the pod name), authenticated with a TokenRequest token
//!   of the chart's ServiceAccount;
//! - nmi as the rendered DaemonSet configures it: one process of
//!   [`Options::nmi`] per node inside the node's network namespace (host
//!   network), with the node's pods as namespaces of their own behind veth
//!   links, and the node's emulated IMDS on 169.254.169.254:80 inside the node
//!   namespace.
//!
//! The only things not taken from the rendered objects are what a kubelet
//! provides: the host files the pod spec mounts (azure.json, the custom-cloud
//! file and the kubelet flags file are written by the world and substituted for
//! the mount paths), `--kubeconfig` (standing in for the in-cluster
//! ServiceAccount token mount) and `SSL_CERT_FILE` (the emulator's test CA,
//! which a real image would not need).
//!
//! [`World::start`] runs the steps of a [`WorldBuilder`] with these
//! defaults; a caller that needs another tenant, the shared cluster, plain
//! flags instead of the chart, or a teardown that reports what it stopped
//! (the local demo) runs the steps itself.
//!
//! For the entitlement tests it also offers: an add-on identity already on
//! every scale set ([`Options::addon_identity`]), namespace-scoped users
//! ([`World::namespace_user`]: a ServiceAccount bound to `edit` and the
//! chart's `<fullname>-edit` in its own namespace, with a client and a
//! kubeconfig for `kubectl`), pods created as such a user
//! ([`World::create_pod_as`]) or applied with kubectl and then run
//! ([`World::run_pod`]), token requests with any query, and the Events and
//! AzureAssignedIdentities a user or an administrator sees. [`APP_NS`] is
//! granted (identity policy annotation) exactly the chart's identities.
//!
//! Network: the apiserver and the emulator listen on the root namespace's
//! loopback; inside each node and mic namespace a relay carries the same
//! `127.0.0.1:<port>` (and the node's `169.254.169.254:80`) over Unix sockets
//! (`NetNs::relay_many`), so nothing is added to the root namespace. One world
//! runs at a time in a test process (they are CPU-heavy and share names of
//! cluster-scoped objects); [`World::start`] waits for the previous one to drop.
//! Logs of every process are in the world's folder, removed on drop unless
//! `AADPODID_E2E_KEEP_LOGS` is set.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use aadpodid_testkit::world::{Options, World};
//! let mut opts = Options::new("/path/to/e2e-mic", "/path/to/e2e-nmi");
//! opts.instances = 3;
//! let world = World::start(opts).await?;
//! let pods = world.create_pods(0, 6, |i| Some(i % 5)).await?;
//! world.wait_assigned(&pods, std::time::Duration::from_secs(60)).await?;
//! world.check_tokens(&pods).await?;
//! # Ok(()) }
//! ```
//!
//! # Modules
//!
//! | module | what |
//! | --- | --- |
//! | [`options`] | [`Options`], [`Program`] (how mic and nmi are started), [`Dialect`] |
//! | [`builder`] | [`WorldBuilder`]: the steps of [`World::start`] one at a time; [`ClusterChoice`], [`ArgsSource`] (chart or plain flags), [`NodeSpec`] |
//! | [`teardown`] | [`teardown::Report`] of [`WorldBuilder::teardown`]; what a process left behind |
//! | `azure` | the emulated tenant ([`tenant_of`]) and the host files that point mic at it |
//! | `chart` | the chart rendered, applied, and turned into processes' commands |
//! | [`processes`] | [`Proc`]: start, signal, probe; [`spawn_kept`]; [`curl_in`] |
//! | `nodes` | [`WorldNode`], [`MicReplica`]; scale sets' identities |
//! | `pods` | [`PodRef`]; pods and their AzureAssignedIdentities; [`create_pod`], [`create_identity`] for a world without the chart |
//! | `tokens` | token requests from pods |
//! | `users` | [`NsUser`]: namespace-scoped users, namespaces, Events |
//! | `federated` | federated identities: the emulator trusting the cluster's ServiceAccount issuer ([`ClusterIssuer`]), federated credentials, ServiceAccounts and pods running as them |
//! | [`upgrade`] | upstream -> this project -> upstream in place, with pods asking for tokens throughout: [`upgrade::UpgradeFigures`] |

mod azure;
pub mod builder;
mod chart;
mod federated;
mod nodes;
pub mod options;
mod pods;
pub mod processes;
pub mod teardown;
mod tokens;
pub mod upgrade;
mod users;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use azure_emulator::Emulator;
use kube::Client;
use serde_json::Value;

pub use azure::tenant_of;
pub use builder::{ArgsSource, ClusterChoice, NodeSpec, WorldBuilder, WorldCluster};
pub use federated::{ClusterIssuer, trust_cluster_issuer};
pub use nodes::{MicReplica, WorldNode, socket_of};
pub use options::{Dialect, Options, Program};
pub use pods::{PodRef, create_identity, create_pod, create_pod_at};
pub use processes::{Proc, curl_head_in, curl_in, spawn_kept};
pub use tokens::access_token;
pub use users::NsUser;

use crate::PrivateCluster;

/// The node and identity resource groups are the kit's tenant's
/// ([`crate::tenant`]).
pub use crate::tenant::{APP_RG, NODE_RG};
/// Tenant and subscription of the emulated Azure (the kit's shared ones).
pub use crate::{SUB, TENANT};
/// The cluster's own identity, on every scale set from the start.
pub const KUBELET: &str = "e2e-aks-agentpool";
/// Client ID of [`KUBELET`] (azure.json's `userAssignedIdentityID`).
pub const KUBELET_CLIENT: &str = "c0000000-0000-4000-8000-0000000000ff";
/// An add-on's identity (in the node resource group, as AKS add-ons' are),
/// on every scale set from the start when [`Options::addon_identity`] is set:
/// mic did not add it, so mic must never remove it.
pub const ADDON: &str = "addon-identity";
/// Client ID of [`ADDON`].
pub const ADDON_CLIENT: &str = "c0000000-0000-4000-8000-0000000000ad";
/// The release: namespace of mic and nmi, and of the chart's objects.
pub const RELEASE_NS: &str = "aad-pod-identity";
/// Where the users' identities, bindings and pods live.
pub const APP_NS: &str = "apps";
/// The Lease mic's leader holds (mic's default name and namespace).
const LEASE: (&str, &str) = ("default", "aad-pod-identity-mic");
/// The token request a pod makes (ARM, as the Azure SDKs ask).
pub const TOKEN_PATH: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F";
/// Bound on bringing one process up (probe answering).
const PROCESS_START: Duration = Duration::from_secs(60);

/// One world at a time per test process.
static ONE_WORLD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Name of user-assigned identity `j`.
pub fn id_name(j: usize) -> String {
    format!("id-{j}")
}

/// Client ID of identity `j`.
pub fn id_client(j: usize) -> String {
    format!("c0000000-0000-4000-8000-{j:012}")
}

/// ARM ID of identity `name` in [`APP_RG`].
pub fn id_resource(name: &str) -> String {
    crate::tenant::uai_id(APP_RG, name)
}

/// ARM ID of identity `name` in [`NODE_RG`] ([`KUBELET`], [`ADDON`]).
pub fn node_identity_resource(name: &str) -> String {
    crate::tenant::uai_id(NODE_RG, name)
}

/// The `aadpodidbinding` selector of identity `j`'s binding.
pub fn selector(j: usize) -> String {
    format!("sel-{j}")
}

/// Name of scale set `s`.
pub fn vmss_name(s: usize) -> String {
    format!("aks-pool{s}-12345678-vmss")
}

/// Everything of one end-to-end test; see the module documentation.
#[derive(Debug)]
pub struct World {
    /// The cluster (restartable apiserver).
    pub cluster: PrivateCluster,
    /// The Azure emulator.
    pub emu: Emulator,
    /// Nodes, scale set by scale set.
    pub nodes: Vec<WorldNode>,
    /// mic replicas.
    pub mics: Vec<MicReplica>,
    /// The rendered chart.
    pub rendered: Vec<Value>,
    /// Options it was started with.
    pub opts: Options,
    /// The files a node holds (to start more processes later).
    host: Option<azure::HostFiles>,
    dir: PathBuf,
    started: Instant,
    _one: tokio::sync::MutexGuard<'static, ()>,
}

impl Drop for World {
    fn drop(&mut self) {
        teardown::stop_all(&mut self.mics, &mut self.nodes, Some(&self.emu));
        let keep = std::env::var_os("AADPODID_E2E_KEEP_LOGS").is_some();
        teardown::remove_unless_kept(&self.dir, keep, "e2e logs");
    }
}

impl World {
    /// Brings the world up (see the module documentation); every process's
    /// probe answers when this returns, and one mic replica holds the Lease.
    pub async fn start(opts: Options) -> anyhow::Result<World> {
        let one = ONE_WORLD.lock().await;
        let dir = std::env::temp_dir().join(crate::unique_name("aadpodid-e2e"));
        // A failed step drops the builder, which stops what it started and
        // removes the folder.
        let mut b = WorldBuilder::new(opts.clone(), ArgsSource::Chart, dir)?;
        b.cluster(ClusterChoice::Private).await?;
        b.tenant(azure::tenant_of(&opts)).await?;
        b.host_files(&azure::world_cloud())?;
        b.chart().await?;
        b.nodes(&NodeSpec::of_options(&opts)).await?;
        b.mic(b.chart_mic_replicas()?).await?;
        b.start_all().await?;
        let world = b.finish(one)?;
        if !world.mics.is_empty() {
            world.leader().await?;
        }
        eprintln!(
            "e2e world up in {:.1?}: {} nodes on {} scale sets, {} mic replicas",
            world.started.elapsed(),
            world.nodes.len(),
            world.opts.scale_sets,
            world.mics.len()
        );
        Ok(world)
    }

    /// A new admin client (bound to the calling runtime).
    pub async fn client(&self) -> anyhow::Result<Client> {
        self.cluster.admin_client().await
    }

    /// The mic replica holding the Lease (its index), waiting (bounded) for one.
    pub async fn leader(&self) -> anyhow::Result<usize> {
        builder::leader(&self.client().await?, &self.mics, LEASE.0).await
    }

    /// `/healthz` body of mic replica `r` (`Active` when leading).
    pub async fn mic_health(&self, r: usize) -> Option<String> {
        let m = self.mics.get(r)?;
        let (code, body) = curl_in(&m.net, &m.proc.probe_url(), &[], 2).await.ok()?;
        (code == 200).then_some(body)
    }

    /// Sends `signal` to mic replica `r` and waits until it exited.
    pub fn signal_mic(&mut self, r: usize, signal: &str) -> anyhow::Result<()> {
        self.mics
            .get_mut(r)
            .context("no such mic")?
            .proc
            .signal(signal)
    }

    /// Sends `signal` to nmi on node `n` and waits until it exited.
    pub fn signal_nmi(&mut self, n: usize, signal: &str) -> anyhow::Result<()> {
        self.nodes
            .get_mut(n)
            .context("no such node")?
            .nmi
            .signal(signal)
    }

    /// Starts nmi on node `n` again with the same args and env; returns when
    /// its probe answers.
    pub async fn start_nmi(&mut self, n: usize) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(n).context("no such node")?;
        node.nmi.spawn(&node.net.node)?;
        node.nmi.wait_probe(&node.net.node).await
    }

    /// State for a failure message: AAIs, scale sets, ARM counters, and the
    /// last log lines of every process.
    pub async fn dump(&self) -> String {
        let mut out = format!(
            "--- AAIs: {:?}\n--- scale sets: {:?}\n--- emulator: {:?}\n",
            self.assigned().await,
            self.all_vmss_identities(),
            self.emu.counters()
        );
        for m in &self.mics {
            out.push_str(&format!(
                "--- {} (pid {:?}):\n{}\n",
                m.proc.name,
                m.proc.pid(),
                m.proc.log_tail(25)
            ));
        }
        for n in &self.nodes {
            out.push_str(&format!(
                "--- {} on {}:\n{}\n",
                n.nmi.name,
                n.name,
                n.nmi.log_tail(10)
            ));
        }
        out
    }

    /// `result`, with [`World::dump`] added to its error.
    async fn with_dump<T>(&self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        match result {
            Ok(v) => Ok(v),
            Err(e) => Err(e.context(self.dump().await)),
        }
    }

    /// Time since [`World::start`] began.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}
