//! Seed and behaviour configuration, read from YAML/JSON (`azure-emulator --config`)
//! or built in code. Every figure Azure does not document (the IMDS body for
//! a missing `resource`, Compute's VMSS write budget, the total identities per
//! VM or scale set, ...) is a field here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything the emulator starts from.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    pub tenant_id: String,
    pub subscription_id: String,
    #[serde(default = "default_location")]
    pub location: String,
    #[serde(default)]
    pub resource_groups: Vec<String>,
    #[serde(default)]
    pub identities: Vec<IdentitySeed>,
    #[serde(default)]
    pub scale_sets: Vec<ScaleSetSeed>,
    #[serde(default)]
    pub virtual_machines: Vec<VmSeed>,
    #[serde(default)]
    pub service_principals: Vec<ServicePrincipalSeed>,
    /// Verification keys of the workload-identity issuers that federated
    /// credentials name. A federated assertion from an issuer without keys
    /// here is refused (AADSTS50166), as Entra refuses one whose issuer's
    /// OIDC metadata it cannot fetch.
    #[serde(default)]
    pub issuers: Vec<IssuerSeed>,
    #[serde(default)]
    pub clock: ClockConfig,
    #[serde(default)]
    pub arm: ArmConfig,
    #[serde(default)]
    pub aad: AadConfig,
    #[serde(default)]
    pub imds: ImdsConfig,
    #[serde(default)]
    pub throttle: ThrottleConfig,
    #[serde(default)]
    pub listen: ListenConfig,
}

fn default_location() -> String {
    "eastus".into()
}

impl Config {
    /// A minimal configuration: one tenant and subscription, nothing else.
    pub fn new(tenant_id: impl Into<String>, subscription_id: impl Into<String>) -> Self {
        Self {
            tenant_id: tenant_id.into(),
            subscription_id: subscription_id.into(),
            location: default_location(),
            resource_groups: Vec::new(),
            identities: Vec::new(),
            scale_sets: Vec::new(),
            virtual_machines: Vec::new(),
            service_principals: Vec::new(),
            issuers: Vec::new(),
            clock: ClockConfig::default(),
            arm: ArmConfig::default(),
            aad: AadConfig::default(),
            imds: ImdsConfig::default(),
            throttle: ThrottleConfig::default(),
            listen: ListenConfig::default(),
        }
    }

    /// Parses YAML (a superset of JSON, so JSON files work too).
    pub fn from_yaml(text: &str) -> Result<Self, serde_saphyr::Error> {
        serde_saphyr::from_str(text)
    }
}

/// A user-assigned identity (`Microsoft.ManagedIdentity/userAssignedIdentities`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentitySeed {
    pub name: String,
    pub resource_group: String,
    /// Generated when absent.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Generated when absent.
    #[serde(default)]
    pub principal_id: Option<String>,
    /// Federated credentials on this identity (workload-identity exchange).
    #[serde(default)]
    pub federated_credentials: Vec<FederatedCredentialSeed>,
    /// What a token of this identity may do against ARM (when MIC runs with MSI).
    #[serde(default)]
    pub permissions: PermissionsSeed,
}

/// Identities initially on a VM or scale set.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityAssignmentSeed {
    #[serde(default)]
    pub system_assigned: bool,
    /// UAI names (in any resource group) or full ARM IDs.
    #[serde(default)]
    pub user_assigned: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScaleSetSeed {
    pub name: String,
    pub resource_group: String,
    /// Instance IDs; `["0", "1"]` by default.
    #[serde(default = "default_instances")]
    pub instances: Vec<String>,
    #[serde(default)]
    pub identity: IdentityAssignmentSeed,
}

fn default_instances() -> Vec<String> {
    vec!["0".into(), "1".into()]
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmSeed {
    pub name: String,
    pub resource_group: String,
    #[serde(default)]
    pub identity: IdentityAssignmentSeed,
}

/// An app registration / service principal in the tenant.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePrincipalSeed {
    pub client_id: String,
    /// Generated when absent.
    #[serde(default)]
    pub object_id: Option<String>,
    #[serde(default)]
    pub secrets: Vec<SecretSeed>,
    /// PEM certificates whose keys may sign client assertions.
    #[serde(default)]
    pub certificates: Vec<String>,
    #[serde(default)]
    pub federated_credentials: Vec<FederatedCredentialSeed>,
    #[serde(default)]
    pub permissions: PermissionsSeed,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SecretSeed {
    Plain(String),
    Detailed {
        value: String,
        /// Unix seconds (wall time) after which the secret is expired (AADSTS7000222).
        #[serde(default, rename = "expiresOn")]
        expires_on: Option<u64>,
    },
}

impl SecretSeed {
    pub fn value(&self) -> &str {
        match self {
            SecretSeed::Plain(v) | SecretSeed::Detailed { value: v, .. } => v,
        }
    }
    pub fn expires_on(&self) -> Option<u64> {
        match self {
            SecretSeed::Plain(_) => None,
            SecretSeed::Detailed { expires_on, .. } => *expires_on,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FederatedCredentialSeed {
    pub issuer: String,
    pub subject: String,
    #[serde(default = "default_fic_audience")]
    pub audience: String,
}

/// The signing keys of one workload-identity issuer (e.g. a cluster's
/// service-account issuer), standing in for what Entra fetches from
/// `{issuer}/.well-known/openid-configuration` and its `jwks_uri`. Keys from
/// every source are pooled; several entries for one issuer are merged.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssuerSeed {
    /// Compared exactly (case-sensitively) with the assertion's `iss` and the
    /// federated credential's `issuer`.
    pub issuer: String,
    /// A JWKS document (`{"keys": [...]}`, what `kubectl get --raw
    /// /openid/v1/jwks` prints), inline or as JSON text. RSA (RS256/PS256)
    /// and EC P-256 (ES256) keys are used; others are skipped.
    #[serde(default)]
    pub jwks: Option<serde_json::Value>,
    /// A file holding such a JWKS, read at start.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// PEM public keys (`PUBLIC KEY` or `RSA PUBLIC KEY`), each plain or with
    /// the `kid` tokens must name.
    #[serde(default)]
    pub public_keys: Vec<PublicKeySeed>,
}

impl IssuerSeed {
    /// An issuer trusting the keys of a JWKS document.
    pub fn with_jwks(issuer: impl Into<String>, jwks: serde_json::Value) -> Self {
        Self {
            issuer: issuer.into(),
            jwks: Some(jwks),
            jwks_file: None,
            public_keys: Vec::new(),
        }
    }
}

/// A PEM public key of an issuer; without a `kid` it is tried for any token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum PublicKeySeed {
    Plain(String),
    Detailed {
        pem: String,
        #[serde(default)]
        kid: Option<String>,
    },
}

impl PublicKeySeed {
    pub fn pem(&self) -> &str {
        match self {
            PublicKeySeed::Plain(p) | PublicKeySeed::Detailed { pem: p, .. } => p,
        }
    }
    pub fn kid(&self) -> Option<&str> {
        match self {
            PublicKeySeed::Plain(_) => None,
            PublicKeySeed::Detailed { kid, .. } => kid.as_deref(),
        }
    }
}

fn default_fic_audience() -> String {
    "api://AzureADTokenExchange".into()
}

/// ARM rights of a principal. Defaults: may write every VM/VMSS and assign every
/// identity (Virtual Machine Contributor + Managed Identity Operator).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PermissionsSeed {
    #[serde(default = "yes")]
    pub write: bool,
    /// UAI IDs or names the principal may assign; `["*"]` for all.
    #[serde(default = "star")]
    pub assign: Vec<String>,
}

impl Default for PermissionsSeed {
    fn default() -> Self {
        Self {
            write: true,
            assign: star(),
        }
    }
}

fn yes() -> bool {
    true
}
fn star() -> Vec<String> {
    vec!["*".into()]
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClockConfig {
    /// Virtual seconds per real second; 0 = manual clock (moved by the admin API).
    #[serde(default = "one")]
    pub speed: f64,
    /// Divide `Retry-After` values by the speed, so real clients wait scaled time.
    #[serde(default = "yes")]
    pub scale_retry_after: bool,
}

impl Default for ClockConfig {
    fn default() -> Self {
        Self {
            speed: 1.0,
            scale_retry_after: true,
        }
    }
}

fn one() -> f64 {
    1.0
}

/// How writes complete (synchronously, or as long-running operations).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum LroMode {
    /// 200 + `Updating` + `Azure-AsyncOperation`/`Location`/`Retry-After`.
    Async,
    /// 200 + `Succeeded`, no LRO headers.
    Sync,
}

/// What a second write to a busy VM/VMSS gets.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ConcurrentWrites {
    /// 409 `Conflict`.
    Conflict,
    /// Wait until the running operation ends, then apply.
    Queue,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ArmConfig {
    #[serde(default = "lro_async")]
    pub lro_mode: LroMode,
    /// Virtual seconds a VMSS write runs (real VMSS: 40-60 s).
    #[serde(default = "vmss_lro")]
    pub vmss_write_seconds: f64,
    /// Virtual seconds a VM write runs (10-20 s on a standalone VM).
    #[serde(default = "vm_lro")]
    pub vm_write_seconds: f64,
    /// When set above `vmss_write_seconds`: each VMSS write runs a duration
    /// drawn uniformly from `[vmss_write_seconds, vmss_write_seconds_max]`
    /// (see [`crate::draw::WriteDurations`]).
    #[serde(default)]
    pub vmss_write_seconds_max: Option<f64>,
    /// The same for VM writes, from `[vm_write_seconds, vm_write_seconds_max]`.
    #[serde(default)]
    pub vm_write_seconds_max: Option<f64>,
    /// Seed of those draws: one seed and the same writes in the same order
    /// give the same durations.
    #[serde(default = "write_seed")]
    pub write_seconds_seed: u64,
    /// `Retry-After` on the LRO answer, in virtual seconds.
    #[serde(default = "lro_retry_after")]
    pub lro_retry_after_seconds: u64,
    #[serde(default = "conflict")]
    pub concurrent_writes: ConcurrentWrites,
    /// UAIs added or removed per request (ARM: 150).
    #[serde(default = "per_request")]
    pub max_identities_per_request: usize,
    /// Total UAIs per VM/VMSS; undocumented, so no cap unless set.
    #[serde(default)]
    pub max_identities_per_resource: Option<usize>,
    /// Largest accepted request body.
    #[serde(default = "max_body")]
    pub max_body_bytes: usize,
    /// The Compute api-versions served; `None`: every published stable one
    /// (Azure's public cloud). An Azure Stack Hub serves only its profiles'
    /// versions, for example `["2020-06-01"]`; any other is refused as ARM
    /// refuses an unknown version (`NoRegisteredProviderFound`).
    #[serde(default)]
    pub compute_api_versions: Option<Vec<String>>,
}

impl Default for ArmConfig {
    fn default() -> Self {
        Self {
            lro_mode: LroMode::Async,
            vmss_write_seconds: vmss_lro(),
            vm_write_seconds: vm_lro(),
            vmss_write_seconds_max: None,
            vm_write_seconds_max: None,
            write_seconds_seed: write_seed(),
            lro_retry_after_seconds: lro_retry_after(),
            concurrent_writes: ConcurrentWrites::Conflict,
            max_identities_per_request: per_request(),
            max_identities_per_resource: None,
            max_body_bytes: max_body(),
            compute_api_versions: None,
        }
    }
}

fn lro_async() -> LroMode {
    LroMode::Async
}
fn vmss_lro() -> f64 {
    45.0
}
fn vm_lro() -> f64 {
    15.0
}
fn write_seed() -> u64 {
    1
}
fn lro_retry_after() -> u64 {
    5
}
fn conflict() -> ConcurrentWrites {
    ConcurrentWrites::Conflict
}
fn per_request() -> usize {
    150
}
fn max_body() -> usize {
    // ARM's request size limit is 4 MB.
    4 * 1024 * 1024
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AadConfig {
    /// Lifetime of tokens from the AAD endpoints (docs examples: 3599).
    #[serde(default = "aad_lifetime")]
    pub token_lifetime_seconds: u64,
    /// Resources (App ID URIs) tokens may be issued for; compared without a trailing slash.
    #[serde(default = "known_resources")]
    pub resources: Vec<String>,
    /// Issue tokens for any resource (skips AADSTS500011).
    #[serde(default)]
    pub any_resource: bool,
    /// Tolerated clock skew for assertion `nbf`/`exp`, seconds.
    #[serde(default = "skew")]
    pub assertion_skew_seconds: u64,
}

impl Default for AadConfig {
    fn default() -> Self {
        Self {
            token_lifetime_seconds: aad_lifetime(),
            resources: known_resources(),
            any_resource: false,
            assertion_skew_seconds: skew(),
        }
    }
}

fn aad_lifetime() -> u64 {
    3599
}
fn skew() -> u64 {
    300
}
fn known_resources() -> Vec<String> {
    [
        "https://management.azure.com/",
        "https://management.core.windows.net/",
        "https://vault.azure.net",
        "https://storage.azure.com/",
        "https://graph.microsoft.com/",
        "api://AzureADTokenExchange",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

/// IMDS handling of `mi_res_id` (not an IMDS parameter: App Service spells it so).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum MiResIdMode {
    Ignore,
    Alias,
    Reject,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImdsConfig {
    /// Managed-identity tokens live 24 h.
    #[serde(default = "imds_lifetime")]
    pub token_lifetime_seconds: u64,
    /// Token requests per second per machine (IMDS docs: 20).
    #[serde(default = "twenty")]
    pub token_requests_per_second: u32,
    /// Concurrent token requests per machine (IMDS docs: 5).
    #[serde(default = "five")]
    pub token_concurrency: u32,
    /// Other IMDS requests per second per machine (IMDS docs: 5).
    #[serde(default = "five")]
    pub instance_requests_per_second: u32,
    /// Virtual seconds between an ARM assignment completing and IMDS serving it.
    #[serde(default)]
    pub assignment_delay_seconds: f64,
    /// Virtual seconds a token request takes (IMDS talking to Entra on a cache miss).
    #[serde(default)]
    pub token_latency_seconds: f64,
    #[serde(default = "mi_ignore")]
    pub mi_res_id: MiResIdMode,
    /// With no selector and exactly one UAI (no system identity), return it
    /// (real IMDS may do so).
    #[serde(default = "yes")]
    pub single_identity_default: bool,
    /// Listeners to open at start (the binary; tests call `Emulator::add_imds`).
    #[serde(default)]
    pub listeners: Vec<ImdsListenerSeed>,
}

impl Default for ImdsConfig {
    fn default() -> Self {
        Self {
            token_lifetime_seconds: imds_lifetime(),
            token_requests_per_second: 20,
            token_concurrency: 5,
            instance_requests_per_second: 5,
            assignment_delay_seconds: 0.0,
            token_latency_seconds: 0.0,
            mi_res_id: MiResIdMode::Ignore,
            single_identity_default: true,
            listeners: Vec::new(),
        }
    }
}

fn imds_lifetime() -> u64 {
    86_399
}
fn twenty() -> u32 {
    20
}
fn five() -> u32 {
    5
}
fn mi_ignore() -> MiResIdMode {
    MiResIdMode::Ignore
}

/// One IMDS listener: which machine it is and where it listens.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImdsListenerSeed {
    /// `vmss/<name>/<instanceId>` or `vm/<name>` (names case-insensitive).
    pub machine: String,
    pub address: SocketAddr,
}

/// A token bucket: `burst` tokens, refilled at `per_minute` (virtual time).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BucketConfig {
    /// Name shown in `x-ms-ratelimit-remaining-resource` and 429 details.
    pub name: String,
    pub burst: f64,
    pub per_minute: f64,
}

/// The per-resource and per-subscription buckets of one Compute policy.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyConfig {
    pub resource: BucketConfig,
    pub subscription: BucketConfig,
}

fn policy(name: &str, res: (f64, f64), sub: (f64, f64)) -> PolicyConfig {
    PolicyConfig {
        resource: BucketConfig {
            name: format!("{name}Resource"),
            burst: res.0,
            per_minute: res.1,
        },
        subscription: BucketConfig {
            name: format!("{name}SubscriptionMaximum"),
            burst: sub.0,
            per_minute: sub.1,
        },
    }
}

/// Microsoft.Compute token buckets and the ARM subscription layer
/// (docs/upstream-behaviour.md#azure-throttling). Policy *names* are not documented for the bucket
/// model; the defaults follow the `<Op>Resource` / `<Op>SubscriptionMaximum`
/// pattern and can be renamed.
///
/// Every field left out of a configuration takes its value from
/// [`ThrottleConfig::default`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ThrottleConfig {
    pub enabled: bool,
    pub vmss_update: PolicyConfig,
    pub vmss_create: PolicyConfig,
    pub vmss_get: PolicyConfig,
    pub vm_update: PolicyConfig,
    pub vm_get: PolicyConfig,
    pub vmss_vm_get: PolicyConfig,
    pub operation_get: PolicyConfig,
    /// ARM layer, per subscription: reads bucket 250 refilled 25/s.
    pub subscription_reads: BucketConfig,
    /// ARM layer, per subscription: writes bucket 200 refilled 10/s.
    pub subscription_writes: BucketConfig,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        let arm = |name: &str, burst, per_second| BucketConfig {
            name: name.into(),
            burst,
            per_minute: per_second * 60.0,
        };
        Self {
            enabled: true,
            vmss_update: policy("PutVMScaleSet", (12.0, 4.0), (1500.0, 500.0)),
            vmss_create: policy("CreateVMScaleSet", (12.0, 4.0), (375.0, 125.0)),
            vmss_get: policy("GetVMScaleSet", (36.0, 12.0), (2400.0, 800.0)),
            vm_update: policy("PutVM", (12.0, 4.0), (1500.0, 500.0)),
            vm_get: policy("GetVM", (36.0, 12.0), (24000.0, 8000.0)),
            vmss_vm_get: policy("GetVMScaleSetVM", (36.0, 12.0), (6000.0, 2000.0)),
            operation_get: policy("GetOperation", (45.0, 15.0), (15000.0, 5000.0)),
            subscription_reads: arm("reads", 250.0, 25.0),
            subscription_writes: arm("writes", 200.0, 10.0),
        }
    }
}

/// Where ARM, AAD and admin listen, and where the CA bundle goes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenConfig {
    /// Default `127.0.0.1:0`.
    #[serde(default)]
    pub arm: Option<SocketAddr>,
    #[serde(default)]
    pub aad: Option<SocketAddr>,
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    /// Default: a fresh directory under the system temp dir.
    #[serde(default)]
    pub ca_bundle_path: Option<PathBuf>,
    /// Load the test CA from these PEM files instead of generating one.
    #[serde(default)]
    pub ca_cert_pem_file: Option<PathBuf>,
    #[serde(default)]
    pub ca_key_pem_file: Option<PathBuf>,
}

/// Helper for code seeds: a map from name to value, sorted.
pub type Tags = BTreeMap<String, String>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_seed_parses_with_defaults() {
        let cfg = Config::from_yaml(
            r#"
tenantId: t1
subscriptionId: s1
resourceGroups: [MC_rg, app-rg]
identities:
  - name: app-id
    resourceGroup: app-rg
    clientId: c1
scaleSets:
  - name: aks-np-vmss
    resourceGroup: MC_rg
    identity: { systemAssigned: true, userAssigned: [app-id] }
servicePrincipals:
  - clientId: mic
    secrets: [s3cr3t, { value: old, expiresOn: 1 }]
    federatedCredentials:
      - { issuer: "https://oidc.example", subject: "system:serviceaccount:ns:sa" }
clock: { speed: 1000 }
arm: { lroMode: sync, concurrentWrites: queue }
"#,
        )
        .expect("parse");
        assert_eq!(cfg.scale_sets[0].instances, vec!["0", "1"]);
        assert_eq!(cfg.service_principals[0].secrets[1].expires_on(), Some(1));
        assert_eq!(
            cfg.service_principals[0].federated_credentials[0].audience,
            "api://AzureADTokenExchange"
        );
        assert_eq!(cfg.arm.lro_mode, LroMode::Sync);
        assert_eq!(cfg.throttle.vmss_update.resource.burst, 12.0);
        assert_eq!(cfg.imds.token_requests_per_second, 20);
    }

    #[test]
    fn a_partial_throttle_section_keeps_the_other_defaults() {
        let cfg = Config::from_yaml(
            r#"
tenantId: t1
subscriptionId: s1
throttle:
  enabled: false
  vmGet:
    resource: { name: r, burst: 1, perMinute: 2 }
    subscription: { name: s, burst: 3, perMinute: 4 }
"#,
        )
        .expect("parse");
        let d = ThrottleConfig::default();
        assert!(!cfg.throttle.enabled);
        assert_eq!(cfg.throttle.vm_get.subscription.per_minute, 4.0);
        assert_eq!(cfg.throttle.vmss_update, d.vmss_update);
        assert_eq!(cfg.throttle.operation_get, d.operation_get);
        assert_eq!(cfg.throttle.subscription_writes, d.subscription_writes);
        assert_eq!(d.subscription_reads.per_minute, 25.0 * 60.0);
        assert_eq!(d.vmss_create.resource.name, "CreateVMScaleSetResource");
    }

    #[test]
    fn issuers_take_inline_jwks_json_text_and_pem_keys() {
        let cfg = Config::from_yaml(
            r#"
tenantId: t1
subscriptionId: s1
issuers:
  - issuer: https://oidc.example/a
    jwks:
      keys:
        - { kty: RSA, kid: k1, use: sig, alg: RS256, n: AQAB, e: AQAB }
  - issuer: https://oidc.example/b
    jwks: '{"keys":[{"kty":"RSA","kid":"k2","n":"AQAB","e":"AQAB"}]}'
    publicKeys:
      - "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
      - { kid: k3, pem: "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n" }
"#,
        )
        .expect("parse");
        assert_eq!(cfg.issuers.len(), 2);
        let a = cfg.issuers[0].jwks.as_ref().expect("jwks");
        assert_eq!(a["keys"][0]["kid"], "k1");
        assert!(cfg.issuers[1].jwks.as_ref().is_some_and(|j| j.is_string()));
        assert_eq!(cfg.issuers[1].public_keys[0].kid(), None);
        assert_eq!(cfg.issuers[1].public_keys[1].kid(), Some("k3"));
        assert!(
            cfg.issuers[1].public_keys[1]
                .pem()
                .starts_with("-----BEGIN")
        );
    }

    #[test]
    fn write_duration_ranges_parse_and_default_to_fixed() {
        for (arm, vmss, vm, seed) in [
            ("{}", (45.0, None), (15.0, None), 1),
            (
                "{ vmssWriteSeconds: 40, vmssWriteSecondsMax: 60, writeSecondsSeed: 9 }",
                (40.0, Some(60.0)),
                (15.0, None),
                9,
            ),
            (
                "{ vmWriteSeconds: 10, vmWriteSecondsMax: 20 }",
                (45.0, None),
                (10.0, Some(20.0)),
                1,
            ),
        ] {
            let cfg = Config::from_yaml(&format!("tenantId: t\nsubscriptionId: s\narm: {arm}\n"))
                .expect("parse");
            let a = &cfg.arm;
            assert_eq!(
                (a.vmss_write_seconds, a.vmss_write_seconds_max),
                vmss,
                "{arm}"
            );
            assert_eq!((a.vm_write_seconds, a.vm_write_seconds_max), vm, "{arm}");
            assert_eq!(a.write_seconds_seed, seed, "{arm}");
        }
    }

    #[test]
    fn json_seed_parses_and_unknown_fields_fail() {
        assert!(Config::from_yaml(r#"{"tenantId":"t","subscriptionId":"s"}"#).is_ok());
        assert!(Config::from_yaml(r#"{"tenantId":"t","subscriptionId":"s","bogus":1}"#).is_err());
    }
}
