//! Tokens for service-principal identities (types 1 and 2): which Secret and
//! tenants an identity needs ([`plan`], pure), and the executor that reads the
//! Secret, asks AAD and caches ([`ServicePrincipals`]).
//!
//! The Secret is read on every request, as upstream did: a rotated or deleted
//! Secret takes effect at once, and a cached token is served only when the
//! identity references the very credential the token was obtained with (the
//! cache key holds the digest of the Secret material, so an identity naming
//! the same client ID with another or no Secret never rides on a cached
//! token). Only the AAD round trip is saved.

use std::collections::BTreeMap;
use std::sync::Arc;

use aadpodid_api::{AzureIdentity, IdentityType};
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kube::{Api, ResourceExt};

use crate::aad::{self, AadClient};
use crate::response::Token;
use crate::token::{IdentityKey, TokenCache, TokenError, TokenKey, TokenSource};

/// What one service-principal identity needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Namespace of the Secret.
    pub secret_namespace: String,
    /// Name of the Secret.
    pub secret_name: String,
    /// Type 2.
    pub certificate: bool,
    /// The primary tenant, then the auxiliary ones (type 1 only, as upstream).
    pub tenants: Vec<String>,
    /// The authority (`adEndpoint`, or the public cloud's).
    pub ad_endpoint: String,
    /// The service principal.
    pub client_id: String,
}

/// Checks a type-1/2 identity and says what to fetch. The Secret's namespace
/// defaults to the identity's; another namespace is refused unless listed in
/// `allowed_secret_namespaces` (`--allowed-secret-namespaces`): otherwise whoever
/// may create an AzureIdentity could use a Secret they cannot read.
pub fn plan(
    identity: &AzureIdentity,
    allowed_secret_namespaces: &[String],
) -> Result<Plan, TokenError> {
    let certificate = match identity.spec.r#type {
        IdentityType::ServicePrincipal => false,
        IdentityType::ServicePrincipalCertificate => true,
        other => {
            return Err(TokenError::Unavailable(format!(
                "identity type {} is not a service principal",
                other.as_i64()
            )));
        }
    };
    let id_ns = identity.namespace().unwrap_or_default();
    let where_ = format!("{id_ns}/{}", identity.name_any());
    let reference = identity.spec.client_password.as_ref();
    let secret_name = reference
        .and_then(|r| r.name.clone())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            TokenError::Unavailable(format!(
                "identity {where_} has no clientPassword secret name"
            ))
        })?;
    let secret_namespace = reference
        .and_then(|r| r.namespace.clone())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| id_ns.clone());
    if !aad::secret_namespace_allowed(&id_ns, &secret_namespace, allowed_secret_namespaces) {
        return Err(TokenError::Forbidden(format!(
            "identity {where_} references secret {secret_namespace}/{secret_name} outside its namespace; NMI reads secrets only from the identity's own namespace unless --allowed-secret-namespaces lists the secret's"
        )));
    }
    if identity.spec.tenant_id.is_empty() {
        return Err(TokenError::Unavailable(format!(
            "identity {where_} has no tenantID"
        )));
    }
    let mut tenants = vec![identity.spec.tenant_id.clone()];
    if !certificate {
        tenants.extend(
            identity
                .spec
                .auxiliary_tenant_ids
                .iter()
                .flatten()
                .filter(|t| !t.is_empty())
                .cloned(),
        );
    }
    Ok(Plan {
        secret_namespace,
        secret_name,
        certificate,
        tenants,
        ad_endpoint: if identity.spec.ad_endpoint.is_empty() {
            aad::DEFAULT_AD_ENDPOINT.to_string()
        } else {
            identity.spec.ad_endpoint.clone()
        },
        client_id: identity.spec.client_id.clone(),
    })
}

/// Reads Secrets and gets AAD tokens for service-principal identities.
#[derive(Clone)]
pub struct ServicePrincipals {
    client: Option<kube::Client>,
    aad: AadClient,
    allowed_secret_namespaces: Arc<Vec<String>>,
}

impl std::fmt::Debug for ServicePrincipals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // kube::Client has no Debug; whether there is one is what tells.
        f.debug_struct("ServicePrincipals")
            .field("has_client", &self.client.is_some())
            .field("aad", &self.aad)
            .field("allowed_secret_namespaces", &self.allowed_secret_namespaces)
            .finish()
    }
}

impl ServicePrincipals {
    /// Over `client` (None: every type-1/2 request fails with 503, for tests
    /// that need none) and `aad`.
    pub fn new(
        client: Option<kube::Client>,
        aad: AadClient,
        allowed_secret_namespaces: Vec<String>,
    ) -> Self {
        ServicePrincipals {
            client,
            aad,
            allowed_secret_namespaces: Arc::new(allowed_secret_namespaces),
        }
    }

    async fn read_secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<BTreeMap<String, Vec<u8>>, TokenError> {
        let client = self
            .client
            .clone()
            .ok_or_else(|| TokenError::Unavailable("no Kubernetes client".into()))?;
        let secret = Api::<KubeSecret>::namespaced(client, namespace)
            .get(name)
            .await
            .map_err(|e| {
                TokenError::Unavailable(format!("failed to get secret {namespace}/{name}: {e}"))
            })?;
        Ok(secret
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect())
    }

    /// The tokens for `identity` and `resource`: the primary tenant's first.
    /// The caller has already decided that the pod may use the identity.
    pub async fn tokens<S: TokenSource>(
        &self,
        cache: &TokenCache<S>,
        identity: &AzureIdentity,
        resource: &str,
    ) -> Result<Vec<Token>, TokenError> {
        let plan = plan(identity, &self.allowed_secret_namespaces)?;
        let data = self
            .read_secret(&plan.secret_namespace, &plan.secret_name)
            .await?;
        let loaded = aad::credential_from_secret(&data, plan.certificate).map_err(|e| {
            TokenError::Unavailable(format!(
                "secret {}/{}: {e}",
                plan.secret_namespace, plan.secret_name
            ))
        })?;
        let mut out = Vec::with_capacity(plan.tenants.len());
        for tenant in &plan.tenants {
            let key = TokenKey::aad(&plan.ad_endpoint, tenant, &loaded.digest, resource);
            let token = cache
                .cached(IdentityKey::of(&identity.spec), key, || {
                    self.aad.token(
                        &plan.ad_endpoint,
                        tenant,
                        &plan.client_id,
                        &loaded.credential,
                        resource,
                    )
                })
                .await?;
            out.push(token);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aadpodid_api::AzureIdentitySpec;
    use k8s_openapi::api::core::v1::SecretReference;

    fn sp(ns: &str, ty: IdentityType, secret_ns: Option<&str>) -> AzureIdentity {
        let mut id = AzureIdentity::new(
            "sp",
            AzureIdentitySpec {
                r#type: ty,
                client_id: "app".into(),
                tenant_id: "t1".into(),
                auxiliary_tenant_ids: Some(vec!["t2".into(), String::new(), "t3".into()]),
                client_password: Some(SecretReference {
                    name: Some("creds".into()),
                    namespace: secret_ns.map(Into::into),
                }),
                ..Default::default()
            },
        );
        id.metadata.namespace = Some(ns.into());
        id
    }

    #[test]
    fn plans() {
        let p = plan(&sp("app", IdentityType::ServicePrincipal, None), &[]).unwrap();
        assert_eq!(
            p,
            Plan {
                secret_namespace: "app".into(),
                secret_name: "creds".into(),
                certificate: false,
                tenants: vec!["t1".into(), "t2".into(), "t3".into()],
                ad_endpoint: "https://login.microsoftonline.com/".into(),
                client_id: "app".into(),
            }
        );
        // Type 2 ignores auxiliary tenants (upstream's multi-tenant path is type 1 only).
        let p = plan(
            &sp(
                "app",
                IdentityType::ServicePrincipalCertificate,
                Some("app"),
            ),
            &[],
        )
        .unwrap();
        assert!(p.certificate);
        assert_eq!(p.tenants, vec!["t1".to_string()]);
    }

    #[test]
    fn cross_namespace_secrets_are_refused_unless_allowed() {
        let id = sp("app", IdentityType::ServicePrincipal, Some("kube-system"));
        let e = plan(&id, &[]).unwrap_err();
        assert_eq!(e.status(), http::StatusCode::FORBIDDEN);
        assert!(e.to_string().contains("kube-system/creds"), "{e}");
        assert!(plan(&id, &["kube-system".into()]).is_ok());
        assert!(plan(&id, &["*".into()]).is_ok());
        assert!(plan(&id, &["other".into()]).is_err());
    }

    #[test]
    fn incomplete_identities_are_unavailable() {
        let mut id = sp("app", IdentityType::ServicePrincipal, None);
        id.spec.tenant_id.clear();
        assert_eq!(plan(&id, &[]).unwrap_err().status(), 503);
        let mut id = sp("app", IdentityType::ServicePrincipal, None);
        id.spec.client_password = None;
        assert_eq!(plan(&id, &[]).unwrap_err().status(), 503);
        let id = sp("app", IdentityType::UserAssignedMsi, None);
        assert_eq!(plan(&id, &[]).unwrap_err().status(), 503);
    }
}
