"""Choosing a verification rule, and what the rules share. The verdict of a step and the
protocol every rule follows are the engine's (verispec.engine.protocols), imported here.
The rule modules register their classes here (register_rule); base imports none of them."""
from __future__ import annotations

from typing import Callable

from ..config import SamplingConfig
from ..engine.protocols import NextKind, Rule, Verdict
from ..engine.tree import TokenTree
from ..options import check_options

__all__ = ["NextKind", "RULES", "Rule", "Verdict", "choose_rule", "end_kind", "follow_picks", "register_rule",
           "rule_class"]

_RULE_CLASSES: dict[str, type] = {}


def register_rule(name: str) -> Callable:
    """Class decorator: make the rule class available to choose_rule as `name`."""

    def wrap(cls):
        _RULE_CLASSES[name] = cls
        return cls

    return wrap


def rule_class(name: str) -> type:
    """The rule class registered as `name` (verispec.acceptance imports every rule module)."""
    if name not in _RULE_CLASSES:
        raise ValueError(f"unknown rule {name!r}; known rules: {', '.join(RULES)} (typical is lossy)")
    return _RULE_CLASSES[name]


def end_kind(tree: TokenTree, node: int) -> NextKind:
    """Kind of the target token emitted after the walk stopped at `node`."""
    if tree.num_drafted == 0:
        return "target"
    return "recovered" if tree.children[node] else "bonus"


def follow_picks(tree: TokenTree, pick: Callable[[int, int], int]) -> Verdict:
    """The walk of a deterministic rule: from the root, accept the child whose token is the
    target's pick(node, depth) there, until no child has it; that pick is the step's token."""
    node, accepted = 0, []
    while True:
        token = pick(node, len(accepted))
        match = next((c for c in tree.children[node] if tree.tokens[c] == token), None)
        if match is None:
            return Verdict(accepted, token, end_kind(tree, node))
        accepted.append(match)
        node = match


RULES = ("auto", "greedy", "speculative-sampling", "gumbel", "typical")


def choose_rule(sampling: SamplingConfig, name: str = "auto", **options) -> Rule:
    """A rule by name; "auto" is the lossless rule for these sampling settings (greedy at
    temperature 0, gumbel for coupled sampling, speculative sampling otherwise). "typical" is lossy."""
    GreedyRule, SpeculativeSamplingRule, GumbelRule, TypicalAcceptanceRule = (
        rule_class(n) for n in ("greedy", "speculative-sampling", "gumbel", "typical"))

    if name == "auto":
        name = "greedy" if sampling.greedy else "gumbel" if sampling.coupled else "speculative-sampling"
    if name == "gumbel":
        if options:
            raise ValueError(f"rule 'gumbel' takes no options (got {', '.join(options)})")
        if sampling.greedy:  # the Gumbel-max draw at temperature 0 is the argmax
            return GreedyRule()
        if not sampling.coupled:
            raise ValueError("the gumbel rule verifies coupled sampling: SamplingConfig(coupled=True, seed=...)")
        return GumbelRule()
    if sampling.coupled and not sampling.greedy:
        raise ValueError(f"coupled sampling is verified by the gumbel rule (or auto), not {name!r}")
    if name == "typical":
        check_options("rule 'typical'", TypicalAcceptanceRule.__init__, options, skip=("self",))
        return TypicalAcceptanceRule(**options)
    if options:
        raise ValueError(f"rule {name!r} takes no options (got {', '.join(options)})")
    if name == "greedy":
        if not sampling.greedy:
            raise ValueError("the greedy rule needs temperature 0; use speculative-sampling (or auto) when sampling")
        return GreedyRule()
    if name == "speculative-sampling":
        return SpeculativeSamplingRule()
    raise ValueError(f"unknown rule {name!r}; known rules: {', '.join(RULES)} (typical is lossy)")
