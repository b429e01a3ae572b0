//! NMI at the edges of its life on a node: connections opened to IMDS before
//! it started (`--enable-conntrack-deletion`), the startup taint
//! (`--node-startup-taint`), requests during the first cache sync after a
//! restart, and `route_localnet` where `/proc/sys` is read-only.
//!
//! Layout as in `nmi_netns.rs`: a real apiserver and the Azure emulator on
//! the root namespace's loopback; NMI (this binary re-executed, running only
//! [`nmi_child_process`]) inside a node network namespace with real iptables;
//! pods in pod namespaces. A relay inside the node carries its
//! `127.0.0.1:6443` (apiserver) and `169.254.169.254:80` (IMDS) to Unix
//! sockets this process forwards; the apiserver's can be held shut (a
//! "gate") to keep NMI's caches from syncing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use aadpodid_api::{AzureIdentity, AzureIdentitySpec};
use aadpodid_tests::assigned::{create_aai, mic_aai};
use aadpodid_tests::netns::{IMDS_ADDRESS, NetNs, Node};
use aadpodid_tests::{Cluster, unique_name, wait_for};
use anyhow::{Context as _, bail};
use azure_emulator::config::{IdentityAssignmentSeed, IdentitySeed, VmSeed};
use azure_emulator::{Config, Emulator};
use k8s_openapi::api::core::v1::{Node as K8sNode, Pod};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use tokio::sync::watch;

const CHILD_ENV: &str = "AADPODID_NMI_LIFECYCLE_CHILD_ARGS";
const API_RELAY_PORT: u16 = 6443;
const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const SUBSCRIPTION: &str = "00000000-0000-0000-0000-0000000000aa";
const CLIENT_A: &str = "aaaaaaaa-0000-4000-8000-00000000000a";
const OBJECT_A: &str = "aaaaaaaa-1111-4000-8000-00000000000a";
const TAINT: &str = "aadpodidentity.k8s.io/nmi-not-ready";
const REDIRECT_RULE: &str = "-A aad-metadata ! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:2579";

/// Runs NMI when this binary is re-executed inside a node namespace by the
/// tests below; on its own it has nothing to run.
#[test]
#[ignore = "run by the tests below inside a node network namespace"]
fn nmi_child_process() {
    let args = std::env::var(CHILD_ENV)
        .expect("started by a test of this file with the NMI arguments in the environment");
    let args: Vec<String> = serde_json::from_str(&args).expect("child args");
    let args = nmi::Args::try_from_args(args).expect("nmi args");
    aadpodid_runtime::logging::init(aadpodid_runtime::logging::LogFormat::Text, "info");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let shutdown = aadpodid_runtime::Shutdown::on_signals().expect("signals");
        if let Err(e) = nmi::run(args, shutdown).await {
            panic!("nmi exited: {e}");
        }
    });
}

const RELAY: &str = r#"
import asyncio, sys
async def pipe(r, w):
    try:
        while True:
            d = await r.read(65536)
            if not d:
                break
            w.write(d)
            await w.drain()
    except Exception:
        pass
    finally:
        try:
            w.close()
        except Exception:
            pass
async def main():
    servers = []
    for spec in sys.argv[1:]:
        hostport, path = spec.split('=')
        host, port = hostport.rsplit(':', 1)
        async def handle(r, w, path=path):
            try:
                ur, uw = await asyncio.open_unix_connection(path)
            except Exception:
                w.close()
                return
            await asyncio.gather(pipe(r, uw), pipe(ur, w))
        servers.append(await asyncio.start_server(handle, host, int(port)))
    print("READY", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"#;

/// Forwards connections on a Unix socket at `path` to `target`; a
/// connection accepted while `gate` is false waits until it opens.
async fn unix_to_tcp(
    path: PathBuf,
    target: SocketAddr,
    gate: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    tokio::spawn(async move {
        while let Ok((mut unix, _)) = listener.accept().await {
            let mut gate = gate.clone();
            tokio::spawn(async move {
                if gate.wait_for(|open| *open).await.is_err() {
                    return;
                }
                if let Ok(mut tcp) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut unix, &mut tcp).await;
                }
            });
        }
    });
    Ok(())
}

struct Fixture {
    node_name: String,
    node: Node,
    dir: PathBuf,
    emu: Emulator,
    nmi: Option<Child>,
    relay: Child,
    /// NMI's kubeconfig: the admin's, through the relay.
    kubeconfig: PathBuf,
    /// Opens (true) and shuts (false) the node's way to the apiserver.
    api_gate: watch::Sender<bool>,
    /// Which NMI start this is (each writes its own log).
    starts: u32,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.stop_nmi();
        let _ = self.relay.kill();
        let _ = self.relay.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Fixture {
    /// A node with `pods` pods, IMDS at 169.254.169.254:80 inside it (the
    /// emulator's, for a VM with a system-assigned identity and `id-a`), and
    /// conntrack active in the node's namespace as on any real node (a
    /// `conntrack` match in INPUT); NMI not started.
    async fn new(cluster: &Cluster, pods: u8) -> anyhow::Result<Fixture> {
        let node_name = unique_name("lc-node");
        let dir = std::env::temp_dir().join(unique_name("nmi-lifecycle"));
        std::fs::create_dir_all(&dir)?;
        let mut cfg = Config::new(TENANT, SUBSCRIPTION);
        cfg.resource_groups = vec!["rg".into()];
        cfg.identities = vec![IdentitySeed {
            name: "id-a".into(),
            resource_group: "rg".into(),
            client_id: Some(CLIENT_A.into()),
            principal_id: Some(OBJECT_A.into()),
            federated_credentials: Vec::new(),
            permissions: Default::default(),
        }];
        cfg.virtual_machines = vec![VmSeed {
            name: node_name.clone(),
            resource_group: "rg".into(),
            identity: IdentityAssignmentSeed {
                system_assigned: true,
                user_assigned: vec!["id-a".into()],
            },
        }];
        let emu = Emulator::start(cfg).await?;
        let imds = emu
            .add_imds(&format!("vm/{node_name}"), "127.0.0.1:0".parse()?)
            .await?;

        let node = Node::with_pods(pods)?;
        node.node.add_local_address(IMDS_ADDRESS)?;
        node.node.run(
            "iptables",
            &[
                "-w",
                "5",
                "-A",
                "INPUT",
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED",
                "-j",
                "ACCEPT",
            ],
        )?;
        let api: SocketAddr = cluster
            .server()
            .trim_start_matches("https://")
            .parse()
            .context("apiserver address")?;
        let (api_gate, gate_rx) = watch::channel(true);
        let (_always, open) = watch::channel(true);
        let api_sock = dir.join("api.sock");
        let imds_sock = dir.join("imds.sock");
        unix_to_tcp(api_sock.clone(), api, gate_rx).await?;
        unix_to_tcp(imds_sock.clone(), imds, open).await?;
        // The sender of an always-open gate may go: `wait_for` sees the
        // last value first.
        drop(_always);
        let mut relay = node
            .node
            .command("python3")
            .arg("-c")
            .arg(RELAY)
            .arg(format!("127.0.0.1:{API_RELAY_PORT}={}", api_sock.display()))
            .arg(format!("{IMDS_ADDRESS}:80={}", imds_sock.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        aadpodid_tests::netns::read_until_ready(&mut relay, "relay")?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            relayed(&std::fs::read_to_string(cluster.kubeconfig())?, cluster),
        )?;
        Ok(Fixture {
            node_name,
            node,
            dir,
            emu,
            nmi: None,
            relay,
            kubeconfig,
            api_gate,
            starts: 0,
        })
    }

    /// The NMI command line for this node, with `kubeconfig` and `extra`.
    fn nmi_args(&self, kubeconfig: &Path, extra: &[String]) -> Vec<String> {
        let mut args = vec![
            format!("--node={}", self.node_name),
            format!("--kubeconfig={}", kubeconfig.display()),
            "--http-probe-port=8085".into(),
            "--allow-network-plugin-kubenet=true".into(),
            "--retry-attempts-for-created=1".into(),
            "--ipt-update-interval-sec=1".into(),
        ];
        args.extend_from_slice(extra);
        args
    }

    /// Starts NMI in the node namespace, behind `wrapper` (a program and its
    /// arguments that end by running the rest of the command line).
    fn start_nmi_with(
        &mut self,
        wrapper: &[&str],
        kubeconfig: &Path,
        extra: &[String],
    ) -> anyhow::Result<()> {
        self.stop_nmi();
        self.starts += 1;
        let args = self.nmi_args(kubeconfig, extra);
        let log = std::fs::File::create(self.log_path())?;
        let exe = std::env::current_exe()?;
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = self.node.node.command(program);
                c.args(rest).arg(&exe);
                c
            }
            None => self.node.node.command(&exe),
        };
        let child = cmd
            .args([
                "--exact",
                "nmi_child_process",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, serde_json::to_string(&args)?)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.nmi = Some(child);
        Ok(())
    }

    fn start_nmi(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let kubeconfig = self.kubeconfig.clone();
        self.start_nmi_with(&[], &kubeconfig, &extra)
    }

    fn stop_nmi(&mut self) {
        if let Some(mut c) = self.nmi.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("nmi-{}.log", self.starts))
    }

    /// The current NMI's log, without terminal colours.
    fn log(&self) -> String {
        let raw = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // CSI: ESC [ parameters final-byte
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

    async fn wait_active(&self) -> anyhow::Result<()> {
        let node = &self.node.node;
        wait_for("nmi /healthz Active", Duration::from_secs(60), || async {
            let out = node
                .run(
                    "curl",
                    &["-s", "--max-time", "1", "http://127.0.0.1:8085/healthz"],
                )
                .ok()?;
            (out == "Active").then_some(())
        })
        .await
        .with_context(|| format!("nmi log:\n{}", self.log()))
    }

    /// Whether the redirect rule and the jump to it are in the node's nat table.
    fn rules_in_place(&self) -> bool {
        self.node
            .node
            .run("iptables", &["-w", "5", "-t", "nat", "-S"])
            .is_ok_and(|out| {
                out.lines().any(|l| l.trim() == REDIRECT_RULE)
                    && out
                        .lines()
                        .any(|l| l.trim() == "-A PREROUTING -j aad-metadata")
            })
    }

    fn pod_ns(&self, i: usize) -> &NetNs {
        &self.node.pods[i].0
    }

    fn pod_ip(&self, i: usize) -> String {
        self.node.pods[i].1.to_string()
    }
}

/// `kubeconfig` with the apiserver's address replaced by the node's relay.
fn relayed(kubeconfig: &str, cluster: &Cluster) -> String {
    kubeconfig.replace(
        cluster.server(),
        &format!("https://127.0.0.1:{API_RELAY_PORT}"),
    )
}

/// `curl` from inside `ns` to IMDS's address: (status, body).
async fn curl(ns: &NetNs, path: &str, headers: &[&str]) -> anyhow::Result<(u16, String)> {
    let url = format!("http://{IMDS_ADDRESS}{path}");
    let mut args = vec!["-s", "--max-time", "45", "-w", "\n%{http_code}"];
    for h in headers {
        args.push("-H");
        args.push(h);
    }
    args.push(&url);
    let mut cmd = ns.command("curl");
    cmd.args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::process::Command::from(cmd).output().await?;
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = out
        .rsplit_once('\n')
        .with_context(|| format!("curl output: {out}"))?;
    Ok((code.trim().parse()?, body.to_string()))
}

const TOKEN_PATH: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F";

/// A pod's keep-alive HTTP client: one connection to 169.254.169.254:80,
/// one token request at start ("FIRST <status line> <got a token>"), and
/// one more on the same connection per line on stdin ("AGAIN ..." or
/// "CUT <why>" when the connection was reset, closed or went silent).
const KEEPALIVE_CLIENT: &str = r#"
import socket, sys
path = sys.argv[1]
s = socket.create_connection(("169.254.169.254", 80), timeout=10)
req = ("GET " + path + " HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nConnection: keep-alive\r\n\r\n").encode()
def exchange():
    s.sendall(req)
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d:
            raise EOFError("closed by the peer")
        buf += d
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    n, chunked = None, False
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            n = int(v)
        if k == b"transfer-encoding" and b"chunked" in v.lower():
            chunked = True
    while (n is not None and len(body) < n) or (chunked and not body.endswith(b"0\r\n\r\n")):
        d = s.recv(65536)
        if not d:
            raise EOFError("closed mid-body")
        body += d
    return lines[0].decode(), b"access_token" in body
status, token = exchange()
print("FIRST", status, "token" if token else "no-token", flush=True)
for _ in sys.stdin:
    try:
        status, token = exchange()
        print("AGAIN", status, "token" if token else "no-token", flush=True)
    except Exception as e:
        print("CUT", type(e).__name__, e, flush=True)
"#;

/// A [`KEEPALIVE_CLIENT`] in a pod namespace.
struct KeepAlive {
    child: Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl KeepAlive {
    /// Opens the connection and makes the first request; returns its line.
    fn open(ns: &NetNs) -> anyhow::Result<(KeepAlive, String)> {
        use std::io::BufRead;
        let mut child = ns
            .command("python3")
            .arg("-c")
            .arg(KEEPALIVE_CLIENT)
            .arg(TOKEN_PATH)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let out = child.stdout.take().context("stdout")?;
        let mut k = KeepAlive {
            child,
            lines: std::io::BufReader::new(out).lines(),
        };
        let first = k.next_line()?;
        Ok((k, first))
    }

    fn next_line(&mut self) -> anyhow::Result<String> {
        match self.lines.next() {
            Some(line) => Ok(line?),
            None => bail!("the keep-alive client ended"),
        }
    }

    /// One more request on the same connection; returns its line.
    fn again(&mut self) -> anyhow::Result<String> {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().context("stdin")?;
        stdin.write_all(b"\n")?;
        stdin.flush()?;
        // The client's socket timeout (10 s) bounds this read.
        tokio::task::block_in_place(|| self.next_line())
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conntrack_deletion_cuts_connections_opened_before_the_redirect() -> anyhow::Result<()> {
    if std::env::var(CHILD_ENV).is_ok() {
        return Ok(());
    }
    let cluster = Cluster::shared();
    let mut f = Fixture::new(cluster, 3).await?;

    // Before NMI: pods 0 and 1 hold keep-alive connections on which the
    // node's IMDS hands out the node's identity.
    let (mut before_0, first) = KeepAlive::open(f.pod_ns(0))?;
    assert!(
        first.starts_with("FIRST HTTP/1.1 200") && first.ends_with(" token"),
        "{first}"
    );
    let (mut before_1, first) = KeepAlive::open(f.pod_ns(1))?;
    assert!(first.ends_with(" token"), "{first}");
    let tracked = f.node.node.run(
        "conntrack",
        &["-L", "-p", "tcp", "--orig-dst", &IMDS_ADDRESS.to_string()],
    )?;
    assert_eq!(tracked.lines().count(), 2, "conntrack entries: {tracked}");

    // NMI without --enable-conntrack-deletion: the rules are in place, yet
    // pod 0's old connection still reaches IMDS (the window this closes).
    f.start_nmi(&[])?;
    f.wait_active().await?;
    assert!(f.rules_in_place());
    let again = before_0.again()?;
    assert!(
        again.starts_with("AGAIN HTTP/1.1 200") && again.ends_with(" token"),
        "without conntrack deletion the old connection keeps reaching IMDS: {again}"
    );

    // The node reboots: the rules are gone when pod 2 connects.
    f.stop_nmi();
    f.node.node.run(
        "iptables",
        &[
            "-w",
            "5",
            "-t",
            "nat",
            "-D",
            "PREROUTING",
            "-j",
            "aad-metadata",
        ],
    )?;
    assert!(!f.rules_in_place());
    let (mut before_2, first) = KeepAlive::open(f.pod_ns(2))?;
    assert!(first.ends_with(" token"), "{first}");

    // NMI with --enable-conntrack-deletion: both old connections are cut at
    // their next request.
    f.start_nmi(&["--enable-conntrack-deletion"])?;
    f.wait_active().await?;
    assert!(f.rules_in_place());
    for (name, conn) in [("pod 1", &mut before_1), ("pod 2", &mut before_2)] {
        let again = conn.again()?;
        assert!(
            again.starts_with("CUT "),
            "{name}'s connection opened before the redirect must be cut: {again}\nnmi log:\n{}",
            f.log()
        );
    }
    let log = f.log();
    assert!(
        log.contains("cut connections to 169.254.169.254:80 opened before the redirect"),
        "{log}"
    );
    // A new connection reaches NMI, which knows no such pod: no token.
    let (status, body) = curl(f.pod_ns(2), TOKEN_PATH, &["Metadata: true"]).await?;
    assert_ne!(status, 200, "{body}");
    assert!(!body.contains("access_token"), "{body}");
    assert!(!body.is_empty(), "NMI answers ({status})");

    // Repair: while NMI runs, the jump goes (someone flushed PREROUTING)
    // and a pod connects to the real IMDS before NMI puts it back; the
    // repair cuts that connection. NMI checks every second, so a try whose
    // connection NMI already answered (no token) is made again.
    let mut repaired = None;
    for _ in 0..5 {
        f.node.node.run(
            "iptables",
            &[
                "-w",
                "5",
                "-t",
                "nat",
                "-D",
                "PREROUTING",
                "-j",
                "aad-metadata",
            ],
        )?;
        let (conn, first) = KeepAlive::open(f.pod_ns(0))?;
        if first.ends_with(" token") {
            repaired = Some(conn);
            break;
        }
        wait_for("the jump back", Duration::from_secs(10), || async {
            f.rules_in_place().then_some(())
        })
        .await?;
    }
    let mut during_repair = repaired.context("no connection reached IMDS before the repair")?;
    wait_for("the repair", Duration::from_secs(10), || async {
        f.rules_in_place().then_some(())
    })
    .await?;
    let again = during_repair.again()?;
    assert!(
        again.starts_with("CUT "),
        "a connection opened while the jump was missing is cut by the repair: {again}\nnmi log:\n{}",
        f.log()
    );

    // Restart with the rules already in place: the first sync changes
    // nothing, and still cuts. The connection is opened while the rules
    // are missing and survives an NMI without the flag that puts them back.
    f.stop_nmi();
    f.node.node.run(
        "iptables",
        &[
            "-w",
            "5",
            "-t",
            "nat",
            "-D",
            "PREROUTING",
            "-j",
            "aad-metadata",
        ],
    )?;
    let (mut before_restart, first) = KeepAlive::open(f.pod_ns(0))?;
    assert!(first.ends_with(" token"), "{first}");
    f.start_nmi(&[])?;
    f.wait_active().await?;
    f.stop_nmi();
    f.start_nmi(&["--enable-conntrack-deletion"])?;
    f.wait_active().await?;
    assert!(
        f.log().contains("iptables in place actions=[]"),
        "{}",
        f.log()
    );
    let again = before_restart.again()?;
    assert!(again.starts_with("CUT "), "{again}\nnmi log:\n{}", f.log());
    Ok(())
}

/// Cluster-scoped objects a test made, deleted when it ends.
struct ClusterScoped {
    cluster: &'static Cluster,
    objects: Vec<String>,
}

impl Drop for ClusterScoped {
    fn drop(&mut self) {
        for o in &self.objects {
            let _ = self
                .cluster
                .kubectl_run(&["delete", "--ignore-not-found", "--wait=false", o], None);
        }
    }
}

/// `kubectl apply` of `manifest`, which must succeed.
fn apply(cluster: &Cluster, manifest: &serde_json::Value) -> anyhow::Result<()> {
    let out = cluster.kubectl_run(&["apply", "-f", "-"], Some(&manifest.to_string()))?;
    if !out.success {
        bail!("kubectl apply: {}", out.stderr);
    }
    Ok(())
}

fn taint_keys(node: &K8sNode) -> Vec<String> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .map(|t| {
            t.iter()
                .map(|t| format!("{}:{}", t.key, t.effect))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn startup_taint_goes_only_after_the_rules_and_the_sync() -> anyhow::Result<()> {
    if std::env::var(CHILD_ENV).is_ok() {
        return Ok(());
    }
    let cluster = Cluster::shared();
    let admin = cluster.admin_client().await?;
    let ns = cluster.temp_namespace("nmi-taint").await?;
    let mut f = Fixture::new(cluster, 1).await?;
    let node_name = f.node_name.clone();
    let sa = "nmi";
    let roles = [format!("{node_name}-base"), format!("{node_name}-pods")];
    let _cleanup = ClusterScoped {
        cluster,
        objects: vec![
            format!("node/{node_name}"),
            format!("clusterrole/{}", roles[0]),
            format!("clusterrole/{}", roles[1]),
            format!("clusterrolebinding/{}", roles[0]),
            format!("clusterrolebinding/{}", roles[1]),
        ],
    };

    // The node as created by a node pool with the startup taint (two
    // effects) and another taint that must stay.
    let nodes: Api<K8sNode> = Api::all(admin.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": node_name},
                "spec": {"taints": [
                    {"key": TAINT, "value": "true", "effect": "NoSchedule"},
                    {"key": "dedicated", "value": "ml", "effect": "NoSchedule"},
                    {"key": TAINT, "effect": "NoExecute"},
                ]},
            }))?,
        )
        .await?;

    // NMI as a ServiceAccount with everything it needs but listing pods: its
    // redirect goes in, its pod watch cannot sync.
    let rbac = |name: &str, rules: serde_json::Value| {
        serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "List", "items": [
                {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                 "metadata": {"name": name}, "rules": rules},
                {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                 "metadata": {"name": name},
                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                 "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns.name()}]},
            ]
        })
    };
    let base = rbac(
        &roles[0],
        serde_json::json!([
            {"apiGroups": ["aadpodidentity.k8s.io"], "resources": ["azurepodidentityexceptions", "azureidentities", "azureidentitybindings", "azureassignedidentities"], "verbs": ["list", "watch"]},
            {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]},
        ]),
    );
    apply(cluster, &base)?;
    let sa_kubeconfig = cluster.service_account_kubeconfig(ns.name(), sa).await?;
    let nmi_kubeconfig = f.dir.join("sa.kubeconfig");
    std::fs::write(
        &nmi_kubeconfig,
        relayed(&std::fs::read_to_string(&sa_kubeconfig)?, cluster),
    )?;

    f.start_nmi_with(
        &[],
        &nmi_kubeconfig,
        &[format!("--node-startup-taint={TAINT}")],
    )?;
    let started = Instant::now();
    wait_for("the redirect", Duration::from_secs(30), || async {
        f.rules_in_place().then_some(())
    })
    .await
    .with_context(|| f.log())?;
    let rules_at = started.elapsed();
    // Rules in, caches unsynced: the taint stays.
    let hold = Duration::from_secs(4);
    let until = Instant::now() + hold;
    while Instant::now() < until {
        let keys = taint_keys(&nodes.get(&node_name).await?);
        assert_eq!(
            keys.iter().filter(|k| k.starts_with(TAINT)).count(),
            2,
            "the taint stays while the pod watch cannot sync: {keys:?}\nnmi log:\n{}",
            f.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        f.log().contains("watch failed"),
        "the pod watch is refused: {}",
        f.log()
    );

    // Let it list pods: the watch syncs and the taint goes, the other stays;
    // whenever the taint is seen gone, the rules are there.
    let pods = rbac(
        &roles[1],
        serde_json::json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}]),
    );
    apply(cluster, &pods)?;
    let granted = started.elapsed();
    let keys = wait_for(
        "the startup taint removed",
        Duration::from_secs(60),
        || async {
            let keys = taint_keys(&nodes.get(&node_name).await.ok()?);
            (!keys.iter().any(|k| k.starts_with(TAINT))).then_some(keys)
        },
    )
    .await
    .with_context(|| f.log())?;
    let removed = started.elapsed();
    assert!(
        f.rules_in_place(),
        "the rules are in place when the taint is gone"
    );
    // Others stay (the node controller may have added its own meanwhile).
    assert!(
        keys.iter().any(|k| k == "dedicated:NoSchedule"),
        "other taints stay: {keys:?}"
    );
    println!("rules at {rules_at:?}, pods granted at {granted:?}, taint removed at {removed:?}");
    let log = f.log();
    assert!(log.contains("startup taint removed"), "{log}");
    // The server serves throughout (the taint never blocks it).
    f.wait_active().await?;
    Ok(())
}

fn identity(ns: &str, name: &str, client_id: &str) -> AzureIdentity {
    let mut id = AzureIdentity::new(
        name,
        AzureIdentitySpec {
            client_id: client_id.into(),
            resource_id: format!(
                "/subscriptions/{SUBSCRIPTION}/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
            ),
            ..Default::default()
        },
    );
    id.metadata.namespace = Some(ns.into());
    id
}

async fn mk_pod(
    client: &kube::Client,
    ns: &str,
    name: &str,
    node: &str,
    ip: &str,
    labels: &[(&str, &str)],
) -> anyhow::Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), (*v).into()))
        .collect();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}]},
    }))?;
    api.create(&PostParams::default(), &pod).await?;
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
        })),
    )
    .await?;
    Ok(())
}

// Needs the first-sync wait in `server.rs` (`--first-sync-wait-sec`): until
// that is in, a request before the first sync fails and so does this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_during_the_first_sync_after_a_restart_wait() -> anyhow::Result<()> {
    if std::env::var(CHILD_ENV).is_ok() {
        return Ok(());
    }
    let cluster = Cluster::shared();
    let client = cluster.admin_client().await?;
    let ns = cluster.temp_namespace("nmi-restart").await?;
    let ns = ns.name().to_string();
    let mut f = Fixture::new(cluster, 1).await?;
    let node = f.node_name.clone();
    mk_pod(
        &client,
        &ns,
        "app",
        &node,
        &f.pod_ip(0),
        &[("aadpodidbinding", "a")],
    )
    .await?;
    let id = identity(&ns, "id-a", CLIENT_A);
    let aai = mic_aai(&client, &ns, &node, "app", &id, "a", false).await?;
    create_aai(&client, &aai).await?;
    f.start_nmi(&[])?;
    f.wait_active().await?;
    let (status, body) = curl(f.pod_ns(0), TOKEN_PATH, &["Metadata: true"]).await?;
    assert_eq!(status, 200, "before the restart: {body}\n{}", f.log());

    // Restart with the apiserver out of reach: NMI listens (the redirect
    // stayed in place) but cannot sync.
    f.stop_nmi();
    f.api_gate.send_replace(false);
    f.start_nmi(&[])?;
    let node_ns = &f.node.node;
    wait_for("nmi listening again", Duration::from_secs(30), || async {
        node_ns
            .run(
                "curl",
                &[
                    "-s",
                    "-o",
                    "/dev/null",
                    "--max-time",
                    "1",
                    "http://127.0.0.1:2579/",
                ],
            )
            .ok()
    })
    .await
    .with_context(|| f.log())?;
    let health = node_ns
        .run(
            "curl",
            &["-s", "--max-time", "1", "http://127.0.0.1:8085/healthz"],
        )
        .unwrap_or_default();
    assert_ne!(
        health,
        "Active",
        "the gate keeps NMI from syncing\n{}",
        f.log()
    );
    let pod = f.pod_ns(0);
    let asked = Instant::now();
    let request = async {
        let answer = curl(pod, TOKEN_PATH, &["Metadata: true"]).await;
        answer.map(|a| (a, asked.elapsed()))
    };
    let release = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        f.api_gate.send_replace(true);
        Ok(())
    };
    let (((status, body), took), ()) = tokio::try_join!(request, release)?;
    println!("request during the first sync answered {status} after {took:?}");
    assert_eq!(
        status,
        200,
        "a request during the first sync waits and succeeds: {body}\nnmi log:\n{}",
        f.log()
    );
    let token: serde_json::Value = serde_json::from_str(&body)?;
    let appid = f
        .emu
        .verify_token(token["access_token"].as_str().context("access_token")?)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?
        .appid;
    assert_eq!(appid, CLIENT_A);
    assert!(
        took >= Duration::from_secs(3),
        "answered only once the apiserver was reachable: {took:?}"
    );
    Ok(())
}

/// `sh -c` that makes `/proc/sys` read-only in a new mount namespace (as in
/// a container without privileges) and runs the rest of its arguments.
const READ_ONLY_PROC_SYS: &str =
    "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec \"$@\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn route_localnet_off_and_read_only_proc_sys_is_named_with_its_fixes() -> anyhow::Result<()> {
    if std::env::var(CHILD_ENV).is_ok() {
        return Ok(());
    }
    let cluster = Cluster::shared();
    let mut f = Fixture::new(cluster, 1).await?;
    let sysctl = "net.ipv4.conf.all.route_localnet";
    let value = |f: &Fixture| {
        f.node
            .node
            .run("sysctl", &["-n", sysctl])
            .map(|v| v.trim().to_string())
    };
    assert_eq!(value(&f)?, "0", "a new namespace starts with {sysctl}=0");

    let kubeconfig = f.kubeconfig.clone();
    f.start_nmi_with(
        &[
            "unshare",
            "-m",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            READ_ONLY_PROC_SYS,
            "sh",
        ],
        &kubeconfig,
        &[],
    )?;
    let mut child = f.nmi.take().context("nmi")?;
    let status = wait_for("nmi to exit", Duration::from_secs(60), || {
        let s = child.try_wait().ok().flatten();
        async move { s }
    })
    .await
    .with_context(|| f.log())?;
    assert!(!status.success());
    let log = f.log();
    println!("{log}");
    for part in [
        "net.ipv4.conf.all.route_localnet is 0 in NMI's network namespace and NMI cannot set it to 1",
        "Read-only file system",
        "/proc/sys is read-only here",
        "127.0.0.1:2579",
        "nmi.routeLocalnetInitContainer=true",
        "--nmi-listen-address=<node IP>",
        "nmi.listenAddress=\"$(HOST_IP)\"",
    ] {
        assert!(log.contains(part), "missing {part:?} in:\n{log}");
    }
    assert_eq!(value(&f)?, "0");
    assert!(
        f.rules_in_place(),
        "the redirect is in place before NMI exits (pods are refused, not sent to IMDS)"
    );

    // --set-route-localnet=false with 0: said at start, and NMI runs on.
    f.start_nmi(&["--set-route-localnet=false"])?;
    f.wait_active().await?;
    let log = f.log();
    assert!(
        log.contains("--set-route-localnet=false forbids NMI to set it: the redirect cannot work"),
        "{log}"
    );
    assert_eq!(value(&f)?, "0");
    Ok(())
}
