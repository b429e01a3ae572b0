//! The CustomResourceDefinitions, generated from the Rust types.
//!
//! `crdgen` writes [`files`] into the repository; a test compares them with
//! what is committed, so the YAML cannot drift from the types.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::Value;

use crate::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException,
};

/// Folder of the per-kind CRD files, relative to the repository root.
pub const CRD_DIR: &str = "crds";
/// The chart's copy (one file, as upstream's chart has), relative to the repository root.
pub const CHART_CRD_FILE: &str = "charts/aad-pod-identity/crds/crd.yaml";

/// The four CRDs, adjusted to upstream's shape:
///
/// - no `/status` subresource: upstream MIC writes `status.status` through the
///   main resource, and keeping that lets the Go and Rust releases replace each
///   other in either direction;
/// - no `required` and no `default` anywhere: upstream's schemas declare
///   neither, so a manifest accepted before is still accepted and stored as written;
/// - a `metadata` object in every `spec` and `status`, of each kind and of the
///   objects an AzureAssignedIdentity embeds ([`keep_go_metadata`]).
pub fn all_crds() -> Result<Vec<CustomResourceDefinition>, serde_json::Error> {
    [
        AzureIdentity::crd(),
        AzureIdentityBinding::crd(),
        AzureAssignedIdentity::crd(),
        AzurePodIdentityException::crd(),
    ]
    .into_iter()
    .map(|mut crd| {
        for version in &mut crd.spec.versions {
            version.subresources = None;
            if let Some(validation) = version.schema.as_mut() {
                let schema = serde_json::to_value(validation.open_api_v3_schema.take())?;
                let mut schema = strip_validation(schema);
                keep_go_metadata(&mut schema, true);
                validation.open_api_v3_schema = serde_json::from_value(schema)?;
            }
        }
        Ok(crd)
    })
    .collect()
}

/// Removes `required` and `default` from a schema and all its subschemas.
fn strip_validation(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        map.remove("required");
        map.remove("default");
        for (key, child) in map.iter_mut() {
            match (key.as_str(), child) {
                // Keys of `properties` are field names, not keywords.
                ("properties", Value::Object(fields)) => {
                    for field in fields.values_mut() {
                        *field = strip_validation(field.take());
                    }
                }
                ("items" | "additionalProperties", sub @ Value::Object(_)) => {
                    *sub = strip_validation(sub.take());
                }
                ("allOf" | "anyOf" | "oneOf", Value::Array(subs)) => {
                    for sub in subs {
                        *sub = strip_validation(sub.take());
                    }
                }
                _ => {}
            }
        }
    }
    schema
}

/// Upstream's Go types embed an `ObjectMeta` in every spec and status, so
/// its MIC writes `spec.metadata` and `status.metadata` (`{"creationTimestamp":
/// null}`) in each AzureAssignedIdentity and in the AzureIdentity and binding
/// it embeds, and its type upgrade writes them into identities and bindings.
/// Upstream's schemas declare them; without them the API server would prune
/// what Go MIC wrote. This declares `metadata` in the `spec` and `status` of
/// `schema` (a kind's root when `root`) and of every embedded resource below
/// it, kept as written (`x-kubernetes-preserve-unknown-fields`). Nothing
/// reads it; no other field is loosened.
fn keep_go_metadata(schema: &mut Value, root: bool) {
    let Value::Object(map) = schema else {
        return;
    };
    let embedded = map
        .get("x-kubernetes-embedded-resource")
        .is_some_and(|v| v == &Value::Bool(true));
    if let Some(Value::Object(props)) = map.get_mut("properties") {
        if root || embedded {
            for part in ["spec", "status"] {
                if let Some(Value::Object(part)) = props.get_mut(part)
                    && let Some(Value::Object(fields)) = part.get_mut("properties")
                {
                    fields.insert("metadata".into(), go_metadata_schema());
                }
            }
        }
        for child in props.values_mut() {
            keep_go_metadata(child, false);
        }
    }
}

fn go_metadata_schema() -> Value {
    serde_json::json!({
        "description": "Written by upstream's Go MIC (its types carry an empty ObjectMeta here); kept as written, never read.",
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// Renders one CRD as a YAML document with a header saying where it comes from.
pub fn render(crd: &CustomResourceDefinition) -> Result<String, serde_saphyr::SerializeError> {
    Ok(format!("{HEADER}{}", serde_saphyr::to_string(crd)?))
}

const HEADER: &str =
    "# Generated by `cargo run -p aadpodid-api --bin crdgen` from crates/api; do not edit.\n";

/// Every generated file: (path relative to the repository root, contents).
pub fn files() -> Result<Vec<(String, String)>, Box<dyn std::error::Error>> {
    let crds = all_crds()?;
    let mut out = Vec::with_capacity(crds.len() + 1);
    let mut chart = String::new();
    for crd in &crds {
        let name = crd.metadata.name.as_deref().unwrap_or_default();
        let text = render(crd)?;
        if !chart.is_empty() {
            chart.push_str("---\n");
        }
        chart.push_str(&text);
        out.push((format!("{CRD_DIR}/{name}.yaml"), text));
    }
    out.push((CHART_CRD_FILE.to_string(), chart));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema_of(kind: &str) -> Value {
        let crd = all_crds()
            .unwrap()
            .into_iter()
            .find(|c| c.spec.names.kind == kind)
            .unwrap();
        let schema = crd.spec.versions[0]
            .schema
            .clone()
            .unwrap()
            .open_api_v3_schema
            .unwrap();
        serde_json::to_value(schema).unwrap()
    }

    #[test]
    fn upstream_field_names_are_in_the_schemas() {
        let id = schema_of("AzureIdentity");
        let props = &id["properties"]["spec"]["properties"];
        for f in [
            "type",
            "resourceID",
            "clientID",
            "clientPassword",
            "tenantID",
            "auxiliaryTenantIDs",
            "adEndpoint",
            "adResourceID",
            "replicas",
        ] {
            assert!(props.get(f).is_some(), "AzureIdentity spec lacks {f}");
        }
        assert_eq!(props["type"]["type"], "integer");
        assert_eq!(props["type"]["maximum"], 2.0);

        let aai = schema_of("AzureAssignedIdentity");
        let spec = &aai["properties"]["spec"]["properties"];
        assert_eq!(
            spec["azureIdentityRef"]["x-kubernetes-embedded-resource"],
            true
        );
        assert_eq!(
            spec["azureBindingRef"]["x-kubernetes-embedded-resource"],
            true
        );
        assert!(spec["nodename"].is_object());
        assert!(aai["properties"]["status"]["properties"]["status"].is_object());
    }

    /// Every `spec` and `status` Go MIC writes a `metadata` into declares one
    /// that keeps what it holds; no other schema has it.
    #[test]
    fn go_metadata_is_declared_where_go_writes_it() {
        let go_meta =
            |v: &Value| v["type"] == "object" && v["x-kubernetes-preserve-unknown-fields"] == true;
        for kind in [
            "AzureIdentity",
            "AzureIdentityBinding",
            "AzureAssignedIdentity",
            "AzurePodIdentityException",
        ] {
            let s = schema_of(kind);
            for part in ["spec", "status"] {
                assert!(
                    go_meta(&s["properties"][part]["properties"]["metadata"]),
                    "{kind} {part}"
                );
            }
        }
        let aai = schema_of("AzureAssignedIdentity");
        let spec = &aai["properties"]["spec"]["properties"];
        for embedded in ["azureIdentityRef", "azureBindingRef"] {
            for part in ["spec", "status"] {
                assert!(
                    go_meta(&spec[embedded]["properties"][part]["properties"]["metadata"]),
                    "{embedded} {part}"
                );
            }
            // The embedded object itself stays checked and pruned as before.
            assert_eq!(spec[embedded]["x-kubernetes-embedded-resource"], true);
            assert!(
                spec[embedded]
                    .get("x-kubernetes-preserve-unknown-fields")
                    .is_none()
            );
        }
        // Only those: the clientPassword object, say, gets none.
        let text = serde_json::to_string(&aai).unwrap();
        assert_eq!(
            text.matches("x-kubernetes-preserve-unknown-fields").count(),
            6
        );
        assert!(
            spec["azureIdentityRef"]["properties"]["spec"]["properties"]["clientPassword"]
                ["properties"]
                .get("metadata")
                .is_none()
        );
    }

    #[test]
    fn nothing_is_required_and_no_status_subresource() {
        for crd in all_crds().unwrap() {
            let v = serde_json::to_string(&crd).unwrap();
            let kind = &crd.spec.names.kind;
            assert!(
                !v.contains("\"required\""),
                "{kind} declares required fields"
            );
            assert!(!v.contains("\"default\""), "{kind} declares defaults");
            assert!(crd.spec.versions.iter().all(|v| v.subresources.is_none()));
            assert_eq!(crd.spec.scope, "Namespaced");
            assert_eq!(
                crd.metadata.annotations.unwrap()["api-approved.kubernetes.io"],
                "unapproved"
            );
        }
    }
}
