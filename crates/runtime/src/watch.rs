//! One way to keep a local view of a Kubernetes kind current, shared by mic
//! and nmi: list every object, then follow changes, and list again after a
//! watch is lost. Errors never stop a watch: the stream from [`events`]
//! retries with kube's default backoff (0.8 s doubling to at most 30 s,
//! with jitter, starting over after two quiet minutes).
//!
//! [`Lister`] decides what each watcher event means for the view (pure,
//! table-tested); [`feed`] performs that on a [`Sink`] until the stream ends
//! or shutdown starts; [`spawn`] registers a [`SyncFlag`] in a [`Synced`] set
//! and runs [`feed`] as a task. A view is synced once its first complete list
//! is in it, and stays synced while later re-lists run; [`Synced::wait_all`]
//! lets a task await the moment every view is.

use std::fmt::Debug;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::Shutdown;

/// The watcher's events for `api` with `config`, retried with kube's default
/// backoff after every error (each error is still yielded, once).
pub fn events<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher::watcher(api, config).default_backoff()
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
