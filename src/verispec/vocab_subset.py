"""A draft whose LM head scores only part of the vocabulary: the first n token ids and the special
tokens (FR-Spec, Zhao et al. 2025: a frequency-ranked draft vocabulary).

Why: a small draft with a large vocabulary spends much of a one-token pass in its LM head.
Qwen2.5-0.5B's head is 151,936 x 896, over a quarter of the weights an int4 draft reads per
token. A draft only proposes; the target verifies every token against its own full head, so
a draft that can never propose a rare token loses a little acceptance and nothing of the
output's exactness. Sampling stays lossless as well: the draft's distribution is zero outside
the subset and its tokens are drawn from it, which is all speculative sampling needs.

Which ids: byte-level BPE vocabularies (GPT-2's, tiktoken's, Qwen2's, Llama-3's) number their
tokens in merge order, and a merge is learned when its pair is the most frequent one left, so
the first ids are the tokenizer corpus's most frequent pieces. No frequency table is needed.
Special and added tokens (end of turn, end of text) are kept wherever their ids lie, since a
draft must be able to propose the end.

The head returns logits over the whole vocabulary, -inf outside the subset, so nothing
downstream (argmax, softmax, sampling, the confidence stop) changes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .layers import copy_swapped
from .quantize import quantized_linear

ALIGN = 64  # the subset's size is a multiple of this (the int4 kernel tiles rows by 16)

class SubsetHead(torch.nn.Module):
    """An LM head over the token ids `ids` (a sorted LongTensor) of a vocabulary of `vocab`
    entries; the logits of the others are -inf."""

    def __init__(self, head: torch.nn.Module, ids: torch.Tensor, vocab: int):
        super().__init__()
        self.head, self.vocab = head, int(vocab)
        self.register_buffer("ids", ids, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.head(x)
        out = scores.new_full((*scores.shape[:-1], self.vocab), float("-inf"))
        return out.index_copy_(-1, self.ids, scores)


def subset_ids(lm: Any, n: int) -> torch.Tensor:
    """The first n ids of lm's vocabulary and every special or added token's id, sorted."""
    head = lm.model.get_output_embeddings()
    vocab = head.out_features if hasattr(head, "out_features") else lm.model.config.vocab_size
    if not 0 < n:
        raise ValueError(f"draft_vocab must be a positive number of token ids, got {n}")
    ids = set(range(min(n, vocab)))
    ids |= {i for i in _special_ids(lm) if 0 <= i < vocab}
    rest = iter(range(min(n, vocab), vocab))
    while len(ids) % ALIGN and len(ids) < vocab:  # a few more of the next ids, to a row count kernels tile
        ids.add(next(i for i in rest if i not in ids))
    return torch.tensor(sorted(ids), dtype=torch.long)


def _special_ids(lm: Any) -> set[int]:
    found: set[int] = set()
    tok = lm.tokenizer
    if tok is not None:
        found |= set(getattr(tok, "all_special_ids", []) or [])
        found |= set(getattr(tok, "added_tokens_decoder", {}) or {})
    for source in (lm.model.config, getattr(lm.model, "generation_config", None)):
        eos = getattr(source, "eos_token_id", None)
        found |= set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    return {int(i) for i in found}


def _head_weight(head: torch.nn.Module) -> torch.Tensor:
    """The [vocab, hidden] weight a head computes with: an nn.Linear's own, a weight-only
    quantized head's kept original (or what its codes stand for)."""
    if isinstance(head, torch.nn.Linear):
        return head.weight.detach()
    full = getattr(head, "full", None)
    if full is not None:
        return full
    if hasattr(head, "dequantized"):
        return head.dequantized()
    raise ValueError(f"draft_vocab: cannot read the weight of a {type(head).__name__} LM head")


def vocab_subset_copy(lm: Any, n: int) -> Any:
    """A LoadedModel-like copy of `lm` whose LM head scores only subset_ids(lm, n); `lm` is
    unchanged and every other tensor is shared with it. The head's rows are copied out (n rows
    of the weight: 59 MB for 32,768 rows of a 896-wide bf16 head); a weight-only quantized head
    is quantized again, in the same mode, over its rows."""
    head = lm.model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError(f"draft_vocab: {lm.name} has no bias-free LM head to restrict")
    ids = subset_ids(lm, n)
    weight = _head_weight(head)
    vocab = weight.shape[0]
    if len(ids) >= vocab:
        return lm  # the subset is the whole vocabulary: nothing to gain
    rows = torch.nn.Linear(weight.shape[1], len(ids), bias=False, device=weight.device, dtype=weight.dtype)
    rows.weight = torch.nn.Parameter(weight.index_select(0, ids.to(weight.device)).clone(), requires_grad=False)
    mode = getattr(lm.model, "verispec_quantization", None)
    # a quantized head that kept its original weight for long passes (a prefill) keeps its rows so
    inner = quantized_linear(rows, mode, keep_full=getattr(head, "full", None) is not None) if mode else rows
    subset = SubsetHead(inner, ids.to(weight.device), vocab)
    return dataclasses.replace(lm, model=copy_swapped(lm.model, {head: subset}), name=f"{lm.name}[vocab {len(ids)}]")
