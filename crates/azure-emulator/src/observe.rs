//! Counters and a request log, for tests and benchmarks.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::lock;

/// Which emulated service a request reached.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub enum Service {
    Arm,
    Aad,
    Imds,
    Admin,
}

/// Totals since start (or the last reset).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Counters {
    /// ARM GETs per lower-cased resource ID.
    pub arm_reads: BTreeMap<String, u64>,
    /// ARM PUT/PATCH per lower-cased resource ID (accepted or not).
    pub arm_writes: BTreeMap<String, u64>,
    /// ARM 429 answers (buckets and injected storms).
    pub arm_throttled: u64,
    /// ARM answers with status >= 400 (429 included).
    pub arm_errors: u64,
    /// Long-running operations started.
    pub lro_started: u64,
    /// Operation-status GETs.
    pub lro_polls: u64,
    /// Writes that waited for a running operation (queue mode).
    pub arm_queued_writes: u64,
    /// IMDS token requests per machine (`vmss/<name>/<id>` or `vm/<name>`).
    pub imds_token_requests: BTreeMap<String, u64>,
    /// IMDS requests of any kind per machine.
    pub imds_requests: BTreeMap<String, u64>,
    /// IMDS 429 answers.
    pub imds_throttled: u64,
    /// IMDS token requests being served right now, per machine (a gauge).
    pub imds_token_in_flight: BTreeMap<String, u64>,
    /// AAD token requests per client ID as sent.
    pub aad_token_requests: BTreeMap<String, u64>,
    /// AAD error answers.
    pub aad_errors: u64,
    /// Injected faults that fired.
    pub faults_fired: u64,
}

/// One request as the emulator answered it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RequestRecord {
    pub seq: u64,
    pub service: Service,
    pub method: String,
    /// Path and query as received.
    pub uri: String,
    pub status: u16,
    /// Virtual time of the answer, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// IMDS: the machine the listener stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// IMDS: the caller's address as the listener saw it (tests check that
    /// no pod reached IMDS directly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

impl RequestRecord {
    /// A record of an answer outside IMDS (no machine, no peer); the
    /// observer numbers it when it is recorded.
    pub fn answered(
        service: Service,
        method: String,
        uri: String,
        status: u16,
        at_ms: u64,
    ) -> Self {
        Self {
            seq: 0,
            service,
            method,
            uri,
            status,
            at_ms,
            machine: None,
            peer: None,
        }
    }
}

#[derive(Debug)]
pub struct Observer {
    inner: Mutex<Inner>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Inner {
    counters: Counters,
    log: VecDeque<RequestRecord>,
    seq: u64,
}

impl Observer {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            capacity,
        }
    }

    pub fn count(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut lock(&self.inner).counters);
    }

    pub fn record(&self, mut rec: RequestRecord) {
        tracing::debug!(service = ?rec.service, method = %rec.method, uri = %rec.uri, status = rec.status, machine = ?rec.machine, "answered");
        let mut g = lock(&self.inner);
        g.seq += 1;
        rec.seq = g.seq;
        if g.log.len() >= self.capacity {
            g.log.pop_front();
        }
        g.log.push_back(rec);
    }

    pub fn counters(&self) -> Counters {
        lock(&self.inner).counters.clone()
    }

    /// Records with `seq > since`, oldest first.
    pub fn requests(&self, since: u64) -> Vec<RequestRecord> {
        lock(&self.inner)
            .log
            .iter()
            .filter(|r| r.seq > since)
            .cloned()
            .collect()
    }

    pub fn reset(&self) {
        let mut g = lock(&self.inner);
        g.counters = Counters::default();
        g.log.clear();
    }
}
