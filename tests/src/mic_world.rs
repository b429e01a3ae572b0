//! The MIC tests' world, on the kit's one world builder
//! ([`aadpodid_testkit::world::WorldBuilder`]): its scratch folder, the
//! cluster (the shared one from its cluster step, or a private one whose
//! apiserver a test may stop) and the Node objects of two scale-set nodes and
//! one standalone-VM node; the emulated tenant of [`aadpodid_testkit::tenant`];
//! a temporary namespace. On top of it: MIC started in this process (or as the
//! `e2e-mic` command, a kit [`Proc`]) with the tenant's `azure.json`,
//! custom-cloud file and standard arguments, or with the args a chart's
//! Deployment renders; and the objects and waits of MIC's tests.
//!
//! The Azure SDK trusts the emulator's test CA only through `SSL_CERT_FILE`,
//! so the tests that use a world run as `child_` tests of their binary, in
//! the child process [`aadpodid_testkit::emulator_ca_parent_test`] starts;
//! a world is built from that child's environment ([`ChildEnv`]). A world
//! that runs MIC only as a process ([`MicWorld::standalone`]) needs no child:
//! the process is given the emulator's CA.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use aadpodid_tests::mic_world::MicWorld;
//! use aadpodid_tests::tenant::{APP_CLIENT, APP_RG, uai_id};
//! let w = MicWorld::shared("MICTEST", "life").build().await?;
//! let mic = w.start_mic("mic-0", &[]).await?;
//! w.identity("app-id", &uai_id(APP_RG, "app-id"), APP_CLIENT).await?;
//! w.binding("b", "app-id", "sel").await?;
//! w.pod("web", "sel", &w.nodes[0]).await?;
//! w.wait_assigned(&w.aai_name("web", "app-id")).await?;
//! mic.stop().await?;
//! w.cleanup().await;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aadpodid_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec,
    AzureIdentitySpec,
};
use aadpodid_runtime::Shutdown;
use aadpodid_testkit::children::ChildEnv;
use aadpodid_testkit::http::http_get;
use aadpodid_testkit::tenant::{
    self, APP_CLIENT, APP_ID, APP_RG, APP2_CLIENT, APP2_ID, CloudEnvironment, KUBELET,
    KUBELET_CLIENT, MicCloud, NODE_RG, Tenant,
};
use aadpodid_testkit::world::processes::pod_env;
use aadpodid_testkit::world::{
    ArgsSource, ClusterChoice, NodeSpec, Options, Proc, Program, WorldBuilder, create_pod,
};
use anyhow::{Context as _, bail};
use azure_emulator::{Config, Emulator};
use clap::Parser as _;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt as _};
use serde_json::Value;

use crate::{Cluster, PrivateCluster, TempNamespace, free_ports, unique_name, wait_for};

/// Bound on every wait of a MIC test.
pub const WAIT: Duration = Duration::from_secs(90);
/// The Lease MIC's leader holds (MIC's default name).
pub const LEASE: &str = "aad-pod-identity-mic";
/// Bound on MIC's start (until it hands its handles over) and stop.
const MIC_START: Duration = Duration::from_secs(60);
const MIC_STOP: Duration = Duration::from_secs(30);

/// A change to the emulator's configuration, made last.
struct ConfigTweak(Box<dyn FnOnce(&mut Config)>);

impl std::fmt::Debug for ConfigTweak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfigTweak")
    }
}

/// How to build a [`MicWorld`]; from [`MicWorld::shared`] or
/// [`MicWorld::private`].
#[derive(Debug)]
pub struct MicWorldBuilder {
    /// The child's environment prefix; `None`: a standalone world.
    env: Option<String>,
    prefix: String,
    private: bool,
    speed: f64,
    logs: bool,
    mic_args: Vec<String>,
    tweak: Option<ConfigTweak>,
}

impl MicWorldBuilder {
    /// The emulator's clock speed (default [`tenant::FAST_CLOCK`]; 10: a 45 s
    /// scale-set write takes 4.5 s, still running when a test acts).
    pub fn speed(mut self, speed: f64) -> Self {
        self.speed = speed;
        self
    }

    /// MIC's logs (of in-process instances) on this process's output, so
    /// they show up when a child test fails.
    pub fn logs(mut self) -> Self {
        self.logs = true;
        self
    }

    /// Arguments every MIC of this world gets after the standard ones (for
    /// example a shorter lease).
    pub fn mic_args(mut self, args: &[&str]) -> Self {
        self.mic_args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    /// Changes the emulator's configuration last, before it starts.
    pub fn tenant(mut self, tweak: impl FnOnce(&mut Config) + 'static) -> Self {
        self.tweak = Some(ConfigTweak(Box::new(tweak)));
        self
    }

    /// The world's tenant: the kit's standard one with [`APP2_ID`], scale set
    /// `vmss` (two instances carrying [`KUBELET`]) and VM `vm` (a system
    /// identity), the clock at [`MicWorldBuilder::speed`], then the tweak of
    /// [`MicWorldBuilder::tenant`].
    fn tenant_config(&mut self, vmss: &str, vm: &str, ca: Option<(PathBuf, PathBuf)>) -> Tenant {
        let mut t = Tenant::standard()
            .identity(APP2_ID, APP_RG, APP2_CLIENT)
            .scale_set(vmss, 2, &[KUBELET])
            .vm(vm, true, &[])
            .speed(self.speed)
            .test_ca(ca);
        if let Some(ConfigTweak(tweak)) = self.tweak.take() {
            tweak(t.config_mut());
        }
        t
    }

    /// Builds the world on the kit's [`WorldBuilder`]: a scratch folder in
    /// the child's, the cluster, the emulator with the world's tenant, a
    /// namespace, and the Node objects of two scale-set instances and the
    /// VM. Fails outside the child process of the test binary's parent test
    /// unless the world is [`MicWorld::standalone`].
    pub async fn build(mut self) -> anyhow::Result<MicWorld> {
        // The child's scratch folder and test CA; a standalone world's: the
        // temp folder, and the emulator makes a CA of its own.
        let (scratch, test_ca) = match &self.env {
            None => (std::env::temp_dir(), None),
            Some(env) => {
                let child = ChildEnv::get(env).with_context(|| {
                    format!(
                        "needs the environment ({env}_DIR, _CA_CERT, _CA_KEY) the parent test of this binary sets; run that test"
                    )
                })?;
                let test_ca = child.test_ca();
                (child.dir, test_ca)
            }
        };
        if self.logs {
            aadpodid_runtime::logging::init(aadpodid_runtime::logging::LogFormat::Text, "info");
        }
        let prefix = self.prefix.clone();
        let vmss = unique_name(&format!("{prefix}-vmss"));
        let vm_node = unique_name(&format!("{prefix}-vm"));
        // MIC runs in this process or from a path given per start: the
        // builder starts no process of its own.
        let opts = Options::new("", "");
        let dir = scratch.join(unique_name(&prefix));
        // A failed step drops the builder, which removes the folder.
        let mut world = WorldBuilder::new(opts, ArgsSource::Flags, dir)?;
        let emu = self
            .tenant_config(&vmss, &vm_node, test_ca)
            .start()
            .await
            .context("emulator starts")?;
        // A private cluster's apiserver a test may stop and start.
        let choice = if self.private {
            ClusterChoice::Private
        } else {
            ClusterChoice::Shared
        };
        let ns = world.cluster(choice).await?.temp_namespace(&prefix).await?;
        world.opts_mut().mic_namespace = ns.name().into();
        let nodes: Vec<String> = (0..2)
            .map(|i| unique_name(&format!("{prefix}-node{i}")))
            .collect();
        let specs: Vec<NodeSpec> = nodes
            .iter()
            .enumerate()
            .map(|(i, name)| NodeSpec {
                name: name.clone(),
                ..NodeSpec::scale_set(NODE_RG, &vmss, i, 0)
            })
            .chain([NodeSpec::vm(NODE_RG, &vm_node, 0)])
            .collect();
        world.node_objects(&specs).await?;
        Ok(MicWorld {
            ns,
            world,
            emu,
            vmss,
            nodes,
            vm_node,
            mic_args: self.mic_args,
        })
    }
}

/// One MIC test's world: the kit's [`WorldBuilder`] (scratch folder,
/// cluster, Node objects, teardown) with MIC on top of it. Its nodes are on
/// the tenant's scale set (instances 0 and 1) and on a standalone VM with a
/// system identity.
#[derive(Debug)]
pub struct MicWorld {
    // Dropped first, while a private cluster still runs.
    pub ns: TempNamespace,
    /// Holds the cluster (built by its cluster step).
    world: WorldBuilder,
    pub emu: Emulator,
    /// The scale set of [`MicWorld::nodes`].
    pub vmss: String,
    /// Nodes on instances 0 and 1 of [`MicWorld::vmss`].
    pub nodes: Vec<String>,
    /// A node on a standalone VM of the same name, with a system identity.
    pub vm_node: String,
    mic_args: Vec<String>,
}

/// MIC's command line (without the program name) and environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MicCommandLine {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl MicWorld {
    /// A world on the shared cluster; `env` is the prefix of the child's
    /// environment (as given to the parent test), `prefix` names this test's
    /// objects.
    pub fn shared(env: &str, prefix: &str) -> MicWorldBuilder {
        MicWorldBuilder {
            env: Some(env.into()),
            prefix: prefix.into(),
            private: false,
            speed: tenant::FAST_CLOCK,
            logs: false,
            mic_args: vec![],
            tweak: None,
        }
    }

    /// A world on the shared cluster outside any child process: its scratch
    /// folder in the temp folder, the emulator with a CA of its own, which
    /// only MIC processes ([`MicWorld::spawn_mic`]) are given; MIC in this
    /// process ([`MicWorld::start_mic`]) would not trust it.
    pub fn standalone(prefix: &str) -> MicWorldBuilder {
        MicWorldBuilder {
            env: None,
            ..MicWorld::shared("", prefix)
        }
    }

    /// A world on a cluster of its own ([`MicWorld::private_cluster`]).
    pub fn private(env: &str, prefix: &str) -> MicWorldBuilder {
        MicWorldBuilder {
            private: true,
            ..MicWorld::shared(env, prefix)
        }
    }

    /// The world's cluster (from the builder's cluster step).
    pub fn cluster(&self) -> &Cluster {
        match self.world.private_cluster() {
            Some(c) => c,
            // Not private: the step took the process's shared cluster.
            None => Cluster::shared(),
        }
    }

    /// The private cluster (its apiserver can be stopped and started).
    pub fn private_cluster(&self) -> anyhow::Result<&PrivateCluster> {
        self.world
            .private_cluster()
            .context("this world runs on the shared cluster")
    }

    /// An admin client: the builder's on the shared cluster, a new one on a
    /// private cluster (whose apiserver may have restarted).
    pub async fn client(&self) -> anyhow::Result<Client> {
        match self.world.private_cluster() {
            None => Ok(self.world.client()?.clone()),
            Some(c) => c.admin_client().await,
        }
    }

    /// The scratch folder (MIC's files and logs), removed with the world.
    pub fn dir(&self) -> &Path {
        self.world.dir()
    }

    /// Writes the tenant's azure.json and custom-cloud file for `instance`,
    /// and returns MIC's command line: the standard arguments with
    /// `kubeconfig` (default: the admin one), the world's arguments, the
    /// test periods, then `extra`.
    pub fn mic_command_line(
        &self,
        instance: &str,
        extra: &[&str],
        kubeconfig: Option<&Path>,
    ) -> anyhow::Result<MicCommandLine> {
        let files = self.cloud_files(instance)?;
        let kubeconfig = kubeconfig.unwrap_or_else(|| self.cluster().kubeconfig());
        let args = tenant::mic_args(&files, kubeconfig, instance, self.ns.name())
            .into_iter()
            .chain(self.mic_args.iter().cloned())
            .chain(tenant::MIC_TEST_PERIODS.iter().map(|a| a.to_string()))
            .chain(extra.iter().map(|a| a.to_string()))
            .collect();
        Ok(MicCommandLine {
            args,
            env: tenant::mic_env(&files, self.ns.name()),
        })
    }

    /// Writes the tenant's azure.json and custom-cloud file for `instance`.
    fn cloud_files(&self, instance: &str) -> anyhow::Result<tenant::MicCloudFiles> {
        tenant::write_mic_cloud_files(
            self.dir(),
            &format!("{instance}-{}-", self.ns.name()),
            &MicCloud::standard(),
            &CloudEnvironment::of(&self.emu),
        )
    }

    /// MIC's command line as a chart's MIC Deployment `deploy` runs it for
    /// pod `instance` in `namespace`: the container's args with
    /// `--cloudconfig` at the tenant's azure.json (written for `instance`),
    /// then `--kubeconfig` and `extra`; the env the pod gets (`namespace`
    /// from the downward API, the custom-cloud file, `FORCENAMESPACED`).
    pub fn chart_mic_command_line(
        &self,
        deploy: &Value,
        instance: &str,
        namespace: &str,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> anyhow::Result<MicCommandLine> {
        let files = self.cloud_files(instance)?;
        let args = aadpodid_testkit::helm::container_args(deploy)
            .into_iter()
            .map(|a| {
                if a.starts_with("--cloudconfig=") {
                    format!("--cloudconfig={}", files.azure_json.display())
                } else {
                    a
                }
            })
            .chain([format!("--kubeconfig={}", kubeconfig.display())])
            .chain(extra.iter().map(|a| a.to_string()))
            .collect();
        let mut env = tenant::mic_env(&files, namespace);
        env.push(("FORCENAMESPACED".into(), "false".into()));
        Ok(MicCommandLine { args, env })
    }

    /// MIC's settings through its own flag parsing ([`MicWorld::mic_command_line`]),
    /// with probe and metrics on free loopback ports and a 200 ms ARM poll.
    pub fn settings(
        &self,
        instance: &str,
        extra: &[&str],
        kubeconfig: Option<&Path>,
    ) -> anyhow::Result<mic::Settings> {
        let MicCommandLine { args, env } = self.mic_command_line(instance, extra, kubeconfig)?;
        let args = mic::args::Args::try_parse_from(std::iter::once("mic".to_string()).chain(args))?;
        let lookup = move |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let mut s = mic::Settings::from_args(&args, &lookup)?;
        s.probe_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        s.metrics_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        s.arm.poll_interval = Duration::from_millis(200);
        Ok(s)
    }

    /// MIC in this process as `instance`, with `extra` arguments.
    pub async fn start_mic(&self, instance: &str, extra: &[&str]) -> anyhow::Result<RunningMic> {
        RunningMic::start(self.settings(instance, extra, None)?).await
    }

    /// The `mic` command `bin` (a test's `env!("CARGO_BIN_EXE_e2e-mic")`) as
    /// a process ([`MicWorld::spawn_mic`]) with the standard command line,
    /// probe and metrics on free ports.
    pub fn spawn_mic_process(
        &self,
        bin: &Path,
        instance: &str,
        extra: &[&str],
    ) -> anyhow::Result<MicProcess> {
        let ports = free_ports()?;
        let [probe_flag, metrics_flag] = [
            format!("--http-probe-port={}", ports[0]),
            format!("--prometheus-port={}", ports[1]),
        ];
        let mut all: Vec<&str> = extra.to_vec();
        all.push(&probe_flag);
        all.push(&metrics_flag);
        let line = self.mic_command_line(instance, &all, None)?;
        self.spawn_mic(bin, instance, line, ports)
    }

    /// `bin` started as process `name` (a kit [`Proc`] in this network
    /// namespace) with `line` plus `HOSTNAME`, `SSL_CERT_FILE` (the emulator's
    /// CA) and `NO_PROXY`, none of this process's environment; its probe
    /// and metrics on loopback `ports`, logging to a file of the scratch
    /// folder.
    pub fn spawn_mic(
        &self,
        bin: &Path,
        name: &str,
        line: MicCommandLine,
        ports: [u16; 2],
    ) -> anyhow::Result<MicProcess> {
        let MicCommandLine { args, mut env } = line;
        env.extend(pod_env(name, self.emu.ca_bundle_path()));
        let log = self.dir().join(format!("{name}-{}.log", self.ns.name()));
        let [probe, metrics] = ports.map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
        let mut proc = Proc::new(
            name,
            Program::binary(bin),
            args,
            env,
            (probe.port(), "/healthz".into()),
            log.clone(),
        );
        proc.spawn_in(None)?;
        Ok(MicProcess {
            proc,
            probe,
            metrics,
            log,
        })
    }

    /// An AzureIdentity (type 0) in the world's namespace.
    pub async fn identity(
        &self,
        name: &str,
        resource_id: &str,
        client_id: &str,
    ) -> anyhow::Result<()> {
        self.create_identity(AzureIdentity::new(
            name,
            AzureIdentitySpec {
                resource_id: resource_id.into(),
                client_id: client_id.into(),
                ..Default::default()
            },
        ))
        .await
    }

    /// An AzureIdentity named after the tenant's identity `id` ([`KUBELET`],
    /// [`APP_ID`] or [`APP2_ID`]) with its resource and client ID.
    pub async fn tenant_identity(&self, id: &str) -> anyhow::Result<()> {
        let (rg, client_id) = match id {
            KUBELET => (NODE_RG, KUBELET_CLIENT),
            APP_ID => (APP_RG, APP_CLIENT),
            APP2_ID => (APP_RG, APP2_CLIENT),
            _ => bail!("{id} is not an identity of the tenant"),
        };
        self.identity(id, &tenant::uai_id(rg, id), client_id).await
    }

    /// The tenant's identity `id` ([`MicWorld::tenant_identity`]), a binding
    /// `<id>-<selector>` of it to `selector`, and pod `pod` on `node` with
    /// that selector; returns the name of the AzureAssignedIdentity to come.
    pub async fn bound_pod(
        &self,
        id: &str,
        pod: &str,
        selector: &str,
        node: &str,
    ) -> anyhow::Result<String> {
        self.tenant_identity(id).await?;
        self.binding(&format!("{id}-{selector}"), id, selector)
            .await?;
        self.pod(pod, selector, node).await?;
        Ok(self.aai_name(pod, id))
    }

    /// Any AzureIdentity, created in the world's namespace.
    pub async fn create_identity(&self, id: AzureIdentity) -> anyhow::Result<()> {
        self.create(id).await
    }

    /// Creates `obj` in the world's namespace.
    pub async fn create<K>(&self, mut obj: K) -> anyhow::Result<()>
    where
        K: kube::Resource<Scope = NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + serde::Serialize,
        K::DynamicType: Default,
    {
        obj.meta_mut().namespace = Some(self.ns.name().into());
        Api::<K>::namespaced(self.client().await?, self.ns.name())
            .create(&PostParams::default(), &obj)
            .await?;
        Ok(())
    }

    /// An AzureIdentityBinding of `identity` to pods labelled `selector`.
    pub async fn binding(&self, name: &str, identity: &str, selector: &str) -> anyhow::Result<()> {
        self.create(AzureIdentityBinding::new(
            name,
            AzureIdentityBindingSpec {
                azure_identity: identity.into(),
                selector: selector.into(),
                weight: 0,
            },
        ))
        .await
    }

    /// A pod on `node` labelled `aadpodidbinding=<selector>` (the kit's
    /// Pod object alone: no kubelet runs it, MIC needs no more).
    pub async fn pod(&self, name: &str, selector: &str, node: &str) -> anyhow::Result<()> {
        let api = Api::<Pod>::namespaced(self.client().await?, self.ns.name());
        let labels = [("aadpodidbinding", selector)].into();
        create_pod(&api, name, &labels, node, None).await
    }

    /// Deletes pods at once (grace period 0: no kubelet runs).
    pub async fn delete_pods(&self, names: &[&str]) -> anyhow::Result<()> {
        let api = Api::<Pod>::namespaced(self.client().await?, self.ns.name());
        for name in names {
            api.delete(name, &DeleteParams::default().grace_period(0))
                .await?;
        }
        Ok(())
    }

    /// Deletes one pod at once.
    pub async fn delete_pod(&self, name: &str) -> anyhow::Result<()> {
        self.delete_pods(&[name]).await
    }

    /// The AzureAssignedIdentity name MIC gives `pod`'s `identity`.
    pub fn aai_name(&self, pod: &str, identity: &str) -> String {
        format!("{pod}-{}-{identity}", self.ns.name())
    }

    /// An AzureAssignedIdentity (they live in `default`, as upstream's do).
    pub async fn aai(&self, name: &str) -> anyhow::Result<Option<AzureAssignedIdentity>> {
        Ok(
            Api::<AzureAssignedIdentity>::namespaced(self.client().await?, "default")
                .get_opt(name)
                .await?,
        )
    }

    /// This namespace's AzureAssignedIdentities.
    pub async fn aais(&self) -> anyhow::Result<Vec<AzureAssignedIdentity>> {
        Ok(
            Api::<AzureAssignedIdentity>::namespaced(self.client().await?, "default")
                .list(&Default::default())
                .await?
                .items
                .into_iter()
                .filter(|a| a.spec.pod_namespace == self.ns.name())
                .collect(),
        )
    }

    /// (name, status) of this namespace's AzureAssignedIdentities.
    pub async fn aai_states(&self) -> anyhow::Result<Vec<(String, Option<String>)>> {
        Ok(self
            .aais()
            .await?
            .into_iter()
            .map(|a| {
                (
                    a.metadata.name.unwrap_or_default(),
                    a.status.map(|s| s.status),
                )
            })
            .collect())
    }

    /// Waits for the AzureAssignedIdentity to be Assigned.
    pub async fn wait_assigned(&self, name: &str) -> anyhow::Result<AzureAssignedIdentity> {
        wait_try(&format!("AAI {name} Assigned"), || async {
            Ok(self.aai(name).await?.filter(is_assigned))
        })
        .await
    }

    /// Waits for the AzureAssignedIdentity to carry MIC's refusal; returns
    /// the reason. It must never be Assigned meanwhile.
    pub async fn wait_refused(&self, name: &str) -> anyhow::Result<String> {
        let aai = wait_try(&format!("AAI {name} refused"), || async {
            Ok(self.aai(name).await?.filter(|a| {
                a.annotations()
                    .contains_key(aadpodid_api::ANNOTATION_ASSIGNMENT_ERROR)
            }))
        })
        .await?;
        let status = aai.status.as_ref().map(|s| s.status.as_str());
        if status != Some("Created") {
            bail!("a refused AAI is not Assigned: {name} is {status:?}");
        }
        Ok(aai.annotations()[aadpodid_api::ANNOTATION_ASSIGNMENT_ERROR].clone())
    }

    /// Waits for the AzureAssignedIdentity to be deleted.
    pub async fn wait_gone(&self, name: &str) -> anyhow::Result<()> {
        wait_try(&format!("AAI {name} deleted"), || async {
            Ok(self.aai(name).await?.is_none().then_some(()))
        })
        .await
    }

    /// Waits until this namespace has no AzureAssignedIdentity; the error
    /// lists those left.
    pub async fn wait_no_aais(&self) -> anyhow::Result<()> {
        let r = wait_try("every AAI deleted", || async {
            Ok(self.aais().await?.is_empty().then_some(()))
        })
        .await;
        match r {
            Ok(()) => Ok(()),
            Err(e) => bail!("{e}; AAIs now: {:#?}", self.aai_states().await?),
        }
    }

    /// Waits until exactly the AzureAssignedIdentities of `expected` (pod,
    /// identity) exist, each once and Assigned, and no other.
    pub async fn wait_exactly_assigned(&self, expected: &[(&str, &str)]) -> anyhow::Result<()> {
        let names: BTreeSet<String> = expected
            .iter()
            .map(|(pod, id)| self.aai_name(pod, id))
            .collect();
        let r = wait_try("every AAI Assigned", || async {
            let aais = self.aais().await?;
            let assigned: BTreeSet<String> = aais
                .iter()
                .filter(|a| is_assigned(a))
                .filter_map(|a| a.metadata.name.clone())
                .collect();
            Ok(
                (assigned.len() == names.len() && names.iter().all(|k| assigned.contains(k)))
                    .then_some(aais),
            )
        })
        .await;
        let aais = match r {
            Ok(aais) => aais,
            Err(e) => bail!("{e}; AAIs now: {:#?}", self.aai_states().await?),
        };
        // No duplicates: one AAI per (pod, identity), and nothing unexpected.
        let mut seen: BTreeMap<(String, String), u32> = BTreeMap::new();
        for a in &aais {
            let identity = a
                .spec
                .azure_identity_ref
                .as_ref()
                .and_then(|i| i.metadata.name.clone())
                .unwrap_or_default();
            *seen.entry((a.spec.pod.clone(), identity)).or_default() += 1;
        }
        let want: BTreeMap<(String, String), u32> = expected
            .iter()
            .map(|(pod, id)| ((pod.to_string(), id.to_string()), 1))
            .collect();
        if seen != want {
            bail!("one AAI per pod and identity: have {seen:?}, want {want:?}");
        }
        Ok(())
    }

    /// The identities on the scale set (lower-case ARM IDs).
    pub fn vmss_identities(&self) -> BTreeSet<String> {
        self.emu
            .assigned_identities(&self.vmss)
            .unwrap_or_default()
            .into_iter()
            .collect()
    }

    /// The user-assigned identities on the standalone VM (lower-case ARM IDs).
    pub fn vm_identities(&self) -> BTreeSet<String> {
        self.emu
            .assigned_identities(&self.vm_node)
            .unwrap_or_default()
            .into_iter()
            .collect()
    }

    /// Whether the tenant's identity `name` (the kubelet's in the node group,
    /// any other in the app group) is on the scale set.
    pub fn on_vmss(&self, name: &str) -> bool {
        let rg = if name == KUBELET { NODE_RG } else { APP_RG };
        self.vmss_identities()
            .contains(&tenant::uai_id(rg, name).to_lowercase())
    }

    /// Waits until identity `name` is on the scale set (`present`) or not.
    pub async fn wait_on_vmss(&self, name: &str, present: bool) -> anyhow::Result<()> {
        wait_for(
            &format!("{name} on the scale set = {present}"),
            WAIT,
            || async { (self.on_vmss(name) == present).then_some(()) },
        )
        .await
    }

    /// Waits until the scale set and the VM hold exactly these identities.
    pub async fn wait_identities(
        &self,
        vmss: &BTreeSet<String>,
        vm: &BTreeSet<String>,
    ) -> anyhow::Result<()> {
        let r = wait_for(
            "the expected identities on the VMSS and VM",
            WAIT,
            || async {
                (self.vmss_identities() == *vmss && self.vm_identities() == *vm).then_some(())
            },
        )
        .await;
        if let Err(e) = r {
            bail!(
                "{e}: VMSS has {:?} (want {vmss:?}), VM has {:?} (want {vm:?})",
                self.vmss_identities(),
                self.vm_identities()
            );
        }
        Ok(())
    }

    /// ARM PATCHes the emulator received for the scale set, answered or
    /// refused (injected faults included).
    pub fn vmss_patches(&self) -> u64 {
        self.vmss_patch_answers().len() as u64
    }

    /// The status of each ARM PATCH of the scale set, in order.
    pub fn vmss_patch_answers(&self) -> Vec<u16> {
        let path = format!("/virtualmachinescalesets/{}?", self.vmss.to_lowercase());
        self.emu
            .requests(0)
            .iter()
            .filter(|r| r.method == "PATCH" && r.uri.to_lowercase().contains(&path))
            .map(|r| r.status)
            .collect()
    }

    /// The holder of MIC's Lease in this namespace.
    pub async fn lease_holder(&self) -> Option<String> {
        Api::<Lease>::namespaced(self.client().await.ok()?, self.ns.name())
            .get_opt(LEASE)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
    }

    /// Stops `mic` ([`RunningMic::stop`]), then [`MicWorld::cleanup`].
    pub async fn close(&self, mic: RunningMic) -> anyhow::Result<()> {
        let stopped = mic.stop().await;
        self.cleanup().await;
        stopped
    }

    /// Removes this world's nodes so later tests' MICs ignore its leftovers.
    pub async fn cleanup(&self) {
        let Ok(client) = self.client().await else {
            return;
        };
        for n in self.nodes.iter().chain(std::iter::once(&self.vm_node)) {
            let _ = Api::<Node>::all(client.clone())
                .delete(n, &DeleteParams::default())
                .await;
        }
    }
}

fn is_assigned(a: &AzureAssignedIdentity) -> bool {
    a.status.as_ref().is_some_and(|s| s.status == "Assigned")
}

/// [`wait_for`] within [`WAIT`] on a check that can fail.
async fn wait_try<T, F, Fut>(what: &str, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    wait_for_ok(what, WAIT, check).await
}

/// [`wait_for`] on a check that can fail: polls until `check` returns
/// `Ok(Some)`; an error ends the wait with that error.
pub async fn wait_for_ok<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    wait_for(what, timeout, || {
        let fut = check();
        async move {
            match fut.await {
                Ok(Some(v)) => Some(Ok(v)),
                Ok(None) => None,
                Err(e) => Some(Err(e)),
            }
        }
    })
    .await?
}

/// MIC running in this process.
#[derive(Debug)]
pub struct RunningMic {
    pub shutdown: Shutdown,
    pub task: tokio::task::JoinHandle<Result<(), mic::RunError>>,
    pub handles: mic::Handles,
}

impl RunningMic {
    /// Starts MIC with `settings`; returns once it handed its handles over.
    pub async fn start(settings: mic::Settings) -> anyhow::Result<RunningMic> {
        let shutdown = Shutdown::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(mic::run(settings, shutdown.clone(), Some(tx)));
        let handles = tokio::time::timeout(MIC_START, rx)
            .await
            .context("MIC starts")?
            .context("MIC sent its handles")?;
        Ok(RunningMic {
            shutdown,
            task,
            handles,
        })
    }

    /// Shuts MIC down; it must stop within 30 s, without error.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.trigger();
        let r = tokio::time::timeout(MIC_STOP, self.task)
            .await
            .context("MIC stops within 30 s")?
            .context("MIC task did not panic")?;
        r.context("MIC ran without error")
    }

    /// Waits until this MIC leads.
    pub async fn wait_leading(&self) -> anyhow::Result<()> {
        let mut leading = self.handles.leading.clone();
        tokio::time::timeout(WAIT, leading.wait_for(|l| *l))
            .await
            .context("MIC leads")??;
        Ok(())
    }

    /// Whether this MIC leads now.
    pub fn leading(&self) -> bool {
        *self.handles.leading.borrow()
    }

    /// The body of `/healthz` (`Active`, `Not Active`).
    pub async fn healthz(&self) -> anyhow::Result<String> {
        http_get(self.handles.probe_addr, "/healthz")
            .await
            .context("MIC's probe answers")
    }

    /// Waits until `/healthz` says `want`.
    pub async fn wait_healthz(&self, want: &str) -> anyhow::Result<()> {
        wait_try(&format!("healthz {want}"), || async {
            Ok((self.healthz().await? == want).then_some(()))
        })
        .await
    }

    /// The body of `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        http_get(self.handles.metrics_addr, "/metrics")
            .await
            .context("MIC's metrics answer")
    }

    /// The value of series `name` (with its labels, if any) on `/metrics`
    /// (0 when absent).
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        Ok(metric_value(&self.metrics().await?, name))
    }
}

/// The value of series `name` (with its labels, if any) in a `/metrics`
/// text; 0 when absent.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The value of series `name` on the `/metrics` of `addr` (0 when absent or
/// when nothing answers).
pub async fn scrape(addr: SocketAddr, name: &str) -> f64 {
    metric_value(&http_get(addr, "/metrics").await.unwrap_or_default(), name)
}

/// The `mic` command running as a process (the kit's [`Proc`]), with its
/// probe and metrics addresses; killed on drop.
#[derive(Debug)]
pub struct MicProcess {
    pub proc: Proc,
    pub probe: SocketAddr,
    pub metrics: SocketAddr,
    pub log: PathBuf,
}

impl Drop for MicProcess {
    fn drop(&mut self) {
        self.proc.kill();
    }
}

impl MicProcess {
    /// `/healthz`, or None while it does not answer.
    pub async fn healthz(&self) -> Option<String> {
        http_get(self.probe, "/healthz").await.ok()
    }

    /// The value of series `name` on `/metrics` (0 when absent or when
    /// nothing answers).
    pub async fn metric(&self, name: &str) -> f64 {
        scrape(self.metrics, name).await
    }

    /// The last 40 lines of its log.
    pub fn log_tail(&self) -> String {
        self.proc.log_tail(40)
    }

    /// SIGKILL, as the kubelet's OOM killer or a node failure would.
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.proc
            .terminate("KILL")
            .await
            .context("SIGKILL the MIC process")?;
        Ok(())
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    pub async fn terminate(mut self) -> anyhow::Result<()> {
        let exit = self
            .proc
            .terminate("TERM")
            .await?
            .context("MIC process runs")?;
        if !exit.success() {
            bail!("MIC exit status {exit}:\n{}", self.log_tail());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_values() {
        let text = "# HELP x\na_count 3\nb_count{op=\"x\"} 1.5\n";
        assert_eq!(metric_value(text, "a_count"), 3.0);
        assert_eq!(metric_value(text, "b_count{op=\"x\"}"), 1.5);
        assert_eq!(metric_value(text, "c_count"), 0.0);
        assert_eq!(metric_value(text, "a"), 0.0);
    }
}
