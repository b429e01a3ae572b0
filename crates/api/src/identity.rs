use std::borrow::Cow;

use k8s_openapi::api::core::v1::SecretReference;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

crd_kind! {
    kind = "AzureIdentity",
    plural = "azureidentities",
    status = "AzureIdentityStatus",
    explain = "AzureIdentity is an Azure identity (user-assigned managed identity or service principal) that pods can be bound to.",
    columns = [
        ("Type", "string", ".spec.type"),
        ("ClientID", "string", ".spec.clientID"),
    ],
    /// An Azure identity that pods may use: a user-assigned managed identity
    /// (type 0) or a service principal with a client secret (type 1) or a
    /// certificate (type 2).
    pub struct AzureIdentitySpec {
        /// Kind of identity: 0 user-assigned managed identity, 1 service principal
        /// with a client secret, 2 service principal with a certificate. A missing
        /// value means 0.
        #[serde(rename = "type", default)]
        pub r#type: IdentityType,

        /// ARM resource ID of the user-assigned managed identity (type 0), of the form
        /// /subscriptions/<id>/resourcegroups/<group>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>.
        #[serde(
            rename = "resourceID",
            default,
            skip_serializing_if = "String::is_empty"
        )]
        pub resource_id: String,

        /// Client (application) ID of the identity; every type needs it.
        #[serde(rename = "clientID", default, skip_serializing_if = "String::is_empty")]
        pub client_id: String,

        /// Secret holding the service principal's credential (types 1 and 2). Type 1
        /// reads the secret's single key as the client secret; type 2 reads the keys
        /// `certificate` (PKCS#12) and `password`.
        #[serde(
            rename = "clientPassword",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        pub client_password: Option<SecretReference>,

        /// Primary tenant of the service principal (types 1 and 2).
        #[serde(rename = "tenantID", default, skip_serializing_if = "String::is_empty")]
        pub tenant_id: String,

        /// Further tenants a type 1 service principal gets tokens for; when set, the
        /// token response is a JSON array with the primary tenant's token first.
        #[serde(rename = "auxiliaryTenantIDs", default)]
        pub auxiliary_tenant_ids: Option<Vec<String>>,

        /// Entra ID (AAD) authority for types 1 and 2; https://login.microsoftonline.com/ when empty.
        #[serde(
            rename = "adEndpoint",
            default,
            skip_serializing_if = "String::is_empty"
        )]
        pub ad_endpoint: String,

        /// Kept for compatibility; not read.
        #[serde(
            rename = "adResourceID",
            default,
            skip_serializing_if = "String::is_empty"
        )]
        pub ad_resource_id: String,

        /// Kept for compatibility; not read.
        #[serde(default)]
        pub replicas: Option<i32>,
    }
}

impl AzureIdentitySpec {
    /// This spec with upstream's empty forms made absent, so that what Go's
    /// MIC embeds in an AzureAssignedIdentity compares equal to the live
    /// object it copied: Go writes an unset `clientPassword` as `{}` (a
    /// `SecretReference` is a struct, written even when empty) and drops an
    /// empty `auxiliaryTenantIDs`. Everything else is kept as it is: a
    /// `clientPassword` naming anything (even an empty string) stays set, as
    /// NMI compares it, and `replicas: 0` is not `null`.
    pub fn canonical(&self) -> AzureIdentitySpec {
        let mut spec = self.clone();
        spec.client_password = spec
            .client_password
            .filter(|p| p.name.is_some() || p.namespace.is_some());
        spec.auxiliary_tenant_ids = spec.auxiliary_tenant_ids.filter(|t| !t.is_empty());
        spec
    }
}

/// Status of an AzureIdentity; kept for compatibility and not written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AzureIdentityStatus {
    /// Kept for compatibility; not written.
    #[serde(rename = "availableReplicas", default)]
    pub available_replicas: i32,
}

/// `spec.type` of an AzureIdentity: an integer on the wire.
///
/// Values other than 0, 1 and 2 are refused by the CRD schema, but an object
/// stored before that schema may still carry one; it is kept as
/// [`IdentityType::Unknown`] so that reading never fails on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum IdentityType {
    /// 0: a user-assigned managed identity, assigned to the node's VM or VMSS.
    #[default]
    UserAssignedMsi,
    /// 1: a service principal with a client secret.
    ServicePrincipal,
    /// 2: a service principal with a certificate.
    ServicePrincipalCertificate,
    /// Any other integer.
    Unknown(i64),
}

impl IdentityType {
    /// The integer written on the wire.
    pub fn as_i64(self) -> i64 {
        match self {
            IdentityType::UserAssignedMsi => 0,
            IdentityType::ServicePrincipal => 1,
            IdentityType::ServicePrincipalCertificate => 2,
            IdentityType::Unknown(v) => v,
        }
    }

    /// The type for an integer read from the wire.
    pub fn from_i64(v: i64) -> Self {
        match v {
            0 => IdentityType::UserAssignedMsi,
            1 => IdentityType::ServicePrincipal,
            2 => IdentityType::ServicePrincipalCertificate,
            other => IdentityType::Unknown(other),
        }
    }
}

impl Serialize for IdentityType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(self.as_i64())
    }
}

impl<'de> Deserialize<'de> for IdentityType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        i64::deserialize(d).map(IdentityType::from_i64)
    }
}

impl JsonSchema for IdentityType {
    fn schema_name() -> Cow<'static, str> {
        "IdentityType".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // Upstream declares a bare integer; the range only refuses values no
        // upstream component ever accepted (NMI answered them with
        // "unsupported identity type").
        json_schema!({ "type": "integer", "minimum": 0, "maximum": 2 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_type_reads_as_user_assigned_msi() {
        let spec: AzureIdentitySpec =
            serde_json::from_value(serde_json::json!({"clientID": "c"})).unwrap();
        assert_eq!(spec.r#type, IdentityType::UserAssignedMsi);
        assert_eq!(spec.client_id, "c");
    }

    #[test]
    fn type_round_trips_as_integer() {
        for (n, t) in [
            (0, IdentityType::UserAssignedMsi),
            (1, IdentityType::ServicePrincipal),
            (2, IdentityType::ServicePrincipalCertificate),
            (7, IdentityType::Unknown(7)),
        ] {
            let v = serde_json::to_value(t).unwrap();
            assert_eq!(v, serde_json::json!(n));
            assert_eq!(serde_json::from_value::<IdentityType>(v).unwrap(), t);
        }
    }

    #[test]
    fn type_as_string_is_refused() {
        let r = serde_json::from_value::<AzureIdentitySpec>(serde_json::json!({"type": "0"}));
        assert!(r.is_err());
    }

    /// (case, a, b, equal once canonical)
    #[test]
    fn canonical_treats_go_zero_forms_as_absent_and_nothing_else() {
        use serde_json::{Value, json};
        let spec = |v: Value| serde_json::from_value::<AzureIdentitySpec>(v).unwrap();
        let base = || {
            json!({
                "resourceID": "/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/a",
                "clientID": "c",
            })
        };
        let with = |k: &str, v: Value| {
            let mut b = base();
            b[k] = v;
            spec(b)
        };
        let other_id = "/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/b";
        // Cases against the base itself: (case, the base with one field
        // written, equal once canonical).
        let against_base: Vec<(&str, AzureIdentitySpec, bool)> = vec![
            // Go's forms of "unset".
            ("clientPassword {}", with("clientPassword", json!({})), true),
            (
                "clientPassword null",
                with("clientPassword", Value::Null),
                true,
            ),
            // Written by a user, never by Go (its omitempty drops them): set.
            (
                "clientPassword with empty strings",
                with("clientPassword", json!({"name": "", "namespace": ""})),
                false,
            ),
            (
                "empty auxiliaryTenantIDs",
                with("auxiliaryTenantIDs", json!([])),
                true,
            ),
            ("type 0 written or not", with("type", json!(0)), true),
            (
                "empty strings written or not",
                with("tenantID", json!("")),
                true,
            ),
            // Real differences.
            (
                "a secret named",
                with("clientPassword", json!({"name": "sp"})),
                false,
            ),
            (
                "another resource ID",
                with("resourceID", json!(other_id)),
                false,
            ),
            ("another client ID", with("clientID", json!("d")), false),
            ("another type", with("type", json!(1)), false),
            ("a tenant", with("tenantID", json!("t")), false),
            (
                "auxiliary tenants",
                with("auxiliaryTenantIDs", json!(["t2"])),
                false,
            ),
            (
                "an authority",
                with("adEndpoint", json!("https://x/")),
                false,
            ),
            ("adResourceID", with("adResourceID", json!("r")), false),
            ("replicas 0 is not unset", with("replicas", json!(0)), false),
        ];
        let secret = |v: Value| with("clientPassword", v);
        let cases = against_base
            .into_iter()
            .map(|(case, a, equal)| (case, a, spec(base()), equal))
            .chain([
                (
                    "a secret namespace only",
                    secret(json!({"namespace": "ns"})),
                    secret(json!({})),
                    false,
                ),
                (
                    "another secret",
                    secret(json!({"name": "sp", "namespace": "a"})),
                    secret(json!({"name": "sp", "namespace": "b"})),
                    false,
                ),
            ]);
        for (case, a, b, equal) in cases {
            assert_eq!(a.canonical() == b.canonical(), equal, "{case}");
            assert_eq!(b.canonical() == a.canonical(), equal, "{case} (swapped)");
            assert_eq!(
                a.canonical().canonical(),
                a.canonical(),
                "{case}: idempotent"
            );
        }
    }

    #[test]
    fn empty_fields_are_omitted_like_go_omitempty() {
        let v = serde_json::to_value(AzureIdentitySpec::default()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": 0, "auxiliaryTenantIDs": null, "replicas": null})
        );
    }
}
