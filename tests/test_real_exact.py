"""Exact mode on the real models, in bfloat16: every lossless method's output is token for
token exact-mode ar's, 10 Spec-Bench prompts, 128 new tokens.

smollm2-135m-instruct: marked `real`, part of the default run (a few minutes on 2 cores).
Qwen2.5-Coder-1.5B-Instruct with its 0.5B sibling: marked `slow` too (one token costs ~0.3 s
here in bf16): run it with `.venv/bin/python -m pytest -q -m "slow and qwen" tests/test_real_exact.py`.
"""
from __future__ import annotations

import functools

import pytest

import verispec
from verispec import SpeculativeGenerator
from verispec.bench import suites
from conftest import REAL_MODEL, fetched

pytestmark = pytest.mark.real
TOKENS = 128


@functools.lru_cache(maxsize=1)
def prompts_of(task_count: int = 10) -> tuple[str, ...]:
    """The first question of each Spec-Bench task, then the second ones: 10 prompts."""
    questions = suites.load_questions(suites.resolve_questions(None))
    by_task: dict[str, list] = {}
    for q in questions:
        by_task.setdefault(q.task, []).append(q.turns[0])
    ordered = [texts[i] for i in range(2) for texts in by_task.values()]
    return tuple(ordered[:task_count])


def check(target, methods: dict, prompts, tokens: int = TOKENS) -> None:
    ar = SpeculativeGenerator(target, method="ar", exact=True)
    generators = {name: SpeculativeGenerator(target, method=m, exact=True, **opts) for name, (m, opts) in methods.items()}
    accepted = dict.fromkeys(methods, 0)
    for i, text in enumerate(prompts):
        ids = target.encode(text, chat=True)
        want = ar.generate(ids, max_new_tokens=tokens).token_ids
        for name, gen in generators.items():
            got = gen.generate(ids, max_new_tokens=tokens)
            assert got.token_ids == want, f"{name} differs from exact ar on prompt {i}"
            accepted[name] += got.stats.accepted_tokens
    assert all(n > 0 for n in accepted.values()), accepted


@pytest.fixture(scope="module")
def smol_bf16():
    fetched(REAL_MODEL)
    return verispec.load_model(REAL_MODEL, dtype="bfloat16")  # its own copy: the shared one is float32


def test_smollm2_every_method_equals_exact_ar_in_bfloat16(smol_bf16):
    # (recycling's 24-node trees are covered on the tiny models: here they would double the test's time)
    check(smol_bf16, {"prompt-lookup": ("prompt-lookup", {}), "eagle": ("eagle", {})}, prompts_of())


@pytest.mark.slow
@pytest.mark.qwen
def test_qwen_pair_equals_exact_ar_in_bfloat16():
    target_name, draft_name = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"
    fetched(target_name), fetched(draft_name)
    target = verispec.load_model(target_name, dtype="bfloat16")
    draft = verispec.load_model(draft_name, dtype="bfloat16")
    check(target, {"draft-model": ("draft-model", {"draft": draft, "k": "auto"}),
                   "prompt-lookup": ("prompt-lookup", {})}, prompts_of())
