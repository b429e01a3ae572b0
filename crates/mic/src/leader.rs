//! Leader election on a coordination.k8s.io Lease (upstream used an
//! Endpoints lock of the same name; Endpoints locks are gone from
//! client-go). Timings as upstream: renew deadline = duration/2, retry period
//! = duration/4. Expiry is judged on the local clock from when the record was
//! last seen to change, as client-go does, so clock skew between replicas
//! does not matter.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

use aadpodid_runtime::Shutdown;

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    /// Also hold upstream's Endpoints lock of the same namespace and name
    /// (`--leader-election-endpoints-lock`).
    pub endpoints_lock: bool,
}

impl LeaderConfig {
    fn renew_deadline(&self) -> Duration {
        self.lease_duration / 2
    }

    fn retry_period(&self) -> Duration {
        (self.lease_duration / 4).max(Duration::from_millis(100))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lost the lease {namespace}/{name}")]
    LostLease { namespace: String, name: String },
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// What a standby last saw, and when.
struct Observed {
    holder: Option<String>,
    renew: Option<MicroTime>,
    at: Instant,
}

/// Runs the election until shutdown (Ok) or until the lease is lost (Err).
/// `leading` is true exactly while this replica may write.
pub async fn run(
    client: Client,
    cfg: LeaderConfig,
    leading: watch::Sender<bool>,
    shutdown: Shutdown,
) -> Result<(), LeaderError> {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut observed: Option<Observed> = None;
    let mut last_renew = Instant::now();
    loop {
        let is_leader = *leading.borrow();
        let (ok, taken) = if is_leader {
            match renew(&api, &cfg).await {
                Renew::Renewed => (true, false),
                Renew::Failed => (false, false),
                Renew::Taken => (false, true),
            }
        } else {
            (try_acquire(&api, &cfg, &mut observed).await, false)
        };
        match (is_leader, ok) {
            (false, true) => {
                tracing::info!(lease = %cfg.name, identity = %cfg.identity, "became leader");
                last_renew = Instant::now();
                leading.send_replace(true);
            }
            (true, true) => last_renew = Instant::now(),
            (true, false) if taken || last_renew.elapsed() >= cfg.renew_deadline() => {
                // Stop writes before anything else.
                leading.send_replace(false);
                tracing::error!(lease = %cfg.name, "lost leader lease");
                return Err(LeaderError::LostLease {
                    namespace: cfg.namespace.clone(),
                    name: cfg.name.clone(),
                });
            }
            _ => {}
        }
        tokio::select! {
            _ = shutdown.signaled() => {
                if *leading.borrow() {
                    leading.send_replace(false);
                    release(&api, &cfg).await;
                }
                return Ok(());
            }
            _ = tokio::time::sleep(cfg.retry_period()) => {}
        }
    }
}

fn fresh_spec(cfg: &LeaderConfig, transitions: i32) -> LeaseSpec {
    let t = now();
    LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.lease_duration.as_secs().max(1) as i32),
        acquire_time: Some(t.clone()),
        renew_time: Some(t),
        lease_transitions: Some(transitions),
        ..Default::default()
    }
}

async fn try_acquire(
    api: &Api<Lease>,
    cfg: &LeaderConfig,
    observed: &mut Option<Observed>,
) -> bool {
    let current = match api.get_opt(&cfg.name).await {
        Ok(c) => c,
        Err(error) => {
            tracing::warn!(%error, "reading the leader lease");
            return false;
        }
    };
    let Some(mut lease) = current else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..Default::default()
            },
            spec: Some(fresh_spec(cfg, 0)),
        };
        return api.create(&PostParams::default(), &lease).await.is_ok();
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let changed = observed
        .as_ref()
        .is_none_or(|o| o.holder != holder || o.renew != spec.renew_time);
    if changed {
        *observed = Some(Observed {
            holder: holder.clone(),
            renew: spec.renew_time.clone(),
            at: Instant::now(),
        });
    }
    let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
    let expired = observed
        .as_ref()
        .is_some_and(|o| o.at.elapsed() >= duration);
    let free = holder.is_none() || holder.as_deref() == Some(cfg.identity.as_str()) || expired;
    if !free {
        return false;
    }
    let transitions = spec.lease_transitions.unwrap_or(0)
        + i32::from(holder.as_deref() != Some(cfg.identity.as_str()));
    // resourceVersion makes this a compare-and-swap: of two standbys, one wins.
    lease.spec = Some(fresh_spec(cfg, transitions));
    api.replace(&cfg.name, &PostParams::default(), &lease)
        .await
        .is_ok()
}

enum Renew {
    Renewed,
    /// The API did not answer; keep trying until the renew deadline.
    Failed,
    /// Someone else holds the lease now.
    Taken,
}

async fn renew(api: &Api<Lease>, cfg: &LeaderConfig) -> Renew {
    let mut lease = match api.get_opt(&cfg.name).await {
        Ok(Some(l)) => l,
        Ok(None) => return Renew::Taken,
        Err(_) => return Renew::Failed,
    };
    let mut spec = lease.spec.clone().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return Renew::Taken;
    }
    spec.renew_time = Some(now());
    lease.spec = Some(spec);
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Renew::Renewed,
        Err(_) => Renew::Failed,
    }
}

/// Hands the lease over at shutdown so a standby need not wait for expiry.
async fn release(api: &Api<Lease>, cfg: &LeaderConfig) {
    let Ok(mut lease) = api.get(&cfg.name).await else {
        return;
    };
    let mut spec = lease.spec.clone().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(now());
    lease.spec = Some(spec);
    if let Err(error) = api.replace(&cfg.name, &PostParams::default(), &lease).await {
        tracing::warn!(%error, "releasing the leader lease");
    }
}
