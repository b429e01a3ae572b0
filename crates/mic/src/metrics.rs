//! MIC metrics with upstream's exact names: namespace `aadpodidentity_`, counters
//! named `*_count` with no `_total` appended, so existing dashboards keep working.

use aadpodid_runtime::metrics::Registrar;
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, Registry};

const KUBE_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0];
const CYCLE_BUCKETS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1200.0,
];

/// `operation_type` values of the cloud metrics.
pub const OP_VMSS_GET: &str = "vmss_get";
pub const OP_VMSS_UPDATE: &str = "vmss_update";
pub const OP_VM_GET: &str = "vm_get";
pub const OP_VM_UPDATE: &str = "vm_update";
/// `operation_type` values of `kubernetes_api_operations_errors_count`.
pub const OP_AAI_ADDITION: &str = "assigned_identity_addition";
pub const OP_AAI_DELETION: &str = "assigned_identity_deletion";
pub const OP_AAI_UPDATE: &str = "assigned_identity_update";
pub const OP_AAI_STATUS: &str = "update_azure_assigned_identity_status";

#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub assigned_identity_addition_duration_seconds: Histogram,
    pub assigned_identity_addition_count: IntCounter,
    pub assigned_identity_deletion_duration_seconds: Histogram,
    pub assigned_identity_deletion_count: IntCounter,
    pub assigned_identity_update_duration_seconds: Histogram,
    pub assigned_identity_update_count: IntCounter,
    pub mic_cycle_duration_seconds: Histogram,
    pub mic_cycle_count: IntCounter,
    pub mic_new_leader_election_count: IntCounter,
    pub cloud_provider_operations_errors_count: IntCounterVec,
    pub cloud_provider_operations_duration_seconds: HistogramVec,
    pub kubernetes_api_operations_errors_count: IntCounterVec,
    /// Beyond upstream: objects a watch skipped because they did not parse.
    pub invalid_objects_count: IntCounterVec,
    /// Beyond upstream: PATCHes held back because the mirrored Compute write
    /// budget was spent (sent later, folded with whatever arrives meanwhile).
    pub mic_arm_writes_deferred_count: IntCounter,
    /// Beyond upstream: assignments refused by the entitlement checks, by
    /// reason (`IdentityClientIDMismatch`, `ClusterIdentityRefused`,
    /// `IdentityNotGranted`); each refusal counted once.
    pub identity_refused_count: IntCounterVec,
}

#[derive(Debug, thiserror::Error)]
#[error("registering metric: {0}")]
pub struct RegisterMetrics(#[from] prometheus::Error);

impl Metrics {
    pub fn new() -> Result<Self, RegisterMetrics> {
        let registry = Registry::new();
        let r = Registrar(&registry);
        Ok(Metrics {
            assigned_identity_addition_duration_seconds: r.histogram(
                "assigned_identity_addition_duration_seconds",
                "Duration in seconds of the assigned identity addition",
                KUBE_BUCKETS,
            )?,
            assigned_identity_addition_count: r.counter(
                "assigned_identity_addition_count",
                "Number of assigned identities added",
            )?,
            assigned_identity_deletion_duration_seconds: r.histogram(
                "assigned_identity_deletion_duration_seconds",
                "Duration in seconds of the assigned identity deletion",
                KUBE_BUCKETS,
            )?,
            assigned_identity_deletion_count: r.counter(
                "assigned_identity_deletion_count",
                "Number of assigned identities deleted",
            )?,
            assigned_identity_update_duration_seconds: r.histogram(
                "assigned_identity_update_duration_seconds",
                "Duration in seconds of the assigned identity update",
                KUBE_BUCKETS,
            )?,
            assigned_identity_update_count: r.counter(
                "assigned_identity_update_count",
                "Number of assigned identities updated",
            )?,
            mic_cycle_duration_seconds: r.histogram(
                "mic_cycle_duration_seconds",
                "Duration in seconds of a MIC sync cycle",
                CYCLE_BUCKETS,
            )?,
            mic_cycle_count: r.counter("mic_cycle_count", "Number of MIC sync cycles")?,
            mic_new_leader_election_count: r.counter(
                "mic_new_leader_election_count",
                "Number of MIC leader elections",
            )?,
            cloud_provider_operations_errors_count: r.counter_vec(
                "cloud_provider_operations_errors_count",
                "Number of cloud provider operation errors",
                &["operation_type"],
            )?,
            cloud_provider_operations_duration_seconds: r.histogram_vec(
                "cloud_provider_operations_duration_seconds",
                "Duration in seconds of cloud provider operations",
                CYCLE_BUCKETS,
                &["operation_type"],
            )?,
            kubernetes_api_operations_errors_count: r.counter_vec(
                "kubernetes_api_operations_errors_count",
                "Number of Kubernetes API operation errors",
                &["operation_type"],
            )?,
            invalid_objects_count: r.counter_vec(
                "mic_invalid_objects_count",
                "Number of objects skipped because they could not be parsed",
                &["kind"],
            )?,
            mic_arm_writes_deferred_count: r.counter(
                "mic_arm_writes_deferred_count",
                "Number of ARM writes deferred to stay within the Compute write budget",
            )?,
            identity_refused_count: r.counter_vec(
                "mic_identity_refused_count",
                "Number of identity assignments refused by the client ID, cluster identity or identity policy checks",
                &["reason"],
            )?,
            registry,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_upstreams() {
        let m = Metrics::new().unwrap();
        m.mic_cycle_count.inc();
        m.cloud_provider_operations_errors_count
            .with_label_values(&[OP_VMSS_GET])
            .inc();
        m.kubernetes_api_operations_errors_count
            .with_label_values(&[OP_AAI_STATUS])
            .inc();
        m.cloud_provider_operations_duration_seconds
            .with_label_values(&[OP_VMSS_UPDATE])
            .observe(1.0);
        m.invalid_objects_count
            .with_label_values(&["AzureIdentity"])
            .inc();
        let mut text = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&m.registry.gather(), &mut text)
            .unwrap();
        for name in [
            "aadpodidentity_assigned_identity_addition_duration_seconds_bucket",
            "aadpodidentity_assigned_identity_addition_count 0",
            "aadpodidentity_assigned_identity_deletion_duration_seconds_bucket",
            "aadpodidentity_assigned_identity_deletion_count 0",
            "aadpodidentity_assigned_identity_update_duration_seconds_bucket",
            "aadpodidentity_assigned_identity_update_count 0",
            "aadpodidentity_mic_cycle_duration_seconds_bucket",
            "aadpodidentity_mic_cycle_count 1",
            "aadpodidentity_mic_new_leader_election_count 0",
            "aadpodidentity_cloud_provider_operations_errors_count{operation_type=\"vmss_get\"} 1",
            "aadpodidentity_cloud_provider_operations_duration_seconds_bucket{operation_type=\"vmss_update\"",
            "aadpodidentity_kubernetes_api_operations_errors_count{operation_type=\"update_azure_assigned_identity_status\"} 1",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(!text.contains("_total"), "{text}");
    }
}
