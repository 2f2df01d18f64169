//! f16/bf16 <-> f32 conversion through stack buffers, and the spans they work in.

use super::*;

/// `s` as a slice of `U` when `T` is `U`.
#[inline(always)]
pub(super) fn cast_slice<T: 'static, U: 'static>(s: &[T]) -> Option<&[U]> {
    if TypeId::of::<T>() == TypeId::of::<U>() {
        // SAFETY: `T` and `U` are the same type (equal `TypeId`s), so this is the same slice
        // with the same length, alignment and lifetime.
        Some(unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<U>(), s.len()) })
    } else {
        None
    }
}

/// `s` as a mutable slice of `U` when `T` is `U`.
#[inline(always)]
pub(super) fn cast_slice_mut<T: 'static, U: 'static>(s: &mut [T]) -> Option<&mut [U]> {
    if TypeId::of::<T>() == TypeId::of::<U>() {
        // SAFETY: as in `cast_slice`; the unique borrow of `s` moves into the result.
        Some(unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<U>(), s.len()) })
    } else {
        None
    }
}

/// A stack buffer for one span.
pub(super) type Buf = [f32; CHUNK];

/// Stack buffers for the element-wise passes, created once per rayon task (cloning a stack
/// value allocates nothing) and lent down, so that short runs do not pay for initializing
/// buffers of their own.
#[derive(Clone, Copy)]
pub(super) struct Scratch {
    pub(super) a: Buf,
    pub(super) b: Buf,
    pub(super) c: Buf,
}

impl Scratch {
    pub(super) fn new() -> Scratch {
        Scratch {
            a: [0.0; CHUNK],
            b: [0.0; CHUNK],
            c: [0.0; CHUNK],
        }
    }
}

/// Calls `f` with `src` (at most [`CHUNK`] values) as f32: `src` itself when `T` is f32,
/// otherwise widened into `buf`: f16 through `half`'s slice conversion (F16C where the CPU has
/// it, detected at run time), bf16 through the branch-free loop below.
#[inline(always)]
pub(super) fn read_f32<T: Element, R>(src: &[T], buf: &mut Buf, f: impl FnOnce(&[f32]) -> R) -> R {
    if let Some(s) = cast_slice::<T, f32>(src) {
        return f(s);
    }
    let b = &mut buf[..src.len()];
    if let Some(h) = cast_slice::<T, f16>(src) {
        h.convert_to_f32_slice(b);
    } else if let Some(h) = cast_slice::<T, bf16>(src) {
        bf16_to_f32_slice(h.reinterpret_cast(), b);
    } else {
        for (d, s) in b.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
    f(b)
}

/// Calls `f` to fill `dst.len()` (at most [`CHUNK`]) f32 values and stores them rounded once
/// into `dst` (f16 and bf16 as in [`read_f32`]); `f` writes into `dst` directly when `T` is f32.
#[inline(always)]
pub(super) fn write_f32<T: Element>(dst: &mut [T], buf: &mut Buf, f: impl FnOnce(&mut [f32])) {
    if let Some(d) = cast_slice_mut::<T, f32>(dst) {
        return f(d);
    }
    let b = &mut buf[..dst.len()];
    f(b);
    if let Some(h) = cast_slice_mut::<T, f16>(dst) {
        h.convert_from_f32_slice(b);
    } else if let Some(h) = cast_slice_mut::<T, bf16>(dst) {
        f32_to_bf16_slice(b, h.reinterpret_cast_mut());
    } else {
        for (d, s) in dst.iter_mut().zip(b.iter()) {
            *d = T::from_f32(*s);
        }
    }
}

// The bf16 conversions below are written without branches (selects only) so that LLVM
// vectorizes the slice loops with the baseline instruction set (SSE2 on x86-64; checked in the
// assembly): no run-time dispatch, no call per element (`half`'s per-element `bf16::from_f32`
// branches). They give the same bits as `half` for every input, NaNs included (quieted,
// payload kept); `tests.rs` checks all bf16 inputs and every f32 rounding case class.
// (A branch-free f16 version, tested bit-exact against F16C, ran 2.4x slower than `half`'s
// F16C path with SSE2 only, so f16 stays with `half`.) Each gives the same bits as `half`'s conversions (and as
// F16C) for every input, NaNs included (quieted, payload kept); `tests.rs` checks all f16 and
// bf16 inputs and every f32 rounding case class.

/// bf16 bits to f32: a shift (NaNs quieted, as `half` does).
#[inline(always)]
pub(super) fn bf16_bits_to_f32(b: u16) -> f32 {
    let b = u32::from(b);
    let quiet = if b & 0x7fff > 0x7f80 { 0x40 } else { 0 };
    f32::from_bits((b | quiet) << 16)
}

/// f32 to bf16 bits, rounded to nearest even (NaN quieted, payload kept).
#[inline(always)]
pub(super) fn f32_to_bf16_bits(f: f32) -> u16 {
    let x = f.to_bits();
    let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
    let nan = (x >> 16) | 0x40;
    (if x & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }) as u16
}

/// Widens bf16 bits into `dst` (same length).
#[inline(always)]
pub(super) fn bf16_to_f32_slice(src: &[u16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16_bits_to_f32(s);
    }
}

/// Rounds `src` to bf16 bits in `dst` (same length).
#[inline(always)]
pub(super) fn f32_to_bf16_slice(src: &[f32], dst: &mut [u16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32_to_bf16_bits(s);
    }
}

/// Cuts `len` values (whole rows of `c` values, NHWC positions) into spans of at most
/// [`CHUNK`]: whole rows when `c <= CHUNK`, otherwise pieces of one row. Calls
/// `f(range, first channel)`; inside a span, `span.chunks(c)` yields segments whose channels
/// are `first..first + segment.len()`.
#[inline(always)]
pub(super) fn for_each_span(len: usize, c: usize, mut f: impl FnMut(Range<usize>, usize)) {
    if c <= CHUNK {
        let step = (CHUNK / c) * c;
        let mut s = 0;
        while s < len {
            let e = (s + step).min(len);
            f(s..e, 0);
            s = e;
        }
    } else {
        let mut row = 0;
        while row < len {
            let mut s = row;
            while s < row + c {
                let e = (s + CHUNK).min(row + c);
                f(s..e, s - row);
                s = e;
            }
            row += c;
        }
    }
}
