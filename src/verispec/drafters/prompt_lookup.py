"""`prompt-lookup`: draft the continuation of the latest earlier occurrence of the context's
last n-gram (Saxena 2023, prompt lookup decoding). Drafts carry no distribution (one-hot q).
"""
from __future__ import annotations

import numpy as np

from ..engine.tree import TokenTree
from .base import DraftContext, Drafter, register


def find_continuation(tokens: list[int] | np.ndarray, k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier match of the longest suffix n-gram.

    n goes from max_ngram down to min_ngram; the first n with a match wins. Among matches,
    the most recent is used, since recent text predicts the next tokens best.
    """
    seq = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_ngram, len(seq) - 1), min_ngram - 1, -1):
        suffix = seq[-n:]
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # excludes the suffix itself
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return seq[start:start + k].tolist()
    return []


@register("prompt-lookup")
class PromptLookup(Drafter):
    def __init__(self, target, k: int = 10, max_ngram: int = 3, min_ngram: int = 1):
        if not (1 <= min_ngram <= max_ngram) or k < 1:
            raise ValueError(f"prompt-lookup needs k >= 1 and 1 <= min_ngram <= max_ngram (got k={k}, "
                             f"min_ngram={min_ngram}, max_ngram={max_ngram})")
        self.k, self.max_ngram, self.min_ngram = int(k), int(max_ngram), int(min_ngram)

    def propose(self, ctx: DraftContext) -> TokenTree:
        k = min(self.k, ctx.max_depth)
        drafts = find_continuation(ctx.tokens, k, self.max_ngram, self.min_ngram) if k > 0 else []
        return TokenTree.chain(ctx.tokens[-1], drafts)
