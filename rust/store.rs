//! A bounded LRU store with optional per-entry TTL and counters.
//!
//! Layout: a `hashbrown::HashTable` of slot indices into a slab of slots that
//! form an intrusive doubly linked list (most recently used at the head), so
//! get, set and evict are O(1). Entries with a TTL are also indexed by a lazy
//! min-heap of expiry times (stale heap items carry an old generation and are
//! skipped), so expired entries are purged before any live entry is evicted,
//! in O(log n) amortized per insert.
//!
//! Invariants: `len() <= max_size`; an expired entry (now >= its expiry) is
//! never returned, it is removed and counted as one expiration and one miss;
//! `hits + misses` equals the number of counted lookups. The store is generic
//! over the key `K` and value `V` and never drops either while the caller
//! holds its lock: everything it removes is pushed to an `out` vector the
//! caller drops after unlocking (Python values may run `__del__`). Lookups
//! take the key's hash and an equality closure, so a caller can probe with a
//! borrowed encoding and allocate a key only on insert.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use hashbrown::HashTable;

use crate::error::CoreError;

const NIL: usize = usize::MAX;

struct Slot<K, V> {
    entry: Option<(K, V)>,
    hash: u64,
    expires: f64,
    prev: usize,
    next: usize,
    gen: u64,
}

/// One item of the expiry heap: (expiry, slot, generation).
#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: f64,
    slot: usize,
    gen: u64,
}

impl PartialEq for Deadline {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Deadline {}
impl PartialOrd for Deadline {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Deadline {
    fn cmp(&self, other: &Self) -> Ordering {
        self.at
            .total_cmp(&other.at)
            .then(self.slot.cmp(&other.slot))
            .then(self.gen.cmp(&other.gen))
    }
}

/// The result of a lookup.
pub enum Lookup<'a, K, V> {
    /// The live value.
    Hit(&'a V),
    /// No entry.
    Miss,
    /// The entry had expired; it was removed and is handed back for dropping.
    Expired(K, V),
}

/// Counters and sizes, as reported by `info()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Info {
    /// Lookups that returned a value.
    pub hits: u64,
    /// Lookups that returned nothing (including expired entries).
    pub misses: u64,
    /// Live entries removed to respect `max_size`.
    pub evictions: u64,
    /// Entries removed because their TTL had passed.
    pub expirations: u64,
    /// Entries held now.
    pub size: usize,
    /// The bound, `None` when unbounded.
    pub max_size: Option<usize>,
}

/// A bounded LRU map with per-entry TTL. Not synchronized: wrap it in a lock.
pub struct Store<K, V> {
    table: HashTable<usize>,
    slots: Vec<Slot<K, V>>,
    free: Vec<usize>,
    head: usize,
    tail: usize,
    len: usize,
    max_size: Option<usize>,
    ttl: Option<f64>,
    deadlines: BinaryHeap<Reverse<Deadline>>,
    timed: usize,
    hits: u64,
    misses: u64,
    evictions: u64,
    expirations: u64,
}

/// Check a TTL in seconds: finite and > 0.
pub fn check_ttl(ttl: f64) -> Result<f64, CoreError> {
    if ttl.is_finite() && ttl > 0.0 {
        Ok(ttl)
    } else {
        Err(CoreError::value(
            "ttl",
            "a finite number of seconds > 0 or None",
            ttl,
        ))
    }
}

impl<K, V> Store<K, V> {
    /// A store holding at most `max_size` entries (`None`: unbounded), each
    /// living `ttl` seconds by default (`None`: forever).
    pub fn new(max_size: Option<usize>, ttl: Option<f64>) -> Result<Self, CoreError> {
        if max_size == Some(0) {
            return Err(CoreError::value("max_size", "an int >= 1 or None", 0));
        }
        let ttl = ttl.map(check_ttl).transpose()?;
        Ok(Self {
            table: HashTable::new(),
            slots: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            len: 0,
            max_size,
            ttl,
            deadlines: BinaryHeap::new(),
            timed: 0,
            hits: 0,
            misses: 0,
            evictions: 0,
            expirations: 0,
        })
    }

    /// The bound on entries.
    pub fn max_size(&self) -> Option<usize> {
        self.max_size
    }

    /// The default TTL in seconds.
    pub fn ttl(&self) -> Option<f64> {
        self.ttl
    }

    /// Entries held (expired ones not purged yet included; see [`Self::purge_expired`]).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the store holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether any entry has a finite expiry (only then is the clock read).
    #[inline]
    pub fn has_timed_entries(&self) -> bool {
        self.timed > 0
    }

    /// Counters and sizes.
    pub fn info(&self) -> Info {
        Info {
            hits: self.hits,
            misses: self.misses,
            evictions: self.evictions,
            expirations: self.expirations,
            size: self.len,
            max_size: self.max_size,
        }
    }

    #[inline]
    fn find(&self, hash: u64, mut eq: impl FnMut(&K) -> bool) -> Option<usize> {
        let slots = &self.slots;
        self.table
            .find(hash, |&i| match &slots[i].entry {
                Some((k, _)) => eq(k),
                None => false,
            })
            .copied()
    }

    #[inline]
    fn unlink(&mut self, i: usize) {
        let (prev, next) = (self.slots[i].prev, self.slots[i].next);
        if prev == NIL {
            self.head = next;
        } else {
            self.slots[prev].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.slots[next].prev = prev;
        }
    }

    #[inline]
    fn push_front(&mut self, i: usize) {
        self.slots[i].prev = NIL;
        self.slots[i].next = self.head;
        if self.head != NIL {
            self.slots[self.head].prev = i;
        }
        self.head = i;
        if self.tail == NIL {
            self.tail = i;
        }
    }

    #[inline]
    fn touch(&mut self, i: usize) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

    /// Remove slot `i` (live) from every index and return its entry.
    fn take(&mut self, i: usize) -> (K, V) {
        let hash = self.slots[i].hash;
        if let Ok(found) = self.table.find_entry(hash, |&j| j == i) {
            found.remove();
        }
        self.unlink(i);
        let slot = &mut self.slots[i];
        if slot.expires.is_finite() {
            self.timed -= 1;
        }
        slot.gen = slot.gen.wrapping_add(1);
        slot.expires = f64::INFINITY;
        self.len -= 1;
        self.free.push(i);
        match slot.entry.take() {
            Some(kv) => kv,
            // A listed slot is always live; reaching this is a logic error in this file.
            None => unreachable!("store slot {i} listed but empty"),
        }
    }

    #[inline]
    fn is_expired(&self, i: usize, now: f64) -> bool {
        now >= self.slots[i].expires
    }

    fn set_expiry(&mut self, i: usize, expires: f64) {
        let slot = &mut self.slots[i];
        let was_timed = slot.expires.is_finite();
        slot.gen = slot.gen.wrapping_add(1);
        slot.expires = expires;
        let gen = slot.gen;
        match (was_timed, expires.is_finite()) {
            (false, true) => self.timed += 1,
            (true, false) => self.timed -= 1,
            _ => {}
        }
        if expires.is_finite() {
            self.deadlines.push(Reverse(Deadline {
                at: expires,
                slot: i,
                gen,
            }));
        }
    }

    /// Look `hash`/`eq` up: a hit moves the entry to the front. `now` is read
    /// only when the entry has a TTL. A miss is counted only if `count_miss`.
    pub fn get(
        &mut self,
        hash: u64,
        now: impl FnOnce() -> f64,
        eq: impl FnMut(&K) -> bool,
        count_miss: bool,
    ) -> Lookup<'_, K, V> {
        let Some(i) = self.find(hash, eq) else {
            if count_miss {
                self.misses += 1;
            }
            return Lookup::Miss;
        };
        if self.slots[i].expires.is_finite() && self.is_expired(i, now()) {
            let (k, v) = self.take(i);
            self.expirations += 1;
            if count_miss {
                self.misses += 1;
            }
            return Lookup::Expired(k, v);
        }
        self.hits += 1;
        self.touch(i);
        match &self.slots[i].entry {
            Some((_, v)) => Lookup::Hit(v),
            None => Lookup::Miss,
        }
    }

    /// Whether a live entry exists (no counters, no reordering).
    pub fn contains(
        &self,
        hash: u64,
        now: impl FnOnce() -> f64,
        eq: impl FnMut(&K) -> bool,
    ) -> bool {
        match self.find(hash, eq) {
            Some(i) => !(self.slots[i].expires.is_finite() && self.is_expired(i, now())),
            None => false,
        }
    }

    /// Visit the keys stored under `hash` for which `pre` holds (no counters).
    pub fn for_each_candidate(&self, hash: u64, mut visit: impl FnMut(&K)) {
        for &i in self.table.iter_hash(hash) {
            if let Some((k, _)) = &self.slots[i].entry {
                visit(k);
            }
        }
    }

    /// Remove every expired entry (counted as expirations) into `out`.
    pub fn purge_expired(&mut self, now: f64, out: &mut Vec<(K, V)>) {
        while let Some(Reverse(d)) = self.deadlines.peek().copied() {
            let slot = &self.slots[d.slot];
            let stale = slot.gen != d.gen || slot.entry.is_none();
            if !stale && d.at > now {
                break;
            }
            self.deadlines.pop();
            if !stale {
                out.push(self.take(d.slot));
                self.expirations += 1;
            }
        }
        // Re-setting timed keys leaves stale heap items; rebuild when they dominate.
        if self.deadlines.len() > 64 && self.deadlines.len() > 2 * self.timed {
            let slots = &self.slots;
            self.deadlines
                .retain(|Reverse(d)| slots[d.slot].gen == d.gen && slots[d.slot].entry.is_some());
        }
    }

    /// Store `value` under `key`. `ttl`: `Some(Some(t))` this entry lives `t`
    /// seconds, `Some(None)` forever, `None` the store's default. Replaced and
    /// evicted entries (and expired ones purged on the way) go to `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn insert(
        &mut self,
        hash: u64,
        key: K,
        value: V,
        ttl: Option<Option<f64>>,
        now: impl FnOnce() -> f64,
        eq: impl FnMut(&K) -> bool,
        out: &mut Vec<(K, V)>,
    ) {
        let ttl = ttl.unwrap_or(self.ttl);
        let mut expires = f64::INFINITY;
        if ttl.is_some() || self.timed > 0 {
            let now = now();
            if let Some(t) = ttl {
                expires = now + t;
            }
            self.purge_expired(now, out);
        }
        if let Some(i) = self.find(hash, eq) {
            if let Some((_, v)) = &mut self.slots[i].entry {
                let old = std::mem::replace(v, value);
                out.push((key, old));
            }
            self.set_expiry(i, expires);
            self.touch(i);
            return;
        }
        if let Some(max) = self.max_size {
            while self.len >= max && self.tail != NIL {
                let t = self.tail;
                out.push(self.take(t));
                self.evictions += 1;
            }
        }
        let i = match self.free.pop() {
            Some(i) => {
                let slot = &mut self.slots[i];
                slot.entry = Some((key, value));
                slot.hash = hash;
                i
            }
            None => {
                self.slots.push(Slot {
                    entry: Some((key, value)),
                    hash,
                    expires: f64::INFINITY,
                    prev: NIL,
                    next: NIL,
                    gen: 0,
                });
                self.slots.len() - 1
            }
        };
        let slots = &self.slots;
        self.table.insert_unique(hash, i, |&j| slots[j].hash);
        self.len += 1;
        self.push_front(i);
        if expires.is_finite() {
            self.set_expiry(i, expires);
        }
    }

    /// Remove the entry for `hash`/`eq`, returning it and whether it was
    /// live (an expired one is removed too, counted as an expiration, and
    /// reported as not live). Hits and misses are not counted.
    pub fn remove(
        &mut self,
        hash: u64,
        now: impl FnOnce() -> f64,
        eq: impl FnMut(&K) -> bool,
    ) -> Option<((K, V), bool)> {
        let i = self.find(hash, eq)?;
        let live = !(self.slots[i].expires.is_finite() && self.is_expired(i, now()));
        if !live {
            self.expirations += 1;
        }
        Some((self.take(i), live))
    }

    /// Remove every entry into `out`; counters are kept.
    pub fn clear(&mut self, out: &mut Vec<(K, V)>) {
        out.extend(self.slots.drain(..).filter_map(|s| s.entry));
        self.table.clear();
        self.free.clear();
        self.deadlines.clear();
        self.head = NIL;
        self.tail = NIL;
        self.len = 0;
        self.timed = 0;
    }

    /// Visit every entry (for the garbage collector's traversal).
    pub fn for_each_entry(&self, mut visit: impl FnMut(&K, &V)) {
        for slot in &self.slots {
            if let Some((k, v)) = &slot.entry {
                visit(k, v);
            }
        }
    }

    /// Keys from most to least recently used (for tests and debugging).
    pub fn keys_mru(&self) -> Vec<&K> {
        let mut out = Vec::with_capacity(self.len);
        let mut i = self.head;
        while i != NIL {
            if let Some((k, _)) = &self.slots[i].entry {
                out.push(k);
            }
            i = self.slots[i].next;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::DefaultHasher;
    use std::hash::{Hash, Hasher};

    fn h(k: u32) -> u64 {
        let mut s = DefaultHasher::new();
        k.hash(&mut s);
        s.finish()
    }

    struct T {
        s: Store<u32, u32>,
        now: f64,
    }

    impl T {
        fn new(max: Option<usize>, ttl: Option<f64>) -> Self {
            Self {
                s: Store::new(max, ttl).unwrap(),
                now: 0.0,
            }
        }
        fn get(&mut self, k: u32) -> Option<u32> {
            let now = self.now;
            match self.s.get(h(k), || now, |x| *x == k, true) {
                Lookup::Hit(v) => Some(*v),
                _ => None,
            }
        }
        fn set(&mut self, k: u32, v: u32) -> Vec<(u32, u32)> {
            self.set_ttl(k, v, None)
        }
        fn set_ttl(&mut self, k: u32, v: u32, ttl: Option<Option<f64>>) -> Vec<(u32, u32)> {
            let now = self.now;
            let mut out = Vec::new();
            self.s
                .insert(h(k), k, v, ttl, || now, |x| *x == k, &mut out);
            out
        }
    }

    #[test]
    fn lru_evicts_least_recently_used() {
        let mut t = T::new(Some(2), None);
        t.set(1, 10);
        t.set(2, 20);
        assert_eq!(t.get(1), Some(10));
        let out = t.set(3, 30);
        assert_eq!(out, vec![(2, 20)]);
        assert_eq!(t.get(2), None);
        assert_eq!(t.get(1), Some(10));
        assert_eq!(t.get(3), Some(30));
        let i = t.s.info();
        assert_eq!((i.hits, i.misses, i.evictions, i.size), (3, 1, 1, 2));
    }

    #[test]
    fn replacing_a_value_hands_back_the_old_one() {
        let mut t = T::new(Some(2), None);
        t.set(1, 10);
        let out = t.set(1, 11);
        assert_eq!(out, vec![(1, 10)]);
        assert_eq!(t.get(1), Some(11));
        assert_eq!(t.s.len(), 1);
    }

    #[test]
    fn expired_entries_are_never_returned() {
        let mut t = T::new(None, Some(1.0));
        t.set(1, 10);
        t.now = 0.999;
        assert_eq!(t.get(1), Some(10));
        t.now = 1.0;
        assert_eq!(t.get(1), None);
        let i = t.s.info();
        assert_eq!((i.hits, i.misses, i.expirations, i.size), (1, 1, 1, 0));
    }

    #[test]
    fn per_entry_ttl_overrides_the_default() {
        let mut t = T::new(None, Some(10.0));
        t.set_ttl(1, 10, Some(Some(1.0)));
        t.set_ttl(2, 20, Some(None));
        t.set(3, 30);
        t.now = 5.0;
        assert_eq!(t.get(1), None);
        assert_eq!(t.get(2), Some(20));
        assert_eq!(t.get(3), Some(30));
        t.now = 1e9;
        assert_eq!(t.get(2), Some(20));
        assert_eq!(t.get(3), None);
    }

    #[test]
    fn expired_entries_are_purged_before_live_ones_are_evicted() {
        let mut t = T::new(Some(2), Some(1.0));
        t.set(1, 10);
        t.now = 0.5;
        t.set(2, 20);
        assert_eq!(t.get(1), Some(10)); // 1 is now most recently used
        t.now = 1.2; // 1 expired, 2 alive
        let out = t.set(3, 30);
        assert_eq!(out, vec![(1, 10)]);
        assert_eq!(t.get(2), Some(20));
        assert_eq!(t.get(3), Some(30));
        assert_eq!(t.s.info().evictions, 0);
        assert_eq!(t.s.info().expirations, 1);
    }

    #[test]
    fn resetting_timed_keys_keeps_the_heap_bounded() {
        let mut t = T::new(Some(4), Some(100.0));
        for i in 0..10_000u32 {
            t.now = f64::from(i) * 1e-3;
            t.set(i % 3, i);
        }
        assert!(t.s.deadlines.len() <= 2 * t.s.timed + 65);
        assert_eq!(t.s.len(), 3);
    }

    #[test]
    fn removing_an_expired_entry_reports_it_absent() {
        let mut t = T::new(None, Some(1.0));
        t.set(1, 10);
        assert_eq!(
            t.s.remove(h(1), || 2.0, |x| *x == 1),
            Some(((1, 10), false))
        );
        assert_eq!(t.s.info().expirations, 1);
        assert!(t.s.is_empty());
    }

    #[test]
    fn delete_and_clear() {
        let mut t = T::new(Some(3), None);
        t.set(1, 10);
        t.set(2, 20);
        assert_eq!(t.s.remove(h(1), || 0.0, |x| *x == 1), Some(((1, 10), true)));
        assert_eq!(t.s.remove(h(1), || 0.0, |x| *x == 1), None);
        let mut out = Vec::new();
        t.s.clear(&mut out);
        assert_eq!(out, vec![(2, 20)]);
        assert!(t.s.is_empty());
        t.set(5, 50);
        assert_eq!(t.get(5), Some(50));
        assert_eq!(t.s.keys_mru(), vec![&5]);
    }

    #[test]
    fn contains_does_not_touch_or_count() {
        let mut t = T::new(Some(2), Some(1.0));
        t.set(1, 10);
        t.set(2, 20);
        assert!(t.s.contains(h(1), || 0.0, |x| *x == 1));
        assert!(!t.s.contains(h(1), || 1.0, |x| *x == 1));
        assert_eq!(t.s.info().hits + t.s.info().misses, 0);
        assert_eq!(t.s.keys_mru(), vec![&2, &1]);
    }

    #[test]
    fn bad_input_is_rejected() {
        assert!(Store::<u32, u32>::new(Some(0), None).is_err());
        assert!(Store::<u32, u32>::new(None, Some(0.0)).is_err());
        assert!(Store::<u32, u32>::new(None, Some(-1.0)).is_err());
        assert!(Store::<u32, u32>::new(None, Some(f64::NAN)).is_err());
        assert!(Store::<u32, u32>::new(None, Some(f64::INFINITY)).is_err());
    }

    #[test]
    fn random_operations_match_a_simple_model() {
        // A naive Vec-based LRU is the oracle; a fixed-seed RNG drives both.
        let mut rng = crate::backoff::SplitMix64::new(7);
        let max = 5usize;
        let mut t = T::new(Some(max), None);
        let mut model: Vec<(u32, u32)> = Vec::new(); // front = MRU
        for step in 0..20_000u32 {
            let k = (rng.next_u64() % 9) as u32;
            match rng.next_u64() % 3 {
                0 => {
                    let got = t.get(k);
                    let pos = model.iter().position(|(mk, _)| *mk == k);
                    let want = pos.map(|p| {
                        let e = model.remove(p);
                        model.insert(0, e);
                        e.1
                    });
                    assert_eq!(got, want, "step {step}");
                }
                1 => {
                    t.set(k, step);
                    if let Some(p) = model.iter().position(|(mk, _)| *mk == k) {
                        model.remove(p);
                    } else if model.len() == max {
                        model.pop();
                    }
                    model.insert(0, (k, step));
                }
                _ => {
                    let got = t.s.remove(h(k), || 0.0, |x| *x == k).map(|e| e.0 .1);
                    let want = model
                        .iter()
                        .position(|(mk, _)| *mk == k)
                        .map(|p| model.remove(p).1);
                    assert_eq!(got, want);
                }
            }
            assert_eq!(t.s.len(), model.len());
        }
        let keys: Vec<u32> = t.s.keys_mru().into_iter().copied().collect();
        let want: Vec<u32> = model.iter().map(|e| e.0).collect();
        assert_eq!(keys, want);
    }
}
