//! Federated identities (token source `federated`): the pod's own
//! ServiceAccount token exchanged at Entra ID, with nothing written to ARM.
//!
//! For a pod NMI has already decided may use the identity (the same checks
//! as for any other identity), NMI
//! 1. asks the API server for a token of the pod's ServiceAccount
//!    (`spec.serviceAccountName`, `default` when empty) through the
//!    TokenRequest API: audience `api://AzureADTokenExchange`, bound to the
//!    Pod object (name and UID: the API server refuses it for a pod that is
//!    gone or replaced, and the token dies with the pod), valid for
//!    [`SA_TOKEN_EXPIRATION_SECS`];
//! 2. exchanges it at Entra ID's v2 token endpoint of the identity's tenant
//!    (its `tenantID`, else the cluster's from azure.json) at its authority
//!    (its `adEndpoint`, else the public cloud's, as for service principals):
//!    client credentials with the identity's client ID, the ServiceAccount
//!    token as the client assertion and `scope` `<resource>/.default`;
//! 3. answers in IMDS's format, through the token cache, keyed by the
//!    identity and by the pod's namespace and ServiceAccount
//!    ([`TokenKey::Federated`]): Entra decides per ServiceAccount
//!    (the federated credential's subject is
//!    `system:serviceaccount:<namespace>:<serviceaccount>`), so a token is
//!    never served to a pod running as another ServiceAccount.
//!
//! Entra's refusals are turned into the fix the user must make ([`explain`]):
//! which federated credential to create (issuer, subject, audience), read
//! from the AADSTS code and the ServiceAccount token's own `iss`.
//!
//! **Bounded.** At most [`MAX_CONCURRENT_EXCHANGES`] exchanges run at once,
//! their places given round-robin between the pods that ask (the fair
//! queue of [`crate::fair`]: a pod asking for many resources cannot hold
//! another's back), at most `--max-pending-fetches-per-pod` waiting per pod
//! (more get 429 at once); a request waits at most [`EXCHANGE_QUEUE_WAIT`]
//! for its place, then gets 429 with `Retry-After`; the TokenRequest has [`TOKEN_REQUEST_TIMEOUT`],
//! the Entra call the AAD client's timeout; concurrent misses of one cache
//! entry share one exchange; the tokens are in the one bounded token cache.
//!
//! Everything but [`Federated`]'s calls (the API server, Entra ID) is pure
//! and table-tested.

use std::sync::Arc;
use std::time::Duration;

use aadpodid_api::{AzureIdentity, FEDERATED_TOKEN_AUDIENCE};
use http::StatusCode;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::ResourceExt;
use kube::api::{Api, PostParams};

use crate::aad::{self, AadClient, JWT_BEARER};
use crate::fair::{FairLimiter, RequesterKey};
use crate::index::PodEntry;
use crate::response::Token;
use crate::secret::Secret;
use crate::token::{
    DEFAULT_MAX_PENDING_PER_POD, IdentityKey, TokenCache, TokenError, TokenKey, TokenSource,
    jwt_claim,
};

/// Lifetime asked for the ServiceAccount token: the shortest the API server
/// issues (it refuses less than ten minutes). The token is used once, at
/// once, as the client assertion; what is kept is Entra's token.
pub const SA_TOKEN_EXPIRATION_SECS: i64 = 600;
/// Most exchanges (TokenRequest plus Entra call) in progress at once.
pub const MAX_CONCURRENT_EXCHANGES: usize = 16;
/// How long a request waits for a place among them before 429.
pub const EXCHANGE_QUEUE_WAIT: Duration = Duration::from_secs(5);
/// `Retry-After` of that 429.
const EXCHANGE_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The TokenRequest, connect to answer.
pub const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The ServiceAccount of a pod that names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// What one exchange needs: who asks, as whom, of which authority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The AzureIdentity, `namespace/name` (for messages).
    pub identity: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's ServiceAccount.
    pub service_account: String,
    /// The pod's name (the token is bound to it).
    pub pod_name: String,
    /// The pod's UID (the token is bound to it).
    pub pod_uid: String,
    /// The identity's client ID.
    pub client_id: String,
    /// The tenant asked.
    pub tenant: String,
    /// The authority asked.
    pub ad_endpoint: String,
}

impl Plan {
    /// The subject Entra sees: `system:serviceaccount:<namespace>:<sa>`.
    pub fn subject(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }

    /// The cache key of its token for `resource`.
    pub fn token_key(&self, resource: &str) -> TokenKey {
        TokenKey::federated(
            &self.ad_endpoint,
            &self.tenant,
            &self.namespace,
            &self.service_account,
            resource,
        )
    }
}

/// The plan for `pod` using the federated `identity`; `cluster_tenant` is
/// azure.json's `tenantId` (empty when unknown).
pub fn plan(
    identity: &AzureIdentity,
    pod: &PodEntry,
    cluster_tenant: &str,
) -> Result<Plan, TokenError> {
    let name = format!(
        "{}/{}",
        identity.namespace().unwrap_or_default(),
        identity.name_any()
    );
    let client_id = identity.spec.client_id.trim();
    if client_id.is_empty() {
        return Err(TokenError::Forbidden(format!(
            "AzureIdentity {name} is federated and has no spec.clientID; NMI serves no token for it. Set spec.clientID to the client ID of the managed identity or application that holds the federated credential"
        )));
    }
    let tenant = match identity.spec.tenant_id.trim() {
        "" => cluster_tenant.trim(),
        t => t,
    };
    if tenant.is_empty() {
        return Err(TokenError::Unavailable(format!(
            "AzureIdentity {name} is federated and names no tenant: set spec.tenantID (NMI's azure.json has no tenantId either)"
        )));
    }
    if pod.uid.is_empty() {
        return Err(TokenError::Unavailable(format!(
            "pod {}/{} has no UID yet; try again",
            pod.namespace, pod.name
        )));
    }
    let service_account = match pod.service_account.as_str() {
        "" => DEFAULT_SERVICE_ACCOUNT,
        sa => sa,
    };
    Ok(Plan {
        identity: name,
        namespace: pod.namespace.clone(),
        service_account: service_account.to_string(),
        pod_name: pod.name.clone(),
        pod_uid: pod.uid.clone(),
        client_id: client_id.to_string(),
        tenant: tenant.to_string(),
        ad_endpoint: match identity.spec.ad_endpoint.trim() {
            "" => aad::DEFAULT_AD_ENDPOINT.to_string(),
            e => e.to_string(),
        },
    })
}

/// The TokenRequest NMI posts to
/// `/api/v1/namespaces/<ns>/serviceaccounts/<sa>/token`.
pub fn token_request(plan: &Plan) -> TokenRequest {
    TokenRequest {
        metadata: Default::default(),
        spec: TokenRequestSpec {
            audiences: vec![FEDERATED_TOKEN_AUDIENCE.to_string()],
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(plan.pod_name.clone()),
                uid: Some(plan.pod_uid.clone()),
            }),
            expiration_seconds: Some(SA_TOKEN_EXPIRATION_SECS),
        },
        status: None,
    }
}

/// The v2 `scope` of an IMDS `resource`: `<resource>/.default` (a resource
/// with a trailing slash keeps it: Entra then issues the token for the
/// resource as written, as IMDS does).
pub fn scope_of(resource: &str) -> String {
    if resource.ends_with("/.default") {
        resource.to_string()
    } else {
        format!("{resource}/.default")
    }
}

/// The form body of the exchange.
pub fn exchange_form(client_id: &str, resource: &str, assertion: &str) -> Secret {
    let mut f = form_urlencoded::Serializer::new(String::new());
    f.append_pair("grant_type", "client_credentials");
    f.append_pair("client_id", client_id);
    f.append_pair("scope", &scope_of(resource));
    f.append_pair("client_assertion_type", JWT_BEARER);
    f.append_pair("client_assertion", assertion);
    Secret::new(f.finish())
}

/// Entra's refusal: its AADSTS code (from `error_codes`, else the
/// description) and the first line of its description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The AADSTS code.
    pub code: Option<u32>,
    /// The description's first line (Entra appends trace and correlation IDs).
    pub description: String,
}

/// Reads Entra's error body.
pub fn parse_refusal(body: &[u8]) -> Refusal {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let description = json
        .get("error_description")
        .and_then(|d| d.as_str())
        .map(|d| d.lines().next().unwrap_or("").trim().to_string())
        .unwrap_or_else(|| {
            String::from_utf8_lossy(body)
                .chars()
                .take(300)
                .collect::<String>()
        });
    let code = json
        .get("error_codes")
        .and_then(|c| c.get(0))
        .and_then(|c| c.as_u64())
        .and_then(|c| u32::try_from(c).ok())
        .or_else(|| {
            let rest = description.split("AADSTS").nth(1)?;
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .ok()
        });
    Refusal { code, description }
}

/// What the user must do about Entra's refusal `code` of `plan`'s exchange
/// for `resource`; `issuer` is the ServiceAccount token's `iss`.
pub fn explain(code: Option<u32>, plan: &Plan, issuer: &str, resource: &str) -> String {
    let subject = plan.subject();
    let client = &plan.client_id;
    let create = format!(
        "create a federated identity credential on the identity with client ID {client} with issuer {issuer}, subject {subject} and audience {FEDERATED_TOKEN_AUDIENCE} (az identity federated-credential create --issuer {issuer} --subject {subject} --audiences {FEDERATED_TOKEN_AUDIENCE}, or for an application az ad app federated-credential create)"
    );
    match code {
        Some(700_211) => format!(
            "no federated identity credential of client ID {client} trusts this cluster's issuer {issuer}: {create}"
        ),
        Some(700_213) => format!(
            "client ID {client} has federated identity credentials for issuer {issuer} but none for subject {subject} (the pod's namespace and ServiceAccount): {create}"
        ),
        Some(700_212) => format!(
            "the federated identity credential of client ID {client} for issuer {issuer} and subject {subject} does not accept audience {FEDERATED_TOKEN_AUDIENCE}: set its audiences to [\"{FEDERATED_TOKEN_AUDIENCE}\"]"
        ),
        Some(50_166) => format!(
            "Entra ID could not read the OpenID discovery document or keys of issuer {issuer}: the issuer must be reachable by Entra ID (on AKS: enable the OIDC issuer, az aks update --enable-oidc-issuer, and use the URL az aks show --query oidcIssuerProfile.issuerUrl gives)"
        ),
        Some(7_000_272 | 700_027) => format!(
            "Entra ID could not verify the ServiceAccount token with the keys issuer {issuer} publishes: the issuer's JWKS must hold the API server's current service-account signing keys"
        ),
        Some(700_024) => "the ServiceAccount token is outside its validity window for Entra ID: check the node's and the API server's clocks".to_string(),
        Some(700_016) => format!(
            "no application or managed identity with client ID {client} exists in tenant {}: check spec.clientID and spec.tenantID",
            plan.tenant
        ),
        Some(90_002) => format!(
            "tenant {} was not found at {}: check spec.tenantID (or tenantId in azure.json) and spec.adEndpoint",
            plan.tenant, plan.ad_endpoint
        ),
        Some(500_011) => format!(
            "resource {resource} is not known in tenant {}: check the resource the application asks for",
            plan.tenant
        ),
        Some(70_011) => format!("resource {resource} does not make a valid scope"),
        _ => "Entra ID refused the exchange".to_string(),
    }
}

/// The error a pod gets for Entra's `status` and `body`.
pub fn refusal_error(
    plan: &Plan,
    issuer: &str,
    resource: &str,
    status: u16,
    body: &[u8],
) -> TokenError {
    let refusal = parse_refusal(body);
    let fix = explain(refusal.code, plan, issuer, resource);
    TokenError::Federated {
        status,
        code: refusal.code,
        message: format!(
            "federated token exchange for AzureIdentity {} (client ID {}) refused by Entra ID (status {status}): {fix}. Entra ID said: {}",
            plan.identity, plan.client_id, refusal.description
        ),
    }
}

/// Why the API server issued no ServiceAccount token: its `status` (0 when
/// it was not reached) and `detail`. A refusal (4xx but 429: RBAC, an
/// admission policy, a ServiceAccount or pod that does not exist) is the
/// pod's 403, a configuration to fix; anything else is 503, to retry.
pub fn token_request_error(plan: &Plan, status: u16, detail: &str) -> TokenError {
    let sa = format!("{}/{}", plan.namespace, plan.service_account);
    let hint = match status {
        401 | 403 => {
            " NMI's ClusterRole needs the verb create on serviceaccounts/token (and an admission policy, if any, must let it ask for this pod)"
        }
        404 => " The ServiceAccount or the pod does not exist (any more).",
        _ => "",
    };
    TokenError::Federated {
        status,
        code: None,
        message: format!(
            "NMI could not get a token of ServiceAccount {sa} for pod {}/{} from the API server: {detail}.{hint}",
            plan.namespace, plan.pod_name
        ),
    }
}

/// Gets federated tokens: the API server for the ServiceAccount token, Entra
/// ID for the exchange.
#[derive(Clone)]
pub struct Federated {
    cluster_tenant: String,
    limiter: Arc<FairLimiter<RequesterKey>>,
    aad: AadClient,
    client: Option<kube::Client>,
}

impl std::fmt::Debug for Federated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // kube::Client has no Debug.
        let client = self.client.as_ref().map(|_| "kube::Client");
        f.debug_struct("Federated")
            .field("cluster_tenant", &self.cluster_tenant)
            .field("client", &client)
            .finish_non_exhaustive()
    }
}

impl Federated {
    /// Over `client` (None: every federated request fails with 503, for
    /// tests that need none), `aad`, and the cluster's tenant (azure.json's
    /// `tenantId`, empty when unknown); at most [`DEFAULT_MAX_PENDING_PER_POD`]
    /// exchanges waiting per pod.
    pub fn new(client: Option<kube::Client>, aad: AadClient, cluster_tenant: &str) -> Self {
        Federated {
            client,
            aad,
            cluster_tenant: cluster_tenant.trim().to_string(),
            limiter: Arc::new(FairLimiter::new(
                MAX_CONCURRENT_EXCHANGES,
                Duration::ZERO,
                DEFAULT_MAX_PENDING_PER_POD,
            )),
        }
    }

    /// The same with at most `max_pending_per_pod` exchanges waiting per pod
    /// (`--max-pending-fetches-per-pod`).
    pub fn with_max_pending_per_pod(mut self, max_pending_per_pod: usize) -> Self {
        self.limiter = Arc::new(FairLimiter::new(
            MAX_CONCURRENT_EXCHANGES,
            Duration::ZERO,
            max_pending_per_pod.max(1),
        ));
        self
    }

    /// The plan of `pod`'s exchange for `identity`.
    pub fn plan(&self, identity: &AzureIdentity, pod: &PodEntry) -> Result<Plan, TokenError> {
        plan(identity, pod, &self.cluster_tenant)
    }

    /// `pod`'s token of the federated `identity` for `resource`, cached,
    /// the exchange waiting in `requester`'s queue. The caller has already
    /// decided that the pod may use the identity.
    pub async fn token<S: TokenSource>(
        &self,
        cache: &TokenCache<S>,
        identity: &AzureIdentity,
        pod: &PodEntry,
        resource: &str,
        requester: &RequesterKey,
    ) -> Result<Token, TokenError> {
        let plan = self.plan(identity, pod)?;
        cache
            .cached(
                IdentityKey::of(&identity.spec),
                plan.token_key(resource),
                || self.queued(&plan, resource, requester),
            )
            .await
    }

    /// The exchange once `requester`'s turn comes: 429 when the pod already
    /// has too many waiting, or when its turn does not come within
    /// [`EXCHANGE_QUEUE_WAIT`] (an exchange that has started is not cut).
    async fn queued(
        &self,
        plan: &Plan,
        resource: &str,
        requester: &RequesterKey,
    ) -> Result<Token, TokenError> {
        let throttled = TokenError::Throttled {
            retry_after: EXCHANGE_RETRY_AFTER,
        };
        let started = std::sync::atomic::AtomicBool::new(false);
        let work = self.limiter.run(requester, false, async {
            started.store(true, std::sync::atomic::Ordering::SeqCst);
            self.exchange(plan, resource).await
        });
        tokio::pin!(work);
        let result = tokio::select! {
            r = &mut work => r,
            _ = tokio::time::sleep(EXCHANGE_QUEUE_WAIT) => {
                if !started.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(throttled);
                }
                work.await
            }
        };
        result.map_err(|full| TokenError::Throttled {
            retry_after: full.retry_after,
        })?
    }

    async fn exchange(&self, plan: &Plan, resource: &str) -> Result<Token, TokenError> {
        let assertion = self.service_account_token(plan).await?;
        let issuer = jwt_claim(assertion.expose(), "iss").unwrap_or_default();
        let url =
            aad::v2_token_url(&plan.ad_endpoint, &plan.tenant).map_err(TokenError::Unavailable)?;
        let body = exchange_form(&plan.client_id, resource, assertion.expose());
        let now = crate::token::now_secs();
        let resp = self.aad.post_form(&url, &body).await?;
        let status = resp.status();
        if status == StatusCode::OK {
            return aad::parse_token_response(status, resp.body(), &plan.client_id, resource, now);
        }
        Err(refusal_error(
            plan,
            &issuer,
            resource,
            status.as_u16(),
            resp.body(),
        ))
    }

    async fn service_account_token(&self, plan: &Plan) -> Result<Secret, TokenError> {
        let Some(client) = self.client.clone() else {
            return Err(token_request_error(plan, 0, "no Kubernetes client"));
        };
        let api = Api::<ServiceAccount>::namespaced(client, &plan.namespace);
        let request = token_request(plan);
        let params = PostParams::default();
        let asked = api.create_token_request(&plan.service_account, &params, &request);
        let answer = match tokio::time::timeout(TOKEN_REQUEST_TIMEOUT, asked).await {
            Err(_) => {
                let detail = format!("no answer within {TOKEN_REQUEST_TIMEOUT:?}");
                return Err(token_request_error(plan, 0, &detail));
            }
            Ok(Err(kube::Error::Api(e))) => {
                return Err(token_request_error(plan, e.code, &e.message));
            }
            Ok(Err(e)) => return Err(token_request_error(plan, 0, &e.to_string())),
            Ok(Ok(answer)) => answer,
        };
        match answer.status.map(|s| s.token) {
            Some(token) if !token.is_empty() => Ok(Secret::new(token)),
            _ => Err(token_request_error(plan, 0, "the answer holds no token")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aadpodid_api::AzureIdentitySpec;

    fn identity(client_id: &str, tenant: &str, ad_endpoint: &str) -> AzureIdentity {
        let mut id = AzureIdentity::new(
            "fed",
            AzureIdentitySpec {
                client_id: client_id.into(),
                tenant_id: tenant.into(),
                ad_endpoint: ad_endpoint.into(),
                ..Default::default()
            },
        );
        id.metadata.namespace = Some("ids".into());
        id
    }

    fn pod(sa: &str, uid: &str) -> PodEntry {
        PodEntry {
            namespace: "app".into(),
            name: "web-0".into(),
            labels: Default::default(),
            service_account: sa.into(),
            uid: uid.into(),
            ips: vec![],
        }
    }

    #[test]
    fn plans_table() {
        // (identity's clientID, tenantID, adEndpoint; pod's SA, UID; cluster
        // tenant) -> Ok((SA, tenant, authority)) or Err(status, text)
        type Want = Result<(&'static str, &'static str, &'static str), (u16, &'static str)>;
        type Row = (
            (&'static str, &'static str, &'static str),
            (&'static str, &'static str),
            &'static str,
            Want,
        );
        #[rustfmt::skip]
        let cases: &[Row] = &[
            (("c", "t1", ""), ("web", "u"), "ct", Ok(("web", "t1", "https://login.microsoftonline.com/"))),
            (("c", "", ""), ("web", "u"), "ct", Ok(("web", "ct", "https://login.microsoftonline.com/"))),
            (("c", "t1", "https://login.example/"), ("", "u"), "", Ok(("default", "t1", "https://login.example/"))),
            (("", "t1", ""), ("web", "u"), "ct", Err((403, "has no spec.clientID"))),
            (("  ", "t1", ""), ("web", "u"), "ct", Err((403, "has no spec.clientID"))),
            (("c", "", ""), ("web", "u"), "", Err((503, "set spec.tenantID"))),
            (("c", "t1", ""), ("web", ""), "ct", Err((503, "has no UID"))),
        ];
        for ((cid, tenant, ep), (sa, uid), cluster, want) in cases {
            let got = plan(&identity(cid, tenant, ep), &pod(sa, uid), cluster);
            match (got, want) {
                (Ok(p), Ok((sa, tenant, ep))) => {
                    assert_eq!(
                        (
                            p.service_account.as_str(),
                            p.tenant.as_str(),
                            p.ad_endpoint.as_str()
                        ),
                        (*sa, *tenant, *ep)
                    );
                    assert_eq!(p.identity, "ids/fed");
                    assert_eq!(p.subject(), format!("system:serviceaccount:app:{sa}"));
                }
                (Err(e), Err((status, text))) => {
                    assert_eq!(e.status().as_u16(), *status, "{e}");
                    assert!(e.to_string().contains(text), "{e}");
                }
                (got, want) => panic!("{cid:?} {tenant:?} {sa:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn the_token_request_is_bound_to_the_pod_for_the_exchange_audience() {
        let p = plan(&identity("c", "t", ""), &pod("web", "uid-1"), "").unwrap();
        let body = serde_json::to_value(token_request(&p)).unwrap();
        assert_eq!(
            body["spec"],
            serde_json::json!({
                "audiences": ["api://AzureADTokenExchange"],
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "web-0", "uid": "uid-1"},
                "expirationSeconds": 600,
            })
        );
    }

    #[test]
    fn exchange_requests_table() {
        #[rustfmt::skip]
        let scopes = [
            ("https://management.azure.com/", "https://management.azure.com//.default"),
            ("https://vault.azure.net", "https://vault.azure.net/.default"),
            ("api://app/.default", "api://app/.default"),
        ];
        for (resource, scope) in scopes {
            assert_eq!(scope_of(resource), scope, "{resource}");
        }
        let form = exchange_form("cid", "https://vault.azure.net", "a.b.c");
        let pairs: std::collections::BTreeMap<String, String> =
            form_urlencoded::parse(form.expose().as_bytes())
                .into_owned()
                .collect();
        let want: std::collections::BTreeMap<String, String> = [
            ("grant_type", "client_credentials"),
            ("client_id", "cid"),
            ("scope", "https://vault.azure.net/.default"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", "a.b.c"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(pairs, want);
        #[rustfmt::skip]
        let urls = [
            ("https://login.microsoftonline.com/", "t1", Some("https://login.microsoftonline.com/t1/oauth2/v2.0/token")),
            ("https://127.0.0.1:8443", "t1", Some("https://127.0.0.1:8443/t1/oauth2/v2.0/token")),
            ("", "t1", Some("https://login.microsoftonline.com/t1/oauth2/v2.0/token")),
            ("https://login.microsoftonline.com/", "t1/../x", None),
            ("http://login.microsoftonline.com/", "t1", None),
        ];
        for (ep, tenant, want) in urls {
            assert_eq!(
                aad::v2_token_url(ep, tenant).ok().as_deref(),
                want,
                "{ep} {tenant}"
            );
        }
    }

    #[test]
    fn entra_refusals_become_fixes_table() {
        let p = plan(&identity("cid", "t1", ""), &pod("web", "u"), "").unwrap();
        let iss = "https://issuer.example";
        let body = |code: u32, text: &str| {
            serde_json::json!({
                "error": "invalid_client",
                "error_description": format!("AADSTS{code}: {text}\r\nTrace ID: x\r\nCorrelation ID: y"),
                "error_codes": [code],
            })
            .to_string()
        };
        // (status, body, status to the pod, texts the message holds)
        #[rustfmt::skip]
        let cases: Vec<(u16, String, u16, Vec<&str>)> = vec![
            (401, body(700_211, "No matching federated identity record found for presented assertion issuer"), 403,
                vec!["AADSTS700211", "trusts this cluster's issuer https://issuer.example", "with issuer https://issuer.example, subject system:serviceaccount:app:web and audience api://AzureADTokenExchange", "ids/fed"]),
            (401, body(700_213, "No matching federated identity record found for presented assertion subject"), 403,
                vec!["none for subject system:serviceaccount:app:web", "with issuer https://issuer.example, subject system:serviceaccount:app:web"]),
            (401, body(700_212, "audience"), 403, vec!["does not accept audience api://AzureADTokenExchange"]),
            (400, body(50_166, "Request to External OIDC endpoint failed."), 403, vec!["--enable-oidc-issuer"]),
            (401, body(7_000_272, "kid"), 403, vec!["current service-account signing keys"]),
            (400, body(700_016, "not found"), 403, vec!["no application or managed identity with client ID cid exists in tenant t1"]),
            (400, body(90_002, "Tenant"), 403, vec!["tenant t1 was not found"]),
            (503, body(50_001, "The service is temporarily unavailable."), 503, vec!["Entra ID refused the exchange", "AADSTS50001"]),
            (429, "not json".into(), 503, vec!["Entra ID refused the exchange", "not json"]),
        ];
        for (status, body, to_pod, texts) in cases {
            let e = refusal_error(&p, iss, "https://vault.azure.net", status, body.as_bytes());
            assert_eq!(e.status().as_u16(), to_pod, "{e}");
            let text = e.to_string();
            for t in texts {
                assert!(text.contains(t), "{t:?} not in {text}");
            }
            assert!(!text.contains("Trace ID"), "{text}");
        }
        // The code is read from the description when error_codes is missing.
        let r = parse_refusal(br#"{"error_description":"AADSTS700213: no match"}"#);
        assert_eq!(r.code, Some(700_213));
    }

    #[test]
    fn token_request_failures_say_what_to_fix() {
        let p = plan(&identity("cid", "t1", ""), &pod("web", "u"), "").unwrap();
        // (API server's status, status to the pod, a text the message holds)
        let cases = [
            (403, 403, "serviceaccounts/token"),
            (401, 403, "serviceaccounts/token"),
            (404, 403, "does not exist"),
            (422, 403, "ServiceAccount app/web"),
            (429, 503, "ServiceAccount app/web"),
            (500, 503, "ServiceAccount app/web"),
            (0, 503, "ServiceAccount app/web"),
        ];
        for (apiserver, to_pod, text) in cases {
            let e = token_request_error(&p, apiserver, "detail");
            assert_eq!(e.status().as_u16(), to_pod, "{apiserver}: {e}");
            let message = e.to_string();
            assert!(
                message.contains(text) && message.contains("detail"),
                "{message}"
            );
        }
    }
}
