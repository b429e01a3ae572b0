//! End-to-end suite: the whole system as a user runs it.
//!
//! Each test brings up an [`aadpodid_tests::e2e::World`]: a cluster of its
//! own, the chart rendered with `helm template` and applied, mic (2 replicas,
//! leader election) and nmi (one per node, in node network namespaces) run
//! with the container args and env of the rendered Deployment and DaemonSet,
//! authenticated as the chart's ServiceAccounts, against the Azure emulator
//! (ARM, Entra ID, IMDS per machine) with two scale sets; pods are Pod objects
//! plus network namespaces, and tokens are asked for from inside them.
//!
//! Upstream's e2e tests (Ginkgo, `test/e2e` of Azure/aad-pod-identity
//! v1.8.17, run on AKS) and the tests here that exercise each, named as
//! `function` (this file) or `file::function` (`tests/tests/<file>.rs`);
//! `mapping_names_only_tests_that_exist` checks every name. Where ours
//! deliberately differs, the named test asserts ours and says so.
//!
//! | upstream test | here |
//! |---|---|
//! | single_identity: validation (token by client ID / resource ID) | `forty_pods_five_identities_two_scale_sets` (curl with no ID from every pod, the Python SDK by client ID for each identity); by resource ID: `e2e_objects::two_identities_on_one_pod_each_by_its_id`, `nmi_e2e::rust_sdk_credential_through_nmi` |
//! | single_identity: AAI deleted with the pod | `forty_pods_five_identities_two_scale_sets` (0 AAIs, scale sets back) |
//! | single_identity: AzureIdentity deleted; binding deleted | `e2e_objects::identity_or_binding_deleted_stops_the_tokens` (AAIs gone, identity off the scale sets, 404 and no token, other pods keep theirs) |
//! | single_identity: AzureIdentity fields updated | `e2e_objects::identity_and_binding_edits_move_the_assignment` (clientID and resourceID changed: the new identity replaces the old on the scale set and in the tokens; a binding's selector edited moves its identity to the newly selected pod) |
//! | single_identity: right identity of two, wrong one fails | `e2e_objects::two_identities_on_one_pod_each_by_its_id` (both identities by client and resource ID; upstream's "wrong" identity fails at Key Vault, Azure's check, so here an unbound identity is refused instead), `nmi_netns::nmi_on_a_test_node` (bound to A, asking for B is refused) |
//! | service_principal | `nmi_netns::nmi_service_principal_identity` |
//! | node: identity used by another pod kept | `mic_lifecycle::child_shared_identity_is_removed_after_the_last_pod`, `forty_pods_five_identities_two_scale_sets` (each identity serves pods on several instances; deleting releases only when no pod needs it) |
//! | node: AAI deleted when the UAMI was unassigned by hand | `e2e_objects::identity_or_binding_deleted_stops_the_tokens` (last step: stripped from both scale sets, then the pods deleted, AAIs go) |
//! | node: system-assigned / foreign UAMI untouched; cluster identity kept | `mic_lifecycle::child_standalone_vm_node_keeps_its_system_identity`, `entitlement::forged_client_ids_and_cluster_identities` (kubelet and add-on identities sampled every 100 ms), `mic_lifecycle::child_pod_lifecycle_assigns_and_removes_the_identity` |
//! | node: immutable identity | `e2e_objects::immutable_identity_stays_on_the_scale_set` (with `mic.serveClusterIdentities=true`: ours serves `--immutable-user-msis` identities to pods only then) |
//! | node: reconcile after manual unassign | `aks_upgrade_identities_restored_by_drift_reconcile`, `mic_lifecycle::child_drift_is_repaired` |
//! | multiple_identities: remove the correct ones | `forty_pods_five_identities_two_scale_sets` (deletes in two halves, checks the scale sets after each), `e2e_objects::identity_or_binding_deleted_stops_the_tokens` (AzureIdentities deleted one by one, the others keep working) |
//! | multiple_identities: 40 pods within 150 s | `forty_pods_five_identities_two_scale_sets` (prints the time; no timed assertion) |
//! | multiple_identities: relabel switches identity | `e2e_objects::relabelled_pod_switches_identity` |
//! | invalid_identities: valid assigned despite invalid | `arm_429_storm_and_an_invalid_identity`, `mic_lifecycle::child_invalid_identity_does_not_hold_back_valid_ones` |
//! | invalid_identities: existing not unassigned | `arm_429_storm_and_an_invalid_identity` (assigned identities stay while the invalid one keeps failing) |
//! | identity_exception | `nmi_netns::nmi_on_a_test_node` (excepted pod reaches IMDS directly) |
//! | instance_metadata (404, header required, 403 when blocked) | `e2e_instance_metadata::instance_metadata_status_codes` (ours answers unknown paths 404 itself instead of proxying them) |
//! | liveness_probe (MIC Active/Not Active, NMI Active) | `leader_mic_killed_mid_patch` (Active on the leader only), `nmi_netns::nmi_on_a_test_node` (NMI Active before the first request); every world polls each process's rendered probe |
//! | init_containers | not covered (no kubelet here; an init container is a pod IP like any other) |
//! | disruptive: MIC leader changed | `leader_mic_killed_mid_patch` |
//! | name_conflict | `e2e_objects::same_names_in_two_namespaces_are_kept_apart` |
//! | retry_after_header | `e2e_objects::retry_after_header_paces_the_sdk` (503 with `Retry-After: 20`; the Python SDK waits it out once and gets the token) |
//! | gatekeeper | not covered (no admission webhook); the CRD schema check: `crd_compat::seed_manifests_apply_unchanged_and_read_back` |
//!
//! Beyond upstream: `nmi_restarted_under_token_load` and
//! `apiserver_restarted_mid_run`.
//!
//! Chart values the tests set, all through `--set` on the chart's own values:
//! `mic.customCloud.enabled=true` (the emulator is a custom cloud), and per test
//! `mic.identityAssignmentReconcileInterval` (drift), `mic.leaderElection.duration`
//! (failover). Everything else is the chart's default.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use aadpodid_tests::e2e::{KUBELET, Options, PodRef, World, id_client, vmss_name};
use aadpodid_tests::{IdentitySelector, python_imds_token, wait_for};
use azure_emulator::{Fault, FaultAction, Service};

fn options() -> Options {
    Options::new(env!("CARGO_BIN_EXE_e2e-mic"), env!("CARGO_BIN_EXE_e2e-nmi"))
}

const ASSIGN: Duration = Duration::from_secs(120);

/// Deletes the pods, then waits until no AzureAssignedIdentity is left and
/// the scale sets carry `before` again.
async fn release_all(
    world: &World,
    pods: &[PodRef],
    before: &BTreeMap<String, BTreeSet<String>>,
) -> anyhow::Result<()> {
    world.delete_pods(pods).await?;
    world.wait_no_assigned(ASSIGN).await?;
    world.wait_vmss(before, ASSIGN).await
}

/// 40 pods over 5 identities on 2 scale sets (3 instances each) all get their
/// tokens; deleting them releases every identity, in two halves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_pods_five_identities_two_scale_sets() -> anyhow::Result<()> {
    let mut opts = options();
    opts.instances = 3;
    opts.pods_per_node = 7;
    let world = World::start(opts).await?;
    let before = world.all_vmss_identities();
    assert_eq!(
        before,
        world.expected_identities(&[]),
        "scale sets start with the cluster identity only"
    );

    let t = Instant::now();
    let pods = world.create_pods(0, 40, |i| Some(i % 5)).await?;
    world.wait_assigned(&pods, ASSIGN).await?;
    eprintln!(
        "40 AAIs Assigned {:.1?} after the pods were created",
        t.elapsed()
    );
    world
        .wait_vmss(&world.expected_identities(&pods), Duration::from_secs(10))
        .await?;

    // Every pod, with curl as an app would (no ID: the pod's only identity).
    world.check_tokens(&pods).await?;
    eprintln!(
        "40 pods got their tokens {:.1?} after creation",
        t.elapsed()
    );
    // The real Python SDK, one pod per identity, by client ID.
    for p in pods.iter().take(5) {
        let ns = world.pod_ns(p)?;
        let client = id_client(p.identity.unwrap_or_default());
        let out = tokio::task::block_in_place(|| {
            python_imds_token(
                None,
                "https://management.azure.com/.default",
                IdentitySelector::ClientId(&client),
                Some(ns),
            )
        })?;
        let token = out["token"].as_str().unwrap_or_default();
        let appid = world
            .emu
            .verify_token(token)
            .map_err(|e| anyhow::anyhow!("{}: {e:?}: {out}", p.name))?
            .appid;
        assert_eq!(appid, client, "{}", p.name);
    }

    // Half of them go: identities still used elsewhere on a scale set stay.
    let (gone, kept) = pods.split_at(20);
    world.delete_pods(gone).await?;
    world.wait_assigned(kept, ASSIGN).await?;
    world
        .wait_vmss(&world.expected_identities(kept), ASSIGN)
        .await?;
    world.check_tokens(kept).await?;
    // The rest: every identity released, the scale sets as they were.
    release_all(&world, kept, &before).await?;
    let c = world.emu.counters();
    eprintln!(
        "ARM writes per scale set {:?}, reads {}, 429s {}; total {:.1?}",
        c.arm_writes,
        c.arm_reads.values().sum::<u64>(),
        c.arm_throttled,
        world.elapsed()
    );
    Ok(())
}

/// The AKS-upgrade case: the identities mic put on a scale set are stripped
/// behind its back (the emulator's admin action, as an upgrade resets the
/// model); mic's drift reconcile puts them back and the pods' tokens work
/// again. Reconcile interval: the chart's
/// `mic.identityAssignmentReconcileInterval=3s` (upstream's e2e uses 2m).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aks_upgrade_identities_restored_by_drift_reconcile() -> anyhow::Result<()> {
    let mut opts = options();
    opts.set.push((
        "mic.identityAssignmentReconcileInterval".into(),
        "3s".into(),
    ));
    let world = World::start(opts).await?;
    let before = world.all_vmss_identities();
    let pods = world.create_pods(0, 8, |i| Some(i % 5)).await?;
    world.wait_assigned(&pods, ASSIGN).await?;
    let want = world.expected_identities(&pods);
    world.wait_vmss(&want, Duration::from_secs(10)).await?;

    let vmss = vmss_name(0);
    let ours: Vec<String> = want[&vmss]
        .iter()
        .filter(|n| !n.eq_ignore_ascii_case(KUBELET))
        .cloned()
        .collect();
    let names: Vec<&str> = ours.iter().map(String::as_str).collect();
    let stripped = world.emu.strip_identities(&vmss, Some(&names));
    assert_eq!(stripped, ours.len(), "stripped {names:?}");
    assert_eq!(
        world.vmss_identities(&vmss),
        before[&vmss],
        "only the cluster identity left"
    );
    let t = Instant::now();
    world.wait_vmss(&want, Duration::from_secs(60)).await?;
    eprintln!(
        "restored by drift reconcile {:.1?} after the strip",
        t.elapsed()
    );
    world.wait_assigned(&pods, ASSIGN).await?;
    // The instances' IMDS sees them once the scale-set write completes.
    world.wait_tokens(&pods, Duration::from_secs(30)).await?;
    eprintln!("tokens back {:.1?} after the strip", t.elapsed());

    release_all(&world, &pods, &before).await
}

/// An ARM 429 storm (the first 4 reads and the first 8 writes answered 429
/// with `Retry-After: 2`) and one identity the tenant does not have: the valid identities
/// are still assigned, the invalid one never is and takes nothing with it,
/// and ARM writes stay within the write budget mic keeps per scale set (the
/// chart's defaults: burst 12, 4 per minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn arm_429_storm_and_an_invalid_identity() -> anyhow::Result<()> {
    let mut opts = options();
    opts.invalid_identity = true;
    let world = World::start(opts).await?;
    let before = world.all_vmss_identities();
    let storm = |method: &str, times: u32| {
        Fault::status(Service::Arm, 429, Some(2))
            .method(method)
            .times(times)
    };
    world.emu.inject(storm("GET", 4));
    world.emu.inject(storm("PATCH", 8));
    let t = Instant::now();
    let pods = world
        .create_pods(0, 8, |i| if i % 4 == 3 { None } else { Some(i % 5) })
        .await?;
    world.wait_assigned(&pods, ASSIGN).await?;
    eprintln!(
        "valid identities Assigned {:.1?} after the pods were created",
        t.elapsed()
    );
    let want = world.expected_identities(&pods);
    world.wait_vmss(&want, Duration::from_secs(30)).await?;
    world
        .wait_tokens(&pods[..3], Duration::from_secs(30))
        .await?;
    let c = world.emu.counters();
    assert_eq!(c.faults_fired, 12, "the whole storm was answered: {c:?}");
    // Keep watching while mic retries the invalid identity: the valid ones stay.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(world.all_vmss_identities(), want);
    let c = world.emu.counters();
    let minutes = t.elapsed().as_secs_f64() / 60.0;
    let budget = 12.0 + 4.0 * minutes.ceil();
    // Every write request sent, the 429s included (the counters leave out
    // answers the fault injection gave).
    let mut writes: BTreeMap<String, u32> = Default::default();
    for r in world.emu.requests(0) {
        if r.service == Service::Arm && (r.method == "PATCH" || r.method == "PUT") {
            let path = r.uri.split('?').next().unwrap_or_default().to_lowercase();
            *writes.entry(path).or_default() += 1;
        }
    }
    assert_eq!(writes.len(), 2, "both scale sets written: {writes:?}");
    for (vmss, n) in &writes {
        eprintln!("{vmss}: {n} write requests in {:.1?}", t.elapsed());
        assert!(
            f64::from(*n) <= budget,
            "{vmss}: {n} writes over a budget of {budget}: {c:?}"
        );
    }
    eprintln!(
        "429s answered: {}, errors: {}",
        c.arm_throttled, c.arm_errors
    );

    release_all(&world, &pods, &before).await
}

/// nmi restarted (SIGTERM, as a rolling update does) under token load: while
/// it is down the pods' requests are refused and none reaches the node's
/// IMDS; after it is back, tokens resume.
///
/// Requests reach IMDS through the node's relay, which hides the caller's
/// address, so the check is stronger than "no request from a pod address":
/// the node's IMDS gets no request at all while nmi (its only other caller)
/// is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nmi_restarted_under_token_load() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut world = World::start(options()).await?;
    let pods = world.create_pods(0, 8, |i| Some(i % 5)).await?;
    world.wait_assigned(&pods, ASSIGN).await?;
    world.check_tokens(&pods).await?;
    let on_node0: Vec<_> = pods.iter().filter(|p| p.node == 0).cloned().collect();
    assert_eq!(on_node0.len(), 2);
    let machine = world.nodes[0].machine.clone();

    // Load: each pod of node 0 asks again and again.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for p in &on_node0 {
        let mut cmd = world.pod_ns(p)?.command("sh");
        let url = format!("http://169.254.169.254{}", aadpodid_tests::e2e::TOKEN_PATH);
        cmd.args([
            "-c",
            "curl -s -o /dev/null --max-time 3 -H 'Metadata: true' -w '%{http_code}\\n' \"$0\"",
            &url,
        ]);
        let stop = stop.clone();
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.stdout(std::process::Stdio::piped()).kill_on_drop(true);
        load.spawn(async move {
            let mut seen = Vec::new();
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) && rounds < 2000 {
                rounds += 1;
                let at = Instant::now();
                let code = match cmd.output().await {
                    Ok(o) => String::from_utf8_lossy(&o.stdout).trim().to_string(),
                    Err(e) => format!("spawn: {e}"),
                };
                seen.push((at, code));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seen
        });
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    world.signal_nmi(0, "TERM")?;
    let down_at = Instant::now();
    let imds_at_down = world.emu.counters().imds_requests.get(&machine).copied();
    let chain = world.nodes[0]
        .net
        .node
        .run("iptables", &["-t", "nat", "-S", "aad-metadata"])?;
    assert!(
        chain.contains("DNAT"),
        "the redirect stays while nmi restarts (fail-closed): {chain}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let imds_at_up = world.emu.counters().imds_requests.get(&machine).copied();
    let up_at = Instant::now();
    assert_eq!(
        imds_at_down, imds_at_up,
        "a request reached {machine}'s IMDS while nmi was down"
    );
    world.start_nmi(0).await?;
    let back_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);

    let mut during = 0;
    let mut after_ok = 0;
    let mut after = 0;
    while let Some(r) = load.join_next().await {
        for (at, code) in r? {
            if at > down_at && at < up_at {
                during += 1;
                // curl prints 000 when no HTTP answer came: refused, fail-closed.
                assert_eq!(code, "000", "an answer while nmi was down");
            }
            if at > back_at {
                after += 1;
                after_ok += usize::from(code == "200");
            }
        }
    }
    eprintln!(
        "while down: {during} requests refused; after restart: {after_ok}/{after} got tokens"
    );
    assert!(during > 0, "the load ran while nmi was down");
    assert!(
        after_ok > 0 && after_ok == after,
        "tokens resume: {after_ok}/{after}"
    );
    world.check_tokens(&pods).await?;
    Ok(())
}

/// The leader mic is killed (SIGKILL) while its scale-set PATCH is in flight
/// (ARM holds it 150 virtual seconds): the other replica takes the Lease
/// (the chart's `mic.leaderElection.duration=6s`) and finishes; deleting the
/// pods then leaves no identity behind on any scale set.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_mic_killed_mid_patch() -> anyhow::Result<()> {
    let mut opts = options();
    opts.set
        .push(("mic.leaderElection.duration".into(), "6s".into()));
    let mut world = World::start(opts).await?;
    let before = world.all_vmss_identities();
    let leader = world.leader().await?;
    assert_eq!(world.mic_health(leader).await.as_deref(), Some("Active"));
    assert_eq!(
        world.mic_health(1 - leader).await.as_deref(),
        Some("Not Active"),
        "the standby replica's probe"
    );
    world.emu.inject(
        Fault::new(Service::Arm, FaultAction::Delay { seconds: 150.0 })
            .method("PATCH")
            .times(1),
    );
    let pods = world.create_pods(0, 8, |i| Some(i % 5)).await?;
    let emu = &world.emu;
    wait_for(
        "mic's first PATCH in flight",
        Duration::from_secs(60),
        || async { (emu.counters().faults_fired >= 1).then_some(()) },
    )
    .await?;
    world.signal_mic(leader, "KILL")?;
    let killed = Instant::now();
    let next = world.leader().await?;
    assert_ne!(next, leader);
    eprintln!(
        "replica {next} took over {:.1?} after the kill",
        killed.elapsed()
    );
    world.wait_assigned(&pods, ASSIGN).await?;
    world
        .wait_vmss(&world.expected_identities(&pods), ASSIGN)
        .await?;
    assert_eq!(world.mic_health(next).await.as_deref(), Some("Active"));
    world.check_tokens(&pods).await?;

    release_all(&world, &pods, &before).await
}

/// The apiserver is killed while mic is assigning and started again: mic and
/// nmi reconnect, every pod (created before and after) ends with exactly one
/// Assigned identity, the scale sets carry exactly what the pods need, and
/// deleting the pods releases everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apiserver_restarted_mid_run() -> anyhow::Result<()> {
    let world = World::start(options()).await?;
    let before = world.all_vmss_identities();
    let mut pods = world.create_pods(0, 4, |i| Some(i % 5)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    world.cluster.stop_apiserver().await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    world.cluster.start_apiserver().await?;
    pods.extend(world.create_pods(4, 4, |i| Some(i % 5)).await?);
    world.wait_assigned(&pods, ASSIGN).await?;
    world
        .wait_vmss(&world.expected_identities(&pods), ASSIGN)
        .await?;
    world.check_tokens(&pods).await?;

    release_all(&world, &pods, &before).await
}

/// The backticked test names of a mapping cell: `function` or
/// `file::function` (other backticked text, such as flags and values, is
/// not a name).
fn named_tests(cell: &str) -> Vec<&str> {
    let is_ident = |s: &str| {
        s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    cell.split('`')
        .skip(1)
        .step_by(2)
        .filter(|t| {
            let mut parts = t.split("::");
            let ok = parts.next().is_some_and(is_ident);
            ok && parts.clone().count() <= 1 && parts.all(is_ident)
        })
        .collect()
}

/// Whether `source` has a test function `name`: `fn name(` with a
/// `#[test]` or `#[tokio::test` attribute at most three lines above.
fn has_test(source: &str, name: &str) -> bool {
    let lines: Vec<&str> = source.lines().map(str::trim_start).collect();
    let sync = format!("fn {name}(");
    let asynchronous = format!("async fn {name}(");
    lines.iter().enumerate().any(|(i, l)| {
        (l.starts_with(&sync) || l.starts_with(&asynchronous))
            && lines[i.saturating_sub(3)..i]
                .iter()
                .any(|a| a.starts_with("#[test]") || a.starts_with("#[tokio::test"))
    })
}

/// The upstream mapping of the module documentation names only tests that
/// exist: every row names at least one test (unless it says "not
/// covered"), and each `file::function` is a test function of
/// `tests/tests/<file>.rs`, each bare `function` one of this file; the same
/// for the "Beyond upstream" list.
#[test]
fn mapping_names_only_tests_that_exist() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let here = include_str!("e2e.rs");
    let docs: Vec<&str> = here
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(str::trim)
        .collect();
    let mut names: Vec<(String, &str)> = Vec::new();
    let mut rows = 0;
    for row in docs.iter().filter(|l| l.starts_with("| ")) {
        if row.starts_with("| upstream test") {
            continue;
        }
        rows += 1;
        let cells: Vec<&str> = row.trim_matches('|').split(" | ").collect();
        assert_eq!(cells.len(), 2, "a row of two cells: {row}");
        let found = named_tests(cells[1]);
        assert!(
            !found.is_empty() || cells[1].trim().starts_with("not covered"),
            "the row names no test: {row}"
        );
        names.extend(found.into_iter().map(|n| (n.to_string(), *row)));
    }
    let beyond: String = docs
        .iter()
        .skip_while(|l| !l.starts_with("Beyond upstream:"))
        .take_while(|l| !l.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    let extra = named_tests(&beyond);
    assert!(!extra.is_empty(), "the Beyond upstream list names no test");
    names.extend(
        extra
            .into_iter()
            .map(|n| (n.to_string(), "Beyond upstream")),
    );
    assert!(rows >= 20, "the mapping has {rows} rows");

    let mut missing = Vec::new();
    for (name, row) in &names {
        let (file, function) = name.split_once("::").unwrap_or(("e2e", name));
        let path = dir.join(format!("{file}.rs"));
        let exists = std::fs::read_to_string(&path).is_ok_and(|src| has_test(&src, function));
        if !exists {
            missing.push(format!(
                "{name} (no test fn {function} in {}): {row}",
                path.display()
            ));
        }
    }
    assert!(
        missing.is_empty(),
        "named but missing:\n{}",
        missing.join("\n")
    );

    // The checks can fail: a helper and an unknown name are not tests.
    assert!(has_test(here, "forty_pods_five_identities_two_scale_sets"));
    assert!(!has_test(here, "release_all"));
    assert!(!has_test(here, "no_such_test"));
    assert_eq!(
        named_tests("`a::b_1`, `c` (`--flag`, `x.y=true`, `Retry-After: 20`, `a::b::c`)"),
        ["a::b_1", "c"]
    );
}
