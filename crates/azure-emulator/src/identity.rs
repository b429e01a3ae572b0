//! The `identity` rules of a VM/VMSS write, as a pure function: given the
//! current identities and the request's `identity` value, decide the new
//! identities or the ARM error (the rules:
//! docs/upstream-behaviour.md#arm-identity-api).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::ArmError;
use crate::ids::{key, parse_uai_id};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityType {
    None,
    SystemAssigned,
    UserAssigned,
    SystemAndUser,
}

impl IdentityType {
    /// Case-insensitive, tolerating a missing space after the comma (the docs
    /// themselves send `userAssigned` and `SystemAssigned,UserAssigned`).
    pub fn parse(text: &str) -> Option<Self> {
        let t: String = text
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .to_ascii_lowercase();
        match t.as_str() {
            "none" => Some(Self::None),
            "systemassigned" => Some(Self::SystemAssigned),
            "userassigned" => Some(Self::UserAssigned),
            "systemassigned,userassigned" | "userassigned,systemassigned" => {
                Some(Self::SystemAndUser)
            }
            _ => None,
        }
    }

    pub fn canonical(self) -> &'static str {
        match self {
            Self::None => "None",
            Self::SystemAssigned => "SystemAssigned",
            Self::UserAssigned => "UserAssigned",
            Self::SystemAndUser => "SystemAssigned, UserAssigned",
        }
    }

    pub fn from_parts(system: bool, user: bool) -> Self {
        match (system, user) {
            (false, false) => Self::None,
            (true, false) => Self::SystemAssigned,
            (false, true) => Self::UserAssigned,
            (true, true) => Self::SystemAndUser,
        }
    }

    fn system(self) -> bool {
        matches!(self, Self::SystemAssigned | Self::SystemAndUser)
    }
    fn user(self) -> bool {
        matches!(self, Self::UserAssigned | Self::SystemAndUser)
    }
}

/// PATCH merges the UAI map; PUT replaces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    Patch,
    Put,
}

/// The outcome of a valid request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdentityPlan {
    pub system: bool,
    /// Final UAIs: lower-cased ID -> ID as the request (or the store) spelled it.
    pub user: BTreeMap<String, String>,
    /// IDs newly assigned by this request (as spelled in the request).
    pub added: Vec<String>,
    /// Lower-cased IDs removed by this request.
    pub removed: Vec<String>,
}

/// Limits the rules need.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_request: usize,
    pub per_resource: Option<usize>,
}

/// Decides the identities after a write. `identity` is the request's
/// `identity` member (`None` when absent: identities are kept).
/// `exists(lower_id)` tells whether a UAI exists.
pub fn plan(
    mode: WriteMode,
    resource_id: &str,
    current_system: bool,
    current_user: &BTreeMap<String, String>,
    identity: Option<&Value>,
    limits: Limits,
    exists: impl Fn(&str) -> bool,
) -> Result<IdentityPlan, ArmError> {
    let unchanged = IdentityPlan {
        system: current_system,
        user: current_user.clone(),
        ..IdentityPlan::default()
    };
    let identity = match identity {
        None | Some(Value::Null) => {
            return Ok(match mode {
                WriteMode::Patch => unchanged,
                // A PUT without identity leaves the resource with none.
                WriteMode::Put => IdentityPlan {
                    removed: current_user.keys().cloned().collect(),
                    ..IdentityPlan::default()
                },
            });
        }
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(ArmError::invalid_content(
                "Unexpected character encountered while parsing value. Path 'identity'.",
            ));
        }
    };
    let ty = match identity.get("type") {
        None | Some(Value::Null) => {
            return Err(ArmError::invalid_content(
                "Required property 'type' not found in JSON. Path 'identity'.",
            ));
        }
        Some(Value::String(s)) => IdentityType::parse(s).ok_or_else(|| {
            ArmError::invalid_content(format!(
                "Requested value '{s}' was not found. Path 'identity.type'."
            ))
        })?,
        Some(_) => {
            return Err(ArmError::invalid_content(
                "Unexpected character encountered while parsing value. Path 'identity.type'.",
            ));
        }
    };

    // Request map entries: (as spelled, Some(true) = assign, Some(false) = remove).
    let mut entries: Vec<(String, bool)> = Vec::new();
    match identity.get("userAssignedIdentities") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            let mut seen = BTreeMap::new();
            for (id, value) in map {
                let assign = match value {
                    Value::Null => false,
                    Value::Object(v) => {
                        let echoed = ["principalId", "clientId"]
                            .iter()
                            .any(|f| v.get(*f).is_some_and(|x| !x.is_null() && x != ""));
                        if echoed {
                            // Read-only values echoed back: ARM refuses them
                            // (seen in kubernetes/autoscaler#1592).
                            return Err(ArmError::new(
                                400,
                                "InvalidIdentityValues",
                                format!(
                                    "Invalid value for the identities '{id}'. The 'UserAssignedIdentities' property keys should only be empty json objects, null or the resource exisiting property."
                                ),
                            ));
                        }
                        true
                    }
                    _ => {
                        return Err(ArmError::invalid_content(format!(
                            "Unexpected character encountered while parsing value. Path 'identity.userAssignedIdentities['{id}']'."
                        )));
                    }
                };
                if parse_uai_id(id).is_none() {
                    return Err(ArmError::new(
                        400,
                        "LinkedInvalidPropertyId",
                        format!(
                            "Property id '{id}' at path 'identity.userAssignedIdentities' is invalid. Expect fully qualified resource Id that start with '/subscriptions/{{subscriptionId}}' or '/providers/{{resourceProviderNamespace}}/'."
                        ),
                    ));
                }
                if seen.insert(key(id), ()).is_some() {
                    // Same identity twice, differing only in case (aad-pod-identity#556);
                    // the exact code is unknown.
                    return Err(ArmError::new(
                        400,
                        "InvalidParameter",
                        format!("The user assigned identity '{id}' is specified more than once in the request."),
                    )
                    .target("identity.userAssignedIdentities"));
                }
                entries.push((id.clone(), assign));
            }
        }
        Some(_) => {
            return Err(ArmError::invalid_content(
                "Unexpected character encountered while parsing value. Path 'identity.userAssignedIdentities'.",
            ));
        }
    }
    let assigning = entries.iter().filter(|(_, a)| *a).count();

    if !ty.user() && assigning > 0 {
        // UAIs with a type that has no user part (seen in
        // Azure/aad-pod-identity#214).
        return Err(ArmError::new(
            400,
            "InvalidParameter",
            format!(
                "ResourceIdentity identityIds should not be provided if the type is \"{}\".",
                ty.canonical()
            ),
        )
        .target("resourceIdentity.identityIds"));
    }

    if entries.len() > limits.per_request {
        // More than ARM takes in one request (seen in Azure/bicep#16559).
        return Err(failed_identity_operation(
            resource_id,
            &format!(
                "User Assigned Identities Number '{}' Assign exceed limit '{}' in one request.",
                entries.len(),
                limits.per_request
            ),
        ));
    }

    if let Some((id, _)) = entries.iter().find(|(id, a)| *a && !exists(&key(id))) {
        // The inner message lower-cases the ID (aad-pod-identity#515); MIC parses it.
        let inner = format!(
            "Failed to perform resource identity operation. Status: 'BadRequest'. Response: '{{\"error\":{{\"code\":\"BadRequest\",\"message\":\"Resource '{}' was not found.\"}}}}'.",
            id.to_ascii_lowercase()
        );
        return Err(failed_identity_operation(resource_id, &inner));
    }

    let mut user: BTreeMap<String, String> = if ty.user() {
        match mode {
            WriteMode::Patch => current_user.clone(),
            WriteMode::Put => BTreeMap::new(),
        }
    } else {
        BTreeMap::new()
    };
    if ty.user() {
        for (id, assign) in &entries {
            let k = key(id);
            if *assign {
                // Keep the stored spelling for an identity that is already there.
                let spelled = current_user.get(&k).cloned().unwrap_or_else(|| id.clone());
                user.insert(k, spelled);
            } else {
                user.remove(&k);
            }
        }
        if user.is_empty() {
            // Message observed (microsoft/CromwellOnAzure#765); code assumed.
            return Err(ArmError::new(
                400,
                "InvalidParameter",
                "The identity ids must not be null or empty for 'UserAssigned' identity type.",
            )
            .target("identity.userAssignedIdentities"));
        }
        if let Some(cap) = limits.per_resource.filter(|cap| user.len() > *cap) {
            return Err(failed_identity_operation(
                resource_id,
                &format!(
                    "User Assigned Identities Number '{}' exceed limit '{cap}' for the resource.",
                    user.len()
                ),
            ));
        }
    }

    let added = user
        .iter()
        .filter(|(k, _)| !current_user.contains_key(*k))
        .map(|(_, v)| v.clone())
        .collect();
    let removed = current_user
        .keys()
        .filter(|k| !user.contains_key(*k))
        .cloned()
        .collect();
    Ok(IdentityPlan {
        system: ty.system(),
        user,
        added,
        removed,
    })
}

/// 400 `FailedIdentityOperation` with ARM's wrapper text (`Identity operation
/// for resource '<id>' failed with error '<inner>'.`).
pub fn failed_identity_operation(resource_id: &str, inner: &str) -> ArmError {
    ArmError::new(
        400,
        "FailedIdentityOperation",
        format!("Identity operation for resource '{resource_id}' failed with error '{inner}'."),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const R: &str =
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/v";
    const LIM: Limits = Limits {
        per_request: 150,
        per_resource: None,
    };

    fn uai(n: &str) -> String {
        format!(
            "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{n}"
        )
    }

    fn cur(names: &[&str]) -> BTreeMap<String, String> {
        names.iter().map(|n| (key(&uai(n)), uai(n))).collect()
    }

    fn run(
        mode: WriteMode,
        sys: bool,
        names: &[&str],
        body: Value,
    ) -> Result<IdentityPlan, ArmError> {
        plan(mode, R, sys, &cur(names), body.get("identity"), LIM, |k| {
            !k.ends_with("/missing")
        })
    }

    #[test]
    fn types_parse_loosely_and_print_canonically() {
        for (text, ty) in [
            ("userAssigned", IdentityType::UserAssigned),
            ("SystemAssigned,UserAssigned", IdentityType::SystemAndUser),
            ("systemassigned, userassigned", IdentityType::SystemAndUser),
            ("NONE", IdentityType::None),
        ] {
            assert_eq!(IdentityType::parse(text), Some(ty), "{text}");
        }
        assert_eq!(
            IdentityType::SystemAndUser.canonical(),
            "SystemAssigned, UserAssigned"
        );
        assert_eq!(IdentityType::parse("Managed"), None);
    }

    #[test]
    fn patch_adds_with_empty_object_removes_with_null_keeps_absent() {
        let p = run(
            WriteMode::Patch,
            false,
            &["a", "b"],
            json!({"identity":{"type":"UserAssigned","userAssignedIdentities":{ (uai("c")): {}, (uai("a").to_uppercase().replace("/SUBSCRIPTIONS/S", "/subscriptions/s")): null }}}),
        )
        .expect("ok");
        assert_eq!(
            p.user.keys().cloned().collect::<Vec<_>>(),
            vec![key(&uai("b")), key(&uai("c"))]
        );
        assert_eq!(p.added, vec![uai("c")]);
        assert_eq!(p.removed, vec![key(&uai("a"))]);
        assert!(!p.system);
    }

    #[test]
    fn absent_identity_keeps_everything_on_patch() {
        let p = run(WriteMode::Patch, true, &["a"], json!({"tags":{}})).expect("ok");
        assert!(p.system);
        assert_eq!(p.user.len(), 1);
        assert!(p.added.is_empty() && p.removed.is_empty());
    }

    #[test]
    fn put_replaces_the_map() {
        let p = run(
            WriteMode::Put,
            false,
            &["a", "b"],
            json!({"identity":{"type":"UserAssigned","userAssignedIdentities":{ (uai("b")): {} }}}),
        )
        .expect("ok");
        assert_eq!(p.user.len(), 1);
        assert_eq!(p.removed, vec![key(&uai("a"))]);
    }

    #[test]
    fn none_and_system_assigned_transitions() {
        // (type sent to a resource with a system identity and UAI "a",
        // system identity after, UAIs after)
        let cases = [
            ("None", false, 0),
            ("SystemAssigned", true, 0),
            // Sending UserAssigned to a resource with a system identity drops it.
            ("UserAssigned", false, 1),
        ];
        for (ty, system, users) in cases {
            let p = run(
                WriteMode::Patch,
                true,
                &["a"],
                json!({"identity":{"type": ty}}),
            )
            .expect("ok");
            assert_eq!((p.system, p.user.len()), (system, users), "{ty}");
        }
    }

    #[test]
    fn errors_match_the_contract() {
        let cases: Vec<(Value, u16, &str, &str)> = vec![
            (
                json!({"identity":{"userAssignedIdentities":{}}}),
                400,
                "InvalidRequestContent",
                "Required property 'type' not found in JSON. Path 'identity'.",
            ),
            (
                json!({"identity":{"type":"Bogus"}}),
                400,
                "InvalidRequestContent",
                "Bogus",
            ),
            (
                json!({"identity":{"type":"SystemAssigned","userAssignedIdentities":{ (uai("x")): {} }}}),
                400,
                "InvalidParameter",
                "should not be provided",
            ),
            (
                json!({"identity":{"type":"UserAssigned","userAssignedIdentities":{ (uai("a")): null }}}),
                400,
                "InvalidParameter",
                "must not be null or empty",
            ),
            (
                json!({"identity":{"type":"UserAssigned","userAssignedIdentities":{ (uai("x")): {"principalId":"p","clientId":"c"} }}}),
                400,
                "InvalidIdentityValues",
                "Invalid value for the identities",
            ),
            (
                json!({"identity":{"type":"UserAssigned","userAssignedIdentities":{ "not-an-id": {} }}}),
                400,
                "LinkedInvalidPropertyId",
                "not-an-id",
            ),
            (
                json!({"identity":{"type":"UserAssigned","userAssignedIdentities":{ (uai("x")): {}, (uai("X")): {} }}}),
                400,
                "InvalidParameter",
                "more than once",
            ),
            (
                json!({"identity":"UserAssigned"}),
                400,
                "InvalidRequestContent",
                "Path 'identity'",
            ),
        ];
        for (body, status, code, text) in cases {
            let e = run(WriteMode::Patch, false, &["a"], body.clone()).expect_err("must fail");
            assert_eq!((e.status, e.code.as_str()), (status, code), "{body}");
            assert!(
                e.message.contains(text),
                "{} does not contain {text}",
                e.message
            );
        }
    }

    #[test]
    fn unknown_identity_is_reported_lower_cased_in_single_quotes() {
        let id = "/subscriptions/S/resourceGroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/Missing";
        let e = run(
            WriteMode::Patch,
            false,
            &[],
            json!({"identity":{"type":"UserAssigned","userAssignedIdentities":{ (id): {} }}}),
        )
        .expect_err("fails");
        assert_eq!(e.code, "FailedIdentityOperation");
        assert!(e.message.starts_with(&format!(
            "Identity operation for resource '{R}' failed with error '"
        )));
        assert!(
            e.message.contains(&format!(
                "Resource '{}' was not found.",
                id.to_ascii_lowercase()
            )),
            "{}",
            e.message
        );
    }

    #[test]
    fn more_than_150_per_request_is_rejected() {
        let map: serde_json::Map<String, Value> = (0..151)
            .map(|i| (uai(&format!("i{i}")), json!({})))
            .collect();
        let e = run(
            WriteMode::Patch,
            false,
            &[],
            json!({"identity":{"type":"UserAssigned","userAssignedIdentities": map}}),
        )
        .expect_err("fails");
        assert_eq!(e.code, "FailedIdentityOperation");
        assert!(e.message.contains(
            "User Assigned Identities Number '151' Assign exceed limit '150' in one request."
        ));
        let map: serde_json::Map<String, Value> = (0..150)
            .map(|i| (uai(&format!("i{i}")), json!({})))
            .collect();
        assert!(
            run(
                WriteMode::Patch,
                false,
                &[],
                json!({"identity":{"type":"UserAssigned","userAssignedIdentities": map}})
            )
            .is_ok()
        );
    }
}
