//! The Helm chart (`charts/aad-pod-identity`) with a real `helm`: lint and
//! template with upstream-style values files, clear failures for invalid
//! values, the rendered args against the binaries' real parsers, the flat
//! manifests in `deploy/infra` kept equal to the render, the Dockerfiles'
//! paths, and the render applied to the real test apiserver.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers outside #[test] functions fail the test by panicking"
)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use aadpodid_tests::helm::{self, Render};
use aadpodid_tests::{Cluster, repo_root, unique_name};
use serde_json::{Value, json};

fn ci_values() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(helm::chart_dir().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    files
}

/// The default render and one with each values file in the chart's `ci/`.
fn default_and_ci_renders() -> Vec<Render> {
    let mut renders = vec![Render::new("aad-pod-identity", "kube-system")];
    for f in ci_values() {
        renders.push(Render::new("aad-pod-identity", "kube-system").values(f));
    }
    renders
}

fn ci(name: &str) -> PathBuf {
    helm::chart_dir().join("ci").join(name)
}

fn render(r: Render) -> Vec<Value> {
    helm::template(&r).unwrap()
}

fn get(docs: &[Value], kind: &str, name: &str) -> Value {
    helm::find(docs, kind, name).unwrap_or_else(|| panic!("no {kind} {name} in the render"))
}

fn kinds(docs: &[Value]) -> Vec<String> {
    helm::objects(docs)
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

fn env_of(workload: &Value) -> Vec<Value> {
    workload["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn env_value(workload: &Value, name: &str) -> Option<Value> {
    env_of(workload).into_iter().find(|e| e["name"] == name)
}

/// Every rule of every ClusterRole and Role in the render.
fn rules(docs: &[Value]) -> Vec<(String, Value)> {
    helm::objects(docs)
        .into_iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
        .flat_map(|o| {
            let name = o["metadata"]["name"].as_str().unwrap().to_string();
            o["rules"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |r| (name.clone(), r))
        })
        .collect()
}

/// The rules (as `role: rule`) for which `keep` holds.
fn rules_where(docs: &[Value], keep: impl Fn(&Value) -> bool) -> Vec<String> {
    rules(docs)
        .into_iter()
        .filter(|(_, r)| keep(r))
        .map(|(n, r)| format!("{n}: {r}"))
        .collect()
}

/// Whether a rule's list `field` (resources, verbs) has an entry for which
/// `pred` holds.
fn lists_any(rule: &Value, field: &str, pred: impl Fn(&Value) -> bool) -> bool {
    rule[field].as_array().unwrap().iter().any(pred)
}

fn grants(docs: &[Value], resource: &str) -> Vec<String> {
    rules_where(docs, |r| lists_any(r, "resources", |x| x == resource))
}

#[test]
fn lint_and_template_pass_with_default_and_every_ci_values_file() {
    for r in default_and_ci_renders() {
        if let Err(out) = helm::lint(&r).unwrap() {
            panic!("helm lint {:?}: {out}", r.values);
        }
        let docs = helm::template(&r).unwrap();
        for o in helm::objects(&docs) {
            assert!(
                o["apiVersion"].is_string() && o["metadata"]["name"].is_string(),
                "{o}"
            );
        }
    }
}

#[test]
fn default_render_is_upstreams_shape_with_least_privilege() {
    let docs = render(Render::new("aad-pod-identity", "kube-system"));
    let names = kinds(&docs);
    for want in [
        "ServiceAccount/aad-pod-identity-mic",
        "ServiceAccount/aad-pod-identity-nmi",
        "ClusterRole/aad-pod-identity-mic",
        "ClusterRole/aad-pod-identity-nmi",
        "ClusterRoleBinding/aad-pod-identity-mic",
        "ClusterRoleBinding/aad-pod-identity-nmi",
        "Deployment/aad-pod-identity-mic",
        "DaemonSet/aad-pod-identity-nmi",
        "AzurePodIdentityException/aks-addon-exception",
        "ValidatingAdmissionPolicy/aad-pod-identity-identity-grants",
        "ValidatingAdmissionPolicy/aad-pod-identity-assigned-identity-writers",
        "ValidatingAdmissionPolicy/aad-pod-identity-exception-writers",
    ] {
        assert!(
            names.contains(&want.to_string()),
            "{want} missing from {names:?}"
        );
    }
    // No label-based exception for MIC: NMI knows MIC by its ServiceAccount.
    assert!(
        !names.contains(&"AzurePodIdentityException/mic".to_string()),
        "{names:?}"
    );
    // Opt-in objects stay out by default, as upstream.
    assert!(!names.iter().any(|n| n.starts_with("PodDisruptionBudget/")));
    assert!(
        !names
            .iter()
            .any(|n| n.ends_with("-view") || n.ends_with("-edit"))
    );

    let mic = get(&docs, "Deployment", "aad-pod-identity-mic");
    assert_eq!(mic["spec"]["replicas"], 2);
    let pod = &mic["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "aad-pod-identity-mic");
    let anti =
        &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(
        anti["podAffinityTerm"]["topologyKey"],
        "kubernetes.io/hostname"
    );
    assert_eq!(
        anti["podAffinityTerm"]["labelSelector"]["matchLabels"],
        mic["spec"]["selector"]["matchLabels"],
        "the anti-affinity term selects MIC's own pods"
    );
    let c = &pod["containers"][0];
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": 8080})
    );
    assert_eq!(
        env_value(&mic, "MIC_POD_NAMESPACE").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(pod["nodeSelector"], json!({"kubernetes.io/os": "linux"}));

    let nmi = get(&docs, "DaemonSet", "aad-pod-identity-nmi");
    let pod = &nmi["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(
        sc["capabilities"],
        json!({"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]})
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": 8085})
    );
    for (var, field) in [
        ("NODE_NAME", "spec.nodeName"),
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        assert_eq!(
            env_value(&nmi, var).unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
            field,
            "{var}"
        );
    }
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert_eq!(
        mounts,
        [
            "/run/xtables.lock",
            "/etc/default/kubelet",
            "/etc/kubernetes/azure.json"
        ]
    );
    // azure.json (the kubelet identity NMI refuses to serve): read-only, the
    // same hostPath as MIC's.
    let azure_mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/etc/kubernetes/azure.json")
        .unwrap();
    assert_eq!(azure_mount["readOnly"], true);
    let azure_volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == azure_mount["name"])
        .unwrap();
    let mic_pod = &get(&docs, "Deployment", "aad-pod-identity-mic")["spec"]["template"]["spec"];
    assert!(
        mic_pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["hostPath"] == azure_volume["hostPath"]),
        "{azure_volume}"
    );
    assert_eq!(
        azure_volume["hostPath"],
        json!({"path": "/etc/kubernetes/azure.json", "type": "File"})
    );

    // Least privilege: no Secrets without service-principal identities, no
    // wildcards; ConfigMaps only in the release namespace and, but for create,
    // only MIC's own by name; Endpoints only for upstream's leader lock, in the
    // lock's namespace: create, and get/update of that one object.
    for resource in ["secrets", "customresourcedefinitions"] {
        assert_eq!(grants(&docs, resource), Vec::<String>::new(), "{resource}");
    }
    let lock = get(&docs, "Role", "aad-pod-identity-mic");
    assert_eq!(lock["metadata"]["namespace"], "default");
    assert_eq!(
        grants(&docs, "endpoints"),
        vec![
            r#"aad-pod-identity-mic: {"apiGroups":[""],"resources":["endpoints"],"verbs":["create"]}"#,
            r#"aad-pod-identity-mic: {"apiGroups":[""],"resourceNames":["aad-pod-identity-mic"],"resources":["endpoints"],"verbs":["get","update"]}"#,
        ]
    );
    let cm = grants(&docs, "configmaps");
    assert!(
        cm.len() == 2
            && cm
                .iter()
                .all(|r| r.starts_with("aad-pod-identity-mic-owned-identities: ")),
        "{cm:?}"
    );
    let owned = get(&docs, "Role", "aad-pod-identity-mic-owned-identities");
    assert_eq!(owned["metadata"]["namespace"], "kube-system");
    assert_eq!(
        owned["rules"],
        json!([
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["configmaps"],
             "resourceNames": ["aad-pod-identity-mic-owned"], "verbs": ["get", "update", "patch"]},
            // NMI's IdentityNotOnNode Events, read in the release namespace only.
            {"apiGroups": [""], "resources": ["events"], "verbs": ["list", "watch"]},
        ])
    );
    let owned_binding = get(
        &docs,
        "RoleBinding",
        "aad-pod-identity-mic-owned-identities",
    );
    assert_eq!(
        owned_binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "aad-pod-identity-mic", "namespace": "kube-system"}])
    );
    // MIC reads Events only in its own namespace (the Role above), never
    // cluster-wide: a namespace user's Event cannot make it call ARM.
    let mic_role = get(&docs, "ClusterRole", "aad-pod-identity-mic");
    for r in mic_role["rules"].as_array().unwrap() {
        if r["resources"]
            .as_array()
            .unwrap()
            .contains(&json!("events"))
        {
            assert_eq!(r["verbs"], json!(["create", "patch"]), "{r}");
        }
    }
    // NMI reads identities and bindings (it checks each AzureAssignedIdentity
    // against them) and writes Events, and writes nothing else.
    let nmi_role = get(&docs, "ClusterRole", "aad-pod-identity-nmi");
    let nmi_rules = nmi_role["rules"].as_array().unwrap();
    assert!(
        nmi_rules.contains(&json!({"apiGroups": ["aadpodidentity.k8s.io"],
            "resources": ["azureidentities", "azureidentitybindings"], "verbs": ["list", "watch"]})),
        "{nmi_role}"
    );
    assert!(
        nmi_rules.contains(&json!({"apiGroups": ["", "events.k8s.io"],
            "resources": ["events"], "verbs": ["create", "patch"]})),
        "{nmi_role}"
    );
    for r in nmi_rules {
        if r["resources"] != json!(["events"]) {
            for v in r["verbs"].as_array().unwrap() {
                assert!(
                    ["get", "list", "watch"].contains(&v.as_str().unwrap()),
                    "NMI writes only Events: {r}"
                );
            }
        }
    }
    for (name, r) in rules(&docs) {
        for field in ["verbs", "resources", "apiGroups"] {
            assert!(
                !r[field].as_array().unwrap().iter().any(|v| v == "*"),
                "{name}: {r}"
            );
        }
    }
    // The Lease only in its namespace; the DaemonSet only by name.
    let lease = get(&docs, "Role", "aad-pod-identity-mic");
    assert_eq!(lease["metadata"]["namespace"], "default");
    assert_eq!(lease["rules"][0]["resources"], json!(["leases"]));
    let ds = get(&docs, "Role", "aad-pod-identity-nmi");
    assert_eq!(ds["metadata"]["namespace"], "kube-system");
    assert_eq!(
        ds["rules"][0]["resourceNames"],
        json!(["aad-pod-identity-nmi"])
    );
}

#[test]
fn upstream_style_values_files_render_what_they_ask_for() {
    let ns = "kube-system";
    // Managed mode: no MIC at all, NMI namespaced, no AzureAssignedIdentity access.
    let docs = render(Render::new("aad-pod-identity", ns).values(ci("managed-mode-values.yaml")));
    let names = kinds(&docs);
    assert!(!names.iter().any(|n| n.contains("-mic")), "{names:?}");
    assert!(!names.contains(&"AzurePodIdentityException/mic".to_string()));
    assert!(names.contains(&"AzurePodIdentityException/aks-addon-exception".to_string()));
    let nmi = get(&docs, "DaemonSet", "aad-pod-identity-nmi");
    let args = helm::container_args(&nmi);
    assert!(
        args.contains(&"--operation-mode=managed".into())
            && args.contains(&"--forceNamespaced".into()),
        "{args:?}"
    );
    assert!(grants(&docs, "azureassignedidentities").is_empty());
    assert_eq!(grants(&docs, "azureidentities").len(), 1);

    // forceNamespaced reaches both components.
    let docs =
        render(Render::new("aad-pod-identity", ns).values(ci("force-namespaced-values.yaml")));
    for (kind, name) in [
        ("Deployment", "aad-pod-identity-mic"),
        ("DaemonSet", "aad-pod-identity-nmi"),
    ] {
        assert_eq!(
            env_value(&get(&docs, kind, name), "FORCENAMESPACED").unwrap()["value"],
            "true"
        );
    }

    // azureIdentities: identity + binding pairs, and a Role for exactly the
    // one Secret the service principal names.
    let docs =
        render(Render::new("aad-pod-identity", ns).values(ci("azure-identities-values.yaml")));
    let id = get(&docs, "AzureIdentity", "azure-identity");
    assert_eq!(id["spec"]["type"], 0);
    assert_eq!(id["metadata"]["namespace"], "default");
    let b = get(&docs, "AzureIdentityBinding", "azure-identity-binding");
    assert_eq!(
        b["spec"],
        json!({"azureIdentity": "azure-identity", "selector": "demo"})
    );
    let sp = get(&docs, "AzureIdentity", "sp-identity");
    assert_eq!(
        sp["spec"]["clientPassword"],
        json!({"name": "sp-secret", "namespace": "default"})
    );
    assert!(helm::find(&docs, "AzureIdentityBinding", "sp-identity-binding").is_some());
    let secret_rules = grants(&docs, "secrets");
    assert_eq!(secret_rules.len(), 1, "{secret_rules:?}");
    let role = get(&docs, "Role", "aad-pod-identity-nmi-secret-0");
    assert_eq!(role["metadata"]["namespace"], "default");
    assert_eq!(role["rules"][0]["resourceNames"], json!(["sp-secret"]));
    assert!(helm::find(&docs, "ClusterRole", "aad-pod-identity-view").is_some());
    assert!(helm::find(&docs, "ClusterRole", "aad-pod-identity-edit").is_some());

    // Custom cloud with the admin Secret: env instead of --cloudconfig, non-root.
    let docs = render(Render::new("aad-pod-identity", ns).values(ci("custom-cloud-values.yaml")));
    let mic = get(&docs, "Deployment", "aad-pod-identity-mic");
    let args = helm::container_args(&mic);
    assert!(
        !args.iter().any(|a| a.starts_with("--cloudconfig")),
        "{args:?}"
    );
    assert_eq!(
        env_value(&mic, "AZURE_ENVIRONMENT_FILEPATH").unwrap()["value"],
        "/etc/kubernetes/akscustom.json"
    );
    assert_eq!(
        env_value(&mic, "CLIENT_SECRET").unwrap()["valueFrom"]["secretKeyRef"],
        json!({"name": "aad-pod-identity-mic", "key": "ClientSecret"})
    );
    let c = &mic["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["securityContext"]["runAsNonRoot"], true);
    assert!(mic["spec"]["template"]["metadata"]["annotations"]["checksum/config"].is_string());
    let secret = get(&docs, "Secret", "aad-pod-identity-mic");
    assert_eq!(secret["data"]["Cloud"], "QXp1cmVTdGFja0Nsb3Vk"); // AzureStackCloud
    let pdb = get(&docs, "PodDisruptionBudget", "mic-pdb");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        get(&docs, "Role", "aad-pod-identity-mic")["metadata"]["namespace"],
        "kube-system"
    );

    // RBAC off: no accounts or roles, and the pods name none.
    let docs = render(Render::new("aad-pod-identity", ns).values(ci("rbac-disabled-values.yaml")));
    let names = kinds(&docs);
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("ServiceAccount/") || n.contains("Role")),
        "{names:?}"
    );
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("AzurePodIdentityException/"))
    );
    for (kind, name) in [
        ("Deployment", "aad-pod-identity-mic"),
        ("DaemonSet", "aad-pod-identity-nmi"),
    ] {
        assert!(get(&docs, kind, name)["spec"]["template"]["spec"]["serviceAccountName"].is_null());
    }

    // allowAccessToSecrets: true is upstream's cluster-wide get.
    let docs = render(Render::new("aad-pod-identity", ns).values(ci("all-flags-values.yaml")));
    let secret_rules = grants(&docs, "secrets");
    assert!(
        secret_rules.len() == 1 && secret_rules[0].starts_with("aad-pod-identity-nmi: "),
        "{secret_rules:?}"
    );
    // Names follow nameOverride/fullnameOverride, never the release name.
    let docs = render(Render::new("my-release", ns).set("fullnameOverride", "pid"));
    assert!(helm::find(&docs, "DaemonSet", "pid-nmi").is_some());
    assert!(helm::find(&docs, "Deployment", "pid-mic").is_some());
}

/// MIC's args through its real parser.
fn parse_mic(args: &[String]) -> mic::args::Args {
    use clap::Parser as _;
    mic::args::Args::try_parse_from(std::iter::once("mic".to_string()).chain(args.iter().cloned()))
        .unwrap_or_else(|e| panic!("mic {args:?}: {e}"))
}

fn of_kind(docs: &[Value], kind: &str) -> Vec<Value> {
    helm::objects(docs)
        .into_iter()
        .filter(|o| o["kind"] == kind)
        .collect()
}

fn text_of(v: &Value) -> String {
    v.to_string()
}

/// identityPolicy.mode: `off` installs no admission policy; `warn` (the
/// default) and `enforce` install the three policies, bound cluster-wide,
/// the identity grant as a warning or a denial and the other two always as
/// denials. MIC gets the mode and, with a policy, may watch Namespaces.
#[test]
fn identity_policy_modes_render_what_they_say() {
    let ns = "kube-system";
    let default = render(Render::new("aad-pod-identity", ns));
    for mode in ["off", "warn", "enforce"] {
        let docs = render(Render::new("aad-pod-identity", ns).set("identityPolicy.mode", mode));
        if mode == "warn" {
            assert_eq!(docs, default, "warn is the default");
        }
        let args = helm::container_args(&get(&docs, "Deployment", "aad-pod-identity-mic"));
        assert!(
            args.contains(&format!("--identity-policy={mode}")),
            "{mode}: {args:?}"
        );
        assert!(
            !args
                .iter()
                .any(|a| a.starts_with("--serve-cluster-identities")),
            "{mode}: {args:?}"
        );
        assert_eq!(parse_mic(&args).identity_policy.as_str(), mode);
        let mic_role = get(&docs, "ClusterRole", "aad-pod-identity-mic");
        let watches_namespaces = mic_role["rules"].as_array().unwrap().contains(
            &json!({"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}),
        );
        assert_eq!(watches_namespaces, mode != "off", "{mode}: {mic_role}");
        let policies = of_kind(&docs, "ValidatingAdmissionPolicy");
        let bindings = of_kind(&docs, "ValidatingAdmissionPolicyBinding");
        if mode == "off" {
            assert!(policies.is_empty() && bindings.is_empty(), "{policies:?}");
            continue;
        }
        assert_eq!((policies.len(), bindings.len()), (3, 3), "{mode}");
        for p in &policies {
            let name = p["metadata"]["name"].as_str().unwrap();
            assert_eq!(p["apiVersion"], "admissionregistration.k8s.io/v1");
            assert_eq!(p["spec"]["failurePolicy"], "Fail", "{name}");
            let b = get(&docs, "ValidatingAdmissionPolicyBinding", name);
            assert_eq!(b["spec"]["policyName"], name);
            assert!(
                b["spec"]["matchResources"].is_null(),
                "{name} binds cluster-wide"
            );
        }
        // AzureIdentity: the grant, from the Namespace annotation.
        let grants = get(
            &docs,
            "ValidatingAdmissionPolicy",
            "aad-pod-identity-identity-grants",
        );
        assert_eq!(
            grants["spec"]["matchConstraints"]["resourceRules"],
            json!([{"apiGroups": ["aadpodidentity.k8s.io"], "apiVersions": ["*"],
                    "operations": ["CREATE", "UPDATE"], "resources": ["azureidentities"]}])
        );
        let t = text_of(&grants);
        assert!(
            t.contains(aadpodid_api::ANNOTATION_ALLOWED_IDENTITIES)
                && t.contains("namespaceObject"),
            "{t}"
        );
        assert_eq!(
            grants["spec"]["auditAnnotations"][0]["key"],
            "identity-not-granted"
        );
        let actions = &get(
            &docs,
            "ValidatingAdmissionPolicyBinding",
            "aad-pod-identity-identity-grants",
        )["spec"]["validationActions"];
        if mode == "warn" {
            assert_eq!(actions, &json!(["Warn", "Audit"]));
        } else {
            assert_eq!(actions, &json!(["Deny"]));
        }
        // AzureAssignedIdentity: MIC's ServiceAccount only, in both modes.
        let aai = get(
            &docs,
            "ValidatingAdmissionPolicy",
            "aad-pod-identity-assigned-identity-writers",
        );
        assert_eq!(
            aai["spec"]["validations"][0]["expression"],
            "request.userInfo.username == 'system:serviceaccount:kube-system:aad-pod-identity-mic'"
        );
        // AzurePodIdentityException: a cluster-wide authorizer check (no
        // namespace), for create, update and delete.
        let exc = get(
            &docs,
            "ValidatingAdmissionPolicy",
            "aad-pod-identity-exception-writers",
        );
        assert_eq!(
            exc["spec"]["matchConstraints"]["resourceRules"][0]["operations"],
            json!(["CREATE", "UPDATE", "DELETE"])
        );
        let e = exc["spec"]["validations"][0]["expression"]
            .as_str()
            .unwrap();
        assert!(
            e.contains("authorizer.group('aadpodidentity.k8s.io').resource('azurepodidentityexceptions').check(")
                && !e.contains(".namespace("),
            "{e}"
        );
        for which in ["assigned-identity-writers", "exception-writers"] {
            assert_eq!(
                get(
                    &docs,
                    "ValidatingAdmissionPolicyBinding",
                    &format!("aad-pod-identity-{which}")
                )["spec"]["validationActions"],
                json!(["Deny"]),
                "{mode} {which}"
            );
        }
    }

    // serveClusterIdentities reaches MIC.
    let docs =
        render(Render::new("aad-pod-identity", ns).set("mic.serveClusterIdentities", "true"));
    let args = helm::container_args(&get(&docs, "Deployment", "aad-pod-identity-mic"));
    assert!(
        args.contains(&"--serve-cluster-identities".to_string()),
        "{args:?}"
    );
    assert!(parse_mic(&args).serve_cluster_identities);
    // One knob for both: NMI serves them too.
    let args = helm::container_args(&get(&docs, "DaemonSet", "aad-pod-identity-nmi"));
    assert!(
        args.contains(&"--serve-cluster-identities".to_string()),
        "{args:?}"
    );
    let nmi_args = nmi::Args::try_from_args(args.clone()).unwrap();
    assert!(nmi_args.serve_cluster_identities, "{args:?}");

    // Names follow fullnameOverride; the MIC account follows the release
    // namespace, and is "default" without rbac.enabled (NMI told the same).
    let docs = render(
        Render::new("rel", "ops")
            .set("fullnameOverride", "pid")
            .set("rbac.enabled", "false"),
    );
    let aai = get(
        &docs,
        "ValidatingAdmissionPolicy",
        "pid-assigned-identity-writers",
    );
    assert!(
        aai["spec"]["validations"][0]["expression"]
            .as_str()
            .unwrap()
            .contains("'system:serviceaccount:ops:default'"),
        "{aai}"
    );
    let nmi = helm::container_args(&get(&docs, "DaemonSet", "pid-nmi"));
    assert!(
        nmi.contains(&"--mic-service-accounts=default".to_string()),
        "{nmi:?}"
    );
    let docs = render(Render::new("rel", "ops").set("fullnameOverride", "pid"));
    let nmi = helm::container_args(&get(&docs, "DaemonSet", "pid-nmi"));
    assert!(
        nmi.contains(&"--mic-service-accounts=pid-mic".to_string()),
        "{nmi:?}"
    );
    assert!(nmi.contains(&"--MICNamespace=ops".to_string()), "{nmi:?}");

    // Managed mode: the policies too (no MIC, so nobody writes AzureAssignedIdentities).
    let docs = render(Render::new("aad-pod-identity", ns).values(ci("managed-mode-values.yaml")));
    assert_eq!(of_kind(&docs, "ValidatingAdmissionPolicy").len(), 3);

    // A mode that is not one of the three.
    let r = Render::new("aad-pod-identity", ns).set("identityPolicy.mode", "audit");
    let e = helm::template_text(&r).unwrap().unwrap_err();
    assert!(e.contains("identityPolicy"), "{e}");
}

/// NMI's node-level options: by default nothing of them is rendered; with
/// `ci/nmi-hardening-values.yaml` the route_localnet init container (the only
/// privileged container, same image), the startup taint's toleration added
/// to a custom list, `get`/`patch` on nodes and the admission policy that
/// narrows them to NMI's user; default tolerations already cover the taint;
/// without RBAC the policy names the "default" ServiceAccount NMI then runs as.
#[test]
fn nmi_node_options_render_what_they_say() {
    let ns = "kube-system";
    let key = "aadpodidentity.k8s.io/nmi-not-ready";
    let node_rule = json!({"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]});
    // NMI's rules on nodes (MIC lists and watches them).
    let nmi_nodes = |docs: &[Value]| -> Vec<String> {
        grants(docs, "nodes")
            .into_iter()
            .filter(|g| !g.contains("-mic: "))
            .collect()
    };
    let docs = render(Render::new("aad-pod-identity", ns));
    let nmi = get(&docs, "DaemonSet", "aad-pod-identity-nmi");
    assert!(nmi["spec"]["template"]["spec"]["initContainers"].is_null());
    assert!(nmi_nodes(&docs).is_empty(), "{:?}", nmi_nodes(&docs));
    assert!(
        helm::find(
            &docs,
            "ValidatingAdmissionPolicy",
            "aad-pod-identity-nmi-startup-taint"
        )
        .is_none()
    );
    let args = helm::container_args(&nmi);
    for flag in [
        "--max-connections",
        "--max-connections-per-ip",
        "--max-pending-fetches-per-pod",
        "--max-cached-tokens",
        "--first-sync-wait-sec",
        "--allow-scheduled-events-post",
        "--proxy-allowed-paths",
        "--node-startup-taint",
    ] {
        assert!(
            !args.iter().any(|a| a.split('=').next() == Some(flag)),
            "{flag} rendered by default: {args:?}"
        );
    }
    // On by default (upstream's chart: off): pods' connections opened while
    // no redirect existed are cut.
    assert!(args.contains(&"--enable-conntrack-deletion=true".to_string()));

    let docs = render(Render::new("aad-pod-identity", ns).values(ci("nmi-hardening-values.yaml")));
    let nmi = get(&docs, "DaemonSet", "aad-pod-identity-nmi");
    let pod = &nmi["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let init = pod["initContainers"].as_array().unwrap();
    assert_eq!(init.len(), 1, "{init:?}");
    let i = &init[0];
    assert_eq!(i["name"], "route-localnet");
    assert_eq!(i["image"], c["image"], "the NMI image (it has /bin/sh)");
    assert_eq!(
        i["command"],
        json!([
            "/bin/sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/conf/all/route_localnet"
        ])
    );
    assert_eq!(i["securityContext"]["privileged"], true);
    assert!(i["resources"]["limits"]["memory"].is_string());
    assert_eq!(pod["hostNetwork"], true, "the sysctl is the node's");
    assert_eq!(
        c["securityContext"]["privileged"], false,
        "NMI itself stays unprivileged"
    );
    assert_eq!(
        pod["tolerations"],
        json!([{"key": "CriticalAddonsOnly", "operator": "Exists"},
               {"key": key, "operator": "Exists"}])
    );
    let args = helm::container_args(&nmi);
    assert!(
        args.contains(&format!("--node-startup-taint={key}")),
        "{args:?}"
    );
    let role = get(&docs, "ClusterRole", "aad-pod-identity-nmi");
    assert!(
        role["rules"].as_array().unwrap().contains(&node_rule),
        "{role}"
    );
    assert_eq!(nmi_nodes(&docs).len(), 1);
    // MIC gets nothing new.
    assert!(
        !get(&docs, "ClusterRole", "aad-pod-identity-mic")["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resources"] == json!(["nodes"]) && r["verbs"].to_string().contains("patch"))
    );
    let vap = get(
        &docs,
        "ValidatingAdmissionPolicy",
        "aad-pod-identity-nmi-startup-taint",
    );
    assert_eq!(vap["spec"]["failurePolicy"], "Fail");
    assert_eq!(
        vap["spec"]["matchConstraints"]["resourceRules"],
        json!([{"apiGroups": [""], "apiVersions": ["*"],
                "operations": ["CREATE", "UPDATE", "DELETE"], "resources": ["nodes"]}])
    );
    assert_eq!(
        vap["spec"]["matchConditions"][0]["expression"],
        "request.userInfo.username == 'system:serviceaccount:kube-system:aad-pod-identity-nmi'"
    );
    let t = text_of(&vap);
    assert!(
        t.contains(&format!("t.key != '{key}'"))
            && t.contains("authentication.kubernetes.io/node-name")
            && t.contains("unschedulable")
            && t.contains("ownerReferences"),
        "{t}"
    );
    let b = get(
        &docs,
        "ValidatingAdmissionPolicyBinding",
        "aad-pod-identity-nmi-startup-taint",
    );
    assert_eq!(b["spec"]["validationActions"], json!(["Deny"]));
    assert!(b["spec"]["matchResources"].is_null(), "bound cluster-wide");

    // Default tolerations (everything) already cover the taint; identity
    // policy off does not take the node policy away.
    let docs = render(
        Render::new("aad-pod-identity", ns)
            .set("nmi.startupTaint.enabled", "true")
            .set("identityPolicy.mode", "off"),
    );
    let nmi = get(&docs, "DaemonSet", "aad-pod-identity-nmi");
    assert_eq!(
        nmi["spec"]["template"]["spec"]["tolerations"],
        json!([{"operator": "Exists"}])
    );
    assert_eq!(of_kind(&docs, "ValidatingAdmissionPolicy").len(), 1);
    assert!(helm::container_args(&nmi).contains(
        &"--node-startup-taint=startup-taint.cluster-autoscaler.kubernetes.io/aad-pod-identity-nmi"
            .to_string()
    ));
    // No tolerations at all: just the taint's.
    let docs = render(
        Render::new("aad-pod-identity", ns)
            .set("nmi.startupTaint.enabled", "true")
            .set("nmi.tolerations", "null"),
    );
    assert_eq!(
        get(&docs, "DaemonSet", "aad-pod-identity-nmi")["spec"]["template"]["spec"]["tolerations"],
        json!([{"key": "startup-taint.cluster-autoscaler.kubernetes.io/aad-pod-identity-nmi",
                "operator": "Exists"}])
    );
    // Without RBAC, NMI runs as "default": the policy limits that account.
    let docs = render(
        Render::new("rel", "ops")
            .set("fullnameOverride", "pid")
            .set("rbac.enabled", "false")
            .set("nmi.startupTaint.enabled", "true"),
    );
    assert!(nmi_nodes(&docs).is_empty());
    assert_eq!(
        get(&docs, "ValidatingAdmissionPolicy", "pid-nmi-startup-taint")["spec"]["matchConditions"]
            [0]["expression"],
        "request.userInfo.username == 'system:serviceaccount:ops:default'"
    );
    // The other route_localnet fix: NMI on the node's IP, from the downward
    // API; nothing of it by default.
    let docs = render(Render::new("aad-pod-identity", ns).set("nmi.listenAddress", "$(HOST_IP)"));
    let nmi = get(&docs, "DaemonSet", "aad-pod-identity-nmi");
    assert_eq!(
        env_value(&nmi, "HOST_IP").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );
    let env: BTreeMap<&str, String> = [
        ("NODE_NAME", "aks-nodepool1-0".to_string()),
        ("HOST_IP", "10.240.0.4".to_string()),
    ]
    .into();
    let parsed = nmi::Args::try_from_args(expand(&helm::container_args(&nmi), &env)).unwrap();
    assert_eq!(parsed.nmi_listen_address.to_string(), "10.240.0.4");
    assert_eq!(parsed.dnat_target().to_string(), "10.240.0.4");
    let docs = render(Render::new("aad-pod-identity", ns));
    let nmi = get(&docs, "DaemonSet", "aad-pod-identity-nmi");
    assert!(env_value(&nmi, "HOST_IP").is_none());
    assert!(
        !helm::container_args(&nmi)
            .iter()
            .any(|a| a.starts_with("--nmi-listen-address"))
    );
    // Managed mode: the same rule.
    let docs = render(
        Render::new("aad-pod-identity", ns)
            .values(ci("managed-mode-values.yaml"))
            .set("nmi.startupTaint.enabled", "true"),
    );
    assert_eq!(nmi_nodes(&docs).len(), 1);
}

/// The user-facing -edit role grants identities and bindings, never
/// exceptions or AzureAssignedIdentities; installMICException renders only
/// the AKS add-on exception.
#[test]
fn namespace_editors_get_no_exceptions() {
    let docs = render(
        Render::new("aad-pod-identity", "kube-system")
            .set("rbac.createUserFacingClusterRoles", "true"),
    );
    let edit = get(&docs, "ClusterRole", "aad-pod-identity-edit");
    assert_eq!(
        edit["rules"],
        json!([{"apiGroups": ["aadpodidentity.k8s.io"],
                "resources": ["azureidentities", "azureidentitybindings"],
                "verbs": ["create", "delete", "deletecollection", "patch", "update"]}])
    );
    let writers = rules_where(&docs, |r| {
        lists_any(r, "resources", |x| x == "azurepodidentityexceptions")
            && lists_any(r, "verbs", |v| v != "get" && v != "list" && v != "watch")
    });
    assert!(writers.is_empty(), "{writers:?}");
    let exceptions: Vec<String> = kinds(&docs)
        .into_iter()
        .filter(|k| k.starts_with("AzurePodIdentityException/"))
        .collect();
    assert_eq!(
        exceptions,
        ["AzurePodIdentityException/aks-addon-exception"]
    );
    let docs =
        render(Render::new("aad-pod-identity", "kube-system").set("installMICException", "false"));
    assert!(of_kind(&docs, "AzurePodIdentityException").is_empty());
}

/// `helm <command> aad-pod-identity <the chart> <args>`.
fn helm_on_chart(command: &str, args: &[&str]) -> helm::HelmOutput {
    let chart = helm::chart_dir().display().to_string();
    let mut all = vec![command, "aad-pod-identity", &chart];
    all.extend_from_slice(args);
    helm::run(&all).unwrap()
}

/// The NOTES of `helm install --dry-run=client` with
/// `installMICException=false` and one more `--set`.
fn dry_run_notes(kubeconfig: &str, ns: &str, set: &str) -> String {
    let out = helm_on_chart(
        "install",
        &[
            "--dry-run=client",
            "--kubeconfig",
            kubeconfig,
            "--namespace",
            ns,
            "--set",
            "installMICException=false",
            "--set",
            set,
        ],
    );
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    out.stdout
        .split("NOTES:")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// NOTES.txt says which mode is active and recommends enforce. (`helm
/// install --dry-run=client` still wants a reachable cluster, and looks for
/// objects it would take over; nothing is installed.)
#[test]
fn notes_name_the_identity_policy_mode() {
    let kubeconfig = Cluster::shared().kubeconfig().display().to_string();
    let ns = unique_name("notes");
    for (mode, says) in [
        ("off", "Not checked"),
        ("warn", "accepted\n  with a warning"),
        ("enforce", "is refused"),
    ] {
        let notes = dry_run_notes(&kubeconfig, &ns, &format!("identityPolicy.mode={mode}"));
        assert!(
            notes.contains(&format!("Identity policy: {mode}.")),
            "{mode}: {notes}"
        );
        assert!(
            notes.contains(says),
            "{mode}: {says:?} missing from {notes}"
        );
        assert_eq!(
            notes.contains("Recommended: identityPolicy.mode=enforce"),
            mode != "enforce",
            "{notes}"
        );
        assert!(
            notes.contains("kubectl annotate namespace")
                && notes.contains(aadpodid_api::ANNOTATION_ALLOWED_IDENTITIES),
            "{notes}"
        );
        // Without the startup taint, the notes say what it would close.
        assert!(
            notes.contains("New nodes: until NMI is ready")
                && notes.contains("nmi.startupTaint.enabled=true"),
            "{notes}"
        );
    }
    // With it, how to set it on AKS (an initialization taint) and undo it.
    let notes = dry_run_notes(&kubeconfig, &ns, "nmi.startupTaint.enabled=true");
    let missing: Vec<&str> = [
        "Startup taint: NMI removes the taint startup-taint.cluster-autoscaler.kubernetes.io/aad-pod-identity-nmi",
        "--node-init-taints startup-taint.cluster-autoscaler.kubernetes.io/aad-pod-identity-nmi=true:NoSchedule",
        "never --node-taints",
        "--node-init-taints \"\"",
    ]
    .into_iter()
    .filter(|want| !notes.contains(want))
    .collect();
    assert!(missing.is_empty(), "{missing:?} missing from {notes}");
    assert!(!notes.contains("New nodes: until NMI is ready"), "{notes}");
}

#[test]
fn invalid_values_fail_with_a_message_naming_the_value() {
    let dir = repo_root().join("tests/fixtures/chart-invalid");
    for (file, needle) in [
        ("bad-operation-mode.yaml", "operationMode"),
        ("missing-selector.yaml", "selector"),
        ("type0-without-resource-id.yaml", "resourceID"),
    ] {
        let r = Render::new("aad-pod-identity", "kube-system").values(dir.join(file));
        match helm::template_text(&r).unwrap() {
            Ok(_) => panic!("{file}: helm template accepted it"),
            Err(e) => assert!(e.contains(needle), "{file}: {e}"),
        }
        assert!(helm::lint(&r).unwrap().is_err(), "{file}: lint accepted it");
    }
    // A bad --set too.
    let r = Render::new("aad-pod-identity", "kube-system").set("nmi.cleanupOnUninstall", "maybe");
    let e = helm::template_text(&r).unwrap().unwrap_err();
    assert!(e.contains("cleanupOnUninstall"), "{e}");
    // NMI's bounds, paths and startup taint: refused by the schema or the
    // chart's own checks before NMI would refuse to start.
    #[rustfmt::skip]
    let refused = [
        ("nmi.maxConnections", "0", "maxConnections"),
        ("nmi.maxConnections", "65537", "maxConnections"),
        ("nmi.maxConnectionsPerIP", "many", "maxConnectionsPerIP"),
        ("nmi.maxPendingFetchesPerPod", "4097", "maxPendingFetchesPerPod"),
        ("nmi.maxCachedTokens", "-1", "maxCachedTokens"),
        ("nmi.firstSyncWaitSec", "301", "firstSyncWaitSec"),
        ("nmi.firstSyncWaitSec", "1.5", "firstSyncWaitSec"),
        ("nmi.allowScheduledEventsPost", "maybe", "allowScheduledEventsPost"),
        ("nmi.proxyAllowedPaths[0]", "/metadata/identity/oauth2", "proxyAllowedPaths"),
        ("nmi.proxyAllowedPaths[0]", "/metadata/%69dentity", "proxyAllowedPaths"),
        ("nmi.proxyAllowedPaths[0]", "/other", "proxyAllowedPaths"),
        ("nmi.startupTaint.key", "-not-a-key", "startupTaint"),
        ("nmi.startupTaint.key", "Bad_Prefix/x", "startupTaint"),
        ("nmi.startupTaint.efect", "NoSchedule", "startupTaint"),
        ("nmi.routeLocalnetInitContainer", "yes", "routeLocalnetInitContainer"),
        ("nmi.listenAddress", "node-ip", "listenAddress"),
    ];
    for (key, value, needle) in refused {
        let r = Render::new("aad-pod-identity", "kube-system").set(key, value);
        let e = helm::template_text(&r)
            .unwrap()
            .expect_err(&format!("{key}={value} accepted"));
        assert!(e.contains(needle), "{key}={value}: {e}");
    }
    let r = Render::new("aad-pod-identity", "kube-system")
        .set("nmi.startupTaint.enabled", "true")
        .set("nmi.startupTaint.key", "");
    let e = helm::template_text(&r).unwrap().unwrap_err();
    assert!(
        e.contains("nmi.startupTaint.key must name the taint"),
        "{e}"
    );
    // The startup taint needs the admission policy, so Kubernetes 1.30.
    let out = helm_on_chart(
        "template",
        &[
            "--kube-version",
            "1.29.4",
            "--set",
            "identityPolicy.mode=off",
            "--set",
            "nmi.startupTaint.enabled=true",
        ],
    );
    assert!(!out.success, "1.29 accepted");
    assert!(
        out.stderr.contains("nmi.startupTaint.enabled") && out.stderr.contains("1.30"),
        "{}",
        out.stderr
    );
}

/// NMI's connection, pending-fetch and cache bounds and its first-sync wait,
/// in the order of its flags.
fn nmi_bounds(a: &nmi::Args) -> (u32, u32, u32, u32, u64) {
    (
        a.max_connections,
        a.max_connections_per_ip,
        a.max_pending_fetches_per_pod,
        a.max_cached_tokens,
        a.first_sync_wait_sec,
    )
}

/// What the kubelet does to `$(VAR)` in args (downward-API env only here).
fn expand(args: &[String], env: &BTreeMap<&str, String>) -> Vec<String> {
    args.iter()
        .map(|a| {
            let mut a = a.clone();
            for (k, v) in env {
                a = a.replace(&format!("$({k})"), v);
            }
            a
        })
        .collect()
}

#[test]
fn rendered_args_parse_with_the_real_parsers() {
    use clap::Parser as _;
    let renders = default_and_ci_renders();
    let scratch = std::env::temp_dir().join(unique_name("chart-args"));
    std::fs::create_dir_all(&scratch).unwrap();
    let azure_json = scratch.join("azure.json");
    std::fs::write(
        &azure_json,
        r#"{"cloud":"AzurePublicCloud","tenantId":"t","aadClientId":"msi","aadClientSecret":"msi","useManagedIdentityExtension":true,"subscriptionId":"s","resourceGroup":"rg","vmType":"vmss"}"#,
    )
    .unwrap();
    for r in renders {
        let docs = render(r.clone());
        let what = format!("{:?}", r.values);
        if let Some(mic) = helm::find(&docs, "Deployment", "aad-pod-identity-mic") {
            let args = helm::container_args(&mic);
            assert!(
                args.contains(&"--identity-policy=warn".to_string()),
                "{what}: {args:?}"
            );
            let parsed = mic::args::Args::try_parse_from(
                std::iter::once("mic".to_string()).chain(args.clone()),
            )
            .unwrap_or_else(|e| panic!("{what}: mic {args:?}: {e}"));
            assert_eq!(
                parsed.identity_policy,
                aadpodid_api::PolicyMode::Warn,
                "{what}"
            );
            assert!(!parsed.serve_cluster_identities, "{what}");
            // The Role covers exactly the ConfigMap MIC keeps its record in.
            if let Some(role) = helm::find(&docs, "Role", "aad-pod-identity-mic-owned-identities") {
                assert_eq!(
                    role["rules"][1]["resourceNames"],
                    json!([parsed.owned_identities_configmap]),
                    "{what}"
                );
            }
            // MIC refuses to start without its namespace; the chart gives it
            // through the downward API.
            let env_ns = env_value(&mic, "MIC_POD_NAMESPACE").expect("MIC_POD_NAMESPACE");
            assert_eq!(
                env_ns["valueFrom"]["fieldRef"]["fieldPath"],
                "metadata.namespace"
            );
            // Settings resolve with that env (and the azure.json at a test path,
            // or the admin Secret's env), as in the pod.
            let mut a = parsed.clone();
            if !a.cloudconfig.is_empty() {
                a.cloudconfig = azure_json.display().to_string();
            }
            let secret_env = |k: &str| match k {
                "MIC_POD_NAMESPACE" => Some("kube-system".to_string()),
                "CLOUD" => Some("AzurePublicCloud".into()),
                "SUBSCRIPTION_ID" | "RESOURCE_GROUP" | "TENANT_ID" | "CLIENT_ID"
                | "CLIENT_SECRET" => Some("x".into()),
                "VM_TYPE" => Some("vmss".into()),
                "FORCENAMESPACED" => env_value(&mic, "FORCENAMESPACED")
                    .and_then(|v| v["value"].as_str().map(str::to_string)),
                _ => None,
            };
            if env_value(&mic, "AZURE_ENVIRONMENT_FILEPATH").is_none() {
                mic::Settings::from_args(&a, &secret_env)
                    .unwrap_or_else(|e| panic!("{what}: mic settings: {e}"));
            }
            let without_ns = |k: &str| {
                if k == "MIC_POD_NAMESPACE" {
                    None
                } else {
                    secret_env(k)
                }
            };
            assert!(
                mic::Settings::from_args(&a, &without_ns).is_err(),
                "{what}: MIC needs MIC_POD_NAMESPACE"
            );
            if let Some(linger) = r
                .values
                .iter()
                .find(|v| v.ends_with("custom-cloud-values.yaml"))
            {
                assert_eq!(
                    parsed.identity_removal_linger,
                    Duration::from_secs(600),
                    "{}",
                    linger.display()
                );
            }
        }
        let nmi = get(&docs, "DaemonSet", "aad-pod-identity-nmi");
        let env: BTreeMap<&str, String> = [("NODE_NAME", "aks-nodepool1-0".to_string())].into();
        let args = expand(&helm::container_args(&nmi), &env);
        let parsed = nmi::Args::try_from_args(args.clone())
            .unwrap_or_else(|e| panic!("{what}: nmi {args:?}: {e}"));
        assert_eq!(parsed.node, "aks-nodepool1-0");
        assert_eq!(parsed.http_probe_port, 8085, "{what}");
        assert!(
            parsed.metadata_header_required && parsed.enable_scale_features,
            "{what}"
        );
        let cleanup = !what.contains("rbac-disabled");
        assert_eq!(parsed.cleanup_on_uninstall, cleanup, "{what}");
        // The cluster's own identities, as MIC gets them: azure.json unless
        // the admin Secret replaces it, and mic.immutableUserMSIs.
        assert!(!parsed.serve_cluster_identities, "{what}");
        if what.contains("custom-cloud") {
            assert_eq!(parsed.cloudconfig, "", "{what}");
            assert_eq!(
                parsed.immutable_client_ids(),
                ["c0000000-0000-4000-8000-00000000000k"],
                "{what}"
            );
        } else {
            assert_eq!(parsed.cloudconfig, "/etc/kubernetes/azure.json", "{what}");
        }
        if what.contains("managed-mode") {
            assert_eq!(parsed.operation_mode, nmi::args::OperationMode::Managed);
            assert!(
                parsed.namespaced(None),
                "managed mode needs namespaced mode"
            );
        } else {
            assert_eq!(parsed.operation_mode, nmi::args::OperationMode::Standard);
            // micNamespace, else the release namespace (kube-system in every render here).
            assert_eq!(parsed.mic_namespace, "kube-system", "{what}");
        }
        if what.contains("nmi-hardening") {
            assert_eq!(nmi_bounds(&parsed), (2048, 16, 8, 1_000_000, 0), "{what}");
            assert!(parsed.enable_conntrack_deletion && parsed.allow_scheduled_events_post);
            assert_eq!(
                parsed.proxy_allowed_paths,
                ["/metadata/loadbalancer", "/metadata/attested"]
            );
            assert_eq!(
                parsed.node_startup_taint,
                "aadpodidentity.k8s.io/nmi-not-ready"
            );
        } else {
            // Unset: the binary's defaults, which values.yaml names.
            let defaults = nmi::Args::try_from_args(Vec::<String>::new()).unwrap();
            assert_eq!(nmi_bounds(&parsed), (1024, 32, 16, 4096, 20), "{what}");
            assert_eq!(
                nmi_bounds(&defaults),
                (1024, 32, 16, 4096, 20),
                "values.yaml documents these defaults"
            );
            // Conntrack deletion is the one default the chart sets against
            // the binary's (upstream's) default.
            assert!(parsed.enable_conntrack_deletion && !defaults.enable_conntrack_deletion);
            assert!(!parsed.allow_scheduled_events_post);
            assert!(parsed.proxy_allowed_paths.is_empty(), "{what}");
            assert_eq!(parsed.node_startup_taint, "", "{what}");
        }
        if what.contains("all-flags") {
            assert_eq!(parsed.ipt_update_interval_sec, 30);
            assert_eq!(parsed.prometheus_port, 9091);
            assert!(parsed.block_instance_metadata && parsed.set_retry_after_header);
            assert_eq!(parsed.allowed_secret_namespaces, ["team-a", "team-b"]);
            assert_eq!(parsed.log_format, "json");
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

/// Objects keyed by kind/namespace/name, Helm's labels removed.
fn keyed(docs: &[Value]) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for d in docs {
        let mut o = d.clone();
        helm::strip_helm_labels(&mut o);
        if o["kind"] == "List"
            && let Some(items) = o["items"].as_array_mut()
        {
            for i in items {
                helm::strip_helm_labels(i);
            }
        }
        let key = format!(
            "{}/{}/{}",
            o["kind"].as_str().unwrap_or_default(),
            o["metadata"]["namespace"].as_str().unwrap_or_default(),
            o["metadata"]["name"].as_str().unwrap_or_default()
        );
        assert!(out.insert(key.clone(), o).is_none(), "duplicate {key}");
    }
    out
}

#[test]
fn deploy_infra_equals_the_chart_render() {
    for (file, r) in [
        (
            "deployment-rbac.yaml",
            Render::new("aad-pod-identity", "default")
                .with_crds()
                .set("upstreamManifestNames", "true"),
        ),
        (
            "managed-mode-deployment.yaml",
            Render::new("aad-pod-identity", "kube-system")
                .with_crds()
                .values(ci("managed-mode-values.yaml"))
                .set("upstreamManifestNames", "true"),
        ),
    ] {
        let path = repo_root().join("deploy/infra").join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let flat = keyed(&helm::parse_documents(&text).unwrap());
        let chart = keyed(&helm::template(&r).unwrap());
        let flat_keys: Vec<&String> = flat.keys().collect();
        let chart_keys: Vec<&String> = chart.keys().collect();
        assert_eq!(
            flat_keys, chart_keys,
            "{file}: objects differ; run deploy/infra/generate.sh"
        );
        for (k, v) in &chart {
            assert_eq!(
                &flat[k], v,
                "{file}: {k} differs; run deploy/infra/generate.sh"
            );
        }
        // The CRDs are the generated ones.
        assert_eq!(
            flat.keys()
                .filter(|k| k.starts_with("CustomResourceDefinition/"))
                .count(),
            4,
            "{file}"
        );
    }
}

#[test]
fn chart_crds_are_the_generated_copy() {
    let chart = keyed(
        &helm::parse_documents(
            &std::fs::read_to_string(helm::chart_dir().join("crds/crd.yaml")).unwrap(),
        )
        .unwrap(),
    );
    let mut generated = Vec::new();
    for e in std::fs::read_dir(repo_root().join("crds")).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        generated.extend(helm::parse_documents(&text).unwrap());
    }
    assert_eq!(
        chart,
        keyed(&generated),
        "run: cargo run -p aadpodid-api --bin crdgen"
    );
}

#[test]
fn dockerfiles_name_paths_and_binaries_that_exist() {
    let root = repo_root();
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
    let ignored: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for (file, package) in [("Dockerfile.mic", "mic"), ("Dockerfile.nmi", "nmi")] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        // Every build-context COPY source exists and is not dockerignored.
        let mut copies = 0;
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("COPY "))
        {
            let words: Vec<&str> = line.split_whitespace().skip(1).collect();
            if words.iter().any(|w| w.starts_with("--from=")) {
                continue;
            }
            let (_, sources) = words.split_last().unwrap();
            for s in sources.iter().filter(|w| !w.starts_with("--")) {
                copies += 1;
                assert!(root.join(s).exists(), "{file}: COPY {s}: no such path");
                assert!(!ignored.contains(s), "{file}: COPY {s} is in .dockerignore");
            }
        }
        assert!(copies >= 3, "{file}: {copies} COPY sources");
        // The workspace members it needs are in the copied folders.
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        for member in [
            "crates/api",
            "crates/azure-emulator",
            "crates/mic",
            "crates/nmi",
            "crates/runtime",
            "tests",
        ] {
            assert!(
                manifest.contains(&format!("\"{member}\"")),
                "{member} is a member"
            );
            assert!(
                text.contains(&format!("COPY {} ", member.split('/').next().unwrap())),
                "{file}: {member} not copied"
            );
        }
        // The package and binary exist, built --locked, and the copied path is the binary.
        let pkg =
            std::fs::read_to_string(root.join("crates").join(package).join("Cargo.toml")).unwrap();
        assert!(pkg.contains(&format!("name = \"{package}\"")), "{package}");
        assert!(
            pkg.contains("[[bin]]") && pkg.contains(&format!("[[bin]]\nname = \"{package}\"")),
            "{package} binary"
        );
        assert!(
            text.contains(&format!(
                "cargo build --release --locked -p {package} --bin {package}"
            )),
            "{file}"
        );
        assert!(
            text.contains(&format!("target/release/{package} /out/{package}")),
            "{file}"
        );
        for label in ["title", "source", "licenses", "version", "revision"] {
            assert!(
                text.contains(&format!("org.opencontainers.image.{label}=")),
                "{file}: OCI label {label}"
            );
        }
        assert!(
            text.contains("FROM ") && text.matches("FROM ").count() == 2,
            "{file}: two stages"
        );
    }
    let mic = std::fs::read_to_string(root.join("Dockerfile.mic")).unwrap();
    assert!(mic.contains("USER 65532"), "MIC runs as non-root");
    let nmi = std::fs::read_to_string(root.join("Dockerfile.nmi")).unwrap();
    assert!(
        nmi.contains("install -y --no-install-recommends iptables conntrack"),
        "NMI has the iptables userland and conntrack (--enable-conntrack-deletion)"
    );
}

/// The render of a release in its own namespace, with names that collide with
/// no other test (cluster-scoped roles) and the Lease in that namespace.
fn isolated_render(ns: &str, prefix: &str) -> Render {
    Render::new(prefix, ns)
        .with_crds()
        .set("fullnameOverride", prefix)
        .set("mic.leaderElection.namespace", ns)
        .set("rbac.createUserFacingClusterRoles", "true")
        .set("mic.podDisruptionBudget.minAvailable", "1")
        .set_string("azureIdentities.app-id.type", "0")
        .set("azureIdentities.app-id.namespace", ns)
        .set("azureIdentities.app-id.clientID", "c0000000-0000-4000-8000-000000000001")
        .set(
            "azureIdentities.app-id.resourceID",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/app-id",
        )
        .set("azureIdentities.app-id.binding.selector", "app")
        .set("nmi.startupTaint.enabled", "true")
        .set("nmi.routeLocalnetInitContainer", "true")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_chart_applies_to_the_apiserver() {
    let cluster = Cluster::shared();
    let ns = cluster.temp_namespace("chart-apply").await.unwrap();
    let prefix = unique_name("pid");
    let _cleanup = ClusterScoped {
        cluster,
        prefix: prefix.clone(),
    };
    let text = helm::template_text(&isolated_render(ns.name(), &prefix))
        .unwrap()
        .unwrap();
    let dry = cluster
        .kubectl_run(
            &["apply", "--server-side", "--dry-run=server", "-f", "-"],
            Some(&text),
        )
        .unwrap();
    assert!(dry.success, "server-side dry run: {}", dry.stderr);
    let real = cluster
        .kubectl_run(&["apply", "--server-side", "-f", "-"], Some(&text))
        .unwrap();
    assert!(real.success, "apply: {}", real.stderr);
    let established = cluster.wait_crds_established().unwrap();
    assert_eq!(established.lines().count(), 4, "{established}");
    for (kind, name, namespaced) in [
        ("deployment", format!("{prefix}-mic"), true),
        ("daemonset", format!("{prefix}-nmi"), true),
        ("serviceaccount", format!("{prefix}-nmi"), true),
        ("poddisruptionbudget", "mic-pdb".to_string(), true),
        ("azureidentity", "app-id".to_string(), true),
        ("azureidentitybinding", "app-id-binding".to_string(), true),
        ("role", format!("{prefix}-mic-owned-identities"), true),
        ("clusterrole", format!("{prefix}-mic"), false),
        ("clusterrole", format!("{prefix}-view"), false),
        ("clusterrolebinding", format!("{prefix}-nmi"), false),
    ] {
        let mut args = vec!["get", kind, name.as_str(), "-o", "name"];
        if namespaced {
            args.extend(["-n", ns.name()]);
        }
        let out = cluster.kubectl_run(&args, None).unwrap();
        assert!(out.success, "{kind} {name}: {}", out.stderr);
    }
    // The user-facing roles carry the aggregation labels (the aggregation
    // itself is kube-controller-manager's, which does not run here).
    let view = cluster
        .kubectl_run(
            &[
                "get",
                "clusterrole",
                &format!("{prefix}-view"),
                "-o",
                "json",
            ],
            None,
        )
        .unwrap();
    let view: Value = serde_json::from_str(&view.stdout).unwrap();
    assert_eq!(
        view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"],
        "true"
    );
    // The admission policies and their bindings, cluster-wide.
    for which in [
        "identity-grants",
        "assigned-identity-writers",
        "exception-writers",
        "nmi-startup-taint",
    ] {
        for kind in [
            "validatingadmissionpolicy",
            "validatingadmissionpolicybinding",
        ] {
            let out = cluster
                .kubectl_run(
                    &["get", kind, &format!("{prefix}-{which}"), "-o", "name"],
                    None,
                )
                .unwrap();
            assert!(out.success, "{kind} {which}: {}", out.stderr);
        }
    }
}

/// Removes a release's cluster-scoped objects when the test ends (also on
/// panic); the CRDs stay (the harness's, and Helm never deletes crds/ either).
struct ClusterScoped {
    cluster: &'static Cluster,
    prefix: String,
}

impl Drop for ClusterScoped {
    fn drop(&mut self) {
        let prefix = &self.prefix;
        let mut names = vec![];
        for kind in ["clusterrole", "clusterrolebinding"] {
            for suffix in ["mic", "nmi", "view", "edit"] {
                names.push((kind, format!("{prefix}-{suffix}")));
            }
        }
        for kind in [
            "validatingadmissionpolicy",
            "validatingadmissionpolicybinding",
        ] {
            for which in [
                "identity-grants",
                "assigned-identity-writers",
                "exception-writers",
                "nmi-startup-taint",
            ] {
                names.push((kind, format!("{prefix}-{which}")));
            }
        }
        for (kind, name) in names {
            let _ = self
                .cluster
                .kubectl_run(&["delete", kind, &name, "--ignore-not-found"], None);
        }
    }
}

/// `defaultTokenSource` reaches both binaries: with `federated` mic and nmi
/// get `--default-token-source=federated` (parsed by their real parsers);
/// by default neither gets the flag and both keep `imds`.
#[test]
fn the_default_token_source_reaches_mic_and_nmi() {
    use aadpodid_api::TokenSource;
    use clap::Parser as _;
    let env: BTreeMap<&str, String> = [("NODE_NAME", "aks-nodepool1-0".to_string())].into();
    for (set, want) in [
        (None, TokenSource::Imds),
        (Some("imds"), TokenSource::Imds),
        (Some("federated"), TokenSource::Federated),
    ] {
        let mut r = Render::new("aad-pod-identity", "kube-system");
        if let Some(v) = set {
            r = r.set("defaultTokenSource", v);
        }
        let docs = render(r);
        let mic = get(&docs, "Deployment", "aad-pod-identity-mic");
        let nmi = get(&docs, "DaemonSet", "aad-pod-identity-nmi");
        let mic_args = helm::container_args(&mic);
        let nmi_args = expand(&helm::container_args(&nmi), &env);
        let flagged = want == TokenSource::Federated;
        for (who, args) in [("mic", &mic_args), ("nmi", &nmi_args)] {
            let has = args.iter().any(|a| a.starts_with("--default-token-source"));
            assert_eq!(has, flagged, "{set:?}: {who} {args:?}");
        }
        let parsed_mic =
            mic::args::Args::try_parse_from(std::iter::once("mic".to_string()).chain(mic_args))
                .unwrap_or_else(|e| panic!("{set:?}: mic: {e}"));
        assert_eq!(parsed_mic.default_token_source, want, "{set:?}: mic");
        let parsed_nmi =
            nmi::Args::try_from_args(nmi_args).unwrap_or_else(|e| panic!("{set:?}: nmi: {e}"));
        assert_eq!(parsed_nmi.default_token_source, want, "{set:?}: nmi");
    }
}

/// `azureIdentities.<name>.tokenSource` renders the AzureIdentity's
/// annotation `aadpodidentity.k8s.io/token-source` (read by MIC and NMI as
/// that source); without it the AzureIdentity renders as before, with no
/// annotation; any other value fails, naming the key.
#[test]
fn azure_identities_token_source_renders_the_annotation() {
    use aadpodid_api::{AzureIdentity, TokenSource, token_source};
    let with = |r: Render, name: &str, source: Option<&str>| {
        let key = |k: &str| format!("azureIdentities.{name}.{k}");
        let mut r = r
            .set_string(&key("type"), "0")
            .set(&key("clientID"), "c0000000-0000-4000-8000-000000000001")
            .set(&key("resourceID"), "/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u")
            .set(&key("binding.selector"), "app");
        if let Some(s) = source {
            r = r.set(&key("tokenSource"), s);
        }
        r
    };
    let base = || Render::new("aad-pod-identity", "kube-system");
    let three = with(base(), "fed", Some("federated"));
    let three = with(three, "by-imds", Some("imds"));
    let docs = render(with(three, "plain", None));
    // (identity, annotation, source with --default-token-source=imds and =federated)
    for (name, annotation, sources) in [
        ("fed", Some("federated"), [TokenSource::Federated; 2]),
        ("by-imds", Some("imds"), [TokenSource::Imds; 2]),
        ("plain", None, [TokenSource::Imds, TokenSource::Federated]),
    ] {
        let obj = get(&docs, "AzureIdentity", name);
        let want = annotation.map(|a| json!({"aadpodidentity.k8s.io/token-source": a}));
        assert_eq!(
            obj["metadata"]["annotations"],
            want.unwrap_or(Value::Null),
            "{name}: {obj}"
        );
        let id: AzureIdentity = serde_json::from_value(obj).unwrap();
        for (default, want) in [TokenSource::Imds, TokenSource::Federated]
            .into_iter()
            .zip(sources)
        {
            assert_eq!(
                token_source(&id, default),
                Ok(want),
                "{name}, default {default}"
            );
        }
    }
    // Absent: the AzureIdentity and binding are those of a render in which
    // no identity names a token source.
    let alone = render(with(base(), "plain", None));
    for (kind, name) in [
        ("AzureIdentity", "plain"),
        ("AzureIdentityBinding", "plain-binding"),
    ] {
        assert_eq!(get(&docs, kind, name), get(&alone, kind, name), "{kind}");
    }
    for bad in ["Federated", "true", "msi"] {
        let e = helm::template_text(&with(base(), "fed", Some(bad)))
            .unwrap()
            .expect_err(&format!("tokenSource={bad} accepted"));
        assert!(
            e.contains("azureIdentities.fed.tokenSource must be imds or federated"),
            "{bad}: {e}"
        );
    }
}
