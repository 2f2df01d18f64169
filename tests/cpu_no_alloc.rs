//! `GroupNorm::forward_into` allocates nothing for its computation, in either layout, whatever
//! the shape: a counting global allocator watches every thread while it runs.
//!
//! This binary holds a single test so that nothing else allocates while it counts.

use groupnorm::Affine;
use groupnorm::{f16, GroupNorm, Layout, Stats};
use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static BYTES: AtomicUsize = AtomicUsize::new(0);
/// The counters are global and the tests run on parallel threads: each test holds this for
/// its whole run, so that one test's allocations never land in another's count.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        if COUNTING.load(Ordering::SeqCst) {
            ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
            BYTES.fetch_add(layout.size(), Ordering::SeqCst);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::SeqCst) {
            ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
            BYTES.fetch_add(new_size, Ordering::SeqCst);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `forward_into` once to warm up (thread pool, thread-locals), then counts the
/// allocations of a second run.
fn allocations_of_forward_into<T: groupnorm::Element>(gn: &GroupNorm, dims: &[usize]) -> usize {
    let numel: usize = dims.iter().product();
    let rows = dims[0] * gn.groups();
    let x: Vec<T> = (0..numel)
        .map(|i| T::from_f32(((i * 7919) % 1000) as f32 / 250.0 - 2.0))
        .collect();
    let w: Vec<f32> = (0..gn.channels()).map(|i| 1.0 + i as f32 / 100.0).collect();
    let mut y = vec![T::default(); numel];
    let mut stats = Stats {
        mean: vec![0.0; rows],
        rstd: vec![0.0; rows],
    };
    gn.forward_into(
        &x,
        dims,
        Affine::new().weight(&w).bias(&w),
        &mut y,
        &mut stats,
    )
    .unwrap();
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    let r = gn.forward_into(
        &x,
        dims,
        Affine::new().weight(&w).bias(&w),
        &mut y,
        &mut stats,
    );
    COUNTING.store(false, Ordering::SeqCst);
    r.unwrap();
    ALLOCATIONS.load(Ordering::SeqCst)
}

/// Fewest allocations over a few runs: rayon's own bookkeeping (work-stealing deques, epoch
/// garbage) allocates now and then, a forward pass that allocated would do so every time.
fn fewest_allocations<T: groupnorm::Element>(gn: &GroupNorm, dims: &[usize]) -> usize {
    (0..5)
        .map(|_| allocations_of_forward_into::<T>(gn, dims))
        .min()
        .unwrap_or(0)
}

#[test]
fn forward_into_allocates_nothing_beyond_argument_validation() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // The baseline: a one-element tensor. What it allocates is argument validation (today 1:
    // the dims copied into `Geometry`; the length checks format their messages only on
    // failure), the same for every shape.
    let one = GroupNorm::new(1, 1).unwrap();
    let baseline = fewest_allocations::<f32>(&one, &[1, 1]);
    assert!(
        baseline <= 1,
        "a one-element forward_into allocates {baseline} times; validation accounts for 1"
    );

    // Small and large rows, narrow and wide channels (C > 256 takes other NHWC paths), a long
    // row split across threads.
    let shapes: [(&[usize], usize); 5] = [
        (&[2, 320, 32, 32], 32),
        (&[1, 64, 64, 64], 32),
        (&[3, 6, 7, 5], 3),
        (&[2, 600, 9], 1),
        (&[1, 2, 1 << 18], 1),
    ];
    for (dims, groups) in shapes {
        for layout in [Layout::Nchw, Layout::Nhwc] {
            let gn = GroupNorm::new(groups, dims[1]).unwrap().with_layout(layout);
            let a = fewest_allocations::<f32>(&gn, dims);
            assert_eq!(
                a,
                baseline,
                "{dims:?} {} f32: {a} allocations",
                layout.name()
            );
            let a = fewest_allocations::<f16>(&gn, dims);
            assert_eq!(
                a,
                baseline,
                "{dims:?} {} f16: {a} allocations",
                layout.name()
            );
        }
    }
}

/// `backward_into` without an activation allocates no buffer of the tensor's size: NCHW only
/// the per-(n, c) sums and the per-channel gradients (a few KiB here); channels-last also its
/// per-block partial sums, at most `numel / 8` f32 values (NHWC_MIN_POSITIONS in
/// src/cpu/fast/mod.rs). Against 1.3 and 2.6 MB for `dx`.
#[test]
fn backward_into_allocates_no_buffer_of_the_tensor_s_size() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    use groupnorm::Element;
    fn bytes_of<T: Element>(layout: Layout) -> (usize, usize) {
        let dims = [2usize, 320, 32, 32];
        let numel: usize = dims.iter().product();
        let gn = GroupNorm::new(32, 320).unwrap().with_layout(layout);
        let x: Vec<T> = (0..numel)
            .map(|i| T::from_f32(((i * 7919) % 1000) as f32 / 250.0 - 2.0))
            .collect();
        let dy: Vec<T> = (0..numel)
            .map(|i| T::from_f32(((i * 104_729) % 997) as f32 / 500.0 - 1.0))
            .collect();
        let w = vec![1.5f32; 320];
        let (_, stats) = gn.forward(&x, &dims, Affine::new().weight(&w)).unwrap();
        let (mut dx, mut dw, mut db) =
            (vec![T::default(); numel], vec![0f32; 320], vec![0f32; 320]);
        let mut fewest = usize::MAX;
        for _ in 0..3 {
            BYTES.store(0, Ordering::SeqCst);
            COUNTING.store(true, Ordering::SeqCst);
            let r = gn.backward_into(
                &dy,
                &x,
                &dims,
                &stats,
                Affine::new().weight(&w),
                &mut dx,
                Some(&mut dw),
                Some(&mut db),
            );
            COUNTING.store(false, Ordering::SeqCst);
            r.unwrap();
            fewest = fewest.min(BYTES.load(Ordering::SeqCst));
        }
        (fewest, numel)
    }
    for layout in [Layout::Nchw, Layout::Nhwc] {
        for (bytes, numel) in [bytes_of::<f32>(layout), bytes_of::<f16>(layout)] {
            // the sums: 2 * N * C f32 = 5 KiB, the gradients 4 * C f32 = 5 KiB, and for NHWC
            // the block partials
            let bound = match layout {
                Layout::Nchw => 16 << 10,
                _ => numel / 8 * 4 + (16 << 10),
            };
            assert!(
                bytes <= bound,
                "{}: {bytes} bytes allocated for {numel} elements (bound {bound})",
                layout.name()
            );
        }
    }
}
