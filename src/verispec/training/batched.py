"""Batched decoding for building distillation data: many prompts at once, finished rows leave
the batch.

`model.generate` keeps every row of a batch in the forward pass until the longest one ends;
answers of a chat model vary from a few tokens to the length limit, so a good part of such a
batch is padding. Here a row that emits an end-of-sequence token is dropped from the batch
and its KV cache at once, so the pass cost follows the rows
still writing. Greedy rows are what `generate(do_sample=False)` gives for each prompt alone
(up to the rounding of batched matmuls); sampled rows use temperature and top-p.

Works on any device the model is on: the same code path runs on a CPU or a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from ..compat import cache_kwargs, new_cache, select_cache_rows
from ..layers import keep_last


@dataclass(frozen=True)
class Sampler:
    """Temperature / nucleus sampling of a batch's next tokens from a seeded generator."""

    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0

    def generator(self, device: torch.device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g

    def draw(self, logits: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """logits [rows, vocab] -> token ids [rows]."""
        probs = torch.softmax(logits.float() / self.temperature, -1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always)
            drop = sorted_p.cumsum(-1) - sorted_p >= self.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            pick = torch.multinomial(sorted_p, 1, generator=g)
            return order.gather(-1, pick)[:, 0]
        return torch.multinomial(probs, 1, generator=g)[:, 0]


@torch.inference_mode()
def decode_batch(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int],
                 pad_id: int, sampler: Sampler | None = None) -> list[tuple[list[int], bool]]:
    """Continue every prompt for up to max_new_tokens; per prompt (new tokens, ended), where
    new tokens include the end-of-sequence token that ended the row (ended=True) or stop at
    the length limit (ended=False)."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: every row's next token is at the end
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=device)
    g = sampler.generator(device) if sampler else None
    cache = new_cache()
    rows = torch.arange(len(prompts), device=device)  # which prompt each batch row is
    out: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    step_ids, step_pos = ids, positions
    for _ in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, **cache_kwargs(model, cache),
                       use_cache=True, logits_to_keep=keep_last(1, step_ids.shape[1], device)).logits[:, -1]
        nxt = sampler.draw(logits, g) if sampler else logits.argmax(-1)
        done = torch.isin(nxt, eos)
        for r, t, d in zip(rows.tolist(), nxt.tolist(), done.tolist()):  # one sync per step, not per row
            out[r].append(t)
            ended[r] = d
        keep = (~done).nonzero()[:, 0]
        if len(keep) == 0:
            break
        if len(keep) < len(rows):  # finished rows leave the batch and the cache
            select_cache_rows(cache, keep)
            rows, nxt, mask, step_pos = rows[keep], nxt[keep], mask[keep], step_pos[keep]
        step_ids = nxt[:, None]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
    return [(o, e) for o, e in zip(out, ended)]
