//! Entra ID client-credentials token endpoints: v1 `/{tenant}/oauth2/token` and
//! v2 `/{tenant}/oauth2/v2.0/token` with a client secret, a certificate client
//! assertion or a federated (workload-identity) assertion; and the OpenID
//! discovery documents and signing keys of the emulator's own tokens.
//! Wire formats: docs/upstream-behaviour.md#entra-id-token-endpoint.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hyper::Request;
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::{Value, json};

use crate::clock::{aad_timestamp, wall_now_secs};
use crate::config::IssuerSeed;
use crate::http::{self, BodyError, HandlerFn, Resp, first, form_pairs, header, media_type};
use crate::ids::{b64_any, new_guid};
use crate::jwt::{self, Parsed, VerifyKey};
use crate::observe::Service;
use crate::state::{AadClient, Certificate};
use crate::{Shared, StartError, lock};

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const MAX_FORM_BYTES: usize = 1024 * 1024;

/// An AADSTS error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AadError {
    pub status: u16,
    pub error: &'static str,
    pub code: u32,
    pub description: String,
}

fn aad_err(
    status: u16,
    error: &'static str,
    code: u32,
    description: impl Into<String>,
) -> AadError {
    AadError {
        status,
        error,
        code,
        description: description.into(),
    }
}

impl AadError {
    fn body(&self, correlation_id: &str) -> serde_json::Value {
        let ts = aad_timestamp(Duration::from_secs(wall_now_secs()));
        let trace = new_guid();
        json!({
            "error": self.error,
            "error_description": format!(
                "AADSTS{}: {}\r\nTrace ID: {trace}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {ts}",
                self.code, self.description
            ),
            "error_codes": [self.code],
            "timestamp": ts,
            "trace_id": trace,
            "correlation_id": correlation_id,
            "error_uri": format!("https://login.microsoftonline.com/error?code={}", self.code),
        })
    }
}

/// v1 success: every value a string, in the order Entra sends them.
#[derive(Serialize)]
struct V1Token {
    token_type: &'static str,
    expires_in: String,
    ext_expires_in: String,
    expires_on: String,
    not_before: String,
    resource: String,
    access_token: String,
}

/// v2 success: numeric lifetimes, no `resource`/`expires_on` (the Rust SDK
/// refuses a string `expires_in`).
#[derive(Serialize)]
struct V2Token {
    token_type: &'static str,
    expires_in: u64,
    ext_expires_in: u64,
    access_token: String,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Version {
    V1,
    V2,
}

/// `base` is `https://<listen address>/`, the authority used in discovery
/// documents when a request carries no usable `Host`.
pub(crate) fn handler(shared: Arc<Shared>, base: String) -> HandlerFn {
    let base = Arc::new(base);
    Arc::new(move |req, _peer| {
        let s = shared.clone();
        let base = base.clone();
        Box::pin(async move { handle(&s, req, &base).await })
    })
}

async fn handle(s: &Shared, req: Request<Incoming>, base: &str) -> Resp {
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let path = req.uri().path().to_string();
    let correlation = req
        .headers()
        .get("client-request-id")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
        .unwrap_or_else(new_guid);
    let (status, resp, client) = match s.fault_gate(Service::Aad, &method, &path, None).await {
        Some((status, retry_after)) => {
            let e = aad_err(
                status,
                "temporarily_unavailable",
                50_001,
                "The service is temporarily unavailable.",
            );
            let headers: Vec<(String, String)> = retry_after
                .map(|r| ("Retry-After".to_string(), r.to_string()))
                .into_iter()
                .collect();
            (
                status,
                http::json(status, &e.body(&correlation), &headers),
                None,
            )
        }
        None => match discovery(s, &req, base) {
            Some(Ok(resp)) => (200, resp, None),
            Some(Err(e)) => (
                e.status,
                http::json(e.status, &e.body(&correlation), &[]),
                None,
            ),
            None => match token(s, req).await {
                Ok((resp, client)) => (200, resp, Some(client)),
                Err((e, client)) => (
                    e.status,
                    http::json(e.status, &e.body(&correlation), &[]),
                    client,
                ),
            },
        },
    };
    s.observer.count(|c| {
        if let Some(cl) = &client {
            *c.aad_token_requests.entry(cl.clone()).or_default() += 1;
        }
        if status >= 400 {
            c.aad_errors += 1;
        }
    });
    s.record_answer(Service::Aad, method, uri, status);
    resp
}

/// What a discovery path asks for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Discovery {
    ConfigV1,
    ConfigV2,
    KeysV1,
    KeysV2,
}

/// Tenant aliases Entra serves discovery for besides tenant IDs; their
/// documents name the issuer with a `{tenantid}` placeholder.
const ALIASES: [&str; 3] = ["common", "organizations", "consumers"];

/// The authority clients reached us by: `https://<Host>/` when the header is
/// a plain host[:port] (so a Host rewrite for `login.microsoftonline.com`
/// keeps clients on it), else the listen address.
fn authority(req: &Request<Incoming>, fallback: &str) -> String {
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c))
        });
    match host {
        Some(h) => format!("https://{h}/"),
        None => fallback.to_string(),
    }
}

/// `GET /{tenant}/.well-known/openid-configuration` (v1),
/// `/{tenant}/v2.0/.well-known/openid-configuration` (v2),
/// `/{tenant}/discovery/keys` and `/{tenant}/discovery/v2.0/keys` (the JWKS;
/// `{tenant}` may be `common`). `None` when the path is none of these.
///
/// The emulator issues v1 access tokens (`iss` `https://sts.windows.net/{tenant}/`,
/// `ver` 1.0), as Entra does for resources that accept v1 tokens such as ARM,
/// so the v1 document's `issuer` is the one its tokens carry. Both documents
/// point at this emulator's endpoints; the key set is the same on every path.
fn discovery(s: &Shared, req: &Request<Incoming>, base: &str) -> Option<Result<Resp, AadError>> {
    let sent = path_segments(req);
    let lower: Vec<String> = sent.iter().map(|x| x.to_ascii_lowercase()).collect();
    let segs: Vec<&str> = lower.iter().map(String::as_str).collect();
    let (asked, what) = match segs.as_slice() {
        [t, ".well-known", "openid-configuration"] => (*t, Discovery::ConfigV1),
        [t, "v2.0", ".well-known", "openid-configuration"] => (*t, Discovery::ConfigV2),
        [t, "discovery", "keys"] => (*t, Discovery::KeysV1),
        [t, "discovery", "v2.0", "keys"] => (*t, Discovery::KeysV2),
        _ => return None,
    };
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        // Entra's text for a POST-only endpoint, turned around.
        return Some(Err(aad_err(
            405,
            "invalid_request",
            900_561,
            format!(
                "The endpoint only accepts GET requests. Received a {} request.",
                req.method()
            ),
        )));
    }
    let tenant = lock(&s.state).tenant_id.clone();
    // The tenant as it appears in URLs, and the one in issuer names.
    let (in_url, in_issuer) = if asked.eq_ignore_ascii_case(&tenant) {
        (tenant.clone(), tenant.clone())
    } else if ALIASES.contains(&asked) {
        (asked.to_string(), "{tenantid}".to_string())
    } else {
        // Entra answers an unknown tenant's discovery with 400 `invalid_tenant`.
        let shown = &sent[0];
        return Some(Err(aad_err(
            400,
            "invalid_tenant",
            90_002,
            format!(
                "Tenant '{shown}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant."
            ),
        )));
    };
    let base = authority(req, base);
    let host = base
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    let cache = [(
        "Cache-Control".to_string(),
        "max-age=86400, private".to_string(),
    )];
    let body = match what {
        Discovery::ConfigV1 => openid_configuration(false, &base, &in_url, &in_issuer, &host),
        Discovery::ConfigV2 => openid_configuration(true, &base, &in_url, &in_issuer, &host),
        Discovery::KeysV1 | Discovery::KeysV2 => {
            let mut jwk = s.signer.jwk();
            if what == Discovery::KeysV2 {
                // v2 key sets name the issuer each key signs for.
                jwk.insert("issuer".into(), json!(format!("{base}{in_issuer}/v2.0")));
            }
            json!({ "keys": [jwk] })
        }
    };
    Some(Ok(http::json(200, &body, &cache)))
}

/// The OpenID configuration document, v1 or v2, of the tenant named
/// `in_url` in URLs and `in_issuer` in issuer names, served at `base` (whose
/// host is `host`). The two versions share most keys; their endpoints differ by
/// a `/v2.0` in the path.
fn openid_configuration(v2: bool, base: &str, in_url: &str, in_issuer: &str, host: &str) -> Value {
    let oauth2 = format!("{base}{in_url}/oauth2{}", if v2 { "/v2.0" } else { "" });
    let mut doc = json!({
        "token_endpoint": format!("{oauth2}/token"),
        "authorization_endpoint": format!("{oauth2}/authorize"),
        "end_session_endpoint": format!("{oauth2}/logout"),
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "http_logout_supported": true,
        "frontchannel_logout_supported": true,
        "cloud_instance_name": host,
        "cloud_graph_host_name": "graph.windows.net",
        "msgraph_host": "graph.microsoft.com",
        "rbac_url": "https://pas.windows.net",
    });
    let own = if v2 {
        json!({
            "jwks_uri": format!("{base}{in_url}/discovery/v2.0/keys"),
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": format!("{base}{in_issuer}/v2.0"),
            "request_uri_parameter_supported": false,
            "device_authorization_endpoint": format!("{oauth2}/devicecode"),
            "claims_supported": ["sub", "iss", "cloud_instance_name", "cloud_instance_host_name", "cloud_graph_host_name", "msgraph_host", "aud", "exp", "iat", "auth_time", "acr", "nonce", "preferred_username", "name", "tid", "ver", "at_hash", "c_hash", "email"],
        })
    } else {
        json!({
            "jwks_uri": format!("{base}common/discovery/keys"),
            "response_types_supported": ["code", "id_token", "code id_token", "token id_token", "token"],
            "scopes_supported": ["openid"],
            "issuer": format!("https://sts.windows.net/{in_issuer}/"),
            "microsoft_multi_refresh_token": true,
            "check_session_iframe": format!("{oauth2}/checksession"),
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "acr", "amr", "nonce", "email", "given_name", "family_name", "nickname"],
        })
    };
    if let (Value::Object(doc), Value::Object(own)) = (&mut doc, own) {
        doc.extend(own);
    }
    doc
}

/// Verification keys of every configured workload-identity issuer, by issuer.
pub(crate) fn load_issuer_keys(
    seeds: &[IssuerSeed],
) -> Result<BTreeMap<String, Vec<VerifyKey>>, StartError> {
    let mut out: BTreeMap<String, Vec<VerifyKey>> = BTreeMap::new();
    for seed in seeds {
        let bad = |reason: String| StartError::Issuer {
            issuer: seed.issuer.clone(),
            reason,
        };
        let mut keys = Vec::new();
        if let Some(doc) = &seed.jwks {
            keys.extend(VerifyKey::from_jwks(doc).map_err(|e| bad(e.0))?);
        }
        if let Some(path) = &seed.jwks_file {
            let text = std::fs::read_to_string(path).map_err(|source| StartError::Read {
                path: path.clone(),
                source,
            })?;
            keys.extend(
                VerifyKey::from_jwks(&Value::String(text))
                    .map_err(|e| bad(format!("{}: {}", path.display(), e.0)))?,
            );
        }
        for (i, pk) in seed.public_keys.iter().enumerate() {
            keys.push(
                VerifyKey::from_pem(pk.pem(), pk.kid().map(str::to_string))
                    .map_err(|e| bad(format!("public key {i}: {}", e.0)))?,
            );
        }
        if !keys.is_empty() {
            out.entry(seed.issuer.clone()).or_default().extend(keys);
        }
    }
    Ok(out)
}

type TokenResult = Result<(Resp, String), (AadError, Option<String>)>;

/// The request path's segments between slashes, as sent (never empty: the
/// path `/` gives one empty segment).
fn path_segments<B>(req: &Request<B>) -> Vec<String> {
    req.uri()
        .path()
        .trim_matches('/')
        .split('/')
        .map(str::to_string)
        .collect()
}

async fn token(s: &Shared, req: Request<Incoming>) -> TokenResult {
    let segs = path_segments(&req);
    let lower: Vec<String> = segs.iter().map(|x| x.to_ascii_lowercase()).collect();
    let version = match lower
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [_, "oauth2", "token"] => Version::V1,
        [_, "oauth2", "v2.0", "token"] => Version::V2,
        _ => {
            return Err((
                aad_err(
                    404,
                    "invalid_request",
                    90_027,
                    "The request path is not a token endpoint of this emulator.",
                ),
                None,
            ));
        }
    };
    let tenant_in_url = segs[0].clone();
    if req.method() != hyper::Method::POST {
        return Err((
            aad_err(
                400,
                "invalid_request",
                900_561,
                format!(
                    "The endpoint only accepts POST requests. Received a {} request.",
                    req.method()
                ),
            ),
            None,
        ));
    }
    let (parts, body) = match http::read_body(req, MAX_FORM_BYTES).await {
        Ok(x) => x,
        Err(BodyError::TooLarge) => {
            return Err((
                aad_err(
                    413,
                    "invalid_request",
                    90_015,
                    "The request body is too large.",
                ),
                None,
            ));
        }
        Err(BodyError::Read) => {
            return Err((
                aad_err(
                    400,
                    "invalid_request",
                    90_015,
                    "The request body could not be read.",
                ),
                None,
            ));
        }
    };
    let tenant = lock(&s.state).tenant_id.clone();
    // Entra accepts the tenant ID; "organizations"/"common" are not valid for client credentials.
    if !tenant_in_url.eq_ignore_ascii_case(&tenant) {
        return Err((
            aad_err(
                400,
                "invalid_request",
                90_002,
                format!(
                    "Tenant '{tenant_in_url}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant."
                ),
            ),
            None,
        ));
    }
    let form = if media_type(&parts).as_deref() == Some("application/x-www-form-urlencoded") {
        form_pairs(&String::from_utf8_lossy(&body))
    } else {
        Vec::new()
    };
    let missing = |name: &str| {
        aad_err(
            400,
            "invalid_request",
            900_144,
            format!("The request body must contain the following parameter: '{name}'."),
        )
    };
    let grant = first(&form, "grant_type").ok_or_else(|| (missing("grant_type"), None))?;
    if grant != "client_credentials" {
        return Err((
            aad_err(
                400,
                "unsupported_grant_type",
                70_003,
                format!("The app requested an unsupported grant type '{grant}'."),
            ),
            None,
        ));
    }
    // HTTP Basic client authentication (v2; OAuth 2.0, RFC 6749 section 2.3.1).
    let basic = header(&parts, "authorization").and_then(|a| {
        let (scheme, rest) = a.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (u, p) = text.split_once(':')?;
        let dec = |x: &str| {
            form_urlencoded::parse(format!("a={x}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
        };
        Some((dec(u)?, dec(p)?))
    });
    let client_id = first(&form, "client_id")
        .map(str::to_string)
        .or_else(|| {
            basic
                .as_ref()
                .filter(|_| version == Version::V2)
                .map(|b| b.0.clone())
        })
        .ok_or_else(|| (missing("client_id"), None))?;
    let cid = Some(client_id.clone());
    let resource = match version {
        Version::V1 => first(&form, "resource")
            .ok_or_else(|| (missing("resource"), cid.clone()))?
            .to_string(),
        Version::V2 => {
            let scope = first(&form, "scope").ok_or_else(|| (missing("scope"), cid.clone()))?;
            scope_resource(scope).map_err(|e| (e, cid.clone()))?
        }
    };
    let client = lock(&s.state).aad_client(&client_id).ok_or_else(|| {
        (aad_err(400, "unauthorized_client", 700_016, format!("Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant.")), cid.clone())
    })?;
    let secret = first(&form, "client_secret")
        .map(str::to_string)
        .or_else(|| basic.filter(|_| version == Version::V2).map(|b| b.1));
    let assertion = first(&form, "client_assertion");
    let (oid, mirid) = match (secret, assertion) {
        (Some(secret), _) => check_secret(&client, &client_id, &secret),
        (None, Some(assertion)) => {
            if first(&form, "client_assertion_type") != Some(JWT_BEARER) {
                Err(aad_err(400, "invalid_request", 700_023, "Invalid client_assertion_type. Expected 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer'."))
            } else {
                check_assertion(s, &client, &client_id, &tenant_in_url, assertion)
            }
        }
        (None, None) => Err(aad_err(401, "invalid_client", 7_000_218, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.")),
    }
    .map_err(|e| (e, cid.clone()))?;
    if !resource_known(s, &resource) {
        return Err((
            aad_err(
                400,
                "invalid_resource",
                500_011,
                format!(
                    "The resource principal named {resource} was not found in the tenant named {tenant}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant."
                ),
            ),
            cid,
        ));
    }
    let life = s.cfg.aad.token_lifetime_seconds;
    let (access_token, iat, exp) = s
        .mint(&resource, &oid, &client_id, mirid.as_deref(), life)
        .map_err(|_| {
            (
                aad_err(500, "server_error", 50_000, "Token signing failed."),
                cid.clone(),
            )
        })?;
    let resp = match version {
        Version::V1 => http::json_typed(
            200,
            &V1Token {
                token_type: "Bearer",
                expires_in: life.to_string(),
                ext_expires_in: life.to_string(),
                expires_on: exp.to_string(),
                not_before: iat.to_string(),
                resource,
                access_token,
            },
            &[],
        ),
        Version::V2 => http::json_typed(
            200,
            &V2Token {
                token_type: "Bearer",
                expires_in: life,
                ext_expires_in: life,
                access_token,
            },
            &[],
        ),
    };
    Ok((resp, client_id))
}

/// The resource of a v2 `scope`: every scope must end in `/.default` and name
/// one resource.
fn scope_resource(scope: &str) -> Result<String, AadError> {
    let mut resource: Option<String> = None;
    for sc in scope.split(' ').filter(|x| !x.is_empty()) {
        let invalid = || {
            aad_err(
                400,
                "invalid_scope",
                70_011,
                format!(
                    "The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid."
                ),
            )
        };
        let r = sc.strip_suffix("/.default").ok_or_else(invalid)?;
        match &resource {
            Some(prev) if prev.trim_end_matches('/') != r.trim_end_matches('/') => {
                return Err(invalid());
            }
            _ => resource = Some(r.to_string()),
        }
    }
    resource.ok_or_else(|| {
        aad_err(
            400,
            "invalid_scope",
            70_011,
            "The provided value for the input parameter 'scope' is not valid.",
        )
    })
}

pub(crate) fn resource_known(s: &Shared, resource: &str) -> bool {
    let norm = |x: &str| x.trim_end_matches('/').to_ascii_lowercase();
    s.cfg.aad.any_resource
        || norm(&s.arm_url) == norm(resource)
        || s.cfg
            .aad
            .resources
            .iter()
            .any(|r| norm(r) == norm(resource))
}

fn check_secret(
    client: &AadClient,
    client_id: &str,
    secret: &str,
) -> Result<(String, Option<String>), AadError> {
    let invalid = || {
        aad_err(
            401,
            "invalid_client",
            7_000_215,
            format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."
            ),
        )
    };
    let AadClient::Sp(sp) = client else {
        return Err(invalid());
    };
    let matched = sp
        .secrets
        .iter()
        .find(|x| x.value() == secret)
        .ok_or_else(invalid)?;
    if matched.expires_on().is_some_and(|e| e <= wall_now_secs()) {
        return Err(aad_err(
            401,
            "invalid_client",
            7_000_222,
            format!(
                "The provided client secret keys for app '{client_id}' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added security: https://aka.ms/certCreds."
            ),
        ));
    }
    Ok((sp.object_id.clone(), None))
}

fn hex_upper(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

fn check_time(s: &Shared, p: &Parsed) -> Result<(), AadError> {
    let now = wall_now_secs();
    let skew = s.cfg.aad.assertion_skew_seconds;
    let nbf = p.claim_u64("nbf").unwrap_or(0);
    let exp = p.claim_u64("exp").ok_or_else(|| {
        aad_err(
            400,
            "invalid_request",
            50_027,
            "JWT token is invalid or malformed: the 'exp' claim is missing.",
        )
    })?;
    if now + skew < nbf || now >= exp + skew {
        return Err(aad_err(
            400,
            "invalid_client",
            700_024,
            format!(
                "Client assertion is not within its valid time range. Current time: {}, assertion valid from {}, expiry time of assertion {}.",
                aad_timestamp(Duration::from_secs(now)),
                aad_timestamp(Duration::from_secs(nbf)),
                aad_timestamp(Duration::from_secs(exp))
            ),
        ));
    }
    Ok(())
}

fn check_assertion(
    s: &Shared,
    client: &AadClient,
    client_id: &str,
    tenant: &str,
    assertion: &str,
) -> Result<(String, Option<String>), AadError> {
    let parsed = jwt::parse(assertion).map_err(|_| {
        aad_err(
            400,
            "invalid_request",
            50_027,
            "JWT token is invalid or malformed.",
        )
    })?;
    let x5t = parsed.header_str("x5t").map(str::to_string);
    let x5t256 = parsed.header_str("x5t#S256").map(str::to_string);
    if x5t.is_some() || x5t256.is_some() {
        let AadClient::Sp(sp) = client else {
            return Err(aad_err(
                401,
                "invalid_client",
                700_027,
                "Client assertion failed signature validation. [Reason - The key was not found.]",
            ));
        };
        // x5t#S256 wins when both are present (certificate-credentials doc).
        let (want, by_sha256) = match (&x5t256, &x5t) {
            (Some(t), _) => (b64_any(t).unwrap_or_default(), true),
            (None, Some(t)) => (b64_any(t).unwrap_or_default(), false),
            (None, None) => (Vec::new(), false),
        };
        let thumb = |c: &Certificate| {
            if by_sha256 {
                c.sha256.clone()
            } else {
                c.sha1.clone()
            }
        };
        let cert = sp.certificates.iter().find(|c| thumb(c) == want).ok_or_else(|| {
            aad_err(401, "invalid_client", 700_027, format!("Client assertion failed signature validation. [Reason - The key was not found., Thumbprint of key used by client: '{}', Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id '{client_id}'.]", hex_upper(&want)))
        })?;
        parsed
            .verify_with_cert(&cert.der)
            .map_err(|_| aad_err(401, "invalid_client", 700_027, "Client assertion contains an invalid signature. [Reason - The provided signature value did not match the expected signature value.]"))?;
        if parsed.claim_str("iss") != Some(client_id) || parsed.claim_str("sub") != Some(client_id)
        {
            return Err(aad_err(
                401,
                "invalid_client",
                700_021,
                "Client assertion application identifier doesn't match 'client_id' parameter. Review the documentation at https://docs.microsoft.com/en-us/azure/active-directory/develop/active-directory-certificate-credentials .",
            ));
        }
        // aud is the token URL; adal adds ?api-version=1.0, so ignore the query
        // and accept either endpoint of this tenant.
        let aud = parsed.claim_str("aud").unwrap_or("");
        let path = aud
            .split('?')
            .next()
            .unwrap_or("")
            .split("://")
            .nth(1)
            .and_then(|r| r.split_once('/'))
            .map(|(_, p)| p)
            .unwrap_or("");
        let path = path.trim_end_matches('/').to_ascii_lowercase();
        let t = tenant.to_ascii_lowercase();
        if path != format!("{t}/oauth2/token") && path != format!("{t}/oauth2/v2.0/token") {
            return Err(aad_err(
                400,
                "invalid_request",
                50_027,
                format!(
                    "JWT token is invalid or malformed. The audience '{aud}' is not the token endpoint."
                ),
            ));
        }
        check_time(s, &parsed)?;
        return Ok((sp.object_id.clone(), None));
    }
    // Federated (workload identity): find the credentials naming the issuer,
    // verify the signature with that issuer's keys, check the time window,
    // then match subject and audience, case-sensitively.
    let (fics, oid, mirid) = match client {
        AadClient::Sp(sp) => (&sp.federated_credentials, sp.object_id.clone(), None),
        AadClient::Uai(u) => (
            &u.federated_credentials,
            u.principal_id.clone(),
            Some(u.id.clone()),
        ),
    };
    let iss = parsed.claim_str("iss").unwrap_or("");
    let sub = parsed.claim_str("sub").unwrap_or("");
    let auds: Vec<String> = match parsed.claims.get("aud") {
        Some(serde_json::Value::String(a)) => vec![a.clone()],
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    };
    let aud_text = auds.first().cloned().unwrap_or_default();
    // Entra's answer when no federated credential matches the assertion's
    // `claim` (which says `value`).
    let no_match = |code, claim: &str, value: &str| {
        aad_err(
            401,
            "invalid_client",
            code,
            format!(
                "No matching federated identity record found for presented assertion {claim} '{value}'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion. https://learn.microsoft.com/entra/workload-id/workload-identity-federation"
            ),
        )
    };
    let by_iss: Vec<_> = fics.iter().filter(|f| f.issuer == iss).collect();
    if by_iss.is_empty() {
        return Err(no_match(700_211, "issuer", iss));
    }
    verify_federated_signature(s, &parsed, iss)?;
    check_time(s, &parsed)?;
    let by_sub: Vec<_> = by_iss.into_iter().filter(|f| f.subject == sub).collect();
    if by_sub.is_empty() {
        return Err(no_match(700_213, "subject", sub));
    }
    if !by_sub.iter().any(|f| auds.contains(&f.audience)) {
        return Err(no_match(700_212, "audience", &aud_text));
    }
    Ok((oid, mirid))
}

/// Checks a federated assertion's signature against its issuer's configured
/// keys (what Entra fetches from the issuer's OIDC metadata and `jwks_uri`).
///
/// Error codes; Entra's documentation gives none for federated assertions,
/// so they come from public issue threads quoting Entra's answers:
/// - no keys for the issuer: AADSTS50166 "Request to External OIDC endpoint
///   failed.", 400 `invalid_request` (Azure/azure-workload-identity#642,
///   #1130), Entra's answer when it cannot fetch the issuer's metadata, the
///   emulator's equivalent of having no keys for it;
/// - no key with the token's `kid`: AADSTS7000272, `invalid_client`
///   (Azure/azure-workload-identity#1232); the status is not in that thread,
///   401 is assumed like the other `invalid_client` answers;
/// - a key with that `kid` that does not verify the signature: AADSTS700027,
///   Entra's code for an invalid client-assertion signature,
///   401 assumed as for certificate assertions.
fn verify_federated_signature(s: &Shared, parsed: &Parsed, iss: &str) -> Result<(), AadError> {
    let keys = lock(&s.issuer_keys).get(iss).cloned().unwrap_or_default();
    if keys.is_empty() {
        return Err(aad_err(
            400,
            "invalid_request",
            50_166,
            "Request to External OIDC endpoint failed.",
        ));
    }
    let alg = parsed.alg();
    if !["RS256", "PS256", "ES256"].contains(&alg) {
        return Err(aad_err(
            401,
            "invalid_client",
            700_027,
            format!(
                "Client assertion contains an invalid signature. [Reason - The signing algorithm '{alg}' is not supported.]"
            ),
        ));
    }
    let kid = parsed.header_str("kid");
    // A key configured without a kid (a bare PEM key) is tried for any token.
    let candidates: Vec<&VerifyKey> = keys
        .iter()
        .filter(|k| k.kid.is_none() || k.kid.as_deref() == kid)
        .collect();
    if candidates.is_empty() {
        return Err(aad_err(
            401,
            "invalid_client",
            7_000_272,
            format!(
                "The certificate with identifier {} used to sign the federated credential could not be found in the metadata of identity provider {iss}. Please validate that your Identity Provider's metadata exposes the key used to sign the incoming token.",
                kid.unwrap_or("")
            ),
        ));
    }
    if candidates.iter().any(|k| parsed.verify_with_key(k).is_ok()) {
        return Ok(());
    }
    Err(aad_err(
        401,
        "invalid_client",
        700_027,
        "Client assertion contains an invalid signature. [Reason - The provided signature value did not match the expected signature value.]",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_must_be_default_and_one_resource() {
        assert_eq!(
            scope_resource("https://management.azure.com/.default")
                .ok()
                .as_deref(),
            Some("https://management.azure.com")
        );
        assert_eq!(
            scope_resource("https://management.azure.com//.default")
                .ok()
                .as_deref(),
            Some("https://management.azure.com/")
        );
        assert_eq!(
            scope_resource("https://management.azure.com/user_impersonation")
                .err()
                .map(|e| e.code),
            Some(70_011)
        );
        assert_eq!(
            scope_resource("https://a/.default https://b/.default")
                .err()
                .map(|e| e.code),
            Some(70_011)
        );
        assert!(scope_resource("").is_err());
    }

    #[test]
    fn error_body_has_the_full_shape() {
        let e = aad_err(
            401,
            "invalid_client",
            7_000_215,
            "Invalid client secret provided.",
        );
        let b = e.body("corr-1");
        assert_eq!(b["error"], "invalid_client");
        assert_eq!(b["error_codes"], json!([7_000_215]));
        assert_eq!(b["correlation_id"], "corr-1");
        assert_eq!(
            b["error_uri"],
            "https://login.microsoftonline.com/error?code=7000215"
        );
        let d = b["error_description"].as_str().unwrap_or("");
        assert!(
            d.starts_with("AADSTS7000215: Invalid client secret provided.\r\nTrace ID: "),
            "{d}"
        );
        assert!(d.contains("\r\nCorrelation ID: corr-1\r\nTimestamp: "));
        assert!(
            b["timestamp"]
                .as_str()
                .is_some_and(|t| t.len() == 20 && t.ends_with('Z'))
        );
    }
}
