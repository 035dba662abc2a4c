"""A draft model's attention on the CPU: its one-token steps through `exact.one_row_attention`.

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

from ..compat import attention_implementation, register_attention, sdpa_attention
from .exact import one_row_attention

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
        scaling = kwargs.get("scaling")
        return one_row_attention(query, key, value, query.shape[-1] ** -0.5 if scaling is None else scaling), None
    return sdpa_attention(module, query, key, value, attention_mask, **kwargs)


@contextmanager
def attention(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` with the draft attention inside the block (its previous one comes back after)."""
    with attention_implementation(model, register_attention(NAME, draft_attention_function)):
        yield
