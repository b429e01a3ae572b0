//! Federated identities end to end: an AzureIdentity annotated
//! `aadpodidentity.k8s.io/token-source: federated` gets its tokens through
//! 169.254.169.254 with nothing written to ARM and nothing asked of the
//! node's IMDS. nmi (the chart's DaemonSet, its ServiceAccount and RBAC with
//! `federatedTokens.enabled`) asks the real test apiserver for a token of
//! the pod's own ServiceAccount, bound to the pod, and exchanges it at the
//! emulator's Entra ID, which trusts the apiserver's ServiceAccount issuer
//! through its discovery document and JWKS (read from the apiserver, as
//! Entra reads a cluster's OIDC issuer).
//!
//! | case | expected |
//! |---|---|
//! | pod bound to the federated identity, its ServiceAccount has a federated credential | a token naming the identity's client ID, through curl (IMDS format) and the Python and Rust SDKs' `ManagedIdentityCredential`; no ARM write, no IMDS token request; cached |
//! | same identity, a pod running as a ServiceAccount without a credential | 403 naming AADSTS700213 and the credential to create (issuer, subject); a Warning Event on the AzureIdentity; once the credential exists, a token |
//! | a pod running as a ServiceAccount that does not exist | 403: the API server issued no token, and why |
//! | a pod with no binding | no token, no exchange |
//! | another node's pod named through `/host/token` | refused by this node's nmi (404), served by its own node's |
//! | a token for another node's pod asked of the API server with nmi's own credentials | refused by the chart's node policy (nmi's pod-bound token names its node); for its own node's pod, issued |
//! | an identity whose annotation is misspelt | no AzureAssignedIdentity from mic (404); with one written by hand, 403 naming the annotation; no exchange |
//! | three new pods, each with its own ServiceAccount | the time from the Pod's creation to its first token |
//! | managed mode: the pod in the identity's namespace; a pod of another namespace with the same label | a token (curl, Python SDK), no ARM write; 404 |
//!
//! mic runs as the chart deploys it: it marks the federated identity's
//! AzureAssignedIdentities Assigned at once and writes nothing to ARM. Last,
//! with mic stopped, the test writes an AzureAssignedIdentity for the
//! misspelt identity itself, for nmi's own refusal.

use std::time::{Duration, Instant};

use aadpodid_tests::e2e::{ClusterIssuer, Options, PodRef, World, curl_in, id_client};
use aadpodid_tests::nmi_node::test_child;
use aadpodid_tests::wait_for;
use anyhow::Context as _;
use serde_json::Value;

/// Namespace of the federated identities and their pods.
const NS: &str = "fed";
/// The ServiceAccount with a federated credential.
const TRUSTED_SA: &str = "web";
/// A ServiceAccount without one (at first).
const OTHER_SA: &str = "batch";
/// Emulator identity of the federated AzureIdentity (`id-1`; `id-0` is the
/// chart's ordinary identity).
const FED_J: usize = 1;
/// Bound on mic marking a pod's AzureAssignedIdentity Assigned.
const ASSIGN: Duration = Duration::from_secs(60);
/// Port of nmi's token service on the node (the chart's default).
const NMI_PORT: u16 = 2579;

/// One scale set of two nodes, `id-0` as the chart's identity and `id-1`,
/// `id-2` in the tenant only, the admission policy off (the test writes
/// AzureAssignedIdentities), nmi allowed to request ServiceAccount tokens
/// (with its own pod-bound token), nmi answering quickly when no identity
/// is assigned, and the operation mode `mode`.
fn options(mode: &str) -> Options {
    let mut o = Options {
        scale_sets: 1,
        instances: 2,
        identities: 1,
        unbound_identities: 2,
        pods_per_node: 5,
        // nmi runs with a token bound to its pod, as the kubelet gives it.
        pod_bound_tokens: true,
        ..Options::new(env!("CARGO_BIN_EXE_e2e-mic"), env!("CARGO_BIN_EXE_e2e-nmi"))
    };
    o.set_values(&[
        ("identityPolicy.mode", "off"),
        ("operationMode", mode),
        ("federatedTokens.enabled", "true"),
        ("federatedTokens.nodePolicy", "true"),
        ("nmi.retryAttemptsForCreated", "2"),
        ("nmi.retryAttemptsForAssigned", "2"),
        ("nmi.findIdentityRetryIntervalInSeconds", "1"),
    ]);
    o
}

/// ARM writes and IMDS token requests so far, and Entra ID token requests
/// for `client_id`.
fn calls(world: &World, client_id: &str) -> (u64, u64, u64) {
    let c = world.emu.counters();
    (
        c.arm_writes.values().sum(),
        c.imds_token_requests.values().sum(),
        c.aad_token_requests.get(client_id).copied().unwrap_or(0),
    )
}

/// The body's JSON.
fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or(Value::Null)
}

/// The world in operation mode `mode` with the emulator trusting the
/// cluster's issuer, namespace [`NS`] with its two ServiceAccounts, the
/// federated AzureIdentity `fed-id` (selector `fed`) and a federated
/// credential for [`TRUSTED_SA`]; and the counters before any pod.
async fn federated_world(mode: &str) -> anyhow::Result<(World, ClusterIssuer, (u64, u64, u64))> {
    let world = World::start(options(mode)).await?;
    let issuer = world.trust_cluster_issuer().await?;
    eprintln!(
        "[federated] cluster issuer {} with {} key(s)",
        issuer.issuer,
        issuer.jwks["keys"].as_array().map_or(0, Vec::len)
    );
    let before = calls(&world, &id_client(FED_J));
    world.create_namespace(NS, None).await?;
    for sa in [TRUSTED_SA, OTHER_SA] {
        world.create_service_account(NS, sa).await?;
    }
    world
        .create_identity_with_source(NS, "fed-id", FED_J, Some("federated"), "fed")
        .await?;
    world.add_federated_credential(FED_J, &issuer.issuer, NS, TRUSTED_SA)?;
    Ok((world, issuer, before))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_identities_get_tokens_with_no_arm_write() -> anyhow::Result<()> {
    let (mut world, issuer, before) = federated_world("standard").await?;
    let client_id = id_client(FED_J);
    world
        .create_identity_with_source(NS, "typo-id", 2, Some("Federated"), "typo")
        .await?;
    let fed = [("aadpodidbinding", "fed")];
    // Pod indexes: even on node 0, odd on node 1.
    let trusted = world
        .create_pod_as_service_account(NS, "trusted", Some(TRUSTED_SA), &fed, 0)
        .await?;
    let other = world
        .create_pod_as_service_account(NS, "other-sa", Some(OTHER_SA), &fed, 2)
        .await?;
    let unbound = world
        .create_pod_as_service_account(NS, "unbound", Some(TRUSTED_SA), &[], 4)
        .await?;
    let far = world
        .create_pod_as_service_account(NS, "far", Some(TRUSTED_SA), &fed, 1)
        .await?;
    let typo = world
        .create_pod_as_service_account(NS, "typo", None, &[("aadpodidbinding", "typo")], 6)
        .await?;
    // mic: Assigned at once, nothing written to ARM.
    for p in [&trusted, &other, &far] {
        wait_for("mic's AAI Assigned", ASSIGN, || async {
            let aais = world.assigned_to(NS, &p.name).await.ok()?;
            let statuses: Vec<String> = aais
                .into_iter()
                .filter_map(|a| a.status.map(|s| s.status))
                .collect();
            (statuses == ["Assigned"]).then_some(())
        })
        .await?;
    }

    // The trusted pod: a token in IMDS's format naming the identity.
    let asked = Instant::now();
    let (status, body) = ask(&world, &trusted, "", 30).await?;
    let first_ms = asked.elapsed().as_secs_f64() * 1e3;
    assert_eq!(status, 200, "{body}\n{}", world.dump().await);
    // IMDS's fields, every one (ADAL-era SDKs read expires_on and resource).
    let answer = json(&body);
    let fields: Vec<&str> = answer
        .as_object()
        .map_or(vec![], |o| o.keys().map(String::as_str).collect());
    let imds =
        "access_token client_id expires_in expires_on not_before refresh_token resource token_type";
    assert_eq!(fields.join(" "), imds, "{body}");
    assert_eq!(answer["client_id"], client_id.as_str(), "{body}");
    assert_eq!(
        answer["resource"], "https://management.azure.com/",
        "{body}"
    );
    assert_eq!(world.appid_of(&body)?, client_id);
    let first = calls(&world, &client_id);
    assert_eq!(first.2, before.2 + 1, "one exchange at Entra ID");
    // Asked again (raw HTTP by client ID too): served from nmi's cache.
    let asked = Instant::now();
    let (status, again) = ask(&world, &trusted, &format!("&client_id={client_id}"), 30).await?;
    let cached_ms = asked.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "[federated] first token of a new pod {first_ms:.1} ms (curl in the pod: TokenRequest, exchange), cached {cached_ms:.1} ms"
    );
    assert_eq!(status, 200, "{again}");
    assert_eq!(world.appid_of(&again)?, client_id);
    assert_eq!(calls(&world, &client_id).2, first.2, "cached");
    // The Python SDK, by default and by client ID; the Rust SDK.
    for by in [None, Some(client_id.as_str())] {
        let appid = world.python_token_appid(&trusted, by).await?;
        assert_eq!(appid, client_id, "Python SDK by {by:?}");
    }
    let token = rust_sdk_token(&world, &trusted).await?;
    let appid = world
        .emu
        .verify_token(&token)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?
        .appid;
    assert_eq!(appid, client_id, "Rust SDK");

    // The same identity for a ServiceAccount Entra does not trust: the
    // AADSTS error and the fix reach the pod and the AzureIdentity's Events.
    let (status, body) = ask(&world, &other, "", 30).await?;
    assert_eq!(status, 403, "{body}");
    let message = json(&body)["error_description"]
        .as_str()
        .unwrap_or(&body)
        .to_string();
    for text in [
        "AADSTS700213",
        "system:serviceaccount:fed:batch",
        issuer.issuer.as_str(),
        "api://AzureADTokenExchange",
        "fed/fed-id",
    ] {
        assert!(message.contains(text), "{text:?} not in {message}");
    }
    assert!(json(&body).get("access_token").is_none(), "{body}");
    let admin = world.client().await?;
    let event = wait_for(
        "the Event on fed/fed-id",
        Duration::from_secs(20),
        || async {
            world
                .events_in(&admin, NS)
                .await
                .ok()?
                .into_iter()
                .find(|e| e.starts_with("AzureIdentity/fed-id Warning federated exchange refused"))
        },
    )
    .await?;
    assert!(
        event.contains("AADSTS700213") && event.contains("system:serviceaccount:fed:batch"),
        "{event}"
    );
    // The fix, as the message says: then the pod gets its token.
    world.add_federated_credential(FED_J, &issuer.issuer, NS, OTHER_SA)?;
    let (status, body) = ask(&world, &other, "", 30).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(world.appid_of(&body)?, client_id);

    // A ServiceAccount that does not exist: the API server issues no token;
    // the pod is told so.
    let ghost = world
        .create_pod_as_service_account(NS, "ghost", Some("missing"), &fed, 8)
        .await?;
    let (status, body) = ask(&world, &ghost, "", 30).await?;
    assert_eq!(status, 403, "{body}");
    for text in ["ServiceAccount fed/missing", "does not exist"] {
        assert!(body.contains(text), "{text:?} not in {body}");
    }

    // No binding: nothing, and no exchange.
    let exchanges = calls(&world, &client_id).2;
    let (status, body) = ask(&world, &unbound, "", 30).await?;
    assert_eq!(status, 404, "{body}");
    assert!(json(&body).get("access_token").is_none(), "{body}");

    // Another node's pod, named through /host/token on node 0: unknown
    // there; its own node's nmi serves it.
    let (status, body) = host_token(&world, 0, &far).await?;
    assert_eq!(status, 404, "node 0 served node 1's pod: {body}");
    assert_eq!(
        calls(&world, &client_id).2,
        exchanges,
        "no exchange for another node's pod"
    );
    let (status, body) = host_token(&world, 1, &far).await?;
    assert_eq!(status, 200, "node 1 for its own pod: {body}");
    // `/host/token` answers {"token": <IMDS answer>, "clientid": ...}.
    assert_eq!(
        world.appid_of(&json(&body)["token"].to_string())?,
        client_id
    );

    // The API server's own line (federatedTokens.nodePolicy): with node 0's
    // nmi credentials (pod-bound, naming node 0), a token for node 1's pod
    // is refused; for node 0's pod it is issued.
    let nmi0 = world.nmi_client(0).await?;
    let refused = world.pod_token_as(&nmi0, &far, TRUSTED_SA).await?;
    let refusal = refused.expect_err("node 0's nmi got a token for node 1's pod");
    assert!(refusal.contains("nmi-token-request-node"), "{refusal}");
    let issued = world.pod_token_as(&nmi0, &trusted, TRUSTED_SA).await?;
    assert!(
        issued.is_ok_and(|t| !t.is_empty()),
        "node 0's nmi for its own pod"
    );

    // A misspelt token source: mic gives the identity to nobody, so nmi
    // finds nothing for the pod.
    let typo_client = id_client(2);
    let (status, body) = ask(&world, &typo, "", 30).await?;
    assert_eq!(status, 404, "{body}");
    assert!(world.assigned_to(NS, &typo.name).await?.is_empty());

    // First tokens of new pods (each its own ServiceAccount, so none is
    // cached): from the Pod's creation to the token, mic's AAI included.
    let mut firsts = Vec::new();
    for i in [3, 5, 7] {
        let sa = format!("sa-{i}");
        world.create_service_account(NS, &sa).await?;
        world.add_federated_credential(FED_J, &issuer.issuer, NS, &sa)?;
        let started = Instant::now();
        let p = world
            .create_pod_as_service_account(NS, &format!("new-{i}"), Some(&sa), &fed, i)
            .await?;
        let (status, body) = ask(&world, &p, "", 30).await?;
        assert_eq!(status, 200, "{body}");
        firsts.push(format!("{:.0}", started.elapsed().as_secs_f64() * 1e3));
    }
    eprintln!(
        "[federated] first token of a new pod, from its creation (ms): {}",
        firsts.join(", ")
    );
    let after = calls(&world, &client_id);

    // Without mic, an AzureAssignedIdentity for the misspelt identity (one
    // written before the annotation changed, say): nmi refuses it itself,
    // naming the annotation.
    for r in 0..world.mics.len() {
        world.signal_mic(r, "KILL")?;
    }
    world.write_assigned(&typo, NS, "typo-id").await?;
    let (status, body) = ask(&world, &typo, "", 30).await?;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("aadpodidentity.k8s.io/token-source"),
        "{body}"
    );
    assert_eq!(
        calls(&world, &typo_client).2,
        0,
        "no exchange for a misspelt source"
    );

    // Nothing written to ARM, nothing asked of IMDS, all along.
    assert_eq!(
        (after.0, after.1),
        (before.0, before.1),
        "ARM writes, IMDS token requests"
    );
    eprintln!(
        "[federated] exchanges at Entra ID for {client_id}: {}; ARM writes {}; IMDS token requests {}",
        after.2 - before.2,
        after.0 - before.0,
        after.1 - before.1
    );
    Ok(())
}

/// A token request from `p` to 169.254.169.254 for ARM with `query`
/// appended: (status, body).
async fn ask(
    world: &World,
    p: &PodRef,
    query: &str,
    max_time: u32,
) -> anyhow::Result<(u16, String)> {
    world.token_request(p, query, max_time).await
}

/// A `/host/token` request for ARM from node `node`'s own network (as a
/// host-network caller makes it) naming pod `p`: (status, body).
async fn host_token(world: &World, node: usize, p: &PodRef) -> anyhow::Result<(u16, String)> {
    curl_in(
        &world.nodes[node].net.node,
        &format!(
            "http://127.0.0.1:{NMI_PORT}/host/token?resource=https%3A%2F%2Fmanagement.azure.com%2F"
        ),
        &[
            &format!("podns: {}", p.namespace),
            &format!("podname: {}", p.name),
        ],
        30,
    )
    .await
}

/// Managed mode (nmi alone decides, from the identities and bindings of the
/// pod's namespace): the same federated identity for a pod of [`NS`], with
/// nothing written to ARM; a pod of another namespace with the same label
/// gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_mode_serves_federated_identities() -> anyhow::Result<()> {
    let (world, _, before) = federated_world("managed").await?;
    let client_id = id_client(FED_J);
    let fed = [("aadpodidbinding", "fed")];
    let trusted = world
        .create_pod_as_service_account(NS, "trusted", Some(TRUSTED_SA), &fed, 0)
        .await?;
    let (status, body) = ask(&world, &trusted, "", 30).await?;
    assert_eq!(status, 200, "{body}\n{}", world.dump().await);
    assert_eq!(world.appid_of(&body)?, client_id);
    let appid = world.python_token_appid(&trusted, None).await?;
    assert_eq!(appid, client_id, "Python SDK");
    world.create_namespace("elsewhere", None).await?;
    world
        .create_service_account("elsewhere", TRUSTED_SA)
        .await?;
    let outsider = world
        .create_pod_as_service_account("elsewhere", "outsider", Some(TRUSTED_SA), &fed, 1)
        .await?;
    let (status, body) = ask(&world, &outsider, "", 30).await?;
    assert_eq!(status, 404, "{body}");
    let after = calls(&world, &client_id);
    assert_eq!(
        (after.0, after.1),
        (before.0, before.1),
        "ARM writes, IMDS token requests"
    );
    assert_eq!(
        after.2 - before.2,
        2,
        "exchanges: curl's resource and the SDK's"
    );
    Ok(())
}

/// The pod side of [`rust_sdk_token`]: the real Rust `azure_identity`
/// `ManagedIdentityCredential` (IMDS at 169.254.169.254) for ARM. Prints
/// `TOKEN_OK <jwt>` or `TOKEN_ERR <error>`.
#[tokio::test]
#[ignore = "run inside a pod namespace by federated_identities_get_tokens_with_no_arm_write"]
async fn rust_sdk_child() {
    use azure_core::credentials::TokenCredential as _;
    let credential = azure_identity::ManagedIdentityCredential::new(None).expect("credential");
    let scopes = ["https://management.azure.com/.default"];
    match credential.get_token(&scopes, None).await {
        Ok(t) => println!("TOKEN_OK {}", t.token.secret()),
        Err(e) => println!("TOKEN_ERR {e}"),
    }
}

/// A token for the pod `p` through the Rust SDK ([`rust_sdk_child`] run in
/// its network namespace, with no variable pointing it at another source).
async fn rust_sdk_token(world: &World, p: &PodRef) -> anyhow::Result<String> {
    let mut cmd = test_child(world.pod_ns(p)?, "rust_sdk_child")?;
    for other_source in "IDENTITY_ENDPOINT IMDS_ENDPOINT MSI_ENDPOINT HTTP_PROXY".split(' ') {
        cmd.env_remove(other_source);
    }
    let out = tokio::process::Command::from(cmd).output().await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.split_once("TOKEN_OK "))
        .map(|(_, t)| t.trim().to_string())
        .with_context(|| format!("no token: {stdout}{}", String::from_utf8_lossy(&out.stderr)))
}
