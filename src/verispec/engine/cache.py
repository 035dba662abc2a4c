"""KV-cache commit and rollback on transformers' own Cache objects.

After a verification pass the cache holds every node of the tree; commit keeps the
context plus the accepted path. A chain's accepted path is a prefix, so a crop does;
a tree's is scattered, so the kept positions are gathered layer by layer.
"""
from __future__ import annotations

import torch
from transformers import Cache


def cache_length(cache: Cache) -> int:
    return int(cache.get_seq_length())


def crop_to(cache: Cache, length: int) -> None:
    """Drop every cached position from `length` on."""
    excess = cache_length(cache) - length
    if excess < 0:
        raise ValueError(f"cannot crop a cache of {cache_length(cache)} positions to {length}")
    if excess:
        cache.crop(-excess)  # transformers >= 5 takes the number of positions to remove, negated


def keep_positions(cache: Cache, start: int, kept: list[int]) -> None:
    """Keep positions [0, start) plus start + i for i in `kept` (ascending), drop the rest."""
    if kept == list(range(len(kept))):
        crop_to(cache, start + len(kept))
        return
    index = torch.tensor([*range(start), *(start + i for i in kept)])
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):  # CachedLM gives hybrid models full layers; others can't gather
            raise NotImplementedError("cannot gather positions of a sliding-window cache layer; use a cache without config")
        if not getattr(layer, "is_initialized", True) or layer.keys is None or layer.keys.numel() == 0:
            continue
        idx = index.to(layer.keys.device)
        layer.keys = layer.keys.index_select(-2, idx)
        layer.values = layer.values.index_select(-2, idx)
