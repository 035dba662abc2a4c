"""Verification rules: which drafted tokens the target accepts, and the token it adds.

Lossless rules: `greedy` (temperature 0) and `speculative-sampling`. Lossy rules (which
change the output distribution) say so with `lossless = False`.
"""
from .base import Rule, Verdict, choose_rule
from .greedy import GreedyRule
from .rejection import SpeculativeSamplingRule

__all__ = ["Rule", "Verdict", "GreedyRule", "SpeculativeSamplingRule", "choose_rule"]
