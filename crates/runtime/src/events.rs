//! Kubernetes Events, published in the background and best effort: a failed
//! Event is logged at debug level and never holds up the caller.
//!
//! A component that reports from a hot path (a node agent answering token
//! requests, say) must not turn a flood of identical failures into a flood of
//! API writes, so the same (object, reason) is published at most once per
//! [`EventPublisher::with_min_interval`] (30 s by default). kube's recorder
//! already folds repeats into one Event with a growing series count; this
//! bound is in front of that, on the number of API calls.
//!
//! Publications go through one bounded queue per publisher, drained by one
//! task that has at most [`MAX_IN_FLIGHT`] API calls open at a time: a burst
//! of Events (thousands of pods appearing at once) costs a fixed amount of
//! memory and tasks, and what does not fit in the queue is dropped and
//! counted ([`EventPublisher::dropped`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How important an Event is (`kubectl describe` shows it as `Type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Severity {
    /// Something happened as expected.
    Normal,
    /// Something needs a person's attention.
    Warning,
}

/// Longest `reason` the Events API accepts.
const MAX_REASON: usize = 128;
/// Longest `note` the Events API accepts (bytes).
const MAX_NOTE: usize = 1024;
/// Default minimum time between two publications of the same (object, reason).
const DEFAULT_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// Events waiting to be sent, per publisher; beyond it new ones are dropped.
pub const QUEUE_CAPACITY: usize = 256;
/// Most Event API calls open at once, per publisher.
pub const MAX_IN_FLIGHT: usize = 4;
/// Most (object, reason) pairs remembered for throttling; beyond it the
/// oldest entries go first.
const MAX_REMEMBERED: usize = 4096;

/// Which publications already happened recently: the pure part of the
/// throttle, driven by an explicit clock so that it can be tested.
#[derive(Debug)]
pub struct Throttle {
    min_interval: Duration,
    last: HashMap<ThrottleKey, Instant>,
}

/// (object identity, reason): the UID when the object has one, else its
/// kind, namespace and name.
type ThrottleKey = (String, String);

impl Throttle {
    /// A throttle letting one publication per key through every `min_interval`.
    pub fn new(min_interval: Duration) -> Self {
        Throttle {
            min_interval,
            last: HashMap::new(),
        }
    }

    /// Whether an Event with `reason` about `regarding` may be published at
    /// `now`; if so, remembers it.
    pub fn admit(&mut self, regarding: &ObjectReference, reason: &str, now: Instant) -> bool {
        if self.min_interval.is_zero() {
            // No throttling: nothing to remember.
            return true;
        }
        let key = (object_key(regarding), reason.to_string());
        if let Some(at) = self.last.get(&key)
            && now.saturating_duration_since(*at) < self.min_interval
        {
            return false;
        }
        if self.last.len() >= MAX_REMEMBERED {
            let interval = self.min_interval;
            self.last
                .retain(|_, at| now.saturating_duration_since(*at) < interval);
            if self.last.len() >= MAX_REMEMBERED {
                // Everything is recent: forget the oldest half.
                let mut ages: Vec<Instant> = self.last.values().copied().collect();
                ages.sort_unstable();
                if let Some(cut) = ages.get(ages.len() / 2).copied() {
                    self.last.retain(|_, at| *at > cut);
                }
            }
        }
        self.last.insert(key, now);
        true
    }
}

fn object_key(r: &ObjectReference) -> String {
    match r.uid.as_deref() {
        Some(uid) if !uid.is_empty() => uid.to_string(),
        _ => format!(
            "{}\n{}\n{}",
            r.kind.as_deref().unwrap_or(""),
            r.namespace.as_deref().unwrap_or(""),
            r.name.as_deref().unwrap_or("")
        ),
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Publishes Events for one reporting component.
#[derive(Clone)]
pub struct EventPublisher {
    recorder: Option<Recorder>,
    throttle: Arc<Mutex<Throttle>>,
    /// The queue to the sending task, made on the first publication (so
    /// that a publisher can be built outside a Tokio runtime).
    queue: Arc<OnceLock<mpsc::Sender<(Event, ObjectReference)>>>,
    dropped: Arc<AtomicU64>,
}

/// Sends the queued Events, at most [`MAX_IN_FLIGHT`] at a time, until every
/// sender is gone.
async fn send_queued(recorder: Recorder, mut queue: mpsc::Receiver<(Event, ObjectReference)>) {
    let mut open = tokio::task::JoinSet::new();
    while let Some((event, regarding)) = queue.recv().await {
        while open.len() >= MAX_IN_FLIGHT {
            open.join_next().await;
        }
        let recorder = recorder.clone();
        open.spawn(async move {
            if let Err(error) = recorder.publish(&event, &regarding).await {
                tracing::debug!(%error, reason = %event.reason, "publishing an event");
            }
        });
        while open.try_join_next().is_some() {}
    }
    while open.join_next().await.is_some() {}
}

impl std::fmt::Debug for EventPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventPublisher")
            .field("enabled", &self.recorder.is_some())
            .finish()
    }
}

impl EventPublisher {
    /// Events reported by `controller` (the component name `kubectl describe`
    /// shows under `From`) from `instance` (a pod or node name). The client's
    /// identity needs `create` and `patch` on `events.k8s.io` events in the
    /// namespaces of the objects it reports on.
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: controller.to_string(),
            instance,
        };
        EventPublisher {
            recorder: Some(Recorder::new(client, reporter)),
            throttle: Arc::new(Mutex::new(Throttle::new(DEFAULT_MIN_INTERVAL))),
            queue: Arc::new(OnceLock::new()),
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A publisher that only logs (tests and tools without a cluster).
    pub fn disabled() -> Self {
        EventPublisher {
            recorder: None,
            throttle: Arc::new(Mutex::new(Throttle::new(DEFAULT_MIN_INTERVAL))),
            queue: Arc::new(OnceLock::new()),
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// How many Events were dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The same publisher with another minimum interval between two Events
    /// with the same reason about the same object.
    pub fn with_min_interval(mut self, min_interval: Duration) -> Self {
        self.throttle = Arc::new(Mutex::new(Throttle::new(min_interval)));
        self
    }

    /// Publishes in the background (needs a Tokio runtime). Returns whether
    /// the Event was queued: `false` when the throttle held it back, the
    /// queue was full (counted in [`EventPublisher::dropped`]) or the
    /// publisher is disabled. `reason` and `note` are cut to the lengths the
    /// API accepts.
    pub fn publish(
        &self,
        severity: Severity,
        reason: &str,
        action: &str,
        note: &str,
        regarding: ObjectReference,
    ) -> bool {
        let reason = truncate(reason, MAX_REASON);
        let admitted = self
            .throttle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(&regarding, reason, Instant::now());
        if !admitted {
            return false;
        }
        let Some(recorder) = self.recorder.as_ref() else {
            tracing::debug!(reason, note, "event (publisher disabled)");
            return false;
        };
        let event = Event {
            type_: match severity {
                Severity::Normal => EventType::Normal,
                Severity::Warning => EventType::Warning,
            },
            reason: reason.to_string(),
            note: Some(truncate(note, MAX_NOTE).to_string()),
            action: truncate(action, MAX_REASON).to_string(),
            secondary: None,
        };
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
            tokio::spawn(send_queued(recorder.clone(), rx));
            tx
        });
        match queue.try_send((event, regarding)) {
            Ok(()) => true,
            Err(error) => {
                let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // The first drop and every thousandth after it are logged.
                if dropped % 1000 == 1 {
                    tracing::warn!(
                        reason,
                        dropped,
                        "Event queue full or closed: Event dropped ({error})"
                    );
                }
                false
            }
        }
    }
}

/// A reference to `obj` for [`EventPublisher::publish`] (kind, API version,
/// namespace, name and, when the object has one, its UID).
pub fn reference<K: Resource<DynamicType = ()>>(obj: &K) -> ObjectReference {
    obj.object_ref(&())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An apiserver that accepts connections and never answers: every
    /// Event call stays open, so the queue fills and the rest is dropped.
    /// Memory and tasks stay bounded: at most the queue and the calls in
    /// flight are held, whatever the burst.
    #[tokio::test]
    async fn a_burst_beyond_the_queue_is_dropped_and_counted() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url: http::Uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let client = Client::try_from(kube::Config::new(url)).unwrap();
        let publisher = EventPublisher::new(client, "test", None).with_min_interval(Duration::ZERO);
        let burst = QUEUE_CAPACITY + MAX_IN_FLIGHT + 100;
        let mut queued = 0;
        for i in 0..burst {
            if publisher.publish(
                Severity::Warning,
                "Burst",
                "Test",
                "note",
                r(Some(&format!("u{i}")), "a"),
            ) {
                queued += 1;
            }
            // Let the sending task take what it can.
            tokio::task::yield_now().await;
        }
        let dropped = publisher.dropped() as usize;
        assert_eq!(queued + dropped, burst);
        assert!(
            queued <= QUEUE_CAPACITY + MAX_IN_FLIGHT + 1,
            "queued {queued} of {burst}"
        );
        assert!(dropped >= 99, "dropped {dropped} of {burst}");
        drop(listener);
    }

    #[test]
    fn a_disabled_publisher_queues_nothing() {
        let publisher = EventPublisher::disabled();
        assert!(!publisher.publish(Severity::Normal, "R", "A", "n", r(None, "a")));
        assert_eq!(publisher.dropped(), 0);
    }

    fn r(uid: Option<&str>, name: &str) -> ObjectReference {
        ObjectReference {
            kind: Some("AzureIdentity".into()),
            namespace: Some("ns".into()),
            name: Some(name.into()),
            uid: uid.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn throttle_lets_one_event_per_object_and_reason_through_per_interval() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut t = Throttle::new(s(30));
        struct Case {
            name: &'static str,
            regarding: ObjectReference,
            reason: &'static str,
            at: Duration,
            want: bool,
        }
        let cases = [
            Case {
                name: "first",
                regarding: r(Some("u1"), "a"),
                reason: "x",
                at: s(0),
                want: true,
            },
            Case {
                name: "same again at once",
                regarding: r(Some("u1"), "a"),
                reason: "x",
                at: s(1),
                want: false,
            },
            Case {
                name: "another reason",
                regarding: r(Some("u1"), "a"),
                reason: "y",
                at: s(1),
                want: true,
            },
            Case {
                name: "another object (uid decides, not the name)",
                regarding: r(Some("u2"), "a"),
                reason: "x",
                at: s(1),
                want: true,
            },
            Case {
                name: "no uid: by name",
                regarding: r(None, "b"),
                reason: "x",
                at: s(1),
                want: true,
            },
            Case {
                name: "no uid, same name",
                regarding: r(None, "b"),
                reason: "x",
                at: s(2),
                want: false,
            },
            Case {
                name: "just before the interval",
                regarding: r(Some("u1"), "a"),
                reason: "x",
                at: s(29),
                want: false,
            },
            Case {
                name: "after the interval",
                regarding: r(Some("u1"), "a"),
                reason: "x",
                at: s(30),
                want: true,
            },
        ];
        for c in cases {
            assert_eq!(
                t.admit(&c.regarding, c.reason, t0 + c.at),
                c.want,
                "{}",
                c.name
            );
        }
    }

    #[test]
    fn throttle_memory_is_bounded() {
        let t0 = Instant::now();
        let mut t = Throttle::new(Duration::from_secs(30));
        for i in 0..(MAX_REMEMBERED * 3) {
            let uid = format!("u{i}");
            assert!(t.admit(&r(Some(&uid), "a"), "x", t0));
        }
        assert!(t.last.len() <= MAX_REMEMBERED);
    }

    #[test]
    fn a_zero_interval_admits_everything_and_remembers_nothing() {
        let t0 = Instant::now();
        let mut t = Throttle::new(Duration::ZERO);
        for _ in 0..3 {
            assert!(t.admit(&r(Some("u1"), "a"), "x", t0));
        }
        assert!(t.last.is_empty());
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abcdef", 3), "abc");
        // "é" is two bytes: cutting inside it keeps the character out.
        assert_eq!(truncate("aé", 2), "a");
    }

    #[tokio::test]
    async fn a_disabled_publisher_sends_nothing() {
        let p = EventPublisher::disabled();
        assert!(!p.publish(Severity::Warning, "r", "Check", "n", r(Some("u"), "a")));
    }
}
