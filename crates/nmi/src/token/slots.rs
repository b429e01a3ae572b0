//! The cache's entries: one slot per (identity, token), leased by the
//! requests that use it, evicted when the map is full, dropped when no
//! request holds a slot without a token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use super::{IdentityKey, TokenError, TokenKey, now_secs};
use crate::response::Token;

/// A token is served from cache only while it has more than this left; SDKs
/// treat under 5 minutes as expired, so a pod never gets one it would refuse.
const REFRESH_MARGIN_SECS: u64 = 15 * 60;

/// Default `--max-cached-tokens`.
pub const DEFAULT_MAX_CACHED_TOKENS: usize = 4096;

/// What one slot holds.
#[derive(Debug, Default)]
pub(super) struct SlotState {
    pub(super) token: Option<Token>,
    /// The last fetch's transient failure, and when it came: requests that
    /// were already waiting for that fetch get it too, rather than each
    /// starting its own round of retries against a failing IMDS. Requests
    /// that arrive later try again.
    pub(super) failed: Option<(Instant, TokenError)>,
}

impl SlotState {
    /// The token, if it may still be served.
    pub(super) fn fresh_token(&self) -> Option<&Token> {
        self.token
            .as_ref()
            .filter(|t| t.expires_on > now_secs() + REFRESH_MARGIN_SECS)
    }
}

pub(super) type Slot = Arc<tokio::sync::Mutex<SlotState>>;
type SlotKey = (IdentityKey, TokenKey);

#[derive(Debug)]
struct Entry {
    slot: Slot,
    /// When it was last asked for (a counter, not a clock).
    used: u64,
}

#[derive(Debug, Default)]
struct Slots {
    map: HashMap<SlotKey, Entry>,
    tick: u64,
}

/// What eviction needs to know of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryState {
    /// A request holds it: never evicted.
    Busy,
    /// No token (a failed or abandoned fetch).
    Empty,
    /// A token too close to expiry to be served.
    Expired,
    /// A token that would be served.
    Live,
}

/// Which entry to evict: never a busy one; empty and expired entries before
/// live ones; the least recently used (`used`, smaller is older) among
/// equals. `None` when every entry is busy.
pub fn pick_victim<K>(entries: impl IntoIterator<Item = (K, EntryState, u64)>) -> Option<K> {
    entries
        .into_iter()
        .filter_map(|(k, state, used)| {
            let class = match state {
                EntryState::Busy => return None,
                EntryState::Empty | EntryState::Expired => 0u8,
                EntryState::Live => 1,
            };
            Some(((class, used), k))
        })
        .min_by_key(|(rank, _)| *rank)
        .map(|(_, k)| k)
}

/// The entries, behind one lock held only for map operations (never across
/// a fetch).
#[derive(Debug, Default)]
pub(super) struct SlotMap(Mutex<Slots>);

/// A request's hold on one entry: when the last holder lets go of an entry
/// without a token, the entry leaves the map.
pub(super) struct Lease<'a> {
    slots: &'a Mutex<Slots>,
    key: SlotKey,
    pub(super) slot: Slot,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let ours = slots
            .map
            .get(&self.key)
            .is_some_and(|e| Arc::ptr_eq(&e.slot, &self.slot));
        // Two references: the map's and ours; the map lock keeps others from
        // taking one meanwhile.
        if ours
            && Arc::strong_count(&self.slot) == 2
            && self.slot.try_lock().is_ok_and(|s| s.token.is_none())
        {
            slots.map.remove(&self.key);
        }
    }
}

impl SlotMap {
    /// The entry for (`identity`, `token`), created if there is none; when
    /// the map already holds `max_entries`, others are evicted first
    /// ([`pick_victim`]) as long as one is not busy.
    pub(super) fn lease(
        &self,
        identity: IdentityKey,
        token: TokenKey,
        max_entries: usize,
    ) -> Lease<'_> {
        let key = (identity, token);
        let mut slots = self.0.lock().unwrap_or_else(|e| e.into_inner());
        slots.tick += 1;
        let tick = slots.tick;
        if let Some(e) = slots.map.get_mut(&key) {
            e.used = tick;
            let slot = Arc::clone(&e.slot);
            return Lease {
                slots: &self.0,
                key,
                slot,
            };
        }
        while slots.map.len() >= max_entries {
            let now = now_secs();
            let victim = pick_victim(slots.map.iter().map(|(k, e)| {
                let state = if Arc::strong_count(&e.slot) > 1 {
                    EntryState::Busy
                } else {
                    match e.slot.try_lock() {
                        Err(_) => EntryState::Busy,
                        Ok(s) => match &s.token {
                            None => EntryState::Empty,
                            Some(t) if t.expires_on <= now + REFRESH_MARGIN_SECS => {
                                EntryState::Expired
                            }
                            Some(_) => EntryState::Live,
                        },
                    }
                };
                (k, state, e.used)
            }))
            .cloned();
            match victim {
                Some(k) => {
                    slots.map.remove(&k);
                }
                // Every entry is held by a request in progress.
                None => break,
            }
        }
        let slot = Slot::default();
        slots.map.insert(
            key.clone(),
            Entry {
                slot: Arc::clone(&slot),
                used: tick,
            },
        );
        Lease {
            slots: &self.0,
            key,
            slot,
        }
    }

    /// Keeps the entries of the identities `keep` says yes to, and gives
    /// back the map's spare room after a burst.
    pub(super) fn retain(&self, mut keep: impl FnMut(&IdentityKey) -> bool) {
        let mut slots = self.0.lock().unwrap_or_else(|e| e.into_inner());
        slots.map.retain(|(identity, _), _| keep(identity));
        // Give back what a burst grew (the map never shrinks by itself).
        if slots.map.capacity() > 2 * slots.map.len() + 64 {
            slots.map.shrink_to_fit();
        }
    }

    /// Number of entries.
    pub(super) fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_table() {
        use EntryState::*;
        type Entries = Vec<(&'static str, EntryState, u64)>;
        let cases: Vec<(&str, Entries, Option<&str>)> = vec![
            ("nothing", vec![], None),
            ("all busy", vec![("a", Busy, 1), ("b", Busy, 2)], None),
            (
                "least recently used live",
                vec![("a", Live, 5), ("b", Live, 2), ("c", Live, 9)],
                Some("b"),
            ),
            (
                "expired before an older live one",
                vec![("a", Live, 1), ("b", Expired, 7)],
                Some("b"),
            ),
            (
                "empty before an older live one",
                vec![("a", Live, 1), ("b", Empty, 8)],
                Some("b"),
            ),
            (
                "oldest among empty and expired",
                vec![("a", Empty, 4), ("b", Expired, 3), ("c", Live, 0)],
                Some("b"),
            ),
            (
                "busy never, however old",
                vec![("a", Busy, 0), ("b", Live, 9)],
                Some("b"),
            ),
        ];
        for (name, entries, want) in cases {
            assert_eq!(pick_victim(entries), want, "{name}");
        }
    }
}
