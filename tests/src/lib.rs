//! Integration-test harness: a real etcd and kube-apiserver on loopback, a real
//! `kubectl`, and helpers that keep tests short and bounded.
//!
//! # How a test gets a cluster
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let cluster = aadpodid_tests::Cluster::shared();
//! let ns = cluster.temp_namespace("my-test").await?;
//! let client = cluster.admin_client().await?;
//! # Ok(()) }
//! ```
//!
//! [`Cluster::shared`] starts one cluster per test process (one test binary) the
//! first time any test asks, and every test of that binary shares it. Cargo runs
//! test binaries one after another, so each binary gets its own cluster and they
//! never overlap. Tests isolate themselves with [`Cluster::temp_namespace`].
//!
//! A failure test that stops and restarts the kube-apiserver takes a cluster of
//! its own instead: [`PrivateCluster::start`].
//!
//! Each test runs on its own Tokio runtime, and a `kube::Client` belongs to the
//! runtime that made it, so tests ask for a new client ([`Cluster::admin_client`])
//! rather than sharing one.
//!
//! The processes are started from a thread that lives as long as the test
//! process, through `setpriv --pdeathsig KILL`, so they die with the test
//! process however it ends (success, panic, or a signal). State directories of
//! earlier test processes that no longer run are removed at the next start.
//!
//! The binaries come from `tests/cluster/build.sh` (Go modules, cached under
//! `$HOME/.cache/aadpodid/cluster`), or from `$AADPODID_CLUSTER_BIN` when set.

pub mod assigned;
pub mod bench;
pub mod e2e;
pub mod helm;
pub mod netns;
pub mod nmi_node;
pub mod upstream;

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// Version of Kubernetes the harness runs (pinned in `tests/cluster/kube/go.mod`).
pub const KUBERNETES_VERSION: &str = "v1.37.2";
/// Version of etcd the harness runs (pinned in `tests/cluster/etcd/go.mod`).
pub const ETCD_VERSION: &str = "v3.7.3";

/// Bound on starting etcd + kube-apiserver and installing the CRDs.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on building the binaries when they are not cached yet.
const BUILD_TIMEOUT: Duration = Duration::from_secs(40 * 60);
const DIR_PREFIX: &str = "aadpodid-cluster-";

/// Root of the repository (for `crds/`, fixtures and the cluster build script).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A running etcd + kube-apiserver with RBAC on.
#[derive(Debug, Clone)]
pub struct Cluster {
    dir: PathBuf,
    server: String,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    bin: PathBuf,
}

static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();

impl Cluster {
    /// The cluster of this test process, started on first use, with the
    /// project's CRDs installed and Established.
    ///
    /// # Panics
    /// When the cluster cannot be built or started; the message says why.
    #[allow(
        clippy::panic,
        reason = "test harness: a cluster that cannot start fails the test"
    )]
    pub fn shared() -> &'static Cluster {
        let started = SHARED.get_or_init(|| start_on_keeper_thread().map_err(|e| format!("{e:#}")));
        match started {
            Ok(c) => c,
            Err(e) => panic!("test cluster failed to start: {e}"),
        }
    }

    /// `https://127.0.0.1:<port>` of the apiserver.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// A kubeconfig file with cluster-admin (`system:masters`) credentials.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Folder of the cluster binaries (`kube-apiserver`, `kubectl`, `etcd`).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// A new admin client, bound to the calling test's runtime.
    pub async fn admin_client(&self) -> anyhow::Result<Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// `kubectl` with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        self.kubectl_with(&self.kubeconfig)
    }

    /// `kubectl` with another kubeconfig (for example one from
    /// [`Cluster::service_account_kubeconfig`]).
    pub fn kubectl_with(&self, kubeconfig: &Path) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig").arg(kubeconfig);
        cmd
    }

    /// Runs kubectl with `args` (admin) and `stdin`; returns (success, stdout, stderr).
    pub fn kubectl_run(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<KubectlOutput> {
        run_kubectl(self.kubectl(), args, stdin)
    }

    /// Creates ServiceAccount `ns/name` if missing and writes a kubeconfig that
    /// authenticates as it with a token from the TokenRequest API. Whatever it may
    /// do comes from the RBAC objects the test creates.
    pub async fn service_account_kubeconfig(
        &self,
        ns: &str,
        name: &str,
    ) -> anyhow::Result<PathBuf> {
        let admin = self.admin_client().await?;
        let sas: Api<ServiceAccount> = Api::namespaced(admin, ns);
        if sas.get_opt(name).await?.is_none() {
            let sa = ServiceAccount {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                ..Default::default()
            };
            sas.create(&PostParams::default(), &sa)
                .await
                .context("create ServiceAccount")?;
        }
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![],
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let token = sas
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .context("TokenRequest")?
            .status
            .context("TokenRequest returned no status")?
            .token;
        let path = self.dir.join(format!("sa-{ns}-{name}.kubeconfig"));
        let text = kubeconfig_yaml(
            &self.server,
            &self.dir.join("ca.crt"),
            &format!("system:serviceaccount:{ns}:{name}"),
            &format!("token: {token}"),
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// A client that authenticates as ServiceAccount `ns/name` (created if missing).
    pub async fn service_account_client(&self, ns: &str, name: &str) -> anyhow::Result<Client> {
        let path = self.service_account_kubeconfig(ns, name).await?;
        client_from_kubeconfig(&path).await
    }

    /// A fresh namespace `<prefix>-<n>` that is deleted when the guard drops,
    /// also when the test panics.
    pub async fn temp_namespace(&self, prefix: &str) -> anyhow::Result<TempNamespace> {
        let name = unique_name(prefix);
        let api: Api<Namespace> = Api::all(self.admin_client().await?);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        api.create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("create namespace {name}"))?;
        Ok(TempNamespace {
            name,
            kubectl: self.kubectl(),
        })
    }
}

/// A cluster of its own for one test, whose kube-apiserver can be stopped and
/// started again on the same etcd and port (for failure tests). Everything of
/// [`Cluster`] works on it through `Deref`. Its processes run until the guard
/// drops (and die with the test process in any case); its folder is removed then.
///
/// ```no_run
/// # async fn demo() -> anyhow::Result<()> {
/// let cluster = aadpodid_tests::PrivateCluster::start().await?;
/// cluster.stop_apiserver().await?;
/// cluster.start_apiserver().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PrivateCluster {
    cluster: Cluster,
    keeper: Option<std::sync::mpsc::Sender<KeeperCommand>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

type Reply = tokio::sync::oneshot::Sender<anyhow::Result<()>>;

#[derive(Debug)]
enum KeeperCommand {
    StopApiServer(Reply),
    StartApiServer(Reply),
}

impl PrivateCluster {
    /// Starts etcd and kube-apiserver (RBAC on, CRDs installed and
    /// Established) from a thread of their own; the calling runtime is not blocked.
    pub async fn start() -> anyhow::Result<PrivateCluster> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        remove_stale_dirs();
        let dir = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-private-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (tx, rx) = std::sync::mpsc::channel::<KeeperCommand>();
        let thread = std::thread::Builder::new()
            .name("private-cluster".into())
            .spawn(move || keep_private(dir, started_tx, rx))?;
        let cluster = match started_rx.await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => bail!("private cluster thread ended without an answer"),
        };
        Ok(PrivateCluster {
            cluster,
            keeper: Some(tx),
            thread: Some(thread),
        })
    }

    /// The cluster (also reachable through `Deref`).
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Kills the kube-apiserver (SIGKILL, as a crash would) and waits until it
    /// is gone; etcd keeps running. Does nothing when it is already stopped.
    pub async fn stop_apiserver(&self) -> anyhow::Result<()> {
        self.ask(KeeperCommand::StopApiServer).await
    }

    /// Starts the kube-apiserver again with the same flags, etcd and port,
    /// and waits until `/readyz` says `ok`. Does nothing when it runs.
    pub async fn start_apiserver(&self) -> anyhow::Result<()> {
        self.ask(KeeperCommand::StartApiServer).await
    }

    async fn ask(&self, command: fn(Reply) -> KeeperCommand) -> anyhow::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.keeper
            .as_ref()
            .context("private cluster stopped")?
            .send(command(tx))
            .map_err(|_| anyhow::anyhow!("private cluster thread is gone"))?;
        rx.await
            .context("private cluster thread ended without an answer")?
    }
}

impl std::ops::Deref for PrivateCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        // Closing the channel makes the thread kill its processes and end.
        self.keeper.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.cluster.dir);
    }
}

/// The thread of a [`PrivateCluster`]: starts it, then serves commands until
/// the guard drops, then kills its processes.
fn keep_private(
    dir: PathBuf,
    started: tokio::sync::oneshot::Sender<anyhow::Result<Cluster>>,
    commands: std::sync::mpsc::Receiver<KeeperCommand>,
) {
    let mut children = Vec::new();
    let booted = boot(dir, &mut children);
    let kill_all = |children: &mut Vec<Child>| {
        for mut c in children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    };
    let (own, spec) = match booted {
        Ok(b) => b,
        Err(e) => {
            kill_all(&mut children);
            let _ = started.send(Err(e));
            return;
        }
    };
    if started.send(Ok(own.clone())).is_err() {
        kill_all(&mut children);
        return;
    }
    // children[0] is etcd; the apiserver is the last one while it runs.
    let mut etcd = children.remove(0);
    let mut apiserver = children.pop();
    while let Ok(command) = commands.recv() {
        match command {
            KeeperCommand::StopApiServer(reply) => {
                let result = match apiserver.take() {
                    Some(mut c) => c
                        .kill()
                        .and_then(|()| c.wait().map(drop))
                        .context("stop kube-apiserver"),
                    None => Ok(()),
                };
                let _ = reply.send(result);
            }
            KeeperCommand::StartApiServer(reply) => {
                let result = match apiserver {
                    Some(_) => Ok(()),
                    None => spec.spawn().and_then(|c| {
                        let mut running = vec![c];
                        let ready = wait_ready(&own, &mut running, START_TIMEOUT);
                        apiserver = running.pop();
                        ready
                    }),
                };
                let _ = reply.send(result);
            }
        }
        if let Ok(Some(status)) = etcd.try_wait() {
            eprintln!("private cluster: etcd exited ({status})");
        }
    }
    let _ = etcd.kill();
    let _ = etcd.wait();
    if let Some(mut c) = apiserver {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// What a kubectl run printed.
#[derive(Debug)]
pub struct KubectlOutput {
    /// Exit status was 0.
    pub success: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

fn run_kubectl(
    mut cmd: Command,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<KubectlOutput> {
    use std::io::Write as _;
    cmd.args(args).args(["--request-timeout", "30s"]);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().context("spawn kubectl")?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    Ok(KubectlOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// A namespace that lives as long as the guard.
#[derive(Debug)]
pub struct TempNamespace {
    name: String,
    kubectl: Command,
}

impl TempNamespace {
    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TempNamespace {
    fn drop(&mut self) {
        // Without kube-controller-manager the namespace stays Terminating with its
        // contents; it is out of every other test's way all the same.
        let _ = self
            .kubectl
            .args([
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A name unique within this test process and across processes: `<prefix>-<pid>-<n>`.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `check` every 100 ms until it returns `Some`, for at most `timeout`.
/// The error names `what` and how long was waited.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Replaces `${NAME}` and `$NAME` in a template, as `envsubst` or Terraform's
/// `templatefile` would; `vars` are (NAME, value). Longer names are replaced
/// first so that `$A` does not eat the start of `$AB`.
pub fn fill_template(text: &str, vars: &[(&str, &str)]) -> String {
    let mut vars = vars.to_vec();
    vars.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    let mut out = text.to_string();
    for (k, v) in vars {
        out = out
            .replace(&format!("${{{k}}}"), v)
            .replace(&format!("${k}"), v);
    }
    out
}

/// Reads a file of `tests/fixtures/`.
pub fn fixture(name: &str) -> anyhow::Result<String> {
    let path = repo_root().join("tests/fixtures").join(name);
    std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
}

/// The Python of a virtualenv holding the pinned real Python Azure SDK
/// (`tests/python/requirements.txt`), created on first use by
/// `tests/python/setup.sh` and cached under `$HOME/.cache/aadpodid`.
pub fn python_sdk() -> anyhow::Result<PathBuf> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let script = repo_root().join("tests/python/setup.sh");
            let out = Command::new("bash")
                .arg(&script)
                .stderr(Stdio::inherit())
                .output()
                .map_err(|e| format!("run {}: {e}", script.display()))?;
            if !out.status.success() {
                return Err(format!("{} failed ({})", script.display(), out.status));
            }
            Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Which user-assigned identity a managed-identity client asks for.
#[derive(Clone, Copy, Debug)]
pub enum IdentitySelector<'a> {
    /// No selector: the machine's only (or system-assigned) identity.
    Default,
    /// `client_id`.
    ClientId(&'a str),
    /// `msi_res_id` (the ARM resource ID).
    ResourceId(&'a str),
    /// `object_id` (the principal ID).
    ObjectId(&'a str),
}

/// Asks for a token with the real Python `ManagedIdentityCredential`, pointed at
/// `imds_base` (for example `http://127.0.0.1:8080`) through the SDK's own
/// `AZURE_POD_IDENTITY_AUTHORITY_HOST`. Returns the script's JSON line:
/// `{"token", "expires_on"}` on success, `{"error_type", "error"}` on failure.
/// The script is run inside `netns` when given (then `imds_base` may be
/// `http://169.254.169.254`).
pub fn python_imds_token(
    imds_base: Option<&str>,
    scope: &str,
    selector: IdentitySelector<'_>,
    netns: Option<&netns::NetNs>,
) -> anyhow::Result<serde_json::Value> {
    let python = python_sdk()?;
    let script = repo_root().join("tests/python/imds_token.py");
    let mut cmd = match netns {
        Some(ns) => ns.command(&python),
        None => Command::new(&python),
    };
    cmd.arg(&script).arg(scope);
    match selector {
        IdentitySelector::Default => {}
        IdentitySelector::ClientId(v) => {
            cmd.args(["--client-id", v]);
        }
        IdentitySelector::ResourceId(v) => {
            cmd.args(["--resource-id", v]);
        }
        IdentitySelector::ObjectId(v) => {
            cmd.args(["--object-id", v]);
        }
    }
    // Only the IMDS source may be chosen: clear every variable that selects another.
    for var in [
        "IDENTITY_ENDPOINT",
        "IDENTITY_HEADER",
        "IDENTITY_SERVER_THUMBPRINT",
        "IMDS_ENDPOINT",
        "MSI_ENDPOINT",
        "MSI_SECRET",
        "AZURE_FEDERATED_TOKEN_FILE",
        "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    ] {
        cmd.env_remove(var);
    }
    if let Some(base) = imds_base {
        cmd.env("AZURE_POD_IDENTITY_AUTHORITY_HOST", base);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("run imds_token.py")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| {
        format!(
            "imds_token.py printed no JSON: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Runs the `#[ignore]`d tests of the calling test binary whose names start
/// with `prefix` in a child process that trusts a fresh emulator test CA through
/// `SSL_CERT_FILE` (which a running test cannot set for itself: `set_var` is
/// unsafe, and unsafe code is forbidden). The child gets `<ENV>_CHILD=1`,
/// `<ENV>_CA_CERT`, `<ENV>_CA_KEY` (the CA to start emulators with) and
/// `<ENV>_DIR` (a scratch folder, removed afterwards), no proxy settings, and
/// must finish within `timeout` with exactly `expected` tests passed.
pub async fn run_children_trusting_emulator_ca(
    prefix: &str,
    env: &str,
    expected: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(unique_name(&env.to_lowercase()));
    std::fs::create_dir_all(&dir)?;
    let result = run_children_in(&dir, prefix, env, expected, timeout).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_children_in(
    dir: &Path,
    prefix: &str,
    env: &str,
    expected: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let ca = azure_emulator::TestCa::generate()?;
    let (cert, key, bundle) = (
        dir.join("ca.pem"),
        dir.join("ca-key.pem"),
        dir.join("bundle.pem"),
    );
    std::fs::write(&cert, ca.cert_pem())?;
    std::fs::write(&key, ca.key_pem())?;
    azure_emulator::tls::write_bundle(ca.cert_pem(), &bundle)?;
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.args([prefix, "--ignored", "--nocapture", "--test-threads=1"])
        .env(format!("{env}_CHILD"), "1")
        .env("SSL_CERT_FILE", &bundle)
        .env(format!("{env}_CA_CERT"), &cert)
        .env(format!("{env}_CA_KEY"), &key)
        .env(format!("{env}_DIR"), dir)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .kill_on_drop(true);
    for var in [
        "AZURE_AUTHORITY_HOST",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .with_context(|| format!("child tests did not finish within {timeout:?}"))??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    if !out.status.success() {
        bail!(
            "child tests failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every child test must have run and passed in the child process.
    let ran = stdout
        .lines()
        .find(|l| l.starts_with("test result:"))
        .unwrap_or_default();
    if !ran.contains(&format!("{expected} passed; 0 failed")) {
        bail!("expected {expected} child tests to pass:\n{stdout}");
    }
    Ok(())
}

async fn client_from_kubeconfig(path: &Path) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn kubeconfig_yaml(server: &str, ca: &Path, user: &str, credentials: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    {credentials}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: {user}\ncurrent-context: test\n",
        ca = ca.display()
    )
}

/// Starts the cluster from a thread that never ends, so that the
/// parent-death signal of the processes fires only when the test process ends.
fn start_on_keeper_thread() -> anyhow::Result<Cluster> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("test-cluster".into())
        .spawn(move || {
            let mut children = Vec::new();
            let result = start(&mut children);
            let failed = result.is_err();
            let _ = tx.send(result);
            if failed {
                for mut c in children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return;
            }
            loop {
                std::thread::park();
            }
        })?;
    rx.recv()
        .context("cluster thread ended without an answer")?
}

fn start(children: &mut Vec<Child>) -> anyhow::Result<Cluster> {
    remove_stale_dirs();
    let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}", std::process::id()));
    boot(dir, children).map(|(cluster, _)| cluster)
}

/// How the kube-apiserver of a cluster is started, so it can be started again
/// on the same etcd and port.
#[derive(Debug, Clone)]
struct ApiServerSpec {
    bin: PathBuf,
    dir: PathBuf,
    etcd_url: String,
    port: u16,
}

impl ApiServerSpec {
    fn spawn(&self) -> anyhow::Result<Child> {
        let d = |f: &str| self.dir.join(f).display().to_string();
        // Appended, so the log of an earlier run stays readable after a restart.
        let api_log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("kube-apiserver.log"))?;
        keeper_command(&self.bin.join("kube-apiserver"))
            .arg(format!("--etcd-servers={}", self.etcd_url))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            // The endpoint reconciler refuses a loopback address; nothing here
            // reaches the apiserver through the `kubernetes` Service anyway.
            .arg("--endpoint-reconciler-type=none")
            .arg(format!("--secure-port={}", self.port))
            .arg(format!("--cert-dir={}", d("certs")))
            .arg(format!("--tls-cert-file={}", d("server.crt")))
            .arg(format!("--tls-private-key-file={}", d("server.key")))
            .arg(format!("--client-ca-file={}", d("ca.crt")))
            .arg("--authorization-mode=RBAC")
            .arg("--anonymous-auth=false")
            .arg(format!("--service-account-key-file={}", d("sa.pub")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                d("sa.key")
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg("--api-audiences=https://kubernetes.default.svc.cluster.local")
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            // No kube-controller-manager runs, so nothing creates the `default`
            // ServiceAccount of a namespace; without this, every pod would be refused.
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg("--allow-privileged=true")
            .arg("--v=1")
            .stdout(api_log.try_clone()?)
            .stderr(api_log)
            .spawn()
            .context("start kube-apiserver")
    }
}

/// Polls `/readyz` until it says `ok`, failing early when one of `children`
/// exits, for at most `timeout`.
fn wait_ready(cluster: &Cluster, children: &mut [Child], timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        for c in children.iter_mut() {
            if let Some(status) = c.try_wait()? {
                bail!(
                    "a cluster process exited ({status}); logs in {}",
                    cluster.dir.display()
                );
            }
        }
        let out = cluster.kubectl_run(&["get", "--raw", "/readyz"], None)?;
        if out.success && out.stdout.trim() == "ok" {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "kube-apiserver not ready after {timeout:?}: {}; logs in {}",
                out.stderr.trim(),
                cluster.dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Creates `dir`, starts etcd and kube-apiserver in it (pushed to `children`
/// in that order), waits until ready and installs the CRDs.
fn boot(dir: PathBuf, children: &mut Vec<Child>) -> anyhow::Result<(Cluster, ApiServerSpec)> {
    let bin = cluster_bin()?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    make_certs(&dir)?;

    let [etcd_client, etcd_peer, api_port] = free_ports()?;
    let etcd_url = format!("http://127.0.0.1:{etcd_client}");
    let peer_url = format!("http://127.0.0.1:{etcd_peer}");
    let etcd_log = std::fs::File::create(dir.join("etcd.log"))?;
    children.push(
        keeper_command(&bin.join("etcd"))
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=default={peer_url}"))
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn")
            .stdout(etcd_log.try_clone()?)
            .stderr(etcd_log)
            .spawn()
            .context("start etcd")?,
    );

    let api = ApiServerSpec {
        bin: bin.clone(),
        dir: dir.clone(),
        etcd_url,
        port: api_port,
    };
    children.push(api.spawn()?);

    let d = |f: &str| dir.join(f).display().to_string();
    let server = format!("https://127.0.0.1:{api_port}");
    let kubeconfig = dir.join("admin.kubeconfig");
    std::fs::write(
        &kubeconfig,
        kubeconfig_yaml(
            &server,
            &dir.join("ca.crt"),
            "admin",
            &format!(
                "client-certificate: {}\n    client-key: {}",
                d("admin.crt"),
                d("admin.key")
            ),
        ),
    )?;
    let cluster = Cluster {
        kubectl: bin.join("kubectl"),
        bin,
        server,
        kubeconfig,
        dir,
    };

    wait_ready(&cluster, children, START_TIMEOUT)?;

    let crds = repo_root().join("crds");
    let crds = crds.to_string_lossy();
    let out = cluster.kubectl_run(&["apply", "--server-side", "-f", &crds], None)?;
    if !out.success {
        bail!("installing CRDs failed: {}", out.stderr);
    }
    let out = cluster.kubectl_run(
        &[
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=60s",
        ],
        None,
    )?;
    if !out.success {
        bail!("CRDs not Established: {}", out.stderr);
    }
    Ok((cluster, api))
}

/// A command wrapped so the process gets SIGKILL when the thread that started it ends.
fn keeper_command(program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--"])
        .arg(program)
        .stdin(Stdio::null());
    cmd
}

fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    // Hold all listeners until every port is chosen so they differ.
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = [0; N];
    for (p, l) in ports.iter_mut().zip(&listeners) {
        *p = l.local_addr()?.port();
    }
    Ok(ports)
}

fn cluster_bin() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("AADPODID_CLUSTER_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let script = repo_root().join("tests/cluster/build.sh");
    let mut child = Command::new("bash")
        .arg(&script)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("run {}", script.display()))?;
    let deadline = Instant::now() + BUILD_TIMEOUT;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            bail!(
                "{} did not finish within {BUILD_TIMEOUT:?}",
                script.display()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let dir = String::from_utf8(out.stdout)?.trim().to_string();
    Ok(PathBuf::from(dir))
}

fn make_certs(dir: &Path) -> anyhow::Result<()> {
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .context("run openssl")?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "7",
                "-subj",
                "/CN=aadpodid-test-ca",
            ],
        ]
        .concat(),
    )?;
    for (name, subject, ext) in [
        (
            "server",
            "/CN=kube-apiserver",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        (
            "admin",
            "/O=system:masters/CN=aadpodid-admin",
            "extendedKeyUsage=clientAuth\n",
        ),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext)?;
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        openssl(
            &[
                &["req", "-new"][..],
                &ec,
                &["-keyout", &key, "-out", &csr, "-subj", subject],
            ]
            .concat(),
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "7",
            "-out",
            &format!("{name}.crt"),
            "-extfile",
            &format!("{name}.ext"),
        ])?;
    }
    openssl(&["genrsa", "-out", "sa.key", "2048"])?;
    openssl(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    Ok(())
}

/// Removes state folders of test processes that no longer run.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        // `<pid>` (the shared cluster) or `<pid>-private-<n>` (a private one).
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_template_handles_both_forms_and_prefixes() {
        let t = "a: ${UAIName}-x\nb: $POD\nc: $PODNAME\n";
        let out = fill_template(t, &[("UAIName", "id1"), ("POD", "p"), ("PODNAME", "q")]);
        assert_eq!(out, "a: id1-x\nb: p\nc: q\n");
    }

    #[test]
    fn unique_names_differ() {
        assert_ne!(unique_name("t"), unique_name("t"));
    }
}
