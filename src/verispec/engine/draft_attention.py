"""A draft model's attention on the CPU: its one-token steps through `one_row_attention`.

Why: a draft decodes one token a pass, and PyTorch's CPU flash-attention kernel is slow for a
single query row: profiling the int4 Qwen2.5-Coder-0.5B draft's one-token step (context 300,
2 threads, avx512_bf16) put 18% of it in that kernel, 0.37 ms a call against 0.04 ms for
`one_row_attention` (float32 scores, softmax and weighted sum for the row, every query head
of a key head in one product). A draft's numbers only move its acceptance (the target verifies
every token), so it may compute its attention another way than the model's own. The target
never runs through this: outside exact mode its passes keep the model's attention, so that
greedy output stays model.generate()'s.

Only a query row without a mask is taken (a decode step that sees every cached key); a pass over
several rows, a masked one (a tree, a sliding window that hides keys), soft-capping or sinks go
to transformers' sdpa function as before. The mechanism is exact mode's: an attention function
registered with transformers (AttentionInterface), set on the model's config for one pass and
put back after, so a draft model shared with another user (the bench's peers) is left as it was.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..compat import attention_implementation, attention_scale, register_attention, sdpa_attention

NAME = "verispec_draft"


def pays(model: torch.nn.Module) -> bool:
    """Whether a draft's decode steps should take this attention: on the CPU, where the flash
    kernel's one-row cost is measured, for models using sdpa (the default attention)."""
    weight = next(model.parameters())
    return weight.device.type == "cpu" and model.config._attn_implementation == "sdpa"


def draft_attention_function(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, **kwargs):
    """transformers' attention-function signature (query [B, H, q, D]); (output [B, q, H, D], None)."""
    one_row = query.shape[2] == 1 and attention_mask is None
    if one_row and kwargs.get("softcap") is None and kwargs.get("s_aux") is None and not kwargs.get("dropout"):
        return one_row_attention(query, key, value, attention_scale(query, kwargs)), None
    return sdpa_attention(module, query, key, value, attention_mask, **kwargs)


def one_row_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q K^T * scale) V for one query row, in float32: query [B, H, 1, D], key/value
    [B, Hkv, kv, D]; returns [B, 1, H, D] in the query's dtype. The H / Hkv query heads that
    share a key head are the rows of one product, as many for every call of a model, so the
    kernels' shapes depend only on the key count. Not PyTorch's flash kernel: for one query row it costs 8x this here
    (Qwen2.5-1.5B's shapes, 300 keys: 0.37 vs 0.04 ms; 1500 keys: 1.9 vs 0.14 ms), and its
    scores are float32 too, so this is no less accurate."""
    b, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(b, kv_heads, heads // kv_heads, dim).float()  # [B, Hkv, H / Hkv, D]
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # [B, Hkv, H / Hkv, kv]
    out = torch.matmul(torch.softmax(scores, dim=-1), value.float())  # [B, Hkv, H / Hkv, D]
    return out.reshape(b, 1, heads, dim).to(query.dtype)


@contextmanager
def attention(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` with the draft attention inside the block (its previous one comes back after)."""
    with attention_implementation(model, register_attention(NAME, draft_attention_function)):
        yield
