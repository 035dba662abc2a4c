"""Greedy losslessness on the real smollm2-135m-instruct (float32), every method.

Marked `real`: part of the default run; the model is fetched and converted on first use.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from verispec import SpeculativeGenerator
from verispec.draft_init import layer_subset
from conftest import ScriptedDrafter, real_model

pytestmark = pytest.mark.real

QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"
MAX_NEW = 40


def spec_bench_first_turns() -> list[str]:
    """The first question of each Spec-Bench task (MT-bench: writing and coding)."""
    if not QUESTIONS.exists():
        pytest.skip(f"Spec-Bench questions not found at {QUESTIONS}")
    wanted = ["writing", "coding", "translation", "summarization", "qa", "math_reasoning", "rag"]
    firsts: dict[str, str] = {}
    for line in QUESTIONS.read_text().splitlines():
        q = json.loads(line)
        firsts.setdefault(q["category"], q["turns"][0])
    return [firsts[c] for c in wanted]


@functools.lru_cache(maxsize=1)
def real_cases(max_new: int = 32):
    """smollm2-135m-instruct (float32) and 10 (prompt ids, greedy reference) pairs: the first
    Spec-Bench question of 7 tasks with the chat template, 3 plain texts. Shared by the
    method test files, so the references are computed once per run. The model is the run's
    one shared copy (conftest.real_model, the `smol` fixture)."""
    smol = real_model()
    prompts = [smol.encode(q, chat=True) for q in spec_bench_first_turns()]
    prompts += [smol.encode(t) for t in ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
                                         "import argparse\n\nparser = argparse.ArgumentParser(",
                                         "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"]]
    cases = []
    for ids in prompts:
        with torch.inference_mode():
            ref = smol.model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)[0, len(ids):]
        cases.append((ids, ref.tolist()))
    return smol, cases


def check_real_greedy(method: str, **options) -> float:
    """Assert greedy equality on every real case; return the mean accepted tokens per pass."""
    smol, cases = real_cases()
    gen = SpeculativeGenerator(smol, method=method, **options)
    passes = tokens = 0
    for ids, ref in cases:
        out = gen.generate(ids, max_new_tokens=len(ref))
        assert out.token_ids == ref, f"{method} differs from generate() on {smol.decode(ids)[:60]!r}"
        passes, tokens = passes + out.stats.target_passes, tokens + out.stats.new_tokens
    return tokens / passes


@pytest.fixture(scope="module")
def cases(smol):
    """(prompt ids, reference greedy tokens) for 11 prompts: Spec-Bench with the chat template, plain text without."""
    prompts = [smol.encode(q, chat=True) for q in spec_bench_first_turns()]
    prompts += [smol.encode(t) for t in [
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
        "The quick brown fox jumps over the lazy dog. The quick brown fox",
        "Speculative decoding speeds up language models by",
        "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    ]]
    out = []
    for ids in prompts:
        with torch.inference_mode():
            ref = smol.model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False)[0, len(ids):]
        out.append((ids, ref.tolist()))
    return out


@pytest.fixture(scope="module")
def small_draft(smol):
    return layer_subset(smol, [0, 1, 2, 3, 27, 28, 29])


STATIC_TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]]


@pytest.mark.parametrize("method,options", [
    ("ar", {}),
    ("prompt-lookup", {}),
    ("draft-model", {"k": 4}),
    ("draft-model", {"tree": STATIC_TREE}),
    ("draft-model", {"tree": "dynamic", "depth": 4, "top_k": 3, "budget": 12}),
    ("eagle", {}),  # the trained head shipped in verispec/assets/drafters/ (EAGLE-2 dynamic tree, draft vocabulary 8192)
    ("eagle", {"tree": "chain", "k": 4}),
    ("medusa", {}),  # the trained heads shipped in verispec/assets/drafters/
], ids=["ar", "prompt-lookup", "draft-chain", "draft-static-tree", "draft-dynamic-tree", "eagle-dynamic",
        "eagle-chain", "medusa"])
def test_greedy_equals_hf_generate(smol, cases, small_draft, method, options):
    if method == "draft-model":
        options = {"draft": small_draft, **options}
    gen = SpeculativeGenerator(smol, method=method, **options)
    for ids, ref in cases:
        out = gen.generate(ids, max_new_tokens=MAX_NEW)
        assert out.token_ids == ref, f"{method} differs from generate() on prompt {smol.decode(ids)[:60]!r}"
    if method in ("eagle", "medusa"):  # trained heads do draft what the target says
        assert gen.generate(cases[-1][0], max_new_tokens=MAX_NEW).stats.mean_accepted_tokens > 1.2


def test_chat_prompt_that_hits_eos(smol):
    ids = smol.encode("What is the capital of France? Answer with one word.", chat=True)
    with torch.inference_mode():
        ref = smol.model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False)[0, len(ids):].tolist()
    assert ref[-1] in smol.eos_token_ids and len(ref) < MAX_NEW
    out = SpeculativeGenerator(smol, method="prompt-lookup").generate(
        "What is the capital of France? Answer with one word.", max_new_tokens=MAX_NEW, chat=True)
    assert out.token_ids == ref and out.text.strip()


def test_max_new_tokens_hit_mid_draft(smol):
    """An oracle drafter proposes 10 right tokens a step, so 23 new tokens end inside a draft."""
    ids = smol.encode("Once upon a time, in a small village by the sea, there lived")
    with torch.inference_mode():
        full = smol.model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids):].tolist()
    assert len(full) == 40
    for max_new in (23, 29):
        oracle = ScriptedDrafter(full, len(ids), k=10, correct=10, vocab=smol.model.config.vocab_size)
        out = SpeculativeGenerator(smol, method=oracle).generate(ids, max_new_tokens=max_new)
        assert out.token_ids == full[:max_new]
        assert out.stats.accept_lengths == [11, 11, max_new - 22]  # the last draft was cut to fit
        lookup = SpeculativeGenerator(smol, method="prompt-lookup").generate(ids, max_new_tokens=max_new)
        assert lookup.token_ids == full[:max_new]
