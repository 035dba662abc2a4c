"""Prompt lookup inside a drafter that pays for its drafts (draft-model's `lookup` option).

Where the answer copies its context (a summary, an answer from a retrieved document, code
being edited) a prompt-lookup continuation is often as good as a draft model's tokens and costs
nothing to draft. Each step, when the context's last n-gram (n from 3 down to `min_ngram`)
occurred before, its continuation is weighed against the draft model's chain by the same
model of a step that chooses the chain's length (drafters.draft_length): expected tokens per
target pass over the time of the step. The draft's side: its acceptance rates, its draft pass
time and the target's pass-time fit, all the drafter's own running estimates. The lookup's
side: acceptance per n-gram length, learnt for free every step a match exists (its
continuation is scored against the tokens the target then commits, drafted or not), and the
same target pass-time fit, with no drafting time. The one with more tokens per second drafts.

Lossless as any draft is: lookup tokens are deterministic (one-hot q), and the draft model's
cache catches up over whatever the target committed at its next draft.
"""
from __future__ import annotations

from .draft_length import AdaptiveLength, best_length, expected_tokens
from .prompt_lookup import NgramAcceptance, find_matches

MAX_NGRAM = 3  # prompt-lookup's default: longer suffixes are rarer and add little


class LookupSplice:
    def __init__(self, min_ngram: int):
        if not 1 <= int(min_ngram) <= MAX_NGRAM:
            raise ValueError(f"lookup is the smallest suffix n-gram whose continuation may replace a draft, "
                             f"1 to {MAX_NGRAM} (0: off); got {min_ngram!r}")
        self.min_ngram = int(min_ngram)
        self._acceptance = NgramAcceptance()
        self._step: tuple[int, list[int]] | None = None  # this step's match: (n-gram length, continuation)
        self.used = False  # whether this step's draft is the lookup continuation

    def begin_step(self) -> None:
        """A new step: nothing matched or copied yet (a step that never asks stays that way)."""
        self._step, self.used = None, False

    def choose(self, tokens: list[int], max_depth: int, adaptive: AdaptiveLength, k_draft: int) -> list[int]:
        """The lookup continuation to draft instead of the draft model's k_draft tokens, or []
        where the draft model expects more tokens per second (or nothing matched)."""
        self.begin_step()
        found = find_matches(tokens, min(adaptive.k_max, max_depth), MAX_NGRAM, self.min_ngram, 1)
        self._step = found[0] if found else None
        if not found or not found[0][1] or not adaptive.cost.known:
            return []
        n, continuation = found[0]
        lookup, cost = self._acceptance(n), adaptive.cost
        length = best_length(lookup.rate, 0.0, cost, len(continuation), 1, lookup.first)
        lookup_rate = expected_tokens(lookup.rate, length, lookup.first) / cost(length)
        draft = adaptive.acceptance
        draft_rate = expected_tokens(draft.rate, k_draft, draft.first) / (k_draft * (adaptive.draft_s or 0.0) + cost(k_draft))
        if lookup_rate <= draft_rate:
            return []
        self.used = True
        return continuation[:length]

    def observe(self, new_tokens: list[int]) -> None:
        """Score this step's continuation, drafted or not, against the tokens committed."""
        if self._step is None:
            return
        n, continuation = self._step
        self._step = None
        self._acceptance.score(n, continuation, new_tokens)
