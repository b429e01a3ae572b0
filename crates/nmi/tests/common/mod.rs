//! Scaffolding shared by NMI's in-process integration tests and the
//! token-path benchmark: NMI's server configuration and server, served on a
//! loopback port, and the Azure emulator with IMDS for one VM, `node`.
//! Nothing here needs a cluster or root. Its lint levels are those of the
//! test or benchmark that includes it (each allows failing loudly).
#![allow(dead_code, reason = "each test binary uses a part of it")]

use std::net::SocketAddr;
use std::sync::Arc;

use aadpodid_api::{
    AzureAssignedIdentity, AzureAssignedIdentityStatus, AzureIdentity, AzureIdentityBinding,
    AzureIdentityBindingSpec, AzureIdentitySpec,
};
use azure_emulator::config::{IdentityAssignmentSeed, IdentitySeed, VmSeed};
use azure_emulator::{Config, Emulator};
use k8s_openapi::api::core::v1::Pod;
use nmi::server::{Server, State};
use nmi::token::{TokenCache, TokenSource};

/// The emulator's tenant.
pub const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
/// The emulator's subscription.
pub const SUBSCRIPTION: &str = "00000000-0000-0000-0000-0000000000aa";
/// The resource the tests ask tokens for (Azure Resource Manager).
pub const ARM: &str = "https://management.azure.com/";

/// NMI's flags as these tests run it: standard mode, not namespaced, the
/// Metadata header required, no retries for Created or Assigned identities,
/// MIC in `default` without ServiceAccounts, default limits, and other paths
/// proxied to `metadata_addr`.
pub fn config(metadata_addr: SocketAddr) -> nmi::server::Config {
    nmi::server::Config {
        mode: nmi::args::OperationMode::Standard,
        namespaced: false,
        metadata_header_required: true,
        proxy: Default::default(),
        set_retry_after_header: false,
        retry_attempts_for_created: 0,
        retry_attempts_for_assigned: 0,
        retry_interval_secs: 0,
        mic_namespace: "default".into(),
        // No IdentityNotOnNode Events from these in-process servers.
        node_name: String::new(),
        event_namespace: String::new(),
        mic_service_accounts: Vec::new(),
        metadata_addr,
        limits: Default::default(),
        default_token_source: Default::default(),
    }
}

/// NMI's server over `state`, `cache` and `config`: no service principal's
/// CA bundle, fresh metrics, Events off, the first sync done.
pub fn server<S>(
    state: Arc<State>,
    cache: TokenCache<S>,
    config: nmi::server::Config,
) -> Server<S> {
    let aad = nmi::aad::AadClient::new(None, "test").unwrap();
    Server {
        state,
        cache,
        federated: nmi::federated::Federated::new(None, aad.clone(), ""),
        sp: nmi::sp::ServicePrincipals::new(None, aad, Vec::new()),
        config,
        metrics: nmi::metrics::Metrics::new().unwrap(),
        events: aadpodid_runtime::events::EventPublisher::disabled(),
        first_sync: nmi::server::FirstSync::done(),
    }
}

/// Serves `server` on a new loopback port; returns its address and the
/// Shutdown that stops it (keep it for as long as the server must run).
pub async fn serve<S: TokenSource>(
    server: Arc<Server<S>>,
) -> (SocketAddr, aadpodid_runtime::Shutdown) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = aadpodid_runtime::Shutdown::new();
    tokio::spawn(nmi::server::serve(listener, server, shutdown.clone()));
    (addr, shutdown)
}

/// A user-assigned identity `name` in resource group `rg` with client ID
/// `client` and, when given, object ID `object`.
pub fn identity_seed(name: &str, client: &str, object: Option<&str>) -> IdentitySeed {
    IdentitySeed {
        name: name.into(),
        resource_group: "rg".into(),
        client_id: Some(client.into()),
        principal_id: object.map(Into::into),
        federated_credentials: Vec::new(),
        permissions: Default::default(),
    }
}

/// The emulator with resource group `rg`, `identities`, and the VM `node`
/// holding all of them (and a system-assigned identity when
/// `system_assigned`); `change` edits the configuration before the start.
/// Returns the emulator and the address of the VM's IMDS, on loopback.
pub async fn emulator(
    identities: Vec<IdentitySeed>,
    system_assigned: bool,
    change: impl FnOnce(&mut Config),
) -> (Emulator, SocketAddr) {
    let mut cfg = Config::new(TENANT, SUBSCRIPTION);
    cfg.resource_groups = vec!["rg".into()];
    let user_assigned = identities.iter().map(|i| i.name.clone()).collect();
    cfg.identities = identities;
    cfg.virtual_machines = vec![VmSeed {
        name: "node".into(),
        resource_group: "rg".into(),
        identity: IdentityAssignmentSeed {
            system_assigned,
            user_assigned,
        },
    }];
    change(&mut cfg);
    let emu = Emulator::start(cfg).await.unwrap();
    let imds = emu
        .add_imds("vm/node", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    (emu, imds)
}

/// The ARM resource ID of the user-assigned identity `name` in resource
/// group `rg` of [`SUBSCRIPTION`].
pub fn resource_id(name: &str) -> String {
    format!(
        "/subscriptions/{SUBSCRIPTION}/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

/// The live AzureIdentity `name` in `ns` for `client_id` at `resource_id`,
/// with UID `uid-<name>`.
pub fn identity(ns: &str, name: &str, client_id: &str, resource_id: &str) -> AzureIdentity {
    let spec = AzureIdentitySpec {
        client_id: client_id.into(),
        resource_id: resource_id.into(),
        ..Default::default()
    };
    let mut id = AzureIdentity::new(name, spec);
    id.metadata.namespace = Some(ns.into());
    id.metadata.uid = Some(format!("uid-{name}"));
    id
}

/// The live AzureIdentityBinding `bind-<identity>` in the identity's
/// namespace selecting `selector`, with UID `uid-bind-<identity>`.
pub fn binding(identity: &AzureIdentity, selector: &str) -> AzureIdentityBinding {
    let name = identity.metadata.name.clone().unwrap();
    let spec = AzureIdentityBindingSpec {
        azure_identity: name.clone(),
        selector: selector.into(),
        ..Default::default()
    };
    let mut b = AzureIdentityBinding::new(&format!("bind-{name}"), spec);
    b.metadata.namespace = identity.metadata.namespace.clone();
    b.metadata.uid = Some(format!("uid-bind-{name}"));
    b
}

/// A pod's token request to NMI for `resource`, with `extra` (`&name=value`
/// pairs) after the query, as IMDS clients send it.
pub fn token_request(
    resource: &str,
    extra: &str,
) -> http::Request<http_body_util::Empty<hyper::body::Bytes>> {
    let q: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("api-version", "2018-02-01")
        .append_pair("resource", resource)
        .finish();
    http::Request::get(format!("/metadata/identity/oauth2/token?{q}{extra}"))
        .header("host", "169.254.169.254")
        .header("metadata", "true")
        .body(http_body_util::Empty::new())
        .unwrap()
}

/// A pod's token request for [`ARM`] with `extra` to NMI at `addr` (the pod
/// is the caller's address): (status, JSON body).
pub async fn ask(addr: SocketAddr, extra: &str) -> anyhow::Result<(u16, serde_json::Value)> {
    use anyhow::Context as _;
    use http_body_util::BodyExt as _;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(token_request(ARM, extra)).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    let v = serde_json::from_slice(&body)
        .with_context(|| format!("not JSON: {}", String::from_utf8_lossy(&body)))?;
    Ok((status, v))
}

/// Pod `name` in `ns` on `node`, Running at `ip`, labelled
/// `aadpodidbinding=<selector>`.
pub fn pod(name: &str, ns: &str, selector: &str, ip: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": ns, "labels": {"aadpodidbinding": selector}},
        "spec": {"nodeName": "node", "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }))
    .unwrap()
}

/// The Assigned AzureAssignedIdentity MIC writes (in `default`) for pod
/// `pod` of `pod_ns` on `node`, embedding `identity` and `binding`.
pub fn assigned(
    identity: &AzureIdentity,
    binding: &AzureIdentityBinding,
    pod: &str,
    pod_ns: &str,
) -> AzureAssignedIdentity {
    let mut a = AzureAssignedIdentity::for_pod(identity, binding, pod, pod_ns, "node");
    a.metadata.namespace = Some("default".into());
    a.status = Some(AzureAssignedIdentityStatus {
        status: "Assigned".into(),
        ..Default::default()
    });
    a
}
