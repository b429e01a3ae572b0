//! A real etcd and kube-apiserver on loopback, RBAC on and the project's CRDs
//! installed: one shared per test process ([`Cluster::shared`]) or one of a
//! test's own whose apiserver can be stopped and started ([`PrivateCluster`]).
//!
//! The processes are started from a thread that lives as long as the test
//! process (or the [`PrivateCluster`] guard), through `setpriv --pdeathsig
//! KILL`, so they die with it however it ends. State directories of earlier
//! test processes that no longer run are removed at the next start.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::Client;
use kube::api::{Api, PostParams};

use crate::fixtures::repo_root;
use crate::ids::{free_ports, unique_name};
use crate::kubectl::{
    KubectlOutput, TempNamespace, client_from_kubeconfig, kubeconfig_yaml, run_kubectl,
};
use crate::tools::BuiltTool;

/// Version of Kubernetes the harness runs (pinned in `tests/cluster/kube/go.mod`).
pub const KUBERNETES_VERSION: &str = "v1.37.2";
/// Version of etcd the harness runs (pinned in `tests/cluster/etcd/go.mod`).
pub const ETCD_VERSION: &str = "v3.7.3";

/// Bound on starting etcd + kube-apiserver and installing the CRDs.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// The folder of the cluster binaries: built by `tests/cluster/build.sh`
/// (given 40 minutes when not cached yet) or named by `$AADPODID_CLUSTER_BIN`.
static CLUSTER_BIN: BuiltTool =
    BuiltTool::new("tests/cluster/build.sh", Duration::from_secs(40 * 60)).named_by(
        "AADPODID_CLUSTER_BIN",
        &["kube-apiserver", "kubectl", "etcd"],
    );
const DIR_PREFIX: &str = "aadpodid-cluster-";

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

    /// Waits (at most 60 s) until every CRD in the cluster is Established;
    /// returns kubectl's answer, one line a CRD.
    pub fn wait_crds_established(&self) -> anyhow::Result<String> {
        let out = self.kubectl_run(
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
        Ok(out.stdout)
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
            sas.create(&PostParams::default(), &named::<ServiceAccount>(name))
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
        api.create(&PostParams::default(), &named::<Namespace>(&name))
            .await
            .with_context(|| format!("create namespace {name}"))?;
        Ok(TempNamespace::new(name, self.kubectl()))
    }
}

/// An object of kind `K` with only its name set.
fn named<K: kube::Resource + Default>(name: &str) -> K {
    let mut object = K::default();
    object.meta_mut().name = Some(name.into());
    object
}

/// A cluster of its own for one test, whose kube-apiserver can be stopped and
/// started again on the same etcd and port (for failure tests). Everything of
/// [`Cluster`] works on it through `Deref`. Its processes run until the guard
/// drops (and die with the test process in any case); its folder is removed then.
///
/// ```no_run
/// # async fn demo() -> anyhow::Result<()> {
/// let cluster = aadpodid_testkit::PrivateCluster::start().await?;
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
        PrivateCluster::start_with(ClusterOptions::default()).await
    }

    /// [`PrivateCluster::start`] with `options`.
    pub async fn start_with(options: ClusterOptions) -> anyhow::Result<PrivateCluster> {
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
            .spawn(move || keep_private(dir, options, started_tx, rx))?;
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
    options: ClusterOptions,
    started: tokio::sync::oneshot::Sender<anyhow::Result<Cluster>>,
    commands: std::sync::mpsc::Receiver<KeeperCommand>,
) {
    let mut children = Vec::new();
    let booted = boot(dir, options, &mut children);
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
    boot(dir, ClusterOptions::default(), children).map(|(cluster, _)| cluster)
}

/// How the kube-apiserver of a cluster is started, so it can be started again
/// on the same etcd and port.
#[derive(Debug, Clone)]
struct ApiServerSpec {
    bin: PathBuf,
    dir: PathBuf,
    etcd_url: String,
    port: u16,
    options: ClusterOptions,
}

/// What a [`PrivateCluster`] is started with beyond the defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterOptions {
    /// The apiserver's ServiceAccount admission plugin on: every pod runs as
    /// a ServiceAccount (`default` unless named) and gets its token volume.
    /// Only for a cluster where a kube-controller-manager runs (it creates
    /// the `default` ServiceAccounts); without one every pod is refused.
    pub service_account_admission: bool,
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
            .args(
                // Without a kube-controller-manager nothing creates the
                // `default` ServiceAccount of a namespace; with the plugin
                // on, every pod would be refused.
                (!self.options.service_account_admission)
                    .then_some("--disable-admission-plugins=ServiceAccount"),
            )
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
fn boot(
    dir: PathBuf,
    options: ClusterOptions,
    children: &mut Vec<Child>,
) -> anyhow::Result<(Cluster, ApiServerSpec)> {
    let bin = CLUSTER_BIN.path()?;
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
        options,
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
    cluster.wait_crds_established()?;
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

fn make_certs(dir: &Path) -> anyhow::Result<()> {
    issue_certs(
        dir,
        ("ca", "/CN=aadpodid-test-ca"),
        &[
            (
                "server",
                "/CN=kube-apiserver",
                // Loopback, where tests reach it, and the names in-cluster
                // clients use: the `kubernetes` Service's address (the first of
                // `--service-cluster-ip-range`) and its DNS names.
                "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,\
                 DNS:kubernetes.default,DNS:kubernetes.default.svc,\
                 DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n",
            ),
            (
                "admin",
                "/O=system:masters/CN=aadpodid-admin",
                "extendedKeyUsage=clientAuth\n",
            ),
        ],
    )?;
    let openssl = |args: &[&str]| openssl_in(dir, args);
    openssl(&["genrsa", "-out", "sa.key", "2048"])?;
    openssl(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    Ok(())
}

/// Runs `openssl` with `args` in `dir` (at most 60 s); fails with its stderr.
fn openssl_in(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = crate::tools::output_within(
        Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .stderr(Stdio::piped()),
        "openssl",
        Duration::from_secs(60),
    )?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Makes, in `dir`, a CA `<stem>.crt`/`<stem>.key` with `subject` (EC P-256,
/// valid 7 days) and for each `(name, subject, extensions)` a key
/// `<name>.key` and a certificate `<name>.crt` signed by that CA with those
/// extensions (an openssl extension file's text).
pub(crate) fn issue_certs(
    dir: &Path,
    (stem, ca_subject): (&str, &str),
    certs: &[(&str, &str, &str)],
) -> anyhow::Result<()> {
    let openssl = |args: &[&str]| openssl_in(dir, args);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let (ca_key, ca_crt) = (format!("{stem}.key"), format!("{stem}.crt"));
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", &ca_key, "-out", &ca_crt, "-days", "7"],
            &["-subj", ca_subject],
        ]
        .concat(),
    )?;
    for (name, subject, ext) in certs {
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
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "7",
            "-out",
            &format!("{name}.crt"),
            "-extfile",
            &format!("{name}.ext"),
        ])?;
    }
    Ok(())
}

/// Removes state folders of test processes that no longer run.
fn remove_stale_dirs() {
    // `<pid>` (the shared cluster) or `<pid>-private-<n>` (a private one).
    remove_dead_owners(&std::env::temp_dir(), DIR_PREFIX, |path, _| {
        let _ = std::fs::remove_dir_all(path);
    });
}

/// Calls `remove(path, name)` for each entry of `dir` whose name is
/// `<prefix><pid>` or `<prefix><pid>-<anything>` and whose process `<pid>`
/// no longer runs: what a test process that died left behind (its state
/// folders, network namespaces, nodes).
pub(crate) fn remove_dead_owners(dir: &Path, prefix: &str, mut remove: impl FnMut(&Path, &str)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let dead = owner_pid(&name, prefix)
            .is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists());
        if dead {
            remove(&entry.path(), &name);
        }
    }
}

/// The process ID in `name` when it is `<prefix><pid>` or
/// `<prefix><pid>-<anything>`.
fn owner_pid(name: &str, prefix: &str) -> Option<u32> {
    name.strip_prefix(prefix)?.split('-').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_object_carries_only_its_name() {
        let ns = named::<Namespace>("ns-1");
        assert_eq!(
            ns,
            Namespace {
                metadata: kube::api::ObjectMeta {
                    name: Some("ns-1".into()),
                    ..Default::default()
                },
                ..Default::default()
            }
        );
    }

    #[test]
    fn the_owner_pid_is_the_number_after_the_prefix() {
        assert_eq!(owner_pid("aadpodid-12", "aadpodid-"), Some(12));
        assert_eq!(owner_pid("aadpodid-12-3-node", "aadpodid-"), Some(12));
        assert_eq!(owner_pid("aadpodid-realnode-12-3", "aadpodid-"), None);
        assert_eq!(owner_pid("other-12", "aadpodid-"), None);
        assert_eq!(owner_pid("aadpodid-", "aadpodid-"), None);
    }

    #[test]
    fn only_what_a_dead_process_left_is_removed() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(unique_name("dead-owners"));
        std::fs::create_dir_all(&dir)?;
        // Above any pid_max Linux allows (2^22): no such process.
        let dead = "t-4294967295-1";
        let alive = format!("t-{}-1", std::process::id());
        for name in [dead, alive.as_str(), "t-x-1", "u-4294967295"] {
            std::fs::create_dir(dir.join(name))?;
        }
        let mut removed = Vec::new();
        remove_dead_owners(&dir, "t-", |path, name| {
            assert_eq!(path, dir.join(name));
            removed.push(name.to_string());
        });
        std::fs::remove_dir_all(&dir)?;
        assert_eq!(removed, [dead]);
        Ok(())
    }
}
