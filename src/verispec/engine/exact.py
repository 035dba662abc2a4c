"""Exact mode: verification passes whose every row is computed as a one-token pass computes it.

Why (scripts/bf16_rows.py shows it op by op): on CPU, in bfloat16, a pass over n tokens of
Llama or Qwen2 differs from n one-token passes first in attention. PyTorch's CPU
flash-attention kernel multiplies all n query rows at once (Q.K^T and P.V through MKL's
bf16 GEMM), and MKL's fp32 result for one row depends on how many rows share the call and
on the key count; RMSNorm and rotary are row-invariant, linear layers and the LM head too on
AVX2 CPUs (ATen's own bf16 GEMM) but not where oneDNN computes them (below). One ulp of
difference in an attention output then flips near-tie argmaxes.

The mechanism is transformers' own: an attention function registered under the name
"verispec_exact" (AttentionInterface, with sdpa's mask builder in AttentionMaskInterface).
Its arithmetic is `exact_rows`: every call, a one-token decode's included, holds a fixed
number of query rows over a key count padded to a block, each row masked to exactly the keys it
may see, in cache order (the context, then its ancestors, as the cache of that path would hold
them during decoding). A token's row is then the same products over the same numbers in
decoding and in verification, whichever rows share its call; a pass's rows go in as few calls
as that allows (a chain's in calls of `exact_rows.rows_per_call` rows). Nothing of the model's code is copied
or patched.

Linear layers. Where bf16/fp16 matrix products go through oneDNN (CPUs with avx512_bf16 or
AMX), a one-row product takes another kernel (a GEMV) than a product over 2 or more rows,
whose row results are the same for every row count (checked for every layer shape of the
zoo's models, 2..39 rows). There, in exact mode, a one-row linear gets a zero row added, so
that decoding and verification compute every row with the same kernel (`row_invariant_linears`).
On other CPUs (AVX2: verispec's bf16 kernel, cpu_linear.Bf16Linear, which load_model swaps in
there, or ATen's own bf16 kernels) the one-row product already is a row of the many-row one, by
the kernel's construction, and nothing is added. Exact-mode `ar` is one-token decoding with this attention
(and, on oneDNN machines, two-row linears): a faithful computation of the same model, which
can differ from model.generate()'s in bf16 as any change of kernel can (measured: README).

Scope: batch size 1 (verispec's loop); any model whose attention goes through
transformers' attention interface (Llama, Qwen2, Gemma-3: the tree-checked models). The
prompt and the first root are prefilled with the model's own attention, as model.generate()
does (CachedLM in exact mode), so only decoding and draft verification take this attention.
"""
from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.nn.modules import module as nn_hooks

from ..compat import attention_implementation, attention_scale, register_attention
from . import exact_rows

NAME = "verispec_exact"
AUTO = "auto"


def resolve(exact: bool | str, model: torch.nn.Module) -> bool:
    """Whether a target runs in exact mode. "auto": on in bfloat16/float16 on the CPU, where the
    cause above is pinned and the mechanism is tested; off in float32 (a pass over n rows
    rounds differently there too, but 24 mantissa bits make a flipped token rare: the float32
    identity tests pass without it) and on GPUs (there the linear layers' GEMM kernels change
    with the row count too, which this attention function does not address: unverified)."""
    if exact == AUTO:
        weight = next(model.parameters())
        return weight.dtype in (torch.bfloat16, torch.float16) and weight.device.type == "cpu"
    if isinstance(exact, bool):
        return exact
    raise ValueError(f"exact must be True, False or 'auto', got {exact!r}")


def register() -> str:
    """Register the exact attention function (idempotent); returns its name."""
    return register_attention(NAME, exact_attention)


def exact_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, **kwargs):
    """transformers' attention-function signature: query [B, H, q, D], key/value [B, Hkv, kv, D];
    returns (output [B, q, H, D], None)."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("exact attention has no logit soft-capping or attention sinks; use exact=False")
    if query.shape[0] != 1:
        raise NotImplementedError("exact attention runs one sequence at a time (batch size 1)")
    scale, q_len = attention_scale(query, kwargs), query.shape[2]
    if q_len == 1 and attention_mask is None:  # a decode step: one call over the whole cache
        return exact_rows.attend(query, key, value, [key.shape[2]], scale).to(query.dtype), None
    out = query.new_empty(1, q_len, query.shape[1], query.shape[3])
    per_call = exact_rows.rows_per_call(query.shape[1] // key.shape[1])
    for at, keys, lengths in _plan(attention_mask, q_len, key.shape[2], per_call):
        if isinstance(keys, int):  # a prefix of the cache: a view, as decoding reads it
            k, v = key[:, :, :keys], value[:, :, :keys]
        else:
            k, v = key.index_select(2, keys), value.index_select(2, keys)
        if isinstance(at, slice):
            out[:, at] = exact_rows.attend(query[:, :, at], k, v, lengths, scale)  # the copy casts
        else:  # a tree path's rows
            out[:, at] = exact_rows.attend(query.index_select(2, at), k, v, lengths, scale).to(out.dtype)
    return out, None


def _plan(mask: torch.Tensor | None, q_len: int, kv_len: int, per_call: int) -> list:
    """exact_rows.plan for this pass, each call's rows as the selector that picks them (a slice
    where they are consecutive, else an index tensor). Every layer of a pass gets the same mask
    object, so a masked pass's plan is worked out once and kept on the mask itself (it lives and
    goes with it)."""
    if mask is None:
        return _selected(exact_rows.plan(None, q_len, kv_len, per_call))
    memo = getattr(mask, "_verispec_plan", None)
    if memo is not None and memo[0] == (q_len, kv_len):
        return memo[1]
    m = mask[0, 0] if mask.dim() == 4 else mask
    m = m[:, :kv_len]
    visible = m if m.dtype == torch.bool else m == 0
    calls = _selected(exact_rows.plan([tuple(row.nonzero().flatten().tolist()) for row in visible],
                                      q_len, kv_len, per_call))
    mask._verispec_plan = ((q_len, kv_len), calls)
    return calls


def _selected(calls: list) -> list:
    return [(slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else torch.tensor(rows),
             keys, lengths) for rows, keys, lengths in calls]


@contextmanager
def attention(model) -> Iterator[None]:
    """Run `model` with the exact attention (and row-invariant linears) inside the block."""
    with attention_implementation(model, register()), row_invariant_linears(model):
        yield


@lru_cache(maxsize=None)
def one_row_kernel_differs(dtype: torch.dtype) -> bool:
    """Whether this machine multiplies one row by another kernel than several rows, in dtype:
    the oneDNN route's capability check, and a probe of the two on a layer-sized product (it
    catches a route the check does not know of)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        if getattr(torch.ops.mkldnn, check)():
            return True
    except (AttributeError, RuntimeError):  # a torch without the check: the probe decides
        pass
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(512, 4096, generator=gen) / 64).to(dtype)
    for _ in range(4):
        x = torch.randn(2, 4096, generator=gen).to(dtype)
        if not torch.equal(F.linear(x[:1], weight), F.linear(x, weight)[:1]):
            return True
    return False


class _TwoRowLinears:
    """While alive: every nn.Linear that gets a one-row input computes it as the first row of a
    two-row product (a zero row added, its output row dropped). Global module hooks, so that
    entering and leaving costs two registrations, not two per layer."""

    def __init__(self):
        self._padded: set[int] = set()  # the modules whose running forward got the added row
        self._handles = (nn_hooks.register_module_forward_pre_hook(self._pad),
                         nn_hooks.register_module_forward_hook(self._unpad))

    def _pad(self, module, args):
        if not isinstance(module, torch.nn.Linear):
            return None
        x = args[0]
        if x.dim() < 2 or x.numel() != x.shape[-1]:
            return None
        self._padded.add(id(module))
        return (torch.cat([x, torch.zeros_like(x)], dim=-2), *args[1:])

    def _unpad(self, module, args, output):
        if id(module) not in self._padded:
            return None
        self._padded.discard(id(module))
        return output[..., :1, :]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def row_invariant_linears(model) -> Iterator[None]:
    """Inside the block, one-row linears of `model`'s dtype are two-row products where this
    machine's one-row kernel differs (one_row_kernel_differs); elsewhere nothing changes."""
    if not one_row_kernel_differs(next(model.parameters()).dtype):
        yield
        return
    hooks = _TwoRowLinears()
    try:
        yield
    finally:
        hooks.remove()
