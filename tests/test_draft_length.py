"""Adaptive draft length (draft-model k="auto"): the choice follows acceptance and costs, and
the output stays exactly the target's."""
from __future__ import annotations

import pytest

from verispec import SpeculativeGenerator
from verispec.drafters.draft_length import AdaptiveLength, best_length, expected_tokens
from test_greedy_equivalence import PROMPTS, hf_greedy


def test_expected_tokens_of_a_chain():
    assert expected_tokens(0.0, 5) == 1.0  # only the target's own token
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_length_grows_with_acceptance_and_shrinks_with_draft_cost():
    cheap, costly = 0.05, 0.5  # a draft pass as a fraction of the target pass (target 1.0)
    assert best_length(0.2, cheap, 1.0, 12) < best_length(0.6, cheap, 1.0, 12) < best_length(0.95, cheap, 1.0, 12)
    assert best_length(0.8, costly, 1.0, 12) < best_length(0.8, cheap, 1.0, 12)
    assert best_length(0.99, 0.0001, 1.0, 7) == 7  # capped at k_max
    assert best_length(0.0, 0.5, 1.0, 12) == 1


def test_adaptive_length_follows_observations():
    policy = AdaptiveLength(k_start=4, k_max=12)
    assert policy.next() == 4  # no timing yet: the starting length
    for _ in range(20):  # every draft kept, drafting cheap
        k = policy.next()
        policy.drafted(k - 1, 0.01 * (k - 1))
        policy._proposed_at -= 0.2  # as if the target pass took 0.2 s
        policy.verified(k, k)
    long_k = policy.next()
    for _ in range(40):  # now every draft rejected at once
        k = policy.next()
        policy.drafted(k - 1, 0.01 * (k - 1))
        policy._proposed_at -= 0.2
        policy.verified(k, 0)
    assert long_k >= 10 and policy.next() <= 2, (long_k, policy.next())


@pytest.mark.parametrize("draft_name", ["tiny_draft", "tiny"])
@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_auto_length_keeps_greedy_output(tiny, request, draft_name, prompt):
    draft = request.getfixturevalue(draft_name)
    out = SpeculativeGenerator(tiny, method="draft-model", draft=draft, k="auto", k_max=8).generate(prompt, max_new_tokens=48)
    assert out.token_ids == hf_greedy(tiny, prompt, 48)


def test_auto_length_never_exceeds_k_max(tiny):
    out = SpeculativeGenerator(tiny, method="draft-model", draft=tiny, k="auto", k_max=2).generate(PROMPTS[0], max_new_tokens=30)
    assert max(out.stats.accept_lengths) <= 3 and out.token_ids == hf_greedy(tiny, PROMPTS[0], 30)


def test_bad_k_is_refused(tiny, tiny_draft):
    with pytest.raises(ValueError, match="'auto'"):
        SpeculativeGenerator(tiny, method="draft-model", draft=tiny_draft, k="long")
