//! Shared test helpers: a standard seed, a small HTTP(S) client that trusts the
//! emulator's CA, and builders. Every request has a timeout; only 127.0.0.1 is
//! ever contacted.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use azure_emulator::config::{
    IdentityAssignmentSeed, IdentitySeed, LroMode, PermissionsSeed, ScaleSetSeed, SecretSeed,
    ServicePrincipalSeed, VmSeed,
};
use azure_emulator::{Config, Counters, Emulator};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderMap;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// The tenant, subscription and names the kit's tenant also uses.
pub use aadpodid_testkit::{
    SUB, TENANT,
    tenant::{APP_RG, ARM_AUDIENCE as ARM_RESOURCE, MIC_CLIENT as MIC, MIC_SECRET, NODE_RG},
};
pub const VMSS: &str = "aks-nodepool1-12345678-vmss";
pub const VMSS2: &str = "aks-other-vmss";
pub const VM: &str = "aks-standalone-vm";
pub const MIC_OID: &str = "9a1e0000-0000-4000-8000-0000000000a1";
pub const LIMITED: &str = "limited-sp";

pub fn uai(rg: &str, name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourcegroups/{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

pub fn vmss_path(name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/{NODE_RG}/providers/Microsoft.Compute/virtualMachineScaleSets/{name}"
    )
}

pub fn vm_path(name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/{NODE_RG}/providers/Microsoft.Compute/virtualMachines/{name}"
    )
}

fn ident(name: &str, rg: &str, client: &str) -> IdentitySeed {
    IdentitySeed {
        name: name.into(),
        resource_group: rg.into(),
        client_id: Some(client.into()),
        principal_id: None,
        federated_credentials: vec![],
        permissions: PermissionsSeed::default(),
    }
}

/// The standard tenant: a node scale set with the kubelet identity, a second
/// scale set, a standalone VM with a system identity, a few app identities,
/// MIC's service principal and one that may assign only `app-id`.
pub fn config() -> Config {
    let mut c = Config::new(TENANT, SUB);
    c.resource_groups = vec![NODE_RG.into(), APP_RG.into()];
    c.identities = vec![
        ident("kubelet", NODE_RG, "c0000000-0000-4000-8000-00000000000k"),
        ident("app-id", APP_RG, "c0000000-0000-4000-8000-000000000001"),
        ident("app-2", APP_RG, "c0000000-0000-4000-8000-000000000002"),
        ident("other-id", APP_RG, "c0000000-0000-4000-8000-000000000003"),
    ];
    c.scale_sets = vec![
        ScaleSetSeed {
            name: VMSS.into(),
            resource_group: NODE_RG.into(),
            instances: vec!["0".into(), "1".into()],
            identity: IdentityAssignmentSeed {
                system_assigned: false,
                user_assigned: vec!["kubelet".into()],
            },
        },
        ScaleSetSeed {
            name: VMSS2.into(),
            resource_group: NODE_RG.into(),
            instances: vec!["0".into()],
            identity: IdentityAssignmentSeed {
                system_assigned: false,
                user_assigned: vec!["other-id".into()],
            },
        },
    ];
    c.virtual_machines = vec![VmSeed {
        name: VM.into(),
        resource_group: NODE_RG.into(),
        identity: IdentityAssignmentSeed {
            system_assigned: true,
            user_assigned: vec![],
        },
    }];
    c.service_principals = vec![
        ServicePrincipalSeed {
            client_id: MIC.into(),
            object_id: Some(MIC_OID.into()),
            secrets: vec![SecretSeed::Plain(MIC_SECRET.into())],
            certificates: vec![],
            federated_credentials: vec![],
            permissions: PermissionsSeed::default(),
        },
        ServicePrincipalSeed {
            client_id: LIMITED.into(),
            object_id: None,
            secrets: vec![SecretSeed::Plain("limited-secret".into())],
            certificates: vec![],
            federated_credentials: vec![],
            permissions: PermissionsSeed {
                write: true,
                assign: vec!["app-id".into()],
            },
        },
    ];
    // Tests move time themselves.
    c.clock.speed = 0.0;
    c
}

/// [`config`] with ARM's writes finished in the answer (no long-running
/// operation to poll).
pub fn sync_config() -> Config {
    let mut c = config();
    c.arm.lro_mode = LroMode::Sync;
    c
}

pub async fn start(cfg: Config) -> Emulator {
    Emulator::start(cfg).await.expect("emulator starts")
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    }
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
    /// ARM's `error.message` ("" when absent).
    pub fn error_message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
    /// Asserts an ARM error answer: this status, this `error.code` and
    /// exactly this `error.message`.
    #[track_caller]
    pub fn assert_error_message(&self, status: u16, code: &str, message: &str) {
        self.assert_error(status, code);
        assert_eq!(self.error_message(), message);
    }
    /// Asserts an ARM error answer: this status and this `error.code`.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            (self.status, self.error_code().as_str()),
            (status, code),
            "{}",
            self.text()
        );
    }
}

/// Waits until `cond` holds on the emulator's counters (polling every 5 ms,
/// at most 10 s); the caller asserts what it needs afterwards.
pub async fn until_counters(emu: &Emulator, cond: impl Fn(&Counters) -> bool) {
    for _ in 0..2000 {
        if cond(&emu.counters()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A request to the emulator. `url` is `http(s)://127.0.0.1:port/path?query`.
pub struct Call<'a> {
    pub method: &'a str,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl<'a> Call<'a> {
    pub fn new(method: &'a str, url: impl Into<String>) -> Self {
        Self {
            method,
            url: url.into(),
            headers: vec![],
            body: vec![],
        }
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }
    pub fn json(mut self, v: &Value) -> Self {
        self.body = v.to_string().into_bytes();
        self.header("content-type", "application/json")
    }
    pub fn raw(mut self, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self.header("content-type", content_type)
    }
    pub fn form(self, pairs: &[(&str, &str)]) -> Self {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish();
        self.raw("application/x-www-form-urlencoded", body)
    }

    pub async fn send(self, ca_pem: &str) -> Reply {
        tokio::time::timeout(Duration::from_secs(20), self.send_inner(ca_pem))
            .await
            .expect("request finished within 20 s")
    }

    async fn send_inner(self, ca_pem: &str) -> Reply {
        let (scheme, rest) = self.url.split_once("://").expect("absolute URL");
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr: SocketAddr = authority.parse().expect("IP:port authority");
        assert!(addr.ip().is_loopback(), "tests only talk to loopback");
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let mut req = hyper::Request::builder().method(self.method).uri(path);
        if !self
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("host"))
        {
            req = req.header("host", authority);
        }
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .body(Full::new(Bytes::from(self.body)))
            .expect("request");
        let resp = if scheme == "https" {
            let stream = tls_connector(ca_pem)
                .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                .await
                .expect("TLS handshake");
            send_http1(stream, req).await
        } else {
            send_http1(tcp, req).await
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec();
        Reply {
            status,
            headers,
            body,
        }
    }
}

/// One HTTP/1.1 request on a fresh connection.
async fn send_http1<S>(stream: S, req: hyper::Request<Full<Bytes>>) -> hyper::Response<Incoming>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    send.send_request(req).await.expect("send")
}

fn tls_connector(ca_pem: &str) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    let der = azure_emulator::tls::pem_to_der(ca_pem).expect("CA PEM");
    roots.add(CertificateDer::from(der)).expect("add CA");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// The Compute api-version MIC uses.
pub const API: &str = "2024-11-01";
/// The api-version upstream's MIC uses.
pub const OLD_API: &str = "2019-12-01";

/// ARM helpers bound to one emulator and one token.
pub struct Arm<'a> {
    pub emu: &'a Emulator,
    pub token: String,
}

impl<'a> Arm<'a> {
    pub fn new(emu: &'a Emulator) -> Self {
        let token = emu.issue_token(MIC, ARM_RESOURCE).expect("MIC token");
        Self { emu, token }
    }
    pub fn as_client(emu: &'a Emulator, client_id: &str) -> Self {
        let token = emu.issue_token(client_id, ARM_RESOURCE).expect("token");
        Self { emu, token }
    }
    pub fn url(&self, path: &str, api: &str) -> String {
        let sep = if path.contains('?') { '&' } else { '?' };
        format!("{}{path}{sep}api-version={api}", self.emu.arm_url())
    }
    pub async fn get(&self, path: &str, api: &str) -> Reply {
        self.send(self.call("GET", &self.url(path, api))).await
    }
    pub async fn patch(&self, path: &str, api: &str, body: &Value) -> Reply {
        self.send(self.call("PATCH", &self.url(path, api)).json(body))
            .await
    }
    pub async fn put(&self, path: &str, api: &str, body: &Value) -> Reply {
        self.send(self.call("PUT", &self.url(path, api)).json(body))
            .await
    }
    /// The `provisioningState` a GET of `path` shows.
    pub async fn provisioning_state(&self, path: &str) -> Value {
        self.get(path, API).await.json()["properties"]["provisioningState"].take()
    }
    /// PATCH of `identity` on a VM or scale set (see [`identity_patch`]).
    pub async fn patch_identities(&self, path: &str, ty: &str, changes: &[(&str, bool)]) -> Reply {
        self.patch(path, API, &identity_patch(ty, changes)).await
    }
    /// PATCH adding one user-assigned identity (by ARM ID).
    pub async fn assign(&self, path: &str, uai_id: &str) -> Reply {
        self.patch_identities(path, "UserAssigned", &[(uai_id, true)])
            .await
    }
    /// PATCH removing one user-assigned identity (by ARM ID).
    pub async fn unassign(&self, path: &str, uai_id: &str) -> Reply {
        self.patch_identities(path, "UserAssigned", &[(uai_id, false)])
            .await
    }
    /// A request carrying this client's token, to send with the emulator's CA.
    pub fn call(&self, method: &'a str, url: &str) -> Call<'a> {
        Call::new(method, url).bearer(&self.token)
    }
    /// Sends a request (from [`Arm::call`]) trusting the emulator's CA.
    pub async fn send(&self, call: Call<'_>) -> Reply {
        call.send(self.emu.ca_pem()).await
    }
    /// GET on an absolute URL (e.g. `Azure-AsyncOperation`).
    pub async fn get_abs(&self, url: &str) -> Reply {
        self.send(self.call("GET", url)).await
    }
}

/// Body adding (`Some(true)`) / removing (`Some(false)`) identities.
pub fn identity_patch(ty: &str, changes: &[(&str, bool)]) -> Value {
    let map: serde_json::Map<String, Value> = changes
        .iter()
        .map(|(id, add)| {
            (
                id.to_string(),
                if *add {
                    serde_json::json!({})
                } else {
                    Value::Null
                },
            )
        })
        .collect();
    serde_json::json!({"identity": {"type": ty, "userAssignedIdentities": map}})
}

/// The lower-cased resource IDs of the user-assigned identities `(group,
/// name)`, in this order: what [`uai_keys`] answers when exactly those are on.
pub fn uai_ids(ids: &[(&str, &str)]) -> Vec<String> {
    ids.iter()
        .map(|(rg, name)| uai(rg, name).to_lowercase())
        .collect()
}

/// Lower-cased keys of `identity.userAssignedIdentities` in a resource body.
pub fn uai_keys(body: &Value) -> Vec<String> {
    let mut v: Vec<String> = body["identity"]["userAssignedIdentities"]
        .as_object()
        .map(|m| m.keys().map(|k| k.to_ascii_lowercase()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Decodes a JWT's claims without verifying.
pub fn claims(token: &str) -> Value {
    let p = azure_emulator::jwt::parse(token).expect("JWT");
    Value::Object(p.claims)
}
