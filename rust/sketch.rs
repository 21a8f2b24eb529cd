//! A count-min frequency sketch with 4-bit counters and periodic aging: the
//! popularity estimate behind the store's TinyLFU admission.
//!
//! Layout: a power-of-two table of 64-byte blocks (one cache line each) of
//! eight `u64` words, 16 four-bit counters per word. A key's hash, mixed
//! once, picks one block; each of the [`DEPTH`] rows then picks one of its
//! own two words of that block and one counter in it, from distinct bits of
//! the mixed hash (Caffeine's `BlockFrequencySketch`). So an estimate or an
//! increment reads one cache line and mixes the hash once, where four
//! independent rows over the whole table read four lines and paid a multiply
//! per row. The estimate is the smallest of the key's counters. Increments
//! are conservative (only the counters at the minimum grow), which keeps
//! collisions from inflating rare keys.
//!
//! Invariants: every counter is <= 15; after `sample_size` increments every
//! counter is halved (aging), so the sketch forgets old popularity and a hot
//! set that changes is learnt again within one sample.

/// Counters per key (rows of the count-min sketch).
pub const DEPTH: usize = 4;
/// The largest value of a counter.
pub const MAX_COUNT: u8 = 15;
/// Words per block: two per row.
const BLOCK_WORDS: usize = 2 * DEPTH;

/// One cache line of counters: a key's counters all live in one block.
#[derive(Debug, Clone, Copy, Default)]
#[repr(align(64))]
struct Block([u64; BLOCK_WORDS]);

/// A count-min sketch of 4-bit counters that halves itself periodically.
#[derive(Debug, Clone)]
pub struct FrequencySketch {
    table: Vec<Block>,
    /// 64 - log2(blocks): a mixed hash shifted right by it indexes the table.
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

/// Where a key's counter of `row` is in its block: (word, bit shift). The
/// low 20 bits of the mixed hash choose them (1 bit for the word, 4 for the
/// counter, per row); the block comes from the top bits (at most 23 of them:
/// the table has at most 2^23 blocks), so the two never overlap.
#[inline(always)]
fn cell(h: u64, row: usize) -> (usize, u32) {
    let word = 2 * row + ((h >> row) & 1) as usize;
    let nibble = ((h >> (4 + 4 * row)) & 0xF) as u32;
    (word & (BLOCK_WORDS - 1), nibble << 2)
}

impl FrequencySketch {
    /// A sketch sized for a cache of `capacity` entries: `2 * capacity`
    /// words (32 counters, 16 bytes per entry, rounded up to a power of two,
    /// at least 16 words, at most 2^26 words = 512 MiB) and aging every
    /// `sample_size` increments. Two words per entry, not one: with every
    /// counter of a key in one block, one word per entry lost 0.5-0.7 points
    /// of hit ratio on the Zipf traces of `python -m opero bench --only
    /// hitratio` (0.441 / 0.356 / 0.439 against 0.446 / 0.356 / 0.446 for
    /// four rows over the whole table); two words give 0.445 / 0.354 / 0.445.
    pub fn new(capacity: usize, sample_size: u64) -> Self {
        let blocks = Self::words_for(capacity) / BLOCK_WORDS;
        Self {
            table: vec![Block::default(); blocks],
            shift: 64 - blocks.trailing_zeros(),
            additions: 0,
            sample_size: sample_size.max(16),
        }
    }

    fn words_for(capacity: usize) -> usize {
        capacity
            .saturating_mul(2)
            .clamp(16, 1 << 26)
            .next_power_of_two()
    }

    /// The number of entries the table is sized for (half its words).
    pub fn capacity(&self) -> usize {
        self.table.len() * BLOCK_WORDS / 2
    }

    /// Grow the table for `capacity` entries (counts restart from zero) and
    /// age every `sample_size` increments; a smaller capacity changes nothing.
    pub fn ensure_capacity(&mut self, capacity: usize, sample_size: u64) {
        let words = Self::words_for(capacity);
        if words > self.table.len() * BLOCK_WORDS {
            *self = Self::new(capacity, sample_size);
        }
    }

    /// The increments between two agings.
    pub fn sample_size(&self) -> u64 {
        self.sample_size
    }

    /// The mixed hash and the index of its block.
    #[inline(always)]
    fn locate(&self, hash: u64) -> (u64, usize) {
        let h = mix(hash);
        // `shift` is 64 - log2(blocks) >= 41, so the index is < blocks; with
        // one block (shift 64) a shift would overflow: index 0.
        let block = h.checked_shr(self.shift).unwrap_or(0) as usize;
        (h, block)
    }

    /// The estimated number of recent occurrences of `hash` (0..=15).
    #[inline]
    pub fn frequency(&self, hash: u64) -> u8 {
        let (h, b) = self.locate(hash);
        let Some(block) = self.table.get(b) else {
            return 0;
        };
        let mut min = u64::from(MAX_COUNT);
        for row in 0..DEPTH {
            let (word, shift) = cell(h, row);
            min = min.min((block.0[word] >> shift) & 0xF);
        }
        min as u8
    }

    /// Record one occurrence of `hash`; age the sketch when a sample is full.
    #[inline]
    pub fn increment(&mut self, hash: u64) {
        let (h, b) = self.locate(hash);
        let Some(block) = self.table.get_mut(b) else {
            return;
        };
        let cells: [(usize, u32); DEPTH] = std::array::from_fn(|row| cell(h, row));
        let counts: [u64; DEPTH] = cells.map(|(word, shift)| (block.0[word] >> shift) & 0xF);
        let min = counts.iter().copied().min().unwrap_or(0);
        if min >= u64::from(MAX_COUNT) {
            return;
        }
        for ((word, shift), count) in cells.into_iter().zip(counts) {
            if count == min {
                block.0[word] += 1 << shift;
            }
        }
        self.additions += 1;
        if self.additions >= self.sample_size {
            self.age();
        }
    }

    /// Halve every counter (and the addition count).
    #[cold]
    pub fn age(&mut self) {
        for block in &mut self.table {
            for w in &mut block.0 {
                *w = (*w >> 1) & 0x7777_7777_7777_7777;
            }
        }
        self.additions /= 2;
    }

    /// Forget everything.
    pub fn clear(&mut self) {
        self.table.iter_mut().for_each(|b| *b = Block::default());
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
    fn a_keys_counters_share_one_block() {
        let mut s = FrequencySketch::new(4096, u64::MAX);
        for key in [0u64, 1, 42, u64::MAX, 0xDEAD_BEEF] {
            s.clear();
            s.increment(key);
            let touched: Vec<usize> = (0..s.table.len())
                .filter(|&b| s.table[b].0.iter().any(|&w| w != 0))
                .collect();
            assert_eq!(touched.len(), 1, "key {key} spread over blocks {touched:?}");
            let nibbles: u32 = s.table[touched[0]]
                .0
                .iter()
                .map(|w| (0..16).filter(|n| (w >> (4 * n)) & 0xF == 1).count() as u32)
                .sum();
            assert_eq!(nibbles, DEPTH as u32, "key {key}: one counter per row");
            assert_eq!(s.frequency(key), 1);
        }
        assert_eq!(align_of::<Block>(), 64);
    }

    #[test]
    fn the_smallest_and_largest_tables_index_in_bounds() {
        // The largest table (2^26 words, 512 MiB) is checked by its size only.
        assert_eq!(FrequencySketch::words_for(usize::MAX), 1 << 26);
        let mut small = FrequencySketch::new(1, u64::MAX);
        let mut large = FrequencySketch::new(1 << 21, u64::MAX);
        assert_eq!((small.capacity(), large.capacity()), (8, 1 << 21));
        for k in (0..64u64).map(|k| k.wrapping_mul(0x9E37_79B9_7F4A_7C15)) {
            small.increment(k);
            large.increment(k);
            assert!(small.frequency(k) >= 1 && large.frequency(k) >= 1);
        }
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
