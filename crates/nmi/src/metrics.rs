//! NMI's Prometheus metrics with upstream's exact names (no `_total` suffix;
//! shared/research/aad-pod-identity.md §2.8), and one of its own in the same
//! style: `aadpodidentity_nmi_identity_refused_count`.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// The metrics and their registry.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// The registry `/metrics` serves.
    pub registry: Registry,
    /// `aadpodidentity_nmi_operations_duration_seconds{operation_type,status_code,namespace,resource}`.
    pub nmi_operations: HistogramVec,
    /// `aadpodidentity_imds_operations_duration_seconds{operation_type}`.
    pub imds_operations: HistogramVec,
    /// `aadpodidentity_imds_operations_errors_count{operation_type}`.
    pub imds_errors: IntCounterVec,
    /// `aadpodidentity_kubernetes_api_operations_errors_count{operation_type}`.
    pub kubernetes_errors: IntCounterVec,
    /// Beyond upstream: `aadpodidentity_nmi_identity_refused_count{namespace,reason}`,
    /// token requests refused because of the AzureIdentity itself
    /// (`namespace` is the AzureIdentity's; `reason` one of the `REFUSED_*`).
    pub identity_refused: IntCounterVec,
}

/// `reason` when the AzureIdentity's `clientID` is not the client ID of the
/// identity IMDS returns for its `resourceID`.
pub const REFUSED_CLIENT_ID_MISMATCH: &str = "client_id_mismatch";
/// `reason` when the AzureIdentity names one of the cluster's own identities
/// (the kubelet identity or one in `--immutable-user-msis`) and
/// `--serve-cluster-identities` is off.
pub const REFUSED_CLUSTER_IDENTITY: &str = "cluster_identity";
/// `reason` when a type-0 AzureIdentity lacks `clientID` or `resourceID`.
pub const REFUSED_INCOMPLETE_IDENTITY: &str = "incomplete_identity";

/// `operation_type` of NMI's own IMDS calls (upstream's adal names).
pub const IMDS_OP_USER_ASSIGNED: &str = "adal_token_msi_userassignedid";

const NMI_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0,
    100.0,
];
const IMDS_BUCKETS: &[f64] = &[0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0];

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let nmi_operations = HistogramVec::new(
            HistogramOpts::new(
                "aadpodidentity_nmi_operations_duration_seconds",
                "Duration in seconds for nmi operations",
            )
            .buckets(NMI_BUCKETS.to_vec()),
            &["operation_type", "status_code", "namespace", "resource"],
        )?;
        let imds_operations = HistogramVec::new(
            HistogramOpts::new(
                "aadpodidentity_imds_operations_duration_seconds",
                "Duration in seconds for imds operations",
            )
            .buckets(IMDS_BUCKETS.to_vec()),
            &["operation_type"],
        )?;
        let imds_errors = IntCounterVec::new(
            Opts::new(
                "aadpodidentity_imds_operations_errors_count",
                "Count of errors in imds operations",
            ),
            &["operation_type"],
        )?;
        let kubernetes_errors = IntCounterVec::new(
            Opts::new(
                "aadpodidentity_kubernetes_api_operations_errors_count",
                "Count of errors in kubernetes api operations",
            ),
            &["operation_type"],
        )?;
        registry.register(Box::new(nmi_operations.clone()))?;
        registry.register(Box::new(imds_operations.clone()))?;
        registry.register(Box::new(imds_errors.clone()))?;
        let identity_refused = IntCounterVec::new(
            Opts::new(
                "aadpodidentity_nmi_identity_refused_count",
                "Count of token requests refused because of the AzureIdentity (client ID not the resource ID's, or missing IDs)",
            ),
            &["namespace", "reason"],
        )?;
        registry.register(Box::new(kubernetes_errors.clone()))?;
        registry.register(Box::new(identity_refused.clone()))?;
        Ok(Metrics {
            registry,
            nmi_operations,
            imds_operations,
            imds_errors,
            kubernetes_errors,
            identity_refused,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_upstreams() {
        let m = Metrics::new().unwrap();
        m.nmi_operations
            .with_label_values(&["/metadata/identity/oauth2/token", "200", "ns", "r"])
            .observe(0.1);
        m.imds_operations
            .with_label_values(&[IMDS_OP_USER_ASSIGNED])
            .observe(0.1);
        m.imds_errors
            .with_label_values(&[IMDS_OP_USER_ASSIGNED])
            .inc();
        m.kubernetes_errors
            .with_label_values(&["get_pod_list"])
            .inc();
        m.identity_refused
            .with_label_values(&["ns", REFUSED_CLIENT_ID_MISMATCH])
            .inc();
        let mut names: Vec<String> = m
            .registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "aadpodidentity_imds_operations_duration_seconds",
                "aadpodidentity_imds_operations_errors_count",
                "aadpodidentity_kubernetes_api_operations_errors_count",
                "aadpodidentity_nmi_identity_refused_count",
                "aadpodidentity_nmi_operations_duration_seconds",
            ]
        );
    }
}
