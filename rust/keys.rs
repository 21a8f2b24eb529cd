//! Canonical, typed encoding of call arguments; in-process hash; stable digest.
//!
//! Each value is written as a one-byte tag then a self-delimiting payload, so
//! the concatenation of encodings is itself unambiguous (prefix-free):
//!
//! | tag | value | payload |
//! |-----|-------|---------|
//! | `NONE` | `None` | - |
//! | `FALSE`/`TRUE` | `bool` | - |
//! | `INT` | `int` fitting `i64` | 8 bytes little endian |
//! | `BIGINT` | other `int` | varint length + two's complement LE bytes |
//! | `FLOAT` | `float` | 8 bytes LE of the bits; `-0.0` is written as `0.0` (they are equal) and every NaN as the one canonical quiet NaN, so `f(nan)` always hits |
//! | `STR` | `str` | varint length + UTF-8 (lone surrogates as `surrogatepass` bytes, tag `STR_SURROGATE`) |
//! | `BYTES` | `bytes` | varint length + bytes |
//! | `TUPLE`/`LIST` | sequences | varint count + items |
//! | `DICT` | `dict` | varint count + (key, value) encodings sorted bytewise |
//! | `SET`/`FROZENSET` | sets | varint count + item encodings sorted bytewise |
//! | `OPAQUE` | anything else | - (the object is the key's next opaque object) |
//!
//! A dict or set holding opaque objects (anywhere inside) is sorted by its
//! items' bytes, then by the hash of each item's opaque objects, the objects
//! moving with their items. If two items tie on both (a hash collision), the
//! header is followed by `UNORDERED` and one `OPAQUE`: a `frozenset` of one
//! key per item, which Python's set equality matches in any order.
//!
//! A call is `CALL` + varint count + positional items, then `KWARGS` + varint
//! count + (name, value) pairs sorted by name. So `f(1)` and `f(x=1)` are
//! different keys (the signature is not consulted), and keyword order never
//! matters.
//!
//! Invariants: two keys are equal iff their byte encodings are equal and their
//! opaque objects are pairwise equal (Python `==`); the hash is never used for
//! equality, so no crafted collision can serve a wrong hit. Only exact
//! builtin types take the canonical path; subclasses (`IntEnum`, `str`
//! subclasses, ...) are opaque. The in-process hash uses a random per-process
//! seed; the stable digest is SHA-256 over a version prefix and the encoding,
//! identical across processes, runs and machines, and is refused for opaque
//! values.

use std::hash::BuildHasher;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};
use smallvec::SmallVec;

/// Tag of `None`.
pub const NONE: u8 = 0x00;
/// Tag of `False`.
pub const FALSE: u8 = 0x01;
/// Tag of `True`.
pub const TRUE: u8 = 0x02;
/// Tag of an `int` that fits `i64`.
pub const INT: u8 = 0x03;
/// Tag of any other `int`.
pub const BIGINT: u8 = 0x04;
/// Tag of a `float`.
pub const FLOAT: u8 = 0x05;
/// Tag of a `str`.
pub const STR: u8 = 0x06;
/// Tag of a `str` holding lone surrogates (encoded with `surrogatepass`).
pub const STR_SURROGATE: u8 = 0x07;
/// Tag of `bytes`.
pub const BYTES: u8 = 0x08;
/// Tag of a `tuple`.
pub const TUPLE: u8 = 0x09;
/// Tag of a `list`.
pub const LIST: u8 = 0x0A;
/// Tag of a `dict`.
pub const DICT: u8 = 0x0B;
/// Tag of a `set`.
pub const SET: u8 = 0x0C;
/// Tag of a `frozenset`.
pub const FROZENSET: u8 = 0x0D;
/// Tag of an opaque (non-builtin or subclass) object.
pub const OPAQUE: u8 = 0x0E;
/// Tag, right after a dict's or set's header, of items replaced by one
/// opaque `frozenset` of per-item keys (items that tie in canonical order).
pub const UNORDERED: u8 = 0x0F;
/// Tag opening a call's positional arguments.
pub const CALL: u8 = 0x10;
/// Tag opening a call's keyword arguments.
pub const KWARGS: u8 = 0x11;

/// Version prefix of the stable digest: bump it if the encoding ever changes.
pub const DIGEST_PREFIX: &[u8] = b"opero-key-v1\x00";

/// Deepest nesting of containers accepted (deeper is an error, not a stack overflow).
pub const MAX_DEPTH: usize = 200;

/// The canonical quiet NaN every NaN is written as.
pub const CANONICAL_NAN: u64 = 0x7FF8_0000_0000_0000;

/// The encode buffer: on the stack up to 128 bytes (a call of a dozen small
/// arguments), so building a probe key allocates nothing. A thread-local Vec
/// was slower here: `__tls_get_addr` (general-dynamic TLS in a cdylib) alone
/// took 2% of a `Store.get`.
pub type KeyBuf = SmallVec<[u8; 128]>;

/// Byte equality without a `memcmp` call: keys are short, and the call plus
/// its setup cost more than comparing 8 bytes at a time inline (`memcmp` was
/// 5% of a `Store.get` profile).
#[inline]
pub fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut xa = a.chunks_exact(8);
    let mut xb = b.chunks_exact(8);
    for (ca, cb) in (&mut xa).zip(&mut xb) {
        let mut wa = [0u8; 8];
        let mut wb = [0u8; 8];
        wa.copy_from_slice(ca);
        wb.copy_from_slice(cb);
        if u64::from_ne_bytes(wa) != u64::from_ne_bytes(wb) {
            return false;
        }
    }
    xa.remainder()
        .iter()
        .zip(xb.remainder())
        .all(|(x, y)| x == y)
}

/// Append `n` as an unsigned LEB128 varint.
#[inline]
pub fn put_varint(buf: &mut KeyBuf, mut n: u64) {
    while n >= 0x80 {
        buf.push((n as u8) | 0x80);
        n >>= 7;
    }
    buf.push(n as u8);
}

/// Append a small int.
#[inline]
pub fn put_int(buf: &mut KeyBuf, v: i64) {
    buf.push(INT);
    buf.extend_from_slice(&v.to_le_bytes());
}

/// Append a big int given as minimal two's complement little-endian bytes.
pub fn put_bigint(buf: &mut KeyBuf, le_bytes: &[u8]) {
    buf.push(BIGINT);
    put_varint(buf, le_bytes.len() as u64);
    buf.extend_from_slice(le_bytes);
}

/// The bits a float is written as: `-0.0` as `0.0`, every NaN as one NaN.
#[inline]
pub fn float_bits(v: f64) -> u64 {
    if v.is_nan() {
        CANONICAL_NAN
    } else if v == 0.0 {
        0
    } else {
        v.to_bits()
    }
}

/// Append a float.
#[inline]
pub fn put_float(buf: &mut KeyBuf, v: f64) {
    buf.push(FLOAT);
    buf.extend_from_slice(&float_bits(v).to_le_bytes());
}

/// Append a length-prefixed byte string under `tag` (`STR`, `STR_SURROGATE`, `BYTES`).
#[inline]
pub fn put_bytes(buf: &mut KeyBuf, tag: u8, data: &[u8]) {
    buf.push(tag);
    put_varint(buf, data.len() as u64);
    buf.extend_from_slice(data);
}

/// Append a container header: its tag and item count.
#[inline]
pub fn put_header(buf: &mut KeyBuf, tag: u8, count: usize) {
    buf.push(tag);
    put_varint(buf, count as u64);
}

/// Sort the item encodings `buf[start..]` delimited by `bounds` (offsets of
/// each item's end, relative to `buf`) bytewise, in place. Used for sets and
/// dicts, whose order must not matter.
pub fn sort_items(buf: &mut KeyBuf, start: usize, bounds: &[usize]) {
    if bounds.len() < 2 {
        return;
    }
    let mut ranges: Vec<(usize, usize)> = Vec::with_capacity(bounds.len());
    let mut s = start;
    for &e in bounds {
        ranges.push((s, e));
        s = e;
    }
    let sorted_already = ranges
        .windows(2)
        .all(|w| buf[w[0].0..w[0].1] <= buf[w[1].0..w[1].1]);
    if sorted_already {
        return;
    }
    ranges.sort_by(|a, b| buf[a.0..a.1].cmp(&buf[b.0..b.1]));
    let mut sorted = Vec::with_capacity(buf.len() - start);
    for (a, b) in ranges {
        sorted.extend_from_slice(&buf[a..b]);
    }
    buf.truncate(start);
    buf.extend_from_slice(&sorted);
}

fn hasher() -> &'static foldhash::fast::RandomState {
    static STATE: OnceLock<foldhash::fast::RandomState> = OnceLock::new();
    STATE.get_or_init(foldhash::fast::RandomState::default)
}

/// The per-process random seeds of [`hash_short`].
fn seeds() -> &'static [u64; 3] {
    static SEEDS: OnceLock<[u64; 3]> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut rng = crate::backoff::SplitMix64::from_entropy();
        [rng.next_u64() | 1, rng.next_u64() | 1, rng.next_u64()]
    })
}

/// Multiply to 128 bits and fold the halves (the foldhash/wyhash mixer).
#[inline(always)]
fn folded_multiply(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

/// An encoding of at most 16 bytes as two little-endian words, zero padded,
/// plus its length; `len == LONG` marks a key that is not short (longer, or
/// holding opaque objects). Two short keys are equal iff their bytes are, so
/// the store compares them in registers, without touching the key's heap
/// data, and the hot paths build them from an int or a str directly, without
/// writing and re-reading an encode buffer (that re-read stalled on store
/// forwarding: 18% of a `Store.get` profile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Short {
    /// Bytes 0..8, little endian.
    pub w0: u64,
    /// Bytes 8..16, little endian.
    pub w1: u64,
    /// The encoding's length, or [`Short::LONG`].
    pub len: u8,
}

impl Short {
    /// The `len` of a key that is not short.
    pub const LONG: u8 = 0xFF;

    /// The marker stored for keys that are not short.
    pub const NOT_SHORT: Short = Short {
        w0: 0,
        w1: 0,
        len: Short::LONG,
    };

    /// Whether this is a real short key.
    #[inline]
    pub fn is_short(&self) -> bool {
        self.len != Self::LONG
    }

    /// The short form of `bytes`, if they fit in 16.
    #[inline]
    pub fn from_bytes(bytes: &[u8]) -> Option<Short> {
        if bytes.len() > 16 {
            return None;
        }
        let mut buf = [0u8; 16];
        buf[..bytes.len()].copy_from_slice(bytes);
        let mut w = [0u8; 8];
        w.copy_from_slice(&buf[..8]);
        let w0 = u64::from_le_bytes(w);
        w.copy_from_slice(&buf[8..]);
        let w1 = u64::from_le_bytes(w);
        Some(Short {
            w0,
            w1,
            len: bytes.len() as u8,
        })
    }

    /// The encoding of an int value: `[INT, v as 8 LE bytes]`.
    #[inline(always)]
    pub fn int(v: i64) -> Short {
        let v = v as u64;
        Short {
            w0: u64::from(INT) | (v << 8),
            w1: v >> 56,
            len: 9,
        }
    }

    /// The encoding of a call with one positional int: `[CALL, 1, INT, v...]`.
    #[inline(always)]
    pub fn call_int(v: i64) -> Short {
        let v = v as u64;
        Short {
            w0: u64::from(CALL) | (1 << 8) | (u64::from(INT) << 16) | (v << 24),
            w1: v >> 40,
            len: 11,
        }
    }

    /// The encoding of a str value of at most 14 UTF-8 bytes: `[STR, n, bytes]`.
    #[inline(always)]
    pub fn str(utf8: &[u8]) -> Option<Short> {
        Self::prefixed(&[STR, utf8.len() as u8], utf8, 14)
    }

    /// A call with one positional str of at most 12 bytes: `[CALL, 1, STR, n, bytes]`.
    #[inline(always)]
    pub fn call_str(utf8: &[u8]) -> Option<Short> {
        Self::prefixed(&[CALL, 1, STR, utf8.len() as u8], utf8, 12)
    }

    #[inline(always)]
    fn prefixed(head: &[u8], tail: &[u8], max: usize) -> Option<Short> {
        if tail.len() > max {
            return None;
        }
        let mut buf = [0u8; 16];
        buf[..head.len()].copy_from_slice(head);
        buf[head.len()..head.len() + tail.len()].copy_from_slice(tail);
        let mut w = [0u8; 8];
        w.copy_from_slice(&buf[..8]);
        let w0 = u64::from_le_bytes(w);
        w.copy_from_slice(&buf[8..]);
        let w1 = u64::from_le_bytes(w);
        Some(Short {
            w0,
            w1,
            len: (head.len() + tail.len()) as u8,
        })
    }
}

/// The in-process hash of a short key (random per-process seeds).
#[inline(always)]
pub fn hash_short(s: Short) -> u64 {
    let k = seeds();
    let h = folded_multiply(s.w0 ^ k[0], k[1] ^ u64::from(s.len));
    folded_multiply(h ^ s.w1 ^ k[2], k[0])
}

/// The in-process hash of an encoding (random per-process seed); equal to
/// [`hash_short`] of its short form when it has one.
#[inline]
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    match Short::from_bytes(bytes) {
        Some(s) => hash_short(s),
        None => hasher().hash_one(bytes),
    }
}

/// Fold the hash of one opaque object into a key's hash.
#[inline]
pub fn mix_hash(h: u64, other: u64) -> u64 {
    (h ^ other.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .rotate_left(23)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

/// SHA-256 hex of the version prefix and an encoding.
pub fn stable_digest(encoding: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(DIGEST_PREFIX);
    h.update(encoding);
    let out = h.finalize();
    let mut s = String::with_capacity(64);
    for b in out {
        s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(f: impl FnOnce(&mut KeyBuf)) -> KeyBuf {
        let mut b = KeyBuf::new();
        f(&mut b);
        b
    }

    #[test]
    fn types_are_distinct() {
        let one = enc(|b| put_int(b, 1));
        let one_f = enc(|b| put_float(b, 1.0));
        let t = KeyBuf::from_slice(&[TRUE]);
        assert_ne!(one, one_f);
        assert_ne!(one, t);
        let s = enc(|b| put_bytes(b, STR, b"a"));
        let by = enc(|b| put_bytes(b, BYTES, b"a"));
        assert_ne!(s, by);
        let tup = enc(|b| put_header(b, TUPLE, 0));
        let lst = enc(|b| put_header(b, LIST, 0));
        assert_ne!(tup, lst);
    }

    #[test]
    fn floats_are_canonical() {
        assert_eq!(float_bits(-0.0), float_bits(0.0));
        assert_eq!(float_bits(f64::NAN), float_bits(-f64::NAN));
        assert_ne!(float_bits(1.0), float_bits(-1.0));
    }

    #[test]
    fn varints_round_trip_lengths() {
        for (n, len) in [
            (0u64, 1usize),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (u64::MAX, 10),
        ] {
            let mut b = KeyBuf::new();
            put_varint(&mut b, n);
            assert_eq!(b.len(), len, "{n}");
        }
    }

    #[test]
    fn encodings_are_prefix_free_across_boundaries() {
        // ("ab",) + ("c",) vs ("a",) + ("bc",): length prefixes keep them apart.
        let a = enc(|b| {
            put_bytes(b, STR, b"ab");
            put_bytes(b, STR, b"c");
        });
        let c = enc(|b| {
            put_bytes(b, STR, b"a");
            put_bytes(b, STR, b"bc");
        });
        assert_ne!(a, c);
    }

    #[test]
    fn sorting_items_makes_order_irrelevant() {
        let build = |order: &[i64]| {
            let mut b = KeyBuf::new();
            b.push(SET);
            let start = b.len();
            let mut bounds = Vec::new();
            for &v in order {
                put_int(&mut b, v);
                bounds.push(b.len());
            }
            sort_items(&mut b, start, &bounds);
            b
        };
        assert_eq!(build(&[3, 1, 2]), build(&[1, 2, 3]));
        assert_ne!(build(&[1, 2]), build(&[1, 3]));
    }

    #[test]
    fn digest_is_stable_and_hex() {
        let e = enc(|b| put_int(b, 42));
        let d = stable_digest(&e);
        assert_eq!(d.len(), 64);
        assert_eq!(d, stable_digest(&e));
        assert!(d.chars().all(|c| c.is_ascii_hexdigit()));
        // Pinned: changing the encoding must bump DIGEST_PREFIX.
        assert_eq!(stable_digest(b""), stable_digest(&[]));
    }

    #[test]
    fn bytes_eq_matches_slice_equality() {
        let data: Vec<u8> = (0..40).collect();
        for i in 0..40 {
            for j in 0..40 {
                assert_eq!(bytes_eq(&data[..i], &data[..j]), i == j);
            }
            let mut other = data[..i].to_vec();
            if i > 0 {
                other[i - 1] ^= 1;
                assert!(!bytes_eq(&data[..i], &other));
            }
        }
    }

    #[test]
    fn short_constructors_match_the_encodings() {
        for v in [
            0i64,
            1,
            -1,
            255,
            256,
            i64::MAX,
            i64::MIN,
            0x0102_0304_0506_0708,
        ] {
            let mut b = KeyBuf::new();
            put_int(&mut b, v);
            assert_eq!(Short::from_bytes(&b), Some(Short::int(v)), "{v}");
            assert_eq!(hash_bytes(&b), hash_short(Short::int(v)));
            let mut c = KeyBuf::new();
            put_header(&mut c, CALL, 1);
            put_int(&mut c, v);
            assert_eq!(Short::from_bytes(&c), Some(Short::call_int(v)), "{v}");
        }
        for text in [
            "",
            "a",
            "hello",
            "twelve bytes",
            "fourteen bytes",
            "fifteen bytes!!",
        ] {
            let mut b = KeyBuf::new();
            put_bytes(&mut b, STR, text.as_bytes());
            let want = if text.len() <= 14 {
                Short::from_bytes(&b)
            } else {
                None
            };
            assert_eq!(Short::str(text.as_bytes()), want, "{text:?}");
            let mut c = KeyBuf::new();
            put_header(&mut c, CALL, 1);
            put_bytes(&mut c, STR, text.as_bytes());
            let want = if text.len() <= 12 {
                Short::from_bytes(&c)
            } else {
                None
            };
            assert_eq!(Short::call_str(text.as_bytes()), want, "{text:?}");
        }
    }

    #[test]
    fn short_keys_compare_like_their_bytes() {
        assert_ne!(Short::from_bytes(&[1]), Short::from_bytes(&[1, 0]));
        assert_eq!(Short::from_bytes(&[0; 17]), None);
        assert!(Short::from_bytes(&[]).is_some_and(|s| s.is_short()));
        assert!(!Short::NOT_SHORT.is_short());
        let a = hash_short(Short::int(1));
        let b = hash_short(Short::int(2));
        assert_ne!(a, b);
        let long = [7u8; 40];
        assert_eq!(hash_bytes(&long), hash_bytes(&long));
    }

    #[test]
    fn hash_depends_on_bytes() {
        assert_eq!(hash_bytes(b"abc"), hash_bytes(b"abc"));
        assert_ne!(hash_bytes(b"abc"), hash_bytes(b"abd"));
        assert_ne!(mix_hash(1, 2), mix_hash(1, 3));
    }
}
