//! Feeds arbitrary bytes to NMI's pure request parsers: the router, the token
//! query parser and the header checks. They must never panic, and a path
//! routed to the token endpoint must be the canonical one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nmi::request::{self, Route, TOKEN_PATH};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // First line: path; second: query; third: a Metadata header value.
    let mut lines = text.splitn(3, '\n');
    let path = lines.next().unwrap_or("");
    let query = lines.next().unwrap_or("");
    let header = lines.next().unwrap_or("");
    for block in [false, true] {
        let policy = request::ProxyPolicy {
            block_instance_metadata: block,
            allow_scheduled_events_post: block,
            extra_paths: Vec::new(),
        };
        let route = request::route(&http::Method::GET, path, &policy);
        if let Ok(Route::Proxy) = route {
            assert!(request::is_canonical_path(path));
        }
        if let Ok(Route::Token) = route {
            let p = path.strip_suffix('/').unwrap_or(path);
            assert_eq!(p.len(), TOKEN_PATH.len());
            assert!(p[1..].eq_ignore_ascii_case(&TOKEN_PATH[1..]));
        }
    }
    if let Ok(q) = request::parse_token_query(Some(query)) {
        assert!(!q.resource.is_empty());
    }
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_bytes(header.as_bytes()) {
        headers.append("metadata", v.clone());
        headers.append("podns", v);
    }
    let _ = request::has_metadata_header(&headers);
    let _ = request::host_pod_headers(&headers);
});
