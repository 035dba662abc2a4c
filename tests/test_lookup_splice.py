"""draft-model's `lookup` (verispec.drafters.lookup_splice): a prompt-lookup continuation drafts
instead of the draft model where the measured rates say it yields more tokens per second; the
output stays the target's."""
from __future__ import annotations

import pytest

from verispec import SpeculativeGenerator
from verispec.drafters.draft_length import AdaptiveLength
from verispec.drafters.draft_model import DraftModel
from verispec.drafters.lookup_splice import LookupSplice
from conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96


def _timed(adaptive: AdaptiveLength, draft_s: float, first: float, rate: float) -> AdaptiveLength:
    """An adaptive length whose target pass costs 1 s whatever its length, with these draft rates."""
    for n in (1, 4, 8, 2, 6):
        adaptive.cost.add(n, 1.0)
    adaptive.draft_s = draft_s
    adaptive.acceptance._first = [first * 100, (1 - first) * 100]
    adaptive.acceptance._next = [rate * 100, (1 - rate) * 100]
    return adaptive


def test_the_continuation_drafts_when_it_promises_more_tokens_a_second():
    tokens = [5, 6, 7, 8, 9, 10, 11, 1, 2, 5, 6, 7]  # "5 6 7" occurred before: its continuation is 8 9 10 ...
    splice = LookupSplice(2)
    # a draft whose tokens are seldom kept and cost half a target pass each: the free continuation wins
    poor = _timed(AdaptiveLength(k_max=6), draft_s=0.5, first=0.2, rate=0.2)
    assert splice.choose(tokens, 10, poor, k_draft=2)[:3] == [8, 9, 10] and splice.used
    # a draft that is nearly always right and nearly free: it drafts
    good = _timed(AdaptiveLength(k_max=6), draft_s=0.001, first=0.99, rate=0.99)
    assert splice.choose(tokens, 10, good, k_draft=6) == [] and not splice.used
    assert splice.choose([1, 2, 3, 4], 10, poor, k_draft=2) == []  # no earlier match: nothing to copy


def test_the_continuation_is_scored_against_what_the_target_committed():
    splice = LookupSplice(1)
    adaptive = _timed(AdaptiveLength(k_max=6), draft_s=0.001, first=0.99, rate=0.99)
    tokens = [5, 6, 7, 8, 9, 1, 5, 6, 7]
    before = splice._acceptance(3).first
    splice.choose(tokens, 10, adaptive, k_draft=6)  # not used, but scored
    splice.observe([8, 9, 4])  # two kept, then a miss
    assert splice._acceptance(3).first > before


def test_copied_steps_happen_and_the_output_is_the_targets():
    target = tiny_llama(vocab=VOCAB, layers=2, seed=21)
    draft = tiny_llama(vocab=VOCAB, layers=1, seed=22)
    used: list[bool] = []
    for seed in range(3):
        prompt = [(seed * 7 + i * 5) % VOCAB for i in range(12)] * 3  # a repeated text: lookup has matches
        ref = SpeculativeGenerator(target, method="ar").generate(prompt, max_new_tokens=40).token_ids
        gen = SpeculativeGenerator(target, method="draft-model", draft=draft, k="auto", lookup=1)
        choose = gen.drafter.splice.choose

        def counting(*args, choose=choose):
            out = choose(*args)
            used.append(bool(out))
            return out

        gen.drafter.splice.choose = counting
        assert gen.generate(prompt, max_new_tokens=40).token_ids == ref
    assert any(used) and not all(used)  # the continuation drafted on some steps, the model on others


def test_lookup_needs_the_measured_costs_and_a_small_ngram():
    target, draft = tiny_llama(vocab=VOCAB, seed=1), tiny_llama(vocab=VOCAB, layers=1, seed=2)
    with pytest.raises(ValueError, match="k='auto'"):
        DraftModel(target, draft=draft, k=4, lookup=2)
    with pytest.raises(ValueError, match="1 to 3"):
        DraftModel(target, draft=draft, k="auto", lookup=4)
