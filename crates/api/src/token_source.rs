//! Where the tokens of an AzureIdentity come from, chosen per identity by an
//! annotation (with a cluster-wide default given to MIC and NMI by a flag).
//!
//! - `imds`: upstream's way. MIC assigns a user-assigned identity to the
//!   pod's VMSS or VM through ARM and NMI asks the node's IMDS for its token
//!   (service principals, types 1 and 2, are read from their Secret as
//!   before).
//! - `federated`: nothing is written to ARM. NMI asks the API server for a
//!   short-lived token of the pod's own ServiceAccount, bound to the pod and
//!   for the audience `api://AzureADTokenExchange`, and exchanges it at
//!   Entra ID for the identity's token (a client assertion with the
//!   identity's client ID), through a federated identity credential whose
//!   subject is `system:serviceaccount:<namespace>:<serviceaccount>`.

use std::collections::BTreeMap;
use std::fmt;

use crate::AzureIdentity;

/// Annotation on an AzureIdentity naming its token source: `federated` or `imds`.
pub const ANNOTATION_TOKEN_SOURCE: &str = "aadpodidentity.k8s.io/token-source";
/// Audience of the ServiceAccount tokens exchanged at Entra ID, the one
/// Entra expects of a federated identity credential.
pub const FEDERATED_TOKEN_AUDIENCE: &str = "api://AzureADTokenExchange";

/// An identity's token source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TokenSource {
    /// Assigned to the node through ARM; tokens from the node's IMDS (or,
    /// for service principals, from their Secret).
    #[default]
    Imds,
    /// Federated: the pod's ServiceAccount token exchanged at Entra ID; no ARM write.
    Federated,
}

impl TokenSource {
    /// The annotation's (and flag's) value for this source.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Imds => "imds",
            TokenSource::Federated => "federated",
        }
    }

    /// The source a value names, exactly (`federated` or `imds`).
    pub fn parse(value: &str) -> Result<TokenSource, UnknownTokenSource> {
        match value {
            "imds" => Ok(TokenSource::Imds),
            "federated" => Ok(TokenSource::Federated),
            other => Err(UnknownTokenSource(other.to_string())),
        }
    }
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token-source value that is neither `federated` nor `imds`. Such an
/// identity is used by neither source: MIC assigns nothing for it and NMI
/// serves no token for it, so that a misspelt opt-in never falls back to an
/// ARM assignment the user meant to avoid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownTokenSource(pub String);

impl fmt::Display for UnknownTokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "annotation {ANNOTATION_TOKEN_SOURCE} is {:?}; the values are \"federated\" and \"imds\"",
            self.0
        )
    }
}

impl std::error::Error for UnknownTokenSource {}

/// The token source the annotations name, or `default` when they name none.
pub fn token_source_of(
    annotations: Option<&BTreeMap<String, String>>,
    default: TokenSource,
) -> Result<TokenSource, UnknownTokenSource> {
    match annotations.and_then(|a| a.get(ANNOTATION_TOKEN_SOURCE)) {
        None => Ok(default),
        Some(value) => TokenSource::parse(value),
    }
}

/// The token source of `identity` (see [`token_source_of`]).
pub fn token_source(
    identity: &AzureIdentity,
    default: TokenSource,
) -> Result<TokenSource, UnknownTokenSource> {
    token_source_of(identity.metadata.annotations.as_ref(), default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_annotation_names_the_source_and_its_absence_the_default() {
        let cases: &[(Option<&str>, TokenSource, Result<TokenSource, &str>)] = &[
            (None, TokenSource::Imds, Ok(TokenSource::Imds)),
            (None, TokenSource::Federated, Ok(TokenSource::Federated)),
            (
                Some("federated"),
                TokenSource::Imds,
                Ok(TokenSource::Federated),
            ),
            (Some("imds"), TokenSource::Federated, Ok(TokenSource::Imds)),
            // Exact values only: a misspelling is an error, not the default.
            (Some("Federated"), TokenSource::Imds, Err("Federated")),
            (Some(" federated"), TokenSource::Imds, Err(" federated")),
            (Some(""), TokenSource::Federated, Err("")),
            (
                Some("workload-identity"),
                TokenSource::Imds,
                Err("workload-identity"),
            ),
        ];
        for (value, default, want) in cases {
            let annotations = value
                .map(|v| BTreeMap::from([(ANNOTATION_TOKEN_SOURCE.to_string(), v.to_string())]));
            let got = token_source_of(annotations.as_ref(), *default);
            let want = want.map_err(|v| UnknownTokenSource(v.to_string()));
            assert_eq!(got, want, "{value:?} with default {default}");
        }
    }

    #[test]
    fn other_annotations_do_not_count() {
        let annotations = BTreeMap::from([(
            "aadpodidentity.k8s.io/Behavior".to_string(),
            "federated".to_string(),
        )]);
        assert_eq!(
            token_source_of(Some(&annotations), TokenSource::Imds),
            Ok(TokenSource::Imds)
        );
    }

    #[test]
    fn values_round_trip_and_the_error_says_what_is_accepted() {
        for source in [TokenSource::Imds, TokenSource::Federated] {
            assert_eq!(TokenSource::parse(source.as_str()), Ok(source));
        }
        let message = UnknownTokenSource("wi".into()).to_string();
        assert!(message.contains(ANNOTATION_TOKEN_SOURCE), "{message}");
        assert!(message.contains("\"federated\" and \"imds\""), "{message}");
    }
}
