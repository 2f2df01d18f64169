//! The helper thread: the second half of a small pass, handed over without allocating, taken
//! back by the caller when the helper is not there to take it.
//!
//! A small pass (see `schedule::sched`) runs as two halves, the first on the calling thread and
//! the second posted to one helper thread through a mailbox: a pointer to a closure on the
//! caller's stack. Whoever comes first runs it: the helper, if it is awake, or the caller, which
//! takes the job back once its own half is done. So a sleeping helper costs nothing but the post
//! (a cold call is the calling thread's pass), and a waking one never makes the caller wait for
//! it. Rayon cannot do this from outside its pool: `in_place_scope` boxes each spawned job (an
//! allocation per call) and waits for it to start, asleep or not (on this project's 2-core VM,
//! with 2 ms between calls, handing half of a 2x64x32x32 f32 forward to rayon's pool took
//! 0.09-0.26 ms against 0.033-0.036 on the calling thread alone).
//!
//! After each job the helper lingers for [`LINGER_NS`], yielding its core to any thread that
//! wants it and watching the mailbox, then parks. A run of calls (one that starts within
//! [`BURST_NS`] of the previous one's end) unparks it, so that the calls after them find it
//! awake; isolated calls leave it parked.
//!
//! This is the CPU path's one piece of `unsafe` concurrency: the mailbox holds a pointer to the
//! caller's stack, made `'static` by a cast. [`in_halves`] does not return, and does not unwind,
//! before the job is taken back or done (the [`Claim`] guard), and only one caller at a time
//! holds the mailbox. Miri runs the tests below (`.ci/run`), the unwinding ones included.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::thread::Thread;
use std::time::Instant;

/// After a job, the helper watches the mailbox this long before it parks. Yielding, not
/// spinning: a core that another thread wants is given to it.
const LINGER_NS: u64 = 1_000_000;
/// A call that posts this soon after the previous one ended unparks a parked helper (one futex
/// call by the caller).
const BURST_NS: u64 = 1_000_000;

/// The mailbox is empty.
const EMPTY: u8 = 0;
/// A job waits: the helper may take it, the caller may take it back.
const POSTED: u8 = 1;
/// The helper runs the job.
const RUNNING: u8 = 2;
/// The helper ran the job.
const DONE: u8 = 3;
/// The job panicked on the helper.
const PANICKED: u8 = 4;

/// The one-slot mailbox between the callers and the helper.
struct Mailbox {
    /// [`EMPTY`], [`POSTED`], [`RUNNING`], [`DONE`] or [`PANICKED`].
    state: AtomicU8,
    /// While [`POSTED`] or [`RUNNING`]: a `*mut Job` on the poster's stack.
    job: AtomicPtr<()>,
    /// Whether a caller holds the mailbox (one at a time; the others run both halves).
    held: AtomicBool,
    /// Whether the helper parks (or is about to).
    parked: AtomicBool,
    /// When the latest call that posted ended ([`clock_ns`]; 0: none yet).
    last_end: AtomicU64,
}

static MAILBOX: Mailbox = Mailbox {
    state: AtomicU8::new(EMPTY),
    job: AtomicPtr::new(std::ptr::null_mut()),
    held: AtomicBool::new(false),
    parked: AtomicBool::new(false),
    last_end: AtomicU64::new(0),
};

/// A posted job: the second half, behind a `dyn` so that the helper can call any of them.
type Job<'a> = &'a mut (dyn FnMut() + Send);

/// Nanoseconds on a monotonic clock that starts at its first reading.
fn clock_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The helper thread, started on first use; `None` where it could not be started.
fn helper() -> Option<&'static Thread> {
    static HELPER: OnceLock<Option<Thread>> = OnceLock::new();
    HELPER
        .get_or_init(|| {
            std::thread::Builder::new()
                .name("groupnorm-helper".into())
                .spawn(helper_loop)
                .ok()
                .map(|h| h.thread().clone())
        })
        .as_ref()
}

/// Runs `first` on the calling thread and `second` on the helper if it takes it in time, else
/// on the calling thread after `first`; returns when both are done. From a worker of rayon's
/// pool this is `rayon::join`. The results do not depend on which thread ran what.
pub(super) fn in_halves(first: impl FnOnce() + Send, second: impl FnOnce() + Send) {
    if rayon::current_thread_index().is_some() {
        rayon::join(first, second);
        return;
    }
    let mb = &MAILBOX;
    let Some(helper) = helper() else {
        first();
        second();
        return;
    };
    if mb
        .held
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        // another caller has the helper
        first();
        second();
        return;
    }
    let mut second = Some(second);
    let mut call = || {
        if let Some(f) = second.take() {
            f()
        }
    };
    let mut job: Job<'_> = &mut call;
    mb.job
        .store((&mut job as *mut Job<'_>).cast::<()>(), Ordering::Release);
    mb.state.store(POSTED, Ordering::SeqCst);
    let last = mb.last_end.load(Ordering::Relaxed);
    if mb.parked.load(Ordering::SeqCst) && last != 0 && clock_ns().saturating_sub(last) < BURST_NS {
        helper.unpark();
    }
    let claim = Claim(mb);
    first();
    match claim.settle() {
        Settled::TakenBack => job(),
        Settled::Done => {}
        Settled::Panicked => {
            drop(claim);
            panic!("groupnorm: the second half of a CPU pass panicked on its helper thread");
        }
    }
}

/// How a posted job ended up.
enum Settled {
    /// The caller took it back: it is the caller's to run.
    TakenBack,
    /// The helper ran it (or the mailbox was settled before).
    Done,
    /// The helper ran it and it panicked.
    Panicked,
}

/// The caller's hold on the mailbox: a posted job borrows the caller's stack, so the caller
/// settles it (takes it back, or waits until the helper has run it) before `in_halves`
/// returns, and the guard settles it too when `first` or the job unwinds. Dropping the guard
/// frees the mailbox.
struct Claim(&'static Mailbox);

impl Claim {
    /// Takes the job back if the helper has not taken it, else waits (as long as the half
    /// takes) until the helper has run it.
    fn settle(&self) -> Settled {
        let state = &self.0.state;
        if state
            .compare_exchange(POSTED, EMPTY, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return Settled::TakenBack;
        }
        let mut spins = 0u32;
        loop {
            match state.load(Ordering::Acquire) {
                DONE | EMPTY => return Settled::Done,
                PANICKED => return Settled::Panicked,
                _ => {
                    spins = spins.wrapping_add(1);
                    if spins % 64 == 0 {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // unwinding out of `first` or the job: the job may still be posted or running
        let _ = self.settle();
        self.0.last_end.store(clock_ns().max(1), Ordering::Relaxed);
        self.0.state.store(EMPTY, Ordering::Release);
        self.0.held.store(false, Ordering::Release);
    }
}

/// The helper: takes posted jobs, lingers after each, parks when none comes.
fn helper_loop() {
    let mb = &MAILBOX;
    loop {
        let mut idle_since = clock_ns();
        loop {
            if mb.state.load(Ordering::Acquire) == POSTED
                && mb
                    .state
                    .compare_exchange(POSTED, RUNNING, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                let job = mb.job.load(Ordering::Acquire).cast::<Job<'static>>();
                // SAFETY: `job` points to the `Job` that the poster stored before it set
                // POSTED; the poster does not return or unwind past that `Job` (nor the closure
                // it borrows) until the state has left RUNNING (`Claim::settle`), and this
                // thread is the only one that runs it, once: the compare-exchange from POSTED
                // succeeds for one side only. The `'static` lifetime is never relied on beyond
                // this call.
                let result = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)() }));
                let end = if result.is_ok() { DONE } else { PANICKED };
                mb.state.store(end, Ordering::Release);
                idle_since = clock_ns();
            } else if clock_ns().saturating_sub(idle_since) > LINGER_NS {
                break;
            } else {
                std::thread::yield_now();
            }
        }
        mb.parked.store(true, Ordering::SeqCst);
        if mb.state.load(Ordering::SeqCst) != POSTED {
            std::thread::park();
        }
        mb.parked.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// The tests that call `in_halves` take turns: each owns the mailbox while it runs.
    pub(in crate::cpu::fast) static MAILBOX_TESTS: Mutex<()> = Mutex::new(());

    /// A posted job that the first half waits for runs on the helper thread, as many times
    /// as it is posted, and the caller returns only after it (the job writes the caller's
    /// stack last).
    #[test]
    fn the_helper_runs_what_it_takes() {
        let _turn = MAILBOX_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        let caller = std::thread::current().id();
        for i in 0..if cfg!(miri) { 5 } else { 200 } {
            let mut ran_on = None;
            in_halves(
                || {
                    // wait until the helper takes the job (waking it if it sleeps)
                    while MAILBOX.state.load(Ordering::Acquire) == POSTED {
                        helper().expect("a helper thread").unpark();
                        std::thread::yield_now();
                    }
                },
                || {
                    // long enough that the caller settles while the helper still runs it
                    std::thread::sleep(std::time::Duration::from_micros(200));
                    ran_on = Some(std::thread::current().id())
                },
            );
            let ran_on = ran_on.expect("the second half ran");
            assert_ne!(ran_on, caller, "call {i}: the helper ran the second half");
        }
    }

    /// Both halves run exactly once, whoever runs the second, over many calls back to back
    /// (the helper awake) and after pauses (asleep), from several threads at once (one holds
    /// the helper, the others run both halves).
    #[test]
    fn each_half_runs_once_whoever_runs_it() {
        let _turn = MAILBOX_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        let calls = if cfg!(miri) { 20 } else { 2000 };
        std::thread::scope(|s| {
            for t in 0..3u64 {
                s.spawn(move || {
                    for i in 0..calls {
                        let (mut a, mut b) = (vec![0u64; 8], vec![0u64; 8]);
                        in_halves(
                            || a.iter_mut().for_each(|v| *v += i + t),
                            || b.iter_mut().for_each(|v| *v += 2 * i + t),
                        );
                        assert!(a.iter().all(|&v| v == i + t), "first half, call {i}");
                        assert!(b.iter().all(|&v| v == 2 * i + t), "second half, call {i}");
                        if i % 7 == 0 {
                            std::thread::sleep(std::time::Duration::from_micros(50));
                        }
                    }
                });
            }
        });
    }

    /// A half that panics, on either thread, reaches the caller as a panic, after the other
    /// half is settled, and leaves the mailbox free for the next call.
    #[test]
    fn a_panicking_half_unwinds_the_caller_and_frees_the_mailbox() {
        let _turn = MAILBOX_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        for panics_first in [true, false] {
            for _ in 0..if cfg!(miri) { 3 } else { 50 } {
                let mut b = [0u8; 64];
                let r = catch_unwind(AssertUnwindSafe(|| {
                    in_halves(
                        || assert!(!panics_first, "first half"),
                        || {
                            b.fill(1);
                            assert!(panics_first, "second half");
                        },
                    )
                }));
                assert!(r.is_err(), "panics_first {panics_first}");
                // the second half ran to its end or not at all, never after the call
                let filled = b.iter().filter(|&&v| v == 1).count();
                assert!(filled == 0 || filled == 64);
                let mut ran = false;
                in_halves(|| {}, || ran = true);
                assert!(ran, "the next call runs its second half");
            }
        }
    }
}
