//! Adoption without churn between upstream v1.8.17's Go MIC and this MIC, on
//! the real apiserver and the Azure emulator, in both directions:
//!
//! - upgrade: Go MIC assigns identities to pods selected by bindings, stops,
//!   and this MIC starts on the same state; over several of its sync cycles
//!   and drift checks it sends no ARM write and changes no
//!   AzureAssignedIdentity (AAI): same resourceVersion, same status;
//! - rollback: this MIC assigns, stops, Go MIC starts: no ARM write, no AAI
//!   changed, and Go MIC logs no error (it decodes what this MIC wrote);
//! - both ways again under upstream's own CRDs, which `helm upgrade` leaves
//!   in place;
//! - what really differs from what this MIC would write (an identity edited
//!   while no MIC ran, an AAI naming a wrong identity resource ID) is still
//!   corrected.
//!
//! Each direction prints its figures (ARM writes, AAIs changed, status
//! changes). Go MIC's type-upgrade ConfigMap is created first, as a cluster
//! that ran Go MIC before has it: without it Go MIC rewrites every
//! identity, binding and AAI of the cluster once at start.

use std::collections::BTreeMap;
use std::time::Duration;

use aadpodid_api::{AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding};
use aadpodid_tests::go_mic::GoMic;
use aadpodid_tests::mic_world::{MicWorld, RunningMic, WAIT};
use aadpodid_tests::tenant::{self, APP_ID, APP_RG, APP2_ID};
use aadpodid_tests::{Cluster, wait_for};
use anyhow::{Context as _, bail};
use azure_emulator::observe::{RequestRecord, Service};
use kube::ResourceExt as _;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use serde_json::json;

const ENV: &str = "MIGADOPT";

aadpodid_tests::emulator_ca_parent_test!(migration_adopt, "MIGADOPT", 5, 900);

/// Both MICs' leader lease (renew deadline 2 s, retry period 1 s): each
/// holds upstream's Endpoints record, and after one is killed the other
/// takes over once the record has gone unrenewed for this long.
const LEASE: &str = "--leader-election-duration=4s";
/// This MIC's arguments here: each second a sync cycle runs (its full
/// resync period), and the short lease.
const OURS: [&str; 2] = ["--syncRetryDuration=1s", LEASE];
/// Go MIC's: the short lease, the same periods as this MIC's, and its sync
/// and reconcile lines logged (`-v=6`).
const GO: [&str; 5] = [
    LEASE,
    "--syncRetryDuration=1s",
    "--identity-assignment-reconcile-interval=2s",
    "--update-user-msi-retry-interval=100ms",
    "-v=6",
];
/// How long each side is watched once it leads: at least two sync cycles of
/// one second and two drift checks of two seconds (`MIC_TEST_PERIODS`).
const OBSERVE: Duration = Duration::from_secs(7);

/// (resourceVersion, status) of each AAI of the world, by name.
type AaiState = BTreeMap<String, (Option<String>, Option<String>)>;

async fn aai_state(w: &MicWorld) -> anyhow::Result<AaiState> {
    Ok(w.aais()
        .await?
        .into_iter()
        .map(|a| {
            (
                a.name_any(),
                (
                    a.metadata.resource_version.clone(),
                    a.status.as_ref().map(|s| s.status.clone()),
                ),
            )
        })
        .collect())
}

/// Samples the statuses of the world's AAIs every 100 ms until dropped or
/// [`StatusSampler::finish`]ed, counting each change it sees (a `Created`
/// in between that a before/after comparison would miss).
struct StatusSampler {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<usize>>,
}

impl StatusSampler {
    async fn start(w: &MicWorld) -> anyhow::Result<StatusSampler> {
        let api = Api::<AzureAssignedIdentity>::namespaced(w.client().await?, "default");
        let ns = w.ns.name().to_string();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut last: BTreeMap<String, Option<String>> = BTreeMap::new();
            let mut changes = 0;
            let mut first = true;
            loop {
                let now: BTreeMap<String, Option<String>> = api
                    .list(&Default::default())
                    .await?
                    .items
                    .into_iter()
                    .filter(|a| a.spec.pod_namespace == ns)
                    .map(|a| (a.name_any(), a.status.map(|s| s.status)))
                    .collect();
                if !first {
                    changes += now.iter().filter(|(k, v)| last.get(*k) != Some(v)).count();
                    changes += last.keys().filter(|k| !now.contains_key(*k)).count();
                }
                first = false;
                last = now;
                tokio::select! {
                    _ = stopped.changed() => return Ok(changes),
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        });
        Ok(StatusSampler { stop, task })
    }

    /// The number of status changes seen.
    async fn finish(self) -> anyhow::Result<usize> {
        let _ = self.stop.send(true);
        self.task.await?
    }
}

/// The emulator's last request number (the start of a window).
fn last_seq(w: &MicWorld) -> u64 {
    w.emu.requests(0).last().map_or(0, |r| r.seq)
}

/// ARM requests after `since` that write (anything but GET).
fn arm_writes(w: &MicWorld, since: u64) -> Vec<RequestRecord> {
    w.emu
        .requests(since)
        .into_iter()
        .filter(|r| r.service == Service::Arm && r.method != "GET")
        .collect()
}

/// ARM GETs of the world's scale set after `since` (a drift check reads it).
fn vmss_reads(w: &MicWorld, since: u64) -> usize {
    let path = format!("/virtualmachinescalesets/{}", w.vmss.to_lowercase());
    w.emu
        .requests(since)
        .iter()
        .filter(|r| {
            r.service == Service::Arm && r.method == "GET" && r.uri.to_lowercase().contains(&path)
        })
        .count()
}

/// Figures of one window: AAIs whose resourceVersion changed, and whose status changed.
fn changes(before: &AaiState, after: &AaiState) -> (usize, usize) {
    let mut versions = 0;
    let mut statuses = 0;
    for (name, (rv, status)) in before {
        match after.get(name) {
            Some((rv2, status2)) => {
                versions += usize::from(rv != rv2);
                statuses += usize::from(status != status2);
            }
            None => {
                versions += 1;
                statuses += 1;
            }
        }
    }
    versions += after.keys().filter(|k| !before.contains_key(*k)).count();
    (versions, statuses)
}

/// Upstream's Go MIC for this world as `go-mic-{tag}` ([`GO`]).
async fn go_mic(w: &MicWorld, tag: &str) -> anyhow::Result<GoMic> {
    GoMic::spawn(w, &format!("go-mic-{tag}"), &GO).await
}

/// klog's error lines (`E<mmdd> ...`) of a Go log.
fn go_errors(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            let b = l.as_bytes();
            b.len() > 5 && b[0] == b'E' && b[1..5].iter().all(u8::is_ascii_digit)
        })
        .collect()
}

/// The AAIs of the world as stored (every field, as `kubectl get -o json`).
async fn raw_aais(w: &MicWorld) -> anyhow::Result<Vec<serde_json::Value>> {
    let ar = ApiResource::erase::<AzureAssignedIdentity>(&());
    let list = Api::<DynamicObject>::namespaced_with(w.client().await?, "default", &ar)
        .list(&Default::default())
        .await?;
    let mut out = Vec::new();
    for o in list.items {
        let v = serde_json::to_value(&o)?;
        if v["spec"]["podNamespace"] == w.ns.name() {
            out.push(v);
        }
    }
    Ok(out)
}

/// The fields upstream's Go types write into an AAI besides those this
/// project's types read (`metadata` in each spec and status, the empty
/// `clientPassword`), which the CRDs must keep for a rollback to find what
/// Go MIC wrote.
const GO_ONLY_FIELDS: [&[&str]; 7] = [
    &["spec", "metadata"],
    &["status", "metadata"],
    &["spec", "azureIdentityRef", "spec", "metadata"],
    &["spec", "azureIdentityRef", "spec", "clientPassword"],
    &["spec", "azureIdentityRef", "status", "metadata"],
    &["spec", "azureBindingRef", "spec", "metadata"],
    &["spec", "azureBindingRef", "status", "metadata"],
];

/// The paths of [`GO_ONLY_FIELDS`] missing from a stored AAI.
fn pruned_go_fields(aai: &serde_json::Value) -> Vec<String> {
    GO_ONLY_FIELDS
        .iter()
        .filter(|path| path.iter().fold(aai, |v, k| &v[*k]).is_null())
        .map(|path| path.join("."))
        .collect()
}

/// Whether this project's NMI accepts each AAI's embedded objects as the
/// live ones (same UID and spec): a pod keeps getting its token.
async fn nmi_accepts_all(w: &MicWorld) -> anyhow::Result<()> {
    let client = w.client().await?;
    let ids = Api::<AzureIdentity>::namespaced(client.clone(), w.ns.name());
    let bindings = Api::<AzureIdentityBinding>::namespaced(client, w.ns.name());
    for aai in w.aais().await? {
        let name = aai.name_any();
        let (Some(id), Some(b)) = (
            aai.spec.azure_identity_ref.as_deref(),
            aai.spec.azure_binding_ref.as_deref(),
        ) else {
            bail!("{name} embeds no identity or binding");
        };
        let live_id = ids.get(&id.name_any()).await?;
        let live_b = bindings.get(&b.name_any()).await?;
        if live_id.uid() != id.uid() || live_b.uid() != b.uid() {
            bail!("{name}: embedded UIDs differ from the live objects'");
        }
        if !nmi::select::same_identity_spec(&live_id.spec, &id.spec)
            || !nmi::select::same_binding_spec(&live_b.spec, &b.spec)
        {
            bail!("{name}: embedded specs differ from the live objects'");
        }
    }
    Ok(())
}

/// Three pods selected by bindings: two on the scale set's instances (two
/// identities), one on the standalone VM. The selectors name the world's
/// namespace: both MICs match bindings across namespaces, and earlier
/// worlds' bindings stay in the cluster.
async fn bound_pods(w: &MicWorld) -> anyhow::Result<Vec<(&'static str, &'static str)>> {
    let app = format!("app-{}", w.ns.name());
    let app2 = format!("app2-{}", w.ns.name());
    w.tenant_identity(APP_ID).await?;
    w.tenant_identity(APP2_ID).await?;
    w.binding("app-binding", APP_ID, &app).await?;
    w.binding("app2-binding", APP2_ID, &app2).await?;
    w.pod("web", &app, &w.nodes[0]).await?;
    w.pod("worker", &app2, &w.nodes[1]).await?;
    w.pod("vm-web", &app, &w.vm_node).await?;
    Ok(vec![
        ("web", APP_ID),
        ("worker", APP2_ID),
        ("vm-web", APP_ID),
    ])
}

/// Deletes the pods of [`bound_pods`] and waits, while a MIC runs, until
/// their AAIs are gone: later worlds of this binary share the cluster, and
/// both MICs watch every namespace.
async fn release_pods(w: &MicWorld) -> anyhow::Result<()> {
    w.delete_pods(&["web", "worker", "vm-web"]).await?;
    w.wait_no_aais().await
}

/// Go MIC assigns the pods of [`bound_pods`] in `w` (identities on the
/// scale set and the VM, AAIs Assigned) and is stopped.
async fn go_assigns(w: &MicWorld, tag: &str) -> anyhow::Result<()> {
    let mut go = go_mic(w, tag).await?;
    let expected = bound_pods(w).await?;
    if let Err(e) = w.wait_exactly_assigned(&expected).await {
        bail!("{e:#}\n{}", go.tail());
    }
    w.wait_on_vmss(APP_ID, true).await?;
    w.wait_on_vmss(APP2_ID, true).await?;
    if !w
        .vm_identities()
        .contains(&tenant::uai_id(APP_RG, APP_ID).to_lowercase())
    {
        bail!("Go MIC did not put {APP_ID} on the VM\n{}", go.tail());
    }
    // Nothing of Go's is still on its way to ARM or the AAIs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    go.child.kill();
    Ok(())
}

/// Which MIC assigns the pods of a new world first.
#[derive(Clone, Copy, Debug)]
enum FirstMic {
    /// Go MIC ([`go_assigns`]).
    Go,
    /// This MIC ([`ours_assigns`], instance `mic-<prefix>`).
    Ours,
}

/// A world on the shared cluster (names prefixed `prefix`) in which `first`
/// assigned.
async fn assigned_world(prefix: &str, first: FirstMic) -> anyhow::Result<MicWorld> {
    let w = MicWorld::shared(ENV, prefix).logs().build().await?;
    match first {
        FirstMic::Go => go_assigns(&w, prefix).await?,
        FirstMic::Ours => ours_assigns(&w, &format!("mic-{prefix}")).await?,
    }
    Ok(w)
}

/// This MIC assigns the pods of [`bound_pods`] in `w` and is stopped.
async fn ours_assigns(w: &MicWorld, instance: &str) -> anyhow::Result<()> {
    let mic = w.start_mic(instance, &OURS).await?;
    let expected = bound_pods(w).await?;
    let assigned = async {
        w.wait_exactly_assigned(&expected).await?;
        w.wait_on_vmss(APP_ID, true).await?;
        w.wait_on_vmss(APP2_ID, true).await
    }
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    mic.stop().await?;
    assigned
}

/// What one MIC's takeover did to the world: its ARM writes, the AAIs'
/// (resourceVersion, status) before and after, and the status changes
/// sampled in between.
#[derive(Debug)]
struct Takeover {
    writes: Vec<RequestRecord>,
    before: AaiState,
    after: AaiState,
    statuses: usize,
}

impl Takeover {
    /// The window's figures, one line.
    fn figures(&self) -> String {
        let (versions, _) = changes(&self.before, &self.after);
        format!(
            "ARM writes {}, AAIs changed {versions} of {}, status changes {}",
            self.writes.len(),
            self.before.len(),
            self.statuses
        )
    }

    /// No ARM write, no AAI changed, no status change.
    fn assert_no_churn(&self, what: &str, context: &str) {
        assert!(
            self.writes.is_empty(),
            "{what}: ARM writes {:?}\n{context}",
            self.writes
        );
        assert_eq!(self.before, self.after, "{what}: AAIs changed\n{context}");
        assert_eq!(self.statuses, 0, "{what}: AAI status changes\n{context}");
    }
}

/// Starts watching the world for a takeover.
async fn window(w: &MicWorld) -> anyhow::Result<(AaiState, u64, StatusSampler)> {
    Ok((
        aai_state(w).await?,
        last_seq(w),
        StatusSampler::start(w).await?,
    ))
}

async fn close_window(
    w: &MicWorld,
    (before, since, sampler): (AaiState, u64, StatusSampler),
) -> anyhow::Result<Takeover> {
    Ok(Takeover {
        after: aai_state(w).await?,
        statuses: sampler.finish().await?,
        writes: arm_writes(w, since),
        before,
    })
}

/// This MIC (`instance`) takes over `w`: it leads, runs at least two sync
/// cycles and one drift check. Returns it running, what it did, and the
/// AAIs it created and rewrote (counted over the whole cluster).
async fn ours_takes_over(
    w: &MicWorld,
    instance: &str,
) -> anyhow::Result<(RunningMic, Takeover, (f64, f64))> {
    let open = window(w).await?;
    let since = open.1;
    let started = std::time::Instant::now();
    let mic = w.start_mic(instance, &OURS).await?;
    mic.wait_leading().await?;
    println!(
        "{instance} leads {} ms after it started",
        started.elapsed().as_millis()
    );
    // Watched from its leading on: its sync cycles and drift checks.
    tokio::time::sleep(OBSERVE).await;
    // A drift check ran: it reads the scale set.
    wait_for("a drift check of this MIC", WAIT, || async {
        (vmss_reads(w, since) > 0).then_some(())
    })
    .await?;
    let t = close_window(w, open).await?;
    let added = mic
        .metric("aadpodidentity_assigned_identity_addition_count")
        .await?;
    let updated = mic
        .metric("aadpodidentity_assigned_identity_update_count")
        .await?;
    Ok((mic, t, (added, updated)))
}

/// What Go MIC did when it took over, with its log.
struct GoTakeover {
    go: GoMic,
    t: Takeover,
    syncs: usize,
    reconciles: usize,
}

impl GoTakeover {
    /// Its figures, one line.
    fn figures(&self) -> String {
        format!(
            "{}, Go sync cycles {}, reconciles {}, Go error lines {}",
            self.t.figures(),
            self.syncs,
            self.reconciles,
            go_errors(&self.go.log()).len()
        )
    }

    /// No churn, no error line, no AAI created or rewritten by Go MIC.
    fn assert_clean(&self, what: &str) {
        let log = self.go.log();
        let tail = self.go.tail();
        let errors = go_errors(&log);
        assert!(
            errors.is_empty(),
            "{what}: Go MIC logged errors: {errors:#?}\n{tail}"
        );
        self.t.assert_no_churn(what, &tail);
        assert!(
            !log.contains("creating assigned id") && !log.contains("updating assigned id"),
            "{what}: Go MIC rewrote AAIs\n{tail}"
        );
    }
}

/// Go MIC (`tag`) takes over `w` until it ran three sync cycles and two
/// reconciles (it logs both at `-v=6`).
async fn go_takes_over(w: &MicWorld, tag: &str) -> anyhow::Result<GoTakeover> {
    let open = window(w).await?;
    let go = go_mic(w, tag).await?;
    let (syncs, reconciles) = wait_for("Go MIC's sync cycles and reconciles", WAIT, || async {
        let log = go.log();
        let syncs = log.matches("running periodic sync loop").count();
        let reconciles = log
            .matches("reconciling identity assignment on Azure")
            .count();
        (syncs >= 3 && reconciles >= 2).then_some((syncs, reconciles))
    })
    .await
    .with_context(|| go.tail())?;
    Ok(GoTakeover {
        t: close_window(w, open).await?,
        go,
        syncs,
        reconciles,
    })
}

/// The AAIs of `w` as stored, printed; the fields Go's types write that
/// the CRD pruned from them.
async fn dump_aais(w: &MicWorld, writer: &str) -> anyhow::Result<Vec<String>> {
    let mut pruned = Vec::new();
    for v in raw_aais(w).await? {
        eprintln!(
            "AAI as {writer} wrote it:\n{}",
            serde_json::to_string_pretty(&v)?
        );
        pruned.extend(pruned_go_fields(&v));
    }
    Ok(pruned)
}

/// Upgrade: this MIC takes over what Go MIC wrote with no ARM write and no
/// AAI changed, over several sync cycles and drift checks, and the CRDs
/// kept every field Go MIC wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by migration_adopt in a child process that trusts the emulator CA"]
async fn child_ours_adopts_what_go_mic_wrote() -> anyhow::Result<()> {
    let w = assigned_world("adopt-up", FirstMic::Go).await?;
    let pruned = dump_aais(&w, "Go MIC").await?;
    println!("fields Go MIC wrote that the CRD pruned: {pruned:?}");
    if !pruned.is_empty() {
        w.cleanup().await;
        bail!("the CRD pruned fields Go MIC wrote: {pruned:?}");
    }
    nmi_accepts_all(&w).await?;
    let (mic, t, (added, updated)) = ours_takes_over(&w, "mic-adopt-up").await?;
    println!(
        "upgrade Go -> ours: {}, AAIs created {added}, rewritten {updated}",
        t.figures()
    );
    // This MIC releases what Go MIC assigned.
    let released = release_pods(&w).await;
    let stopped = mic.stop().await;
    w.cleanup().await;
    stopped?;
    released?;
    t.assert_no_churn("upgrade", "");
    assert_eq!((added, updated), (0.0, 0.0), "AAIs written by the takeover");
    Ok(())
}

/// Rollback: Go MIC takes over what this MIC wrote with no ARM write, no
/// AAI changed and no error in its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by migration_adopt in a child process that trusts the emulator CA"]
async fn child_go_mic_adopts_what_ours_wrote() -> anyhow::Result<()> {
    let w = assigned_world("adopt-down", FirstMic::Ours).await?;
    dump_aais(&w, "this MIC").await?;
    let taken = go_takes_over(&w, "adopt-down").await;
    let g = match taken {
        Ok(g) => g,
        Err(e) => {
            w.cleanup().await;
            return Err(e);
        }
    };
    println!("rollback ours -> Go: {}", g.figures());
    // Go MIC releases what this MIC assigned.
    let released = release_pods(&w).await;
    w.cleanup().await;
    released.with_context(|| g.go.tail())?;
    g.assert_clean("rollback");
    Ok(())
}

/// What a rollback still costs: Go MIC judges an AAI by the
/// resourceVersion of the identity and binding it embeds, and this MIC does
/// not rewrite AAIs for metadata-only edits (labels, annotations). An
/// identity labelled while this MIC ran makes Go MIC rewrite the AAIs that
/// embed it once (status back to `Created`, then `Assigned`), with no ARM
/// write; the other AAIs stay as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by migration_adopt in a child process that trusts the emulator CA"]
async fn child_rollback_after_a_metadata_edit() -> anyhow::Result<()> {
    let w = assigned_world("adopt-meta", FirstMic::Ours).await?;
    Api::<AzureIdentity>::namespaced(w.client().await?, w.ns.name())
        .patch(
            APP2_ID,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"team": "a"}}})),
        )
        .await?;
    let worker = w.aai_name("worker", APP2_ID);
    let open = window(&w).await?;
    let go = go_mic(&w, "adopt-meta").await?;
    let rewritten = wait_for(
        "Go MIC rewrites the AAI of the labelled identity",
        WAIT,
        || async {
            let a = w.aai(&worker).await.ok()??;
            let rv = a
                .spec
                .azure_identity_ref
                .as_deref()?
                .metadata
                .resource_version
                .clone();
            let live = Api::<AzureIdentity>::namespaced(w.client().await.ok()?, w.ns.name())
                .get(APP2_ID)
                .await
                .ok()?;
            (rv == live.metadata.resource_version && a.status.as_ref()?.status == "Assigned")
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t = close_window(&w, open).await?;
    println!("rollback after a label on one identity: {}", t.figures());
    let released = release_pods(&w).await;
    let tail = go.tail();
    drop(go);
    w.cleanup().await;
    rewritten.with_context(|| tail.clone())?;
    released.with_context(|| tail.clone())?;
    assert!(t.writes.is_empty(), "ARM writes: {:?}\n{tail}", t.writes);
    for (name, state) in &t.before {
        if *name == worker {
            assert_ne!(t.after.get(name), Some(state), "{name} rewritten");
        } else {
            assert_eq!(t.after.get(name), Some(state), "{name} unchanged\n{tail}");
        }
    }
    Ok(())
}

/// Both ways under upstream's own CRDs, which `helm upgrade` leaves in place
/// (Helm never upgrades a chart's `crds/`): Go MIC assigns, this MIC takes
/// over, Go MIC takes back; no churn either way. On a cluster of its own,
/// whose CRDs are replaced by those of upstream's chart 4.1.18.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by migration_adopt in a child process that trusts the emulator CA"]
async fn child_both_ways_under_upstreams_crds() -> anyhow::Result<()> {
    let w = MicWorld::private(ENV, "adopt-crd").logs().build().await?;
    install_upstream_crds(w.cluster())?;
    go_assigns(&w, "adopt-crd-1").await?;
    let (mic, up, (added, updated)) = ours_takes_over(&w, "mic-adopt-crd").await?;
    println!(
        "upstream CRDs, upgrade Go -> ours: {}, AAIs created {added}, rewritten {updated}",
        up.figures()
    );
    mic.stop().await?;
    let g = go_takes_over(&w, "adopt-crd-2").await?;
    println!("upstream CRDs, rollback ours -> Go: {}", g.figures());
    release_pods(&w).await?;
    up.assert_no_churn("upgrade under upstream's CRDs", "");
    assert_eq!((added, updated), (0.0, 0.0), "AAIs written by the takeover");
    g.assert_clean("rollback under upstream's CRDs");
    Ok(())
}

/// Replaces the cluster's CRDs (before any object of theirs exists) by
/// those of upstream's chart.
fn install_upstream_crds(cluster: &Cluster) -> anyhow::Result<()> {
    let chart = aadpodid_tests::helm::upstream_chart()?;
    let out = std::process::Command::new("tar")
        .arg("-xzOf")
        .arg(&chart)
        .arg("aad-pod-identity/crds/crd.yaml")
        .output()?;
    if !out.status.success() {
        bail!("tar: {}", String::from_utf8_lossy(&out.stderr));
    }
    let crds = String::from_utf8(out.stdout)?;
    let names: Vec<String> = [
        "azureidentities",
        "azureidentitybindings",
        "azureassignedidentities",
        "azurepodidentityexceptions",
    ]
    .iter()
    .map(|p| format!("{p}.aadpodidentity.k8s.io"))
    .collect();
    let mut delete = vec!["delete", "crd", "--wait=true"];
    delete.extend(names.iter().map(String::as_str));
    for (args, stdin) in [
        (delete, None),
        (vec!["create", "-f", "-"], Some(crds.as_str())),
    ] {
        let out = cluster.kubectl_run(&args, stdin)?;
        if !out.success {
            bail!("kubectl {args:?}: {}", out.stderr);
        }
    }
    cluster.wait_crds_established()?;
    Ok(())
}

/// What really differs from what this MIC would write is still corrected
/// after the takeover, and nothing else is touched: an AzureIdentity edited
/// while no MIC ran (its AAI embeds the old resource ID), then an AAI whose
/// embedded identity is made to name another identity's resource ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by migration_adopt in a child process that trusts the emulator CA"]
async fn child_a_really_different_aai_is_still_corrected() -> anyhow::Result<()> {
    let w = assigned_world("adopt-fix", FirstMic::Go).await?;
    let client = w.client().await?;
    let aais = Api::<AzureAssignedIdentity>::namespaced(client.clone(), "default");
    let app = tenant::uai_id(APP_RG, APP_ID);
    let app2 = tenant::uai_id(APP_RG, APP2_ID);
    let worker = w.aai_name("worker", APP2_ID);
    let web = w.aai_name("web", APP_ID);
    // While no MIC runs, the user points identity app2-id at app-id.
    Api::<AzureIdentity>::namespaced(client.clone(), w.ns.name())
        .patch(
            APP2_ID,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resourceID": app, "clientID": tenant::APP_CLIENT}})),
        )
        .await?;
    let before = aai_state(&w).await?;

    let mic = w.start_mic("mic-adopt-fix", &OURS).await?;
    mic.wait_leading().await?;
    let embeds = |name: String, want: String| {
        let aais = aais.clone();
        async move {
            let a = aais.get_opt(&name).await.ok()??;
            let id = a.spec.azure_identity_ref.as_deref()?;
            (id.spec.resource_id == want && a.status.as_ref()?.status == "Assigned").then_some(())
        }
    };
    let edited = wait_for(
        "the edited identity embedded anew and Assigned",
        WAIT,
        || embeds(worker.clone(), app.clone()),
    )
    .await;
    let released = match edited {
        Ok(()) => w.wait_on_vmss(APP2_ID, false).await,
        Err(e) => Err(e),
    };
    let after_edit = aai_state(&w).await?;
    // Then an AAI made to name another identity's resource ID.
    let tampered = aais
        .patch(
            &web,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"azureIdentityRef": {"spec": {"resourceID": app2}}}})),
        )
        .await;
    let fixed = match tampered {
        Ok(_) => {
            wait_for("the tampered AAI corrected and Assigned", WAIT, || {
                embeds(web.clone(), app.clone())
            })
            .await
        }
        Err(e) => Err(e.into()),
    };
    let updates = mic
        .metric("aadpodidentity_assigned_identity_update_count")
        .await?;
    let app_kept = w.on_vmss(APP_ID);
    let cleaned = release_pods(&w).await;
    let stopped = mic.stop().await;
    w.cleanup().await;
    stopped?;
    released?;
    fixed?;
    cleaned?;
    let (versions, _) = changes(&before, &after_edit);
    println!(
        "really different: edited identity and tampered AAI corrected; AAIs changed by the edit {versions} of {}, AAI updates {updates}",
        before.len()
    );
    // Only the AAI of the edited identity was rewritten.
    for (name, state) in &before {
        if *name != worker {
            assert_eq!(after_edit.get(name), Some(state), "{name} changed");
        }
    }
    assert_ne!(after_edit.get(&worker), before.get(&worker));
    assert!(app_kept, "app-id stays on the scale set");
    assert_eq!(updates, 2.0, "two AAIs rewritten");
    Ok(())
}

/// Whatever embedded identity this MIC keeps as the same assignment, this
/// project's NMI accepts as the live object: adopting an AAI without
/// rewriting it must never leave a pod with a 403. Each variant of the live
/// identity's spec is compared with each variant of the embedded copy.
#[test]
fn what_mic_keeps_nmi_accepts() {
    use aadpodid_api::AzureAssignedIdentitySpec;
    use k8s_openapi::api::core::v1::SecretReference;

    let secret = |name: Option<&str>, namespace: Option<&str>| {
        Some(SecretReference {
            name: name.map(String::from),
            namespace: namespace.map(String::from),
        })
    };
    let variants: Vec<aadpodid_api::AzureIdentitySpec> = [
        None,
        secret(None, None),
        secret(Some(""), None),
        secret(None, Some("")),
        secret(Some("sp"), None),
        secret(Some("sp"), Some("ns")),
    ]
    .into_iter()
    .flat_map(|password| {
        [None, Some(vec![]), Some(vec!["t2".to_string()])]
            .into_iter()
            .map(move |aux| aadpodid_api::AzureIdentitySpec {
                resource_id: tenant::uai_id(APP_RG, APP_ID),
                client_id: tenant::APP_CLIENT.into(),
                client_password: password.clone(),
                auxiliary_tenant_ids: aux,
                ..Default::default()
            })
    })
    .collect();
    let aai = |spec: &aadpodid_api::AzureIdentitySpec| {
        let mut id = AzureIdentity::new(APP_ID, spec.clone());
        id.metadata.uid = Some("uid".into());
        AzureAssignedIdentitySpec {
            azure_identity_ref: Some(Box::new(id)),
            azure_binding_ref: None,
            pod: "web".into(),
            pod_namespace: "ns".into(),
            node_name: "n".into(),
            replicas: None,
        }
    };
    let mut kept = 0;
    for live in &variants {
        for embedded in &variants {
            if mic::plan::same_assignment(&aai(live), &aai(embedded)) {
                kept += 1;
                assert!(
                    nmi::select::same_identity_spec(live, embedded),
                    "MIC keeps, NMI refuses: live {live:?}, embedded {embedded:?}"
                );
            }
        }
    }
    // Go's `{}` and `[]` forms are kept (not only identical specs).
    assert!(kept > variants.len(), "{kept}");
}
