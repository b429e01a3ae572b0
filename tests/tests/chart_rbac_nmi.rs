//! RBAC proof for the chart, NMI: the real command `e2e-nmi` runs with the
//! container args the chart renders, authenticated as the chart's
//! ServiceAccount (TokenRequest tokens) and authorized only by the chart's
//! rendered ClusterRole/Roles and bindings, against the RBAC-enabled test
//! apiserver:
//! - NMI syncs its caches, installs its iptables redirect in a test node
//!   namespace, becomes Active and serves a pod (in its own network namespace)
//!   the token of its identity from the emulator's IMDS, through an
//!   AzureAssignedIdentity written as MIC's ServiceAccount (the chart's
//!   admission policy admits no other writer) that embeds the live
//!   AzureIdentity and AzureIdentityBinding; it keeps the redirect
//!   over a restart and removes it after a real `helm uninstall`
//!   (`--cleanup-on-uninstall`).
//! - NMI may read exactly the Secrets the chart's values name.
//! - nmi.startupTaint: NMI removes the startup taint from its own Node with
//!   the chart's rules and admission policy and its pod-bound token; without
//!   `patch`, or with a token that names no node, the taint stays.
//! - One verb taken out of a rendered ClusterRole makes NMI fail.
//!
//! MIC's half of the proof is the test binary `chart_rbac`. No MIC runs
//! while these tests do (a separate test binary; cargo runs test binaries
//! one after the other), so the AzureAssignedIdentities written here by hand
//! stay as written.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use aadpodid_tests::chart_release::{
    APPLY_SERVER_SIDE, Release, WAIT, apply_identity_binding_pod, kubectl_in, list, submit, values,
    without_verb,
};
use aadpodid_tests::helm;
use aadpodid_tests::nmi_node::{Launch, NmiNode, Options, nmi_bin};
use aadpodid_tests::tenant::{self, APP_CLIENT, APP_ID, APP_RG};
use aadpodid_tests::{Cluster, TENANT, unique_name, wait_for};
use anyhow::{Context as _, anyhow};
use serde_json::{Value, json};

/// A token request as an Azure SDK sends it.
const TOKEN_PATH: &str =
    "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/";

/// The node of these tests: one pod, NMI not started (each test starts it
/// as the chart says, [`chart_launch`]), the emulator's world
/// [`app_world`], the kubelet flags file NMI checks in the node's folder.
async fn node() -> anyhow::Result<NmiNode> {
    let mut opts = Options::new(1, nmi_bin(env!("CARGO_BIN_EXE_e2e-nmi")));
    opts.start_nmi = false;
    opts.namespace = "rbac-nmi-node";
    opts.emulator = app_world;
    let f = NmiNode::start(opts).await?;
    // No kubenet here.
    std::fs::write(
        f.dir().join("kubelet"),
        "KUBELET_FLAGS=--network-plugin=cni\n",
    )?;
    Ok(f)
}

/// The emulator's world of these tests: the node's VM in the app group,
/// with a system identity and `app-id` (the tenant's app identity).
fn app_world(cfg: &mut azure_emulator::Config) {
    let vm = cfg
        .virtual_machines
        .first()
        .map(|v| v.name.clone())
        .unwrap_or_default();
    cfg.subscription_id = aadpodid_tests::SUB.into();
    cfg.resource_groups = vec![APP_RG.into()];
    cfg.identities = vec![tenant::identity_seed(APP_ID, APP_RG, APP_CLIENT)];
    cfg.virtual_machines = vec![tenant::vm_seed(&vm, APP_RG, true, &[APP_ID])];
}

/// A kubeconfig of the chart's NMI ServiceAccount whose server is the
/// node's relay to the apiserver.
async fn nmi_kubeconfig(f: &NmiNode, rel: &Release) -> anyhow::Result<PathBuf> {
    let sa = rel.sa_kubeconfig("nmi", None, f.dir()).await?;
    f.relay_kubeconfig(&sa, "nmi-relayed.kubeconfig")
}

/// How the kubelet starts the DaemonSet's pod `pod` on `f`: the container
/// args the chart renders (the kubelet flags file in the node's folder),
/// `kubeconfig`, and the env the kubelet gives the pod.
fn chart_launch(
    f: &NmiNode,
    rel: &Release,
    pod: &str,
    kubeconfig: &Path,
) -> anyhow::Result<Launch> {
    let ds = rel.get("DaemonSet", &rel.nmi())?;
    let args = helm::container_args(&ds)
        .into_iter()
        .map(|a| {
            if a.starts_with("--kubelet-config=") {
                format!("--kubelet-config={}", f.dir().join("kubelet").display())
            } else {
                a.replace("$(NODE_NAME)", &f.node_name)
            }
        })
        .collect();
    let env = [
        ("NODE_NAME", f.node_name.as_str()),
        ("POD_NAME", pod),
        ("POD_NAMESPACE", rel.ns.name()),
        ("FORCENAMESPACED", "false"),
    ];
    Ok(Launch {
        args,
        kubeconfig: Some(kubeconfig.to_path_buf()),
        env: env.map(|(k, v)| (k.to_string(), v.to_string())).into(),
        args_only: true,
        ..Launch::default()
    })
}

/// A pod on `f` (its network namespace's address) bound to `app-id` by a
/// real AzureIdentity and AzureIdentityBinding, and the Assigned
/// AzureAssignedIdentity MIC would write, in "default", embedding both with
/// their UIDs, written with MIC's credentials `mic_kubeconfig`. Returns the
/// AzureAssignedIdentity's name (in "default").
fn bind_pod(
    f: &NmiNode,
    cluster: &Cluster,
    ns: &str,
    mic_kubeconfig: &Path,
) -> anyhow::Result<String> {
    let ip = f.pod_ip(0);
    apply_identity_binding_pod(cluster, ns, "app", "app", &f.node_name)?;
    // The live objects, as MIC embeds them.
    let embed = |kind: &str, name: &str| -> anyhow::Result<Value> {
        let out = kubectl_in(cluster, ns, &["get", kind, name, "-o", "json"])?;
        assert!(out.success, "{}", out.stderr);
        let live: Value = serde_json::from_str(&out.stdout)?;
        assert!(live["metadata"]["uid"].is_string(), "{live}");
        Ok(json!({
            "apiVersion": live["apiVersion"], "kind": live["kind"],
            "metadata": {"name": live["metadata"]["name"], "namespace": ns,
                         "uid": live["metadata"]["uid"]},
            "spec": live["spec"],
        }))
    };
    let name = format!("app-{ns}-app-id");
    let aai = json!({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureAssignedIdentity",
        "metadata": {"name": name, "namespace": "default", "labels": {"nodename": f.node_name}},
        "spec": {"azureIdentityRef": embed("azureidentity", "app-id")?,
                 "azureBindingRef": embed("azureidentitybinding", "app-binding")?,
                 "pod": "app", "podNamespace": ns, "nodename": f.node_name},
        "status": {"status": "Assigned"},
    });
    let mut cmd = cluster.kubectl_with(mic_kubeconfig);
    cmd.args(["create", "-f", "-", "--request-timeout", "30s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    {
        use std::io::Write as _;
        let mut pipe = child.stdin.take().context("kubectl's stdin")?;
        pipe.write_all(aai.to_string().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    assert!(
        out.status.success(),
        "AzureAssignedIdentity as MIC: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
    let out = kubectl_in(
        cluster,
        ns,
        &[
            "patch",
            "pod",
            "app",
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ],
    )?;
    assert!(out.success, "{}", out.stderr);
    Ok(name)
}

/// The redirect chain, or None when it does not exist.
fn chain(f: &NmiNode) -> Option<String> {
    f.nat_rules(Some("aad-metadata"))
        .ok()
        .filter(|s| s.contains("DNAT"))
}

/// `r`, or its error with what NMI's current start logged.
fn with_start_log<T>(r: anyhow::Result<T>, f: &NmiNode) -> anyhow::Result<T> {
    r.map_err(|e| anyhow!("{e}\nNMI log:\n{}", f.start_log()))
}

/// Deletes the admission policies a release installed when the test ends,
/// also on panic (helm uninstall removes them otherwise): they hold
/// cluster-wide and would refuse the other tests' MICs.
struct ReleasePolicies {
    cluster: &'static Cluster,
    name: String,
}

impl Drop for ReleasePolicies {
    fn drop(&mut self) {
        for which in [
            "identity-grants",
            "assigned-identity-writers",
            "exception-writers",
        ] {
            for kind in [
                "validatingadmissionpolicybinding",
                "validatingadmissionpolicy",
            ] {
                let _ = self.cluster.kubectl_run(
                    &[
                        "delete",
                        kind,
                        &format!("{}-{which}", self.name),
                        "--ignore-not-found",
                    ],
                    None,
                );
            }
        }
    }
}

/// `kubectl delete <args> --ignore-not-found` when dropped.
struct DeleteOnDrop {
    cluster: &'static Cluster,
    args: Vec<String>,
}

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        let mut args: Vec<&str> = vec!["delete"];
        args.extend(self.args.iter().map(String::as_str));
        args.push("--ignore-not-found");
        let _ = self.cluster.kubectl_run(&args, None);
    }
}

/// Creates, as the DaemonSet controller would, the DaemonSet's pod on the node.
fn create_ds_pod(rel: &Release, node: &str, pod: &str) -> anyhow::Result<()> {
    let ds_uid = kubectl_in(
        rel.cluster,
        rel.ns.name(),
        &[
            "get",
            "daemonset",
            &rel.nmi(),
            "-o",
            "jsonpath={.metadata.uid}",
        ],
    )?
    .stdout;
    assert!(!ds_uid.is_empty());
    let ds = rel.get("DaemonSet", &rel.nmi())?;
    let mut spec = ds["spec"]["template"]["spec"].clone();
    spec["nodeName"] = json!(node);
    let p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": pod, "namespace": rel.ns.name(),
            "labels": ds["spec"]["template"]["metadata"]["labels"],
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": rel.nmi(),
                                 "uid": ds_uid, "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": spec,
    });
    submit(rel.cluster, &["apply"], &p)
}

/// NMI as the chart's ServiceAccount becomes Active; a restart keeps the
/// redirect; a real `helm uninstall` (DaemonSet, then RBAC and the
/// ServiceAccount deleted, then SIGTERM) removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nmi_becomes_active_with_the_chart_rbac_and_cleans_up_on_uninstall() -> anyhow::Result<()> {
    let cluster = Cluster::shared();
    let mut f = node().await?;
    let ns = cluster.temp_namespace("rbac-nmi").await?;
    let release = unique_name("rbac-nmi");
    let _policies = ReleasePolicies {
        cluster,
        name: release.clone(),
    };
    // A real helm install into the test apiserver (no controllers run, so the
    // workloads are objects only; the test plays kubelet).
    let kubeconfig = cluster.kubeconfig().display().to_string();
    let install = helm::run(&[
        "install",
        &release,
        &helm::chart_dir().display().to_string(),
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        ns.name(),
        "--set",
        &format!("fullnameOverride={release}"),
        "--set",
        &format!("mic.leaderElection.namespace={}", ns.name()),
        "--set",
        "installMICException=false",
        "--skip-crds",
        "--timeout",
        "60s",
    ])?;
    assert!(
        install.success,
        "helm install: {}{}",
        install.stdout, install.stderr
    );
    let r = values(&release, &ns);
    let rel = Release::of(release.clone(), ns, &r)?;
    let pod = format!("{}-x7k2p", rel.nmi());
    create_ds_pod(&rel, &f.node_name, &pod)?;
    let kc = nmi_kubeconfig(&f, &rel).await?;

    f.launch(&chart_launch(&f, &rel, &pod, &kc)?)?;
    f.wait_active().await?;
    assert!(chain(&f).is_some(), "redirect installed");
    assert!(!f.start_log().contains("forbidden"), "{}", f.start_log());
    // It serves a pod on the node the token of the identity it is bound to.
    // The admission policy the release installed admits only MIC's account.
    let mic_kc = rel.sa_kubeconfig("mic", None, f.dir()).await?;
    let aai_name = bind_pod(&f, cluster, rel.ns.name(), &mic_kc)?;
    let _aai = DeleteOnDrop {
        cluster,
        args: vec![
            "azureassignedidentity".into(),
            aai_name,
            "-n".into(),
            "default".into(),
        ],
    };
    let (code, body) = f.curl(0, TOKEN_PATH, &["Metadata: true"]).await?;
    assert_eq!(code, 200, "{body}\nNMI log:\n{}", f.start_log());
    let token: Value = serde_json::from_str(&body)?;
    assert_eq!(token["client_id"], APP_CLIENT, "{body}");
    assert_eq!(f.answer_appid(&body)?, APP_CLIENT);

    // A restart (rolling update, crash, eviction): the redirect stays.
    f.terminate_nmi().await?;
    assert!(
        chain(&f).is_some(),
        "redirect kept over a restart:\n{}",
        f.start_log()
    );
    assert!(f.start_log().contains("fail-closed"), "{}", f.start_log());

    f.launch(&chart_launch(&f, &rel, &pod, &kc)?)?;
    f.wait_active().await?;
    let uninstall = helm::run(&[
        "uninstall",
        &release,
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        rel.ns.name(),
        "--timeout",
        "60s",
    ])?;
    assert!(
        uninstall.success,
        "helm uninstall: {}{}",
        uninstall.stdout, uninstall.stderr
    );
    // The account is gone with the release: NMI's own token no longer works,
    // so only what its watch saw can tell it the DaemonSet went.
    let sa = kubectl_in(
        cluster,
        rel.ns.name(),
        &["get", "serviceaccount", &rel.nmi()],
    )?;
    assert!(!sa.success, "ServiceAccount deleted by helm uninstall");
    f.terminate_nmi().await?;
    assert!(
        chain(&f).is_none(),
        "redirect removed after uninstall:\n{}",
        f.start_log()
    );
    assert!(
        f.start_log().contains("being uninstalled"),
        "{}",
        f.start_log()
    );
    Ok(())
}

/// Without `list` on AzureAssignedIdentities NMI never syncs its caches and
/// never becomes Active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nmi_without_one_verb_never_becomes_active() -> anyhow::Result<()> {
    let mut f = node().await?;
    let rel = Release::render("rbac-nmi-broken", &[]).await?;
    rel.apply_rbac("nmi", without_verb("azureassignedidentities", "list"))?;
    let kc = nmi_kubeconfig(&f, &rel).await?;
    // No DaemonSet pod: --cleanup-on-uninstall is off for this one (logged).
    f.launch(&chart_launch(&f, &rel, "no-such-pod", &kc)?)?;
    let r = wait_for("NMI's list refused", WAIT, || async {
        f.start_log().contains("forbidden").then_some(())
    })
    .await;
    let health = f.healthz().await.unwrap_or_default();
    f.stop_nmi();
    rel.delete_cluster_scoped();
    with_start_log(r, &f)?;
    assert_eq!(health, "Not Active", "{}", f.start_log());
    Ok(())
}

/// `kubectl auth can-i` as the chart's NMI ServiceAccount.
fn nmi_can(rel: &Release, args: &[&str]) -> anyhow::Result<bool> {
    let who = format!("--as=system:serviceaccount:{}:{}", rel.ns.name(), rel.nmi());
    let mut all = vec!["auth", "can-i"];
    all.extend_from_slice(args);
    all.push(&who);
    let out = rel.cluster.kubectl_run(&all, None)?;
    Ok(out.stdout.trim() == "yes")
}

/// Secrets: by default NMI may read exactly the Secret a service-principal
/// identity of `azureIdentities` names, in its namespace, and nothing else;
/// `rbac.allowAccessToSecrets` true/false are upstream's cluster-wide rule and none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nmi_reads_only_the_secrets_of_service_principal_identities() -> anyhow::Result<()> {
    // The clientPassword JSON string of upstream's values, through a file
    // (`--set` would read `{...}` as a list).
    let sp = |ns: &str| {
        format!(
            "azureIdentities:\n  sp:\n    type: 1\n    namespace: {ns}\n    clientID: cccccccc-0000-4000-8000-00000000000c\n    tenantID: {TENANT}\n    clientPassword: '{{\"name\":\"sp-secret\",\"namespace\":\"{ns}\"}}'\n    binding:\n      selector: sp\n"
        )
    };
    for (case, allow) in [
        ("auto", None),
        ("all", Some("true")),
        ("none", Some("false")),
    ] {
        let cluster = Cluster::shared();
        let ns = cluster
            .temp_namespace(&format!("rbac-secrets-{case}"))
            .await?;
        let name = unique_name(&format!("sec-{case}"));
        let values_file = std::env::temp_dir().join(format!("{name}-values.yaml"));
        std::fs::write(&values_file, sp(ns.name()))?;
        let mut r = values(&name, &ns).values(&values_file);
        if let Some(a) = allow {
            r = r.set("rbac.allowAccessToSecrets", a);
        }
        let rel = Release::of(name.clone(), ns, &r);
        let _ = std::fs::remove_file(&values_file);
        let rel = rel?;
        submit(cluster, &APPLY_SERVER_SIDE, &list(rel.rbac_objects("nmi"))).context(case)?;
        let ns = rel.ns.name().to_string();
        let can = |args: &[&str]| nmi_can(&rel, args);
        let own = can(&["get", "secrets/sp-secret", "-n", &ns])?;
        let other = can(&["get", "secrets/other", "-n", &ns])?;
        let elsewhere = can(&["get", "secrets/sp-secret", "-n", "default"])?;
        let list = can(&["list", "secrets", "-n", &ns])?;
        let want = match case {
            "auto" => (true, false, false, false),
            "all" => (true, true, true, false),
            _ => (false, false, false, false),
        };
        assert_eq!((own, other, elsewhere, list), want, "{case}");
        // And the rest of NMI's rights hold in every case.
        let crd = |plural: &str| format!("{plural}.aadpodidentity.k8s.io");
        let assigned = crd("azureassignedidentities");
        assert!(can(&["watch", &assigned, "-A"])?);
        assert!(!can(&["create", &assigned, "-A"])?);
        for resource in [crd("azureidentities"), crd("azureidentitybindings")] {
            assert!(can(&["watch", &resource, "-A"])?, "{resource}");
            assert!(!can(&["create", &resource, "-A"])?, "{resource}");
        }
        assert!(can(&["create", "events", "-n", &ns])?);
        assert!(!can(&["create", &crd("azurepodidentityexceptions"), "-A"])?);
        rel.delete_cluster_scoped();
    }
    Ok(())
}

/// nmi.startupTaint with exactly the chart's RBAC and its admission policy:
/// NMI, running as the chart's ServiceAccount with the pod-bound token a
/// kubelet mounts for its DaemonSet pod, removes the startup taint from its
/// own Node once it is Active (redirect in place), keeping the other taints.
/// With a token that names no node (not pod-bound) the policy refuses the
/// same patch and the taint stays. Without the `patch` verb it stays too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nmi_removes_its_startup_taint_with_the_chart_rbac_and_policy() -> anyhow::Result<()> {
    const KEY: &str = "aadpodidentity.k8s.io/nmi-not-ready";
    let cluster = Cluster::shared();
    let mut f = node().await?;
    let node_name = f.node_name.clone();
    let rel = Release::render(
        "rbac-taint",
        &[
            ("nmi.startupTaint.enabled", "true"),
            ("nmi.startupTaint.key", KEY),
        ],
    )
    .await?;
    let args = helm::container_args(&rel.get("DaemonSet", &rel.nmi())?);
    assert!(
        args.contains(&format!("--node-startup-taint={KEY}")),
        "{args:?}"
    );
    let policy = format!("{}-nmi-startup-taint", rel.name);
    let _cleanup = [
        DeleteOnDrop {
            cluster,
            args: vec!["validatingadmissionpolicybinding".into(), policy.clone()],
        },
        DeleteOnDrop {
            cluster,
            args: vec!["validatingadmissionpolicy".into(), policy.clone()],
        },
        DeleteOnDrop {
            cluster,
            args: vec!["node".into(), node_name.clone()],
        },
    ];
    let objs = list(vec![
        rel.get("ValidatingAdmissionPolicy", &policy)?,
        rel.get("ValidatingAdmissionPolicyBinding", &policy)?,
        // The DaemonSet object (no controller runs): its pod is created below.
        rel.get("DaemonSet", &rel.nmi())?,
    ]);
    submit(cluster, &APPLY_SERVER_SIDE, &objs)?;
    // The Node (the node step's, without taints) given the taint as the
    // node pool creates it.
    let taints = json!([
        {"key": "other.example/keep", "value": "x", "effect": "NoSchedule"},
        {"key": KEY, "value": "true", "effect": "NoSchedule"},
    ]);
    let patch = json!({"spec": {"taints": taints}}).to_string();
    let out = cluster.kubectl_run(
        &["patch", "node", &node_name, "--type=merge", "-p", &patch],
        None,
    )?;
    assert!(out.success, "{}", out.stderr);
    let keys = || -> anyhow::Result<Vec<String>> {
        let out = cluster.kubectl_run(
            &[
                "get",
                "node",
                &node_name,
                "-o",
                "jsonpath={.spec.taints[*].key}",
            ],
            None,
        )?;
        // (Less node.kubernetes.io/not-ready, which the apiserver adds to a
        // new Node and no kubelet clears here.)
        Ok(out
            .stdout
            .split_whitespace()
            .filter(|k| !k.starts_with("node.kubernetes.io/"))
            .map(str::to_string)
            .collect())
    };

    // Without `patch` on nodes: NMI becomes Active, the taint stays.
    rel.apply_rbac("nmi", without_verb("nodes", "patch"))?;
    let pod = format!("{}-x7k2p", rel.nmi());
    create_ds_pod(&rel, &node_name, &pod)?;
    // Unbound first (names no node): the policy refuses.
    let unbound = nmi_kubeconfig(&f, &rel).await?;
    let out = kubectl_in(
        cluster,
        rel.ns.name(),
        &[
            "create",
            "token",
            &rel.nmi(),
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            &pod,
            "--duration",
            "1h",
        ],
    )?;
    assert!(out.success, "{}", out.stderr);
    let text = std::fs::read_to_string(&unbound)?;
    let (head, rest) = text.split_once("token: ").context("a token")?;
    let (_, tail) = rest.split_once('\n').context("a line after the token")?;
    let bound = f.dir().join("nmi-bound.kubeconfig");
    std::fs::write(
        &bound,
        format!("{head}token: {}\n{tail}", out.stdout.trim()),
    )?;

    f.launch(&chart_launch(&f, &rel, &pod, &bound)?)?;
    f.wait_active().await?;
    let l = taint_refused(&f, "refused without patch").await?;
    assert!(l.contains("forbidden"), "{l}");
    f.terminate_nmi().await?;
    assert_eq!(keys()?, ["other.example/keep", KEY]);

    // The chart's rules; a token that names no node: the policy refuses.
    rel.apply_rbac("nmi", |_| Ok(()))?;
    f.launch(&chart_launch(&f, &rel, &pod, &unbound)?)?;
    f.wait_active().await?;
    let l = taint_refused(&f, "refused by the policy").await?;
    assert!(l.contains(&policy) && l.contains("names no node"), "{l}");
    f.terminate_nmi().await?;
    assert_eq!(keys()?, ["other.example/keep", KEY]);

    // The pod-bound token, as in a real pod: removed, the other taint kept,
    // with the redirect in place.
    f.launch(&chart_launch(&f, &rel, &pod, &bound)?)?;
    let r = wait_for("startup taint removed", WAIT, || {
        // (A failed read is no answer yet: the wait goes on.)
        let k = keys().ok();
        async move { k.filter(|k| !k.iter().any(|k| k == KEY)) }
    })
    .await;
    let k = with_start_log(r, &f)?;
    assert!(chain(&f).is_some(), "taint removed before the redirect");
    assert_eq!(k, ["other.example/keep"]);
    assert!(
        f.start_log().contains("startup taint removed"),
        "{}",
        f.start_log()
    );
    f.terminate_nmi().await?;
    rel.delete_cluster_scoped();
    Ok(())
}

/// Waits until NMI's current start logs that removing the startup taint
/// failed; what it logged.
async fn taint_refused(f: &NmiNode, what: &'static str) -> anyhow::Result<String> {
    let r = wait_for(what, WAIT, || async {
        let l = f.start_log();
        l.contains("removing the startup taint failed").then_some(l)
    })
    .await;
    with_start_log(r, f)
}
