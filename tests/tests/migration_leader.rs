//! Never two leaders while upstream v1.8.17's Go MIC and this MIC run side by
//! side (a `helm upgrade` or a rollback overlaps their pods): this MIC holds
//! upstream's Endpoints lock as well as its Lease, and acts only while it
//! holds both.
//!
//! On the real apiserver and the Azure emulator, with the same lock
//! namespace and name (unique per test):
//! - Go MIC leads first: this MIC stays standby (`/healthz` Not Active, no
//!   sync cycle, no AAI written, no ARM request) while Go MIC assigns a pod,
//!   and takes over once Go MIC is killed and its record has expired;
//! - this MIC leads first: Go MIC stays standby (it logs that the lock is
//!   held by this MIC, its `/healthz` says Not Active, no ARM request and no
//!   AAI from it) while this MIC assigns a pod, and takes over at once when
//!   this MIC stops and releases both locks;
//! - throughout both, the holders of both records and whether each MIC acts
//!   are sampled every 100 ms: no sample shows both acting, and an acting
//!   MIC is always the holder of what it needs;
//! - with `--leader-election-endpoints-lock=false` this MIC uses the Lease
//!   only, and leaves the Endpoints object alone.
//!
//! ARM requests are told apart by api-version: upstream's Go SDK sends
//! Compute `2019-12-01`, this MIC never does.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use aadpodid_testkit::world::upgrade::{ENDPOINTS_ANNOTATION, LeaderLock, Side, side_of_arm};
use aadpodid_tests::go_mic::GoMic;
use aadpodid_tests::http::http_get;
use aadpodid_tests::mic_world::{MicWorld, RunningMic, WAIT, metric_value};
use aadpodid_tests::tenant::{APP_ID, APP2_ID};
use aadpodid_tests::{unique_name, wait_for};
use anyhow::{Context as _, bail, ensure};
use azure_emulator::observe::{RequestRecord, Service};
use k8s_openapi::api::core::v1::Endpoints;
use kube::api::{Api, ObjectMeta, PostParams};

const ENV: &str = "MIGLEAD";

aadpodid_tests::emulator_ca_parent_test!(migration_leader, "MIGLEAD", 5, 900);

/// Both MICs' lease: renew deadline 2 s, retry period 1 s.
const DURATION: &str = "--leader-election-duration=4s";
const LEASE: Duration = Duration::from_secs(4);
/// How long a standby is watched: several of the leader's renewals and more
/// than one lease duration.
const STANDBY_WATCH: Duration = Duration::from_secs(10);

/// Upstream's Go MIC on this world and `lock`, logging the election at
/// `-v=4` ("lock is held by ... and has not yet expired").
async fn go_mic(w: &MicWorld, lock: &LeaderLock, instance: &str) -> anyhow::Result<GoMic> {
    GoMic::spawn(
        w,
        instance,
        &[
            DURATION,
            &lock.name_flag(),
            "--update-user-msi-retry-interval=100ms",
            "-v=4",
        ],
    )
    .await
}

/// ARM requests after `since` by `side` (told apart by api-version).
fn arm_requests(w: &MicWorld, since: u64, side: Side) -> Vec<RequestRecord> {
    w.emu
        .requests(since)
        .into_iter()
        .filter(|r| r.service == Service::Arm && side_of_arm(&r.uri) == side)
        .collect()
}

fn last_seq(w: &MicWorld) -> u64 {
    w.emu.requests(0).last().map_or(0, |r| r.seq)
}

/// What one 100 ms sample saw. Whether a MIC acts is read before and after
/// the two records (this MIC's `leading`, then Go MIC's `/healthz`; the
/// records; Go MIC's `/healthz`, then `leading`), so a MIC that acted at
/// both ends acted while the records were read: neither gives up and takes
/// up leadership again (both exit when they lose it).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Sample {
    at: Duration,
    endpoints: Option<String>,
    lease: Option<String>,
    ours: (bool, bool),
    go: (bool, bool),
}

impl Sample {
    fn ours_acted(&self) -> bool {
        self.ours.0 && self.ours.1
    }

    fn go_acted(&self) -> bool {
        self.go.0 && self.go.1
    }

    /// The same state, time aside (for the printed history).
    fn state(&self) -> (Option<&str>, Option<&str>, bool, bool) {
        (
            self.endpoints.as_deref(),
            self.lease.as_deref(),
            self.ours.0 || self.ours.1,
            self.go.0 || self.go.1,
        )
    }
}

/// Samples both records and both MICs every 100 ms until finished (at most
/// 3000 samples).
struct History {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<Vec<Sample>>>,
}

impl History {
    fn start(lock: &LeaderLock, ours: &RunningMic, go_probe: SocketAddr) -> History {
        let lock = lock.clone();
        let leading = ours.handles.leading.clone();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut samples = Vec::new();
            let go_active =
                || async { http_get(go_probe, "/healthz").await.ok().as_deref() == Some("Active") };
            for _ in 0..3000 {
                let ours_a = *leading.borrow();
                let go_a = go_active().await;
                let endpoints = lock.endpoints_holder().await?;
                let lease = lock.lease_holder().await?;
                let go_b = go_active().await;
                let ours_b = *leading.borrow();
                samples.push(Sample {
                    at: start.elapsed(),
                    endpoints,
                    lease,
                    ours: (ours_a, ours_b),
                    go: (go_a, go_b),
                });
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            Ok(samples)
        });
        History { stop, task }
    }

    /// Stops sampling, prints the history's changes and checks it: never
    /// both acting; this MIC acts only as the holder of both records, Go
    /// MIC only as the holder of the Endpoints record.
    async fn finish(self, ours_id: &str, go_id: &str) -> anyhow::Result<Vec<Sample>> {
        let _ = self.stop.send(true);
        let samples = self.task.await??;
        println!("lock history ({} samples, 100 ms apart):", samples.len());
        let mut last = None;
        for s in &samples {
            if last != Some(s.state()) {
                println!(
                    "  {:>6} ms  endpoints {:?}  lease {:?}  ours acts {}  go acts {}",
                    s.at.as_millis(),
                    s.endpoints,
                    s.lease,
                    s.ours_acted(),
                    s.go_acted()
                );
                last = Some(s.state());
            }
        }
        ensure!(samples.len() > 10, "too few samples: {samples:?}");
        for s in &samples {
            ensure!(
                !(s.ours_acted() && (s.go.0 || s.go.1)),
                "both MICs acted at once: {s:?}"
            );
            if s.ours_acted() {
                ensure!(
                    s.endpoints.as_deref() == Some(ours_id) && s.lease.as_deref() == Some(ours_id),
                    "this MIC acted without holding both records: {s:?}"
                );
            }
            if s.go_acted() {
                ensure!(
                    s.endpoints.as_deref() == Some(go_id),
                    "Go MIC acted without holding the Endpoints record: {s:?}"
                );
            }
        }
        Ok(samples)
    }
}

/// A pod bound to `id` through a binding whose selector names the world's
/// namespace (both MICs match bindings across namespaces); the AAI's name.
async fn bound_pod(w: &MicWorld, id: &str, pod: &str, node: &str) -> anyhow::Result<String> {
    let selector = format!("{pod}-{}", w.ns.name());
    w.tenant_identity(id).await?;
    w.binding(&format!("{pod}-binding"), id, &selector).await?;
    w.pod(pod, &selector, node).await?;
    Ok(w.aai_name(pod, id))
}

/// The counters of a MIC acting: sync cycles and AAIs created, updated or
/// deleted.
const ACTS: [&str; 4] = [
    "aadpodidentity_mic_cycle_count",
    "aadpodidentity_assigned_identity_addition_count",
    "aadpodidentity_assigned_identity_update_count",
    "aadpodidentity_assigned_identity_deletion_count",
];

/// [`ACTS`] on this MIC's `/metrics`.
async fn our_acts(mic: &RunningMic) -> anyhow::Result<[f64; 4]> {
    let text = mic.metrics().await?;
    Ok(ACTS.map(|name| metric_value(&text, name)))
}

/// [`ACTS`] on Go MIC's `/metrics` (0 while absent or not answering).
async fn go_acts(go: &GoMic) -> [f64; 4] {
    let text = http_get(go.metrics, "/metrics").await.unwrap_or_default();
    ACTS.map(|name| metric_value(&text, name))
}

/// A MIC of `side` stood by since `since`: its [`ACTS`] (`acts`) all 0, and
/// no ARM request from its side.
fn stood_by(w: &MicWorld, since: u64, side: Side, acts: [f64; 4]) -> anyhow::Result<()> {
    ensure!(
        acts == [0.0; 4],
        "{side:?} MIC standby: no cycle, no AAI written (cycles, added, updated, deleted) = {acts:?}"
    );
    let arm = arm_requests(w, since, side);
    ensure!(arm.is_empty(), "{side:?} MIC standby: ARM requests {arm:?}");
    Ok(())
}

/// A world on the shared cluster and the lock both MICs use: the world's
/// namespace and a unique name.
async fn world_and_lock(prefix: &str) -> anyhow::Result<(MicWorld, LeaderLock)> {
    let w = MicWorld::shared(ENV, prefix).logs().build().await?;
    let lock = LeaderLock::new(w.client().await?, w.ns.name(), &unique_name("mic-lock"));
    Ok((w, lock))
}

/// This MIC as `mic-ours` on `lock`, leading.
async fn our_leader(w: &MicWorld, lock: &LeaderLock) -> anyhow::Result<RunningMic> {
    let ours = w
        .start_mic("mic-ours", &[DURATION, &lock.name_flag()])
        .await?;
    ours.wait_leading().await?;
    Ok(ours)
}

/// Go MIC leads first. This MIC, started on the same lock, stays standby
/// while Go MIC assigns a pod: no sync cycle, no AAI written, no ARM
/// request. Go MIC is killed (no release, as a deleted pod's process): this
/// MIC takes over once the record has gone unchanged for its lease, then
/// assigns a second pod itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by migration_leader in a child process that trusts the emulator CA"]
async fn child_go_leads_first_ours_stands_by_then_takes_over() -> anyhow::Result<()> {
    let (w, lock) = world_and_lock("lead-go").await?;
    let mut go = go_mic(&w, &lock, "go-mic-0").await?;
    wait_for("Go MIC Active", WAIT, || async {
        go.active().await.then_some(())
    })
    .await
    .with_context(|| go.tail())?;
    ensure!(
        lock.endpoints_holder().await?.as_deref() == Some("go-mic-0"),
        "Go MIC holds the Endpoints lock"
    );

    let since = last_seq(&w);
    let ours = w
        .start_mic("mic-ours", &[DURATION, &lock.name_flag()])
        .await?;
    let history = History::start(&lock, &ours, go.probe);
    let first = bound_pod(&w, APP_ID, "first", &w.nodes[0]).await?;
    if let Err(e) = w.wait_assigned(&first).await {
        bail!("{e:#}\n{}", go.tail());
    }
    tokio::time::sleep(STANDBY_WATCH).await;
    ensure!(!ours.leading(), "this MIC never led while Go MIC did");
    ensure!(ours.healthz().await? == "Not Active");
    stood_by(&w, since, Side::Ours, our_acts(&ours).await?)?;
    let go_writes = arm_requests(&w, since, Side::Upstream)
        .into_iter()
        .filter(|r| r.method != "GET")
        .count();
    ensure!(go_writes > 0, "Go MIC assigned the pod");
    // A standby writes neither lock.
    ensure!(
        lock.lease_holder().await?.is_none(),
        "no Lease while Go MIC leads"
    );

    // Go MIC goes, without a release.
    let killed = Instant::now();
    go.child.kill();
    ours.wait_leading().await?;
    let takeover = killed.elapsed();
    ours.wait_healthz("Active").await?;
    ensure!(
        lock.endpoints_holder().await?.as_deref() == Some("mic-ours")
            && lock.lease_holder().await?.as_deref() == Some("mic-ours"),
        "this MIC holds both locks"
    );
    // Upstream's exact format, which Go MIC reads.
    let record = lock.endpoints_annotation().await?.context("annotation")?;
    let v: serde_json::Value = serde_json::from_str(&record)?;
    let keys: Vec<&str> = v
        .as_object()
        .context("an object")?
        .keys()
        .map(String::as_str)
        .collect();
    ensure!(
        record.starts_with(
            "{\"holderIdentity\":\"mic-ours\",\"leaseDurationSeconds\":4,\"acquireTime\":\""
        ) && v["renewTime"]
            .as_str()
            .is_some_and(|t| t.len() == 20 && t.ends_with('Z'))
            && v["leaderTransitions"].as_i64().is_some_and(|n| n >= 1)
            && keys.len() == 5,
        "record {record}"
    );
    println!(
        "takeover Go -> ours: {} ms after Go MIC was killed (lease {} ms)",
        takeover.as_millis(),
        LEASE.as_millis()
    );
    // Not before Go MIC's last renewal had gone unchanged for a lease
    // (renewals a second apart at most), and not much later.
    ensure!(
        takeover >= LEASE - Duration::from_millis(2_100) && takeover < LEASE * 3,
        "takeover took {takeover:?}"
    );

    // This MIC now acts: the second pod is assigned by it.
    let ours_since = last_seq(&w);
    let second = bound_pod(&w, APP2_ID, "second", &w.nodes[1]).await?;
    w.wait_assigned(&second).await?;
    ensure!(
        arm_requests(&w, ours_since, Side::Ours)
            .iter()
            .any(|r| r.method != "GET"),
        "this MIC wrote to ARM"
    );
    ensure!(
        arm_requests(&w, ours_since, Side::Upstream).is_empty(),
        "nothing from Go MIC after it was killed"
    );
    w.delete_pods(&["first", "second"]).await?;
    w.wait_no_aais().await?;
    history.finish("mic-ours", "go-mic-0").await?;
    w.close(ours).await
}

/// This MIC leads first. Go MIC, started on the same lock, reads this MIC's
/// Endpoints record, says so in its log and stays standby while this MIC
/// assigns a pod: its `/healthz` Not Active, no ARM request, no AAI from it.
/// This MIC stops and releases both locks: Go MIC takes over within its
/// retry period, without waiting for a lease to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by migration_leader in a child process that trusts the emulator CA"]
async fn child_ours_leads_first_go_stands_by() -> anyhow::Result<()> {
    let (w, lock) = world_and_lock("lead-ours").await?;
    let ours = our_leader(&w, &lock).await?;
    ensure!(lock.endpoints_holder().await?.as_deref() == Some("mic-ours"));
    ensure!(lock.lease_holder().await?.as_deref() == Some("mic-ours"));

    let since = last_seq(&w);
    let go = go_mic(&w, &lock, "go-mic-1").await?;
    let history = History::start(&lock, &ours, go.probe);
    let held = "lock is held by mic-ours and has not yet expired";
    wait_for("Go MIC sees this MIC's record", WAIT, || async {
        go.log().contains(held).then_some(())
    })
    .await
    .with_context(|| go.tail())?;
    let pod = bound_pod(&w, APP_ID, "web", &w.nodes[0]).await?;
    w.wait_assigned(&pod).await?;
    tokio::time::sleep(STANDBY_WATCH).await;

    ensure!(ours.leading(), "this MIC still leads");
    ensure!(
        go.healthz().await.as_deref() == Some("Not Active"),
        "Go MIC standby\n{}",
        go.tail()
    );
    let log = go.log();
    ensure!(
        log.contains(&format!(
            "attempting to acquire leader lease {}/{}",
            lock.namespace, lock.name
        )) && !log.contains("successfully acquired lease"),
        "Go MIC never acquired\n{}",
        go.tail()
    );
    stood_by(&w, since, Side::Upstream, go_acts(&go).await)?;
    ensure!(
        arm_requests(&w, since, Side::Ours)
            .iter()
            .any(|r| r.method != "GET"),
        "this MIC assigned the pod"
    );

    // This MIC stops: it releases both records; Go MIC takes the Endpoints
    // lock at its next retry.
    let stopped = Instant::now();
    ours.stop().await?;
    let released = stopped.elapsed();
    wait_for("Go MIC takes over", WAIT, || async {
        go.log()
            .contains("successfully acquired lease")
            .then_some(())
    })
    .await
    .with_context(|| go.tail())?;
    let acquired = stopped.elapsed();
    wait_for("Go MIC Active", WAIT, || async {
        go.active().await.then_some(())
    })
    .await
    .with_context(|| go.tail())?;
    let active = stopped.elapsed();
    println!(
        "handover ours -> Go: stopped and released in {} ms, Go acquired after {} ms, Go Active after {} ms",
        released.as_millis(),
        acquired.as_millis(),
        active.as_millis()
    );
    ensure!(
        acquired < LEASE,
        "the release let Go MIC in before a lease expired: {acquired:?}"
    );
    ensure!(lock.endpoints_holder().await?.as_deref() == Some("go-mic-1"));
    ensure!(
        lock.lease_holder().await?.as_deref() == Some(""),
        "the Lease released"
    );

    // Go MIC acts now; it cleans up the pod's identity.
    w.delete_pods(&["web"]).await?;
    if let Err(e) = w.wait_no_aais().await {
        bail!("{e:#}\n{}", go.tail());
    }
    let samples = history.finish("mic-ours", "go-mic-1").await?;
    ensure!(
        samples.iter().any(|s| s.go_acted()),
        "the history saw Go MIC act"
    );
    drop(go);
    w.cleanup().await;
    Ok(())
}

/// With `--leader-election-endpoints-lock=false` this MIC uses the Lease
/// only: an unexpired foreign holder of the Endpoints record does not stop
/// it, and it never writes the Endpoints object. With the flag at its
/// default, the same record keeps it standby (its stated hour is honoured).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by migration_leader in a child process that trusts the emulator CA"]
async fn child_lease_only_when_the_endpoints_lock_is_off() -> anyhow::Result<()> {
    let (w, lock) = world_and_lock("lease-only").await?;
    let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ");
    let record = format!(
        "{{\"holderIdentity\":\"go-mic-elsewhere\",\"leaseDurationSeconds\":3600,\"acquireTime\":\"{now}\",\"renewTime\":\"{now}\",\"leaderTransitions\":0}}"
    );
    let e = Endpoints {
        metadata: ObjectMeta {
            name: Some(lock.name.clone()),
            annotations: Some([(ENDPOINTS_ANNOTATION.to_string(), record.clone())].into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let created = Api::<Endpoints>::namespaced(w.client().await?, w.ns.name())
        .create(&PostParams::default(), &e)
        .await?;

    // Default: the foreign record holds this MIC back past its own lease.
    let held = w
        .start_mic("mic-held", &[DURATION, &lock.name_flag()])
        .await?;
    tokio::time::sleep(LEASE * 2).await;
    ensure!(
        !held.leading(),
        "standby behind an unexpired Endpoints record"
    );
    ensure!(held.healthz().await? == "Not Active");
    ensure!(lock.lease_holder().await?.is_none(), "no Lease taken");
    held.stop().await?;

    // Lease only.
    let started = Instant::now();
    let mic = w
        .start_mic(
            "mic-lease",
            &[
                DURATION,
                &lock.name_flag(),
                "--leader-election-endpoints-lock=false",
            ],
        )
        .await?;
    mic.wait_leading().await?;
    println!(
        "Lease only: leading {} ms after start",
        started.elapsed().as_millis()
    );
    ensure!(lock.lease_holder().await?.as_deref() == Some("mic-lease"));
    mic.wait_healthz("Active").await?;
    tokio::time::sleep(LEASE).await;
    let after = lock
        .endpoints()
        .await?
        .context("the Endpoints object stays")?;
    ensure!(
        after.metadata.resource_version == created.metadata.resource_version,
        "the Endpoints object was written"
    );
    ensure!(lock.endpoints_annotation().await? == Some(record));
    w.close(mic).await
}

/// The rights the Endpoints lock needs, in the lock's namespace: `create`
/// on `endpoints`, and `get` and `update` on the lock by name. Without them
/// this MIC does not lead (nor fall back to the Lease alone): a Role with the
/// Lease's rules only keeps it standby, with neither lock written; adding
/// the Endpoints rules lets it lead on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by migration_leader in a child process that trusts the emulator CA"]
async fn child_the_endpoints_rules_are_needed_and_enough() -> anyhow::Result<()> {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let (w, lock) = world_and_lock("lock-rbac").await?;
    let admin = w.client().await?;
    let lease_rule = serde_json::json!({"apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"], "verbs": ["get", "create", "update"]});
    let role = |rules: Vec<serde_json::Value>| -> anyhow::Result<Role> {
        Ok(serde_json::from_value(serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "mic-lock", "namespace": w.ns.name()},
            "rules": rules,
        }))?)
    };
    let roles = Api::<Role>::namespaced(admin.clone(), w.ns.name());
    roles
        .create(&PostParams::default(), &role(vec![lease_rule.clone()])?)
        .await?;
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "mic-lock", "namespace": w.ns.name()},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "mic-lock"},
        "subjects": [{"kind": "ServiceAccount", "name": "mic", "namespace": w.ns.name()}],
    }))?;
    Api::<RoleBinding>::namespaced(admin.clone(), w.ns.name())
        .create(&PostParams::default(), &binding)
        .await?;
    let kubeconfig = w
        .cluster()
        .service_account_kubeconfig(w.ns.name(), "mic")
        .await?;
    let mic = RunningMic::start(w.settings(
        "mic-rbac",
        &[DURATION, &lock.name_flag()],
        Some(&kubeconfig),
    )?)
    .await?;

    tokio::time::sleep(LEASE * 2).await;
    ensure!(!mic.leading(), "no lead without the Endpoints rules");
    ensure!(
        lock.endpoints().await?.is_none() && lock.lease_holder().await?.is_none(),
        "neither lock written"
    );

    let mut with_endpoints = role(vec![
        lease_rule,
        serde_json::json!({"apiGroups": [""], "resources": ["endpoints"], "verbs": ["create"]}),
        serde_json::json!({"apiGroups": [""], "resources": ["endpoints"],
            "resourceNames": [lock.name], "verbs": ["get", "update"]}),
    ])?;
    with_endpoints.metadata.resource_version =
        roles.get("mic-lock").await?.metadata.resource_version;
    roles
        .replace("mic-lock", &PostParams::default(), &with_endpoints)
        .await?;
    mic.wait_leading().await?;
    ensure!(lock.endpoints_holder().await?.as_deref() == Some("mic-rbac"));
    ensure!(lock.lease_holder().await?.as_deref() == Some("mic-rbac"));
    // It renews (updates) both under these rules.
    tokio::time::sleep(LEASE).await;
    ensure!(mic.leading(), "still leading after several renewals");
    w.close(mic).await
}

/// A leader that finds a lock not as it left it stops acting at its next
/// round and ends with the lost-lease error: here the Endpoints record is
/// rewritten to name another holder (what an upstream mic that judged this
/// one expired would write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by migration_leader in a child process that trusts the emulator CA"]
async fn child_a_foreign_endpoints_record_stops_the_leader() -> anyhow::Result<()> {
    let (w, lock) = world_and_lock("lost").await?;
    let ours = our_leader(&w, &lock).await?;
    ours.wait_healthz("Active").await?;

    let api = Api::<Endpoints>::namespaced(w.client().await?, w.ns.name());
    let mut e = lock.endpoints().await?.context("the Endpoints lock")?;
    let record = lock.endpoints_annotation().await?.context("record")?;
    let foreign = record.replace("\"mic-ours\"", "\"go-mic-intruder\"");
    ensure!(foreign != record, "{record}");
    e.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(ENDPOINTS_ANNOTATION.into(), foreign);
    api.replace(&lock.name, &PostParams::default(), &e).await?;
    let written = Instant::now();
    let mut leading = ours.handles.leading.clone();
    tokio::time::timeout(WAIT, leading.wait_for(|l| !*l))
        .await
        .context("stops leading")??;
    let stopped = written.elapsed();
    println!(
        "a foreign Endpoints record stopped the leader in {} ms",
        stopped.as_millis()
    );
    // Within one retry period (1 s) and a round.
    ensure!(stopped < Duration::from_millis(2_500), "{stopped:?}");
    let ended = tokio::time::timeout(WAIT, ours.task)
        .await
        .context("MIC ends")??;
    ensure!(
        matches!(ended, Err(mic::RunError::Leader(_))),
        "ends with the lost-lease error: {ended:?}"
    );
    ensure!(
        lock.endpoints_holder().await?.as_deref() == Some("go-mic-intruder"),
        "the foreign record stays"
    );
    w.cleanup().await;
    Ok(())
}
