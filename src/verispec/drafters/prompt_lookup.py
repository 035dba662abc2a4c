"""`prompt-lookup`: draft the continuation of the latest earlier occurrence of the context's
last n-gram (Saxena 2023, prompt lookup decoding). Drafts carry no distribution (one-hot q).
With tree_width > 1 the continuations of several matches are merged into a token tree.
"""
from __future__ import annotations

import numpy as np

from ..engine.tree import TokenTree
from .base import DraftContext, Drafter, register
from .ngram_tree import continuation_trie


def find_continuations(tokens: list[int] | np.ndarray, k: int, max_ngram: int, min_ngram: int,
                       max_matches: int = 1) -> list[list[int]]:
    """Up to k tokens after each of up to max_matches earlier matches of a suffix n-gram, best first.

    n goes from max_ngram down to min_ngram: longer n-grams first, and within one n the most
    recent match first, since recent text predicts the next tokens best. Shorter n-grams only
    add matches while fewer than max_matches were found (a start already found is not repeated).
    """
    seq = np.asarray(tokens, dtype=np.int64)
    found: list[list[int]] = []
    starts: set[int] = set()
    for n in range(min(max_ngram, len(seq) - 1), min_ngram - 1, -1):
        suffix = seq[-n:]
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # excludes the suffix itself
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        for start in (hits[::-1] + n).tolist():
            if start not in starts:
                starts.add(start)
                found.append(seq[start:start + k].tolist())
                if len(found) == max_matches:
                    return found
    return found


def find_continuation(tokens: list[int] | np.ndarray, k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier match of the longest suffix n-gram."""
    found = find_continuations(tokens, k, max_ngram, min_ngram, max_matches=1)
    return found[0] if found else []


@register("prompt-lookup")
class PromptLookup(Drafter):
    """Options: k (draft length), max_ngram / min_ngram (suffix n-gram sizes tried), tree_width
    (1: a chain from the best match; more: a trie of up to that many matches' continuations),
    budget (drafted nodes of such a tree)."""

    def __init__(self, target, k: int = 10, max_ngram: int = 3, min_ngram: int = 1, tree_width: int = 1,
                 budget: int = 32):
        if not (1 <= min_ngram <= max_ngram) or k < 1 or tree_width < 1 or budget < 1:
            raise ValueError(f"prompt-lookup needs k, tree_width, budget >= 1 and 1 <= min_ngram <= max_ngram (got k={k}, "
                             f"min_ngram={min_ngram}, max_ngram={max_ngram}, tree_width={tree_width}, budget={budget})")
        self.k, self.max_ngram, self.min_ngram = int(k), int(max_ngram), int(min_ngram)
        self.tree_width, self.budget = int(tree_width), int(budget)

    def propose(self, ctx: DraftContext) -> TokenTree:
        k = min(self.k, ctx.max_depth)
        if k <= 0:
            return TokenTree.chain(ctx.tokens[-1])
        if self.tree_width == 1:
            return TokenTree.chain(ctx.tokens[-1], find_continuation(ctx.tokens, k, self.max_ngram, self.min_ngram))
        found = find_continuations(ctx.tokens, k, self.max_ngram, self.min_ngram, self.tree_width)
        return continuation_trie(ctx.tokens[-1], found, self.budget, k)
