"""KV-cache commit and rollback on transformers' own Cache objects.

After a verification pass the cache holds every node of the tree; commit keeps the
context plus the accepted path. A chain's accepted path is a prefix, so a crop does;
a tree's is scattered, so the kept positions are gathered layer by layer. The cache's
internals (layers, keys/values, crop) are reached only through verispec.compat.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..compat import cache_length, crop_cache, gather_cache

if TYPE_CHECKING:
    from transformers import Cache

__all__ = ["cache_length", "crop_to", "keep_positions"]


def crop_to(cache: "Cache", length: int) -> None:
    """Drop every cached position from `length` on."""
    crop_cache(cache, length)


def keep_positions(cache: "Cache", start: int, kept: list[int]) -> None:
    """Keep positions [0, start) plus start + i for i in `kept` (ascending), drop the rest."""
    if kept == list(range(len(kept))):
        crop_to(cache, start + len(kept))
        return
    # CachedLM gives hybrid models full layers; a sliding-window layer raises here.
    gather_cache(cache, torch.tensor([*range(start), *(start + i for i in kept)]))
