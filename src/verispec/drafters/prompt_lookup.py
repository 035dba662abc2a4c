"""`prompt-lookup`: draft the continuation of the latest earlier occurrence of the context's
last n-gram (Saxena 2023, prompt lookup decoding). Drafts carry no distribution (one-hot q).
With tree_width > 1 the continuations of several matches are merged into a token tree.
With k="auto" a chain's length is chosen each step (drafters.draft_length): from the
acceptance observed for matches of the same n-gram length, which predicts a draft far better
than one rate for all (a 3-gram match continues the text much more often than a 1-gram one),
and from the target's pass time fitted over the draft length. Drafting is free, so the
continuation not drafted is still scored against the tokens the target then commits: the
estimates keep learning while the policy drafts little or nothing.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

from ..engine.tree import TokenTree
from .base import DraftContext, Drafter, register
from .draft_length import Acceptance, AdaptiveLength
from .ngram_tree import continuation_trie


def find_continuations(tokens: list[int] | np.ndarray, k: int, max_ngram: int, min_ngram: int,
                       max_matches: int = 1) -> list[list[int]]:
    """Up to k tokens after each of up to max_matches earlier matches of a suffix n-gram, best first.

    n goes from max_ngram down to min_ngram: longer n-grams first, and within one n the most
    recent match first, since recent text predicts the next tokens best. Shorter n-grams only
    add matches while fewer than max_matches were found (a start already found is not repeated).
    """
    return [cont for _, cont in find_matches(tokens, k, max_ngram, min_ngram, max_matches)]


def find_matches(tokens, k: int, max_ngram: int, min_ngram: int, max_matches: int) -> list[tuple[int, list[int]]]:
    """find_continuations' matches as (n-gram length, continuation)."""
    seq = np.asarray(tokens, dtype=np.int64)
    found: list[tuple[int, list[int]]] = []
    starts: set[int] = set()
    for n in range(min(max_ngram, len(seq) - 1), min_ngram - 1, -1):
        suffix = seq[-n:]
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # excludes the suffix itself
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        for start in (hits[::-1] + n).tolist():
            if start not in starts:
                starts.add(start)
                found.append((n, seq[start:start + k].tolist()))
                if len(found) == max_matches:
                    return found
    return found


def find_continuation(tokens: list[int] | np.ndarray, k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier match of the longest suffix n-gram."""
    found = find_continuations(tokens, k, max_ngram, min_ngram, max_matches=1)
    return found[0] if found else []


class NgramAcceptance:
    """How continuations of matches fare, one Acceptance per n-gram length (a 3-gram match continues
    the text much more often than a 1-gram one). Drafting them is free, so a continuation is scored
    against the committed tokens whether it was drafted or not."""

    def __init__(self):
        self._by_ngram: dict[int, Acceptance] = {}

    def __call__(self, n: int) -> Acceptance:
        return self._by_ngram.setdefault(n, Acceptance())

    def score(self, n: int, continuation: list[int], new_tokens: list[int]) -> None:
        """The continuation of an n-gram match against what the target then committed."""
        seen = min(len(continuation), len(new_tokens))
        kept = next((i for i in range(seen) if continuation[i] != new_tokens[i]), seen)
        self(n).add(seen, kept)


@register("prompt-lookup")
class PromptLookup(Drafter):
    """Options: k (draft length, or "auto": chosen each step, 0 included, up to k_max; see the
    module's doc), max_ngram / min_ngram (suffix n-gram sizes tried), tree_width (1: a chain
    from the best match; more: a trie of up to that many matches' continuations), budget
    (drafted nodes of such a tree)."""

    def __init__(self, target, k: int | Literal["auto"] = 10, max_ngram: int = 3, min_ngram: int = 1, tree_width: int = 1,
                 budget: int = 32, k_max: int = 10):
        auto = k == "auto"
        if auto:
            k = k_max
        if isinstance(k, str) or not (1 <= min_ngram <= max_ngram) or k < 1 or tree_width < 1 or budget < 1:
            raise ValueError(f"prompt-lookup needs k (an integer or 'auto'), k_max, tree_width, budget >= 1 and "
                             f"1 <= min_ngram <= max_ngram (got k={k!r}, k_max={k_max}, min_ngram={min_ngram}, "
                             f"max_ngram={max_ngram}, tree_width={tree_width}, budget={budget})")
        if auto and tree_width > 1:
            raise ValueError("prompt-lookup's k='auto' chooses a chain's length; with tree_width > 1 give k an integer")
        self.k, self.max_ngram, self.min_ngram = int(k), int(max_ngram), int(min_ngram)
        self.tree_width, self.budget = int(tree_width), int(budget)
        self.adaptive = AdaptiveLength(k_start=min(4, self.k), k_max=self.k, probe_every=None) if auto else None
        self._acceptance = NgramAcceptance()
        self._step: tuple[int, list[int], int] | None = None  # this step's (n-gram length, continuation, drafted)

    def begin(self, prompt: list[int]) -> None:
        self._step = None
        if self.adaptive:
            self.adaptive.begin()

    def propose(self, ctx: DraftContext) -> TokenTree:
        k = min(self.k, ctx.max_depth)
        if k <= 0:
            return TokenTree.chain(ctx.tokens[-1])
        if self.tree_width > 1:
            found = find_continuations(ctx.tokens, k, self.max_ngram, self.min_ngram, self.tree_width)
            return continuation_trie(ctx.tokens[-1], found, self.budget, k)
        if self.adaptive is None:
            return TokenTree.chain(ctx.tokens[-1], find_continuation(ctx.tokens, k, self.max_ngram, self.min_ngram))
        matches = find_matches(ctx.tokens, k, self.max_ngram, self.min_ngram, 1)
        n, continuation = matches[0] if matches else (0, [])
        drafted = continuation[:self.adaptive.next(self._acceptance(n))] if continuation else []
        self._step = (n, continuation, len(drafted))
        self.adaptive.drafted(0, 0.0)
        return TokenTree.chain(ctx.tokens[-1], drafted)

    def observe(self, tree, target_logits, verdict, new_tokens, features=None) -> None:
        if self.adaptive is None or self._step is None:
            return
        n, continuation, drafted = self._step
        self.adaptive.verified(drafted)
        # the whole continuation against what was committed: the drafted part's verdict, and
        # for free whether the next undrafted token would have been kept too
        self._acceptance.score(n, continuation, new_tokens)
