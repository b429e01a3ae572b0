//! NMI end to end on a test node: a real apiserver, real iptables in a node
//! network namespace, pods in pod namespaces, the Azure emulator's IMDS
//! behind 169.254.169.254:80 inside the node, and real clients in the pods.
//! The node is [`aadpodid_tests::nmi_node::NmiNode`]: NMI runs there from the
//! `e2e-nmi` binary (or `AADPODID_NMI_BIN`).

use std::time::{Duration, Instant};

use aadpodid_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentitySpec, AzurePodIdentityException,
    AzurePodIdentityExceptionSpec,
};
use aadpodid_tests::assigned::create_aai;
use aadpodid_tests::netns::{IMDS_ADDRESS, NetNs};
use aadpodid_tests::nmi_node::{
    ARM, ARM_TOKEN_PATH, CLIENT_A, CLIENT_B, NmiNode, OBJECT_A, OBJECT_B, Options, SP_CERT_CLIENT,
    SP_CLIENT, SP_SECRET, TENANT, curl, identity, nmi_bin,
};
use aadpodid_tests::{Cluster, IdentitySelector, python_imds_token, wait_for};
use anyhow::{Context as _, bail};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};

/// A test node with `pods` pods and NMI active; returns it with its
/// admin client and namespace.
async fn node_with(pods: u8) -> anyhow::Result<(NmiNode, kube::Client, String)> {
    let mut opts = Options::new(pods, nmi_bin(env!("CARGO_BIN_EXE_e2e-nmi")));
    opts.namespace = "nmi";
    let f = NmiNode::start(opts).await?;
    let (client, ns) = (f.client.clone(), f.ns().to_string());
    Ok((f, client, ns))
}

/// The verified `appid` of the token in [`python`]'s output `out`.
fn appid_of(f: &NmiNode, out: &serde_json::Value) -> anyhow::Result<String> {
    let token = out["token"]
        .as_str()
        .with_context(|| format!("no token: {out}"))?;
    f.verified_appid(token)
}

fn python(ns: &NetNs, selector: IdentitySelector<'_>) -> anyhow::Result<serde_json::Value> {
    // The SDK call blocks; let the runtime move other tasks (the relays) meanwhile.
    tokio::task::block_in_place(|| {
        python_imds_token(
            None,
            "https://management.azure.com/.default",
            selector,
            Some(ns),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nmi_on_a_test_node() -> anyhow::Result<()> {
    let (mut f, client, ns) = node_with(5).await?;

    // The rules are upstream's, jumped to first in PREROUTING.
    let chain = f.nat_rules(Some("aad-metadata"))?;
    assert!(chain.contains("-A aad-metadata ! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:2579"), "{chain}");
    let pre = f.nat_rules(Some("PREROUTING"))?;
    assert!(
        pre.lines().find(|l| l.starts_with("-A ")) == Some("-A PREROUTING -j aad-metadata"),
        "{pre}"
    );

    let id_a = identity(&ns, "id-a", CLIENT_A);
    let id_b = identity(&ns, "id-b", CLIENT_B);
    // pod 0 bound to A; pod 1 unlabelled; pod 2 excepted; pod 3 waits for MIC.
    f.create_bound_pod("bound", 0, &id_a, "a").await?;
    for (i, name, labels) in [
        (1, "plain", &[][..]),
        (2, "excepted", &[("app", "Agent")][..]),
        (3, "waiting", &[("aadpodidbinding", "a")][..]),
    ] {
        f.create_pod(name, i, labels).await?;
    }
    let mut exc = AzurePodIdentityException::new(
        "agents",
        AzurePodIdentityExceptionSpec {
            pod_labels: [("app".to_string(), "agent".to_string())].into(),
        },
    );
    exc.metadata.namespace = Some(ns.clone());
    Api::<AzurePodIdentityException>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &exc)
        .await?;

    // A bound pod gets its identity's token through the real Python SDK,
    // with no selector, by client ID and by object ID.
    let out = python(f.pod_ns(0), IdentitySelector::Default)?;
    assert_eq!(appid_of(&f, &out)?, CLIENT_A, "{out}\n{}", f.log());
    let out = python(f.pod_ns(0), IdentitySelector::ClientId(CLIENT_A))?;
    assert_eq!(appid_of(&f, &out)?, CLIENT_A, "{out}");
    let out = python(f.pod_ns(0), IdentitySelector::ObjectId(OBJECT_A))?;
    assert_eq!(appid_of(&f, &out)?, CLIENT_A, "{out}");

    // Bound to A, it cannot get B: by client_id, msi_res_id, object_id
    // (with the ID in upper case too), or through /host/token.
    let md = ["Metadata: true"];
    let tok = ARM_TOKEN_PATH;
    let res_b = id_b.spec.resource_id.clone();
    for sel in [
        format!("&client_id={CLIENT_B}"),
        format!("&client_id={}", CLIENT_B.to_uppercase()),
        format!("&msi_res_id={res_b}"),
        format!("&object_id={OBJECT_B}"),
    ] {
        let (code, body) = curl(f.pod_ns(0), &format!("{tok}{sel}"), &md).await?;
        assert_eq!(code, 404, "{sel}: {body}");
        assert!(!body.contains("access_token"), "{sel}: {body}");
    }
    let (code, body) = curl(
        f.pod_ns(0),
        &format!("/host/token?resource={ARM}"),
        &["podns: x", "podname: y"],
    )
    .await?;
    assert_eq!(
        (
            code,
            body.contains("request remote address is not from a host")
        ),
        (500, true),
        "{body}"
    );

    // An unlabelled pod gets nothing (after upstream's budget: 1 attempt × 5 s here).
    let (code, body) = curl(f.pod_ns(1), tok, &md).await?;
    assert_eq!(code, 404, "{body}");
    assert!(
        body.contains("CREATED state failed after 1 attempts"),
        "{body}"
    );

    // An excepted pod talks to IMDS as if NMI were not there: the node's
    // system identity.
    let (code, body) = curl(f.pod_ns(2), tok, &md).await?;
    assert_eq!(code, 200, "{body}");

    // Hostile input: the right error, fast, and no token.
    for (path, headers, want) in [
        (tok, &[][..], 400),
        (
            "/metadata/identity\\oauth2\\token/?resource=x",
            &md[..],
            400,
        ),
        ("/metadata/identity/OAuth2/token?resource=x", &md[..], 400),
        (
            "/metadata/instance/../identity/oauth2/token?resource=x",
            &md[..],
            400,
        ),
        (
            "/metadata/identity/oauth2/token?resource=a&resource=b",
            &md[..],
            400,
        ),
        ("/metadata/identity/oauth2/token", &md[..], 400),
    ] {
        let (code, body) = curl(f.pod_ns(0), path, headers).await?;
        assert_eq!(code, want, "{path}: {body}");
        let v: serde_json::Value =
            serde_json::from_str(&body).with_context(|| format!("{path}: {body}"))?;
        assert!(
            v["error"].is_string() && v.get("access_token").is_none(),
            "{path}: {body}"
        );
    }
    let huge = format!("X-Big: {}", "a".repeat(100 * 1024));
    let (code, _) = curl(f.pod_ns(0), tok, &[md[0], &huge]).await?;
    // hyper bounds the buffered head (64 KiB); whether a 100 KiB head is
    // refused (431) or already parsed depends on read chunking. Either way
    // the server stays up and bounded.
    assert!(code == 431 || code == 200, "huge header: {code}");

    // Waiting is driven by the watch: a request made while the AAI is
    // Created returns after (and because) it turns Assigned.
    let (aai_ns, aai) = f
        .assignment("waiting", &id_a, "a")
        .status("Created")
        .create(&client)
        .await?;
    let waiter = async {
        let r = curl(f.pod_ns(3), tok, &md).await;
        (r, Instant::now())
    };
    let patch = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let patched_at = Instant::now();
        Api::<AzureAssignedIdentity>::namespaced(client.clone(), &aai_ns)
            .patch(
                &aai,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": {"status": "Assigned"}})),
            )
            .await
            .map(|_| patched_at)
    };
    let ((result, answered_at), patched_at) = tokio::join!(waiter, patch);
    let patched_at = patched_at?;
    let (code, body) = result?;
    assert_eq!(code, 200, "{body}");
    assert!(answered_at >= patched_at);
    eprintln!(
        "answered {:?} after the status change",
        answered_at - patched_at
    );

    // Fail-closed: with NMI down the redirect stays, pods are refused at
    // once, and nothing reaches IMDS from a pod.
    let before = f.emu()?.counters();
    f.stop_nmi();
    let mut cmd = f.pod_ns(0).command("curl");
    cmd.args([
        "-s",
        "--max-time",
        "5",
        "-H",
        "Metadata: true",
        &format!("http://{IMDS_ADDRESS}{tok}"),
    ]);
    let out = tokio::process::Command::from(cmd).output().await?;
    assert_eq!(out.status.code(), Some(7), "connection refused expected");
    assert_eq!(
        format!("{:?}", f.emu()?.counters()),
        format!("{before:?}"),
        "a pod request reached IMDS while NMI was down"
    );
    let chain = f.nat_rules(Some("aad-metadata"))?;
    assert!(chain.contains("DNAT"), "{chain}");
    // And tokens resume after a restart.
    f.restart_nmi().await?;
    let out = python(f.pod_ns(0), IdentitySelector::ClientId(CLIENT_A))?;
    assert_eq!(appid_of(&f, &out)?, CLIENT_A, "{out}");

    // Tampering is repaired at the next check.
    f.node_ns()
        .run("iptables", &["-t", "nat", "-F", "aad-metadata"])?;
    wait_for("iptables repaired", Duration::from_secs(10), || async {
        let c = f.nat_rules(Some("aad-metadata")).ok()?;
        c.contains("DNAT").then_some(())
    })
    .await?;
    Ok(())
}

/// Type 1 end to end: a Secret, a client-secret AzureIdentity and an Assigned
/// AAI give the pod an AAD token for the service principal; an identity whose
/// Secret lies in another namespace is refused
/// (docs/upstream-behaviour.md#h10-secrets-read-across-namespaces).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nmi_service_principal_identity() -> anyhow::Result<()> {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::{Secret, SecretReference};
    let (f, client, ns) = node_with(3).await?;
    let other_guard = Cluster::shared().temp_namespace("nmi-sp-other").await?;
    let other = other_guard.name().to_string();

    for n in [&ns, &other] {
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "sp-creds"},
            "stringData": {"clientSecret": SP_SECRET},
        }))?;
        Api::<Secret>::namespaced(client.clone(), n)
            .create(&PostParams::default(), &secret)
            .await?;
    }
    let cert_secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("sp-cert".into()),
            ..Default::default()
        },
        data: Some(
            [
                ("certificate".to_string(), ByteString(f.sp_p12.clone())),
                ("password".to_string(), ByteString(b"pw".to_vec())),
            ]
            .into(),
        ),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &cert_secret)
        .await?;
    let sp_identity = |name: &str, secret_ns: &str| {
        let mut id = AzureIdentity::new(
            name,
            AzureIdentitySpec {
                r#type: aadpodid_api::IdentityType::ServicePrincipal,
                client_id: SP_CLIENT.into(),
                tenant_id: TENANT.into(),
                ad_endpoint: f.aad_url(),
                client_password: Some(SecretReference {
                    name: Some("sp-creds".into()),
                    namespace: Some(secret_ns.into()),
                }),
                ..Default::default()
            },
        );
        id.metadata.namespace = Some(ns.clone());
        id
    };
    let near = sp_identity("sp-near", &ns);
    let far = sp_identity("sp-far", &other);
    let mut cert = sp_identity("sp-cert", &ns);
    cert.spec.r#type = aadpodid_api::IdentityType::ServicePrincipalCertificate;
    cert.spec.client_id = SP_CERT_CLIENT.into();
    cert.spec.client_password = Some(SecretReference {
        name: Some("sp-cert".into()),
        namespace: None,
    });
    for (i, (name, id)) in [("near", &near), ("far", &far), ("cert", &cert)]
        .into_iter()
        .enumerate()
    {
        f.create_bound_pod(name, i, id, name).await?;
    }

    let md = ["Metadata: true"];
    let tok = ARM_TOKEN_PATH;
    // Twice: the second answer comes from the cache, after the same checks.
    for _ in 0..2 {
        let (code, body) = curl(f.pod_ns(0), tok, &md).await?;
        assert_eq!(code, 200, "{body}\n{}", f.log());
        let v: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(f.answer_appid(&body)?, SP_CLIENT);
        assert_eq!(v["resource"], ARM);
        assert!(v["expires_on"].as_str().is_some(), "{body}");
    }
    // The same service principal through a Secret in another namespace:
    // refused, even though a token for it is cached.
    let (code, body) = curl(f.pod_ns(1), tok, &md).await?;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains(&format!("{other}/sp-creds")), "{body}");
    assert!(!body.contains("access_token"), "{body}");

    // Type 2: the PKCS#12 certificate from the Secret signs the assertion.
    let (code, body) = curl(f.pod_ns(2), tok, &md).await?;
    assert_eq!(code, 200, "{body}\n{}", f.log());
    assert_eq!(f.answer_appid(&body)?, SP_CERT_CLIENT);
    Ok(())
}

/// NMI does not trust an AzureAssignedIdentity on its own: hand-written
/// AAIs (by the admin, as if admission were bypassed) whose embedded
/// identity or binding does not match the live objects, that name a
/// selector the pod does not carry, that sit where MIC never writes, or that
/// have an empty status, give no token. And an AzureIdentity naming one
/// identity's resource ID with another's client ID gets a 403, an Event and
/// a metric, never the other identity's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nmi_trusts_no_forged_assigned_identity() -> anyhow::Result<()> {
    use k8s_openapi::api::events::v1::Event;
    let (f, client, ns) = node_with(7).await?;
    let id_a = identity(&ns, "id-a", CLIENT_A);

    // Each pod is labelled "a" (except "relabelled") and gets one AAI.
    let pods = [
        "genuine",
        "wrong-uid",
        "no-binding",
        "relabelled",
        "wrong-ns",
        "empty-status",
        "mismatch",
    ];
    for (i, name) in pods.iter().enumerate() {
        let label = if *name == "relabelled" { "other" } else { "a" };
        f.create_pod(name, i, &[("aadpodidbinding", label)]).await?;
    }
    // The genuine AAI, as MIC writes it: the control that the setup works.
    f.assignment("genuine", &id_a, "a").create(&client).await?;
    let aai = |pod: &'static str| f.assignment(pod, &id_a, "a").build(&client);
    // The embedded identity carries another UID (a deleted and recreated
    // identity, or a forgery).
    let mut forged = aai("wrong-uid").await?;
    if let Some(i) = forged.spec.azure_identity_ref.as_deref_mut() {
        i.metadata.uid = Some("00000000-0000-4000-8000-00000000dead".into());
    }
    create_aai(&client, &forged).await?;
    // The embedded binding does not exist.
    let mut forged = aai("no-binding").await?;
    if let Some(b) = forged.spec.azure_binding_ref.as_deref_mut() {
        b.metadata.name = Some("no-such-binding".into());
    }
    create_aai(&client, &forged).await?;
    // The binding selects "a", the pod is labelled "other".
    create_aai(&client, &aai("relabelled").await?).await?;
    // In the pod's namespace: MIC writes to "default" here.
    let mut forged = aai("wrong-ns").await?;
    forged.metadata.namespace = Some(ns.clone());
    create_aai(&client, &forged).await?;
    // Status empty (upstream counted it as Assigned).
    let mut forged = aai("empty-status").await?;
    forged.status = None;
    create_aai(&client, &forged).await?;

    let md = ["Metadata: true"];
    let tok = ARM_TOKEN_PATH;
    let (code, body) = curl(f.pod_ns(0), tok, &md).await?;
    assert_eq!(code, 200, "genuine: {body}\n{}", f.log());
    assert_eq!(f.answer_appid(&body)?, CLIENT_A);
    // Forged or stale where MIC writes: refused without waiting for MIC
    // (NMI holds such a refusal 2 s for its caches to catch up; the wait
    // budget here is 5 s). Where MIC never writes, or not Assigned: as if
    // absent, so the pod waits for MIC and then gets nothing.
    for (i, name, at_once) in [
        (1, "wrong-uid", true),
        (2, "no-binding", true),
        (3, "relabelled", true),
        (4, "wrong-ns", false),
        (5, "empty-status", false),
    ] {
        let started = Instant::now();
        let (code, body) = curl(f.pod_ns(i), tok, &md).await?;
        let took = started.elapsed();
        assert_eq!(code, 404, "{name}: {body}\n{}", f.log());
        assert!(!body.contains("access_token"), "{name}: {body}");
        if at_once {
            assert!(took < Duration::from_secs(4), "{name} waited {took:?}");
        }
        eprintln!("{name}: 404 after {took:?}");
    }

    // The resource ID of identity A with the client ID of identity B (both
    // on the node): 403, and nothing of B's reaches the pod.
    let mut forged_id = identity(&ns, "forged", CLIENT_B);
    forged_id.spec.resource_id = id_a.spec.resource_id.clone();
    f.assignment("mismatch", &forged_id, "a")
        .create(&client)
        .await?;
    for query in ["", &format!("&client_id={CLIENT_B}")] {
        let (code, body) = curl(f.pod_ns(6), &format!("{tok}{query}"), &md).await?;
        assert_eq!(code, 403, "{query}: {body}\n{}", f.log());
        assert!(!body.contains("access_token"), "{query}: {body}");
        assert!(
            body.contains(&id_a.spec.resource_id) && body.contains(CLIENT_B),
            "{body}"
        );
    }
    // The real SDK too: whatever it gets, it is never B's token.
    let out = python(f.pod_ns(6), IdentitySelector::ClientId(CLIENT_B))?;
    if let Some(token) = out["token"].as_str() {
        let appid = f.verified_appid(token)?;
        bail!("a token came back (appid {appid}, B is {CLIENT_B}): {out}");
    }
    // The user sees why: an Event on the AzureIdentity, and the metric.
    let events = Api::<Event>::namespaced(client.clone(), &ns);
    let event = wait_for(
        "Event on the AzureIdentity",
        Duration::from_secs(15),
        || async {
            events
                .list(&Default::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| {
                    e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("forged")
                        && e.reason.as_deref() == Some(nmi::server::REASON_CLIENT_ID_MISMATCH)
                })
        },
    )
    .await?;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(
        event.regarding.as_ref().and_then(|r| r.kind.as_deref()),
        Some("AzureIdentity")
    );
    let metrics = f.metrics()?;
    assert!(
        metrics.lines().any(|l| l.starts_with(&format!(
            "aadpodidentity_nmi_identity_refused_count{{namespace=\"{ns}\",reason=\"client_id_mismatch\"}}"
        ))),
        "{metrics}"
    );
    Ok(())
}
