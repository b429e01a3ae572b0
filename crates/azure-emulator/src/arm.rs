//! ARM: Microsoft.Compute scale sets, VMs and instances, user-assigned
//! identities, long-running operations, throttling.
//! Wire formats: docs/upstream-behaviour.md#arm-identity-api.

use std::sync::Arc;
use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;
use serde_json::{Map, Value, json};

use crate::clock::{VirtualTime, arm_timestamp};
use crate::config::{BucketConfig, ConcurrentWrites, LroMode, PolicyConfig};
use crate::error::ArmError;
use crate::http::{self, BodyError, HandlerFn, Resp, first_ci, form_pairs, header, media_type};
use crate::identity::{self, IdentityType, Limits, WriteMode};
use crate::ids::{key, new_guid};
use crate::observe::Service;
use crate::state::{Assigned, Compute, Kind, Operation, State};
use crate::throttle::{self, Charge};
use crate::{Shared, TokenClaims, lock};

/// Compute api-versions accepted (the stable ones of the published API
/// specifications). All share the identity
/// schema; `etag`/`If-Match` exist from 2023-09-01.
pub const COMPUTE_API_VERSIONS: &[&str] = &[
    "2018-06-01",
    "2018-10-01",
    "2019-03-01",
    "2019-07-01",
    "2019-12-01",
    "2020-06-01",
    "2020-12-01",
    "2021-03-01",
    "2021-04-01",
    "2021-07-01",
    "2021-11-01",
    "2022-03-01",
    "2022-08-01",
    "2022-11-01",
    "2023-03-01",
    "2023-07-01",
    "2023-09-01",
    "2024-03-01",
    "2024-07-01",
    "2024-11-01",
    "2025-04-01",
    "2025-11-01",
    "2026-04-01",
];
/// Microsoft.ManagedIdentity api-versions (the stable ones published).
pub const MSI_API_VERSIONS: &[&str] = &["2018-11-30", "2023-01-31", "2024-11-30", "2026-05-31"];
const ETAG_SINCE: &str = "2023-09-01";

struct Outcome {
    resource_key: Option<String>,
    write: bool,
    read: bool,
    lro_started: bool,
    lro_poll: bool,
}

pub(crate) fn handler(shared: Arc<Shared>) -> HandlerFn {
    Arc::new(move |req, _peer| {
        let s = shared.clone();
        Box::pin(async move { handle(&s, req).await })
    })
}

fn request_headers() -> Vec<(String, String)> {
    let id = new_guid();
    vec![
        ("x-ms-request-id".into(), id.clone()),
        ("x-ms-correlation-request-id".into(), id),
        ("Cache-Control".into(), "no-cache".into()),
    ]
}

async fn handle(s: &Shared, req: Request<Incoming>) -> Resp {
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let mut out = Outcome {
        resource_key: None,
        write: false,
        read: false,
        lro_started: false,
        lro_poll: false,
    };
    let result = match s
        .fault_gate(Service::Arm, &method, req.uri().path(), None)
        .await
    {
        Some((status, retry_after)) => Err(injected(status, retry_after)),
        None => route(s, req, &mut out).await,
    };
    let (status, resp) = match result {
        Ok((status, body, mut headers)) => {
            headers.extend(request_headers());
            match body {
                Some(b) => (status, http::json(status, &b, &headers)),
                None => (status, http::response(status, "", "", &headers)),
            }
        }
        Err(e) => {
            let mut headers = e.more.headers.clone();
            headers.extend(request_headers());
            (e.status, http::json(e.status, &e.body(), &headers))
        }
    };
    s.observer.count(|c| {
        if let Some(k) = &out.resource_key {
            if out.write {
                *c.arm_writes.entry(k.clone()).or_default() += 1;
            } else if out.read {
                *c.arm_reads.entry(k.clone()).or_default() += 1;
            }
        }
        if status == 429 {
            c.arm_throttled += 1;
        }
        if status >= 400 {
            c.arm_errors += 1;
        }
        if out.lro_started {
            c.lro_started += 1;
        }
        if out.lro_poll {
            c.lro_polls += 1;
        }
    });
    s.record_answer(Service::Arm, method, uri, status);
    resp
}

fn injected(status: u16, retry_after: Option<u64>) -> ArmError {
    match status {
        429 => throttle::throttled(
            &throttle::Refused {
                name: "InjectedFault".into(),
                wait: Duration::from_secs(retry_after.unwrap_or(1)),
                allowed: 0,
                measured: 1,
                window_start: Duration::ZERO,
            },
            retry_after.unwrap_or(1),
        ),
        500 => ArmError::new(
            500,
            "InternalServerError",
            "An unexpected error occured while processing the request.",
        ),
        503 => {
            let e = ArmError::new(
                503,
                "ServiceUnavailable",
                "The service is unavailable. Please try again later.",
            );
            match retry_after {
                Some(r) => e.header("Retry-After", r.to_string()),
                None => e,
            }
        }
        other => ArmError::new(
            other,
            "InjectedFault",
            format!("Fault injected by the emulator (status {other})."),
        ),
    }
}

type Answer = Result<(u16, Option<Value>, Vec<(String, String)>), ArmError>;

fn not_found_resource(kind: &str, name: &str, rg: &str) -> ArmError {
    ArmError::new(
        404,
        "ResourceNotFound",
        format!(
            "The Resource '{kind}/{name}' under resource group '{rg}' was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix"
        ),
    )
}

/// The Compute api-versions this emulator serves ([`COMPUTE_API_VERSIONS`]
/// unless the configuration names fewer).
fn served_compute_versions(cfg: &crate::config::ArmConfig) -> Vec<&str> {
    match &cfg.compute_api_versions {
        Some(v) => v.iter().map(String::as_str).collect(),
        None => COMPUTE_API_VERSIONS.to_vec(),
    }
}

fn check_api_version(
    pairs: &[(String, String)],
    allowed: &[&str],
    type_name: &str,
    location: &str,
) -> Result<String, ArmError> {
    let v = first_ci(pairs, "api-version")
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            ArmError::new(
                400,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
        })?;
    if !allowed.contains(&v) {
        return Err(ArmError::new(
            400,
            "NoRegisteredProviderFound",
            format!(
                "No registered resource provider found for location '{location}' and API version '{v}' for type '{type_name}'. The supported api-versions are '{}'. The supported locations are '{location}'.",
                allowed.join(", ")
            ),
        ));
    }
    Ok(v.to_string())
}

async fn route(s: &Shared, req: Request<Incoming>, out: &mut Outcome) -> Answer {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let claims = s.verify_arm_token(auth.as_deref())?;
    let path = req.uri().path().to_string();
    let pairs = form_pairs(req.uri().query().unwrap_or(""));
    let segs: Vec<&str> = path.split('/').filter(|x| !x.is_empty()).collect();
    let low: Vec<String> = segs.iter().map(|x| x.to_ascii_lowercase()).collect();
    let l: Vec<&str> = low.iter().map(String::as_str).collect();
    let (sub, tenant, location) = {
        let st = lock(&s.state);
        (
            st.subscription_id.clone(),
            st.tenant_id.clone(),
            st.location.clone(),
        )
    };
    let method = req.method().clone();
    let is_get = method == hyper::Method::GET;
    let compute_versions = served_compute_versions(&s.cfg.arm);
    // A read-only resource of type `type_name`: any method but GET is refused,
    // then the api-version is checked against `allowed`.
    let read_only = |allowed: &[&str], type_name: &str| {
        if !is_get {
            return Err(method_not_allowed(&method));
        }
        check_api_version(&pairs, allowed, type_name, &location)
    };

    if l.first() == Some(&"subscriptions") && l.len() == 1 && is_get {
        return Ok((
            200,
            Some(json!({"value": [subscription_json(&sub, &tenant)]})),
            vec![],
        ));
    }
    if l.first() != Some(&"subscriptions") || l.len() < 2 {
        return Err(ArmError::new(
            404,
            "NotFound",
            format!("The requested path '{path}' is not served by this emulator."),
        ));
    }
    if !l[1].eq_ignore_ascii_case(&sub) {
        return Err(ArmError::new(
            404,
            "SubscriptionNotFound",
            format!("The subscription '{}' could not be found.", segs[1]),
        ));
    }
    if l.len() == 2 && is_get {
        return Ok((200, Some(subscription_json(&sub, &tenant)), vec![]));
    }
    // /subscriptions/{s}/providers/Microsoft.Compute/locations/{loc}/operations/{id}
    if let [
        "subscriptions",
        _,
        "providers",
        "microsoft.compute",
        "locations",
        _,
        "operations",
        op,
    ] = l.as_slice()
    {
        read_only(&compute_versions, "locations/operations")?;
        out.lro_poll = true;
        return operation_status(
            s,
            op,
            &pairs,
            req.headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .unwrap_or(""),
            &sub,
            &location,
        );
    }
    if l.len() < 4 || l[2] != "resourcegroups" {
        return Err(ArmError::new(
            404,
            "NotFound",
            format!("The requested path '{path}' is not served by this emulator."),
        ));
    }
    let rg_display = lock(&s.state).resource_groups.get(l[3]).cloned();
    let Some(rg_display) = rg_display else {
        return Err(ArmError::new(
            404,
            "ResourceGroupNotFound",
            format!("Resource group '{}' could not be found.", segs[3]),
        ));
    };
    if l.len() == 4 && is_get {
        charge(s, &claims, None, &sub, false)?;
        return Ok((
            200,
            Some(
                json!({"id": format!("/subscriptions/{sub}/resourceGroups/{rg_display}"), "name": rg_display, "type": "Microsoft.Resources/resourceGroups", "location": location, "properties": {"provisioningState": "Succeeded"}}),
            ),
            vec![],
        ));
    }
    match &l[4..] {
        [
            "providers",
            "microsoft.managedidentity",
            "userassignedidentities",
            _,
        ] => {
            let api = read_only(MSI_API_VERSIONS, "userAssignedIdentities")?;
            let k = key(&path);
            out.resource_key = Some(k.clone());
            out.read = true;
            let headers = charge(s, &claims, None, &sub, false)?;
            let st = lock(&s.state);
            let u = st.uais.get(&k).ok_or_else(|| {
                not_found_resource(
                    "Microsoft.ManagedIdentity/userAssignedIdentities",
                    segs[7],
                    segs[3],
                )
            })?;
            let mut props = json!({"tenantId": st.tenant_id, "principalId": u.principal_id, "clientId": u.client_id});
            if api.as_str() >= "2024-11-30" {
                props["isolationScope"] = json!("None");
            }
            Ok((
                200,
                Some(
                    json!({"id": u.id, "name": u.name, "type": "Microsoft.ManagedIdentity/userAssignedIdentities", "location": st.location, "tags": {}, "properties": props}),
                ),
                headers,
            ))
        }
        [
            "providers",
            "microsoft.compute",
            "virtualmachinescalesets",
            _,
            "virtualmachines",
            inst,
        ] => {
            read_only(&compute_versions, "virtualMachineScaleSets/virtualMachines")?;
            let vk = key(&format!(
                "/subscriptions/{}/resourcegroups/{}/providers/microsoft.compute/virtualmachinescalesets/{}",
                l[1], l[3], l[7]
            ));
            out.resource_key = Some(key(&path));
            out.read = true;
            let headers = charge(
                s,
                &claims,
                Some((&s.cfg.throttle.vmss_vm_get, key(&path))),
                &sub,
                false,
            )?;
            let st = lock(&s.state);
            let c = st
                .compute
                .get(&vk)
                .filter(|c| c.kind == Kind::ScaleSet)
                .ok_or_else(|| {
                    not_found_resource(
                        "Microsoft.Compute/virtualMachineScaleSets",
                        segs[7],
                        segs[3],
                    )
                })?;
            let i = c
                .instances
                .iter()
                .find(|i| i.instance_id.eq_ignore_ascii_case(inst))
                .ok_or_else(|| {
                    not_found_resource(
                        "Microsoft.Compute/virtualMachineScaleSets/virtualMachines",
                        &format!("{}/{}", segs[7], segs[9]),
                        segs[3],
                    )
                })?;
            // Identity lives on the scale-set model; instances keep
            // latestModelApplied (an identity change needs no instance upgrade).
            Ok((
                200,
                Some(json!({
                    "name": format!("{}_{}", c.name, i.instance_id),
                    "id": format!("{}/virtualMachines/{}", c.id, i.instance_id),
                    "type": "Microsoft.Compute/virtualMachineScaleSets/virtualMachines",
                    "location": c.location,
                    "instanceId": i.instance_id,
                    "properties": {
                        "latestModelApplied": true,
                        "vmId": i.vm_id,
                        "provisioningState": "Succeeded",
                        "osProfile": {"computerName": i.computer_name},
                    },
                })),
                headers,
            ))
        }
        [
            "providers",
            "microsoft.compute",
            kind @ ("virtualmachinescalesets" | "virtualmachines"),
            _,
        ] => {
            let kind = if *kind == "virtualmachinescalesets" {
                Kind::ScaleSet
            } else {
                Kind::Vm
            };
            let type_name = if kind == Kind::ScaleSet {
                "virtualMachineScaleSets"
            } else {
                "virtualMachines"
            };
            let api = check_api_version(&pairs, &compute_versions, type_name, &location)?;
            let rk = key(&path);
            out.resource_key = Some(rk.clone());
            let name = segs[7].to_string();
            let exists = lock(&s.state)
                .compute
                .get(&rk)
                .is_some_and(|c| c.kind == kind);
            let full_type = format!("Microsoft.Compute/{type_name}");
            match method {
                hyper::Method::GET => {
                    out.read = true;
                    if !exists {
                        return Err(not_found_resource(&full_type, &name, segs[3]));
                    }
                    let policy = if kind == Kind::ScaleSet {
                        &s.cfg.throttle.vmss_get
                    } else {
                        &s.cfg.throttle.vm_get
                    };
                    let headers = charge(s, &claims, Some((policy, rk.clone())), &sub, false)?;
                    let st = lock(&s.state);
                    let c = st
                        .compute
                        .get(&rk)
                        .ok_or_else(|| not_found_resource(&full_type, &name, segs[3]))?;
                    Ok((
                        200,
                        Some(resource_json(&st, c, &api, s.clock.now())),
                        headers,
                    ))
                }
                hyper::Method::PATCH | hyper::Method::PUT => {
                    out.write = true;
                    let mode = if method == hyper::Method::PUT {
                        WriteMode::Put
                    } else {
                        WriteMode::Patch
                    };
                    if mode == WriteMode::Patch && !exists {
                        return Err(not_found_resource(&full_type, &name, segs[3]));
                    }
                    let policy = match (kind, exists) {
                        (Kind::ScaleSet, true) => &s.cfg.throttle.vmss_update,
                        (Kind::ScaleSet, false) => &s.cfg.throttle.vmss_create,
                        (Kind::Vm, _) => &s.cfg.throttle.vm_update,
                    };
                    let headers = charge(s, &claims, Some((policy, rk.clone())), &sub, true)?;
                    let host = req
                        .headers()
                        .get("host")
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("management.azure.com")
                        .to_string();
                    let w = WriteReq {
                        kind,
                        mode,
                        rk,
                        name,
                        rg: rg_display,
                        api,
                        host,
                        claims: claims.clone(),
                    };
                    let (status, body, mut lro_headers, started) = write(s, req, w).await?;
                    out.lro_started = started;
                    lro_headers.extend(headers);
                    Ok((status, Some(body), lro_headers))
                }
                _ => Err(method_not_allowed(&method)),
            }
        }
        _ => Err(ArmError::new(
            404,
            "NotFound",
            format!("The requested path '{path}' is not served by this emulator."),
        )),
    }
}

fn method_not_allowed(m: &hyper::Method) -> ArmError {
    ArmError::new(
        405,
        "MethodNotAllowed",
        format!("The HTTP method '{m}' is not supported by this emulator for this resource."),
    )
}

fn subscription_json(sub: &str, tenant: &str) -> Value {
    json!({"id": format!("/subscriptions/{sub}"), "subscriptionId": sub, "tenantId": tenant, "displayName": "azure-emulator", "state": "Enabled"})
}

/// Charges the ARM subscription bucket and, when given, a Compute policy's
/// resource and subscription buckets; returns the rate-limit headers.
fn charge(
    s: &Shared,
    claims: &TokenClaims,
    policy: Option<(&PolicyConfig, String)>,
    sub: &str,
    write: bool,
) -> Result<Vec<(String, String)>, ArmError> {
    let t = &s.cfg.throttle;
    if !t.enabled {
        return Ok(Vec::new());
    }
    let now = s.clock.now();
    let mut buckets = lock(&s.buckets);
    let layer: &BucketConfig = if write {
        &t.subscription_writes
    } else {
        &t.subscription_reads
    };
    // ARM keeps these per subscription and principal.
    let arm = buckets
        .charge(&[Charge { config: layer, scope: format!("{sub}/{}", claims.oid) }], now)
        .map_err(|r| {
            let secs = s.retry_after(r.wait);
            ArmError::new(
                429,
                "SubscriptionRequestsThrottled",
                format!("Number of '{}' requests for subscription '{sub}' actor '{}' exceeded. Please try again after '{secs}' seconds after additional tokens are available. Refer to https://aka.ms/arm-throttling", if write { "write" } else { "read" }, claims.oid),
            )
            .header("Retry-After", secs.to_string())
        })?;
    let mut headers = vec![(
        format!(
            "x-ms-ratelimit-remaining-subscription-{}",
            if write { "writes" } else { "reads" }
        ),
        arm.first().map(|r| r.remaining).unwrap_or(0).to_string(),
    )];
    if let Some((p, scope)) = policy {
        let charges = [
            Charge {
                config: &p.resource,
                scope,
            },
            Charge {
                config: &p.subscription,
                scope: sub.to_string(),
            },
        ];
        match buckets.charge(&charges, now) {
            Ok(rem) => {
                let v: Vec<String> = rem
                    .iter()
                    .map(|r| format!("Microsoft.Compute/{};{}", r.name, r.remaining))
                    .collect();
                headers.push(("x-ms-ratelimit-remaining-resource".into(), v.join(",")));
                headers.push(("x-ms-request-charge".into(), "1".into()));
            }
            Err(refused) => {
                let secs = s.retry_after(refused.wait);
                let mut e = throttle::throttled(&refused, secs);
                // Show where every bucket of the policy stands, the empty one at 0.
                e = e.header(
                    "x-ms-ratelimit-remaining-resource",
                    format!("Microsoft.Compute/{};0", refused.name),
                );
                return Err(e);
            }
        }
    }
    Ok(headers)
}

struct WriteReq {
    kind: Kind,
    mode: WriteMode,
    rk: String,
    name: String,
    rg: String,
    api: String,
    host: String,
    claims: TokenClaims,
}

/// A write's answer: status, body, extra headers, whether an LRO started.
type Written = (u16, Value, Vec<(String, String)>, bool);

enum Step {
    Wait(VirtualTime),
    Done(Result<Written, ArmError>),
}

async fn write(s: &Shared, req: Request<Incoming>, w: WriteReq) -> Result<Written, ArmError> {
    let (parts, body) = match http::read_body(req, s.cfg.arm.max_body_bytes).await {
        Ok(x) => x,
        Err(BodyError::TooLarge) => {
            return Err(ArmError::new(
                413,
                "RequestEntityTooLarge",
                format!(
                    "The request content size exceeds the maximum size of {} bytes.",
                    s.cfg.arm.max_body_bytes
                ),
            ));
        }
        Err(BodyError::Read) => {
            return Err(ArmError::invalid_content(
                "The request body could not be read.",
            ));
        }
    };
    match media_type(&parts).as_deref() {
        Some("application/json") | Some("text/json") => {}
        other => {
            return Err(ArmError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "The content media type '{}' is not supported. Only 'application/json' is supported.",
                    other.unwrap_or("")
                ),
            ));
        }
    }
    let doc: Value = serde_json::from_slice(&body).map_err(ArmError::invalid_content)?;
    let Value::Object(doc) = doc else {
        return Err(ArmError::invalid_content(
            "Unexpected JSON token; an object was expected. Path ''.",
        ));
    };
    let if_match = header(&parts, "if-match").map(str::to_string);
    let if_none_match = header(&parts, "if-none-match").map(str::to_string);
    // Bounded: each wait ends when the running operation's virtual end passes.
    for _ in 0..10_000 {
        let step = {
            let mut st = lock(&s.state);
            let now = s.clock.now();
            st.gc_operations(now);
            if let Some(c) = st.compute.get(&w.rk).filter(|c| c.deleting) {
                {
                    let what = if w.kind == Kind::ScaleSet {
                        "Update Virtual Machine Scale Set"
                    } else {
                        "Update Virtual Machine"
                    };
                    let noun = if w.kind == Kind::ScaleSet {
                        "Virtual Machine Scale Set"
                    } else {
                        "Virtual Machine"
                    };
                    return Err(ArmError::new(
                        409,
                        "OperationNotAllowed",
                        format!(
                            "Operation '{what}' is not allowed on {noun} '{}' since it is marked for deletion. For more information on your operations, please refer to https://aka.ms/activitylog.",
                            c.name
                        ),
                    ));
                }
            }
            match st.busy_until(&w.rk, now) {
                Some(end) if s.cfg.arm.concurrent_writes == ConcurrentWrites::Queue => {
                    Step::Wait(end)
                }
                Some(_) => Step::Done(Err(ArmError::new(
                    409,
                    "Conflict",
                    "The request failed due to conflict with a concurrent request. To resolve it, please refer to https://aka.ms/activitylog to get more details on the conflicting requests.",
                ))),
                None => Step::Done(apply(
                    s,
                    &mut st,
                    &w,
                    &doc,
                    if_match.as_deref(),
                    if_none_match.as_deref(),
                    now,
                )),
            }
        };
        match step {
            Step::Wait(end) => {
                s.observer.count(|c| c.arm_queued_writes += 1);
                s.clock.sleep_until(end).await;
            }
            Step::Done(r) => return r,
        }
    }
    Err(ArmError::new(
        409,
        "Conflict",
        "The request failed due to conflict with a concurrent request.",
    ))
}

fn apply(
    s: &Shared,
    st: &mut State,
    w: &WriteReq,
    doc: &Map<String, Value>,
    if_match: Option<&str>,
    if_none_match: Option<&str>,
    now: VirtualTime,
) -> Result<Written, ArmError> {
    let existing = st.compute.get(&w.rk).cloned();
    if w.api.as_str() >= ETAG_SINCE {
        if let Some(m) = if_match {
            let current = existing.as_ref().map(|c| c.etag);
            let ok = match (m.trim(), current) {
                ("*", Some(_)) => true,
                (given, Some(cur)) => given.trim_matches('"') == cur.to_string(),
                (_, None) => false,
            };
            if !ok {
                let cur = current.map(|c| c.to_string()).unwrap_or_default();
                return Err(ArmError::new(
                    412,
                    "PreconditionFailed",
                    format!(
                        "Etag provided in if-match header \"{}\" does not match etag \"{cur}\" of resource.",
                        m.trim().trim_matches('"')
                    ),
                ));
            }
        }
        if if_none_match.map(str::trim) == Some("*") && existing.is_some() {
            return Err(ArmError::new(
                412,
                "PreconditionFailed",
                "The resource already exists and If-None-Match '*' was given.",
            ));
        }
    }
    let type_name = if w.kind == Kind::ScaleSet {
        "virtualMachineScaleSets"
    } else {
        "virtualMachines"
    };
    let display_id = existing.as_ref().map(|c| c.id.clone()).unwrap_or_else(|| {
        let sub = st.subscription_id.clone();
        format!(
            "/subscriptions/{sub}/resourceGroups/{}/providers/Microsoft.Compute/{type_name}/{}",
            w.rg, w.name
        )
    });
    let perms = st.permissions(&w.claims.oid);
    if !perms.write {
        return Err(ArmError::new(
            403,
            "AuthorizationFailed",
            format!(
                "The client '{}' with object id '{}' does not have authorization to perform action 'Microsoft.Compute/{type_name}/write' over scope '{display_id}' or the scope is invalid. If access was recently granted, please refresh your credentials.",
                w.claims.appid, w.claims.oid
            ),
        ));
    }
    if existing.is_none()
        && doc
            .get("location")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
    {
        return Err(ArmError::new(
            400,
            "LocationRequired",
            "The location property is required for this definition.",
        ));
    }
    let (cur_sys, cur_user) = existing
        .as_ref()
        .map(|c| (c.system_principal_id.is_some(), c.user_spellings()))
        .unwrap_or_default();
    let limits = Limits {
        per_request: s.cfg.arm.max_identities_per_request,
        per_resource: s.cfg.arm.max_identities_per_resource,
    };
    let plan = identity::plan(
        w.mode,
        &display_id,
        cur_sys,
        &cur_user,
        doc.get("identity"),
        limits,
        |k| st.uais.contains_key(k),
    )?;
    let denied: Vec<String> = plan
        .added
        .iter()
        .filter(|id| {
            let k = key(id);
            !perms.may_assign(&k) || st.revoked_assign.contains(&k)
        })
        .cloned()
        .collect();
    if !denied.is_empty() {
        // IDs comma-separated inside single quotes: MIC parses them.
        return Err(ArmError::new(
            403,
            "LinkedAuthorizationFailed",
            format!(
                "The client '{}' with object id '{}' has permission to perform action 'Microsoft.Compute/{type_name}/write' on scope '{display_id}'; however, it does not have permission to perform action 'Microsoft.ManagedIdentity/userAssignedIdentities/assign/action' on the linked scope(s) '{}' or the linked scope(s) are invalid.",
                w.claims.appid,
                w.claims.oid,
                denied.join(",")
            ),
        ));
    }

    let async_mode = s.cfg.arm.lro_mode == LroMode::Async;
    let duration = if async_mode {
        st.write_durations
            .write(&s.cfg.arm, w.kind == Kind::ScaleSet)
    } else {
        Duration::ZERO
    };
    let visible_at =
        (now + duration + Duration::from_secs_f64(s.cfg.imds.assignment_delay_seconds.max(0.0)))
            .as_millis() as u64;

    let mut c = existing.clone().unwrap_or_else(|| Compute {
        kind: w.kind,
        id: display_id.clone(),
        name: w.name.clone(),
        resource_group: w.rg.clone(),
        location: doc
            .get("location")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        system_principal_id: None,
        user: Default::default(),
        etag: 0,
        deleting: false,
        instances: Vec::new(),
        unique_id: new_guid(),
        sku: None,
        tags: json!({}),
        last_operation: None,
    });
    c.system_principal_id = match (plan.system, c.system_principal_id.take()) {
        (true, Some(p)) => Some(p),
        (true, None) => Some(new_guid()),
        (false, _) => None,
    };
    let mut user = std::collections::BTreeMap::new();
    for (k, spelled) in &plan.user {
        let a = match c.user.get(k) {
            Some(a) => a.clone(),
            None => {
                let Some(u) = st.uais.get(k) else { continue };
                Assigned {
                    id: spelled.clone(),
                    client_id: u.client_id.clone(),
                    principal_id: u.principal_id.clone(),
                    visible_at_ms: visible_at,
                }
            }
        };
        user.insert(k.clone(), a);
    }
    c.user = user;
    if let Some(t @ Value::Object(_)) = doc.get("tags") {
        c.tags = t.clone();
    }
    if let Some(Value::Object(sku)) = doc.get("sku") {
        let mut merged = c.sku.clone().unwrap_or_else(|| json!({}));
        for (k, v) in sku {
            merged[k] = v.clone();
        }
        c.sku = Some(merged);
    }
    c.etag += 1;
    let mut headers = Vec::new();
    let mut started = false;
    if async_mode {
        let failure = if st.fail_next_operations > 0 {
            st.fail_next_operations -= 1;
            Some((
                "InternalExecutionError".to_string(),
                "An internal execution error occurred. Please retry later.".to_string(),
            ))
        } else {
            None
        };
        let op = Operation {
            id: new_guid(),
            resource_key: w.rk.clone(),
            start: now,
            end: now + duration,
            failure,
        };
        let base = format!(
            "https://{}/subscriptions/{}/providers/Microsoft.Compute/locations/{}/operations/{}",
            w.host, st.subscription_id, c.location, op.id
        );
        headers.push((
            "Azure-AsyncOperation".to_string(),
            format!("{base}?api-version={}", w.api),
        ));
        headers.push((
            "Location".to_string(),
            format!("{base}?monitor=true&api-version={}", w.api),
        ));
        headers.push((
            "Retry-After".to_string(),
            s.retry_after(Duration::from_secs(s.cfg.arm.lro_retry_after_seconds))
                .to_string(),
        ));
        c.last_operation = Some(op.id.clone());
        st.operations.insert(op.id.clone(), op);
        started = true;
    } else {
        c.last_operation = None;
    }
    let status = if existing.is_none() { 201 } else { 200 };
    st.compute.insert(w.rk.clone(), c);
    let c = st
        .compute
        .get(&w.rk)
        .ok_or_else(|| ArmError::new(500, "InternalServerError", "resource vanished"))?;
    Ok((status, resource_json(st, c, &w.api, now), headers, started))
}

fn operation_status(
    s: &Shared,
    op_id: &str,
    pairs: &[(String, String)],
    host: &str,
    sub: &str,
    location: &str,
) -> Answer {
    let st = lock(&s.state);
    let now = s.clock.now();
    let op = st.operations.get(op_id).ok_or_else(|| {
        ArmError::new(
            404,
            "NotFound",
            "The entity was not found in this Azure location.",
        )
    })?;
    let status = op.status(now);
    if first_ci(pairs, "monitor").is_some_and(|m| m.eq_ignore_ascii_case("true")) {
        // Location-header semantics: 202 while running, the resource when done.
        if status == "InProgress" {
            let api = first_ci(pairs, "api-version").unwrap_or("");
            let loc = format!(
                "https://{host}/subscriptions/{sub}/providers/Microsoft.Compute/locations/{location}/operations/{op_id}?monitor=true&api-version={api}"
            );
            return Ok((
                202,
                None,
                vec![
                    ("Location".into(), loc),
                    (
                        "Retry-After".into(),
                        s.retry_after(Duration::from_secs(s.cfg.arm.lro_retry_after_seconds))
                            .to_string(),
                    ),
                ],
            ));
        }
        let api = first_ci(pairs, "api-version").unwrap_or("").to_string();
        let c = st.compute.get(&op.resource_key).ok_or_else(|| {
            ArmError::new(404, "NotFound", "The resource of this operation is gone.")
        })?;
        return Ok((200, Some(resource_json(&st, c, &api, now)), vec![]));
    }
    let mut body = json!({"startTime": arm_timestamp(op.start), "status": status, "name": op.id});
    if status != "InProgress" {
        body["endTime"] = json!(arm_timestamp(op.end));
    }
    if let (Some((code, message)), "Failed") = (&op.failure, status) {
        body["error"] = json!({"code": code, "message": message});
    }
    Ok((200, Some(body), vec![]))
}

/// The GET shape of a VM or scale set: `id`, `name`, `type`, `location`,
/// `identity` (with `principalId`/`clientId` per user-assigned identity),
/// `properties.provisioningState`, and `etag` from 2023-09-01.
pub(crate) fn resource_json(st: &State, c: &Compute, api: &str, now: VirtualTime) -> Value {
    let type_name = if c.kind == Kind::ScaleSet {
        "Microsoft.Compute/virtualMachineScaleSets"
    } else {
        "Microsoft.Compute/virtualMachines"
    };
    let mut v = json!({"name": c.name, "id": c.id, "type": type_name, "location": c.location, "tags": c.tags});
    if let Some(sku) = &c.sku {
        v["sku"] = sku.clone();
    }
    if api >= ETAG_SINCE {
        v["etag"] = json!(format!("\"{}\"", c.etag));
    }
    let ty = IdentityType::from_parts(c.system_principal_id.is_some(), !c.user.is_empty());
    if ty != IdentityType::None {
        let mut id = json!({"type": ty.canonical()});
        if let Some(p) = &c.system_principal_id {
            id["principalId"] = json!(p);
            id["tenantId"] = json!(st.tenant_id);
        }
        if !c.user.is_empty() {
            let m: Map<String, Value> = c
                .user
                .values()
                .map(|a| {
                    (
                        a.id.clone(),
                        json!({"principalId": a.principal_id, "clientId": a.client_id}),
                    )
                })
                .collect();
            id["userAssignedIdentities"] = Value::Object(m);
        }
        v["identity"] = id;
    }
    let state = st.provisioning_state(c, now);
    v["properties"] = match c.kind {
        Kind::ScaleSet => json!({
            "provisioningState": state,
            "orchestrationMode": "Uniform",
            "uniqueId": c.unique_id,
            "upgradePolicy": {"mode": "Manual"},
            "overprovision": false,
            "singlePlacementGroup": true,
        }),
        Kind::Vm => json!({"provisioningState": state, "vmId": c.unique_id}),
    };
    v
}
