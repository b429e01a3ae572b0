//! The chart's narrowing of NMI's right to request ServiceAccount tokens
//! (federated identities), on the real apiserver: the rendered ClusterRole
//! (create on serviceaccounts/token) and the ValidatingAdmissionPolicies
//! `-nmi-token-request` and `-nmi-token-request-node` are applied, and NMI's
//! ServiceAccount, with the pod-bound token a kubelet mounts for NMI's pod
//! (its user extra names the node), asks for tokens of an application's
//! ServiceAccount:
//! - for the audience api://AzureADTokenExchange, bound to a Pod on NMI's
//!   node, for at most an hour: admitted (and the token says so);
//! - another audience, a second audience, no bound object, a Secret-bound
//!   token, a longer life, a pod on another node or not scheduled, or a
//!   token of NMI's that names no node: refused, with the policy's message;
//! - another ServiceAccount with the same RBAC is not limited.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers outside #[test] functions fail the test by panicking"
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use aadpodid_api::FEDERATED_TOKEN_AUDIENCE;
use aadpodid_tests::helm::{self, Render};
use aadpodid_tests::{Cluster, KubectlOutput, run_kubectl, unique_name, wait_for};
use base64::Engine as _;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::PostParams;
use serde_json::{Value, json};

/// Bound on the apiserver's policy, binding and Pod (parameter) informers
/// catching up.
const SETTLE: Duration = Duration::from_secs(30);

/// What the test made, deleted on drop: namespaces, then cluster-scoped objects.
struct Made {
    cluster: &'static Cluster,
    namespaces: Vec<String>,
    cluster_scoped: Vec<(String, String)>,
}

impl Drop for Made {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = self.cluster.kubectl_run(
                &[
                    "delete",
                    "namespace",
                    ns,
                    "--wait=false",
                    "--ignore-not-found",
                ],
                None,
            );
        }
        for (kind, name) in &self.cluster_scoped {
            let _ = self
                .cluster
                .kubectl_run(&["delete", kind, name, "--ignore-not-found"], None);
        }
    }
}

/// Creates `objects` as the administrator.
fn create(cluster: &Cluster, objects: Vec<Value>) {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
    let apply = ["apply", "--server-side", "-f", "-"];
    let out = run_kubectl(cluster.kubectl(), &apply, Some(&list.to_string())).unwrap();
    assert!(out.success, "apply: {}\n{list}", out.stderr);
}

fn pod(ns: &str, name: &str, service_account: &str, node: Option<&str>) -> Value {
    let mut spec = json!({"serviceAccountName": service_account,
        "containers": [{"name": "app", "image": "example.invalid/app"}]});
    if let Some(n) = node {
        spec["nodeName"] = json!(n);
    }
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

/// `kubectl create token` of ServiceAccount `ns/sa` with `audiences`, bound
/// to `bound` (kind, name) if any, for `duration` if given.
fn token_args(
    ns: &str,
    sa: &str,
    audiences: &[&str],
    bound: Option<(&str, &str)>,
    duration: Option<&str>,
) -> Vec<String> {
    let mut args: Vec<String> = ["create", "token", sa, "-n", ns].map(String::from).to_vec();
    for a in audiences {
        args.extend(["--audience".into(), a.to_string()]);
    }
    if let Some((kind, name)) = bound {
        args.extend([
            "--bound-object-kind".into(),
            kind.into(),
            "--bound-object-name".into(),
            name.into(),
        ]);
    }
    if let Some(d) = duration {
        args.extend(["--duration".into(), d.into()]);
    }
    args
}

fn kubectl_as(cluster: &Cluster, kubeconfig: &Path, args: &[String]) -> KubectlOutput {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_kubectl(cluster.kubectl_with(kubeconfig), &args, None).unwrap()
}

/// A copy of `kubeconfig` (a ServiceAccount's) that authenticates with `token`.
fn with_token(kubeconfig: &Path, token: &str) -> PathBuf {
    let text = std::fs::read_to_string(kubeconfig).unwrap();
    let swapped: Vec<String> = text
        .lines()
        .map(|l| match l.split_once("token: ") {
            Some((indent, _)) if indent.trim().is_empty() => format!("{indent}token: {token}"),
            _ => l.to_string(),
        })
        .collect();
    assert_ne!(swapped.join("\n"), text.trim_end(), "no token line");
    let path = kubeconfig.with_extension("pod-bound.kubeconfig");
    std::fs::write(&path, swapped.join("\n") + "\n").unwrap();
    path
}

/// The claims of a JWT.
fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nmi_may_request_only_exchange_tokens_for_pods_on_its_node() {
    let cluster = Cluster::shared();
    let name = unique_name("fed-pol");
    // Namespaces of the release and of the application, nodes, NMI's
    // objects and the two policies, all named after the test's release.
    let [rel, app, own, other, nmi, shape, node_policy] = [
        "rel",
        "app",
        "own",
        "other",
        "nmi",
        "nmi-token-request",
        "nmi-token-request-node",
    ]
    .map(|suffix| format!("{name}-{suffix}"));
    let mut made = Made {
        cluster,
        namespaces: vec![],
        cluster_scoped: vec![],
    };
    for ns in [&rel, &app] {
        create(
            cluster,
            vec![json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})],
        );
        made.namespaces.push(ns.clone());
    }

    let docs = helm::template(
        &Render::new(&name, &rel)
            .set("fullnameOverride", &name)
            .set("federatedTokens.enabled", "true"),
    )
    .unwrap();
    // NMI's RBAC and ServiceAccount, the two policies and their bindings.
    let kinds = [
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "ClusterRole",
        "ClusterRoleBinding",
        "ServiceAccount",
    ];
    let names = [&shape, &node_policy, &nmi];
    let items: Vec<Value> = helm::objects(&docs)
        .into_iter()
        .filter(|o| {
            kinds.iter().any(|k| o["kind"] == *k)
                && names.iter().any(|n| o["metadata"]["name"] == n.as_str())
        })
        .collect();
    for o in &items {
        let kind = o["kind"].as_str().unwrap().to_lowercase();
        if kind == "clusterrole" {
            let rule = json!({"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]});
            assert!(o["rules"].as_array().unwrap().contains(&rule), "{o}");
        }
        if kind != "serviceaccount" {
            let name = o["metadata"]["name"].as_str().unwrap().to_string();
            made.cluster_scoped.push((kind, name));
        }
    }
    assert_eq!(items.len(), 7, "{items:?}");
    create(cluster, items);

    // Two nodes; NMI's pod on `own`; the application's ServiceAccount `app`
    // with pods on both nodes and one not scheduled, and a Secret.
    for n in [&own, &other] {
        create(
            cluster,
            vec![json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}})],
        );
        made.cluster_scoped.push(("node".into(), n.clone()));
    }
    create(
        cluster,
        vec![
            pod(&rel, "nmi-x7k2p", &nmi, Some(&own)),
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": "app", "namespace": app}}),
            pod(&app, "web", "app", Some(&own)),
            pod(&app, "far", "app", Some(&other)),
            pod(&app, "pending", "app", None),
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "s", "namespace": app}}),
        ],
    );

    // NMI's credentials: a plain token (names no node) and the pod-bound
    // token the kubelet would mount for its pod.
    let unbound = cluster
        .service_account_kubeconfig(&rel, &nmi)
        .await
        .unwrap();
    let nmi_token = token_args(&rel, &nmi, &[], Some(("Pod", "nmi-x7k2p")), None);
    let out = run_kubectl(
        cluster.kubectl(),
        &nmi_token.iter().map(String::as_str).collect::<Vec<_>>(),
        None,
    )
    .unwrap();
    assert!(out.success, "{}", out.stderr);
    let bound = with_token(&unbound, out.stdout.trim());
    let as_nmi = |args: &[String]| kubectl_as(cluster, &bound, args);

    let exchange = |pod: &str| {
        token_args(
            &app,
            "app",
            &[FEDERATED_TOKEN_AUDIENCE],
            Some(("Pod", pod)),
            Some("1h"),
        )
    };
    // The policies, their bindings and the Pod parameters reach the
    // apiserver's informers within SETTLE: wait until each policy refuses a
    // request of its own, then until the right one is admitted (the node
    // policy refuses it while it has no parameters yet).
    let wrong_audience = token_args(
        &app,
        "app",
        &["https://kubernetes.default.svc"],
        Some(("Pod", "web")),
        None,
    );
    for (policy, args) in [(&shape, wrong_audience), (&node_policy, exchange("far"))] {
        wait_for(&format!("{policy} acting"), SETTLE, || {
            let out = as_nmi(&args);
            let acted = out.stderr.contains(&format!("'{policy}'"));
            async move { acted.then_some(()) }
        })
        .await
        .unwrap();
    }
    let token = wait_for("NMI's exchange token admitted", SETTLE, || {
        let out = as_nmi(&exchange("web"));
        async move { out.success.then_some(out.stdout.trim().to_string()) }
    })
    .await
    .unwrap();
    // NMI's own request (what it posts for a pod: nmi::federated's
    // TokenRequest, bound to the pod's name and UID) through its own
    // client: admitted for the pod on its node, refused for the other.
    let nmi_client = {
        let kubeconfig = kube::config::Kubeconfig::read_from(&bound).unwrap();
        let options = kube::config::KubeConfigOptions::default();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .unwrap();
        kube::Client::try_from(config).unwrap()
    };
    let accounts: kube::Api<ServiceAccount> = kube::Api::namespaced(nmi_client, &app);
    for (pod, admitted) in [("web", true), ("far", false)] {
        let get = [
            "get",
            "pod",
            pod,
            "-n",
            &app,
            "-o",
            "jsonpath={.metadata.uid}",
        ];
        let uid = cluster.kubectl_run(&get, None).unwrap().stdout;
        let plan = nmi::federated::Plan {
            identity: format!("{app}/id"),
            namespace: app.clone(),
            service_account: "app".into(),
            pod_name: pod.into(),
            pod_uid: uid.trim().to_string(),
            client_id: "c0000000-0000-4000-8000-000000000001".into(),
            tenant: "t".into(),
            ad_endpoint: "https://login.microsoftonline.com/".into(),
        };
        let request = nmi::federated::token_request(&plan);
        let answer = accounts
            .create_token_request("app", &PostParams::default(), &request)
            .await;
        match answer {
            Ok(_) => assert!(admitted, "{pod}: admitted"),
            Err(e) => {
                assert!(!admitted, "{pod}: {e}");
                assert!(e.to_string().contains(&format!("'{node_policy}'")), "{e}");
            }
        }
    }
    let c = claims(&token);
    assert_eq!(c["aud"], json!([FEDERATED_TOKEN_AUDIENCE]), "{c}");
    assert_eq!(c["sub"], format!("system:serviceaccount:{app}:app"), "{c}");
    assert_eq!(c["kubernetes.io"]["pod"]["name"], "web", "{c}");
    assert_eq!(c["kubernetes.io"]["node"]["name"], own.as_str(), "{c}");
    let life = c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap();
    assert!((600..=3600).contains(&life), "{c}");
    // The default expiry (the apiserver's hour) and a shorter one pass too.
    for d in [None, Some("10m")] {
        let args = token_args(
            &app,
            "app",
            &[FEDERATED_TOKEN_AUDIENCE],
            Some(("Pod", "web")),
            d,
        );
        let out = as_nmi(&args);
        assert!(out.success, "{d:?}: {}", out.stderr);
    }
    // Both policies type-check against TokenRequest (and Pod) cleanly.
    let get = [
        "get",
        "validatingadmissionpolicy",
        &shape,
        &node_policy,
        "-o",
        "json",
    ];
    let out = cluster.kubectl_run(&get, None).unwrap();
    let list: Value = serde_json::from_str(&out.stdout).unwrap();
    let statuses: Vec<&Value> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["status"])
        .collect();
    assert_eq!(statuses.len(), 2, "{list}");
    for status in statuses {
        let warnings = &status["typeChecking"]["expressionWarnings"];
        assert!(warnings.is_null(), "type-check warnings: {status}");
    }

    // Refused, each by the policy that says why.
    let refused = |args: Vec<String>, policy: &str, says: &str, why: &str| {
        let out = as_nmi(&args);
        assert!(!out.success, "{why}: admitted: {args:?}");
        assert!(
            out.stderr.contains(&format!("'{policy}'")) && out.stderr.contains(says),
            "{why}: {}",
            out.stderr
        );
    };
    let only = format!("only for the audience {FEDERATED_TOKEN_AUDIENCE}");
    let web = Some(("Pod", "web"));
    refused(
        token_args(&app, "app", &["https://kubernetes.default.svc"], web, None),
        &shape,
        &only,
        "another audience",
    );
    refused(
        token_args(
            &app,
            "app",
            &[FEDERATED_TOKEN_AUDIENCE, "https://vault.example"],
            web,
            None,
        ),
        &shape,
        &only,
        "a second audience",
    );
    refused(
        token_args(&app, "app", &[FEDERATED_TOKEN_AUDIENCE], None, None),
        &shape,
        "not unbound ones",
        "no bound object",
    );
    refused(
        token_args(
            &app,
            "app",
            &[FEDERATED_TOKEN_AUDIENCE],
            Some(("Secret", "s")),
            None,
        ),
        &shape,
        "not bound to a Secret",
        "a Secret-bound token",
    );
    refused(
        token_args(&app, "app", &[FEDERATED_TOKEN_AUDIENCE], web, Some("3601s")),
        &shape,
        "at most 3600 seconds, not 3601",
        "a longer life",
    );
    refused(
        exchange("far"),
        &node_policy,
        &format!(
            "on node {own} may request tokens only for pods on that node, not for Pod {app}/far on node {other}"
        ),
        "a pod on another node",
    );
    refused(
        exchange("pending"),
        &node_policy,
        "which is not scheduled",
        "a pod not scheduled",
    );
    let out = kubectl_as(cluster, &unbound, &exchange("web"));
    assert!(!out.success, "a token naming no node: admitted");
    assert!(
        out.stderr.contains(&format!("'{node_policy}'"))
            && out.stderr.contains("a token that names its node"),
        "{}",
        out.stderr
    );

    // A namespace with no Pods gives the node policy no parameters: the
    // administrator's TokenRequest there is admitted (not refused for want
    // of a Pod), and NMI's fails only because its bound pod does not exist.
    let lone = format!("{name}-lone");
    create(
        cluster,
        vec![
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": lone}}),
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": "app", "namespace": lone}}),
        ],
    );
    made.namespaces.push(lone.clone());
    let admin = token_args(&lone, "app", &["https://vault.example"], None, None);
    let out = run_kubectl(
        cluster.kubectl(),
        &admin.iter().map(String::as_str).collect::<Vec<_>>(),
        None,
    )
    .unwrap();
    assert!(
        out.success,
        "the administrator in a namespace with no Pods: {}",
        out.stderr
    );
    let ghost = token_args(
        &lone,
        "app",
        &[FEDERATED_TOKEN_AUDIENCE],
        Some(("Pod", "ghost")),
        None,
    );
    let out = as_nmi(&ghost);
    assert!(
        !out.success,
        "a token bound to a pod that does not exist: admitted"
    );
    assert!(
        !out.stderr.contains(&format!("'{node_policy}'")) && out.stderr.contains("not found"),
        "{}",
        out.stderr
    );

    // Another ServiceAccount given the same ClusterRole: not limited.
    let tool = format!("{name}-tool");
    create(
        cluster,
        vec![
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": tool},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": nmi},
            "subjects": [{"kind": "ServiceAccount", "name": "tool", "namespace": rel}]}),
        ],
    );
    made.cluster_scoped
        .push(("clusterrolebinding".into(), tool.clone()));
    let tool_config = cluster
        .service_account_kubeconfig(&rel, "tool")
        .await
        .unwrap();
    let any = token_args(&app, "app", &["https://vault.example"], None, Some("2h"));
    let out = wait_for("the tool's RBAC", SETTLE, || {
        let out = kubectl_as(cluster, &tool_config, &any);
        async move { out.success.then_some(out) }
    })
    .await
    .unwrap();
    assert_eq!(
        claims(out.stdout.trim())["aud"],
        json!(["https://vault.example"])
    );
    drop(made);
}

/// The policies come with the right: none without it, and the node policy
/// only with `federatedTokens.nodePolicy`; `defaultTokenSource: federated`
/// turns them on, and an unknown source is refused by the values schema.
#[test]
fn the_right_and_its_policies_render_together() {
    let names = |render: Render| -> Vec<String> {
        let docs = helm::template(&render).unwrap();
        helm::objects(&docs)
            .iter()
            .filter(|o| {
                (o["kind"] == "ValidatingAdmissionPolicy"
                    && o["metadata"]["name"]
                        .as_str()
                        .unwrap()
                        .contains("token-request"))
                    || (o["kind"] == "ClusterRole"
                        && o["rules"].as_array().is_some_and(|r| {
                            r.iter()
                                .any(|r| r["resources"] == json!(["serviceaccounts/token"]))
                        }))
            })
            .map(|o| {
                [&o["kind"], &o["metadata"]["name"]]
                    .map(|v| v.as_str().unwrap())
                    .join(" ")
            })
            .collect()
    };
    let r = || Render::new("r", "kube-system").set("fullnameOverride", "r");
    assert_eq!(names(r()), Vec::<String>::new());
    let all = [
        "ClusterRole r-nmi",
        "ValidatingAdmissionPolicy r-nmi-token-request",
        "ValidatingAdmissionPolicy r-nmi-token-request-node",
    ];
    assert_eq!(names(r().set("federatedTokens.enabled", "true")), all);
    assert_eq!(names(r().set("defaultTokenSource", "federated")), all);
    assert_eq!(
        names(
            r().set("defaultTokenSource", "federated")
                .set("federatedTokens.nodePolicy", "false")
        ),
        all[..2]
    );
    let e = helm::template(&r().set("defaultTokenSource", "workload-identity")).unwrap_err();
    assert!(format!("{e:#}").contains("defaultTokenSource"), "{e:#}");
}
