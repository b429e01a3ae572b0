//! Which identity a token is for: JWT claims read without verification, and
//! the checks a token from IMDS must pass before a pod gets it.

use base64::Engine as _;

use super::TokenError;
use crate::cluster::ClusterIdentities;
use crate::response::Token;

/// The claims of a JWT (unverified: the token came from IMDS over the
/// node's own link and is only read to check which identity it is for).
fn jwt_claims(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The client ID a JWT was issued to: its `appid` claim (v1 tokens), or
/// `azp` when there is no `appid` (v2 tokens).
pub fn jwt_appid(token: &str) -> Option<String> {
    let claims = jwt_claims(token)?;
    match claims.get("appid") {
        Some(appid) => appid.as_str().map(str::to_owned),
        None => claims.get("azp")?.as_str().map(str::to_owned),
    }
}

/// A string claim of a JWT, unverified (the `iss` of a ServiceAccount
/// token the API server just issued, named in error messages).
pub fn jwt_claim(token: &str, claim: &str) -> Option<String> {
    jwt_claims(token)?.get(claim)?.as_str().map(str::to_owned)
}

/// The `oid` claim of a JWT: the object (principal) ID of its identity.
pub fn jwt_oid(token: &str) -> Option<String> {
    jwt_claims(token)?.get("oid")?.as_str().map(str::to_owned)
}

/// Why a token is not for the expected client ID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdMismatch {
    /// `client_id` of IMDS's answer (empty when it had none).
    pub imds_client_id: String,
    /// The token's `appid` (or `azp`), if it could be read.
    pub token_client_id: Option<String>,
}

/// Whether a token from IMDS is for `expected` (an AzureIdentity's
/// `clientID`): IMDS's `client_id` field and the token's `appid` (or `azp`
/// when it has no `appid`) must both equal it, ignoring ASCII case. An empty
/// `expected`, a missing field or an unreadable token never match.
pub fn verify_client_id(
    expected: &str,
    imds_client_id: &str,
    access_token: &str,
) -> Result<(), ClientIdMismatch> {
    let token_client_id = jwt_appid(access_token);
    let same = |c: &str| !expected.is_empty() && c.eq_ignore_ascii_case(expected);
    if same(imds_client_id) && token_client_id.as_deref().is_some_and(same) {
        return Ok(());
    }
    Err(ClientIdMismatch {
        imds_client_id: imds_client_id.to_string(),
        token_client_id,
    })
}

/// Whether IMDS's `token` for the user-assigned identity with `resource_id`
/// may be handed out for `client_id` (the AzureIdentity's `clientID`): it
/// must be for that client ID ([`verify_client_id`]), and neither IMDS's
/// `client_id` nor the token's `appid` may name one of the cluster's own
/// identities that `cluster` refuses.
pub fn check_imds_token(
    cluster: &ClusterIdentities,
    resource_id: &str,
    client_id: &str,
    token: Token,
) -> Result<Token, TokenError> {
    match verify_client_id(client_id, &token.client_id, token.access_token.expose()) {
        Ok(()) => {
            let appid = jwt_appid(token.access_token.expose());
            let seen = [Some(token.client_id.as_str()), appid.as_deref()];
            match cluster.refused(seen.into_iter().flatten()) {
                Some(c) => Err(TokenError::ClusterIdentity {
                    client_id: c.to_string(),
                }),
                None => Ok(token),
            }
        }
        Err(mismatch) => {
            tracing::warn!(
                resource_id,
                expected_client_id = client_id,
                imds_client_id = %mismatch.imds_client_id,
                token_client_id = ?mismatch.token_client_id,
                "IMDS's identity for the resource ID has another client ID; token withheld"
            );
            Err(TokenError::ClientIdMismatch {
                resource_id: resource_id.to_string(),
                expected: client_id.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use http::StatusCode;

    use super::*;
    use crate::token::TokenCache;
    use crate::token::testing::{self, Fake, fetch, jwt, jwt_app, long_lived, who};

    #[test]
    fn imds_token_check_table() {
        let token = |imds_client_id: &str, appid: &str| {
            testing::token(jwt_app(appid), imds_client_id.into(), 0, "r")
        };
        let cluster = ClusterIdentities::new(["kubelet"], false);
        let served = ClusterIdentities::new(["kubelet"], true);
        // (name, cluster identities, expected client ID, IMDS's client_id,
        // the token's appid, the status when refused)
        #[rustfmt::skip]
        let cases = [
            ("the AzureIdentity's own", &cluster, "app", "app", "APP", None),
            ("IMDS reports another", &cluster, "app", "other", "app", Some(403)),
            ("the token is another's", &cluster, "app", "app", "other", Some(403)),
            ("IMDS answered the kubelet identity", &cluster, "kubelet", "KUBELET", "kubelet", Some(403)),
            ("the kubelet identity, served", &served, "kubelet", "kubelet", "kubelet", None),
        ];
        for (name, cluster, expected, imds, appid, refused) in cases {
            let got = check_imds_token(cluster, "rid", expected, token(imds, appid));
            match (got, refused) {
                (Ok(t), None) => assert_eq!(t.client_id, imds, "{name}"),
                (Err(e), Some(status)) => assert_eq!(e.status().as_u16(), status, "{name}: {e}"),
                (got, want) => panic!("{name}: got {got:?}, want refusal {want:?}"),
            }
        }
        assert!(matches!(
            check_imds_token(&cluster, "rid", "app", token("other", "app")),
            Err(TokenError::ClientIdMismatch { .. })
        ));
        assert!(matches!(
            check_imds_token(&cluster, "rid", "kubelet", token("kubelet", "kubelet")),
            Err(TokenError::ClusterIdentity { .. })
        ));
    }

    #[tokio::test]
    async fn a_token_for_another_client_id_is_refused_and_never_cached() {
        // The resource ID of one identity with the client ID of another (the
        // kubelet identity's, say): IMDS answers for the resource ID.
        let cache = TokenCache::new(long_lived());
        for _ in 0..2 {
            let got = cache
                .by_resource_id("rid-a", "kubelet-client", "r", &who())
                .await;
            match got {
                Err(TokenError::ClientIdMismatch {
                    resource_id,
                    expected,
                }) => {
                    assert_eq!(
                        (resource_id.as_str(), expected.as_str()),
                        ("rid-a", "kubelet-client")
                    );
                }
                other => panic!("want a mismatch, got {other:?}"),
            }
        }
        assert_eq!(
            cache.source().calls.load(Ordering::SeqCst),
            2,
            "a refused token is not cached"
        );
        // The honest pair is cached on its own key: the refusal did not
        // poison it, and it does not answer for the forged pair.
        fetch(&cache, "rid-a", "app-of-rid-a", "r").await;
        fetch(&cache, "rid-a", "app-of-rid-a", "r").await;
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 3);
        let again = cache
            .by_resource_id("rid-a", "kubelet-client", "r", &who())
            .await;
        assert!(matches!(again, Err(TokenError::ClientIdMismatch { .. })));
        assert_eq!(again.unwrap_err().status(), StatusCode::FORBIDDEN);
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 4);

        // IMDS itself reporting another client ID for the resource ID.
        let lying = TokenCache::new(Fake {
            lifetime: 86_399,
            reports: Some("someone-else"),
            ..Default::default()
        });
        let got = lying
            .by_resource_id("rid-a", "app-of-rid-a", "r", &who())
            .await;
        assert!(
            matches!(got, Err(TokenError::ClientIdMismatch { .. })),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn cluster_identities_are_refused_without_asking_imds_unless_served() {
        // The Fake's identity for resource ID `kubelet` has client ID
        // `app-of-kubelet`: the AzureIdentity names it correctly.
        let cluster = ["APP-OF-KUBELET", "app-of-immutable"];
        let cache = TokenCache::new(long_lived())
            .with_cluster_identities(ClusterIdentities::new(cluster, false));
        for (rid, cid) in [
            ("kubelet", "app-of-kubelet"),
            ("KUBELET", "App-Of-Kubelet"),
            ("kubelet", " app-of-kubelet "),
            ("immutable", "app-of-immutable"),
            // A forged resource ID changes nothing: the client ID decides first.
            ("rid-a", "app-of-kubelet"),
        ] {
            let got = cache.by_resource_id(rid, cid, "r", &who()).await;
            match got {
                Err(e @ TokenError::ClusterIdentity { .. }) => {
                    assert_eq!(e.status(), StatusCode::FORBIDDEN);
                    assert!(
                        e.to_string().contains("one of the cluster's own identities; nmi serves it only with --serve-cluster-identities"),
                        "{e}"
                    );
                }
                other => panic!("{rid}/{cid}: want a cluster-identity refusal, got {other:?}"),
            }
        }
        assert_eq!(
            cache.source().calls.load(Ordering::SeqCst),
            0,
            "IMDS never asked"
        );
        assert!(cache.is_empty(), "nothing cached");
        // Other identities are served as before.
        fetch(&cache, "rid-a", "app-of-rid-a", "r").await;
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 1);

        let served = TokenCache::new(long_lived())
            .with_cluster_identities(ClusterIdentities::new(cluster, true));
        let token = served
            .by_resource_id("kubelet", "app-of-kubelet", "r", &who())
            .await
            .unwrap();
        assert_eq!(token.client_id, "app-of-kubelet");
        fetch(&served, "kubelet", "app-of-kubelet", "r").await;
        assert_eq!(
            served.source().calls.load(Ordering::SeqCst),
            1,
            "cached when served"
        );
    }

    #[tokio::test]
    async fn empty_ids_are_refused_without_asking_imds() {
        let cache = TokenCache::new(long_lived());
        for (rid, cid) in [("", "c"), ("r", ""), (" ", "c"), ("", "")] {
            let got = cache.by_resource_id(rid, cid, "r", &who()).await;
            assert!(
                matches!(got, Err(TokenError::Forbidden(_))),
                "{rid:?} {cid:?}"
            );
        }
        assert_eq!(cache.source().calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn client_id_check_table() {
        let c = "11111111-aaaa-4000-8000-000000000001";
        let upper = c.to_ascii_uppercase();
        let other = "22222222-bbbb-4000-8000-000000000002";
        let cases: Vec<(&str, &str, &str, String, bool)> = vec![
            ("both agree", c, c, jwt_app(c), true),
            ("case ignored", c, &upper, jwt_app(&upper), true),
            (
                "azp when no appid",
                c,
                c,
                jwt(serde_json::json!({"azp": c})),
                true,
            ),
            (
                "appid wins over azp",
                c,
                c,
                jwt(serde_json::json!({"appid": other, "azp": c})),
                false,
            ),
            ("imds reports another", c, other, jwt_app(c), false),
            ("token for another", c, c, jwt_app(other), false),
            ("imds gave no client_id", c, "", jwt_app(c), false),
            ("unreadable token", c, c, "not-a-jwt".into(), false),
            (
                "token without appid or azp",
                c,
                c,
                jwt(serde_json::json!({"oid": "o"})),
                false,
            ),
            (
                "non-string appid",
                c,
                c,
                jwt(serde_json::json!({"appid": 1})),
                false,
            ),
            ("empty expected", "", "", jwt_app(""), false),
            ("prefix is no match", "1111", c, jwt_app(c), false),
        ];
        for (name, expected, imds, token, want) in cases {
            assert_eq!(
                verify_client_id(expected, imds, &token).is_ok(),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn appid_from_jwt_and_statuses() {
        assert_eq!(jwt_appid(&jwt_app("c1")).as_deref(), Some("c1"));
        assert_eq!(jwt_appid("not-a-jwt"), None);
        assert_eq!(
            jwt_oid(&jwt(serde_json::json!({"oid": "o1"}))).as_deref(),
            Some("o1")
        );
        assert_eq!(jwt_oid(&jwt_app("c1")), None);
        assert_eq!(
            TokenError::Refused {
                status: 400,
                body: String::new()
            }
            .status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(TokenError::Unavailable(String::new()).status(), 503);
    }
}
