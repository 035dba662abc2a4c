"""Adaptive draft length (draft-model k="auto"): the choice follows acceptance and costs, and
the output stays exactly the target's."""
from __future__ import annotations

import pytest

from verispec import SpeculativeGenerator
from verispec.drafters.draft_length import Acceptance, AdaptiveLength, PassCost, best_length, expected_tokens
from test_greedy_equivalence import PROMPTS, hf_greedy


def test_expected_tokens_of_a_chain():
    assert expected_tokens(0.0, 5) == 1.0  # only the target's own token
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(0.9, 0) == 1.0  # no draft: a plain step
    # bursty: the first token kept a third of the time, the next ones 9 in 10 after a kept one
    assert expected_tokens(0.9, 3, first=1 / 3) == pytest.approx(1 + (1 + 0.9 + 0.81) / 3)


def test_pass_cost_fits_intercept_and_slope():
    cost = PassCost()
    for n in (0, 3, 10, 1, 7, 0, 5):
        cost.add(n, 0.050 + 0.004 * n)
    a, b = cost.coefficients()
    # the prior's pull (0.03 of the mean time per token) is small against a spread of n like this
    assert a == pytest.approx(0.050, rel=0.1) and b == pytest.approx(0.004, rel=0.5), (a, b)
    flat = PassCost()
    for _ in range(5):
        flat.add(4, 0.1)  # one length seen: the slope is the prior's, the line goes through the data
    a, b = flat.coefficients()
    assert b > 0 and a + 4 * b == pytest.approx(0.1)


def test_acceptance_keeps_first_and_following_rates_apart():
    acc = Acceptance()
    for _ in range(30):
        acc.add(10, 0)  # two in three drafts die at once...
        acc.add(10, 0)
        acc.add(10, 10)  # ...the third is kept whole
    assert acc.first < 0.45 and acc.rate > 0.85, (acc.first, acc.rate)


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


def drive(policy, steps, accepted_of, pass_s, draft_s=0.0):
    """Run the policy's loop on made-up timings: pass_s(k) seconds per target pass."""
    lengths = []
    for _ in range(steps):
        k = policy.next()
        lengths.append(k)
        policy.drafted(max(k - 1, 0), draft_s * max(k - 1, 0))
        policy._proposed_at -= pass_s(k)  # as if the target pass took that long
        policy.verified(k, accepted_of(k))
    return lengths


def test_drafting_stops_where_it_cannot_pay_and_probes():
    """A compute-bound target (each drafted token adds 60% of a pass) and a poor draft: the
    policy settles on k = 0, drafting again only for a short probe every probe_every steps."""
    policy = AdaptiveLength(k_start=4, k_max=8, probe_every=5, k_probe=2)
    lengths = drive(policy, 60, lambda k: 1 if k >= 3 else 0, lambda k: 0.1 * (1 + 0.6 * k), draft_s=0.01)
    tail = lengths[30:]
    assert tail.count(0) >= 20 and set(tail) <= {0, 2}, lengths
    assert 2 in tail  # the probes


def test_memory_bound_target_gets_long_drafts():
    """Passes nearly flat in k and most drafts kept: the longest length wins."""
    policy = AdaptiveLength(k_start=4, k_max=10)
    lengths = drive(policy, 40, lambda k: k if k < 9 else 8, lambda k: 0.1 * (1 + 0.01 * k), draft_s=0.002)
    assert min(lengths[20:]) >= 8, lengths


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


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_prompt_lookup_auto_keeps_greedy_output(tiny, prompt):
    out = SpeculativeGenerator(tiny, method="prompt-lookup", k="auto").generate(prompt * 3, max_new_tokens=48)
    assert out.token_ids == hf_greedy(tiny, prompt * 3, 48)


def test_prompt_lookup_auto_scores_the_undrafted_continuation(tiny):
    """At k = 0 the continuation still meets the committed tokens: its n-gram's rates move."""
    from verispec.drafters.base import make_drafter
    from verispec.engine.protocols import DraftContext, Verdict
    from verispec.engine.sampling import SamplingConfig

    drafter = make_drafter("prompt-lookup", tiny, k="auto")
    drafter.adaptive.next = lambda acceptance=None: 0  # force the no-draft step
    tokens = [5, 6, 7, 8, 9, 5, 6, 7]  # the 3-gram 5 6 7 recurs: its continuation is 8 9 ...
    tree = drafter.propose(DraftContext(tokens, 10, SamplingConfig(), None))
    assert tree.num_drafted == 0
    before = drafter._acceptance(3).first
    drafter.observe(tree, None, Verdict([], 8, "bonus"), [8])  # the target then commits 8: it would have been kept
    assert drafter._acceptance(3).first > before


def test_prompt_lookup_auto_refuses_a_tree(tiny):
    with pytest.raises(ValueError, match="tree_width"):
        SpeculativeGenerator(tiny, method="prompt-lookup", k="auto", tree_width=3)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_chain_stops_after_a_token_the_draft_doubts(tiny, tiny_draft, temperature):
    """min_confidence: the draft stops after a token it gives less than that probability; the
    chains get shorter and the output stays the target's (greedy: generate()'s)."""
    def run(min_confidence):
        gen = SpeculativeGenerator(tiny, method="draft-model", draft=tiny_draft, k=6, min_confidence=min_confidence)
        return [gen.generate(p, max_new_tokens=32, temperature=temperature, seed=1) for p in PROMPTS[:3]]
    always, doubting = run(0.0), run(0.9)
    drafted = [sum(o.stats.drafted_tokens for o in outs) for outs in (always, doubting)]
    assert drafted[1] < 0.8 * drafted[0], drafted
    if temperature == 0.0:
        assert [o.token_ids for o in doubting] == [hf_greedy(tiny, p, 32) for p in PROMPTS[:3]]
    with pytest.raises(ValueError, match="min_confidence"):
        SpeculativeGenerator(tiny, method="draft-model", draft=tiny_draft, min_confidence=1.5)
