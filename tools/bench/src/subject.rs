//! What is measured (one function per row) and for whom ([`Subject`]).
//!
//! The functions that differ per subject are [`mic_program`] and
//! [`nmi_program`]: what the kit's world starts as MIC and NMI (with the
//! same flags from the kit, plus the bench's scaled periods). Every row then
//! runs the same steps against the same cluster and emulator settings,
//! whichever subject runs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use aadpodid_testkit::flood::{
    Flood, Kind, Outcome, Peaks, Plan, Sampler, open_fds, raise_nofile, token_path,
};
use aadpodid_testkit::netns::{IMDS_ADDRESS, NetNs};
use aadpodid_testkit::procfs;
use aadpodid_testkit::tools::last_line_json;
use aadpodid_testkit::upstream;
use aadpodid_testkit::world::Program;
use anyhow::{Context as _, bail};

use crate::child::{LoadResult, LoadSpec};
use crate::quiet_core::QuietCore;
use crate::report::{Figures, LOAD_RATES, Metric, SUSTAINED_P99};
use crate::shipped::{Cores, Shipped};
use crate::stats::Summary;
use crate::world::{
    self, Launchers, NMI_VMSS, TOKEN_PATH, Target, World, curl_imds, curl_token, self_exe,
};
use crate::writes;
use crate::{Options, ROLE_ENV, Scale};
use azure_emulator::state::OperationSpan;

/// Whose MIC and NMI run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Subject {
    /// This repository's `mic` and `nmi`.
    ThisProject,
    /// Upstream aad-pod-identity v1.8.17's Go `mic` and `nmi`.
    Upstream,
}

impl Subject {
    /// Column title.
    pub fn title(self) -> &'static str {
        match self {
            Subject::ThisProject => "this project",
            Subject::Upstream => "upstream v1.8.17",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Subject::ThisProject => "rs",
            Subject::Upstream => "go",
        }
    }
}

/// MIC settings a subject's program turns into flags. Periods are already
/// divided by the clock speed, and budgets multiplied by it, so that MIC's
/// wall-time timers keep their ratio to the emulated clock.
#[derive(Clone, Debug)]
pub struct MicSettings {
    /// Drift reconcile (`--identity-assignment-reconcile-interval`): each
    /// MIC's shipped default, [`reconcile_default`].
    pub reconcile_interval: Duration,
    /// Full resync (`--syncRetryDuration`, 3600s by default).
    pub sync_retry: Duration,
    /// `--update-user-msi-retry-interval` (1s by default).
    pub retry_interval: Duration,
    /// Compute's write refill per scale set and per subscription, per wall minute.
    pub resource_writes_per_minute: f64,
    pub subscription_writes_per_minute: f64,
}

/// The drift check's period each MIC ships with (emulated time): this
/// project's is a 30-minute safety net (between two, drift is caught from
/// Node and NMI events), upstream's 3 minutes. Row 5 measures idle ARM calls
/// with these, so each column shows what its default costs.
pub fn reconcile_default(subject: Subject) -> Duration {
    match subject {
        Subject::ThisProject => Duration::from_secs(1800),
        Subject::Upstream => Duration::from_secs(180),
    }
}

/// The line this project's MIC logs at each periodic drift check.
pub const SAFETY_NET_LOG: &str = "periodic drift check (safety net)";

impl MicSettings {
    /// `subject`'s MIC defaults on the scale's clock.
    pub fn of(scale: &Scale, subject: Subject) -> MicSettings {
        MicSettings {
            reconcile_interval: scale.wall(reconcile_default(subject)),
            sync_retry: scale.wall(Duration::from_secs(3600)),
            retry_interval: scale.wall(Duration::from_secs(1)),
            resource_writes_per_minute: 4.0 * scale.speed,
            subscription_writes_per_minute: 500.0 * scale.speed,
        }
    }
}

pub(crate) fn go_duration_text(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// Whether `subject` can run here; the reason when not.
pub fn available(subject: Subject) -> Result<(), String> {
    match subject {
        Subject::ThisProject => Ok(()),
        // Upstream's binaries come from tests/upstream/build.sh (cached).
        Subject::Upstream => upstream::upstream_bin_dir()
            .map(|_| ())
            .map_err(|e| format!("not run: upstream binaries unavailable: {e:#}")),
    }
}

/// The flags that scale MIC's periods, in the spelling both MICs share.
fn scaled_period_flags(s: &MicSettings) -> Vec<String> {
    vec![
        format!(
            "--identity-assignment-reconcile-interval={}",
            go_duration_text(s.reconcile_interval)
        ),
        format!("--syncRetryDuration={}", go_duration_text(s.sync_retry)),
        format!(
            "--update-user-msi-retry-interval={}",
            go_duration_text(s.retry_interval)
        ),
    ]
}

/// What the world starts as MIC for `subject`: after the kit's flags
/// (kubeconfig, cloud config, leader election, probe and metrics ports),
/// this project's write budget refills and both MICs' scaled periods.
pub fn mic_program(
    subject: Subject,
    s: &MicSettings,
    shipped: &Shipped,
) -> anyhow::Result<Program> {
    let periods = scaled_period_flags(s);
    match subject {
        Subject::ThisProject => Ok(shipped
            .mic_program()
            .with_args([
                format!(
                    "--arm-resource-writes-per-minute={}",
                    s.resource_writes_per_minute
                ),
                format!(
                    "--arm-subscription-writes-per-minute={}",
                    s.subscription_writes_per_minute
                ),
            ])
            .with_args(periods)),
        // Upstream has no client-side write budget: only the periods scale.
        Subject::Upstream => Ok(Program::upstream("mic")?.with_args(periods)),
    }
}

/// What the world starts as NMI for `subject` (the kit's flags only),
/// pinned to NMI's core.
pub fn nmi_program(subject: Subject, shipped: &Shipped) -> anyhow::Result<Program> {
    match subject {
        Subject::ThisProject => shipped.nmi_program(),
        Subject::Upstream => shipped.pin_nmi(Program::upstream("nmi")?),
    }
}

/// How `subject`'s world starts MIC and NMI on `scale`.
fn launchers(subject: Subject, scale: &Scale, shipped: &Shipped) -> anyhow::Result<Launchers> {
    Ok(Launchers {
        mic: mic_program(subject, &MicSettings::of(scale, subject), shipped)?,
        nmi: nmi_program(subject, shipped)?,
        // Upstream's files carry no token audience (it asks for tokens for
        // the ARM endpoint itself).
        token_audience: subject == Subject::ThisProject,
    })
}

/// Every selected row for `subject`; a row that fails says why in its cells.
pub async fn run_subject(
    subject: Subject,
    scale: &Scale,
    opts: &Options,
    shipped: &Shipped,
) -> Figures {
    if let Err(reason) = available(subject) {
        return Figures::not_run(&reason);
    }
    let mut f = Figures::default();
    if let Err(e) = rows(subject, scale, opts, shipped, &mut f).await {
        eprintln!("{}: {e:#}", subject.title());
        f.fill_missing(&format!("failed: {e:#}"));
    }
    f.fill_missing("not run: row not selected");
    f
}

struct Run<'a> {
    subject: Subject,
    w: &'a mut World,
    /// Where the load generator runs.
    cores: Cores,
    /// Details a row gathers before its cells are set.
    notes: Vec<String>,
}

async fn rows(
    subject: Subject,
    scale: &Scale,
    opts: &Options,
    shipped: &Shipped,
    f: &mut Figures,
) -> anyhow::Result<()> {
    let launchers = launchers(subject, scale, shipped)?;
    let mut w = World::new(subject.tag(), scale, launchers, opts.keep_logs).await?;
    let r = rows_in(subject, &mut w, scale, opts, shipped.cores, f).await;
    let t = Instant::now();
    w.clear().await;
    eprintln!("[{}] cluster cleared in {:?}", subject.title(), t.elapsed());
    r
}

async fn rows_in(
    subject: Subject,
    w: &mut World,
    scale: &Scale,
    opts: &Options,
    cores: Cores,
    f: &mut Figures,
) -> anyhow::Result<()> {
    let progress = Progress {
        subject,
        started: Instant::now(),
    };
    let mut run = start_run(subject, w, scale, opts, cores, f).await?;
    eprintln!(
        "[{}] set up in {:?}",
        subject.title(),
        progress.started.elapsed()
    );
    nmi_rows(&mut run, opts, f, &progress).await;
    // After NMI's rows (it moves their pod away from pod namespace 0's
    // address), before the burst (its pods' writes are done by then).
    if opts.row(7) {
        let r = crate::other::row(run.w, f).await;
        let metrics: Vec<Metric> = Metric::all().into_iter().filter(|m| m.row() == 7).collect();
        progress.row(f, "row 7", &metrics, r);
    }
    // After row 7 (its pods are Assigned), before the burst.
    if opts.row(8) {
        if subject == Subject::ThisProject {
            let r = crate::federated::row(run.w, f).await;
            progress.row(f, "row 8", &crate::federated::METRICS, r);
        } else {
            for m in crate::federated::METRICS {
                f.set_text(m, crate::federated::UPSTREAM);
            }
        }
    }
    mic_rows(&mut run, opts, f, &progress).await;
    if !opts.row(2) {
        for m in Metric::all().into_iter().filter(|m| m.row() == 2) {
            f.set_text(m, "not run: row not selected");
        }
    }
    // MIC and NMI stop when the cluster is cleared.
    Ok(())
}

/// MIC active, NMI active when a selected row needs it, and NMI's figures
/// at rest (row 4) taken before any pod is on its node.
async fn start_run<'w>(
    subject: Subject,
    w: &'w mut World,
    scale: &Scale,
    opts: &Options,
    cores: Cores,
    f: &mut Figures,
) -> anyhow::Result<Run<'w>> {
    w.ensure_identities(scale.burst_ids.max(10)).await?;
    w.start_mic().await?;
    let mut run = Run {
        subject,
        w,
        cores,
        notes: Vec::new(),
    };
    if opts.row(1) || opts.row(3) || opts.row(4) || opts.row(7) || opts.row(8) {
        run.w.start_nmi().await?;
    }
    if opts.row(4) {
        let r = nmi_at_rest(&mut run, f).await;
        fail(f, &[Metric::NmiRestRss, Metric::NmiRestFds], r);
    }
    Ok(run)
}

/// NMI's rows, in this order: the first token (1), NMI with its pods (4),
/// the token load (3), then the floods (4), each with NMI restarted.
async fn nmi_rows(run: &mut Run<'_>, opts: &Options, f: &mut Figures, p: &Progress) {
    if opts.row(1) {
        let r = row_first_token(run, f).await;
        let metrics = [
            Metric::FirstToken,
            Metric::FirstTokenP95,
            Metric::FirstTokenMin,
            Metric::FirstTokenMax,
        ];
        p.row(f, "row 1", &metrics, r);
    }
    if opts.row(4) {
        let r = row_nmi_rss(run, f).await;
        p.row(
            f,
            "row 4 (nmi)",
            &[Metric::NmiPeakRss, Metric::NmiPodsFds],
            r,
        );
    }
    if opts.row(3) {
        let r = row_token_load(run, f).await;
        for n in run.notes.drain(..) {
            f.note(n);
        }
        let metrics: Vec<Metric> = Metric::all().into_iter().filter(|m| m.row() == 3).collect();
        p.row(f, "row 3", &metrics, r);
    }
    if opts.row(4) {
        for kind in Kind::ALL {
            let r = row_nmi_flood(run, f, kind).await;
            let metrics = [
                Metric::FloodRss(kind),
                Metric::FloodFds(kind),
                Metric::FloodVictim(kind),
            ];
            p.row(f, &format!("row 4 (nmi, {})", kind.title()), &metrics, r);
        }
    }
}

/// MIC's rows: the burst (2, also needed by 4 and 5), idle (5) once the
/// burst converged, then MIC with many pods (4) unless `--nmi-only`.
async fn mic_rows(run: &mut Run<'_>, opts: &Options, f: &mut Figures, p: &Progress) {
    let mic_rss = opts.row(4) && !opts.nmi_only;
    if opts.row(2) || mic_rss || opts.row(5) {
        let r = row_burst(run, f).await;
        // The ARM counts (per scale set too) cover the span, converged or not.
        if p.row(f, "row 2", &[Metric::BurstEmulated, Metric::BurstWall], r) {
            // Idle means nothing while MIC is still catching up.
            f.set_text(Metric::IdleArmCalls, "not run: the burst did not converge");
            f.set_text(Metric::IdleCpu, "not run: the burst did not converge");
        }
    }
    if opts.row(5) && f.get(Metric::IdleCpu).is_none() {
        let r = row_idle(run, f).await;
        p.row(f, "row 5", &[Metric::IdleArmCalls, Metric::IdleCpu], r);
    }
    if opts.row(4) && opts.nmi_only {
        for m in [Metric::MicPeakRss, Metric::BigConvergeWall] {
            f.set_text(m, "not run: --nmi-only");
        }
    }
    if mic_rss {
        let r = row_mic_rss(run, f).await;
        let metrics = [Metric::MicPeakRss, Metric::BigConvergeWall];
        p.row(f, "row 4 (mic)", &metrics, r);
    }
}

/// Logs each row's end with the time since the subject's set-up began.
struct Progress {
    subject: Subject,
    started: Instant,
}

impl Progress {
    /// Logs row `row`'s result and, when it failed, writes why into
    /// `metrics`; whether it failed.
    fn row(&self, f: &mut Figures, row: &str, metrics: &[Metric], r: anyhow::Result<()>) -> bool {
        let title = self.subject.title();
        match &r {
            Ok(()) => eprintln!("[{title}] {row} done ({:?})", self.started.elapsed()),
            Err(e) => eprintln!("[{title}] {row} failed: {e:#}"),
        }
        let failed = r.is_err();
        fail(f, metrics, r);
        failed
    }
}

fn fail(f: &mut Figures, metrics: &[Metric], r: anyhow::Result<()>) {
    if let Err(e) = r {
        for m in metrics {
            f.set_text(*m, &format!("failed: {e:#}"));
        }
    }
}

/// Row 1: `first_token_samples` times, a new pod on NMI's node bound to an
/// identity its scale set does not have yet: from creating the pod until a
/// client in it holds a token, minus that sample's own VMSS write (LRO,
/// its duration drawn by the emulator) in wall time. Each sample's pod has
/// pod namespace 0's address; once it holds its token it is moved to an
/// address no namespace backs, so that the next sample's pod is the only
/// one there (and no identity is removed from the scale set meanwhile).
/// The last sample's pod stays as `first`.
async fn row_first_token(run: &mut Run<'_>, f: &mut Figures) -> anyhow::Result<()> {
    let n = run.w.scale.first_token_samples.max(1);
    run.w.ensure_identities(n).await?;
    let mut samples = Vec::with_capacity(n);
    let mut lros = Vec::with_capacity(n);
    let mut extra_writes = 0;
    for k in 0..n {
        let last = k + 1 == n;
        let name = if last {
            "first".to_string()
        } else {
            format!("first-{k}")
        };
        let since = run.w.emulated_ms()?;
        let took = first_token_once(run, &name, k).await?;
        let writes = run.w.writes_since(Target::ScaleSet(NMI_VMSS), since)?;
        let lro = own_lro(run.w, &writes, &name)?;
        extra_writes += writes.len() - 1;
        samples.push((took.as_secs_f64() - lro.as_secs_f64()) * 1000.0);
        lros.push(lro.as_secs_f64() * 1000.0);
        if !last {
            let away = std::net::Ipv4Addr::new(10, 246, 0, (k % 250 + 1) as u8);
            move_pod_ip(run, &name, away).await?;
            // The mapping's change reaches NMI's watch before the next pod.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let s = Summary::of(&samples).context("no sample")?;
    f.set(Metric::FirstToken, s.median);
    f.set(Metric::FirstTokenP95, s.p95);
    f.set(Metric::FirstTokenMin, s.min);
    f.set(Metric::FirstTokenMax, s.max);
    let each: Vec<String> = samples
        .iter()
        .zip(&lros)
        .map(|(v, l)| format!("{v:.0} (L {l:.0})"))
        .collect();
    f.note(format!(
        "first token: {} samples (ms, minus the sample's own L in wall ms), in order: {}{}",
        s.n,
        each.join(", "),
        if extra_writes > 0 {
            format!("; {extra_writes} more writes to the scale set than samples (L is each sample's first)")
        } else {
            String::new()
        }
    ));
    Ok(())
}

/// The first of `writes` (a pod's own write, those started since its
/// creation) as a wall duration.
pub(crate) fn own_lro(w: &World, writes: &[OperationSpan], pod: &str) -> anyhow::Result<Duration> {
    let first = writes
        .first()
        .with_context(|| format!("{pod}: no write of its identity found"))?;
    Ok(w.scale.wall(first.duration()))
}

/// Pod `name` (identity `j`) at pod namespace 0's address: wall time from
/// its creation until `curl` in that namespace gets a token (polled every
/// 50 ms, 240 s at most).
async fn first_token_once(run: &mut Run<'_>, name: &str, j: usize) -> anyhow::Result<Duration> {
    let ns = run.w.ns_nmi.name().to_string();
    let node_name = run.w.nmi_node.clone();
    let (_, ip) = run.w.pod(0)?;
    let t0 = Instant::now();
    run.w
        .create_pods(&ns, vec![(name.into(), node_name, j, Some(ip))])
        .await?;
    token_after(run.w.pod(0)?.0, t0, name).await
}

/// Wall time from `t0` until `curl` in pod namespace `pod` gets a token
/// (polled every 50 ms, 240 s after `t0` at most).
pub(crate) async fn token_after(pod: &NetNs, t0: Instant, name: &str) -> anyhow::Result<Duration> {
    let deadline = t0 + Duration::from_secs(240);
    loop {
        let code = curl_token(pod, 120).await?;
        if code == 200 {
            return Ok(t0.elapsed());
        }
        if Instant::now() >= deadline {
            bail!("{name}: no token within 240 s (last status {code})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reports pod `name` of NMI's node Running at `ip` instead.
async fn move_pod_ip(run: &mut Run<'_>, name: &str, ip: std::net::Ipv4Addr) -> anyhow::Result<()> {
    let ns = run.w.ns_nmi.name().to_string();
    move_pod_ip_in(run.w, &ns, name, ip).await
}

/// Reports pod `name` of namespace `ns` Running at `ip` instead.
pub(crate) async fn move_pod_ip_in(
    w: &World,
    ns: &str,
    name: &str,
    ip: std::net::Ipv4Addr,
) -> anyhow::Result<()> {
    let api: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(w.client.clone(), ns);
    let status = serde_json::json!({
        "status": {"podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}
    });
    api.patch_status(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(status),
    )
    .await
    .with_context(|| format!("move pod {name} to {ip}"))?;
    Ok(())
}

/// The pod the load clients run in (pod namespace 1), bound to identity 0.
async fn ensure_load_pod(run: &mut Run<'_>) -> anyhow::Result<()> {
    ensure_pod(run, "load", 1).await
}

/// Pod `name` in pod namespace `i` of NMI's node, bound to identity 0,
/// unless it exists.
async fn ensure_pod(run: &mut Run<'_>, name: &str, i: usize) -> anyhow::Result<()> {
    let ns = run.w.ns_nmi.name().to_string();
    let api: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(run.w.client.clone(), &ns);
    if api.get_opt(name).await?.is_some() {
        return Ok(());
    }
    let node_name = run.w.nmi_node.clone();
    let (_, ip) = run.w.pod(i)?;
    run.w
        .create_pods(&ns, vec![(name.into(), node_name, 0, Some(ip))])
        .await
}

/// Row 4 (NMI at rest): RSS and descriptors once active, before any pod
/// is on its node.
async fn nmi_at_rest(run: &mut Run<'_>, f: &mut Figures) -> anyhow::Result<()> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = run.w.nmi_pid()?;
    let mem = procfs::memory(pid)?;
    let fds = open_fds(pid)?;
    f.set(Metric::NmiRestRss, mem.now_kib as f64 / 1024.0);
    f.set(Metric::NmiRestFds, fds as f64);
    Ok(())
}

/// Row 4 (NMI under a flood): NMI restarted, one pod (the load pod) sends
/// the `kind` flood while another (pod namespace 0) asks for its first
/// token for a new resource; NMI's peak RSS and descriptors meanwhile.
async fn row_nmi_flood(run: &mut Run<'_>, f: &mut Figures, kind: Kind) -> anyhow::Result<()> {
    let connections = prepare_flood(run).await?;
    let m = measure_flood(run, kind, connections).await?;
    let alive = run.w.nmi()?.exited().is_none();
    record_flood(f, kind, &m, alive);
    Ok(())
}

/// Before a flood: both pods Assigned, the descriptor limit raised, NMI
/// restarted and answering both pods. Returns how many connections the
/// flood may open under that limit.
async fn prepare_flood(run: &mut Run<'_>) -> anyhow::Result<usize> {
    // The victim is row 1's pod (pod namespace 0), made here when row 1
    // did not run.
    ensure_load_pod(run).await?;
    ensure_pod(run, "first", 0).await?;
    // Every pod of the namespace (one AAI each), not the AAIs MIC has
    // written so far: the victim may be new.
    let ns = run.w.ns_nmi.name().to_string();
    let pods = kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(run.w.client.clone(), &ns)
        .list(&Default::default())
        .await?
        .items
        .len();
    run.w
        .wait_assigned(&ns, pods, Duration::from_millis(250))
        .await?;
    // NMI (restarted below) and the attacker inherit this process's
    // descriptor limit; it must not be what stops the flood.
    let nofile = raise_nofile(3 * run.w.scale.flood_connections + 256)?;
    let connections = run
        .w
        .scale
        .flood_connections
        .min(nofile.saturating_sub(256) / 3);
    run.w.restart_nmi().await?;
    warm_token(run).await?;
    let (victim_ns, _) = run.w.pod(0)?;
    let (code, body) = curl_imds(victim_ns, TOKEN_PATH, 30).await?;
    if code != 200 {
        bail!("the second pod gets no token before the flood ({code}): {body}");
    }
    Ok(connections)
}

/// What one flood did to NMI, and how the victim fared meanwhile.
#[derive(Debug)]
struct FloodRun {
    plan: Plan,
    outcome: Outcome,
    /// Sampled every 100 ms during the flood.
    peaks: Peaks,
    /// VmHWM after the flood, KiB.
    hwm_kib: u64,
    /// VmRSS and descriptors before the flood.
    rss_base_kib: u64,
    fds_base: usize,
    /// Descriptors just before the flood was stopped.
    fds_at_stop: usize,
    /// Descriptors once back near the baseline (or after 30 s), and when.
    fds_after: usize,
    settled_after: Duration,
    /// The victim's answer status (0: none) and its wait.
    victim_status: u16,
    victim_latency: Duration,
}

/// The flood itself: NMI sampled, the flood started from the load pod, the
/// victim's first token for a new resource timed, the flood held at least
/// `flood_hold` and stopped, then NMI's descriptors followed back down.
async fn measure_flood(
    run: &mut Run<'_>,
    kind: Kind,
    connections: usize,
) -> anyhow::Result<FloodRun> {
    let hold = run.w.scale.flood_hold;
    let tag = format!(
        "{}-{}-{}",
        run.subject.tag(),
        kind.slug(),
        std::process::id()
    );
    let pid = run.w.nmi_pid()?;
    let (victim_ns, _) = run.w.pod(0)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fds_base = open_fds(pid)?;
    let rss_base_kib = procfs::memory(pid)?.now_kib;
    let sampler = Sampler::start(pid);
    let plan = Plan {
        kind,
        target: SocketAddr::from((IMDS_ADDRESS, 80)),
        connections,
        connect_concurrency: 256,
        open_within: Duration::from_secs(60),
        hold_max: Duration::from_secs(120),
        tag: tag.clone(),
    };
    let mut cmd = run.w.pod(1)?.0.command(self_exe());
    cmd.env(ROLE_ENV, "flood");
    let flood = tokio::task::block_in_place(|| Flood::spawn_with(cmd, &plan, world::spawn_kept))?;
    let held_from = Instant::now();
    let started = Instant::now();
    let victim = curl_imds(
        victim_ns,
        &token_path(&format!("https://victim-{tag}.example/")),
        30,
    )
    .await;
    let victim_latency = started.elapsed();
    tokio::time::sleep(hold.saturating_sub(held_from.elapsed())).await;
    let fds_at_stop = open_fds(pid).unwrap_or(0);
    let outcome = tokio::task::block_in_place(|| flood.stop())?;
    let peaks = sampler.finish().await;
    let hwm_kib = procfs::memory(pid).map_or(0, |m| m.peak_kib);
    // Descriptors after the flood, waiting up to 30 s for the baseline.
    let stopped = Instant::now();
    let mut fds_after = open_fds(pid).unwrap_or(0);
    while fds_after > fds_base + 16 && stopped.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        fds_after = open_fds(pid).unwrap_or(0);
    }
    Ok(FloodRun {
        plan,
        outcome,
        peaks,
        hwm_kib,
        rss_base_kib,
        fds_base,
        fds_at_stop,
        fds_after,
        settled_after: stopped.elapsed(),
        victim_status: victim.as_ref().map_or(0, |(c, _)| *c),
        victim_latency,
    })
}

/// The flood's three cells and its line of details.
fn record_flood(f: &mut Figures, kind: Kind, m: &FloodRun, alive: bool) {
    f.set(
        Metric::FloodRss(kind),
        m.hwm_kib.max(m.peaks.rss_kib) as f64 / 1024.0,
    );
    f.set(
        Metric::FloodFds(kind),
        m.peaks.fds.max(m.fds_at_stop) as f64,
    );
    if m.victim_status == 200 {
        f.set(
            Metric::FloodVictim(kind),
            m.victim_latency.as_secs_f64() * 1000.0,
        );
    } else {
        f.set_text(
            Metric::FloodVictim(kind),
            &format!(
                "failed: no token (status {}) after {:.1} s",
                m.victim_status,
                m.victim_latency.as_secs_f64()
            ),
        );
    }
    let o = &m.outcome;
    f.note(format!(
        "{} flood ({} connections): {} connected, {} not; answers {}; {} closed by nmi unanswered, {} open at stop; \
         nmi before: {:.1} MiB, {} descriptors; {} descriptors {:.1} s after the flood stopped; nmi {}",
        kind.title(),
        m.plan.connections,
        o.connected,
        o.connect_failed,
        o.answered_text(),
        o.closed_unanswered,
        o.open_at_stop,
        m.rss_base_kib as f64 / 1024.0,
        m.fds_base,
        m.fds_after,
        m.settled_after.as_secs_f64(),
        if alive { "running" } else { "EXITED" },
    ));
}

async fn nmi_pods_assigned(run: &mut Run<'_>) -> anyhow::Result<()> {
    let ns = run.w.ns_nmi.name().to_string();
    let (total, _) = run.w.aai_counts(&ns).await?;
    run.w
        .wait_assigned(&ns, total.max(1), Duration::from_millis(250))
        .await
}

/// A token through NMI from the load pod, retried until 200 (bounded).
async fn warm_token(run: &mut Run<'_>) -> anyhow::Result<()> {
    for _ in 0..20 {
        if curl_token(run.w.pod(1)?.0, 60).await? == 200 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("the load pod gets no token")
}

/// Row 4 (NMI): peak RSS with `nmi_pods` pods and their AAIs on its node.
async fn row_nmi_rss(run: &mut Run<'_>, f: &mut Figures) -> anyhow::Result<()> {
    ensure_load_pod(run).await?;
    let ns = run.w.ns_nmi.name().to_string();
    let api: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(run.w.client.clone(), &ns);
    let have = api.list(&Default::default()).await?.items.len();
    let extra: Vec<_> = (have..run.w.scale.nmi_pods)
        .map(|i| {
            // Addresses no namespace backs, outside every node's pod range
            // (10.244.<n>.0/24): NMI only needs them in its index.
            let ip = std::net::Ipv4Addr::new(10, 245, (i / 250) as u8, (i % 250 + 1) as u8);
            (
                format!("extra-{i}"),
                run.w.nmi_node.clone(),
                i % 10,
                Some(ip),
            )
        })
        .collect();
    run.w.create_pods(&ns, extra).await?;
    let expected = api.list(&Default::default()).await?.items.len();
    run.w
        .wait_assigned(&ns, expected, Duration::from_millis(250))
        .await?;
    // Let NMI's watches catch up, then serve one request.
    tokio::time::sleep(Duration::from_secs(2)).await;
    warm_token(run).await?;
    let pid = run.w.nmi_pid()?;
    let mem = procfs::memory(pid)?;
    let fds = open_fds(pid)?;
    f.set(Metric::NmiPeakRss, mem.peak_kib as f64 / 1024.0);
    f.set(Metric::NmiPodsFds, fds as f64);
    f.note(format!(
        "nmi with {expected} pods on its node: VmHWM {} KiB, VmRSS {} KiB, {fds} descriptors",
        mem.peak_kib, mem.now_kib
    ));
    Ok(())
}

/// Row 3: nmi (on its core) under the open-loop generator (on the other)
/// from the load pod: each of [`LOAD_RATES`] for `load_seconds`, then the
/// search for the peak sustainable rate.
async fn row_token_load(run: &mut Run<'_>, f: &mut Figures) -> anyhow::Result<()> {
    ensure_load_pod(run).await?;
    nmi_pods_assigned(run).await?;
    warm_token(run).await?;
    let imds_before = run.w.emu()?.counters();
    let quiet = QuietCore::keep_off(run.w.nmi_pid()?, run.cores.load);
    if let Some(q) = &quiet {
        run.notes.push(format!(
            "token load: {} processes of the benchmark (nmi not among them) moved to the generator's core for the load runs",
            q.moved()
        ));
    }
    let seconds = run.w.scale.load_seconds;
    let mut tried = Vec::new();
    for rate in LOAD_RATES {
        let r = load_step(run, f64::from(rate), seconds, "fixed").await?;
        f.set(Metric::LoadP50(rate), r.p50_us as f64 / 1000.0);
        f.set(Metric::LoadP99(rate), r.p99_us as f64 / 1000.0);
        f.set(Metric::LoadMax(rate), r.max_us as f64 / 1000.0);
        f.set(Metric::LoadAchieved(rate), r.achieved);
        tried.push((f64::from(rate), r.sustained(f64::from(rate), SUSTAINED_P99)));
    }
    let peak = peak_rate(run, tried).await?;
    drop(quiet);
    f.set(Metric::LoadPeak, peak);
    let imds_after = run.w.emu()?.counters();
    let sum = |m: &std::collections::BTreeMap<String, u64>| m.values().sum::<u64>();
    let pid = run.w.nmi_pid()?;
    let mem = procfs::memory(pid)?;
    f.note(format!(
        "token load: IMDS token requests meanwhile {}, IMDS 429s {}; nmi after it: VmHWM {} KiB, VmRSS {} KiB",
        sum(&imds_after.imds_token_requests) - sum(&imds_before.imds_token_requests),
        imds_after.imds_throttled - imds_before.imds_throttled,
        mem.peak_kib,
        mem.now_kib
    ));
    Ok(())
}

/// The highest rate sustained: from what `tried` (rate, sustained) says,
/// doubling up from the highest rate sustained below the lowest one not
/// (or halving down), then two geometric bisections; 0 when none of
/// [`SEARCH_FLOOR`]'s rates and above was sustained.
async fn peak_rate(run: &mut Run<'_>, tried: Vec<(f64, bool)>) -> anyhow::Result<f64> {
    const SEARCH_FLOOR: f64 = 50.0;
    const SEARCH_CAP: f64 = 320_000.0;
    let mut fail = tried
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(r, _)| *r)
        .reduce(f64::min);
    let mut pass = tried
        .iter()
        .filter(|(r, ok)| *ok && fail.is_none_or(|f| *r < f))
        .map(|(r, _)| *r)
        .fold(0.0, f64::max);
    let seconds = run.w.scale.load_search_seconds;
    // Each loop ends within log2(cap / floor) steps.
    loop {
        let rate = match fail {
            None if pass * 2.0 <= SEARCH_CAP => pass.max(SEARCH_FLOOR / 2.0) * 2.0,
            Some(f) if pass == 0.0 && f / 2.0 >= SEARCH_FLOOR => f / 2.0,
            _ => break,
        };
        let r = load_step(run, rate, seconds, "search").await?;
        if r.sustained(rate, SUSTAINED_P99) {
            pass = rate;
        } else {
            fail = Some(rate);
        }
    }
    for _ in 0..2 {
        let Some(f) = fail.filter(|_| pass > 0.0) else {
            break;
        };
        let rate = (pass * f).sqrt().round();
        if rate <= pass || rate >= f {
            break;
        }
        let r = load_step(run, rate, seconds, "search").await?;
        if r.sustained(rate, SUSTAINED_P99) {
            pass = rate;
        } else {
            fail = Some(rate);
        }
    }
    Ok(pass)
}

/// One run of the generator at `rate` for `duration`, with nmi's CPU over
/// it; a line of details either way.
async fn load_step(
    run: &mut Run<'_>,
    rate: f64,
    duration: Duration,
    what: &str,
) -> anyhow::Result<LoadResult> {
    let spec = LoadSpec {
        target: SocketAddr::from((IMDS_ADDRESS, 80)),
        path: TOKEN_PATH.into(),
        rate,
        duration,
        connections: run.w.scale.load_connections,
        timeout: Duration::from_secs(2),
    };
    let pid = run.w.nmi_pid()?;
    let cpu0 = procfs::cpu(pid)?;
    let r = run_load(run.w.pod(1)?.0, &spec, run.cores.load).await?;
    let cpu = procfs::cpu(pid)?.saturating_sub(cpu0);
    let sustained = r.sustained(rate, SUSTAINED_P99);
    eprintln!(
        "[{}] load {what} {rate:.0}/s: p99 {} us, achieved {:.0}/s, errors {}{}",
        run.subject.title(),
        r.p99_us,
        r.achieved,
        r.errors + r.unfinished,
        if sustained { ", sustained" } else { "" }
    );
    run.notes.push(format!(
        "load ({what}) {rate:.0}/s for {:.1} s: {} due, {} ok, {} errors, {} unfinished; p50 {} µs, p99 {} µs, max {} µs; achieved {:.0}/s; generator send lag p99 {} µs; nmi CPU {:.2} s ({:.0} % of its core){}",
        duration.as_secs_f64(),
        r.due,
        r.ok,
        r.errors,
        r.unfinished,
        r.p50_us,
        r.p99_us,
        r.max_us,
        r.achieved,
        r.send_lag_p99_us,
        cpu.as_secs_f64(),
        100.0 * cpu.as_secs_f64() / r.seconds.max(1e-9),
        if sustained { "; sustained" } else { "" }
    ));
    Ok(r)
}

/// The load role in pod namespace `pod` with `spec`, pinned to `core`;
/// what it measured.
async fn run_load(pod: &NetNs, spec: &LoadSpec, core: Option<usize>) -> anyhow::Result<LoadResult> {
    let mut cmd = match core {
        Some(c) => {
            let mut cmd = pod.command("taskset");
            cmd.arg("-c").arg(c.to_string()).arg(self_exe());
            cmd
        }
        None => pod.command(self_exe()),
    };
    cmd.env(ROLE_ENV, "load")
        .arg(serde_json::to_string(spec)?)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = tokio::time::timeout(
        spec.duration + spec.timeout + Duration::from_secs(60),
        tokio::task::spawn_blocking(move || cmd.output()),
    )
    .await
    .context("load run exceeded its bound")???;
    last_line_json("load", &out)
}

fn arm_totals(c: &azure_emulator::Counters) -> [u64; 4] {
    [
        c.arm_writes.values().sum(),
        c.arm_reads.values().sum(),
        c.lro_polls,
        c.arm_throttled,
    ]
}

/// Row 2: `burst_pods` pods over `burst_ids` identities and `vmss` scale
/// sets, created 32 at a time while MIC runs.
async fn row_burst(run: &mut Run<'_>, f: &mut Figures) -> anyhow::Result<()> {
    let scale = run.w.scale.clone();
    run.w.ensure_identities(scale.burst_ids).await?;
    let ns = run.w.ns_burst.name().to_string();
    let pods: Vec<_> = (0..scale.burst_pods)
        .map(|i| {
            // Shifted per block of identities, so that every scale set
            // gets pods of (nearly) every identity, as a Deployment's pods
            // spread over nodes would.
            let n = run.w.nodes.len();
            let node = run.w.nodes[(i + 7 * (i / scale.burst_ids)) % n].clone();
            (format!("burst-{i}"), node, i % scale.burst_ids, None)
        })
        .collect();
    let before = arm_totals(&run.w.emu()?.counters());
    let since = run.w.emu()?.requests(0).last().map_or(0, |r| r.seq);
    let v0 = run.w.emu()?.clock().now();
    let t0 = Instant::now();
    run.w.create_pods(&ns, pods).await?;
    let created = t0.elapsed();
    let waited = run
        .w
        .wait_assigned(&ns, scale.burst_pods, Duration::from_millis(250))
        .await;
    let wall = t0.elapsed();
    let emulated = run.w.emu()?.clock().now().saturating_sub(v0);
    let after = arm_totals(&run.w.emu()?.counters());
    let d = |i: usize| (after[i] - before[i]) as f64;
    // ARM counts cover the same span, converged or not.
    f.set(Metric::BurstWrites, d(0));
    f.set(Metric::BurstReads, d(1));
    f.set(Metric::BurstPolls, d(2));
    f.set(Metric::Burst429, d(3));
    let (v0_ms, v1_ms) = (
        v0.as_millis() as u64,
        v0.as_millis() as u64 + emulated.as_millis() as u64,
    );
    let ops: Vec<OperationSpan> = run
        .w
        .emu()?
        .operations()
        .into_iter()
        .filter(|o| (v0_ms..=v1_ms).contains(&o.start_ms))
        .collect();
    record_scale_set_writes(f, &run.w.emu()?.requests(since), &ops, since, &scale);
    f.note(format!(
        "burst: the {} pods were created in {:.1} s wall",
        scale.burst_pods,
        created.as_secs_f64()
    ));
    waited?;
    f.set(Metric::BurstEmulated, emulated.as_secs_f64());
    f.set(Metric::BurstWall, wall.as_secs_f64());
    Ok(())
}

/// The burst's writes per scale set (from request `since + 1` of the
/// emulator's log on, with the operations `ops` they started): the most any
/// scale set got and the most in flight on one at once, with a line per
/// scale set.
fn record_scale_set_writes(
    f: &mut Figures,
    records: &[azure_emulator::RequestRecord],
    ops: &[OperationSpan],
    since: u64,
    scale: &Scale,
) {
    let per = writes::per_scale_set(records, ops);
    let most = |g: fn(&writes::VmssWrites) -> u64| per.iter().map(g).max().unwrap_or(0) as f64;
    f.set(Metric::BurstVmssWrites, most(|w| w.writes));
    f.set(Metric::BurstVmssInFlight, most(|w| w.max_in_flight));
    let lost = records
        .first()
        .map_or(0, |r| r.seq.saturating_sub(since + 1));
    let lines: Vec<String> = per.iter().map(writes::VmssWrites::line).collect();
    f.note(format!(
        "burst writes per scale set (operations of {:.0}-{:.0} emulated s): {}{}",
        scale.lro_seconds.0,
        scale.lro_seconds.1,
        lines.join("; "),
        if lost > 0 {
            format!("; the request log had dropped {lost} records of the span: counts are partial")
        } else {
            String::new()
        }
    ));
}

/// Row 5: ARM calls and MIC CPU over `idle` of emulated time after the burst.
async fn row_idle(run: &mut Run<'_>, f: &mut Figures) -> anyhow::Result<()> {
    let scale = run.w.scale.clone();
    // Let the last operations of the burst finish first.
    tokio::time::sleep(scale.wall(Duration::from_secs(60))).await;
    let before = arm_totals(&run.w.emu()?.counters());
    let nets0 = run.w.mic()?.log().matches(SAFETY_NET_LOG).count();
    let cpu0 = procfs::cpu(run.w.mic_pid()?)?;
    let v0 = run.w.emu()?.clock().now();
    tokio::time::sleep(scale.wall(scale.idle)).await;
    let mic = run.w.mic()?;
    if let Some(status) = mic.exited() {
        bail!("MIC exited ({status}): {}", mic.log_tail(20));
    }
    let cpu1 = procfs::cpu(run.w.mic_pid()?)?;
    let after = arm_totals(&run.w.emu()?.counters());
    // This project's MIC logs each periodic check; upstream's logs none.
    let nets = run.w.mic()?.log().matches(SAFETY_NET_LOG).count() - nets0;
    let nets = match run.subject {
        Subject::ThisProject => {
            format!("; safety-net drift checks in the span: {nets} (each reads every VMSS/VM once)")
        }
        Subject::Upstream => String::new(),
    };
    let emulated = run.w.emu()?.clock().now().saturating_sub(v0);
    let calls: u64 = (0..3).map(|i| after[i] - before[i]).sum();
    f.set(Metric::IdleArmCalls, calls as f64);
    f.set(Metric::IdleCpu, (cpu1 - cpu0).as_secs_f64());
    f.note(format!(
        "idle: {:.0} emulated s = {:.1} wall s; ARM writes {}, reads {}, LRO polls {}{nets}",
        emulated.as_secs_f64(),
        emulated.as_secs_f64() / scale.speed,
        after[0] - before[0],
        after[1] - before[1],
        after[2] - before[2]
    ));
    Ok(())
}

/// Row 4 (MIC): peak RSS once it holds `big_pods` pods over `big_ids`
/// identities, all Assigned (the burst's pods count towards the total).
async fn row_mic_rss(run: &mut Run<'_>, f: &mut Figures) -> anyhow::Result<()> {
    let scale = run.w.scale.clone();
    run.w.ensure_identities(scale.big_ids).await?;
    let ns = run.w.ns_big.name().to_string();
    let npv = scale.nodes_per_vmss;
    let pods: Vec<_> = (scale.burst_pods..scale.big_pods)
        .map(|i| {
            let j = i % scale.big_ids;
            // Identity j lives on scale set j mod K, spread over its nodes.
            let node = (j % scale.vmss) * npv + (i / scale.big_ids) % npv;
            (format!("big-{i}"), run.w.nodes[node].clone(), j, None)
        })
        .collect();
    let expected = pods.len();
    let t0 = Instant::now();
    run.w.create_pods(&ns, pods).await?;
    let waited = run
        .w
        .wait_assigned(&ns, expected, Duration::from_secs(2))
        .await;
    let wall = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mem = procfs::memory(run.w.mic_pid()?)?;
    let mib = mem.peak_kib as f64 / 1024.0;
    match waited {
        Ok(()) => {
            f.set(Metric::MicPeakRss, mib);
            f.set(Metric::BigConvergeWall, wall.as_secs_f64());
        }
        Err(e) => {
            f.set_text(
                Metric::MicPeakRss,
                &format!("failed to converge ({e:#}); peak RSS so far {mib:.1}"),
            );
            f.set_text(Metric::BigConvergeWall, &format!("failed: {e:#}"));
        }
    }
    f.note(format!(
        "mic with {} pods / {} identities (+{} on the nmi node): VmHWM {} KiB, VmRSS {} KiB",
        scale.big_pods, scale.big_ids, scale.nmi_pods, mem.peak_kib, mem.now_kib
    ));
    Ok(())
}
