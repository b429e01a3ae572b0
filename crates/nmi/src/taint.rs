//! `--node-startup-taint`: no pod on a new node before NMI is ready.
//!
//! A node pool created with a taint such as
//! `aadpodidentity.k8s.io/nmi-not-ready=true:NoSchedule` runs no pod that
//! does not tolerate it. NMI (which tolerates everything) removes every taint
//! with that key from its own Node once its redirect is in place and every
//! watch has synced, so the first pods find NMI answering instead of the
//! node's real IMDS.
//!
//! Pure: [`removal_patch`] (a JSON Patch that tests each taint it removes)
//! and [`retry_delay`]. Thin: [`remove_when_ready`], which needs `get` and
//! `patch` on `nodes`.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::{Api, Client};
use serde_json::{Value, json};

use aadpodid_runtime::Shutdown;

/// Attempts (a GET and a PATCH each) before giving up.
pub const MAX_ATTEMPTS: u32 = 20;

/// The JSON Patch that removes every taint with key `key` from `taints` (the
/// Node's `spec.taints` as read), or `None` when there is none. Each removal
/// is preceded by a `test` that the taint at that index still has that key,
/// so a list changed since it was read makes the apiserver refuse the whole
/// patch instead of removing the wrong taint; removals go from the highest
/// index down so earlier ones do not shift later ones.
pub fn removal_patch(taints: &[Taint], key: &str) -> Option<Value> {
    let indices: Vec<usize> = taints
        .iter()
        .enumerate()
        .filter(|(_, t)| t.key == key)
        .map(|(i, _)| i)
        .collect();
    if indices.is_empty() {
        return None;
    }
    let mut ops = Vec::with_capacity(indices.len() * 2);
    for i in indices.iter().rev() {
        ops.push(json!({"op": "test", "path": format!("/spec/taints/{i}/key"), "value": key}));
        ops.push(json!({"op": "remove", "path": format!("/spec/taints/{i}")}));
    }
    Some(Value::Array(ops))
}

/// How long to wait before attempt `attempt + 1` (`attempt` counts from 0).
/// A conflict (the taints changed under the patch) is retried at once with a
/// fresh read; other errors back off exponentially from 500 ms to 30 s.
pub fn retry_delay(attempt: u32, conflict: bool) -> Duration {
    if conflict {
        return Duration::from_millis(100);
    }
    let ms = 500u64.saturating_mul(1u64 << attempt.min(16));
    Duration::from_millis(ms.min(30_000))
}

/// Whether an API error means the Node changed under the patch (a failed
/// `test` is 422 Invalid, a write race 409 Conflict).
fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 || s.code == 422)
}

/// What one attempt did.
enum Attempt {
    /// The Node had no such taint (any more).
    Absent,
    /// Removed this many taints.
    Removed(usize),
}

async fn attempt(client: &Client, node: &str, key: &str) -> Result<Attempt, kube::Error> {
    let current = Api::<Node>::all(client.clone()).get(node).await?;
    let taints = current
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default();
    let Some(patch) = removal_patch(taints, key) else {
        return Ok(Attempt::Absent);
    };
    let removed = taints.iter().filter(|t| t.key == key).count();
    let name: String = form_urlencoded::byte_serialize(node.as_bytes()).collect();
    let body = serde_json::to_vec(&patch).map_err(kube::Error::SerdeError)?;
    let request = http::Request::patch(format!("/api/v1/nodes/{name}"))
        .header(http::header::CONTENT_TYPE, "application/json-patch+json")
        .header(http::header::ACCEPT, "application/json")
        .body(body)
        .map_err(kube::Error::HttpError)?;
    let _: Node = client.request(request).await?;
    Ok(Attempt::Removed(removed))
}

/// Waits until `ready` resolves (the caller's watches have all synced; the
/// redirect is in place before this is called), then removes every taint
/// with key `key` from Node `node`. Errors are retried with [`retry_delay`]
/// up to [`MAX_ATTEMPTS`] times; then it logs how to remove the taint by hand
/// and returns. Returns at once on `shutdown`.
pub async fn remove_when_ready(
    client: Client,
    node: String,
    key: String,
    ready: impl Future<Output = ()>,
    shutdown: Shutdown,
) {
    tokio::select! {
        _ = shutdown.signaled() => return,
        _ = ready => {}
    }
    for n in 0..MAX_ATTEMPTS {
        let delay = match attempt(&client, &node, &key).await {
            Ok(Attempt::Absent) if n == 0 => {
                tracing::info!(%node, taint = %key, "startup taint not on this node: nothing to remove");
                return;
            }
            Ok(Attempt::Absent) => {
                tracing::info!(%node, taint = %key, "startup taint gone");
                return;
            }
            Ok(Attempt::Removed(count)) => {
                tracing::info!(%node, taint = %key, count, "startup taint removed: the redirect is in place and the caches synced");
                return;
            }
            Err(error) => {
                let conflict = is_conflict(&error);
                tracing::warn!(%node, taint = %key, attempt = n + 1, %error, conflict, "removing the startup taint failed; retrying");
                retry_delay(n, conflict)
            }
        };
        tokio::select! {
            _ = shutdown.signaled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    tracing::error!(
        %node,
        taint = %key,
        "could not remove the startup taint after {MAX_ATTEMPTS} attempts; NMI itself serves, but pods that do not tolerate the taint stay off this node until it is removed (kubectl taint nodes {node} {key}-) or NMI restarts"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "aadpodidentity.k8s.io/nmi-not-ready";

    fn taint(key: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            effect: effect.into(),
            value: Some("true".into()),
            time_added: None,
        }
    }

    #[test]
    fn patches() {
        type Case = (&'static str, Vec<Taint>, Option<Value>);
        let cases: Vec<Case> = vec![
            ("no taints", vec![], None),
            (
                "only other taints",
                vec![
                    taint("node.kubernetes.io/not-ready", "NoSchedule"),
                    taint("aadpodidentity.k8s.io/nmi-not-ready-2", "NoSchedule"),
                ],
                None,
            ),
            (
                "the taint alone",
                vec![taint(KEY, "NoSchedule")],
                Some(json!([
                    {"op": "test", "path": "/spec/taints/0/key", "value": KEY},
                    {"op": "remove", "path": "/spec/taints/0"},
                ])),
            ),
            (
                "several effects, other taints kept, highest index first",
                vec![
                    taint(KEY, "NoSchedule"),
                    taint("node.kubernetes.io/unschedulable", "NoSchedule"),
                    taint(KEY, "NoExecute"),
                    taint("dedicated", "PreferNoSchedule"),
                ],
                Some(json!([
                    {"op": "test", "path": "/spec/taints/2/key", "value": KEY},
                    {"op": "remove", "path": "/spec/taints/2"},
                    {"op": "test", "path": "/spec/taints/0/key", "value": KEY},
                    {"op": "remove", "path": "/spec/taints/0"},
                ])),
            ),
        ];
        for (name, taints, want) in cases {
            assert_eq!(removal_patch(&taints, KEY), want, "{name}");
        }
    }

    #[test]
    fn the_patch_applied_keeps_other_taints() {
        let taints = vec![
            taint(KEY, "NoSchedule"),
            taint("keep-1", "NoSchedule"),
            taint(KEY, "NoExecute"),
            taint("keep-2", "NoExecute"),
        ];
        let mut node = json!({"spec": {"taints": taints}});
        let patch: json_patch_like::Ops =
            serde_json::from_value(removal_patch(&taints, KEY).unwrap()).unwrap();
        json_patch_like::apply(&mut node, &patch);
        let keys: Vec<&str> = node["spec"]["taints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, ["keep-1", "keep-2"]);
    }

    /// The two operations [`removal_patch`] emits, applied as RFC 6902 says.
    mod json_patch_like {
        use serde_json::Value;

        pub type Ops = Vec<Value>;

        pub fn apply(doc: &mut Value, ops: &Ops) {
            for op in ops {
                let path = op["path"].as_str().unwrap();
                match op["op"].as_str().unwrap() {
                    "test" => assert_eq!(doc.pointer(path).unwrap(), &op["value"], "{path}"),
                    "remove" => {
                        let (parent, i) = path.rsplit_once('/').unwrap();
                        let i: usize = i.parse().unwrap();
                        doc.pointer_mut(parent)
                            .unwrap()
                            .as_array_mut()
                            .unwrap()
                            .remove(i);
                    }
                    other => panic!("unexpected op {other}"),
                }
            }
        }
    }

    #[test]
    fn delays() {
        assert_eq!(retry_delay(0, true), Duration::from_millis(100));
        assert_eq!(retry_delay(7, true), Duration::from_millis(100));
        let backoff: Vec<u64> = (0..8)
            .map(|n| retry_delay(n, false).as_millis() as u64)
            .collect();
        assert_eq!(backoff, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        assert_eq!(retry_delay(u32::MAX, false), Duration::from_secs(30));
        let worst: Duration = (0..MAX_ATTEMPTS).map(|n| retry_delay(n, false)).sum();
        assert!(
            worst < Duration::from_secs(10 * 60),
            "gives up within ten minutes: {worst:?}"
        );
    }
}
