//! Clocks: a monotonic clock in seconds and a manual clock for tests.
//!
//! Invariants: every reading is finite and never goes backwards (except
//! [`recent`] while its thread starts: a reading from the precise clock may
//! be followed by the thread's first, microseconds older); a
//! [`ManualClock`] moves only through [`ManualClock::advance`] (by a finite,
//! non-negative amount), so tests of the store, the bucket and the backoff are
//! exact and never sleep.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::error::CoreError;

/// A clock whose reading moves only when told to (for tests).
#[derive(Debug)]
pub struct ManualClock {
    /// The reading in seconds, stored as `f64` bits so it can be shared lock-free.
    bits: AtomicU64,
}

impl ManualClock {
    /// A clock reading `start` seconds (must be finite).
    pub fn new(start: f64) -> Result<Self, CoreError> {
        if !start.is_finite() {
            return Err(CoreError::value(
                "start",
                "a finite number of seconds",
                start,
            ));
        }
        Ok(Self {
            bits: AtomicU64::new(start.to_bits()),
        })
    }

    /// The current reading, in seconds.
    #[inline]
    pub fn now(&self) -> f64 {
        f64::from_bits(self.bits.load(Ordering::Acquire))
    }

    /// Move the clock forward by `seconds` (finite, >= 0).
    pub fn advance(&self, seconds: f64) -> Result<(), CoreError> {
        if !(seconds.is_finite() && seconds >= 0.0) {
            return Err(CoreError::value(
                "seconds",
                "a finite number of seconds >= 0",
                seconds,
            ));
        }
        let mut current = self.bits.load(Ordering::Acquire);
        loop {
            let next = f64::from_bits(current) + seconds;
            if !next.is_finite() {
                return Err(CoreError::value(
                    "seconds",
                    "an amount that keeps the clock finite",
                    seconds,
                ));
            }
            match self.bits.compare_exchange_weak(
                current,
                next.to_bits(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => current = actual,
            }
        }
    }
}

/// Seconds since the first reading in this process, from `Instant` (monotonic).
#[inline(never)]
pub fn monotonic() -> f64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// The kernel's vDSO `clock_gettime`, called directly.
///
/// glibc's `clock_gettime` wrapper (PLT call, clock-id dispatch) costs
/// 3.8 ns per coarse reading on this VM, the vDSO function itself 2.3 ns; the
/// TTL check reads the clock on every hit of a 26 ns cached call, so the
/// difference is 6% of it. Resolved once with `dlopen(RTLD_NOLOAD)` (glibc
/// registers the vDSO as "linux-vdso.so.1"); where that fails (musl) the
/// libc wrapper is used.
#[cfg(target_os = "linux")]
mod vdso {
    use std::sync::atomic::{AtomicUsize, Ordering};

    type ClockGettime = unsafe extern "C" fn(libc::clockid_t, *mut libc::timespec) -> libc::c_int;

    /// 0: not resolved yet; 1: unavailable; else the function's address.
    static FUNC: AtomicUsize = AtomicUsize::new(0);

    #[cold]
    fn resolve() -> usize {
        // SAFETY: RTLD_NOLOAD only looks up an already loaded object and
        // loads nothing; the name is a NUL-terminated constant.
        let handle = unsafe {
            libc::dlopen(
                c"linux-vdso.so.1".as_ptr(),
                libc::RTLD_LAZY | libc::RTLD_NOLOAD,
            )
        };
        let addr = if handle.is_null() {
            std::ptr::null_mut()
        } else {
            // SAFETY: `handle` is a live handle from dlopen; the name is a
            // NUL-terminated constant.
            unsafe { libc::dlsym(handle, c"__vdso_clock_gettime".as_ptr()) }
        };
        let v = if addr.is_null() { 1 } else { addr as usize };
        FUNC.store(v, Ordering::Relaxed);
        v
    }

    /// Read `clock` into `ts`; returns 0 on success like `clock_gettime`.
    #[inline(always)]
    pub(crate) fn clock_gettime(clock: libc::clockid_t, ts: &mut libc::timespec) -> libc::c_int {
        let mut f = FUNC.load(Ordering::Relaxed);
        if f == 0 {
            f = resolve();
        }
        if f == 1 {
            // SAFETY: `ts` is a valid, writable timespec.
            return unsafe { libc::clock_gettime(clock, ts) };
        }
        // SAFETY: `f` is the address of the vDSO's `__vdso_clock_gettime`,
        // whose C signature is `int (clockid_t, struct timespec *)`.
        let func = unsafe { std::mem::transmute::<usize, ClockGettime>(f) };
        // SAFETY: `ts` is a valid, writable timespec.
        unsafe { func(clock, ts) }
    }
}

/// A cheap monotonic reading for TTL checks, in seconds.
///
/// On Linux this is `CLOCK_MONOTONIC_COARSE` read straight from the vDSO
/// (2.3 ns here, against about 20 ns for `Instant::now`; resolution one
/// scheduler tick, 1-4 ms), so a TTL measured with it may be off by up to
/// one tick either way. Elsewhere it is [`monotonic`].
#[inline(always)]
pub fn coarse() -> f64 {
    #[cfg(target_os = "linux")]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        if vdso::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) == 0 {
            return ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
        }
        monotonic()
    }
    #[cfg(not(target_os = "linux"))]
    {
        monotonic()
    }
}

/// The precise `CLOCK_MONOTONIC` (same epoch as [`coarse`]), in seconds.
#[inline]
fn precise() -> f64 {
    #[cfg(target_os = "linux")]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        if vdso::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) == 0 {
            return ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
        }
        monotonic()
    }
    #[cfg(not(target_os = "linux"))]
    {
        monotonic()
    }
}

/// A monotonic timestamp kept fresh by a background "upkeep" thread, so a
/// reading is one atomic load (the way `quanta`'s `recent()` serves moka).
///
/// The TTL check of a cache hit reads the clock on every hit: the vDSO's
/// coarse clock costs 2.3 ns of a 26 ns hit (9%), an atomic load about
/// 0.3 ns. The upkeep thread starts at the first reading, stores
/// `CLOCK_MONOTONIC` every [`UPKEEP_PERIOD`], never touches Python and never
/// keeps the process alive (the process exits without joining it).
///
/// Fork: a `pthread_atfork` *prepare* handler stops the thread before every
/// `fork()` (so CPython 3.12+, which counts the process's threads after a
/// fork, has no reason to warn that the process is multi-threaded), and the
/// next reading, in the parent or the child, starts a new one and answers
/// from the precise clock meanwhile. Only atomics are shared with the thread:
/// no lock can be inherited held by a child. Resolution: the period, plus
/// however long the thread waits for a CPU on a loaded machine.
pub mod recent {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
    use std::sync::Once;
    use std::time::{Duration, Instant};

    /// How often the upkeep thread refreshes the timestamp.
    pub const UPKEEP_PERIOD: Duration = Duration::from_millis(1);
    /// The longest a `fork()` waits for the upkeep thread to stop.
    const STOP_WAIT: Duration = Duration::from_millis(100);

    /// The last timestamp as `f64` bits; 0 while no upkeep thread runs.
    static NOW: AtomicU64 = AtomicU64::new(0);
    /// 0: no thread; 1: a thread runs (or is starting); 2: spawning failed.
    static STATE: AtomicU8 = AtomicU8::new(0);
    /// Asks the running thread to stop (set by the fork handler).
    static STOP: AtomicBool = AtomicBool::new(false);
    /// Whether an upkeep thread is between its start and its exit.
    static ALIVE: AtomicBool = AtomicBool::new(false);
    static AT_FORK: Once = Once::new();

    /// The current timestamp in seconds (monotonic, same epoch as `coarse`).
    #[inline(always)]
    pub fn now() -> f64 {
        let bits = NOW.load(Ordering::Relaxed);
        if bits != 0 {
            return f64::from_bits(bits);
        }
        start()
    }

    /// Whether an upkeep thread is running (for tests).
    pub fn running() -> bool {
        ALIVE.load(Ordering::Acquire)
    }

    /// What runs before every `fork()`: stop the upkeep thread.
    pub extern "C" fn before_fork() {
        if STATE.load(Ordering::Acquire) != 1 {
            return;
        }
        NOW.store(0, Ordering::Relaxed);
        STOP.store(true, Ordering::Release);
        let started = Instant::now();
        while ALIVE.load(Ordering::Acquire) && started.elapsed() < STOP_WAIT {
            std::thread::sleep(Duration::from_micros(50));
        }
        // The thread may have stored once more between its check and ours.
        NOW.store(0, Ordering::Relaxed);
        STOP.store(false, Ordering::Release);
        STATE.store(0, Ordering::Release);
    }

    extern "C" fn after_fork_in_child() {
        // Only atomics here: the child is single-threaded and must not allocate.
        NOW.store(0, Ordering::Relaxed);
        STOP.store(false, Ordering::Relaxed);
        ALIVE.store(false, Ordering::Relaxed);
        STATE.store(0, Ordering::Relaxed);
    }

    /// First reading (or first after a fork): start the upkeep thread and
    /// answer from the precise clock meanwhile.
    #[cold]
    #[inline(never)]
    fn start() -> f64 {
        let t = super::precise();
        if STATE
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return t;
        }
        AT_FORK.call_once(|| {
            // SAFETY: registering handlers that only touch atomics (and, in
            // the parent before the fork, sleep); plain `extern "C" fn()`s.
            unsafe {
                libc::pthread_atfork(Some(before_fork), None, Some(after_fork_in_child));
            }
        });
        ALIVE.store(true, Ordering::Release);
        NOW.store(t.to_bits(), Ordering::Relaxed);
        let spawned = std::thread::Builder::new()
            .name("opero-clock".into())
            .stack_size(64 * 1024)
            .spawn(|| {
                loop {
                    std::thread::sleep(UPKEEP_PERIOD);
                    if STOP.load(Ordering::Acquire) {
                        break;
                    }
                    NOW.store(super::precise().to_bits(), Ordering::Relaxed);
                }
                ALIVE.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            // No thread (resource limits): every reading uses the precise clock.
            NOW.store(0, Ordering::Relaxed);
            ALIVE.store(false, Ordering::Release);
            STATE.store(2, Ordering::Release);
        }
        t
    }
}

/// Where a store or a bucket reads the time from.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// The process's monotonic clock (precise).
    #[default]
    Monotonic,
    /// The coarse monotonic clock (cheap).
    Coarse,
    /// The upkeep thread's timestamp ([`recent`]; cheapest; used for TTL checks).
    Recent,
    /// A manual clock shared with the test that drives it.
    Manual(Arc<ManualClock>),
}

impl Clock {
    /// The current reading in seconds (inlined: it sits on the TTL hit path).
    #[inline(always)]
    pub fn now(&self) -> f64 {
        match self {
            Clock::Monotonic => monotonic(),
            Clock::Coarse => coarse(),
            Clock::Recent => recent::now(),
            Clock::Manual(c) => c.now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_follows_the_monotonic_clock_within_a_few_periods() {
        let first = recent::now();
        assert!(first > 0.0);
        std::thread::sleep(std::time::Duration::from_millis(30));
        let later = recent::now();
        let truth = precise();
        assert!(
            later > first,
            "the upkeep thread did not refresh the timestamp"
        );
        // Generous for a loaded CI box: the thread may wait for a CPU.
        assert!(truth - later < 0.5, "recent lags by {} s", truth - later);
        assert!(later <= truth);
    }

    #[test]
    fn the_fork_handler_stops_the_upkeep_thread_and_a_reading_restarts_it() {
        let _ = recent::now();
        std::thread::sleep(std::time::Duration::from_millis(5));
        recent::before_fork();
        assert!(!recent::running());
        let t = recent::now();
        assert!(recent::running());
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(recent::now() > t);
    }

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let c = ManualClock::new(5.0).unwrap();
        assert_eq!(c.now(), 5.0);
        c.advance(1.5).unwrap();
        assert_eq!(c.now(), 6.5);
        c.advance(0.0).unwrap();
        assert_eq!(c.now(), 6.5);
    }

    #[test]
    fn manual_clock_rejects_bad_input() {
        assert!(ManualClock::new(f64::NAN).is_err());
        assert!(ManualClock::new(f64::INFINITY).is_err());
        let c = ManualClock::new(0.0).unwrap();
        assert!(c.advance(-1.0).is_err());
        assert!(c.advance(f64::NAN).is_err());
        assert!(c.advance(f64::INFINITY).is_err());
        c.advance(f64::MAX).unwrap();
        assert!(c.advance(f64::MAX).is_err());
    }

    #[test]
    fn monotonic_clocks_never_go_backwards() {
        let mut last = monotonic();
        let mut last_coarse = coarse();
        for _ in 0..1000 {
            let now = monotonic();
            let now_coarse = coarse();
            assert!(now >= last);
            assert!(now_coarse >= last_coarse);
            last = now;
            last_coarse = now_coarse;
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn coarse_clock_agrees_with_the_kernel_coarse_clock() {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
        assert_eq!(rc, 0);
        let kernel = ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
        let ours = coarse();
        assert!(ours >= kernel && ours - kernel < 1.0, "{ours} vs {kernel}");
    }

    #[test]
    fn clock_enum_reads_the_manual_clock() {
        let m = Arc::new(ManualClock::new(1.0).unwrap());
        let c = Clock::Manual(m.clone());
        m.advance(2.0).unwrap();
        assert_eq!(c.now(), 3.0);
        assert!(Clock::Monotonic.now().is_finite());
        assert!(Clock::Coarse.now().is_finite());
    }
}
