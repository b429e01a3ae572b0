//! NMI's Prometheus metrics with upstream's exact names (prefix
//! `aadpodidentity_`, no `_total` suffix), and some of its own in the same
//! style: `aadpodidentity_nmi_identity_refused_count`, the refusals of the
//! bounds (`aadpodidentity_nmi_connections_refused_count`,
//! `aadpodidentity_nmi_requests_refused_count`) and gauges of what NMI holds.
//! Every label has a bounded set of values: constants, namespaces of pods on
//! the node, and at most [`MAX_RESOURCE_LABELS`] distinct `resource` values.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use aadpodid_api::{AzureIdentity, IdentityType, TokenSource, token_source};
use aadpodid_runtime::metrics::Registrar;
use prometheus::{HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Registry};

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
    /// `aadpodidentity_nmi_connections_refused_count{reason}`: connections
    /// closed at once because of `--max-connections` (`max_connections`) or
    /// `--max-connections-per-ip` (`max_connections_per_ip`).
    pub connections_refused: IntCounterVec,
    /// `aadpodidentity_nmi_requests_refused_count{reason}`: requests refused
    /// by a bound (`reason` one of the `REQUEST_REFUSED_*`).
    pub requests_refused: IntCounterVec,
    /// `aadpodidentity_nmi_connections`: open connections.
    pub connections: IntGauge,
    /// `aadpodidentity_nmi_token_cache_entries`: entries in the token cache.
    pub token_cache_entries: IntGauge,
    /// `aadpodidentity_nmi_imds_fetches{state}`: IMDS calls `waiting` for a
    /// start slot and `in_flight`.
    pub imds_fetches: IntGaugeVec,
    resource_labels: Arc<Mutex<HashSet<String>>>,
}

/// Distinct `resource` label values kept; later ones are reported as
/// [`RESOURCE_LABEL_OTHER`], so a pod asking for endless distinct resources
/// cannot grow the metrics without bound.
pub const MAX_RESOURCE_LABELS: usize = 256;
/// The `resource` label beyond [`MAX_RESOURCE_LABELS`].
pub const RESOURCE_LABEL_OTHER: &str = "other";

/// `reason`: a token request (or proxied GET) declared a body, or a forwarded
/// body was too large.
pub const REQUEST_REFUSED_BODY: &str = "body";
/// `reason`: a forwarded body did not arrive in time.
pub const REQUEST_REFUSED_BODY_TIMEOUT: &str = "body_timeout";
/// `reason`: the pod already had `--max-pending-fetches-per-pod` IMDS calls
/// waiting (answered 429).
pub const REQUEST_REFUSED_PENDING_FETCHES: &str = "pending_fetches";
/// `reason`: the caches did not sync within `--first-sync-wait-sec`
/// (answered 503).
pub const REQUEST_REFUSED_FIRST_SYNC: &str = "first_sync";

/// `reason` when the AzureIdentity's `clientID` is not the client ID of the
/// identity IMDS returns for its `resourceID`.
pub const REFUSED_CLIENT_ID_MISMATCH: &str = "client_id_mismatch";
/// `reason` when the AzureIdentity names one of the cluster's own identities
/// (the kubelet identity or one in `--immutable-user-msis`) and
/// `--serve-cluster-identities` is off.
pub const REFUSED_CLUSTER_IDENTITY: &str = "cluster_identity";
/// `reason` when a type-0 AzureIdentity lacks `clientID` or `resourceID`.
pub const REFUSED_INCOMPLETE_IDENTITY: &str = "incomplete_identity";
/// `reason` when an AzureIdentity's token-source annotation names no known
/// source.
pub const REFUSED_UNKNOWN_TOKEN_SOURCE: &str = "unknown_token_source";
/// `reason` when Entra ID refuses a federated identity's exchange (no
/// matching federated credential, wrong issuer or audience, and the like).
pub const REFUSED_FEDERATED_EXCHANGE: &str = "federated_exchange_refused";

/// `operation_type` of a user-assigned identity's token from IMDS (upstream's
/// adal name).
pub const IMDS_OP_USER_ASSIGNED: &str = "adal_token_msi_userassignedid";
/// `operation_type` of a service principal's token from Entra ID, with its
/// secret or certificate (upstream's adal name).
pub const IMDS_OP_SERVICE_PRINCIPAL: &str = "adal_token";
/// `operation_type` of a federated identity's token: the pod's
/// ServiceAccount token exchanged at Entra ID (this project's own source;
/// upstream has no such operation).
pub const IMDS_OP_FEDERATED: &str = "federated_token_exchange";

/// The `operation_type` of a token fetch for `identity` when identities
/// without the token-source annotation use `default_source`: federated
/// first (any identity type), then by type; an annotation naming no known
/// source counts as the type's.
pub fn operation_type(identity: &AzureIdentity, default_source: TokenSource) -> &'static str {
    if matches!(
        token_source(identity, default_source),
        Ok(TokenSource::Federated)
    ) {
        return IMDS_OP_FEDERATED;
    }
    match identity.spec.r#type {
        IdentityType::ServicePrincipal | IdentityType::ServicePrincipalCertificate => {
            IMDS_OP_SERVICE_PRINCIPAL
        }
        _ => IMDS_OP_USER_ASSIGNED,
    }
}

const NMI_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0,
    100.0,
];
const IMDS_BUCKETS: &[f64] = &[0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0];

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let r = Registrar(&registry);
        Ok(Metrics {
            nmi_operations: r.histogram_vec(
                "nmi_operations_duration_seconds",
                "Duration in seconds for nmi operations",
                NMI_BUCKETS,
                &["operation_type", "status_code", "namespace", "resource"],
            )?,
            imds_operations: r.histogram_vec(
                "imds_operations_duration_seconds",
                "Duration in seconds for imds operations",
                IMDS_BUCKETS,
                &["operation_type"],
            )?,
            imds_errors: r.counter_vec(
                "imds_operations_errors_count",
                "Count of errors in imds operations",
                &["operation_type"],
            )?,
            kubernetes_errors: r.counter_vec(
                "kubernetes_api_operations_errors_count",
                "Count of errors in kubernetes api operations",
                &["operation_type"],
            )?,
            identity_refused: r.counter_vec(
                "nmi_identity_refused_count",
                "Count of token requests refused because of the AzureIdentity (client ID not the resource ID's, or missing IDs)",
                &["namespace", "reason"],
            )?,
            connections_refused: r.counter_vec(
                "nmi_connections_refused_count",
                "Count of connections closed at once because too many were open, in all or from the address",
                &["reason"],
            )?,
            requests_refused: r.counter_vec(
                "nmi_requests_refused_count",
                "Count of requests refused by a bound (declared body, pending IMDS calls per pod, first sync)",
                &["reason"],
            )?,
            connections: r.gauge(
                "nmi_connections",
                "Open connections to the token service",
            )?,
            token_cache_entries: r.gauge(
                "nmi_token_cache_entries",
                "Entries in the token cache",
            )?,
            imds_fetches: r.gauge_vec(
                "nmi_imds_fetches",
                "IMDS token calls waiting for a start slot or in flight",
                &["state"],
            )?,
            registry,
            resource_labels: Arc::default(),
        })
    }

    /// Counts one request refused by a bound (`reason` one of the
    /// `REQUEST_REFUSED_*`).
    pub fn request_refused(&self, reason: &str) {
        self.requests_refused.with_label_values(&[reason]).inc();
    }

    /// The `resource` label for `resource`: itself while fewer than
    /// [`MAX_RESOURCE_LABELS`] distinct values were seen (or it is one of
    /// them), else [`RESOURCE_LABEL_OTHER`]. Empty stays empty.
    pub fn resource_label(&self, resource: &str) -> String {
        if resource.is_empty() {
            return String::new();
        }
        let mut seen = self
            .resource_labels
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if seen.contains(resource) {
            return resource.to_string();
        }
        if seen.len() < MAX_RESOURCE_LABELS {
            seen.insert(resource.to_string());
            return resource.to_string();
        }
        RESOURCE_LABEL_OTHER.to_string()
    }

    /// Sets the gauges of what the token path holds.
    pub fn set_load(&self, cache_entries: usize, waiting: usize, in_flight: usize) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.token_cache_entries.set(gauge(cache_entries));
        self.imds_fetches
            .with_label_values(&["waiting"])
            .set(gauge(waiting));
        self.imds_fetches
            .with_label_values(&["in_flight"])
            .set(gauge(in_flight));
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
        m.connections_refused
            .with_label_values(&["max_connections_per_ip"])
            .inc();
        m.requests_refused
            .with_label_values(&[REQUEST_REFUSED_BODY])
            .inc();
        m.set_load(1, 2, 3);
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
                "aadpodidentity_nmi_connections",
                "aadpodidentity_nmi_connections_refused_count",
                "aadpodidentity_nmi_identity_refused_count",
                "aadpodidentity_nmi_imds_fetches",
                "aadpodidentity_nmi_operations_duration_seconds",
                "aadpodidentity_nmi_requests_refused_count",
                "aadpodidentity_nmi_token_cache_entries",
            ]
        );
    }

    #[test]
    fn resource_labels_are_bounded() {
        let m = Metrics::new().unwrap();
        assert_eq!(m.resource_label(""), "");
        for i in 0..MAX_RESOURCE_LABELS {
            let r = format!("https://r{i}");
            assert_eq!(m.resource_label(&r), r);
        }
        assert_eq!(m.resource_label("https://one-more"), RESOURCE_LABEL_OTHER);
        assert_eq!(
            m.resource_label("https://r0"),
            "https://r0",
            "known values stay"
        );
        assert_eq!(m.resource_label(""), "");
    }

    #[test]
    fn operation_types_table() {
        use IdentityType::{ServicePrincipal, ServicePrincipalCertificate, UserAssignedMsi};
        use TokenSource::{Federated, Imds};
        use aadpodid_api::ANNOTATION_TOKEN_SOURCE;
        use std::collections::BTreeMap;
        // (type, annotation, default source, operation_type)
        #[rustfmt::skip]
        let cases = [
            (UserAssignedMsi, None, Imds, IMDS_OP_USER_ASSIGNED),
            (UserAssignedMsi, Some("imds"), Federated, IMDS_OP_USER_ASSIGNED),
            (UserAssignedMsi, Some("federated"), Imds, IMDS_OP_FEDERATED),
            (UserAssignedMsi, None, Federated, IMDS_OP_FEDERATED),
            (UserAssignedMsi, Some("Federated"), Federated, IMDS_OP_USER_ASSIGNED),
            (ServicePrincipal, None, Imds, IMDS_OP_SERVICE_PRINCIPAL),
            (ServicePrincipalCertificate, None, Imds, IMDS_OP_SERVICE_PRINCIPAL),
            (ServicePrincipal, Some("federated"), Imds, IMDS_OP_FEDERATED),
            (ServicePrincipalCertificate, None, Federated, IMDS_OP_FEDERATED),
        ];
        for (kind, annotation, default, want) in cases {
            let mut id = AzureIdentity::new("a", Default::default());
            id.spec.r#type = kind;
            id.metadata.annotations = annotation
                .map(|a| BTreeMap::from([(ANNOTATION_TOKEN_SOURCE.to_string(), a.to_string())]));
            assert_eq!(
                operation_type(&id, default),
                want,
                "{kind:?}, annotation {annotation:?}, default {default}"
            );
        }
        let values = [
            IMDS_OP_USER_ASSIGNED,
            IMDS_OP_SERVICE_PRINCIPAL,
            IMDS_OP_FEDERATED,
        ];
        let m = Metrics::new().unwrap();
        for v in values {
            m.imds_operations.with_label_values(&[v]).observe(0.1);
        }
        let family = m
            .registry
            .gather()
            .into_iter()
            .find(|f| f.name() == "aadpodidentity_imds_operations_duration_seconds")
            .unwrap();
        let mut seen: Vec<String> = family
            .get_metric()
            .iter()
            .flat_map(|s| s.get_label().iter().map(|l| l.value().to_string()))
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                "adal_token",
                "adal_token_msi_userassignedid",
                "federated_token_exchange"
            ],
            "one series per operation, upstream's label name"
        );
    }
}
