//! Pure response rendering: the IMDS token body every SDK accepts, and JSON
//! error bodies (docs/upstream-behaviour.md#imds-wire-format).

use http::StatusCode;
use serde::Serialize;

use crate::secret::Secret;

/// An access token as NMI hands it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    /// The JWT.
    pub access_token: Secret,
    /// Epoch seconds when it expires (the JWT's `exp`).
    pub expires_on: u64,
    /// Epoch seconds from which it is valid, when known.
    pub not_before: Option<u64>,
    /// The audience, echoing the request's `resource`.
    pub resource: String,
    /// `Bearer`.
    pub token_type: String,
    /// Client ID of the identity the token is for.
    pub client_id: String,
}

/// The IMDS response body. Every value is a string, as the IMDS swagger types
/// them: the Rust SDK refuses a numeric `expires_on`, MSAL Python needs a truthy
/// `expires_in`, MSAL Node reads only `expires_on`, old Python needs `resource`.
/// Field order is upstream's, then IMDS's
/// `client_id`.
#[derive(Serialize)]
struct Body<'a> {
    access_token: &'a str,
    refresh_token: &'a str,
    expires_in: String,
    expires_on: String,
    not_before: String,
    resource: &'a str,
    token_type: &'a str,
    client_id: &'a str,
}

impl<'a> Body<'a> {
    fn new(t: &'a Token, now: u64) -> Self {
        Body {
            access_token: t.access_token.expose(),
            refresh_token: "",
            // Seconds left, as IMDS reports for a cached token; at least 1 so
            // the value stays truthy for MSAL Python.
            expires_in: t.expires_on.saturating_sub(now).max(1).to_string(),
            expires_on: t.expires_on.to_string(),
            not_before: t.not_before.unwrap_or(now).to_string(),
            resource: &t.resource,
            token_type: &t.token_type,
            client_id: &t.client_id,
        }
    }
}

/// The 200 body of the token endpoint: one object, or an array when several
/// tokens are returned (auxiliary tenants, primary first, as upstream).
pub fn token_body(tokens: &[Token], now: u64) -> Vec<u8> {
    let bodies: Vec<Body<'_>> = tokens.iter().map(|t| Body::new(t, now)).collect();
    let rendered = match bodies.as_slice() {
        [one] => serde_json::to_vec(one),
        many => serde_json::to_vec(many),
    };
    // Serialising strings into JSON cannot fail.
    rendered.unwrap_or_default()
}

/// The 200 body of `/host/token`: `{"token":{...},"clientid":"..."}` (upstream's).
pub fn host_token_body(token: &Token, now: u64) -> Vec<u8> {
    #[derive(Serialize)]
    struct Host<'a> {
        token: Body<'a>,
        clientid: &'a str,
    }
    serde_json::to_vec(&Host {
        token: Body::new(token, now),
        clientid: &token.client_id,
    })
    .unwrap_or_default()
}

/// The OAuth error code for a status, from the enum of IMDS's published API
/// description.
pub fn error_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_request",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        413 => "payload_too_large",
        429 => "too_many_requests",
        503 => "service_unavailable",
        _ => "server_error",
    }
}

/// A JSON error body `{"error":..,"error_description":..}`. Upstream sent
/// text/plain for most errors, which MSAL Python cannot parse
/// (it needs JSON even on errors); the descriptions keep upstream's wording.
pub fn error_body(status: StatusCode, description: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct Err<'a> {
        error: &'a str,
        error_description: &'a str,
    }
    serde_json::to_vec(&Err {
        error: error_code(status),
        error_description: description,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn error_codes_name_each_status_nmi_answers() {
        for (status, code) in [
            (400, "invalid_request"),
            (403, "forbidden"),
            (404, "not_found"),
            (405, "method_not_allowed"),
            (408, "request_timeout"),
            (413, "payload_too_large"),
            (429, "too_many_requests"),
            (503, "service_unavailable"),
            (500, "server_error"),
            (502, "server_error"),
        ] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(error_code(status), code, "{status}");
            let body: Value = serde_json::from_slice(&error_body(status, "why")).unwrap();
            assert_eq!(body, json!({"error": code, "error_description": "why"}));
        }
    }

    fn tok(client: &str) -> Token {
        Token {
            access_token: Secret::new("eyJ.a.b"),
            expires_on: 1_700_086_399,
            not_before: Some(1_700_000_000),
            resource: "https://management.azure.com/".into(),
            token_type: "Bearer".into(),
            client_id: client.into(),
        }
    }

    #[test]
    fn token_body_satisfies_every_sdk() {
        let body: Value = serde_json::from_slice(&token_body(&[tok("c1")], 1_700_000_000)).unwrap();
        assert_eq!(
            body,
            json!({
                "access_token": "eyJ.a.b",
                "refresh_token": "",
                "expires_in": "86399",
                "expires_on": "1700086399",
                "not_before": "1700000000",
                "resource": "https://management.azure.com/",
                "token_type": "Bearer",
                "client_id": "c1",
            })
        );
        // Rust azure_identity: expires_on must be a string holding an integer.
        assert!(body["expires_on"].as_str().unwrap().parse::<i64>().is_ok());
    }

    #[test]
    fn field_order_is_upstreams() {
        let text = String::from_utf8(token_body(&[tok("c1")], 0)).unwrap();
        let keys = [
            "access_token",
            "refresh_token",
            "expires_in",
            "expires_on",
            "not_before",
            "resource",
            "token_type",
            "client_id",
        ];
        let pos: Vec<usize> = keys.iter().map(|k| text.find(k).unwrap()).collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "{text}");
    }

    #[test]
    fn expires_in_counts_down_and_stays_truthy() {
        let t = tok("c1");
        let at = |now| -> Value {
            serde_json::from_slice(&token_body(std::slice::from_ref(&t), now)).unwrap()
        };
        assert_eq!(at(1_700_086_000)["expires_in"], "399");
        assert_eq!(at(1_800_000_000)["expires_in"], "1");
    }

    #[test]
    fn several_tokens_render_as_an_array_primary_first() {
        let body: Value =
            serde_json::from_slice(&token_body(&[tok("primary"), tok("aux")], 0)).unwrap();
        assert_eq!(body[0]["client_id"], "primary");
        assert_eq!(body[1]["client_id"], "aux");
    }

    #[test]
    fn host_body_wraps_the_token() {
        let body: Value = serde_json::from_slice(&host_token_body(&tok("c1"), 0)).unwrap();
        assert_eq!(body["clientid"], "c1");
        assert_eq!(body["token"]["access_token"], "eyJ.a.b");
    }

    #[test]
    fn error_bodies_are_json_with_upstream_text() {
        let cases = [
            (
                400,
                "Required metadata header not specified",
                "invalid_request",
            ),
            (403, "failed to get token", "forbidden"),
            (
                404,
                "no azure identity found for request clientID",
                "not_found",
            ),
            (500, "pod list is empty", "server_error"),
            (503, "identity not ready", "service_unavailable"),
        ];
        for (status, msg, code) in cases {
            let s = StatusCode::from_u16(status).unwrap();
            let body: Value = serde_json::from_slice(&error_body(s, msg)).unwrap();
            assert_eq!(body, json!({"error": code, "error_description": msg}));
        }
        // The exact bytes upstream sends for the metadata check.
        assert_eq!(
            error_body(StatusCode::BAD_REQUEST, "Required metadata header not specified"),
            br#"{"error":"invalid_request","error_description":"Required metadata header not specified"}"#
        );
    }
}
