//! The node's cloud config (`/etc/kubernetes/azure.json`, `--cloudconfig`)
//! and the `--immutable-user-msis` list, read the same way by mic and nmi.
//!
//! azure.json is read as upstream reads it: YAML (JSON is YAML) converted to
//! a JSON object whose keys match ignoring case, as Go's `encoding/json`
//! does. A key that is absent or null reads as empty; a value of the wrong
//! type is an error naming the key.

use std::collections::BTreeMap;

use serde_json::Value;

/// azure.json's key for the kubelet identity's client ID.
pub const KUBELET_CLIENT_ID_KEY: &str = "userAssignedIdentityID";

/// Why azure.json could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AzureJsonError {
    /// Not a YAML or JSON object.
    #[error("not a JSON or YAML object: {0}")]
    Syntax(String),
    /// A key holds a value of another type.
    #[error("{key}: expected a {expected}, got {got}")]
    WrongType {
        /// The key as asked for.
        key: String,
        /// `string` or `boolean`.
        expected: &'static str,
        /// The value found, as JSON.
        got: String,
    },
}

/// A parsed azure.json: its top-level keys, lower-cased.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AzureJson {
    keys: BTreeMap<String, Value>,
}

impl AzureJson {
    /// Parses the file's contents. An empty file is an error: it says
    /// nothing, not even that a key is absent.
    pub fn parse(text: &str) -> Result<Self, AzureJsonError> {
        if text.trim().is_empty() {
            return Err(AzureJsonError::Syntax("the file is empty".into()));
        }
        let map: BTreeMap<String, Value> =
            serde_saphyr::from_str(text).map_err(|e| AzureJsonError::Syntax(e.to_string()))?;
        Ok(AzureJson {
            keys: map
                .into_iter()
                .map(|(k, v)| (k.to_lowercase(), v))
                .collect(),
        })
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.keys.get(&key.to_lowercase()).filter(|v| !v.is_null())
    }

    fn wrong_type(key: &str, expected: &'static str, got: &Value) -> AzureJsonError {
        AzureJsonError::WrongType {
            key: key.into(),
            expected,
            got: got.to_string(),
        }
    }

    /// The string at `key`, as written (empty when absent or null).
    pub fn string(&self, key: &str) -> Result<String, AzureJsonError> {
        match self.get(key) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(Self::wrong_type(key, "string", other)),
        }
    }

    /// The boolean at `key` (false when absent or null).
    pub fn boolean(&self, key: &str) -> Result<bool, AzureJsonError> {
        match self.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(Self::wrong_type(key, "boolean", other)),
        }
    }

    /// The kubelet identity's client ID ([`KUBELET_CLIENT_ID_KEY`]), trimmed;
    /// `None` when absent, null or blank.
    pub fn kubelet_client_id(&self) -> Result<Option<String>, AzureJsonError> {
        let id = self.string(KUBELET_CLIENT_ID_KEY)?;
        let id = id.trim();
        Ok((!id.is_empty()).then(|| id.to_string()))
    }
}

/// `--immutable-user-msis`: comma-separated client IDs, each trimmed and
/// lower-cased, blank entries dropped (as upstream loads the flag). Any
/// other text is kept: a client ID is compared, never parsed.
pub fn client_id_list(flag: &str) -> Vec<String> {
    flag.split(',')
        .map(|c| c.trim().to_lowercase())
        .filter(|c| !c.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_lists() {
        let cases: &[(&str, &[&str])] = &[
            ("", &[]),
            (",", &[]),
            (" , ,", &[]),
            ("aaaa-1", &["aaaa-1"]),
            ("AAAA-1,bbbb-2", &["aaaa-1", "bbbb-2"]),
            (" aaaa-1 , ,BBBB-2,", &["aaaa-1", "bbbb-2"]),
            ("a,a", &["a", "a"]),
        ];
        for (flag, want) in cases {
            assert_eq!(client_id_list(flag), *want, "{flag:?}");
        }
    }

    #[test]
    fn kubelet_client_ids() {
        let cases: &[(&str, Result<Option<&str>, &str>)] = &[
            (
                r#"{"cloud":"AzurePublicCloud","userAssignedIdentityID":"kubelet-id"}"#,
                Ok(Some("kubelet-id")),
            ),
            (
                r#"{"userassignedidentityid":" Kubelet-ID "}"#,
                Ok(Some("Kubelet-ID")),
            ),
            (
                "userAssignedIdentityID: kubelet-id\n",
                Ok(Some("kubelet-id")),
            ),
            (r#"{"useManagedIdentityExtension":true}"#, Ok(None)),
            ("{}", Ok(None)),
            (r#"{"userAssignedIdentityID":""}"#, Ok(None)),
            (r#"{"userAssignedIdentityID":"  "}"#, Ok(None)),
            (r#"{"userAssignedIdentityID":null}"#, Ok(None)),
            (
                r#"{"userAssignedIdentityID":42}"#,
                Err("userAssignedIdentityID: expected a string, got 42"),
            ),
            ("not json", Err("not a JSON or YAML object")),
            ("[]", Err("not a JSON or YAML object")),
            ("{", Err("not a JSON or YAML object")),
            ("", Err("not a JSON or YAML object: the file is empty")),
            (" \n", Err("not a JSON or YAML object: the file is empty")),
        ];
        for (text, want) in cases {
            let got = AzureJson::parse(text).and_then(|j| j.kubelet_client_id());
            match (want, &got) {
                (Ok(w), Ok(g)) => assert_eq!(g.as_deref(), *w, "{text}"),
                (Err(w), Err(e)) => assert!(e.to_string().starts_with(w), "{text}: {e}"),
                _ => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn strings_and_booleans_by_key_in_any_case() {
        let j = AzureJson::parse(
            "cloud: AzureChinaCloud\ntenantID: t\nuseManagedIdentityExtension: true\nvmType: null\nmaximumLoadBalancerRuleCount: 250\n",
        )
        .unwrap();
        assert_eq!(j.string("cloud").unwrap(), "AzureChinaCloud");
        assert_eq!(j.string("tenantId").unwrap(), "t");
        assert_eq!(j.string("TENANTID").unwrap(), "t");
        assert_eq!(j.string("vmType").unwrap(), "", "null reads as empty");
        assert_eq!(j.string("absent").unwrap(), "");
        assert!(j.boolean("useManagedIdentityExtension").unwrap());
        assert!(!j.boolean("vmType").unwrap(), "null reads as false");
        assert!(!j.boolean("absent").unwrap());
        assert_eq!(
            j.string("maximumLoadBalancerRuleCount")
                .unwrap_err()
                .to_string(),
            "maximumLoadBalancerRuleCount: expected a string, got 250"
        );
        assert_eq!(
            j.boolean("cloud").unwrap_err().to_string(),
            r#"cloud: expected a boolean, got "AzureChinaCloud""#
        );
    }
}
