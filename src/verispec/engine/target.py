"""A causal LM with its own KV cache: prefill, a pass over a token tree, commit.

The target uses it to verify drafts; a draft model uses the same class for its own cache.
Tree attention goes through transformers' supported 4D attention-mask path: context
positions are visible to every node, and inside the tree a node sees only its ancestors
and itself; position ids are context length + depth.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from .cache import cache_length, crop_to, keep_positions
from .tree import TokenTree


class CachedLM:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache = DynamicCache(config=model.config)
        self._tree_start = 0  # cache length before the last tree pass

    @property
    def cached_len(self) -> int:
        return cache_length(self.cache)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model.config)

    def _run(self, ids: torch.Tensor, logits_to_keep: int = 0, **extra) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(
                input_ids=ids.to(self.device)[None], past_key_values=self.cache,
                use_cache=True, logits_to_keep=logits_to_keep, **extra,
            )
        return out.logits[0]

    def extend(self, tokens: list[int], last_logits_only: bool = True) -> torch.Tensor:
        """Append tokens to the cache (a prefill, or catching up); logits [1 or len, vocab]."""
        return self._run(torch.tensor(tokens), logits_to_keep=1 if last_logits_only else 0)

    def forward_tree(self, tree: TokenTree) -> torch.Tensor:
        """One pass over every tree node; logits [n_nodes, vocab], row i predicts node i's children."""
        self._tree_start = start = self.cached_len
        ids = torch.tensor(tree.tokens)
        if tree.is_chain:  # plain causal attention is exactly the chain's ancestor mask
            return self._run(ids)
        positions = (start + torch.tensor(tree.depths))[None].to(self.device)
        return self._run(ids, position_ids=positions, attention_mask=self._tree_mask(tree, start))

    def _tree_mask(self, tree: TokenTree, start: int) -> torch.Tensor:
        """[1, 1, n, start + n] additive float mask: 0 where visible, dtype minimum elsewhere."""
        visible = torch.cat([torch.ones(len(tree), start, dtype=torch.bool), tree.ancestor_mask()], dim=1)
        mask = torch.zeros(visible.shape, dtype=self.dtype)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        return mask[None, None].to(self.device)

    def commit(self, kept_nodes: list[int]) -> None:
        """After forward_tree: keep the cached context plus these tree nodes (a root-first path)."""
        keep_positions(self.cache, self._tree_start, kept_nodes)

    def crop(self, length: int) -> None:
        crop_to(self.cache, length)
