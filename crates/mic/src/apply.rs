//! Carries out a [`Plan`]: Kubernetes writes of AzureAssignedIdentities
//! (AAIs), then one GET + PATCH(es) per VMSS/VM, then the status writes that
//! depend on what landed (upstream's order, research/aad-pod-identity.md §2.5
//! step 6). Every write first checks that this replica still leads.

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

use crate::cloud::{ArmError, Cloud, CloudError, ResourceKind, ResourceRef, identity_patches};
use crate::events::{self, Events};
use crate::guard::{self, Protection};
use crate::index::{Index, Key};
use crate::ledger::{self, Ledger};
use crate::metrics::{self, Metrics};
use crate::plan::{Plan, ResourceWork, Warning, assigned_client_id, refs};
use crate::schedule::Budget;

/// Back-off for an identity ARM refused (beyond upstream, #1139): it leaves
/// the batch until then and never holds back the others.
const QUARANTINE_FIRST: Duration = Duration::from_secs(5);
const QUARANTINE_MAX: Duration = Duration::from_secs(300);
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
        self.retry_at = Some(self.retry_at.map_or(at, |t| t.min(at)));
    }
}

pub struct Executor<C: Cloud> {
    client: Client,
    cloud: Arc<C>,
    events: Events,
    metrics: Metrics,
    leading: watch::Receiver<bool>,
    opts: ExecutorOptions,
    /// Retry-After per resource: a throttled scale set pauses alone (fixes H8).
    not_before: Mutex<BTreeMap<ResourceRef, Instant>>,
    /// Identity ID → (retry time, failures).
    quarantine: Mutex<BTreeMap<String, (Instant, u32)>>,
    /// Warnings already reported, so each is logged once.
    reported: Mutex<BTreeSet<String>>,
    /// Local mirror of Compute's write buckets (beyond upstream, #1267).
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
    pub fn new(
        client: Client,
        cloud: Arc<C>,
        events: Events,
        metrics: Metrics,
        leading: watch::Receiver<bool>,
        opts: ExecutorOptions,
    ) -> Self {
        Executor {
            client,
            cloud,
            events,
            metrics,
            leading,
            not_before: Mutex::default(),
            quarantine: Mutex::default(),
            reported: Mutex::default(),
            budget: Mutex::new(Budget::new(opts.limits)),
            origin: Instant::now(),
            ledger: tokio::sync::Mutex::new(None),
            refusals: Mutex::default(),
            known_client_ids: Mutex::default(),
            opts,
        }
    }

    /// Drops the cached ledger: the next term reads it afresh.
    pub async fn forget_ledger(&self) {
        *self.ledger.lock().await = None;
    }

    fn ledger_api(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.opts.ledger_namespace)
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
    async fn refuse(
        &self,
        aai: &AzureAssignedIdentity,
        refusal: &guard::Refusal,
    ) -> Result<(), ApplyError> {
        let key = crate::index::key(aai);
        let message = refusal.message();
        let first =
            lock(&self.refusals).insert(key.clone(), message.clone()) != Some(message.clone());
        if first {
            tracing::warn!(aai = %format!("{}/{}", key.0, key.1), reason = refusal.reason(), "{message}");
            self.metrics
                .identity_refused_count
                .with_label_values(&[refusal.reason()])
                .inc();
            if let (Some(identity), _) = refs(aai) {
                self.events.publish(
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
            if let Err(error) = self
                .api(&key.0)
                .patch(&key.1, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                tracing::warn!(aai = %format!("{}/{}", key.0, key.1), %error, "annotating a refused AzureAssignedIdentity");
                // Reported again next time, with the annotation.
                lock(&self.refusals).remove(&key);
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
            self.metrics.mic_arm_writes_deferred_count.inc();
            Instant::now() + wait
        })
    }

    /// Feeds what ARM said about its buckets back into the mirror.
    fn observe_write(&self, r: &ResourceRef, error: Option<&CloudError>) {
        let now = self.budget_now();
        let mut budget = lock(&self.budget);
        if let Some(header) = self.cloud.take_remaining(r) {
            budget.observe_remaining(r, &header, now);
        }
        if let Some(n) = self.cloud.take_remaining_subscription_writes() {
            budget.observe_subscription_writes(n, now);
        }
        if let Some(after) = error.and_then(CloudError::retry_after) {
            budget.observe_retry_after(r, after, now);
        }
    }

    fn check_leader(&self) -> Result<(), ApplyError> {
        if *self.leading.borrow() {
            Ok(())
        } else {
            Err(ApplyError::NotLeader)
        }
    }

    fn api(&self, ns: &str) -> Api<AzureAssignedIdentity> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// Logs and reports each plan warning once.
    pub fn report_warnings(&self, warnings: &[Warning], index: &Index) {
        let mut reported = lock(&self.reported);
        for w in warnings {
            if !reported.insert(format!("{w:?}")) {
                continue;
            }
            tracing::warn!(warning = ?w, "ignoring");
            let (note, reference) = match w {
                Warning::IdentityNotFound { binding, identity } => (
                    format!("identity {}/{} not found", identity.0, identity.1),
                    index.bindings.get(binding).map(events::reference),
                ),
                Warning::InvalidResourceId {
                    identity,
                    resource_id,
                } => (
                    format!("invalid resource id {resource_id:?}"),
                    index.identities.get(identity).map(events::reference),
                ),
                Warning::UnknownIdentityType { identity, value } => (
                    format!("unsupported identity type {value}"),
                    index.identities.get(identity).map(events::reference),
                ),
                Warning::DuplicateAssignedIdentity { name, binding } => (
                    format!(
                        "AzureAssignedIdentity {}/{} already made from another binding",
                        name.0, name.1
                    ),
                    index.bindings.get(binding).map(events::reference),
                ),
                Warning::NamespaceMismatch { binding, pod } => (
                    format!(
                        "namespaced identity cannot be used by pod {}/{}",
                        pod.0, pod.1
                    ),
                    index.bindings.get(binding).map(events::reference),
                ),
                Warning::IdentityNotGranted {
                    identity,
                    namespace,
                    resource_id,
                    enforced,
                } => {
                    self.metrics
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
                        index.identities.get(identity).map(events::reference),
                    )
                }
            };
            let reason = match w {
                Warning::IdentityNotGranted { .. } => events::REASON_IDENTITY_NOT_GRANTED,
                _ => events::REASON_INVALID_OBJECT,
            };
            if let Some(r) = reference {
                self.events.publish(true, reason, note, r);
            }
        }
    }

    /// Runs the plan. Errors of single objects are reported and retried by a
    /// later cycle; only losing the lease stops it early.
    pub async fn execute(&self, plan: &Plan, index: &Index) -> Result<Outcome, ApplyError> {
        let mut outcome = Outcome::default();
        self.report_warnings(&plan.warnings, index);
        let mut aais: BTreeMap<Key, AzureAssignedIdentity> = index.assigned.clone();
        let mut failed: BTreeSet<Key> = BTreeSet::new();

        // 1. Kubernetes writes first, bounded by --createDeleteBatch.
        // Futures are collected first: a lazy `map` held across an await
        // makes the cycle's future lose `Send` (higher-ranked closure).
        let mut creates = Vec::with_capacity(plan.create.len());
        for aai in &plan.create {
            creates.push(self.create(aai));
        }
        let creates = futures::stream::iter(creates)
            .buffer_unordered(self.opts.batch.max(1))
            .collect::<Vec<_>>()
            .await;
        let mut updates = Vec::with_capacity(plan.update.len());
        for aai in &plan.update {
            updates.push(self.update(aai));
        }
        let updates = futures::stream::iter(updates)
            .buffer_unordered(self.opts.batch.max(1))
            .collect::<Vec<_>>()
            .await;
        for r in creates.into_iter().chain(updates) {
            match r {
                Ok(aai) => {
                    aais.insert(crate::index::key(&aai), aai);
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
        for key in &plan.assign_now {
            if let Some(aai) = aais.get(key).filter(|_| !failed.contains(key))
                && !self.mark_assigned(aai).await?
            {
                outcome.retry(Instant::now() + FAILURE_RETRY);
            }
        }
        for key in &plan.delete_now {
            if let Some(aai) = aais.get(key)
                && !self.delete(aai).await?
            {
                outcome.retry(Instant::now() + FAILURE_RETRY);
            }
        }

        // 3. One task per resource, all at once; each does one GET and its PATCHes.
        let mut work = Vec::with_capacity(plan.resources.len());
        for (r, w) in &plan.resources {
            work.push(self.resource_task(r, w, &aais, &failed, index));
        }
        let results = futures::future::join_all(work).await;
        for (r, res) in results {
            match res {
                Ok(Some(at)) => outcome.retry(at),
                Ok(None) => {}
                Err(ApplyError::NotLeader) => return Err(ApplyError::NotLeader),
                Err(error) => {
                    tracing::warn!(resource = %r, %error, "resource work failed");
                    outcome.retry(Instant::now() + FAILURE_RETRY);
                }
            }
        }
        Ok(outcome)
    }

    async fn resource_task<'a>(
        &'a self,
        r: &'a ResourceRef,
        w: &'a ResourceWork,
        aais: &'a BTreeMap<Key, AzureAssignedIdentity>,
        failed: &'a BTreeSet<Key>,
        index: &'a Index,
    ) -> (&'a ResourceRef, Result<Option<Instant>, ApplyError>) {
        (r, self.resource(r, w, aais, failed, index).await)
    }

    /// Whether a resource is paused by Retry-After; returns the resume time.
    fn paused(&self, r: &ResourceRef) -> Option<Instant> {
        lock(&self.not_before)
            .get(r)
            .copied()
            .filter(|t| *t > Instant::now())
    }

    fn note_error(&self, r: &ResourceRef, e: &CloudError, update: bool) -> Instant {
        self.metrics
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
        let res = self.cloud.get_identities(r).await;
        if let Ok(current) = &res {
            let mut known = lock(&self.known_client_ids);
            for (id, a) in &current.reported {
                if !a.client_id.is_empty() {
                    known.insert(id.clone(), a.client_id.clone());
                }
            }
        }
        // A GET answer may carry the resource's bucket counts too.
        if let Some(header) = self.cloud.take_remaining(r) {
            let now = self.budget_now();
            lock(&self.budget).observe_remaining(r, &header, now);
        }
        self.metrics
            .cloud_provider_operations_duration_seconds
            .with_label_values(&[op_label(r, false)])
            .observe(start.elapsed().as_secs_f64());
        res.map_err(|e| {
            let at = self.note_error(r, &e, false);
            (e, at)
        })
    }

    fn quarantine(&self, ids: &BTreeSet<String>) -> Instant {
        let mut q = lock(&self.quarantine);
        let mut earliest = Instant::now() + QUARANTINE_MAX;
        for id in ids {
            let failures = q.get(id).map_or(0, |(_, n)| *n) + 1;
            let wait = QUARANTINE_FIRST
                .saturating_mul(1 << failures.min(6).saturating_sub(1))
                .min(QUARANTINE_MAX);
            let at = Instant::now() + wait;
            earliest = earliest.min(at);
            q.insert(id.clone(), (at, failures));
        }
        earliest
    }

    /// One VMSS/VM: GET, PATCH the delta (dropping identities ARM refuses and
    /// retrying the rest, as upstream's UpdateUserMSI retry, §2.3), then settle
    /// the AAIs from what is really there. Returns when to try again, if needed.
    async fn resource(
        &self,
        r: &ResourceRef,
        w: &ResourceWork,
        aais: &BTreeMap<Key, AzureAssignedIdentity>,
        failed: &BTreeSet<Key>,
        index: &Index,
    ) -> Result<Option<Instant>, ApplyError> {
        if let Some(at) = self.paused(r) {
            return Ok(Some(at));
        }
        let mut retry_at: Option<Instant> = None;
        let mut current = match self.get(r).await {
            Ok(c) => c,
            Err((error, at)) => {
                tracing::warn!(resource = %r, %error, "reading identities");
                return Ok(Some(at));
            }
        };
        // An identity ARM refused stays out of the batch until a PATCH of its
        // own lands; once its back-off is over it is retried alone, after
        // the batch (beyond upstream, #1139). Wall-clock back-off alone is
        // not enough: when the write budget spaces PATCHes further apart than
        // the back-off, the refused identity would ride again with the
        // others and hold them back.
        // What the guard lets through, against ARM's view and the ledger.
        let ledger = match self.ledger(index).await {
            Ok(l) => l,
            Err(ApplyError::NotLeader) => return Err(ApplyError::NotLeader),
            Err(error) => {
                tracing::warn!(resource = %r, %error, "no ARM work without the ownership ledger");
                return Ok(Some(Instant::now() + FAILURE_RETRY));
            }
        };
        let typed: BTreeMap<Key, String> = w
            .assign_on_success
            .iter()
            .filter_map(|(k, _)| aais.get(k).map(|a| (k.clone(), assigned_client_id(a))))
            .collect();
        let mut vetted = guard::vet(
            w,
            &current,
            &typed,
            &|id| ledger.owns(r, id),
            &self.opts.protection,
        );
        guard::withhold_known_cluster_identities(
            &mut vetted,
            w,
            &lock(&self.known_client_ids),
            &self.opts.protection,
        );
        let refused_before: BTreeSet<Key> = vetted.refused.iter().map(|(k, _)| k.clone()).collect();
        for (key, refusal) in &vetted.refused {
            if let Some(aai) = aais.get(key).filter(|_| !failed.contains(key)) {
                self.refuse(aai, refusal).await?;
            }
        }
        let mut owned_entries = ledger.entries(r);
        if !vetted.record.is_empty() {
            // The entry goes in before the PATCH that adds the identity.
            let entries = ledger::with_added(&owned_entries, &vetted.record);
            if let Err(error) = self.write_ledger(r, entries.clone()).await {
                if matches!(error, ApplyError::NotLeader) {
                    return Err(error);
                }
                tracing::warn!(resource = %r, %error, "ledger not written; identities not added");
                return Ok(Some(Instant::now() + FAILURE_RETRY));
            }
            owned_entries = entries;
        }
        let owns_now = |id: &str| owned_entries.contains(&ledger::fingerprint(id));
        let split = split_quarantined(&vetted.add, &lock(&self.quarantine), Instant::now());
        let quarantined = split.quarantined;
        if let Some(at) = split.next_probe {
            retry_at = Some(retry_at.map_or(at, |t| t.min(at)));
        }
        let remove = vetted.remove.clone();
        let mut refused: BTreeSet<String> = BTreeSet::new();
        let mut deferred = false;
        let mut wrote = false;
        if current.provisioning_state.eq_ignore_ascii_case("Deleting") {
            // §9 statement 22: never PATCH a resource being deleted.
            tracing::warn!(resource = %r, "{}", CloudError::ResourceDeleting { resource: r.clone() });
        } else {
            // Work queue of add groups: the batch first (carrying the
            // removes), then each due quarantined identity alone. A group ARM
            // refuses loses the identities the error names; a refusal naming
            // none is split in halves until the culprit stands alone.
            let mut groups: std::collections::VecDeque<Group> = std::collections::VecDeque::new();
            groups.push_back(Group {
                add: split.batch,
                removes: true,
                probe: false,
            });
            for id in split.probes {
                groups.push_back(Group {
                    add: BTreeSet::from([id]),
                    removes: false,
                    probe: true,
                });
            }
            let mut failures = 0u32;
            let no_removes = BTreeSet::new();
            'groups: while let Some(group) = groups.pop_front() {
                let remove_now = if group.removes { &remove } else { &no_removes };
                let patches =
                    identity_patches(&patch_basis(&current, &group.add), &group.add, remove_now);
                if patches.is_empty() {
                    continue;
                }
                self.check_leader()?;
                if group.probe {
                    tracing::info!(resource = %r, identity = ?group.add, "retrying an identity ARM refused, alone");
                }
                let mut error = None;
                for patch in &patches {
                    // Within the mirrored budget only; what waits is folded
                    // into the next PATCH of this resource.
                    if let Err(at) = self.acquire_write(r) {
                        retry_at = Some(retry_at.map_or(at, |t| t.min(at)));
                        deferred = true;
                        break 'groups;
                    }
                    let start = std::time::Instant::now();
                    let res = self.cloud.update_identities(r, patch).await;
                    wrote = true;
                    self.metrics
                        .cloud_provider_operations_duration_seconds
                        .with_label_values(&[op_label(r, true)])
                        .observe(start.elapsed().as_secs_f64());
                    self.observe_write(r, res.as_ref().err());
                    if let Err(e) = res {
                        error = Some(e);
                        break;
                    }
                }
                let Some(e) = error else {
                    continue;
                };
                let at = self.note_error(r, &e, true);
                tracing::warn!(resource = %r, error = %e, "updating identities");
                retry_at = Some(retry_at.map_or(at, |t| t.min(at)));
                let decision = on_refusal(&group.add, e.arm());
                if let Refusal::Quarantine(ids) = &decision {
                    // Taken out whatever the retry budget says: the next PATCH
                    // of this resource goes without them.
                    let due = self.quarantine(ids);
                    tracing::warn!(resource = %r, identities = ?ids, retry_in = ?due.saturating_duration_since(Instant::now()), "ARM refused identities; quarantined, the rest go on without them");
                    retry_at = Some(due.min(retry_at.unwrap_or(at)));
                    refused.extend(ids.iter().cloned());
                }
                failures += 1;
                // Upstream's retry bound (--update-user-msi-max-retry), plus
                // the halvings a refusal that names no identity needs.
                let bound = self.opts.max_retry + bisect_steps(group.add.len());
                if failures > bound {
                    break;
                }
                match decision {
                    Refusal::Stop => break,
                    Refusal::Quarantine(ids) => {
                        let rest: BTreeSet<String> = group.add.difference(&ids).cloned().collect();
                        if group.probe || (rest.is_empty() && !group.removes) {
                            continue;
                        }
                        groups.push_front(Group {
                            add: rest,
                            removes: group.removes,
                            probe: false,
                        });
                    }
                    Refusal::Split(first, second) => {
                        groups.push_front(Group {
                            add: second,
                            removes: false,
                            probe: false,
                        });
                        groups.push_front(Group {
                            add: first,
                            removes: group.removes,
                            probe: false,
                        });
                    }
                }
                tokio::time::sleep(self.opts.retry_interval).await;
                match self.get(r).await {
                    Ok(c) => current = c,
                    Err((_, at)) => return Ok(Some(at)),
                }
            }
            // What really landed decides the AAIs (upstream's error path, §2.5
            // step 6d); nothing sent, nothing to read again.
            if wrote {
                match self.get(r).await {
                    Ok(c) => current = c,
                    Err((_, at)) => return Ok(Some(at)),
                }
            }
        }
        // The last operation failed: the model may list identities the
        // instances never got, so nothing counts as landed until a PATCH
        // succeeds (the next cycle re-sends the adds).
        let landed_failed = is_failed(&current);
        if landed_failed {
            tracing::warn!(resource = %r, "last operation failed; identities not taken as assigned");
            retry_at.get_or_insert(Instant::now() + FAILURE_RETRY);
        }
        for (key, id) in &w.assign_on_success {
            let Some(aai) = aais.get(key).filter(|_| !failed.contains(key)) else {
                continue;
            };
            if landed_failed || refused_before.contains(key) {
                continue;
            }
            if current.user_assigned.contains(id) {
                lock(&self.quarantine).remove(id);
                // Landed: now ARM says whose identity it is.
                if let Some(refusal) = guard::check(
                    id,
                    &assigned_client_id(aai),
                    &current,
                    &owns_now,
                    &self.opts.protection,
                ) {
                    self.refuse(aai, &refusal).await?;
                    continue;
                }
                if !self.mark_assigned(aai).await? {
                    retry_at.get_or_insert(Instant::now() + FAILURE_RETRY);
                }
            } else {
                let why = if refused.contains(id) || quarantined.contains(id) {
                    "Azure refused the identity; retrying with back-off"
                } else {
                    "identity not yet on the node"
                };
                // A PATCH held back by the budget is no error.
                if !deferred || refused.contains(id) || quarantined.contains(id) {
                    self.apply_error_event(aai, why);
                }
                retry_at.get_or_insert(Instant::now() + FAILURE_RETRY);
            }
        }
        let released: BTreeSet<&Key> = vetted.release.iter().collect();
        for (key, id) in &w.delete_on_success {
            let Some(aai) = aais.get(key) else { continue };
            // A protected or pre-existing identity stays; its AAI goes.
            let stays = released.contains(key);
            if (current.user_assigned.contains(id) && !stays) || !self.delete(aai).await? {
                retry_at.get_or_insert(Instant::now() + FAILURE_RETRY);
            }
        }
        // Entries of identities gone from the resource and not being added
        // leave the ledger (a removal that landed, or one done by others).
        let kept = ledger::pruned(&owned_entries, &current.user_assigned, &vetted.add);
        if kept != owned_entries {
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

    fn apply_error_event(&self, aai: &AzureAssignedIdentity, why: &str) {
        if let (_, Some(binding)) = refs(aai) {
            self.events.publish(
                true,
                events::REASON_BINDING_APPLY_ERROR,
                format!(
                    "Applying binding {} node {} for pod {} resulted in error: {why}",
                    binding.name_any(),
                    aai.spec.node_name,
                    aai.name_any()
                ),
                events::reference(binding),
            );
        }
    }

    /// Drift check (§2.7): re-add identities of Assigned AAIs that are gone
    /// from their VMSS/VM. Adds only.
    pub async fn reconcile_drift(
        &self,
        expected: &BTreeMap<ResourceRef, BTreeSet<String>>,
        index: &Index,
    ) -> Result<Outcome, ApplyError> {
        let mut outcome = Outcome::default();
        // Assigned AAIs are checked again against ARM here: the ledger, the
        // cluster's identities or an identity's client ID may have changed
        // since, and an AAI an earlier MIC (upstream's too) marked Assigned
        // was never checked at all.
        let assigned = crate::plan::assigned_by_resource(index);
        if expected.is_empty() && assigned.is_empty() {
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
        let resources: BTreeSet<&ResourceRef> = expected.keys().chain(assigned.keys()).collect();
        for r in resources {
            let ids = expected.get(r).unwrap_or(&no_ids);
            if let Some(at) = self.paused(r) {
                outcome.retry(at);
                continue;
            }
            let current = match self.get(r).await {
                Ok(c) => c,
                Err((_, at)) => {
                    outcome.retry(at);
                    continue;
                }
            };
            let mut demoted: BTreeSet<String> = BTreeSet::new();
            for (key, id) in assigned.get(r).into_iter().flatten() {
                let Some(aai) = index.assigned.get(key) else {
                    continue;
                };
                let owns = |i: &str| ledger.owns(r, i);
                if let Some(refusal) = guard::check(
                    id,
                    &assigned_client_id(aai),
                    &current,
                    &owns,
                    &self.opts.protection,
                ) {
                    demoted.insert(id.clone());
                    tracing::warn!(aai = %format!("{}/{}", key.0, key.1), reason = refusal.reason(), "an Assigned AzureAssignedIdentity fails the entitlement checks; back to Created");
                    match self.patch_status(aai, AssignedIdentityState::Created).await {
                        Err(ApplyError::NotLeader) => return Err(ApplyError::NotLeader),
                        Err(error) => {
                            tracing::warn!(%error, "demoting");
                            outcome.retry(Instant::now() + FAILURE_RETRY);
                        }
                        Ok(()) => self.refuse(aai, &refusal).await?,
                    }
                }
            }
            let missing: BTreeSet<String> = ids
                .difference(&current.user_assigned)
                .filter(|id| !demoted.contains(*id))
                .cloned()
                .collect();
            if missing.is_empty() || current.provisioning_state.eq_ignore_ascii_case("Deleting") {
                continue;
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
                continue;
            }
            for patch in identity_patches(&current, &missing, &BTreeSet::new()) {
                self.check_leader()?;
                if let Err(at) = self.acquire_write(r) {
                    outcome.retry(at);
                    break;
                }
                let res = self.cloud.update_identities(r, &patch).await;
                self.observe_write(r, res.as_ref().err());
                if let Err(e) = res {
                    outcome.retry(self.note_error(r, &e, true));
                    tracing::warn!(resource = %r, error = %e, "re-adding identities");
                    break;
                }
            }
        }
        Ok(outcome)
    }

    async fn create(
        &self,
        aai: &AzureAssignedIdentity,
    ) -> Result<AzureAssignedIdentity, (Key, ApplyError)> {
        let key = crate::index::key(aai);
        self.check_leader().map_err(|e| (key.clone(), e))?;
        let start = std::time::Instant::now();
        let res = self.api(&key.0).create(&PostParams::default(), aai).await;
        match res {
            Ok(mut created) => {
                // Kept for this cycle only; MIC never reads managedFields
                // (see `watch::slim`).
                created.metadata.managed_fields = None;
                self.metrics.assigned_identity_addition_count.inc();
                self.metrics
                    .assigned_identity_addition_duration_seconds
                    .observe(start.elapsed().as_secs_f64());
                Ok(created)
            }
            // Already there: the watch had not shown it yet; the next cycle sees it.
            Err(source) if matches!(&source, kube::Error::Api(s) if s.code == 409) => Err((
                key.clone(),
                ApplyError::CreateAssignedIdentity {
                    ns: key.0,
                    name: key.1,
                    source,
                },
            )),
            Err(source) => {
                self.metrics
                    .kubernetes_api_operations_errors_count
                    .with_label_values(&[metrics::OP_AAI_ADDITION])
                    .inc();
                if let (_, Some(binding)) = refs(aai) {
                    self.events.publish(
                        true,
                        events::REASON_BINDING_APPLY_ERROR,
                        format!("Creating AzureAssignedIdentity {}: {source}", key.1),
                        events::reference(binding),
                    );
                }
                Err((
                    key.clone(),
                    ApplyError::CreateAssignedIdentity {
                        ns: key.0,
                        name: key.1,
                        source,
                    },
                ))
            }
        }
    }

    async fn update(
        &self,
        aai: &AzureAssignedIdentity,
    ) -> Result<AzureAssignedIdentity, (Key, ApplyError)> {
        let key = crate::index::key(aai);
        self.check_leader().map_err(|e| (key.clone(), e))?;
        let start = std::time::Instant::now();
        match self
            .api(&key.0)
            .replace(&key.1, &PostParams::default(), aai)
            .await
        {
            Ok(mut updated) => {
                updated.metadata.managed_fields = None;
                self.metrics.assigned_identity_update_count.inc();
                self.metrics
                    .assigned_identity_update_duration_seconds
                    .observe(start.elapsed().as_secs_f64());
                Ok(updated)
            }
            Err(source) => {
                self.metrics
                    .kubernetes_api_operations_errors_count
                    .with_label_values(&[metrics::OP_AAI_UPDATE])
                    .inc();
                Err((
                    key.clone(),
                    ApplyError::UpdateAssignedIdentity {
                        ns: key.0,
                        name: key.1,
                        source,
                    },
                ))
            }
        }
    }

    /// JSON patch of `/status/status` on the main resource (the CRD has no
    /// status subresource; §1.3).
    async fn patch_status(
        &self,
        aai: &AzureAssignedIdentity,
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
            Ok(_) => Ok(()),
            Err(source) => {
                self.metrics
                    .kubernetes_api_operations_errors_count
                    .with_label_values(&[metrics::OP_AAI_STATUS])
                    .inc();
                self.events.publish(
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
    async fn mark_assigned(&self, aai: &AzureAssignedIdentity) -> Result<bool, ApplyError> {
        match self
            .patch_status(aai, AssignedIdentityState::Assigned)
            .await
        {
            Ok(()) => {
                lock(&self.refusals).remove(&crate::index::key(aai));
                if let (_, Some(binding)) = refs(aai) {
                    self.events.publish(
                        false,
                        events::REASON_BINDING_APPLIED,
                        format!(
                            "Binding {} applied on node {} for pod {}",
                            binding.name_any(),
                            aai.spec.node_name,
                            aai.name_any()
                        ),
                        events::reference(binding),
                    );
                }
                Ok(true)
            }
            Err(ApplyError::NotLeader) => Err(ApplyError::NotLeader),
            Err(error) => {
                tracing::warn!(%error, "marking Assigned");
                Ok(false)
            }
        }
    }

    /// Unassigned, DELETE, then drop the finalizer (§1.3); `Ok(false)` when
    /// the apiserver did not take it (reported; the caller tries again later).
    async fn delete(&self, aai: &AzureAssignedIdentity) -> Result<bool, ApplyError> {
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
                self.metrics
                    .kubernetes_api_operations_errors_count
                    .with_label_values(&[metrics::OP_AAI_DELETION])
                    .inc();
                tracing::warn!(error = %ApplyError::DeleteAssignedIdentity { ns, name, source }, "delete failed");
                return Ok(false);
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
                self.metrics
                    .kubernetes_api_operations_errors_count
                    .with_label_values(&[metrics::OP_AAI_DELETION])
                    .inc();
                tracing::warn!(error = %ApplyError::DeleteAssignedIdentity { ns, name, source }, "removing the finalizer failed");
                return Ok(false);
            }
        }
        self.metrics.assigned_identity_deletion_count.inc();
        self.metrics
            .assigned_identity_deletion_duration_seconds
            .observe(start.elapsed().as_secs_f64());
        Ok(true)
    }
}

/// `provisioningState: Failed`: the last write on the resource failed.
fn is_failed(current: &crate::cloud::ResourceIdentity) -> bool {
    current.provisioning_state.eq_ignore_ascii_case("Failed")
}

/// What the PATCH is computed against: after a failed operation the adds
/// are sent again even if the model already lists them.
fn patch_basis(
    current: &crate::cloud::ResourceIdentity,
    add: &BTreeSet<String>,
) -> crate::cloud::ResourceIdentity {
    let mut basis = current.clone();
    if is_failed(current) {
        basis.user_assigned.retain(|id| !add.contains(id));
    }
    basis
}

/// One PATCH's worth of adds in [`Executor::resource`]'s work queue.
#[derive(Debug)]
struct Group {
    add: BTreeSet<String>,
    /// Carries the resource's removals (only the batch does).
    removes: bool,
    /// A quarantined identity retried alone.
    probe: bool,
}

/// The adds of one resource, split by the quarantine.
#[derive(Debug, Default, PartialEq, Eq)]
struct AddSplit {
    /// Sent together: every add ARM has not refused.
    batch: BTreeSet<String>,
    /// Refused identities whose back-off is over: each is retried alone.
    probes: Vec<String>,
    /// Every refused identity among the adds (due or not).
    quarantined: BTreeSet<String>,
    /// When the next refused identity still waiting is due.
    next_probe: Option<Instant>,
}

/// Splits `add` by the quarantine (identity ID → (due time, failures)). A
/// quarantined identity never rejoins the batch, however long ago it was
/// refused: it must first land on its own. Pure, so unit-tested.
fn split_quarantined(
    add: &BTreeSet<String>,
    quarantine: &BTreeMap<String, (Instant, u32)>,
    now: Instant,
) -> AddSplit {
    let mut out = AddSplit::default();
    for id in add {
        match quarantine.get(id) {
            None => {
                out.batch.insert(id.clone());
            }
            Some((due, _)) => {
                out.quarantined.insert(id.clone());
                if *due <= now {
                    out.probes.push(id.clone());
                } else {
                    out.next_probe = Some(out.next_probe.map_or(*due, |t| t.min(*due)));
                }
            }
        }
    }
    out
}

/// What to do after ARM refused a PATCH adding `group`.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// Not the identities' fault (throttled, conflict, server error): stop
    /// writing this resource for now.
    Stop,
    /// These identities are at fault: quarantine them, send the rest now.
    Quarantine(BTreeSet<String>),
    /// An identity is at fault but ARM did not say which: send the halves
    /// apart until the culprit stands alone.
    Split(BTreeSet<String>, BTreeSet<String>),
}

/// The decision after a refused PATCH. ARM names the refused identity in
/// `FailedIdentityOperation` and `LinkedAuthorizationFailed` messages
/// (azure-apis.md §3.3, aad-pod-identity#515 and #585); when it names none
/// of the group the group is halved (a group of one is the culprit).
fn on_refusal(group: &BTreeSet<String>, error: Option<&ArmError>) -> Refusal {
    let Some(error) = error.filter(|e| e.is_identity_failure()) else {
        return Refusal::Stop;
    };
    let named: BTreeSet<String> = error
        .named_identity_ids()
        .intersection(group)
        .cloned()
        .collect();
    if !named.is_empty() {
        return Refusal::Quarantine(named);
    }
    match group.len() {
        0 => Refusal::Stop,
        1 => Refusal::Quarantine(group.clone()),
        n => {
            let first: BTreeSet<String> = group.iter().take(n / 2).cloned().collect();
            let second = group.difference(&first).cloned().collect();
            Refusal::Split(first, second)
        }
    }
}

/// Failures a halving search over `n` identities may need (⌈log2 n⌉).
fn bisect_steps(n: usize) -> u32 {
    n.max(1).next_power_of_two().trailing_zeros()
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::ResourceIdentity;

    fn ids(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_failed_operation_sends_the_adds_again() {
        // (provisioningState, identities in the model, adds, expected basis)
        let cases = [
            ("Succeeded", &["a", "b"][..], &["a"][..], &["a", "b"][..]),
            ("Failed", &["a", "b"][..], &["a"][..], &["b"][..]),
            ("failed", &["a"][..], &["c"][..], &["a"][..]),
            ("Updating", &["a"][..], &["a"][..], &["a"][..]),
        ];
        for (state, model, add, want) in cases {
            let current = ResourceIdentity {
                type_: "UserAssigned".into(),
                user_assigned: ids(model),
                provisioning_state: state.into(),
                ..Default::default()
            };
            let basis = patch_basis(&current, &ids(add));
            assert_eq!(basis.user_assigned, ids(want), "{state}");
            assert_eq!(is_failed(&current), state.eq_ignore_ascii_case("failed"));
        }
    }

    fn uai(n: &str) -> String {
        format!(
            "/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/{n}"
        )
    }

    fn uais(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|n| uai(n)).collect()
    }

    fn refusal(code: &str, message: String) -> ArmError {
        ArmError {
            status: Some(400),
            code: code.into(),
            message,
            retry_after: None,
        }
    }

    #[test]
    fn a_refused_identity_stays_out_of_the_batch_after_its_back_off() {
        // The e2e 429-storm case: the budget spaces PATCHes 15 s apart, more
        // than the 5 s back-off. Before the fix the ghost rejoined the batch
        // as soon as its back-off ran out and the whole PATCH was refused again.
        let now = Instant::now();
        let add = uais(&["a", "b", "ghost", "slow"]);
        let q: BTreeMap<String, (Instant, u32)> = [
            (uai("ghost"), (now - Duration::from_secs(10), 1)),
            (uai("slow"), (now + Duration::from_secs(20), 3)),
            (uai("not-wanted"), (now - Duration::from_secs(1), 1)),
        ]
        .into();
        let s = split_quarantined(&add, &q, now);
        assert_eq!(s.batch, uais(&["a", "b"]));
        assert_eq!(s.probes, vec![uai("ghost")], "due: retried alone");
        assert_eq!(s.quarantined, uais(&["ghost", "slow"]));
        assert_eq!(s.next_probe, Some(now + Duration::from_secs(20)));
        // Nothing quarantined: everything in one batch.
        let s = split_quarantined(&add, &BTreeMap::new(), now);
        assert_eq!(s.batch, add);
        assert!(s.probes.is_empty() && s.quarantined.is_empty() && s.next_probe.is_none());
    }

    #[test]
    fn a_refusal_takes_out_the_named_identity_or_halves_the_group() {
        let group = uais(&["a", "b", "c", "ghost"]);
        // The emulator's / ARM's not-found body (azure-apis.md §3.3).
        let not_found = refusal(
            "FailedIdentityOperation",
            format!(
                "Identity operation for resource '/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/v' failed with error 'Failed to perform resource identity operation. Status: 'BadRequest'. Response: '{{\"error\":{{\"code\":\"BadRequest\",\"message\":\"Resource '{}' was not found.\"}}}}'.'.",
                uai("ghost")
            ),
        );
        assert_eq!(
            on_refusal(&group, Some(&not_found)),
            Refusal::Quarantine(uais(&["ghost"]))
        );
        // Named identities outside the group are not blamed.
        assert_eq!(
            on_refusal(&uais(&["a", "b"]), Some(&not_found)),
            Refusal::Split(uais(&["a"]), uais(&["b"]))
        );
        // No identity named: halves, and a group of one is the culprit.
        let anonymous = refusal("LinkedAuthorizationFailed", "no scope given".into());
        assert_eq!(
            on_refusal(&group, Some(&anonymous)),
            Refusal::Split(uais(&["a", "b"]), uais(&["c", "ghost"]))
        );
        assert_eq!(
            on_refusal(&uais(&["ghost"]), Some(&anonymous)),
            Refusal::Quarantine(uais(&["ghost"]))
        );
        // Not the identities' fault: throttling or a conflict stops the writes.
        let throttled = ArmError {
            status: Some(429),
            code: "TooManyRequests".into(),
            message: format!("'{}'", uai("a")),
            retry_after: Some(Duration::from_secs(2)),
        };
        assert_eq!(on_refusal(&group, Some(&throttled)), Refusal::Stop);
        assert_eq!(on_refusal(&group, None), Refusal::Stop);
        assert_eq!(
            [0, 1, 2, 3, 4, 5, 150].map(bisect_steps),
            [0, 0, 1, 2, 2, 3, 8]
        );
    }
}
