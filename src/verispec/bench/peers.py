"""Peers: Hugging Face transformers' own generate, run in the same process on the same prompts.

    hf-greedy          model.generate() (greedy; sampling when temperature > 0)
    hf-prompt-lookup   generate(prompt_lookup_num_tokens=10)
    hf-assisted        generate(assistant_model=draft)            same-tokenizer draft (--draft)
    hf-universal       generate(assistant_model=draft, tokenizer=..., assistant_tokenizer=...)
                       a draft with another tokenizer (--universal-draft, else --draft)

New tokens are counted as verispec counts them: new tokens only, the stop token included.
What HF does not report is measured from the outside, never invented: a forward pre-hook on
the target records each target pass's input (so the candidate tokens it verified), and a
streamer records the tokens each pass emitted. From these come tokens per target pass,
drafted/accepted counts per draft position and each token's kind (accepted / recovered /
bonus / target). Forward hooks also time the target's (and the assistant's) forward passes.
Where the two records do not line up, those numbers are reported as unknown.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from typing import Any

import torch
from transformers import GenerationConfig

from ..drafters.draft_model import check_same_vocabulary
from ..engine.stats import GenerationStats
from ..generator import GenerationOutput

PEERS = ("hf-greedy", "hf-prompt-lookup", "hf-assisted", "hf-universal")
# options that HF reads from the assistant model's own generation config
_ASSISTANT_KEYS = {"num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
                   "assistant_lookbehind", "target_lookbehind"}


def is_peer(method: str) -> bool:
    return method in PEERS


class _Streamer:
    """transformers streamer protocol: put() per step (the prompt first), end() at the end."""

    def __init__(self):
        self.chunks: list[torch.Tensor] = []
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.chunks.append(value)

    def end(self) -> None:
        pass


class _ForwardTimer:
    """Forward hooks adding up a module's forward time; optionally keeping each call's input_ids."""

    def __init__(self, module: torch.nn.Module, keep_inputs: bool, sync):
        self.module, self.keep_inputs, self.sync = module, keep_inputs, sync
        self.inputs: list[torch.Tensor] = []
        self.seconds = 0.0
        self._start = 0.0
        self._handles = []

    def __enter__(self):
        self._handles = [
            self.module.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.module.register_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def _pre(self, module, args, kwargs):
        if self.keep_inputs:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None:
                self.inputs.append(ids)
        self.sync()
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        self.sync()
        self.seconds += time.perf_counter() - self._start


@contextmanager
def _seeded(seed: int | None, device: torch.device):
    """transformers samples from torch's global RNG: seed it for one call, then restore the caller's state."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class HFPeer:
    """One transformers generate() configuration behind the bench's method interface."""

    kind = "hf"

    def __init__(self, name: str, lm: Any, draft: Any | None = None, **options: Any):
        if name not in PEERS:
            raise ValueError(f"unknown peer {name!r}; peers: {', '.join(PEERS)}")
        self.name, self.lm, self.draft = name, lm, draft
        self.options = dict(options)
        self.generate_options: dict[str, Any] = {}
        self.assistant_options: dict[str, Any] = {}
        if name in ("hf-assisted", "hf-universal") and draft is None:
            flag = "--draft" if name == "hf-assisted" else "--universal-draft (or --draft)"
            raise ValueError(f"{name} needs a draft model: pass {flag} NAME_OR_PATH")
        if name == "hf-universal":
            if getattr(lm, "tokenizer", None) is None or getattr(draft, "tokenizer", None) is None:
                raise ValueError("hf-universal needs tokenizers for both the target and the draft model")
            if lm.tokenizer.get_vocab() == draft.tokenizer.get_vocab():
                raise ValueError("hf-universal is for a draft with another tokenizer, and this draft shares the "
                                 "target's (transformers refuses that); use hf-assisted, or pass a draft with "
                                 "another tokenizer as --universal-draft")
        if name == "hf-assisted":
            try:
                check_same_vocabulary(lm, draft)
            except ValueError:
                raise ValueError("hf-assisted needs a draft with the target's tokenizer, and this draft's vocabulary "
                                 "differs; for a draft with another tokenizer use hf-universal "
                                 "(--universal-draft)") from None
        if name == "hf-prompt-lookup":
            self.generate_options["prompt_lookup_num_tokens"] = 10
        known = set(GenerationConfig().to_dict())
        for key, value in self.options.items():
            if key in _ASSISTANT_KEYS and name in ("hf-assisted", "hf-universal"):
                self.assistant_options[key] = value
            elif key in known:
                self.generate_options[key] = value
            else:
                raise ValueError(f"{name} has no option {key!r}; options are transformers GenerationConfig fields "
                                 f"(e.g. prompt_lookup_num_tokens, max_matching_ngram_size, num_assistant_tokens)")
        if draft is not None and draft.model is lm.model:
            # the target drafting for itself: give the assistant its own copy, so the forward hooks
            # that measure the target do not also count the assistant's passes
            self.draft = copy.copy(draft)
            self.draft.model = copy.deepcopy(draft.model)
        self.model = lm.model
        self.device = next(self.model.parameters()).device
        self._sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        self.measures_draft_time = name in ("hf-assisted", "hf-universal")

    # -- generation ------------------------------------------------------------------

    def generation_config(self, max_new_tokens: int, temperature: float):
        eos = list(getattr(self.lm, "eos_token_ids", None) or [])
        tok = getattr(self.lm, "tokenizer", None)
        pad = getattr(tok, "pad_token_id", None)
        pad = pad if pad is not None else (eos[0] if eos else 0)
        sampling = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0) if temperature > 0 \
            else dict(do_sample=False)
        # A fresh config: nothing from the model's own generation_config (repetition penalty, say)
        # that verispec would not apply either.
        return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos or None, pad_token_id=pad,
                                **sampling, **self.generate_options)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 seed: int | None = None) -> GenerationOutput:
        ids = torch.tensor([list(prompt_ids)], device=self.device)
        kwargs: dict[str, Any] = dict(attention_mask=torch.ones_like(ids),
                                      generation_config=self.generation_config(max_new_tokens, temperature))
        if self.draft is not None and self.name in ("hf-assisted", "hf-universal"):
            kwargs["assistant_model"] = self.draft.model
            if self.name == "hf-universal":
                kwargs.update(tokenizer=self.lm.tokenizer, assistant_tokenizer=self.draft.tokenizer)
        streamer = _Streamer()
        start = time.perf_counter()
        with _seeded(seed, self.device), self._assistant_settings(), torch.inference_mode(), \
                _ForwardTimer(self.model, True, self._sync) as target_timer, \
                (_ForwardTimer(self.draft.model, False, self._sync) if self.measures_draft_time else _null()) as draft_timer:
            output = self.model.generate(ids, streamer=streamer, **kwargs)
        self._sync()
        wall = time.perf_counter() - start
        new = output[0, len(prompt_ids):].tolist()
        eos = set(getattr(self.lm, "eos_token_ids", None) or [])
        cut = next((i + 1 for i, t in enumerate(new) if t in eos), None)
        new = new[:cut]
        stats, kinds = measure_steps(list(prompt_ids), new, target_timer.inputs, streamer.chunks)
        stats.wall_time_s = wall
        stats.time_s = {"prefill": 0.0, "draft": draft_timer.seconds if draft_timer else 0.0,
                        "target": target_timer.seconds, "accept": 0.0}
        text = self.lm.decode(new) if getattr(self.lm, "tokenizer", None) is not None else ""
        return GenerationOutput(new, text, stats, kinds, list(prompt_ids))

    @property
    def measured_phases(self) -> tuple[str, ...]:
        """Phases of GenerationStats.time_s this peer measures; the others are unknown (not zero)."""
        return ("target", "draft") if self.measures_draft_time else ("target",)

    @contextmanager
    def _assistant_settings(self):
        """HF reads the assistant's settings from its own generation_config: set ours for this call only."""
        if not self.assistant_options or self.draft is None:
            yield
            return
        model = self.draft.model
        saved = model.generation_config
        model.generation_config = copy.deepcopy(saved)
        for key, value in self.assistant_options.items():
            setattr(model.generation_config, key, value)
        try:
            yield
        finally:
            model.generation_config = saved


@contextmanager
def _null():
    yield None


def measure_steps(prompt: list[int], new: list[int], target_inputs: list[torch.Tensor],
                  emitted: list[torch.Tensor]) -> tuple[GenerationStats, list[str]]:
    """Per target pass: the candidates it verified (its input past the committed tokens) and
    the tokens it emitted. Returns stats in verispec's terms and each new token's kind; if the
    records do not line up, stats carry only new_tokens and kinds are empty (unknown)."""
    stats = GenerationStats()
    stats.new_tokens = len(new)
    if len(target_inputs) != len(emitted) or not emitted:
        return stats, []
    measured, kinds = GenerationStats(), []
    committed = len(prompt)
    for number, (inp, out) in enumerate(zip(target_inputs, emitted)):
        inp = inp[0].tolist() if inp.dim() == 2 else inp.tolist()
        tokens = out.reshape(-1).tolist()
        # the first pass (the prefill) reads the whole prompt, later ones the last committed token
        candidates = inp[len(prompt):] if number == 0 else inp[1:]
        if number == 0 and inp[:len(prompt)] != prompt:
            return stats, []
        accepted = 0
        while accepted < min(len(tokens), len(candidates)) and tokens[accepted] == candidates[accepted]:
            accepted += 1
        if accepted == len(tokens):  # cut (stop token or length) inside the drafts
            step_kinds = ["accepted"] * accepted
        else:
            end = "target" if not candidates else ("bonus" if accepted == len(candidates) else "recovered")
            step_kinds = ["accepted"] * accepted + [end]
        measured.record_step(len(candidates), len(candidates), accepted, len(tokens))
        kinds += step_kinds
        committed += len(tokens)
    flat = [t for chunk in emitted for t in chunk.reshape(-1).tolist()]
    if flat[:len(new)] != new or measured.new_tokens < len(new):
        return stats, []
    if measured.new_tokens > len(new):  # the streamer saw tokens past the stop token: trim the last step
        return stats, []
    return measured, kinds
