"""Prompts the target writes itself (self-instruct in the manner of Magpie, Xu et al. 2024).

The target is given its chat layout up to where a user's message begins and samples the
message: the requests a chat model expects to be asked, in every domain it was tuned on,
with no corpus at all. A drafter distilled on the answers to them sees the target's
general-domain behaviour, not only the domain of whatever local text is at hand (heads
trained on Python-documentation prompts alone agreed with the target half as often on
Spec-Bench's chat questions as on their own held-out prompts).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from .batched import Sampler, decode_batch
from .prompts import EvalSetGuard

SENTINEL = "\u2063verispec-user-turn\u2063"


def user_turn_prefix(lm: Any) -> list[int]:
    """Token ids of the chat layout up to the start of a user's message (the bench's layout:
    the chat template, else the plain "User: " form)."""
    tok = lm.tokenizer
    if not getattr(tok, "chat_template", None):
        return list(tok("User:", add_special_tokens=True)["input_ids"])
    text = tok.apply_chat_template([{"role": "user", "content": SENTINEL}], add_generation_prompt=True, tokenize=False)
    return list(tok(text[:text.index(SENTINEL)], add_special_tokens=False)["input_ids"])


def _end_of_turn(lm: Any, text: str, ended: bool) -> str | None:
    """The user's message in a sampled continuation, or None if it never ended."""
    if not getattr(lm.tokenizer, "chat_template", None):
        cut = text.find("\nAssistant:")  # the plain layout ends a turn where the assistant's begins
        return text[:cut].strip() if cut >= 0 else None
    return text.strip() if ended else None


def self_instruct_prompts(lm: Any, n: int, seed: int = 0, guard: EvalSetGuard | None = None,
                          batch_size: int = 32, max_tokens: int = 96, temperature: float = 1.0,
                          top_p: float = 0.95, min_words: int = 3, progress: bool = False,
                          seen: set[str] | None = None, write=None) -> list[str]:
    """n distinct user messages sampled from the target (deterministic for a seed on one machine).
    seen: keys (see `key`) of messages already used elsewhere; they are not repeated.
    write(prefix, rows, max_tokens, sampler) -> [(token ids, ended)]: how continuations are
    sampled (default: batched decoding of lm.model; tests script it)."""
    guard = guard if guard is not None else EvalSetGuard()
    prefix = user_turn_prefix(lm)
    eos = lm.eos_token_ids
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else eos[0]
    if write is None:
        def write(prefix, rows, max_tokens, sampler):
            return decode_batch(lm.model, [prefix] * rows, max_tokens, eos, pad, sampler)
    prompts: list[str] = []
    seen = set(seen or ())
    start = time.perf_counter()
    for attempt in range(50 * (n // batch_size + 1)):
        if len(prompts) >= n:
            break
        sampler = Sampler(temperature=temperature, top_p=top_p, seed=seed * 1_000_003 + attempt)
        for row, ended in write(prefix, batch_size, max_tokens, sampler):
            row = [t for t in row if t not in eos]
            text = _end_of_turn(lm, lm.tokenizer.decode(row, skip_special_tokens=True), ended)
            if not text or len(text.split()) < min_words or key(text) in seen or not guard.clean(text):
                continue
            seen.add(key(text))
            prompts.append(text)
        if progress:
            print(f"[data] self-instruct: {min(len(prompts), n)}/{n} user turns  {time.perf_counter() - start:.0f}s",
                  flush=True)
    if len(prompts) < n:
        raise ValueError(f"the model wrote only {len(prompts)} usable distinct user messages of the {n} asked")
    return prompts[:n]


def key(text: str) -> str:
    """Messages that differ only in case and spacing are one message."""
    return " ".join(text.lower().split())
