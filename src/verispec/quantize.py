"""Weight-only quantized copies of a model, for drafting.

A draft's output never reaches the user unverified, so its weights may be approximate:
only the acceptance rate depends on them. Decoding on a CPU (or a GPU at batch 1) is
bound by reading the weights, and a one-token pass of a bfloat16 model reads two bytes per
parameter; int4 weights (groups of 32 along the input dimension, each with a scale and an
offset) read about a quarter of that, int8 (one scale per output channel) half.

Two uses, one mechanism (`quantized_copy`):
- a smaller same-tokenizer draft made cheaper still (`int4:qwen2.5-coder-0.5b-instruct`);
- the target's own int4 copy as its draft (`int4`): no second model, and it agrees with the
  target far more often than a smaller model does (QSpec, SPEQ: quantized self-speculation).

On CPU the products go through torch's weight-only kernels (`_weight_int4pack_mm_for_cpu`,
`_weight_int8pack_mm`, the ones torchao's int4/int8 weight-only modes use; the int4 one in
bfloat16 whatever the model's dtype), except int4 on AVX2 CPUs without AVX-512: there verispec's
own kernel (kernels/int4_linear.cpp, inputs rounded to int8 per group) is about twice as fast
(`int4_backend`). Elsewhere the layer dequantizes its weight at each call: correct, and no faster
than the original.

Measured on the 2-core avx512_bf16 machine (one-token pass, context 300, bf16): Qwen2.5-Coder
0.5B 70 ms -> int8 38 ms -> int4 26 ms; 1.5B 162 -> 87 -> 47 ms. Several rows cost more in
int4 (the 1.5B: 42 ms for 2, 55 ms for 4, 115 ms for 8 rows), so a quantized draft suits chains
(one new row a pass) better than wide trees.

The int4 kernel's cost grows with every row (it is a matrix-vector kernel at heart: a
8960x1536 layer takes 195 ms for 1024 rows where the bf16 product takes 72 ms), so a layer
keeps a reference to the weight it was made from and computes passes of FULL_ROWS rows or
more (a prompt's prefill) with it. For the target's own copy that weight is the target's,
shared: free. For `int4:M` it keeps M's unquantized weights alive (`keep_full=False` drops
them, and prefills then run through the kernel).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from . import cpu_linear, kernels
from .layers import copy_swapped, swap_modules

MODES = ("int4", "int8")
GROUP = 32  # int4 group size along K: GGUF's Q4_K sub-block, so a Q4_K model's grid is nearly kept
# From this many rows a pass uses the unquantized weight when the layer kept it: measured crossover
# of the int4 kernel with bf16 products on Qwen shapes, 2 threads (8 rows: 1.4 vs 1.7 ms, 16: 2.8 vs 2.4)
FULL_ROWS = 12


class _WeightOnly(torch.nn.Module):
    """What the weight-only layers share: rows in, the quantized product (or, for many rows, the
    kept unquantized weight's), bias, and the input's leading shape back."""

    def __init__(self, linear: torch.nn.Linear, keep_full: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # detach() shares the storage: no copy, and the copy's own tensors stay the original's
        self.register_buffer("full", linear.weight.detach() if keep_full else None, persistent=False)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.full is not None and rows.shape[0] >= FULL_ROWS:
            y = cpu_linear.linear(rows, self.full.to(rows.dtype), self.bias)
        else:
            y = self._product(rows).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def int4_backend(device: torch.device) -> str:
    """Which product an int4 layer on `device` computes through: "verispec" (kernels/int4_linear.cpp,
    on AVX2 CPUs without AVX-512, where torch's int4 kernel is about half as fast: measured), "torch"
    (`_weight_int4pack_mm_for_cpu`, other CPUs) or "dequantize" (other devices: correct, no faster)."""
    if device.type != "cpu":
        return "dequantize"
    if kernels.cpu_capability() == "AVX2" and kernels.int4_linear() is not None:
        return "verispec"
    return "torch"


class Int4Linear(_WeightOnly):
    """y = x W^T + b with W stored as 4-bit codes q per (row, group of GROUP inputs):
    W = (q - 8) * scale + zero, q in 0..15 (asymmetric: from the group's minimum to its maximum)."""

    def __init__(self, linear: torch.nn.Linear, keep_full: bool = False, backend: str | None = None):
        """backend: int4_backend's choice for the weight's device unless given (tests compare them)."""
        super().__init__(linear, keep_full)
        weight = linear.weight.detach()
        n, k = weight.shape
        self.dtype = weight.dtype
        grouped = weight.float().reshape(n, k // GROUP, GROUP)
        low = grouped.amin(-1)
        scale = ((grouped.amax(-1) - low) / 15).clamp(min=1e-8)
        q = torch.round((grouped - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)  # [N, G, 32]
        zero = low + 8 * scale
        self.backend = backend or int4_backend(weight.device)
        buffers = dict.fromkeys(["codes", "scale", "zero", "packed", "scales_and_zeros"])
        if self.backend == "verispec":
            # half a byte a weight: byte j of a group holds input j (low nibble) and 16 + j (high)
            buffers.update(codes=(q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2).contiguous(),
                           scale=scale.half().contiguous(), zero=zero.half().contiguous())
        else:  # torch's convention: scales and zeros as [K / GROUP, N, 2]
            buffers["scales_and_zeros"] = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(
                torch.bfloat16 if self.backend == "torch" else weight.dtype)
            if self.backend == "torch":  # only the kernel's tiled layout is kept (half a byte a weight)
                buffers["packed"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, k).to(torch.int32), 1)
            else:  # one byte a code, dequantized per call
                buffers["codes"] = q.reshape(n, k)
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor, persistent=False)

    def _groups(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """codes [N, G, 32] as floats, scale and zero [N, G]."""
        if self.backend == "verispec":
            c = self.codes.reshape(self.out_features, -1, GROUP // 2)
            q = torch.cat([c & 15, c >> 4], -1).float()
            return q, self.scale.float(), self.zero.float()
        sz = self.scales_and_zeros.float()  # [K / GROUP, N, 2]
        return self.codes.float().reshape(self.out_features, -1, GROUP), sz[..., 0].t(), sz[..., 1].t()

    def dequantized(self) -> torch.Tensor:
        """The weight the codes stand for, [N, K] (for checks; torch's packed layout is read back
        through its kernel itself, as the product with an identity)."""
        if self.backend == "torch":
            eye = torch.eye(self.in_features, dtype=torch.bfloat16)
            return self._product(eye).t().to(self.dtype)
        q, scale, zero = self._groups()
        return ((q - 8) * scale[..., None] + zero[..., None]).reshape(self.out_features, -1).to(self.dtype)

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        if self.backend == "verispec":
            # activations rounded to int8 per group of 32 inside (a draft's precision only moves its acceptance)
            return kernels.int4_linear()(rows, self.codes, self.scale, self.zero)
        if self.backend == "torch":
            # the kernel takes bfloat16 activations: a float32 draft computes its products in bf16
            return torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(torch.bfloat16).contiguous(), self.packed, GROUP,
                                                              self.scales_and_zeros)
        return rows @ self.dequantized().t()


class Int8Linear(_WeightOnly):
    """y = x W^T + b with W = q * scale, q int8 per element, one scale per output channel."""

    def __init__(self, linear: torch.nn.Linear, keep_full: bool = False):
        super().__init__(linear, keep_full)
        weight = linear.weight.detach()
        scale = (weight.float().abs().amax(1) / 127).clamp(min=1e-8)
        self.register_buffer("codes", torch.round(weight.float() / scale[:, None]).clamp(-127, 127)
                             .to(torch.int8), persistent=False)
        self.register_buffer("scale", scale.to(weight.dtype), persistent=False)

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.device.type == "cpu":
            return torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.codes, self.scale)
        return rows @ (self.codes.to(rows.dtype) * self.scale[:, None]).t()


def _quantizable(linear: torch.nn.Linear, mode: str, backend: str | None = None) -> bool:
    n, k = linear.weight.shape
    if mode == "int4":  # groups along K; torch's packed layout also tiles N by 16
        return k % GROUP == 0 and (n % 16 == 0 or (backend or int4_backend(linear.weight.device)) != "torch")
    return True


def _check(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"quantization {mode!r} is not one of {', '.join(MODES)}")


def quantized_linear(linear: torch.nn.Linear, mode: str, keep_full: bool = False,
                     backend: str | None = None) -> torch.nn.Module:
    """The weight-only `mode` version of one layer, or the layer itself where the kernel cannot
    tile its shape (a draft only gets slower there, never wrong). backend: int4's (see int4_backend)."""
    _check(mode)
    if not _quantizable(linear, mode, backend):
        return linear
    return Int4Linear(linear, keep_full, backend) if mode == "int4" else Int8Linear(linear, keep_full)


def _quantized_linears(model: torch.nn.Module, mode: str, keep_full: bool,
                       backend: str | None = None) -> dict[torch.nn.Module, torch.nn.Module]:
    """Each nn.Linear of `model` (the LM head included) -> its weight-only `mode` version; the
    layers quantized_linear leaves as they are are left out."""
    swaps = {m: quantized_linear(m, mode, keep_full, backend) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return {m: q for m, q in swaps.items() if q is not m}


def quantize_model(model: torch.nn.Module, mode: str) -> int:
    """Replace, in place, the linear layers of `model` by weight-only `mode` ones (the unquantized
    weights are let go); returns how many."""
    _check(mode)
    swaps = _quantized_linears(model, mode, keep_full=False)
    swap_modules(model, swaps)
    return len(swaps)


def quantized_copy(lm: Any, mode: str, keep_full: bool = True, backend: str | None = None) -> Any:
    """A LoadedModel-like copy of `lm` whose linear layers are `mode` weight-only; `lm` itself is
    unchanged. The copy's module tree is new, but every tensor outside the linear layers (the
    embeddings, the norms, rotary tables) is the original's, shared read-only: the copy costs only
    its quantized weights. The embeddings stay unquantized (a lookup reads one row), also when
    the LM head shares their weight: the copy's head gets quantized weights of its own.
    keep_full: each layer also holds (shares, no copy) the original weight and uses it for passes
    of FULL_ROWS rows or more, a prompt's prefill, where the quantized kernels are slower; this
    keeps `lm`'s linear weights alive as long as the copy lives.
    backend: int4's product (int4_backend's choice unless given; scripts/draft_step_cost.py compares them)."""
    _check(mode)
    swaps = _quantized_linears(lm.model, mode, keep_full, backend)
    if not swaps:
        raise ValueError(f"{lm.name}: no linear layer could be quantized to {mode}")
    model = copy_swapped(lm.model, swaps)
    model.verispec_quantization = mode  # its config still names the original's directory: not its weights
    return dataclasses.replace(lm, model=model, name=f"{lm.name}[{mode}]")
