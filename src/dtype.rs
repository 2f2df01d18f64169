//! Element types: activations in f32, f16 or bf16 (and f64 on the CPU path); parameters in f32
//! or the activation type.

use half::{bf16, f16};
use std::fmt;

/// The runtime name of an element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE binary64: the CPU path only (computed in f64, held to 1e-12 against the f64
    /// reference); the GPU path refuses it with [`Error::DtypeNotOnGpu`](crate::Error::DtypeNotOnGpu).
    F64,
}

impl DType {
    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::F64 => 8,
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Short name used in kernel names and reports (`f32`, `f16`, `bf16`, `f64`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F64 => "f64",
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Distance from 1.0 to the next representable value (2^-23, 2^-10, 2^-7, 2^-52).
    pub const fn epsilon(self) -> f64 {
        match self {
            DType::F64 => f64::EPSILON,
            DType::F32 => 1.1920928955078125e-7,
            DType::F16 => 9.765625e-4,
            DType::BF16 => 7.8125e-3,
        }
    }

    /// Unit in the last place of `v` in this dtype (the spacing of representable values at `|v|`),
    /// with the subnormal spacing as a floor.
    pub fn ulp(self, v: f64) -> f64 {
        let (mant_bits, min_exp) = match self {
            DType::F64 => (52, -1022),
            DType::F32 => (23, -126),
            DType::F16 => (10, -14),
            DType::BF16 => (7, -126),
        };
        let a = v.abs();
        let e = if a > 0.0 && a.is_finite() {
            (a.log2().floor() as i32).max(min_exp)
        } else {
            min_exp
        };
        2f64.powi(e - mant_bits)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An element type the crate computes on: `f32`, [`struct@f16`], [`struct@bf16`], or `f64` on
/// the CPU path.
///
/// Sealed: the kernels exist for the first three only (the GPU path refuses f64 with a typed
/// error). Conversions to f32 are exact except from f64; conversions from f32 and f64 round to
/// nearest even.
pub trait Element:
    sealed::Sealed
    + Copy
    + Default
    + Send
    + Sync
    + PartialEq
    + fmt::Debug
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + 'static
{
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Widening to f32 (exact for f32, f16, bf16; rounding for f64).
    fn to_f32(self) -> f32;
    /// Rounding narrowing from f32.
    fn from_f32(v: f32) -> Self;
    /// Exact widening to f64.
    fn to_f64(self) -> f64;
    /// Rounding narrowing from f64 (one rounding, not two).
    fn from_f64(v: f64) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v as f64
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        f16::from_f32(f64_to_f32_round_odd(v))
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        bf16::from_f32(f64_to_f32_round_odd(v))
    }
}

/// f64 to f32 rounding to odd: truncate, and set the last bit if anything was cut off. A second
/// rounding to nearest from there into a format at least two bits narrower (f16: 11 bits, bf16: 8,
/// against f32's 24) gives the correctly rounded result, which `half`'s own `from_f64` does not
/// (with F16C it converts through a rounded f32 and can round twice).
fn f64_to_f32_round_odd(v: f64) -> f32 {
    let f = v as f32;
    if !f.is_finite() || f as f64 == v {
        return f;
    }
    // the truncation of v: f itself, or its neighbour towards zero when f rounded away
    let t = if (f as f64).abs() > v.abs() {
        f32::from_bits(f.to_bits() - 1)
    } else {
        f
    };
    f32::from_bits(t.to_bits() | 1)
}

/// Checks that parameters of type `P` may accompany activations of type `T`:
/// `P` must be f32 or `T` itself (the mixed-precision rule).
pub(crate) fn check_param_dtype<T: Element, P: Element>(name: &'static str) -> crate::Result<()> {
    if P::DTYPE == T::DTYPE || P::DTYPE == DType::F32 {
        Ok(())
    } else {
        Err(crate::Error::DtypeMismatch {
            name,
            activation: T::DTYPE,
            param: P::DTYPE,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulp_matches_known_spacings() {
        assert_eq!(DType::F32.ulp(1.0), f32::EPSILON as f64);
        assert_eq!(DType::F16.ulp(1.0), 2f64.powi(-10));
        assert_eq!(DType::BF16.ulp(1.5), 2f64.powi(-7));
        assert_eq!(DType::F16.ulp(1000.0), 0.5);
        // subnormal floor
        assert_eq!(DType::F16.ulp(0.0), 2f64.powi(-24));
        assert_eq!(DType::F32.ulp(1e-45), 2f64.powi(-149));
        assert_eq!(DType::F64.ulp(1.0), f64::EPSILON);
        assert_eq!(DType::F64.size(), 8);
    }

    #[test]
    fn from_f64_rounds_once() {
        // 1 + 2^-11 + 2^-30 is just above the f16 midpoint between 1 and 1 + 2^-10: one rounding
        // gives 1 + 2^-10; rounding to f32 first lands on the midpoint and ties to even, 1.0.
        let v = 1.0 + 2f64.powi(-11) + 2f64.powi(-30);
        assert_eq!(<f16 as Element>::from_f64(v).to_f64(), 1.0 + 2f64.powi(-10));
        assert_eq!(
            <f16 as Element>::from_f64(-v).to_f64(),
            -(1.0 + 2f64.powi(-10))
        );
        // and just below the midpoint stays down
        let v = 1.0 + 2f64.powi(-11) - 2f64.powi(-30);
        assert_eq!(<f16 as Element>::from_f64(v).to_f64(), 1.0);
        // bf16: midpoint between 1 and 1 + 2^-7, nudged up
        let v = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        assert_eq!(<bf16 as Element>::from_f64(v).to_f64(), 1.0 + 2f64.powi(-7));
        // exact midpoints still tie to even, and specials pass through
        assert_eq!(
            <f16 as Element>::from_f64(1.0 + 2f64.powi(-11)).to_f64(),
            1.0
        );
        assert!(<f16 as Element>::from_f64(f64::NAN).to_f64().is_nan());
        assert_eq!(<bf16 as Element>::from_f64(1e300).to_f64(), f64::INFINITY);
        assert_eq!(<f16 as Element>::from_f64(1e-300).to_f64(), 0.0);
    }
}
