//! How close the current thread is to the end of its C stack.
//!
//! Python 3.11 bounds recursion by counting Python frames only. A recursive
//! function decorated by a native call path (a memoized `fib` under
//! `@opero(cache=True)` with `sys.setrecursionlimit(10_000)`) spends native
//! frames on every level as well, and ran off the end of an 8 MiB stack
//! (SIGSEGV) at about 3,500 levels where `functools.lru_cache` raised
//! `RecursionError`. A native call that is about to re-enter Python asks
//! [`nearly_full`] first and raises `RecursionError` instead.
//!
//! Invariant: the stack grows down (every supported target); the bounds of a
//! thread's stack are read once per thread (`pthread_getattr_np`, which reads
//! `/proc/self/maps` for the main thread) and kept in a thread-local; where
//! they cannot be read the check never fires.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The space kept free below the check: what a level of Python and native
/// frames (a few KiB), plus the user's own C code and the error path, may
/// still use. A quarter of the stack when that is smaller (tiny thread stacks).
pub const MARGIN: usize = 256 * 1024;

thread_local! {
    /// This thread's (lowest address, floor, top) of its stack: the floor is
    /// the lowest address the stack pointer may reach before a check fires;
    /// floor 0 not read yet, floor 1 bounds unknown (never fires).
    static BOUNDS: Cell<(usize, usize, usize)> = const { Cell::new((0, 0, 0)) };
}

/// The (floor, top) of the stack a check last passed on: a stack pointer
/// between them is in that stack, above its floor. Reading these is cheaper
/// than the thread-local (a `__tls_get_addr` call in a shared library: 33
/// instructions a call measured). Written with the GIL held (the callers run
/// attached, and the module keeps the GIL on), so the pair is not torn.
static LAST_FLOOR: AtomicUsize = AtomicUsize::new(usize::MAX);
static LAST_TOP: AtomicUsize = AtomicUsize::new(0);

/// Whether the current stack pointer is within [`MARGIN`] of the end of the
/// current thread's stack: two loads and two compares while the stack checked
/// last is the current one.
#[inline(always)]
pub fn nearly_full() -> bool {
    let here = stack_pointer();
    if here > LAST_FLOOR.load(Ordering::Relaxed) && here <= LAST_TOP.load(Ordering::Relaxed) {
        return false;
    }
    nearly_full_slow(here)
}

/// [`nearly_full`] through this thread's own bounds; remembers them when the
/// check passes.
#[cold]
#[inline(never)]
fn nearly_full_slow(here: usize) -> bool {
    let (low, floor, top) = BOUNDS.with(|b| match b.get() {
        (_, 0, _) => {
            let v = bounds().map_or((0, 1, 0), |(low, size)| {
                (low, floor_of(Some((low, size))), low.saturating_add(size))
            });
            b.set(v);
            v
        }
        v => v,
    });
    if here < floor {
        // Below the thread's own stack: running on a stack of some other
        // kind (a fiber's), whose bounds are unknown: never fires.
        return here >= low;
    }
    if floor > 1 && here <= top {
        LAST_FLOOR.store(floor, Ordering::Relaxed);
        LAST_TOP.store(top, Ordering::Relaxed);
    }
    false
}

/// An address in the current frame (close enough to the stack pointer).
#[inline(always)]
fn stack_pointer() -> usize {
    let marker = 0u8;
    std::hint::black_box(std::ptr::addr_of!(marker)) as usize
}

/// The floor for a stack of `(lowest address, size)`, or 1 (never fires).
fn floor_of(bounds: Option<(usize, usize)>) -> usize {
    match bounds {
        Some((low, size)) if low > 0 && size > 0 => low.saturating_add(MARGIN.min(size / 4)),
        _ => 1,
    }
}

/// The current thread's stack: (lowest address, size in bytes).
#[cold]
#[cfg(target_os = "linux")]
fn bounds() -> Option<(usize, usize)> {
    // SAFETY: an all-zero `pthread_attr_t` is plain bytes, a valid
    // out-parameter for `pthread_getattr_np`, which initializes it.
    let mut attr: libc::pthread_attr_t = unsafe { std::mem::zeroed() };
    // SAFETY: `pthread_self` has no preconditions.
    let me = unsafe { libc::pthread_self() };
    // SAFETY: `attr` is a writable attribute object; `me` is this thread.
    if unsafe { libc::pthread_getattr_np(me, &mut attr) } != 0 {
        return None;
    }
    let mut addr: *mut libc::c_void = std::ptr::null_mut();
    let mut size: libc::size_t = 0;
    // SAFETY: `attr` was initialized above; `addr`/`size` are plain out-pointers.
    let r = unsafe { libc::pthread_attr_getstack(&attr, &mut addr, &mut size) };
    // SAFETY: destroyed once, after its successful initialization.
    unsafe { libc::pthread_attr_destroy(&mut attr) };
    (r == 0).then_some((addr as usize, size))
}

/// The current thread's stack: (lowest address, size in bytes).
#[cold]
#[cfg(target_os = "macos")]
fn bounds() -> Option<(usize, usize)> {
    // SAFETY: `pthread_self` has no preconditions.
    let t = unsafe { libc::pthread_self() };
    // SAFETY: reads the calling thread's own descriptor.
    let top = unsafe { libc::pthread_get_stackaddr_np(t) } as usize;
    // SAFETY: as above.
    let size = unsafe { libc::pthread_get_stacksize_np(t) };
    top.checked_sub(size).map(|low| (low, size))
}

/// Unknown elsewhere: the check never fires.
#[cold]
#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn bounds() -> Option<(usize, usize)> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shallow_stack_is_not_nearly_full() {
        assert!(!nearly_full());
        let t = std::thread::Builder::new()
            .stack_size(4 << 20)
            .spawn(nearly_full)
            .unwrap();
        assert!(!t.join().unwrap());
    }

    #[cfg(any(target_os = "linux", target_os = "macos"))]
    #[test]
    fn the_bounds_contain_the_current_frame() {
        let (low, size) = bounds().expect("stack bounds");
        let here = stack_pointer();
        assert!(low < here && here < low + size, "{low:#x} {here:#x} {size}");
    }

    #[cfg(any(target_os = "linux", target_os = "macos"))]
    #[test]
    fn an_address_outside_the_threads_stack_never_fires() {
        assert!(!nearly_full_slow(64));
        let (low, _) = bounds().expect("stack bounds");
        assert!(nearly_full_slow(low + 64));
    }

    #[test]
    fn unknown_bounds_never_fire() {
        assert_eq!(floor_of(None), 1);
        assert_eq!(floor_of(Some((0, 0))), 1);
        assert_eq!(floor_of(Some((4096, 64 << 10))), 4096 + (16 << 10));
        assert_eq!(floor_of(Some((4096, 8 << 20))), 4096 + MARGIN);
    }

    /// Recurse until the check fires: it must fire before the stack ends
    /// (a crash would fail the test run), within the margin of the floor.
    fn depth_until_full(n: usize) -> usize {
        if nearly_full() {
            return n;
        }
        let pad = [0u8; 512];
        std::hint::black_box(&pad);
        depth_until_full(n + 1) + std::hint::black_box(0)
    }

    #[cfg(any(target_os = "linux", target_os = "macos"))]
    #[test]
    fn deep_recursion_is_stopped_before_the_end_of_the_stack() {
        let t = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| depth_until_full(0))
            .unwrap();
        let depth = t.join().unwrap();
        // Stopped (not crashed) well after the start: 2 MiB less the margin.
        assert!(depth > 100, "{depth}");
    }
}
