//! A release of the chart for the RBAC tests (`chart_rbac`, `chart_rbac_nmi`):
//! rendered with `helm template` in its own namespace and with cluster-scoped
//! names of its own, whose RBAC objects a test applies (whole, or with one
//! verb taken out) and whose ServiceAccounts a component runs as; and the
//! small `kubectl` and log helpers both tests use.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aadpodid_testkit::helm::{self, Render};
use aadpodid_testkit::tenant::{self, APP_CLIENT, APP_ID, APP_RG};
use aadpodid_testkit::{Cluster, KubectlOutput, TempNamespace, unique_name};
use anyhow::{Context as _, anyhow, ensure};
use serde_json::{Value, json};

/// How long the RBAC tests wait for a component to reach a state.
pub const WAIT: Duration = Duration::from_secs(60);

/// A release of the chart in its own namespace, with cluster-scoped names of
/// its own (`fullnameOverride`).
#[derive(Debug)]
pub struct Release {
    /// The cluster the release is applied to.
    pub cluster: &'static Cluster,
    /// The release's namespace (deleted when dropped).
    pub ns: TempNamespace,
    /// The release name, also its `fullnameOverride`.
    pub name: String,
    /// The rendered objects.
    pub docs: Vec<Value>,
}

impl Release {
    /// Renders a release named after `prefix` in a new namespace, with
    /// [`values`] and the `--set` pairs `extra`.
    pub async fn render(prefix: &str, extra: &[(&str, &str)]) -> anyhow::Result<Release> {
        let ns = Cluster::shared().temp_namespace(prefix).await?;
        let name = unique_name(prefix);
        let mut r = values(&name, &ns);
        for (k, v) in extra {
            r = r.set(k, v);
        }
        Release::of(name, ns, &r)
    }

    /// The release `name` in `ns` as `r` renders it.
    pub fn of(name: String, ns: TempNamespace, r: &Render) -> anyhow::Result<Release> {
        Ok(Release {
            cluster: Cluster::shared(),
            docs: helm::template(r)?,
            ns,
            name,
        })
    }

    /// The rendered object of `kind` named `name`.
    pub fn get(&self, kind: &str, name: &str) -> anyhow::Result<Value> {
        helm::find(&self.docs, kind, name).with_context(|| format!("no {kind} {name}"))
    }

    /// MIC's name in this release (Deployment, ServiceAccount, ClusterRole).
    pub fn mic(&self) -> String {
        format!("{}-mic", self.name)
    }

    /// NMI's name in this release (DaemonSet, ServiceAccount, ClusterRole).
    pub fn nmi(&self) -> String {
        format!("{}-nmi", self.name)
    }

    /// The rendered RBAC objects of `component` (ServiceAccount,
    /// ClusterRole/Roles and bindings, all named `<release>-<component>...`).
    pub fn rbac_objects(&self, component: &str) -> Vec<Value> {
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
    pub fn apply_rbac(
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
    pub async fn sa_kubeconfig(
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

    /// Deletes the release's ClusterRoles and ClusterRoleBindings (the
    /// namespace goes with [`TempNamespace`]).
    pub fn delete_cluster_scoped(&self) {
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
pub fn values(name: &str, ns: &TempNamespace) -> Render {
    Render::new(name, ns.name())
        .set("fullnameOverride", name)
        .set("mic.leaderElection.namespace", ns.name())
        .set("installMICException", "false")
}

/// Removes `verb` from every rule of a (Cluster)Role that grants it on `resource`.
pub fn without_verb(
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
pub const APPLY_SERVER_SIDE: [&str; 2] = ["apply", "--server-side"];

/// `kubectl <args> -f -` with `objects` on stdin; kubectl's message when it fails.
pub fn submit(cluster: &Cluster, args: &[&str], objects: &Value) -> anyhow::Result<()> {
    let all: Vec<&str> = args.iter().copied().chain(["-f", "-"]).collect();
    let out = cluster.kubectl_run(&all, Some(&objects.to_string()))?;
    ensure!(out.success, "kubectl {}: {}", args.join(" "), out.stderr);
    Ok(())
}

/// A `v1` List of `items`.
pub fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// The text of the log at `path` (empty when there is none yet).
pub fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `r`, or its error with the log of `who` at `path`.
pub fn with_log<T>(r: anyhow::Result<T>, who: &str, path: &Path) -> anyhow::Result<T> {
    r.map_err(|e| anyhow!("{e}\n{who} log:\n{}", log_of(path)))
}

/// `kubectl <args> -n <ns>`; what it printed.
pub fn kubectl_in(cluster: &Cluster, ns: &str, args: &[&str]) -> anyhow::Result<KubectlOutput> {
    let args: Vec<&str> = args.iter().copied().chain(["-n", ns]).collect();
    cluster.kubectl_run(&args, None)
}

/// Applies, in `ns`, the AzureIdentity `app-id` (the tenant's app
/// identity), its binding `app-binding` to `selector`, and pod `pod` on
/// `node` with that selector.
pub fn apply_identity_binding_pod(
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
