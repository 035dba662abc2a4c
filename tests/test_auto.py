"""method="auto": the fastest lossless method the model has, and it says which."""
from __future__ import annotations

import pytest
import torch

from verispec import SpeculativeGenerator, methods
from verispec.heads.eagle3 import Eagle3Head, head_config, save_eagle3
from verispec.models import tokenizer_identity
from conftest import hf_greedy, tiny_llama


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("VERISPEC_HOME", str(tmp_path))
    return tmp_path


def test_auto_is_the_default_and_falls_back_to_prompt_lookup_without_a_head(home):
    tiny = tiny_llama()
    gen = SpeculativeGenerator(tiny)
    assert "auto" in methods()
    assert gen.method == "prompt-lookup" and "no trained EAGLE head" in gen.auto_reason
    assert gen.generate([5, 6, 7, 5, 6], max_new_tokens=20).token_ids == hf_greedy(tiny, [5, 6, 7, 5, 6], 20)


def test_auto_uses_the_models_eagle3_head_in_the_hybrid_tree(home):
    tiny = tiny_llama(layers=3)
    torch.manual_seed(0)
    head = Eagle3Head(head_config(tiny.model.config, 96, [0, 1, 2]))
    head.set_draft_vocab(torch.arange(96))
    path = save_eagle3(head, home / "drafters" / "tiny" / "eagle3", tokenizer_identity(tiny))
    gen = SpeculativeGenerator(tiny)
    assert gen.method == "hybrid" and str(path) in gen.auto_reason and gen.drafter.inner.version == 3
    for prompt in ([5, 6, 7, 8], [1, 90, 33, 2, 2, 14, 60]):
        assert gen.generate(prompt, max_new_tokens=30).token_ids == hf_greedy(tiny, prompt, 30)


def test_auto_takes_no_options(home):
    with pytest.raises(ValueError, match="auto.*no options"):
        SpeculativeGenerator(tiny_llama(), "auto", k=3)
