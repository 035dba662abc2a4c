"""Fast linear layers on the CPU: float32 through oneDNN on a weight packed once into its layout
(PackedLinear), bfloat16 through verispec's own kernel where oneDNN has no bf16 path (Bf16Linear).

Float32. Why: torch's float32 `F.linear` on the CPU goes through MKL, and on this project's AVX2-only
EPYC MKL's product over a few rows costs several times its one-row product (a [8960, 1536]
layer of Qwen2.5-1.5B, 2 threads: 5.7 ms at 1 row, 11.9 at 2, 17 at 4 to 16 rows). A
verification pass over 4 tokens then costs 2.6 one-token passes, and speculative decoding has
no room at all. oneDNN's matmul on a weight reordered once into its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, then `_linear_pointwise`, the pair torch's own
inductor uses for CPU linears) reads the weight at memory speed: 4.3 ms at 1 row, 4.6 at 4,
7.3 at 16, 11.6 at 32. It is also row-invariant: row r of an m-row product equals the one-row
product bit for bit (checked for m = 1..300), where MKL's is not.

Cost: the packed copy is memory of its own, as much as the layer's float32 weight (the
original stays: tied embeddings, state_dict, quantized copies and training read it).

Bfloat16. On CPUs without bf16 instructions (AVX2, no avx512_bf16 / AMX / avx_ne_convert) torch's
bf16 product has no oneDNN path, and its generic kernel costs about a one-row product per row
(a [8960, 1536] layer, 2 threads: 1.65 ms at 1 row, 5.9 ms at 4, 22.8 ms at 16, 424 ms at
300 rows). `kernels/bf16_linear.cpp` reads the bf16 weight as it is (no copy) and costs 1.0,
2.0, 4.7 and 72 ms there (`scripts/linear_cost.py`); it is row-invariant by construction. Where
oneDNN computes bf16 (avx512_bf16 machines) nothing is swapped: it is fast there already.

Scope: inference only. A layer whose weight or input needs a gradient, or that runs in another
dtype or on another device, computes `F.linear` as before; a weight changed in place (an
optimizer step) is packed again at its next use (its tensor version is checked).
"""
from __future__ import annotations

import copy
from functools import lru_cache

import torch
import torch.nn.functional as F

from . import kernels
from .layers import swap_modules


@lru_cache(maxsize=None)
def available() -> bool:
    """Whether this torch has oneDNN's packed linear (a CPU build with mkldnn)."""
    ops = torch.ops.mkldnn
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
                and hasattr(ops, "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


def bf16_kernel_pays() -> bool:
    """Whether bf16 products go through verispec's kernel here: no oneDNN bf16 path, and the
    kernel builds (an AVX2 CPU and a C++ compiler)."""
    return not _onednn_bf16() and kernels.bf16_linear() is not None


@lru_cache(maxsize=None)
def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pays(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether load_model swaps a model's linear layers by default: float32 on the CPU (oneDNN),
    bfloat16 on a CPU where oneDNN has no bf16 path (verispec's kernel)."""
    if torch.device(device).type != "cpu":
        return False
    if dtype == torch.float32:
        return available()
    return dtype == torch.bfloat16 and bf16_kernel_pays()


def _inference(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a product may leave F.linear: both in `dtype` on the CPU, and no gradient needed."""
    return (w.dtype == dtype and x.dtype == dtype and w.device.type == "cpu" and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through verispec's bf16 kernel where it pays (Bf16Linear's product, and that of
    layers that are not nn.Linear modules, e.g. a quantized draft's kept full weight)."""
    if _inference(x, weight, torch.bfloat16) and bf16_kernel_pays():
        return kernels.bf16_linear()(x, weight, bias)
    return F.linear(x, weight, bias)


class PackedLinear(torch.nn.Linear):
    """An nn.Linear, on the Parameters given (shared, not copied), whose float32 CPU inference
    products go through oneDNN on a packed copy of the weight."""

    def __init__(self, weight: torch.nn.Parameter, bias: torch.nn.Parameter | None, pack: bool = True):
        torch.nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight, self.bias = weight, bias
        self._packed: torch.Tensor | None = None
        self._packed_for: tuple | None = None  # (storage, version) of the weight it was packed from
        if pack and self._packable(weight):
            self._pack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not _inference(x, w, torch.float32):
            return F.linear(x, w, self.bias)
        if self._packed_for != _stamp(w):
            self._pack()
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    @staticmethod
    def _packable(w: torch.Tensor) -> bool:
        return w.dtype == torch.float32 and w.device.type == "cpu"

    def _pack(self) -> None:
        w = self.weight.detach()
        self._packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        self._packed_for = _stamp(w)

    def __deepcopy__(self, memo):
        """The Parameters are copied as deepcopy copies any (tied ones stay tied; a memo that maps
        them to themselves shares them). The opaque packed tensor cannot be deep-copied: a
        shared weight shares it, a copied one is packed anew."""
        weight, bias = copy.deepcopy(self.weight, memo), copy.deepcopy(self.bias, memo)
        twin = PackedLinear(weight, bias, pack=weight is not self.weight)
        if weight is self.weight:
            twin._packed, twin._packed_for = self._packed, self._packed_for
        memo[id(self)] = twin
        return twin


class Bf16Linear(torch.nn.Linear):
    """An nn.Linear, on the Parameters given (shared, not copied), whose bf16 CPU inference
    products go through verispec's kernel (kernels/bf16_linear.cpp)."""

    def __init__(self, weight: torch.nn.Parameter, bias: torch.nn.Parameter | None):
        torch.nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def _stamp(w: torch.Tensor) -> tuple:
    """Where a weight lives and its in-place change count: a new stamp means pack again. An
    inference-mode tensor has no version counter, and cannot be changed in place outside it."""
    try:
        return w.data_ptr(), w._version
    except RuntimeError:
        return w.data_ptr(), None


def pack_linears(model: torch.nn.Module) -> int:
    """Replace, in place, every CPU nn.Linear of `model` by its fast version sharing its
    Parameters: float32 ones by a PackedLinear (where oneDNN is there), bf16 ones by a Bf16Linear
    (where bf16_kernel_pays); returns how many were replaced."""
    fast = {torch.float32: PackedLinear, torch.bfloat16: Bf16Linear}
    swaps = {m: fast[m.weight.dtype](m.weight, m.bias) for m in model.modules()
             if type(m) is torch.nn.Linear and pays(m.weight.dtype, m.weight.device)}
    swap_modules(model, swaps)
    return len(swaps)
