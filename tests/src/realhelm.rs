//! A chart on real nodes, shared by `tests/tests/real_helm.rs` (this
//! project's chart) and `tests/tests/real_migration.rs` (upstream's chart,
//! then the upgrade to this one): a private cluster with its controller
//! manager and scheduler, the emulator, two real nodes (kubelet, containerd,
//! runc, each in a network namespace of the test, its Node's providerID
//! naming its emulated scale-set instance) with the cloud inside them
//! (169.254.169.254 the emulator's IMDS for that machine, ARM and Entra ID
//! at 10.253.0.1 over TLS with a certificate of the test's own CA), the
//! images of `scripts/images.sh` in both nodes; then the seed manifests, an
//! application pod asking for a token once a second, and the checks and
//! diagnostics both tests use.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aadpodid_testkit::realcloud::{CloudCa, NodeCloud};
use aadpodid_testkit::realnode::{ControlPlane, RealNode, image_of_binary, node_bin_dir};
use aadpodid_testkit::tenant::{
    self, APP_CLIENT, APP_ID, APP_RG, APP2_CLIENT, APP2_ID, KUBELET, MicCloud, MicCloudFiles,
    NODE_RG, Tenant,
};
use aadpodid_testkit::tools::output_within;
use aadpodid_testkit::{ClusterOptions, PrivateCluster, fill_template, fixture, helm, wait_for};
use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

/// The emulated scale set whose instances the nodes are.
pub const VMSS: &str = "realpool";
/// The release and its namespace.
pub const RELEASE: &str = "aad-pod-identity";
/// Where the application pod and the seed objects go.
pub const APP_NS: &str = "demo";
/// Bound on the nodes' registering Ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on mic's replicas and nmi's pods becoming Ready.
pub const WORKLOADS_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound on an application pod's first token.
pub const TOKEN_TIMEOUT: Duration = Duration::from_secs(150);
/// The application image (`scripts/images.sh`): Python and the Azure SDK,
/// `/app/token.py`.
const APP_IMAGE: &str = "localhost/aadpodid-app:";
/// The image seed 004's pod names.
const DEMO_IMAGE: &str = "mcr.microsoft.com/oss/azure/aad-pod-identity/demo:v1.6.3";
/// The identity `az aks pod-identity add --name` makes for seed 004.
const DEMO_IDENTITY: &str = "my-pod-identity";
/// How many lines of the application's log the checks read.
pub const TRIES_KEPT: usize = 5000;
/// Bound on building the images (cargo release builds when not cached).
const IMAGES_LIMIT: Duration = Duration::from_secs(2400);
/// The application pod the seeds' binding selects.
pub const APP_POD: &str = "app";

/// A folder of the test's own, removed on drop (also when the test fails).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new folder under the system's temporary folder.
    pub fn new(prefix: &str) -> anyhow::Result<TempDir> {
        let dir = std::env::temp_dir().join(aadpodid_testkit::unique_name(prefix));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Each step's name and how long after the start it ended.
#[derive(Debug)]
pub struct Steps {
    label: &'static str,
    started: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Steps {
    /// Starts the clock; `label` prefixes what is printed.
    pub fn new(label: &'static str) -> Steps {
        Steps {
            label,
            started: Instant::now(),
            done: Vec::new(),
        }
    }

    /// Step `name` ended now.
    pub fn mark(&mut self, name: &'static str) {
        let at = self.started.elapsed();
        eprintln!("{}: {name} after {at:.1?}", self.label);
        self.done.push((name, at));
    }

    /// Prints every step with its end time.
    pub fn print(&self) {
        let summary: Vec<String> = self
            .done
            .iter()
            .map(|(n, d)| format!("{n} {:.1}s", d.as_secs_f64()))
            .collect();
        eprintln!("{} steps: {}", self.label, summary.join(", "));
    }
}

/// Runs `scripts/images.sh <names>` (building, or reusing its cache) and
/// returns its `<name> <archive>` lines, in the order of `names`.
pub fn build_images(names: &[&str]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut script = Command::new("bash");
    script
        .arg("scripts/images.sh")
        .args(names)
        .current_dir(aadpodid_testkit::repo_root())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    let built = output_within(&mut script, "scripts/images.sh", IMAGES_LIMIT)?;
    ensure!(
        built.status.success(),
        "scripts/images.sh: {}",
        built.status
    );
    let stdout = String::from_utf8(built.stdout)?;
    names
        .iter()
        .map(|name| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .map(|path| (name.to_string(), PathBuf::from(path)))
                .with_context(|| format!("no `{name} <archive>` line in {stdout:?}"))
        })
        .collect()
}

/// The OCI archives of the chart's images and the application image.
#[derive(Debug)]
pub struct Images {
    /// mic.
    pub mic: PathBuf,
    /// nmi.
    pub nmi: PathBuf,
    /// The application image.
    pub app: PathBuf,
}

/// The OCI archives of this project's images and the application image,
/// from `scripts/images.sh`, or the three paths (mic, nmi, app) in
/// `$AADPODID_CHART_IMAGES` when set.
pub fn chart_images() -> anyhow::Result<Images> {
    let paths: Vec<PathBuf> = match std::env::var("AADPODID_CHART_IMAGES") {
        Ok(given) => given.split_whitespace().map(PathBuf::from).collect(),
        Err(_) => build_images(&["mic", "nmi", "app"])?
            .into_iter()
            .map(|(_, p)| p)
            .collect(),
    };
    let [mic, nmi, app] = <[PathBuf; 3]>::try_from(paths).map_err(|p| {
        anyhow::anyhow!("AADPODID_CHART_IMAGES: three archives (mic, nmi, app): {p:?}")
    })?;
    Ok(Images { mic, nmi, app })
}

/// An image reference split as charts take it:
/// `<repository>/<name>:<tag>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Everything before the last `/`.
    pub repository: String,
    /// Between the last `/` and the tag.
    pub name: String,
    /// After the last `:`.
    pub tag: String,
}

impl ImageRef {
    /// Splits `reference`.
    pub fn parse(reference: &str) -> anyhow::Result<ImageRef> {
        let (path, tag) = reference
            .rsplit_once(':')
            .with_context(|| format!("no tag in {reference}"))?;
        let (repository, name) = path
            .rsplit_once('/')
            .with_context(|| format!("no repository in {reference}"))?;
        Ok(ImageRef {
            repository: repository.into(),
            name: name.into(),
            tag: tag.into(),
        })
    }

    /// The whole reference.
    pub fn reference(&self) -> String {
        format!("{}/{}:{}", self.repository, self.name, self.tag)
    }
}

/// Everything a test brings up, in the order it is torn down.
pub struct Up {
    /// Each node's cloud (same order as `nodes`).
    pub clouds: Vec<NodeCloud>,
    /// The two nodes.
    pub nodes: Vec<RealNode>,
    /// The controller manager and the scheduler.
    pub plane: ControlPlane,
    /// The emulator.
    pub emu: azure_emulator::Emulator,
    /// An admin client of the cluster.
    pub client: kube::Client,
    /// The cluster.
    pub cluster: PrivateCluster,
    /// The cloud's CA (`ca.ca`: the file a client trusts).
    pub ca: CloudCa,
    /// azure.json and the custom-cloud file (ARM at 10.253.0.1) for MIC.
    pub files: MicCloudFiles,
    /// An empty file for nmi's `kubeletConfig`.
    pub kubelet_config: PathBuf,
    /// The images the nodes hold.
    pub held: Vec<String>,
    /// The test's folder.
    pub dir: TempDir,
}

/// Starts the cluster with its control plane, the emulator and two real
/// nodes with the cloud inside them, imports `archives` (and seed 004's
/// demo image) into both, and waits until they are Ready; writes the files
/// the charts mount from the node (hostPath: one host, so one copy serves
/// both nodes).
pub async fn start(steps: &mut Steps, archives: &[&Path]) -> anyhow::Result<Up> {
    let cluster = PrivateCluster::start_with(ClusterOptions {
        service_account_admission: true,
    })
    .await?;
    let client = cluster.admin_client().await?;
    let plane = ControlPlane::start(&cluster)?;
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
    let mut all: Vec<&Path> = archives.to_vec();
    all.push(&demo);
    std::thread::scope(|scope| {
        let imports: Vec<_> = nodes
            .iter()
            .map(|node| {
                let all = &all;
                scope.spawn(move || all.iter().try_for_each(|a| node.import_image(a)))
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

    let files =
        tenant::write_mic_cloud_files(dir, "", &MicCloud::standard(), &CloudCa::environment())?;
    let kubelet_config = dir.join("kubelet-default");
    std::fs::write(&kubelet_config, "")?;
    let held = nodes[0].images()?;
    Ok(Up {
        clouds,
        nodes,
        plane,
        emu,
        client,
        cluster,
        ca,
        files,
        kubelet_config,
        held,
        dir: temp,
    })
}

impl std::fmt::Debug for Up {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Up")
            .field(
                "nodes",
                &self.nodes.iter().map(RealNode::name).collect::<Vec<_>>(),
            )
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Up {
    /// The nodes, borrowed.
    pub fn node_refs(&self) -> Vec<&RealNode> {
        self.nodes.iter().collect()
    }

    /// The image the nodes hold whose reference starts with `prefix`.
    pub fn image(&self, prefix: &str) -> anyhow::Result<ImageRef> {
        let found = self
            .held
            .iter()
            .find(|i| i.starts_with(prefix))
            .with_context(|| format!("no {prefix} image in {:?}", self.held))?;
        ImageRef::parse(found)
    }

    /// Runs `helm <args>` on the cluster; fails with what helm printed.
    pub fn helm(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = helm::run_on(self.cluster.kubeconfig(), args)?;
        ensure!(
            out.success,
            "helm {}: {}\n{}",
            args.first().unwrap_or(&""),
            out.stdout,
            out.stderr
        );
        Ok(out.stdout)
    }

    /// `helm <command> RELEASE charts/aad-pod-identity -n RELEASE <extra>`,
    /// then `--set-string k=v` for each of `strings` and `--set k=true` for
    /// each of `flags`, on the cluster.
    pub fn helm_chart(
        &self,
        command: &str,
        extra: &[&str],
        strings: &[(&str, String)],
        flags: &[&str],
    ) -> anyhow::Result<String> {
        let chart = helm::chart_dir().display().to_string();
        let mut args: Vec<String> = [command, RELEASE, &chart, "--namespace", RELEASE]
            .iter()
            .chain(extra)
            .map(|a| a.to_string())
            .collect();
        for (k, v) in strings {
            args.extend(["--set-string".into(), format!("{k}={v}")]);
        }
        for flag in flags {
            args.extend(["--set".into(), format!("{flag}=true")]);
        }
        self.helm(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Waits until mic's Deployment has 2 ready replicas and nmi's DaemonSet
    /// a ready pod on each node; on failure says what the pods, their logs
    /// and the nodes' logs show.
    pub async fn wait_workloads(&mut self) -> anyhow::Result<()> {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), RELEASE);
        let daemonsets: Api<DaemonSet> = Api::namespaced(self.client.clone(), RELEASE);
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
        match result {
            Ok(()) => Ok(()),
            Err(e) => Err(self.workload_failure(e).await),
        }
    }

    /// Waits until the release's pods are exactly two mic pods of `mic` and
    /// two nmi pods of `nmi`, all Ready (the pods of other images gone).
    pub async fn wait_pods_of(&mut self, mic: &str, nmi: &str) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), RELEASE);
        let result = wait_for(
            "mic and nmi pods of the new images Ready",
            WORKLOADS_TIMEOUT,
            || {
                let pods = pods.clone();
                async move {
                    let listed = pods.list(&ListParams::default()).await.ok()?;
                    let mut counts = (0, 0);
                    for pod in &listed.items {
                        let name = pod.metadata.name.clone().unwrap_or_default();
                        let image = pod
                            .spec
                            .as_ref()
                            .and_then(|s| s.containers.first())
                            .and_then(|c| c.image.clone())
                            .unwrap_or_default();
                        let ready = pod
                            .status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|c| {
                                c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                            });
                        let want = if name.contains("-mic-") {
                            counts.0 += 1;
                            mic
                        } else if name.contains("-nmi-") {
                            counts.1 += 1;
                            nmi
                        } else {
                            continue;
                        };
                        if image != want || !ready || pod.metadata.deletion_timestamp.is_some() {
                            return None;
                        }
                    }
                    (counts == (2, 2)).then_some(())
                }
            },
        )
        .await;
        match result {
            Ok(()) => Ok(()),
            Err(e) => Err(self.workload_failure(e).await),
        }
    }

    /// `e` with the release's pods, mic's and nmi's logs and the nodes' logs.
    async fn workload_failure(&mut self, e: anyhow::Error) -> anyhow::Error {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), RELEASE);
        let states: Vec<String> = match pods.list(&ListParams::default()).await {
            Ok(listed) => listed
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
                .collect(),
            Err(list) => vec![format!("{list:#}")],
        };
        let nodes: Vec<&RealNode> = self.nodes.iter().collect();
        let logs: Vec<String> = ["mic", "nmi"]
            .iter()
            .map(|c| format!("--- {c}:\n{}", container_log(&nodes, RELEASE, c, 40)))
            .collect();
        if let Err(down) = self.plane.check_running() {
            return down.context(format!("{e:#}"));
        }
        anyhow::anyhow!(
            "{e:#}\npods:\n{}\ncontainer logs:\n{}\nnodes:\n{}",
            states.join("\n"),
            logs.join("\n"),
            nodes
                .iter()
                .map(|n| n.logs(20))
                .collect::<Vec<_>>()
                .join("\n")
        )
    }

    /// Applies the seed manifests unchanged (seed 002's AzureIdentity and
    /// binding; what `az aks pod-identity add` creates and seed 004's pod),
    /// starts the application pod and waits until it has its token (its
    /// identity put on the scale set) and seed 004's pod is Assigned.
    pub async fn seed(&self, steps: &mut Steps) -> anyhow::Result<()> {
        let identity = tenant::uai_id(APP_RG, APP_ID);
        let demo_identity = tenant::uai_id(APP_RG, APP2_ID);
        let vars = [
            ("UAIName", APP_ID),
            ("UAIId", identity.as_str()),
            ("UAIClientId", APP_CLIENT),
            ("KVName", "kv-demo"),
        ];
        let cluster = &self.cluster;
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
        self.start_app(APP_POD).await?;
        // MIC put the identity on the app's node's scale set through ARM.
        let on_vmss = self.emu.assigned_identities(VMSS).unwrap_or_default();
        ensure!(
            on_vmss.iter().any(|i| i.eq_ignore_ascii_case(&identity)),
            "{on_vmss:?}"
        );
        steps.mark("app pod's token through 169.254.169.254");
        // Seed 004's pod gets its identity too: MIC assigns it and puts it on
        // the scale set.
        wait_for("seed 004's pod Assigned", TOKEN_TIMEOUT, || async move {
            let list = self.assigned().ok()?;
            list.iter()
                .any(|a| a["spec"]["pod"] == "demo" && a["status"]["status"] == "Assigned")
                .then_some(())
        })
        .await
        .map_err(|e| e.context(self.diagnostics()))?;
        let on_vmss = self.emu.assigned_identities(VMSS).unwrap_or_default();
        ensure!(
            on_vmss
                .iter()
                .any(|i| i.eq_ignore_ascii_case(&demo_identity)),
            "{on_vmss:?}"
        );
        steps.mark("seed 004's pod Assigned");
        Ok(())
    }

    /// Starts application pod `name` (labelled for seed 002's binding) and
    /// waits until its first try got a token for the identity.
    pub async fn start_app(&self, name: &str) -> anyhow::Result<()> {
        let image = self.image(APP_IMAGE)?.reference();
        let app = app_pod(&image, &format!("{APP_ID}-binding"), name);
        let out = self
            .cluster
            .kubectl_run(&["apply", "-n", APP_NS, "-f", "-"], Some(&app))?;
        ensure!(out.success, "pod {name}: {}", out.stderr);
        let first = wait_for("the app's token", TOKEN_TIMEOUT, || async move {
            self.tries(name).into_iter().find(|t| t["ok"] == true)
        })
        .await
        .map_err(|e| {
            e.context(format!(
                "{name}'s log: {}\n{}",
                container_log(&self.node_refs(), APP_NS, name, 40),
                self.diagnostics()
            ))
        })?;
        ensure!(
            first["appid"]
                .as_str()
                .is_some_and(|a| a.eq_ignore_ascii_case(APP_CLIENT)),
            "{first}"
        );
        Ok(())
    }

    /// The tries of application pod `name`, from its log.
    pub fn tries(&self, name: &str) -> Vec<serde_json::Value> {
        tries(&container_log(&self.node_refs(), APP_NS, name, TRIES_KEPT))
    }

    /// The AzureAssignedIdentities of the cluster.
    pub fn assigned(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let list = helm::get_json(&self.cluster, &["azureassignedidentities", "-A"])?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    /// The names of nmi's pods (the DaemonSet's, in the release namespace).
    pub async fn nmi_pods(&self) -> anyhow::Result<Vec<String>> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), RELEASE);
        let listed = pods.list(&ListParams::default()).await?;
        Ok(listed
            .items
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .filter(|n| n.contains("nmi"))
            .collect())
    }

    /// The application pod's node and address.
    pub async fn app_placement(&self) -> anyhow::Result<(String, String)> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), APP_NS);
        let pod = pods.get(APP_POD).await?;
        let node = pod.spec.and_then(|s| s.node_name);
        let ip = pod.status.and_then(|s| s.pod_ip);
        node.zip(ip)
            .context("the app pod has no node or no address yet")
    }

    /// No IMDS relay of a node logged a pod's address (only nmi's, from the
    /// node's own network, reached IMDS), and the application's node's relay
    /// logged some connection. Returns how many connections each node's relay
    /// logged.
    pub async fn check_imds_callers(&self) -> anyhow::Result<Vec<usize>> {
        let (app_node, _) = self.app_placement().await?;
        let mut calls = Vec::new();
        for (node, cloud) in self.nodes.iter().zip(&self.clouds) {
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
                !peers.is_empty() || node.name() != app_node,
                "no IMDS call on the app's node"
            );
            calls.push(peers.len());
        }
        Ok(calls)
    }

    /// What the cluster says about the application's pod and identities.
    pub fn diagnostics(&self) -> String {
        let get = |args: &[&str]| {
            self.cluster
                .kubectl_run(args, None)
                .map(|o| format!("{}{}", o.stdout, o.stderr))
                .unwrap_or_else(|e| format!("{e:#}"))
        };
        let nodes = self.node_refs();
        format!(
            "pods: {}\nassigned: {}\nmic: {}\nnmi: {}",
            get(&["get", "pods", "-A", "-o", "wide"]),
            get(&["get", "azureassignedidentities", "-A", "-o", "yaml"]),
            container_log(&nodes, RELEASE, "mic", 40),
            container_log(&nodes, RELEASE, "nmi", 40),
        )
    }

    /// Tears everything down and checks that the nodes left nothing behind.
    pub fn tear_down(self, steps: &mut Steps) -> anyhow::Result<()> {
        let Up {
            clouds,
            nodes,
            mut plane,
            emu,
            client,
            cluster,
            dir,
            ..
        } = self;
        plane.check_running()?;
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
        drop((emu, client, cluster, dir));
        steps.mark("torn down");
        Ok(())
    }
}

/// Waits until no nat table of the nodes has nmi's `aad-metadata` chain.
pub async fn wait_no_redirect(nodes: &[RealNode]) -> anyhow::Result<()> {
    for node in nodes {
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
    Ok(())
}

/// An application pod (pod and container `name`): labelled for `binding`,
/// it asks for an ARM token with the Python Azure SDK's
/// `ManagedIdentityCredential` (the identity's client ID) once a second, a
/// bounded number of times; each try prints one JSON line
/// (`{"ok": true, "appid": ..}` or `{"ok": false, "error": ..}`).
fn app_pod(image: &str, binding: &str, name: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"aadpodidbinding": binding}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": name,
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

/// The application's tries in its log: the lines that are JSON objects
/// with an `ok` field (the SDK's warnings on stderr are not).
pub fn tries(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("ok").is_some())
        .collect()
}

/// The tries from the first one that got a token on, and those of them
/// that did not.
pub fn after_first_token(
    all: Vec<serde_json::Value>,
) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let after: Vec<serde_json::Value> = all.into_iter().skip_while(|t| t["ok"] != true).collect();
    let failed = after.iter().filter(|t| t["ok"] != true).cloned().collect();
    (after, failed)
}

/// The logs of every container whose pod is in `ns` and whose name (pod's
/// or container's) starts with `name`, on any of `nodes`, read from the
/// kubelet's pod log folders (the apiserver cannot reach the kubelets,
/// which listen inside their namespaces); the last `lines` lines of each.
pub fn container_log(nodes: &[&RealNode], ns: &str, name: &str, lines: usize) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_refs_split_as_charts_take_them() -> anyhow::Result<()> {
        let ours = ImageRef::parse("localhost/aad-pod-identity/mic:v1.8.17-rs.0")?;
        assert_eq!(ours.repository, "localhost/aad-pod-identity");
        assert_eq!(ours.name, "mic");
        assert_eq!(ours.tag, "v1.8.17-rs.0");
        assert_eq!(
            ours.reference(),
            "localhost/aad-pod-identity/mic:v1.8.17-rs.0"
        );
        let upstream = ImageRef::parse("localhost/upstream-nmi:v1.8.17")?;
        assert_eq!(
            (upstream.repository.as_str(), upstream.name.as_str()),
            ("localhost", "upstream-nmi")
        );
        assert!(ImageRef::parse("no-tag").is_err());
        Ok(())
    }
}
