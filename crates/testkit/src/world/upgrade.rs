//! An in-place upgrade from upstream v1.8.17 to this project and the
//! rollback, as a cluster goes through them, with pods asking for tokens
//! throughout: [`run`].
//!
//! The world starts as upstream's: its Go mic replicas (one leads on
//! upstream's Endpoints lock) and its Go nmi on each node, with plain flags
//! ([`ArgsSource::Flags`]) and the apiserver's admin kubeconfig; Go mic
//! assigns every pod's identity. With [`UpgradePlan::path`] Helm or
//! Manifests, upstream's release (chart 4.1.18 or flat manifests) is
//! written before Go starts, this project's over it right before each
//! direction's processes are swapped and upstream's again at the rollback
//! (see `upgrade/objects.rs`; the processes keep the plain flags, no
//! kubelet runs the written workloads). Then, in the order a rollout of
//! this project's chart runs them:
//! - upgrade: on each node in turn this project's nmi is started beside Go
//!   nmi (a surge: it installs its redirect and waits for the port), and once
//!   its redirect is in place (what the chart's readiness probe checks) Go
//!   nmi gets SIGTERM and is waited for; then this project's mic replicas
//!   start beside Go mic's (standby: Go holds the lock), Go mic's replicas
//!   are stopped (standby ones first, the leader last) and ours takes over;
//! - rollback (upstream's chart: delete first): on each node this
//!   project's nmi gets SIGTERM, then Go nmi starts; Go mic's replicas start
//!   beside ours, ours are stopped, and Go mic takes over.
//!
//! Across each direction it samples every 100 ms the Endpoints lock and the
//! Lease, the emulator's ARM request log (sides told apart by api-version,
//! [`GO_COMPUTE`]), every scale set's identities and every
//! AzureAssignedIdentity (AAI); every pod asks for a token every
//! [`UpgradePlan::token_every`]; the node relays log every connection that
//! reached IMDS and its peer. It returns the figures of each direction
//! ([`UpgradeFigures`]); deciding what is acceptable is the caller's.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aadpodid_api::AzureAssignedIdentity;
use anyhow::{Context as _, bail};
use azure_emulator::observe::Service;
use kube::Client;
use kube::api::{Api, ListParams};

use super::azure::{self, HostFiles};
use super::builder::{FlagsRole, Source};
use super::chart::Launch;
use super::nodes::{MicReplica, socket_of};
use super::options::Dialect;
use super::processes::{Proc, curl_command, run_curl};
use super::users::create_namespace;
use super::{
    APP_NS, ArgsSource, ClusterChoice, LEASE, NodeSpec, ONE_WORLD, Options, PodRef, Program,
    TOKEN_PATH, World, WorldBuilder, create_identity,
};
use crate::netns::IMDS_ADDRESS;
use crate::tenant::CloudEnvironment;
use crate::wait_for;

pub use figures::{
    AaiChanges, AaiSnapshot, GO_COMPUTE, LockSample, ObjectStep, Outcome, Side, Tenure,
    UpgradeFigures, aai_changes, acting_conflicts, direct_from_pods, removed_while_needed,
    side_of_arm, takeover_at, tenures,
};
pub use locks::{ENDPOINTS_ANNOTATION, LeaderLock};
pub use objects::UpgradePath;

mod figures;
mod locks;
mod objects;

/// Bound on the samples of one direction (10 minutes at 100 ms).
const MAX_SAMPLES: usize = 6000;
/// Bound on the token rounds of one direction.
const MAX_ROUNDS: usize = 3000;
/// Bound on a new side taking over, a redirect appearing, pods' tokens.
const STEP_WAIT: Duration = Duration::from_secs(60);

/// The programs of both sides.
#[derive(Clone, Debug)]
pub struct Sides {
    /// Upstream's mic ([`Program::upstream`]`("mic")`).
    pub upstream_mic: Program,
    /// Upstream's nmi.
    pub upstream_nmi: Program,
    /// This project's mic.
    pub our_mic: Program,
    /// This project's nmi.
    pub our_nmi: Program,
}

/// How a node's nmi is replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NmiOrder {
    /// The new one beside the old one until its redirect is in place, then
    /// the old one stopped (this project's chart: `maxSurge: 1`); only for
    /// this project's nmi, which waits for the port.
    Surge,
    /// The old one stopped and waited for, then the new one started
    /// (upstream's chart: `maxUnavailable: 1`).
    DeleteFirst,
}

/// What [`run`] does.
#[derive(Clone, Debug)]
pub struct UpgradePlan {
    /// The programs.
    pub sides: Sides,
    /// mic replicas of each side.
    pub mic_replicas: usize,
    /// Both mics' `--leader-election-duration`.
    pub lease: Duration,
    /// How the upgrade replaces each node's nmi ([`NmiOrder::Surge`]; the
    /// rollback is always [`NmiOrder::DeleteFirst`]).
    pub upgrade_nmi: NmiOrder,
    /// How long the pods' load runs before a direction's first step, and
    /// the new replicas stand by before the old ones stop.
    pub steady: Duration,
    /// How long everything is still watched after the new side took over
    /// (its first sync cycles on the state the old side left).
    pub settle: Duration,
    /// Pause between two token requests of a pod.
    pub token_every: Duration,
    /// Where the objects of each side come from ([`UpgradePath::Processes`]:
    /// none, only the processes are swapped).
    pub path: UpgradePath,
}

impl UpgradePlan {
    /// Two mic replicas a side, a 4 s lease, a surge upgrade, 2 s steady,
    /// 5 s settling, a token every 250 ms, processes only.
    pub fn new(sides: Sides) -> UpgradePlan {
        UpgradePlan {
            sides,
            mic_replicas: 2,
            lease: Duration::from_secs(4),
            upgrade_nmi: NmiOrder::Surge,
            steady: Duration::from_secs(2),
            settle: Duration::from_secs(5),
            token_every: Duration::from_millis(250),
            path: UpgradePath::Processes,
        }
    }
}

/// Everything [`run`] measured.
#[derive(Clone, Debug, Default)]
pub struct UpgradeRun {
    /// Bringing up upstream's world until every pod had its token.
    pub setup: Duration,
    /// Upstream's objects written before Go started ([`UpgradePath::Helm`],
    /// [`UpgradePath::Manifests`]).
    pub install: Option<ObjectStep>,
    /// ARM writes of upstream's mic while it assigned the identities first.
    pub setup_arm_writes: usize,
    /// Upstream to this project.
    pub upgrade: UpgradeFigures,
    /// This project back to upstream.
    pub rollback: UpgradeFigures,
}

impl UpgradeRun {
    /// Both directions' figures as printed blocks.
    pub fn blocks(&self) -> String {
        let install = self
            .install
            .as_ref()
            .map_or(String::new(), |o| format!("objects: {}\n", o.line()));
        format!(
            "{install}setup {:.1?}, upstream's ARM writes while assigning: {}\n{}{}",
            self.setup,
            self.setup_arm_writes,
            self.upgrade.block(),
            self.rollback.block()
        )
    }
}

/// Runs the upgrade and the rollback on a world of `opts` (its sizes and
/// identities; mic and nmi come from `plan`), pods `app-<i>` one per pod
/// namespace, pod `i` bound to identity `i % identities`.
pub async fn run(opts: Options, plan: &UpgradePlan) -> anyhow::Result<UpgradeRun> {
    let started = Instant::now();
    let (mut world, objects) = start(opts, plan).await?;
    let (objects, install) = objects.unzip();
    let count = world.nodes.len() * usize::from(world.opts.pods_per_node);
    let ids = world.opts.identities.max(1);
    let pods = world.create_pods(0, count, |i| Some(i % ids)).await?;
    world.wait_assigned(&pods, STEP_WAIT).await?;
    world
        .wait_vmss(&world.expected_identities(&pods), STEP_WAIT)
        .await?;
    world.wait_tokens(&pods, STEP_WAIT).await?;
    let setup_arm_writes = world
        .emu
        .requests(0)
        .iter()
        .filter(|r| r.service == Service::Arm && r.method != "GET")
        .count();
    let setup = started.elapsed();
    let ours_dir = world.dir.join("ours");
    std::fs::create_dir_all(&ours_dir)?;
    let ours_host = HostFiles::write(
        &ours_dir,
        &azure::world_cloud(),
        &CloudEnvironment::of(&world.emu),
    )?;
    let client = world.client().await?;
    let lock = LeaderLock::new(client.clone(), LEASE.0, LEASE.1);
    let mut live = Live::take(&mut world);
    live.objects = objects;
    let ctx = Ctx {
        w: &world,
        client: &client,
        lock: &lock,
        ours_host: &ours_host,
        plan,
        pods: &pods,
    };
    let upgrade = ctx.direction(&mut live, Direction::Upgrade).await;
    let rollback = match &upgrade {
        Ok(_) => ctx.direction(&mut live, Direction::Rollback).await,
        Err(_) => Ok(UpgradeFigures::default()),
    };
    live.put_back(&mut world);
    let (upgrade, rollback) = match (upgrade, rollback) {
        (Ok(u), Ok(r)) => (u, r),
        (Err(e), _) | (_, Err(e)) => return Err(e.context(world.dump().await)),
    };
    Ok(UpgradeRun {
        setup,
        install,
        setup_arm_writes,
        upgrade,
        rollback,
    })
}

/// Upstream's world: Go mic replicas and Go nmi on each node, with plain
/// flags; the identities and bindings in [`APP_NS`]; upstream's objects of
/// [`UpgradePlan::path`] written before Go starts.
async fn start(
    mut opts: Options,
    plan: &UpgradePlan,
) -> anyhow::Result<(World, Option<(objects::Objects, ObjectStep)>)> {
    let one = ONE_WORLD.lock().await;
    opts.mic = with_lease(&plan.sides.upstream_mic, plan.lease);
    opts.nmi = plan.sides.upstream_nmi.clone();
    let dir = std::env::temp_dir().join(crate::unique_name("aadpodid-upgrade"));
    let mut b = WorldBuilder::new(opts.clone(), ArgsSource::Flags, dir)?;
    b.cluster(ClusterChoice::Private).await?;
    b.tenant(azure::tenant_of(&opts)).await?;
    // Upstream's custom-cloud file carries no token audience (it asks for
    // tokens for the ARM endpoint itself).
    let env = CloudEnvironment {
        token_audience: None,
        ..CloudEnvironment::of(b.emu()?)
    };
    b.host_files_with(&azure::world_cloud(), &env)?;
    let client = b.client()?.clone();
    create_namespace(&client, APP_NS, None).await?;
    for j in 0..opts.identities {
        create_identity(&client, APP_NS, j).await?;
    }
    b.nodes(&NodeSpec::of_options(&opts)).await?;
    b.mic(plan.mic_replicas).await?;
    let objects = objects::Objects::install(plan.path, b.cluster_ref()?, b.dir())?;
    b.start_all().await?;
    Ok((b.finish(one)?, objects))
}

/// `program` with the plan's lease duration.
fn with_lease(program: &Program, lease: Duration) -> Program {
    program.clone().with_args([format!(
        "--leader-election-duration={}ms",
        lease.as_millis()
    )])
}

/// The processes of the run, moved out of the world while both directions
/// run (the watchers read the world meanwhile); stopped when dropped.
struct Live {
    /// nmi of each node.
    nmis: Vec<Proc>,
    /// mic replicas, with their side; stopped ones are removed.
    mics: Vec<(MicReplica, Side)>,
    /// Index of the next mic replica (its pod name).
    next_mic: usize,
    /// The objects of the plan's path.
    objects: Option<objects::Objects>,
}

impl Live {
    fn take(w: &mut World) -> Live {
        let nmis = w.nodes.iter_mut().map(|n| n.nmi.take()).collect();
        let mics: Vec<(MicReplica, Side)> = std::mem::take(&mut w.mics)
            .into_iter()
            .map(|m| (m, Side::Upstream))
            .collect();
        Live {
            nmis,
            next_mic: mics.len(),
            mics,
            objects: None,
        }
    }

    fn put_back(&mut self, w: &mut World) {
        for (n, p) in w.nodes.iter_mut().zip(self.nmis.drain(..)) {
            n.nmi = p;
        }
        w.mics.extend(self.mics.drain(..).map(|(m, _)| m));
    }

    /// Replica names and their sides, for the lock holders.
    fn sides(&self, known: &mut BTreeMap<String, Side>) {
        for (m, side) in &self.mics {
            known.insert(m.proc.name.clone(), *side);
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        for p in &mut self.nmis {
            p.kill();
        }
        for (m, _) in &mut self.mics {
            m.stop();
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Upgrade,
    Rollback,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Upgrade => "upgrade",
            Direction::Rollback => "rollback",
        }
    }

    /// The side it moves to.
    fn to(self) -> Side {
        match self {
            Direction::Upgrade => Side::Ours,
            Direction::Rollback => Side::Upstream,
        }
    }
}

/// What the steps of one direction return: when the old leader got SIGTERM
/// (ms since the direction began), and when the last step ended.
struct Steps {
    leader_stop_ms: u64,
    done: Duration,
    objects: Vec<ObjectStep>,
}

/// What the watcher of one direction saw.
#[derive(Default)]
struct Watched {
    locks: Vec<LockSample>,
    vmss: Vec<(u64, BTreeMap<String, BTreeSet<String>>)>,
    aai: AaiChanges,
    arm_writes: BTreeMap<Side, usize>,
    arm_reads: BTreeMap<Side, usize>,
}

/// The world and what both directions share.
struct Ctx<'a> {
    w: &'a World,
    client: &'a Client,
    /// mic's Lease and upstream's Endpoints lock.
    lock: &'a LeaderLock,
    ours_host: &'a HostFiles,
    plan: &'a UpgradePlan,
    pods: &'a [PodRef],
}

impl Ctx<'_> {
    /// One direction: the steps, with the watcher and the pods' load beside
    /// them, then its figures.
    async fn direction(&self, live: &mut Live, dir: Direction) -> anyhow::Result<UpgradeFigures> {
        let failures_before = self.w.token_failures(self.pods).await?;
        let since_seq = self.w.emu.requests(0).last().map_or(0, |r| r.seq);
        let since_epoch = epoch_ms();
        let t0 = Instant::now();
        let done = AtomicBool::new(false);
        let mut sides = BTreeMap::new();
        let steps = async {
            let r = self.steps(live, dir, t0, &mut sides).await;
            done.store(true, Ordering::SeqCst);
            r
        };
        let (steps, watched, load) =
            tokio::join!(steps, self.watch(since_seq, t0, &done), self.load(&done));
        let (steps, watched, outcomes) = (steps?, watched?, load?);
        let needed = self.w.expected_identities(self.pods);
        let mut token_errors = BTreeMap::new();
        for o in outcomes.iter().filter(|o| **o != Outcome::Token) {
            *token_errors.entry(format!("{o:?}")).or_default() += 1;
        }
        let failures_after = self.tokens_after().await?;
        Ok(UpgradeFigures {
            name: dir.name().into(),
            objects: steps.objects,
            duration: steps.done,
            arm_writes: watched.arm_writes,
            arm_reads: watched.arm_reads,
            aai: watched.aai,
            token_requests: outcomes.len(),
            token_errors,
            imds_direct: self.imds_direct(since_epoch),
            tenures: tenures(&watched.locks),
            takeover: takeover_at(&watched.locks, &sides, dir.to(), steps.leader_stop_ms)
                .map(|at| Duration::from_millis(at.saturating_sub(steps.leader_stop_ms))),
            conflicts: acting_conflicts(&watched.locks, &sides),
            removed_needed: removed_while_needed(&needed, &watched.vmss),
            failures_before,
            failures_after,
            samples: watched.locks.len(),
        })
    }

    /// The steps of `dir`; `sides` gets every mic replica's side.
    async fn steps(
        &self,
        live: &mut Live,
        dir: Direction,
        t0: Instant,
        sides: &mut BTreeMap<String, Side>,
    ) -> anyhow::Result<Steps> {
        live.sides(sides);
        tokio::time::sleep(self.plan.steady).await;
        // The chart or the manifests are written first; the rollout of the
        // processes follows.
        let objects = match (&mut live.objects, dir) {
            (None, _) => Vec::new(),
            (Some(o), Direction::Upgrade) => o.upgrade().await?,
            (Some(o), Direction::Rollback) => o.rollback().await?,
        };
        let begun = Instant::now();
        let s = &self.plan.sides;
        let (nmi, order, mic) = match dir {
            Direction::Upgrade => (&s.our_nmi, self.plan.upgrade_nmi, &s.our_mic),
            Direction::Rollback => (&s.upstream_nmi, NmiOrder::DeleteFirst, &s.upstream_mic),
        };
        for n in 0..self.w.nodes.len() {
            self.swap_nmi(live, n, nmi, order, dir).await?;
        }
        let old = match dir.to() {
            Side::Ours => Side::Upstream,
            Side::Upstream => Side::Ours,
        };
        self.add_mics(live, mic, dir.to()).await?;
        live.sides(sides);
        // The new replicas stand by while the old leader holds the lock.
        tokio::time::sleep(self.plan.steady).await;
        let leader = self.endpoints_holder().await?;
        let leader_stop_ms = self.stop_mics(live, old, leader.as_deref()).await?;
        let leader_stop_ms = leader_stop_ms.map_or(0, |t| (t - t0).as_millis() as u64);
        wait_for("the new side to hold the locks", STEP_WAIT, || async {
            let e = self.endpoints_holder().await.ok()??;
            let l = self.lease_holder().await.ok()?;
            let holds =
                |h: &Option<String>| h.as_ref().and_then(|h| sides.get(h)) == Some(&dir.to());
            (holds(&Some(e)) && (dir.to() == Side::Upstream || holds(&l))).then_some(())
        })
        .await?;
        let done = begun.elapsed();
        tokio::time::sleep(self.plan.settle).await;
        Ok(Steps {
            leader_stop_ms,
            done,
            objects,
        })
    }

    /// How processes of `program` are launched (this project's programs get
    /// this project's host files).
    fn launch(&self, program: &Program) -> anyhow::Result<Launch<'_>> {
        let host = match program.dialect {
            Dialect::ThisProject => self.ours_host,
            Dialect::Upstream => self.w.host.as_ref().context("no host files")?,
        };
        Ok(Launch {
            client: self.client,
            dir: &self.w.dir,
            host,
            emu: &self.w.emu,
            apiserver: socket_of(self.w.cluster.server())?,
            relay: self.w.opts.relay.as_ref(),
            pod_bound_tokens: self.w.opts.pod_bound_tokens,
        })
    }

    /// Replaces node `n`'s nmi with `program` in `order`.
    async fn swap_nmi(
        &self,
        live: &mut Live,
        n: usize,
        program: &Program,
        order: NmiOrder,
        dir: Direction,
    ) -> anyhow::Result<()> {
        let node = &self.w.nodes[n];
        let ns = &node.net.node;
        let name = format!("nmi-{}-{}", node.name, dir.name());
        let mut new = self.launch(program)?.flags_process(
            FlagsRole::Nmi,
            program,
            self.w.cluster.kubeconfig(),
            &name,
            &node.name,
        );
        match order {
            NmiOrder::Surge => {
                if program.dialect == Dialect::Upstream {
                    bail!("upstream's nmi cannot start beside another nmi (it needs the port)");
                }
                new.spawn(ns)?;
                let ready = wait_for("the new nmi's redirect", STEP_WAIT, || {
                    let up = new.exited().is_none();
                    let guard = ns
                        .run(
                            "iptables",
                            &[
                                "-w",
                                "5",
                                "-t",
                                "nat",
                                "-C",
                                "PREROUTING",
                                "-j",
                                GUARD_CHAIN,
                            ],
                        )
                        .is_ok();
                    async move { (guard || !up).then_some(up) }
                })
                .await;
                if !ready? {
                    bail!("{name} exited beside the old nmi:\n{}", new.log_tail(20));
                }
                live.nmis[n].terminate("TERM").await?;
            }
            NmiOrder::DeleteFirst => {
                live.nmis[n].terminate("TERM").await?;
                new.spawn(ns)?;
            }
        }
        new.wait_probe(ns).await?;
        live.nmis[n] = new;
        Ok(())
    }

    /// Starts [`UpgradePlan::mic_replicas`] replicas of `program` and waits
    /// until their probes answer.
    async fn add_mics(&self, live: &mut Live, program: &Program, side: Side) -> anyhow::Result<()> {
        let program = with_lease(program, self.plan.lease);
        let launch = self.launch(&program)?;
        let source = Source::Flags {
            mic: Some(launch.host.mic_files()),
            namespace: &self.w.opts.mic_namespace,
            program: &program,
            kubeconfig: self.w.cluster.kubeconfig(),
        };
        for _ in 0..self.plan.mic_replicas {
            let r = live.next_mic;
            live.next_mic += 1;
            let node = &self.w.nodes[r % self.w.nodes.len()].name;
            let mut m = MicReplica::add(&launch, &source, r, node).await?;
            m.proc.spawn(&m.net)?;
            live.mics.push((m, side));
        }
        for (m, _) in live.mics.iter_mut().filter(|(_, s)| *s == side) {
            if m.proc.pid().is_some() {
                m.proc.wait_probe(&m.net).await?;
            }
        }
        Ok(())
    }

    /// Stops `side`'s mic replicas with SIGTERM, standby ones first and
    /// `leader` last; returns when the leader got its SIGTERM.
    async fn stop_mics(
        &self,
        live: &mut Live,
        side: Side,
        leader: Option<&str>,
    ) -> anyhow::Result<Option<Instant>> {
        let mut order: Vec<usize> = (0..live.mics.len())
            .filter(|i| live.mics[*i].1 == side)
            .collect();
        order.sort_by_key(|i| Some(live.mics[*i].0.proc.name.as_str()) == leader);
        let mut leader_stop = None;
        for i in order {
            let m = &mut live.mics[i].0;
            if Some(m.proc.name.as_str()) == leader {
                leader_stop = Some(Instant::now());
            }
            m.proc.terminate("TERM").await?;
            m.stop();
        }
        live.mics.retain(|(_, s)| *s != side);
        Ok(leader_stop)
    }

    /// Holder of upstream's Endpoints lock (`None`: no object, or free).
    async fn endpoints_holder(&self) -> anyhow::Result<Option<String>> {
        Ok(locks::held(self.lock.endpoints_holder().await?))
    }

    /// Holder of the Lease (`None`: no object, or free).
    async fn lease_holder(&self) -> anyhow::Result<Option<String>> {
        Ok(locks::held(self.lock.lease_holder().await?))
    }

    /// Samples the locks, the ARM log, the scale sets and the AAIs every
    /// 100 ms until `done` (and once more).
    async fn watch(
        &self,
        since_seq: u64,
        t0: Instant,
        done: &AtomicBool,
    ) -> anyhow::Result<Watched> {
        let mut w = Watched::default();
        let mut last_seq = since_seq;
        let aais: Api<AzureAssignedIdentity> = Api::all(self.client.clone());
        let mut before = aai_snapshot(&aais).await?;
        for _ in 0..MAX_SAMPLES {
            let finished = done.load(Ordering::SeqCst);
            let mut s = LockSample {
                at_ms: t0.elapsed().as_millis() as u64,
                ..LockSample::default()
            };
            for r in self.w.emu.requests(last_seq) {
                last_seq = last_seq.max(r.seq);
                if r.service != Service::Arm {
                    continue;
                }
                let side = side_of_arm(&r.uri);
                let count = if r.method == "GET" {
                    &mut w.arm_reads
                } else {
                    &mut w.arm_writes
                };
                *count.entry(side).or_default() += 1;
                s.arm.insert(side);
            }
            // A failed read of a lock is a sample without holder: it can
            // only add conflicts, never hide one.
            s.endpoints = self.endpoints_holder().await.unwrap_or(None);
            s.lease = self.lease_holder().await.unwrap_or(None);
            w.locks.push(s);
            w.vmss.push((
                t0.elapsed().as_millis() as u64,
                self.w.all_vmss_identities(),
            ));
            if let Ok(after) = aai_snapshot(&aais).await {
                w.aai += aai_changes(&before, &after);
                before = after;
            }
            if finished {
                return Ok(w);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the watcher reached {MAX_SAMPLES} samples")
    }

    /// Every pod asks for a token, round after round, until `done`.
    async fn load(&self, done: &AtomicBool) -> anyhow::Result<Vec<Outcome>> {
        let url = format!("http://{IMDS_ADDRESS}{TOKEN_PATH}");
        let mut outcomes = Vec::new();
        for _ in 0..MAX_ROUNDS {
            if done.load(Ordering::SeqCst) {
                return Ok(outcomes);
            }
            let mut set = tokio::task::JoinSet::new();
            for p in self.pods {
                let cmd = curl_command(Some(self.w.pod_ns(p)?), &url, &["Metadata: true"], 5);
                set.spawn(run_curl(cmd));
            }
            while let Some(r) = set.join_next().await {
                let (code, body) = r??;
                outcomes.push(Outcome::of(code, &body));
            }
            tokio::time::sleep(self.plan.token_every).await;
        }
        bail!("the pods' load reached {MAX_ROUNDS} rounds")
    }

    /// Pods still without their token once every pod had one again (bounded).
    async fn tokens_after(&self) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + STEP_WAIT;
        loop {
            let failures = self.w.token_failures(self.pods).await?;
            if failures.is_empty() || Instant::now() >= deadline {
                return Ok(failures);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Requests from the pods that reached a node's IMDS directly since
    /// `since_ms` (ms since the epoch).
    fn imds_direct(&self, since_ms: u64) -> usize {
        let mut total = 0;
        for (n, node) in self.w.nodes.iter().enumerate() {
            let Some(log) = &node.imds_peers else {
                continue;
            };
            let pods: BTreeSet<IpAddr> = self
                .pods
                .iter()
                .filter(|p| p.node == n)
                .map(|p| IpAddr::V4(p.ip))
                .collect();
            total += direct_from_pods(&crate::relay::peer_log(log), &pods, since_ms);
        }
        total
    }
}

/// The chain this project's nmi jumps to from PREROUTING once its redirect
/// is in place (what its chart's readiness probe checks).
const GUARD_CHAIN: &str = "aad-metadata-guard";

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Every AAI by `namespace/name`: (uid, resourceVersion, status).
async fn aai_snapshot(api: &Api<AzureAssignedIdentity>) -> anyhow::Result<AaiSnapshot> {
    let items = api.list(&ListParams::default()).await?.items;
    let entry = |a: AzureAssignedIdentity| {
        let m = a.metadata;
        let key = format!(
            "{}/{}",
            m.namespace.unwrap_or_default(),
            m.name.unwrap_or_default()
        );
        let status = a.status.map(|s| s.status).unwrap_or_default();
        let state = (
            m.uid.unwrap_or_default(),
            m.resource_version.unwrap_or_default(),
            status,
        );
        (key, state)
    };
    Ok(items.into_iter().map(entry).collect())
}
