"""verispec's own CPU kernels, compiled on first use with PyTorch's extension builder.

One so far: `bf16_linear.cpp`, a bfloat16 linear layer for x86 CPUs with AVX2 but no bf16
instructions (its header says why). It is registered as the operator
`torch.ops.verispec.bf16_linear(x, weight, bias=None)`; `bf16_linear()` builds it (about 15 s,
once per machine and source: torch keeps the build under ~/.cache/torch_extensions) and returns
it, or None where it cannot run here, after one warning naming what is missing.
"""
from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("bf16_linear.cpp")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # -fopenmp: at::parallel_for runs on torch's own threads


def cpu_supports_bf16_kernel() -> bool:
    """An x86 CPU with AVX2 and FMA (what the kernel is written for), as torch's dispatcher sees it."""
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    except (AttributeError, RuntimeError):
        return False


@lru_cache(maxsize=None)
def bf16_linear():
    """The compiled operator, or None (no AVX2 CPU, or no C++ compiler: one warning says which)."""
    if not cpu_supports_bf16_kernel():
        return None
    try:
        from torch.utils.cpp_extension import load

        load("verispec_bf16_linear", [str(_SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as err:  # a missing compiler surfaces as several error types
        warnings.warn(f"verispec could not build its bf16 CPU kernel ({type(err).__name__}: {err}); bf16 linear "
                      "layers use PyTorch's own, which costs about one one-row product per row on this CPU. "
                      "Install a C++ compiler (g++) and ninja to get it, or load the model in float32.",
                      RuntimeWarning, stacklevel=2)
        return None
    return torch.ops.verispec.bf16_linear
