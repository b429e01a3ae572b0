//! Fail-closed until uninstall (`--cleanup-on-uninstall`).
//!
//! NMI keeps its iptables redirect when it stops, so pods never reach the
//! node's real IMDS while NMI restarts or rolls. That redirect must go when the
//! DaemonSet itself is removed (`helm uninstall`), on every node, or pods would
//! get "connection refused" from IMDS forever. So NMI watches the DaemonSet that
//! owns its pod while it runs, and on SIGTERM removes the rules only when that
//! DaemonSet is gone or being deleted. A rolling update, a restart, a node drain
//! or an eviction keeps them.
//!
//! Why a watch and not only a look at exit: `helm uninstall` deletes the
//! DaemonSet first (Helm's uninstall order puts workloads before RBAC and
//! ServiceAccounts), and the garbage collector then deletes the pods. By the
//! time the kubelet sends SIGTERM, the ServiceAccount may be gone and NMI's
//! token refused, but the watch has already seen the deletion. A fresh GET at
//! exit is a second source when it still works.
//!
//! The decision is [`decide`], pure; [`OwnerWatch`] feeds it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aadpodid_runtime::Shutdown;
use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};

/// Downward-API variable with this pod's name (the chart sets it).
pub const ENV_POD_NAME: &str = "POD_NAME";
/// Downward-API variable with this pod's namespace (the chart sets it).
pub const ENV_POD_NAMESPACE: &str = "POD_NAMESPACE";

/// Bound on the GET made at exit: the kubelet's grace period is short.
const EXIT_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// What NMI knows about its owning DaemonSet (by name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerState {
    /// Not observed (yet), or the API refused to say.
    Unknown,
    /// A DaemonSet of that name exists.
    Present {
        /// Its UID; another UID is a successor, not the owner.
        uid: String,
        /// It has a `deletionTimestamp` (foreground deletion in progress).
        deleting: bool,
    },
    /// No DaemonSet of that name exists.
    Absent,
}

/// What to do with the iptables redirect when NMI stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Remove the chain and jump: the DaemonSet is being uninstalled.
    RemoveRules,
    /// Keep them (fail-closed): NMI is restarting or being replaced.
    KeepRules,
}

/// Whether to remove the rules at exit. `fresh` is a GET made at exit (None
/// when it failed), `watched` the last state the watch saw; a fresh answer wins
/// over the watch. Only clear evidence that the owner `owner_uid` is gone or
/// going removes the rules: anything unknown keeps them (fail-closed), and a
/// DaemonSet of the same name but another UID is a successor that takes the
/// rules over.
pub fn decide(owner_uid: &str, fresh: Option<&OwnerState>, watched: &OwnerState) -> ExitAction {
    let evidence = match fresh {
        Some(state) if *state != OwnerState::Unknown => state,
        _ => watched,
    };
    match evidence {
        OwnerState::Absent => ExitAction::RemoveRules,
        OwnerState::Present { uid, deleting } if uid == owner_uid && *deleting => {
            ExitAction::RemoveRules
        }
        OwnerState::Present { .. } | OwnerState::Unknown => ExitAction::KeepRules,
    }
}

/// The state an observed object (or its absence) stands for.
pub fn observe(ds: Option<&DaemonSet>) -> OwnerState {
    match ds {
        None => OwnerState::Absent,
        Some(ds) => OwnerState::Present {
            uid: ds.metadata.uid.clone().unwrap_or_default(),
            deleting: ds.metadata.deletion_timestamp.is_some(),
        },
    }
}

/// The DaemonSet that controls a pod, from its owner references: (name, UID).
pub fn daemonset_owner(pod: &Pod) -> Option<(String, String)> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|r| r.kind == "DaemonSet" && r.controller == Some(true))
        .map(|r| (r.name.clone(), r.uid.clone()))
}

/// Why the owner could not be found at start.
#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    /// `--pod-name`/`--pod-namespace` (POD_NAME/POD_NAMESPACE) are empty.
    #[error("--cleanup-on-uninstall needs POD_NAME and POD_NAMESPACE (downward API)")]
    MissingPodIdentity,
    /// Reading this NMI's own pod failed.
    #[error("getting pod {namespace}/{name}: {source}")]
    GetPod {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Why.
        source: kube::Error,
    },
    /// The pod has no controlling DaemonSet.
    #[error("pod {namespace}/{name} is not controlled by a DaemonSet")]
    NoDaemonSetOwner {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
}

/// Watches the owning DaemonSet while NMI runs.
#[derive(Clone, Debug)]
pub struct OwnerWatch {
    api: Api<DaemonSet>,
    name: String,
    uid: String,
    watched: Arc<Mutex<OwnerState>>,
}

impl OwnerWatch {
    /// Finds the DaemonSet that owns pod `namespace/name` and starts watching
    /// it (by name, so the Role may restrict `resourceNames`) until `shutdown`.
    pub async fn start(
        client: &Client,
        namespace: &str,
        name: &str,
        shutdown: &Shutdown,
    ) -> Result<Self, UninstallError> {
        if namespace.is_empty() || name.is_empty() {
            return Err(UninstallError::MissingPodIdentity);
        }
        let pod = Api::<Pod>::namespaced(client.clone(), namespace)
            .get(name)
            .await
            .map_err(|source| UninstallError::GetPod {
                namespace: namespace.into(),
                name: name.into(),
                source,
            })?;
        let (ds_name, uid) =
            daemonset_owner(&pod).ok_or_else(|| UninstallError::NoDaemonSetOwner {
                namespace: namespace.into(),
                name: name.into(),
            })?;
        let api = Api::<DaemonSet>::namespaced(client.clone(), namespace);
        let watch = OwnerWatch {
            api: api.clone(),
            name: ds_name.clone(),
            uid,
            watched: Arc::new(Mutex::new(OwnerState::Unknown)),
        };
        let cfg = watcher::Config::default().fields(&format!("metadata.name={ds_name}"));
        let stream = aadpodid_runtime::watch::events(api, cfg);
        let watched = Arc::clone(&watch.watched);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::pin!(stream);
            // During a (re)list: whether the DaemonSet was among the objects.
            let mut listed: Option<DaemonSet> = None;
            loop {
                let event = tokio::select! {
                    _ = shutdown.signaled() => return,
                    e = stream.next() => e,
                };
                let state = match event {
                    None => return,
                    Some(Err(error)) => {
                        tracing::warn!(%error, "watching the NMI DaemonSet failed; retrying");
                        continue;
                    }
                    Some(Ok(Event::Init)) => {
                        listed = None;
                        continue;
                    }
                    Some(Ok(Event::InitApply(ds))) => {
                        listed = Some(ds);
                        continue;
                    }
                    Some(Ok(Event::InitDone)) => observe(listed.take().as_ref()),
                    Some(Ok(Event::Apply(ds))) => observe(Some(&ds)),
                    Some(Ok(Event::Delete(_))) => OwnerState::Absent,
                };
                if let Ok(mut w) = watched.lock() {
                    if *w != state {
                        tracing::info!(?state, "NMI DaemonSet observed");
                    }
                    *w = state;
                }
            }
        });
        Ok(watch)
    }

    /// The owning DaemonSet's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The last state the watch saw.
    pub fn watched(&self) -> OwnerState {
        self.watched
            .lock()
            .map(|w| w.clone())
            .unwrap_or(OwnerState::Unknown)
    }

    /// Decides at exit, with a bounded fresh GET and the watched state.
    pub async fn decide_on_exit(&self) -> ExitAction {
        let fresh = match tokio::time::timeout(EXIT_CHECK_TIMEOUT, self.api.get_opt(&self.name))
            .await
        {
            Ok(Ok(ds)) => Some(observe(ds.as_ref())),
            Ok(Err(error)) => {
                tracing::info!(%error, "could not read the NMI DaemonSet at exit; using the watch");
                None
            }
            Err(_) => None,
        };
        let watched = self.watched();
        let action = decide(&self.uid, fresh.as_ref(), &watched);
        tracing::info!(daemonset = %self.name, ?fresh, ?watched, ?action, "exit decision");
        action
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
    use kube::api::ObjectMeta;

    fn present(uid: &str, deleting: bool) -> OwnerState {
        OwnerState::Present {
            uid: uid.into(),
            deleting,
        }
    }

    #[test]
    fn only_clear_evidence_of_uninstall_removes_the_rules() {
        use ExitAction::{KeepRules as Keep, RemoveRules as Remove};
        use OwnerState::{Absent, Unknown};
        let cases: Vec<(&str, Option<OwnerState>, OwnerState, ExitAction)> = vec![
            // A rolling update or restart: the DaemonSet is there.
            (
                "restart",
                Some(present("u1", false)),
                present("u1", false),
                Keep,
            ),
            ("restart, exit GET failed", None, present("u1", false), Keep),
            // helm uninstall (background propagation): gone.
            ("uninstall", Some(Absent), present("u1", false), Remove),
            ("uninstall, token already refused", None, Absent, Remove),
            ("uninstall, watch late", Some(Absent), Unknown, Remove),
            // Foreground deletion: still there, with a deletionTimestamp.
            (
                "foreground delete",
                Some(present("u1", true)),
                present("u1", false),
                Remove,
            ),
            (
                "foreground delete seen by watch",
                None,
                present("u1", true),
                Remove,
            ),
            // A successor of the same name takes the rules over.
            ("replaced", Some(present("u2", false)), Absent, Keep),
            (
                "successor being deleted",
                Some(present("u2", true)),
                Absent,
                Keep,
            ),
            // Nothing known: fail-closed.
            ("unknown", None, Unknown, Keep),
            ("unknown fresh", Some(Unknown), Unknown, Keep),
            // A fresh answer wins over a stale watch.
            ("watch stale", Some(present("u1", false)), Absent, Keep),
        ];
        for (what, fresh, watched, want) in cases {
            assert_eq!(decide("u1", fresh.as_ref(), &watched), want, "{what}");
        }
    }

    #[test]
    fn observe_reads_uid_and_deletion() {
        let mut ds = DaemonSet {
            metadata: ObjectMeta {
                uid: Some("u1".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(observe(Some(&ds)), present("u1", false));
        ds.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert_eq!(observe(Some(&ds)), present("u1", true));
        assert_eq!(observe(None), OwnerState::Absent);
    }

    #[test]
    fn owner_is_the_controlling_daemonset() {
        let owner = |kind: &str, name: &str, controller| OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            controller: Some(controller),
            ..Default::default()
        };
        let pod = |refs| Pod {
            metadata: ObjectMeta {
                owner_references: Some(refs),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(
            daemonset_owner(&pod(vec![
                owner("ReplicaSet", "rs", false),
                owner("DaemonSet", "other", false),
                owner("DaemonSet", "nmi", true),
            ])),
            Some(("nmi".into(), "uid-nmi".into()))
        );
        assert_eq!(
            daemonset_owner(&pod(vec![owner("ReplicaSet", "rs", true)])),
            None
        );
        assert_eq!(daemonset_owner(&Pod::default()), None);
    }
}
