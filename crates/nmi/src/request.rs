//! Pure request parsing: which handler a path goes to, the `Metadata` header,
//! and the token request's query, each failure a typed [`Rejection`] with
//! upstream's status and message
//! (docs/upstream-behaviour.md#nmi-routes-and-requests).

use http::{HeaderMap, Method, StatusCode};

/// Canonical token path. Only the `metadata` segment is matched ignoring case,
/// as upstream's route `/{type:(?i:metadata)}/identity/oauth2/token`.
pub const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";
/// Host-network callers name a pod in headers here.
pub const HOST_TOKEN_PATH: &str = "/host/token";
/// Headers `/host/token` requires.
pub const HEADER_POD_NAMESPACE: &str = "podns";
/// See [`HEADER_POD_NAMESPACE`].
pub const HEADER_POD_NAME: &str = "podname";
/// Longest query string accepted: real SDK queries are under 1 KiB; anything
/// much longer is hostile and is refused before it is decoded.
pub const MAX_QUERY_LEN: usize = 8 * 1024;
/// Longest accepted parameter value (ARM resource IDs are at most a few hundred bytes).
pub const MAX_VALUE_LEN: usize = 2 * 1024;

/// Where a request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The managed-identity token endpoint.
    Token,
    /// `/host/token`.
    HostToken,
    /// An allow-listed IMDS endpoint: passed through to IMDS unchanged.
    Proxy,
}

/// Which IMDS endpoints NMI forwards, from the flags. The default is closed:
/// only the read-only endpoints of [`proxy_allowed`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyPolicy {
    /// `--block-instance-metadata`: `/metadata/instance*` answered 403.
    pub block_instance_metadata: bool,
    /// `--allow-scheduled-events-post`: let pods acknowledge (and so
    /// expedite) the node's scheduled events.
    pub allow_scheduled_events_post: bool,
    /// `--proxy-allowed-paths`: more IMDS paths (and their sub-paths)
    /// forwarded by GET, each checked by [`extra_proxy_path`].
    pub extra_paths: Vec<String>,
}

/// Checks one `--proxy-allowed-paths` entry: a canonical path (see
/// [`is_canonical_path`]) under `/metadata/`, outside `/metadata/identity`
/// (tokens are NMI's to answer). Returned without a trailing `/`.
pub fn extra_proxy_path(entry: &str) -> Result<String, String> {
    let path = entry.trim();
    let path = path.strip_suffix('/').unwrap_or(path);
    let lower = path.to_ascii_lowercase();
    if !is_canonical_path(path) || path == "/" {
        return Err(format!(
            "{entry:?} is not a canonical path (segments of A-Z a-z 0-9 _ - only)"
        ));
    }
    if !path.starts_with("/metadata/") {
        return Err(format!("{entry:?} is not under /metadata/"));
    }
    if lower == "/metadata/identity" || lower.starts_with("/metadata/identity/") {
        return Err(format!(
            "{entry:?}: paths under /metadata/identity are never forwarded"
        ));
    }
    Ok(path.to_owned())
}

/// Why a request is refused before any pod or identity is looked up.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// `Metadata: true` missing or wrong (SSRF guard; answered at once so SDK
    /// probes, which send no header and wait about a second, see a fast 400).
    #[error("Required metadata header not specified")]
    MissingMetadataHeader,
    /// A malformed path: backslashes, dot segments, doubled slashes, any
    /// percent-encoding, non-ASCII or other characters outside the canonical
    /// segment alphabet. Upstream's fix for CVE-2022-23551 answers these 400.
    #[error("Invalid request")]
    InvalidPath,
    /// `/metadata/instance*` with `--block-instance-metadata`.
    #[error("Request blocked by AAD Pod Identity NMI")]
    BlockedInstanceMetadata,
    /// A well-formed path that is not an IMDS endpoint NMI forwards.
    #[error("path not allowed by AAD Pod Identity NMI")]
    PathNotAllowed,
    /// An allow-listed path with a method NMI does not forward for it.
    #[error("method not allowed by AAD Pod Identity NMI")]
    MethodNotAllowed,
    /// No `resource`, or an empty one.
    #[error("parameter resource cannot be empty")]
    EmptyResource,
    /// A parameter given twice (IMDS rejects duplicates).
    #[error("parameter {0} specified more than once")]
    DuplicateParameter(&'static str),
    /// More than one of `client_id`, `object_id`, `msi_res_id` (mutually exclusive in IMDS).
    #[error("only one of client_id, object_id and msi_res_id may be specified")]
    ConflictingSelectors,
    /// Query or value over the size limits.
    #[error("request query too long")]
    QueryTooLong,
    /// `/host/token` without the pod headers.
    #[error("missing 'podname' and 'podns' from request header")]
    MissingPodHeaders,
    /// `/host/token` from anything but 127.0.0.1.
    #[error("request remote address is not from a host")]
    NotFromHost,
}

impl Rejection {
    /// Upstream's status for each rejection.
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::BlockedInstanceMetadata => StatusCode::FORBIDDEN,
            Rejection::PathNotAllowed => StatusCode::NOT_FOUND,
            Rejection::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            // Upstream answers 500 here; kept for compatibility.
            Rejection::NotFromHost => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// Routes a request by `method` and `path` (the raw request path, not
/// decoded). The token routes are matched as upstream does, whatever the
/// method. Everything else reaches IMDS only if the path is already canonical
/// (see [`is_canonical_path`]) and the (method, path) pair is allow-listed
/// ([`proxy_allowed`]); anything else gets NMI's own answer, so what IMDS would
/// make of an encoded, folded or dotted path never matters (CVE-2022-23551).
pub fn route(method: &Method, path: &str, policy: &ProxyPolicy) -> Result<Route, Rejection> {
    if is_canonical(path, TOKEN_PATH, true) {
        return Ok(Route::Token);
    }
    if is_canonical(path, HOST_TOKEN_PATH, false) {
        return Ok(Route::HostToken);
    }
    if !is_canonical_path(path) {
        return Err(Rejection::InvalidPath);
    }
    // Upstream matched the `metadata` segment ignoring case; the block keeps
    // answering 403 for those spellings rather than 404.
    let lower = path.to_ascii_lowercase();
    if policy.block_instance_metadata
        && (lower == "/metadata/instance" || lower.starts_with("/metadata/instance/"))
    {
        return Err(Rejection::BlockedInstanceMetadata);
    }
    // Token-like spellings NMI does not answer itself (`/Metadata/Identity/...`
    // and the like) are malformed, not merely unknown.
    if lower.starts_with("/metadata/identity/oauth2") || lower.starts_with("/host/token") {
        return Err(Rejection::InvalidPath);
    }
    proxy_allowed(method, path, policy).map(|()| Route::Proxy)
}

/// The IMDS endpoints NMI forwards, matched exactly (case included) on a
/// canonical path:
/// - `GET /metadata/instance` and its sub-paths (VM metadata; not with
///   `--block-instance-metadata`), `GET /metadata/versions`;
/// - `GET /metadata/scheduledevents` (reading is harmless; `POST` acknowledges
///   an event and so lets one pod expedite the node's reboot or redeploy: only
///   with `--allow-scheduled-events-post`);
/// - `GET /metadata/attested/document` (signed VM identity data that
///   workloads use to prove where they run);
/// - `GET /metadata/identity/info` (the tenant ID only, no credential).
///
/// Nothing else by default: other IMDS endpoints (for example the load
/// balancer's) are rarely used from pods and each would need its own review
/// (`--proxy-allowed-paths` adds some, by GET only); anything with a body or
/// another method could change the node.
pub fn proxy_allowed(method: &Method, path: &str, policy: &ProxyPolicy) -> Result<(), Rejection> {
    let path = path.strip_suffix('/').unwrap_or(path);
    let instance = path == "/metadata/instance" || path.starts_with("/metadata/instance/");
    let known = instance
        || matches!(
            path,
            "/metadata/versions"
                | "/metadata/scheduledevents"
                | "/metadata/attested/document"
                | "/metadata/identity/info"
        )
        || policy.extra_paths.iter().any(|p| {
            path == p
                || path
                    .strip_prefix(p.as_str())
                    .is_some_and(|r| r.starts_with('/'))
        });
    if !known {
        return Err(Rejection::PathNotAllowed);
    }
    if instance && policy.block_instance_metadata {
        return Err(Rejection::BlockedInstanceMetadata);
    }
    let post_ok = path == "/metadata/scheduledevents" && policy.allow_scheduled_events_post;
    if *method == Method::GET || (*method == Method::POST && post_ok) {
        Ok(())
    } else {
        Err(Rejection::MethodNotAllowed)
    }
}

/// A path NMI may forward as is: starts with `/`, ASCII only, every segment
/// non-empty and made of `[A-Za-z0-9_-]` (so no `%`, `\`, `//`, `.`/`..`,
/// `;`, NUL or anything else a server could decode or fold); one trailing
/// `/` is allowed.
pub fn is_canonical_path(path: &str) -> bool {
    if path == "/" {
        return true;
    }
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    !rest.is_empty()
        && rest.split('/').all(|seg| {
            !seg.is_empty()
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
}

/// `path` equals `canonical` or `canonical/`; with `ci_first` the first segment
/// is compared ignoring ASCII case.
fn is_canonical(path: &str, canonical: &str, ci_first: bool) -> bool {
    let path = path.strip_suffix('/').unwrap_or(path);
    if path.len() != canonical.len() {
        return false;
    }
    let (Some((pf, pr)), Some((cf, cr))) = (
        path.get(1..).and_then(|p| p.split_once('/')),
        canonical.get(1..).and_then(|c| c.split_once('/')),
    ) else {
        return false;
    };
    let first_ok = if ci_first {
        pf.eq_ignore_ascii_case(cf)
    } else {
        pf == cf
    };
    path.starts_with('/') && first_ok && pr == cr
}

/// Whether the request carries `Metadata: true`. The name is case-insensitive;
/// the value must be exactly `true` (as upstream). Several `Metadata` headers are refused.
pub fn has_metadata_header(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all("metadata").iter();
    matches!((values.next(), values.next()), (Some(v), None) if v.as_bytes() == b"true")
}

/// Which identity the caller names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// None: NMI chooses among the pod's identities (see `select`).
    Default,
    /// `client_id`.
    ClientId(String),
    /// `msi_res_id` (or `mi_res_id`, upstream's fallback since v1.8.15).
    ResourceId(String),
    /// `object_id` (the principal ID; upstream ignored it and served an
    /// arbitrary identity).
    ObjectId(String),
}

/// A parsed token request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenQuery {
    /// The audience (`resource`), as given.
    pub resource: String,
    /// The named identity, if any.
    pub selector: Selector,
}

/// Parses the token query. `api-version`, `authority` and `bypass_cache` are
/// ignored as upstream does; other unknown parameters too.
pub fn parse_token_query(query: Option<&str>) -> Result<TokenQuery, Rejection> {
    let query = query.unwrap_or("");
    if query.len() > MAX_QUERY_LEN {
        return Err(Rejection::QueryTooLong);
    }
    let mut resource = None;
    let mut client_id = None;
    let mut msi_res_id = None;
    let mut mi_res_id = None;
    let mut object_id = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let (slot, name) = match k.as_ref() {
            "resource" => (&mut resource, "resource"),
            "client_id" => (&mut client_id, "client_id"),
            "msi_res_id" => (&mut msi_res_id, "msi_res_id"),
            "mi_res_id" => (&mut mi_res_id, "mi_res_id"),
            "object_id" => (&mut object_id, "object_id"),
            _ => continue,
        };
        if v.len() > MAX_VALUE_LEN {
            return Err(Rejection::QueryTooLong);
        }
        if slot.is_some() {
            return Err(Rejection::DuplicateParameter(name));
        }
        *slot = Some(v.into_owned());
    }
    let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
    let resource = nonempty(resource).ok_or(Rejection::EmptyResource)?;
    let res_id = nonempty(msi_res_id).or(nonempty(mi_res_id));
    let selector = match (nonempty(client_id), res_id, nonempty(object_id)) {
        (None, None, None) => Selector::Default,
        (Some(c), None, None) => Selector::ClientId(c),
        (None, Some(r), None) => Selector::ResourceId(r),
        (None, None, Some(o)) => Selector::ObjectId(o),
        _ => return Err(Rejection::ConflictingSelectors),
    };
    Ok(TokenQuery { resource, selector })
}

/// `/host/token`'s pod headers, checked before the caller (as upstream).
pub fn host_pod_headers(headers: &HeaderMap) -> Result<(String, String), Rejection> {
    let get = |name| {
        headers
            .get(name)
            .and_then(|v: &http::HeaderValue| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    match (get(HEADER_POD_NAMESPACE), get(HEADER_POD_NAME)) {
        (Some(ns), Some(name)) => Ok((ns, name)),
        _ => Err(Rejection::MissingPodHeaders),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn routes() {
        use Route::*;
        let get = Method::GET;
        let closed = ProxyPolicy::default();
        let refused = |m: &Method, path: &str, policy: &ProxyPolicy, want: Rejection| {
            assert_eq!(route(m, path, policy), Err(want), "{m} {path}");
        };
        let ok: &[(&str, Route)] = &[
            ("/metadata/identity/oauth2/token", Token),
            ("/metadata/identity/oauth2/token/", Token),
            ("/Metadata/identity/oauth2/token", Token),
            ("/METADATA/identity/oauth2/token", Token),
            ("/host/token", HostToken),
            ("/host/token/", HostToken),
            ("/metadata/instance", Proxy),
            ("/metadata/instance/", Proxy),
            ("/metadata/instance/compute/name", Proxy),
            ("/metadata/instance/network/interface/0/ipv4", Proxy),
            ("/metadata/attested/document", Proxy),
            ("/metadata/identity/info", Proxy),
            ("/metadata/versions", Proxy),
            ("/metadata/scheduledevents", Proxy),
        ];
        for (path, want) in ok {
            assert_eq!(route(&get, path, &closed), Ok(*want), "{path}");
        }
        // The token routes answer every method, as upstream's.
        for m in [Method::POST, Method::PUT, Method::DELETE] {
            assert_eq!(route(&m, TOKEN_PATH, &closed), Ok(Token));
        }
        let invalid = [
            // CVE-2022-23551 and relatives.
            "/metadata/identity\\oauth2\\token/",
            "/metadata/identity\\oauth2\\token",
            "/metadata\\identity\\oauth2\\token",
            "/metadata/identity/oauth2\\token",
            "/metadata/identity%5Coauth2%5Ctoken",
            "/metadata/identity/oauth2/token%2F",
            "/metadata/identity/oauth2/tokenx",
            "/metadata/identity//oauth2/token",
            "/metadata/identity/./oauth2/token",
            "/metadata/instance/../identity/oauth2/token",
            "/metadata/%69dentity/oauth2/token",
            "/metadata/%u0069dentity/oauth2/token",
            "/metadata/identity/oauth2/%2574oken",
            "/metadata/identity/oauth2/to%E2%84%AAen",
            "/metadata/identity/oauth2/to\u{212A}en",
            "/metadata/\u{0131}dentity/oauth2/token",
            // Upstream proxied these and relied on IMDS rejecting them.
            "/metadata/Identity/oauth2/token",
            "/metadata/identity/OAuth2/token",
            "/metadata/identity/oauth2/Token",
            "/metadata//identity/oauth2/token",
            "/Host/token",
            "/host/token/../x",
            "/metadata/instance/../versions",
            "/metadata/./instance",
            "/metadata/%2e%2e/identity/oauth2/token",
            "/metadata/instance/%2e%2e/%2e%2e/identity/oauth2/token",
            "/metadata/instance%00",
            "/metadata/instance/%00",
            "/metadata/instance\0",
            "/metadata/instance;x=y",
            "/metadata/identity/oauth2/token;x",
            "/metadata/instance/compute;jsessionid=1",
            "/metadata/scheduledevents/.",
            "//metadata/instance",
            "/metadata/instance//compute",
            "/metadata//",
            "\\metadata\\instance",
            "/metadata/instance\\compute",
            "/metadata/instanc%65",
            "/metadata/v\u{00e9}rsions",
            "/metadata/instance/compute name",
            "/metadata/instance/compute.name",
            "metadata/instance",
            "*",
            "",
            "//",
        ];
        let not_found = [
            "/",
            "/METADATA/instance",
            "/Metadata/instance",
            "/metadata/INSTANCE",
            "/metadata/Versions",
            "/metadata/ScheduledEvents",
            "/metadata",
            "/metadata/",
            "/metadata/instances",
            "/metadata/instancex/compute",
            "/metadata/attested",
            "/metadata/attested/document/x",
            "/metadata/identity",
            "/metadata/identity/info/x",
            "/metadata/identity/oauth3/token",
            "/metadata/loadbalancer",
            "/metadata/scheduledevents/x",
            "/metadata/versions/x",
            "/metadata/THIM/amd/certification",
            "/x",
            "/host",
            "/healthz",
        ];
        // Each list with the methods it is tried with and what they get.
        let lists = [
            (&invalid[..], &[Method::GET][..], Rejection::InvalidPath),
            (
                &not_found[..],
                &[Method::GET, Method::POST][..],
                Rejection::PathNotAllowed,
            ),
        ];
        for (paths, methods, want) in lists {
            for path in paths {
                for m in methods {
                    refused(m, path, &closed, want.clone());
                }
            }
        }
        // Each method with the paths it is refused on.
        let by_method: &[(Method, &[&str])] = &[
            (
                Method::POST,
                &[
                    "/metadata/scheduledevents",
                    "/metadata/scheduledevents/",
                    "/metadata/instance",
                    "/metadata/attested/document",
                    "/metadata/identity/info",
                ],
            ),
            (
                Method::PUT,
                &["/metadata/scheduledevents", "/metadata/instance/compute"],
            ),
            (Method::DELETE, &["/metadata/scheduledevents"]),
            (Method::PATCH, &["/metadata/instance/compute/userData"]),
            (Method::HEAD, &["/metadata/versions"]),
            (Method::OPTIONS, &["/metadata/versions"]),
            (Method::CONNECT, &["/metadata/instance"]),
        ];
        let wrong_method = || {
            by_method
                .iter()
                .flat_map(|(m, paths)| paths.iter().map(move |p| (m, *p)))
        };
        for (m, path) in wrong_method() {
            refused(m, path, &closed, Rejection::MethodNotAllowed);
        }
        // The one widening flag opens exactly scheduled-events POST.
        let widened = ProxyPolicy {
            allow_scheduled_events_post: true,
            ..ProxyPolicy::default()
        };
        assert_eq!(
            route(&Method::POST, "/metadata/scheduledevents", &widened),
            Ok(Proxy)
        );
        for (m, path) in wrong_method() {
            if *m != Method::POST || !path.starts_with("/metadata/scheduledevents") {
                refused(m, path, &widened, Rejection::MethodNotAllowed);
            }
        }
        assert_eq!(
            route(&Method::PUT, "/metadata/scheduledevents", &widened),
            Err(Rejection::MethodNotAllowed)
        );
        assert_eq!(
            route(&get, "/metadata/%73cheduledevents", &widened),
            Err(Rejection::InvalidPath)
        );
    }

    #[test]
    fn extra_paths_widen_by_get_only() {
        let ok = [
            ("/metadata/loadbalancer", "/metadata/loadbalancer"),
            ("/metadata/loadbalancer/", "/metadata/loadbalancer"),
            (" /metadata/THIM/amd ", "/metadata/THIM/amd"),
        ];
        for (entry, want) in ok {
            assert_eq!(extra_proxy_path(entry).as_deref(), Ok(want), "{entry}");
        }
        for entry in [
            "",
            "/",
            "/metadata",
            "/metadata/",
            "/other/x",
            "metadata/x",
            "/metadata/identity",
            "/metadata/Identity/oauth2/token",
            "/metadata/identity/x",
            "/metadata/%6coadbalancer",
            "/metadata/../x",
            "/metadata//x",
            "/metadata/x;y",
            "/metadata/x\\y",
        ] {
            assert!(extra_proxy_path(entry).is_err(), "{entry:?}");
        }
        let policy = ProxyPolicy {
            extra_paths: vec!["/metadata/loadbalancer".into()],
            ..ProxyPolicy::default()
        };
        use Method as M;
        use Rejection::{InvalidPath, MethodNotAllowed, PathNotAllowed};
        let cases: &[(Method, &str, Result<Route, Rejection>)] = &[
            (M::GET, "/metadata/loadbalancer", Ok(Route::Proxy)),
            (M::GET, "/metadata/loadbalancer/x", Ok(Route::Proxy)),
            (M::GET, "/metadata/loadbalancerx", Err(PathNotAllowed)),
            (M::GET, "/metadata/LoadBalancer", Err(PathNotAllowed)),
            (M::GET, "/metadata/loadbalancer/%2e%2e", Err(InvalidPath)),
            (M::POST, "/metadata/loadbalancer", Err(MethodNotAllowed)),
        ];
        for (method, path, want) in cases {
            assert_eq!(route(method, path, &policy), *want, "{method} {path}");
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(Rejection::InvalidPath.status(), StatusCode::BAD_REQUEST);
        assert_eq!(Rejection::PathNotAllowed.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            Rejection::MethodNotAllowed.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            Rejection::BlockedInstanceMetadata.status(),
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn block_instance_metadata_only_blocks_instance() {
        let blocked = ProxyPolicy {
            block_instance_metadata: true,
            ..ProxyPolicy::default()
        };
        let open = ProxyPolicy::default();
        use Rejection::{BlockedInstanceMetadata as Blocked, PathNotAllowed as NotFound};
        use Route::{Proxy, Token};
        type Routed = Result<Route, Rejection>;
        // (GET path, with the block, without it)
        let cases: &[(&str, Routed, Routed)] = &[
            ("/metadata/instance", Err(Blocked), Ok(Proxy)),
            ("/metadata/instance/compute", Err(Blocked), Ok(Proxy)),
            // Other spellings: blocked too, and never forwarded without the block.
            ("/Metadata/instance/compute", Err(Blocked), Err(NotFound)),
            ("/metadata/INSTANCE", Err(Blocked), Err(NotFound)),
            ("/METADATA/Instance/", Err(Blocked), Err(NotFound)),
            ("/metadata/instancex", Err(NotFound), Err(NotFound)),
            ("/metadata/attested/document", Ok(Proxy), Ok(Proxy)),
            ("/metadata/versions", Ok(Proxy), Ok(Proxy)),
            ("/metadata/scheduledevents", Ok(Proxy), Ok(Proxy)),
            ("/metadata/identity/info", Ok(Proxy), Ok(Proxy)),
            ("/metadata/identity/oauth2/token", Ok(Token), Ok(Token)),
        ];
        for (path, with_block, without) in cases {
            assert_eq!(
                route(&Method::GET, path, &blocked),
                *with_block,
                "{path} blocked"
            );
            assert_eq!(route(&Method::GET, path, &open), *without, "{path} open");
        }
    }

    #[test]
    fn metadata_header() {
        let cases: &[(&[&str], bool)] = &[
            (&[], false),
            (&["true"], true),
            (&["True"], false),
            (&["TRUE"], false),
            (&["true "], false),
            (&[""], false),
            (&["true", "true"], false),
        ];
        for (values, want) in cases {
            let mut h = HeaderMap::new();
            for v in *values {
                h.append("Metadata", HeaderValue::from_static(v));
            }
            assert_eq!(has_metadata_header(&h), *want, "{values:?}");
        }
        let mut h = HeaderMap::new();
        h.insert("metadata", HeaderValue::from_static("true"));
        assert!(has_metadata_header(&h), "header names are case-insensitive");
    }

    #[test]
    fn token_queries() {
        use Selector::*;
        let arm = "https://management.azure.com/";
        let ok: &[(&str, Selector)] = &[
            (
                "api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F",
                Default,
            ),
            ("resource=https://management.azure.com/", Default),
            (
                "resource=https://management.azure.com/&client_id=C1",
                ClientId("C1".into()),
            ),
            (
                "resource=https://management.azure.com/&msi_res_id=%2Fsubscriptions%2Fs%2Fx",
                ResourceId("/subscriptions/s/x".into()),
            ),
            (
                "resource=https://management.azure.com/&mi_res_id=/r",
                ResourceId("/r".into()),
            ),
            (
                "resource=https://management.azure.com/&msi_res_id=&mi_res_id=/r",
                ResourceId("/r".into()),
            ),
            (
                "resource=https://management.azure.com/&object_id=o1",
                ObjectId("o1".into()),
            ),
            ("resource=https://management.azure.com/&client_id=", Default),
            (
                "resource=https://management.azure.com/&bypass_cache=true&authority=x&api-version=1&api-version=2",
                Default,
            ),
        ];
        for (q, sel) in ok {
            let got = parse_token_query(Some(q)).unwrap_or_else(|e| panic!("{q}: {e}"));
            assert_eq!(got.selector, *sel, "{q}");
            assert_eq!(got.resource, arm, "{q}");
        }
        // `+` decodes as a space (Go and Rust encoders use it).
        assert_eq!(
            parse_token_query(Some("resource=a+b")).map(|q| q.resource),
            Ok("a b".to_string())
        );
        let long = format!("resource=r&client_id={}", "a".repeat(MAX_VALUE_LEN + 1));
        let huge = format!("resource=r&x={}", "a".repeat(MAX_QUERY_LEN));
        let bad: &[(&str, Rejection)] = &[
            ("", Rejection::EmptyResource),
            ("resource=", Rejection::EmptyResource),
            ("api-version=2018-02-01", Rejection::EmptyResource),
            (
                "resource=a&resource=b",
                Rejection::DuplicateParameter("resource"),
            ),
            (
                "resource=a&resource=a",
                Rejection::DuplicateParameter("resource"),
            ),
            (
                "resource=a&client_id=x&client_id=y",
                Rejection::DuplicateParameter("client_id"),
            ),
            (
                "resource=a&client_id=x&object_id=y",
                Rejection::ConflictingSelectors,
            ),
            (
                "resource=a&client_id=x&msi_res_id=y",
                Rejection::ConflictingSelectors,
            ),
            (&long, Rejection::QueryTooLong),
            (&huge, Rejection::QueryTooLong),
        ];
        for (q, want) in bad {
            assert_eq!(parse_token_query(Some(q)).as_ref(), Err(want), "{q:.80}");
        }
        assert_eq!(parse_token_query(None), Err(Rejection::EmptyResource));
    }

    #[test]
    fn rejection_statuses_and_messages_are_upstreams() {
        assert_eq!(Rejection::MissingMetadataHeader.status(), 400);
        assert_eq!(Rejection::EmptyResource.status(), 400);
        assert_eq!(Rejection::InvalidPath.status(), 400);
        assert_eq!(Rejection::MissingPodHeaders.status(), 400);
        assert_eq!(Rejection::BlockedInstanceMetadata.status(), 403);
        assert_eq!(Rejection::NotFromHost.status(), 500);
        assert_eq!(
            Rejection::EmptyResource.to_string(),
            "parameter resource cannot be empty"
        );
        assert_eq!(
            Rejection::MissingPodHeaders.to_string(),
            "missing 'podname' and 'podns' from request header"
        );
        assert_eq!(
            Rejection::BlockedInstanceMetadata.to_string(),
            "Request blocked by AAD Pod Identity NMI"
        );
    }

    #[test]
    fn host_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(host_pod_headers(&h), Err(Rejection::MissingPodHeaders));
        h.insert("podns", HeaderValue::from_static("ns"));
        assert_eq!(host_pod_headers(&h), Err(Rejection::MissingPodHeaders));
        h.insert("PodName", HeaderValue::from_static("p"));
        assert_eq!(host_pod_headers(&h), Ok(("ns".into(), "p".into())));
    }
}
