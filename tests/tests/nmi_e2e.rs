//! NMI end to end, second part: the real Rust `azure_identity` credential
//! through NMI, NMI killed and restarted under load (fail-closed), IMDS faults
//! retried then surfaced, managed and namespaced modes, and IPv6 callers.
//!
//! Layout. The node is [`NmiNode`] with the emulator *inside* the node
//! namespace ([`Imds::InNode`]: this test binary re-executes itself there as
//! [`emulator_child_process`]), with its IMDS on 169.254.169.254:80, so IMDS
//! sees every caller's real address: NMI's own, or a pod's if one ever got
//! past the redirect. The test reads the emulator's request log (with the
//! peer address of each IMDS request) and injects faults through its admin
//! API, from inside the node. NMI is the test crate's `e2e-nmi` binary run
//! in the node namespace.

use std::net::{IpAddr, Ipv6Addr};
use std::process::Stdio;
use std::time::Duration;

use aadpodid_api::{AzureIdentity, AzureIdentityBinding};
use aadpodid_tests::netns::{IMDS_ADDRESS, NODE_POD_GATEWAY_V6, NetNs};
use aadpodid_tests::nmi_node::{
    CLIENT_A, CLIENT_B, Imds, NmiNode, OBJECT_A, Options, TENANT, binding, curl_with_head as curl,
    emulator_child_main, identity, nmi_bin, test_child,
};
use aadpodid_tests::{Cluster, wait_for};
use anyhow::{Context as _, bail};
use base64::Engine as _;
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

/// Which identity [`rust_credential_child`] asks for: "" (none),
/// `client_id=ID`, `object_id=ID` or `msi_res_id=ID`.
const CREDENTIAL_ENV: &str = "AADPODID_E2E_CREDENTIAL_SELECTOR";
/// Seconds [`rust_credential_child`] waits for a token.
const CREDENTIAL_TIMEOUT_ENV: &str = "AADPODID_E2E_CREDENTIAL_TIMEOUT";
const NMI_PORT: u16 = 2579;
const ARM_SCOPE: &str = "https://management.azure.com/.default";
const TOKEN_PATH: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01";
const MD: &str = "Metadata: true";
/// NMI's arguments in these tests, before each test's own: one retry for
/// Assigned identities, two seconds apart.
const E2E_ARGS: [&str; 2] = [
    "--retry-attempts-for-assigned=1",
    "--find-identity-retry-interval=2",
];

/// The emulator inside a node namespace ([`Imds::InNode`]), run by
/// [`NmiNode::start`] until killed.
#[test]
#[ignore = "run by the tests below inside a node network namespace"]
fn emulator_child_process() -> anyhow::Result<()> {
    emulator_child_main()
}

/// A node with `pods` pods, the emulator inside it issuing tokens for any
/// resource (tests ask for many so that NMI's cache cannot answer), and
/// NMI active with [`E2E_ARGS`] and `extra`.
async fn node(pods: u8, extra: &[&str]) -> anyhow::Result<NmiNode> {
    let mut opts = Options::new(pods, nmi_bin(env!("CARGO_BIN_EXE_e2e-nmi")))
        .args(E2E_ARGS)
        .args(extra.iter().copied());
    opts.imds = Imds::InNode {
        child_test: "emulator_child_process",
    };
    opts.emulator = |c| c.aad.any_resource = true;
    opts.namespace = "nmi-e2e";
    NmiNode::start(opts).await
}

/// [`node`] with one pod, `app`, bound to `id-a` (selector `a`); returns
/// the node and that identity.
async fn node_with_app() -> anyhow::Result<(NmiNode, AzureIdentity)> {
    let f = node(1, &[]).await?;
    let id_a = identity(f.ns(), "id-a", CLIENT_A);
    f.create_bound_pod("app", 0, &id_a, "a").await?;
    Ok((f, id_a))
}

/// The pod side of the Rust SDK tests: the real `ManagedIdentityCredential`
/// (IMDS address fixed at 169.254.169.254), with the client ID from the
/// environment or none. Prints `TOKEN_OK <jwt>` or `TOKEN_ERR <error>`.
#[tokio::test]
#[ignore = "run by rust_sdk_credential_through_nmi inside a pod namespace"]
async fn rust_credential_child() {
    use azure_core::credentials::TokenCredential as _;
    use azure_identity::{
        ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId,
    };
    let selector = std::env::var(CREDENTIAL_ENV).expect("started by a test of this file");
    let timeout: u64 = std::env::var(CREDENTIAL_TIMEOUT_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let user_assigned_id = match selector.split_once('=') {
        None => None,
        Some(("client_id", v)) => Some(UserAssignedId::ClientId(v.into())),
        Some(("object_id", v)) => Some(UserAssignedId::ObjectId(v.into())),
        Some(("msi_res_id", v)) => Some(UserAssignedId::ResourceId(v.into())),
        Some(other) => panic!("unknown selector {other:?}"),
    };
    let options = user_assigned_id.map(|id| ManagedIdentityCredentialOptions {
        user_assigned_id: Some(id),
        ..Default::default()
    });
    let credential = ManagedIdentityCredential::new(options).expect("credential");
    match tokio::time::timeout(
        Duration::from_secs(timeout),
        credential.get_token(&[ARM_SCOPE], None),
    )
    .await
    {
        Ok(Ok(token)) => println!("TOKEN_OK {}", token.token.secret()),
        Ok(Err(e)) => println!("TOKEN_ERR {e}"),
        Err(_) => println!("TOKEN_ERR timed out after {timeout} s"),
    }
}

/// Whether an IMDS request record came from one of the node's pod addresses
/// (the IPv4 addresses of `f`'s pods, or IPv6 fd00:10:244::/64), i.e. around
/// NMI.
fn from_a_pod(f: &NmiNode, record: &Value) -> bool {
    let peer = record["peer"].as_str().unwrap_or("");
    match peer.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => f.net().pods.iter().any(|(_, pod)| *pod == v4),
        Ok(IpAddr::V6(v6)) => v6.segments()[..4] == [0xfd00, 0x10, 0x244, 0],
        Err(_) => false,
    }
}

fn imds_url(query: &str) -> String {
    format!("http://{IMDS_ADDRESS}{TOKEN_PATH}{query}")
}

/// The claims of a JWT (signature not checked: the emulator signed it, and
/// the claims say which identity it is for).
fn claims(token: &str) -> anyhow::Result<Value> {
    let payload = token.split('.').nth(1).context("JWT has no payload")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?;
    Ok(serde_json::from_slice(&bytes)?)
}

fn token_claims(body: &str) -> anyhow::Result<Value> {
    let v: Value = serde_json::from_str(body).with_context(|| format!("body: {body}"))?;
    claims(v["access_token"].as_str().context("access_token")?)
}

/// Runs [`rust_credential_child`] in `ns`: `Ok(token)` or `Err(message)`.
async fn rust_credential(
    ns: &NetNs,
    selector: &str,
    timeout_secs: u64,
) -> anyhow::Result<Result<String, String>> {
    let mut cmd = test_child(ns, "rust_credential_child")?;
    cmd.env(CREDENTIAL_ENV, selector)
        .env(CREDENTIAL_TIMEOUT_ENV, timeout_secs.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Only the IMDS source may be chosen: clear every variable that selects another.
    for var in [
        "IDENTITY_ENDPOINT",
        "IDENTITY_HEADER",
        "IMDS_ENDPOINT",
        "MSI_ENDPOINT",
        "MSI_SECRET",
        "HTTP_PROXY",
        "http_proxy",
    ] {
        cmd.env_remove(var);
    }
    let out = tokio::process::Command::from(cmd).output().await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines() {
        if let Some((_, t)) = line.split_once("TOKEN_OK ") {
            return Ok(Ok(t.trim().to_string()));
        }
        if let Some((_, e)) = line.split_once("TOKEN_ERR ") {
            return Ok(Err(e.trim().to_string()));
        }
    }
    bail!(
        "credential child printed no result: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Count of NMI answers to token requests with `status` for pods in `ns`.
fn token_answers(metrics: &str, status: u16, ns: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("aadpodidentity_nmi_operations_duration_seconds_count{"))
        .filter(|l| l.contains(&format!("status_code=\"{status}\"")))
        .filter(|l| l.contains(&format!("namespace=\"{ns}\"")))
        .filter(|l| l.contains("operation_type=\"/metadata/identity/oauth2/token\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Priority 1: the real Rust SDK credential in a pod gets its identity's
/// token through NMI at 169.254.169.254, with and without a client ID, and
/// cannot get another identity's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rust_sdk_credential_through_nmi() -> anyhow::Result<()> {
    let (f, id_a) = node_with_app().await?;
    let ns = f.ns();
    let since = f.last_seq().await?;

    // No selector (the pod's one identity), by client ID (either case), by
    // object ID and by resource ID: all give A's token.
    let selectors = [
        String::new(),
        format!("client_id={CLIENT_A}"),
        format!("client_id={}", CLIENT_A.to_uppercase()),
        format!("object_id={OBJECT_A}"),
        format!("msi_res_id={}", id_a.spec.resource_id),
    ];
    for selector in &selectors {
        let token = rust_credential(f.pod_ns(0), selector, 60)
            .await?
            .map_err(|e| anyhow::anyhow!("{selector:?}: {e}\nnmi log:\n{}", f.log()))?;
        let c = claims(&token)?;
        assert_eq!(c["appid"], CLIENT_A, "{selector:?}: {c}");
        assert_eq!(c["oid"], OBJECT_A, "{selector:?}: {c}");
        assert_eq!(c["tid"], TENANT, "{selector:?}: {c}");
        // The SDK turns the scope into resource "https://management.azure.com".
        assert_eq!(c["aud"], "https://management.azure.com", "{c}");
    }

    // Bound to A, asking for B by client ID or resource ID: refused on every
    // one of the SDK's retries (NMI answers 404 as upstream, which the SDK
    // retries for up to 72 s; the child gives up after 8 s), and NMI never
    // asked IMDS for B.
    let id_b = identity(ns, "id-b", CLIENT_B);
    for selector in [
        format!("client_id={CLIENT_B}"),
        format!("msi_res_id={}", id_b.spec.resource_id),
    ] {
        let before = token_answers(&f.metrics()?, 404, ns);
        let denied = rust_credential(f.pod_ns(0), &selector, 8).await?;
        assert!(denied.is_err(), "pod bound to A got B's token: {denied:?}");
        let refusals = token_answers(&f.metrics()?, 404, ns) - before;
        assert!(refusals >= 1, "no 404 counted for B: {}", f.metrics()?);
        eprintln!("{selector}: refused {refusals} time(s) within 8 s: {denied:?}");
    }

    let requests = f.imds_requests(since).await?;
    assert!(
        requests
            .iter()
            .all(|r| !r["uri"].as_str().unwrap_or("").contains(CLIENT_B)
                && !r["uri"].as_str().unwrap_or("").contains("id-b")),
        "NMI asked IMDS for B: {requests:?}"
    );
    assert!(
        !requests.is_empty() && requests.iter().all(|r| !from_a_pod(&f, r)),
        "IMDS requests must all come from NMI: {requests:?}"
    );
    Ok(())
}

/// Priority 2: NMI SIGKILLed and restarted while two pods request tokens in
/// a loop. While it is down no pod request reaches IMDS (the redirect stays;
/// the emulator sees every caller's address), requests are refused at once
/// (curl exit 7, not a timeout), and tokens resume after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nmi_killed_and_restarted_under_load_fails_closed() -> anyhow::Result<()> {
    let mut f = node(2, &[]).await?;
    let id_a = identity(f.ns(), "id-a", CLIENT_A);
    for i in 0..2 {
        f.create_bound_pod(&format!("app{i}"), i, &id_a, "a")
            .await?;
    }
    let since = f.last_seq().await?;

    // Each iteration asks for a new resource, so NMI's cache cannot answer
    // and every success is an IMDS call by NMI. The loops run until the test
    // creates `stop` (after NMI is back), bounded to 400 iterations.
    let stop = f.dir().join("stop");
    let script = format!(
        "for i in $(seq 1 400); do \
           [ -e '{}' ] && break; \
           curl -s -o /dev/null --max-time 5 -H 'Metadata: true' \
             -w '%{{http_code}} %{{exitcode}}\\n' \
             \"http://{IMDS_ADDRESS}{TOKEN_PATH}&resource=https%3A%2F%2Fr$i.$1.example%2F\"; \
           sleep 0.1; \
         done",
        stop.display()
    );
    let mut loops = Vec::new();
    for i in 0..2 {
        let mut cmd = f.pod_ns(i).command("sh");
        cmd.args(["-c", &script, "sh", &format!("pod{i}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        loops.push(
            tokio::process::Command::from(cmd)
                .kill_on_drop(true)
                .spawn()?,
        );
    }

    tokio::time::sleep(Duration::from_millis(1500)).await;
    f.stop_nmi();
    // Answers to requests NMI sent just before it died may still be logged.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let down_from = f.last_seq().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let chain = f.nat_rules(Some("aad-metadata"))?;
    assert!(chain.contains("DNAT"), "redirect removed: {chain}");
    let down_to = f.last_seq().await?;
    f.restart_nmi().await?;
    // Let the pods get tokens from the new NMI for a while, then stop them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    std::fs::write(&stop, "")?;

    let mut outputs = Vec::new();
    for child in loops {
        // Bounded: they stop at `stop`, or after 400 iterations.
        outputs.push(child.wait_with_output().await);
    }
    let mut refused = 0;
    let mut ok_after_refusal = 0;
    let mut codes = std::collections::BTreeMap::<String, u32>::new();
    for out in outputs {
        let out = out?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut seen_refusal = false;
        for line in text.lines() {
            *codes.entry(line.to_string()).or_default() += 1;
            match line {
                "000 7" => {
                    refused += 1;
                    seen_refusal = true;
                }
                "200 0" if seen_refusal => ok_after_refusal += 1,
                _ => {}
            }
            assert_ne!(line, "000 28", "a request hung until curl's timeout");
        }
    }
    eprintln!("answers (status, curl exit) → count: {codes:?}");
    assert!(
        refused > 0,
        "no request was made while NMI was down: {codes:?}"
    );
    assert!(ok_after_refusal > 0, "tokens did not resume: {codes:?}");

    let requests = f.imds_requests(since).await?;
    let leaked: Vec<_> = requests.iter().filter(|r| from_a_pod(&f, r)).collect();
    assert!(leaked.is_empty(), "pod requests reached IMDS: {leaked:?}");
    let while_down: Vec<_> = requests
        .iter()
        .filter(|r| {
            r["seq"]
                .as_u64()
                .is_some_and(|s| s > down_from && s <= down_to)
        })
        .collect();
    assert!(
        while_down.is_empty(),
        "IMDS saw requests while NMI was down: {while_down:?}"
    );
    let ok = requests.iter().filter(|r| r["status"] == 200).count();
    eprintln!(
        "{} IMDS requests in all ({ok} answered 200), none from a pod address",
        requests.len()
    );
    assert!(ok > 0);

    // Control: the observer does see pod addresses. After the explicit
    // cleanup (what the chart's uninstall runs), a pod's request goes
    // straight to IMDS and is logged with the pod's address.
    f.stop_nmi();
    f.node_ns()
        .run(env!("CARGO_BIN_EXE_e2e-nmi"), &["--cleanup-iptables=true"])?;
    let since = f.last_seq().await?;
    let (code, _, body) = curl(
        f.pod_ns(0),
        &imds_url(&format!(
            "&client_id={CLIENT_A}{}",
            "&resource=https%3A%2F%2Fmanagement.azure.com%2F"
        )),
        &[MD],
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    let direct = f.imds_requests(since).await?;
    assert!(
        direct
            .iter()
            .any(|r| from_a_pod(&f, r) && r["peer"] == f.pod_ip(0)),
        "{direct:?}"
    );
    Ok(())
}

/// Priority 3: IMDS's 429/5xx are retried by NMI with bounded backoff that
/// honours `Retry-After`; when they persist, the pod gets IMDS's own status.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn imds_faults_are_retried_then_surfaced() -> anyhow::Result<()> {
    let (f, _) = node_with_app().await?;
    let fault = |status: u16, retry_after: Option<u64>, count: u32| {
        json!({
            "service": "imds",
            "pathContains": "oauth2/token",
            "action": {"kind": "status", "status": status, "retryAfter": retry_after},
            "count": count,
        })
    };
    let for_resource = |requests: &[Value], resource: &str| -> Vec<Value> {
        requests
            .iter()
            .filter(|r| r["uri"].as_str().unwrap_or("").contains(resource))
            .cloned()
            .collect()
    };

    // Two 429s asking for 2 s each, then a token: three IMDS requests, the
    // later ones at least Retry-After apart.
    let since = f.last_seq().await?;
    f.inject(fault(429, Some(2), 2)).await?;
    let (code, _, body) = curl(
        f.pod_ns(0),
        &imds_url("&resource=https%3A%2F%2Fone.example%2F"),
        &[MD],
    )
    .await?;
    assert_eq!(code, 200, "{body}\n{}", f.log());
    assert_eq!(token_claims(&body)?["appid"], CLIENT_A);
    let seen = for_resource(&f.imds_requests(since).await?, "one.example");
    let statuses: Vec<_> = seen.iter().map(|r| r["status"].clone()).collect();
    assert_eq!(statuses, [json!(429), json!(429), json!(200)], "{seen:?}");
    for pair in seen.windows(2) {
        let gap = pair[1]["atMs"].as_u64().unwrap_or(0) - pair[0]["atMs"].as_u64().unwrap_or(0);
        assert!(
            gap >= 1950,
            "Retry-After: 2 not honoured ({gap} ms): {seen:?}"
        );
    }

    // A 500 that persists: NMI's bounded retries (four requests), then
    // IMDS's 500 and body reach the pod.
    let since = f.last_seq().await?;
    f.inject(fault(500, None, 10)).await?;
    let (code, _, body) = curl(
        f.pod_ns(0),
        &imds_url("&resource=https%3A%2F%2Ftwo.example%2F"),
        &[MD],
    )
    .await?;
    assert_eq!(code, 500, "{body}");
    assert!(
        body.contains("Failed to retrieve token from the Active directory"),
        "{body}"
    );
    assert!(!body.contains("access_token"), "{body}");
    let seen = for_resource(&f.imds_requests(since).await?, "two.example");
    assert_eq!(seen.len(), 4, "{seen:?}");
    f.clear_faults().await?;

    // A 429 asking for longer than NMI holds a request: passed on at once,
    // Retry-After included, after one IMDS request.
    let since = f.last_seq().await?;
    f.inject(fault(429, Some(30), 1)).await?;
    let url = imds_url("&resource=https%3A%2F%2Fthree.example%2F");
    let (code, head, body) = curl(f.pod_ns(0), &url, &[MD]).await?;
    assert_eq!(code, 429, "{body}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 30"),
        "{head}"
    );
    let seen = for_resource(&f.imds_requests(since).await?, "three.example");
    assert_eq!(seen.len(), 1, "{seen:?}");
    // The fault is spent: the same request now gets a token.
    let (code, _, body) = curl(f.pod_ns(0), &url, &[MD]).await?;
    assert_eq!(code, 200, "{body}");
    Ok(())
}

/// Priority 4: managed mode (bindings and identities in the pod's namespace,
/// no AAIs) and namespaced standard mode (an identity of another namespace
/// does not apply), end to end through pod namespaces.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn managed_and_namespaced_modes() -> anyhow::Result<()> {
    let cluster = Cluster::shared();
    let ns2_guard = cluster.temp_namespace("nmi-e2e-mode2").await?;
    let ns2 = ns2_guard.name().to_string();
    let mut f = node(3, &["--operation-mode=managed", "--forceNamespaced=true"]).await?;
    let (client, ns1) = (f.client.clone(), f.ns().to_string());

    // ns1: identity A bound to selector "a". ns2: identity B bound to "b",
    // and nothing for "a".
    for (ns, id, client_id, selector) in
        [(&ns1, "id-a", CLIENT_A, "a"), (&ns2, "id-b", CLIENT_B, "b")]
    {
        let pp = PostParams::default();
        Api::<AzureIdentity>::namespaced(client.clone(), ns)
            .create(&pp, &identity(ns, id, client_id))
            .await?;
        let bind = binding(ns, &format!("bind-{selector}"), id, selector);
        Api::<AzureIdentityBinding>::namespaced(client.clone(), ns)
            .create(&pp, &bind)
            .await?;
    }
    // pod 0 in ns1 labelled "a": served. pod 1 in ns2 labelled "a": the
    // binding lives in ns1. pod 2 in ns1 labelled "b": the binding lives in ns2.
    for (ns, name, i, selector) in [
        (&ns1, "a-here", 0, "a"),
        (&ns2, "a-there", 1, "a"),
        (&ns1, "b-there", 2, "b"),
    ] {
        let labels = [("aadpodidbinding", selector)];
        f.create_pod_in(ns, name, &[&f.pod_ip(i)], &labels).await?;
    }

    let arm = "&resource=https%3A%2F%2Fmanagement.azure.com%2F";
    // The identity and binding arrive through the watch: bounded wait.
    let pod0 = f.pod_ns(0);
    let body = wait_for(
        "managed mode serves the bound pod",
        Duration::from_secs(15),
        || async {
            let (code, _, body) = curl(pod0, &imds_url(arm), &[MD]).await.ok()?;
            (code == 200).then_some(body)
        },
    )
    .await
    .with_context(|| f.log())?;
    assert_eq!(token_claims(&body)?["appid"], CLIENT_A);
    let (code, _, body) = curl(
        f.pod_ns(0),
        &imds_url(&format!("{arm}&client_id={CLIENT_B}")),
        &[MD],
    )
    .await?;
    assert_eq!(code, 404, "{body}");
    for (i, who) in [
        (1, "binding of its selector in another namespace"),
        (2, "binding in another namespace"),
    ] {
        let (code, _, body) = curl(f.pod_ns(i), &imds_url(arm), &[MD]).await?;
        assert_eq!(code, 404, "pod {i} ({who}): {body}");
        assert!(!body.contains("access_token"), "{body}");
        let (code, _, body) = curl(
            f.pod_ns(i),
            &imds_url(&format!("{arm}&client_id={CLIENT_B}")),
            &[MD],
        )
        .await?;
        assert_eq!(code, 404, "pod {i} ({who}) by client_id: {body}");
    }

    // Standard mode, namespaced: the AAIs decide, and one whose identity is
    // in another namespace (as a non-namespaced MIC would have written, in
    // "default", for the binding in ns2 selecting "b") does not apply.
    // Without namespaced mode it would.
    let id_b_ns2 = identity(&ns2, "id-b", CLIENT_B);
    f.assignment("b-there", &id_b_ns2, "b")
        .create(&client)
        .await?;
    let id_a_ns1 = identity(&ns1, "id-a", CLIENT_A);
    f.assignment("a-here", &id_a_ns1, "a")
        .namespaced()
        .create(&client)
        .await?;
    let standard = ["--operation-mode=standard", "--forceNamespaced=true"];
    f.restart_nmi_with(&[&E2E_ARGS[..], &standard].concat())
        .await?;
    let (code, _, body) = curl(f.pod_ns(0), &imds_url(arm), &[MD]).await?;
    assert_eq!(code, 200, "{body}\n{}", f.log());
    assert_eq!(token_claims(&body)?["appid"], CLIENT_A);
    let (code, _, body) = curl(f.pod_ns(2), &imds_url(arm), &[MD]).await?;
    assert_eq!(
        code, 404,
        "namespaced mode served another namespace's identity: {body}"
    );
    assert!(!body.contains("access_token"), "{body}");

    let not_namespaced = ["--operation-mode=standard", "--forceNamespaced=false"];
    f.restart_nmi_with(&[&E2E_ARGS[..], &not_namespaced].concat())
        .await?;
    let (code, _, body) = curl(f.pod_ns(2), &imds_url(arm), &[MD]).await?;
    assert_eq!(code, 200, "without namespaced mode the AAI applies: {body}");
    assert_eq!(token_claims(&body)?["appid"], CLIENT_B);
    Ok(())
}

/// Priority 5: IPv6 callers. The redirect is IPv4 (169.254.169.254 has no
/// IPv6 form), so an IPv6 pod reaches NMI's listener directly: NMI listens
/// on `::` (dual-stack), finds pods by their IPv6 `podIPs`, refuses
/// `/host/token` from a pod's IPv6 address and accepts it over `[::1]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ipv6_pods_reach_nmi() -> anyhow::Result<()> {
    let f = node(3, &["--nmi-listen-address=::"]).await?;
    let ns = f.ns();
    let v6: Vec<Ipv6Addr> = (0..3)
        .map(|i| f.net().add_ipv6(i))
        .collect::<Result<_, _>>()?;
    let id_a = identity(ns, "id-a", CLIENT_A);
    // pod 0: dual-stack (both addresses in podIPs). pod 1: IPv6 only in the
    // API (its namespace still has an IPv4 address nobody owns). pod 2: not
    // a pod of the API at all.
    let labels = [("aadpodidbinding", "a")];
    let (v4_0, v6_0, v6_1) = (f.pod_ip(0), v6[0].to_string(), v6[1].to_string());
    for (name, ips) in [("dual", vec![&*v4_0, &*v6_0]), ("v6only", vec![&*v6_1])] {
        f.create_pod_in(ns, name, &ips, &labels).await?;
        f.assignment(name, &id_a, "a").create(&f.client).await?;
    }

    let arm = "&resource=https%3A%2F%2Fmanagement.azure.com%2F";
    let nmi_v6 = |q: &str| format!("http://[{NODE_POD_GATEWAY_V6}]:{NMI_PORT}{TOKEN_PATH}{q}");
    // The route to NMI over IPv6 exists (neighbour discovery on the link is
    // quick but not instant): bounded wait for the first answer.
    let pod1 = f.pod_ns(1);
    let body = wait_for("IPv6 pod reaches NMI", Duration::from_secs(15), || async {
        let (code, _, body) = curl(pod1, &nmi_v6(arm), &[MD]).await.ok()?;
        (code != 0).then_some((code, body))
    })
    .await?;
    assert_eq!(body.0, 200, "IPv6-only pod: {}\n{}", body.1, f.log());
    assert_eq!(token_claims(&body.1)?["appid"], CLIENT_A);

    // The dual-stack pod is the same pod by either address.
    let (code, _, body) = curl(f.pod_ns(0), &nmi_v6(arm), &[MD]).await?;
    assert_eq!(code, 200, "dual-stack pod over IPv6: {body}");
    let (code, _, body) = curl(f.pod_ns(0), &imds_url(arm), &[MD]).await?;
    assert_eq!(code, 200, "dual-stack pod over IPv4 (redirect): {body}");

    // The IPv6-only pod's unowned IPv4 address, and an IPv6 address no pod
    // has, get no token.
    let (code, _, body) = curl(f.pod_ns(1), &imds_url(arm), &[MD]).await?;
    assert_eq!(code, 500, "{body}");
    assert!(!body.contains("access_token"), "{body}");
    let (code, _, body) = curl(f.pod_ns(2), &nmi_v6(arm), &[MD]).await?;
    assert_eq!(code, 500, "{body}");
    assert!(!body.contains("access_token"), "{body}");

    // /host/token: refused from a pod's IPv6 address, served over [::1].
    let host_headers = [&*format!("podns: {ns}"), "podname: v6only"];
    let host_path = "/host/token?resource=https%3A%2F%2Fmanagement.azure.com%2F";
    let (code, _, body) = curl(
        f.pod_ns(1),
        &format!("http://[{NODE_POD_GATEWAY_V6}]:{NMI_PORT}{host_path}"),
        &host_headers,
    )
    .await?;
    assert_eq!(code, 500, "{body}");
    assert!(
        body.contains("request remote address is not from a host"),
        "{body}"
    );
    let (code, _, body) = curl(
        f.node_ns(),
        &format!("http://[::1]:{NMI_PORT}{host_path}"),
        &host_headers,
    )
    .await?;
    assert_eq!(code, 200, "{body}\n{}", f.log());
    let v: Value = serde_json::from_str(&body)?;
    assert_eq!(v["clientid"], CLIENT_A, "{body}");
    assert_eq!(token_claims(&v["token"].to_string())?["appid"], CLIENT_A);

    let requests = f.imds_requests(0).await?;
    assert!(requests.iter().all(|r| !from_a_pod(&f, r)), "{requests:?}");
    Ok(())
}
