//! A pod whose AzureAssignedIdentity is still `Created` gets no token, even
//! when the node's IMDS already serves the identity: `Assigned` is MIC's
//! verdict after its own checks against ARM (the client ID ARM reports, and
//! whether the identity is one of the cluster's own, such as one that was on
//! the node before MIC), which NMI cannot make. An identity on the node
//! before MIC (an add-on's) is served by IMDS at once, so serving `Created`
//! would hand it to any pod that declares it. In process, over the Azure
//! emulator's IMDS on loopback (no cluster, no root).

// The shared scaffolding fails the test loudly (it unwraps).
#[allow(clippy::unwrap_used, reason = "test scaffolding")]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aadpodid_api::{AzureAssignedIdentity, AzureAssignedIdentityStatus, AzureIdentity};
use azure_emulator::Emulator;
use common::resource_id;
use serde_json::Value;

const CLIENT_A: &str = "aaaaaaaa-0000-4000-8000-00000000000a";
const OBJECT_A: &str = "aaaaaaaa-1111-4000-8000-00000000000a";
const NS: &str = "team";

/// The emulator with `id-a` on the VM `node` (as an add-on's identity that
/// was there before MIC would be).
async fn emulator() -> (Emulator, SocketAddr) {
    common::emulator(
        vec![common::identity_seed("id-a", CLIENT_A, Some(OBJECT_A))],
        false,
        |_| {},
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
    state: Arc<nmi::server::State>,
    _shutdown: aadpodid_runtime::Shutdown,
}

/// NMI with the pod `team/app` (label `sel`) at 127.0.0.1, the live identity
/// `id` with its binding, the pod's Created AzureAssignedIdentity for `id`,
/// and a wait budget of `budget_secs` for a Created identity.
async fn nmi(imds: SocketAddr, id: &AzureIdentity, budget_secs: u32) -> anyhow::Result<Nmi> {
    let source =
        nmi::token::Imds::new(&format!("http://{imds}"), "test").map_err(anyhow::Error::msg)?;
    let state = Arc::new(nmi::server::State::default());
    state.update(|i| {
        i.apply_pod(&common::pod("app", NS, "sel", "127.0.0.1"));
        i.reset(std::slice::from_ref(id));
        i.reset(&[common::binding(id, "sel")]);
        i.reset(&[aai(id, "Created")]);
    });
    let config = nmi::server::Config {
        retry_attempts_for_created: 0,
        retry_attempts_for_assigned: budget_secs,
        retry_interval_secs: 1,
        ..common::config(imds)
    };
    let cache = nmi::token::TokenCache::new(source);
    let server = Arc::new(common::server(Arc::clone(&state), cache, config));
    let (addr, shutdown) = common::serve(server).await;
    Ok(Nmi {
        addr,
        state,
        _shutdown: shutdown,
    })
}

impl Nmi {
    /// A token request from the pod: (status, JSON body, when answered).
    async fn get(&self, extra: &str) -> anyhow::Result<(u16, Value, Instant)> {
        let (status, v) = common::ask(self.addr, extra).await?;
        Ok((status, v, Instant::now()))
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
async fn a_created_identity_imds_serves_is_not_served_until_assigned() -> anyhow::Result<()> {
    let (emu, imds) = emulator().await;
    let a = live("id-a", CLIENT_A);
    let nmi = nmi(imds, &a, 2).await?;
    // Every way of asking, object_id included: the wait's own answer, and
    // IMDS never asked.
    let queries = [
        String::new(),
        format!("&client_id={CLIENT_A}"),
        format!("&msi_res_id={}", resource_id("id-a")),
        format!("&object_id={OBJECT_A}"),
    ];
    let mut answers = Vec::new();
    for extra in &queries {
        let (status, body, _) = nmi.get(extra).await?;
        answers.push((extra.as_str(), status, body["error_description"].clone()));
    }
    let wait_over = Value::from(
        "getting assigned identities for pod team/app in ASSIGNED state failed after 2 attempts, retry duration [1]s, error: <nil>. Check MIC pod logs for identity assignment errors",
    );
    let want: Vec<_> = queries
        .iter()
        .map(|q| (q.as_str(), 404, wait_over.clone()))
        .collect();
    assert_eq!(answers, want);
    assert_eq!(imds_token_requests(&emu), 0, "IMDS was asked");
    // A request waiting meanwhile is answered once MIC marks it Assigned.
    let assigned_at = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        nmi.state.update(|i| i.reset(&[aai(&a, "Assigned")]));
        Instant::now()
    };
    let (answer, assigned_at) = tokio::join!(nmi.get(""), assigned_at);
    let (status, body, answered_at) = answer?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["client_id"], CLIENT_A, "{body}");
    assert!(answered_at >= assigned_at, "answered before Assigned");
    Ok(())
}
