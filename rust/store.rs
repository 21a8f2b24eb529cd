//! A bounded store with optional per-entry TTL and counters, evicting by
//! LRU or by W-TinyLFU.
//!
//! Layout: a `hashbrown::HashTable` of slot indices into a slab of slots that
//! form intrusive doubly linked lists (most recently used at the head), so
//! get, set and evict are O(1). The LRU policy uses one list. W-TinyLFU
//! ([`Policy::TinyLfu`]) uses three: a small admission window (LRU) in front
//! of a segmented main region (probation + protected). A new entry always
//! enters the window, so a value read right after it was stored is a hit
//! whatever the burst of new keys around it; the entry pushed out of the
//! window joins the main region only if a [`FrequencySketch`] says it is
//! more popular than the main region's victim. A hill climber resizes the
//! window every sample (10 x `max_size` lookups) in the direction that raised
//! the hit ratio (Caffeine's design), so recency-heavy traces get a large
//! window and frequency-heavy ones a small one. Entries with a TTL are also indexed by a lazy
//! min-heap of expiry times (stale heap items carry an old generation and are
//! skipped), so expired entries are purged before any live entry is evicted,
//! in O(log n) amortized per insert.
//!
//! Invariants: `len() <= max_size` (between calls); under W-TinyLFU
//! `1 <= window_max < max_size` (`= 1` when `max_size` is 1); an expired entry (now >= its expiry) is
//! never returned, it is removed and counted as one expiration and one miss;
//! `hits + misses` equals the number of counted lookups. The store is generic
//! over the key `K` and value `V` and never drops either while the caller
//! holds its lock: everything it removes is pushed to an `out` collection the
//! caller drops after unlocking (Python values may run `__del__`). Lookups
//! take the key's hash and an equality closure, so a caller can probe with a
//! borrowed encoding and allocate a key only on insert.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use hashbrown::HashTable;

use crate::backoff::SplitMix64;
use crate::error::CoreError;
use crate::sketch::FrequencySketch;

const NIL: usize = usize::MAX;
/// The list of an LRU store, and the admission window of a W-TinyLFU one.
const WINDOW: u8 = 0;
/// W-TinyLFU: main-region entries seen once since they left the window.
const PROBATION: u8 = 1;
/// W-TinyLFU: main-region entries hit again while on probation.
const PROTECTED: u8 = 2;

/// How a full store picks the entry to drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Least recently used.
    #[default]
    Lru,
    /// Window TinyLFU: recency window, frequency-gated main region.
    TinyLfu,
}

impl Policy {
    /// The policy named `name` (`"lru"` or `"tinylfu"`).
    pub fn parse(name: &str) -> Result<Self, CoreError> {
        match name {
            "lru" => Ok(Policy::Lru),
            "tinylfu" => Ok(Policy::TinyLfu),
            other => Err(CoreError::value(
                "policy",
                "'lru' or 'tinylfu'",
                format!("{other:?}"),
            )),
        }
    }

    /// The name `parse` accepts.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Lru => "lru",
            Policy::TinyLfu => "tinylfu",
        }
    }
}

/// Head, tail and length of one intrusive list.
#[derive(Debug, Clone, Copy)]
struct Ends {
    head: usize,
    tail: usize,
    len: usize,
}

const EMPTY: Ends = Ends {
    head: NIL,
    tail: NIL,
    len: 0,
};

/// Caffeine's hill-climber constants: first step 6.25% of the capacity, a
/// 5-point change of the hit ratio restarts the climb, steps decay by 2%.
const STEP_PERCENT: f64 = 0.0625;
const RESTART_THRESHOLD: f64 = 0.05;
const STEP_DECAY: f64 = 0.98;
/// A candidate this popular is admitted over a more popular victim with
/// probability 1/128, so an attacker who inflates one victim's count cannot
/// freeze the main region (Caffeine's defence against hash flooding).
const WARM_CANDIDATE: u8 = 6;

/// The sketch starts sized for this many entries and grows with the store
/// (to `max_size`), so a huge bound costs no memory until entries arrive.
const SKETCH_START: usize = 1024;

/// The W-TinyLFU state of a store.
struct TinyLfu {
    sketch: FrequencySketch,
    max: usize,
    window: f64,
    window_max: usize,
    protected_max: usize,
    sample_hits: u64,
    sample_misses: u64,
    sample_size: u64,
    prev_hit_rate: f64,
    step: f64,
    rng: SplitMix64,
}

impl TinyLfu {
    fn new(max: usize) -> Self {
        let sized = max.min(SKETCH_START);
        let sample = (sized as u64).saturating_mul(10);
        let mut t = Self {
            sketch: FrequencySketch::new(sized, sample),
            max,
            window: (max as f64 * 0.01).max(1.0),
            window_max: 1,
            protected_max: 0,
            sample_hits: 0,
            sample_misses: 0,
            sample_size: sample.max(16),
            prev_hit_rate: 0.0,
            step: -STEP_PERCENT * max as f64,
            rng: SplitMix64::new(0x5EED ^ max as u64),
        };
        t.resize(0.0);
        t
    }

    /// Grow the sketch (and the samples) once the store outgrows it: a
    /// compare per insert, the growth out of line.
    #[inline(always)]
    fn fit(&mut self, len: usize) {
        if len > self.sketch.capacity() && self.sketch.capacity() < self.max {
            self.grow(len);
        }
    }

    #[cold]
    #[inline(never)]
    fn grow(&mut self, len: usize) {
        let sized = self.max.min(len.saturating_mul(2));
        let sample = (sized as u64).saturating_mul(10);
        self.sketch.ensure_capacity(sized, sample);
        self.sample_size = sample.max(16);
    }

    /// Move the window target by `amount` entries and derive the region bounds.
    fn resize(&mut self, amount: f64) {
        let hi = (self.max.saturating_sub(1)).max(1) as f64;
        self.window = (self.window + amount).clamp(1.0, hi);
        self.window_max = self.window.round() as usize;
        let main = self.max.saturating_sub(self.window_max);
        self.protected_max = main - main / 5;
    }

    /// Count one lookup; at the end of a sample, climb towards a better window.
    #[inline]
    fn record(&mut self, hit: bool) {
        if hit {
            self.sample_hits += 1;
        } else {
            self.sample_misses += 1;
        }
        if self.sample_hits + self.sample_misses >= self.sample_size {
            self.climb();
        }
    }

    fn climb(&mut self) {
        let n = (self.sample_hits + self.sample_misses) as f64;
        let rate = self.sample_hits as f64 / n;
        let change = rate - self.prev_hit_rate;
        let amount = if change >= 0.0 { self.step } else { -self.step };
        self.step = if change.abs() >= RESTART_THRESHOLD {
            STEP_PERCENT * self.max as f64 * amount.signum()
        } else {
            STEP_DECAY * amount
        };
        self.prev_hit_rate = rate;
        self.sample_hits = 0;
        self.sample_misses = 0;
        self.resize(amount);
    }

    /// Whether `candidate` (frequency `cf`) should replace a victim of frequency `vf`.
    #[inline]
    fn admit(&mut self, cf: u8, vf: u8) -> bool {
        cf > vf || (cf >= WARM_CANDIDATE && self.rng.next_u64() & 127 == 0)
    }
}

struct Slot<K, V> {
    entry: Option<(K, V)>,
    hash: u64,
    expires: f64,
    prev: usize,
    next: usize,
    gen: u64,
    region: u8,
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

/// A bounded map with per-entry TTL. Not synchronized: wrap it in a lock.
pub struct Store<K, V> {
    table: HashTable<usize>,
    slots: Vec<Slot<K, V>>,
    free: Vec<usize>,
    /// Window (the whole store under LRU), probation, protected; a fourth,
    /// unused list lets `region & 3` index without a bounds check.
    lists: [Ends; 4],
    lfu: Option<Box<TinyLfu>>,
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
    /// living `ttl` seconds by default (`None`: forever), evicting by LRU.
    pub fn new(max_size: Option<usize>, ttl: Option<f64>) -> Result<Self, CoreError> {
        Self::with_policy(max_size, ttl, Policy::Lru)
    }

    /// Like [`Self::new`], evicting by `policy` (W-TinyLFU needs a bound).
    pub fn with_policy(
        max_size: Option<usize>,
        ttl: Option<f64>,
        policy: Policy,
    ) -> Result<Self, CoreError> {
        if max_size == Some(0) {
            return Err(CoreError::value("max_size", "an int >= 1 or None", 0));
        }
        let ttl = ttl.map(check_ttl).transpose()?;
        let lfu = match (policy, max_size) {
            (Policy::Lru, _) => None,
            (Policy::TinyLfu, Some(max)) => Some(Box::new(TinyLfu::new(max))),
            (Policy::TinyLfu, None) => {
                return Err(CoreError::value(
                    "max_size",
                    "an int >= 1 with policy 'tinylfu' (an unbounded store never evicts)",
                    "None",
                ))
            }
        };
        Ok(Self {
            table: HashTable::new(),
            slots: Vec::new(),
            free: Vec::new(),
            lists: [EMPTY; 4],
            lfu,
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

    /// The eviction policy.
    pub fn policy(&self) -> Policy {
        if self.lfu.is_some() {
            Policy::TinyLfu
        } else {
            Policy::Lru
        }
    }

    /// W-TinyLFU: the current bound of the admission window (`None` under LRU).
    pub fn window_max(&self) -> Option<usize> {
        self.lfu.as_ref().map(|l| l.window_max)
    }

    /// Entries in the window (the whole store under LRU), probation and protected.
    pub fn region_sizes(&self) -> [usize; 3] {
        [self.lists[0].len, self.lists[1].len, self.lists[2].len]
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
        let list = &mut self.lists[usize::from(self.slots[i].region & 3)];
        list.len -= 1;
        if prev == NIL {
            list.head = next;
        } else {
            self.slots[prev].next = next;
        }
        if next == NIL {
            list.tail = prev;
        } else {
            self.slots[next].prev = prev;
        }
    }

    #[inline]
    fn push_front(&mut self, i: usize, region: u8) {
        let list = &mut self.lists[usize::from(region & 3)];
        let head = list.head;
        list.head = i;
        list.len += 1;
        if list.tail == NIL {
            list.tail = i;
        }
        if head != NIL {
            self.slots[head].prev = i;
        }
        let slot = &mut self.slots[i];
        slot.prev = NIL;
        slot.next = head;
        slot.region = region;
    }

    /// Mark slot `i` used: to the front of its list (LRU), or W-TinyLFU's
    /// promotion from probation to protected. Always inlined: as a call it
    /// cost the LRU hit of a cached call 5-7 ns (27 to 34 ns).
    #[inline(always)]
    fn touch(&mut self, i: usize) {
        let region = self.slots[i].region;
        if region == PROBATION {
            self.promote(i);
        } else if self.lists[usize::from(region & 3)].head != i {
            self.unlink(i);
            self.push_front(i, region);
        }
    }

    /// W-TinyLFU: a probation entry used again moves to protected.
    #[cold]
    fn promote(&mut self, i: usize) {
        self.unlink(i);
        self.push_front(i, PROTECTED);
        self.demote_protected();
    }

    /// W-TinyLFU: move protected entries over the bound back to probation
    /// (inlined: on most inserts there are none, one compare).
    #[inline(always)]
    fn demote_protected(&mut self) {
        let bound = self.lfu.as_ref().map_or(usize::MAX, |l| l.protected_max);
        while self.lists[usize::from(PROTECTED)].len > bound {
            let t = self.lists[usize::from(PROTECTED)].tail;
            self.unlink(t);
            self.push_front(t, PROBATION);
        }
    }

    /// W-TinyLFU: the main region's next victim other than `not` (`NIL` if none).
    fn victim(&self, not: usize) -> usize {
        for region in [PROBATION, PROTECTED] {
            let mut v = self.lists[usize::from(region & 3)].tail;
            if v == not && v != NIL {
                v = self.slots[v].prev;
            }
            if v != NIL {
                return v;
            }
        }
        NIL
    }

    /// W-TinyLFU: bring the store back within its bounds after inserting
    /// slot `newest`. Entries over the window's bound move to probation, each
    /// one admitted over the main region's victim only if the sketch finds
    /// it more popular; the loser is evicted. When the window is under its
    /// bound (the hill climber grew it), the window's oldest entry duels the
    /// main region's victim in place: the window grows only at the expense
    /// of less popular main entries.
    fn evict_tinylfu(&mut self, max: usize, newest: usize, out: &mut impl Extend<(K, V)>) {
        let Some(lfu) = self.lfu.as_ref() else {
            return;
        };
        let window_max = lfu.window_max;
        while self.lists[usize::from(WINDOW)].len > window_max {
            let c = self.lists[usize::from(WINDOW)].tail;
            self.unlink(c);
            self.push_front(c, PROBATION);
            if self.len > max {
                let v = self.victim(c);
                let drop = self.duel(c, v);
                out.extend(Some(self.take(drop)));
                self.evictions += 1;
            }
        }
        while self.len > max {
            let v = self.victim(NIL);
            let c = self.lists[usize::from(WINDOW)].tail;
            // The entry just stored is never the one dropped: read right
            // after, it is a hit.
            let drop = match (c, v) {
                (NIL, NIL) => break,
                (c, NIL) if c != newest => c,
                (_, NIL) => break,
                // No window candidate but the newest: the two main victims
                // duel (evicting the first blindly lost hot entries whenever
                // the hill climber grew the window).
                (c, v) if c == NIL || c == newest => {
                    let v2 = self.victim(v);
                    self.duel(v, v2)
                }
                (c, v) => self.duel(c, v),
            };
            out.extend(Some(self.take(drop)));
            self.evictions += 1;
        }
        self.demote_protected();
    }

    /// W-TinyLFU: the slot to evict of candidate `c` and victim `v` (`NIL`
    /// when the main region holds no other entry).
    fn duel(&mut self, c: usize, v: usize) -> usize {
        let (Some(lfu), false) = (self.lfu.as_mut(), v == NIL) else {
            return c;
        };
        let cf = lfu.sketch.frequency(self.slots[c].hash);
        let vf = lfu.sketch.frequency(self.slots[v].hash);
        if lfu.admit(cf, vf) {
            v
        } else {
            c
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
        slot.region = WINDOW;
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
                self.count_miss();
            }
            return Lookup::Miss;
        };
        if self.slots[i].expires.is_finite() && self.is_expired(i, now()) {
            let (k, v) = self.take(i);
            self.expirations += 1;
            if count_miss {
                self.count_miss();
            }
            return Lookup::Expired(k, v);
        }
        self.hits += 1;
        if let Some(lfu) = self.lfu.as_mut() {
            lfu.sketch.increment(hash);
            lfu.record(true);
        }
        self.touch(i);
        match &self.slots[i].entry {
            Some((_, v)) => Lookup::Hit(v),
            None => Lookup::Miss,
        }
    }

    #[inline]
    fn count_miss(&mut self) {
        self.misses += 1;
        if let Some(lfu) = self.lfu.as_mut() {
            lfu.record(false);
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
    pub fn purge_expired(&mut self, now: f64, out: &mut impl Extend<(K, V)>) {
        while let Some(Reverse(d)) = self.deadlines.peek().copied() {
            let slot = &self.slots[d.slot];
            let stale = slot.gen != d.gen || slot.entry.is_none();
            if !stale && d.at > now {
                break;
            }
            self.deadlines.pop();
            if !stale {
                out.extend(Some(self.take(d.slot)));
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
        out: &mut impl Extend<(K, V)>,
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
        if let Some(lfu) = self.lfu.as_mut() {
            lfu.sketch.increment(hash);
        }
        if let Some(i) = self.find(hash, eq) {
            if let Some((_, v)) = &mut self.slots[i].entry {
                let old = std::mem::replace(v, value);
                out.extend(Some((key, old)));
            }
            self.set_expiry(i, expires);
            self.touch(i);
            return;
        }
        if let (Some(max), None) = (self.max_size, &self.lfu) {
            let tail = usize::from(WINDOW);
            while self.len >= max && self.lists[tail].tail != NIL {
                let t = self.lists[tail].tail;
                out.extend(Some(self.take(t)));
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
                    region: WINDOW,
                });
                self.slots.len() - 1
            }
        };
        let slots = &self.slots;
        self.table.insert_unique(hash, i, |&j| slots[j].hash);
        self.len += 1;
        self.push_front(i, WINDOW);
        if expires.is_finite() {
            self.set_expiry(i, expires);
        }
        if let (Some(max), Some(lfu)) = (self.max_size, self.lfu.as_mut()) {
            lfu.fit(self.len);
            self.evict_tinylfu(max, i, out);
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
        self.lists = [EMPTY; 4];
        if let Some(lfu) = self.lfu.as_mut() {
            lfu.sketch.clear();
        }
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

    /// Keys from most to least recently used (for tests and debugging);
    /// under W-TinyLFU the window, then protected, then probation.
    pub fn keys_mru(&self) -> Vec<&K> {
        let mut out = Vec::with_capacity(self.len);
        for region in [WINDOW, PROTECTED, PROBATION] {
            let mut i = self.lists[usize::from(region & 3)].head;
            while i != NIL {
                if let Some((k, _)) = &self.slots[i].entry {
                    out.push(k);
                }
                i = self.slots[i].next;
            }
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
        let mut rng = SplitMix64::new(7);
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

#[cfg(test)]
mod tinylfu_tests {
    use super::*;
    use crate::backoff::SplitMix64;

    /// A Zipf(s) sampler over `n` ranks by inverse CDF.
    struct Zipf {
        cdf: Vec<f64>,
    }

    impl Zipf {
        fn new(n: usize, s: f64) -> Self {
            let mut acc = 0.0;
            let mut cdf = Vec::with_capacity(n);
            for r in 1..=n {
                acc += 1.0 / (r as f64).powf(s);
                cdf.push(acc);
            }
            for c in &mut cdf {
                *c /= acc;
            }
            Self { cdf }
        }
        fn sample(&self, rng: &mut SplitMix64) -> u64 {
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            self.cdf.partition_point(|&c| c < u) as u64
        }
    }

    fn mix(k: u64) -> u64 {
        // Stands in for a key hash (the store sees hashes, not keys).
        k.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17)
    }

    /// Hit ratio of a store of `max` entries replaying `trace` as a cache would.
    fn replay(policy: Policy, max: usize, trace: &[u64]) -> f64 {
        let mut s: Store<u64, ()> = Store::with_policy(Some(max), None, policy).unwrap();
        let mut out = Vec::new();
        for &k in trace {
            let h = mix(k);
            if let Lookup::Miss = s.get(h, || 0.0, |x| *x == k, true) {
                s.insert(h, k, (), None, || 0.0, |x| *x == k, &mut out);
                out.clear();
            }
            assert!(s.len() <= max);
        }
        let i = s.info();
        i.hits as f64 / (i.hits + i.misses) as f64
    }

    /// The bench's three traces, scaled by `n` keys and `len` requests.
    fn traces(n: usize, len: usize) -> [Vec<u64>; 3] {
        let z = Zipf::new(n, 0.9);
        let mut rng = SplitMix64::new(1);
        let stationary: Vec<u64> = (0..len).map(|_| z.sample(&mut rng)).collect();
        let mut fresh = n as u64;
        let scan: Vec<u64> = (0..len)
            .map(|_| {
                if rng.next_u64() % 5 == 0 {
                    fresh += 1;
                    fresh
                } else {
                    z.sample(&mut rng)
                }
            })
            .collect();
        let shift: Vec<u64> = (0..len)
            .map(|i| z.sample(&mut rng) + if i < len / 2 { 0 } else { 10 * n as u64 })
            .collect();
        [stationary, scan, shift]
    }

    #[test]
    fn tinylfu_beats_lru_on_skewed_traces() {
        for trace in traces(10_000, 200_000) {
            let lru = replay(Policy::Lru, 100, &trace);
            let lfu = replay(Policy::TinyLfu, 100, &trace);
            assert!(lfu > lru + 0.02, "tinylfu {lfu:.3} vs lru {lru:.3}");
        }
    }

    fn lfu(max: usize) -> Store<u64, u64> {
        Store::with_policy(Some(max), None, Policy::TinyLfu).unwrap()
    }

    fn put(s: &mut Store<u64, u64>, k: u64, v: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        s.insert(mix(k), k, v, None, || 0.0, |x| *x == k, &mut out);
        out
    }

    fn fetch(s: &mut Store<u64, u64>, k: u64) -> Option<u64> {
        match s.get(mix(k), || 0.0, |x| *x == k, true) {
            Lookup::Hit(v) => Some(*v),
            _ => None,
        }
    }

    #[test]
    fn a_value_read_right_after_it_was_stored_is_a_hit() {
        for max in [1, 2, 3, 10, 1000] {
            let mut s = lfu(max);
            // Make the main region popular first, then burst new keys.
            for round in 0..20 {
                for k in 0..max as u64 {
                    if fetch(&mut s, k).is_none() {
                        put(&mut s, k, round);
                    }
                }
            }
            for k in 1_000_000..1_000_000 + 5 * max as u64 {
                put(&mut s, k, k);
                assert_eq!(fetch(&mut s, k), Some(k), "max {max}");
                assert!(s.len() <= max);
            }
        }
    }

    #[test]
    fn a_scan_of_one_off_keys_does_not_flush_the_hot_set() {
        let mut s = lfu(100);
        for _ in 0..10 {
            for k in 0..90 {
                if fetch(&mut s, k).is_none() {
                    put(&mut s, k, k);
                }
            }
        }
        for k in 10_000..20_000 {
            put(&mut s, k, k);
        }
        let kept = (0..90).filter(|&k| fetch(&mut s, k).is_some()).count();
        assert!(kept >= 80, "only {kept} of 90 hot keys kept");
        let i = s.info();
        assert_eq!(i.size, 100);
        assert_eq!(i.evictions, 10_090 - 100);
    }

    #[test]
    fn a_hot_set_survives_a_crawl_whatever_the_hash_seed() {
        // The docs' example: 50 hot keys in 100 entries, a crawl of 4,000
        // one-off keys, two between hot reads (LRU keeps none of the hot
        // keys); hashes vary per process.
        for seed in 0..40u64 {
            let mut s: Store<u64, ()> =
                Store::with_policy(Some(100), None, Policy::TinyLfu).unwrap();
            let mut out = Vec::new();
            let mut access = |s: &mut Store<u64, ()>, k: u64| -> bool {
                let h = mix(k ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
                let hit = matches!(s.get(h, || 0.0, |x| *x == k, true), Lookup::Hit(_));
                if !hit {
                    s.insert(h, k, (), None, || 0.0, |x| *x == k, &mut out);
                }
                hit
            };
            for _ in 0..5 {
                for k in 0..50 {
                    access(&mut s, k);
                }
            }
            let mut hot_hits = 0;
            for i in 0..2000 {
                access(&mut s, 10_000 + 2 * i);
                access(&mut s, 10_001 + 2 * i);
                hot_hits += usize::from(access(&mut s, i % 50));
            }
            assert!(hot_hits >= 1990, "seed {seed}: {hot_hits} hot hits");
        }
    }

    #[test]
    fn the_window_stays_within_bounds_while_it_adapts() {
        let mut s = lfu(50);
        let mut rng = SplitMix64::new(3);
        let mut seen = std::collections::HashSet::new();
        for step in 0..200_000u64 {
            // Recency-heavy first (a sliding range), then frequency-heavy.
            let k = if step < 100_000 {
                step / 4 + rng.next_u64() % 40
            } else {
                rng.next_u64() % 30 + (rng.next_u64() % 2) * (rng.next_u64() % 5000)
            };
            if fetch(&mut s, k).is_none() {
                put(&mut s, k, k);
            }
            let w = s.window_max().unwrap();
            assert!((1..50).contains(&w));
            seen.insert(w);
            let r = s.region_sizes();
            assert_eq!(r.iter().sum::<usize>(), s.len());
            assert!(s.len() <= 50);
        }
        assert!(seen.len() > 1, "the hill climber never moved the window");
    }

    #[test]
    fn tinylfu_returns_what_was_stored_last() {
        let mut rng = SplitMix64::new(11);
        let mut s = lfu(8);
        let mut model = std::collections::HashMap::new();
        for step in 0..50_000u64 {
            let k = rng.next_u64() % 20;
            match rng.next_u64() % 3 {
                0 => {
                    if let Some(v) = fetch(&mut s, k) {
                        assert_eq!(model.get(&k), Some(&v), "step {step}");
                    }
                }
                1 => {
                    for (ek, ev) in put(&mut s, k, step) {
                        if ek != k {
                            assert_eq!(model.remove(&ek), Some(ev));
                        }
                    }
                    model.insert(k, step);
                }
                _ => {
                    let got = s.remove(mix(k), || 0.0, |x| *x == k).map(|e| e.0 .1);
                    assert_eq!(got, model.remove(&k));
                }
            }
            assert_eq!(s.len(), model.len());
            assert!(s.len() <= 8);
        }
        let i = s.info();
        assert_eq!(i.size, s.keys_mru().len());
    }

    #[test]
    fn a_huge_bound_costs_no_memory_until_entries_arrive() {
        let mut s = lfu(1 << 40);
        assert_eq!(s.lfu.as_ref().unwrap().sketch.capacity(), 1024);
        for k in 0..5000 {
            put(&mut s, k, k);
        }
        let cap = s.lfu.as_ref().unwrap().sketch.capacity();
        assert!((5000..=16_384).contains(&cap), "{cap}");
        assert_eq!(s.len(), 5000);
        assert_eq!(fetch(&mut s, 4999), Some(4999));
    }

    #[test]
    fn policy_names_and_bounds_are_checked() {
        assert_eq!(Policy::parse("lru"), Ok(Policy::Lru));
        assert_eq!(Policy::parse("tinylfu"), Ok(Policy::TinyLfu));
        assert!(Policy::parse("LFU").is_err());
        assert!(Store::<u64, u64>::with_policy(None, None, Policy::TinyLfu).is_err());
        assert_eq!(lfu(5).policy().name(), "tinylfu");
    }

    #[test]
    #[ignore = "prints the bench-size hit ratios (cargo test --release -- --ignored)"]
    #[allow(clippy::print_stdout)] // a diagnostic: its output is the point
    fn full_size_hit_ratios() {
        for (name, trace) in ["stationary", "scan", "shift"]
            .iter()
            .zip(traces(100_000, 1_000_000))
        {
            let lru = replay(Policy::Lru, 1000, &trace);
            let lfu = replay(Policy::TinyLfu, 1000, &trace);
            println!("{name}: lru {lru:.3} tinylfu {lfu:.3}");
        }
    }
}
