"""groupnorm: Group Normalization on NVIDIA GPUs and the CPU, from Python.

`groupnorm.torch` holds the PyTorch integration (an op with autograd and torch.compile support,
the `GroupNorm` and `GroupNormSiLU` modules, `replace_group_norm`). Importing `groupnorm` itself
needs no torch.
"""

from . import _native

__version__ = "0.1.0"


def kernels_built() -> bool:
    """Whether this build carries the CUDA kernels (nvcc was found when it was compiled)."""
    return _native.kernels_built()


def built_archs() -> str:
    """The GPU architectures the embedded kernels were compiled for ("" without kernels)."""
    return _native.built_archs()


__all__ = ["kernels_built", "built_archs", "__version__"]
