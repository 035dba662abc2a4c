"""Typical acceptance (lossy): plausibility threshold behaviour and the generator wiring."""
from __future__ import annotations

import pytest
import torch

from verispec import SamplingConfig, SpeculativeGenerator
from verispec.acceptance import TypicalAcceptanceRule, choose_rule
from verispec.engine.tree import TokenTree

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
    with pytest.raises(ValueError):
        SpeculativeGenerator(tiny, rule="typical", rule_options={"epsilon": 2.0})
