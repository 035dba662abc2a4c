"""SpeculativeGenerator: the public entry point that ties a target, a drafter and a rule."""
from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .acceptance import choose_rule
from .config import SamplingConfig
from .drafters import Drafter, make_drafter, methods as drafter_methods
from .engine.loop import speculative_decode
from .engine.exact import resolve as resolve_exact
from .engine.stats import GenerationStats
from .engine.target import CachedLM
from .heads import drafter_dirs

AUTO = "auto"


def methods() -> list[str]:
    """Every method name: "auto" and the registered drafters."""
    return [AUTO, *drafter_methods()]


def choose_method(lm: Any) -> tuple[str, dict, str]:
    """What "auto" runs for this model: (method, options, why).

    A trained EAGLE head for the model (EAGLE-3 first, else EAGLE-1; the user's, or one shipped
    with verispec) drafts in one tree with prompt-lookup continuations (`hybrid`): the head
    predicts new text, the lookup copies from the context (summaries, translations, retrieved
    passages), and the merge keeps the nodes worth their pass cost. Without a head, prompt
    lookup: the fastest training-free drafter measured (README, Results)."""
    for kind, version in (("eagle3", 3), ("eagle", 1)):
        for path in drafter_dirs(lm, kind):
            if (path / "config.json").exists():
                return "hybrid", {"drafter": str(path)}, f"EAGLE-{version} head {path} merged with prompt lookup"
    return "prompt-lookup", {}, "no trained EAGLE head for this model: prompt lookup (training-free)"


@dataclass
class GenerationOutput:
    token_ids: list[int]  # new tokens only
    text: str
    stats: GenerationStats
    kinds: list[str] = field(default_factory=list)  # how each new token came: accepted/recovered/bonus/target
    prompt_ids: list[int] = field(default_factory=list)
    seed: int | None = None  # the sampling seed (the gumbel rule draws one when none is given)


class SpeculativeGenerator:
    """Generate with `method` (see verispec.methods()) on a LoadedModel target.

    method="auto" (the default) picks the fastest lossless method this model has (see
    choose_method; `.method` and `.auto_reason` say which and why). Other methods' options go
    as keyword arguments, e.g. method="prompt-lookup", k=10, or
    method="draft-model", draft=verispec.load_model(...), k=5. A Drafter instance is
    accepted as `method` too, for drafters of your own. `rule` picks the verification
    rule: "auto" (lossless: greedy at temperature 0, speculative sampling otherwise), "gumbel"
    (lossless, coupled: each token the Gumbel-max draw with noise keyed by the seed and its
    position, for the target and the drafts alike, so the sampled output is token for token
    `ar`'s under the same rule and seed; without a seed one is drawn, `output.seed` says which)
    or "typical" (Medusa's typical acceptance, LOSSY; rule_options epsilon, delta).
    exact=True computes every target pass with row-invariant numerics (verispec.engine.exact), so
    that in bfloat16 too the output is token for token exact-mode `ar`'s; "auto" (the default)
    turns it on for bfloat16/float16 targets on the CPU (`.exact` says what was chosen).
    """

    def __init__(self, lm: Any, method: str | Drafter = AUTO, rule: str = "auto",
                 rule_options: dict | None = None, exact: bool | str = "auto", **method_options: Any):
        self.lm = lm
        self.exact = resolve_exact(exact, lm.model)
        self.rule_name, self.rule_options = rule, dict(rule_options or {})
        # build the rule once now so that a bad name or option fails here, not mid-benchmark
        choose_rule(self._sampling(0.0 if rule == "greedy" else 1.0, 0, 1.0, 0), rule, **self.rule_options)
        self.auto_reason = None
        if method == AUTO:
            if method_options:
                raise ValueError(f"method 'auto' takes no options (got {', '.join(sorted(method_options))}); "
                                 "name a method to pass options to it")
            method, method_options, self.auto_reason = choose_method(lm)
        if isinstance(method, Drafter):
            self.method, self.drafter = type(method).__name__, method
        else:
            self.method, self.drafter = method, make_drafter(method, lm, **method_options)
        self.target = CachedLM(lm.model, exact=self.exact)

    def generate(
        self, prompt: str | list[int], max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, seed: int | None = None, chat: bool = False, stop_token_ids: list[int] | None = None,
        on_step: Callable[[list[int]], bool | None] | None = None,
    ) -> GenerationOutput:
        """`on_step(new_token_ids)` is called after each verification step with the tokens it
        committed (for streaming); return False from it to stop early."""
        sampling = self._sampling(temperature, top_k, top_p, seed)
        prompt_ids = self._encode(prompt, chat)
        self._check_lengths(prompt_ids, max_new_tokens)
        stop_ids = set(self._eos_ids() if stop_token_ids is None else stop_token_ids)
        result = speculative_decode(
            self.target, self.drafter, choose_rule(sampling, self.rule_name, **self.rule_options), prompt_ids, max_new_tokens,
            sampling, self._rng(sampling), stop_ids, on_step,
        )
        return GenerationOutput(result.tokens, self._decode(result.tokens), result.stats, result.kinds, prompt_ids,
                                sampling.seed)

    def _sampling(self, temperature: float, top_k: int, top_p: float, seed: int | None) -> SamplingConfig:
        """The sampling settings of a generation; the gumbel rule couples them (and needs a seed)."""
        coupled = self.rule_name == "gumbel"
        if coupled and seed is None and temperature != 0:
            seed = secrets.randbits(63)  # reported in GenerationOutput.seed, so the output can be reproduced
        return SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, coupled=coupled)

    def _encode(self, prompt: str | list[int], chat: bool) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty; give some text or token ids")
            if getattr(self.lm, "tokenizer", None) is None:
                raise ValueError("this model has no tokenizer: pass the prompt as a list of token ids")
            return self.lm.encode(prompt, chat=chat)
        if chat:
            raise ValueError("chat=True needs a text prompt (the chat template applies to text)")
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty; give some text or token ids")
        vocab = self.lm.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        return ids

    def _check_lengths(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        limit = self.target.max_positions
        if limit is not None and len(prompt_ids) + max_new_tokens > limit:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                f"of {limit} positions; shorten the prompt or lower max_new_tokens"
            )

    def _eos_ids(self) -> list[int]:
        ids = getattr(self.lm, "eos_token_ids", None)
        if ids is not None:
            return list(ids)
        eos = getattr(self.lm.model.generation_config, "eos_token_id", None)
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    def _decode(self, ids: list[int]) -> str:
        return self.lm.decode(ids) if getattr(self.lm, "tokenizer", None) is not None else ""

    def _rng(self, sampling: SamplingConfig) -> torch.Generator | None:
        if sampling.greedy:
            return None
        rng = torch.Generator(device=self.target.device)
        if sampling.seed is not None:
            rng.manual_seed(sampling.seed)
        else:  # seeded from OS entropy; torch's global RNG is neither read nor re-seeded
            rng.seed()
        return rng
