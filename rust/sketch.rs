//! A count-min frequency sketch with 4-bit counters and periodic aging: the
//! popularity estimate behind the store's TinyLFU admission.
//!
//! Layout: a power-of-two table of `u64` words, 16 four-bit counters each.
//! A key's hash picks one counter in each of [`DEPTH`] words (each row
//! remixes the hash with its own seed, so the caller's hash may be weak, e.g.
//! Python's `hash(int)`). The estimate is the smallest of those counters.
//! Increments are conservative (only the counters at the minimum grow), which
//! keeps collisions from inflating rare keys.
//!
//! Invariants: every counter is <= 15; after `sample_size` increments every
//! counter is halved (aging), so the sketch forgets old popularity and a hot
//! set that changes is learnt again within one sample.

/// Counters per key (rows of the count-min sketch).
pub const DEPTH: usize = 4;
/// The largest value of a counter.
pub const MAX_COUNT: u8 = 15;
const SEEDS: [u64; DEPTH] = [
    0x9E37_79B9_7F4A_7C15,
    0xC2B2_AE3D_27D4_EB4F,
    0x1656_67B1_9E37_79F9,
    0x27D4_EB2F_1656_67C5,
];

/// A count-min sketch of 4-bit counters that halves itself periodically.
#[derive(Debug, Clone)]
pub struct FrequencySketch {
    table: Vec<u64>,
    /// 64 - log2(words): a hash shifted right by it indexes the table.
    shift: u32,
    additions: u64,
    sample_size: u64,
}

#[inline]
fn mix(mut z: u64) -> u64 {
    // The SplitMix64 finalizer: every input bit reaches every output bit.
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl FrequencySketch {
    /// A sketch sized for a cache of `capacity` entries: `capacity` words
    /// (16 counters per entry, rounded up to a power of two, at least 16
    /// words, at most 2^26 words = 512 MiB) and aging every `sample_size`
    /// increments.
    pub fn new(capacity: usize, sample_size: u64) -> Self {
        let words = Self::words_for(capacity);
        Self {
            table: vec![0; words],
            shift: 64 - words.trailing_zeros(),
            additions: 0,
            sample_size: sample_size.max(16),
        }
    }

    fn words_for(capacity: usize) -> usize {
        capacity.clamp(16, 1 << 26).next_power_of_two()
    }

    /// The number of entries the table is sized for.
    pub fn capacity(&self) -> usize {
        self.table.len()
    }

    /// Grow the table for `capacity` entries (counts restart from zero) and
    /// age every `sample_size` increments; a smaller capacity changes nothing.
    pub fn ensure_capacity(&mut self, capacity: usize, sample_size: u64) {
        let words = Self::words_for(capacity);
        if words > self.table.len() {
            *self = Self::new(words, sample_size);
        }
    }

    /// The increments between two agings.
    pub fn sample_size(&self) -> u64 {
        self.sample_size
    }

    #[inline]
    fn slots(&self, hash: u64) -> [(usize, u32); DEPTH] {
        // One full mix, then a multiply per row (Caffeine's `indexOf`): four
        // full mixes made a W-TinyLFU miss ~100 instructions dearer.
        // Multiply-shift per row: the high bits of a product with an odd
        // constant depend on every bit of the mixed hash.
        let spread = mix(hash);
        let mut out = [(0usize, 0u32); DEPTH];
        for (row, seed) in SEEDS.iter().enumerate() {
            let h = spread.wrapping_mul(*seed | 1);
            // The top bits pick the word, the 4 below them the counter in it.
            let word = (h >> self.shift) as usize;
            let nibble = ((h >> (self.shift - 4)) & 0xF) as u32;
            out[row] = (word, nibble << 2);
        }
        out
    }

    #[inline]
    fn count(&self, (word, shift): (usize, u32)) -> u8 {
        ((self.table[word] >> shift) & 0xF) as u8
    }

    /// The estimated number of recent occurrences of `hash` (0..=15).
    pub fn frequency(&self, hash: u64) -> u8 {
        self.slots(hash)
            .iter()
            .map(|&s| self.count(s))
            .min()
            .unwrap_or(0)
    }

    /// Record one occurrence of `hash`; age the sketch when a sample is full.
    pub fn increment(&mut self, hash: u64) {
        let slots = self.slots(hash);
        let min = slots.iter().map(|&s| self.count(s)).min().unwrap_or(0);
        if min >= MAX_COUNT {
            return;
        }
        for &(word, shift) in &slots {
            if self.count((word, shift)) == min {
                self.table[word] += 1 << shift;
            }
        }
        self.additions += 1;
        if self.additions >= self.sample_size {
            self.age();
        }
    }

    /// Halve every counter (and the addition count).
    pub fn age(&mut self) {
        for w in &mut self.table {
            *w = (*w >> 1) & 0x7777_7777_7777_7777;
        }
        self.additions /= 2;
    }

    /// Forget everything.
    pub fn clear(&mut self) {
        self.table.iter_mut().for_each(|w| *w = 0);
        self.additions = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_saturate_at_fifteen() {
        let mut s = FrequencySketch::new(64, u64::MAX);
        for _ in 0..100 {
            s.increment(42);
        }
        assert_eq!(s.frequency(42), MAX_COUNT);
        assert_eq!(s.frequency(43), 0);
    }

    #[test]
    fn sequential_hashes_do_not_collide_into_one_estimate() {
        // Python's hash(int) is the int: rows must remix it.
        let mut s = FrequencySketch::new(1024, u64::MAX);
        for k in 0..1024u64 {
            s.increment(k);
        }
        let over: usize = (0..1024u64).filter(|&k| s.frequency(k) > 1).count();
        assert!(over < 20, "{over} keys over-estimated");
        let ghosts: usize = (5000..6024u64).filter(|&k| s.frequency(k) > 0).count();
        assert!(ghosts < 20, "{ghosts} unseen keys estimated seen");
    }

    #[test]
    fn growing_keeps_the_table_a_power_of_two() {
        let mut s = FrequencySketch::new(10, 100);
        assert_eq!(s.capacity(), 16);
        s.increment(7);
        s.ensure_capacity(8, 100);
        assert_eq!((s.capacity(), s.frequency(7)), (16, 1));
        s.ensure_capacity(1000, 10_000);
        assert_eq!((s.capacity(), s.sample_size()), (1024, 10_000));
        assert_eq!(s.frequency(7), 0);
    }

    #[test]
    fn aging_halves_counters() {
        let mut s = FrequencySketch::new(16, 40);
        for _ in 0..8 {
            s.increment(1);
        }
        assert_eq!(s.frequency(1), 8);
        for k in 100..132u64 {
            s.increment(k);
        }
        // The 40th increment aged the table: 8 -> 4.
        assert_eq!(s.frequency(1), 4);
        s.clear();
        assert_eq!(s.frequency(1), 0);
    }
}
