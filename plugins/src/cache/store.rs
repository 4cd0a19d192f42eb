//! The cache's memory: stored responses by primary key (route, host, path, query),
//! each key holding up to [`MAX_VARIANTS`] variants told apart by the request
//! headers their response's `Vary` names, in a byte budget (`max_size`) enforced
//! with S3-FIFO eviction (Yang et al., SOSP '23; the policy behind Pingora's TinyUFO):
//!
//! - a new object enters the small FIFO (about 10% of the budget), or the main FIFO if
//!   its identity is in the ghost queue (it was evicted from the small FIFO recently);
//! - a hit bumps the object's 2-bit frequency, nothing else (no list surgery on reads);
//! - eviction from the small FIFO moves objects that were hit to the main FIFO and
//!   drops the others (remembering their identity in the ghost queue); eviction from
//!   the main FIFO gives objects with a frequency another round (decrementing it).
//!
//! One-hit wonders (a scan of distinct keys) thus pass through the small FIFO without
//! pushing out the popular objects in the main one. Objects past their serving window
//! are dropped first whatever their frequency. Every object's cost counts its body,
//! its headers and a fixed per-object overhead, so the budget bounds real memory.
//! Objects removed out of order (replaced, purged, expired) leave their id in a queue;
//! such dead ids are skipped when they reach the head, and a queue is compacted when
//! they outnumber the live ones.

use super::policy::{vary_value, Freshness};
use bytes::Bytes;
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Variants kept per primary key; storing one more drops the oldest.
pub const MAX_VARIANTS: usize = 16;
/// Bookkeeping bytes charged per object (maps, queues, the entry itself).
const OBJECT_OVERHEAD: usize = 320;
/// Bytes charged per stored header field besides its name and value.
const HEADER_OVERHEAD: usize = 64;
/// Highest access frequency remembered.
const MAX_FREQ: u8 = 3;

/// A stored response.
#[derive(Debug)]
pub struct Entry {
    /// The status.
    pub status: u16,
    /// The header fields to replay (hop-by-hop fields, `Content-Length`, `Age` and
    /// per-request fields already removed).
    pub headers: Vec<(String, String)>,
    /// The whole body.
    pub body: Bytes,
    /// The request headers the response varies on, with the values this variant was
    /// stored for (`None`: the request did not have it).
    pub vary: Vec<(http::HeaderName, Option<String>)>,
    /// The request path, for purges by prefix.
    pub path: String,
    /// When the response arrived.
    pub stored_at: Instant,
    /// Freshness lifetime and stale window.
    pub freshness: Freshness,
}

/// Whether an entry may be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Within its freshness lifetime.
    Fresh,
    /// Past it, but within its `stale-while-revalidate` window.
    Stale,
    /// Unusable.
    Dead,
}

impl Entry {
    /// The `Age` to send with it.
    pub fn age(&self, now: Instant) -> Duration {
        self.freshness.initial_age + now.saturating_duration_since(self.stored_at)
    }

    /// Fresh, stale (servable while revalidating) or dead.
    pub fn state(&self, now: Instant) -> State {
        let elapsed = now.saturating_duration_since(self.stored_at);
        if elapsed < self.freshness.fresh_for {
            State::Fresh
        } else if elapsed < self.freshness.fresh_for + self.freshness.stale_for {
            State::Stale
        } else {
            State::Dead
        }
    }

    /// Whether `req` has the header values this variant was stored for.
    pub fn matches(&self, req: &http::HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(n, v)| vary_value(req, n).as_deref() == v.as_deref())
    }

    fn same_names(&self, other: &Entry) -> bool {
        self.vary.len() == other.vary.len()
            && self.vary.iter().zip(&other.vary).all(|(a, b)| a.0 == b.0)
    }

    fn same_variant(&self, other: &Entry) -> bool {
        self.same_names(other) && self.vary.iter().zip(&other.vary).all(|(a, b)| a.1 == b.1)
    }

    /// What the entry costs in the budget (given its primary key's length).
    pub fn cost(&self, key_len: usize) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + HEADER_OVERHEAD)
            .sum();
        let vary: usize = self
            .vary
            .iter()
            .map(|(n, v)| n.as_str().len() + v.as_ref().map_or(0, String::len) + HEADER_OVERHEAD)
            .sum();
        self.body.len() + headers + vary + self.path.len() + 2 * key_len + OBJECT_OVERHEAD
    }
}

struct Slot {
    entry: Arc<Entry>,
    key: Arc<str>,
    cost: usize,
    freq: u8,
    in_main: bool,
    ghost_id: u64,
}

/// The bounded store. Not synchronized: the plugin keeps it behind a mutex, and every
/// operation is short (no I/O, no allocation proportional to a body).
pub struct Store {
    capacity: usize,
    small_target: usize,
    used: usize,
    small_used: usize,
    small_live: usize,
    main_live: usize,
    next_id: u64,
    index: HashMap<Arc<str>, Vec<u64>>,
    objects: HashMap<u64, Slot>,
    small: VecDeque<u64>,
    main: VecDeque<u64>,
    ghost: VecDeque<u64>,
    ghost_set: HashMap<u64, u32>,
    hasher: RandomState,
}

impl Store {
    /// An empty store of `capacity` bytes.
    pub fn new(capacity: usize) -> Store {
        Store {
            capacity,
            small_target: (capacity / 10).max(1),
            used: 0,
            small_used: 0,
            small_live: 0,
            main_live: 0,
            next_id: 0,
            index: HashMap::new(),
            objects: HashMap::new(),
            small: VecDeque::new(),
            main: VecDeque::new(),
            ghost: VecDeque::new(),
            ghost_set: HashMap::new(),
            hasher: RandomState::new(),
        }
    }

    /// Bytes charged for what is stored.
    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.used
    }

    /// Stored objects (variants).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether nothing is stored.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// The variant of `key` that matches `req`, if it is not dead (a dead one found on
    /// the way is dropped); counts as an access.
    pub fn lookup(
        &mut self,
        key: &str,
        req: &http::HeaderMap,
        now: Instant,
    ) -> Option<(Arc<Entry>, State)> {
        let ids = self.index.get(key)?;
        let mut found = None;
        let mut dead = Vec::new();
        for id in ids {
            let Some(slot) = self.objects.get(id) else {
                continue;
            };
            match slot.entry.state(now) {
                State::Dead => dead.push(*id),
                s if found.is_none() && slot.entry.matches(req) => found = Some((*id, s)),
                _ => {}
            }
        }
        for id in dead {
            self.remove(id);
        }
        let (id, state) = found?;
        let slot = self.objects.get_mut(&id)?;
        slot.freq = (slot.freq + 1).min(MAX_FREQ);
        Some((Arc::clone(&slot.entry), state))
    }

    /// Stores `entry` under `key`, replacing the variant with the same `Vary` values (and
    /// every variant when the `Vary` names changed); false when it is larger than the
    /// whole budget.
    pub fn insert(&mut self, key: &str, entry: Entry) -> bool {
        let cost = entry.cost(key.len());
        if cost > self.capacity {
            return false;
        }
        let key: Arc<str> = match self.index.get_key_value(key) {
            Some((k, _)) => Arc::clone(k),
            None => Arc::from(key),
        };
        // Older variants this one replaces, or that vary on other names.
        let stale: Vec<u64> = self
            .index
            .get(&key)
            .map(|ids| {
                ids.iter()
                    .copied()
                    .filter(|id| {
                        self.objects.get(id).is_some_and(|s| {
                            s.entry.same_variant(&entry) || !s.entry.same_names(&entry)
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        for id in stale {
            self.remove(id);
        }
        if let Some(ids) = self.index.get(&key) {
            if ids.len() >= MAX_VARIANTS {
                let oldest = ids[0];
                self.remove(oldest);
            }
        }
        let ghost_id = {
            let values: Vec<Option<&str>> = entry.vary.iter().map(|(_, v)| v.as_deref()).collect();
            self.hasher.hash_one((&*key, values))
        };
        let in_main = self.ghost_set.remove(&ghost_id).is_some();
        let id = self.next_id;
        self.next_id += 1;
        self.objects.insert(
            id,
            Slot {
                entry: Arc::new(entry),
                key: Arc::clone(&key),
                cost,
                freq: 0,
                in_main,
                ghost_id,
            },
        );
        self.index.entry(key).or_default().push(id);
        self.used += cost;
        if in_main {
            self.main.push_back(id);
            self.main_live += 1;
        } else {
            self.small.push_back(id);
            self.small_used += cost;
            self.small_live += 1;
        }
        let now = Instant::now();
        while self.used > self.capacity {
            if !self.evict_one(now) {
                break;
            }
        }
        true
    }

    /// Drops every variant of `key`; returns how many.
    pub fn invalidate(&mut self, key: &str) -> usize {
        let ids = self.index.get(key).cloned().unwrap_or_default();
        let n = ids.len();
        for id in ids {
            self.remove(id);
        }
        n
    }

    /// Drops every object whose path starts with `prefix` (all with `None`); returns how
    /// many.
    pub fn purge(&mut self, prefix: Option<&str>) -> usize {
        let ids: Vec<u64> = match prefix {
            None => self.objects.keys().copied().collect(),
            Some(p) => self
                .objects
                .iter()
                .filter(|(_, s)| s.entry.path.starts_with(p))
                .map(|(id, _)| *id)
                .collect(),
        };
        let n = ids.len();
        for id in ids {
            self.remove(id);
        }
        if self.objects.is_empty() {
            self.small.clear();
            self.main.clear();
            self.index.shrink_to_fit();
            self.objects.shrink_to_fit();
        }
        n
    }

    fn remove(&mut self, id: u64) -> Option<Slot> {
        let slot = self.objects.remove(&id)?;
        self.used -= slot.cost;
        if slot.in_main {
            self.main_live -= 1;
        } else {
            self.small_used -= slot.cost;
            self.small_live -= 1;
        }
        if let Some(ids) = self.index.get_mut(&slot.key) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.index.remove(&slot.key);
            }
        }
        self.compact();
        Some(slot)
    }

    /// Drops dead ids from a queue once they outnumber the live ones.
    fn compact(&mut self) {
        let objects = &self.objects;
        if self.small.len() > 2 * self.small_live + 64 {
            self.small
                .retain(|id| objects.get(id).is_some_and(|s| !s.in_main));
        }
        if self.main.len() > 2 * self.main_live + 64 {
            self.main
                .retain(|id| objects.get(id).is_some_and(|s| s.in_main));
        }
    }

    fn remember_ghost(&mut self, ghost_id: u64) {
        *self.ghost_set.entry(ghost_id).or_insert(0) += 1;
        self.ghost.push_back(ghost_id);
        let limit = self.objects.len().max(64);
        while self.ghost.len() > limit {
            let Some(old) = self.ghost.pop_front() else {
                break;
            };
            if let Some(n) = self.ghost_set.get_mut(&old) {
                *n -= 1;
                if *n == 0 {
                    self.ghost_set.remove(&old);
                }
            }
        }
    }

    /// Evicts one object; false when there is nothing left to evict.
    fn evict_one(&mut self, now: Instant) -> bool {
        loop {
            if self.objects.is_empty() {
                return false;
            }
            let from_small = self.small_used > self.small_target || self.main_live == 0;
            if from_small {
                let Some(id) = self.small.pop_front() else {
                    // Only main objects are left.
                    self.small_used = 0;
                    if self.main_live == 0 {
                        return false;
                    }
                    continue;
                };
                let Some(slot) = self.objects.get_mut(&id) else {
                    continue;
                };
                if slot.in_main {
                    continue;
                }
                if slot.freq > 0 && slot.entry.state(now) != State::Dead {
                    // Hit while in probation: promote.
                    slot.in_main = true;
                    slot.freq = 0;
                    let cost = slot.cost;
                    self.small_used -= cost;
                    self.small_live -= 1;
                    self.main_live += 1;
                    self.main.push_back(id);
                    continue;
                }
                if let Some(s) = self.remove(id) {
                    self.remember_ghost(s.ghost_id);
                }
                return true;
            }
            let Some(id) = self.main.pop_front() else {
                self.main_live = 0;
                continue;
            };
            let Some(slot) = self.objects.get_mut(&id) else {
                continue;
            };
            if !slot.in_main {
                continue;
            }
            if slot.freq > 0 && slot.entry.state(now) != State::Dead {
                slot.freq -= 1;
                self.main.push_back(id);
                continue;
            }
            self.remove(id);
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, body: usize, vary: &[(&str, Option<&str>)], fresh: u64) -> Entry {
        Entry {
            status: 200,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: Bytes::from(vec![b'x'; body]),
            vary: vary
                .iter()
                .map(|(n, v)| (n.parse().unwrap(), v.map(str::to_string)))
                .collect(),
            path: path.into(),
            stored_at: Instant::now(),
            freshness: Freshness {
                fresh_for: Duration::from_secs(fresh),
                stale_for: Duration::from_secs(0),
                initial_age: Duration::ZERO,
            },
        }
    }

    fn hm(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn check_accounting(s: &Store) {
        let used: usize = s.objects.values().map(|o| o.cost).sum();
        assert_eq!(used, s.used);
        let small: usize = s
            .objects
            .values()
            .filter(|o| !o.in_main)
            .map(|o| o.cost)
            .sum();
        assert_eq!(small, s.small_used);
        assert_eq!(
            s.objects.values().filter(|o| o.in_main).count(),
            s.main_live
        );
        assert_eq!(
            s.objects.values().filter(|o| !o.in_main).count(),
            s.small_live
        );
        let indexed: usize = s.index.values().map(Vec::len).sum();
        assert_eq!(indexed, s.objects.len());
        assert!(s.used <= s.capacity);
    }

    #[test]
    fn stores_and_finds_variants() {
        let mut s = Store::new(1 << 20);
        let now = Instant::now();
        let ae = [("accept-encoding", Some("gzip"))];
        assert!(s.insert("k", entry("/a", 10, &ae, 60)));
        assert!(s.insert("k", entry("/a", 10, &[("accept-encoding", None)], 60)));
        assert_eq!(s.len(), 2);
        let (e, st) = s
            .lookup("k", &hm(&[("accept-encoding", "gzip")]), now)
            .unwrap();
        assert_eq!(st, State::Fresh);
        assert_eq!(e.vary[0].1.as_deref(), Some("gzip"));
        let (e, _) = s.lookup("k", &hm(&[]), now).unwrap();
        assert_eq!(e.vary[0].1, None);
        assert!(s
            .lookup("k", &hm(&[("accept-encoding", "br")]), now)
            .is_none());
        // Same variant again replaces it.
        assert!(s.insert("k", entry("/a", 20, &ae, 60)));
        assert_eq!(s.len(), 2);
        // Other Vary names replace them all.
        assert!(s.insert("k", entry("/a", 20, &[("origin", Some("o"))], 60)));
        assert_eq!(s.len(), 1);
        check_accounting(&s);
    }

    #[test]
    fn caps_variants() {
        let mut s = Store::new(1 << 20);
        for i in 0..MAX_VARIANTS + 4 {
            let v = i.to_string();
            assert!(s.insert("k", entry("/a", 1, &[("x-v", Some(v.as_str()))], 60)));
        }
        assert_eq!(s.len(), MAX_VARIANTS);
        assert!(s
            .lookup("k", &hm(&[("x-v", "0")]), Instant::now())
            .is_none());
        assert!(s
            .lookup("k", &hm(&[("x-v", "19")]), Instant::now())
            .is_some());
        check_accounting(&s);
    }

    #[test]
    fn dead_entries_are_dropped() {
        let mut s = Store::new(1 << 20);
        assert!(s.insert("k", entry("/a", 10, &[], 1)));
        let later = Instant::now() + Duration::from_secs(2);
        assert!(s.lookup("k", &hm(&[]), later).is_none());
        assert!(s.is_empty());
        assert_eq!(s.used(), 0);
    }

    #[test]
    fn stays_within_budget() {
        let cap = 100 * 1024;
        let mut s = Store::new(cap);
        for i in 0..5000 {
            assert!(s.insert(&format!("k{i}"), entry(&format!("/p/{i}"), 1000, &[], 60)));
            assert!(s.used() <= cap);
        }
        assert!(s.len() < 100 && s.len() > 50, "{}", s.len());
        assert!(s.small.len() + s.main.len() <= 2 * s.len() + 130);
        check_accounting(&s);
        assert!(!s.insert("huge", entry("/h", cap, &[], 60)));
    }

    #[test]
    fn hot_objects_survive_a_scan() {
        let cap = 200 * 1400;
        let mut s = Store::new(cap);
        let now = Instant::now();
        for i in 0..50 {
            s.insert(&format!("hot{i}"), entry("/hot", 1000, &[], 600));
        }
        for round in 0..3 {
            for i in 0..50 {
                assert!(
                    s.lookup(&format!("hot{i}"), &hm(&[]), now).is_some(),
                    "round {round}: hot{i} gone"
                );
            }
            // A scan of one-hit wonders, several times the budget.
            for j in 0..1000 {
                s.insert(&format!("scan{round}-{j}"), entry("/scan", 1000, &[], 600));
            }
        }
        let hot = (0..50)
            .filter(|i| s.lookup(&format!("hot{i}"), &hm(&[]), now).is_some())
            .count();
        assert_eq!(hot, 50, "S3-FIFO keeps the hot set through scans");
        check_accounting(&s);
    }

    #[test]
    fn ghost_hits_go_to_main() {
        let cap = 20 * 1400;
        let mut s = Store::new(cap);
        s.insert("a", entry("/a", 1000, &[], 600));
        // Enough to push it out, not enough to push it out of the ghost queue.
        for j in 0..30 {
            s.insert(&format!("s{j}"), entry("/s", 1000, &[], 600));
        }
        assert!(s.lookup("a", &hm(&[]), Instant::now()).is_none());
        s.insert("a", entry("/a", 1000, &[], 600));
        let id = s.index["a"][0];
        assert!(s.objects[&id].in_main);
        check_accounting(&s);
    }

    #[test]
    fn purges_by_prefix() {
        let mut s = Store::new(1 << 20);
        s.insert("1", entry("/x/1", 1, &[], 60));
        s.insert("2", entry("/x/2", 1, &[], 60));
        s.insert("3", entry("/y/3", 1, &[], 60));
        assert_eq!(s.purge(Some("/x")), 2);
        assert_eq!(s.len(), 1);
        assert_eq!(s.invalidate("3"), 1);
        s.insert("4", entry("/z", 1, &[], 60));
        assert_eq!(s.purge(None), 1);
        assert_eq!(s.used(), 0);
        check_accounting(&s);
    }
}
