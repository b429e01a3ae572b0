//! IMDS, one listener per machine (VM or VMSS instance): managed-identity
//! tokens, instance metadata, versions, identity info; per-machine limits.
//! Wire formats: docs/upstream-behaviour.md#imds-wire-format.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::clock::{VirtualTime, wall_now_secs};
use crate::config::MiResIdMode;
use crate::http::{self, HandlerFn, Resp, first, form_pairs};
use crate::ids::key;
use crate::observe::{RequestRecord, Service};
use crate::state::{Kind, Machine, MachineIdentity};
use crate::{Shared, lock};

/// IMDS api-versions, as IMDS documents them; newest last.
pub const IMDS_API_VERSIONS: &[&str] = &[
    "2017-03-01",
    "2017-04-02",
    "2017-08-01",
    "2017-10-01",
    "2017-12-01",
    "2018-02-01",
    "2018-04-02",
    "2018-10-01",
    "2019-02-01",
    "2019-03-11",
    "2019-04-30",
    "2019-06-01",
    "2019-06-04",
    "2019-08-01",
    "2019-08-15",
    "2019-11-01",
    "2020-06-01",
    "2020-07-15",
    "2020-09-01",
    "2020-10-01",
    "2020-12-01",
    "2021-01-01",
    "2021-02-01",
    "2021-03-01",
    "2021-05-01",
    "2021-08-01",
    "2021-10-01",
    "2021-11-01",
    "2021-11-15",
    "2021-12-13",
    "2023-07-01",
    "2023-11-15",
    "2024-03-15",
    "2024-07-17",
    "2025-04-07",
];
/// The token operation exists from 2018-02-01 (imds.json).
const TOKEN_SINCE: &str = "2018-02-01";

#[derive(Debug, Clone)]
struct Cached {
    token: String,
    iat: u64,
    exp: u64,
}

/// IMDS's token cache, per (machine, identity, resource); `bypass_cache=true`
/// skips it.
#[derive(Debug, Default)]
pub struct TokenCache {
    map: Mutex<HashMap<(String, String, String), Cached>>,
}

/// Per-listener limits: requests in the last virtual second, and concurrency.
#[derive(Debug)]
struct Ctx {
    machine: Machine,
    token_window: Mutex<VecDeque<VirtualTime>>,
    other_window: Mutex<VecDeque<VirtualTime>>,
    concurrency: Semaphore,
}

pub(crate) fn handler(shared: Arc<Shared>, machine: Machine) -> HandlerFn {
    let ctx = Arc::new(Ctx {
        concurrency: Semaphore::new(shared.cfg.imds.token_concurrency.max(1) as usize),
        machine,
        token_window: Mutex::new(VecDeque::new()),
        other_window: Mutex::new(VecDeque::new()),
    });
    Arc::new(move |req, peer| {
        let s = shared.clone();
        let c = ctx.clone();
        Box::pin(async move { handle(&s, &c, req, peer).await })
    })
}

fn oauth_err(status: u16, error: &str, description: &str) -> (u16, Resp) {
    (
        status,
        http::json(
            status,
            &json!({"error": error, "error_description": description}),
            &[],
        ),
    )
}

fn instance_err(status: u16, body: Value) -> (u16, Resp) {
    (status, http::json(status, &body, &[]))
}

fn bad_version() -> (u16, Resp) {
    instance_err(
        400,
        json!({
            "error": "Bad request. api-version is invalid or was not specified in the request. For more information refer to aka.ms/azureimds",
            "newest-versions": ["2025-04-07", "2024-07-17", "2024-03-15"],
        }),
    )
}

/// Counts one request in a one-second sliding window; false when over `limit`.
fn admit(window: &Mutex<VecDeque<VirtualTime>>, now: VirtualTime, limit: u32) -> bool {
    let mut w = lock(window);
    while w
        .front()
        .is_some_and(|t| now.saturating_sub(*t) >= Duration::from_secs(1))
    {
        w.pop_front();
    }
    if w.len() >= limit as usize {
        return false;
    }
    w.push_back(now);
    true
}

fn throttled() -> (u16, Resp) {
    // No Retry-After: MSAL Python replays any answer carrying one as a throttle.
    oauth_err(
        429,
        "too_many_requests",
        "Too many requests. Please retry after some time.",
    )
}

async fn handle(s: &Shared, ctx: &Ctx, req: Request<Incoming>, peer: std::net::SocketAddr) -> Resp {
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let path = req.uri().path().trim_end_matches('/').to_string();
    let is_token = path.eq_ignore_ascii_case("/metadata/identity/oauth2/token");
    let (status, resp) = dispatch(s, ctx, req, &path, is_token).await;
    let label = ctx.machine.label.clone();
    s.observer.count(|c| {
        *c.imds_requests.entry(label.clone()).or_default() += 1;
        if is_token {
            *c.imds_token_requests.entry(label.clone()).or_default() += 1;
        }
        if status == 429 {
            c.imds_throttled += 1;
        }
    });
    let at_ms = s.clock.now().as_millis() as u64;
    s.observer.record(RequestRecord {
        machine: Some(label),
        peer: Some(peer.ip().to_canonical().to_string()),
        ..RequestRecord::answered(Service::Imds, method, uri, status, at_ms)
    });
    resp
}

async fn dispatch(
    s: &Shared,
    ctx: &Ctx,
    req: Request<Incoming>,
    path: &str,
    is_token: bool,
) -> (u16, Resp) {
    let identity_path = path.to_ascii_lowercase().starts_with("/metadata/identity");
    // The Metadata header is checked before anything else, so header-less
    // probes are answered at once (SDK probes give up after about a second).
    let metadata_ok = req.headers().get("metadata").and_then(|v| v.to_str().ok()) == Some("true");
    if !metadata_ok {
        return if identity_path {
            oauth_err(
                400,
                "invalid_request",
                "Required metadata header not specified",
            )
        } else {
            instance_err(
                400,
                json!({"error": "Bad request: . Required metadata header not specified"}),
            )
        };
    }
    if req.headers().contains_key("x-forwarded-for") {
        // Status and body undocumented; 400 assumed.
        return oauth_err(
            400,
            "invalid_request",
            "Request not allowed: X-Forwarded-For header is present",
        );
    }
    if req.method() != hyper::Method::GET {
        return oauth_err(
            405,
            "method_not_allowed",
            "The requested verb is not supported",
        );
    }
    let now = s.clock.now();
    let limits = &s.cfg.imds;
    if is_token {
        if !admit(&ctx.token_window, now, limits.token_requests_per_second) {
            return throttled();
        }
    } else if !admit(&ctx.other_window, now, limits.instance_requests_per_second) {
        return throttled();
    }
    let permit = if is_token {
        match ctx.concurrency.try_acquire() {
            Ok(p) => Some(p),
            Err(_) => return throttled(),
        }
    } else {
        None
    };
    if let Some((status, retry_after)) = s
        .fault_gate(
            Service::Imds,
            req.method().as_str(),
            path,
            Some(&ctx.machine.label),
        )
        .await
    {
        let (status, mut resp) = fault_body(status);
        // An injected fault's `retryAfter` is sent as given (clients that
        // honour it are tested against it).
        if let Some(secs) = retry_after
            && let Ok(v) = hyper::header::HeaderValue::from_str(&secs.to_string())
        {
            resp.headers_mut().insert(hyper::header::RETRY_AFTER, v);
        }
        return (status, resp);
    }
    let query = req.uri().query().unwrap_or("").to_string();
    let pairs = form_pairs(&query);
    let lower = path.to_ascii_lowercase();
    let answer = if is_token {
        let label = ctx.machine.label.clone();
        s.observer
            .count(|c| *c.imds_token_in_flight.entry(label.clone()).or_default() += 1);
        let answer = token(s, ctx, &pairs).await;
        s.observer.count(|c| {
            if let Some(n) = c.imds_token_in_flight.get_mut(&label) {
                *n = n.saturating_sub(1);
            }
        });
        answer
    } else if lower == "/metadata/versions" {
        (
            200,
            http::json(200, &json!({"apiVersions": IMDS_API_VERSIONS}), &[]),
        )
    } else if lower == "/metadata/identity/info" {
        match first(&pairs, "api-version") {
            Some(v) if IMDS_API_VERSIONS.contains(&v) => {
                let t = lock(&s.state).tenant_id.clone();
                (200, http::json(200, &json!({"tenantId": t}), &[]))
            }
            _ => bad_version(),
        }
    } else if lower == "/metadata/instance" || lower.starts_with("/metadata/instance/") {
        instance(s, ctx, path, &pairs)
    } else {
        instance_err(404, json!({"error": "Not found"}))
    };
    drop(permit);
    answer
}

fn fault_body(status: u16) -> (u16, Resp) {
    match status {
        404 => oauth_err(404, "not_found", "IMDS endpoint is updating"),
        410 => oauth_err(410, "service_unavailable", "IMDS is going through updates"),
        429 => throttled(),
        500 => oauth_err(
            500,
            "unknown",
            "Failed to retrieve token from the Active directory. For details see logs in /var/log/azure/Microsoft.ManagedIdentity/msi.log",
        ),
        503 => oauth_err(
            503,
            "service_unavailable",
            "The service is temporarily unavailable",
        ),
        other => oauth_err(other, "server_error", "Fault injected by the emulator"),
    }
}

/// IMDS success body: every value a string; `expires_on` is the JWT's `exp`,
/// `not_before` its `nbf`.
#[derive(Serialize)]
struct ImdsToken {
    access_token: String,
    client_id: String,
    expires_in: String,
    expires_on: String,
    ext_expires_in: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    msi_res_id: Option<String>,
    not_before: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    object_id: Option<String>,
    resource: String,
    token_type: &'static str,
}

const NOT_FOUND: &str = "Identity not found";
const MULTIPLE: &str = "Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request";

async fn token(s: &Shared, ctx: &Ctx, pairs: &[(String, String)]) -> (u16, Resp) {
    let mut names: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return oauth_err(
            400,
            "invalid_request",
            "Duplicate query parameter names are not allowed",
        );
    }
    match first(pairs, "api-version") {
        Some(v) if IMDS_API_VERSIONS.contains(&v) && v >= TOKEN_SINCE => {}
        _ => {
            return oauth_err(
                400,
                "invalid_request",
                "api-version is invalid or was not specified in the request",
            );
        }
    }
    let Some(resource) = first(pairs, "resource")
        .filter(|r| !r.is_empty())
        .map(str::to_string)
    else {
        // Exact text undocumented; this is what other emulators send.
        return oauth_err(
            400,
            "invalid_request",
            "Required audience parameter not specified",
        );
    };
    let mi_res_id = first(pairs, "mi_res_id").map(str::to_string);
    let msi_res_id =
        first(pairs, "msi_res_id")
            .map(str::to_string)
            .or(match s.cfg.imds.mi_res_id {
                MiResIdMode::Alias => mi_res_id.clone(),
                _ => None,
            });
    if mi_res_id.is_some() && s.cfg.imds.mi_res_id == MiResIdMode::Reject {
        return oauth_err(
            400,
            "invalid_request",
            "mi_res_id is not a supported parameter; use msi_res_id",
        );
    }
    let client_id = first(pairs, "client_id").map(str::to_string);
    let object_id = first(pairs, "object_id").map(str::to_string);
    let selectors = [
        client_id.is_some(),
        object_id.is_some(),
        msi_res_id.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if selectors > 1 {
        return oauth_err(
            400,
            "invalid_request",
            "Only one of client_id, object_id or msi_res_id may be specified",
        );
    }
    let now = s.clock.now();
    let (ids, tenant) = {
        let st = lock(&s.state);
        (
            st.machine_identities(&ctx.machine, now),
            st.tenant_id.clone(),
        )
    };
    let chosen: Result<&MachineIdentity, &str> = if let Some(c) = &client_id {
        ids.iter()
            .find(|i| i.client_id.eq_ignore_ascii_case(c))
            .ok_or(NOT_FOUND)
    } else if let Some(o) = &object_id {
        ids.iter()
            .find(|i| i.principal_id.eq_ignore_ascii_case(o))
            .ok_or(NOT_FOUND)
    } else if let Some(r) = &msi_res_id {
        ids.iter()
            .find(|i| i.resource_id.as_deref().is_some_and(|x| key(x) == key(r)))
            .ok_or(NOT_FOUND)
    } else if let Some(sys) = ids.iter().find(|i| i.resource_id.is_none()) {
        Ok(sys)
    } else {
        match ids.len() {
            0 => Err(NOT_FOUND),
            1 if s.cfg.imds.single_identity_default => Ok(&ids[0]),
            _ => Err(MULTIPLE),
        }
    };
    let chosen = match chosen {
        Ok(c) => c.clone(),
        Err(msg) => return oauth_err(400, "invalid_request", msg),
    };
    if !crate::aad::resource_known(s, &resource) {
        return oauth_err(
            400,
            "invalid_resource",
            &format!(
                "AADSTS500011: The resource principal named {resource} was not found in the tenant named {tenant}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant."
            ),
        );
    }
    if s.cfg.imds.token_latency_seconds > 0.0 {
        s.clock
            .sleep(Duration::from_secs_f64(s.cfg.imds.token_latency_seconds))
            .await;
    }
    let bypass = first(pairs, "bypass_cache") == Some("true");
    let cache_key = (
        ctx.machine.label.clone(),
        chosen.principal_id.clone(),
        resource.clone(),
    );
    let wall = wall_now_secs();
    let cached = if bypass {
        None
    } else {
        lock(&s.imds_cache.map)
            .get(&cache_key)
            .filter(|c| c.exp > wall + 300)
            .cloned()
    };
    let tok = match cached {
        Some(c) => c,
        None => {
            let life = s.cfg.imds.token_lifetime_seconds;
            match s.mint(
                &resource,
                &chosen.principal_id,
                &chosen.client_id,
                chosen.resource_id.as_deref(),
                life,
            ) {
                Ok((token, iat, exp)) => {
                    let c = Cached { token, iat, exp };
                    lock(&s.imds_cache.map).insert(cache_key, c.clone());
                    c
                }
                Err(_) => return fault_body(500),
            }
        }
    };
    let remaining = tok.exp.saturating_sub(wall).to_string();
    let body = ImdsToken {
        access_token: tok.token,
        client_id: chosen.client_id,
        expires_in: remaining.clone(),
        expires_on: tok.exp.to_string(),
        ext_expires_in: remaining,
        msi_res_id,
        not_before: tok.iat.to_string(),
        object_id,
        resource,
        token_type: "Bearer",
    };
    (200, http::json_typed(200, &body, &[]))
}

fn instance(s: &Shared, ctx: &Ctx, path: &str, pairs: &[(String, String)]) -> (u16, Resp) {
    match first(pairs, "api-version") {
        Some(v) if IMDS_API_VERSIONS.contains(&v) => {}
        _ => return bad_version(),
    }
    let doc = {
        let st = lock(&s.state);
        let Some(c) = st.compute.get(&ctx.machine.resource_key) else {
            return instance_err(404, json!({"error": "Not found"}));
        };
        let (name, resource_id, vm_id, computer, vmss_name, vmss_id) =
            match (&c.kind, &ctx.machine.instance_id) {
                (Kind::ScaleSet, Some(i)) => {
                    let inst = c.instances.iter().find(|x| &x.instance_id == i);
                    (
                        format!("{}_{i}", c.name),
                        format!("{}/virtualMachines/{i}", c.id),
                        inst.map(|x| x.vm_id.clone()).unwrap_or_default(),
                        inst.map(|x| x.computer_name.clone()).unwrap_or_default(),
                        c.name.clone(),
                        c.id.clone(),
                    )
                }
                _ => (
                    c.name.clone(),
                    c.id.clone(),
                    c.unique_id.clone(),
                    c.name.clone(),
                    String::new(),
                    String::new(),
                ),
            };
        // Every primitive a string, missing ones "" (as IMDS documents).
        json!({
            "compute": {
                "azEnvironment": "AzurePublicCloud",
                "location": c.location,
                "name": name,
                "osType": "Linux",
                "resourceGroupName": c.resource_group,
                "resourceId": resource_id,
                "subscriptionId": st.subscription_id,
                "vmId": vm_id,
                "vmScaleSetName": vmss_name,
                "virtualMachineScaleSet": {"id": vmss_id},
                "osProfile": {"adminUsername": "azureuser", "computerName": computer},
                "zone": "",
                "tags": "",
                "tagsList": [],
            },
            "network": {"interface": []},
        })
    };
    let rest: Vec<&str> = path["/metadata/instance".len()..]
        .split('/')
        .filter(|x| !x.is_empty())
        .collect();
    let mut node = &doc;
    for seg in rest {
        let next = match node {
            Value::Object(m) => m
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(seg))
                .map(|(_, v)| v),
            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => return instance_err(404, json!({"error": "Not found"})),
        }
    }
    let text = first(pairs, "format") == Some("text");
    match node {
        Value::String(leaf) if text => (
            200,
            http::response(200, "text/plain; charset=utf-8", leaf.clone(), &[]),
        ),
        Value::String(_) => instance_err(
            400,
            json!({"error": "Bad request. Leaf nodes require format=text. For more information refer to aka.ms/azureimds"}),
        ),
        other => (200, http::json(200, other, &[])),
    }
}
