//! Which source NMI asks, in process: NMI's token server over the Azure
//! emulator's IMDS on loopback, with no Kubernetes client (no cluster, no
//! root). An identity whose token source is `federated` (its annotation, or
//! `--default-token-source`) never reaches IMDS: without a client NMI cannot
//! ask the API server for the pod's ServiceAccount token and says so (503);
//! a value naming no source is refused (403, naming the annotation, counted);
//! `imds` goes to IMDS as always. In standard and managed mode. And the
//! `operation_type` label each fetch is counted under.

// The shared scaffolding fails the test loudly (it unwraps).
#[allow(clippy::unwrap_used, reason = "test scaffolding")]
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use aadpodid_api::{ANNOTATION_TOKEN_SOURCE, AzureIdentity, IdentityType, TokenSource};
use common::resource_id;
use nmi::args::OperationMode;
use nmi::metrics::{IMDS_OP_FEDERATED, IMDS_OP_SERVICE_PRINCIPAL, IMDS_OP_USER_ASSIGNED};

const CLIENT_A: &str = "aaaaaaaa-0000-4000-8000-00000000000a";
const NS: &str = "team";

/// AzureIdentity `a` for the emulator's `id-a`, annotated with `source`.
fn identity(source: Option<&str>) -> AzureIdentity {
    let mut id = common::identity(NS, "a", CLIENT_A, &resource_id("id-a"));
    id.spec.tenant_id = common::TENANT.into();
    id.metadata.annotations =
        source.map(|s| BTreeMap::from([(ANNOTATION_TOKEN_SOURCE.to_string(), s.to_string())]));
    id
}

#[tokio::test]
async fn each_identity_is_served_from_its_source() -> anyhow::Result<()> {
    let (emu, imds) = common::emulator(
        vec![common::identity_seed("id-a", CLIENT_A, None)],
        false,
        |_| {},
    )
    .await;
    use TokenSource::{Federated, Imds};
    // (annotation, --default-token-source, status, a text of the answer,
    // IMDS asked)
    #[rustfmt::skip]
    let cases: [(Option<&str>, TokenSource, u16, &str, bool); 6] = [
        (None, Imds, 200, "access_token", true),
        (Some("imds"), Federated, 200, "access_token", true),
        (Some("federated"), Imds, 503, "no Kubernetes client", false),
        (None, Federated, 503, "no Kubernetes client", false),
        (Some("Federated"), Imds, 403, "annotation aadpodidentity.k8s.io/token-source is \"Federated\"", false),
        (Some(""), Federated, 403, "the values are \"federated\" and \"imds\"", false),
    ];
    for mode in [OperationMode::Standard, OperationMode::Managed] {
        for (annotation, default, status, text, imds_asked) in cases {
            let case = format!("{mode:?}, annotation {annotation:?}, default {default}");
            let id = identity(annotation);
            let config = nmi::server::Config {
                mode,
                namespaced: mode == OperationMode::Managed,
                default_token_source: default,
                ..common::config(imds)
            };
            let (server, addr, _shutdown) = serve_one_pod(&id, imds, config).await?;
            let before = imds_token_requests(&emu);
            let (got, body) = common::ask(addr, "").await?;
            assert_eq!(got, status, "{case}: {body}");
            let answer = match body["error_description"].as_str() {
                Some(d) => d.to_string(),
                None => body.to_string(),
            };
            assert!(answer.contains(text), "{case}: {body}");
            let asked = imds_token_requests(&emu) > before;
            assert_eq!(asked, imds_asked, "{case}: IMDS asked");
            let refused = server
                .metrics
                .identity_refused
                .with_label_values(&[NS, "unknown_token_source"])
                .get();
            assert_eq!(refused, u64::from(status == 403), "{case}: counted");
        }
    }
    Ok(())
}

/// NMI's token server with `config` over the emulator's IMDS at `imds`,
/// knowing one pod `app` (127.0.0.1) of namespace `NS`, bound to `id` and
/// with its Assigned AzureAssignedIdentity. Serving until the handle drops.
async fn serve_one_pod(
    id: &AzureIdentity,
    imds: std::net::SocketAddr,
    config: nmi::server::Config,
) -> anyhow::Result<(
    Arc<nmi::server::Server<nmi::token::Imds>>,
    std::net::SocketAddr,
    aadpodid_runtime::Shutdown,
)> {
    let binding = common::binding(id, "sel");
    let mut pod = common::pod("app", NS, "sel", "127.0.0.1");
    pod.metadata.uid = Some("uid-app".into());
    let state = Arc::new(nmi::server::State::default());
    state.update(|i| {
        i.apply_pod(&pod);
        i.reset(std::slice::from_ref(id));
        i.reset(std::slice::from_ref(&binding));
        i.reset(&[common::assigned(id, &binding, "app", NS)]);
    });
    let source =
        nmi::token::Imds::new(&format!("http://{imds}"), "test").map_err(anyhow::Error::msg)?;
    let server = Arc::new(common::server(
        state,
        nmi::token::TokenCache::new(source),
        config,
    ));
    let (addr, shutdown) = common::serve(Arc::clone(&server)).await;
    Ok((server, addr, shutdown))
}

/// The token requests IMDS has had.
fn imds_token_requests(emu: &azure_emulator::Emulator) -> usize {
    emu.requests(0)
        .iter()
        .filter(|r| r.uri.contains("oauth2/token"))
        .count()
}

/// The `operation_type` label of the fetches: a user-assigned identity's
/// token from IMDS is upstream's `adal_token_msi_userassignedid`, a service
/// principal's upstream's `adal_token`, and a federated identity's exchange
/// (any type) has its own `federated_token_exchange`, in
/// `aadpodidentity_imds_operations_duration_seconds` and, when the fetch
/// fails, `aadpodidentity_imds_operations_errors_count`.
#[tokio::test]
async fn each_fetch_is_labelled_by_its_source_and_type() -> anyhow::Result<()> {
    let (_emu, imds) = common::emulator(
        vec![common::identity_seed("id-a", CLIENT_A, None)],
        false,
        |_| {},
    )
    .await;
    use IdentityType::{ServicePrincipal, UserAssignedMsi};
    // (type, token-source annotation, status, operation_type, an error counted)
    #[rustfmt::skip]
    let cases = [
        (UserAssignedMsi, None, 200, IMDS_OP_USER_ASSIGNED, false),
        (UserAssignedMsi, Some("federated"), 503, IMDS_OP_FEDERATED, true),
        (ServicePrincipal, Some("federated"), 503, IMDS_OP_FEDERATED, true),
        (ServicePrincipal, None, 0, IMDS_OP_SERVICE_PRINCIPAL, true),
    ];
    for (kind, annotation, status, want, failed) in cases {
        let case = format!("{kind:?}, annotation {annotation:?}");
        let mut id = identity(annotation);
        id.spec.r#type = kind;
        let (server, addr, _shutdown) = serve_one_pod(&id, imds, common::config(imds)).await?;
        let (got, body) = common::ask(addr, "").await?;
        if status != 0 {
            assert_eq!(got, status, "{case}: {body}");
        }
        let m = &server.metrics;
        for op in [
            IMDS_OP_USER_ASSIGNED,
            IMDS_OP_SERVICE_PRINCIPAL,
            IMDS_OP_FEDERATED,
        ] {
            let timed = m
                .imds_operations
                .with_label_values(&[op])
                .get_sample_count();
            let errors = m.imds_errors.with_label_values(&[op]).get();
            assert_eq!(timed, u64::from(op == want), "{case}: {op} timed ({body})");
            assert_eq!(
                errors,
                u64::from(op == want && failed),
                "{case}: {op} errors ({body})"
            );
        }
    }
    Ok(())
}
