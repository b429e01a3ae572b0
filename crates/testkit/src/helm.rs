//! A real `helm` (built from its pinned Go module by `tests/helm/build.sh`, or
//! `$AADPODID_HELM_BIN/helm`) and helpers to render the chart into objects.
//!
//! ```no_run
//! # fn demo() -> anyhow::Result<()> {
//! use aadpodid_testkit::helm;
//! let docs = helm::template(&helm::Render::new("rel", "kube-system"))?;
//! let ds = helm::find(&docs, "DaemonSet", "aad-pod-identity-nmi");
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::repo_root;
use crate::tools::BuiltTool;

/// helm's folder: built by `tests/helm/build.sh` (given 30 minutes when not
/// cached yet) or named by `$AADPODID_HELM_BIN`.
static HELM: BuiltTool = BuiltTool::new("tests/helm/build.sh", Duration::from_secs(30 * 60))
    .named_by("AADPODID_HELM_BIN", &["helm"]);

/// Labels Helm adds that flat manifests leave out.
pub const HELM_LABELS: [&str; 2] = ["helm.sh/chart", "app.kubernetes.io/managed-by"];

/// `charts/aad-pod-identity`.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/aad-pod-identity")
}

/// The `helm` executable, built on first use (cached across runs).
pub fn helm_bin() -> anyhow::Result<PathBuf> {
    Ok(HELM.path()?.join("helm"))
}

/// What `helm` printed.
#[derive(Debug)]
pub struct HelmOutput {
    /// Exit status was 0.
    pub success: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `helm <args>` with a scratch HOME-independent configuration.
pub fn run(args: &[&str]) -> anyhow::Result<HelmOutput> {
    let scratch = std::env::temp_dir().join(format!("aadpodid-helm-{}", std::process::id()));
    let out = Command::new(helm_bin()?)
        .args(args)
        // Keep helm's repository/cache/config files out of the user's home.
        .env("HELM_CACHE_HOME", scratch.join("cache"))
        .env("HELM_CONFIG_HOME", scratch.join("config"))
        .env("HELM_DATA_HOME", scratch.join("data"))
        .stdin(Stdio::null())
        .output()
        .context("run helm")?;
    Ok(HelmOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `helm <args>` against the cluster of `kubeconfig` (as [`run`]).
pub fn run_on(kubeconfig: &Path, args: &[&str]) -> anyhow::Result<HelmOutput> {
    let kubeconfig = kubeconfig.display().to_string();
    let mut all = vec!["--kubeconfig", kubeconfig.as_str()];
    all.extend_from_slice(args);
    run(&all)
}

/// Upstream's chart version shipped in its Go module (`charts/`).
pub const UPSTREAM_CHART_VERSION: &str = "4.1.18";

/// Upstream aad-pod-identity's Go module folder
/// (`$GOMODCACHE/github.com/!azure/aad-pod-identity@<version>`, where
/// `GOMODCACHE` defaults to `$HOME/.cache/go-mod` as for the builds of
/// `tests/lib/go-tool.sh`), downloaded with `go mod download` when missing.
pub fn upstream_module_dir() -> anyhow::Result<PathBuf> {
    let cache = match std::env::var_os("GOMODCACHE") {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
            .join(".cache/go-mod"),
    };
    let version = crate::upstream::UPSTREAM_VERSION;
    let dir = cache.join(format!("github.com/!azure/aad-pod-identity@{version}"));
    if dir.is_dir() {
        return Ok(dir);
    }
    let out = crate::tools::output_within(
        Command::new("go")
            .args([
                "mod",
                "download",
                &format!("github.com/Azure/aad-pod-identity@{version}"),
            ])
            .current_dir(repo_root().join("tests/upstream"))
            .env("GOMODCACHE", &cache)
            .stderr(Stdio::inherit()),
        "go mod download",
        Duration::from_secs(10 * 60),
    )?;
    if !out.status.success() || !dir.is_dir() {
        bail!(
            "go mod download of upstream's module failed; {} missing",
            dir.display()
        );
    }
    Ok(dir)
}

/// A user's values for upstream's chart 4.1.18: only keys upstream's
/// values.yaml has, a change from its default in most sections.
pub const USER_VALUES: &str = r#"forceNamespaced: "true"
mic:
  replicas: 3
  logVerbosity: 2
  leaderElection:
    namespace: kube-system
    duration: 30s
  syncRetryDuration: 1h30m
  clientQps: "10"
  immutableUserMSIs:
    - "00000000-0000-4000-8000-0000000000aa"
  podLabels:
    team: platform
nmi:
  allowNetworkPluginKubenet: true
  micNamespace: kube-system
  podLabels:
    team: platform
rbac:
  createUserFacingClusterRoles: true
azureIdentities:
  "seed002-identity":
    namespace: "default"
    type: 0
    resourceID: "/subscriptions/0b1f6471-1bf0-4dda-aec3-cb9272f09590/resourceGroups/app-rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/seed002"
    clientID: "c0000000-0000-4000-8000-000000000002"
    binding:
      name: "seed002-binding"
      selector: "seed002"
"#;

/// What docs/migration.md says to run to go back to upstream's flat
/// manifests after re-applying them: the objects upstream's files do not
/// have.
pub const MANIFESTS_ROLLBACK_DELETES: [&[&str]; 2] = [
    &[
        "delete",
        "-n",
        "default",
        "role,rolebinding",
        "aad-pod-id-mic",
        "aad-pod-id-mic-owned-identities",
        "aad-pod-id-nmi",
        "--ignore-not-found",
    ],
    &[
        "delete",
        "validatingadmissionpolicybinding,validatingadmissionpolicy",
        "aad-pod-identity-identity-grants",
        "aad-pod-identity-assigned-identity-writers",
        "aad-pod-identity-exception-writers",
        "--ignore-not-found",
    ],
];

/// Upstream's own chart (`charts/aad-pod-identity-4.1.18.tgz` of its module).
pub fn upstream_chart() -> anyhow::Result<PathBuf> {
    let chart = upstream_module_dir()?.join(format!(
        "charts/aad-pod-identity-{UPSTREAM_CHART_VERSION}.tgz"
    ));
    if !chart.is_file() {
        bail!("{} missing from upstream's module", chart.display());
    }
    Ok(chart)
}

/// Upstream's flat manifest `deploy/infra/<file>` from its module.
pub fn upstream_manifest(file: &str) -> anyhow::Result<PathBuf> {
    let path = upstream_module_dir()?.join("deploy/infra").join(file);
    if !path.is_file() {
        bail!("{} missing from upstream's module", path.display());
    }
    Ok(path)
}

/// One `helm template` of the chart.
#[derive(Clone, Debug)]
pub struct Render {
    /// Release name.
    pub release: String,
    /// Release namespace.
    pub namespace: String,
    /// `--values` files.
    pub values: Vec<PathBuf>,
    /// `--set` / `--set-string` pairs: (key, value, as string).
    pub set: Vec<(String, String, bool)>,
    /// `--include-crds`.
    pub include_crds: bool,
}

impl Render {
    /// Default values, no CRDs.
    pub fn new(release: &str, namespace: &str) -> Self {
        Render {
            release: release.into(),
            namespace: namespace.into(),
            values: vec![],
            set: vec![],
            include_crds: false,
        }
    }

    /// Adds a values file.
    pub fn values(mut self, path: impl AsRef<Path>) -> Self {
        self.values.push(path.as_ref().to_path_buf());
        self
    }

    /// Adds `--set key=value`.
    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.set.push((key.into(), value.into(), false));
        self
    }

    /// Adds `--set-string key=value`.
    pub fn set_string(mut self, key: &str, value: &str) -> Self {
        self.set.push((key.into(), value.into(), true));
        self
    }

    /// Adds `--include-crds`.
    pub fn with_crds(mut self) -> Self {
        self.include_crds = true;
        self
    }

    fn args(&self, command: &str) -> Vec<String> {
        let mut args = vec![command.to_string()];
        if command == "template" {
            args.push(self.release.clone());
        }
        args.push(chart_dir().display().to_string());
        if command == "template" {
            args.extend(["--namespace".into(), self.namespace.clone()]);
            if self.include_crds {
                args.push("--include-crds".into());
            }
        }
        for v in &self.values {
            args.extend(["--values".into(), v.display().to_string()]);
        }
        for (k, v, string) in &self.set {
            let flag = if *string { "--set-string" } else { "--set" };
            args.extend([flag.into(), format!("{k}={v}")]);
        }
        args
    }
}

/// `helm template`: the rendered YAML text, or the error helm printed.
pub fn template_text(r: &Render) -> anyhow::Result<Result<String, String>> {
    let args = r.args("template");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&args)?;
    Ok(if out.success {
        Ok(out.stdout)
    } else {
        Err(out.stderr)
    })
}

/// `helm template`, parsed into objects (a `List` stays one document).
pub fn template(r: &Render) -> anyhow::Result<Vec<Value>> {
    match template_text(r)? {
        Ok(text) => parse_documents(&text),
        Err(e) => bail!("helm template failed: {e}"),
    }
}

/// `helm lint --strict` with the render's values; Err carries helm's output.
pub fn lint(r: &Render) -> anyhow::Result<Result<String, String>> {
    let mut args = r.args("lint");
    args.push("--strict".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&args)?;
    let text = format!("{}{}", out.stdout, out.stderr);
    Ok(if out.success { Ok(text) } else { Err(text) })
}

/// The YAML documents of a multi-document text, empty ones left out.
pub fn parse_documents(text: &str) -> anyhow::Result<Vec<Value>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).context("parse YAML documents")?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// The objects of the documents, with `List`s flattened.
pub fn objects(docs: &[Value]) -> Vec<Value> {
    let mut out = Vec::new();
    for d in docs {
        if d["kind"] == "List" {
            out.extend(d["items"].as_array().cloned().unwrap_or_default());
        } else {
            out.push(d.clone());
        }
    }
    out
}

/// The object of `kind` named `name` (Lists flattened).
pub fn find(docs: &[Value], kind: &str, name: &str) -> Option<Value> {
    objects(docs)
        .into_iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

/// Removes [`HELM_LABELS`] from an object's (and its pod template's) labels.
pub fn strip_helm_labels(obj: &mut Value) {
    for path in ["/metadata/labels", "/spec/template/metadata/labels"] {
        if let Some(Value::Object(labels)) = obj.pointer_mut(path) {
            for l in HELM_LABELS {
                labels.remove(l);
            }
        }
    }
}

/// The container args of the first container of a Deployment or DaemonSet.
pub fn container_args(workload: &Value) -> Vec<String> {
    workload["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The kinds a release of the chart (ours or upstream's) or the flat
/// manifests can hold, as `kubectl get` takes them.
pub const RELEASE_KINDS: [&str; 16] = [
    "customresourcedefinitions.apiextensions.k8s.io",
    "serviceaccounts",
    "secrets",
    "configmaps",
    "clusterroles.rbac.authorization.k8s.io",
    "clusterrolebindings.rbac.authorization.k8s.io",
    "roles.rbac.authorization.k8s.io",
    "rolebindings.rbac.authorization.k8s.io",
    "deployments.apps",
    "daemonsets.apps",
    "poddisruptionbudgets.policy",
    "validatingadmissionpolicies.admissionregistration.k8s.io",
    "validatingadmissionpolicybindings.admissionregistration.k8s.io",
    "azureidentities.aadpodidentity.k8s.io",
    "azureidentitybindings.aadpodidentity.k8s.io",
    "azurepodidentityexceptions.aadpodidentity.k8s.io",
];

/// One object as the apiserver stores it: identity and version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// `metadata.uid`: a new one means the object was deleted and created again.
    pub uid: String,
    /// `metadata.resourceVersion`: changes with every write.
    pub resource_version: String,
}

/// Objects keyed `Kind/namespace/name` (namespace empty when cluster-scoped).
pub type Snapshot = std::collections::BTreeMap<String, Stored>;

/// The objects of `items` (a `kubectl get -o json` List's items) as a
/// [`Snapshot`]; Helm's release records (Secrets `sh.helm.release.v1.*`) are
/// left out.
pub fn snapshot_of(items: &[Value]) -> Snapshot {
    let mut out = Snapshot::new();
    for o in items {
        let meta = &o["metadata"];
        let name = meta["name"].as_str().unwrap_or_default();
        let kind = o["kind"].as_str().unwrap_or_default();
        if kind == "Secret" && name.starts_with("sh.helm.release.v1.") {
            continue;
        }
        let key = format!(
            "{kind}/{}/{name}",
            meta["namespace"].as_str().unwrap_or_default()
        );
        out.insert(
            key,
            Stored {
                uid: meta["uid"].as_str().unwrap_or_default().to_string(),
                resource_version: meta["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            },
        );
    }
    out
}

/// Every object of [`RELEASE_KINDS`] on the cluster of `kubeconfig` (kinds the
/// apiserver does not serve, such as the CRD kinds before the CRDs exist,
/// count as empty), less those whose uid is in `baseline` (objects the cluster
/// had before the test's first step).
pub fn snapshot(kubectl: impl Fn() -> Command, baseline: &Snapshot) -> anyhow::Result<Snapshot> {
    let known: std::collections::BTreeSet<&str> =
        baseline.values().map(|s| s.uid.as_str()).collect();
    let mut items = Vec::new();
    for kind in RELEASE_KINDS {
        let out = crate::kubectl::run_kubectl(kubectl(), &["get", kind, "-A", "-o", "json"], None)?;
        if !out.success {
            if out
                .stderr
                .contains("the server doesn't have a resource type")
            {
                continue;
            }
            bail!("kubectl get {kind}: {}", out.stderr);
        }
        let list: Value = serde_json::from_str(&out.stdout).context("kubectl get -o json")?;
        items.extend(list["items"].as_array().cloned().unwrap_or_default());
    }
    let mut snap = snapshot_of(&items);
    snap.retain(|_, s| !known.contains(s.uid.as_str()));
    Ok(snap)
}

/// The project's four CRDs (upstream's names).
pub const CRD_NAMES: [&str; 4] = [
    "azureassignedidentities.aadpodidentity.k8s.io",
    "azureidentities.aadpodidentity.k8s.io",
    "azureidentitybindings.aadpodidentity.k8s.io",
    "azurepodidentityexceptions.aadpodidentity.k8s.io",
];

/// `kubectl get <args> -o json` on `cluster` (admin), parsed.
pub fn get_json(cluster: &crate::Cluster, args: &[&str]) -> anyhow::Result<Value> {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend(["-o", "json"]);
    let out = cluster.kubectl_run(&all, None)?;
    if !out.success {
        bail!("kubectl {all:?}: {}", out.stderr);
    }
    serde_json::from_str(&out.stdout).context("kubectl get -o json")
}

/// What tells upstream's CRDs from this project's on a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrdShape {
    /// Printer columns of the AzureAssignedIdentity CRD (upstream's: none).
    pub assigned_identity_columns: usize,
    /// AzureIdentity `spec.type` has a maximum (this project's 0..=2 check).
    pub identity_type_bounded: bool,
}

impl CrdShape {
    /// Upstream v1.8.17's CRDs.
    pub const UPSTREAM: CrdShape = CrdShape {
        assigned_identity_columns: 0,
        identity_type_bounded: false,
    };
    /// This project's CRDs.
    pub const OURS: CrdShape = CrdShape {
        assigned_identity_columns: 6,
        identity_type_bounded: true,
    };
}

/// The [`CrdShape`] of the CRDs installed on `cluster`.
pub fn crd_shape(cluster: &crate::Cluster) -> anyhow::Result<CrdShape> {
    let aai = get_json(cluster, &["crd", CRD_NAMES[0]])?;
    let ai = get_json(cluster, &["crd", CRD_NAMES[1]])?;
    Ok(CrdShape {
        assigned_identity_columns: aai["spec"]["versions"][0]["additionalPrinterColumns"]
            .as_array()
            .map_or(0, Vec::len),
        identity_type_bounded: ai["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
            ["spec"]["properties"]["type"]["maximum"]
            .is_number(),
    })
}

/// The DaemonSets and the Deployments of a snapshot, in every namespace.
pub fn workloads(snap: &Snapshot) -> (Vec<String>, Vec<String>) {
    let of = |kind: &str| {
        snap.keys()
            .filter(|k| k.starts_with(kind))
            .cloned()
            .collect::<Vec<_>>()
    };
    (of("DaemonSet/"), of("Deployment/"))
}

/// The uid of object `key` in `snap`.
pub fn uid<'a>(snap: &'a Snapshot, key: &str) -> Option<&'a str> {
    snap.get(key).map(|s| s.uid.as_str())
}

/// A cluster of the test's own as before anything of aad-pod-identity was
/// installed (the CRDs the kit installs deleted), and its [`snapshot`] then:
/// the baseline later snapshots leave out.
pub async fn bare_private_cluster() -> anyhow::Result<(crate::PrivateCluster, Snapshot)> {
    let c = crate::PrivateCluster::start().await?;
    let mut args = vec!["delete", "crd", "--wait=true"];
    args.extend(CRD_NAMES);
    let out = c.kubectl_run(&args, None)?;
    if !out.success {
        bail!("kubectl {args:?}: {}", out.stderr);
    }
    let baseline = snapshot(|| c.kubectl(), &Snapshot::new())?;
    Ok((c, baseline))
}

/// A cluster of the test's own for a migration test (bare, as
/// [`bare_private_cluster`] leaves it, or a running one with
/// [`Migration::on`]), the commands such a test runs on it,
/// which must succeed, and its steps: each one snapshotted, compared with the
/// snapshot before, and checked to leave exactly one of each expected
/// workload (nothing of it created twice).
///
/// ```no_run
/// # async fn demo(upstream: &str, ours: &str) -> anyhow::Result<()> {
/// use aadpodid_testkit::helm::Migration;
/// let m = Migration::start(&["kube-system/nmi"], &["kube-system/mic"]).await?;
/// m.apply(upstream)?;
/// let s1 = m.snapshot("upstream applied")?;
/// let up = m.step(&s1, "ours over upstream's", || m.apply(ours).map(drop))?;
/// assert!(up.diff.deleted.is_empty());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Migration {
    /// The cluster.
    pub cluster: crate::Cluster,
    /// The cluster's processes, when [`Migration::start`] started them
    /// (stopped when the migration drops).
    _own: Option<crate::PrivateCluster>,
    /// What the cluster held before the test's first step.
    pub baseline: Snapshot,
    /// The keys every snapshot must hold as its only DaemonSets and
    /// Deployments.
    workloads: (Vec<String>, Vec<String>),
}

/// One step of a [`Migration`]: its name, the snapshot after it, what
/// changed from the snapshot before, and how long its writes took.
#[derive(Debug)]
pub struct Step {
    /// What the step did, for reports.
    pub name: String,
    /// The objects after the step.
    pub snap: Snapshot,
    /// From the snapshot before to [`Step::snap`].
    pub diff: ObjectDiff,
    /// How long the step's writes took.
    pub took: Duration,
}

impl Migration {
    /// A bare cluster of the test's own on which every snapshot must hold
    /// exactly the DaemonSets `daemonsets` and the Deployments `deployments`
    /// (each `namespace/name`), in every namespace.
    pub async fn start(daemonsets: &[&str], deployments: &[&str]) -> anyhow::Result<Migration> {
        let (own, baseline) = bare_private_cluster().await?;
        Ok(Migration::with(
            own.cluster().clone(),
            Some(own),
            baseline,
            daemonsets,
            deployments,
        ))
    }

    /// The same steps on a running `cluster` (its CRDs and everything on it
    /// now are the baseline), for example a world's: every snapshot must
    /// hold `daemonsets` and `deployments` as at [`Migration::start`].
    pub fn on(
        cluster: &crate::Cluster,
        daemonsets: &[&str],
        deployments: &[&str],
    ) -> anyhow::Result<Migration> {
        let baseline = snapshot(|| cluster.kubectl(), &Snapshot::new())?;
        Ok(Migration::with(
            cluster.clone(),
            None,
            baseline,
            daemonsets,
            deployments,
        ))
    }

    fn with(
        cluster: crate::Cluster,
        own: Option<crate::PrivateCluster>,
        baseline: Snapshot,
        daemonsets: &[&str],
        deployments: &[&str],
    ) -> Migration {
        let keys = |kind: &str, names: &[&str]| -> Vec<String> {
            names.iter().map(|n| format!("{kind}/{n}")).collect()
        };
        Migration {
            cluster,
            _own: own,
            baseline,
            workloads: (
                keys("DaemonSet", daemonsets),
                keys("Deployment", deployments),
            ),
        }
    }

    /// `kubectl <args>` with `stdin`, which must succeed: what it printed.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let out = self.cluster.kubectl_run(args, stdin)?;
        if !out.success {
            bail!("kubectl {args:?}: {}", out.stderr);
        }
        Ok(out.stdout)
    }

    /// `kubectl apply -f -` (client-side) of `text`: what kubectl printed.
    pub fn apply(&self, text: &str) -> anyhow::Result<String> {
        self.kubectl(&["apply", "-f", "-"], Some(text))
    }

    /// `kubectl get <args> -o json`, parsed ([`get_json`]).
    pub fn get_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        get_json(&self.cluster, args)
    }

    /// The [`CrdShape`] of the CRDs installed now.
    pub fn crd_shape(&self) -> anyhow::Result<CrdShape> {
        crd_shape(&self.cluster)
    }

    /// `helm <args>` on the cluster, as it went.
    pub fn try_helm(&self, args: &[&str]) -> anyhow::Result<HelmOutput> {
        run_on(self.cluster.kubeconfig(), args)
    }

    /// `helm <args>` on the cluster, which must succeed: what it printed.
    pub fn helm(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.try_helm(args)?;
        if !out.success {
            bail!("helm {args:?}: {}{}", out.stdout, out.stderr);
        }
        Ok(out.stdout)
    }

    /// The objects now, less the baseline; fails (naming `step`) unless the
    /// DaemonSets and Deployments are exactly the expected ones.
    pub fn snapshot(&self, step: &str) -> anyhow::Result<Snapshot> {
        let snap = snapshot(|| self.cluster.kubectl(), &self.baseline)?;
        let found = workloads(&snap);
        if found != self.workloads {
            bail!(
                "{step}: DaemonSets and Deployments {found:?}, want {:?}",
                self.workloads
            );
        }
        Ok(snap)
    }

    /// Runs `write` (timed), then snapshots as [`Migration::snapshot`] and
    /// compares with `before`; prints `step (took): figures` and the objects
    /// replaced, created or deleted. Fails if an object was deleted and
    /// created again.
    pub fn step(
        &self,
        before: &Snapshot,
        step: &str,
        write: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<Step> {
        let t = std::time::Instant::now();
        write()?;
        let took = t.elapsed();
        let snap = self.snapshot(step)?;
        let diff = diff(before, &snap);
        println!("{step} ({took:.2?}): {}", diff.figures());
        for (what, keys) in [
            ("replaced", &diff.replaced),
            ("created", &diff.created),
            ("deleted", &diff.deleted),
        ] {
            if !keys.is_empty() {
                println!("  {what}: {keys:?}");
            }
        }
        if !diff.recreated.is_empty() {
            bail!("{step}: objects deleted and created again: {diff:?}");
        }
        Ok(Step {
            name: step.to_string(),
            snap,
            diff,
            took,
        })
    }
}

impl Step {
    /// Fails unless the step wrote nothing at all (every object of the
    /// snapshot before unchanged, none created); the snapshot after it.
    pub fn wrote_nothing(self) -> anyhow::Result<Snapshot> {
        if !self.diff.wrote_nothing() {
            bail!("{} wrote: {:?}", self.name, self.diff);
        }
        Ok(self.snap)
    }
}

/// Fails unless object `key` is in both snapshots with the same uid (the
/// same object, not deleted and created again in between).
pub fn same_object(before: &Snapshot, after: &Snapshot, key: &str) -> anyhow::Result<()> {
    match (uid(before, key), uid(after, key)) {
        (Some(a), Some(b)) if a == b => Ok(()),
        (a, b) => bail!("{key}: uid {a:?} before, {b:?} after"),
    }
}

/// What happened to each object between two snapshots.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ObjectDiff {
    /// Same uid, same resourceVersion.
    pub unchanged: Vec<String>,
    /// Same uid, new resourceVersion: updated in place.
    pub replaced: Vec<String>,
    /// Same key, new uid: deleted and created again.
    pub recreated: Vec<String>,
    /// Only after.
    pub created: Vec<String>,
    /// Only before.
    pub deleted: Vec<String>,
}

impl ObjectDiff {
    /// Nothing replaced, recreated, created or deleted.
    pub fn wrote_nothing(&self) -> bool {
        let written = [
            &self.replaced,
            &self.recreated,
            &self.created,
            &self.deleted,
        ];
        written.iter().all(|keys| keys.is_empty())
    }

    /// `unchanged/replaced/recreated/created/deleted` counts, for reports.
    pub fn figures(&self) -> String {
        format!(
            "unchanged {}, replaced in place {}, recreated {}, created {}, deleted {}",
            self.unchanged.len(),
            self.replaced.len(),
            self.recreated.len(),
            self.created.len(),
            self.deleted.len()
        )
    }
}

/// Compares two snapshots object by object.
pub fn diff(before: &Snapshot, after: &Snapshot) -> ObjectDiff {
    let mut d = ObjectDiff::default();
    for (k, b) in before {
        match after.get(k) {
            None => d.deleted.push(k.clone()),
            Some(a) if a.uid != b.uid => d.recreated.push(k.clone()),
            Some(a) if a.resource_version != b.resource_version => d.replaced.push(k.clone()),
            Some(_) => d.unchanged.push(k.clone()),
        }
    }
    d.created = after
        .keys()
        .filter(|k| !before.contains_key(*k))
        .cloned()
        .collect();
    d
}

/// The keys of `snap` of `kind` in `namespace`.
pub fn keys_of(snap: &Snapshot, kind: &str, namespace: &str) -> Vec<String> {
    let prefix = format!("{kind}/{namespace}/");
    snap.keys()
        .filter(|k| k.starts_with(&prefix))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_flatten_and_helm_labels_go() {
        let docs = parse_documents(
            "# c\n---\nkind: List\nitems:\n- {kind: A, metadata: {name: a}}\n---\nkind: B\nmetadata:\n  name: b\n  labels: {x: z, helm.sh/chart: c-1}\n",
        )
        .unwrap();
        assert_eq!(docs.len(), 2);
        assert!(find(&docs, "A", "a").is_some());
        let mut b = find(&docs, "B", "b").unwrap();
        strip_helm_labels(&mut b);
        assert_eq!(b["metadata"]["labels"], json!({"x": "z"}));
    }

    fn stored(uid: &str, rv: &str) -> Stored {
        Stored {
            uid: uid.into(),
            resource_version: rv.into(),
        }
    }

    #[test]
    fn snapshots_skip_helm_records_and_diffs_sort_every_object() {
        let snap = snapshot_of(&[
            json!({"kind": "Secret", "metadata": {"name": "sh.helm.release.v1.r.v1", "namespace": "n", "uid": "h", "resourceVersion": "1"}}),
            json!({"kind": "ClusterRole", "metadata": {"name": "c", "uid": "u", "resourceVersion": "2"}}),
        ]);
        assert_eq!(
            snap.into_iter().collect::<Vec<_>>(),
            vec![("ClusterRole//c".to_string(), stored("u", "2"))]
        );
        // Key, then `uid:resourceVersion` before and after ("": absent).
        let rows = [
            ["K/n/same", "1:1", "1:1"],
            ["K/n/written", "2:1", "2:5"],
            ["K/n/again", "3:1", "9:1"],
            ["K/n/gone", "4:1", ""],
            ["K/n/new", "", "8:1"],
        ];
        let side = |i: usize| -> Snapshot {
            rows.iter()
                .filter_map(|r| {
                    let (uid, rv) = r[i].split_once(':')?;
                    Some((r[0].to_string(), stored(uid, rv)))
                })
                .collect()
        };
        let (before, after) = (side(1), side(2));
        let d = diff(&before, &after);
        assert_eq!(
            d,
            ObjectDiff {
                unchanged: vec!["K/n/same".into()],
                replaced: vec!["K/n/written".into()],
                recreated: vec!["K/n/again".into()],
                created: vec!["K/n/new".into()],
                deleted: vec!["K/n/gone".into()],
            }
        );
        assert_eq!(
            d.figures(),
            "unchanged 1, replaced in place 1, recreated 1, created 1, deleted 1"
        );
        assert!(!d.wrote_nothing());
        assert!(diff(&before, &before).wrote_nothing());
        same_object(&before, &after, "K/n/written").unwrap();
        assert!(same_object(&before, &after, "K/n/again").is_err());
        assert!(same_object(&before, &after, "K/n/gone").is_err());
        assert_eq!(keys_of(&after, "K", "n").len(), 4);
        assert!(keys_of(&after, "K", "m").is_empty());
        assert_eq!(uid(&after, "K/n/again"), Some("9"));
        let w: Snapshot = [
            ("DaemonSet/a/nmi".to_string(), stored("1", "1")),
            ("Deployment/b/mic".to_string(), stored("2", "1")),
            ("DaemonSetX//y".to_string(), stored("3", "1")),
        ]
        .into();
        assert_eq!(
            workloads(&w),
            (
                vec!["DaemonSet/a/nmi".to_string()],
                vec!["Deployment/b/mic".to_string()]
            )
        );
    }
}
