"""verispec.compat: the one module that touches transformers internals."""
from __future__ import annotations

import warnings

import pytest
import torch

from verispec import compat


class _NewStyle(torch.nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None):
        return cache


class _OldStyle(torch.nn.Module):
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        return past_key_values


class _KwargsOnly(torch.nn.Module):
    def forward(self, **kwargs):
        return kwargs


def test_cache_keyword_follows_the_declared_name():
    assert compat.cache_kwargs(_NewStyle(), "c") == {"cache": "c"}
    assert compat.cache_kwargs(_OldStyle(), "c") == {"past_key_values": "c"}
    # neither declared: what the installed transformers' own models take
    from transformers import LlamaForCausalLM

    assert compat.cache_keyword(_KwargsOnly()) == compat.cache_keyword(LlamaForCausalLM.__new__(LlamaForCausalLM))


def test_tiny_model_forward_with_cache_raises_no_deprecation(tiny):
    cache = compat.new_cache(tiny.model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with torch.inference_mode():
            tiny.model(input_ids=torch.tensor([[1, 2, 3]]), **compat.cache_kwargs(tiny.model, cache), use_cache=True)
    assert compat.cache_length(cache) == 3


def test_crop_and_gather_match_a_fresh_prefill(tiny):
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        full = compat.new_cache(tiny.model.config)
        tiny.model(input_ids=ids, **compat.cache_kwargs(tiny.model, full), use_cache=True)
        kept = compat.new_cache(tiny.model.config)
        tiny.model(input_ids=ids[:, :3], **compat.cache_kwargs(tiny.model, kept), use_cache=True)
    compat.crop_cache(full, 3)
    assert compat.cache_length(full) == 3
    for a, b in zip(full.layers, kept.layers):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
    compat.gather_cache(full, torch.tensor([0, 2]))
    assert compat.cache_length(full) == 2
    assert torch.allclose(full.layers[0].keys[..., 1, :], kept.layers[0].keys[..., 2, :], atol=1e-5)
    with pytest.raises(ValueError, match="cannot crop"):
        compat.crop_cache(full, 5)


class _Tok:
    def __init__(self, shape):
        self.shape = shape

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        ids = [1, 2, 3]
        return {"list": ids, "batched": [ids], "tensor": torch.tensor([ids]),
                "encoding": {"input_ids": ids, "attention_mask": [1, 1, 1]}}[self.shape]


@pytest.mark.parametrize("shape", ["list", "batched", "tensor", "encoding"])
def test_chat_template_ids_is_a_list_of_ints(shape):
    ids = compat.chat_template_ids(_Tok(shape), [{"role": "user", "content": "hi"}])
    assert ids == [1, 2, 3] and all(type(i) is int for i in ids)


def test_cache_append_and_row_selection():
    cache = compat.new_cache()
    k = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).view(2, 1, 3, 4)  # [batch, kv_heads, positions, head_dim]
    keys, values = compat.cache_append(cache, k, -k, 0)
    assert torch.equal(keys, k) and compat.cache_length(cache) == 3
    keys, _ = compat.cache_append(cache, k[..., :1, :], -k[..., :1, :], 0)
    assert keys.shape == (2, 1, 4, 4)
    compat.select_cache_rows(cache, torch.tensor([1]))
    assert torch.equal(cache.layers[0].keys[0, :, :3], k[1]) and cache.layers[0].keys.shape[0] == 1
