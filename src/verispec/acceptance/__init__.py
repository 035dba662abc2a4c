"""Verification rules: which drafted tokens the target accepts, and the token it adds.

Lossless rules: `greedy` (temperature 0), `speculative-sampling`, and `gumbel` (coupled,
seeded sampling: output token-identical to `ar`'s for the seed). Lossy rules (which
change the output distribution) say so with `lossless = False`: `typical`.
"""
from .base import RULES, Rule, Verdict, choose_rule
from .greedy import GreedyRule
from .gumbel import GumbelRule
from .rejection import SpeculativeSamplingRule
from .typical import TypicalAcceptanceRule

__all__ = ["RULES", "Rule", "Verdict", "GreedyRule", "GumbelRule", "SpeculativeSamplingRule", "TypicalAcceptanceRule", "choose_rule"]
