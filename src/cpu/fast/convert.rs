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
}

impl Scratch {
    pub(super) fn new() -> Scratch {
        Scratch {
            a: [0.0; CHUNK],
            b: [0.0; CHUNK],
        }
    }
}

/// Calls `f` with `src` (at most [`CHUNK`] values) as f32: `src` itself when `T` is f32,
/// otherwise widened into `buf` by the branch-free loops below. `f` must only compute with the
/// values, never store them as they are: bf16 signaling NaNs arrive unquieted
/// ([`bf16_to_f32_for_arithmetic`]), and the first operation on them quiets them.
#[inline(always)]
pub(super) fn read_f32<T: Element, R>(src: &[T], buf: &mut Buf, f: impl FnOnce(&[f32]) -> R) -> R {
    if let Some(s) = cast_slice::<T, f32>(src) {
        return f(s);
    }
    let b = &mut buf[..src.len()];
    if let Some(h) = cast_slice::<T, f16>(src) {
        f16_to_f32_slice(h.reinterpret_cast(), b);
    } else if let Some(h) = cast_slice::<T, bf16>(src) {
        bf16_to_f32_for_arithmetic(h.reinterpret_cast(), b);
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
        f32_to_f16_slice(b, h.reinterpret_cast_mut());
    } else if let Some(h) = cast_slice_mut::<T, bf16>(dst) {
        f32_to_bf16_slice(b, h.reinterpret_cast_mut());
    } else {
        for (d, s) in dst.iter_mut().zip(b.iter()) {
            *d = T::from_f32(*s);
        }
    }
}

/// Eight values as f32: one vector register once inlined into an AVX2 copy.
pub(super) type F8 = [f32; 8];

/// Whether a pass over `T` values takes the explicit vector forms of [`load8`], [`store8`],
/// [`store16`] and the lane fold: the CPU has AVX2 and F16C. Checked once per pass (cached
/// flags) and handed to the inner loops as their const parameter `SIMD`, so that they carry no
/// check. (Written as plain loops, LLVM vectorized the bf16 conversions across eight-value
/// steps, gathering with `vpinsrw`: the bf16 forward ran 2x slower than through buffers.)
#[inline(always)]
pub(super) fn use_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    return f16c::available();
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// The first eight values of `s` as f32, converted in registers: the fused form of
/// [`read_f32`] for loops that take eight values at a time (same values, same NaN contract).
/// `SIMD` must be [`use_simd()`](use_simd).
#[inline(always)]
pub(super) fn load8<T: Element, const SIMD: bool>(s: &[T]) -> F8 {
    let s = &s[..8];
    let mut o = [0f32; 8];
    if let Some(v) = cast_slice::<T, f32>(s) {
        #[cfg(target_arch = "x86_64")]
        if SIMD {
            // SAFETY: `SIMD` is only true when the CPU has AVX2 and F16C (`use_simd`).
            return unsafe { f16c::load8_f32(v) };
        }
        o.copy_from_slice(v);
    } else if let Some(h) = cast_slice::<T, bf16>(s) {
        let h: &[u16] = h.reinterpret_cast();
        #[cfg(target_arch = "x86_64")]
        if SIMD {
            // SAFETY: `SIMD` is only true when the CPU has AVX2 and F16C (`use_simd`).
            return unsafe { f16c::load8_bf16(h) };
        }
        for (o, &h) in o.iter_mut().zip(h) {
            *o = f32::from_bits(u32::from(h) << 16);
        }
    } else if let Some(h) = cast_slice::<T, f16>(s) {
        let h: &[u16] = h.reinterpret_cast();
        #[cfg(target_arch = "x86_64")]
        if SIMD {
            // SAFETY: `SIMD` is only true when the CPU has AVX2 and F16C (`use_simd`).
            return unsafe { f16c::load8(h) };
        }
        for (o, &h) in o.iter_mut().zip(h) {
            *o = f16_bits_to_f32(h);
        }
    } else {
        for (o, v) in o.iter_mut().zip(s) {
            *o = v.to_f32();
        }
    }
    o
}

/// One value as f32, as [`load8`] converts it (for the tails of its loops).
#[inline(always)]
pub(super) fn load1<T: Element>(v: &T) -> f32 {
    let s = std::slice::from_ref(v);
    if let Some(h) = cast_slice::<T, bf16>(s) {
        f32::from_bits(u32::from(h[0].to_bits()) << 16)
    } else {
        v.to_f32()
    }
}

/// Stores eight f32 values rounded once into the first eight of `d`: the fused form of
/// [`write_f32`] (same bits). `SIMD` as in [`load8`].
#[inline(always)]
pub(super) fn store8<T: Element, const SIMD: bool>(v: F8, d: &mut [T]) {
    let d = &mut d[..8];
    if let Some(o) = cast_slice_mut::<T, f32>(d) {
        #[cfg(target_arch = "x86_64")]
        if SIMD {
            // SAFETY: as in `load8`.
            return unsafe { f16c::store8_f32(v, o) };
        }
        o.copy_from_slice(&v);
    } else if let Some(h) = cast_slice_mut::<T, bf16>(d) {
        let h: &mut [u16] = h.reinterpret_cast_mut();
        #[cfg(target_arch = "x86_64")]
        if SIMD {
            // SAFETY: as in `load8`.
            return unsafe { f16c::store8_bf16(v, h) };
        }
        for (h, &v) in h.iter_mut().zip(&v) {
            *h = f32_to_bf16_bits(v);
        }
    } else if let Some(h) = cast_slice_mut::<T, f16>(d) {
        let h: &mut [u16] = h.reinterpret_cast_mut();
        #[cfg(target_arch = "x86_64")]
        if SIMD {
            // SAFETY: as in `load8`.
            return unsafe { f16c::store8(v, h) };
        }
        for (h, &v) in h.iter_mut().zip(&v) {
            *h = f32_to_f16_bits(v);
        }
    } else {
        for (o, &v) in d.iter_mut().zip(&v) {
            *o = T::from_f32(v);
        }
    }
}

/// [`store8`] of two vectors into the first sixteen of `d` (bf16 packs them together).
#[inline(always)]
pub(super) fn store16<T: Element, const SIMD: bool>(lo: F8, hi: F8, d: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        if let Some(h) = cast_slice_mut::<T, bf16>(&mut d[..16]) {
            // SAFETY: `SIMD` is only true when the CPU has AVX2 and F16C (`use_simd`).
            return unsafe { f16c::store16_bf16(lo, hi, h.reinterpret_cast_mut()) };
        }
    }
    let (a, b) = d[..16].split_at_mut(8);
    store8::<T, SIMD>(lo, a);
    store8::<T, SIMD>(hi, b);
}

/// [`fold_lanes`] of the four rows of [`lane_sum_of`]'s accumulators: in vector registers
/// when `SIMD` (the same additions in the same order, so the same bits), out of line otherwise.
#[inline(always)]
pub(super) fn fold_lanes4<const SIMD: bool>(acc: &[[f32; 8]; 4]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        // SAFETY: `SIMD` is only true when the CPU has AVX2 and F16C (`use_simd`).
        return unsafe { f16c::fold4x8(acc) };
    }
    fold_lanes(acc)
}

/// [`fold_lanes`] of two rows of eight: in vector registers when `SIMD` (the same additions
/// in the same order), out of line otherwise.
#[inline(always)]
pub(super) fn fold_lanes2<const SIMD: bool>(acc: &[[f32; 8]; 2]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        // SAFETY: `SIMD` is only true when the CPU has AVX2 and F16C (`use_simd`).
        return unsafe { f16c::fold2x8(acc) };
    }
    fold_lanes(acc)
}

/// Stores one value as [`store8`] rounds it (for the tails of its loops).
#[inline(always)]
pub(super) fn store1<T: Element>(v: f32, d: &mut T) {
    let d = std::slice::from_mut(d);
    if let Some(h) = cast_slice_mut::<T, bf16>(d) {
        h[0] = bf16::from_bits(f32_to_bf16_bits(v));
    } else if let Some(h) = cast_slice_mut::<T, f16>(d) {
        h[0] = f16::from_bits(f32_to_f16_bits(v));
    } else {
        d[0] = T::from_f32(v);
    }
}

/// `y[i] = f(i, x[i])` over two runs of the same length, converted in registers eight values
/// at a time ([`load8`], [`store8`]), the tail one at a time: the same values and bits as
/// [`read_f32`], `f`, [`write_f32`] through buffers, with no buffer. `f` must be a plain
/// element-wise computation for LLVM to vectorize it (`i` may index per-channel arrays).
#[inline(always)]
pub(super) fn map_values<T: Element, const SIMD: bool>(
    x: &[T],
    y: &mut [T],
    f: impl Fn(usize, f32) -> f32,
) {
    let eight = |i: usize, a: &[T]| {
        let v = load8::<T, SIMD>(a);
        let mut o = [0f32; 8];
        for (l, (o, &v)) in o.iter_mut().zip(&v).enumerate() {
            *o = f(i + l, v);
        }
        o
    };
    let mut x16 = x.chunks_exact(16);
    let mut y16 = y.chunks_exact_mut(16);
    let mut i = 0;
    for (a, b) in (&mut x16).zip(&mut y16) {
        let (lo, hi) = (eight(i, &a[..8]), eight(i + 8, &a[8..]));
        store16::<T, SIMD>(lo, hi, b);
        i += 16;
    }
    let mut xs = x16.remainder().chunks_exact(8);
    let mut ys = y16.into_remainder().chunks_exact_mut(8);
    for (a, b) in (&mut xs).zip(&mut ys) {
        store8::<T, SIMD>(eight(i, a), b);
        i += 8;
    }
    for (a, b) in xs.remainder().iter().zip(ys.into_remainder()) {
        store1(f(i, load1(a)), b);
        i += 1;
    }
}

/// `y = (x - hi) * scale + shift` over two runs of the same length: [`map_values`] of that
/// closure, with an explicit vector loop for f32 where `SIMD` (the same bits).
#[inline(always)]
pub(super) fn affine_values<T: Element, const SIMD: bool>(
    x: &[T],
    y: &mut [T],
    hi: f32,
    scale: f32,
    shift: f32,
) {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        if let (Some(xf), Some(yf)) = (cast_slice::<T, f32>(x), cast_slice_mut::<T, f32>(y)) {
            // SAFETY: `SIMD` is only true when the CPU has AVX2 and F16C (`use_simd`).
            return unsafe { f16c::affine_f32(xf, yf, hi, scale, shift) };
        }
    }
    map_values::<T, SIMD>(x, y, move |_, v| (v - hi) * scale + shift)
}

/// `o[i] = f(x[i], d[i])` over three runs of the same length, converted in registers as in
/// [`map_values`] (the backward's `dx`).
#[inline(always)]
pub(super) fn map2_values<T: Element, U: Element, const SIMD: bool>(
    x: &[T],
    d: &[U],
    o: &mut [T],
    f: impl Fn(f32, f32) -> f32,
) {
    let d = &d[..x.len()];
    let eight = |a: &[T], b: &[U]| {
        let (u, v) = (load8::<T, SIMD>(a), load8::<U, SIMD>(b));
        let mut r = [0f32; 8];
        for (l, r) in r.iter_mut().enumerate() {
            *r = f(u[l], v[l]);
        }
        r
    };
    let (mut x16, mut d16) = (x.chunks_exact(16), d.chunks_exact(16));
    let mut o16 = o.chunks_exact_mut(16);
    for ((a, b), c) in (&mut x16).zip(&mut d16).zip(&mut o16) {
        let (lo, hi) = (eight(&a[..8], &b[..8]), eight(&a[8..], &b[8..]));
        store16::<T, SIMD>(lo, hi, c);
    }
    let (mut x8, mut d8) = (
        x16.remainder().chunks_exact(8),
        d16.remainder().chunks_exact(8),
    );
    let mut o8 = o16.into_remainder().chunks_exact_mut(8);
    for ((a, b), c) in (&mut x8).zip(&mut d8).zip(&mut o8) {
        store8::<T, SIMD>(eight(a, b), c);
    }
    let tail = x8.remainder().iter().zip(d8.remainder());
    for ((a, b), c) in tail.zip(o8.into_remainder()) {
        store1(f(load1(a), load1(b)), c);
    }
}

// The conversions below are written without branches (selects only) so that LLVM vectorizes
// the slice loops: 4 lanes with the baseline instruction set (SSE2 on x86-64), 8 lanes in the
// AVX2 copies of the callers (`multiversion`), into which they are inlined; checked in the
// assembly. No call per element or per vector: `half`'s slice conversion calls a
// non-inlinable F16C function per 8 values (measured 150 ns per 256 values against 12 ns
// inlined), its per-element conversions branch. f16 spans use F16C itself where the CPU has
// it (module `f16c` below, a few instructions per 8 values against about 15 for the loops). They give the same bits as
// `half`'s conversions, hence as F16C's `vcvtph2ps`/`vcvtps2ph` with round-to-nearest-even, for
// every input, NaNs included (quieted, payload kept); `tests.rs` checks every f16 and bf16
// input and every f32 rounding case class against `half`.

/// f16 bits to f32, exactly: the exponent rebiased for normal values, the subnormals by one
/// exact f32 subtraction, Inf and NaN (quieted, payload kept) by the largest exponent.
#[inline(always)]
pub(super) fn f16_bits_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let o = (h & 0x7fff) << 13;
    let exp = o & 0x0f80_0000;
    // exponent 1..=30: rebias 15 -> 127
    let normal = o + (112 << 23);
    // exponent 31: Inf or NaN, exponent 255, NaNs quieted
    let quiet = if h & 0x03ff != 0 { 0x0040_0000 } else { 0 };
    let special = (o + (224 << 23)) | quiet;
    // exponent 0: m * 2^-24 = (2^-14 + m * 2^-24) - 2^-14, exact in f32 (zero included)
    let tiny = (f32::from_bits(o + (113 << 23)) - f32::from_bits(113 << 23)).to_bits();
    let mag = if exp == 0x0f80_0000 {
        special
    } else if exp == 0 {
        tiny
    } else {
        normal
    };
    f32::from_bits(mag | sign)
}

/// f32 to f16 bits, rounded to nearest even (overflow to Inf, NaN quieted with its payload's
/// top bits kept, as F16C does).
#[inline(always)]
pub(super) fn f32_to_f16_bits(f: f32) -> u16 {
    let x = f.to_bits();
    let sign = (x >> 16) & 0x8000;
    let a = x & 0x7fff_ffff;
    // |f| >= 65536 (rounds to Inf; the normal path below rounds 65504..65536 to Inf itself),
    // Inf, NaN
    let nan = 0x7e00 | ((a >> 13) & 0x03ff);
    let big = if a > 0x7f80_0000 { nan } else { 0x7c00 };
    // |f| < 2^-14: adding 0.5 makes the FPU round the value to a multiple of 2^-24 (nearest
    // even), leaving the f16 subnormal bits in the low mantissa bits
    let tiny = (f32::from_bits(a) + 0.5).to_bits().wrapping_sub(126 << 23);
    // normal: rebias and round to nearest even on the 13 dropped bits (a carry into the
    // exponent is the right result, Inf included)
    let odd = (a >> 13) & 1;
    let normal = a.wrapping_sub(112 << 23).wrapping_add(0x0fff + odd) >> 13;
    let mag = if a >= 143 << 23 {
        big
    } else if a < 113 << 23 {
        tiny
    } else {
        normal
    };
    (mag | sign) as u16
}

/// Widens f16 bits into `dst` (same length): F16C where the CPU has it (with AVX2; checked once per
/// call, a cached flag; inlined into the AVX2 copies of the callers), the branch-free loop
/// otherwise. The same bits either way.
#[inline(always)]
pub(super) fn f16_to_f32_slice(src: &[u16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if f16c::available() {
        // SAFETY: the CPU has AVX and F16C, checked just above.
        return unsafe { f16c::widen(src, dst) };
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f16_bits_to_f32(s);
    }
}

/// Rounds `src` to f16 bits in `dst` (same length), F16C or the branch-free loop as in
/// [`f16_to_f32_slice`].
#[inline(always)]
pub(super) fn f32_to_f16_slice(src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if f16c::available() {
        // SAFETY: the CPU has AVX and F16C, checked just above.
        return unsafe { f16c::narrow(src, dst) };
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32_to_f16_bits(s);
    }
}

/// F16C conversions of whole spans, eight values per instruction: the issue's "small explicit
/// kernel" for f16, and the only `unsafe` of the CPU path besides [`cast_slice`]. `half`'s slice
/// conversion runs the same instructions but calls a function per eight values; here a span of
/// up to [`CHUNK`] values is one call, inlined into callers compiled with F16C.
#[cfg(target_arch = "x86_64")]
mod f16c {
    use super::{f16_bits_to_f32, f32_to_f16_bits};
    use std::arch::x86_64::{
        __m128i, __m256, __m256i, _mm256_add_epi32, _mm256_add_ps, _mm256_and_si256,
        _mm256_blendv_epi8, _mm256_castps256_ps128, _mm256_castps_si256, _mm256_castsi256_si128,
        _mm256_cmp_ps, _mm256_cvtepu16_epi32, _mm256_cvtph_ps, _mm256_cvtps_ph,
        _mm256_extractf128_ps, _mm256_loadu_ps, _mm256_movemask_ps, _mm256_mul_ps, _mm256_or_si256,
        _mm256_packus_epi32, _mm256_permute4x64_epi64, _mm256_set1_epi32, _mm256_set1_ps,
        _mm256_slli_epi32, _mm256_srli_epi32, _mm256_storeu_ps, _mm256_storeu_si256, _mm256_sub_ps,
        _mm_add_ps, _mm_add_ss, _mm_cvtss_f32, _mm_loadu_si128, _mm_movehdup_ps, _mm_movehl_ps,
        _mm_storeu_si128, _CMP_UNORD_Q, _MM_FROUND_TO_NEAREST_INT,
    };

    /// Whether the CPU has AVX, AVX2 and F16C (detected once by `std`, then cached flags).
    #[inline(always)]
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("f16c")
    }

    /// [`super::fold_lanes`] of four rows, in vector registers: rows 0 + 2 and 1 + 3, their
    /// sum, then lanes `k + 4`, `k + 2`, `k + 1`, the same additions in the same order (same
    /// bits). Inlined into its caller, where the out-of-line fold reloaded the rows in 8-byte
    /// pieces (a tenth of the f16/bf16 forward, perf), and where LLVM's own inlined fold
    /// reshaped the loop before it into 128-bit pieces.
    ///
    /// # Safety
    /// The CPU must have AVX2 ([`available`]).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn fold4x8(acc: &[[f32; 8]; 4]) -> f32 {
        // SAFETY: each row is 8 f32 (32 bytes), read unaligned; the CPU has AVX.
        unsafe {
            let r = |i: usize| _mm256_loadu_ps(acc[i].as_ptr());
            lanes8(_mm256_add_ps(
                _mm256_add_ps(r(0), r(2)),
                _mm256_add_ps(r(1), r(3)),
            ))
        }
    }

    /// The fold of one row's eight lanes: `k + 4`, `k + 2`, `k + 1`, as [`super::fold_lanes`]
    /// ends.
    ///
    /// # Safety
    /// The CPU must have AVX ([`available`]).
    #[target_feature(enable = "avx")]
    #[inline]
    unsafe fn lanes8(v: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
    }

    /// [`super::fold_lanes`] of two rows, in vector registers: their sum, then lanes `k + 4`,
    /// `k + 2`, `k + 1` (the same additions in the same order, so the same bits).
    ///
    /// # Safety
    /// The CPU must have AVX2 ([`available`]).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn fold2x8(acc: &[[f32; 8]; 2]) -> f32 {
        // SAFETY: each row is 8 f32 (32 bytes), read unaligned; the CPU has AVX.
        unsafe {
            let r = |i: usize| _mm256_loadu_ps(acc[i].as_ptr());
            lanes8(_mm256_add_ps(r(0), r(1)))
        }
    }

    /// The first eight values of `s` in one vector load (copied as an array, LLVM vectorized
    /// the loops around [`super::load8`] across its eight-value steps, with scalar loads).
    ///
    /// # Safety
    /// The CPU must have AVX ([`available`]).
    #[target_feature(enable = "avx")]
    #[inline]
    pub(super) unsafe fn load8_f32(s: &[f32]) -> [f32; 8] {
        let s = &s[..8];
        // SAFETY: `s` is 8 f32, read unaligned; `__m256` and `[f32; 8]` have the same size.
        unsafe { std::mem::transmute::<__m256, [f32; 8]>(_mm256_loadu_ps(s.as_ptr())) }
    }

    /// Stores eight values into the first eight of `d` in one vector store.
    ///
    /// # Safety
    /// The CPU must have AVX ([`available`]).
    #[target_feature(enable = "avx")]
    #[inline]
    pub(super) unsafe fn store8_f32(v: [f32; 8], d: &mut [f32]) {
        let d = &mut d[..8];
        // SAFETY: as in `load8_f32`; `d` is 8 f32, written unaligned.
        unsafe { _mm256_storeu_ps(d.as_mut_ptr(), std::mem::transmute::<[f32; 8], __m256>(v)) }
    }

    /// `y[i] = (x[i] - hi) * scale + shift` over a run (the NCHW forward's affine step in
    /// f32), four vectors per step: a subtraction, a product and a sum per value in that
    /// order (no FMA), the same bits as the scalar form the tail uses. Explicit because
    /// LLVM's own loop for it, through [`super::map_values`], came out in two shapes from
    /// one build to the next: 23 instructions per 32 values, or 17 per 16 with both
    /// pointers reloaded from the stack each step (cachegrind, 2x320x64x64).
    ///
    /// # Safety
    /// The CPU must have AVX ([`available`]).
    #[target_feature(enable = "avx")]
    #[inline]
    pub(super) unsafe fn affine_f32(x: &[f32], y: &mut [f32], hi: f32, scale: f32, shift: f32) {
        let n = x.len().min(y.len());
        let (h, a, b) = (
            _mm256_set1_ps(hi),
            _mm256_set1_ps(scale),
            _mm256_set1_ps(shift),
        );
        let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
        let mut i = 0;
        // SAFETY: every access is at an offset below `n`, the length of both runs (unaligned
        // loads and stores of 8 f32 at `i..i + 8` with `i + 8 <= n`).
        unsafe {
            let step = |i: usize| {
                let v = _mm256_loadu_ps(xp.add(i));
                _mm256_storeu_ps(
                    yp.add(i),
                    _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(v, h), a), b),
                );
            };
            while i + 32 <= n {
                step(i);
                step(i + 8);
                step(i + 16);
                step(i + 24);
                i += 32;
            }
            while i + 8 <= n {
                step(i);
                i += 8;
            }
        }
        for (o, &v) in y[i..n].iter_mut().zip(&x[i..n]) {
            *o = (v - hi) * scale + shift;
        }
    }

    /// The first eight bf16 values of `s` (bits), widened by the shift alone as
    /// [`super::bf16_to_f32_for_arithmetic`] does.
    ///
    /// # Safety
    /// The CPU must have AVX2 ([`available`]).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn load8_bf16(s: &[u16]) -> [f32; 8] {
        let s = &s[..8];
        // SAFETY: `s` is 8 u16 (16 bytes), read unaligned; `__m256i` and `[f32; 8]` have the
        // same size and every bit pattern is valid for both.
        unsafe {
            let h = _mm_loadu_si128(s.as_ptr().cast::<__m128i>());
            let w = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
            std::mem::transmute::<__m256i, [f32; 8]>(w)
        }
    }

    /// Eight values rounded to bf16 bits as [`super::f32_to_bf16_bits`] rounds each (nearest
    /// even; NaN quieted, payload kept), in the 32-bit lanes.
    ///
    /// # Safety
    /// The CPU must have AVX2 ([`available`]).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn bf16_lanes(v: [f32; 8]) -> __m256i {
        // SAFETY: `__m256` and `[f32; 8]` have the same size, any bits are valid in both.
        let f = unsafe { std::mem::transmute::<[f32; 8], __m256>(v) };
        let x = _mm256_castps_si256(f);
        // SAFETY: the CPU has AVX2 (this function's contract).
        let rounded = unsafe { bf16_lanes_finite(v) };
        let nan = _mm256_or_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(0x40));
        let is_nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(f, f));
        _mm256_blendv_epi8(rounded, nan, is_nan)
    }

    /// [`bf16_lanes`] for lanes that hold no NaN (infinities round to themselves): the
    /// rounding alone, without the NaN blend.
    ///
    /// # Safety
    /// The CPU must have AVX2 ([`available`]).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn bf16_lanes_finite(v: [f32; 8]) -> __m256i {
        // SAFETY: `__m256i` and `[f32; 8]` have the same size, any bits are valid in both.
        let x = unsafe { std::mem::transmute::<[f32; 8], __m256i>(v) };
        let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(1));
        let bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd);
        _mm256_srli_epi32::<16>(_mm256_add_epi32(x, bias))
    }

    /// Rounds sixteen values to bf16 bits into the first sixteen of `d`, as
    /// [`super::f32_to_bf16_bits`] rounds each: one pack for both halves.
    ///
    /// # Safety
    /// The CPU must have AVX2 ([`available`]).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn store16_bf16(lo: [f32; 8], hi: [f32; 8], d: &mut [u16]) {
        let d = &mut d[..16];
        // SAFETY: the CPU has AVX2 (the caller); `d` is 16 u16 (32 bytes), written unaligned.
        unsafe {
            // one compare tells whether either vector holds a NaN (unordered lanes): almost
            // never, so the branch predicts and the blend is skipped
            let (l, h) = (
                std::mem::transmute::<[f32; 8], __m256>(lo),
                std::mem::transmute::<[f32; 8], __m256>(hi),
            );
            let (a, b) = if _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(l, h)) == 0 {
                (bf16_lanes_finite(lo), bf16_lanes_finite(hi))
            } else {
                (bf16_lanes(lo), bf16_lanes(hi))
            };
            // 32 -> 16 bits: every value is below 2^16, so the unsigned saturating pack is a
            // plain narrowing; it packs within 128-bit halves (a0-3 b0-3 | a4-7 b4-7), so
            // the quads are put back in order.
            let p = _mm256_packus_epi32(a, b);
            let q = _mm256_permute4x64_epi64::<0b11_01_10_00>(p);
            _mm256_storeu_si256(d.as_mut_ptr().cast::<__m256i>(), q);
        }
    }

    /// Rounds eight values to bf16 bits into the first eight of `d`, as
    /// [`super::f32_to_bf16_bits`] rounds each.
    ///
    /// # Safety
    /// The CPU must have AVX2 ([`available`]).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn store8_bf16(v: [f32; 8], d: &mut [u16]) {
        let d = &mut d[..8];
        // SAFETY: the CPU has AVX2 (the caller); `d` is 8 u16, written unaligned.
        unsafe {
            let r = bf16_lanes(v);
            let p = _mm256_packus_epi32(r, r);
            let q = _mm256_permute4x64_epi64::<0b1000>(p);
            _mm_storeu_si128(d.as_mut_ptr().cast::<__m128i>(), _mm256_castsi256_si128(q));
        }
    }

    /// Calls `eight` on each run of eight values of `src` and `dst` (the shorter length), and
    /// converts the rest with `one`.
    #[inline(always)]
    fn by_eights<S: Copy, D>(
        src: &[S],
        dst: &mut [D],
        mut eight: impl FnMut(&[S], &mut [D]),
        one: impl Fn(S) -> D,
    ) {
        let n = src.len().min(dst.len());
        let mut s8 = src[..n].chunks_exact(8);
        let mut d8 = dst[..n].chunks_exact_mut(8);
        for (s, d) in (&mut s8).zip(&mut d8) {
            eight(s, d);
        }
        for (d, &s) in d8.into_remainder().iter_mut().zip(s8.remainder()) {
            *d = one(s);
        }
    }

    /// The first eight f16 values of `s`, widened.
    ///
    /// # Safety
    /// The CPU must have AVX and F16C ([`available`]).
    #[target_feature(enable = "avx,f16c")]
    #[inline]
    pub(super) unsafe fn load8(s: &[u16]) -> [f32; 8] {
        let s = &s[..8];
        // SAFETY: `s` is 8 u16 (16 bytes), read unaligned; `__m256` and `[f32; 8]` have the
        // same size and every bit pattern is valid for both.
        unsafe {
            let h = _mm_loadu_si128(s.as_ptr().cast::<__m128i>());
            std::mem::transmute::<__m256, [f32; 8]>(_mm256_cvtph_ps(h))
        }
    }

    /// Rounds eight values to f16 (nearest even) into the first eight of `d`.
    ///
    /// # Safety
    /// The CPU must have AVX and F16C ([`available`]).
    #[target_feature(enable = "avx,f16c")]
    #[inline]
    pub(super) unsafe fn store8(v: [f32; 8], d: &mut [u16]) {
        let d = &mut d[..8];
        // SAFETY: as in `load8`; `d` is 8 u16, written unaligned. The empty `asm!` reads and
        // writes nothing but its register operand.
        unsafe {
            let f = std::mem::transmute::<[f32; 8], __m256>(v);
            let mut h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(f);
            // Keeps the rounding in a register: LLVM otherwise folds it into the store
            // (`vcvtps2ph` with a memory operand), which on AMD Zen cores costs more than
            // the register form and a plain store (a standalone loop: 0.099 against 0.073 ns
            // per value on this project's EPYC machine).
            std::arch::asm!("/* {0} */", inout(xmm_reg) h, options(pure, nomem, nostack, preserves_flags));
            _mm_storeu_si128(d.as_mut_ptr().cast::<__m128i>(), h);
        }
    }

    /// Widens f16 bits into `dst` (the shorter length), eight at a time.
    ///
    /// # Safety
    /// The CPU must have AVX and F16C ([`available`]).
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn widen(src: &[u16], dst: &mut [f32]) {
        by_eights(
            src,
            dst,
            |s, d| {
                // SAFETY: `s` is 8 u16 (16 bytes) and `d` 8 f32 (32 bytes), both read/written
                // unaligned; the caller guarantees AVX and F16C.
                unsafe {
                    let h = _mm_loadu_si128(s.as_ptr().cast::<__m128i>());
                    _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h));
                }
            },
            f16_bits_to_f32,
        );
    }

    /// Rounds `src` to f16 bits in `dst` (the shorter length), nearest even, eight at a time.
    ///
    /// # Safety
    /// The CPU must have AVX and F16C ([`available`]).
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn narrow(src: &[f32], dst: &mut [u16]) {
        by_eights(
            src,
            dst,
            |s, d| {
                // SAFETY: `s` is 8 f32 (32 bytes) and `d` 8 u16 (16 bytes), both read/written
                // unaligned; the caller guarantees AVX and F16C.
                unsafe {
                    let f = _mm256_loadu_ps(s.as_ptr());
                    let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(f);
                    _mm_storeu_si128(d.as_mut_ptr().cast::<__m128i>(), h);
                }
            },
            f32_to_f16_bits,
        );
    }
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

/// Widens bf16 bits into `dst` (same length) for arithmetic: the shift alone, two vector
/// instructions per eight values against six with `half`'s NaN quieting (the
/// bf16 forward measured 1.3x slower than f16 with it). The bits differ from `half`'s only for
/// signaling NaNs, which stay signaling here; every use computes with the values
/// ([`read_f32`]'s contract), and IEEE 754 arithmetic (x86's included) returns a signaling
/// NaN operand quieted with its payload kept, which is `half`'s quieted value: the results are
/// the same (`tests.rs` checks every bf16 input through an addition).
#[inline(always)]
pub(super) fn bf16_to_f32_for_arithmetic(src: &[u16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits(u32::from(s) << 16);
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
