//! The node's IMDS budget (5 concurrent calls, 20 starts per second) shared
//! fairly between the pods that ask: [`FairQueue`] decides, [`FairLimiter`]
//! executes.
//!
//! Every IMDS call waits in the queue of the pod it is made for (its
//! [`RequesterKey`]). Start slots go round-robin across pods, so a pod asking
//! for thousands of distinct resources only ever gets every other slot while
//! another pod waits. A pod whose queue was empty is served before every pod
//! that already had a turn ("fresh" pods first, as fq_codel serves new
//! flows), and each pod may have at most `max_pending_per_key` calls waiting:
//! beyond that its request is refused at once (429 with `Retry-After`).
//!
//! **The bound.** A pod with nothing waiting whose call arrives at `t` is
//! granted a start slot as soon as one of the `concurrency` slots is free,
//! behind only the pods that became fresh before it and are still waiting for
//! their first grant (one grant each). With one busy pod and one quiet pod
//! that means: the quiet pod's call starts at most one IMDS call (the
//! earliest in-flight one finishing; every in-flight call has reserved its
//! start at most `concurrency × spacing` ahead) plus one `spacing` after it
//! arrives, however many calls the busy pod has queued. With the defaults
//! (5 concurrent, spacing 52.5 ms) that is one IMDS call + 5 × 52.5 ms +
//! 52.5 ms ≈ one call + 315 ms.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// Whose IMDS call this is: the calling pod (namespace and name), or the
/// source address of a host-network caller of `/host/token`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequesterKey(String);

impl RequesterKey {
    /// A pod.
    pub fn pod(namespace: &str, name: &str) -> Self {
        RequesterKey(format!("pod/{namespace}/{name}"))
    }

    /// A host-network caller, by source address.
    pub fn host(ip: std::net::IpAddr) -> Self {
        RequesterKey(format!("host/{}", ip.to_canonical()))
    }

    /// A caller inside NMI itself (benchmarks and tests).
    pub fn internal(name: &str) -> Self {
        RequesterKey(format!("internal/{name}"))
    }
}

/// One queued call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(u64);

/// A call refused because its pod already has `max_pending_per_key` calls
/// waiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueFull {
    /// How long the pod should wait before asking again (a hint: the time its
    /// queue takes to drain at its fair share).
    pub retry_after: Duration,
}

/// What [`FairQueue::release`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Released {
    /// The ticket was still waiting: it is gone from its queue.
    Waiting,
    /// The ticket held a slot: the slot is free.
    InFlight,
    /// Unknown (already released).
    Unknown,
}

/// The decisions of fair queuing, without clocks or tasks: which ticket gets
/// the next start slot, when it may start, and whether a new call is admitted.
#[derive(Debug)]
pub struct FairQueue<K> {
    concurrency: usize,
    max_pending_per_key: usize,
    spacing: Duration,
    next_start: Option<Instant>,
    next_ticket: u64,
    queues: HashMap<K, VecDeque<Ticket>>,
    /// Keys whose queue was empty when their first waiting ticket came, not
    /// served since: served first, in arrival order.
    fresh: VecDeque<K>,
    /// Keys that were served and still have tickets waiting.
    rotation: VecDeque<K>,
    in_flight: HashSet<Ticket>,
}

impl<K: Clone + Eq + Hash> FairQueue<K> {
    /// At most `concurrency` tickets hold slots, starts are at least
    /// `spacing` apart, and each key has at most `max_pending_per_key`
    /// tickets waiting (at least one).
    pub fn new(concurrency: usize, spacing: Duration, max_pending_per_key: usize) -> Self {
        FairQueue {
            concurrency: concurrency.max(1),
            max_pending_per_key: max_pending_per_key.max(1),
            spacing,
            next_start: None,
            next_ticket: 0,
            queues: HashMap::new(),
            fresh: VecDeque::new(),
            rotation: VecDeque::new(),
            in_flight: HashSet::new(),
        }
    }

    /// Queues a call for `key`. `retry` (the next attempt of a call that
    /// already had its turn) is never refused: such calls are bounded by the
    /// calls in progress.
    pub fn enqueue(&mut self, key: &K, retry: bool) -> Result<Ticket, QueueFull> {
        let waiting = self.queues.get(key).map_or(0, VecDeque::len);
        if !retry && waiting >= self.max_pending_per_key {
            return Err(QueueFull {
                retry_after: self.drain_time(waiting),
            });
        }
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        let queue = self.queues.entry(key.clone()).or_default();
        if queue.is_empty() {
            self.fresh.push_back(key.clone());
        }
        queue.push_back(ticket);
        Ok(ticket)
    }

    /// How long `waiting` tickets of one key take to be granted when every
    /// key with tickets waiting gets its turn in between (at least 1 s).
    fn drain_time(&self, waiting: usize) -> Duration {
        let keys = u32::try_from(self.queues.len().max(1)).unwrap_or(u32::MAX);
        let per_ticket = self.spacing.saturating_mul(keys);
        let total = per_ticket.saturating_mul(u32::try_from(waiting).unwrap_or(u32::MAX));
        let secs = total.as_secs() + u64::from(total.subsec_nanos() > 0);
        Duration::from_secs(secs.max(1))
    }

    /// The next ticket to start and when, if a slot is free and a ticket is
    /// waiting. The ticket holds its slot until [`FairQueue::release`].
    pub fn grant(&mut self, now: Instant) -> Option<(Ticket, Instant)> {
        if self.in_flight.len() >= self.concurrency {
            return None;
        }
        let key = self
            .fresh
            .pop_front()
            .or_else(|| self.rotation.pop_front())?;
        let queue = self.queues.get_mut(&key)?;
        let ticket = queue.pop_front()?;
        if queue.is_empty() {
            self.queues.remove(&key);
        } else {
            self.rotation.push_back(key);
        }
        let start = self.next_start.map_or(now, |n| n.max(now));
        self.next_start = Some(start + self.spacing);
        self.in_flight.insert(ticket);
        Some((ticket, start))
    }

    /// The ticket is done (its call finished) or abandoned (its caller went
    /// away): it leaves its queue, or frees its slot.
    pub fn release(&mut self, key: &K, ticket: Ticket) -> Released {
        if self.in_flight.remove(&ticket) {
            return Released::InFlight;
        }
        let Some(queue) = self.queues.get_mut(key) else {
            return Released::Unknown;
        };
        let Some(at) = queue.iter().position(|t| *t == ticket) else {
            return Released::Unknown;
        };
        queue.remove(at);
        if queue.is_empty() {
            self.queues.remove(key);
            self.fresh.retain(|k| k != key);
            self.rotation.retain(|k| k != key);
        }
        Released::Waiting
    }

    /// Tickets waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }

    /// Tickets holding a slot.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

/// Runs calls through a [`FairQueue`]: each waits on its own oneshot for its
/// start, and a guard releases its ticket however the call ends (finished,
/// or dropped because its caller went away).
#[derive(Debug)]
pub struct FairLimiter<K> {
    inner: Mutex<Inner<K>>,
}

#[derive(Debug)]
struct Inner<K> {
    queue: FairQueue<K>,
    waiters: HashMap<Ticket, oneshot::Sender<Instant>>,
}

impl<K: Clone + Eq + Hash> Inner<K> {
    fn dispatch(&mut self) {
        while let Some((ticket, start)) = self.queue.grant(Instant::now()) {
            // A dropped receiver means its guard is about to release the
            // ticket (it takes the same lock).
            if let Some(tx) = self.waiters.remove(&ticket) {
                let _ = tx.send(start);
            }
        }
    }
}

struct TicketGuard<'a, K: Clone + Eq + Hash> {
    limiter: &'a FairLimiter<K>,
    key: K,
    ticket: Ticket,
}

impl<K: Clone + Eq + Hash> Drop for TicketGuard<'_, K> {
    fn drop(&mut self) {
        let mut inner = self.limiter.lock();
        inner.waiters.remove(&self.ticket);
        inner.queue.release(&self.key, self.ticket);
        inner.dispatch();
    }
}

impl<K: Clone + Eq + Hash> FairLimiter<K> {
    /// See [`FairQueue::new`].
    pub fn new(concurrency: usize, spacing: Duration, max_pending_per_key: usize) -> Self {
        FairLimiter {
            inner: Mutex::new(Inner {
                queue: FairQueue::new(concurrency, spacing, max_pending_per_key),
                waiters: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<K>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` when `key`'s turn comes, or refuses at once when `key` has
    /// too many calls waiting.
    pub async fn run<T>(
        &self,
        key: &K,
        retry: bool,
        f: impl Future<Output = T>,
    ) -> Result<T, QueueFull> {
        let (ticket, rx) = {
            let mut inner = self.lock();
            let ticket = inner.queue.enqueue(key, retry)?;
            let (tx, rx) = oneshot::channel();
            inner.waiters.insert(ticket, tx);
            inner.dispatch();
            (ticket, rx)
        };
        let _guard = TicketGuard {
            limiter: self,
            key: key.clone(),
            ticket,
        };
        // The sender lives in the limiter until the ticket is granted.
        if let Ok(start) = rx.await {
            tokio::time::sleep_until(start).await;
        }
        Ok(f.await)
    }

    /// (calls waiting, calls holding a slot).
    pub fn load(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.queue.waiting(), inner.queue.in_flight())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPACING: Duration = Duration::from_millis(50);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Grants everything grantable at `now`: (key, start offset in ms).
    fn grant_all(
        q: &mut FairQueue<&'static str>,
        keys: &HashMap<Ticket, &'static str>,
        t0: Instant,
        now: Instant,
    ) -> Vec<(&'static str, u64)> {
        let mut out = Vec::new();
        while let Some((t, start)) = q.grant(now) {
            out.push((keys[&t], (start - t0).as_millis() as u64));
        }
        out
    }

    #[test]
    fn round_robin_and_fresh_keys_first() {
        struct Case {
            name: &'static str,
            concurrency: usize,
            /// Enqueued in this order before any grant.
            calls: Vec<&'static str>,
            /// Keys of the grants, in order (starts are `SPACING` apart).
            want: Vec<&'static str>,
        }
        let cases = [
            Case {
                name: "one key: FIFO",
                concurrency: 3,
                calls: vec!["a", "a", "a"],
                want: vec!["a", "a", "a"],
            },
            Case {
                name: "a busy key and a quiet one alternate",
                concurrency: 10,
                calls: vec!["a", "a", "a", "a", "b"],
                want: vec!["a", "b", "a", "a", "a"],
            },
            Case {
                name: "three keys round-robin",
                concurrency: 10,
                calls: vec!["a", "a", "a", "b", "b", "c"],
                want: vec!["a", "b", "c", "a", "b", "a"],
            },
            Case {
                name: "concurrency caps the grants",
                concurrency: 2,
                calls: vec!["a", "a", "b"],
                want: vec!["a", "b"],
            },
        ];
        for case in cases {
            let t0 = Instant::now();
            let mut q = FairQueue::new(case.concurrency, SPACING, 100);
            let mut keys = HashMap::new();
            for k in &case.calls {
                keys.insert(q.enqueue(k, false).unwrap(), *k);
            }
            let got = grant_all(&mut q, &keys, t0, t0);
            let got_keys: Vec<_> = got.iter().map(|(k, _)| *k).collect();
            assert_eq!(got_keys, case.want, "{}", case.name);
            let starts: Vec<u64> = got.iter().map(|(_, s)| *s).collect();
            let want_starts: Vec<u64> = (0..got.len() as u64).map(|i| i * 50).collect();
            assert_eq!(starts, want_starts, "{}: starts", case.name);
        }
    }

    #[test]
    fn a_quiet_key_overtakes_a_backlog_of_any_length() {
        let t0 = Instant::now();
        let mut q = FairQueue::new(5, SPACING, 10_000);
        let mut keys = HashMap::new();
        for _ in 0..500 {
            keys.insert(q.enqueue(&"busy", false).unwrap(), "busy");
        }
        let first = grant_all(&mut q, &keys, t0, t0);
        assert_eq!(first.len(), 5, "all slots taken by the busy key");
        // The quiet key's call arrives while every slot is busy.
        let b = q.enqueue(&"quiet", false).unwrap();
        keys.insert(b, "quiet");
        assert_eq!(q.grant(t0), None, "no slot free");
        // The earliest in-flight call finishes: the quiet key is next.
        assert_eq!(q.release(&"busy", Ticket(0)), Released::InFlight);
        let now = t0 + ms(10);
        let (t, start) = q.grant(now).unwrap();
        assert_eq!(t, b);
        // One spacing after the last reserved start: within the stated bound.
        assert_eq!(start - t0, ms(250));
        assert!(start - now <= SPACING * 5 + SPACING);
    }

    #[test]
    fn admission_is_per_key_and_retries_are_never_refused() {
        let mut q = FairQueue::new(1, SPACING, 2);
        q.enqueue(&"a", false).unwrap();
        q.enqueue(&"a", false).unwrap();
        let full = q.enqueue(&"a", false).unwrap_err();
        assert!(full.retry_after >= Duration::from_secs(1));
        q.enqueue(&"b", false).unwrap();
        q.enqueue(&"a", true).expect("a retry is admitted");
        assert_eq!(q.waiting(), 4);
        // A grant makes room for one more.
        let t0 = Instant::now();
        q.grant(t0).unwrap();
        assert_eq!(q.waiting(), 3);
        assert!(
            q.enqueue(&"a", false).is_err(),
            "a still has 2 waiting (one retry)"
        );
    }

    #[test]
    fn release_table() {
        let t0 = Instant::now();
        let mut q = FairQueue::new(1, SPACING, 10);
        let a1 = q.enqueue(&"a", false).unwrap();
        let a2 = q.enqueue(&"a", false).unwrap();
        let b1 = q.enqueue(&"b", false).unwrap();
        assert_eq!(q.grant(t0).map(|g| g.0), Some(a1));
        for (key, ticket, want, waiting, in_flight) in [
            ("a", a2, Released::Waiting, 1, 1),
            ("a", a2, Released::Unknown, 1, 1),
            ("b", a1, Released::InFlight, 1, 0),
            ("a", a1, Released::Unknown, 1, 0),
            ("b", b1, Released::Waiting, 0, 0),
        ] {
            assert_eq!(q.release(&key, ticket), want, "{key} {ticket:?}");
            assert_eq!((q.waiting(), q.in_flight()), (waiting, in_flight));
        }
        assert!(q.queues.is_empty() && q.fresh.is_empty() && q.rotation.is_empty());
        assert_eq!(q.grant(t0), None);
    }

    #[test]
    fn starts_keep_the_spacing_but_bank_no_credit_when_idle() {
        let t0 = Instant::now();
        let mut q = FairQueue::new(5, SPACING, 10);
        let a = q.enqueue(&"a", false).unwrap();
        let (_, s1) = q.grant(t0).unwrap();
        q.release(&"a", a);
        let b = q.enqueue(&"a", false).unwrap();
        let (_, s2) = q.grant(t0 + ms(10)).unwrap();
        assert_eq!((s1 - t0, s2 - t0), (ms(0), ms(50)));
        q.release(&"a", b);
        q.enqueue(&"a", false).unwrap();
        let (_, s3) = q.grant(t0 + ms(5000)).unwrap();
        assert_eq!(s3 - t0, ms(5000), "an idle queue starts at once");
    }

    #[tokio::test]
    async fn executor_cancelled_waiters_and_finished_calls_free_their_tickets() {
        let limiter = std::sync::Arc::new(FairLimiter::new(1, Duration::ZERO, 10));
        let (hold_tx, hold_rx) = oneshot::channel::<()>();
        let first = {
            let limiter = std::sync::Arc::clone(&limiter);
            tokio::spawn(async move {
                limiter
                    .run(&"a", false, async move {
                        let _ = hold_rx.await;
                    })
                    .await
            })
        };
        tokio::task::yield_now().await;
        let mut waiting = Vec::new();
        for _ in 0..3 {
            let limiter = std::sync::Arc::clone(&limiter);
            waiting.push(tokio::spawn(async move {
                limiter.run(&"b", false, async {}).await
            }));
        }
        while limiter.load() != (3, 1) {
            tokio::task::yield_now().await;
        }
        for w in &waiting {
            w.abort();
        }
        for w in waiting {
            let _ = w.await;
        }
        assert_eq!(limiter.load(), (0, 1), "aborted waiters left their queue");
        let _ = hold_tx.send(());
        first.await.unwrap().unwrap();
        assert_eq!(limiter.load(), (0, 0), "the finished call freed its slot");
        // And the limiter still works.
        limiter.run(&"c", false, async {}).await.unwrap();
        assert_eq!(limiter.load(), (0, 0));
    }

    #[tokio::test]
    async fn executor_refuses_beyond_the_per_key_bound() {
        let limiter = std::sync::Arc::new(FairLimiter::new(1, Duration::ZERO, 2));
        let (hold_tx, hold_rx) = oneshot::channel::<()>();
        let l = std::sync::Arc::clone(&limiter);
        let holder = tokio::spawn(async move {
            l.run(&"a", false, async move {
                let _ = hold_rx.await;
            })
            .await
        });
        while limiter.load() != (0, 1) {
            tokio::task::yield_now().await;
        }
        let mut queued = Vec::new();
        for _ in 0..2 {
            let l = std::sync::Arc::clone(&limiter);
            queued.push(tokio::spawn(
                async move { l.run(&"a", false, async {}).await },
            ));
        }
        while limiter.load() != (2, 1) {
            tokio::task::yield_now().await;
        }
        assert!(limiter.run(&"a", false, async {}).await.is_err());
        let _ = hold_tx.send(());
        holder.await.unwrap().unwrap();
        for q in queued {
            q.await.unwrap().unwrap();
        }
        assert_eq!(limiter.load(), (0, 0));
    }
}
