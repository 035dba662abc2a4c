"""Typical acceptance (lossy): plausibility threshold behaviour and the generator wiring."""
from __future__ import annotations

import pytest
import torch

from verispec import SamplingConfig, SpeculativeGenerator
from verispec.acceptance import TypicalAcceptanceRule, choose_rule
from verispec.engine.tree import TokenTree
from conftest import check_typical_acceptance

V = 8
SAMPLING = SamplingConfig(temperature=1.0)


def test_uniform_target_accepts_every_draft():
    tree = TokenTree((0, 3, 5, 1, 7), (-1, 0, 1, 2, 0))
    logits = torch.zeros(len(tree), V)  # uniform p: every token is as plausible as any
    v = TypicalAcceptanceRule().verify(tree, logits, SAMPLING, torch.Generator().manual_seed(0))
    assert v.accepted == [1, 2, 3] and v.next_kind == "bonus"


def test_near_deterministic_target_accepts_only_its_argmax():
    logits = torch.full((4, V), -20.0)
    logits[:, 2] = 20.0  # p(2) ~ 1 after every node
    rule, rng = TypicalAcceptanceRule(), torch.Generator().manual_seed(0)
    tree = TokenTree((0, 2, 2, 3), (-1, 0, 1, 2))
    v = rule.verify(tree, logits, SAMPLING, rng)
    assert v.accepted == [1, 2] and v.next_kind == "recovered" and v.next_token == 2
    siblings = TokenTree((0, 5, 2, 6), (-1, 0, 0, 0))
    assert rule.verify(siblings, logits, SAMPLING, rng).accepted == [2]


def test_threshold_is_the_smaller_of_epsilon_and_delta_times_exp_minus_entropy():
    """p = (0.4, 0.3, 0.2, 0.1): H = 1.2799, exp(-H) = 0.2781. With delta = 0.5 the entropy
    term (0.139) is the threshold, so 0.2 passes and 0.1 does not; with epsilon = 0.05 below
    it, epsilon rules and 0.1 passes too."""
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = p.log().expand(2, -1)
    tree_of = lambda token: TokenTree((0, token), (-1, 0))
    rng = torch.Generator().manual_seed(0)
    entropy_rules = TypicalAcceptanceRule(epsilon=0.9, delta=0.5)
    assert [entropy_rules.verify(tree_of(t), logits, SAMPLING, rng).accepted for t in range(4)] == [[1], [1], [1], []]
    epsilon_rules = TypicalAcceptanceRule(epsilon=0.05, delta=0.5)
    assert [epsilon_rules.verify(tree_of(t), logits, SAMPLING, rng).accepted for t in range(4)] == [[1]] * 4


def test_typical_is_marked_lossy_and_lossless_rules_are_not():
    assert TypicalAcceptanceRule.lossless is False
    assert choose_rule(SAMPLING).lossless and choose_rule(SamplingConfig()).lossless
    with pytest.raises(ValueError, match="unknown rule"):
        choose_rule(SAMPLING, "nope")


def test_generator_with_typical_rule(tiny, tiny_draft):
    gen = SpeculativeGenerator(tiny, method="draft-model", draft=tiny_draft, k=4, rule="typical",
                               rule_options={"epsilon": 0.2, "delta": 0.5})
    out = gen.generate([1, 2, 3], max_new_tokens=30, temperature=1.0, seed=0)
    assert len(out.token_ids) == 30
    assert check_typical_acceptance(tiny, [1, 2, 3], out, temperature=1.0, epsilon=0.2, delta=0.5) > 0
    # the limits: a threshold near 0 accepts every draft; epsilon = 1 with a huge delta makes the
    # threshold 1, nothing is plausible, and each token is the target's own draw (plain sampling)
    for options, accepts_all in [({"epsilon": 1e-12, "delta": 1e-12}, True), ({"epsilon": 1.0, "delta": 1e9}, False)]:
        limit = SpeculativeGenerator(tiny, method="draft-model", draft=tiny_draft, k=4, rule="typical", rule_options=options)
        out = limit.generate([1, 2, 3], max_new_tokens=30, temperature=1.0, seed=0)
        if accepts_all:
            assert out.stats.accepted_tokens == out.stats.drafted_tokens > 0
        else:
            assert out.stats.accepted_tokens == 0 and set(out.kinds) <= {"recovered", "target"}  # target: the last step drafts nothing
            assert out.stats.target_passes == 30
    with pytest.raises(ValueError):
        SpeculativeGenerator(tiny, rule="typical", rule_options={"epsilon": 2.0})
