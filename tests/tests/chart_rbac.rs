//! RBAC proof for the chart: MIC and NMI run as the real commands (`e2e-mic`,
//! `e2e-nmi`) with the container args the chart renders, authenticated as the
//! chart's ServiceAccounts (TokenRequest tokens) and authorized only by the
//! chart's rendered ClusterRoles/Roles and bindings, against the RBAC-enabled
//! test apiserver:
//! - MIC does its whole job: pod + binding -> AzureAssignedIdentity Assigned
//!   and the identity on the emulated scale set, recorded in the ConfigMap
//!   the chart's Role covers, then removed again.
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
//! - One verb taken out of a rendered ClusterRole makes each job fail.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aadpodid_api::AzureAssignedIdentity;
use aadpodid_tests::helm::{self, Render};
use aadpodid_tests::netns::{IMDS_ADDRESS, Node};
use aadpodid_tests::tenant::{
    self, APP_CLIENT, APP_ID, APP_RG, CloudEnvironment, KUBELET, MicCloud, MicCloudFiles, Tenant,
};
use aadpodid_tests::{Cluster, TENANT, TempNamespace, free_ports, unique_name, wait_for};
use anyhow::{Context as _, anyhow, ensure};
use azure_emulator::Emulator;
use azure_emulator::config::LroMode;
use kube::Api;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// MIC acts on every pod and AzureAssignedIdentity of the cluster: while the
/// MIC test runs it would retire the AzureAssignedIdentities the NMI tests
/// write by hand (seen as a flaky NMI token test). The MIC test takes this
/// lock exclusively, the NMI tests share it.
static MIC_RUNS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A release of the chart in its own namespace, with cluster-scoped names of
/// its own (`fullnameOverride`).
struct Release {
    cluster: &'static Cluster,
    ns: TempNamespace,
    name: String,
    docs: Vec<Value>,
}

impl Release {
    async fn render(prefix: &str, extra: &[(&str, &str)]) -> anyhow::Result<Release> {
        let ns = Cluster::shared().temp_namespace(prefix).await?;
        let name = unique_name(prefix);
        let mut r = values(&name, &ns);
        for (k, v) in extra {
            r = r.set(k, v);
        }
        Release::of(name, ns, &r)
    }

    /// The release `name` in `ns` as `r` renders it.
    fn of(name: String, ns: TempNamespace, r: &Render) -> anyhow::Result<Release> {
        Ok(Release {
            cluster: Cluster::shared(),
            docs: helm::template(r)?,
            ns,
            name,
        })
    }

    fn get(&self, kind: &str, name: &str) -> anyhow::Result<Value> {
        helm::find(&self.docs, kind, name).with_context(|| format!("no {kind} {name}"))
    }

    fn mic(&self) -> String {
        format!("{}-mic", self.name)
    }

    fn nmi(&self) -> String {
        format!("{}-nmi", self.name)
    }

    /// The rendered RBAC objects of `component` (ServiceAccount,
    /// ClusterRole/Roles and bindings, all named `<release>-<component>...`).
    fn rbac_objects(&self, component: &str) -> Vec<Value> {
        let name = format!("{}-{component}", self.name);
        helm::objects(&self.docs)
            .into_iter()
            .filter(|o| {
                let kind = o["kind"].as_str().unwrap_or_default();
                let is_rbac = matches!(
                    kind,
                    "ServiceAccount"
                        | "ClusterRole"
                        | "ClusterRoleBinding"
                        | "Role"
                        | "RoleBinding"
                );
                let named = o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(&name));
                is_rbac && named
            })
            .collect()
    }

    /// Applies the RBAC objects of `component` after `edit` may change them.
    fn apply_rbac(
        &self,
        component: &str,
        edit: impl Fn(&mut Value) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut items = self.rbac_objects(component);
        for o in &mut items {
            edit(o)?;
        }
        assert!(
            items.len() >= 5,
            "{component}: {} RBAC objects",
            items.len()
        );
        submit(self.cluster, &APPLY_SERVER_SIDE, &list(items)).context("apply RBAC")
    }

    /// A kubeconfig with a TokenRequest token of the chart's ServiceAccount,
    /// pointing at `server` (default: the apiserver itself).
    async fn sa_kubeconfig(
        &self,
        component: &str,
        server: Option<&str>,
        dir: &Path,
    ) -> anyhow::Result<PathBuf> {
        let path = self
            .cluster
            .service_account_kubeconfig(self.ns.name(), &format!("{}-{component}", self.name))
            .await?;
        let text = std::fs::read_to_string(&path)?;
        let text = match server {
            Some(s) => text.replace(self.cluster.server(), s),
            None => text,
        };
        let out = dir.join(format!("{component}.kubeconfig"));
        std::fs::write(&out, text)?;
        Ok(out)
    }

    fn delete_cluster_scoped(&self) {
        for kind in ["clusterrole", "clusterrolebinding"] {
            for n in [self.mic(), self.nmi()] {
                let _ = self
                    .cluster
                    .kubectl_run(&["delete", kind, &n, "--ignore-not-found"], None);
            }
        }
    }
}

/// The chart's values every release of these tests sets: its own
/// cluster-scoped names, the leader-election Lease in its namespace, no
/// exception for MIC.
fn values(name: &str, ns: &TempNamespace) -> Render {
    Render::new(name, ns.name())
        .set("fullnameOverride", name)
        .set("mic.leaderElection.namespace", ns.name())
        .set("installMICException", "false")
}

/// Removes `verb` from every rule of a (Cluster)Role that grants it on `resource`.
fn without_verb(
    resource: &'static str,
    verb: &'static str,
) -> impl Fn(&mut Value) -> anyhow::Result<()> {
    move |o: &mut Value| {
        if o["kind"] != "ClusterRole" {
            return Ok(());
        }
        let rules = o["rules"].as_array_mut().context("a ClusterRole's rules")?;
        for rule in rules {
            let resources = rule["resources"].as_array().context("a rule's resources")?;
            if resources.iter().any(|r| r == resource) {
                let verbs = rule["verbs"].as_array_mut().context("a rule's verbs")?;
                let before = verbs.len();
                verbs.retain(|v| v != verb);
                assert_eq!(verbs.len() + 1, before, "{resource} had {verb}");
            }
        }
        Ok(())
    }
}

/// `kubectl apply --server-side`.
const APPLY_SERVER_SIDE: [&str; 2] = ["apply", "--server-side"];

/// `kubectl <args> -f -` with `objects` on stdin; kubectl's message when it fails.
fn submit(cluster: &Cluster, args: &[&str], objects: &Value) -> anyhow::Result<()> {
    let all: Vec<&str> = args.iter().copied().chain(["-f", "-"]).collect();
    let out = cluster.kubectl_run(&all, Some(&objects.to_string()))?;
    ensure!(out.success, "kubectl {}: {}", args.join(" "), out.stderr);
    Ok(())
}

/// A `v1` List of `items`.
fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `r`, or its error with the log of `who` at `path`.
fn with_log<T>(r: anyhow::Result<T>, who: &str, path: &Path) -> anyhow::Result<T> {
    r.map_err(|e| anyhow!("{e}\n{who} log:\n{}", log_of(path)))
}

// ---------------------------------------------------------------- MIC

/// The emulated tenant MIC works on: one scale-set node, MIC's files.
struct MicWorld {
    emu: Emulator,
    dir: PathBuf,
    files: MicCloudFiles,
    vmss: String,
    node: String,
}

impl MicWorld {
    async fn new(cluster: &Cluster) -> anyhow::Result<MicWorld> {
        let dir = std::env::temp_dir().join(unique_name("chart-rbac-mic"));
        std::fs::create_dir_all(&dir)?;
        let vmss = unique_name("rbac-vmss");
        let mut seeds = Tenant::standard().scale_set(&vmss, 1, &[KUBELET]);
        seeds.config_mut().arm.lro_mode = LroMode::Sync;
        let emu = seeds.start().await?;
        let files = tenant::write_mic_cloud_files(
            &dir,
            "",
            &MicCloud::standard(),
            &CloudEnvironment::of(&emu),
        )?;
        let node = unique_name("rbac-node");
        let provider_id = tenant::vmss_provider_id(tenant::NODE_RG, &vmss, 0);
        let object = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node},
            "spec": {"providerID": provider_id},
        });
        submit(cluster, &["apply"], &object)?;
        Ok(MicWorld {
            emu,
            dir,
            files,
            vmss,
            node,
        })
    }

    fn on_vmss(&self) -> bool {
        self.emu
            .assigned_identities(&self.vmss)
            .unwrap_or_default()
            .contains(&tenant::uai_id(APP_RG, APP_ID).to_lowercase())
    }

    /// Starts `e2e-mic` with the rendered args (azure.json at the test's
    /// path), as the chart's ServiceAccount.
    fn start_mic(&self, rel: &Release, kubeconfig: &Path, log: &Path) -> anyhow::Result<Child> {
        let deploy = rel.get("Deployment", &rel.mic())?;
        let args: Vec<String> = helm::container_args(&deploy)
            .into_iter()
            .map(|a| {
                if a.starts_with("--cloudconfig=") {
                    format!("--cloudconfig={}", self.files.azure_json.display())
                } else {
                    a
                }
            })
            .chain([
                format!("--kubeconfig={}", kubeconfig.display()),
                "--identity-assignment-reconcile-interval=2s".into(),
            ])
            .collect();
        Command::new(env!("CARGO_BIN_EXE_e2e-mic"))
            .args(&args)
            // What the pod gets: the downward API and the custom-cloud file.
            .env("MIC_POD_NAMESPACE", rel.ns.name())
            .env("FORCENAMESPACED", "false")
            .env("HOSTNAME", format!("{}-0", rel.mic()))
            .env(
                tenant::ENV_AZURE_ENVIRONMENT_FILEPATH,
                &self.files.environment,
            )
            .env("SSL_CERT_FILE", self.emu.ca_bundle_path())
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .context("e2e-mic")
    }

    fn cleanup(&self, cluster: &Cluster) {
        let _ = cluster.kubectl_run(&["delete", "node", &self.node, "--ignore-not-found"], None);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Applies, in `ns`, the AzureIdentity `app-id` (the tenant's app
/// identity), its binding `app-binding` to `selector`, and pod `pod` on
/// `node` with that selector.
fn apply_identity_binding_pod(
    cluster: &Cluster,
    ns: &str,
    pod: &str,
    selector: &str,
    node: &str,
) -> anyhow::Result<()> {
    let objs = list(vec![
        json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
         "metadata": {"name": "app-id", "namespace": ns},
         "spec": {"type": 0, "resourceID": tenant::uai_id(APP_RG, APP_ID), "clientID": APP_CLIENT}}),
        json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
         "metadata": {"name": "app-binding", "namespace": ns},
         "spec": {"azureIdentity": "app-id", "selector": selector}}),
        json!({"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": pod, "namespace": ns, "labels": {"aadpodidbinding": selector}},
         "spec": {"nodeName": node, "containers": [{"name": "c", "image": "example.invalid/app"}]}}),
    ]);
    submit(cluster, &["apply"], &objs)
}

async fn aai(ns: &str) -> Option<AzureAssignedIdentity> {
    let client = Cluster::shared().admin_client().await.ok()?;
    Api::<AzureAssignedIdentity>::namespaced(client, "default")
        .get_opt(&format!("web-{ns}-app-id"))
        .await
        .ok()?
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// `kubectl <args> -n <ns>`; what it printed.
fn kubectl_in(
    cluster: &Cluster,
    ns: &str,
    args: &[&str],
) -> anyhow::Result<aadpodid_tests::KubectlOutput> {
    let args: Vec<&str> = args.iter().copied().chain(["-n", ns]).collect();
    cluster.kubectl_run(&args, None)
}

/// Deletes pod `web` at once (no kubelet runs to finish a graceful deletion).
const FORCE_DELETE_WEB: [&str; 5] = ["delete", "pod", "web", "--grace-period=0", "--force"];

/// MIC with exactly the chart's rules does its whole job; without `create`
/// on AzureAssignedIdentities it cannot. One test: two MICs at once would
/// both act on every pod of the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mic_does_its_job_with_the_chart_rbac_and_fails_without_one_verb() -> anyhow::Result<()> {
    let _exclusive = MIC_RUNS.write().await;
    let cluster = Cluster::shared();
    let world = MicWorld::new(cluster).await?;
    for (case, broken) in [("full", false), ("no-create", true)] {
        let [probe, metrics] = free_ports()?.map(|p| p.to_string());
        let rel = Release::render(
            &format!("rbac-mic-{case}"),
            &[("mic.probePort", &probe), ("mic.prometheusPort", &metrics)],
        )
        .await?;
        if broken {
            rel.apply_rbac("mic", without_verb("azureassignedidentities", "create"))?;
        } else {
            rel.apply_rbac("mic", |_| Ok(()))?;
        }
        let kubeconfig = rel.sa_kubeconfig("mic", None, &world.dir).await?;
        let log = world.dir.join(format!("mic-{case}.log"));
        let mut mic = world.start_mic(&rel, &kubeconfig, &log)?;
        apply_identity_binding_pod(cluster, rel.ns.name(), "web", "rbac-app", &world.node)?;
        let ns = rel.ns.name().to_string();
        if !broken {
            let r = wait_for("AAI Assigned", WAIT, || async {
                aai(&ns)
                    .await
                    .filter(|a| a.status.as_ref().is_some_and(|s| s.status == "Assigned"))
            })
            .await;
            if r.is_err() {
                stop(&mut mic);
            }
            with_log(r, "MIC", &log)?;
            assert!(world.on_vmss(), "identity on the scale set");
            // What MIC added is recorded in the one ConfigMap its Role covers.
            let owned = kubectl_in(
                cluster,
                &ns,
                &[
                    "get",
                    "configmap",
                    "aad-pod-identity-mic-owned",
                    "-o",
                    "name",
                ],
            )?;
            assert!(
                owned.success,
                "{}\nMIC log:\n{}",
                owned.stderr,
                log_of(&log)
            );
            // The Lease is in the namespace the chart's Role covers.
            let lease = kubectl_in(
                cluster,
                &ns,
                &["get", "lease", "aad-pod-identity-mic", "-o", "name"],
            )?;
            assert!(lease.success, "{}", lease.stderr);
            let del = kubectl_in(cluster, &ns, &FORCE_DELETE_WEB)?;
            assert!(del.success, "{}", del.stderr);
            let r = wait_for("identity removed", WAIT, || async {
                (aai(&ns).await.is_none() && !world.on_vmss()).then_some(())
            })
            .await;
            stop(&mut mic);
            with_log(r, "MIC", &log)?;
            assert!(!log_of(&log).contains("forbidden"), "{}", log_of(&log));
        } else {
            // The apiserver refuses the create; nothing is assigned.
            let r = wait_for("MIC's create refused", WAIT, || async {
                log_of(&log).contains("forbidden").then_some(())
            })
            .await;
            stop(&mut mic);
            with_log(r, "MIC", &log)?;
            assert!(
                aai(&ns).await.is_none(),
                "no AzureAssignedIdentity without create"
            );
            let _ = kubectl_in(cluster, &ns, &FORCE_DELETE_WEB);
        }
        rel.delete_cluster_scoped();
    }
    world.cleanup(cluster);
    Ok(())
}

// ---------------------------------------------------------------- NMI

const API_RELAY_PORT: u16 = 6443;

/// A test node (network namespace) whose `127.0.0.1:6443` reaches the
/// apiserver through a Unix socket (nothing is added to the root namespace).
struct NmiNode {
    node: Node,
    dir: PathBuf,
    relay: Child,
    name: String,
    /// IMDS of this node's VM, behind 169.254.169.254:80 inside the node.
    emu: Emulator,
}

impl Drop for NmiNode {
    fn drop(&mut self) {
        stop(&mut self.relay);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl NmiNode {
    /// A kubeconfig of the chart's NMI ServiceAccount whose server is the
    /// node's relay to the apiserver.
    async fn nmi_kubeconfig(&self, rel: &Release) -> anyhow::Result<PathBuf> {
        let server = format!("https://127.0.0.1:{API_RELAY_PORT}");
        rel.sa_kubeconfig("nmi", Some(&server), &self.dir).await
    }

    async fn new(cluster: &Cluster) -> anyhow::Result<NmiNode> {
        let dir = std::env::temp_dir().join(unique_name("chart-rbac-nmi"));
        std::fs::create_dir_all(&dir)?;
        let name = unique_name("rbac-nmi-node");
        // One VM in the app group, with a system identity and app-id.
        let mut cfg = azure_emulator::Config::new(TENANT, aadpodid_tests::SUB);
        cfg.resource_groups = vec![APP_RG.into()];
        cfg.identities = vec![tenant::identity_seed(APP_ID, APP_RG, APP_CLIENT)];
        cfg.virtual_machines = vec![tenant::vm_seed(&name, APP_RG, true, &[APP_ID])];
        let emu = Emulator::start(cfg).await?;
        let imds = emu
            .add_imds(&format!("vm/{name}"), "127.0.0.1:0".parse()?)
            .await?;
        let node = Node::with_pods(1)?;
        node.node.add_local_address(IMDS_ADDRESS)?;
        let api: SocketAddr = cluster.server().trim_start_matches("https://").parse()?;
        let relay = node
            .node
            .relay_many(
                &[
                    (SocketAddr::from(([127, 0, 0, 1], API_RELAY_PORT)), api),
                    (SocketAddr::from((IMDS_ADDRESS, 80)), imds),
                ],
                &dir,
            )
            .await?;
        // The kubelet flags file NMI checks (no kubenet here).
        std::fs::write(dir.join("kubelet"), "KUBELET_FLAGS=--network-plugin=cni\n")?;
        Ok(NmiNode {
            node,
            dir,
            relay,
            name,
            emu,
        })
    }

    /// A pod on this node (its network namespace's address) bound to
    /// `app-id` by a real AzureIdentity and AzureIdentityBinding, and the
    /// Assigned AzureAssignedIdentity MIC would write, in "default", embedding
    /// both with their UIDs, written with MIC's credentials `mic_kubeconfig`.
    /// Returns the AzureAssignedIdentity's name (in "default").
    fn bind_pod(
        &self,
        cluster: &Cluster,
        ns: &str,
        mic_kubeconfig: &Path,
    ) -> anyhow::Result<String> {
        let ip = self.node.pods[0].1.to_string();
        apply_identity_binding_pod(cluster, ns, "app", "app", &self.name)?;
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
            "metadata": {"name": name, "namespace": "default", "labels": {"nodename": self.name}},
            "spec": {"azureIdentityRef": embed("azureidentity", "app-id")?,
                     "azureBindingRef": embed("azureidentitybinding", "app-binding")?,
                     "pod": "app", "podNamespace": ns, "nodename": self.name},
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

    /// A token request from the pod, as an Azure SDK sends it: (status, body).
    /// Async: the node's IMDS is the emulator served by this test's runtime,
    /// so a blocking wait here could stall the very task that must answer.
    async fn pod_token_request(&self) -> anyhow::Result<(String, String)> {
        let mut cmd = self.node.pods[0].0.command("curl");
        cmd.args([
                "-s", "--max-time", "30", "-w", "\n%{http_code}", "-H", "Metadata: true",
                &format!("http://{IMDS_ADDRESS}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/"),
        ]);
        let out = tokio::process::Command::from(cmd).output().await?;
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = out.rsplit_once('\n').unwrap_or((&out, ""));
        Ok((code.trim().to_string(), body.to_string()))
    }

    /// Starts `e2e-nmi` in the node with the DaemonSet's rendered args and the
    /// env the kubelet would give its pod.
    fn start_nmi(
        &self,
        rel: &Release,
        pod: &str,
        kubeconfig: &Path,
        log: &Path,
    ) -> anyhow::Result<Child> {
        let ds = rel.get("DaemonSet", &rel.nmi())?;
        let args: Vec<String> = helm::container_args(&ds)
            .into_iter()
            .map(|a| {
                if a.starts_with("--kubelet-config=") {
                    format!("--kubelet-config={}", self.dir.join("kubelet").display())
                } else {
                    a.replace("$(NODE_NAME)", &self.name)
                }
            })
            .chain([format!("--kubeconfig={}", kubeconfig.display())])
            .collect();
        self.node
            .node
            .command(env!("CARGO_BIN_EXE_e2e-nmi"))
            .args(&args)
            .env("NODE_NAME", &self.name)
            .env("POD_NAME", pod)
            .env("POD_NAMESPACE", rel.ns.name())
            .env("FORCENAMESPACED", "false")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .context("e2e-nmi")
    }

    fn healthz(&self) -> String {
        self.node
            .node
            .run(
                "curl",
                &["-s", "--max-time", "1", "http://127.0.0.1:8085/healthz"],
            )
            .unwrap_or_default()
    }

    /// The redirect chain, or None when it does not exist.
    fn chain(&self) -> Option<String> {
        self.node
            .node
            .run("iptables", &["-t", "nat", "-S", "aad-metadata"])
            .ok()
            .filter(|s| s.contains("DNAT"))
    }

    async fn wait_active(&self, log: &Path) -> anyhow::Result<()> {
        let r = wait_for("nmi Active", WAIT, || async {
            (self.healthz() == "Active").then_some(())
        })
        .await;
        with_log(r, "NMI", log)
    }
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

/// SIGTERM, as the kubelet sends, and a bounded wait for the exit.
async fn terminate(child: &mut Child, log: &Path) -> anyhow::Result<()> {
    let out = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .output()?;
    assert!(out.status.success());
    let r = wait_for("nmi exits after SIGTERM", Duration::from_secs(20), || {
        let done = child.try_wait().ok().flatten().is_some();
        async move { done.then_some(()) }
    })
    .await;
    if r.is_err() {
        stop(child);
    }
    with_log(r, "NMI", log)
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
    let _shared = MIC_RUNS.read().await;
    let cluster = Cluster::shared();
    let node = NmiNode::new(cluster).await?;
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
    create_ds_pod(&rel, &node.name, &pod)?;
    let kc = node.nmi_kubeconfig(&rel).await?;

    let log1 = node.dir.join("nmi-1.log");
    let mut nmi = node.start_nmi(&rel, &pod, &kc, &log1)?;
    node.wait_active(&log1).await?;
    assert!(node.chain().is_some(), "redirect installed");
    assert!(!log_of(&log1).contains("forbidden"), "{}", log_of(&log1));
    // It serves a pod on the node the token of the identity it is bound to.
    // The admission policy the release installed admits only MIC's account.
    let mic_kc = rel.sa_kubeconfig("mic", None, &node.dir).await?;
    let aai_name = node.bind_pod(cluster, rel.ns.name(), &mic_kc)?;
    let _aai = DeleteOnDrop {
        cluster,
        args: vec![
            "azureassignedidentity".into(),
            aai_name,
            "-n".into(),
            "default".into(),
        ],
    };
    let (code, body) = node.pod_token_request().await?;
    assert_eq!(code, "200", "{body}\nNMI log:\n{}", log_of(&log1));
    let token: Value = serde_json::from_str(&body)?;
    assert_eq!(token["client_id"], APP_CLIENT, "{body}");
    let claims = node
        .emu
        .verify_token(&aadpodid_tests::e2e::access_token(&body)?)
        .map_err(|e| anyhow!("{e:?}"))?;
    assert_eq!(claims.appid, APP_CLIENT);

    // A restart (rolling update, crash, eviction): the redirect stays.
    terminate(&mut nmi, &log1).await?;
    assert!(
        node.chain().is_some(),
        "redirect kept over a restart:\n{}",
        log_of(&log1)
    );
    assert!(log_of(&log1).contains("fail-closed"), "{}", log_of(&log1));

    let log2 = node.dir.join("nmi-2.log");
    let mut nmi = node.start_nmi(&rel, &pod, &kc, &log2)?;
    node.wait_active(&log2).await?;
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
    terminate(&mut nmi, &log2).await?;
    assert!(
        node.chain().is_none(),
        "redirect removed after uninstall:\n{}",
        log_of(&log2)
    );
    assert!(
        log_of(&log2).contains("being uninstalled"),
        "{}",
        log_of(&log2)
    );
    Ok(())
}

/// Without `list` on AzureAssignedIdentities NMI never syncs its caches and
/// never becomes Active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nmi_without_one_verb_never_becomes_active() -> anyhow::Result<()> {
    let _shared = MIC_RUNS.read().await;
    let cluster = Cluster::shared();
    let node = NmiNode::new(cluster).await?;
    let rel = Release::render("rbac-nmi-broken", &[]).await?;
    rel.apply_rbac("nmi", without_verb("azureassignedidentities", "list"))?;
    let kc = node.nmi_kubeconfig(&rel).await?;
    let log = node.dir.join("nmi.log");
    // No DaemonSet pod: --cleanup-on-uninstall is off for this one (logged).
    let mut nmi = node.start_nmi(&rel, "no-such-pod", &kc, &log)?;
    let r = wait_for("NMI's list refused", WAIT, || async {
        log_of(&log).contains("forbidden").then_some(())
    })
    .await;
    let health = node.healthz();
    stop(&mut nmi);
    rel.delete_cluster_scoped();
    with_log(r, "NMI", &log)?;
    assert_eq!(health, "Not Active", "{}", log_of(&log));
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
    let _shared = MIC_RUNS.read().await;
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
    let _shared = MIC_RUNS.read().await;
    let cluster = Cluster::shared();
    let node = NmiNode::new(cluster).await?;
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
            args: vec!["node".into(), node.name.clone()],
        },
    ];
    let objs = list(vec![
        rel.get("ValidatingAdmissionPolicy", &policy)?,
        rel.get("ValidatingAdmissionPolicyBinding", &policy)?,
        // The DaemonSet object (no controller runs): its pod is created below.
        rel.get("DaemonSet", &rel.nmi())?,
    ]);
    submit(cluster, &APPLY_SERVER_SIDE, &objs)?;
    // The Node, created with the taint as the node pool would.
    let taints = json!([
        {"key": "other.example/keep", "value": "x", "effect": "NoSchedule"},
        {"key": KEY, "value": "true", "effect": "NoSchedule"},
    ]);
    let n = json!({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": node.name}, "spec": {"taints": taints}});
    submit(cluster, &["create"], &n)?;
    let keys = || -> anyhow::Result<Vec<String>> {
        let out = cluster.kubectl_run(
            &[
                "get",
                "node",
                &node.name,
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
    create_ds_pod(&rel, &node.name, &pod)?;
    // Unbound first (names no node): the policy refuses.
    let unbound = node.nmi_kubeconfig(&rel).await?;
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
    let bound = node.dir.join("nmi-bound.kubeconfig");
    std::fs::write(
        &bound,
        format!("{head}token: {}\n{tail}", out.stdout.trim()),
    )?;

    let waits_for = |log: &Path, what: &'static str| {
        let log = log.to_path_buf();
        async move {
            let r = wait_for(what, WAIT, || {
                let l = log_of(&log);
                async move { l.contains("removing the startup taint failed").then_some(l) }
            })
            .await;
            with_log(r, "NMI", &log)
        }
    };
    let log = node.dir.join("nmi-nopatch.log");
    let mut nmi = node.start_nmi(&rel, &pod, &bound, &log)?;
    node.wait_active(&log).await?;
    let l = waits_for(&log, "refused without patch").await?;
    assert!(l.contains("forbidden"), "{l}");
    terminate(&mut nmi, &log).await?;
    assert_eq!(keys()?, ["other.example/keep", KEY]);

    // The chart's rules; a token that names no node: the policy refuses.
    rel.apply_rbac("nmi", |_| Ok(()))?;
    let log = node.dir.join("nmi-unbound.log");
    let mut nmi = node.start_nmi(&rel, &pod, &unbound, &log)?;
    node.wait_active(&log).await?;
    let l = waits_for(&log, "refused by the policy").await?;
    assert!(l.contains(&policy) && l.contains("names no node"), "{l}");
    terminate(&mut nmi, &log).await?;
    assert_eq!(keys()?, ["other.example/keep", KEY]);

    // The pod-bound token, as in a real pod: removed, the other taint kept,
    // with the redirect in place.
    let log = node.dir.join("nmi-bound.log");
    let mut nmi = node.start_nmi(&rel, &pod, &bound, &log)?;
    let r = wait_for("startup taint removed", WAIT, || {
        // (A failed read is no answer yet: the wait goes on.)
        let k = keys().ok();
        async move { k.filter(|k| !k.iter().any(|k| k == KEY)) }
    })
    .await;
    let k = with_log(r, "NMI", &log)?;
    assert!(node.chain().is_some(), "taint removed before the redirect");
    assert_eq!(k, ["other.example/keep"]);
    assert!(
        log_of(&log).contains("startup taint removed"),
        "{}",
        log_of(&log)
    );
    terminate(&mut nmi, &log).await?;
    rel.delete_cluster_scoped();
    Ok(())
}
