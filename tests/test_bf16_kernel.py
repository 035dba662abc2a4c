"""verispec's bf16 CPU kernel (kernels/bf16_linear.cpp, cpu_linear.Bf16Linear): the products of
nn.Linear up to bf16 rounding, row-invariant bit for bit (exact mode's premise), the same
Parameters, a fallback under gradients, and exact mode's identities on a model that runs on it."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from verispec import SpeculativeGenerator, kernels
from verispec.cpu_linear import Bf16Linear
from verispec.engine.tree import TokenTree
from conftest import tiny_llama, tiny_qwen2
from test_exact import decode_rows, path_to, tree_rows

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not kernels.cpu_supports_bf16_kernel(), reason="not an AVX2 x86 CPU")]


@pytest.fixture(scope="module")
def op():
    compiled = kernels.bf16_linear()
    assert compiled is not None, "an AVX2 CPU with a C++ compiler must build the kernel"
    return compiled


def _weights(n: int, k: int, seed: int = 0, bias: bool = True):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    return w, b, gen


# odd sizes on purpose: K not a multiple of the 8 lanes, N not of any weight tile (8, 5, 3)
@pytest.mark.parametrize("n,k", [(37, 45), (64, 128), (200, 8), (3, 7), (1, 300)])
@pytest.mark.parametrize("bias", [True, False])
def test_products_match_a_float64_reference_to_bf16_rounding(op, n, k, bias):
    w, b, gen = _weights(n, k, bias=bias)
    x = torch.randn(11, k, generator=gen).bfloat16()
    got = op(x, w, b)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == torch.bfloat16 and got.shape == (11, n)
    # float32 accumulation then one rounding: within a bf16 ulp of the exact value, plus float32 noise
    torch.testing.assert_close(got.double(), want, rtol=2 ** -8, atol=1e-5 * k)


@pytest.mark.parametrize("n,k", [(37, 45), (96, 136), (151, 64)])
def test_every_row_is_bit_identical_to_its_one_row_product(op, n, k):
    w, b, gen = _weights(n, k, seed=1)
    x = torch.randn(20, k, generator=gen).bfloat16()
    alone = torch.cat([op(x[r:r + 1], w, b) for r in range(20)])
    for m in range(1, 21):  # every tiling: 1 and 2 rows have tiles of their own, then 4 + remainder
        assert torch.equal(op(x[:m], w, b), alone[:m]), f"{m} rows"


def test_leading_dimensions_and_strided_inputs(op):
    w, b, gen = _weights(24, 40, seed=2)
    x = torch.randn(2, 3, 80, generator=gen).bfloat16()[..., ::2]  # not contiguous
    got = op(x, w, b)
    assert got.shape == (2, 3, 24)
    assert torch.equal(got, op(x.contiguous().reshape(6, 40), w, b).reshape(2, 3, 24))


def test_a_mismatched_input_is_refused(op):
    w, b, _ = _weights(8, 16)
    with pytest.raises(RuntimeError, match="does not match the weight"):
        op(torch.zeros(2, 15, dtype=torch.bfloat16), w, b)


def test_the_module_shares_parameters_and_falls_back_under_gradients(op):
    linear = torch.nn.Linear(40, 24).bfloat16()
    module = Bf16Linear(linear.weight, linear.bias)
    assert module.weight is linear.weight and module.bias is linear.bias
    x = torch.randn(3, 40).bfloat16()
    with torch.inference_mode():
        assert torch.equal(module(x), op(x, linear.weight, linear.bias))
    x.requires_grad_(True)
    module(x).float().sum().backward()  # the plain product: it has a gradient
    assert linear.weight.grad is not None and x.grad is not None


def _on_kernel(make, seed: int):
    lm = make(vocab=96, layers=3, hidden=128, seed=seed)
    lm.model.to(torch.bfloat16)
    swaps = {m: Bf16Linear(m.weight, m.bias) for m in lm.model.modules() if type(m) is torch.nn.Linear}
    from verispec.layers import swap_modules

    swap_modules(lm.model, swaps)
    assert swaps and all(type(m) is not torch.nn.Linear for m in lm.model.modules())
    return lm


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_exact_mode_on_the_kernel_keeps_every_pass_row_identical_to_decoding(op, make):
    target = _on_kernel(make, seed=11)
    rng = random.Random(3)
    ctx = [rng.randrange(96) for _ in range(130)]
    prompt, chain = ctx[:119], ctx[119:]
    chain_tree = TokenTree(tuple(chain), tuple(range(-1, len(chain) - 1)))
    assert torch.equal(tree_rows(target.model, True, prompt, chain_tree), decode_rows(target.model, True, prompt, chain))
    parents = (-1, 0, 1, 2, 3, 4, 5, 0, 7, 8, 2, 10)
    tree = TokenTree(tuple(rng.randrange(96) for _ in parents), parents)
    together = tree_rows(target.model, True, prompt, tree)
    for node in range(len(parents)):
        assert torch.equal(together[node], decode_rows(target.model, True, prompt, path_to(tree, node))[-1]), node


def test_speculative_output_on_the_kernel_equals_exact_ar(op):
    from verispec.draft_init import layer_subset

    target = _on_kernel(tiny_llama, seed=5)
    draft = layer_subset(target, [0, 1])
    ar = SpeculativeGenerator(target, method="ar", exact=True)
    rng = random.Random(9)
    accepted = 0
    for method, options in (("draft-model", {"k": 4, "draft": draft}), ("prompt-lookup", {})):
        spec = SpeculativeGenerator(target, method=method, exact=True, **options)
        for _ in range(4):
            phrase = [rng.randrange(96) for _ in range(6)]
            prompt = [t for _ in range(4) for t in phrase + [rng.randrange(96)]]
            got = spec.generate(prompt, max_new_tokens=32)
            assert got.token_ids == ar.generate(prompt, max_new_tokens=32).token_ids
            accepted += got.stats.accepted_tokens
    assert accepted > 0  # multi-row passes verified drafts


def test_a_failed_build_warns_once_with_the_fix_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension as builder

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(builder, "load", no_compiler)
    kernels.bf16_linear.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="Install a C\\+\\+ compiler"):
            assert kernels.bf16_linear() is None
        linear = torch.nn.Linear(16, 8).bfloat16().requires_grad_(False)
        x = torch.randn(3, 16).bfloat16()
        assert torch.equal(Bf16Linear(linear.weight, linear.bias)(x), F.linear(x, linear.weight, linear.bias))
    finally:
        kernels.bf16_linear.cache_clear()  # the next caller builds (or loads) the real one again
