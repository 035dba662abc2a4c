"""Weight-only quantized drafts (verispec.quantize): int4 / int8 linear layers that compute what
their dequantized weights would, a copy that leaves the model it came from untouched, and
drafting with them lossless (the target verifies every token)."""
from __future__ import annotations

import random

import pytest
import torch

from verispec import SpeculativeGenerator, kernels, quantize
from verispec.draft_init import load_draft
from verispec.quantize import FULL_ROWS, Int4Linear, Int8Linear, quantize_model, quantized_copy
from conftest import tiny_llama, tiny_qwen2

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96


def _linear(n: int, k: int, dtype: torch.dtype, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=gen) / k ** 0.5)
        if bias:
            layer.bias.copy_(torch.randn(n, generator=gen))
    return layer.to(dtype)


def _int4_reference(weight: torch.Tensor) -> torch.Tensor:
    """The int4 scheme written out: per row and group of 32 inputs, 16 levels from the group's
    minimum to its maximum, each weight rounded to the nearest level."""
    w = weight.float().reshape(weight.shape[0], -1, 32)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    step = (high - low) / 15
    return (low + torch.round((w - low) / step) * step).reshape(weight.shape)


def _backends() -> list:
    """The CPU int4 products: torch's kernel everywhere, verispec's where it builds (AVX2)."""
    ours = pytest.param("verispec", marks=pytest.mark.skipif(
        kernels.int4_linear() is None, reason="verispec's int4 kernel needs an AVX2 CPU and a C++ compiler"))
    return ["torch", ours]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 9])
@pytest.mark.parametrize("shape", [(64, 256), (40, 96)])
def test_int4_kernels_compute_the_product_of_the_quantized_weights(backend, rows, shape):
    """Each CPU kernel against a float product with the quantized weights computed independently:
    equal up to the activations' rounding (torch's: to bf16; verispec's: to int8 per group of 32).
    (40, 96): an output count no tile divides, three groups."""
    n, k = shape
    if backend == "torch" and n % 16:
        pytest.skip("torch's packed layout tiles outputs by 16")
    layer = _linear(n, k, torch.bfloat16)
    q = Int4Linear(layer, backend=backend)
    assert q.backend == backend
    assert (q.codes if backend == "verispec" else q.packed) is not None  # only the kernel's own layout kept
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    want = x.float() @ _int4_reference(layer.weight).t() + layer.bias.float()
    got = q(x).float()
    assert got.shape == want.shape and torch.allclose(got, want, atol=0.05, rtol=0.02)
    assert torch.allclose(q.dequantized().float(), _int4_reference(layer.weight), atol=0.01, rtol=0.01)


@pytest.mark.skipif(kernels.int4_linear() is None, reason="verispec's int4 kernel needs an AVX2 CPU and a C++ compiler")
def test_verispec_int4_kernel_rounds_only_the_activations():
    """Its one approximation is the int8 rounding of the inputs per group of 32: inputs that are
    already exact int8 multiples of their group's scale give the float product of the dequantized
    weights (float32 accumulation), and a 3-D float32 input keeps its shape and dtype."""
    layer = _linear(48, 64, torch.float32, bias=False, seed=3)
    q = Int4Linear(layer, backend="verispec")
    levels = torch.randint(-127, 128, (2, 3, 64)).float()
    levels[..., 0], levels[..., 32] = 127, -127  # each group's largest magnitude: its scale is exactly 1/127 of it
    x = levels * 0.25
    got = q(x)
    assert got.shape == (2, 3, 48) and got.dtype == torch.float32
    want = x.double() @ q.dequantized().double().t()
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="does not match"):
        kernels.int4_linear()(torch.randn(1, 32), q.codes, q.scale, q.zero)


@pytest.mark.parametrize("make", [Int4Linear, Int8Linear])
def test_quantized_weights_stay_near_the_original_ones(make):
    """4 bits per weight in groups of 32 (scale and offset per group), or 8 bits with a scale per
    output channel: the dequantized weight is within half a step of the original."""
    layer = _linear(48, 128, torch.float32)
    q = make(layer)
    x = torch.randn(5, 128)
    err = (q(x) - layer(x)).abs().max()
    scale = layer(x).abs().max()
    assert err < (0.2 if make is Int4Linear else 0.02) * scale
    assert err > 0  # it is quantized, not the same weights
    if make is Int4Linear:
        step = (q.dequantized() - layer.weight).abs().max()
        w = layer.weight.reshape(48, -1, 32)
        assert step <= ((w.amax(-1) - w.amin(-1)) / 15).max() / 2 + 1e-6


def test_a_float32_layer_computes_its_int4_products_in_bfloat16():
    """Torch's kernel takes bf16 activations: a float32 layer's result is the bf16 one, in float32."""
    layer = _linear(32, 64, torch.float32, seed=1)
    q = Int4Linear(layer, backend="torch")
    x = torch.randn(3, 64)
    y = q(x)
    assert y.dtype == torch.float32
    want = x.bfloat16().float() @ q.dequantized().float().t() + layer.bias
    assert torch.allclose(y, want, atol=0.03, rtol=0.02)


def test_quantized_copy_leaves_the_original_and_its_tied_embeddings_alone():
    lm = tiny_qwen2(vocab=VOCAB, hidden=64)
    lm.model.config.tie_word_embeddings = True
    lm.model.lm_head.weight = lm.model.model.embed_tokens.weight  # tied, as Qwen2.5-0.5B's are
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    copy = quantized_copy(lm, "int4")
    assert copy.model is not lm.model and copy.name == "tiny-qwen2[int4]"
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert isinstance(lm.model.lm_head, torch.nn.Linear)
    assert isinstance(copy.model.lm_head, Int4Linear)
    assert copy.model.model.embed_tokens.weight is lm.model.model.embed_tokens.weight  # shared, not copied
    assert copy.model.model.norm.weight is lm.model.model.norm.weight
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight  # the original still ties them
    linears = [m for m in copy.model.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears  # every projection and the head quantized
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        a, b = lm.model(ids).logits, copy.model(ids).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.5  # a close model, not the same one


@pytest.mark.parametrize("make", [Int4Linear, Int8Linear])
def test_a_prefill_sized_pass_uses_the_kept_weight_and_a_draft_step_the_quantized_one(make):
    """keep_full: from FULL_ROWS rows on (a prompt), the product is the original layer's, bit for
    bit; below (drafting), the quantized weights', which differ from it."""
    layer = _linear(64, 256, torch.bfloat16)
    kept, lean = make(layer, keep_full=True), make(layer)
    assert kept.full.data_ptr() == layer.weight.data_ptr() and lean.full is None  # shared, not copied
    with torch.inference_mode():
        many = torch.randn(FULL_ROWS, 256, dtype=torch.bfloat16)
        assert torch.equal(kept(many), layer(many))
        assert not torch.equal(lean(many), layer(many))
        few = many[: FULL_ROWS - 1]
        assert torch.equal(kept(few), lean(few)) and not torch.equal(kept(few), layer(few))


def test_a_quantized_copy_prefills_with_the_originals_weights():
    """The copy's layers keep the original's weights (no copy): a prompt-length pass is the
    original model's pass, while one-token steps are the quantized model's."""
    lm = tiny_qwen2(vocab=VOCAB, hidden=64)
    copy = quantized_copy(lm, "int4")
    layers = [m for m in copy.model.modules() if isinstance(m, Int4Linear)]
    assert layers and all(m.full is not None for m in layers)
    assert copy.model.lm_head.full.data_ptr() == lm.model.lm_head.weight.data_ptr()
    prompt = torch.arange(FULL_ROWS + 3).unsqueeze(0) % VOCAB
    with torch.inference_mode():
        assert torch.equal(copy.model(prompt).logits, lm.model(prompt).logits)
        step = prompt[:, :1]
        assert not torch.equal(copy.model(step).logits, lm.model(step).logits)
        assert all(m.full is None for m in quantized_copy(lm, "int4", keep_full=False).model.modules()
                   if isinstance(m, Int4Linear))


def test_layers_the_kernel_cannot_tile_keep_their_weights():
    model = torch.nn.Sequential(_linear(64, 256, torch.bfloat16), _linear(16, 64, torch.bfloat16),
                                _linear(10, 48, torch.bfloat16))
    # 48 inputs: not whole groups of 32; 10 outputs: not a multiple of 16, which only torch's layout needs
    tiled = quantize.int4_backend(torch.device("cpu")) != "torch"
    assert quantize_model(model, "int4") == 2
    assert isinstance(model[0], Int4Linear) and isinstance(model[2], torch.nn.Linear)
    assert type(quantize.quantized_linear(_linear(10, 64, torch.bfloat16), "int4")) is (
        Int4Linear if tiled else torch.nn.Linear)


def test_draft_specs_name_quantized_copies():
    lm = tiny_llama(vocab=VOCAB, layers=3, hidden=64)
    assert load_draft("int4", lm).name == "tiny[int4]"
    subset = load_draft("int8:layers:0,2", lm)
    assert subset.name == "tiny[layers 0,2][int8]" and len(subset.model.model.layers) == 2
    with pytest.raises(ValueError, match="int4, int8"):
        quantized_copy(lm, "int3")


def _prompts():
    rng = random.Random(5)
    for seed in range(6):
        phrase = [rng.randrange(VOCAB) for _ in range(5)]
        yield [t for _ in range(3) for t in phrase + [rng.randrange(VOCAB)]] if seed % 2 else \
            [rng.randrange(VOCAB) for _ in range(30)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{"k": 4}, {"k": "auto"}, {"tree": "dynamic", "budget": 10}])
def test_the_targets_int4_copy_drafts_losslessly(dtype, options):
    """draft="int4": the target's own quantized copy drafts; the output is ar's (float32: greedy
    decoding; bf16: exact-mode ar), and the copy agrees with the target well above chance
    (1 in 96; 4 bits of a random Gaussian weight keep less than a real model's do)."""
    target = tiny_llama(vocab=VOCAB, layers=3, hidden=128, seed=4)
    target.model.to(dtype)
    ar = SpeculativeGenerator(target, method="ar")
    spec = SpeculativeGenerator(target, method="draft-model", draft="int4", **options)
    per_pass = []
    for prompt in _prompts():
        want = ar.generate(prompt, max_new_tokens=24).token_ids
        got = spec.generate(prompt, max_new_tokens=24)
        assert got.token_ids == want
        per_pass.append(got.stats.mean_accepted_tokens)
    if options.get("k") != "auto":  # auto drafts little here: on a tiny model the draft costs what the target does
        assert sum(per_pass) / len(per_pass) > 1.3  # tokens per target pass (ar: 1)


def test_a_quantized_draft_is_not_passed_to_vllm_as_its_originals_directory():
    """The copy's config still names the directory it was loaded from; vLLM would load the
    unquantized weights from there, so the vLLM peer refuses it instead."""
    from verispec.bench.vllm_peer import model_path

    copy = quantized_copy(tiny_llama(vocab=VOCAB), "int8")
    with pytest.raises(ValueError, match="quantized copy"):
        model_path(copy, "the draft")
