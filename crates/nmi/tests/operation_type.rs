//! The `operation_type` label of NMI's token fetches, in process (NMI's
//! token server over the Azure emulator's IMDS on loopback, no Kubernetes
//! client): a user-assigned identity's token from IMDS is upstream's
//! `adal_token_msi_userassignedid`, a service principal's upstream's
//! `adal_token`, and a federated identity's exchange (any type) has its own
//! `federated_token_exchange`, in `aadpodidentity_imds_operations_duration_seconds`
//! and, when the fetch fails, `aadpodidentity_imds_operations_errors_count`.

// The shared scaffolding fails the test loudly (it unwraps).
#[allow(clippy::unwrap_used, reason = "test scaffolding")]
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use aadpodid_api::{ANNOTATION_TOKEN_SOURCE, IdentityType};
use common::resource_id;
use nmi::metrics::{IMDS_OP_FEDERATED, IMDS_OP_SERVICE_PRINCIPAL, IMDS_OP_USER_ASSIGNED};

const CLIENT_A: &str = "aaaaaaaa-0000-4000-8000-00000000000a";
const NS: &str = "team";

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
        let mut id = common::identity(NS, "a", CLIENT_A, &resource_id("id-a"));
        id.spec.tenant_id = common::TENANT.into();
        id.spec.r#type = kind;
        id.metadata.annotations = annotation
            .map(|s| BTreeMap::from([(ANNOTATION_TOKEN_SOURCE.to_string(), s.to_string())]));
        let binding = common::binding(&id, "sel");
        let mut pod = common::pod("app", NS, "sel", "127.0.0.1");
        pod.metadata.uid = Some("uid-app".into());
        let state = Arc::new(nmi::server::State::default());
        state.update(|i| {
            i.apply_pod(&pod);
            i.reset(std::slice::from_ref(&id));
            i.reset(std::slice::from_ref(&binding));
            i.reset(&[common::assigned(&id, &binding, "app", NS)]);
        });
        let source =
            nmi::token::Imds::new(&format!("http://{imds}"), "test").map_err(anyhow::Error::msg)?;
        let server = Arc::new(common::server(
            state,
            nmi::token::TokenCache::new(source),
            common::config(imds),
        ));
        let (addr, _shutdown) = common::serve(Arc::clone(&server)).await;
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
