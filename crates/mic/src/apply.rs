//! Carries out a [`Plan`]: Kubernetes writes of AzureAssignedIdentities
//! (AAIs), then one GET + PATCH(es) per VMSS/VM, then the status writes that
//! depend on what landed (upstream's order, research/aad-pod-identity.md §2.5
//! step 6). Every write first checks that this replica still leads.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aadpodid_api::{ASSIGNED_IDENTITY_FINALIZER, AssignedIdentityState, AzureAssignedIdentity};
use futures::StreamExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cloud::{Cloud, CloudError, ResourceKind, ResourceRef, identity_patches};
use crate::events::{self, Events};
use crate::index::{Index, Key};
use crate::metrics::{self, Metrics};
use crate::plan::{Plan, ResourceWork, Warning, refs};
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
            opts,
        }
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
            };
            if let Some(r) = reference {
                self.events
                    .publish(true, events::REASON_INVALID_OBJECT, note, r);
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

        // 2. No ARM work needed.
        for key in &plan.assign_now {
            if let Some(aai) = aais.get(key).filter(|_| !failed.contains(key)) {
                self.mark_assigned(aai).await?;
            }
        }
        for key in &plan.delete_now {
            if let Some(aai) = aais.get(key) {
                self.delete(aai).await?;
            }
        }

        // 3. One task per resource, all at once; each does one GET and its PATCHes.
        let mut work = Vec::with_capacity(plan.resources.len());
        for (r, w) in &plan.resources {
            work.push(self.resource_task(r, w, &aais, &failed));
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
    ) -> (&'a ResourceRef, Result<Option<Instant>, ApplyError>) {
        (r, self.resource(r, w, aais, failed).await)
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
        self.metrics
            .cloud_provider_operations_duration_seconds
            .with_label_values(&[op_label(r, false)])
            .observe(start.elapsed().as_secs_f64());
        res.map_err(|e| {
            let at = self.note_error(r, &e, false);
            (e, at)
        })
    }

    fn quarantined(&self) -> BTreeSet<String> {
        let now = Instant::now();
        lock(&self.quarantine)
            .iter()
            .filter(|(_, (t, _))| *t > now)
            .map(|(id, _)| id.clone())
            .collect()
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
        let quarantined = self.quarantined();
        let mut add: BTreeSet<String> = w.add.difference(&quarantined).cloned().collect();
        if add.len() < w.add.len() {
            retry_at = lock(&self.quarantine).values().map(|(t, _)| *t).min();
        }
        let remove = w.remove.clone();
        let mut refused: BTreeSet<String> = BTreeSet::new();
        let mut deferred = false;
        let mut wrote = false;
        if current.provisioning_state.eq_ignore_ascii_case("Deleting") {
            // §9 statement 22: never PATCH a resource being deleted.
            tracing::warn!(resource = %r, "{}", CloudError::ResourceDeleting { resource: r.clone() });
        } else {
            let mut attempts = 0;
            loop {
                let patches = identity_patches(&patch_basis(&current, &add), &add, &remove);
                if patches.is_empty() {
                    break;
                }
                self.check_leader()?;
                let mut error = None;
                let mut sent = 0;
                for patch in &patches {
                    // Within the mirrored budget only; what waits is folded
                    // into the next PATCH of this resource.
                    if let Err(at) = self.acquire_write(r) {
                        retry_at = Some(retry_at.map_or(at, |t| t.min(at)));
                        deferred = true;
                        break;
                    }
                    let start = std::time::Instant::now();
                    let res = self.cloud.update_identities(r, patch).await;
                    sent += 1;
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
                if deferred && sent == 0 {
                    break;
                }
                let Some(e) = error else {
                    break;
                };
                let at = self.note_error(r, &e, true);
                tracing::warn!(resource = %r, error = %e, "updating identities");
                let named: BTreeSet<String> = e
                    .arm()
                    .filter(|a| a.is_identity_failure())
                    .map(|a| a.named_identity_ids())
                    .unwrap_or_default()
                    .intersection(&add)
                    .cloned()
                    .collect();
                retry_at = Some(retry_at.map_or(at, |t| t.min(at)));
                if named.is_empty() || attempts >= self.opts.max_retry {
                    break;
                }
                // Take the refused identities out and retry the rest alone.
                retry_at = Some(self.quarantine(&named).min(retry_at.unwrap_or(at)));
                refused.extend(named.iter().cloned());
                add.retain(|id| !named.contains(id));
                attempts += 1;
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
            if landed_failed {
                continue;
            }
            if current.user_assigned.contains(id) {
                lock(&self.quarantine).remove(id);
                self.mark_assigned(aai).await?;
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
        for (key, id) in &w.delete_on_success {
            let Some(aai) = aais.get(key) else { continue };
            if current.user_assigned.contains(id) {
                retry_at.get_or_insert(Instant::now() + FAILURE_RETRY);
            } else {
                self.delete(aai).await?;
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
    ) -> Result<Outcome, ApplyError> {
        let mut outcome = Outcome::default();
        for (r, ids) in expected {
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
            let missing: BTreeSet<String> =
                ids.difference(&current.user_assigned).cloned().collect();
            if missing.is_empty() || current.provisioning_state.eq_ignore_ascii_case("Deleting") {
                continue;
            }
            tracing::info!(resource = %r, missing = ?missing, "re-adding identities removed from the resource");
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
            Ok(created) => {
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
            Ok(updated) => {
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
        let ops = if aai.status.is_some() {
            json!([{"op": "replace", "path": "/status/status", "value": state.as_str()}])
        } else {
            json!([{"op": "add", "path": "/status", "value": {"status": state.as_str(), "availableReplicas": 1}}])
        };
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

    async fn mark_assigned(&self, aai: &AzureAssignedIdentity) -> Result<(), ApplyError> {
        match self
            .patch_status(aai, AssignedIdentityState::Assigned)
            .await
        {
            Ok(()) => {
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
                Ok(())
            }
            Err(ApplyError::NotLeader) => Err(ApplyError::NotLeader),
            Err(error) => {
                tracing::warn!(%error, "marking Assigned");
                Ok(())
            }
        }
    }

    /// Unassigned, DELETE, then drop the finalizer (§1.3).
    async fn delete(&self, aai: &AzureAssignedIdentity) -> Result<(), ApplyError> {
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
                return Ok(());
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
                return Ok(());
            }
        }
        self.metrics.assigned_identity_deletion_count.inc();
        self.metrics
            .assigned_identity_deletion_duration_seconds
            .observe(start.elapsed().as_secs_f64());
        Ok(())
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
            };
            let basis = patch_basis(&current, &ids(add));
            assert_eq!(basis.user_assigned, ids(want), "{state}");
            assert_eq!(is_failed(&current), state.eq_ignore_ascii_case("failed"));
        }
    }
}
