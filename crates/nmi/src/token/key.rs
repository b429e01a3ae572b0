//! The token cache's keys: which identity a token belongs to
//! ([`IdentityKey`]) and which of its tokens it is ([`TokenKey`]). Typed, so
//! that one kind of key can never be read as another and no ID can run into
//! the next one.

use std::fmt;

use aadpodid_api::{AzureIdentitySpec, IdentityType};

/// The identity a cached token belongs to; IDs are compared ignoring ASCII
/// case (they are stored lower-cased). The cache drops every token of an
/// identity that no pod on the node uses any more.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum IdentityKey {
    /// A user-assigned identity: asked of IMDS by resource ID and served only
    /// for its client ID, so both are part of the key and a token checked for
    /// one pair is never served for another.
    UserAssigned {
        /// The AzureIdentity's `resourceID`, lower-cased.
        resource_id: String,
        /// The AzureIdentity's `clientID`, lower-cased.
        client_id: String,
    },
    /// A service principal, by client ID; each of its tokens also carries
    /// the digest of the Secret it was made with ([`TokenKey::Aad`]).
    ServicePrincipal {
        /// The AzureIdentity's `clientID`, lower-cased.
        client_id: String,
    },
}

impl IdentityKey {
    /// The key of a user-assigned identity.
    pub fn user_assigned(resource_id: &str, client_id: &str) -> Self {
        IdentityKey::UserAssigned {
            resource_id: resource_id.to_ascii_lowercase(),
            client_id: client_id.to_ascii_lowercase(),
        }
    }

    /// The key of a service principal.
    pub fn service_principal(client_id: &str) -> Self {
        IdentityKey::ServicePrincipal {
            client_id: client_id.to_ascii_lowercase(),
        }
    }

    /// The key of the identity an AzureIdentity describes: user-assigned
    /// for type 0, a service principal for every other type.
    pub fn of(spec: &AzureIdentitySpec) -> Self {
        match spec.r#type {
            IdentityType::UserAssignedMsi => {
                IdentityKey::user_assigned(&spec.resource_id, &spec.client_id)
            }
            _ => IdentityKey::service_principal(&spec.client_id),
        }
    }
}

impl fmt::Display for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityKey::UserAssigned {
                resource_id,
                client_id,
            } => write!(f, "user-assigned {resource_id:?} client {client_id:?}"),
            IdentityKey::ServicePrincipal { client_id } => {
                write!(f, "service-principal {client_id:?}")
            }
        }
    }
}

/// Which token of an identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TokenKey {
    /// From IMDS, for `resource` (as the pod wrote it).
    Imds {
        /// The resource the token is for.
        resource: String,
    },
    /// From AAD with a Secret's credential.
    Aad {
        /// The AAD endpoint, lower-cased.
        endpoint: String,
        /// The tenant, lower-cased.
        tenant: String,
        /// The digest of the credential read from the Secret: a changed
        /// Secret makes new entries instead of serving the old one's tokens.
        secret_digest: String,
        /// The resource the token is for (as the pod wrote it).
        resource: String,
    },
    /// From Entra ID in exchange for a ServiceAccount token (a federated
    /// identity). Entra trusts a federated credential per ServiceAccount,
    /// so the pod's namespace and ServiceAccount are part of the key: a
    /// token obtained for one ServiceAccount is never served to a pod
    /// running as another.
    Federated {
        /// The authority, lower-cased.
        endpoint: String,
        /// The tenant, lower-cased.
        tenant: String,
        /// The pod's namespace.
        namespace: String,
        /// The pod's ServiceAccount.
        service_account: String,
        /// The resource the token is for (as the pod wrote it).
        resource: String,
    },
}

impl TokenKey {
    /// The key of an IMDS token for `resource`.
    pub fn imds(resource: &str) -> Self {
        TokenKey::Imds {
            resource: resource.to_string(),
        }
    }

    /// The key of an AAD token.
    pub fn aad(endpoint: &str, tenant: &str, secret_digest: &str, resource: &str) -> Self {
        TokenKey::Aad {
            endpoint: endpoint.to_ascii_lowercase(),
            tenant: tenant.to_ascii_lowercase(),
            secret_digest: secret_digest.to_string(),
            resource: resource.to_string(),
        }
    }
}

impl TokenKey {
    /// The key of a federated token for a pod of `namespace` running as
    /// `service_account`.
    pub fn federated(
        endpoint: &str,
        tenant: &str,
        namespace: &str,
        service_account: &str,
        resource: &str,
    ) -> Self {
        TokenKey::Federated {
            endpoint: endpoint.to_ascii_lowercase(),
            tenant: tenant.to_ascii_lowercase(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            resource: resource.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(r#type: IdentityType, resource_id: &str, client_id: &str) -> AzureIdentitySpec {
        AzureIdentitySpec {
            r#type,
            resource_id: resource_id.into(),
            client_id: client_id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn identity_keys_table() {
        use IdentityType::{ServicePrincipal as Sp, ServicePrincipalCertificate as Cert};
        let msi = IdentityType::UserAssignedMsi;
        // (name, one AzureIdentity's (type, resourceID, clientID), another's,
        // whether they share a key)
        type Id = (IdentityType, &'static str, &'static str);
        #[rustfmt::skip]
        let cases: [(&str, Id, Id, bool); 6] = [
            ("case is ignored", (msi, "/S/RID-A", "APP"), (msi, "/s/rid-a", "app"), true),
            ("another client ID", (msi, "/s/a", "app"), (msi, "/s/a", "kubelet"), false),
            ("another resource ID", (msi, "/s/a", "app"), (msi, "/s/b", "app"), false),
            ("IDs cannot run together", (msi, "a\nb", "c"), (msi, "a", "b\nc"), false),
            ("a service principal is not an MSI", (Sp, "", "app"), (msi, "", "app"), false),
            ("service principals: client ID only", (Sp, "/s/a", "APP"), (Cert, "", "app"), true),
        ];
        for (name, (t1, r1, c1), (t2, r2, c2), same) in cases {
            let (one, other) = (spec(t1, r1, c1), spec(t2, r2, c2));
            let (a, b) = (IdentityKey::of(&one), IdentityKey::of(&other));
            assert_eq!(a == b, same, "{name}: {a} / {b}");
            let written = a.to_string() == b.to_string();
            assert_eq!(written, same, "{name}: written out");
        }
        assert_eq!(
            IdentityKey::of(&spec(msi, "/Subs/RID", "App")),
            IdentityKey::user_assigned("/subs/rid", "APP")
        );
    }

    #[test]
    fn token_keys_table() {
        let aad = TokenKey::aad;
        let base = aad("https://login/", "t1", "d1", "r");
        #[rustfmt::skip]
        let cases = [
            ("endpoint and tenant ignore case", aad("HTTPS://LOGIN/", "T1", "d1", "r"), true),
            ("another Secret", aad("https://login/", "t1", "d2", "r"), false),
            ("another tenant", aad("https://login/", "t2", "d1", "r"), false),
            ("the resource keeps its case", aad("https://login/", "t1", "d1", "R"), false),
            ("an IMDS token is another token", TokenKey::imds("r"), false),
        ];
        for (name, other, same) in cases {
            assert_eq!(base == other, same, "{name}");
        }
        assert_ne!(TokenKey::imds("r"), TokenKey::imds("R"));
    }

    #[test]
    fn federated_keys_table() {
        let fed = TokenKey::federated;
        let base = fed("https://login/", "t1", "ns", "sa", "r");
        #[rustfmt::skip]
        let cases = [
            ("endpoint and tenant ignore case", fed("HTTPS://LOGIN/", "T1", "ns", "sa", "r"), true),
            ("another ServiceAccount", fed("https://login/", "t1", "ns", "sa2", "r"), false),
            ("the same ServiceAccount name in another namespace", fed("https://login/", "t1", "ns2", "sa", "r"), false),
            ("names cannot run together", fed("https://login/", "t1", "n", "ssa", "r"), false),
            ("another tenant", fed("https://login/", "t2", "ns", "sa", "r"), false),
            ("another resource", fed("https://login/", "t1", "ns", "sa", "R"), false),
            ("an IMDS token is another token", TokenKey::imds("r"), false),
            ("a Secret's token is another token", TokenKey::aad("https://login/", "t1", "ns", "r"), false),
        ];
        for (name, other, same) in cases {
            assert_eq!(base == other, same, "{name}");
        }
    }
}
