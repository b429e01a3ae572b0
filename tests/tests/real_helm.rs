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
use aadpodid_testkit::realnode::{ControlPlane, RealNode, image_of_binary, node_bin_dir};
use aadpodid_testkit::tenant::{
    self, APP_CLIENT, APP_ID, APP_RG, APP2_CLIENT, APP2_ID, KUBELET, MicCloud, NODE_RG, Tenant,
};
use aadpodid_testkit::tools::output_within;
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
/// The application image (`scripts/images.sh`): Python and the Azure SDK,
/// `/app/token.py`.
const APP_IMAGE: &str = "localhost/aadpodid-app:";
/// The image seed 004's pod names.
const DEMO_IMAGE: &str = "mcr.microsoft.com/oss/azure/aad-pod-identity/demo:v1.6.3";
/// The identity `az aks pod-identity add --name` makes for seed 004.
const DEMO_IDENTITY: &str = "my-pod-identity";
/// How many lines of the application's log the checks read.
const TRIES_KEPT: usize = 5000;
/// Bound on building the images (cargo release builds when not cached).
const IMAGES_LIMIT: Duration = Duration::from_secs(2400);

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
    let Up {
        clouds,
        nodes,
        mut plane,
        emu: _emu,
        client,
        cluster,
        dir: _dir,
    } = up(&mut steps).await?;
    let node_refs: Vec<&RealNode> = nodes.iter().collect();

    // `helm upgrade` with a changed value rolls nmi (a surge rollout: the
    // new pod is ready before the old one stops) while the app keeps asking
    // once a second.
    let before = nmi_pods(&client).await?;
    let tries_before = tries(&container_log(&node_refs, APP_NS, "app", TRIES_KEPT)).len();
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
    let after_first: Vec<serde_json::Value> =
        tries(&container_log(&node_refs, APP_NS, "app", TRIES_KEPT))
            .into_iter()
            .skip_while(|t| t["ok"] != true)
            .collect();
    let failed: Vec<&serde_json::Value> = after_first.iter().filter(|t| t["ok"] != true).collect();
    let tries_after = tries(&container_log(&node_refs, APP_NS, "app", TRIES_KEPT)).len();
    ensure!(
        failed.is_empty() && tries_after >= tries_before + 2,
        "tries after the first token ({tries_before} before the upgrade, {tries_after} after \
         the rollout): {after_first:#?}"
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
    drop(node_refs);
    drop(clouds);
    let remains: Vec<_> = nodes
        .iter()
        .map(|n| (n.dir().to_path_buf(), n.cgroup_root().to_string()))
        .collect();
    drop(nodes);
    steps.mark("nodes torn down");
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

/// `mic.customCloud.caBundlePath` (what the test above sets so that MIC
/// trusts the cloud's CA) mounts that node file into MIC's container and
/// names it in `SSL_CERT_FILE`; unset, neither is there.
#[test]
fn custom_cloud_ca_bundle_renders_a_mount_and_ssl_cert_file() -> anyhow::Result<()> {
    let mic = |with_ca: bool| -> anyhow::Result<serde_json::Value> {
        let mut render = helm::Render::new(RELEASE, RELEASE)
            .set("mic.customCloud.enabled", "true")
            .set_string(
                "mic.customCloud.configPath",
                "/etc/kubernetes/akscustom.json",
            );
        if with_ca {
            render = render.set_string("mic.customCloud.caBundlePath", "/etc/ssl/cloud-ca.pem");
        }
        let docs = helm::template(&render)?;
        let deployment = docs
            .iter()
            .find(|d| d["kind"] == "Deployment")
            .context("no Deployment rendered")?;
        Ok(deployment["spec"]["template"]["spec"].clone())
    };
    for with_ca in [true, false] {
        let spec = mic(with_ca)?;
        let container = &spec["containers"][0];
        let env = container["env"].as_array().cloned().unwrap_or_default();
        let ssl = env.iter().find(|e| e["name"] == "SSL_CERT_FILE");
        let mount = container["volumeMounts"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == "custom-cloud-ca").cloned());
        let volume = spec["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "custom-cloud-ca").cloned());
        if with_ca {
            ensure!(
                ssl.is_some_and(|e| e["value"] == "/etc/ssl/cloud-ca.pem"),
                "{env:?}"
            );
            ensure!(
                mount.as_ref().is_some_and(
                    |m| m["mountPath"] == "/etc/ssl/cloud-ca.pem" && m["readOnly"] == true
                ),
                "{mount:?}"
            );
            ensure!(
                volume
                    .as_ref()
                    .is_some_and(|v| v["hostPath"]["path"] == "/etc/ssl/cloud-ca.pem"
                        && v["hostPath"]["type"] == "File"),
                "{volume:?}"
            );
        } else {
            ensure!(
                ssl.is_none() && mount.is_none() && volume.is_none(),
                "{spec}"
            );
        }
    }
    Ok(())
}

/// Not a check: brings everything up as the test above does and leaves it
/// running for a person to use (`scripts/local-up.sh --real`), until Ctrl-C
/// or `$AADPODID_REAL_KEEP_SECS` seconds (default 3600); then tears it down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "left running on purpose: scripts/local-up.sh --real"]
async fn real_cluster_stays_up() -> anyhow::Result<()> {
    let mut steps = Steps {
        started: Instant::now(),
        done: Vec::new(),
    };
    let up = up(&mut steps).await?;
    let secs: u64 = std::env::var("AADPODID_REAL_KEEP_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3600);
    let kubectl = up.cluster.bin_dir().join("kubectl");
    let kubeconfig = up.cluster.kubeconfig().display().to_string();
    eprintln!("\nreal cluster up (two real nodes, the chart installed as release {RELEASE}):");
    eprintln!("  export KUBECONFIG={kubeconfig}");
    eprintln!("  {} get pods -A -o wide", kubectl.display());
    eprintln!("  helm: {}", helm::helm_bin()?.display());
    for (node, cloud) in up.nodes.iter().zip(&up.clouds) {
        eprintln!(
            "  node {}: pod logs {}, its namespace: ip netns exec {} iptables-save -t nat, \
             IMDS callers {}",
            node.name(),
            node.dir().join("pod-logs").display(),
            node.netns().name(),
            cloud.imds_peers().display()
        );
    }
    eprintln!(
        "  the app pod ({APP_NS}/app) asks for a token once a second; its log is under the \
         pod logs of its node"
    );
    eprintln!("left running for {secs} s; Ctrl-C tears it down");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => eprintln!("Ctrl-C: tearing down"),
        () = tokio::time::sleep(Duration::from_secs(secs)) => eprintln!("time is up: tearing down"),
    }
    drop(up);
    Ok(())
}

/// Everything the test brings up, in the order it is torn down.
struct Up {
    clouds: Vec<NodeCloud>,
    nodes: Vec<RealNode>,
    plane: ControlPlane,
    emu: azure_emulator::Emulator,
    client: kube::Client,
    cluster: PrivateCluster,
    dir: TempDir,
}

/// Builds (or reuses) the images, starts the cluster with its control
/// plane, the emulator and two real nodes with the cloud inside them,
/// installs the chart and waits until mic's two replicas and both nmi pods
/// are Ready; applies the seed manifests and the application pod and waits
/// until the application has its token and seed 004's pod its identity.
async fn up(steps: &mut Steps) -> anyhow::Result<Up> {
    let images = chart_images()?;
    steps.mark("images");

    let cluster = PrivateCluster::start_with(ClusterOptions {
        service_account_admission: true,
    })
    .await?;
    let client = cluster.admin_client().await?;
    let mut plane = ControlPlane::start(&cluster)?;
    let emu = Tenant::standard()
        .identity(APP2_ID, APP_RG, APP2_CLIENT)
        .scale_set(VMSS, 2, &[KUBELET])
        .start()
        .await?;
    let temp = TempDir::new("aadpodid-realhelm")?;
    let dir = temp.path();
    let ca = CloudCa::make(&dir.join("ca"))?;
    // Seed 004's pod names upstream's demo image, which no registry here
    // serves: the nodes hold an image of that name (an idle process that
    // ignores the pod's arguments), so the manifest runs unchanged.
    let demo = dir.join("demo.oci.tar");
    image_of_binary(&node_bin_dir()?.join("pause"), DEMO_IMAGE, &demo)?;
    steps.mark("cluster and emulator");

    let mut nodes = Vec::new();
    let mut clouds = Vec::new();
    for i in 0..2u8 {
        let provider = tenant::vmss_provider_id(NODE_RG, VMSS, usize::from(i));
        let node = RealNode::start_as(&cluster, i, Some(&provider)).await?;
        let machine = format!("vmss/{VMSS}/{i}");
        let cloud_dir = dir.join(format!("cloud-{i}"));
        clouds.push(NodeCloud::start(&node, &emu, &machine, &ca, &cloud_dir).await?);
        nodes.push(node);
    }
    // The images into both nodes at once (each import copies the layers).
    std::thread::scope(|scope| {
        let imports: Vec<_> = nodes
            .iter()
            .map(|node| {
                scope.spawn(|| {
                    [&images.mic, &images.nmi, &images.app, &demo]
                        .into_iter()
                        .try_for_each(|archive| node.import_image(archive))
                })
            })
            .collect();
        imports.into_iter().try_for_each(|import| {
            import
                .join()
                .map_err(|_| anyhow::anyhow!("an image import panicked"))?
        })
    })?;
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
    let held = nodes[0].images()?;
    let image_of = |name: &str| -> anyhow::Result<String> {
        held.iter()
            .find(|i| {
                i.starts_with("localhost/aad-pod-identity/") && i.contains(&format!("/{name}:"))
            })
            .cloned()
            .with_context(|| format!("no {name} image in {held:?}"))
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
    // The chart's securityContext holds for the running processes: nmi runs
    // as root with only NET_ADMIN and NET_RAW, mic with no capability on a
    // read-only root, neither can gain privileges.
    for (program, caps, read_only) in [("nmi", 0x3000_u64, false), ("mic", 0, true)] {
        let seen = processes_of(&node_refs, program);
        ensure!(seen.len() == 2, "{program}: {seen:?}");
        for p in &seen {
            ensure!(
                p.effective_caps == caps && p.no_new_privs && (!read_only || p.read_only_root),
                "{program}: {p:?}"
            );
        }
    }

    // The seed manifests, unchanged: an AzureIdentity and its binding.
    let identity = tenant::uai_id(APP_RG, APP_ID);
    let demo_identity = tenant::uai_id(APP_RG, APP2_ID);
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
    // What `az aks pod-identity add --name my-pod-identity` creates, and
    // seed 004's pod of that identity.
    let addon_identity = fill_template(
        &fixture("seed002-azureidentity.yaml")?,
        &[
            ("UAIName", DEMO_IDENTITY),
            ("UAIId", &demo_identity),
            ("UAIClientId", APP2_CLIENT),
        ],
    );
    let addon = format!(
        "{addon_identity}---\napiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentityBinding\n\
         metadata:\n  name: {DEMO_IDENTITY}-binding\nspec:\n  azureIdentity: {DEMO_IDENTITY}\n  \
         selector: {DEMO_IDENTITY}\n"
    );
    let seed4 = fill_template(
        &fixture("seed004-pod.yaml")?,
        &[
            ("POD_IDENTITY_NAME", DEMO_IDENTITY),
            ("SUBSCRIPTION_ID", aadpodid_testkit::SUB),
            ("IDENTITY_CLIENT_ID", APP2_CLIENT),
            ("IDENTITY_RESOURCE_GROUP", APP_RG),
        ],
    );
    for (what, text) in [
        ("the add-on's objects", &addon),
        ("seed004-pod.yaml", &seed4),
    ] {
        let out = cluster.kubectl_run(&["apply", "-n", APP_NS, "-f", "-"], Some(text))?;
        ensure!(out.success, "{what}: {}", out.stderr);
    }
    let app = app_pod(&app_image(&held)?, &format!("{APP_ID}-binding"));
    let out = cluster.kubectl_run(&["apply", "-n", APP_NS, "-f", "-"], Some(&app))?;
    ensure!(out.success, "app pod: {}", out.stderr);
    let first = wait_for("the app's token", TOKEN_TIMEOUT, || {
        let nodes = &node_refs;
        async move {
            tries(&container_log(nodes, APP_NS, "app", TRIES_KEPT))
                .into_iter()
                .find(|t| t["ok"] == true)
        }
    })
    .await
    .map_err(|e| {
        e.context(format!(
            "app log: {}\n{}",
            container_log(&node_refs, APP_NS, "app", 40),
            diagnostics(&node_refs, &cluster)
        ))
    })?;
    ensure!(
        first["appid"]
            .as_str()
            .is_some_and(|a| a.eq_ignore_ascii_case(APP_CLIENT)),
        "{first}"
    );
    // MIC put the identity on the app's node's scale set through ARM.
    let on_vmss = emu.assigned_identities(VMSS).unwrap_or_default();
    ensure!(
        on_vmss.iter().any(|i| i.eq_ignore_ascii_case(&identity)),
        "{on_vmss:?}"
    );
    steps.mark("app pod's token through 169.254.169.254");
    // Seed 004's pod gets its identity too: MIC assigns it and puts it on
    // the scale set.
    wait_for("seed 004's pod Assigned", TOKEN_TIMEOUT, || {
        let cluster = &cluster;
        async move {
            let out = cluster
                .kubectl_run(
                    &["get", "azureassignedidentities", "-A", "-o", "json"],
                    None,
                )
                .ok()?;
            let list: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
            list["items"]
                .as_array()?
                .iter()
                .any(|a| a["spec"]["pod"] == "demo" && a["status"]["status"] == "Assigned")
                .then_some(())
        }
    })
    .await
    .map_err(|e| e.context(diagnostics(&node_refs, &cluster)))?;
    let on_vmss = emu.assigned_identities(VMSS).unwrap_or_default();
    ensure!(
        on_vmss
            .iter()
            .any(|i| i.eq_ignore_ascii_case(&demo_identity)),
        "{on_vmss:?}"
    );
    steps.mark("seed 004's pod Assigned");

    drop(node_refs);
    Ok(Up {
        clouds,
        nodes,
        plane,
        emu,
        client,
        cluster,
        dir: temp,
    })
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

/// What the kernel says about one container process.
#[derive(Debug)]
#[allow(dead_code, reason = "pid is for the failure message")]
struct ProcessSecurity {
    pid: u32,
    effective_caps: u64,
    no_new_privs: bool,
    read_only_root: bool,
}

/// The processes in the nodes' pods whose program is `program` (its file
/// name), with their effective capabilities, `no_new_privs` and whether
/// their root is mounted read-only.
fn processes_of(nodes: &[&RealNode], program: &str) -> Vec<ProcessSecurity> {
    let mut out = Vec::new();
    for pid in nodes.iter().flat_map(|n| n.pod_processes()) {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let first = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        if Path::new(&*String::from_utf8_lossy(first)).file_name() != Some(program.as_ref()) {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_default()
                .to_string()
        };
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
        // mountinfo: the mount point is the 5th field, its options the 6th.
        let read_only_root = mounts.lines().any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.get(4) == Some(&"/") && f.get(5).is_some_and(|o| o.split(',').any(|x| x == "ro"))
        });
        out.push(ProcessSecurity {
            pid,
            effective_caps: u64::from_str_radix(&field("CapEff:"), 16).unwrap_or(u64::MAX),
            no_new_privs: field("NoNewPrivs:") == "1",
            read_only_root,
        });
    }
    out
}

/// The application pod: labelled for `binding`, it asks for an ARM token
/// with the Python Azure SDK's `ManagedIdentityCredential` (the identity's
/// client ID) once a second, a bounded number of times; each try prints one
/// JSON line (`{"ok": true, "appid": ..}` or `{"ok": false, "error": ..}`).
fn app_pod(image: &str, binding: &str) -> String {
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
                "command": [
                    "python3", "/app/token.py", "https://management.azure.com/.default",
                    APP_CLIENT, "--loop", "900", "--interval", "1",
                ],
            }],
        },
    })
    .to_string()
}

/// The application image among the images a node holds.
fn app_image(held: &[String]) -> anyhow::Result<String> {
    held.iter()
        .find(|i| i.starts_with(APP_IMAGE))
        .cloned()
        .with_context(|| format!("no {APP_IMAGE} image in {held:?}"))
}

/// The application's tries in its log: the lines that are JSON objects
/// with an `ok` field (the SDK's warnings on stderr are not).
fn tries(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("ok").is_some())
        .collect()
}

/// The OCI archives of the images.
struct Images {
    mic: PathBuf,
    nmi: PathBuf,
    app: PathBuf,
}

/// The OCI archives of the chart's images and the application image, from
/// `scripts/images.sh` (built, or reused from its cache), or the three paths
/// (mic, nmi, app) in `$AADPODID_CHART_IMAGES` when set.
fn chart_images() -> anyhow::Result<Images> {
    if let Ok(given) = std::env::var("AADPODID_CHART_IMAGES") {
        let paths: Vec<PathBuf> = given.split_whitespace().map(PathBuf::from).collect();
        let [mic, nmi, app] = <[PathBuf; 3]>::try_from(paths).map_err(|p| {
            anyhow::anyhow!("AADPODID_CHART_IMAGES: three archives (mic, nmi, app): {p:?}")
        })?;
        return Ok(Images { mic, nmi, app });
    }
    let mut script = Command::new("bash");
    script
        .arg("scripts/images.sh")
        .current_dir(aadpodid_testkit::repo_root())
        .stderr(Stdio::inherit());
    let built = output_within(&mut script, "scripts/images.sh", IMAGES_LIMIT)?;
    ensure!(
        built.status.success(),
        "scripts/images.sh: {}",
        built.status
    );
    let stdout = String::from_utf8(built.stdout)?;
    let archive = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(PathBuf::from)
            .with_context(|| format!("no `{name} <archive>` line in {stdout:?}"))
    };
    Ok(Images {
        mic: archive("mic")?,
        nmi: archive("nmi")?,
        app: archive("app")?,
    })
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
            .map(|c| format!("--- {c}:\n{}", container_log(nodes, RELEASE, c, 40)))
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
/// which listen inside their namespaces); the last `lines` lines of each.
fn container_log(nodes: &[&RealNode], ns: &str, name: &str, lines: usize) -> String {
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
                    out.push_str(&tail(&file.path(), lines));
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
        container_log(nodes, RELEASE, "mic", 40),
        container_log(nodes, RELEASE, "nmi", 40),
    )
}
