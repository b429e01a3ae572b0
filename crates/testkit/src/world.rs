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
//!   of `e2e-mic` ([`Options::mic`], see [`Program`]), each in a network namespace of its own (a pod network, so
//!   every replica has the chart's ports), with the container's args and env
//!   (downward-API values filled in as the kubelet would, `HOSTNAME` the pod
//!   name), authenticated with a TokenRequest token of the chart's ServiceAccount;
//! - nmi as the rendered DaemonSet configures it: one `e2e-nmi` ([`Options::nmi`]) per node inside
//!   the node's network namespace (host network), with the node's pods as
//!   namespaces of their own behind veth links, and the node's emulated IMDS
//!   on 169.254.169.254:80 inside the node namespace.
//!
//! The only things not taken from the rendered objects are what a kubelet
//! provides: the host files the pod spec mounts (azure.json, the custom-cloud
//! file and the kubelet flags file are written by the world and substituted for
//! the mount paths), `--kubeconfig` (standing in for the in-cluster
//! ServiceAccount token mount) and `SSL_CERT_FILE` (the emulator's test CA,
//! which a real image would not need).
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

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aadpodid_api::AzureAssignedIdentity;
use aadpodid_api::policy::ANNOTATION_ALLOWED_IDENTITIES;
use anyhow::{Context as _, bail};
use azure_emulator::config::{
    IdentityAssignmentSeed, IdentitySeed, PermissionsSeed, ScaleSetSeed, SecretSeed,
    ServicePrincipalSeed,
};
use azure_emulator::{Config, Emulator};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node as KubeNode, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::netns::{IMDS_ADDRESS, NetNs, Node};
use crate::{PrivateCluster, helm, wait_for};

/// Tenant and subscription of the emulated Azure (the kit's shared ones).
pub use crate::{SUB, TENANT};
/// The AKS node resource group, holding the scale sets.
pub const NODE_RG: &str = "MC_e2e-rg_e2e-aks_eastus";
/// The resource group of the user-assigned identities pods use.
pub const APP_RG: &str = "e2e-identities";
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
const MIC_CLIENT: &str = "5b1c2c4e-0000-4000-8000-0000000e2e01";
const MIC_SECRET: &str = "e2e-mic-s3cr3t";
/// The release: namespace of mic and nmi, and of the chart's objects.
pub const RELEASE_NS: &str = "aad-pod-identity";
/// Where the users' identities, bindings and pods live.
pub const APP_NS: &str = "apps";
/// The Lease mic's leader holds (mic's default name and namespace).
const LEASE: (&str, &str) = ("default", "aad-pod-identity-mic");
/// The token request a pod makes (ARM, as the Azure SDKs ask).
pub const TOKEN_PATH: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F";
/// Host paths the rendered pod specs mount, as the chart's defaults name them.
const HOST_AZURE_JSON: &str = "/etc/kubernetes/azure.json";
const HOST_CUSTOM_CLOUD: &str = "/etc/kubernetes/akscustom.json";
const HOST_KUBELET_FLAGS: &str = "/etc/default/kubelet";
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
    format!(
        "/subscriptions/{SUB}/resourceGroups/{APP_RG}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

/// ARM ID of identity `name` in [`NODE_RG`] ([`KUBELET`], [`ADDON`]).
pub fn node_identity_resource(name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/{NODE_RG}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

/// The `aadpodidbinding` selector of identity `j`'s binding.
pub fn selector(j: usize) -> String {
    format!("sel-{j}")
}

/// Name of scale set `s`.
pub fn vmss_name(s: usize) -> String {
    format!("aks-pool{s}-12345678-vmss")
}

/// How the world starts mic or nmi: an executable, and variables set on top
/// of the container's environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Program {
    /// The executable.
    pub path: PathBuf,
    /// Variables added to the container's environment (they win over it).
    pub env: Vec<(String, String)>,
}

impl Program {
    /// A binary that is mic or nmi by itself.
    pub fn binary(path: impl Into<PathBuf>) -> Program {
        Program {
            path: path.into(),
            env: vec![],
        }
    }

    /// Executable `exe` run with `var=value`, which makes it act as mic or
    /// nmi (a tool that re-executes itself in a role).
    pub fn role(exe: impl Into<PathBuf>, var: &str, value: &str) -> Program {
        Program {
            path: exe.into(),
            env: vec![(var.into(), value.into())],
        }
    }

    /// [`Program::role`] of the running executable.
    pub fn this_executable_as(var: &str, value: &str) -> anyhow::Result<Program> {
        let exe = std::env::current_exe().context("find the running executable")?;
        Ok(Program::role(exe, var, value))
    }
}

/// What a world holds.
#[derive(Clone, Debug)]
pub struct Options {
    /// Number of scale sets.
    pub scale_sets: usize,
    /// Instances (nodes) per scale set.
    pub instances: usize,
    /// User-assigned identities `id-0..`, each with a binding `sel-<j>`.
    pub identities: usize,
    /// More user-assigned identities in the tenant, `id-<identities>..`,
    /// without chart objects (for identities the tests' users declare).
    pub unbound_identities: usize,
    /// Pod namespaces per node.
    pub pods_per_node: u8,
    /// Also an AzureIdentity + binding (`sel-invalid`) naming an identity the
    /// tenant does not have.
    pub invalid_identity: bool,
    /// Also [`ADDON`] on every scale set from the start (a pre-existing
    /// identity mic did not add).
    pub addon_identity: bool,
    /// Extra `--set key=value` for the chart.
    pub set: Vec<(String, String)>,
    /// Virtual seconds per real second of the emulator (a VMSS write takes 45
    /// virtual seconds).
    pub clock_speed: f64,
    /// How mic replicas are started.
    pub mic: Program,
    /// How nmi is started on each node.
    pub nmi: Program,
}

impl Options {
    /// Two scale sets of two instances, five identities, two pod namespaces
    /// per node, the chart's default values, the clock 30 times real time;
    /// mic and nmi are these executables (a test passes
    /// `env!("CARGO_BIN_EXE_e2e-mic")` and `env!("CARGO_BIN_EXE_e2e-nmi")`).
    pub fn new(mic_bin: impl Into<PathBuf>, nmi_bin: impl Into<PathBuf>) -> Self {
        Options::with_programs(Program::binary(mic_bin), Program::binary(nmi_bin))
    }

    /// [`Options::new`] with mic and nmi started as `mic` and `nmi` say (for
    /// example one executable re-executed in two roles, [`Program::role`]).
    pub fn with_programs(mic: Program, nmi: Program) -> Self {
        Options {
            mic,
            nmi,
            scale_sets: 2,
            instances: 2,
            identities: 5,
            unbound_identities: 0,
            pods_per_node: 2,
            invalid_identity: false,
            addon_identity: false,
            set: vec![],
            clock_speed: 30.0,
        }
    }
}

/// A process of the world (mic replica or nmi), with how to start it again.
#[derive(Debug)]
pub struct Proc {
    /// Pod name it stands for (`HOSTNAME`).
    pub name: String,
    program: Program,
    args: Vec<String>,
    env: Vec<(String, String)>,
    probe: (u16, String),
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Its process ID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self, ns: &NetNs) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = ns.command(&self.program.path);
        // The container's environment only, plus PATH (iptables) for the wrapper.
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(
                self.program
                    .env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("start {}", self.name))?,
        );
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` (`TERM`, `KILL`) and waits (bounded) until it exits.
    fn signal(&mut self, signal: &str) -> anyhow::Result<()> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        // `ip netns exec` and `setpriv` exec the program: the child's PID is its PID.
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &c.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -{signal} {} failed", self.name);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("{} did not exit within 20 s of SIG{signal}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// One node: a scale-set instance, its Node object, network namespaces and nmi.
#[derive(Debug)]
pub struct WorldNode {
    /// Node object name.
    pub name: String,
    /// Scale set it belongs to.
    pub vmss: String,
    /// Emulator machine label, `vmss/<name>/<id>`.
    pub machine: String,
    /// The node and its pods' namespaces.
    pub net: Node,
    /// nmi on it.
    pub nmi: Proc,
    relay: Child,
}

/// A mic replica: a process in a pod namespace of its own.
#[derive(Debug)]
pub struct MicReplica {
    /// Its network namespace.
    pub net: NetNs,
    /// The process.
    pub proc: Proc,
    relay: Child,
}

/// A pod of the world: a Pod object bound to a node, and its namespace.
#[derive(Clone, Debug)]
pub struct PodRef {
    /// Pod name.
    pub name: String,
    /// Its Kubernetes namespace ([`APP_NS`] for [`World::create_pods`]).
    pub namespace: String,
    /// Index into [`World::nodes`].
    pub node: usize,
    /// Index of its namespace among the node's pods.
    pub slot: usize,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Identity index it is bound to (label `aadpodidbinding: sel-<j>`), or
    /// `None` for the invalid identity.
    pub identity: Option<usize>,
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
    dir: PathBuf,
    started: Instant,
    _one: tokio::sync::MutexGuard<'static, ()>,
}

impl Drop for World {
    fn drop(&mut self) {
        for m in &mut self.mics {
            m.proc.kill();
            let _ = m.relay.kill();
            let _ = m.relay.wait();
        }
        for n in &mut self.nodes {
            n.nmi.kill();
            let _ = n.relay.kill();
            let _ = n.relay.wait();
        }
        self.emu.shutdown();
        if std::env::var_os("AADPODID_E2E_KEEP_LOGS").is_some() {
            eprintln!("e2e logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn socket_of(url: &str) -> anyhow::Result<SocketAddr> {
    url.trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("address of {url}"))
}

fn emulator_config(opts: &Options) -> Config {
    let mut cfg = Config::new(TENANT, SUB);
    cfg.resource_groups = vec![NODE_RG.into(), APP_RG.into()];
    let ident = |name: String, rg: &str, client: String| IdentitySeed {
        name,
        resource_group: rg.into(),
        client_id: Some(client),
        principal_id: None,
        federated_credentials: vec![],
        permissions: PermissionsSeed::default(),
    };
    cfg.identities = vec![ident(KUBELET.into(), NODE_RG, KUBELET_CLIENT.into())];
    let mut on_nodes = vec![KUBELET.to_string()];
    if opts.addon_identity {
        cfg.identities
            .push(ident(ADDON.into(), NODE_RG, ADDON_CLIENT.into()));
        on_nodes.push(ADDON.into());
    }
    cfg.identities.extend(
        (0..opts.identities + opts.unbound_identities)
            .map(|j| ident(id_name(j), APP_RG, id_client(j))),
    );
    cfg.scale_sets = (0..opts.scale_sets)
        .map(|s| ScaleSetSeed {
            name: vmss_name(s),
            resource_group: NODE_RG.into(),
            instances: (0..opts.instances).map(|i| i.to_string()).collect(),
            identity: IdentityAssignmentSeed {
                system_assigned: false,
                user_assigned: on_nodes.clone(),
            },
        })
        .collect();
    cfg.service_principals = vec![ServicePrincipalSeed {
        client_id: MIC_CLIENT.into(),
        object_id: None,
        secrets: vec![SecretSeed::Plain(MIC_SECRET.into())],
        certificates: vec![],
        federated_credentials: vec![],
        permissions: PermissionsSeed::default(),
    }];
    cfg.clock.speed = opts.clock_speed;
    cfg
}

/// The chart values of the world's identities (the chart's `azureIdentities`).
fn identities_values(opts: &Options) -> String {
    let mut out = String::from("azureIdentities:\n");
    let mut add = |key: &str, resource: &str, client: &str, sel: &str| {
        out.push_str(&format!(
            "  {key:?}:\n    namespace: {APP_NS:?}\n    type: 0\n    resourceID: {resource:?}\n    clientID: {client:?}\n    binding:\n      selector: {sel:?}\n"
        ));
    };
    for j in 0..opts.identities {
        add(
            &id_name(j),
            &id_resource(&id_name(j)),
            &id_client(j),
            &selector(j),
        );
    }
    if opts.invalid_identity {
        add(
            "id-missing",
            &id_resource("id-missing"),
            "c0000000-0000-4000-8000-00000000dead",
            "sel-invalid",
        );
    }
    out
}

/// The identity policy's grant of [`APP_NS`]: exactly the identities the
/// chart's `azureIdentities` put there, as the administrator who wrote those
/// values would grant them (so the chart applies in every policy mode).
fn app_ns_grants(opts: &Options) -> Option<String> {
    let ids: Vec<String> = (0..opts.identities)
        .map(|j| id_resource(&id_name(j)))
        .chain(opts.invalid_identity.then(|| id_resource("id-missing")))
        .collect();
    (!ids.is_empty()).then(|| ids.join(","))
}

/// The Pod object the kubelet would run for a rendered workload: the pod
/// template's labels and spec, bound to `node`, owned by the workload (nmi
/// watches the DaemonSet that owns its pod for `--cleanup-on-uninstall`).
async fn create_workload_pod(
    client: &Client,
    workload: &Value,
    owner_uid: &str,
    name: &str,
    node: &str,
) -> anyhow::Result<()> {
    let template = &workload["spec"]["template"];
    let mut spec = template["spec"].clone();
    spec["nodeName"] = json!(node);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": template["metadata"]["labels"],
            "ownerReferences": [{
                "apiVersion": workload["apiVersion"],
                "kind": workload["kind"],
                "name": workload["metadata"]["name"],
                "uid": owner_uid,
                "controller": true,
            }],
        },
        "spec": spec,
    }))?;
    let api: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NS);
    api.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("create pod {name}"))?;
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running"}})),
    )
    .await?;
    Ok(())
}

/// UID of the applied object `kind/name` in [`RELEASE_NS`].
async fn uid_of(client: &Client, kind: &str, name: &str) -> anyhow::Result<String> {
    use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
    let uid = match kind {
        "DaemonSet" => {
            Api::<DaemonSet>::namespaced(client.clone(), RELEASE_NS)
                .get(name)
                .await?
                .metadata
                .uid
        }
        _ => {
            Api::<Deployment>::namespaced(client.clone(), RELEASE_NS)
                .get(name)
                .await?
                .metadata
                .uid
        }
    };
    uid.with_context(|| format!("{kind} {name} has no uid"))
}

/// The first container of a rendered workload.
fn container(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]["containers"][0]
}

/// The liveness probe's (port, path).
fn probe_of(workload: &Value) -> anyhow::Result<(u16, String)> {
    let get = &container(workload)["livenessProbe"]["httpGet"];
    let port = match &get["port"] {
        Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .with_context(|| format!("probe port in {get}"))?;
    let path = get["path"].as_str().context("probe path")?.to_string();
    Ok((port, path))
}

/// Environment variables, (name, value).
type Env = Vec<(String, String)>;

/// The container's env, with downward-API fields filled in from `fields`
/// (`metadata.namespace`, `metadata.name`, `spec.nodeName`), and its args with
/// `$(VAR)` expanded as the kubelet does; `paths` maps host mount paths to files
/// of the world.
fn container_command(
    workload: &Value,
    fields: &BTreeMap<&str, String>,
    paths: &[(&str, &Path)],
) -> anyhow::Result<(Vec<String>, Env)> {
    let subst = |s: &str| {
        let mut s = s.to_string();
        for (from, to) in paths {
            s = s.replace(from, &to.display().to_string());
        }
        s
    };
    let mut env = Vec::new();
    for e in container(workload)["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().context("env name")?.to_string();
        let value = if let Some(v) = e["value"].as_str() {
            subst(v)
        } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            fields
                .get(path)
                .with_context(|| format!("env {name}: no value for field {path}"))?
                .clone()
        } else {
            bail!("env {name}: unsupported source {e}");
        };
        env.push((name, value));
    }
    let args = helm::container_args(workload)
        .iter()
        .map(|a| {
            let mut a = subst(a);
            for (k, v) in &env {
                a = a.replace(&format!("$({k})"), v);
            }
            a
        })
        .collect();
    Ok((args, env))
}

async fn kubectl_apply(cluster: &PrivateCluster, yaml: &str) -> anyhow::Result<()> {
    let out = tokio::task::block_in_place(|| {
        cluster.kubectl_run(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(yaml),
        )
    })?;
    if !out.success {
        bail!("kubectl apply failed: {}", out.stderr);
    }
    Ok(())
}

/// Polls `curl http://127.0.0.1:<port><path>` inside `ns` until it answers 200
/// (any body), bounded by [`PROCESS_START`].
async fn wait_probe(ns: &NetNs, proc: &mut Proc) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{}{}", proc.probe.0, proc.probe.1);
    let deadline = Instant::now() + PROCESS_START;
    loop {
        if let Some(c) = proc.child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!(
                "{} exited ({status}) before its probe answered:\n{}",
                proc.name,
                proc.log_tail(30)
            );
        }
        let code = probe_code(ns, &url).await;
        if code == Some(200) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{}: {url} not answering 200 after {PROCESS_START:?}:\n{}",
                proc.name,
                proc.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn probe_code(ns: &NetNs, url: &str) -> Option<u16> {
    let (code, _) = curl_in(ns, url, &[], 2).await.ok()?;
    Some(code)
}

/// `curl` inside `ns`: (status, body); status 0 when no HTTP answer came.
pub async fn curl_in(
    ns: &NetNs,
    url: &str,
    headers: &[&str],
    max_time: u32,
) -> anyhow::Result<(u16, String)> {
    let max = max_time.to_string();
    let mut cmd = ns.command("curl");
    cmd.args(["-s", "--max-time", &max, "-w", "\n%{http_code}"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(url).stdout(Stdio::piped()).stderr(Stdio::null());
    let out = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

impl World {
    /// Brings the world up (see the module documentation); every process's
    /// probe answers when this returns, and one mic replica holds the Lease.
    pub async fn start(opts: Options) -> anyhow::Result<World> {
        let one = ONE_WORLD.lock().await;
        let started = Instant::now();
        let dir = std::env::temp_dir().join(crate::unique_name("aadpodid-e2e"));
        std::fs::create_dir_all(&dir)?;
        let result = Self::build(opts, dir.clone(), one, started).await;
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        result
    }

    async fn build(
        opts: Options,
        dir: PathBuf,
        one: tokio::sync::MutexGuard<'static, ()>,
        started: Instant,
    ) -> anyhow::Result<World> {
        let cluster = PrivateCluster::start().await?;
        let emu = Emulator::start(emulator_config(&opts)).await?;
        let admin = cluster.admin_client().await?;

        // Files a node would hold.
        let azure_json = dir.join("azure.json");
        std::fs::write(
            &azure_json,
            json!({
                "cloud": "AzureStackCloud",
                "tenantId": TENANT,
                "aadClientId": MIC_CLIENT,
                "aadClientSecret": MIC_SECRET,
                "subscriptionId": SUB,
                "resourceGroup": NODE_RG,
                "vmType": "vmss",
                "userAssignedIdentityID": KUBELET_CLIENT,
            })
            .to_string(),
        )?;
        let cloud = dir.join("akscustom.json");
        std::fs::write(
            &cloud,
            json!({
                "name": "AzureStackCloud",
                "resourceManagerEndpoint": emu.arm_url(),
                "activeDirectoryEndpoint": emu.aad_url(),
                "tokenAudience": "https://management.azure.com/",
            })
            .to_string(),
        )?;
        // Azure CNI, as upstream's e2e clusters (`--network-plugin azure`).
        let kubelet_flags = dir.join("kubelet");
        std::fs::write(
            &kubelet_flags,
            "KUBELET_FLAGS=--network-plugin=cni --max-pods=110\n",
        )?;
        let paths: [(&str, &Path); 3] = [
            (HOST_AZURE_JSON, &azure_json),
            (HOST_CUSTOM_CLOUD, &cloud),
            (HOST_KUBELET_FLAGS, &kubelet_flags),
        ];

        // The chart, rendered and applied.
        let values = dir.join("identities-values.yaml");
        std::fs::write(&values, identities_values(&opts))?;
        let mut render = helm::Render::new("aad-pod-identity", RELEASE_NS)
            .with_crds()
            .values(&values)
            .set("mic.customCloud.enabled", "true");
        for (k, v) in &opts.set {
            render = render.set(k, v);
        }
        let text = tokio::task::block_in_place(|| helm::template_text(&render))?
            .map_err(|e| anyhow::anyhow!("helm template failed: {e}"))?;
        let rendered = helm::parse_documents(&text)?;
        let namespaces: Api<Namespace> = Api::all(admin.clone());
        for (ns, grants) in [(RELEASE_NS, None), (APP_NS, app_ns_grants(&opts))] {
            let n = Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.into()),
                    annotations: grants
                        .map(|g| BTreeMap::from([(ANNOTATION_ALLOWED_IDENTITIES.to_string(), g)])),
                    ..Default::default()
                },
                ..Default::default()
            };
            namespaces.create(&PostParams::default(), &n).await?;
        }
        kubectl_apply(&cluster, &text).await?;
        let deployment = helm::find(&rendered, "Deployment", "aad-pod-identity-mic")
            .context("rendered mic Deployment")?;
        let daemonset = helm::find(&rendered, "DaemonSet", "aad-pod-identity-nmi")
            .context("rendered nmi DaemonSet")?;
        let sa_of = |w: &Value| -> anyhow::Result<String> {
            Ok(w["spec"]["template"]["spec"]["serviceAccountName"]
                .as_str()
                .context("serviceAccountName")?
                .to_string())
        };
        let mic_kubeconfig = cluster
            .service_account_kubeconfig(RELEASE_NS, &sa_of(&deployment)?)
            .await?;
        let nmi_kubeconfig = cluster
            .service_account_kubeconfig(RELEASE_NS, &sa_of(&daemonset)?)
            .await?;

        let ds_uid = uid_of(&admin, "DaemonSet", "aad-pod-identity-nmi").await?;
        let deploy_uid = uid_of(&admin, "Deployment", "aad-pod-identity-mic").await?;
        let api = socket_of(cluster.server())?;
        let arm = socket_of(&emu.arm_url())?;
        let aad = socket_of(&emu.aad_url())?;
        let bundle = emu.ca_bundle_path().display().to_string();
        let extra_env = |pod: &str| {
            vec![
                ("HOSTNAME".to_string(), pod.to_string()),
                ("SSL_CERT_FILE".to_string(), bundle.clone()),
                ("NO_PROXY".to_string(), "127.0.0.1,localhost".to_string()),
            ]
        };

        // Nodes: Node objects, namespaces, IMDS, nmi.
        let nodes_api: Api<KubeNode> = Api::all(admin.clone());
        let nmi_probe = probe_of(&daemonset)?;
        let mut nodes = Vec::new();
        for s in 0..opts.scale_sets {
            for i in 0..opts.instances {
                let vmss = vmss_name(s);
                let name = format!("aks-pool{s}-12345678-vmss{i:06}");
                let provider = format!(
                    "azure:///subscriptions/{SUB}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachineScaleSets/{vmss}/virtualMachines/{i}",
                    NODE_RG.to_lowercase()
                );
                let node: KubeNode = serde_json::from_value(json!({
                    "metadata": {"name": name, "labels": {"kubernetes.io/os": "linux"}},
                    "spec": {"providerID": provider},
                }))?;
                nodes_api.create(&PostParams::default(), &node).await?;
                let machine = format!("vmss/{vmss}/{i}");
                let subnet = u8::try_from(nodes.len() + 1).context("too many nodes")?;
                let net = Node::with_pods_in(opts.pods_per_node, subnet)?;
                net.node.add_local_address(IMDS_ADDRESS)?;
                let imds = emu.add_imds(&machine, "127.0.0.1:0".parse()?).await?;
                let sockets = dir.join(net.node.name());
                std::fs::create_dir_all(&sockets)?;
                let relay = net
                    .node
                    .relay_many(
                        &[(api, api), (SocketAddr::from((IMDS_ADDRESS, 80)), imds)],
                        &sockets,
                    )
                    .await?;
                let pod_name = format!("aad-pod-identity-nmi-{}", nodes.len());
                create_workload_pod(&admin, &daemonset, &ds_uid, &pod_name, &name).await?;
                let fields = BTreeMap::from([
                    ("metadata.namespace", RELEASE_NS.to_string()),
                    ("metadata.name", pod_name.clone()),
                    ("spec.nodeName", name.clone()),
                ]);
                let (mut args, mut env) = container_command(&daemonset, &fields, &paths)?;
                args.push(format!("--kubeconfig={}", nmi_kubeconfig.display()));
                env.extend(extra_env(&pod_name));
                let nmi = Proc {
                    name: pod_name.clone(),
                    program: opts.nmi.clone(),
                    args,
                    env,
                    probe: nmi_probe.clone(),
                    log: dir.join(format!("{pod_name}.log")),
                    child: None,
                };
                nodes.push(WorldNode {
                    name,
                    vmss,
                    machine,
                    net,
                    nmi,
                    relay,
                });
            }
        }

        // mic replicas, each in a pod namespace of its own.
        let replicas = deployment["spec"]["replicas"].as_u64().unwrap_or(1);
        let mic_probe = probe_of(&deployment)?;
        let mut mics = Vec::new();
        for r in 0..replicas {
            let net = NetNs::new("mic")?;
            let sockets = dir.join(net.name());
            std::fs::create_dir_all(&sockets)?;
            let relay = net
                .relay_many(&[(api, api), (arm, arm), (aad, aad)], &sockets)
                .await?;
            let pod_name = format!("aad-pod-identity-mic-{r}");
            let node = nodes
                .get(usize::try_from(r)? % nodes.len().max(1))
                .map(|n: &WorldNode| n.name.clone())
                .unwrap_or_default();
            create_workload_pod(&admin, &deployment, &deploy_uid, &pod_name, &node).await?;
            let fields = BTreeMap::from([
                ("metadata.namespace", RELEASE_NS.to_string()),
                ("metadata.name", pod_name.clone()),
            ]);
            let (mut args, mut env) = container_command(&deployment, &fields, &paths)?;
            args.push(format!("--kubeconfig={}", mic_kubeconfig.display()));
            env.extend(extra_env(&pod_name));
            let proc = Proc {
                name: pod_name.clone(),
                program: opts.mic.clone(),
                args,
                env,
                probe: mic_probe.clone(),
                log: dir.join(format!("{pod_name}.log")),
                child: None,
            };
            mics.push(MicReplica { net, proc, relay });
        }

        let mut world = World {
            cluster,
            emu,
            nodes,
            mics,
            rendered,
            opts,
            dir,
            started,
            _one: one,
        };
        for n in &mut world.nodes {
            n.nmi.spawn(&n.net.node)?;
        }
        for m in &mut world.mics {
            m.proc.spawn(&m.net)?;
        }
        for n in &mut world.nodes {
            wait_probe(&n.net.node, &mut n.nmi).await?;
        }
        for m in &mut world.mics {
            wait_probe(&m.net, &mut m.proc).await?;
        }
        world.leader().await?;
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
        let leases: Api<Lease> = Api::namespaced(self.client().await?, LEASE.0);
        let mics = &self.mics;
        wait_for("a mic replica to hold the Lease", PROCESS_START, || {
            let leases = leases.clone();
            async move {
                let holder = leases.get_opt(LEASE.1).await.ok()??.spec?.holder_identity?;
                mics.iter()
                    .position(|m| m.proc.name == holder && m.proc.child.is_some())
            }
        })
        .await
    }

    /// `/healthz` body of mic replica `r` (`Active` when leading).
    pub async fn mic_health(&self, r: usize) -> Option<String> {
        let m = self.mics.get(r)?;
        let url = format!("http://127.0.0.1:{}{}", m.proc.probe.0, m.proc.probe.1);
        let (code, body) = curl_in(&m.net, &url, &[], 2).await.ok()?;
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
        wait_probe(&node.net.node, &mut node.nmi).await
    }

    /// Creates `count` pods, pod `i` on node `i % nodes` in the next free pod
    /// namespace there, bound to identity `identity_of(i)` (`None`: the invalid
    /// identity's selector), Running with its podIP.
    pub async fn create_pods(
        &self,
        first: usize,
        count: usize,
        identity_of: impl Fn(usize) -> Option<usize>,
    ) -> anyhow::Result<Vec<PodRef>> {
        let api: Api<Pod> = Api::namespaced(self.client().await?, APP_NS);
        let mut out = Vec::with_capacity(count);
        for i in first..first + count {
            let node = i % self.nodes.len();
            let slot = i / self.nodes.len();
            let (_, ip) = self.nodes[node]
                .net
                .pods
                .get(slot)
                .with_context(|| format!("node {node} has no pod namespace {slot}"))?;
            let identity = identity_of(i);
            let sel = identity.map_or_else(|| "sel-invalid".to_string(), selector);
            let name = format!("app-{i}");
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"aadpodidbinding": sel}},
                "spec": {
                    "nodeName": self.nodes[node].name,
                    "containers": [{"name": "app", "image": "app"}],
                },
            }))?;
            api.create(&PostParams::default(), &pod).await?;
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({
                    "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}
                })),
            )
            .await?;
            out.push(PodRef {
                name,
                namespace: APP_NS.into(),
                node,
                slot,
                ip: *ip,
                identity,
            });
        }
        Ok(out)
    }

    /// Deletes pods (grace period 0, as the kubelet confirms at once).
    pub async fn delete_pods(&self, pods: &[PodRef]) -> anyhow::Result<()> {
        let client = self.client().await?;
        for p in pods {
            let api: Api<Pod> = Api::namespaced(client.clone(), &p.namespace);
            api.delete(&p.name, &DeleteParams::default().grace_period(0))
                .await?;
        }
        Ok(())
    }

    /// The AzureAssignedIdentities of pods of [`APP_NS`]: (pod, identity name, status).
    pub async fn assigned(&self) -> anyhow::Result<Vec<(String, String, String)>> {
        // MIC keeps AAIs in `default` (upstream's place) unless namespaced.
        let api: Api<AzureAssignedIdentity> = Api::all(self.client().await?);
        Ok(api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|a| a.spec.pod_namespace == APP_NS)
            .map(|a| {
                let id = a
                    .spec
                    .azure_identity_ref
                    .as_ref()
                    .and_then(|r| r.metadata.name.clone())
                    .unwrap_or_default();
                let status = a.status.map(|s| s.status).unwrap_or_default();
                (a.spec.pod, id, status)
            })
            .collect())
    }

    /// Waits (bounded) until the AzureAssignedIdentities of [`APP_NS`] are
    /// exactly one `Assigned` per pod in `pods` with a valid identity (and
    /// one per pod of the invalid identity, in any other state).
    pub async fn wait_assigned(&self, pods: &[PodRef], timeout: Duration) -> anyhow::Result<()> {
        let want: BTreeMap<String, String> = pods
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    p.identity.map_or_else(|| "id-missing".into(), id_name),
                )
            })
            .collect();
        let r = wait_for("every pod's identity Assigned", timeout, || async {
            let aais = self.assigned().await.ok()?;
            if aais.len() != want.len() {
                return None;
            }
            let ok = aais.iter().all(|(pod, id, status)| {
                want.get(pod) == Some(id) && ((id == "id-missing") != (status == "Assigned"))
            });
            ok.then_some(())
        })
        .await;
        match r {
            Ok(()) => Ok(()),
            Err(e) => Err(e.context(self.dump().await)),
        }
    }

    /// Waits (bounded) until [`APP_NS`] has no AzureAssignedIdentity.
    pub async fn wait_no_assigned(&self, timeout: Duration) -> anyhow::Result<()> {
        let r = wait_for("no AzureAssignedIdentity left", timeout, || async {
            self.assigned().await.ok()?.is_empty().then_some(())
        })
        .await;
        match r {
            Ok(()) => Ok(()),
            Err(e) => Err(e.context(self.dump().await)),
        }
    }

    /// Names of the user-assigned identities on scale set `vmss`.
    pub fn vmss_identities(&self, vmss: &str) -> BTreeSet<String> {
        self.emu
            .assigned_identities(vmss)
            .unwrap_or_default()
            .iter()
            .map(|id| id.rsplit('/').next().unwrap_or(id).to_string())
            .collect()
    }

    /// What each scale set should carry for `pods`: the kubelet identity (and
    /// [`ADDON`] when seeded) and the valid identities of the pods on its nodes.
    pub fn expected_identities(&self, pods: &[PodRef]) -> BTreeMap<String, BTreeSet<String>> {
        let mut base = BTreeSet::from([KUBELET.to_lowercase()]);
        if self.opts.addon_identity {
            base.insert(ADDON.to_lowercase());
        }
        let mut out: BTreeMap<String, BTreeSet<String>> = (0..self.opts.scale_sets)
            .map(|s| (vmss_name(s), base.clone()))
            .collect();
        for p in pods {
            if let Some(j) = p.identity {
                out.entry(self.nodes[p.node].vmss.clone())
                    .or_default()
                    .insert(id_name(j));
            }
        }
        out
    }

    /// Every scale set's identities (names).
    pub fn all_vmss_identities(&self) -> BTreeMap<String, BTreeSet<String>> {
        (0..self.opts.scale_sets)
            .map(|s| (vmss_name(s), self.vmss_identities(&vmss_name(s))))
            .collect()
    }

    /// Waits (bounded) until the scale sets carry exactly `want`.
    pub async fn wait_vmss(
        &self,
        want: &BTreeMap<String, BTreeSet<String>>,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let r = wait_for("scale-set identities", timeout, || async {
            (self.all_vmss_identities() == *want).then_some(())
        })
        .await;
        match r {
            Ok(()) => Ok(()),
            Err(e) => Err(e.context(format!(
                "want {want:?}, have {:?}\n{}",
                self.all_vmss_identities(),
                self.dump().await
            ))),
        }
    }

    /// The pod's network namespace.
    pub fn pod_ns(&self, p: &PodRef) -> anyhow::Result<&NetNs> {
        self.nodes
            .get(p.node)
            .and_then(|n| n.net.pods.get(p.slot))
            .map(|(ns, _)| ns)
            .context("pod namespace")
    }

    /// A token request from inside the pod with curl, as an app would make it
    /// to 169.254.169.254: (status, body).
    pub async fn curl_token(&self, p: &PodRef, max_time: u32) -> anyhow::Result<(u16, String)> {
        curl_in(
            self.pod_ns(p)?,
            &format!("http://{IMDS_ADDRESS}{TOKEN_PATH}"),
            &["Metadata: true"],
            max_time,
        )
        .await
    }

    /// The `appid` of the token in a successful IMDS answer, verified with
    /// the emulator's signing key.
    pub fn appid_of(&self, body: &str) -> anyhow::Result<String> {
        let v: Value = serde_json::from_str(body).with_context(|| format!("not JSON: {body}"))?;
        let token = v["access_token"]
            .as_str()
            .with_context(|| format!("no access_token: {body}"))?;
        Ok(self
            .emu
            .verify_token(token)
            .map_err(|e| anyhow::anyhow!("token does not verify: {e:?}"))?
            .appid)
    }

    /// Asks for a token from every pod (all at once, as the apps would) and
    /// checks each gets its own identity's token.
    pub async fn check_tokens(&self, pods: &[PodRef]) -> anyhow::Result<()> {
        let failures = self.token_failures(pods).await?;
        if !failures.is_empty() {
            bail!(
                "{} of {} pods did not get their token:\n{}\n{}",
                failures.len(),
                pods.len(),
                failures.join("\n"),
                self.dump().await
            );
        }
        Ok(())
    }

    /// [`World::check_tokens`] again every 500 ms until every pod gets its
    /// token, for at most `timeout` (an identity put on a scale set reaches its
    /// instances' IMDS only when the scale-set write completes).
    pub async fn wait_tokens(&self, pods: &[PodRef], timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let failures = self.token_failures(pods).await?;
            if failures.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "after {timeout:?}, {} of {} pods still get no token:\n{}\n{}",
                    failures.len(),
                    pods.len(),
                    failures.join("\n"),
                    self.dump().await
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The pods that did not get their identity's token, with what they got.
    async fn token_failures(&self, pods: &[PodRef]) -> anyhow::Result<Vec<String>> {
        let mut set = tokio::task::JoinSet::new();
        for p in pods {
            let ns = self.pod_ns(p)?.command("curl");
            let p = p.clone();
            set.spawn(async move {
                let mut cmd = ns;
                cmd.args(["-s", "--max-time", "30"])
                    .args(["-H", "Metadata: true", "-w", "\n%{http_code}"])
                    .arg(format!("http://{IMDS_ADDRESS}{TOKEN_PATH}"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null());
                let out = tokio::process::Command::from(cmd)
                    .kill_on_drop(true)
                    .output()
                    .await;
                (p, out)
            });
        }
        let mut failures = Vec::new();
        while let Some(r) = set.join_next().await {
            let (p, out) = r?;
            let text = String::from_utf8_lossy(&out?.stdout).into_owned();
            let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
            let want = p.identity.map(id_client);
            let got = if code.trim() == "200" {
                self.appid_of(body).ok()
            } else {
                None
            };
            if got.is_none() || got != want {
                failures.push(format!("{} ({}): {code} {body}", p.name, p.ip));
            }
        }
        Ok(failures)
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

    /// Time since [`World::start`] began.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// A namespace-scoped user: ServiceAccount `user` of its own namespace,
/// bound there (RoleBindings) to the built-in `edit` ClusterRole and the
/// chart's `<fullname>-edit` ClusterRole, and to nothing else.
#[derive(Clone, Debug)]
pub struct NsUser {
    /// The user's namespace.
    pub namespace: String,
    /// The ServiceAccount's name.
    pub name: String,
    /// A kubeconfig that authenticates as the ServiceAccount.
    pub kubeconfig: PathBuf,
}

impl NsUser {
    /// The user name the apiserver sees.
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }

    /// A client acting as the user (bound to the calling runtime).
    pub async fn client(&self) -> anyhow::Result<Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(Client::try_from(config)?)
    }
}

/// One ClusterRole selector of an aggregation rule matches `labels`
/// (`matchLabels` only, the form every aggregated role here uses).
fn aggregation_matches(
    selectors: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector],
    labels: &BTreeMap<String, String>,
) -> bool {
    selectors.iter().any(|s| {
        s.match_expressions.as_ref().is_none_or(Vec::is_empty)
            && s.match_labels
                .as_ref()
                .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels.get(k) == Some(v)))
    })
}

impl World {
    /// Does what kube-controller-manager's ClusterRole aggregation would (no
    /// controller-manager runs here): every ClusterRole with an
    /// `aggregationRule` (the built-in `admin`, `edit`, `view`) gets the rules
    /// of the ClusterRoles its selectors match, the chart's user-facing roles
    /// included. Idempotent.
    pub async fn aggregate_cluster_roles(&self) -> anyhow::Result<()> {
        use k8s_openapi::api::rbac::v1::ClusterRole;
        let api: Api<ClusterRole> = Api::all(self.client().await?);
        let mut roles = api.list(&ListParams::default()).await?.items;
        // Aggregated roles aggregate each other (`view` into `edit` into
        // `admin`): repeat until nothing changes (bounded by the role count).
        let mut changed = BTreeSet::new();
        for _ in 0..=roles.len() {
            let mut any = false;
            for i in 0..roles.len() {
                let Some(selectors) = roles[i]
                    .aggregation_rule
                    .as_ref()
                    .and_then(|a| a.cluster_role_selectors.clone())
                else {
                    continue;
                };
                let mut rules = roles[i].rules.clone().unwrap_or_default();
                for (j, other) in roles.iter().enumerate() {
                    let labels = other.metadata.labels.clone().unwrap_or_default();
                    if j == i || !aggregation_matches(&selectors, &labels) {
                        continue;
                    }
                    for r in other.rules.iter().flatten() {
                        if !rules.contains(r) {
                            rules.push(r.clone());
                            any = true;
                            changed.insert(i);
                        }
                    }
                }
                roles[i].rules = Some(rules);
            }
            if !any {
                break;
            }
        }
        for i in changed {
            let name = roles[i].metadata.name.clone().context("ClusterRole name")?;
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"rules": roles[i].rules})),
            )
            .await
            .with_context(|| format!("aggregate ClusterRole {name}"))?;
        }
        Ok(())
    }

    /// Name of the chart's user-facing edit ClusterRole (rendered with
    /// `rbac.createUserFacingClusterRoles=true`).
    pub fn user_facing_edit_role(&self) -> anyhow::Result<String> {
        self.rendered
            .iter()
            .filter(|d| d["kind"] == "ClusterRole")
            .filter_map(|d| d["metadata"]["name"].as_str())
            .find(|n| n.ends_with("-edit"))
            .map(str::to_string)
            .context("the chart rendered no <fullname>-edit ClusterRole (set rbac.createUserFacingClusterRoles=true)")
    }

    /// Creates Namespace `name` (an administrator's act), with the identity
    /// policy's grant annotation when `grants` is given; an existing one gets
    /// the annotation set (or removed for `None`).
    pub async fn create_namespace(&self, name: &str, grants: Option<&str>) -> anyhow::Result<()> {
        let api: Api<Namespace> = Api::all(self.client().await?);
        if api.get_opt(name).await?.is_some() {
            api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {
                    ANNOTATION_ALLOWED_IDENTITIES: grants,
                }}})),
            )
            .await?;
            return Ok(());
        }
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: grants.map(|g| {
                    BTreeMap::from([(ANNOTATION_ALLOWED_IDENTITIES.to_string(), g.to_string())])
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        api.create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("create namespace {name}"))?;
        Ok(())
    }

    /// A namespace-scoped user in namespace `namespace` (created, with
    /// `grants` as in [`World::create_namespace`]): see [`NsUser`]. Also
    /// runs [`World::aggregate_cluster_roles`], so `edit` holds what it
    /// holds on a real cluster.
    pub async fn namespace_user(
        &self,
        namespace: &str,
        grants: Option<&str>,
    ) -> anyhow::Result<NsUser> {
        use k8s_openapi::api::rbac::v1::RoleBinding;
        let chart_edit = self.user_facing_edit_role()?;
        self.create_namespace(namespace, grants).await?;
        self.aggregate_cluster_roles().await?;
        let name = "user";
        let kubeconfig = self
            .cluster
            .service_account_kubeconfig(namespace, name)
            .await?;
        let bindings: Api<RoleBinding> = Api::namespaced(self.client().await?, namespace);
        for role in ["edit", chart_edit.as_str()] {
            let rb: RoleBinding = serde_json::from_value(json!({
                "metadata": {"name": format!("{name}-{role}")},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
            }))?;
            bindings
                .create(&PostParams::default(), &rb)
                .await
                .with_context(|| format!("bind {name} to {role} in {namespace}"))?;
        }
        Ok(NsUser {
            namespace: namespace.into(),
            name: name.into(),
            kubeconfig,
        })
    }

    /// `kubectl <args>` with `stdin`, as `user` (the administrator for
    /// `None`), bounded by `--request-timeout 30s`.
    pub async fn kubectl_as(
        &self,
        user: Option<&NsUser>,
        args: &[&str],
        stdin: Option<&str>,
    ) -> anyhow::Result<crate::KubectlOutput> {
        use std::io::Write as _;
        let mut cmd = match user {
            Some(u) => self.cluster.kubectl_with(&u.kubeconfig),
            None => self.cluster.kubectl(),
        };
        cmd.args(args).args(["--request-timeout", "30s"]);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        tokio::task::block_in_place(|| {
            let mut child = cmd.spawn().context("spawn kubectl")?;
            if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
                pipe.write_all(input.as_bytes())?;
            }
            let out = child.wait_with_output()?;
            Ok(crate::KubectlOutput {
                success: out.status.success(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        })
    }

    /// Node, slot and address of pod index `i` (as [`World::create_pods`]
    /// places it: node `i % nodes`, its pod namespace `i / nodes`).
    fn place(&self, i: usize) -> anyhow::Result<(usize, usize, Ipv4Addr)> {
        let nodes = self.nodes.len().max(1);
        let (node, slot) = (i % nodes, i / nodes);
        let (_, ip) = self
            .nodes
            .get(node)
            .and_then(|n| n.net.pods.get(slot))
            .with_context(|| format!("node {node} has no pod namespace {slot}"))?;
        Ok((node, slot, *ip))
    }

    /// Creates Pod `namespace/name` with `labels` through `client` (a
    /// user's, or the admin's), on the node of pod index `i` (see
    /// [`World::create_pods`]; do not mix indexes of both), then does what
    /// the kubelet would: Running with the address of that pod namespace.
    pub async fn create_pod_as(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        i: usize,
    ) -> anyhow::Result<PodRef> {
        let (node, _, _) = self.place(i)?;
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "nodeName": self.nodes[node].name,
                "containers": [{"name": "app", "image": "app"}],
            },
        }))?;
        Api::<Pod>::namespaced(client.clone(), namespace)
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("create pod {namespace}/{name}"))?;
        self.run_pod(namespace, name, i).await
    }

    /// What the scheduler and the kubelet do for an existing Pod (for
    /// example one applied with kubectl): bind it to the node of pod index
    /// `i` unless it names a node, and report it Running with the address of
    /// that pod namespace.
    pub async fn run_pod(&self, namespace: &str, name: &str, i: usize) -> anyhow::Result<PodRef> {
        let (node, slot, ip) = self.place(i)?;
        let api: Api<Pod> = Api::namespaced(self.client().await?, namespace);
        let pod = api.get(name).await?;
        let on = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        match on {
            Some(n) if n != self.nodes[node].name => {
                bail!("pod {namespace}/{name} is on {n}, not on node {node}")
            }
            Some(_) => {}
            None => {
                api.create_subresource::<_, Value>(
                    "binding",
                    name,
                    &PostParams::default(),
                    &json!({
                        "apiVersion": "v1", "kind": "Binding",
                        "metadata": {"name": name},
                        "target": {"apiVersion": "v1", "kind": "Node", "name": self.nodes[node].name},
                    }),
                )
                .await
                .with_context(|| format!("bind pod {namespace}/{name}"))?;
            }
        }
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}
            })),
        )
        .await?;
        Ok(PodRef {
            name: name.into(),
            namespace: namespace.into(),
            node,
            slot,
            ip,
            identity: None,
        })
    }

    /// A token request from inside the pod with curl, with `query` appended
    /// to [`TOKEN_PATH`] (for example `&client_id=...`): (status, body);
    /// status 0 when no answer came within `max_time` seconds.
    pub async fn token_request(
        &self,
        p: &PodRef,
        query: &str,
        max_time: u32,
    ) -> anyhow::Result<(u16, String)> {
        curl_in(
            self.pod_ns(p)?,
            &format!("http://{IMDS_ADDRESS}{TOKEN_PATH}{query}"),
            &["Metadata: true"],
            max_time,
        )
        .await
    }

    /// A token through the real Python `azure-identity`
    /// `ManagedIdentityCredential` run inside the pod (by `client_id` when
    /// given); returns the token's verified `appid`.
    pub async fn python_token_appid(
        &self,
        p: &PodRef,
        client_id: Option<&str>,
    ) -> anyhow::Result<String> {
        let ns = self.pod_ns(p)?;
        let selector = client_id.map_or(crate::IdentitySelector::Default, |c| {
            crate::IdentitySelector::ClientId(c)
        });
        let out = tokio::task::block_in_place(|| {
            crate::python_imds_token(
                None,
                "https://management.azure.com/.default",
                selector,
                Some(ns),
            )
        })?;
        let token = out["token"]
            .as_str()
            .with_context(|| format!("{}/{}: the SDK got no token: {out}", p.namespace, p.name))?;
        Ok(self
            .emu
            .verify_token(token)
            .map_err(|e| anyhow::anyhow!("token does not verify: {e:?}"))?
            .appid)
    }

    /// Every AzureAssignedIdentity (any namespace) for pod `namespace/pod`.
    pub async fn assigned_to(
        &self,
        namespace: &str,
        pod: &str,
    ) -> anyhow::Result<Vec<AzureAssignedIdentity>> {
        let api: Api<AzureAssignedIdentity> = Api::all(self.client().await?);
        Ok(api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|a| a.spec.pod == pod && a.spec.pod_namespace == namespace)
            .collect())
    }

    /// The Events of `namespace` as `client` may list them, one line each:
    /// `<Kind>/<name> <type> <reason>: <message>`.
    pub async fn events_in(&self, client: &Client, namespace: &str) -> anyhow::Result<Vec<String>> {
        use k8s_openapi::api::core::v1::Event;
        let api: Api<Event> = Api::namespaced(client.clone(), namespace);
        Ok(api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(|e| {
                format!(
                    "{}/{} {} {}: {}",
                    e.involved_object.kind.unwrap_or_default(),
                    e.involved_object.name.unwrap_or_default(),
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.message.unwrap_or_default()
                )
            })
            .collect())
    }

    /// Runs `body` while sampling every scale set every 100 ms; returns its
    /// result and every sample in which one of `keep` (identity names),
    /// once seen on a scale set, was missing from it, as `<vmss>: <identities>`.
    pub async fn while_watching_vmss<T>(
        &self,
        keep: &[&str],
        body: impl Future<Output = T>,
    ) -> (T, Vec<String>) {
        use std::sync::atomic::{AtomicBool, Ordering};
        let done = AtomicBool::new(false);
        let body = async {
            let r = body.await;
            done.store(true, Ordering::Relaxed);
            r
        };
        let watch = async {
            let mut missing = Vec::new();
            let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
            loop {
                for (vmss, ids) in self.all_vmss_identities() {
                    let mut gone = false;
                    for k in keep {
                        let k = k.to_lowercase();
                        if ids.iter().any(|i| i.eq_ignore_ascii_case(&k)) {
                            seen.insert((vmss.clone(), k));
                        } else if seen.contains(&(vmss.clone(), k)) {
                            gone = true;
                        }
                    }
                    let line = format!("{vmss}: {ids:?}");
                    if gone && missing.last() != Some(&line) {
                        missing.push(line);
                    }
                }
                if done.load(Ordering::Relaxed) {
                    return missing;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::join!(body, watch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_a_binary_or_an_executable_in_a_role() {
        let bin = Program::binary("/bin/mic");
        assert_eq!(bin.path, PathBuf::from("/bin/mic"));
        assert!(bin.env.is_empty());
        let role = Program::role("/bin/tool", "ROLE", "nmi");
        assert_eq!(role.path, PathBuf::from("/bin/tool"));
        assert_eq!(role.env, vec![("ROLE".to_string(), "nmi".to_string())]);
        let me = Program::this_executable_as("ROLE", "mic").unwrap();
        assert_eq!(me.path, std::env::current_exe().unwrap());
        let opts = Options::new("/m", "/n");
        assert_eq!((opts.mic.path, opts.nmi.path), ("/m".into(), "/n".into()));
    }
}
