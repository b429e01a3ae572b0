//! The objects side of [`super::run`]: upstream's release installed
//! before Go starts, this project's written over it right before the
//! processes are swapped, upstream's again at the rollback, each write a
//! [`helm::Migration`] step (timed, snapshotted, failing if an object was
//! deleted and created again) on the run's own cluster.
//!
//! - [`UpgradePath::Helm`]: `helm install` of upstream's chart 4.1.18 with
//!   [`helm::USER_VALUES`] in `kube-system`; upgrade: this project's CRDs
//!   applied server-side, then `helm upgrade` with the release's values as a
//!   file; rollback: `helm rollback` to revision 1.
//! - [`UpgradePath::Manifests`]: `kubectl apply` of upstream's
//!   `deploy/infra/deployment-rbac.yaml`; upgrade: this project's; rollback:
//!   upstream's again and the deletes of [`helm::MANIFESTS_ROLLBACK_DELETES`].
//!
//! No kubelet runs: the Deployments and DaemonSets stay objects; the
//! processes are the run's own.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;

use super::ObjectStep;
use crate::Cluster;
use crate::helm::{self, Migration, Snapshot};

/// Where the objects of the two sides come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpgradePath {
    /// No objects: only the processes are swapped.
    Processes,
    /// upstream's chart 4.1.18, `helm upgrade` to this project's chart,
    /// `helm rollback`.
    Helm,
    /// upstream's flat manifests, `kubectl apply` of this project's, and of
    /// upstream's again.
    Manifests,
}

impl UpgradePath {
    /// `processes`, `helm` or `manifests`.
    pub fn name(self) -> &'static str {
        match self {
            UpgradePath::Processes => "processes",
            UpgradePath::Helm => "helm",
            UpgradePath::Manifests => "manifests",
        }
    }
}

/// Helm's release name and namespace (upstream's defaults).
const RELEASE: &str = "aad-pod-identity";
const RELEASE_NS: &str = "kube-system";

/// The objects of a run on its cluster, and the snapshot after the last step.
pub(super) struct Objects {
    path: UpgradePath,
    m: Arc<Migration>,
    /// The nmi DaemonSet's and the mic Deployment's `namespace/name`.
    workloads: [String; 2],
    dir: PathBuf,
    last: Snapshot,
}

impl Objects {
    /// Installs upstream's release on `cluster` (blocking); `None` for
    /// [`UpgradePath::Processes`]. `dir` takes the values files.
    pub(super) fn install(
        path: UpgradePath,
        cluster: &Cluster,
        dir: &Path,
    ) -> anyhow::Result<Option<(Objects, ObjectStep)>> {
        let (ds, deploy) = match path {
            UpgradePath::Processes => return Ok(None),
            UpgradePath::Helm => (
                format!("{RELEASE_NS}/{RELEASE}-nmi"),
                format!("{RELEASE_NS}/{RELEASE}-mic"),
            ),
            UpgradePath::Manifests => ("default/nmi".to_string(), "default/mic".to_string()),
        };
        let m = Arc::new(Migration::on(cluster, &[&ds], &[&deploy])?);
        let mut objects = Objects {
            path,
            m,
            workloads: [ds, deploy],
            dir: dir.to_path_buf(),
            last: Snapshot::new(),
        };
        // Snapshots leave the baseline out: before the install, nothing.
        let first = objects.blocking_steps(&[Write::Install], &Snapshot::new())?;
        Ok(Some((
            objects,
            first.into_iter().next().context("no step")?,
        )))
    }

    /// This project's objects over upstream's.
    pub(super) async fn upgrade(&mut self) -> anyhow::Result<Vec<ObjectStep>> {
        let writes: &'static [Write] = match self.path {
            UpgradePath::Helm => &[Write::Crds, Write::Upgrade],
            _ => &[Write::Upgrade],
        };
        self.steps(writes).await
    }

    /// upstream's objects again.
    pub(super) async fn rollback(&mut self) -> anyhow::Result<Vec<ObjectStep>> {
        self.steps(&[Write::Rollback]).await
    }

    /// `writes` in turn on a blocking thread (the run's watchers go on).
    async fn steps(&mut self, writes: &'static [Write]) -> anyhow::Result<Vec<ObjectStep>> {
        let me = Objects {
            path: self.path,
            m: self.m.clone(),
            workloads: self.workloads.clone(),
            dir: self.dir.clone(),
            last: std::mem::take(&mut self.last),
        };
        let (me, steps) = tokio::task::spawn_blocking(move || {
            let mut me = me;
            let before = me.last.clone();
            let steps = me.blocking_steps(writes, &before);
            (me, steps)
        })
        .await?;
        self.last = me.last;
        steps
    }

    fn blocking_steps(
        &mut self,
        writes: &[Write],
        before: &Snapshot,
    ) -> anyhow::Result<Vec<ObjectStep>> {
        let mut before = before.clone();
        let mut out = Vec::new();
        for w in writes {
            let name = w.name(self.path);
            let step = self.m.step(&before, &name, || self.write(*w))?;
            out.push(ObjectStep {
                name,
                took: step.took,
                replaced: step.diff.replaced.len(),
                created: step.diff.created.len(),
                deleted: step.diff.deleted.len(),
                images: self.images()?,
            });
            before = step.snap;
        }
        self.last = before;
        Ok(out)
    }

    /// The nmi DaemonSet's and the mic Deployment's container images as
    /// the apiserver holds them.
    fn images(&self) -> anyhow::Result<Vec<String>> {
        let kinds = ["daemonset", "deployment"];
        let mut out = Vec::new();
        for (kind, key) in kinds.iter().zip(&self.workloads) {
            let (ns, name) = key.split_once('/').context("namespace/name")?;
            let o = self.m.get_json(&["-n", ns, kind, name])?;
            let image = &o["spec"]["template"]["spec"]["containers"][0]["image"];
            out.push(image.as_str().unwrap_or_default().to_string());
        }
        Ok(out)
    }

    fn write(&self, w: Write) -> anyhow::Result<()> {
        let m = &*self.m;
        match (self.path, w) {
            (UpgradePath::Processes, _) => Ok(()),
            (UpgradePath::Helm, Write::Install) => {
                let values = self.dir.join("user-values.yaml");
                std::fs::write(&values, helm::USER_VALUES)?;
                let chart = helm::upstream_chart()?;
                m.helm(&[
                    "install",
                    RELEASE,
                    &chart.display().to_string(),
                    "-n",
                    RELEASE_NS,
                    "-f",
                    &values.display().to_string(),
                ])?;
                m.cluster.wait_crds_established().map(drop)
            }
            (UpgradePath::Helm, Write::Crds) => {
                let crds = helm::chart_dir().join("crds/crd.yaml");
                let crds = crds.display().to_string();
                let force = "--force-conflicts";
                m.kubectl(&["apply", "--server-side", force, "-f", &crds], None)?;
                m.cluster.wait_crds_established().map(drop)
            }
            (UpgradePath::Helm, Write::Upgrade) => {
                let got = m.helm(&["get", "values", RELEASE, "-n", RELEASE_NS, "-o", "yaml"])?;
                let old = self.dir.join("old-values.yaml");
                std::fs::write(&old, got)?;
                let ours = helm::chart_dir().display().to_string();
                let old = old.display().to_string();
                m.helm(&["upgrade", RELEASE, &ours, "-n", RELEASE_NS, "-f", &old])
                    .map(drop)
            }
            (UpgradePath::Helm, Write::Rollback) => m
                .helm(&["rollback", RELEASE, "1", "-n", RELEASE_NS])
                .map(drop),
            (UpgradePath::Manifests, Write::Install) => {
                m.apply(&upstream_manifests()?)?;
                m.cluster.wait_crds_established().map(drop)
            }
            (UpgradePath::Manifests, Write::Crds | Write::Upgrade) => {
                let ours = crate::repo_root().join("deploy/infra/deployment-rbac.yaml");
                m.apply(&std::fs::read_to_string(ours)?)?;
                m.cluster.wait_crds_established().map(drop)
            }
            (UpgradePath::Manifests, Write::Rollback) => {
                m.apply(&upstream_manifests()?)?;
                for args in helm::MANIFESTS_ROLLBACK_DELETES {
                    m.kubectl(args, None)?;
                }
                Ok(())
            }
        }
    }
}

fn upstream_manifests() -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(helm::upstream_manifest(
        "deployment-rbac.yaml",
    )?)?)
}

/// One write of a path.
#[derive(Clone, Copy, Debug)]
enum Write {
    Install,
    Crds,
    Upgrade,
    Rollback,
}

impl Write {
    fn name(self, path: UpgradePath) -> String {
        let what = match (path, self) {
            (UpgradePath::Helm, Write::Install) => "helm install upstream 4.1.18",
            (UpgradePath::Helm, Write::Crds) => "CRDs applied",
            (UpgradePath::Helm, Write::Upgrade) => "helm upgrade upstream -> ours",
            (UpgradePath::Helm, Write::Rollback) => "helm rollback",
            (_, Write::Install) => "kubectl apply upstream's",
            (_, Write::Crds | Write::Upgrade) => "kubectl apply ours",
            (_, Write::Rollback) => "kubectl apply upstream's + deletes",
        };
        what.to_string()
    }
}
