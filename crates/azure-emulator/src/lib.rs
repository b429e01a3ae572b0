//! A stand-in for Azure Resource Manager (compute), Entra ID (AAD) token
//! endpoints and IMDS, faithful to their wire formats, for tests, demos and
//! benchmarks. The behaviours it reproduces are summed up in
//! docs/upstream-behaviour.md (IMDS wire format, Entra ID token endpoint, ARM
//! identity API, Azure throttling).
//!
//! Start it in-process with [`Emulator::start`], point clients at
//! [`Emulator::arm_url`] / [`Emulator::aad_url`] (HTTPS, trusted through
//! [`Emulator::ca_bundle_path`] as `SSL_CERT_FILE`) and open IMDS listeners
//! per machine with [`Emulator::add_imds`] (plain HTTP).
//!
//! Federated (workload-identity) assertions are verified against the keys
//! seeded for their issuer under `issuers` ([`config::IssuerSeed`]); the
//! emulator's own token-signing key is published through OpenID discovery
//! (`/{tenant}/v2.0/.well-known/openid-configuration`,
//! `/{tenant}/discovery/v2.0/keys`, see [`aad`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use azure_emulator::{Config, Emulator};
//!
//! let cfg = Config::from_yaml(r#"
//! tenantId: 72f988bf-86f1-41af-91ab-2d7cd011db47
//! subscriptionId: 0b1f6471-1bf0-4dda-aec3-cb9272f09590
//! identities: [{ name: app-id, resourceGroup: app-rg }]
//! scaleSets: [{ name: aks-np-vmss, resourceGroup: MC_rg, instances: ["0"] }]
//! servicePrincipals: [{ clientId: mic, secrets: [s3cr3t] }]
//! clock: { speed: 1000 }   # a 45 s scale-set write takes 45 ms
//! "#)?;
//! let emu = Emulator::start(cfg).await?;
//! let imds = emu.add_imds("vmss/aks-np-vmss/0", "127.0.0.1:0".parse()?).await?;
//! println!("{} {} {} {imds}", emu.arm_url(), emu.aad_url(), emu.ca_bundle_path().display());
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub mod aad;
mod admin;
pub mod arm;
pub mod clock;
pub mod config;
pub mod draw;
pub mod error;
pub mod faults;
mod http;
pub mod identity;
pub mod ids;
pub mod imds;
pub mod jwt;
pub mod observe;
pub mod state;
pub mod throttle;
pub mod tls;

pub use clock::Clock;
pub use config::{Config, FederatedCredentialSeed};
pub use faults::{Fault, FaultAction};
pub use observe::{Counters, RequestRecord, Service};
pub use tls::TestCa;

use crate::error::ArmError;
use crate::ids::key;
use crate::jwt::Signer;
use crate::state::{Assigned, SeedError, State};

/// Locks a mutex, recovering the data if a holder panicked (a test thread
/// failing an assertion must not wedge every later request).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid seed: {0}")]
    Seed(#[from] SeedError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("generating the token-signing key: {0}")]
    Key(#[from] jwt::JwtError),
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("keys of issuer '{issuer}': {reason}")]
    Issuer { issuer: String, reason: String },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Claims of a token the emulator issued, as ARM sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    pub aud: String,
    pub tid: String,
    pub oid: String,
    pub appid: String,
    pub exp: u64,
}

/// State shared by every listener.
#[derive(Debug)]
pub(crate) struct Shared {
    pub cfg: Config,
    pub clock: Clock,
    pub state: Mutex<State>,
    pub signer: Arc<Signer>,
    /// `https://<ARM address>`. ARM also accepts tokens for its own base URL,
    /// as a custom cloud's does: upstream aad-pod-identity asks AAD for its
    /// environment's `ResourceManagerEndpoint` (`pkg/cloudprovider`).
    pub arm_url: String,
    /// Verification keys of workload-identity issuers, by exact issuer URL.
    pub issuer_keys: Mutex<BTreeMap<String, Vec<jwt::VerifyKey>>>,
    pub buckets: Mutex<throttle::Buckets>,
    pub faults: faults::Faults,
    pub observer: observe::Observer,
    pub imds_cache: imds::TokenCache,
}

/// Audiences ARM accepts (the Azure CLI asks for the second).
const ARM_AUDIENCES: [&str; 2] = [
    "https://management.azure.com",
    "https://management.core.windows.net",
];

impl Shared {
    /// Logs an answer outside IMDS at the current virtual time.
    pub fn record_answer(&self, service: Service, method: String, uri: String, status: u16) {
        self.observer.record(RequestRecord::answered(
            service,
            method,
            uri,
            status,
            self.clock.now().as_millis() as u64,
        ));
    }

    /// Signs an access token. Times are wall-clock seconds (clients compare
    /// them with their own clock; see `clock.rs`).
    pub fn mint(
        &self,
        aud: &str,
        oid: &str,
        appid: &str,
        mirid: Option<&str>,
        lifetime: u64,
    ) -> Result<(String, u64, u64), jwt::JwtError> {
        let tenant = lock(&self.state).tenant_id.clone();
        let iat = clock::wall_now_secs();
        let exp = iat + lifetime;
        let mut c = Map::new();
        c.insert("aud".into(), json!(aud));
        c.insert(
            "iss".into(),
            json!(format!("https://sts.windows.net/{tenant}/")),
        );
        c.insert("iat".into(), json!(iat));
        c.insert("nbf".into(), json!(iat));
        c.insert("exp".into(), json!(exp));
        c.insert("appid".into(), json!(appid));
        c.insert("appidacr".into(), json!("1"));
        c.insert("idtyp".into(), json!("app"));
        c.insert("oid".into(), json!(oid));
        c.insert("sub".into(), json!(oid));
        c.insert("tid".into(), json!(tenant));
        c.insert("uti".into(), json!(ids::new_guid()));
        c.insert("ver".into(), json!("1.0"));
        if let Some(m) = mirid {
            c.insert("xms_mirid".into(), json!(m));
        }
        Ok((self.signer.sign(&c)?, iat, exp))
    }

    /// ARM's bearer check (401 without a valid token for an ARM audience);
    /// error bodies as ARM sends them.
    pub fn verify_arm_token(&self, authorization: Option<&str>) -> Result<TokenClaims, ArmError> {
        let tenant = lock(&self.state).tenant_id.clone();
        let challenge = |err: ArmError| {
            let msg = err.message.replace('"', "'");
            err.header(
                "WWW-Authenticate",
                format!("Bearer authorization_uri=\"https://login.windows.net/{tenant}\", error=\"invalid_token\", error_description=\"{msg}\""),
            )
        };
        let Some(auth) = authorization else {
            return Err(challenge(ArmError::new(
                401,
                "AuthenticationFailed",
                "Authentication failed. The 'Authorization' header is missing.",
            )));
        };
        let token = match auth.split_once(' ') {
            Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") && !t.trim().is_empty() => {
                t.trim()
            }
            _ => {
                return Err(challenge(ArmError::new(
                    401,
                    "AuthenticationFailed",
                    "Authentication failed. The 'Authorization' header is provided in an invalid format.",
                )));
            }
        };
        let parsed = self.signer.verify(token).map_err(|_| {
            challenge(ArmError::new(
                401,
                "InvalidAuthenticationToken",
                "The access token is invalid.",
            ))
        })?;
        let aud = parsed.claim_str("aud").unwrap_or("").to_string();
        let own = aud
            .trim_end_matches('/')
            .eq_ignore_ascii_case(self.arm_url.trim_end_matches('/'));
        if !own && !ARM_AUDIENCES.contains(&aud.trim_end_matches('/')) {
            return Err(challenge(ArmError::new(
                401,
                "InvalidAuthenticationTokenAudience",
                format!(
                    "The access token has been obtained for wrong audience or resource '{aud}'. It should exactly match with one of the allowed audiences 'https://management.core.windows.net/','https://management.core.windows.net','https://management.azure.com/','https://management.azure.com'."
                ),
            )));
        }
        let exp = parsed.claim_u64("exp").unwrap_or(0);
        let now = clock::wall_now_secs();
        if exp <= now {
            return Err(challenge(ArmError::new(
                401,
                "ExpiredAuthenticationToken",
                format!(
                    "The access token expiry UTC time '{}' is earlier than current UTC time '{}'.",
                    clock::aad_timestamp(Duration::from_secs(exp)),
                    clock::aad_timestamp(Duration::from_secs(now))
                ),
            )));
        }
        let tid = parsed.claim_str("tid").unwrap_or("").to_string();
        if !tid.eq_ignore_ascii_case(&tenant) {
            return Err(challenge(ArmError::new(
                401,
                "InvalidAuthenticationTokenTenant",
                format!(
                    "The access token is from the wrong issuer '{}'. It must match the tenant 'https://sts.windows.net/{tenant}/' associated with this subscription.",
                    parsed.claim_str("iss").unwrap_or("")
                ),
            )));
        }
        Ok(TokenClaims {
            aud,
            tid,
            oid: parsed.claim_str("oid").unwrap_or("").to_string(),
            appid: parsed.claim_str("appid").unwrap_or("").to_string(),
            exp,
        })
    }

    /// Applies an injected request fault: hangs forever, sleeps (virtual time)
    /// and returns `None`, or returns the status (and `Retry-After`) to answer.
    pub async fn fault_gate(
        &self,
        service: Service,
        method: &str,
        path: &str,
        machine: Option<&str>,
    ) -> Option<(u16, Option<u64>)> {
        let action = self.faults.take(service, method, path, machine)?;
        self.observer.count(|c| c.faults_fired += 1);
        match action {
            FaultAction::Hang => {
                std::future::pending::<()>().await;
                None
            }
            FaultAction::Delay { seconds } => {
                self.clock
                    .sleep(Duration::from_secs_f64(seconds.max(0.0)))
                    .await;
                None
            }
            FaultAction::Status {
                status,
                retry_after,
            } => Some((status, retry_after)),
        }
    }

    /// `Retry-After` seconds for a virtual wait (scaled by the clock speed if configured).
    pub fn retry_after(&self, virtual_wait: Duration) -> u64 {
        self.clock
            .retry_after_secs(virtual_wait, self.cfg.clock.scale_retry_after)
    }
}

/// A running emulator. Dropping it stops every listener.
#[derive(Debug)]
pub struct Emulator {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    arm_addr: SocketAddr,
    aad_addr: SocketAddr,
    admin_addr: SocketAddr,
    ca_pem: String,
    ca_bundle: PathBuf,
    /// The temp directory holding a bundle we chose the place of; removed on drop.
    owned_dir: Option<PathBuf>,
    imds: Mutex<Vec<ImdsListener>>,
}

/// An open IMDS listener.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImdsListener {
    /// `vmss/<name>/<instanceId>` or `vm/<name>`.
    pub machine: String,
    pub address: SocketAddr,
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

impl Emulator {
    /// Starts ARM, AAD and admin on loopback (or `cfg.listen`), with a fresh or
    /// configured test CA, and the IMDS listeners of `cfg.imds.listeners`.
    pub async fn start(cfg: Config) -> Result<Self, StartError> {
        let ca = match (&cfg.listen.ca_cert_pem_file, &cfg.listen.ca_key_pem_file) {
            (Some(c), Some(k)) => {
                let read = |p: &Path| {
                    std::fs::read_to_string(p).map_err(|source| StartError::Read {
                        path: p.to_path_buf(),
                        source,
                    })
                };
                TestCa::from_pem(&read(c)?, &read(k)?)?
            }
            _ => TestCa::generate()?,
        };
        Self::start_with_ca(cfg, &ca).await
    }

    /// Like [`Emulator::start`] with a given CA, so several emulators in one
    /// process can share one `SSL_CERT_FILE`.
    pub async fn start_with_ca(cfg: Config, ca: &TestCa) -> Result<Self, StartError> {
        let clock = Clock::new(cfg.clock.speed);
        let state = State::seed(&cfg, clock.now())?;
        let issuer_keys = aad::load_issuer_keys(&cfg.issuers)?;
        let tls = tokio_rustls::TlsAcceptor::from(ca.server_config()?);
        let (ca_bundle, owned_dir) = match &cfg.listen.ca_bundle_path {
            Some(p) => (p.clone(), None),
            None => {
                let dir = std::env::temp_dir().join(format!("azure-emulator-{}", ids::new_guid()));
                (dir.join("ca-bundle.pem"), Some(dir))
            }
        };
        tls::write_bundle(ca.cert_pem(), &ca_bundle)?;
        let arm_l = bind("ARM", cfg.listen.arm.unwrap_or_else(loopback)).await?;
        let aad_l = bind("AAD", cfg.listen.aad.unwrap_or_else(loopback)).await?;
        let admin_l = bind("admin", cfg.listen.admin.unwrap_or_else(loopback)).await?;
        let local = |l: &TcpListener, what, addr| {
            l.local_addr()
                .map_err(|source| StartError::Bind { what, addr, source })
        };
        let (arm_addr, aad_addr, admin_addr) = (
            local(&arm_l, "ARM", loopback())?,
            local(&aad_l, "AAD", loopback())?,
            local(&admin_l, "admin", loopback())?,
        );
        let listeners = cfg.imds.listeners.clone();
        let shared = Arc::new(Shared {
            clock,
            state: Mutex::new(state),
            signer: Signer::shared()?,
            arm_url: format!("https://{arm_addr}"),
            issuer_keys: Mutex::new(issuer_keys),
            buckets: Mutex::new(throttle::Buckets::default()),
            faults: faults::Faults::default(),
            observer: observe::Observer::new(100_000),
            imds_cache: imds::TokenCache::default(),
            cfg,
        });
        let (shutdown, rx) = watch::channel(false);
        tokio::spawn(http::serve(
            arm_l,
            Some(tls.clone()),
            arm::handler(shared.clone()),
            rx.clone(),
        ));
        tokio::spawn(http::serve(
            aad_l,
            Some(tls),
            aad::handler(shared.clone(), format!("https://{aad_addr}/")),
            rx.clone(),
        ));
        let emu = Emulator {
            shared,
            shutdown,
            arm_addr,
            aad_addr,
            admin_addr,
            ca_pem: ca.cert_pem().to_string(),
            ca_bundle,
            owned_dir,
            imds: Mutex::new(Vec::new()),
        };
        let admin = admin::handler(emu.shared.clone(), emu.urls_json());
        tokio::spawn(http::serve(admin_l, None, admin, rx));
        for l in listeners {
            emu.add_imds(&l.machine, l.address).await?;
        }
        Ok(emu)
    }

    fn urls_json(&self) -> Value {
        json!({
            "arm": self.arm_url(),
            "aad": self.aad_url(),
            "admin": self.admin_url(),
            "caBundle": self.ca_bundle.display().to_string(),
        })
    }

    /// Opens an IMDS listener for `machine` (`vmss/<name>/<instanceId>` or
    /// `vm/<name>`) on `addr` (port 0 picks one); returns the bound address.
    pub async fn add_imds(
        &self,
        machine: &str,
        addr: SocketAddr,
    ) -> Result<SocketAddr, StartError> {
        let m = lock(&self.shared.state).machine(machine)?;
        let l = bind("IMDS", addr).await?;
        let bound = l.local_addr().map_err(|source| StartError::Bind {
            what: "IMDS",
            addr,
            source,
        })?;
        let h = imds::handler(self.shared.clone(), m.clone());
        tokio::spawn(http::serve(l, None, h, self.shutdown.subscribe()));
        lock(&self.imds).push(ImdsListener {
            machine: m.label,
            address: bound,
        });
        Ok(bound)
    }

    /// `https://127.0.0.1:<port>`: the ARM endpoint (no trailing slash).
    pub fn arm_url(&self) -> String {
        format!("https://{}", self.arm_addr)
    }
    /// `https://127.0.0.1:<port>/`: the authority host for the Azure SDK.
    pub fn aad_url(&self) -> String {
        format!("https://{}/", self.aad_addr)
    }
    /// `http://127.0.0.1:<port>`: the admin endpoint.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }
    /// System roots plus the test CA; set `SSL_CERT_FILE` to it.
    pub fn ca_bundle_path(&self) -> &Path {
        &self.ca_bundle
    }
    pub fn imds_listeners(&self) -> Vec<ImdsListener> {
        lock(&self.imds).clone()
    }
    pub fn clock(&self) -> &Clock {
        &self.shared.clock
    }
    pub fn tenant_id(&self) -> String {
        lock(&self.shared.state).tenant_id.clone()
    }
    pub fn subscription_id(&self) -> String {
        lock(&self.shared.state).subscription_id.clone()
    }

    /// A token as the AAD endpoint would issue it to `client_id` (a service
    /// principal or UAI client ID) for `resource`.
    pub fn issue_token(&self, client_id: &str, resource: &str) -> Option<String> {
        let (oid, mirid) = match lock(&self.shared.state).aad_client(client_id)? {
            state::AadClient::Sp(sp) => (sp.object_id, None),
            state::AadClient::Uai(u) => (u.principal_id, Some(u.id)),
        };
        let life = self.shared.cfg.aad.token_lifetime_seconds;
        self.shared
            .mint(resource, &oid, client_id, mirid.as_deref(), life)
            .ok()
            .map(|t| t.0)
    }

    /// Replaces the verification keys of a workload-identity issuer (key
    /// rotation) with those of a JWKS document; an empty `keys` array removes
    /// them, after which its assertions get AADSTS50166. Returns how many keys
    /// the issuer now has.
    pub fn set_issuer_jwks(&self, issuer: &str, jwks: &Value) -> Result<usize, jwt::KeyError> {
        let keys = jwt::VerifyKey::from_jwks(jwks)?;
        let n = keys.len();
        let mut map = lock(&self.shared.issuer_keys);
        if keys.is_empty() {
            map.remove(issuer);
        } else {
            map.insert(issuer.to_string(), keys);
        }
        Ok(n)
    }

    /// Adds a federated identity credential to the user-assigned identity
    /// `name` (what `az identity federated-credential create` does); false
    /// when there is no such identity. An identical credential is not added
    /// twice.
    pub fn add_federated_credential(
        &self,
        name: &str,
        credential: FederatedCredentialSeed,
    ) -> bool {
        let mut st = lock(&self.shared.state);
        let Some(key) = st.uai_key_named(name) else {
            return false;
        };
        let Some(uai) = st.uais.get_mut(&key) else {
            return false;
        };
        if !uai.federated_credentials.contains(&credential) {
            uai.federated_credentials.push(credential);
        }
        true
    }

    /// The emulator's token-signing key as a JWKS, as
    /// `/{tenant}/discovery/v2.0/keys` serves it.
    pub fn signing_jwks(&self) -> Value {
        json!({ "keys": [self.shared.signer.jwk()] })
    }

    /// ARM's bearer-token check, for tests and tools.
    pub fn verify_token(&self, token: &str) -> Result<TokenClaims, error::ArmError> {
        self.shared
            .verify_arm_token(Some(&format!("Bearer {token}")))
    }

    // ---- observation -------------------------------------------------------

    pub fn counters(&self) -> Counters {
        self.shared.observer.counters()
    }
    /// Requests answered after sequence number `since` (0 for all kept).
    pub fn requests(&self, since: u64) -> Vec<RequestRecord> {
        self.shared.observer.requests(since)
    }
    pub fn reset_observations(&self) {
        self.shared.observer.reset();
    }
    /// The long-running operations of the last hour of virtual time, by start.
    pub fn operations(&self) -> Vec<state::OperationSpan> {
        lock(&self.shared.state).operation_spans()
    }

    /// The client and principal ID of a UAI, by name.
    pub fn identity(&self, name: &str) -> Option<state::Uai> {
        let st = lock(&self.shared.state);
        st.uai_key_named(name)
            .and_then(|k| st.uais.get(&k).cloned())
    }
    /// A service principal's object ID.
    pub fn principal_object_id(&self, client_id: &str) -> Option<String> {
        lock(&self.shared.state)
            .principals
            .iter()
            .find(|p| p.client_id.eq_ignore_ascii_case(client_id))
            .map(|p| p.object_id.clone())
    }
    /// Lower-cased IDs of the UAIs on a VM or scale set (by name).
    pub fn assigned_identities(&self, resource_name: &str) -> Option<Vec<String>> {
        lock(&self.shared.state)
            .compute_named(resource_name)
            .map(|c| c.user.keys().cloned().collect())
    }
    /// Whether a VM or scale set has a system-assigned identity.
    pub fn has_system_identity(&self, resource_name: &str) -> Option<bool> {
        lock(&self.shared.state)
            .compute_named(resource_name)
            .map(|c| c.system_principal_id.is_some())
    }

    // ---- faults ------------------------------------------------------------

    pub fn inject(&self, fault: Fault) {
        self.shared.faults.add(fault);
    }
    pub fn clear_faults(&self) {
        self.shared.faults.clear();
    }
    pub fn faults(&self) -> Vec<Fault> {
        self.shared.faults.list()
    }
    /// Deletes a UAI resource (assignments stay on VMs/VMSS, as in Azure).
    pub fn delete_identity(&self, name: &str) -> bool {
        actions::delete_identity(&self.shared, name)
    }
    /// Recreates a deleted UAI under the same name with new IDs.
    pub fn recreate_identity(&self, name: &str, resource_group: &str) -> state::Uai {
        actions::recreate_identity(&self.shared, name, resource_group)
    }
    /// Revokes (or restores) everyone's `assign/action` right on a UAI.
    pub fn set_assign_revoked(&self, name: &str, revoked: bool) -> bool {
        actions::set_assign_revoked(&self.shared, name, revoked)
    }
    /// Revokes (or restores) a principal's write right on VMs/VMSS.
    pub fn set_write_revoked(&self, object_id: &str, revoked: bool) {
        let mut st = lock(&self.shared.state);
        let k = object_id.to_ascii_lowercase();
        if revoked {
            st.revoked_write.insert(k);
        } else {
            st.revoked_write.remove(&k);
        }
    }
    /// Marks a VM or scale set as being deleted (writes get 409).
    pub fn set_deleting(&self, resource_name: &str, deleting: bool) -> bool {
        actions::set_deleting(&self.shared, resource_name, deleting)
    }
    /// Removes UAIs from a VM/VMSS behind the client's back (what AKS upgrades
    /// do); `None` strips all. Returns how many were removed.
    pub fn strip_identities(&self, resource_name: &str, names: Option<&[&str]>) -> usize {
        actions::strip_identities(&self.shared, resource_name, names)
    }
    /// Assigns UAIs out of band (as another tool would), visible to IMDS after
    /// the configured delay.
    pub fn assign_identities(&self, resource_name: &str, names: &[&str]) -> usize {
        actions::assign_identities(&self.shared, resource_name, names)
    }
    /// Makes the next `n` long-running operations end `Failed`.
    pub fn fail_next_operations(&self, n: u32) {
        lock(&self.shared.state).fail_next_operations = n;
    }
    /// Refills every throttling bucket.
    pub fn reset_throttling(&self) {
        lock(&self.shared.buckets).reset();
    }

    /// Stops every listener.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(dir) = &self.owned_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// State-level faults, shared by the library API and the admin endpoint.
pub(crate) mod actions {
    use super::*;

    pub fn delete_identity(shared: &Shared, name: &str) -> bool {
        let mut st = lock(&shared.state);
        let k = st.uai_key_named(name);
        k.and_then(|k| st.uais.remove(&k)).is_some()
    }

    pub fn recreate_identity(shared: &Shared, name: &str, rg: &str) -> state::Uai {
        let mut st = lock(&shared.state);
        let id = ids::uai_id(&st.subscription_id.clone(), rg, name);
        st.resource_groups
            .entry(rg.to_ascii_lowercase())
            .or_insert_with(|| rg.to_string());
        let u = state::Uai {
            id: id.clone(),
            name: name.to_string(),
            resource_group: rg.to_string(),
            client_id: ids::new_guid(),
            principal_id: ids::new_guid(),
            federated_credentials: Vec::new(),
            permissions: state::Permissions {
                write: true,
                assign: vec!["*".into()],
            },
        };
        st.uais.insert(key(&id), u.clone());
        u
    }

    fn uai_key_by_name(st: &State, name: &str) -> Option<String> {
        if ids::parse_uai_id(name).is_some() {
            return Some(key(name));
        }
        st.uai_key_named(name)
    }

    pub fn set_assign_revoked(shared: &Shared, name: &str, revoked: bool) -> bool {
        let mut st = lock(&shared.state);
        let Some(k) = uai_key_by_name(&st, name) else {
            return false;
        };
        if revoked {
            st.revoked_assign.insert(k);
        } else {
            st.revoked_assign.remove(&k);
        }
        true
    }

    pub fn set_deleting(shared: &Shared, name: &str, deleting: bool) -> bool {
        let mut st = lock(&shared.state);
        match st.compute_named_mut(name) {
            Some(c) => {
                c.deleting = deleting;
                true
            }
            None => false,
        }
    }

    pub fn strip_identities(shared: &Shared, name: &str, names: Option<&[&str]>) -> usize {
        let mut st = lock(&shared.state);
        let wanted: Option<Vec<String>> =
            names.map(|ns| ns.iter().filter_map(|n| uai_key_by_name(&st, n)).collect());
        let Some(c) = st.compute_named_mut(name) else {
            return 0;
        };
        let before = c.user.len();
        match wanted {
            None => c.user.clear(),
            Some(keys) => c.user.retain(|k, _| !keys.contains(k)),
        }
        let removed = before - c.user.len();
        if removed > 0 {
            c.etag += 1;
        }
        removed
    }

    pub fn assign_identities(shared: &Shared, name: &str, names: &[&str]) -> usize {
        let now = shared.clock.now()
            + Duration::from_secs_f64(shared.cfg.imds.assignment_delay_seconds.max(0.0));
        let mut st = lock(&shared.state);
        let uais: Vec<state::Uai> = names
            .iter()
            .filter_map(|n| uai_key_by_name(&st, n).and_then(|k| st.uais.get(&k).cloned()))
            .collect();
        let Some(c) = st.compute_named_mut(name) else {
            return 0;
        };
        let mut n = 0;
        for u in uais {
            n += 1;
            c.user.insert(
                key(&u.id),
                Assigned {
                    id: u.id,
                    client_id: u.client_id,
                    principal_id: u.principal_id,
                    visible_at_ms: now.as_millis() as u64,
                },
            );
        }
        c.etag += 1;
        n
    }
}
