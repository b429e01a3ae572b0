//! NMI on a test node: a real apiserver, real iptables in a node network
//! namespace, pods in pod namespaces, the Azure emulator's IMDS behind
//! 169.254.169.254:80 inside the node, and NMI as a process there.
//!
//! Layout. NMI runs inside the node namespace (as a host-network DaemonSet
//! does), from a real binary: integration tests pass
//! `env!("CARGO_BIN_EXE_e2e-nmi")` to [`nmi_bin`], which
//! `AADPODID_NMI_BIN` overrides (to run another build of NMI, for example
//! an older one for comparison figures). The apiserver lives in the root
//! namespace on loopback; the node's relay carries the node's
//! `127.0.0.1:6443` to it over a Unix socket. Unix sockets are not
//! network-namespaced, so nothing is added to the root namespace's network.
//! The way to the apiserver passes a gate ([`NmiNode::set_api_reachable`])
//! that can hold new connections shut, to keep NMI's caches from syncing.
//!
//! The emulator runs where [`Options::imds`] says: in the calling process
//! with its IMDS and AAD carried into the node by the same relay
//! ([`Imds::Relayed`], the default: the test may use the [`Emulator`]
//! itself), or as a process inside the node ([`Imds::InNode`]: IMDS sees
//! every caller's own address, NMI's or a pod's, in its request log).
//!
//! The node stands on the kit's world builder
//! ([`aadpodid_testkit::world::WorldBuilder`]): the shared cluster and its
//! admin client come from its cluster step, the node's folder is its scratch
//! folder (removed with it), a relayed emulator is its tenant step's, and the
//! node itself (its Node object, network namespaces, relay and NMI's
//! process) is its node step's ([`WorldBuilder::node_with`]).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use aadpodid_tests::nmi_node::{NmiNode, Options, nmi_bin};
//! let bin = nmi_bin("/path/to/e2e-nmi"); // env!("CARGO_BIN_EXE_e2e-nmi") in a test
//! let node = NmiNode::start(Options::new(3, bin)).await?;
//! let (status, body) = node.curl(0, "/metadata/identity/oauth2/token?resource=x", &["Metadata: true"]).await?;
//! # Ok(()) }
//! ```

pub use aadpodid_testkit::flood;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use tokio::sync::watch;

use anyhow::{Context as _, bail};
use azure_emulator::config::{IdentityAssignmentSeed, IdentitySeed, ImdsListenerSeed, VmSeed};
use azure_emulator::{Config, Emulator};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use serde_json::Value;

use aadpodid_testkit::tenant::Tenant;
use aadpodid_testkit::world::builder::NodeLinks;
use aadpodid_testkit::world::{
    self, ArgsSource, ClusterChoice, NodeSpec, Proc, Program, WorldBuilder, WorldNode,
    create_pod_at, curl_head_in, socket_of,
};

use crate::netns::{IMDS_ADDRESS, NetNs, Node, read_until_ready};
use crate::{TempNamespace, unique_name, wait_for};

/// The emulator's tenant (the test kit's), and its ARM audience, a resource
/// IMDS always knows.
pub use crate::{TENANT, tenant::ARM_AUDIENCE as ARM};

/// Environment variable naming the NMI binary to run instead of the default.
pub const NMI_BIN_ENV: &str = "AADPODID_NMI_BIN";
/// Environment variable naming the emulator's configuration (JSON) for
/// [`emulator_child_main`].
pub const EMULATOR_CONFIG_ENV: &str = "AADPODID_NMI_NODE_EMULATOR";
/// Client ID of the user-assigned identity `id-a` on the node's VM.
pub const CLIENT_A: &str = "aaaaaaaa-0000-4000-8000-00000000000a";
/// Client ID of the user-assigned identity `id-b` on the node's VM.
pub const CLIENT_B: &str = "bbbbbbbb-0000-4000-8000-00000000000b";
/// Object (principal) ID of `id-a`.
pub const OBJECT_A: &str = "aaaaaaaa-1111-4000-8000-00000000000a";
/// Object (principal) ID of `id-b`.
pub const OBJECT_B: &str = "bbbbbbbb-1111-4000-8000-00000000000b";
/// Token path for [`ARM`], as a pod asks for it.
pub const ARM_TOKEN_PATH: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F";
/// The emulator's subscription.
pub const SUBSCRIPTION: &str = "00000000-0000-0000-0000-0000000000aa";
/// A service principal (type 1) the emulator's Entra ID knows.
pub const SP_CLIENT: &str = "cccccccc-0000-4000-8000-00000000000c";
/// Its client secret.
pub const SP_SECRET: &str = "s3cr3t-of-the-sp";
/// A service principal (type 2) authenticating with a certificate.
pub const SP_CERT_CLIENT: &str = "dddddddd-0000-4000-8000-00000000000d";
/// The rule of NMI's `aad-metadata` chain that sends pods' IMDS traffic to
/// NMI, as `iptables -t nat -S` prints it.
pub const REDIRECT_RULE: &str = "-A aad-metadata ! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:2579";
/// The jump from PREROUTING to NMI's chain, as `iptables -t nat -S` prints it.
pub const REDIRECT_JUMP: &str = "-A PREROUTING -j aad-metadata";
/// The same redirect in NMI's second chain, which upstream's NMI does not
/// delete when it stops.
pub const GUARD_RULE: &str = "-A aad-metadata-guard ! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:2579";
/// The jump from PREROUTING to NMI's second chain.
pub const GUARD_JUMP: &str = "-A PREROUTING -j aad-metadata-guard";

/// `AADPODID_NMI_BIN` when set, else `default` (in an integration test,
/// `env!("CARGO_BIN_EXE_e2e-nmi")`).
pub fn nmi_bin(default: impl Into<PathBuf>) -> PathBuf {
    match std::env::var_os(NMI_BIN_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => default.into(),
    }
}

/// Where the node's IMDS (the Azure emulator) runs.
#[derive(Clone, Debug, Default)]
pub enum Imds {
    /// The emulator in the calling process, its IMDS and AAD carried into
    /// the node by the relay: IMDS sees the relay as every caller, and the
    /// test reaches the emulator itself ([`NmiNode::emu`]).
    #[default]
    Relayed,
    /// The emulator as a process inside the node, IMDS on
    /// 169.254.169.254:80 there, so IMDS sees every caller's own address.
    /// The process is the calling test binary re-executed to run its
    /// ignored test `child_test`, which must call [`emulator_child_main`].
    InNode {
        /// The name of that test.
        child_test: &'static str,
    },
}

/// How a test node is set up.
#[derive(Clone, Debug)]
pub struct Options {
    /// Pod namespaces attached to the node (at most 200).
    pub pods: u8,
    /// The NMI binary (see [`nmi_bin`]).
    pub nmi_bin: PathBuf,
    /// Arguments appended to NMI's fixed ones (later flags win in clap only
    /// for single-valued flags; do not repeat a fixed one).
    pub nmi_args: Vec<String>,
    /// Start NMI and wait until `/healthz` says `Active` (else the test
    /// starts it with [`NmiNode::start_nmi`]).
    pub start_nmi: bool,
    /// Changes the emulator's configuration before it starts (the default
    /// one holds the identities and service principals of the constants above).
    pub emulator: fn(&mut Config),
    /// Where the emulator runs.
    pub imds: Imds,
    /// Prefix of the node's temporary namespace (see [`NmiNode::ns`]).
    pub namespace: &'static str,
    /// A program and its arguments run in front of NMI inside the node; it
    /// must end by executing the rest of its command line (for example
    /// `unshare -m -- sh -c '...; exec "$@"' sh`). Empty: NMI itself.
    pub wrapper: Vec<String>,
}

/// How one NMI start differs from the node's [`Options`].
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// Arguments appended to NMI's fixed ones (as [`Options::nmi_args`]).
    pub args: Vec<String>,
    /// The wrapper for this start (as [`Options::wrapper`]).
    pub wrapper: Vec<String>,
    /// Another kubeconfig for this start instead of the admin's through the
    /// relay (see [`NmiNode::relay_kubeconfig`]).
    pub kubeconfig: Option<PathBuf>,
    /// Variables added to NMI's environment (a pod's, as the kubelet sets
    /// them).
    pub env: Vec<(String, String)>,
    /// `args` and `--kubeconfig` alone, without NMI's fixed arguments (a
    /// chart's rendered container args).
    pub args_only: bool,
}

impl Options {
    /// `pods` pods, `nmi_bin`, no extra arguments, NMI started, the
    /// emulator relayed.
    pub fn new(pods: u8, nmi_bin: PathBuf) -> Self {
        Options {
            pods,
            nmi_bin,
            nmi_args: Vec::new(),
            start_nmi: true,
            emulator: |_| {},
            imds: Imds::default(),
            namespace: "nmi-node",
            wrapper: Vec::new(),
        }
    }

    /// With `args` appended to NMI's command line.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.nmi_args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// The node's emulator, where [`Options::imds`] put it.
#[derive(Debug)]
enum Azure {
    /// In this process: the builder's (its tenant step).
    Relayed,
    /// A process inside the node, and what it printed.
    InNode {
        child: Child,
        admin_url: String,
        aad_url: String,
    },
}

/// A test node with NMI (see the module docs). Everything it started is
/// stopped, its folder removed and its namespaces deleted on drop (the
/// builder's).
pub struct NmiNode {
    /// The Node's name (the VM's name in the emulator).
    pub node_name: String,
    /// PKCS#12 (password `pw`) of the type-2 service principal.
    pub sp_p12: Vec<u8>,
    /// The cluster's admin client.
    pub client: kube::Client,
    /// The test's temporary Kubernetes namespace, deleted on drop.
    ns: TempNamespace,
    azure: Azure,
    kubeconfig: PathBuf,
    nmi_bin: PathBuf,
    nmi_args: Vec<String>,
    wrapper: Vec<String>,
    log_path: PathBuf,
    /// Where the current start's output begins in the log.
    log_start: u64,
    /// The apiserver's address as the cluster's kubeconfig names it.
    api_server: String,
    /// Opens (true) and shuts (false) the node's way to the apiserver.
    api_gate: watch::Sender<bool>,
    /// Cluster, scratch folder, relayed emulator and the node (its one
    /// [`WorldBuilder::nodes`] entry, whose `nmi` is NMI's current start);
    /// dropped last (it stops NMI and the relay, removes the folder and
    /// stops the emulator).
    world: WorldBuilder,
}

impl std::fmt::Debug for NmiNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (name, dir) = (&self.node_name, self.dir());
        write!(f, "NmiNode {{ node_name: {name:?}, dir: {dir:?}, .. }}")
    }
}

impl Drop for NmiNode {
    fn drop(&mut self) {
        self.stop_nmi();
        if let Azure::InNode { child, .. } = &mut self.azure {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl NmiNode {
    /// Starts the emulator, the node with its pods and the relay on the
    /// shared cluster, and (with `opts.start_nmi`) NMI, waiting until it is
    /// active.
    pub async fn start(opts: Options) -> anyhow::Result<NmiNode> {
        let node_name = unique_name("node");
        // NMI starts from this node's own launch, not from a builder step.
        let kit_opts = world::Options::new("", opts.nmi_bin.clone());
        let dir = std::env::temp_dir().join(unique_name("nmi-node"));
        // A failed step drops the builder, which removes the folder.
        let mut world = WorldBuilder::new(kit_opts, ArgsSource::Flags, dir.clone())?;
        let cluster = world.cluster(ClusterChoice::Shared).await?;
        let (api_server, admin_kubeconfig) = (
            cluster.server().to_string(),
            cluster.kubeconfig().to_path_buf(),
        );
        let ns = cluster.temp_namespace(opts.namespace).await?;
        let client = world.client()?.clone();

        let mut cfg = emulator_config(&node_name);
        let (cert_pem, p12) = openssl_certificate(&dir)?;
        // Type 1 with its secret, type 2 with its certificate, as the
        // emulator's configuration file lists them.
        cfg.service_principals = serde_json::from_value(serde_json::json!([
            {"clientId": SP_CLIENT, "secrets": [SP_SECRET]},
            {"clientId": SP_CERT_CLIENT, "certificates": [cert_pem]},
        ]))?;
        // The CA bundle NMI trusts for AAD lives in the node's folder.
        cfg.listen.ca_bundle_path = Some(dir.join("emulator-ca.pem"));
        (opts.emulator)(&mut cfg);

        let spec = NodeSpec::vm("rg", &node_name, opts.pods);
        let (api_gate, gate) = watch::channel(true);
        let mut links = NodeLinks {
            apiserver_at: Some(SocketAddr::from(([127, 0, 0, 1], API_RELAY_PORT))),
            api_gate: Some(gate),
            // Pods in 10.244.0.0/24, as tests of this node count them.
            pod_subnet: Some(0),
            ..NodeLinks::default()
        };
        match &opts.imds {
            Imds::Relayed => {
                let emu = world.tenant(Tenant::of_config(cfg, "rg")).await?;
                // AAD keeps its address inside the node (the test CA's
                // certificate names 127.0.0.1), so `adEndpoint` is the
                // emulator's own URL.
                let aad = socket_of(&emu.aad_url())?;
                links.extra.push((aad, aad));
            }
            Imds::InNode { .. } => {
                // Started once the node is there, from this file.
                cfg.imds.listeners = vec![ImdsListenerSeed {
                    machine: spec.machine.clone(),
                    address: SocketAddr::from((IMDS_ADDRESS, 80)),
                }];
                std::fs::write(dir.join("emulator.json"), serde_json::to_vec(&cfg)?)?;
                links.imds_in_node = true;
            }
        }
        let log_path = dir.join("nmi.log");
        let mut f = NmiNode {
            node_name,
            sp_p12: p12,
            client,
            ns,
            // Until the emulator inside the node runs (below).
            azure: Azure::Relayed,
            kubeconfig: dir.join("kubeconfig"),
            nmi_bin: opts.nmi_bin,
            nmi_args: opts.nmi_args,
            wrapper: opts.wrapper,
            log_path,
            log_start: 0,
            api_server,
            api_gate,
            world,
        };
        f.kubeconfig = f.relay_kubeconfig(&admin_kubeconfig, "kubeconfig")?;
        let nmi = f.nmi_proc(&f.default_launch());
        f.world.node_with(&spec, links, nmi).await?;
        if let Imds::InNode { child_test } = opts.imds {
            f.azure = start_emulator_in(f.node_ns(), child_test, &dir)?;
        }
        if opts.start_nmi {
            f.start_nmi()?;
            f.wait_active().await?;
        }
        Ok(f)
    }

    /// NMI's fixed arguments for this node, with `kubeconfig`.
    fn base_args(&self, kubeconfig: &Path) -> Vec<String> {
        let mut args = nmi_args(&self.node_name, kubeconfig);
        args.push(format!("--aad-ca-file={}", self.ca_bundle().display()));
        args
    }

    /// The emulator in this process ([`Imds::Relayed`]); an error when it
    /// runs inside the node.
    pub fn emu(&self) -> anyhow::Result<&Emulator> {
        match &self.azure {
            Azure::Relayed => self.world.emu(),
            Azure::InNode { .. } => bail!("the emulator runs inside the node: use its admin API"),
        }
    }

    /// The `appid` of `token` once the emulator has checked its signature
    /// ([`Imds::Relayed`]).
    pub fn verified_appid(&self, token: &str) -> anyhow::Result<String> {
        let claims = self
            .emu()?
            .verify_token(token)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(claims.appid)
    }

    /// [`NmiNode::verified_appid`] of the `access_token` of a token
    /// answer's `body`.
    pub fn answer_appid(&self, body: &str) -> anyhow::Result<String> {
        self.verified_appid(&aadpodid_testkit::world::access_token(body)?)
    }

    /// The emulator's AAD URL (the same inside the node and here).
    pub fn aad_url(&self) -> String {
        match &self.azure {
            Azure::Relayed => self.emu().map(Emulator::aad_url).unwrap_or_default(),
            Azure::InNode { aad_url, .. } => aad_url.clone(),
        }
    }

    /// The emulator's CA bundle (its AAD's certificate), in the node's folder.
    pub fn ca_bundle(&self) -> PathBuf {
        self.dir().join("emulator-ca.pem")
    }

    /// A call to the emulator's admin API (`/requests`, `/faults`, ...):
    /// its JSON answer (`Null` when empty); an error unless 2xx.
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let (mut cmd, url) = match &self.azure {
            Azure::Relayed => (std::process::Command::new("curl"), self.emu()?.admin_url()),
            Azure::InNode { admin_url, .. } => (self.node_ns().command("curl"), admin_url.clone()),
        };
        cmd.args([
            "-s",
            "-f",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            "-X",
            method,
        ]);
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "-d", &b.to_string()]);
        }
        cmd.arg(format!("{}{path}", url.trim_end_matches('/')))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = tokio::process::Command::from(cmd).output().await?;
        if !out.status.success() {
            bail!(
                "admin {method} {path}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).with_context(|| format!("admin {path}: {text}"))
    }

    /// The emulator's request log after sequence number `since`.
    async fn requests(&self, since: u64) -> anyhow::Result<Vec<Value>> {
        let all = self
            .admin("GET", &format!("/requests?since={since}"), None)
            .await?;
        Ok(all.as_array().context("request log")?.clone())
    }

    /// The IMDS requests of the emulator's log after sequence number
    /// `since`, each with the caller's address (`peer`).
    pub async fn imds_requests(&self, since: u64) -> anyhow::Result<Vec<Value>> {
        let mut all = self.requests(since).await?;
        all.retain(|r| r["service"] == "imds");
        Ok(all)
    }

    /// The highest sequence number in the emulator's request log so far.
    pub async fn last_seq(&self) -> anyhow::Result<u64> {
        let all = self.requests(0).await?;
        Ok(all
            .iter()
            .filter_map(|r| r["seq"].as_u64())
            .max()
            .unwrap_or(0))
    }

    /// Adds a fault (the admin API's JSON form) to the emulator.
    pub async fn inject(&self, fault: Value) -> anyhow::Result<()> {
        self.admin("POST", "/faults", Some(&fault))
            .await
            .map(|_| ())
    }

    /// Removes the emulator's faults.
    pub async fn clear_faults(&self) -> anyhow::Result<()> {
        self.admin("DELETE", "/faults", None).await.map(|_| ())
    }

    /// NMI's Prometheus text, from inside the node.
    pub fn metrics(&self) -> anyhow::Result<String> {
        self.node_ns().run(
            "curl",
            &[
                "-s",
                "--max-time",
                "5",
                &format!("http://127.0.0.1:{METRICS_PORT}/metrics"),
            ],
        )
    }

    /// Starts NMI (stopping a running one first) with the fixed arguments
    /// and the extra ones of [`Options::nmi_args`]; does not wait. Its log
    /// is appended to [`NmiNode::log`].
    pub fn start_nmi(&mut self) -> anyhow::Result<()> {
        self.launch(&self.default_launch())
    }

    /// What [`NmiNode::start_nmi`] starts.
    fn default_launch(&self) -> Launch {
        Launch {
            args: self.nmi_args.clone(),
            wrapper: self.wrapper.clone(),
            ..Launch::default()
        }
    }

    /// [`NmiNode::start_nmi`] with `extra` instead of the extra arguments
    /// of the options (remembered for later restarts).
    pub fn start_nmi_with(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        self.nmi_args = extra.iter().map(|s| s.to_string()).collect();
        self.start_nmi()
    }

    /// [`NmiNode::start_nmi_with`], then waits until NMI is active.
    pub async fn restart_nmi_with(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        self.start_nmi_with(extra)?;
        self.wait_active().await
    }

    /// Starts NMI (stopping a running one first) as `launch` says, without
    /// changing what later [`NmiNode::start_nmi`] calls do; does not wait.
    pub fn launch(&mut self, launch: &Launch) -> anyhow::Result<()> {
        self.stop_nmi();
        self.log_start = std::fs::metadata(&self.log_path).map_or(0, |m| m.len());
        let mut nmi = self.nmi_proc(launch);
        let bin = self.nmi_bin.display().to_string();
        let node = self.kit_node_mut();
        nmi.spawn(&node.net.node).context(bin)?;
        node.nmi = nmi;
        Ok(())
    }

    /// NMI's process as `launch` says, not started: its log appended to
    /// [`NmiNode::log`].
    fn nmi_proc(&self, launch: &Launch) -> Proc {
        let (program, mut args) = match launch.wrapper.split_first() {
            Some((program, rest)) => {
                let mut args = rest.to_vec();
                args.push(self.nmi_bin.display().to_string());
                (PathBuf::from(program), args)
            }
            None => (self.nmi_bin.clone(), Vec::new()),
        };
        let kubeconfig = launch.kubeconfig.as_deref().unwrap_or(&self.kubeconfig);
        if launch.args_only {
            args.extend(launch.args.iter().cloned());
            args.push(format!("--kubeconfig={}", kubeconfig.display()));
        } else {
            args.extend(self.base_args(kubeconfig));
            args.extend(launch.args.iter().cloned());
        }
        // The test's environment without its proxies: NMI reaches loopback only.
        let env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| !crate::env::PROXY_VARS.contains(&k.as_str()))
            .chain([("NO_PROXY".to_string(), "127.0.0.1,localhost".to_string())])
            .chain(launch.env.iter().cloned())
            .collect();
        Proc::new(
            &format!("nmi-{}", self.node_name),
            Program::binary(program),
            args,
            env,
            (PROBE_PORT, "/healthz".into()),
            self.log_path.clone(),
        )
    }

    /// Runs `bin` at the next starts instead of [`Options::nmi_bin`] (another
    /// build of NMI, for before/after figures).
    pub fn set_nmi_bin(&mut self, bin: PathBuf) {
        self.nmi_bin = bin;
    }

    /// Takes NMI's process from the node (which then no longer stops it),
    /// for a test that waits for it to exit.
    pub fn take_nmi(&mut self) -> Option<Child> {
        let idle = self.nmi_proc(&self.default_launch());
        std::mem::replace(&mut self.kit_node_mut().nmi, idle).into_child()
    }

    /// Stops NMI as the kubelet does (SIGTERM) and waits (bounded) until it
    /// exits; nothing when it is not running. The error carries what this
    /// start logged.
    pub async fn terminate_nmi(&mut self) -> anyhow::Result<()> {
        let r = self.kit_node_mut().nmi.terminate("TERM").await;
        r.map(drop)
            .with_context(|| format!("nmi log:\n{}", self.start_log()))
    }

    /// Kills NMI (SIGKILL, as a crashing or OOM-killed NMI) and reaps it;
    /// nothing when it is not running.
    pub fn stop_nmi(&mut self) {
        // No node yet when its step failed (and the node is dropped).
        if let Some(node) = self.world.nodes.first_mut() {
            node.nmi.kill();
        }
    }

    /// Stops NMI, starts it again with the same arguments and waits until
    /// it is active.
    pub async fn restart_nmi(&mut self) -> anyhow::Result<()> {
        self.start_nmi()?;
        self.wait_active().await
    }

    /// NMI's process ID while it runs: the child itself (`ip netns exec`
    /// and `setpriv` exec in place), or the process below it that runs the
    /// NMI binary should a wrapper have forked.
    pub fn nmi_pid(&self) -> Option<u32> {
        let id = self.kit_node().nmi.pid()?;
        let exe = std::fs::canonicalize(&self.nmi_bin).unwrap_or_else(|_| self.nmi_bin.clone());
        Some(crate::procfs::find_exe(id, &exe).unwrap_or(id))
    }

    /// Whether NMI's process is still running (false once it has exited).
    pub fn nmi_running(&mut self) -> bool {
        let nmi = &mut self.kit_node_mut().nmi;
        nmi.pid().is_some() && nmi.exited().is_none()
    }

    /// Everything NMI wrote to stdout and stderr since this node started,
    /// without terminal colours.
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log_path).unwrap_or_default())
    }

    /// What the current (last started) NMI wrote, without terminal colours.
    pub fn start_log(&self) -> String {
        let raw = std::fs::read(&self.log_path).unwrap_or_default();
        let from = usize::try_from(self.log_start).unwrap_or(0).min(raw.len());
        strip_ansi(&String::from_utf8_lossy(&raw[from..]))
    }

    /// Opens (`true`, the default) or shuts the node's way to the apiserver:
    /// while shut, new connections wait (those open stay open).
    pub fn set_api_reachable(&self, open: bool) {
        self.api_gate.send_replace(open);
    }

    /// Writes `source` (a kubeconfig for the cluster) to `name` in the
    /// node's folder with the apiserver's address replaced by the node's
    /// relay, as NMI must see it; returns its path (see [`Launch::kubeconfig`]).
    pub fn relay_kubeconfig(&self, source: &Path, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir().join(name);
        write_relayed_kubeconfig(source, &self.api_server, &path)?;
        Ok(path)
    }

    /// The node's nat table (`iptables -t nat -S`), or one chain of it.
    pub fn nat_rules(&self, chain: Option<&str>) -> anyhow::Result<String> {
        let mut args = vec!["-w", "5", "-t", "nat", "-S"];
        args.extend(chain);
        self.node_ns().run("iptables", &args)
    }

    /// Whether NMI's redirect rules and the jumps to them (both chains) are
    /// in the node's nat table.
    pub fn redirect_in_place(&self) -> bool {
        self.nat_rules(None).is_ok_and(|out| {
            [REDIRECT_RULE, REDIRECT_JUMP, GUARD_RULE, GUARD_JUMP]
                .iter()
                .all(|want| out.lines().any(|l| l.trim() == *want))
        })
    }

    /// Whether any jump to NMI's chains is in PREROUTING (false: pods reach
    /// the real IMDS).
    pub fn any_redirect_jump(&self) -> bool {
        self.nat_rules(Some("PREROUTING")).is_ok_and(|out| {
            out.lines()
                .any(|l| l.trim() == REDIRECT_JUMP || l.trim() == GUARD_JUMP)
        })
    }

    /// Deletes the jumps from PREROUTING to NMI's chains at once, in one
    /// `iptables-restore` transaction (as a reboot or a flush of PREROUTING
    /// would leave the node).
    pub fn remove_redirect_jump(&self) -> anyhow::Result<()> {
        let script = "printf '*nat\\n-D PREROUTING -j aad-metadata\\n-D PREROUTING -j aad-metadata-guard\\nCOMMIT\\n' | iptables-restore -w 5 --noflush";
        self.node_ns().run("sh", &["-c", script])?;
        Ok(())
    }

    /// The node's folder (Unix sockets, kubeconfig, NMI's log).
    pub fn dir(&self) -> &Path {
        self.world.dir()
    }

    /// The kubeconfig NMI uses (the apiserver through the node's relay).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The kit's node (the builder's only one).
    fn kit_node(&self) -> &WorldNode {
        &self.world.nodes[0]
    }

    /// [`NmiNode::kit_node`], to change.
    fn kit_node_mut(&mut self) -> &mut WorldNode {
        &mut self.world.nodes[0]
    }

    /// The node and pod namespaces.
    pub fn net(&self) -> &Node {
        &self.kit_node().net
    }

    /// The node's network namespace.
    pub fn node_ns(&self) -> &NetNs {
        &self.net().node
    }

    /// Pod `i`'s network namespace. Panics when there is no pod `i`
    /// (test code: the index is the test's own).
    pub fn pod_ns(&self, i: usize) -> &NetNs {
        &self.net().pods[i].0
    }

    /// Pod `i`'s IPv4 address.
    pub fn pod_ip(&self, i: usize) -> String {
        self.net().pods[i].1.to_string()
    }

    /// NMI's `/healthz` answer from inside the node, within 1 s.
    pub async fn healthz(&self) -> Option<String> {
        healthz(self.node_ns()).await
    }

    /// Waits (60 s at most) until NMI's `/healthz` says `Active`; the error
    /// carries NMI's log.
    pub async fn wait_active(&self) -> anyhow::Result<()> {
        wait_active(self.node_ns(), || self.log()).await
    }

    /// `curl` from pod `i` to `http://169.254.169.254<path>`: (status, body).
    pub async fn curl(
        &self,
        i: usize,
        path: &str,
        headers: &[&str],
    ) -> anyhow::Result<(u16, String)> {
        curl(self.pod_ns(i), path, headers).await
    }

    /// The test's temporary Kubernetes namespace (see [`Options::namespace`]),
    /// where the helpers below put pods and their identities.
    pub fn ns(&self) -> &str {
        self.ns.name()
    }

    /// Creates pod `name` on this node in [`NmiNode::ns`] with pod `i`'s
    /// address, Running.
    pub async fn create_pod(
        &self,
        name: &str,
        i: usize,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        self.create_pod_in(self.ns(), name, &[&self.pod_ip(i)], labels)
            .await
    }

    /// Creates pod `name` on this node in `ns` with the addresses `ips`
    /// (the first is `podIP`), for another namespace, dual-stack and
    /// IPv6-only pods.
    pub async fn create_pod_in(
        &self,
        ns: &str,
        name: &str,
        ips: &[&str],
        labels: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let ips = ips
            .iter()
            .map(|ip| ip.parse().with_context(|| format!("pod address {ip}")))
            .collect::<anyhow::Result<Vec<IpAddr>>>()?;
        let labels = labels.iter().copied().collect();
        let api = Api::<Pod>::namespaced(self.client.clone(), ns);
        create_pod_at(&api, name, &labels, &self.node_name, &ips).await
    }

    /// What MIC writes when it binds pod `pod` of [`NmiNode::ns`] on this
    /// node to `identity` through a binding selecting `selector` (see
    /// [`Assignment`]): Assigned, in `default`.
    pub fn assignment<'a>(
        &'a self,
        pod: &'a str,
        identity: &'a aadpodid_api::AzureIdentity,
        selector: &'a str,
    ) -> Assignment<'a> {
        Assignment::new(self.ns(), &self.node_name, pod, identity, selector)
    }

    /// Pod `name` at pod `i`'s address, labelled
    /// `aadpodidbinding=<selector>`, and bound to `identity` as MIC binds
    /// it (an Assigned AzureAssignedIdentity).
    pub async fn create_bound_pod(
        &self,
        name: &str,
        i: usize,
        identity: &aadpodid_api::AzureIdentity,
        selector: &str,
    ) -> anyhow::Result<()> {
        self.create_pod(name, i, &[("aadpodidbinding", selector)])
            .await?;
        self.assignment(name, identity, selector)
            .create(&self.client)
            .await?;
        Ok(())
    }
}

/// The calling test binary re-executed inside `ns` to run only its ignored
/// test `test` (a child of the test: an attacker, an SDK, the emulator).
pub fn test_child(ns: &NetNs, test: &str) -> anyhow::Result<std::process::Command> {
    let mut cmd = ns.command(std::env::current_exe()?);
    cmd.args([
        "--exact",
        test,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    Ok(cmd)
}

/// Starts the emulator inside `ns` ([`Imds::InNode`]) with the
/// configuration `emulator.json` in `dir`, and reads its addresses.
fn start_emulator_in(ns: &NetNs, child_test: &str, dir: &Path) -> anyhow::Result<Azure> {
    let cfg_path = dir.join("emulator.json");
    let mut child = test_child(ns, child_test)?
        .env(EMULATOR_CONFIG_ENV, &cfg_path)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("emulator.log"))?)
        .spawn()?;
    let printed = match read_until_ready(&mut child, "emulator") {
        Ok(lines) => lines,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let value = |key: &str| {
        printed
            .iter()
            .find_map(|l| l.split_once(key).map(|(_, v)| v.trim().to_string()))
            .with_context(|| format!("the emulator printed no {key}"))
    };
    let (admin_url, aad_url) = match (value("ADMIN_URL="), value("AAD_URL=")) {
        (Ok(admin), Ok(aad)) => (admin, aad),
        (Err(e), _) | (_, Err(e)) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    Ok(Azure::InNode {
        child,
        admin_url,
        aad_url,
    })
}

/// The emulator of [`Imds::InNode`], in the child process the node started:
/// runs it with the configuration [`EMULATOR_CONFIG_ENV`] names, prints its
/// admin and AAD URLs and `READY`, and serves until killed. Returns at once
/// when that variable is not set (the ignored test run by hand).
pub fn emulator_child_main() -> anyhow::Result<()> {
    let Some(path) = std::env::var_os(EMULATOR_CONFIG_ENV) else {
        return Ok(());
    };
    let cfg: Config = serde_json::from_slice(&std::fs::read(&path)?)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let emu = Emulator::start(cfg).await?;
        println!("ADMIN_URL={}", emu.admin_url());
        println!("AAD_URL={}", emu.aad_url());
        println!("READY");
        std::future::pending::<anyhow::Result<()>>().await
    })
}

/// The emulator's world for a node `node_name`: tenant [`TENANT`],
/// subscription [`SUBSCRIPTION`], resource group `rg` with the user-assigned
/// identities `id-a` ([`CLIENT_A`]) and `id-b` ([`CLIENT_B`]), and the
/// node's VM with a system-assigned identity and both of them.
pub fn emulator_config(node_name: &str) -> Config {
    let mut cfg = Config::new(TENANT, SUBSCRIPTION);
    cfg.resource_groups = vec!["rg".into()];
    let seed = |name: &str, client: &str, object: &str| IdentitySeed {
        name: name.into(),
        resource_group: "rg".into(),
        client_id: Some(client.into()),
        principal_id: Some(object.into()),
        federated_credentials: Vec::new(),
        permissions: Default::default(),
    };
    cfg.identities = vec![
        seed("id-a", CLIENT_A, OBJECT_A),
        seed("id-b", CLIENT_B, OBJECT_B),
    ];
    cfg.virtual_machines = vec![VmSeed {
        name: node_name.into(),
        resource_group: "rg".into(),
        identity: IdentityAssignmentSeed {
            system_assigned: true,
            user_assigned: vec!["id-a".into(), "id-b".into()],
        },
    }];
    cfg
}

/// NMI's health port inside the node (`/healthz`).
pub const PROBE_PORT: u16 = 8085;
/// NMI's metrics port inside the node (its default).
pub const METRICS_PORT: u16 = 9090;
/// The apiserver's port as NMI sees it inside the node (on 127.0.0.1).
pub const API_RELAY_PORT: u16 = 6443;

/// NMI's arguments for a test node `node_name`: `kubeconfig`, the health
/// port [`PROBE_PORT`], kubenet allowed, one retry for Created identities
/// and the redirect checked every second.
pub fn nmi_args(node_name: &str, kubeconfig: &Path) -> Vec<String> {
    vec![
        format!("--node={node_name}"),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--http-probe-port={PROBE_PORT}"),
        "--allow-network-plugin-kubenet=true".into(),
        "--retry-attempts-for-created=1".into(),
        "--ipt-update-interval-sec=1".into(),
    ]
}

/// Writes `source` (a kubeconfig naming the apiserver `server`) to `dest`
/// with the apiserver's address replaced by a node's relay,
/// `https://127.0.0.1:6443`, as NMI must see it inside the node.
pub fn write_relayed_kubeconfig(source: &Path, server: &str, dest: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(source)
        .with_context(|| format!("read {}", source.display()))?
        .replace(server, &format!("https://127.0.0.1:{API_RELAY_PORT}"));
    std::fs::write(dest, text).with_context(|| format!("write {}", dest.display()))
}

/// NMI's `/healthz` answer from inside `node`, within 1 s.
pub async fn healthz(node: &NetNs) -> Option<String> {
    let mut cmd = node.command("curl");
    cmd.args([
        "-s",
        "--max-time",
        "1",
        &format!("http://127.0.0.1:{PROBE_PORT}/healthz"),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let out = tokio::process::Command::from(cmd).output().await.ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits (60 s at most) until NMI's `/healthz` inside `node` says `Active`;
/// the error carries `log()`.
pub async fn wait_active(node: &NetNs, log: impl Fn() -> String) -> anyhow::Result<()> {
    let r = wait_for("nmi /healthz Active", Duration::from_secs(60), || async {
        (healthz(node).await.as_deref() == Some("Active")).then_some(())
    })
    .await;
    r.with_context(|| format!("nmi log:\n{}", log()))
}

/// A self-signed RSA certificate made by `openssl` in `dir`: (certificate
/// PEM, PKCS#12 with password `pw`).
pub fn openssl_certificate(dir: &Path) -> anyhow::Result<(String, Vec<u8>)> {
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "sp.key",
        "-out",
        "sp.crt",
        "-subj",
        "/CN=sp-cert",
        "-days",
        "2",
    ])?;
    run(&[
        "pkcs12", "-export", "-inkey", "sp.key", "-in", "sp.crt", "-out", "sp.p12", "-passout",
        "pass:pw",
    ])?;
    Ok((
        std::fs::read_to_string(dir.join("sp.crt"))?,
        std::fs::read(dir.join("sp.p12"))?,
    ))
}

/// `text` without ANSI escape sequences (CSI: ESC `[` parameters, final letter).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `curl` from inside `ns` to `http://169.254.169.254<path>`: returns
/// (status, body), 30 s at most (see [`curl_with_head`]).
pub async fn curl(ns: &NetNs, path: &str, headers: &[&str]) -> anyhow::Result<(u16, String)> {
    let url = format!("http://{IMDS_ADDRESS}{path}");
    let (status, _head, body) = curl_with_head(ns, &url, headers).await?;
    Ok((status, body))
}

/// One HTTP exchange by `curl` inside `ns`: (status, response headers,
/// body), 30 s at most, hostile URLs kept as written (the kit's
/// [`curl_head_in`]).
pub async fn curl_with_head(
    ns: &NetNs,
    url: &str,
    headers: &[&str],
) -> anyhow::Result<(u16, String, String)> {
    curl_head_in(ns, url, headers, 30).await
}

pub use crate::assigned::{Assignment, binding, identity};
