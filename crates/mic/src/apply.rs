//! Carries out a [`Plan`]: Kubernetes writes of AzureAssignedIdentities
//! (AAIs), then one GET + PATCH(es) per VMSS/VM, then the status writes that
//! depend on what landed (upstream MIC's order; see "MIC sync cycle" in
//! docs/upstream-behaviour.md). What to write to a VMSS/VM and how each AAI
//! settles is decided in [`crate::writes`]; this module performs it. Every
//! write first checks that this replica still leads.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aadpodid_api::{
    ANNOTATION_ASSIGNMENT_ERROR, ASSIGNED_IDENTITY_FINALIZER, AssignedIdentityState,
    AzureAssignedIdentity,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cloud::{Cloud, CloudError, IdentityPatch, ResourceKind, ResourceRef, identity_patches};
use crate::events::{self, Events};
use crate::guard::{self, Protection};
use crate::index::{AssignedInfo, Index, Key, Replaced};
use crate::ledger::{self, Ledger};
use crate::metrics::{self, Metrics};
use crate::plan::{Plan, PlannedAai, ResourceWork, Warning, assigned_client_id, refs};
use crate::schedule::Budget;
use crate::writes::{
    self, Next, Sent, Settle, SettleInput, WriteQueue, is_deleting, split_quarantined,
};

/// When a resource failed without a Retry-After.
const FAILURE_RETRY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("creating AzureAssignedIdentity {ns}/{name}: {source}")]
    CreateAssignedIdentity {
        ns: String,
        name: String,
        source: kube::Error,
    },
    #[error("updating AzureAssignedIdentity {ns}/{name}: {source}")]
    UpdateAssignedIdentity {
        ns: String,
        name: String,
        source: kube::Error,
    },
    #[error("writing the status of AzureAssignedIdentity {ns}/{name}: {source}")]
    PatchAssignedIdentityStatus {
        ns: String,
        name: String,
        source: kube::Error,
    },
    #[error("deleting AzureAssignedIdentity {ns}/{name}: {source}")]
    DeleteAssignedIdentity {
        ns: String,
        name: String,
        source: kube::Error,
    },
    #[error("reading the ownership ledger ConfigMap {ns}/{name}: {source}")]
    ReadLedger {
        ns: String,
        name: String,
        source: kube::Error,
    },
    #[error("writing the ownership ledger ConfigMap {ns}/{name}: {source}")]
    WriteLedger {
        ns: String,
        name: String,
        source: kube::Error,
    },
    #[error("the ownership ledger was not read in this term")]
    LedgerNotRead,
    #[error("not the leader any more")]
    NotLeader,
}

/// Settings of the executor.
#[derive(Clone, Debug)]
pub struct ExecutorOptions {
    /// `--createDeleteBatch`.
    pub batch: usize,
    /// `--update-user-msi-max-retry`.
    pub max_retry: u32,
    /// `--update-user-msi-retry-interval`.
    pub retry_interval: Duration,
    /// The ARM write budget the scheduler keeps to (`--arm-*-write*` flags).
    pub limits: crate::schedule::Limits,
    /// Cluster identities and `--serve-cluster-identities`.
    pub protection: Protection,
    /// Namespace (`MIC_POD_NAMESPACE`) and name (`--owned-identities-configmap`)
    /// of the ownership ledger.
    pub ledger_namespace: String,
    pub ledger_name: String,
}

/// What a cycle leaves for later.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Run again at this time even if nothing changes (throttled or failed work).
    pub retry_at: Option<Instant>,
}

impl Outcome {
    fn retry(&mut self, at: Instant) {
        earliest(&mut self.retry_at, at);
    }
}

/// The ARM work of one VMSS/VM (GET, PATCHes, LRO, settling its AAIs), run
/// beside later cycles, so a resource waiting on its operation holds up no
/// other. At most one runs per resource: work a cycle plans for a resource
/// whose job still runs waits, and is planned again once it ends.
pub type ResourceJob = std::pin::Pin<Box<dyn std::future::Future<Output = JobDone> + Send>>;

/// How a [`ResourceJob`] ended.
#[derive(Debug)]
pub struct JobDone {
    pub resource: ResourceRef,
    /// When to try the resource again, if needed.
    pub result: Result<Option<Instant>, ApplyError>,
    /// A cycle held work back while the job ran: plan again now.
    pub replan: bool,
}

/// Resources with a running job, and the work held back meanwhile.
#[derive(Debug, Default)]
struct InFlight {
    /// Resource → the AAIs its job settles.
    jobs: BTreeMap<ResourceRef, BTreeSet<Key>>,
    /// Resources whose work a cycle held back while their job ran.
    held: BTreeSet<ResourceRef>,
}

/// What a cycle does with one piece of work, given the running jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// Done now (by the cycle, or by a new job for its resource).
    Now,
    /// Waits for the job that runs on its resource; planned again when it ends.
    Held,
}

impl InFlight {
    /// An AAI write (update, status, deletion) waits while a job settles the AAI.
    fn route_key(&mut self, key: &Key) -> Route {
        let busy = self
            .jobs
            .iter()
            .find(|(_, keys)| keys.contains(key))
            .map(|(r, _)| r.clone());
        match busy {
            Some(r) => {
                self.held.insert(r);
                Route::Held
            }
            None => Route::Now,
        }
    }

    /// A resource's ARM work: a new job, or held while one runs; `keys`
    /// are the AAIs the new job settles.
    fn route_resource(&mut self, r: &ResourceRef, keys: BTreeSet<Key>) -> Route {
        if self.jobs.contains_key(r) {
            self.held.insert(r.clone());
            return Route::Held;
        }
        self.jobs.insert(r.clone(), keys);
        Route::Now
    }

    /// The job on `r` ended; whether work was held for it meanwhile.
    fn finish(&mut self, r: &ResourceRef) -> bool {
        self.jobs.remove(r);
        self.held.remove(r)
    }
}

/// Keeps the earlier of `slot` and `at`.
fn earliest(slot: &mut Option<Instant>, at: Instant) {
    *slot = Some(slot.map_or(at, |t| t.min(at)));
}

/// The work on one resource once vetted and recorded in the ledger.
#[derive(Debug)]
struct VettedWork {
    /// Identity IDs to add.
    add: BTreeSet<String>,
    /// Identity IDs to remove.
    remove: BTreeSet<String>,
    /// Retiring AAIs whose identity stays on the resource by design.
    release: Vec<Key>,
    /// AAIs the guard refused before anything was sent (already reported).
    refused_before: BTreeSet<Key>,
    /// The ledger's entries for the resource after recording the adds.
    owned_entries: BTreeSet<String>,
}

/// How sending one group's PATCHes ended (the owned form of [`Sent`]).
#[derive(Debug)]
enum Sending {
    Landed,
    /// The write budget held a PATCH back until `at`.
    Deferred {
        at: Instant,
        sent_some: bool,
    },
    Failed(CloudError),
}

/// The AAIs a cycle acts on: the index's (shared, not copied), with what
/// the cycle wrote over them.
struct Known<'a> {
    indexed: Cow<'a, BTreeMap<Key, Arc<AssignedInfo>>>,
    written: BTreeMap<Key, Written>,
}

/// An AAI the cycle wrote: the plan's and what the apiserver gave it. A
/// few hundred bytes where the apiserver's answer, even kept as the index
/// keeps AAIs, takes over a kilobyte: thousands are written in a cycle.
#[derive(Clone)]
struct Written {
    planned: PlannedAai,
    uid: Option<String>,
    resource_version: Option<String>,
}

impl Known<'_> {
    /// The AAIs of `keys`, owned (for a job that outlives the cycle).
    fn part(&self, keys: &BTreeSet<Key>) -> Known<'static> {
        let mut part = Known {
            indexed: Cow::Owned(BTreeMap::new()),
            written: BTreeMap::new(),
        };
        for key in keys {
            if let Some(w) = self.written.get(key) {
                part.written.insert(key.clone(), w.clone());
            } else if let Some(a) = self.indexed.get(key) {
                part.indexed.to_mut().insert(key.clone(), Arc::clone(a));
            }
        }
        part
    }

    fn get(&self, key: &Key) -> Option<Cow<'_, AssignedInfo>> {
        match self.written.get(key) {
            Some(w) => Some(Cow::Owned(
                w.planned.kept(w.uid.clone(), w.resource_version.clone()),
            )),
            None => self.indexed.get(key).map(|a| Cow::Borrowed(&**a)),
        }
    }

    fn contains_key(&self, key: &Key) -> bool {
        self.written.contains_key(key) || self.indexed.contains_key(key)
    }
}

/// Which write of an AzureAssignedIdentity [`Executor::write_aai`] makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AaiWrite {
    Create,
    Update,
}

/// What an [`Executor`] works through: the Kubernetes client, the cloud,
/// where it reports, and whether this replica leads.
pub struct Deps<C: Cloud> {
    pub client: Client,
    pub cloud: Arc<C>,
    pub events: Events,
    pub metrics: Metrics,
    pub leading: watch::Receiver<bool>,
    /// The index, where MIC's own AAI writes go as soon as they are answered.
    pub shared: Arc<crate::watch::Shared>,
}

impl<C: Cloud> std::fmt::Debug for Deps<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deps").finish_non_exhaustive()
    }
}

pub struct Executor<C: Cloud> {
    deps: Deps<C>,
    opts: ExecutorOptions,
    /// Retry-After per resource: a throttled scale set pauses alone, where
    /// upstream paused every scale set (docs/upstream-behaviour.md, H8).
    not_before: Mutex<BTreeMap<ResourceRef, Instant>>,
    /// Identities ARM refused, with their back-off.
    quarantine: Mutex<writes::Quarantine>,
    /// Warnings already reported, so each is logged once.
    reported: Mutex<BTreeSet<String>>,
    /// Local mirror of Compute's write buckets, so MIC stays under the
    /// throttling limits instead of running into 429s (upstream does not).
    budget: Mutex<Budget>,
    /// Time zero of the budget's clock.
    origin: Instant,
    /// The ownership ledger as last read or written by this leader; `None`
    /// until read in this term.
    ledger: tokio::sync::Mutex<Option<Ledger>>,
    /// AAI → the refusal last reported for it, so each is reported once
    /// (Event, metric, log) until it changes or the AAI is assigned.
    refusals: Mutex<BTreeMap<Key, String>>,
    /// Identity ID → the client ID ARM reported for it on any resource read
    /// so far (a cluster identity is then known before it is added elsewhere).
    known_client_ids: Mutex<BTreeMap<String, String>>,
    /// The resources whose [`ResourceJob`] runs.
    in_flight: Mutex<InFlight>,
}

impl<C: Cloud> std::fmt::Debug for Executor<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn op_label(r: &ResourceRef, update: bool) -> &'static str {
    match (r.kind, update) {
        (ResourceKind::Vmss, false) => metrics::OP_VMSS_GET,
        (ResourceKind::Vmss, true) => metrics::OP_VMSS_UPDATE,
        (ResourceKind::Vm, false) => metrics::OP_VM_GET,
        (ResourceKind::Vm, true) => metrics::OP_VM_UPDATE,
    }
}

impl<C: Cloud> Executor<C> {
    pub fn new(deps: Deps<C>, opts: ExecutorOptions) -> Self {
        Executor {
            deps,
            not_before: Mutex::default(),
            quarantine: Mutex::default(),
            reported: Mutex::default(),
            budget: Mutex::new(Budget::new(opts.limits)),
            origin: Instant::now(),
            ledger: tokio::sync::Mutex::new(None),
            refusals: Mutex::default(),
            known_client_ids: Mutex::default(),
            in_flight: Mutex::default(),
            opts,
        }
    }

    /// Forgets every running job (after they were aborted).
    pub fn clear_jobs(&self) {
        *lock(&self.in_flight) = InFlight::default();
    }

    /// The job on `r` ended without saying so (it panicked): `r` is free again.
    pub fn job_lost(&self, r: &ResourceRef) {
        lock(&self.in_flight).finish(r);
    }

    /// Whether a job runs on `r`.
    fn busy(&self, r: &ResourceRef) -> bool {
        lock(&self.in_flight).jobs.contains_key(r)
    }

    /// The ledger as read in this term (jobs do not read it: the cycle that
    /// starts them does, with the index it may be seeded from).
    async fn read_ledger(&self) -> Result<Ledger, ApplyError> {
        self.ledger
            .lock()
            .await
            .clone()
            .ok_or(ApplyError::LedgerNotRead)
    }

    /// Drops the cached ledger: the next term reads it afresh.
    pub async fn forget_ledger(&self) {
        *self.ledger.lock().await = None;
    }

    fn ledger_api(&self) -> Api<ConfigMap> {
        Api::namespaced(self.deps.client.clone(), &self.opts.ledger_namespace)
    }

    fn read_ledger_error(&self, source: kube::Error) -> ApplyError {
        ApplyError::ReadLedger {
            ns: self.opts.ledger_namespace.clone(),
            name: self.opts.ledger_name.clone(),
            source,
        }
    }

    fn write_ledger_error(&self, source: kube::Error) -> ApplyError {
        ApplyError::WriteLedger {
            ns: self.opts.ledger_namespace.clone(),
            name: self.opts.ledger_name.clone(),
            source,
        }
    }

    /// The ledger, read once per term; when the ConfigMap does not exist it
    /// is created, seeded from every AAI of `index` (which is synced), before
    /// any removal is decided.
    async fn ledger(&self, index: &Index) -> Result<Ledger, ApplyError> {
        let mut cached = self.ledger.lock().await;
        if let Some(l) = cached.as_ref() {
            return Ok(l.clone());
        }
        let api = self.ledger_api();
        let name = &self.opts.ledger_name;
        let read = match api.get_opt(name).await {
            Ok(Some(cm)) => Ledger::from_data(&cm.data.unwrap_or_default()),
            Ok(None) => {
                self.check_leader()?;
                let seeded = Ledger::seed(index);
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(self.opts.ledger_namespace.clone()),
                        ..Default::default()
                    },
                    data: Some(seeded.to_data()),
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &cm).await {
                    Ok(_) => {
                        tracing::info!(configmap = %name, resources = seeded.len(), "ownership ledger created, seeded from the existing AzureAssignedIdentities");
                        seeded
                    }
                    // Written meanwhile (a previous term): read that one.
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        let cm = api.get(name).await.map_err(|e| self.read_ledger_error(e))?;
                        Ledger::from_data(&cm.data.unwrap_or_default())
                    }
                    Err(e) => return Err(self.write_ledger_error(e)),
                }
            }
            Err(e) => return Err(self.read_ledger_error(e)),
        };
        *cached = Some(read.clone());
        Ok(read)
    }

    /// Writes the entries of `r` (that key alone, by a merge patch) and
    /// updates the cache once the apiserver took it.
    async fn write_ledger(
        &self,
        r: &ResourceRef,
        entries: std::collections::BTreeSet<String>,
    ) -> Result<(), ApplyError> {
        self.check_leader()?;
        let mut cached = self.ledger.lock().await;
        let Some(current) = cached.as_mut() else {
            return Err(ApplyError::LedgerNotRead);
        };
        if current.entries(r) == entries {
            return Ok(());
        }
        let value = if entries.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::Value::String(ledger::encode(&entries))
        };
        let patch = json!({"data": {ledger::resource_key(r): value}});
        let api = self.ledger_api();
        match api
            .patch(
                &self.opts.ledger_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {}
            // Deleted behind MIC's back: write it whole again from the cache.
            Err(kube::Error::Api(s)) if s.code == 404 => {
                let mut whole = current.clone();
                whole.set(r, entries.clone());
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(self.opts.ledger_name.clone()),
                        namespace: Some(self.opts.ledger_namespace.clone()),
                        ..Default::default()
                    },
                    data: Some(whole.to_data()),
                    ..Default::default()
                };
                api.create(&PostParams::default(), &cm)
                    .await
                    .map_err(|e| self.write_ledger_error(e))?;
            }
            Err(e) => return Err(self.write_ledger_error(e)),
        }
        current.set(r, entries);
        Ok(())
    }

    /// Reports a refused AAI: the annotation on it (written only when it
    /// differs), and once per new reason an Event on its AzureIdentity, a
    /// log line and the metric. Never schedules a retry: the AAI is checked
    /// again on the next change or full resync.
    async fn refuse(&self, aai: &AssignedInfo, refusal: &guard::Refusal) -> Result<(), ApplyError> {
        let key = crate::index::key(aai);
        let message = refusal.message();
        let first =
            lock(&self.refusals).insert(key.clone(), message.clone()) != Some(message.clone());
        if first {
            tracing::warn!(aai = %format!("{}/{}", key.0, key.1), reason = refusal.reason(), "{message}");
            self.deps
                .metrics
                .identity_refused_count
                .with_label_values(&[refusal.reason()])
                .inc();
            if let (Some(identity), _) = refs(aai) {
                self.deps.events.publish(
                    true,
                    refusal.reason(),
                    format!("AzureAssignedIdentity {}: {message}", key.1),
                    events::reference(identity),
                );
            }
        }
        if aai.annotations().get(ANNOTATION_ASSIGNMENT_ERROR) != Some(&message) {
            self.check_leader()?;
            let patch =
                json!({"metadata": {"annotations": {ANNOTATION_ASSIGNMENT_ERROR: message}}});
            match self
                .api(&key.0)
                .patch(&key.1, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(answer) => self.deps.shared.own_answer(
                    &answer,
                    Replaced::Version(aai.metadata.resource_version.as_deref()),
                ),
                Err(error) => {
                    tracing::warn!(aai = %format!("{}/{}", key.0, key.1), %error, "annotating a refused AzureAssignedIdentity");
                    // Reported again next time, with the annotation.
                    lock(&self.refusals).remove(&key);
                }
            }
        }
        Ok(())
    }

    fn budget_now(&self) -> Duration {
        Instant::now().saturating_duration_since(self.origin)
    }

    /// Takes a write token for `r`, or says when one will be there.
    fn acquire_write(&self, r: &ResourceRef) -> Result<(), Instant> {
        let now = self.budget_now();
        lock(&self.budget).try_acquire(r, now).map_err(|wait| {
            tracing::debug!(resource = %r, ?wait, "write budget spent; PATCH deferred");
            self.deps.metrics.mic_arm_writes_deferred_count.inc();
            Instant::now() + wait
        })
    }

    /// Feeds what ARM said about its buckets back into the mirror.
    fn observe_write(&self, r: &ResourceRef, error: Option<&CloudError>) {
        let now = self.budget_now();
        let mut budget = lock(&self.budget);
        if let Some(header) = self.deps.cloud.take_remaining(r) {
            budget.observe_remaining(r, &header, now);
        }
        if let Some(n) = self.deps.cloud.take_remaining_subscription_writes() {
            budget.observe_subscription_writes(n, now);
        }
        if let Some(after) = error.and_then(CloudError::retry_after) {
            budget.observe_retry_after(r, after, now);
        }
    }

    fn check_leader(&self) -> Result<(), ApplyError> {
        if *self.deps.leading.borrow() {
            Ok(())
        } else {
            Err(ApplyError::NotLeader)
        }
    }

    fn api(&self, ns: &str) -> Api<AzureAssignedIdentity> {
        Api::namespaced(self.deps.client.clone(), ns)
    }

    /// Logs and reports each plan warning once.
    pub fn report_warnings(&self, warnings: &[Warning], index: &Index) {
        let mut reported = lock(&self.reported);
        let identity_ref = |k: &Key| {
            index
                .identities
                .get(k)
                .map(|o| events::reference(o.as_ref()))
        };
        let binding_ref = |k: &Key| index.bindings.get(k).map(|o| events::reference(o.as_ref()));
        for w in warnings {
            if !reported.insert(format!("{w:?}")) {
                continue;
            }
            tracing::warn!(warning = ?w, "ignoring");
            let (note, reference) = match w {
                Warning::IdentityNotFound { binding, identity } => (
                    format!("identity {}/{} not found", identity.0, identity.1),
                    binding_ref(binding),
                ),
                Warning::InvalidResourceId {
                    identity,
                    resource_id,
                } => (
                    format!("invalid resource id {resource_id:?}"),
                    identity_ref(identity),
                ),
                Warning::UnknownIdentityType { identity, value } => (
                    format!("unsupported identity type {value}"),
                    identity_ref(identity),
                ),
                Warning::DuplicateAssignedIdentity { name, binding } => (
                    format!(
                        "AzureAssignedIdentity {}/{} already made from another binding",
                        name.0, name.1
                    ),
                    binding_ref(binding),
                ),
                Warning::NamespaceMismatch { binding, pod } => (
                    format!(
                        "namespaced identity cannot be used by pod {}/{}",
                        pod.0, pod.1
                    ),
                    binding_ref(binding),
                ),
                Warning::IdentityNotGranted {
                    identity,
                    namespace,
                    resource_id,
                    enforced,
                } => {
                    self.deps
                        .metrics
                        .identity_refused_count
                        .with_label_values(&[events::REASON_IDENTITY_NOT_GRANTED])
                        .inc();
                    (
                        format!(
                            "{resource_id} is not granted to namespace {namespace} by its {} annotation; {}",
                            aadpodid_api::ANNOTATION_ALLOWED_IDENTITIES,
                            if *enforced {
                                "not assigned (identity policy: enforce)"
                            } else {
                                "assigned anyway (identity policy: warn)"
                            }
                        ),
                        identity_ref(identity),
                    )
                }
                Warning::UnknownTokenSource { identity, error } => (
                    format!("{error}; no pod is given this identity until it is fixed"),
                    identity_ref(identity),
                ),
            };
            let reason = match w {
                Warning::IdentityNotGranted { .. } => events::REASON_IDENTITY_NOT_GRANTED,
                _ => events::REASON_INVALID_OBJECT,
            };
            if let Some(r) = reference {
                self.deps.events.publish(true, reason, note, r);
            }
        }
    }

    /// Runs the plan's Kubernetes writes and returns the ARM work of each
    /// resource as a [`ResourceJob`] for the caller to run. Work on AAIs or
    /// resources a running job settles waits for it to end. Errors of single
    /// objects are reported and retried by a later cycle; only losing the
    /// lease stops it early. The plan's new and updated AAIs are dropped
    /// once written: the apiserver's answers stand for them.
    pub async fn execute(
        self: &Arc<Self>,
        plan: Plan,
        index: &Index,
    ) -> Result<(Outcome, Vec<(ResourceRef, ResourceJob)>), ApplyError> {
        let mut outcome = Outcome::default();
        self.report_warnings(&plan.warnings, index);
        let mut aais = Known {
            indexed: Cow::Borrowed(&index.assigned),
            written: BTreeMap::new(),
        };
        let mut failed: BTreeSet<Key> = BTreeSet::new();
        let now = |key: &Key| lock(&self.in_flight).route_key(key) == Route::Now;

        // 1. Kubernetes writes first: creates, then updates.
        let creates = self.write_aais(plan.create, AaiWrite::Create).await;
        let update: Vec<PlannedAai> = plan.update.into_iter().filter(|a| now(&a.key)).collect();
        let updates = self.write_aais(update, AaiWrite::Update).await;
        for r in creates.into_iter().chain(updates) {
            match r {
                Ok(w) => {
                    aais.written.insert(w.planned.key.clone(), w);
                }
                Err((_, ApplyError::NotLeader)) => return Err(ApplyError::NotLeader),
                Err((key, error)) => {
                    tracing::warn!(%error, "AzureAssignedIdentity write failed");
                    failed.insert(key);
                    outcome.retry(Instant::now() + FAILURE_RETRY);
                }
            }
        }

        // 2. No ARM work needed. A write the apiserver did not take (it may
        // be restarting) is tried again: no watch event would bring it back.
        for key in plan.assign_now.iter().filter(|k| now(k)) {
            if let Some(aai) = aais.get(key).filter(|_| !failed.contains(key))
                && !self.mark_assigned(&aai).await?
            {
                outcome.retry(Instant::now() + FAILURE_RETRY);
            }
        }
        for key in plan.delete_now.iter().filter(|k| now(k)) {
            if let Some(aai) = aais.get(key) {
                let result = self.try_delete(&aai).await?;
                // Upstream's Events for an AzureAssignedIdentity of a node
                // that is gone (the only removal it reported by Event).
                let node_exists = index.nodes.contains_key(&aai.spec.node_name);
                if let Some(e) = events::node_gone_removal(&aai, node_exists, result.as_ref()) {
                    self.deps
                        .events
                        .publish(e.warning, e.reason, e.note, e.regarding);
                }
                if result.is_err() {
                    outcome.retry(Instant::now() + FAILURE_RETRY);
                }
            }
        }

        // 3. The ledger is read (or seeded from the index) once per term,
        // before any job needs it.
        if !plan.resources.is_empty()
            && let Err(error) = self.ledger(index).await
        {
            if matches!(error, ApplyError::NotLeader) {
                return Err(error);
            }
            tracing::warn!(%error, "no ARM work without the ownership ledger");
            outcome.retry(Instant::now() + FAILURE_RETRY);
            return Ok((outcome, Vec::new()));
        }

        // 4. One job per resource that has none running; each does one GET
        // and its PATCHes. No await from here on: a cycle cancelled before
        // has started no job.
        let mut jobs = Vec::with_capacity(plan.resources.len());
        let mut in_flight = lock(&self.in_flight);
        for (r, w) in plan.resources {
            let keys: BTreeSet<Key> = w
                .assign_on_success
                .iter()
                .chain(&w.delete_on_success)
                .map(|(k, _)| k.clone())
                .collect();
            let mine = aais.part(&keys);
            let failed = keys.intersection(&failed).cloned().collect();
            if in_flight.route_resource(&r, keys) == Route::Held {
                continue;
            }
            let job: ResourceJob =
                Box::pin(Arc::clone(self).resource_job(r.clone(), w, mine, failed));
            jobs.push((r, job));
        }
        Ok((outcome, jobs))
    }

    /// [`Executor::resource`] as a job that owns what it needs.
    async fn resource_job(
        self: Arc<Self>,
        r: ResourceRef,
        w: ResourceWork,
        aais: Known<'static>,
        failed: BTreeSet<Key>,
    ) -> JobDone {
        let result = match self.resource(&r, &w, &aais, &failed).await {
            Err(ApplyError::NotLeader) => Err(ApplyError::NotLeader),
            Err(error) => {
                tracing::warn!(resource = %r, %error, "resource work failed");
                Ok(Some(Instant::now() + FAILURE_RETRY))
            }
            ok => ok,
        };
        let replan = lock(&self.in_flight).finish(&r);
        JobDone {
            resource: r,
            result,
            replan,
        }
    }

    /// Whether a resource is paused by Retry-After; returns the resume time.
    fn paused(&self, r: &ResourceRef) -> Option<Instant> {
        lock(&self.not_before)
            .get(r)
            .copied()
            .filter(|t| *t > Instant::now())
    }

    fn note_error(&self, r: &ResourceRef, e: &CloudError, update: bool) -> Instant {
        self.deps
            .metrics
            .cloud_provider_operations_errors_count
            .with_label_values(&[op_label(r, update)])
            .inc();
        let at = Instant::now() + e.retry_after().unwrap_or(FAILURE_RETRY);
        if e.retry_after().is_some() {
            lock(&self.not_before).insert(r.clone(), at);
        }
        at
    }

    async fn get(
        &self,
        r: &ResourceRef,
    ) -> Result<crate::cloud::ResourceIdentity, (CloudError, Instant)> {
        let start = std::time::Instant::now();
        let res = self.deps.cloud.get_identities(r).await;
        if let Ok(current) = &res {
            let mut known = lock(&self.known_client_ids);
            for (id, a) in &current.reported {
                if !a.client_id.is_empty() {
                    known.insert(id.clone(), a.client_id.clone());
                }
            }
        }
        // A GET answer may carry the resource's bucket counts too.
        if let Some(header) = self.deps.cloud.take_remaining(r) {
            let now = self.budget_now();
            lock(&self.budget).observe_remaining(r, &header, now);
        }
        self.deps
            .metrics
            .cloud_provider_operations_duration_seconds
            .with_label_values(&[op_label(r, false)])
            .observe(start.elapsed().as_secs_f64());
        res.map_err(|e| {
            let at = self.note_error(r, &e, false);
            (e, at)
        })
    }

    /// One VMSS/VM: GET, vet, PATCH the delta as the [`WriteQueue`] decides
    /// (identities ARM refuses are dropped and the rest retried, as upstream
    /// retries a refused identity update without the identities ARM names),
    /// then settle the AAIs from what is really there. Returns when to try
    /// again, if needed.
    async fn resource(
        &self,
        r: &ResourceRef,
        w: &ResourceWork,
        aais: &Known<'_>,
        failed: &BTreeSet<Key>,
    ) -> Result<Option<Instant>, ApplyError> {
        if let Some(at) = self.paused(r) {
            return Ok(Some(at));
        }
        let current = match self.get(r).await {
            Ok(c) => c,
            Err((error, at)) => {
                tracing::warn!(resource = %r, %error, "reading identities");
                return Ok(Some(at));
            }
        };
        let vetted = match self.vet(r, w, &current, aais, failed).await? {
            Ok(v) => v,
            Err(at) => return Ok(Some(at)),
        };
        let mut retry_at: Option<Instant> = None;
        let split = split_quarantined(&vetted.add, &lock(&self.quarantine), Instant::now());
        if let Some(at) = split.next_probe {
            earliest(&mut retry_at, at);
        }
        let mut queue = WriteQueue::new(
            split.batch,
            split.probes,
            vetted.remove.clone(),
            self.opts.max_retry,
        );
        let current = if is_deleting(&current) {
            tracing::warn!(resource = %r, "{}", CloudError::ResourceDeleting { resource: r.clone() });
            current
        } else {
            match self.write(r, current, &mut queue, &mut retry_at).await? {
                Ok(after) => after,
                Err(at) => return Ok(Some(at)),
            }
        };
        // What really landed decides the AAIs (as upstream does after a
        // failed update).
        let owned = &vetted.owned_entries;
        let owns_now = |id: &str| owned.contains(&ledger::fingerprint(id));
        let released: BTreeSet<Key> = vetted.release.iter().cloned().collect();
        let input = SettleInput {
            current: &current,
            assign: w
                .assign_on_success
                .iter()
                .filter(|(k, _)| aais.contains_key(k) && !failed.contains(k))
                .map(|(k, id)| (k, id.as_str()))
                .collect(),
            delete: w
                .delete_on_success
                .iter()
                .filter(|(k, _)| aais.contains_key(k))
                .map(|(k, id)| (k, id.as_str()))
                .collect(),
            refused_before: &vetted.refused_before,
            refused_now: queue.refused(),
            quarantined: &split.quarantined,
            deferred: queue.deferred(),
            released: &released,
        };
        let check = |key: &Key, id: &str| {
            let aai = aais.get(key)?;
            let typed = assigned_client_id(&aai);
            guard::check(id, &typed, &current, &owns_now, &self.opts.protection)
        };
        let settled = writes::settle(&input, &check);
        if settled.last_operation_failed {
            tracing::warn!(resource = %r, "last operation failed; identities not taken as assigned");
            retry_at.get_or_insert(Instant::now() + FAILURE_RETRY);
        }
        for action in settled.actions {
            if !self.settle(action, aais).await? {
                retry_at.get_or_insert(Instant::now() + FAILURE_RETRY);
            }
        }
        // Entries of identities gone from the resource and not being added
        // leave the ledger (a removal that landed, or one done by others).
        let kept = ledger::pruned(owned, &current.user_assigned, &vetted.add);
        if kept != *owned {
            match self.write_ledger(r, kept).await {
                Err(ApplyError::NotLeader) => return Err(ApplyError::NotLeader),
                Err(error) => {
                    tracing::warn!(resource = %r, %error, "ledger not pruned; trying again later");
                    retry_at.get_or_insert(Instant::now() + FAILURE_RETRY);
                }
                Ok(()) => {}
            }
        }
        Ok(retry_at)
    }

    /// What the guard lets through on `r`, against ARM's view and the
    /// ledger: reports the AAIs it refuses and records the identities about
    /// to be added in the ledger (before the PATCH that adds them). `Err`
    /// inside says when to try again when the ledger could not be read or
    /// written.
    async fn vet(
        &self,
        r: &ResourceRef,
        w: &ResourceWork,
        current: &crate::cloud::ResourceIdentity,
        aais: &Known<'_>,
        failed: &BTreeSet<Key>,
    ) -> Result<Result<VettedWork, Instant>, ApplyError> {
        let ledger = match self.read_ledger().await {
            Ok(l) => l,
            Err(ApplyError::NotLeader) => return Err(ApplyError::NotLeader),
            Err(error) => {
                tracing::warn!(resource = %r, %error, "no ARM work without the ownership ledger");
                return Ok(Err(Instant::now() + FAILURE_RETRY));
            }
        };
        let typed: BTreeMap<Key, String> = w
            .assign_on_success
            .iter()
            .filter_map(|(k, _)| aais.get(k).map(|a| (k.clone(), assigned_client_id(&a))))
            .collect();
        let owns = |id: &str| ledger.owns(r, id);
        let mut vetted = guard::vet(w, current, &typed, &owns, &self.opts.protection);
        guard::withhold_known_cluster_identities(
            &mut vetted,
            w,
            &lock(&self.known_client_ids),
            &self.opts.protection,
        );
        for (key, refusal) in &vetted.refused {
            if let Some(aai) = aais.get(key).filter(|_| !failed.contains(key)) {
                self.refuse(&aai, refusal).await?;
            }
        }
        let mut owned_entries = ledger.entries(r);
        if !vetted.record.is_empty() {
            let entries = ledger::with_added(&owned_entries, &vetted.record);
            if let Err(error) = self.write_ledger(r, entries.clone()).await {
                if matches!(error, ApplyError::NotLeader) {
                    return Err(error);
                }
                tracing::warn!(resource = %r, %error, "ledger not written; identities not added");
                return Ok(Err(Instant::now() + FAILURE_RETRY));
            }
            owned_entries = entries;
        }
        Ok(Ok(VettedWork {
            add: vetted.add,
            remove: vetted.remove,
            release: vetted.release,
            refused_before: vetted.refused.into_iter().map(|(k, _)| k).collect(),
            owned_entries,
        }))
    }

    /// Sends the queue's PATCHes to `r` and performs its decisions; returns
    /// the resource as read after them (`current` when nothing was sent), or
    /// when to try again if that read failed.
    async fn write(
        &self,
        r: &ResourceRef,
        mut current: crate::cloud::ResourceIdentity,
        queue: &mut WriteQueue,
        retry_at: &mut Option<Instant>,
    ) -> Result<Result<crate::cloud::ResourceIdentity, Instant>, ApplyError> {
        while let Some(write) = queue.next(&current) {
            self.check_leader()?;
            if write.group.probe {
                tracing::info!(resource = %r, identity = ?write.group.add, "retrying an identity ARM refused, alone");
            }
            let step = match self.send(r, &write.patches).await {
                Sending::Landed => queue.record(&write.group, Sent::Landed),
                Sending::Deferred { at, sent_some } => {
                    earliest(retry_at, at);
                    queue.record(&write.group, Sent::Deferred { sent_some })
                }
                Sending::Failed(e) => {
                    let at = self.note_error(r, &e, true);
                    tracing::warn!(resource = %r, error = %e, "updating identities");
                    earliest(retry_at, at);
                    queue.record(&write.group, Sent::Failed(e.arm()))
                }
            };
            if !step.quarantine.is_empty() {
                let ids = &step.quarantine;
                let due = writes::quarantine(&mut lock(&self.quarantine), ids, Instant::now());
                tracing::warn!(resource = %r, identities = ?ids, retry_in = ?due.saturating_duration_since(Instant::now()), "ARM refused identities; quarantined, the rest go on without them");
                earliest(retry_at, due);
            }
            match step.next {
                Next::Continue => {}
                Next::Stop => break,
                Next::PauseAndReread => {
                    tokio::time::sleep(self.opts.retry_interval).await;
                    match self.get(r).await {
                        Ok(c) => current = c,
                        Err((_, at)) => return Ok(Err(at)),
                    }
                }
            }
        }
        // Nothing sent, nothing to read again.
        if queue.reread() {
            match self.get(r).await {
                Ok(c) => current = c,
                Err((_, at)) => return Ok(Err(at)),
            }
        }
        Ok(Ok(current))
    }

    /// Sends one group's PATCHes in order, within the mirrored write budget.
    async fn send(&self, r: &ResourceRef, patches: &[IdentityPatch]) -> Sending {
        for (i, patch) in patches.iter().enumerate() {
            if let Err(at) = self.acquire_write(r) {
                return Sending::Deferred {
                    at,
                    sent_some: i > 0,
                };
            }
            let start = std::time::Instant::now();
            let res = self.deps.cloud.update_identities(r, patch).await;
            self.deps
                .metrics
                .cloud_provider_operations_duration_seconds
                .with_label_values(&[op_label(r, true)])
                .observe(start.elapsed().as_secs_f64());
            self.observe_write(r, res.as_ref().err());
            if let Err(e) = res {
                return Sending::Failed(e);
            }
        }
        Sending::Landed
    }

    /// Performs one settle decision; `Ok(false)` when the AAI is to be
    /// tried again later.
    async fn settle(&self, action: Settle, aais: &Known<'_>) -> Result<bool, ApplyError> {
        match action {
            Settle::Assign { key, id } => {
                lock(&self.quarantine).remove(&id);
                match aais.get(&key) {
                    Some(aai) => self.mark_assigned(&aai).await,
                    None => Ok(true),
                }
            }
            Settle::Refuse { key, id, refusal } => {
                lock(&self.quarantine).remove(&id);
                if let Some(aai) = aais.get(&key) {
                    self.refuse(&aai, &refusal).await?;
                }
                Ok(true)
            }
            Settle::NotYet { key, event } => {
                if let (Some(why), Some(aai)) = (event, aais.get(&key)) {
                    self.apply_error_event(&aai, why);
                }
                Ok(false)
            }
            Settle::Delete { key } => match aais.get(&key) {
                Some(aai) => self.delete(&aai).await,
                None => Ok(true),
            },
            Settle::StillThere { .. } => Ok(false),
        }
    }

    fn apply_error_event(&self, aai: &AssignedInfo, why: &str) {
        self.binding_event(
            aai,
            true,
            events::REASON_BINDING_APPLY_ERROR,
            |b, node, pod| {
                format!("Applying binding {b} node {node} for pod {pod} resulted in error: {why}")
            },
        );
    }

    /// Publishes an Event regarding the binding `aai` embeds (none when it
    /// embeds none); `note` is given the binding's, node's and pod's names.
    fn binding_event(
        &self,
        aai: &AssignedInfo,
        warning: bool,
        reason: &str,
        note: impl FnOnce(String, &str, String) -> String,
    ) {
        if let (_, Some(binding)) = refs(aai) {
            let note = note(binding.name_any(), &aai.spec.node_name, aai.name_any());
            let regarding = events::reference(binding);
            self.deps.events.publish(warning, reason, note, regarding);
        }
    }

    /// Drift check (upstream's periodic reconcile): re-add identities of
    /// Assigned AAIs that are gone from their VMSS/VM. Adds only. `only`:
    /// these resources alone (an event-driven check, [`crate::drift`]);
    /// `None`: every resource.
    pub async fn reconcile_drift(
        &self,
        expected: &BTreeMap<ResourceRef, BTreeSet<String>>,
        index: &Index,
        only: Option<&BTreeSet<ResourceRef>>,
    ) -> Result<Outcome, ApplyError> {
        let mut outcome = Outcome::default();
        // Assigned AAIs are checked again against ARM here: the ledger, the
        // cluster's identities or an identity's client ID may have changed
        // since, and an AAI an earlier MIC (upstream's too) marked Assigned
        // was never checked at all.
        let assigned = crate::plan::assigned_by_resource(index);
        let wanted = |r: &ResourceRef| only.is_none_or(|o| o.contains(r));
        if !expected.keys().chain(assigned.keys()).any(wanted) {
            return Ok(outcome);
        }
        let ledger = match self.ledger(index).await {
            Ok(l) => l,
            Err(ApplyError::NotLeader) => return Err(ApplyError::NotLeader),
            Err(error) => {
                tracing::warn!(%error, "drift check skipped without the ownership ledger");
                outcome.retry(Instant::now() + FAILURE_RETRY);
                return Ok(outcome);
            }
        };
        let no_ids = BTreeSet::new();
        let resources: BTreeSet<&ResourceRef> = expected
            .keys()
            .chain(assigned.keys())
            .filter(|r| wanted(r))
            .collect();
        // A resource with a running job is settled by it; the next check
        // looks at it again.
        for r in resources.into_iter().filter(|r| !self.busy(r)) {
            let ids = expected.get(r).unwrap_or(&no_ids);
            let on_r = assigned.get(r).map_or(&[][..], Vec::as_slice);
            self.drift_resource(r, ids, on_r, &ledger, index, &mut outcome)
                .await?;
        }
        Ok(outcome)
    }

    /// The drift check of one resource: demotes the Assigned AAIs that fail
    /// the checks and adds the missing identities again, as
    /// [`writes::drift`] decides.
    async fn drift_resource(
        &self,
        r: &ResourceRef,
        ids: &BTreeSet<String>,
        assigned: &[(Key, String)],
        ledger: &Ledger,
        index: &Index,
        outcome: &mut Outcome,
    ) -> Result<(), ApplyError> {
        if let Some(at) = self.paused(r) {
            outcome.retry(at);
            return Ok(());
        }
        let current = match self.get(r).await {
            Ok(c) => c,
            Err((_, at)) => {
                outcome.retry(at);
                return Ok(());
            }
        };
        let on_r: Vec<(&Key, &str)> = assigned
            .iter()
            .filter(|(key, _)| index.assigned.contains_key(key))
            .map(|(key, id)| (key, id.as_str()))
            .collect();
        let owns = |i: &str| ledger.owns(r, i);
        let check = |key: &Key, id: &str| {
            let aai = index.assigned.get(key)?;
            let typed = assigned_client_id(aai);
            guard::check(id, &typed, &current, &owns, &self.opts.protection)
        };
        let drift = writes::drift(ids, &on_r, &current, &check);
        for (key, refusal) in &drift.demote {
            let Some(aai) = index.assigned.get(key) else {
                continue;
            };
            tracing::warn!(aai = %format!("{}/{}", key.0, key.1), reason = refusal.reason(), "an Assigned AzureAssignedIdentity fails the entitlement checks; back to Created");
            match self.patch_status(aai, AssignedIdentityState::Created).await {
                Err(ApplyError::NotLeader) => return Err(ApplyError::NotLeader),
                Err(error) => {
                    tracing::warn!(%error, "demoting");
                    outcome.retry(Instant::now() + FAILURE_RETRY);
                }
                Ok(()) => self.refuse(aai, refusal).await?,
            }
        }
        let missing = drift.readd;
        if missing.is_empty() {
            return Ok(());
        }
        tracing::info!(resource = %r, missing = ?missing, "re-adding identities removed from the resource");
        // Recorded before the PATCH, as any add.
        let old = ledger.entries(r);
        let entries = ledger::with_added(&old, &missing);
        if entries != old
            && let Err(error) = self.write_ledger(r, entries).await
        {
            if matches!(error, ApplyError::NotLeader) {
                return Err(error);
            }
            tracing::warn!(resource = %r, %error, "ledger not written; identities not re-added");
            outcome.retry(Instant::now() + FAILURE_RETRY);
            return Ok(());
        }
        for patch in identity_patches(&current, &missing, &BTreeSet::new()) {
            self.check_leader()?;
            if let Err(at) = self.acquire_write(r) {
                outcome.retry(at);
                break;
            }
            let res = self.deps.cloud.update_identities(r, &patch).await;
            self.observe_write(r, res.as_ref().err());
            if let Err(e) = res {
                outcome.retry(self.note_error(r, &e, true));
                tracing::warn!(resource = %r, error = %e, "re-adding identities");
                break;
            }
        }
        Ok(())
    }

    /// Writes each of `aais` (as `write` says), at most `--createDeleteBatch`
    /// at a time.
    async fn write_aais(
        &self,
        aais: Vec<PlannedAai>,
        write: AaiWrite,
    ) -> Vec<Result<Written, (Key, ApplyError)>> {
        // Each write's future is made when a place in the batch frees up:
        // a future per AAI made up front would hold thousands at once. (A
        // lazy `map` over a stream held across an await makes the cycle's
        // future lose `Send`: higher-ranked closure; this loop has none.)
        let batch = self.opts.batch.max(1);
        let mut out = Vec::with_capacity(aais.len());
        let mut waiting = aais.into_iter();
        let mut running = futures::stream::FuturesUnordered::new();
        for aai in waiting.by_ref().take(batch) {
            running.push(self.write_aai(aai, write));
        }
        while let Some(result) = running.next().await {
            out.push(result);
            if let Some(aai) = waiting.next() {
                running.push(self.write_aai(aai, write));
            }
        }
        out
    }

    /// Creates or replaces `aai` (as `write` says), with its metrics; a
    /// failed create is also reported on the binding.
    async fn write_aai(
        &self,
        planned: PlannedAai,
        write: AaiWrite,
    ) -> Result<Written, (Key, ApplyError)> {
        let key = planned.key.clone();
        self.check_leader().map_err(|e| (key.clone(), e))?;
        // Built as it is written: at most a batch of them at a time.
        let aai = planned.aai();
        let start = std::time::Instant::now();
        let api = self.api(&key.0);
        let (res, count, duration, op) = match write {
            AaiWrite::Create => (
                api.create(&PostParams::default(), &aai).await,
                &self.deps.metrics.assigned_identity_addition_count,
                &self
                    .deps
                    .metrics
                    .assigned_identity_addition_duration_seconds,
                metrics::OP_AAI_ADDITION,
            ),
            AaiWrite::Update => (
                api.replace(&key.1, &PostParams::default(), &aai).await,
                &self.deps.metrics.assigned_identity_update_count,
                &self.deps.metrics.assigned_identity_update_duration_seconds,
                metrics::OP_AAI_UPDATE,
            ),
        };
        let source = match res {
            Ok(written) => {
                count.inc();
                duration.observe(start.elapsed().as_secs_f64());
                let kept = planned.kept(
                    written.metadata.uid.clone(),
                    written.metadata.resource_version.clone(),
                );
                let replaced = match write {
                    AaiWrite::Create => Replaced::Nothing,
                    AaiWrite::Update => Replaced::Version(aai.metadata.resource_version.as_deref()),
                };
                self.deps.shared.own_write(kept, replaced);
                return Ok(Written {
                    planned,
                    uid: written.metadata.uid,
                    resource_version: written.metadata.resource_version,
                });
            }
            Err(source) => source,
        };
        // A create that finds the AAI there is no failure: the watch had
        // not shown it yet; the next cycle sees it.
        let already_there =
            write == AaiWrite::Create && matches!(&source, kube::Error::Api(s) if s.code == 409);
        if !already_there {
            self.deps
                .metrics
                .kubernetes_api_operations_errors_count
                .with_label_values(&[op])
                .inc();
            if let (AaiWrite::Create, Some(binding)) =
                (write, aai.spec.azure_binding_ref.as_deref())
            {
                self.deps.events.publish(
                    true,
                    events::REASON_BINDING_APPLY_ERROR,
                    format!("Creating AzureAssignedIdentity {}: {source}", key.1),
                    events::reference(binding),
                );
            }
        }
        let (ns, name) = key.clone();
        let error = match write {
            AaiWrite::Create => ApplyError::CreateAssignedIdentity { ns, name, source },
            AaiWrite::Update => ApplyError::UpdateAssignedIdentity { ns, name, source },
        };
        Err((key, error))
    }

    /// JSON patch of `/status/status` on the main resource (the CRD has no
    /// status subresource, so the status is written like any other field).
    async fn patch_status(
        &self,
        aai: &AssignedInfo,
        state: AssignedIdentityState,
    ) -> Result<(), ApplyError> {
        self.check_leader()?;
        let (ns, name) = crate::index::key(aai);
        let mut ops = if aai.status.is_some() {
            json!([{"op": "replace", "path": "/status/status", "value": state.as_str()}])
        } else {
            json!([{"op": "add", "path": "/status", "value": {"status": state.as_str(), "availableReplicas": 1}}])
        };
        // The assignment went through: the earlier refusal no longer holds.
        if state == AssignedIdentityState::Assigned
            && aai.annotations().contains_key(ANNOTATION_ASSIGNMENT_ERROR)
            && let Some(list) = ops.as_array_mut()
        {
            list.push(json!({"op": "remove", "path": format!("/metadata/annotations/{}", ANNOTATION_ASSIGNMENT_ERROR.replace('~', "~0").replace('/', "~1"))}));
        }
        let patch: json_patch::Patch =
            serde_json::from_value(ops).map_err(|e| ApplyError::PatchAssignedIdentityStatus {
                ns: ns.clone(),
                name: name.clone(),
                source: kube::Error::SerdeError(e),
            })?;
        let res = self
            .api(&ns)
            .patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await;
        match res {
            Ok(answer) => {
                self.deps.shared.own_answer(
                    &answer,
                    Replaced::Version(aai.metadata.resource_version.as_deref()),
                );
                Ok(())
            }
            Err(source) => {
                self.deps
                    .metrics
                    .kubernetes_api_operations_errors_count
                    .with_label_values(&[metrics::OP_AAI_STATUS])
                    .inc();
                self.deps.events.publish(
                    true,
                    events::REASON_STATUS_UPDATE_ERROR,
                    format!("Updating assigned identity {name} status to {state} failed: {source}"),
                    events::reference(aai),
                );
                Err(ApplyError::PatchAssignedIdentityStatus { ns, name, source })
            }
        }
    }

    /// Marks the AAI Assigned; `Ok(false)` when the apiserver did not take
    /// the write (reported; the caller tries again later).
    async fn mark_assigned(&self, aai: &AssignedInfo) -> Result<bool, ApplyError> {
        match self
            .patch_status(aai, AssignedIdentityState::Assigned)
            .await
        {
            Ok(()) => {
                lock(&self.refusals).remove(&crate::index::key(aai));
                self.binding_event(
                    aai,
                    false,
                    events::REASON_BINDING_APPLIED,
                    |b, node, pod| format!("Binding {b} applied on node {node} for pod {pod}"),
                );
                Ok(true)
            }
            Err(ApplyError::NotLeader) => Err(ApplyError::NotLeader),
            Err(error) => {
                tracing::warn!(%error, "marking Assigned");
                Ok(false)
            }
        }
    }

    /// Unassigned, DELETE, then drop MIC's finalizer (it keeps the AAI until
    /// its identity is off the node); `Ok(false)` when the apiserver did not
    /// take it (reported; the caller tries again later).
    async fn delete(&self, aai: &AssignedInfo) -> Result<bool, ApplyError> {
        Ok(self.try_delete(aai).await?.is_ok())
    }

    /// [`Executor::delete`] with the reason of a failure.
    async fn try_delete(&self, aai: &AssignedInfo) -> Result<Result<(), String>, ApplyError> {
        self.check_leader()?;
        let (ns, name) = crate::index::key(aai);
        let api = self.api(&ns);
        let start = std::time::Instant::now();
        if aai.metadata.deletion_timestamp.is_none() {
            if aai.status.is_some() && aai.state() != Some(AssignedIdentityState::Unassigned) {
                match self
                    .patch_status(aai, AssignedIdentityState::Unassigned)
                    .await
                {
                    Err(ApplyError::NotLeader) => return Err(ApplyError::NotLeader),
                    Err(error) => tracing::debug!(%error, "marking Unassigned"),
                    Ok(()) => {}
                }
            }
            self.check_leader()?;
            if let Err(source) = api.delete(&name, &DeleteParams::default()).await
                && !is_not_found(&source)
            {
                return Ok(Err(self.deletion_failed(ns, name, source, "delete failed")));
            }
        }
        let finalizers: Vec<String> = aai
            .finalizers()
            .iter()
            .filter(|f| *f != ASSIGNED_IDENTITY_FINALIZER)
            .cloned()
            .collect();
        if finalizers.len() != aai.finalizers().len() {
            self.check_leader()?;
            let patch = json!({"metadata": {"finalizers": if finalizers.is_empty() { serde_json::Value::Null } else { json!(finalizers) }}});
            if let Err(source) = api
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                && !is_not_found(&source)
            {
                return Ok(Err(self.deletion_failed(
                    ns,
                    name,
                    source,
                    "removing the finalizer failed",
                )));
            }
        }
        self.deps.metrics.assigned_identity_deletion_count.inc();
        self.deps
            .metrics
            .assigned_identity_deletion_duration_seconds
            .observe(start.elapsed().as_secs_f64());
        Ok(Ok(()))
    }

    /// Counts and logs a failed step (`what`) of deleting `ns/name`; the
    /// apiserver's error.
    fn deletion_failed(&self, ns: String, name: String, source: kube::Error, what: &str) -> String {
        self.deps
            .metrics
            .kubernetes_api_operations_errors_count
            .with_label_values(&[metrics::OP_AAI_DELETION])
            .inc();
        let message = source.to_string();
        tracing::warn!(error = %ApplyError::DeleteAssignedIdentity { ns, name, source }, "{what}");
        message
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> Key {
        ("ns".into(), n.into())
    }

    #[test]
    fn work_waits_only_for_the_job_on_its_own_resource() {
        use Route::{Held, Now};
        let (a, b) = (ResourceRef::vmss("a"), ResourceRef::vmss("b"));
        let mut f = InFlight::default();
        // A job starts on scale set A, settling AAI 1.
        assert_eq!(f.route_resource(&a, [key("1")].into()), Now);
        // While it runs: B gets its own job; more work for A waits, and so do
        // writes of the AAI A's job settles; other AAIs are written at once.
        let cases: Vec<(&str, Route)> = vec![
            ("b's work", f.route_resource(&b, [key("2")].into())),
            ("a's work", f.route_resource(&a, [key("3")].into())),
            ("AAI 1 (a's job)", f.route_key(&key("1"))),
            ("AAI 2 (b's job)", f.route_key(&key("2"))),
            ("AAI 4 (no job)", f.route_key(&key("4"))),
        ];
        let want = [Now, Held, Held, Held, Now];
        for ((case, got), want) in cases.into_iter().zip(want) {
            assert_eq!(got, want, "{case}");
        }
        // A's job ends: work was held for it, so a cycle plans again; the
        // held work went nowhere else (A's next job takes it).
        assert!(f.finish(&a));
        assert_eq!(f.route_resource(&a, [key("3")].into()), Now);
        assert!(!f.finish(&a), "nothing held since");
        // B's job ends: its AAI's write was held for it.
        assert!(f.finish(&b));
        assert!(f.jobs.is_empty() && f.held.is_empty());
    }
}
