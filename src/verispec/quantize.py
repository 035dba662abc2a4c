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
`_weight_int8pack_mm`, the ones torchao's int4/int8 weight-only modes use). Elsewhere the
layer dequantizes its weight once per call: correct, and no faster than the original.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

MODES = ("int4", "int8")
GROUP = 32  # int4 group size along K: GGUF's Q4_K sub-block, so a Q4_K model's grid is nearly kept


class Int4Linear(torch.nn.Module):
    """y = x W^T + b with W stored as 4-bit codes q per (row, group of GROUP inputs):
    W = q * scale + low, q in 0..15 (asymmetric: the group's minimum and range)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        n, k = weight.shape
        self.in_features, self.out_features, self.dtype = k, n, weight.dtype
        grouped = weight.float().reshape(n, k // GROUP, GROUP)
        low = grouped.amin(-1, keepdim=True)
        scale = ((grouped.amax(-1, keepdim=True) - low) / 15).clamp(min=1e-8)
        codes = torch.round((grouped - low) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)
        # the kernel's convention: W = (q - 8) * scale + zero, scales and zeros as [K / GROUP, N, 2]
        zero = low + 8 * scale
        self.register_buffer("scales_and_zeros", torch.cat([scale, zero], -1).transpose(0, 1).contiguous()
                             .to(weight.dtype), persistent=False)
        self.register_buffer("codes", codes.to(torch.uint8), persistent=False)  # [N, K], for other devices
        packed = None  # the CPU kernel's tiled layout (it takes bfloat16 activations)
        if weight.device.type == "cpu" and weight.dtype == torch.bfloat16:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.register_buffer("packed", packed, persistent=False)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def dequantized(self) -> torch.Tensor:
        sz = self.scales_and_zeros.float()  # [K / GROUP, N, 2]
        scale, zero = sz[..., 0].t(), sz[..., 1].t()  # [N, K / GROUP]
        q = self.codes.float().reshape(self.out_features, -1, GROUP)
        return ((q - 8) * scale[..., None] + zero[..., None]).reshape(self.out_features, -1).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.packed is not None and x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), self.packed, GROUP, self.scales_and_zeros)
        else:
            y = rows @ self.dequantized().t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class Int8Linear(torch.nn.Module):
    """y = x W^T + b with W = q * scale, q int8 per element, one scale per output channel."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        scale = (weight.float().abs().amax(1) / 127).clamp(min=1e-8)
        self.register_buffer("codes", torch.round(weight.float() / scale[:, None]).clamp(-127, 127)
                             .to(torch.int8), persistent=False)
        self.register_buffer("scale", scale.to(weight.dtype), persistent=False)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.codes, self.scale)
        else:
            y = rows @ (self.codes.to(x.dtype) * self.scale[:, None]).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def _quantizable(linear: torch.nn.Linear, mode: str) -> bool:
    n, k = linear.weight.shape
    if mode == "int4":  # the packed layout tiles N by 16 and K by the group
        return k % GROUP == 0 and n % 16 == 0
    return True


def quantize_model(model: torch.nn.Module, mode: str) -> int:
    """Replace, in place, every nn.Linear of `model` (the LM head included) by its weight-only
    `mode` version; returns how many were replaced. Layers whose shape the kernel cannot tile
    keep their original weights (a draft only gets slower there, never wrong)."""
    if mode not in MODES:
        raise ValueError(f"quantization {mode!r} is not one of {', '.join(MODES)}")
    make = Int4Linear if mode == "int4" else Int8Linear
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and _quantizable(child, mode):
                setattr(parent, name, make(child))
                replaced += 1
    return replaced


def quantized_copy(lm: Any, mode: str) -> Any:
    """A LoadedModel-like copy of `lm` whose linear layers are `mode` weight-only; `lm` itself is
    unchanged. The embeddings stay as they are (a lookup reads one row), also when the LM head
    shares their weight: the copy's head gets quantized weights of its own."""
    if mode not in MODES:
        raise ValueError(f"quantization {mode!r} is not one of {', '.join(MODES)}")
    model = copy.deepcopy(lm.model)
    if quantize_model(model, mode) == 0:
        raise ValueError(f"{lm.name}: no linear layer could be quantized to {mode}")
    model.requires_grad_(False).eval()
    model.verispec_quantization = mode  # its config still names the original's directory: not its weights
    return dataclasses.replace(lm, model=model, name=f"{lm.name}[{mode}]")
