//! The chart: rendered with `helm template` for the world's options, applied
//! with `kubectl apply`, and its workloads turned into processes as a kubelet
//! would run their pods.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use azure_emulator::Emulator;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::azure::HostFiles;
use super::processes::{Proc, pod_env};
use super::{APP_NS, Options, Program, RELEASE_NS, id_client, id_name, id_resource, selector};
use crate::{Cluster, helm};

/// The chart values of the world's identities (the chart's `azureIdentities`).
fn identities_values(opts: &Options) -> String {
    let mut out = String::from("azureIdentities:\n");
    let mut add = |key: &str, resource: &str, client: &str, sel: &str| {
        out.push_str(&format!(
            "  {key:?}:\n    namespace: {APP_NS:?}\n    type: 0\n    resourceID: {resource:?}\n    clientID: {client:?}\n    binding:\n      selector: {sel:?}\n"
        ));
    };
    for j in 0..opts.identities {
        add(
            &id_name(j),
            &id_resource(&id_name(j)),
            &id_client(j),
            &selector(j),
        );
    }
    if opts.invalid_identity {
        add(
            "id-missing",
            &id_resource("id-missing"),
            "c0000000-0000-4000-8000-00000000dead",
            "sel-invalid",
        );
    }
    out
}

/// The identity policy's grant of [`APP_NS`]: exactly the identities the
/// chart's `azureIdentities` put there, as the administrator who wrote those
/// values would grant them (so the chart applies in every policy mode).
fn app_ns_grants(opts: &Options) -> Option<String> {
    let ids: Vec<String> = (0..opts.identities)
        .map(|j| id_resource(&id_name(j)))
        .chain(opts.invalid_identity.then(|| id_resource("id-missing")))
        .collect();
    (!ids.is_empty()).then(|| ids.join(","))
}

/// The chart as applied: what was rendered, and its two workloads.
#[derive(Debug)]
pub(super) struct Release {
    /// Every rendered document.
    pub(super) rendered: Vec<Value>,
    /// The mic Deployment (none in managed mode, `operationMode=managed`).
    pub(super) mic: Option<Workload>,
    /// The nmi DaemonSet.
    pub(super) nmi: Workload,
}

impl Release {
    /// Renders the chart for `opts` (values in `dir`), creates [`RELEASE_NS`]
    /// and [`APP_NS`] (with its grant), and applies everything rendered.
    pub(super) async fn install(
        cluster: &Cluster,
        admin: &Client,
        opts: &Options,
        dir: &Path,
    ) -> anyhow::Result<Release> {
        let values = dir.join("identities-values.yaml");
        std::fs::write(&values, identities_values(opts))?;
        let mut render = helm::Render::new("aad-pod-identity", RELEASE_NS)
            .with_crds()
            .values(&values)
            .set("mic.customCloud.enabled", "true");
        for (k, v) in &opts.set {
            render = render.set(k, v);
        }
        let text = tokio::task::block_in_place(|| helm::template_text(&render))?
            .map_err(|e| anyhow::anyhow!("helm template failed: {e}"))?;
        let rendered = helm::parse_documents(&text)?;
        for (ns, grants) in [(RELEASE_NS, None), (APP_NS, app_ns_grants(opts))] {
            super::users::create_namespace(admin, ns, grants.as_deref()).await?;
        }
        let (mic, nmi) = (
            ("Deployment", "aad-pod-identity-mic"),
            ("DaemonSet", "aad-pod-identity-nmi"),
        );
        // The ServiceAccounts' tokens are asked for before the chart's
        // admission policies exist: with federatedTokens.nodePolicy, a
        // TokenRequest in a namespace without Pods (the policy's parameters)
        // is refused whoever makes it.
        let has_mic = helm::find(&rendered, mic.0, mic.1).is_some();
        let mic_kubeconfig = if has_mic {
            Some(account_kubeconfig(cluster, &rendered, mic).await?)
        } else {
            None
        };
        let nmi_kubeconfig = account_kubeconfig(cluster, &rendered, nmi).await?;
        kubectl_apply(cluster, &text).await?;
        let workload = |(kind, name), program: &Program, kubeconfig| {
            Workload::applied(admin, &rendered, kind, name, program.clone(), kubeconfig)
        };
        let mic = match mic_kubeconfig {
            Some(k) => Some(workload(mic, &opts.mic, k).await?),
            None => None,
        };
        let nmi = workload(nmi, &opts.nmi, nmi_kubeconfig).await?;
        Ok(Release { rendered, mic, nmi })
    }

    /// The rendered Deployment's replicas (1 when it names none; 0 without
    /// one).
    pub(super) fn mic_replicas(&self) -> usize {
        let Some(mic) = &self.mic else {
            return 0;
        };
        let replicas = mic.object["spec"]["replicas"].as_u64().unwrap_or(1);
        usize::try_from(replicas).unwrap_or(1)
    }
}

async fn kubectl_apply(cluster: &Cluster, yaml: &str) -> anyhow::Result<()> {
    let out = tokio::task::block_in_place(|| {
        cluster.kubectl_run(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(yaml),
        )
    })?;
    if !out.success {
        bail!("kubectl apply failed: {}", out.stderr);
    }
    Ok(())
}

/// A rendered and applied Deployment or DaemonSet, and what its pods' processes
/// are started with.
#[derive(Debug)]
pub(super) struct Workload {
    /// The rendered object.
    pub(super) object: Value,
    /// UID of the applied object (its pods' owner).
    uid: String,
    /// A kubeconfig of its ServiceAccount (a TokenRequest token).
    kubeconfig: PathBuf,
    /// Its liveness probe: (port, path).
    probe: (u16, String),
    /// The executable its container runs.
    pub(super) program: Program,
}

/// A kubeconfig of the ServiceAccount of the rendered `kind/name` (created
/// if missing; the chart's apply then adopts it).
async fn account_kubeconfig(
    cluster: &Cluster,
    rendered: &[Value],
    (kind, name): (&str, &str),
) -> anyhow::Result<PathBuf> {
    let object =
        helm::find(rendered, kind, name).with_context(|| format!("rendered {kind} {name}"))?;
    let account = object["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .context("serviceAccountName")?;
    cluster
        .service_account_kubeconfig(RELEASE_NS, account)
        .await
}

impl Workload {
    async fn applied(
        admin: &Client,
        rendered: &[Value],
        kind: &str,
        name: &str,
        program: Program,
        kubeconfig: PathBuf,
    ) -> anyhow::Result<Workload> {
        let object =
            helm::find(rendered, kind, name).with_context(|| format!("rendered {kind} {name}"))?;
        Ok(Workload {
            uid: uid_of(admin, kind, name).await?,
            probe: probe_of(&object)?,
            object,
            kubeconfig,
            program,
        })
    }
}

/// UID of the applied object `kind/name` in [`RELEASE_NS`].
async fn uid_of(client: &Client, kind: &str, name: &str) -> anyhow::Result<String> {
    let uid = match kind {
        "DaemonSet" => {
            Api::<DaemonSet>::namespaced(client.clone(), RELEASE_NS)
                .get(name)
                .await?
                .metadata
                .uid
        }
        _ => {
            Api::<Deployment>::namespaced(client.clone(), RELEASE_NS)
                .get(name)
                .await?
                .metadata
                .uid
        }
    };
    uid.with_context(|| format!("{kind} {name} has no uid"))
}

/// What every process of the world is launched with.
pub(super) struct Launch<'a> {
    /// An admin client (creates the workloads' pods).
    pub(super) client: &'a Client,
    /// The world's folder (logs, sockets).
    pub(super) dir: &'a Path,
    /// The files a node holds.
    pub(super) host: &'a HostFiles,
    /// The emulator (IMDS, ARM, Entra ID, its CA bundle for `SSL_CERT_FILE`).
    pub(super) emu: &'a Emulator,
    /// The apiserver's address.
    pub(super) apiserver: SocketAddr,
    /// The relay program of [`Options::relay`] (`None`: the kit's).
    pub(super) relay: Option<&'a Program>,
    /// [`Options::pod_bound_tokens`].
    pub(super) pod_bound_tokens: bool,
}

impl Launch<'_> {
    /// Creates pod `pod_name` of `workload` on node `node` (Running) and
    /// returns its process, not started yet: the container's args and env as
    /// the kubelet would run them, plus `--kubeconfig`, `HOSTNAME`,
    /// `SSL_CERT_FILE` and `NO_PROXY`.
    pub(super) async fn process(
        &self,
        workload: &Workload,
        pod_name: &str,
        node: &str,
    ) -> anyhow::Result<Proc> {
        create_workload_pod(self.client, workload, pod_name, node).await?;
        let kubeconfig = if self.pod_bound_tokens {
            pod_bound_kubeconfig(self.client, workload, pod_name, self.dir).await?
        } else {
            workload.kubeconfig.clone()
        };
        let mut fields = BTreeMap::from([
            ("metadata.namespace", RELEASE_NS.to_string()),
            ("metadata.name", pod_name.to_string()),
        ]);
        if !node.is_empty() {
            fields.insert("spec.nodeName", node.to_string());
        }
        let (mut args, env) = container_command(&workload.object, &fields, self.host)?;
        args.push(format!("--kubeconfig={}", kubeconfig.display()));
        Ok(self.proc(
            pod_name,
            &workload.program,
            args,
            env,
            workload.probe.clone(),
        ))
    }

    /// The process of pod `pod_name`: `program` with `args` and `env` plus
    /// [`pod_env`] (`HOSTNAME`, `SSL_CERT_FILE` the emulator's CA, `NO_PROXY`),
    /// probed at `probe`, logging to `<pod_name>.log` in the world's folder.
    pub(super) fn proc(
        &self,
        pod_name: &str,
        program: &Program,
        args: Vec<String>,
        mut env: Env,
        probe: (u16, String),
    ) -> Proc {
        env.extend(pod_env(pod_name, self.emu.ca_bundle_path()));
        let log = self.dir.join(format!("{pod_name}.log"));
        Proc::new(pod_name, program.clone(), args, env, probe, log)
    }
}

/// The Pod object the kubelet would run for a rendered workload: the pod
/// template's labels and spec, bound to `node`, owned by the workload (nmi
/// watches the DaemonSet that owns its pod for `--cleanup-on-uninstall`).
async fn create_workload_pod(
    client: &Client,
    workload: &Workload,
    name: &str,
    node: &str,
) -> anyhow::Result<()> {
    let object = &workload.object;
    let template = &object["spec"]["template"];
    let mut spec = template["spec"].clone();
    spec["nodeName"] = json!(node);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": template["metadata"]["labels"],
            "ownerReferences": [{
                "apiVersion": object["apiVersion"],
                "kind": object["kind"],
                "name": object["metadata"]["name"],
                "uid": workload.uid,
                "controller": true,
            }],
        },
        "spec": spec,
    }))?;
    let api: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NS);
    api.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("create pod {name}"))?;
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running"}})),
    )
    .await?;
    Ok(())
}

/// A kubeconfig for pod `pod` of `workload` (in [`RELEASE_NS`]) with a token
/// of its ServiceAccount bound to the pod, as the kubelet mounts: the API
/// server adds the pod's node to such a token (user extra
/// `authentication.kubernetes.io/node-name`), and it dies with the pod.
async fn pod_bound_kubeconfig(
    client: &Client,
    workload: &Workload,
    pod: &str,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    let account = workload.object["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .context("serviceAccountName")?;
    let uid = Api::<Pod>::namespaced(client.clone(), RELEASE_NS)
        .get(pod)
        .await?
        .metadata
        .uid
        .with_context(|| format!("pod {pod} has no UID"))?;
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {
            "audiences": [],
            "expirationSeconds": 3600,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid},
        },
    }))?;
    let token = Api::<ServiceAccount>::namespaced(client.clone(), RELEASE_NS)
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .with_context(|| format!("a token of {account} bound to pod {pod}"))?
        .status
        .context("TokenRequest returned no status")?
        .token;
    let text = std::fs::read_to_string(&workload.kubeconfig)?;
    let text = with_token(&text, &token)
        .with_context(|| format!("no token in {}", workload.kubeconfig.display()))?;
    let path = dir.join(format!("{pod}.kubeconfig"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// `kubeconfig` (a token kubeconfig) with its `token:` replaced by `token`;
/// `None` when it holds no token.
fn with_token(kubeconfig: &str, token: &str) -> Option<String> {
    let mut found = false;
    let lines: Vec<String> = kubeconfig
        .lines()
        .map(|line| {
            let rest = line.trim_start();
            match rest.strip_prefix("token: ") {
                Some(_) if !found => {
                    found = true;
                    format!("{}token: {token}", &line[..line.len() - rest.len()])
                }
                _ => line.to_string(),
            }
        })
        .collect();
    found.then(|| lines.join("\n") + "\n")
}

/// The first container of a rendered workload.
fn container(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]["containers"][0]
}

/// The liveness probe's (port, path).
fn probe_of(workload: &Value) -> anyhow::Result<(u16, String)> {
    let get = &container(workload)["livenessProbe"]["httpGet"];
    let port = match &get["port"] {
        Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .with_context(|| format!("probe port in {get}"))?;
    let path = get["path"].as_str().context("probe path")?.to_string();
    Ok((port, path))
}

/// Environment variables, (name, value).
pub(super) type Env = Vec<(String, String)>;

/// The container's env, with downward-API fields filled in from `fields`
/// (`metadata.namespace`, `metadata.name`, `spec.nodeName`), and its args with
/// `$(VAR)` expanded as the kubelet does; host mount paths become the world's
/// files.
fn container_command(
    workload: &Value,
    fields: &BTreeMap<&str, String>,
    host: &HostFiles,
) -> anyhow::Result<(Vec<String>, Env)> {
    let mut env = Vec::new();
    for e in container(workload)["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().context("env name")?.to_string();
        let value = if let Some(v) = e["value"].as_str() {
            host.substitute(v)
        } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            fields
                .get(path)
                .with_context(|| format!("env {name}: no value for field {path}"))?
                .clone()
        } else {
            bail!("env {name}: unsupported source {e}");
        };
        env.push((name, value));
    }
    let args = helm::container_args(workload)
        .iter()
        .map(|a| {
            let mut a = host.substitute(a);
            for (k, v) in &env {
                a = a.replace(&format!("$({k})"), v);
            }
            a
        })
        .collect();
    Ok((args, env))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kubeconfig_gets_another_token() {
        let cases = [
            (
                "users:\n- name: u\n  user:\n    token: old\nx: y\n",
                Some("users:\n- name: u\n  user:\n    token: new\nx: y\n"),
            ),
            ("token: old\n", Some("token: new\n")),
            ("user:\n    client-certificate: c\n", None),
        ];
        for (kubeconfig, want) in cases {
            assert_eq!(
                with_token(kubeconfig, "new").as_deref(),
                want,
                "{kubeconfig}"
            );
        }
    }

    #[test]
    fn values_and_grants_name_the_same_identities() {
        let mut opts = Options::new("/m", "/n");
        opts.identities = 2;
        opts.invalid_identity = true;
        let values = identities_values(&opts);
        assert!(values.starts_with("azureIdentities:\n  \"id-0\":\n"));
        assert!(values.contains("selector: \"sel-1\""));
        assert!(values.contains("selector: \"sel-invalid\""));
        assert_eq!(
            app_ns_grants(&opts).unwrap(),
            [
                id_resource("id-0"),
                id_resource("id-1"),
                id_resource("id-missing")
            ]
            .join(",")
        );
        opts.identities = 0;
        opts.invalid_identity = false;
        assert_eq!(app_ns_grants(&opts), None);
    }

    #[test]
    fn container_command_fills_fields_env_and_host_paths() {
        let workload = json!({"spec": {"template": {"spec": {"containers": [{
            "args": ["--node=$(NODE_NAME)", "--cloudconfig=/etc/kubernetes/azure.json"],
            "env": [
                {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "CLOUD", "value": "/etc/kubernetes/akscustom.json"},
            ],
            "livenessProbe": {"httpGet": {"port": "8080", "path": "/healthz"}},
        }]}}}});
        let host = HostFiles::for_tests();
        let fields = BTreeMap::from([("spec.nodeName", "n1".to_string())]);
        let (args, env) = container_command(&workload, &fields, &host).unwrap();
        assert_eq!(args, ["--node=n1", "--cloudconfig=/w/azure.json"]);
        assert_eq!(
            env,
            [
                ("NODE_NAME".to_string(), "n1".to_string()),
                ("CLOUD".to_string(), "/w/cloud.json".to_string())
            ]
        );
        assert_eq!(probe_of(&workload).unwrap(), (8080, "/healthz".to_string()));
        let missing = container_command(&workload, &BTreeMap::new(), &host);
        assert!(missing.is_err());
    }
}
