"""The one loop: draft -> target pass -> verify -> commit. Nothing method-specific lives here."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import SamplingConfig
from .protocols import DraftContext, Drafter, Rule, Verdict
from .stats import GenerationStats, PhaseTimer
from .target import CachedLM


@dataclass
class LoopResult:
    tokens: list[int]  # new tokens only
    kinds: list[str]  # per new token: "accepted", "recovered", "bonus" or "target"
    stats: GenerationStats = field(default_factory=GenerationStats)
    stopped_early: bool = False  # on_step asked to stop before max_new_tokens or a stop token


def speculative_decode(
    target: CachedLM, drafter: Drafter, rule: Rule, prompt: list[int], max_new_tokens: int,
    sampling: SamplingConfig, rng: torch.Generator | None, stop_ids: set[int],
    on_step: Callable[[list[int]], bool | None] | None = None,
) -> LoopResult:
    """Decode up to max_new_tokens. `on_step`, if given, gets each step's committed tokens as
    soon as they are verified (streaming); returning False stops the generation there (a
    client that went away), with what was committed so far as the result."""
    result = LoopResult([], [])
    stats, timer = result.stats, PhaseTimer(result.stats, target.device)
    start = time.perf_counter()
    target.reset()
    with target.features_captured(getattr(drafter, "needs_features", False)):  # released after, even on error
        drafter.begin(prompt)
        tokens = list(prompt)
        pending = tokens[:-1]  # the prompt goes through the target with the first tree; then the
        # cache always holds every committed token but the last one, the next tree's root
        while len(result.tokens) < max_new_tokens:
            ctx = DraftContext(tokens, max_new_tokens - len(result.tokens) - 1, sampling, rng)
            with timer.phase("draft"):
                tree = drafter.propose(ctx)
            if max(tree.depths) > ctx.max_depth:
                raise RuntimeError(f"{type(drafter).__name__} drafted {max(tree.depths)} deep, over the step's limit {ctx.max_depth}")
            with timer.phase("prefill" if pending else "target"):
                logits = target.forward_tree(tree, pending)  # [n_nodes (+ aux), vocab]
            with timer.phase("accept"):
                verdict = rule.verify(tree, logits[: len(tree)], sampling, rng, position=len(tokens))
            target.commit([0, *verdict.accepted])
            new = [tree.tokens[i] for i in verdict.accepted] + [verdict.next_token]
            kinds = ["accepted"] * len(verdict.accepted) + [verdict.next_kind]
            stop_at = next((i + 1 for i, t in enumerate(new) if t in stop_ids), None)
            new, kinds = new[:stop_at], kinds[:stop_at]
            with timer.phase("draft"):
                drafter.observe(tree, logits, verdict, new, _committed_features(target, drafter, len(pending), verdict, new))
            pending = []
            stats.record_step(max(tree.depths), tree.num_drafted, min(len(verdict.accepted), len(new)), len(new))
            tokens += new
            result.tokens += new
            result.kinds += kinds
            if on_step is not None and on_step(new) is False and stop_at is None:
                result.stopped_early = True
                break
            if stop_at is not None:
                break
    stats.wall_time_s = time.perf_counter() - start
    return result


def _committed_features(target: CachedLM, drafter: Drafter, n_pending: int, verdict: Verdict,
                        new: list[int]) -> torch.Tensor | None:
    """The target's features of the pending context, the root and the accepted path, up to the
    newest committed token (exclusive: its features come with the next pass); a stop token
    inside the accepted path ends it there."""
    if not getattr(drafter, "needs_features", False):
        return None
    rows = [*range(n_pending), *(n_pending + i for i in [0, *verdict.accepted[:len(new) - 1]])]
    return target.features[rows]
