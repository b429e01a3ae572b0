//! Admin endpoint (plain HTTP, loopback): observation, fault injection and
//! state-level faults for tests in other processes and for people.
//!
//! - `GET /urls`, `GET /counters`, `GET /requests?since=N`, `GET /state`
//! - `GET|POST|DELETE /faults` (POST body: a [`crate::Fault`] as JSON)
//! - `POST /actions` with `{"action": "...", ...}`; see [`Action`].

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::faults::Fault;
use crate::http::{self, HandlerFn, Resp, first, form_pairs};
use crate::{Shared, actions, lock};

/// State-level faults and controls, as JSON bodies of `POST /actions`.
#[derive(Debug, Deserialize)]
#[serde(tag = "action", rename_all = "camelCase", deny_unknown_fields)]
pub enum Action {
    DeleteIdentity {
        name: String,
    },
    #[serde(rename_all = "camelCase")]
    RecreateIdentity {
        name: String,
        resource_group: String,
    },
    RevokeAssign {
        name: String,
        #[serde(default = "yes")]
        revoked: bool,
    },
    #[serde(rename_all = "camelCase")]
    RevokeWrite {
        object_id: String,
        #[serde(default = "yes")]
        revoked: bool,
    },
    SetDeleting {
        resource: String,
        #[serde(default = "yes")]
        deleting: bool,
    },
    StripIdentities {
        resource: String,
        #[serde(default)]
        identities: Option<Vec<String>>,
    },
    AssignIdentities {
        resource: String,
        identities: Vec<String>,
    },
    FailNextOperations {
        count: u32,
    },
    AdvanceClock {
        seconds: f64,
    },
    ResetThrottling,
    ResetObservations,
}

fn yes() -> bool {
    true
}

pub(crate) fn handler(shared: Arc<Shared>, urls: Value) -> HandlerFn {
    let urls = Arc::new(urls);
    Arc::new(move |req, _peer| {
        let s = shared.clone();
        let u = urls.clone();
        Box::pin(async move { handle(&s, &u, req).await })
    })
}

fn err(status: u16, msg: impl Into<String>) -> Resp {
    http::json(status, &json!({"error": msg.into()}), &[])
}

async fn handle(s: &Shared, urls: &Value, req: hyper::Request<hyper::body::Incoming>) -> Resp {
    let method = req.method().clone();
    let path = req.uri().path().trim_end_matches('/').to_string();
    let pairs = form_pairs(req.uri().query().unwrap_or(""));
    let body = match http::read_body(req, 1024 * 1024).await {
        Ok((_, b)) => b,
        Err(_) => return err(413, "body too large or unreadable"),
    };
    let parse = |b: &[u8]| {
        serde_json::from_slice::<Value>(b)
            .map_err(|e| Box::new(err(400, format!("invalid JSON: {e}"))))
    };
    match (method.as_str(), path.as_str()) {
        ("GET", "/urls") => http::json(200, urls, &[]),
        ("GET", "/counters") => http::json(200, &json!(s.observer.counters()), &[]),
        ("GET", "/requests") => {
            let since = first(&pairs, "since")
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
            http::json(200, &json!(s.observer.requests(since)), &[])
        }
        ("GET", "/state") => {
            let st = lock(&s.state);
            let now = s.clock.now();
            let compute: Vec<Value> = st
                .compute
                .values()
                .map(|c| {
                    let mut v = json!(c);
                    v["provisioningState"] = json!(st.provisioning_state(c, now));
                    v
                })
                .collect();
            http::json(
                200,
                &json!({
                    "tenantId": st.tenant_id,
                    "subscriptionId": st.subscription_id,
                    "virtualTimeMs": now.as_millis() as u64,
                    "identities": st.uais.values().collect::<Vec<_>>(),
                    "compute": compute,
                    "revokedAssign": st.revoked_assign,
                }),
                &[],
            )
        }
        ("GET", "/faults") => http::json(200, &json!(s.faults.list()), &[]),
        ("DELETE", "/faults") => {
            s.faults.clear();
            http::json(200, &json!({"cleared": true}), &[])
        }
        ("POST", "/faults") => {
            let v = match parse(&body) {
                Ok(v) => v,
                Err(r) => return *r,
            };
            match serde_json::from_value::<Fault>(v) {
                Ok(f) => {
                    s.faults.add(f);
                    http::json(200, &json!({"added": true}), &[])
                }
                Err(e) => err(400, format!("invalid fault: {e}")),
            }
        }
        ("POST", "/actions") => {
            let v = match parse(&body) {
                Ok(v) => v,
                Err(r) => return *r,
            };
            match serde_json::from_value::<Action>(v) {
                Ok(a) => http::json(200, &run(s, a), &[]),
                Err(e) => err(400, format!("invalid action: {e}")),
            }
        }
        _ => err(404, format!("no admin route {method} {path}")),
    }
}

fn run(s: &Shared, a: Action) -> Value {
    match a {
        Action::DeleteIdentity { name } => json!({"deleted": actions::delete_identity(s, &name)}),
        Action::RecreateIdentity {
            name,
            resource_group,
        } => json!(actions::recreate_identity(s, &name, &resource_group)),
        Action::RevokeAssign { name, revoked } => {
            json!({"found": actions::set_assign_revoked(s, &name, revoked)})
        }
        Action::RevokeWrite { object_id, revoked } => {
            let mut st = lock(&s.state);
            let k = object_id.to_ascii_lowercase();
            if revoked {
                st.revoked_write.insert(k);
            } else {
                st.revoked_write.remove(&k);
            }
            json!({"ok": true})
        }
        Action::SetDeleting { resource, deleting } => {
            json!({"found": actions::set_deleting(s, &resource, deleting)})
        }
        Action::StripIdentities {
            resource,
            identities,
        } => {
            let names: Option<Vec<&str>> = identities
                .as_ref()
                .map(|v| v.iter().map(String::as_str).collect());
            json!({"removed": actions::strip_identities(s, &resource, names.as_deref())})
        }
        Action::AssignIdentities {
            resource,
            identities,
        } => {
            let names: Vec<&str> = identities.iter().map(String::as_str).collect();
            json!({"assigned": actions::assign_identities(s, &resource, &names)})
        }
        Action::FailNextOperations { count } => {
            lock(&s.state).fail_next_operations = count;
            json!({"ok": true})
        }
        Action::AdvanceClock { seconds } => {
            s.clock.advance(Duration::from_secs_f64(seconds.max(0.0)));
            json!({"virtualTimeMs": s.clock.now().as_millis() as u64})
        }
        Action::ResetThrottling => {
            lock(&s.buckets).reset();
            json!({"ok": true})
        }
        Action::ResetObservations => {
            s.observer.reset();
            json!({"ok": true})
        }
    }
}
