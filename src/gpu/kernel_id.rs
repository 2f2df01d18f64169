//! Which kernel a launch runs, as a small value: the launch sequences (src/gpu/launch.rs) name
//! kernels by [`KernelId`], the runtime finds a loaded function by its dense [`KernelId::index`]
//! in a fixed table (no string formatted, no lock taken, no map searched per launch), and the
//! exported name `groupnorm_<kind>_<T>[_<P>][_vec|_scalar]` is formatted only where a string is
//! wanted: the first resolution of a kernel in a context, errors, the emulator and reports.

use crate::DType;
use std::fmt;

/// The kernels of kernels/, by what they do; the `stem` is the `<kind>` of the exported name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    FwdFused,
    FwdPartial,
    FwdMerge,
    FwdApply,
    ClusterFwd,
    NhwcFwdFused,
    NhwcFwdCluster,
    NhwcFwdPartial,
    NhwcFwdMerge,
    NhwcFwdApply,
    BwdFused,
    BwdCenter,
    BwdPartial,
    BwdRows,
    BwdDx,
    BwdParams,
    ClusterBwd,
    NhwcBwdFused,
    NhwcBwdCluster,
    NhwcBwdCenter,
    NhwcBwdPartial,
    NhwcBwdDx,
    BaseStats,
    BaseNorm,
    BaseBwdSums,
    BaseBwdCoeffs,
    BaseBwdDx,
    BaseBwdParams,
}

impl Kind {
    /// Every kind, in the order of their discriminants.
    pub(crate) const ALL: [Kind; 28] = [
        Kind::FwdFused,
        Kind::FwdPartial,
        Kind::FwdMerge,
        Kind::FwdApply,
        Kind::ClusterFwd,
        Kind::NhwcFwdFused,
        Kind::NhwcFwdCluster,
        Kind::NhwcFwdPartial,
        Kind::NhwcFwdMerge,
        Kind::NhwcFwdApply,
        Kind::BwdFused,
        Kind::BwdCenter,
        Kind::BwdPartial,
        Kind::BwdRows,
        Kind::BwdDx,
        Kind::BwdParams,
        Kind::ClusterBwd,
        Kind::NhwcBwdFused,
        Kind::NhwcBwdCluster,
        Kind::NhwcBwdCenter,
        Kind::NhwcBwdPartial,
        Kind::NhwcBwdDx,
        Kind::BaseStats,
        Kind::BaseNorm,
        Kind::BaseBwdSums,
        Kind::BaseBwdCoeffs,
        Kind::BaseBwdDx,
        Kind::BaseBwdParams,
    ];

    /// The `<kind>` part of the exported name.
    pub(crate) const fn stem(self) -> &'static str {
        match self {
            Kind::FwdFused => "fwd_fused",
            Kind::FwdPartial => "fwd_partial",
            Kind::FwdMerge => "fwd_merge",
            Kind::FwdApply => "fwd_apply",
            Kind::ClusterFwd => "cluster_fwd",
            Kind::NhwcFwdFused => "nhwc_fwd_fused",
            Kind::NhwcFwdCluster => "nhwc_fwd_cluster",
            Kind::NhwcFwdPartial => "nhwc_fwd_partial",
            Kind::NhwcFwdMerge => "nhwc_fwd_merge",
            Kind::NhwcFwdApply => "nhwc_fwd_apply",
            Kind::BwdFused => "bwd_fused",
            Kind::BwdCenter => "bwd_center",
            Kind::BwdPartial => "bwd_partial",
            Kind::BwdRows => "bwd_rows",
            Kind::BwdDx => "bwd_dx",
            Kind::BwdParams => "bwd_params",
            Kind::ClusterBwd => "cluster_bwd",
            Kind::NhwcBwdFused => "nhwc_bwd_fused",
            Kind::NhwcBwdCluster => "nhwc_bwd_cluster",
            Kind::NhwcBwdCenter => "nhwc_bwd_center",
            Kind::NhwcBwdPartial => "nhwc_bwd_partial",
            Kind::NhwcBwdDx => "nhwc_bwd_dx",
            Kind::BaseStats => "base_stats",
            Kind::BaseNorm => "base_norm",
            Kind::BaseBwdSums => "base_bwd_sums",
            Kind::BaseBwdCoeffs => "base_bwd_coeffs",
            Kind::BaseBwdDx => "base_bwd_dx",
            Kind::BaseBwdParams => "base_bwd_params",
        }
    }

    /// Whether this is a thread-block cluster kernel (launched with a cluster dimension, and
    /// allowed clusters beyond the portable 8 blocks).
    pub(crate) const fn is_cluster(self) -> bool {
        matches!(
            self,
            Kind::ClusterFwd | Kind::ClusterBwd | Kind::NhwcFwdCluster | Kind::NhwcBwdCluster
        )
    }
}

/// One exported kernel: its kind, activation dtype `t`, parameter dtype `p` (for kernels
/// specialised on it) and vector width (`Some(true)`: 16-byte accesses, `Some(false)`: scalar,
/// `None`: the kernel has one form).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KernelId {
    pub kind: Kind,
    pub t: DType,
    pub p: Option<DType>,
    pub vec: Option<bool>,
}

/// Dense position of a dtype (every variant, so that [`KernelId::index`] is total; the GPU
/// path refuses f64 before any launch, so its slots stay empty).
const fn dtype_slot(d: DType) -> usize {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::F64 => 3,
    }
}

const DTYPES: usize = 4;

impl KernelId {
    /// A kernel with its parameter dtype and vector width.
    pub(crate) const fn new(kind: Kind, t: DType, p: Option<DType>, vec: Option<bool>) -> Self {
        KernelId { kind, t, p, vec }
    }

    /// How many distinct ids there are: the length of a table indexed by [`KernelId::index`].
    pub(crate) const COUNT: usize = Kind::ALL.len() * DTYPES * (DTYPES + 1) * 3;

    /// A distinct position in `0..COUNT` for every id (a bijection, tested).
    pub(crate) const fn index(self) -> usize {
        let p = match self.p {
            None => 0,
            Some(p) => 1 + dtype_slot(p),
        };
        let vec = match self.vec {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        };
        ((self.kind as usize * DTYPES + dtype_slot(self.t)) * (DTYPES + 1) + p) * 3 + vec
    }

    /// The exported name, `groupnorm_<kind>_<T>[_<P>][_vec|_scalar]` (allocates; see [`fmt::Display`]).
    pub(crate) fn name(self) -> String {
        self.to_string()
    }
}

impl fmt::Display for KernelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "groupnorm_{}_{}", self.kind.stem(), self.t)?;
        if let Some(p) = self.p {
            write!(f, "_{p}")?;
        }
        match self.vec {
            Some(true) => f.write_str("_vec"),
            Some(false) => f.write_str("_scalar"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_exported_ones() {
        let id = KernelId::new(Kind::FwdFused, DType::F16, Some(DType::F32), Some(true));
        assert_eq!(id.name(), "groupnorm_fwd_fused_f16_f32_vec");
        let id = KernelId::new(Kind::FwdPartial, DType::BF16, None, Some(false));
        assert_eq!(id.name(), "groupnorm_fwd_partial_bf16_scalar");
        let id = KernelId::new(Kind::BwdParams, DType::F32, None, None);
        assert_eq!(id.name(), "groupnorm_bwd_params_f32");
        let id = KernelId::new(
            Kind::NhwcBwdCluster,
            DType::F16,
            Some(DType::F16),
            Some(false),
        );
        assert_eq!(id.name(), "groupnorm_nhwc_bwd_cluster_f16_f16_scalar");
    }

    /// `ALL` lists each kind once, at its discriminant (what `index` relies on).
    #[test]
    fn kinds_are_listed_in_discriminant_order() {
        for (i, k) in Kind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k:?}");
        }
    }

    /// Every id gets its own slot, inside the table, and distinct ids have distinct names.
    #[test]
    fn index_is_a_bijection_onto_the_table() {
        let dtypes = [DType::F32, DType::F16, DType::BF16, DType::F64];
        let mut seen = vec![None; KernelId::COUNT];
        for kind in Kind::ALL {
            for t in dtypes {
                for p in std::iter::once(None).chain(dtypes.map(Some)) {
                    for vec in [None, Some(false), Some(true)] {
                        let id = KernelId::new(kind, t, p, vec);
                        let i = id.index();
                        assert!(i < KernelId::COUNT, "{id:?} -> {i}");
                        if let Some(other) = seen[i].replace(id) {
                            panic!("{id:?} and {other:?} share slot {i}");
                        }
                    }
                }
            }
        }
        assert!(seen.iter().all(Option::is_some), "slots no id reaches");
        let mut names: Vec<String> = seen.iter().map(|id| id.unwrap().name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), KernelId::COUNT, "two ids format to one name");
    }

    #[test]
    fn cluster_kinds_are_the_cluster_kernels() {
        for kind in Kind::ALL {
            assert_eq!(
                kind.is_cluster(),
                kind.stem().contains("cluster"),
                "{kind:?}"
            );
        }
    }
}
