//! Device tensors: a `cudarc` buffer with the dims and layout that give it meaning.

use super::runtime::Gpu;
use crate::config::{check_len, Stats};
use crate::{Element, Error, Layout, Result};
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, DriverError, ValidAsZeroBits};
use std::sync::Arc;

/// Wraps an allocation failure with its size, and any other driver error with what was done.
pub(crate) fn alloc_error(bytes: usize, what: &str, e: DriverError) -> Error {
    if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::OutOfMemory { bytes, source: e }
    } else {
        Error::driver(what.to_string(), e)
    }
}

/// Copies a host slice to a new device buffer on `stream`.
pub fn upload<T: DeviceRepr>(stream: &Arc<CudaStream>, host: &[T]) -> Result<CudaSlice<T>> {
    stream
        .clone_htod(host)
        .map_err(|e| alloc_error(std::mem::size_of_val(host), "copying to the device", e))
}

/// Copies a device buffer back to the host (synchronizes with `stream`).
pub fn download<T: DeviceRepr>(stream: &Arc<CudaStream>, dev: &CudaSlice<T>) -> Result<Vec<T>> {
    stream
        .clone_dtoh(dev)
        .map_err(|e| Error::driver("copying to the host", e))
}

/// A zeroed device buffer of `len` elements (at least one, as the driver refuses empty ones).
pub(crate) fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<CudaSlice<T>> {
    // cudarc multiplies `len` by the element size unchecked: a wrapped product would allocate a
    // few bytes for a buffer that claims `len` elements
    let bytes = checked_bytes::<T>(len.max(1), &[len])?;
    stream
        .alloc_zeros::<T>(len.max(1))
        .map_err(|e| alloc_error(bytes, "allocating device memory", e))
}

/// An activation tensor on the device: logical dims `(N, C, *spatial)`, a layout, and a buffer
/// holding its `N * C * S` elements from element `offset` on.
///
/// The offset lets a tensor be a view into a larger buffer, including one that starts at an
/// element that is not 16-byte aligned (the kernels then take their scalar path).
#[derive(Debug)]
pub struct DeviceTensor<T> {
    data: CudaSlice<T>,
    offset: usize,
    dims: Vec<usize>,
    layout: Layout,
}

fn numel(dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::TooLarge {
            dims: dims.to_vec(),
            why: "the element count overflows usize".into(),
        })
}

/// Bytes of `len` elements of `T`, or [`Error::TooLarge`] where that passes `isize::MAX` (no
/// allocation can be that large; cudarc would wrap the product).
pub(crate) fn checked_bytes<T>(len: usize, dims: &[usize]) -> Result<usize> {
    let size = std::mem::size_of::<T>();
    if crate::config::fits_bytes(len, size) {
        Ok(len * size)
    } else {
        Err(Error::TooLarge {
            dims: dims.to_vec(),
            why: format!("{len} elements of {size} bytes overflow isize bytes"),
        })
    }
}

/// Checks that a buffer of `len` elements holds `offset..offset + numel(dims)`.
fn check_extent<T>(len: usize, offset: usize, dims: &[usize]) -> Result<()> {
    let n = numel(dims)?;
    let needed = offset.checked_add(n).ok_or_else(|| Error::TooLarge {
        dims: dims.to_vec(),
        why: "offset plus element count overflows usize".into(),
    })?;
    // in bytes too, and the buffer's own claim: a length whose bytes overflow cannot be a
    // real allocation, so no length check against it means anything
    checked_bytes::<T>(needed, dims)?;
    checked_bytes::<T>(len, dims)?;
    if len < needed {
        return Err(Error::LengthMismatch {
            name: "data",
            expected: needed,
            got: len,
            what: format!("offset {offset} plus the product of dims {dims:?}"),
        });
    }
    Ok(())
}

/// A borrowed activation tensor on the device: a buffer the caller keeps (a `CudaSlice` from
/// candle, another library or a pool), with the dims and layout it holds from element `offset`
/// on. What [`DeviceTensor`] is, without taking the buffer: the GPU operations take either
/// (see [`AsDeviceView`]).
///
/// ```no_run
/// use groupnorm::gpu::{upload, DeviceAffine, DeviceView, Gpu};
/// use groupnorm::{GroupNorm, Layout};
/// let gpu = Gpu::new(0)?;
/// let mine = upload(gpu.stream(), &vec![0.5f32; 2 * 8 * 16])?; // stays the caller's
/// let x = DeviceView::new(&mine, &[2, 8, 16], Layout::Nchw)?;
/// let (y, _stats) = GroupNorm::new(4, 8)?.on_gpu(&gpu).forward(&x, DeviceAffine::none())?;
/// # Ok::<(), groupnorm::Error>(())
/// ```
#[derive(Debug)]
pub struct DeviceView<'a, T> {
    data: &'a CudaSlice<T>,
    offset: usize,
    dims: &'a [usize],
    layout: Layout,
}

// by hand: the derives would ask `T: Clone`, which a shared borrow does not need
impl<T> Clone for DeviceView<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DeviceView<'_, T> {}

impl<'a, T: Element> DeviceView<'a, T> {
    /// Views a buffer holding at least the tensor's elements, from its start.
    pub fn new(data: &'a CudaSlice<T>, dims: &'a [usize], layout: Layout) -> Result<Self> {
        Self::with_offset(data, 0, dims, layout)
    }

    /// Views the elements `offset..offset + numel` of a buffer. Errors as
    /// [`DeviceTensor::with_offset`].
    pub fn with_offset(
        data: &'a CudaSlice<T>,
        offset: usize,
        dims: &'a [usize],
        layout: Layout,
    ) -> Result<Self> {
        check_extent::<T>(data.len(), offset, dims)?;
        Ok(DeviceView {
            data,
            offset,
            dims,
            layout,
        })
    }

    /// Logical dims `(N, C, *spatial)`.
    pub fn dims(&self) -> &'a [usize] {
        self.dims
    }

    /// Memory layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// Element offset of the tensor in its buffer.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The underlying buffer.
    pub fn buffer(&self) -> &'a CudaSlice<T> {
        self.data
    }
}

/// A mutably borrowed activation tensor on the device, for outputs: what [`DeviceView`] is
/// for inputs.
#[derive(Debug)]
pub struct DeviceViewMut<'a, T> {
    data: &'a mut CudaSlice<T>,
    offset: usize,
    dims: &'a [usize],
    layout: Layout,
}

impl<'a, T: Element> DeviceViewMut<'a, T> {
    /// Views a buffer holding at least the tensor's elements, from its start.
    pub fn new(data: &'a mut CudaSlice<T>, dims: &'a [usize], layout: Layout) -> Result<Self> {
        Self::with_offset(data, 0, dims, layout)
    }

    /// Views the elements `offset..offset + numel` of a buffer. Errors as
    /// [`DeviceTensor::with_offset`].
    pub fn with_offset(
        data: &'a mut CudaSlice<T>,
        offset: usize,
        dims: &'a [usize],
        layout: Layout,
    ) -> Result<Self> {
        check_extent::<T>(data.len(), offset, dims)?;
        Ok(DeviceViewMut {
            data,
            offset,
            dims,
            layout,
        })
    }

    /// Logical dims `(N, C, *spatial)`.
    pub fn dims(&self) -> &[usize] {
        self.dims
    }

    /// Memory layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Element offset of the tensor in its buffer.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The same tensor, read-only.
    pub fn as_view(&self) -> DeviceView<'_, T> {
        DeviceView {
            data: self.data,
            offset: self.offset,
            dims: self.dims,
            layout: self.layout,
        }
    }

    /// The underlying buffer, mutably.
    pub fn buffer_mut(&mut self) -> &mut CudaSlice<T> {
        self.data
    }
}

/// What the GPU operations take as an input tensor: an owned [`DeviceTensor`] or a borrowed
/// [`DeviceView`] (pass either by reference).
pub trait AsDeviceView {
    /// The element type.
    type Elem: Element;
    /// The tensor as a borrowed view.
    fn device_view(&self) -> DeviceView<'_, Self::Elem>;
}

/// What the GPU operations take as an output tensor: an owned [`DeviceTensor`] or a mutably
/// borrowed [`DeviceViewMut`] (pass either by `&mut`).
pub trait AsDeviceViewMut {
    /// The element type.
    type Elem: Element;
    /// The tensor as a mutably borrowed view.
    fn device_view_mut(&mut self) -> DeviceViewMut<'_, Self::Elem>;
}

impl<T: Element> AsDeviceView for DeviceTensor<T> {
    type Elem = T;
    fn device_view(&self) -> DeviceView<'_, T> {
        self.view()
    }
}

impl<T: Element> AsDeviceView for DeviceView<'_, T> {
    type Elem = T;
    fn device_view(&self) -> DeviceView<'_, T> {
        *self
    }
}

impl<T: Element> AsDeviceViewMut for DeviceTensor<T> {
    type Elem = T;
    fn device_view_mut(&mut self) -> DeviceViewMut<'_, T> {
        self.view_mut()
    }
}

impl<T: Element> AsDeviceViewMut for DeviceViewMut<'_, T> {
    type Elem = T;
    fn device_view_mut(&mut self) -> DeviceViewMut<'_, T> {
        DeviceViewMut {
            data: &mut *self.data,
            offset: self.offset,
            dims: self.dims,
            layout: self.layout,
        }
    }
}

impl<T: Element> DeviceTensor<T> {
    /// The tensor as a borrowed view.
    pub fn view(&self) -> DeviceView<'_, T> {
        DeviceView {
            data: &self.data,
            offset: self.offset,
            dims: &self.dims,
            layout: self.layout,
        }
    }

    /// The tensor as a mutably borrowed view.
    pub fn view_mut(&mut self) -> DeviceViewMut<'_, T> {
        DeviceViewMut {
            data: &mut self.data,
            offset: self.offset,
            dims: &self.dims,
            layout: self.layout,
        }
    }

    /// Wraps a device buffer holding exactly the tensor's elements.
    pub fn new(data: CudaSlice<T>, dims: &[usize], layout: Layout) -> Result<Self> {
        Self::with_offset(data, 0, dims, layout)
    }

    /// Wraps the elements `offset..offset + numel` of a device buffer.
    pub fn with_offset(
        data: CudaSlice<T>,
        offset: usize,
        dims: &[usize],
        layout: Layout,
    ) -> Result<Self> {
        check_extent::<T>(data.len(), offset, dims)?;
        Ok(DeviceTensor {
            data,
            offset,
            dims: dims.to_vec(),
            layout,
        })
    }

    /// Copies a host slice holding the tensor in `layout` order to the device.
    pub fn from_host(gpu: &Gpu, host: &[T], dims: &[usize], layout: Layout) -> Result<Self> {
        check_len("host", host.len(), numel(dims)?, "the product of the dims")?;
        let data = if host.is_empty() {
            zeros(gpu.stream(), 0)?
        } else {
            upload(gpu.stream(), host)?
        };
        Ok(DeviceTensor {
            data,
            offset: 0,
            dims: dims.to_vec(),
            layout,
        })
    }

    /// A tensor of zeros. Errors with [`Error::TooLarge`] before allocating where the byte size
    /// overflows `isize`.
    pub fn zeros(gpu: &Gpu, dims: &[usize], layout: Layout) -> Result<Self> {
        let n = numel(dims)?;
        checked_bytes::<T>(n, dims)?;
        Ok(DeviceTensor {
            data: zeros(gpu.stream(), n)?,
            offset: 0,
            dims: dims.to_vec(),
            layout,
        })
    }

    /// Copies the tensor's elements back to the host, in its layout's order.
    pub fn to_host(&self, gpu: &Gpu) -> Result<Vec<T>> {
        let n = self.numel();
        if n == 0 {
            return Ok(Vec::new());
        }
        let view = self.data.slice(self.offset..self.offset + n);
        gpu.stream()
            .clone_dtoh(&view)
            .map_err(|e| Error::driver("copying to the host", e))
    }

    /// Logical dims `(N, C, *spatial)`.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// Memory layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// Element offset of the tensor in its buffer.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The underlying buffer.
    pub fn buffer(&self) -> &CudaSlice<T> {
        &self.data
    }

    /// The underlying buffer, mutably.
    pub fn buffer_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.data
    }

    /// Gives the buffer back.
    pub fn into_buffer(self) -> CudaSlice<T> {
        self.data
    }
}

/// The affine parameters of one GPU call, on the device: what [`Affine`](crate::Affine) is on
/// the host. Named at the call site, so weight and bias cannot be swapped by position, and
/// [`DeviceAffine::none`] needs no type annotation.
#[derive(Debug)]
pub struct DeviceAffine<'a, P> {
    /// Per-channel scale (`C` values), or `None` for 1.
    pub weight: Option<&'a CudaSlice<P>>,
    /// Per-channel shift (`C` values), or `None` for 0.
    pub bias: Option<&'a CudaSlice<P>>,
}

// by hand: the derives would ask `P: Clone`, which the references do not need
impl<P> Clone for DeviceAffine<'_, P> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<P> Copy for DeviceAffine<'_, P> {}

impl<'a, P> DeviceAffine<'a, P> {
    /// Neither parameter yet, with the parameter type left to the ones that follow.
    pub const fn new() -> Self {
        DeviceAffine {
            weight: None,
            bias: None,
        }
    }

    /// Sets the weight (per-channel scale).
    pub const fn weight(mut self, weight: &'a CudaSlice<P>) -> Self {
        self.weight = Some(weight);
        self
    }

    /// Sets the bias (per-channel shift).
    pub const fn bias(mut self, bias: &'a CudaSlice<P>) -> Self {
        self.bias = Some(bias);
        self
    }
}

impl DeviceAffine<'static, f32> {
    /// No weight and no bias (typed f32, which every activation dtype accepts).
    pub const fn none() -> Self {
        DeviceAffine::new()
    }
}

impl<P> Default for DeviceAffine<'_, P> {
    fn default() -> Self {
        DeviceAffine::new()
    }
}

/// Forward statistics on the device, f32, `(N, G)`: what [`Stats`] is on the host.
#[derive(Debug)]
pub struct DeviceStats {
    /// Mean of each group row.
    pub mean: CudaSlice<f32>,
    /// Reciprocal standard deviation of each group row.
    pub rstd: CudaSlice<f32>,
    /// Number of rows, `N * G` (the buffers may be longer: the driver refuses empty ones).
    pub rows: usize,
}

impl DeviceStats {
    /// Zeroed statistics for `rows` group rows.
    pub fn zeros(gpu: &Gpu, rows: usize) -> Result<Self> {
        checked_bytes::<f32>(rows, &[rows])?;
        Ok(DeviceStats {
            mean: zeros(gpu.stream(), rows)?,
            rstd: zeros(gpu.stream(), rows)?,
            rows,
        })
    }

    /// Uploads host statistics.
    pub fn from_host(gpu: &Gpu, stats: &Stats) -> Result<Self> {
        check_len(
            "rstd",
            stats.rstd.len(),
            stats.mean.len(),
            "as many as mean",
        )?;
        let rows = stats.mean.len();
        if rows == 0 {
            return Self::zeros(gpu, 0);
        }
        Ok(DeviceStats {
            mean: upload(gpu.stream(), &stats.mean)?,
            rstd: upload(gpu.stream(), &stats.rstd)?,
            rows,
        })
    }

    /// Checks that the public fields agree: both buffers hold at least `rows` values.
    pub fn validate(&self) -> Result<()> {
        for (name, s) in [("mean", &self.mean), ("rstd", &self.rstd)] {
            if s.len() < self.rows {
                return Err(Error::LengthMismatch {
                    name,
                    expected: self.rows,
                    got: s.len(),
                    what: "at least `rows` values (DeviceStats::rows)".into(),
                });
            }
        }
        Ok(())
    }

    /// Copies the statistics to the host. Errors with [`Error::LengthMismatch`] where the
    /// public fields disagree (a buffer shorter than `rows`).
    pub fn to_host(&self, gpu: &Gpu) -> Result<Stats> {
        self.validate()?;
        if self.rows == 0 {
            return Ok(Stats::default());
        }
        let get = |s: &CudaSlice<f32>| {
            gpu.stream()
                .clone_dtoh(&s.slice(0..self.rows))
                .map_err(|e| Error::driver("copying to the host", e))
        };
        Ok(Stats {
            mean: get(&self.mean)?,
            rstd: get(&self.rstd)?,
        })
    }
}

/// Gradients on the device.
#[derive(Debug)]
pub struct DeviceGrads<T, P> {
    /// Gradient with respect to the input.
    pub dx: DeviceTensor<T>,
    /// Gradient with respect to the weight, when a weight was given.
    pub dweight: Option<CudaSlice<P>>,
    /// Gradient with respect to the bias, when asked for.
    pub dbias: Option<CudaSlice<P>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `DeviceTensor::zeros(&gpu, &[(1 << 62) + 1])` asked cudarc for `len * 4` bytes, which
    /// wrapped to 4; `zeros`, `DeviceStats::zeros` and `with_offset` now go through this check
    /// before any allocation or length comparison.
    #[test]
    fn byte_sizes_that_overflow_are_refused_before_allocating() {
        let dims = [(1usize << 62) + 1];
        let e = checked_bytes::<f32>(dims[0], &dims).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
        assert!(e.to_string().contains("overflow isize"), "{e}");
        // f16: 2^63 + 2 bytes, past isize::MAX though it fits u64
        assert!(checked_bytes::<half::f16>(dims[0], &dims).is_err());
        assert!(checked_bytes::<f32>(usize::MAX, &[usize::MAX]).is_err());
        // the largest that fits
        let most = isize::MAX as usize / 4;
        assert_eq!(checked_bytes::<f32>(most, &[most]).unwrap(), most * 4);
        assert_eq!(checked_bytes::<f32>(0, &[0]).unwrap(), 0);
    }
}
