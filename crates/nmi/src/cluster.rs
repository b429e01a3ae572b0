//! The cluster's own identities: the kubelet identity (azure.json's
//! `userAssignedIdentityID`) and every client ID in `--immutable-user-msis`.
//! Such an identity has rights over the cluster's resources, so NMI never
//! hands its token to a pod unless `--serve-cluster-identities` is set, in
//! either operation mode. This is a second line behind MIC (which does not
//! mark such an AzureAssignedIdentity Assigned) and the only one in managed
//! mode, where no MIC runs: an AzureIdentity naming the kubelet identity's
//! resource ID and client ID would otherwise get its token.
//!
//! The decision is [`ClusterIdentities::refused`]: a client ID matches,
//! ignoring case, before IMDS is asked (the AzureIdentity's `clientID`) and
//! after (IMDS's `client_id` and the token's `appid`/`azp`). Excepted pods
//! and MIC's own pods are not affected: their requests go to IMDS unchanged.

use std::collections::BTreeSet;
use std::path::Path;

use aadpodid_runtime::azure_json::{self, AzureJson};

/// Client IDs NMI never serves to pods unless told to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterIdentities {
    /// Lower-cased, trimmed, non-empty.
    client_ids: BTreeSet<String>,
    /// `--serve-cluster-identities`.
    serve: bool,
}

impl ClusterIdentities {
    /// The cluster identities `client_ids` (any case, blanks ignored);
    /// `serve` lets pods have them anyway.
    pub fn new<I, S>(client_ids: I, serve: bool) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        ClusterIdentities {
            client_ids: client_ids
                .into_iter()
                .map(|c| c.as_ref().trim().to_ascii_lowercase())
                .filter(|c| !c.is_empty())
                .collect(),
            serve,
        }
    }

    /// Whether `client_id` is one of the cluster's own identities, ignoring
    /// case and surrounding blanks. An empty client ID never is.
    pub fn contains(&self, client_id: &str) -> bool {
        let c = client_id.trim();
        !c.is_empty() && self.client_ids.contains(&c.to_ascii_lowercase())
    }

    /// The first of `client_ids` that is a cluster identity NMI must not
    /// serve, or `None` (always `None` with `--serve-cluster-identities`).
    pub fn refused<'a>(&self, client_ids: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
        if self.serve {
            return None;
        }
        client_ids.into_iter().find(|c| self.contains(c))
    }

    /// How many client IDs are protected (for the startup log).
    pub fn len(&self) -> usize {
        self.client_ids.len()
    }

    /// No client ID is protected.
    pub fn is_empty(&self) -> bool {
        self.client_ids.is_empty()
    }

    /// `--serve-cluster-identities`.
    pub fn serves(&self) -> bool {
        self.serve
    }
}

/// The cluster identities from the flags: `--immutable-user-msis` and, when
/// `--cloudconfig` is set, the kubelet identity from that file (read with
/// `read`). Both are read as MIC reads them ([`azure_json`]). A file that cannot be read or parsed is not fatal: the second
/// value is the warning to log, and the flag's list alone is used.
pub fn from_flags(
    cloudconfig: &str,
    immutable_user_msis: &str,
    serve: bool,
    read: impl FnOnce(&Path) -> std::io::Result<String>,
) -> (ClusterIdentities, Option<String>) {
    let mut ids = azure_json::client_id_list(immutable_user_msis);
    let mut warning = None;
    if !cloudconfig.is_empty() {
        let kubelet = read(Path::new(cloudconfig))
            .map_err(|e| e.to_string())
            .and_then(|text| {
                AzureJson::parse(&text)
                    .and_then(|j| j.kubelet_client_id())
                    .map_err(|e| e.to_string())
            });
        match kubelet {
            Ok(Some(id)) => ids.push(id),
            Ok(None) => {}
            Err(e) => {
                warning = Some(format!(
                    "--cloudconfig={cloudconfig}: {e}; the kubelet identity is not known, only --immutable-user-msis is protected"
                ));
            }
        }
    }
    (ClusterIdentities::new(ids, serve), warning)
}

/// The cluster's tenant (azure.json's `tenantId`), the tenant of a federated
/// identity that names none; empty without `--cloudconfig` or when the file
/// cannot be read (such an identity is then refused with the fix).
pub fn tenant_from_flags(
    cloudconfig: &str,
    read: impl FnOnce(&Path) -> std::io::Result<String>,
) -> String {
    if cloudconfig.is_empty() {
        return String::new();
    }
    read(Path::new(cloudconfig))
        .ok()
        .and_then(|text| AzureJson::parse(&text).ok())
        .and_then(|j| j.string("tenantId").ok())
        .map(|t| t.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_is_a_case_insensitive_match_unless_served() {
        let cluster = ClusterIdentities::new(["KUBELET-ID", " immutable-id ", ""], false);
        let served = ClusterIdentities::new(["kubelet-id"], true);
        // (identities, client IDs seen, refused)
        let cases: &[(&ClusterIdentities, &[&str], Option<&str>)] = &[
            // Before IMDS: the AzureIdentity's clientID.
            (&cluster, &["kubelet-id"], Some("kubelet-id")),
            (&cluster, &["Kubelet-ID"], Some("Kubelet-ID")),
            (&cluster, &[" kubelet-id "], Some(" kubelet-id ")),
            (&cluster, &["IMMUTABLE-ID"], Some("IMMUTABLE-ID")),
            (&cluster, &["app-id"], None),
            (&cluster, &["kubelet"], None),
            (&cluster, &["kubelet-id-2"], None),
            (&cluster, &[""], None),
            (&cluster, &[], None),
            // After IMDS: its client_id, then the token's appid.
            (&cluster, &["app-id", "kubelet-id"], Some("kubelet-id")),
            (&cluster, &["kubelet-id", "app-id"], Some("kubelet-id")),
            (&cluster, &["app-id", "app-id"], None),
            // --serve-cluster-identities.
            (&served, &["kubelet-id"], None),
            (&served, &["app-id", "KUBELET-ID"], None),
            // Nothing protected.
            (&ClusterIdentities::default(), &["kubelet-id"], None),
        ];
        for (i, (ids, seen, want)) in cases.iter().enumerate() {
            assert_eq!(
                ids.refused(seen.iter().copied()),
                *want,
                "case {i}: {seen:?}"
            );
        }
        assert_eq!(cluster.len(), 2);
        assert!(served.contains("KUBELET-ID") && served.serves());
    }

    #[test]
    fn the_tenant_comes_from_azure_json() {
        let ok = |_: &Path| Ok(r#"{"tenantId":" T1 ","userAssignedIdentityID":"k"}"#.to_string());
        assert_eq!(tenant_from_flags("/etc/kubernetes/azure.json", ok), "T1");
        let none = |_: &Path| Ok("{}".to_string());
        assert_eq!(tenant_from_flags("/a.json", none), "");
        let garbage = |_: &Path| Ok("{".to_string());
        assert_eq!(tenant_from_flags("/a.json", garbage), "");
        assert_eq!(tenant_from_flags("", |_: &Path| panic!("not read")), "");
    }

    #[test]
    fn from_flags_reads_the_file_or_warns() {
        let azure_json = |_: &Path| Ok(r#"{"userAssignedIdentityID":"KUBELET-ID"}"#.to_string());
        let missing = |_: &Path| -> std::io::Result<String> {
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "No such file or directory",
            ))
        };
        let garbage = |_: &Path| Ok("{".to_string());
        let unread =
            |_: &Path| -> std::io::Result<String> { panic!("no --cloudconfig, nothing to read") };

        let (ids, warning) = from_flags("/etc/kubernetes/azure.json", "imm-1", false, azure_json);
        assert_eq!(ids, ClusterIdentities::new(["kubelet-id", "imm-1"], false));
        assert_eq!(warning, None);

        let (ids, warning) = from_flags("", "imm-1,IMM-2", true, unread);
        assert_eq!(ids, ClusterIdentities::new(["imm-1", "imm-2"], true));
        assert_eq!(warning, None);

        for read in [missing as fn(&Path) -> std::io::Result<String>, garbage] {
            let (ids, warning) = from_flags("/etc/kubernetes/azure.json", "imm-1", false, read);
            assert_eq!(ids, ClusterIdentities::new(["imm-1"], false));
            let warning = warning.unwrap_or_default();
            assert!(
                warning.contains("/etc/kubernetes/azure.json")
                    && warning.contains("only --immutable-user-msis"),
                "{warning}"
            );
        }
    }
}
