"""A draft's one-token passes through the one-row attention (verispec.engine.draft_attention): the
same logits as the model's own attention up to float rounding, taken only for one unmasked row,
the model's own attention back after each pass, and never for a target."""
from __future__ import annotations

import random

import pytest
import torch

from verispec.engine import draft_attention
from verispec.engine.target import CachedLM
from verispec.engine.tree import TokenTree
from conftest import tiny_llama, tiny_qwen2

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


@pytest.fixture(params=["llama", "qwen2"])
def model(request):
    make = tiny_llama if request.param == "llama" else tiny_qwen2
    return make(vocab=VOCAB, layers=2, hidden=128, seed=3).model  # 128 / 4 heads; qwen2: grouped kv heads


def test_one_token_steps_take_the_one_row_attention_and_match_the_models_own(model, monkeypatch):
    calls = []
    real = draft_attention.one_row_attention
    monkeypatch.setattr(draft_attention, "one_row_attention", lambda *a: calls.append(1) or real(*a))
    prompt, steps = _tokens(1, 40), _tokens(2, 6)
    own, fast = CachedLM(model), CachedLM(model, draft=True)
    assert fast.fast_decode and not own.fast_decode
    torch.testing.assert_close(fast.extend(prompt), own.extend(prompt), rtol=0, atol=0)  # a prefill: sdpa for both
    assert not calls
    for token in steps:
        torch.testing.assert_close(fast.extend([token]), own.extend([token]), rtol=1e-4, atol=1e-5)
        assert model.config._attn_implementation == "sdpa"  # set for the pass, then put back
    assert len(calls) == len(steps) * model.config.num_hidden_layers


def test_passes_over_several_rows_or_under_a_mask_keep_the_models_attention(model, monkeypatch):
    monkeypatch.setattr(draft_attention, "one_row_attention", lambda *a: pytest.fail("one-row attention taken"))
    prompt = _tokens(3, 30)
    own, fast = CachedLM(model), CachedLM(model, draft=True)
    own.extend(prompt)
    fast.extend(prompt)
    tree = TokenTree(tuple(_tokens(4, 4)), (-1, 0, 0, 1))  # a tree: several rows under a 4D mask
    assert torch.equal(fast.forward_tree(tree), own.forward_tree(tree))
    assert torch.equal(fast.extend(_tokens(5, 3), last_logits_only=False), own.extend(_tokens(5, 3), last_logits_only=False))


def test_a_target_cannot_be_a_draft(model):
    with pytest.raises(ValueError, match="target"):
        CachedLM(model, exact=True, draft=True)
