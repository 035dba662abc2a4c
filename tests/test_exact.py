"""Exact mode (verispec.engine.exact): in bfloat16, a verification pass over n tokens gives each row
bit for bit what a one-token pass gives, so every lossless method's output is exact-mode
ar's. Tiny random Llama and Qwen2 models in bfloat16; the real models: test_real_model.py."""
from __future__ import annotations

import math
import random

import pytest
import torch

from verispec import SpeculativeGenerator
from verispec.engine.target import CachedLM
from verispec.engine.tree import TokenTree
from conftest import tiny_llama, tiny_qwen2

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96


def bf16(lm):
    lm.model.to(torch.bfloat16)
    return lm


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def target(request):
    # head_dim 32 and 3 layers: wide enough that multi-row attention rounds differently
    make = tiny_llama if request.param == "llama" else tiny_qwen2
    return bf16(make(vocab=VOCAB, layers=3, hidden=128, seed=11))


def context(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


def decode_rows(model, exact: bool, prompt: list[int], path: list[int]) -> torch.Tensor:
    """Logits after each token of `path`, one token per pass (the prompt prefilled first)."""
    lm = CachedLM(model, exact=exact)
    lm.extend(prompt)
    rows = []
    for token in path:
        rows.append(lm.forward_tree(TokenTree((token,), (-1,)))[0])
        lm.commit([0])
    return torch.stack(rows)


def tree_rows(model, exact: bool, prompt: list[int], tree: TokenTree) -> torch.Tensor:
    lm = CachedLM(model, exact=exact)
    lm.extend(prompt)  # the same prefill pass as decode_rows': only the tree pass differs
    return lm.forward_tree(tree)


def path_to(tree: TokenTree, node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(tree.tokens[node])
        node = tree.parents[node]
    return path[::-1]


CHAIN_CASES = [(seed, length, n) for seed, length, n in ((1, 30, 4), (2, 120, 8), (3, 200, 12), (4, 64, 2))]


@pytest.mark.parametrize("seed,length,n", CHAIN_CASES)
def test_a_chain_pass_is_bit_identical_to_one_token_passes(target, seed, length, n):
    ctx = context(seed, length + n)
    prompt, chain = ctx[:length - 1], ctx[length - 1:]
    one_by_one = decode_rows(target.model, True, prompt, chain)
    together = tree_rows(target.model, True, prompt, TokenTree(tuple(chain), tuple(range(-1, len(chain) - 1))))
    assert torch.equal(together, one_by_one)


TREES = [
    (-1, 0, 0, 1, 1, 2, 3),  # 0; 1 2; 3 4 under 1, 5 under 2; 6 under 3
    (-1, 0, 1, 2, 3, 4, 5, 0, 7, 8, 2, 10),  # a 7-long main chain (more than a call's rows), two side branches
]


@pytest.mark.parametrize("parents", TREES)
def test_a_tree_pass_is_bit_identical_to_decoding_each_path(target, parents):
    ctx = context(7, 150)
    prompt = ctx[:-1]
    tree = TokenTree(tuple(context(8, len(parents))), parents)
    together = tree_rows(target.model, True, prompt, tree)
    for node in range(len(parents)):
        rows = decode_rows(target.model, True, prompt, path_to(tree, node))
        assert torch.equal(together[node], rows[-1]), f"node {node}"


def test_without_exact_mode_the_rows_do_differ(target):
    """What exact mode removes: the same passes with the model's own attention round
    differently from one-token passes (else the tests above would prove nothing)."""
    differs = 0
    for seed, length, n in CHAIN_CASES:
        ctx = context(seed, length + n)
        prompt, chain = ctx[:length - 1], ctx[length - 1:]
        one_by_one = decode_rows(target.model, False, prompt, chain)
        together = tree_rows(target.model, False, prompt, TokenTree(tuple(chain), tuple(range(-1, len(chain) - 1))))
        differs += not torch.equal(together, one_by_one)
    assert differs > 0


def test_exact_ar_is_one_token_decoding_of_the_same_model(target):
    """exact-mode ar prefills the prompt in one pass (the model's own attention, as generate()
    does), then runs one token per pass with the exact attention: float32 scores for one query
    row, the grouped-query heads mapped as the model maps them. Teacher-forced along
    generate()'s own output, its logits stay within two bf16 ulps of the model's own decoding
    (a wrong head mapping is three or more), and it makes generate()'s choice at every
    row whose top-2 margin is wider than twice the two rows' largest difference (no deviation
    that size can flip it). Near ties are not asserted: a random model's logits are nearly
    flat, one bf16 ulp apart or tied (on AVX2 CPUs, prompt 0's second token is an exact tie
    in generate()'s logits), and there the two faithful computations may choose differently."""
    clear_rows = total = 0
    for seed in range(4):
        prompt = context(21 + seed, 60)
        out = SpeculativeGenerator(target, method="ar", exact=True).generate(prompt, max_new_tokens=24)
        assert out.stats.target_passes == 24  # one token a pass
        with torch.inference_mode():
            ref = target.model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):]
        path = ref.tolist()
        exact_rows = decode_rows(target.model, True, prompt, path).float()
        own_rows = decode_rows(target.model, False, prompt, path).float()
        diff = (exact_rows - own_rows).abs().amax(dim=-1)  # per row
        scale = float(own_rows.abs().max())
        assert diff.max() <= 2 * 2.0 ** (math.floor(math.log2(scale)) - 7)  # two bf16 ulps of the largest logit
        top2 = own_rows.topk(2, dim=-1).values
        clear = top2[:, 0] - top2[:, 1] > 2 * diff
        assert torch.equal(exact_rows.argmax(-1)[clear], own_rows.argmax(-1)[clear]), f"prompt {seed}"
        # Free-running: row j chooses token j + 1, so up to the first near tie the outputs agree.
        first_tie = int((~clear).nonzero()[0]) if not clear.all() else len(path)
        assert out.token_ids[:first_tie + 1] == path[:first_tie + 1], f"prompt {seed}"
        clear_rows += int(clear.sum())
        total += len(path)
    assert clear_rows >= total // 2, (clear_rows, total)  # the assertions above covered most rows
    assert target.model.config._attn_implementation == "sdpa"  # exact mode is set per pass, then undone


def test_the_first_pass_prefills_like_generate_then_verifies_row_by_row(target):
    """With a prompt pending, the prompt and the root go through the model's own attention, as in
    model.generate(); the drafts below the root, row by row: each equals a one-token pass."""
    prompt, chain = context(40, 50), context(41, 5)
    lm = CachedLM(target.model, exact=True)
    rows = lm.forward_tree(TokenTree((prompt[-1], *chain), tuple(range(-1, len(chain)))), prompt[:-1])
    with torch.inference_mode():
        whole = target.model(torch.tensor([prompt])).logits[0, -1]
    assert torch.equal(rows[0], whole)  # the root's row is the prefill's last row
    lm.commit(list(range(len(chain) + 1)))
    ref = CachedLM(target.model, exact=True)  # the model's own prefill, then exact one-token passes
    ref.extend(prompt)
    one_by_one = []
    for token in chain:
        one_by_one.append(ref.forward_tree(TokenTree((token,), (-1,)))[0])
        ref.commit([0])
    assert torch.equal(rows[1:], torch.stack(one_by_one))
    assert lm.cached_len == ref.cached_len == len(prompt) + len(chain)


@pytest.fixture(scope="module")
def draft(target):
    """Two of the target's three layers: it agrees with the target often, not always."""
    from verispec.draft_init import layer_subset

    return layer_subset(target, [0, 1])


def repetitive(seed: int) -> list[int]:
    rng = random.Random(seed)
    phrase = [rng.randrange(VOCAB) for _ in range(6)]
    return [t for _ in range(4) for t in phrase + [rng.randrange(VOCAB)]]


@pytest.mark.parametrize("method,options", [
    ("prompt-lookup", {}), ("prompt-lookup", {"tree_width": 3}), ("draft-model", {"k": 4}),
    ("draft-model", {"tree": "dynamic", "budget": 12}), ("recycling", {}), ("lookahead", {}), ("eagle", {}),
])
def test_every_lossless_method_equals_exact_ar_in_bfloat16(target, draft, method, options, tmp_path_factory):
    if method == "draft-model":
        options = {**options, "draft": draft}
    if method == "eagle":  # an untrained EAGLE-3 head: the features of the first (prefill) pass feed it
        from test_export import eagle3_dir

        options = {"drafter": str(eagle3_dir(target, tmp_path_factory.mktemp("eagle3"), draft_vocab=None))}
    ar = SpeculativeGenerator(target, method="ar", exact=True)
    spec = SpeculativeGenerator(target, method=method, exact=True, **options)
    drafted = 0
    for seed in range(10):
        prompt = repetitive(seed) if seed % 2 else context(100 + seed, 40)
        want = ar.generate(prompt, max_new_tokens=32).token_ids
        got = spec.generate(prompt, max_new_tokens=32)
        assert got.token_ids == want, f"prompt {seed}"
        drafted += got.stats.drafted_tokens if method == "eagle" else got.stats.accepted_tokens
    assert drafted > 0  # multi-row passes were exercised (and drafts accepted, but by the untrained head)


def test_exact_auto_is_on_for_half_precision_on_the_cpu_only(target):
    """The default, exact="auto": on for this bfloat16 target; off in float32; True/False as given."""
    from verispec.engine.exact import resolve

    assert SpeculativeGenerator(target, method="ar").exact is True
    assert resolve("auto", tiny_llama(vocab=VOCAB).model) is False  # float32
    assert SpeculativeGenerator(target, method="ar", exact=False).exact is False
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        SpeculativeGenerator(target, method="ar", exact="yes")
    # and by default a speculative method's bf16 output is exact ar's
    prompt = repetitive(3)
    want = SpeculativeGenerator(target, method="ar").generate(prompt, max_new_tokens=24).token_ids
    assert SpeculativeGenerator(target, method="prompt-lookup").generate(prompt, max_new_tokens=24).token_ids == want


def test_one_row_linears_compute_as_rows_of_many_row_products():
    """Where this machine's one-row bf16 product takes another kernel (oneDNN's GEMV on
    avx512_bf16/AMX CPUs), exact passes compute it as a row of a two-row product; elsewhere the
    one-row product already is one. Either way, inside exact mode, row 0 alone equals row 0 of
    a product over more rows (a reduction over 4096 like an MLP's down projection, where the
    kernels' orders differ)."""
    from verispec.engine.exact import row_invariant_linears

    gen = torch.Generator().manual_seed(3)
    layer = torch.nn.Linear(4096, 256, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(256, 4096, generator=gen) / 64)
    model = torch.nn.Sequential(layer)
    for trial in range(8):
        x = torch.randn(1, 6, 4096, generator=gen).to(torch.bfloat16)
        with torch.no_grad(), row_invariant_linears(model):
            alone = model(x[:, :1])
            together = model(x)
        assert alone.shape == (1, 1, 256)
        assert torch.equal(alone[0, 0], together[0, 0]), f"trial {trial}"


def test_a_one_row_pass_under_a_mask_is_a_decode_call():
    """A single draft below the first root is verified in a one-row pass that carries a mask.
    transformers' sdpa then packs a grouped-query row into a multi-row call (its GQA path
    without a mask-free kernel), which rounds differently from the decode call: exact attention
    computes it as its decode call on the keys it sees."""
    from verispec.engine.exact import exact_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Attention(torch.nn.Module):  # what sdpa reads of a Qwen2 attention layer
        num_key_value_groups = 6
        is_causal = True

    gen = torch.Generator().manual_seed(4)
    differ = 0
    for keys in (300, 700):
        for _ in range(4):
            q = torch.randn(1, 12, 1, 128, generator=gen).to(torch.bfloat16)
            k, v = (torch.randn(1, 2, keys, 128, generator=gen).to(torch.bfloat16) for _ in range(2))
            mask = torch.zeros(1, 1, 1, keys, dtype=torch.bfloat16)  # every key visible
            decode, _ = exact_attention(Attention(), q, k, v, None, scaling=128 ** -0.5)
            masked, _ = exact_attention(Attention(), q, k, v, mask, scaling=128 ** -0.5)
            assert torch.equal(masked, decode)
            own_decode, _ = sdpa_attention_forward(Attention(), q, k, v, None, scaling=128 ** -0.5)
            own_masked, _ = sdpa_attention_forward(Attention(), q, k, v, mask, scaling=128 ** -0.5)
            assert torch.allclose(decode.float(), own_decode.float(), atol=0.02)  # the same attention
            differ += not torch.equal(own_masked, own_decode)
    assert differ, "the model's own masked call no longer differs: this test would not see the bug"
