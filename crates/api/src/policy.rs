//! The identity policy: which Azure identities the AzureIdentities of a
//! namespace may name. A cluster administrator grants identities to a
//! namespace with the Namespace annotation [`ANNOTATION_ALLOWED_IDENTITIES`];
//! its value is a comma-separated list of patterns:
//!
//! - a full user-assigned identity resource ID grants exactly that identity;
//! - a pattern ending in `*` grants every resource ID that starts with the
//!   text before the `*` (for example a whole resource group:
//!   `/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/*`);
//! - `*` alone grants every identity.
//!
//! Comparison ignores ASCII case (ARM resource IDs are case-insensitive) and
//! blanks around each pattern; empty patterns grant nothing, and a `*`
//! anywhere but at the end is taken literally. A namespace without the
//! annotation is granted nothing. The chart's ValidatingAdmissionPolicy
//! implements the same rule in CEL; MIC applies this function at run time.

use std::fmt;
use std::str::FromStr;

/// Namespace annotation that lists the identity resource IDs its
/// AzureIdentities may name (see the module documentation for the form).
pub const ANNOTATION_ALLOWED_IDENTITIES: &str = "aadpodidentity.k8s.io/allowed-identities";

/// How the identity policy is applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PolicyMode {
    /// Not checked (upstream's behaviour).
    #[default]
    Off,
    /// Checked and reported (admission warning, Event, log), never refused.
    Warn,
    /// Checked and refused: an identity not granted to its namespace is never assigned.
    Enforce,
}

impl PolicyMode {
    /// The flag and chart spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyMode::Off => "off",
            PolicyMode::Warn => "warn",
            PolicyMode::Enforce => "enforce",
        }
    }
}

impl fmt::Display for PolicyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A mode spelled other than `off`, `warn` or `enforce`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsePolicyModeError(pub String);

impl fmt::Display for ParsePolicyModeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "identity policy mode {:?} is not one of off, warn, enforce",
            self.0
        )
    }
}

impl std::error::Error for ParsePolicyModeError {}

impl FromStr for PolicyMode {
    type Err = ParsePolicyModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(PolicyMode::Off),
            "warn" => Ok(PolicyMode::Warn),
            "enforce" => Ok(PolicyMode::Enforce),
            other => Err(ParsePolicyModeError(other.to_string())),
        }
    }
}

/// Whether the annotation value `granted` (absent: nothing granted) lets an
/// AzureIdentity name `resource_id`. Pure.
pub fn identity_granted(granted: Option<&str>, resource_id: &str) -> bool {
    let Some(granted) = granted else {
        return false;
    };
    let id = resource_id.trim().to_ascii_lowercase();
    if id.is_empty() {
        return false;
    }
    granted.split(',').any(|pattern| {
        let pattern = pattern.trim().to_ascii_lowercase();
        match pattern.strip_suffix('*') {
            Some(prefix) => id.starts_with(prefix),
            None => !pattern.is_empty() && id == pattern,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RG: &str = "/subscriptions/s1/resourceGroups/rg-a/providers/Microsoft.ManagedIdentity/userAssignedIdentities/";

    #[test]
    fn grants_table() {
        let id = format!("{RG}app");
        let cases: &[(Option<&str>, &str, bool)] = &[
            (None, &id, false),
            (Some(""), &id, false),
            (Some(" , "), &id, false),
            (Some("*"), &id, true),
            (Some(" * "), &id, true),
            (Some(&id), &id, true),
            // case and blanks do not matter
            (Some(&format!("  {}  ", id.to_uppercase())), &id, true),
            (Some(&format!("{RG}*")), &id, true),
            (Some(&format!("{RG}ap*")), &id, true),
            (Some(&format!("{RG}other, {RG}app")), &id, true),
            // exact entries are exact: no prefix match without '*'
            (Some(&format!("{RG}ap")), &id, false),
            (Some(&format!("{RG}app2")), &id, false),
            // '*' only counts at the end
            (Some(&format!("{RG}*pp")), &id, false),
            (Some("/subscriptions/s1/resourceGroups/rg-b/*"), &id, false),
            // an empty resource ID is never granted
            (Some("*"), "", false),
        ];
        for (granted, rid, want) in cases {
            assert_eq!(identity_granted(*granted, rid), *want, "{granted:?} {rid}");
        }
    }

    #[test]
    fn modes_parse_and_print() {
        for m in [PolicyMode::Off, PolicyMode::Warn, PolicyMode::Enforce] {
            assert_eq!(m.as_str().parse::<PolicyMode>(), Ok(m));
        }
        assert!("Enforce".parse::<PolicyMode>().is_err());
        assert!("".parse::<PolicyMode>().is_err());
        assert_eq!(PolicyMode::default(), PolicyMode::Off);
    }
}
