"""oneDNN packed float32 linears (verispec.cpu_linear): the same products as nn.Linear, the same
Parameters, a fallback wherever the packed path does not apply (gradients, another dtype), a
weight changed in place packed again, and a packed model decoding as the unpacked one does."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from verispec import SpeculativeGenerator
from verispec import cpu_linear
from verispec.cpu_linear import PackedLinear, pack_linears
from verispec.quantize import quantized_copy
from conftest import hf_greedy, tiny_llama, tiny_qwen2

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not cpu_linear.available(), reason="this torch has no oneDNN packed linear")]


def _linear(n: int = 48, k: int = 40, bias: bool = True) -> torch.nn.Linear:
    torch.manual_seed(0)
    layer = torch.nn.Linear(k, n, bias=bias).eval().requires_grad_(False)
    if bias:
        torch.nn.init.normal_(layer.bias)
    return layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 40), (5, 40), (1, 7, 40), (2, 3, 40)])
def test_packed_products_match_the_linear(bias, shape):
    linear = _linear(bias=bias)
    packed = PackedLinear(linear.weight, linear.bias)
    assert packed.weight is linear.weight and packed.bias is linear.bias  # shared, not copied
    x = torch.randn(shape)
    with torch.inference_mode():
        out = packed(x)
    assert out.shape == (*shape[:-1], 48)
    torch.testing.assert_close(out, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
    assert packed._packed is not None  # the packed path ran, not the fallback


def test_gradients_take_the_plain_product():
    linear = _linear().requires_grad_(True)
    packed = PackedLinear(linear.weight, linear.bias)
    x = torch.randn(3, 40, requires_grad=True)
    packed(x).sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    F.linear(reference, linear.weight.detach(), linear.bias.detach()).sum().backward()
    assert linear.weight.grad is not None
    torch.testing.assert_close(x.grad, reference.grad)


def test_weight_changed_in_place_is_packed_again():
    linear = _linear()
    packed = PackedLinear(linear.weight, linear.bias)
    x = torch.randn(4, 40)
    before = packed(x)
    with torch.no_grad():
        linear.weight.mul_(2.0)  # an optimizer step changes the Parameter in place
    after = packed(x)
    torch.testing.assert_close(after, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def test_other_dtypes_fall_back():
    linear = _linear()
    packed = PackedLinear(linear.weight, linear.bias)
    packed.to(torch.bfloat16)
    x = torch.randn(2, 40, dtype=torch.bfloat16)
    assert torch.equal(packed(x), F.linear(x, packed.weight, packed.bias))


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_packed_model_decodes_as_the_unpacked_one(make):
    plain = make()
    lm = make()
    assert pack_linears(lm.model) == sum(isinstance(m, torch.nn.Linear) for m in plain.model.modules())
    prompt = list(range(3, 40))
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(torch.tensor([prompt])).logits,
                                   plain.model(torch.tensor([prompt])).logits, rtol=1e-4, atol=1e-4)
    reference = hf_greedy(plain, prompt, 24)
    assert hf_greedy(lm, prompt, 24) == reference
    out = SpeculativeGenerator(lm, method="draft-model", draft=make(), k=4).generate(prompt, max_new_tokens=24)
    assert out.token_ids == reference


def test_copies_stay_packed_with_tied_weights_kept():
    lm = tiny_llama()
    lm.model.lm_head.weight = lm.model.model.embed_tokens.weight  # tied, as in Qwen2.5-0.5B/1.5B
    pack_linears(lm.model)
    twin = copy.deepcopy(lm.model)
    assert isinstance(twin.lm_head, PackedLinear) and twin.lm_head._packed is not lm.model.lm_head._packed
    assert twin.lm_head.weight is twin.model.embed_tokens.weight
    assert twin.lm_head.weight is not lm.model.lm_head.weight
    prompt = torch.tensor([list(range(5, 20))])
    with torch.inference_mode():
        torch.testing.assert_close(twin(prompt).logits, lm.model(prompt).logits, rtol=1e-4, atol=1e-4)


def test_quantized_copy_of_a_packed_model():
    lm = tiny_llama()
    pack_linears(lm.model)
    q = quantized_copy(lm, "int4")
    assert not any(isinstance(m, PackedLinear) for m in q.model.modules())
    prompt = list(range(3, 30))
    out = SpeculativeGenerator(lm, method="draft-model", draft=q, k=4).generate(prompt, max_new_tokens=16)
    assert out.token_ids == hf_greedy(lm, prompt, 16)


def test_load_model_swaps_float32_and_kernel_bf16_cpu_models_only():
    assert cpu_linear.pays(torch.float32, torch.device("cpu"))
    # bf16: verispec's kernel exactly where oneDNN has no bf16 path and the kernel builds
    assert cpu_linear.pays(torch.bfloat16, torch.device("cpu")) == cpu_linear.bf16_kernel_pays()
    assert not cpu_linear.pays(torch.float16, torch.device("cpu"))
    assert not cpu_linear.pays(torch.float32, torch.device("meta"))
    assert not cpu_linear.pays(torch.bfloat16, torch.device("meta"))


def test_a_layer_made_in_inference_mode_packs():
    with torch.inference_mode():
        linear = _linear()
        packed = PackedLinear(linear.weight, linear.bias)
        x = torch.randn(3, 40)
        torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
