//! NMI at the edges of its life on a node: connections opened to IMDS before
//! it started (`--enable-conntrack-deletion`), the startup taint
//! (`--node-startup-taint`), requests during the first cache sync after a
//! restart, and `route_localnet` where `/proc/sys` is read-only.
//!
//! The node is [`NmiNode`] (real iptables in a node namespace, the real
//! apiserver and the Azure emulator through a relay, the `e2e-nmi` binary),
//! with conntrack active in the node's namespace as on any real node; its
//! way to the apiserver can be held shut to keep NMI's caches from syncing.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use aadpodid_tests::netns::{IMDS_ADDRESS, NetNs};
use aadpodid_tests::nmi_node::{
    ARM_TOKEN_PATH, CLIENT_A, Launch, NmiNode, Options, curl, identity, nmi_bin,
};
use aadpodid_tests::{Cluster, wait_for};
use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Node as K8sNode;
use kube::Api;
use kube::api::{Patch, PatchParams};

const TAINT: &str = "aadpodidentity.k8s.io/nmi-not-ready";

/// A node with `pods` pods and conntrack active in its namespace (a
/// `conntrack` match in INPUT); NMI not started.
async fn node(pods: u8) -> anyhow::Result<NmiNode> {
    let mut opts = Options::new(pods, nmi_bin(env!("CARGO_BIN_EXE_e2e-nmi")));
    opts.start_nmi = false;
    opts.namespace = "nmi-lifecycle";
    let f = NmiNode::start(opts).await?;
    f.node_ns().run(
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
    Ok(f)
}

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
            .arg(ARM_TOKEN_PATH)
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
    let mut f = node(3).await?;

    // Before NMI: pods 0 and 1 hold keep-alive connections on which the
    // node's IMDS hands out the node's identity.
    let (mut before_0, first) = KeepAlive::open(f.pod_ns(0))?;
    assert!(
        first.starts_with("FIRST HTTP/1.1 200") && first.ends_with(" token"),
        "{first}"
    );
    let (mut before_1, first) = KeepAlive::open(f.pod_ns(1))?;
    assert!(first.ends_with(" token"), "{first}");
    let tracked = f.node_ns().run(
        "conntrack",
        &["-L", "-p", "tcp", "--orig-dst", &IMDS_ADDRESS.to_string()],
    )?;
    assert_eq!(tracked.lines().count(), 2, "conntrack entries: {tracked}");

    // NMI without --enable-conntrack-deletion: the rules are in place, yet
    // pod 0's old connection still reaches IMDS (the window this closes).
    f.restart_nmi_with(&[]).await?;
    assert!(f.redirect_in_place());
    let again = before_0.again()?;
    assert!(
        again.starts_with("AGAIN HTTP/1.1 200") && again.ends_with(" token"),
        "without conntrack deletion the old connection keeps reaching IMDS: {again}"
    );

    // The node reboots: the rules are gone when pod 2 connects.
    f.stop_nmi();
    f.remove_redirect_jump()?;
    assert!(!f.redirect_in_place());
    let (mut before_2, first) = KeepAlive::open(f.pod_ns(2))?;
    assert!(first.ends_with(" token"), "{first}");

    // NMI with --enable-conntrack-deletion: both old connections are cut at
    // their next request.
    f.restart_nmi_with(&["--enable-conntrack-deletion"]).await?;
    assert!(f.redirect_in_place());
    for (name, conn) in [("pod 1", &mut before_1), ("pod 2", &mut before_2)] {
        let again = conn.again()?;
        assert!(
            again.starts_with("CUT "),
            "{name}'s connection opened before the redirect must be cut: {again}\nnmi log:\n{}",
            f.start_log()
        );
    }
    let log = f.start_log();
    assert!(
        log.contains("cut connections to 169.254.169.254:80 opened before the redirect"),
        "{log}"
    );
    // A new connection reaches NMI, which knows no such pod: no token.
    let (status, body) = curl(f.pod_ns(2), ARM_TOKEN_PATH, &["Metadata: true"]).await?;
    assert_ne!(status, 200, "{body}");
    assert!(!body.contains("access_token"), "{body}");
    assert!(!body.is_empty(), "NMI answers ({status})");

    // Repair: while NMI runs, the jump goes (someone flushed PREROUTING)
    // and a pod connects to the real IMDS before NMI puts it back; the
    // repair cuts that connection. NMI checks every second, so a try whose
    // connection NMI already answered (no token) is made again.
    // NMI logs "iptables repaired" only after the repair's cut has run, so
    // the test waits for that line rather than for the jump alone: a request
    // sent between the jump's return and the cut would still reach IMDS.
    let repairs = |log: &str| log.matches("iptables repaired").count();
    let mut repaired = None;
    for _ in 0..5 {
        let before = repairs(&f.start_log());
        f.remove_redirect_jump()?;
        let (conn, first) = KeepAlive::open(f.pod_ns(0))?;
        if first.ends_with(" token") {
            repaired = Some((conn, before));
            break;
        }
        wait_for("the jump back", Duration::from_secs(10), || async {
            f.redirect_in_place().then_some(())
        })
        .await?;
    }
    let (mut during_repair, before) =
        repaired.context("no connection reached IMDS before the repair")?;
    wait_for("the repair", Duration::from_secs(10), || async {
        (f.redirect_in_place() && repairs(&f.start_log()) > before).then_some(())
    })
    .await?;
    let again = during_repair.again()?;
    assert!(
        again.starts_with("CUT "),
        "a connection opened while the jump was missing is cut by the repair: {again}\nnmi log:\n{}",
        f.start_log()
    );

    // Restart with the rules already in place: the first sync changes
    // nothing, and still cuts. The connection is opened while the rules
    // are missing and survives an NMI without the flag that puts them back.
    f.stop_nmi();
    f.remove_redirect_jump()?;
    let (mut before_restart, first) = KeepAlive::open(f.pod_ns(0))?;
    assert!(first.ends_with(" token"), "{first}");
    f.restart_nmi_with(&[]).await?;
    f.stop_nmi();
    f.restart_nmi_with(&["--enable-conntrack-deletion"]).await?;
    assert!(
        f.start_log().contains("iptables in place actions=[]"),
        "{}",
        f.start_log()
    );
    let again = before_restart.again()?;
    assert!(
        again.starts_with("CUT "),
        "{again}\nnmi log:\n{}",
        f.start_log()
    );
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
    let cluster = Cluster::shared();
    let mut f = node(1).await?;
    let ns = f.ns().to_string();
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
    // effects) and another taint that must stay: the node step's Node object
    // (which has no taints) given them before NMI starts.
    let nodes: Api<K8sNode> = Api::all(f.client.clone());
    nodes
        .patch(
            &node_name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "spec": {"taints": [
                    {"key": TAINT, "value": "true", "effect": "NoSchedule"},
                    {"key": "dedicated", "value": "ml", "effect": "NoSchedule"},
                    {"key": TAINT, "effect": "NoExecute"},
                ]},
            })),
        )
        .await?;
    let keys = taint_keys(&nodes.get(&node_name).await?);
    assert_eq!(keys.len(), 3, "the node has exactly these taints: {keys:?}");

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
                 "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]},
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
    let sa_kubeconfig = cluster.service_account_kubeconfig(&ns, sa).await?;
    let nmi_kubeconfig = f.relay_kubeconfig(&sa_kubeconfig, "sa.kubeconfig")?;

    f.launch(&Launch {
        args: vec![format!("--node-startup-taint={TAINT}")],
        kubeconfig: Some(nmi_kubeconfig),
        ..Launch::default()
    })?;
    let started = Instant::now();
    wait_for("the redirect", Duration::from_secs(30), || async {
        f.redirect_in_place().then_some(())
    })
    .await
    .with_context(|| f.start_log())?;
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
            f.start_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        f.start_log().contains("watch failed"),
        "the pod watch is refused: {}",
        f.start_log()
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
    .with_context(|| f.start_log())?;
    let removed = started.elapsed();
    assert!(
        f.redirect_in_place(),
        "the rules are in place when the taint is gone"
    );
    // Others stay (the node controller may have added its own meanwhile).
    assert!(
        keys.iter().any(|k| k == "dedicated:NoSchedule"),
        "other taints stay: {keys:?}"
    );
    println!("rules at {rules_at:?}, pods granted at {granted:?}, taint removed at {removed:?}");
    let log = f.start_log();
    assert!(log.contains("startup taint removed"), "{log}");
    // The server serves throughout (the taint never blocks it).
    f.wait_active().await?;
    Ok(())
}

// The first-sync wait (`--first-sync-wait-sec`, in `server.rs`): a request
// that arrives before nmi's watches have listed waits for them instead of
// failing; with the wait set to 0 the same request gets 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_during_the_first_sync_after_a_restart_wait() -> anyhow::Result<()> {
    let mut f = node(1).await?;
    let id = identity(f.ns(), "id-a", CLIENT_A);
    f.create_bound_pod("app", 0, &id, "a").await?;
    f.restart_nmi_with(&[]).await?;
    let (status, body) = curl(f.pod_ns(0), ARM_TOKEN_PATH, &["Metadata: true"]).await?;
    assert_eq!(status, 200, "before the restart: {body}\n{}", f.start_log());

    // Restart with the apiserver out of reach: NMI listens (the redirect
    // stayed in place) but cannot sync.
    f.stop_nmi();
    f.set_api_reachable(false);
    f.start_nmi_with(&[])?;
    let node_ns = f.node_ns();
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
    .with_context(|| f.start_log())?;
    let health = f.healthz().await.unwrap_or_default();
    assert_ne!(
        health,
        "Active",
        "the gate keeps NMI from syncing\n{}",
        f.start_log()
    );
    let pod = f.pod_ns(0);
    let asked = Instant::now();
    let request = async {
        let answer = curl(pod, ARM_TOKEN_PATH, &["Metadata: true"]).await;
        answer.map(|a| (a, asked.elapsed()))
    };
    let release = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        f.set_api_reachable(true);
        Ok(())
    };
    let (((status, body), took), ()) = tokio::try_join!(request, release)?;
    println!("request during the first sync answered {status} after {took:?}");
    assert_eq!(
        status,
        200,
        "a request during the first sync waits and succeeds: {body}\nnmi log:\n{}",
        f.start_log()
    );
    assert_eq!(f.answer_appid(&body)?, CLIENT_A);
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
    let mut f = node(1).await?;
    let sysctl = "net.ipv4.conf.all.route_localnet";
    let value = |f: &NmiNode| {
        f.node_ns()
            .run("sysctl", &["-n", sysctl])
            .map(|v| v.trim().to_string())
    };
    assert_eq!(value(&f)?, "0", "a new namespace starts with {sysctl}=0");

    f.launch(&Launch {
        wrapper: [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            READ_ONLY_PROC_SYS,
            "sh",
        ]
        .map(String::from)
        .to_vec(),
        ..Launch::default()
    })?;
    let mut child = f.take_nmi().context("nmi")?;
    let status = wait_for("nmi to exit", Duration::from_secs(60), || {
        let s = child.try_wait().ok().flatten();
        async move { s }
    })
    .await
    .with_context(|| f.start_log())?;
    assert!(!status.success());
    let log = f.start_log();
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
        f.redirect_in_place(),
        "the redirect is in place before NMI exits (pods are refused, not sent to IMDS)"
    );

    // --set-route-localnet=false with 0: said at start, and NMI runs on.
    f.restart_nmi_with(&["--set-route-localnet=false"]).await?;
    let log = f.start_log();
    assert!(
        log.contains("--set-route-localnet=false forbids NMI to set it: the redirect cannot work"),
        "{log}"
    );
    assert_eq!(value(&f)?, "0");
    Ok(())
}
