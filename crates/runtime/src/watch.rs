//! One way to keep a local view of a Kubernetes kind current, shared by mic
//! and nmi: list every object, then follow changes, and list again after a
//! watch is lost. Errors never stop a watch: the stream from [`events`]
//! retries with backoff ([`Retry`]: 0.8 s doubling to at most 30 s, with
//! jitter, starting over after any success). An answer from the apiserver
//! that the watch's resource version is gone (410) is the exception: the
//! server is up and asks for a fresh list, so the list follows at once.
//!
//! [`Lister`] decides what each watcher event means for the view (pure,
//! table-tested); [`feed`] performs that on a [`Sink`] until the stream ends
//! or shutdown starts; [`spawn`] registers a [`SyncFlag`] in a [`Synced`] set
//! and runs [`feed`] as a task. A view is synced once its first complete list
//! is in it, and stays synced while later re-lists run; [`Synced::wait_all`]
//! lets a task await the moment every view is.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::Shutdown;

/// The watcher's events for `api` with `config`, retried after every error
/// with the delay [`Retry`] decides (each error is still yielded, once).
pub fn events<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let inner = Box::pin(watcher::watcher(api, config));
    futures::stream::unfold(
        (inner, Retry::default(), None::<Duration>),
        |(mut inner, mut retry, wait)| async move {
            if let Some(wait) = wait {
                tokio::time::sleep(wait).await;
            }
            let item = inner.next().await?;
            let wait = match &item {
                Ok(_) => {
                    retry.succeeded();
                    None
                }
                Err(error) => {
                    Some(retry.failed(Failure::of(error), std::time::Instant::now(), jitter()))
                }
            };
            Some((item, (inner, retry, wait)))
        },
    )
}

/// Why a watch attempt failed, as far as the next attempt's delay goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The apiserver answered that the resource version the watch resumed
    /// from is gone (410): it is reachable, and the watcher lists afresh.
    Gone,
    /// Anything else (no connection, a 5xx, a refusal).
    Other,
}

impl Failure {
    /// The class of `error`.
    pub fn of(error: &watcher::Error) -> Failure {
        let gone = match error {
            watcher::Error::WatchError(status) => status.code == 410,
            watcher::Error::WatchStartFailed(kube::Error::Api(status))
            | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 410,
            _ => false,
        };
        if gone { Failure::Gone } else { Failure::Other }
    }
}

/// First delay after an error.
const RETRY_FIRST: Duration = Duration::from_millis(800);
/// Largest delay before jitter (so at most 30 s with it).
const RETRY_MAX: Duration = Duration::from_secs(15);
/// Delay before the fresh list a 410 asks for.
const RETRY_GONE: Duration = Duration::from_millis(100);
/// A 410 gets [`RETRY_GONE`] at most once per this interval; more often,
/// it waits like any other error (a server answering 410 to every watch
/// must not draw a full list every 100 ms).
const GONE_FAST_EVERY: Duration = Duration::from_secs(30);

/// The delay before the next watch attempt: doubling from [`RETRY_FIRST`]
/// up to [`RETRY_MAX`] for errors in a row, times a jitter factor in [1, 2)
/// so that many watchers (every nmi of a cluster) do not return together;
/// any success starts over. A 410 is retried after [`RETRY_GONE`] at once
/// (rate-limited by [`GONE_FAST_EVERY`]), and starts the doubling over: the
/// server answered.
#[derive(Debug, Default)]
pub struct Retry {
    /// Errors in a row since the last success or fast re-list.
    errors: u32,
    /// When the last fast re-list was granted.
    last_fast: Option<std::time::Instant>,
}

impl Retry {
    /// An event arrived: the next error starts from [`RETRY_FIRST`].
    pub fn succeeded(&mut self) {
        self.errors = 0;
    }

    /// The delay after a `failure` at `now`; `jitter` is in [0, 1).
    pub fn failed(&mut self, failure: Failure, now: std::time::Instant, jitter: f64) -> Duration {
        let fast = failure == Failure::Gone
            && self
                .last_fast
                .is_none_or(|at| now.saturating_duration_since(at) >= GONE_FAST_EVERY);
        if fast {
            self.last_fast = Some(now);
            self.errors = 0;
            return RETRY_GONE;
        }
        let base = RETRY_FIRST
            .saturating_mul(1u32 << self.errors.min(16))
            .min(RETRY_MAX);
        self.errors = self.errors.saturating_add(1);
        base.mul_f64(1.0 + jitter.clamp(0.0, 0.999))
    }
}

/// A number in [0, 1), different on every call (std's per-process random
/// hash keys; jitter needs no stronger randomness).
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::hash::RandomState::new().build_hasher();
    h.write_u64(CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// What a view does with what its watch sees. Each method says whether the
/// view changed; after a step that changed it, [`feed`] calls
/// [`Sink::changed`] (once the sync flag is set, for a complete list).
pub trait Sink<K> {
    /// Replaces every object of the kind with `all`, a complete list (the
    /// first one, or a re-list after the watch was lost).
    fn reset(&mut self, all: Vec<K>) -> bool;
    /// Adds or updates one object.
    fn apply(&mut self, obj: K) -> bool;
    /// Removes one object.
    fn delete(&mut self, obj: K) -> bool;
    /// The view changed, and the sync flag says so if it is now synced.
    fn changed(&mut self) {}
    /// The watch failed and will retry with backoff ([`feed`] logs it).
    fn failed(&mut self, _error: &watcher::Error) {}
}

/// What one watcher event asks of the view.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<K> {
    /// A complete list ended: replace everything with it.
    Reset(Vec<K>),
    /// One object was added or updated.
    Apply(K),
    /// One object was deleted.
    Delete(K),
}

/// Collects a (re-)list until it is complete, so that the view never holds
/// a half list: until then it keeps what it had.
#[derive(Debug)]
pub struct Lister<K> {
    listing: Vec<K>,
}

impl<K> Default for Lister<K> {
    fn default() -> Self {
        Lister {
            listing: Vec::new(),
        }
    }
}

impl<K> Lister<K> {
    /// What `event` asks of the view, if anything yet.
    pub fn step(&mut self, event: Event<K>) -> Option<Step<K>> {
        match event {
            Event::Init => {
                self.listing.clear();
                None
            }
            Event::InitApply(obj) => {
                self.listing.push(obj);
                None
            }
            // Hands the list over whole: a large first list (every labelled
            // pod of a cluster) leaves no capacity behind here.
            Event::InitDone => Some(Step::Reset(std::mem::take(&mut self.listing))),
            Event::Apply(obj) => Some(Step::Apply(obj)),
            Event::Delete(obj) => Some(Step::Delete(obj)),
        }
    }
}

/// Which watches have put a complete list into their view at least once.
/// Clones share the same set. With no watch registered, [`Synced::all`] is
/// true: register (with [`spawn`] or [`Synced::flag`]) before anyone asks.
#[derive(Clone, Debug)]
pub struct Synced {
    /// Registered flags not set yet; waiters follow it.
    pending: Arc<tokio::sync::watch::Sender<usize>>,
}

impl Default for Synced {
    fn default() -> Self {
        Synced {
            pending: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }
}

impl Synced {
    /// Registers one more watch, not synced yet.
    pub fn flag(&self) -> SyncFlag {
        self.pending.send_modify(|n| *n += 1);
        SyncFlag {
            pending: Some(Arc::clone(&self.pending)),
        }
    }

    /// Whether every registered watch has synced.
    pub fn all(&self) -> bool {
        *self.pending.borrow() == 0
    }

    /// Resolves once every registered watch has synced (at once if they
    /// have). Never resolves while a watch that ended unsynced is registered,
    /// so callers race it with shutdown or a timeout. The future owns a clone
    /// of the set, so it can be moved into a task.
    pub fn wait_all(&self) -> impl Future<Output = ()> + Send + 'static {
        let pending = Arc::clone(&self.pending);
        async move {
            let mut rx = pending.subscribe();
            // `pending` keeps the sender, so the channel cannot close here;
            // if it ever did, the set could never sync: wait forever.
            if rx.wait_for(|n| *n == 0).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// One watch's entry in a [`Synced`] set. Setting it twice counts once; a
/// flag dropped unset (its watch ended first) keeps the set unsynced.
#[derive(Debug)]
pub struct SyncFlag {
    pending: Option<Arc<tokio::sync::watch::Sender<usize>>>,
}

impl SyncFlag {
    /// Marks this watch synced.
    pub fn set(&mut self) {
        if let Some(pending) = self.pending.take() {
            pending.send_modify(|n| *n = n.saturating_sub(1));
        }
    }

    /// Whether [`SyncFlag::set`] was called.
    pub fn is_set(&self) -> bool {
        self.pending.is_none()
    }
}

/// Feeds `events` into `sink` until the stream ends or `shutdown`: complete
/// lists as one [`Sink::reset`] (then `synced` is set), changes one by one,
/// errors to [`Sink::failed`] and the log.
pub async fn feed<K, E, S>(events: E, mut sink: S, mut synced: SyncFlag, shutdown: Shutdown)
where
    K: Resource<DynamicType = ()>,
    E: Stream<Item = Result<Event<K>, watcher::Error>>,
    S: Sink<K>,
{
    let kind = K::kind(&());
    futures::pin_mut!(events);
    let mut lister = Lister::default();
    loop {
        let event = tokio::select! {
            _ = shutdown.signaled() => return,
            e = events.next() => e,
        };
        let Some(event) = event else { return };
        let changed = match event {
            Err(error) => {
                tracing::warn!(%kind, %error, "watch failed; retrying with backoff");
                sink.failed(&error);
                false
            }
            Ok(event) => match lister.step(event) {
                None => false,
                Some(Step::Reset(all)) => {
                    let count = all.len();
                    let changed = sink.reset(all);
                    synced.set();
                    tracing::debug!(%kind, count, "watch: listed");
                    changed
                }
                Some(Step::Apply(obj)) => {
                    tracing::debug!(%kind, ns = ?obj.namespace(), name = %obj.name_any(), "watch: applied");
                    sink.apply(obj)
                }
                Some(Step::Delete(obj)) => {
                    tracing::debug!(%kind, ns = ?obj.namespace(), name = %obj.name_any(), "watch: deleted");
                    sink.delete(obj)
                }
            },
        };
        if changed {
            sink.changed();
        }
    }
}

/// Registers a flag in `synced` now (so [`Synced::all`] and
/// [`Synced::wait_all`] wait for this watch from the moment it is started) and runs [`feed`] as a task.
pub fn spawn<K, E, S>(
    events: E,
    sink: S,
    synced: &Synced,
    shutdown: &Shutdown,
) -> tokio::task::JoinHandle<()>
where
    K: Resource<DynamicType = ()> + Send + 'static,
    E: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    S: Sink<K> + Send + 'static,
{
    tokio::spawn(feed(events, sink, synced.flag(), shutdown.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use std::sync::Mutex;
    use std::time::Duration;

    fn mk(name: &str) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some(name.into());
        cm.metadata.namespace = Some("ns".into());
        cm
    }

    fn names(objs: &[ConfigMap]) -> Vec<String> {
        objs.iter().map(|o| o.name_any()).collect()
    }

    #[test]
    fn lister_hands_over_only_complete_lists() {
        use Event::*;
        // (events, steps expected, one per event)
        type Case = (Vec<Event<&'static str>>, Vec<Option<Step<&'static str>>>);
        let cases: Vec<Case> = vec![
            (
                vec![Init, InitApply("a"), InitApply("b"), InitDone],
                vec![None, None, None, Some(Step::Reset(vec!["a", "b"]))],
            ),
            (vec![Init, InitDone], vec![None, Some(Step::Reset(vec![]))]),
            (
                vec![Apply("a"), Delete("b")],
                vec![Some(Step::Apply("a")), Some(Step::Delete("b"))],
            ),
            // A re-list that starts over drops what the broken one collected.
            (
                vec![Init, InitApply("old"), Init, InitApply("new"), InitDone],
                vec![None, None, None, None, Some(Step::Reset(vec!["new"]))],
            ),
            // Two lists in a row do not share objects.
            (
                vec![
                    Init,
                    InitApply("a"),
                    InitDone,
                    Init,
                    InitApply("b"),
                    InitDone,
                ],
                vec![
                    None,
                    None,
                    Some(Step::Reset(vec!["a"])),
                    None,
                    None,
                    Some(Step::Reset(vec!["b"])),
                ],
            ),
        ];
        for (events, expected) in cases {
            let mut lister = Lister::default();
            let got: Vec<_> = events.into_iter().map(|e| lister.step(e)).collect();
            assert_eq!(got, expected);
        }
    }

    #[test]
    fn retry_delays() {
        use Failure::*;
        let ms = Duration::from_millis;
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // (case, steps: Some((failure, seconds after t0, jitter)) or None
        // for a success, the delays expected for the failures)
        type Case = (
            &'static str,
            Vec<Option<(Failure, u64, f64)>>,
            Vec<Duration>,
        );
        let cases: Vec<Case> = vec![
            (
                "errors in a row double, capped at 15 s before jitter",
                (0..7).map(|i| Some((Other, i, 0.0))).collect(),
                vec![
                    ms(800),
                    ms(1600),
                    ms(3200),
                    ms(6400),
                    ms(12800),
                    ms(15000),
                    ms(15000),
                ],
            ),
            (
                "jitter stretches a delay by up to (not quite) twice",
                vec![
                    Some((Other, 0, 0.5)),
                    Some((Other, 1, 1.0)),
                    Some((Other, 2, 7.0)),
                ],
                vec![
                    ms(1200),
                    ms(3198) + Duration::from_micros(400),
                    ms(6396) + Duration::from_micros(800),
                ],
            ),
            (
                "a success starts over",
                vec![
                    Some((Other, 0, 0.0)),
                    Some((Other, 1, 0.0)),
                    None,
                    Some((Other, 2, 0.0)),
                ],
                vec![ms(800), ms(1600), ms(800)],
            ),
            (
                "a 410 after an outage re-lists at once and starts the doubling over",
                vec![
                    Some((Other, 0, 0.0)),
                    Some((Other, 1, 0.0)),
                    Some((Other, 2, 0.0)),
                    Some((Gone, 3, 0.5)),
                    Some((Other, 4, 0.0)),
                ],
                vec![ms(800), ms(1600), ms(3200), ms(100), ms(800)],
            ),
            (
                "410s in a row: one fast re-list per 30 s, the rest wait",
                vec![
                    Some((Gone, 0, 0.0)),
                    None,
                    Some((Gone, 1, 0.0)),
                    Some((Gone, 2, 0.0)),
                    None,
                    Some((Gone, 29, 0.0)),
                    Some((Gone, 30, 0.0)),
                ],
                vec![ms(100), ms(800), ms(1600), ms(800), ms(100)],
            ),
        ];
        for (case, steps, expected) in cases {
            let mut retry = Retry::default();
            let mut got = Vec::new();
            for step in steps {
                match step {
                    Some((failure, s, jitter)) => got.push(retry.failed(failure, at(s), jitter)),
                    None => retry.succeeded(),
                }
            }
            assert_eq!(got, expected, "{case}");
        }
    }

    #[test]
    fn failure_classes() {
        use kube::core::Status;
        let status = |code: u16| {
            let mut s = Status::failure("x", "Expired");
            s.code = code;
            s
        };
        let cases: Vec<(&str, watcher::Error, Failure)> = vec![
            (
                "410 event",
                watcher::Error::WatchError(Box::new(status(410))),
                Failure::Gone,
            ),
            (
                "500 event",
                watcher::Error::WatchError(Box::new(status(500))),
                Failure::Other,
            ),
            (
                "410 at watch start",
                watcher::Error::WatchStartFailed(kube::Error::Api(Box::new(status(410)))),
                Failure::Gone,
            ),
            (
                "403 at watch start",
                watcher::Error::WatchStartFailed(kube::Error::Api(Box::new(status(403)))),
                Failure::Other,
            ),
            (
                "410 on the list is not a resume",
                watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status(410)))),
                Failure::Other,
            ),
            (
                "no resource version",
                watcher::Error::NoResourceVersion,
                Failure::Other,
            ),
        ];
        for (case, error, expected) in cases {
            assert_eq!(Failure::of(&error), expected, "{case}");
        }
    }

    #[test]
    fn jitter_is_in_range_and_varies() {
        let draws: Vec<f64> = (0..64).map(|_| jitter()).collect();
        assert!(draws.iter().all(|j| (0.0..1.0).contains(j)), "{draws:?}");
        let distinct: std::collections::BTreeSet<u64> = draws.iter().map(|j| j.to_bits()).collect();
        assert!(distinct.len() > 60, "{draws:?}");
    }

    #[test]
    fn synced_waits_for_every_registered_flag() {
        let synced = Synced::default();
        assert!(synced.all(), "nothing registered");
        let mut a = synced.flag();
        let mut b = synced.clone().flag();
        assert!(!synced.all());
        a.set();
        assert!(a.is_set() && !b.is_set());
        assert!(!synced.all());
        a.set(); // counts once
        assert!(!synced.all());
        b.set();
        assert!(synced.all());
        let c = synced.flag();
        assert!(!synced.all());
        drop(c); // a watch that ended unsynced keeps the set unsynced
        assert!(!synced.all());
    }

    #[tokio::test]
    async fn wait_all_resolves_once_every_flag_is_set() {
        // (case, flags registered, flags set after the waiter started,
        // flags dropped unset, whether the waiter resolves)
        type Case = (
            &'static str,
            usize,
            &'static [usize],
            &'static [usize],
            bool,
        );
        let cases: &[Case] = &[
            ("nothing registered", 0, &[], &[], true),
            ("one, set", 1, &[0], &[], true),
            ("three, set out of order", 3, &[2, 0, 1], &[], true),
            ("two, one set", 2, &[0], &[], false),
            ("two, one set twice", 2, &[0, 0], &[], false),
            ("two, one ended unsynced", 2, &[0], &[1], false),
        ];
        for (name, registered, set, dropped, resolves) in cases {
            let synced = Synced::default();
            let mut flags: Vec<Option<SyncFlag>> =
                (0..*registered).map(|_| Some(synced.flag())).collect();
            let waiter = tokio::spawn(synced.wait_all());
            tokio::task::yield_now().await;
            for &i in *dropped {
                flags[i] = None;
            }
            for &i in *set {
                if let Some(flag) = flags[i].as_mut() {
                    flag.set();
                }
            }
            let woke = tokio::time::timeout(Duration::from_millis(100), waiter)
                .await
                .is_ok();
            assert_eq!(woke, *resolves, "{name}: waiter");
            assert_eq!(synced.all(), *resolves, "{name}: all()");
            // A waiter that starts late sees the same answer at once.
            let late = tokio::time::timeout(Duration::from_millis(20), synced.wait_all())
                .await
                .is_ok();
            assert_eq!(late, *resolves, "{name}: late waiter");
        }
    }

    /// Records what the feed asked, and whether the set was synced each time
    /// `changed` was called.
    struct Recorder {
        log: Arc<Mutex<Vec<String>>>,
        synced: Synced,
    }

    impl Recorder {
        fn push(&self, line: String) {
            self.log.lock().unwrap().push(line);
        }
    }

    impl Sink<ConfigMap> for Recorder {
        fn reset(&mut self, all: Vec<ConfigMap>) -> bool {
            self.push(format!("reset {:?}", names(&all)));
            true
        }
        fn apply(&mut self, obj: ConfigMap) -> bool {
            self.push(format!("apply {}", obj.name_any()));
            // Say "unchanged" for objects named "same".
            obj.name_any() != "same"
        }
        fn delete(&mut self, obj: ConfigMap) -> bool {
            self.push(format!("delete {}", obj.name_any()));
            true
        }
        fn changed(&mut self) {
            self.push(format!("changed synced={}", self.synced.all()));
        }
        fn failed(&mut self, error: &watcher::Error) {
            self.push(format!("failed {error}"));
        }
    }

    /// Spawns a feed of `events` into a [`Recorder`]: the task, the
    /// recorder's log and the sync set.
    fn start<E>(
        events: E,
        shutdown: &Shutdown,
    ) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<String>>>, Synced)
    where
        E: Stream<Item = Result<Event<ConfigMap>, watcher::Error>> + Send + 'static,
    {
        let synced = Synced::default();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Recorder {
            log: Arc::clone(&log),
            synced: synced.clone(),
        };
        let task = spawn(events, sink, &synced, shutdown);
        (task, log, synced)
    }

    async fn run(events: Vec<Result<Event<ConfigMap>, watcher::Error>>) -> (Vec<String>, bool) {
        let (task, log, synced) = start(futures::stream::iter(events), &Shutdown::new());
        assert!(!synced.all(), "registered before the task runs");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        let lines = log.lock().unwrap().clone();
        (lines, synced.all())
    }

    /// A failed list, a list of a and b, three changes, then a failure and
    /// a list of d alone.
    fn feed() -> Vec<Result<Event<ConfigMap>, watcher::Error>> {
        vec![
            Err(watcher::Error::NoResourceVersion),
            Ok(Event::Init),
            Ok(Event::InitApply(mk("a"))),
            Ok(Event::InitApply(mk("b"))),
            Ok(Event::InitDone),
            Ok(Event::Apply(mk("c"))),
            Ok(Event::Apply(mk("same"))),
            Ok(Event::Delete(mk("a"))),
            Err(watcher::Error::NoResourceVersion),
            Ok(Event::Init),
            Ok(Event::InitApply(mk("d"))),
            Ok(Event::InitDone),
        ]
    }

    #[tokio::test]
    async fn feed_resets_then_syncs_then_applies() {
        let (log, synced) = run(feed()).await;
        let failed = format!("failed {}", watcher::Error::NoResourceVersion);
        assert_eq!(
            log,
            vec![
                failed.as_str(),
                r#"reset ["a", "b"]"#,
                "changed synced=true",
                "apply c",
                "changed synced=true",
                "apply same",
                "delete a",
                "changed synced=true",
                failed.as_str(),
                r#"reset ["d"]"#,
                "changed synced=true",
            ]
        );
        assert!(synced);
    }

    #[tokio::test]
    async fn feed_without_a_complete_list_never_syncs() {
        // The feed cut in its first list: the failure, `Init` and a.
        let (log, synced) = run(feed().into_iter().take(3).collect()).await;
        assert_eq!(log.len(), 1, "{log:?}");
        assert!(!synced);
    }

    #[tokio::test]
    async fn feed_stops_on_shutdown() {
        let shutdown = Shutdown::new();
        let events = futures::stream::pending::<Result<Event<ConfigMap>, watcher::Error>>();
        let (task, log, synced) = start(events, &shutdown);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!task.is_finished());
        shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert!(log.lock().unwrap().is_empty());
        assert!(!synced.all());
    }
}
