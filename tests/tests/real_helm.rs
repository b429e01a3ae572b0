//! `helm install` of the chart on real nodes: the mic and nmi images that
//! `scripts/images.sh` builds, run by a real kubelet, containerd and runc on
//! two nodes (each a network namespace of the test's own, its Node's
//! providerID naming its emulated scale-set instance), with the chart's own
//! probes, securityContext, mounts and in-cluster configuration (the
//! ServiceAccount token the kubelet mounts, the `kubernetes` Service).
//!
//! Inside each node 169.254.169.254 is the emulator's IMDS for that machine
//! and 10.253.0.1 its ARM and Entra ID (TLS with a certificate of the test's
//! own CA, which MIC trusts through the chart's custom-cloud values). The
//! seed manifests (an AzureIdentity and its binding) are applied unchanged;
//! an application pod of the binding's label then gets a token through
//! 169.254.169.254, redirected by nmi.
//!
//! Needs root, the cluster binaries, the node binaries and the images (all
//! built on first use when missing). Every wait is bounded.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aadpodid_testkit::realcloud::{CloudCa, NodeCloud};
use aadpodid_testkit::realnode::{ControlPlane, RealNode};
use aadpodid_testkit::tenant::{
    self, APP_CLIENT, APP_ID, APP_RG, KUBELET, MicCloud, NODE_RG, Tenant,
};
use aadpodid_testkit::{ClusterOptions, PrivateCluster, fill_template, fixture, helm, wait_for};
use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

/// The emulated scale set whose instances the nodes are.
const VMSS: &str = "realpool";
/// The release and its namespace.
const RELEASE: &str = "aad-pod-identity";
/// Where the application pod and the seed objects go.
const APP_NS: &str = "demo";
/// Bound on the nodes' registering Ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on mic's replicas and nmi's pods becoming Ready.
const WORKLOADS_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound on the application pod's first token.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(150);
/// Bound on building the images (cargo release builds when not cached).
const IMAGES_LIMIT_S: &str = "2400";

/// A folder of the test's own, removed on drop (also when the test fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> anyhow::Result<TempDir> {
        let dir = std::env::temp_dir().join(aadpodid_testkit::unique_name(prefix));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A step's name and how long after the start it ended.
struct Steps {
    started: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Steps {
    fn mark(&mut self, name: &'static str) {
        let at = self.started.elapsed();
        eprintln!("real helm: {name} after {at:.1?}");
        self.done.push((name, at));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_runs_the_chart_on_real_nodes() -> anyhow::Result<()> {
    let mut steps = Steps {
        started: Instant::now(),
        done: Vec::new(),
    };
    let archives = chart_images()?;
    steps.mark("images");

    let cluster = PrivateCluster::start_with(ClusterOptions {
        service_account_admission: true,
    })
    .await?;
    let client = cluster.admin_client().await?;
    let mut plane = ControlPlane::start(&cluster)?;
    let emu = Tenant::standard()
        .scale_set(VMSS, 2, &[KUBELET])
        .start()
        .await?;
    let dir = TempDir::new("aadpodid-realhelm")?;
    let dir = dir.path();
    let ca = CloudCa::make(&dir.join("ca"))?;
    steps.mark("cluster and emulator");

    let mut nodes = Vec::new();
    let mut clouds = Vec::new();
    for i in 0..2u8 {
        let provider = tenant::vmss_provider_id(NODE_RG, VMSS, usize::from(i));
        let node = RealNode::start_as(&cluster, i, Some(&provider)).await?;
        for archive in &archives {
            node.import_image(archive)?;
        }
        let machine = format!("vmss/{VMSS}/{i}");
        let cloud_dir = dir.join(format!("cloud-{i}"));
        clouds.push(NodeCloud::start(&node, &emu, &machine, &ca, &cloud_dir).await?);
        nodes.push(node);
    }
    for node in &mut nodes {
        let ready = node.wait_ready(&client, READY_TIMEOUT).await?;
        let provider = ready.spec.as_ref().and_then(|s| s.provider_id.clone());
        ensure!(
            provider.as_deref().is_some_and(|p| p.contains(VMSS)),
            "providerID {provider:?}"
        );
    }
    steps.mark("nodes Ready");

    // The files the chart mounts from the node (hostPath): one host, so one
    // copy serves both nodes.
    let files =
        tenant::write_mic_cloud_files(dir, "", &MicCloud::standard(), &CloudCa::environment())?;
    let kubelet_config = dir.join("kubelet-default");
    std::fs::write(&kubelet_config, "")?;
    let images = nodes[0].images()?;
    let image_of = |name: &str| -> anyhow::Result<String> {
        images
            .iter()
            .find(|i| {
                i.starts_with("localhost/aad-pod-identity/") && i.contains(&format!("/{name}:"))
            })
            .cloned()
            .with_context(|| format!("no {name} image in {images:?}"))
    };
    let (mic_image, nmi_image) = (image_of("mic")?, image_of("nmi")?);
    let repository = mic_image
        .rsplit_once("/mic:")
        .map(|(r, _)| r.to_string())
        .context("mic image reference")?;
    let tag_of = |image: &str| image.rsplit_once(':').map(|(_, t)| t.to_string());
    let sets = [
        ("image.repository", repository),
        ("image.imagePullPolicy", "Never".into()),
        ("mic.tag", tag_of(&mic_image).context("mic tag")?),
        ("nmi.tag", tag_of(&nmi_image).context("nmi tag")?),
        ("mic.cloudConfig", files.azure_json.display().to_string()),
        (
            "mic.customCloud.configPath",
            files.environment.display().to_string(),
        ),
        ("mic.customCloud.caBundlePath", ca.ca.display().to_string()),
        ("nmi.kubeletConfig", kubelet_config.display().to_string()),
    ];
    let mut args = vec![
        "install".to_string(),
        RELEASE.into(),
        helm::chart_dir().display().to_string(),
        "--namespace".into(),
        RELEASE.into(),
        "--create-namespace".into(),
    ];
    for (k, v) in &sets {
        args.push("--set-string".into());
        args.push(format!("{k}={v}"));
    }
    for flag in ["mic.customCloud.enabled", "nmi.routeLocalnetInitContainer"] {
        args.push("--set".into());
        args.push(format!("{flag}=true"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = helm::run_on(cluster.kubeconfig(), &args)?;
    ensure!(out.success, "helm install: {}\n{}", out.stdout, out.stderr);
    steps.mark("helm install");

    let node_refs: Vec<&RealNode> = nodes.iter().collect();
    wait_workloads(&client, &mut plane, &node_refs).await?;
    steps.mark("mic 2/2 and nmi 2/2 Ready");

    // The seed manifests, unchanged: an AzureIdentity and its binding.
    let identity = tenant::uai_id(APP_RG, APP_ID);
    let vars = [
        ("UAIName", APP_ID),
        ("UAIId", identity.as_str()),
        ("UAIClientId", APP_CLIENT),
        ("KVName", "kv-demo"),
    ];
    cluster.kubectl_run(&["create", "namespace", APP_NS], None)?;
    for file in [
        "seed002-azureidentity.yaml",
        "seed002-azureidentitybinding.yaml",
    ] {
        let text = fill_template(&fixture(file)?, &vars);
        let out = cluster.kubectl_run(&["apply", "-n", APP_NS, "-f", "-"], Some(&text))?;
        ensure!(out.success, "{file}: {}", out.stderr);
    }
    let app = app_pod(&nmi_image, &format!("{APP_ID}-binding"));
    let out = cluster.kubectl_run(&["apply", "-n", APP_NS, "-f", "-"], Some(&app))?;
    ensure!(out.success, "app pod: {}", out.stderr);
    let token_line = wait_for("the app's token", TOKEN_TIMEOUT, || {
        let nodes = &node_refs;
        async move {
            container_log(nodes, APP_NS, "app")
                .lines()
                .find(|l| l.starts_with("TOKEN "))
                .map(str::to_string)
        }
    })
    .await
    .map_err(|e| {
        e.context(format!(
            "app log: {}\n{}",
            container_log(&node_refs, APP_NS, "app"),
            diagnostics(&node_refs, &cluster)
        ))
    })?;
    ensure!(
        token_line.contains(" 200") && token_line.contains(APP_CLIENT),
        "{token_line}"
    );
    // MIC put the identity on the app's node's scale set through ARM.
    let on_vmss = emu.assigned_identities(VMSS).unwrap_or_default();
    ensure!(
        on_vmss.iter().any(|i| i.eq_ignore_ascii_case(&identity)),
        "{on_vmss:?}"
    );
    steps.mark("app pod's token through 169.254.169.254");

    // `helm upgrade` with a changed value rolls nmi (a surge rollout: the
    // new pod is ready before the old one stops) while the app keeps asking
    // once a second.
    let before = nmi_pods(&client).await?;
    let out = helm::run_on(
        cluster.kubeconfig(),
        &[
            "upgrade",
            RELEASE,
            &helm::chart_dir().display().to_string(),
            "--namespace",
            RELEASE,
            "--reuse-values",
            "--set",
            "nmi.logVerbosity=1",
        ],
    )?;
    ensure!(out.success, "helm upgrade: {}\n{}", out.stdout, out.stderr);
    wait_for("nmi rolled on both nodes", WORKLOADS_TIMEOUT, || {
        let (client, before) = (client.clone(), before.clone());
        async move {
            let now = nmi_pods(&client).await.ok()?;
            (now.len() == 2 && now.iter().all(|p| !before.contains(p))).then_some(())
        }
    })
    .await
    .map_err(|e| e.context(diagnostics(&node_refs, &cluster)))?;
    wait_workloads(&client, &mut plane, &node_refs).await?;
    steps.mark("helm upgrade: nmi rolled");
    // The app's tries during the rollout: each got a token (nmi answered
    // throughout), and the IMDS relays never saw a pod's address.
    let log = container_log(&node_refs, APP_NS, "app");
    let after_first: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.starts_with("TOKEN "))
        .filter(|l| !l.starts_with("[") && !l.is_empty())
        .collect();
    let failed: Vec<&&str> = after_first
        .iter()
        .filter(|l| !l.starts_with("TOKEN "))
        .collect();
    ensure!(
        failed.is_empty() && after_first.len() >= 2,
        "tries after the first token: {after_first:#?}"
    );
    for (node, cloud) in nodes.iter().zip(&clouds) {
        let prefix = node.pod_cidr().trim_end_matches("0/24").to_string();
        let peers = aadpodid_testkit::relay::peer_log(cloud.imds_peers());
        let from_pods: Vec<_> = peers
            .iter()
            .filter(|(_, ip)| ip.to_string().starts_with(&prefix))
            .collect();
        ensure!(
            from_pods.is_empty(),
            "pods reached IMDS directly: {from_pods:?}"
        );
        ensure!(
            !peers.is_empty() || node.name() != app_node(&client).await?,
            "no IMDS call on the app's node"
        );
    }

    // `helm uninstall`: nmi removes its redirect from each node as it goes.
    let out = helm::run_on(
        cluster.kubeconfig(),
        &[
            "uninstall",
            RELEASE,
            "--namespace",
            RELEASE,
            "--wait",
            "--timeout",
            "120s",
        ],
    )?;
    ensure!(
        out.success,
        "helm uninstall: {}\n{}",
        out.stdout,
        out.stderr
    );
    for node in &nodes {
        let left = wait_for("no nmi rule left", Duration::from_secs(90), || {
            let rules = node
                .netns()
                .run("iptables-save", &["-t", "nat"])
                .unwrap_or_default();
            let rules = (!rules.contains("aad-metadata")).then_some(rules);
            async move { rules }
        })
        .await;
        if let Err(e) = left {
            let rules = node.netns().run("iptables-save", &["-t", "nat"])?;
            bail!("{e:#}: {} nat table:\n{rules}", node.name());
        }
    }
    wait_for("nmi's pods gone", Duration::from_secs(90), || {
        let client = client.clone();
        async move { nmi_pods(&client).await.ok()?.is_empty().then_some(()) }
    })
    .await?;
    steps.mark("helm uninstall: redirect gone");

    plane.check_running()?;
    drop(clouds);
    let remains: Vec<_> = nodes
        .iter()
        .map(|n| (n.dir().to_path_buf(), n.cgroup_root().to_string()))
        .collect();
    drop(nodes);
    for (node_dir, cgroup_root) in &remains {
        let leftovers = RealNode::leftovers(node_dir, cgroup_root);
        ensure!(leftovers.is_empty(), "{leftovers:?}");
    }
    drop(plane);
    steps.mark("torn down");
    let summary: Vec<String> = steps
        .done
        .iter()
        .map(|(n, d)| format!("{n} {:.1}s", d.as_secs_f64()))
        .collect();
    eprintln!("real helm steps: {}", summary.join(", "));
    Ok(())
}

/// The names of nmi's pods (the DaemonSet's, in the release namespace).
async fn nmi_pods(client: &kube::Client) -> anyhow::Result<Vec<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE);
    let listed = pods.list(&ListParams::default()).await?;
    Ok(listed
        .items
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .filter(|n| n.contains("nmi"))
        .collect())
}

/// The node the application pod runs on.
async fn app_node(client: &kube::Client) -> anyhow::Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), APP_NS);
    pods.get("app")
        .await?
        .spec
        .and_then(|s| s.node_name)
        .context("the app pod has no node")
}

/// The application pod: labelled for `binding`, it asks 169.254.169.254 for
/// an ARM token for the identity's client ID once a second (bounded) with
/// bash's own TCP, from the nmi image (which has bash), and prints one line
/// per try: `TOKEN <status line>` when the answer holds an access token,
/// else what it got.
fn app_pod(image: &str, binding: &str) -> String {
    const SCRIPT: &str = r#"
for i in $(seq 1 600); do
  if exec 3<>/dev/tcp/169.254.169.254/80; then
    printf 'GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%%3A%%2F%%2Fmanagement.azure.com%%2F&client_id=%s HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n' "$CLIENT_ID" >&3
    answer=$(timeout 30 cat <&3)
    exec 3>&-
    status=$(printf '%s\n' "$answer" | head -n 1 | tr -d '\r')
    if printf '%s' "$answer" | grep -q '"access_token"'; then
      echo "TOKEN $status $(printf '%s' "$answer" | grep -o '"client_id": *"[^"]*"')"
    else
      echo "NO-TOKEN $status $(printf '%s' "$answer" | tail -c 200 | tr '\r\n' '  ')"
    fi
  else
    echo "NO-CONNECT"
  fi
  sleep 1
done
sleep 3600
"#;
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "app", "labels": {"aadpodidbinding": binding}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": image,
                "imagePullPolicy": "Never",
                "command": ["/bin/bash", "-c", SCRIPT],
                "env": [{"name": "CLIENT_ID", "value": APP_CLIENT}],
            }],
        },
    })
    .to_string()
}

/// The OCI archives of the chart's images, from `scripts/images.sh` (built,
/// or reused from its cache), or the two paths (mic, nmi) in
/// `$AADPODID_CHART_IMAGES` when set.
fn chart_images() -> anyhow::Result<Vec<PathBuf>> {
    if let Ok(given) = std::env::var("AADPODID_CHART_IMAGES") {
        let paths: Vec<PathBuf> = given.split_whitespace().map(PathBuf::from).collect();
        ensure!(
            paths.len() == 2,
            "AADPODID_CHART_IMAGES: two archives (mic, nmi): {given:?}"
        );
        return Ok(paths);
    }
    let root = aadpodid_testkit::repo_root();
    let out = Command::new("timeout")
        .args([IMAGES_LIMIT_S, "bash", "scripts/images.sh"])
        .current_dir(&root)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("run scripts/images.sh")?;
    ensure!(out.status.success(), "scripts/images.sh: {}", out.status);
    let stdout = String::from_utf8(out.stdout)?;
    ["mic", "nmi"]
        .iter()
        .map(|name| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .map(PathBuf::from)
                .with_context(|| format!("no `{name} <archive>` line in {stdout:?}"))
        })
        .collect()
}

/// Waits until mic's Deployment has 2 ready replicas and nmi's DaemonSet a
/// ready pod on each node; on failure says what the pods, their logs and
/// the nodes' logs show.
async fn wait_workloads(
    client: &kube::Client,
    plane: &mut ControlPlane,
    nodes: &[&RealNode],
) -> anyhow::Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), RELEASE);
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), RELEASE);
    let result = wait_for("mic and nmi Ready", WORKLOADS_TIMEOUT, || {
        let (deployments, daemonsets) = (deployments.clone(), daemonsets.clone());
        async move {
            let mic = deployments.list(&ListParams::default()).await.ok()?;
            let nmi = daemonsets.list(&ListParams::default()).await.ok()?;
            let mic_ready = mic
                .items
                .iter()
                .filter_map(|d| d.status.as_ref()?.ready_replicas)
                .sum::<i32>();
            let nmi_ready = nmi
                .items
                .iter()
                .map(|d| d.status.as_ref().map_or(0, |s| s.number_ready))
                .sum::<i32>();
            (mic_ready == 2 && nmi_ready == 2).then_some(())
        }
    })
    .await;
    if let Err(e) = result {
        let pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE);
        let listed = pods.list(&ListParams::default()).await?;
        let states: Vec<String> = listed
            .items
            .iter()
            .map(|p| {
                format!(
                    "{} on {:?}: {}",
                    p.metadata.name.clone().unwrap_or_default(),
                    p.spec.as_ref().and_then(|s| s.node_name.clone()),
                    serde_json::to_string(&p.status).unwrap_or_default()
                )
            })
            .collect();
        let logs: Vec<String> = ["mic", "nmi"]
            .iter()
            .map(|c| format!("--- {c}:\n{}", container_log(nodes, RELEASE, c)))
            .collect();
        plane.check_running()?;
        bail!(
            "{e:#}\npods:\n{}\ncontainer logs:\n{}\nnodes:\n{}",
            states.join("\n"),
            logs.join("\n"),
            nodes
                .iter()
                .map(|n| n.logs(20))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(())
}

/// The logs of every container whose pod is in `ns` and whose name (pod's
/// or container's) starts with `name`, on any of `nodes`, read from the
/// kubelet's pod log folders (the apiserver cannot reach the kubelets,
/// which listen inside their namespaces); the last 40 lines of each.
fn container_log(nodes: &[&RealNode], ns: &str, name: &str) -> String {
    let mut out = String::new();
    for node in nodes {
        let Ok(pods) = std::fs::read_dir(node.dir().join("pod-logs")) else {
            continue;
        };
        for pod in pods.flatten().take(200) {
            let pod_dir = pod.file_name().to_string_lossy().into_owned();
            if !pod_dir.starts_with(&format!("{ns}_")) {
                continue;
            }
            let Ok(containers) = std::fs::read_dir(pod.path()) else {
                continue;
            };
            for container in containers.flatten().take(20) {
                let cname = container.file_name().to_string_lossy().into_owned();
                let pod_name = pod_dir.split('_').nth(1).unwrap_or_default();
                if !pod_name.starts_with(name) && !cname.starts_with(name) {
                    continue;
                }
                for file in std::fs::read_dir(container.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .take(20)
                {
                    out.push_str(&format!(
                        "[{pod_dir}/{cname}/{}]\n",
                        file.file_name().to_string_lossy()
                    ));
                    out.push_str(&tail(&file.path(), 40));
                    out.push('\n');
                }
            }
        }
    }
    out
}

/// The last `lines` lines of a file (the CRI log format: each line after
/// its time, stream and tag).
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text
        .lines()
        .map(|l| l.splitn(4, ' ').nth(3).unwrap_or(l))
        .collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What the cluster says about the application's pod and identities.
fn diagnostics(nodes: &[&RealNode], cluster: &PrivateCluster) -> String {
    let get = |args: &[&str]| {
        cluster
            .kubectl_run(args, None)
            .map(|o| format!("{}{}", o.stdout, o.stderr))
            .unwrap_or_else(|e| format!("{e:#}"))
    };
    format!(
        "pods: {}\nassigned: {}\nmic: {}\nnmi: {}",
        get(&["get", "pods", "-A", "-o", "wide"]),
        get(&["get", "azureassignedidentities", "-A", "-o", "yaml"]),
        container_log(nodes, RELEASE, "mic"),
        container_log(nodes, RELEASE, "nmi"),
    )
}
