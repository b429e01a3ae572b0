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
}
