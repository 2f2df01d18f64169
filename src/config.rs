//! Configuration and shapes: what a GroupNorm is, and the validated geometry of one call.
//!
//! [`GroupNorm`] holds what does not change between calls (groups, channels, eps, layout).
//! [`Geometry`] is what one call's input dims mean for it: `N`, `C`, `G`, `D = C / G`, `S` and
//! `L = D * S`, checked once, so the CPU and GPU paths work from the same validated numbers.

use crate::dtype::{check_param_dtype, Element};
use crate::{Error, Result};

/// Memory order of an activation tensor whose logical dims are `(N, C, *spatial)`.
///
/// Dims are always passed in the logical order `(N, C, *spatial)`, as PyTorch does for
/// channels-last tensors; the layout says how those elements lie in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Layout {
    /// Contiguous `(N, C, *spatial)`: a group row is one run of `L = D * S` values.
    #[default]
    Nchw,
    /// Channels-last, contiguous `(N, *spatial, C)`: a group row is `S` runs of `D` values,
    /// `C` apart.
    Nhwc,
}

impl Layout {
    /// Short name (`nchw`, `nhwc`).
    pub const fn name(self) -> &'static str {
        match self {
            Layout::Nchw => "nchw",
            Layout::Nhwc => "nhwc",
        }
    }
}

/// What the operator applies to the normalized, affine output: `y = act(xhat * w + b)`.
///
/// Diffusion and VAE blocks follow nearly every GroupNorm with a SiLU; fusing it saves a full
/// pass over memory forward and two backward. The backward of an activated operator needs the
/// bias (to recompute `z = xhat * w + b`): [`GroupNorm::backward`] reads it from the same
/// [`Affine`] the forward pass took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Activation {
    /// Plain GroupNorm: `y = xhat * w + b`.
    #[default]
    None,
    /// `y = silu(z) = z * sigmoid(z)` with `z = xhat * w + b` (PyTorch's `F.silu`).
    Silu,
}

impl Activation {
    /// Short name (`none`, `silu`).
    pub const fn name(self) -> &'static str {
        match self {
            Activation::None => "none",
            Activation::Silu => "silu",
        }
    }

    /// The activation in f64 (the reference's precision).
    pub fn apply_f64(self, z: f64) -> f64 {
        match self {
            Activation::None => z,
            Activation::Silu => z / (1.0 + (-z).exp()),
        }
    }

    /// Its derivative `d act(z) / dz` in f64.
    pub fn derivative_f64(self, z: f64) -> f64 {
        match self {
            Activation::None => 1.0,
            Activation::Silu => {
                let sig = 1.0 / (1.0 + (-z).exp());
                sig * (1.0 + z * (1.0 - sig))
            }
        }
    }

    /// The activation in f32, as the kernels compute it; the fast CPU path follows the same
    /// formula with its own vectorized exponential (within 2 ulp of the exact one).
    #[inline(always)]
    pub fn apply_f32(self, z: f32) -> f32 {
        match self {
            Activation::None => z,
            Activation::Silu => z / (1.0 + (-z).exp()),
        }
    }

    /// Its derivative in f32, as the kernels compute it (the fast CPU path: the same formula
    /// with its vectorized exponential).
    #[inline(always)]
    pub fn derivative_f32(self, z: f32) -> f32 {
        match self {
            Activation::None => 1.0,
            Activation::Silu => {
                let sig = 1.0 / (1.0 + (-z).exp());
                sig * (1.0 + z * (1.0 - sig))
            }
        }
    }
}

/// The affine parameters of one call, `y = act(xhat * weight + bias)`: each optional, `C`
/// values, in f32 or the activation dtype. A missing weight counts as 1, a missing bias as 0.
///
/// The two are named at the call site, so they cannot be swapped by position, and
/// [`Affine::none`] needs no type annotation:
///
/// ```
/// use groupnorm::{Affine, GroupNorm};
/// let gn = GroupNorm::new(1, 2)?;
/// let (x, w, b) = (vec![1.0f32, 3.0], vec![2.0f32, 2.0], vec![0.5f32, 0.5]);
/// let (plain, _) = gn.forward(&x, &[1, 2], Affine::none())?;
/// let (scaled, _) = gn.forward(&x, &[1, 2], Affine::new().weight(&w).bias(&b))?;
/// assert!((scaled[1] - (2.0 * plain[1] + 0.5)).abs() < 1e-6);
/// # Ok::<(), groupnorm::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Affine<'a, P> {
    /// Per-channel scale, or `None` for 1.
    pub weight: Option<&'a [P]>,
    /// Per-channel shift, or `None` for 0.
    pub bias: Option<&'a [P]>,
}

impl<'a, P> Affine<'a, P> {
    /// Neither parameter yet, with the parameter type left to the ones that follow.
    pub const fn new() -> Self {
        Affine {
            weight: None,
            bias: None,
        }
    }

    /// Sets the weight (per-channel scale).
    pub const fn weight(mut self, weight: &'a [P]) -> Self {
        self.weight = Some(weight);
        self
    }

    /// Sets the bias (per-channel shift).
    pub const fn bias(mut self, bias: &'a [P]) -> Self {
        self.bias = Some(bias);
        self
    }
}

impl Affine<'static, f32> {
    /// No weight and no bias (typed f32, which every activation dtype accepts, so no
    /// annotation is needed).
    pub const fn none() -> Self {
        Affine::new()
    }
}

impl<P> Default for Affine<'_, P> {
    fn default() -> Self {
        Affine::new()
    }
}

/// A validated Group Normalization configuration.
///
/// ```
/// use groupnorm::{GroupNorm, Layout};
/// let gn = GroupNorm::new(32, 320)?.with_eps(1e-6)?.with_layout(Layout::Nhwc);
/// assert_eq!(gn.channels_per_group(), 10);
/// # Ok::<(), groupnorm::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupNorm {
    groups: usize,
    channels: usize,
    eps: f64,
    layout: Layout,
    activation: Activation,
}

/// The `eps` PyTorch uses by default.
pub const DEFAULT_EPS: f64 = 1e-5;

impl GroupNorm {
    /// `groups` groups over `channels` channels, eps 1e-5, NCHW.
    ///
    /// Errors: `groups == 0`, `channels == 0`, or `channels % groups != 0`.
    pub fn new(groups: usize, channels: usize) -> Result<Self> {
        if groups == 0 {
            return Err(Error::ZeroGroups);
        }
        if channels == 0 {
            return Err(Error::ZeroChannels);
        }
        if channels % groups != 0 {
            return Err(Error::GroupsDoNotDivideChannels { groups, channels });
        }
        Ok(GroupNorm {
            groups,
            channels,
            eps: DEFAULT_EPS,
            layout: Layout::Nchw,
            activation: Activation::None,
        })
    }

    /// Sets eps, added to the variance before the square root.
    ///
    /// Every path computes in f32 and uses `eps as f32`, so eps is checked after that
    /// conversion: it must stay finite and positive there (from the smallest subnormal f32,
    /// about 1.4e-45, up to `f32::MAX`, about 3.4e38). Errors with [`Error::InvalidEps`]
    /// otherwise: zero, negative, NaN, infinite, or a value that underflows to 0 or overflows to
    /// infinity in f32 (`1e-50`, `1e300`).
    pub fn with_eps(mut self, eps: f64) -> Result<Self> {
        let e32 = eps as f32;
        if !eps.is_finite() || !e32.is_finite() || e32 <= 0.0 {
            return Err(Error::InvalidEps { eps });
        }
        self.eps = eps;
        Ok(self)
    }

    /// Sets the memory layout of activations.
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// Sets the activation fused after the affine transform (default [`Activation::None`]).
    pub fn with_activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }

    /// The configured activation.
    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Number of groups `G`.
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// Number of channels `C`.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Channels per group `D = C / G`.
    pub fn channels_per_group(&self) -> usize {
        self.channels / self.groups
    }

    /// The configured eps.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// The configured layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Validates input dims `(N, C, *spatial)` against this configuration.
    pub fn geometry(&self, dims: &[usize]) -> Result<Geometry> {
        if dims.len() < 2 {
            return Err(Error::TooFewDims {
                got: dims.len(),
                dims: dims.to_vec(),
            });
        }
        if dims[1] != self.channels {
            return Err(Error::ChannelMismatch {
                expected: self.channels,
                got: dims[1],
                dims: dims.to_vec(),
            });
        }
        let too_large = |why: &str| Error::TooLarge {
            dims: dims.to_vec(),
            why: why.to_string(),
        };
        let spatial = dims[2..]
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| too_large("the spatial size overflows usize"))?;
        let n = dims[0];
        let numel = n
            .checked_mul(self.channels)
            .and_then(|v| v.checked_mul(spatial))
            .ok_or_else(|| too_large("the element count overflows usize"))?;
        // Byte sizes must fit too, for the widest dtype, or no allocation could describe them.
        // This holds whether or not the tensor is empty: the statistics (N * G values), the
        // parameter gradients (C) and the per-(n, c) partials of the backward pass (up to four
        // f32 each, N * C) are allocated even when S = 0.
        fits_bytes(numel, 8).then_some(()).ok_or_else(|| {
            too_large("the byte size of an f64 tensor of these dims overflows isize")
        })?;
        n.checked_mul(self.groups)
            .filter(|&rows| fits_bytes(rows, 8))
            .ok_or_else(|| {
                too_large(&format!(
                    "N * G = {n} * {} statistics (two f32 each) overflow isize bytes",
                    self.groups
                ))
            })?;
        n.checked_mul(self.channels)
            .filter(|&nc| fits_bytes(nc, 16))
            .ok_or_else(|| {
                too_large(&format!(
                    "N * C = {n} * {} per-channel partials (four f32 each) overflow isize bytes",
                    self.channels
                ))
            })?;
        let d = self.channels / self.groups;
        Ok(Geometry {
            n,
            c: self.channels,
            g: self.groups,
            d,
            s: spatial,
            layout: self.layout,
            dims: dims.to_vec(),
        })
    }

    /// The plain backward (without the bias) is only defined without an activation: errors with
    /// [`Error::BiasNeeded`] otherwise, pointing at `backward_activated`.
    pub(crate) fn check_plain_backward(&self) -> Result<()> {
        match self.activation {
            Activation::None => Ok(()),
            a => Err(Error::BiasNeeded {
                activation: a.name(),
            }),
        }
    }

    /// Checks parameter lengths (`C` each) and dtypes (f32 or the activation dtype).
    pub(crate) fn check_params<T: Element, P: Element>(
        &self,
        weight: Option<&[P]>,
        bias: Option<&[P]>,
    ) -> Result<()> {
        for (name, p) in [("weight", weight), ("bias", bias)] {
            if let Some(p) = p {
                check_param_dtype::<T, P>(name)?;
                check_len(name, p.len(), self.channels, "one value per channel")?;
            }
        }
        Ok(())
    }
}

/// Whether `count` values of `size` bytes each fit in `isize::MAX` bytes (the most any
/// allocation, host or device, can describe).
pub(crate) fn fits_bytes(count: usize, size: usize) -> bool {
    count
        .checked_mul(size)
        .is_some_and(|b| b <= isize::MAX as usize)
}

/// Returns a [`Error::LengthMismatch`] unless `got == expected`.
pub(crate) fn check_len(name: &'static str, got: usize, expected: usize, what: &str) -> Result<()> {
    check_len_with(name, got, expected, || what.to_string())
}

/// [`check_len`] with the description formatted only when the lengths differ (the checks run
/// on every call, and a message formatted up front was an allocation per call).
pub(crate) fn check_len_with(
    name: &'static str,
    got: usize,
    expected: usize,
    what: impl FnOnce() -> String,
) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            name,
            expected,
            got,
            what: what(),
        })
    }
}

/// The validated geometry of one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Batch size `N`.
    pub n: usize,
    /// Channels `C`.
    pub c: usize,
    /// Groups `G`.
    pub g: usize,
    /// Channels per group `D = C / G`.
    pub d: usize,
    /// Spatial size `S`: the product of the trailing dims (1 when there are none).
    pub s: usize,
    /// Memory layout of the activations.
    pub layout: Layout,
    /// The logical dims `(N, C, *spatial)` as given.
    pub dims: Vec<usize>,
}

impl Geometry {
    /// Values in one group row, `L = D * S`.
    pub fn row_len(&self) -> usize {
        self.d * self.s
    }

    /// Number of group rows, `N * G` (also the length of `mean` and `rstd`).
    pub fn rows(&self) -> usize {
        self.n * self.g
    }

    /// Total number of activation elements, `N * C * S`.
    pub fn numel(&self) -> usize {
        self.n * self.c * self.s
    }

    /// Offset of element `(n, c, s)` in memory for this layout.
    #[inline(always)]
    pub fn offset(&self, n: usize, c: usize, s: usize) -> usize {
        match self.layout {
            Layout::Nchw => (n * self.c + c) * self.s + s,
            Layout::Nhwc => (n * self.s + s) * self.c + c,
        }
    }

    /// Checks that an activation buffer (`x`, `dy`, `y`, `dx`) has `N * C * S` elements.
    pub(crate) fn check_activation(&self, name: &'static str, len: usize) -> Result<()> {
        check_len_with(name, len, self.numel(), || {
            format!("the product of dims {:?}", self.dims)
        })
    }

    /// Checks that `mean`/`rstd` have `N * G` elements.
    pub(crate) fn check_stats(&self, stats: &Stats) -> Result<()> {
        let what = || format!("N * G = {} * {}", self.n, self.g);
        check_len_with("mean", stats.mean.len(), self.rows(), what)?;
        check_len_with("rstd", stats.rstd.len(), self.rows(), what)
    }
}

/// Per-group statistics saved by the forward pass for the backward pass, f32, shape `(N, G)`
/// row-major: `mean[n * G + g]`, `rstd[n * G + g] = 1 / sqrt(var + eps)` with the biased variance.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Mean of each group row.
    pub mean: Vec<f32>,
    /// Reciprocal standard deviation of each group row.
    pub rstd: Vec<f32>,
}

/// Gradients from the backward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct Grads<T, P> {
    /// Gradient with respect to the input, same dims and layout as `x`.
    pub dx: Vec<T>,
    /// Gradient with respect to the weight (`C` values), present when a weight was given.
    pub dweight: Option<Vec<P>>,
    /// Gradient with respect to the bias (`C` values), present when asked for.
    pub dbias: Option<Vec<P>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_follow_the_layout() {
        let gn = GroupNorm::new(2, 4).unwrap();
        let g = gn.geometry(&[2, 4, 3]).unwrap();
        assert_eq!(g.offset(1, 2, 1), (4 + 2) * 3 + 1);
        let g = gn.with_layout(Layout::Nhwc).geometry(&[2, 4, 3]).unwrap();
        assert_eq!(g.offset(1, 2, 1), (3 + 1) * 4 + 2);
    }

    #[test]
    fn two_dim_input_has_unit_spatial() {
        let g = GroupNorm::new(2, 4).unwrap().geometry(&[3, 4]).unwrap();
        assert_eq!((g.n, g.s, g.d, g.row_len(), g.rows()), (3, 1, 2, 2, 6));
    }
}
