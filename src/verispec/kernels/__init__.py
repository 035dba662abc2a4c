"""verispec's own CPU kernels, compiled on first use with PyTorch's extension builder.

- `bf16_linear.cpp`: a bfloat16 linear layer for x86 CPUs with AVX2 but no bf16 instructions,
  row-invariant (exact mode's premise): `torch.ops.verispec.bf16_linear(x, weight, bias=None)`.
- `int4_linear.cpp`: an int4 weight-only linear layer (a quantized draft's products, inputs
  rounded to int8) for x86 CPUs without AVX-512, where PyTorch's int4 kernel is half as fast:
  `torch.ops.verispec.int4_linear(x, codes, scale, zero)`.

Each file's header says why it exists. `bf16_linear()` / `int4_linear()` build the kernel (about
15 s, once per machine and source: torch keeps the build under ~/.cache/torch_extensions) and
return the operator, or None where it cannot run here, after one warning naming what is missing.
"""
from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path

import torch

_HERE = Path(__file__).parent
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]  # -fopenmp: at::parallel_for runs on torch's own threads


def cpu_capability() -> str:
    """The vector instructions torch's dispatcher uses on this CPU ("AVX2", "AVX512", "DEFAULT", ...)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "DEFAULT"


def cpu_supports_bf16_kernel() -> bool:
    """An x86 CPU with AVX2 and FMA (what the kernels are written for; F16C comes with them), as
    torch's dispatcher sees it."""
    return cpu_capability() in ("AVX2", "AVX512")


def _build(name: str, what: str, fallback: str):
    """Compile kernels/<name>.cpp into torch.ops.verispec.<name>; the operator, or None after one warning."""
    if not cpu_supports_bf16_kernel():
        return None
    try:
        from torch.utils.cpp_extension import load

        load(f"verispec_{name}", [str(_HERE / f"{name}.cpp")], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as err:  # a missing compiler surfaces as several error types
        warnings.warn(f"verispec could not build its {what} CPU kernel ({type(err).__name__}: {err}); {fallback} "
                      "Install a C++ compiler (g++) and ninja to get it.", RuntimeWarning, stacklevel=3)
        return None
    return getattr(torch.ops.verispec, name)


@lru_cache(maxsize=None)
def bf16_linear():
    """The compiled bf16 operator, or None (no AVX2 CPU, or no C++ compiler: one warning says which)."""
    return _build("bf16_linear", "bf16", "bf16 linear layers use PyTorch's own, which costs about one one-row "
                  "product per row on this CPU (or load the model in float32).")


@lru_cache(maxsize=None)
def int4_linear():
    """The compiled int4 operator, or None (no AVX2 CPU, or no C++ compiler: one warning says which)."""
    return _build("int4_linear", "int4", "int4 drafts use PyTorch's int4 kernel, about half as fast on this CPU.")
