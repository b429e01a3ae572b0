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

fn grants(docs: &[Value], resource: &str) -> Vec<String> {
    rules(docs)
        .into_iter()
        .filter(|(_, r)| {
            r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == resource)
        })
        .map(|(n, r)| format!("{n}: {r}"))
        .collect()
}

#[test]
fn lint_and_template_pass_with_default_and_every_ci_values_file() {
    let mut renders = vec![Render::new("aad-pod-identity", "kube-system")];
    for f in ci_values() {
        renders.push(Render::new("aad-pod-identity", "kube-system").values(f));
    }
    for r in renders {
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
        "AzurePodIdentityException/mic",
        "AzurePodIdentityException/aks-addon-exception",
    ] {
        assert!(
            names.contains(&want.to_string()),
            "{want} missing from {names:?}"
        );
    }
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
    assert_eq!(mounts, ["/run/xtables.lock", "/etc/default/kubelet"]);

    // Least privilege: no Endpoints or ConfigMaps (the lock is a Lease), no
    // Secrets without service-principal identities, no wildcards.
    for resource in [
        "endpoints",
        "configmaps",
        "secrets",
        "customresourcedefinitions",
    ] {
        assert_eq!(grants(&docs, resource), Vec::<String>::new(), "{resource}");
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
    let mut renders = vec![Render::new("aad-pod-identity", "kube-system")];
    for f in ci_values() {
        renders.push(Render::new("aad-pod-identity", "kube-system").values(f));
    }
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
            let parsed = mic::args::Args::try_parse_from(
                std::iter::once("mic".to_string()).chain(args.clone()),
            )
            .unwrap_or_else(|e| panic!("{what}: mic {args:?}: {e}"));
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
            Render::new("aad-pod-identity", "default").with_crds(),
        ),
        (
            "managed-mode-deployment.yaml",
            Render::new("aad-pod-identity", "kube-system")
                .with_crds()
                .values(ci("managed-mode-values.yaml")),
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
        nmi.contains("install -y --no-install-recommends iptables"),
        "NMI has the iptables userland"
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_chart_applies_to_the_apiserver() {
    let cluster = Cluster::shared();
    let ns = cluster.temp_namespace("chart-apply").await.unwrap();
    let prefix = unique_name("pid");
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
    let est = cluster
        .kubectl_run(
            &[
                "wait",
                "--for=condition=Established",
                "crd",
                "--all",
                "--timeout=60s",
            ],
            None,
        )
        .unwrap();
    assert!(est.success, "{}", est.stderr);
    assert_eq!(est.stdout.lines().count(), 4, "{}", est.stdout);
    for (kind, name, namespaced) in [
        ("deployment", format!("{prefix}-mic"), true),
        ("daemonset", format!("{prefix}-nmi"), true),
        ("serviceaccount", format!("{prefix}-nmi"), true),
        ("poddisruptionbudget", "mic-pdb".to_string(), true),
        ("azureidentity", "app-id".to_string(), true),
        ("azureidentitybinding", "app-id-binding".to_string(), true),
        ("azurepodidentityexception", "mic".to_string(), true),
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
    // Remove the cluster-scoped objects; the CRDs stay (the harness's, and
    // Helm never deletes crds/ either).
    for kind in ["clusterrole", "clusterrolebinding"] {
        for suffix in ["mic", "nmi", "view", "edit"] {
            let _ = cluster.kubectl_run(
                &[
                    "delete",
                    kind,
                    &format!("{prefix}-{suffix}"),
                    "--ignore-not-found",
                ],
                None,
            );
        }
    }
}
