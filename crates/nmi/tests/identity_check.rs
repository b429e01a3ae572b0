//! One identity, checked end to end, in process: NMI's token server over the
//! Azure emulator's IMDS on loopback (no cluster, no root). An AzureIdentity
//! whose `clientID` is not the client ID of the managed identity at its
//! `resourceID` gets a 403 and a metric, never the token; every IMDS request
//! NMI makes names the identity by resource ID.

// The shared scaffolding fails the test loudly (it unwraps).
#[allow(clippy::unwrap_used, reason = "test scaffolding")]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use aadpodid_api::{AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding};
use anyhow::Context as _;
use azure_emulator::Emulator;
use base64::Engine as _;
use common::resource_id;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

const CLIENT_A: &str = "aaaaaaaa-0000-4000-8000-00000000000a";
const OBJECT_A: &str = "aaaaaaaa-1111-4000-8000-00000000000a";
/// Plays the kubelet identity: on the node, and not the pod's to have.
const CLIENT_K: &str = "cccccccc-0000-4000-8000-00000000000c";
const OBJECT_K: &str = "cccccccc-1111-4000-8000-00000000000c";
const NS: &str = "team";

/// AzureIdentity `name` for `client_id` at the resource ID of the
/// user-assigned identity `uai` (none when empty).
fn identity(name: &str, uai: &str, client_id: &str) -> AzureIdentity {
    let rid = if uai.is_empty() {
        String::new()
    } else {
        resource_id(uai)
    };
    common::identity(NS, name, client_id, &rid)
}

fn binding(identity: &AzureIdentity) -> AzureIdentityBinding {
    common::binding(identity, "sel")
}

/// The Assigned AzureAssignedIdentity MIC writes for the pod and `identity`.
fn aai(identity: &AzureIdentity) -> AzureAssignedIdentity {
    common::assigned(identity, &binding(identity), "app", NS)
}

fn pod() -> Pod {
    common::pod("app", NS, "sel", "127.0.0.1")
}

/// The emulator with the VM `node` holding `id-a` and `kubelet` (no
/// system-assigned identity).
async fn emulator() -> (Emulator, SocketAddr) {
    common::emulator(
        vec![
            common::identity_seed("id-a", CLIENT_A, Some(OBJECT_A)),
            common::identity_seed("kubelet", CLIENT_K, Some(OBJECT_K)),
        ],
        false,
        |_| {},
    )
    .await
}

struct Nmi {
    addr: SocketAddr,
    server: Arc<nmi::server::Server<nmi::token::Imds>>,
    _shutdown: aadpodid_runtime::Shutdown,
}

impl Nmi {
    async fn start(
        imds: SocketAddr,
        mode: nmi::args::OperationMode,
        identities: &[AzureIdentity],
    ) -> anyhow::Result<Nmi> {
        Self::start_with(imds, mode, identities, Default::default()).await
    }

    /// Like [`Nmi::start`], protecting `cluster` (as `run` does from the flags).
    async fn start_with(
        imds: SocketAddr,
        mode: nmi::args::OperationMode,
        identities: &[AzureIdentity],
        cluster: nmi::cluster::ClusterIdentities,
    ) -> anyhow::Result<Nmi> {
        let source =
            nmi::token::Imds::new(&format!("http://{imds}"), "test").map_err(anyhow::Error::msg)?;
        let state = Arc::new(nmi::server::State::default());
        state.update(|i| {
            i.apply_pod(&pod());
            i.reset(identities);
            i.reset(&identities.iter().map(binding).collect::<Vec<_>>());
        });
        let config = nmi::server::Config {
            mode,
            namespaced: mode == nmi::args::OperationMode::Managed,
            ..common::config(imds)
        };
        let cache = nmi::token::TokenCache::new(source).with_cluster_identities(cluster);
        let server = Arc::new(common::server(state, cache, config));
        let (addr, shutdown) = common::serve(Arc::clone(&server)).await;
        Ok(Nmi {
            addr,
            server,
            _shutdown: shutdown,
        })
    }

    /// The pod's AzureAssignedIdentities become those of `identities`.
    fn assign(&self, identities: &[&AzureIdentity]) {
        let aais: Vec<AzureAssignedIdentity> = identities.iter().map(|i| aai(i)).collect();
        self.server.state.update(|i| i.reset(&aais));
    }

    /// A token request from the pod (127.0.0.1): (status, JSON body).
    async fn get(&self, extra: &str) -> anyhow::Result<(u16, Value)> {
        common::ask(self.addr, extra).await
    }

    fn refused(&self, reason: &str) -> u64 {
        self.server
            .metrics
            .identity_refused
            .with_label_values(&[NS, reason])
            .get()
    }
}

/// The token requests IMDS has had from NMI.
fn imds_token_requests(emu: &Emulator) -> Vec<String> {
    emu.requests(0)
        .into_iter()
        .filter(|r| r.uri.contains("oauth2/token"))
        .map(|r| r.uri)
        .collect()
}

/// The cluster identities as `nmi --cloudconfig=<azure.json naming the
/// kubelet identity> --immutable-user-msis=<immutable>` reads them.
fn cluster_from_flags(
    immutable: &str,
    serve: bool,
) -> anyhow::Result<nmi::cluster::ClusterIdentities> {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "nmi-identity-check-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("azure.json");
    std::fs::write(
        &path,
        json!({
            "cloud": "AzurePublicCloud",
            "useManagedIdentityExtension": true,
            "userAssignedIdentityID": CLIENT_K.to_uppercase(),
        })
        .to_string(),
    )?;
    let path = path.to_str().context("a UTF-8 path")?;
    let (cluster, warning) =
        nmi::cluster::from_flags(path, immutable, serve, |p| std::fs::read_to_string(p));
    assert_eq!(warning, None);
    std::fs::remove_dir_all(&dir)?;
    Ok(cluster)
}

fn appid(body: &Value) -> String {
    let token = body["access_token"].as_str().unwrap_or_default();
    let payload = token.split('.').nth(1).unwrap_or_default();
    let claims: Value = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    claims["appid"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_client_id_gets_403_and_never_the_other_identitys_token() -> anyhow::Result<()> {
    let (emu, imds) = emulator().await;
    // `honest` is id-a as it is. `forged` names id-a's resource ID (which MIC
    // would assign) with the kubelet identity's client ID. `incomplete` has no
    // resource ID. `kube-b` is the kubelet identity as a tenant would forge
    // it from the other side: its resource ID, id-a's client ID.
    let honest = identity("honest", "id-a", CLIENT_A);
    let forged = identity("forged", "id-a", CLIENT_K);
    let incomplete = identity("incomplete", "", CLIENT_A);
    let reverse = identity("reverse", "kubelet", CLIENT_A);
    let nmi = Nmi::start(
        imds,
        nmi::args::OperationMode::Standard,
        &[
            honest.clone(),
            forged.clone(),
            incomplete.clone(),
            reverse.clone(),
        ],
    )
    .await?;

    nmi.assign(&[&honest]);
    let (code, body) = nmi.get("").await?;
    assert_eq!((code, appid(&body).as_str()), (200, CLIENT_A), "{body}");

    for (who, id) in [("forged", &forged), ("reverse", &reverse)] {
        nmi.assign(&[id]);
        for selector in ["".to_string(), format!("&client_id={}", id.spec.client_id)] {
            let before = nmi.refused("client_id_mismatch");
            let (code, body) = nmi.get(&selector).await?;
            assert_eq!(code, 403, "{who} {selector}: {body}");
            assert!(body.get("access_token").is_none(), "{who}: {body}");
            let text = body["error_description"].as_str().unwrap_or_default();
            assert!(
                text.contains(&id.spec.resource_id) && text.contains(&id.spec.client_id),
                "{who}: the message names both IDs: {body}"
            );
            assert_eq!(
                nmi.refused("client_id_mismatch"),
                before + 1,
                "{who}: counted every time (nothing cached)"
            );
        }
    }

    nmi.assign(&[&incomplete]);
    let before = emu.requests(0).len();
    let (code, body) = nmi.get("").await?;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap_or_default()
            .contains("needs both spec.resourceID and spec.clientID"),
        "{body}"
    );
    assert_eq!(nmi.refused("incomplete_identity"), 1);
    assert_eq!(emu.requests(0).len(), before, "IMDS was not asked");

    // object_id: each candidate is fetched by its resource ID and checked;
    // the honest one answers for its object ID, the kubelet's object ID
    // gets nothing (its only route is the forged identity, refused).
    nmi.assign(&[&forged, &honest]);
    let (code, body) = nmi.get(&format!("&object_id={OBJECT_A}")).await?;
    assert_eq!((code, appid(&body).as_str()), (200, CLIENT_A), "{body}");
    let (code, body) = nmi
        .get(&format!("&object_id={}", OBJECT_K.to_uppercase()))
        .await?;
    assert_ne!(code, 200, "{body}");
    assert!(body.get("access_token").is_none(), "{body}");
    nmi.assign(&[&honest]);
    let (code, body) = nmi.get(&format!("&object_id={OBJECT_K}")).await?;
    assert_eq!(code, 404, "{body}");

    // Every token request NMI made named the identity by resource ID only,
    // and whatever IMDS returned for the kubelet identity stayed in NMI.
    let imds_requests: Vec<String> = emu
        .requests(0)
        .into_iter()
        .filter(|r| r.uri.contains("oauth2/token"))
        .map(|r| r.uri)
        .collect();
    assert!(!imds_requests.is_empty());
    for uri in &imds_requests {
        assert!(
            uri.contains("msi_res_id=")
                && !uri.contains("client_id=")
                && !uri.contains("object_id="),
            "{uri}"
        );
    }
    Ok(())
}

/// Managed mode (no AzureAssignedIdentities: the bindings in the pod's
/// namespace decide) fetches by resource ID and checks the client ID too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_mode_checks_the_client_id_too() -> anyhow::Result<()> {
    let (_emu, imds) = emulator().await;
    let honest = identity("honest", "id-a", CLIENT_A);
    let nmi = Nmi::start(imds, nmi::args::OperationMode::Managed, &[honest]).await?;
    let (code, body) = nmi.get("").await?;
    assert_eq!((code, appid(&body).as_str()), (200, CLIENT_A), "{body}");

    let forged = identity("forged", "id-a", CLIENT_K);
    let nmi = Nmi::start(imds, nmi::args::OperationMode::Managed, &[forged]).await?;
    let (code, body) = nmi.get("").await?;
    assert_eq!(code, 403, "{body}");
    assert!(body.get("access_token").is_none(), "{body}");
    assert_eq!(nmi.refused("client_id_mismatch"), 1);
    Ok(())
}

/// Managed mode has no MIC to refuse the kubelet identity: an AzureIdentity
/// in the user's namespace naming its resource ID and client ID correctly is
/// refused by NMI itself, before IMDS is asked, unless the administrator
/// passed --serve-cluster-identities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_mode_refuses_the_kubelet_identity_without_asking_imds() -> anyhow::Result<()> {
    assert_eq!(nmi::metrics::REFUSED_CLUSTER_IDENTITY, "cluster_identity");
    assert_eq!(nmi::server::REASON_CLUSTER_IDENTITY, "cluster identity");
    let (emu, imds) = emulator().await;
    let kubelet = identity("kubelet-own", "kubelet", CLIENT_K);
    let shouting = identity("kubelet-upper", "kubelet", &CLIENT_K.to_uppercase());
    let honest = identity("honest", "id-a", CLIENT_A);
    let nmi = Nmi::start_with(
        imds,
        nmi::args::OperationMode::Managed,
        &[kubelet.clone(), shouting, honest],
        cluster_from_flags("", false)?,
    )
    .await?;
    let selectors = [
        format!("&client_id={CLIENT_K}"),
        format!("&client_id={}", CLIENT_K.to_uppercase()),
        format!("&msi_res_id={}", kubelet.spec.resource_id),
        format!("&object_id={OBJECT_K}"),
    ];
    for (k, selector) in selectors.iter().enumerate() {
        let (code, body) = nmi.get(selector).await?;
        assert_eq!(code, 403, "{selector}: {body}");
        assert!(body.get("access_token").is_none(), "{selector}: {body}");
        let text = body["error_description"].as_str().unwrap_or_default();
        assert!(
            text.contains("is one of the cluster's own identities; nmi serves it only with --serve-cluster-identities"),
            "{selector}: {body}"
        );
        assert!(
            nmi.refused("cluster_identity") > k as u64,
            "{selector}: counted every time (nothing cached)"
        );
    }
    // Other identities of the pod are served; the object_id request above
    // fetched id-a's token (its candidates include it) but never the kubelet's.
    let (code, body) = nmi.get(&format!("&client_id={CLIENT_A}")).await?;
    assert_eq!((code, appid(&body).as_str()), (200, CLIENT_A), "{body}");
    let (code, body) = nmi.get(&format!("&object_id={OBJECT_A}")).await?;
    assert_eq!((code, appid(&body).as_str()), (200, CLIENT_A), "{body}");
    let asked = imds_token_requests(&emu);
    assert!(!asked.is_empty());
    for uri in &asked {
        assert!(
            uri.contains("userAssignedIdentities%2Fid-a") && !uri.contains("kubelet"),
            "IMDS was asked for {uri}"
        );
    }
    assert_eq!(nmi.refused("client_id_mismatch"), 0);

    // The same identity with --serve-cluster-identities: served.
    let nmi = Nmi::start_with(
        imds,
        nmi::args::OperationMode::Managed,
        &[kubelet],
        cluster_from_flags("", true)?,
    )
    .await?;
    let (code, body) = nmi.get("").await?;
    assert_eq!((code, appid(&body).as_str()), (200, CLIENT_K), "{body}");
    assert_eq!(nmi.refused("cluster_identity"), 0);
    Ok(())
}

/// `--immutable-user-msis` protects its client IDs the same way, in standard
/// mode too (an Assigned AzureAssignedIdentity is not enough).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immutable_user_msis_are_refused_in_standard_mode() -> anyhow::Result<()> {
    let (emu, imds) = emulator().await;
    let honest = identity("honest", "id-a", CLIENT_A);
    let nmi = Nmi::start_with(
        imds,
        nmi::args::OperationMode::Standard,
        std::slice::from_ref(&honest),
        cluster_from_flags(&format!("other-id, {}", CLIENT_A.to_uppercase()), false)?,
    )
    .await?;
    nmi.assign(&[&honest]);
    for selector in ["".to_string(), format!("&object_id={OBJECT_A}")] {
        let (code, body) = nmi.get(&selector).await?;
        assert_eq!(code, 403, "{selector}: {body}");
        assert!(body.get("access_token").is_none(), "{body}");
    }
    assert_eq!(nmi.refused("cluster_identity"), 2);
    assert!(imds_token_requests(&emu).is_empty(), "IMDS was not asked");

    let nmi = Nmi::start_with(
        imds,
        nmi::args::OperationMode::Standard,
        std::slice::from_ref(&honest),
        cluster_from_flags(CLIENT_A, true)?,
    )
    .await?;
    nmi.assign(&[&honest]);
    let (code, body) = nmi.get("").await?;
    assert_eq!((code, appid(&body).as_str()), (200, CLIENT_A), "{body}");
    Ok(())
}
