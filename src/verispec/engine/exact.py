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
Every row is computed by `one_row_attention` (float32 scores, softmax and
weighted sum for a single query row): a one-token decode is one call; a pass with n rows (or
one row under a mask: a single draft below the first root) becomes n calls, row r over
exactly the keys it may see, gathered in cache order (the context, then its ancestors, as the
cache of that path would hold them during decoding) and with no mask: the same call, on the
same numbers, as a one-token pass at that position. Nothing of the model's code is copied or patched.

Linear layers. Where bf16/fp16 matrix products go through oneDNN (CPUs with avx512_bf16 or
AMX), a one-row product takes another kernel (a GEMV) than a product over 2 or more rows,
whose row results are the same for every row count (checked for every layer shape of the
zoo's models, 2..39 rows). There, in exact mode, a one-row linear gets a zero row added, so
that decoding and verification compute every row with the same kernel (`row_invariant_linears`).
On other CPUs (ATen's own bf16 kernels, AVX2) the one-row product already is a row of the
many-row one, and nothing is added. Exact-mode `ar` is one-token decoding with this attention
(and, on oneDNN machines, two-row linears): a faithful computation of the same model, which
can differ from model.generate()'s in bf16 as any change of kernel can (measured: README).

Scope: batch size 1 (verispec's loop); any model whose attention goes through
transformers' attention interface (Llama, Qwen2, Gemma-3: the tree-checked models). The
prompt and the first root are prefilled with the model's own attention, as model.generate()
does (CachedLM in exact mode), so only draft verification pays for the row-by-row attention.
"""
from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.nn.modules import module as nn_hooks

from ..compat import attention_implementation, register_attention

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
    scaling = kwargs.get("scaling")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_len = query.shape[2]
    if q_len == 1 and attention_mask is None:  # a one-token decode
        return one_row_attention(query, key, value, scale), None
    if query.shape[0] != 1:
        raise NotImplementedError("exact attention runs one sequence at a time (batch size 1)")
    rows = []
    for r, keys in enumerate(_row_keys(attention_mask, q_len, key.shape[2])):
        if isinstance(keys, int):  # a prefix of the cache: a view, as decoding reads it
            k, v = key[:, :, :keys], value[:, :, :keys]
        else:
            k, v = key.index_select(2, keys), value.index_select(2, keys)
        rows.append(one_row_attention(query[:, :, r:r + 1], k, v, scale))
    return torch.cat(rows, dim=1), None


def one_row_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q K^T * scale) V for one query row, in float32: query [B, H, 1, D], key/value
    [B, Hkv, kv, D]; returns [B, 1, H, D] in the query's dtype. The H / Hkv query heads that
    share a key head are the rows of one product, as many for every call of a model, so the
    kernels' shapes depend only on the key count, which a token's row has the same in decoding
    and in verification. Not PyTorch's flash kernel: for one query row it costs 8x this here
    (Qwen2.5-1.5B's shapes, 300 keys: 0.37 vs 0.04 ms; 1500 keys: 1.9 vs 0.14 ms), and its
    scores are float32 too, so this is no less accurate."""
    b, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(b, kv_heads, heads // kv_heads, dim).float()  # [B, Hkv, H / Hkv, D]
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # [B, Hkv, H / Hkv, kv]
    out = torch.matmul(torch.softmax(scores, dim=-1), value.float())  # [B, Hkv, H / Hkv, D]
    return out.reshape(b, 1, heads, dim).to(query.dtype)


def _row_keys(mask: torch.Tensor | None, q_len: int, kv_len: int) -> list:
    """Per query row, the keys it sees: an int n for the cache prefix [0, n), else an index
    tensor. Every layer of a pass gets the same mask object, so the rows are worked out once
    per pass and kept on the mask itself (they live and go with it)."""
    if mask is None:
        past = kv_len - q_len
        return [past + r + 1 for r in range(q_len)]
    memo = getattr(mask, "_verispec_row_keys", None)
    if memo is not None and memo[0] == (q_len, kv_len):
        return memo[1]
    visible = _visible(mask, kv_len)
    rows = []
    for r in range(q_len):
        keys = visible[r].nonzero().flatten()
        length = int(keys.numel())
        rows.append(length if length and int(keys[-1]) == length - 1 else keys)
    mask._verispec_row_keys = ((q_len, kv_len), rows)
    return rows


def _visible(mask: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[q, kv] bool: which keys each query row may see."""
    m = mask[0, 0] if mask.dim() == 4 else mask
    m = m[:, :kv_len]
    return m if m.dtype == torch.bool else m == 0


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
