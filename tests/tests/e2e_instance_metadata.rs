//! Upstream's e2e `instance_metadata` scenario ("should receive proper HTTP
//! status code when contacting various endpoints") on a test node
//! ([`aadpodid_tests::nmi_node::NmiNode`]: NMI from the `e2e-nmi` binary in a
//! node network namespace, the emulator's IMDS behind 169.254.169.254:80,
//! pods in pod namespaces).
//!
//! Upstream asks NMI on `127.0.0.1:2579` from a host-network pod; here every
//! request is made both that way (from the node namespace) and as an
//! application pod makes it (to 169.254.169.254, redirected to NMI).
//!
//! What upstream asserts, and what is asserted here:
//! - an unknown path with `Metadata: true` gets 404. Upstream proxied it and
//!   passed IMDS's 404 on; NMI forwards only allow-listed IMDS paths
//!   (docs/upstream-behaviour.md#nmi-routes-and-requests), so here the 404 is
//!   NMI's own and IMDS never sees the request (its counter is checked);
//! - without the header, upstream's exact 400 body `Required metadata header
//!   not specified`. Upstream checked the header before proxying any path, so
//!   its unknown path got that 400; here an unknown path is refused (404)
//!   before the header matters, and the 400 is asserted on a forwarded path,
//!   `/metadata/instance`;
//! - with `--block-instance-metadata`, `/metadata/instance` (and below it)
//!   gets 403, header or not, and IMDS never sees it;
//! - beyond upstream's test: without the block, `/metadata/instance` is
//!   forwarded and the answer is the node's own instance metadata.

use aadpodid_tests::netns::{IMDS_ADDRESS, NetNs};
use aadpodid_tests::nmi_node::{NmiNode, Options, curl_with_head, nmi_bin};

/// NMI's port on the node (upstream's default, which the test node keeps).
const NMI_PORT: u16 = 2579;
/// Upstream's body for a request without `Metadata: true`.
const MISSING_HEADER_BODY: &str =
    r#"{"error":"invalid_request","error_description":"Required metadata header not specified"}"#;
/// An IMDS instance-metadata request as SDKs make it.
const INSTANCE: &str = "/metadata/instance?api-version=2021-02-01";

/// Where a request is made from: the node (host network, NMI's port on
/// loopback, as upstream's busybox pod) or pod 0 (the metadata address).
fn callers(f: &NmiNode) -> [(&'static str, &NetNs, String); 2] {
    [
        ("node", f.node_ns(), format!("http://127.0.0.1:{NMI_PORT}")),
        ("pod", f.pod_ns(0), format!("http://{IMDS_ADDRESS}")),
    ]
}

/// Requests IMDS got so far (every machine).
fn imds_seen(f: &NmiNode) -> anyhow::Result<u64> {
    Ok(f.emu()?.counters().imds_requests.values().sum())
}

/// `path` from every caller with `headers`: each answer's status and body,
/// and whether IMDS saw any of the requests.
async fn ask(
    f: &NmiNode,
    path: &str,
    headers: &[&str],
) -> anyhow::Result<(Vec<(String, u16, String)>, bool)> {
    let before = imds_seen(f)?;
    let mut answers = Vec::new();
    for (who, ns, base) in callers(f) {
        let (code, _, body) = curl_with_head(ns, &format!("{base}{path}"), headers).await?;
        answers.push((format!("{who} {path} {headers:?}"), code, body));
    }
    Ok((answers, imds_seen(f)? > before))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instance_metadata_status_codes() -> anyhow::Result<()> {
    let mut opts = Options::new(1, nmi_bin(env!("CARGO_BIN_EXE_e2e-nmi")));
    opts.namespace = "instance-md";
    let mut f = NmiNode::start(opts).await?;
    let md = ["Metadata: true"];

    // An unknown path: 404, answered by NMI itself.
    let (answers, reached) = ask(&f, "/doesnotexist", &md).await?;
    for (what, code, body) in &answers {
        assert_eq!(*code, 404, "{what}: {body}");
    }
    assert!(!reached, "an unknown path was forwarded to IMDS");
    let (answers, reached) = ask(&f, "/doesnotexist", &[]).await?;
    for (what, code, body) in &answers {
        assert_eq!(*code, 404, "{what}: {body}");
    }
    assert!(!reached, "an unknown path was forwarded to IMDS");

    // The header is required: upstream's exact 400, nothing forwarded.
    let (answers, reached) = ask(&f, INSTANCE, &[]).await?;
    for (what, code, body) in &answers {
        assert_eq!((*code, body.as_str()), (400, MISSING_HEADER_BODY), "{what}");
    }
    assert!(!reached, "a request without the header was forwarded");

    // With the header, the node's own instance metadata, from its IMDS.
    let (answers, reached) = ask(&f, INSTANCE, &md).await?;
    for (what, code, body) in &answers {
        assert_eq!(*code, 200, "{what}: {body}");
        let v: serde_json::Value = serde_json::from_str(body)?;
        assert_eq!(v["compute"]["name"], f.node_name.as_str(), "{what}: {body}");
    }
    assert!(reached, "instance metadata comes from IMDS");

    // --block-instance-metadata: 403 for the endpoint and below it, with
    // or without the header; IMDS sees none of it.
    f.restart_nmi_with(&["--block-instance-metadata=true"])
        .await?;
    for path in [
        INSTANCE,
        "/metadata/instance/compute?api-version=2021-02-01",
    ] {
        for headers in [&md[..], &[][..]] {
            let (answers, reached) = ask(&f, path, headers).await?;
            for (what, code, body) in &answers {
                assert_eq!(*code, 403, "{what}: {body}\n{}", f.log());
                assert!(!body.contains("compute"), "{what}: {body}");
            }
            assert!(!reached, "{path}: a blocked request reached IMDS");
        }
    }
    // Other forwarded endpoints stay open.
    let (answers, _) = ask(&f, "/metadata/versions", &md).await?;
    for (what, code, body) in &answers {
        assert_eq!(*code, 200, "{what}: {body}");
    }
    Ok(())
}
