//! A pod whose AzureAssignedIdentity is still `Created` (MIC is assigning the
//! identity to the node) gets its token as soon as IMDS serves the identity,
//! after every entitlement check an `Assigned` one passes; in process, over
//! the Azure emulator's IMDS on loopback (no cluster, no root). An AAI that
//! fails a check never makes NMI ask IMDS, and a waiting request asks IMDS at
//! most once per `PROBE_EVERY`.

// The shared scaffolding fails the test loudly (it unwraps).
#[allow(clippy::unwrap_used, reason = "test scaffolding")]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aadpodid_api::{AzureAssignedIdentity, AzureAssignedIdentityStatus, AzureIdentity};
use anyhow::Context as _;
use azure_emulator::Emulator;
use common::{ARM, resource_id};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::Value;

const CLIENT_A: &str = "aaaaaaaa-0000-4000-8000-00000000000a";
const OBJECT_A: &str = "aaaaaaaa-1111-4000-8000-00000000000a";
/// An identity that exists but that the node's VM does not hold (yet).
const CLIENT_N: &str = "dddddddd-0000-4000-8000-00000000000d";
const NS: &str = "team";

/// The emulator with `id-a` on the VM `node` and `id-new` not on it.
async fn emulator() -> (Emulator, SocketAddr) {
    common::emulator(
        vec![
            common::identity_seed("id-a", CLIENT_A, Some(OBJECT_A)),
            common::identity_seed("id-new", CLIENT_N, None),
        ],
        false,
        |cfg| {
            for vm in &mut cfg.virtual_machines {
                vm.identity.user_assigned.retain(|n| n != "id-new");
            }
        },
    )
    .await
}

fn live(name: &str, client_id: &str) -> AzureIdentity {
    common::identity(NS, name, client_id, &resource_id(name))
}

/// MIC's AzureAssignedIdentity for the pod and `identity`, in `status`.
fn aai(identity: &AzureIdentity, status: &str) -> AzureAssignedIdentity {
    let mut a = common::assigned(identity, &common::binding(identity, "sel"), "app", NS);
    a.status = Some(AzureAssignedIdentityStatus {
        status: status.into(),
        ..Default::default()
    });
    a
}

struct Nmi {
    addr: SocketAddr,
    _shutdown: aadpodid_runtime::Shutdown,
}

/// NMI with the pod `team/app` (label `pod_label`) at 127.0.0.1, the live
/// identities `ids` with their bindings (selector `sel`), the pod's `aais`,
/// and a wait budget of `budget_secs` for a Created identity.
async fn nmi(
    imds: SocketAddr,
    ids: &[AzureIdentity],
    aais: &[AzureAssignedIdentity],
    pod_label: &str,
    budget_secs: u64,
) -> anyhow::Result<Nmi> {
    let source =
        nmi::token::Imds::new(&format!("http://{imds}"), "test").map_err(anyhow::Error::msg)?;
    let state = Arc::new(nmi::server::State::default());
    state.update(|i| {
        i.apply_pod(&common::pod("app", NS, pod_label, "127.0.0.1"));
        i.reset(ids);
        i.reset(
            &ids.iter()
                .map(|id| common::binding(id, "sel"))
                .collect::<Vec<_>>(),
        );
        i.reset(aais);
    });
    let config = nmi::server::Config {
        retry_attempts_for_created: 0,
        retry_attempts_for_assigned: u32::try_from(budget_secs)?,
        retry_interval_secs: 1,
        ..common::config(imds)
    };
    let cache = nmi::token::TokenCache::new(source);
    let server = Arc::new(common::server(state, cache, config));
    let (addr, shutdown) = common::serve(server).await;
    Ok(Nmi {
        addr,
        _shutdown: shutdown,
    })
}

/// NMI with one live identity `id`, the pod (label `sel`) and its Created
/// AzureAssignedIdentity for `id`, and a wait budget of `budget_secs`.
async fn created(imds: SocketAddr, id: &AzureIdentity, budget_secs: u64) -> anyhow::Result<Nmi> {
    let aais = [aai(id, "Created")];
    nmi(imds, std::slice::from_ref(id), &aais, "sel", budget_secs).await
}

impl Nmi {
    /// A token request from the pod: (status, JSON body, time taken).
    async fn get(&self, extra: &str) -> anyhow::Result<(u16, Value, Duration)> {
        let started = Instant::now();
        let stream = tokio::net::TcpStream::connect(self.addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let resp = sender
            .send_request(common::token_request(ARM, extra))
            .await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        let v: Value = serde_json::from_slice(&body)
            .with_context(|| format!("not JSON: {}", String::from_utf8_lossy(&body)))?;
        Ok((status, v, started.elapsed()))
    }
}

/// The token requests IMDS has had from NMI.
fn imds_token_requests(emu: &Emulator) -> usize {
    emu.requests(0)
        .into_iter()
        .filter(|r| r.uri.contains("oauth2/token"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_identity_is_served_as_soon_as_imds_serves_it() -> anyhow::Result<()> {
    let (emu, imds) = emulator().await;
    let a = live("id-a", CLIENT_A);
    let nmi = created(imds, &a, 20).await?;
    let (status, body, took) = nmi.get("").await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["client_id"], CLIENT_A, "{body}");
    assert!(
        took < Duration::from_secs(5),
        "served when IMDS had the identity, not after the 20 s wait: {took:?}"
    );
    // By client ID and resource ID too.
    let (status, body, _) = nmi.get(&format!("&client_id={CLIENT_A}")).await?;
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = nmi
        .get(&format!("&msi_res_id={}", resource_id("id-a")))
        .await?;
    assert_eq!(status, 200, "{body}");
    assert!(imds_token_requests(&emu) >= 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_identity_imds_does_not_serve_waits_asking_at_most_once_a_second()
-> anyhow::Result<()> {
    let (emu, imds) = emulator().await;
    let n = live("id-new", CLIENT_N);
    let nmi = created(imds, &n, 3).await?;
    let (status, body, took) = nmi.get("").await?;
    assert_eq!(status, 404, "{body}");
    let message = body["error_description"].as_str().unwrap_or_default();
    assert!(
        message.contains("in ASSIGNED state failed after 3 attempts"),
        "the wait's own answer: {body}"
    );
    assert!(
        took >= Duration::from_secs(3),
        "waited its budget: {took:?}"
    );
    let asked = imds_token_requests(&emu);
    assert!(
        (1..=5).contains(&asked),
        "IMDS asked {asked} times in {took:?}: at most once a second"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_aai_that_fails_a_check_never_reaches_imds() -> anyhow::Result<()> {
    let (emu, imds) = emulator().await;
    let a = live("id-a", CLIENT_A);
    // The embedded identity is another object than the live one (forged).
    let mut forged = aai(&a, "Created");
    if let Some(i) = forged.spec.azure_identity_ref.as_deref_mut() {
        i.metadata.uid = Some("forged".into());
    }
    // (AAI, pod label, name)
    let cases = [
        (forged, "sel", "forged identity UID"),
        (
            aai(&a, "Created"),
            "other",
            "pod relabelled away from the binding",
        ),
    ];
    for (aai, label, name) in cases {
        let nmi = nmi(imds, std::slice::from_ref(&a), &[aai], label, 1).await?;
        let (status, body, _) = nmi.get("").await?;
        assert_ne!(status, 200, "{name}: {body}");
        assert!(body.get("access_token").is_none(), "{name}: {body}");
        assert_eq!(imds_token_requests(&emu), 0, "{name}: IMDS was asked");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_id_request_waits_for_assigned() -> anyhow::Result<()> {
    let (emu, imds) = emulator().await;
    let a = live("id-a", CLIENT_A);
    let nmi = created(imds, &a, 1).await?;
    let (status, body, _) = nmi.get(&format!("&object_id={OBJECT_A}")).await?;
    assert_eq!(status, 404, "{body}");
    assert_eq!(imds_token_requests(&emu), 0, "IMDS was asked");
    Ok(())
}
