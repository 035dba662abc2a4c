"""TokenTree bookkeeping, tree target passes and KV-cache commit against fresh prefills."""
from __future__ import annotations

import pytest
import torch

from verispec.engine.target import CachedLM
from verispec.engine.tree import TokenTree


def test_chain_shape():
    t = TokenTree.chain(7, [1, 2, 3])
    assert t.parents == (-1, 0, 1, 2) and t.depths == (0, 1, 2, 3) and t.is_chain
    assert t.num_drafted == 3 and t.leaf_paths() == [[0, 1, 2, 3]]
    assert torch.equal(t.ancestor_mask(), torch.tril(torch.ones(4, 4, dtype=torch.bool)))


def test_tree_shape_and_mask():
    #      0
    #    1   2
    #   3 4    5
    t = TokenTree((10, 11, 12, 13, 14, 15), (-1, 0, 0, 1, 1, 2))
    assert not t.is_chain
    assert t.depths == (0, 1, 1, 2, 2, 2)
    assert t.children[0] == (1, 2) and t.children[1] == (3, 4)
    assert t.path_to(4) == [0, 1, 4]
    assert t.leaf_paths() == [[0, 1, 3], [0, 1, 4], [0, 2, 5]]
    mask = t.ancestor_mask()
    assert mask[4].tolist() == [True, True, False, False, True, False]
    assert mask[5].tolist() == [True, False, True, False, False, True]


@pytest.mark.parametrize("parents", [(0,), (-1, 1), (-1, 0, 3, 1), (1, -1)])
def test_invalid_parents_rejected(parents):
    with pytest.raises(ValueError):
        TokenTree(tuple(range(len(parents))), parents)


def fresh_logits(lm, tokens: list[int]) -> torch.Tensor:
    """Logits of a plain, cache-free pass over tokens [len, vocab]."""
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([tokens])).logits[0]


def test_tree_pass_matches_plain_pass_per_node(tiny):
    lm = CachedLM(tiny.model)
    context = [3, 14, 15, 92, 65, 35]
    tree = TokenTree((context[-1], 11, 12, 13, 14, 15, 16), (-1, 0, 0, 1, 1, 2, 5))
    lm.extend(context[:-1])
    logits = lm.forward_tree(tree)
    for node in range(len(tree)):
        path_tokens = [tree.tokens[i] for i in tree.path_to(node)]
        expected = fresh_logits(tiny, context[:-1] + path_tokens)[-1]
        torch.testing.assert_close(logits[node], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("accepted", [[], [1], [2, 5], [1, 4], [1, 3]])
def test_tree_commit_equals_fresh_prefill_over_rounds(tiny, accepted):
    """Commit a path, then run another tree round on top; both rounds must match plain passes."""
    lm = CachedLM(tiny.model)
    tokens = [3, 14, 15, 92, 65, 35]
    lm.extend(tokens[:-1])
    tree = TokenTree((tokens[-1], 11, 12, 13, 14, 15), (-1, 0, 0, 1, 1, 2))
    for _ in range(3):
        lm.forward_tree(tree)
        lm.commit([0, *accepted])
        tokens = tokens + [tree.tokens[i] for i in accepted] + [7]  # 7: the step's own token
        assert lm.cached_len == len(tokens) - 1
        logits = lm.forward_tree(TokenTree.chain(tokens[-1]))
        torch.testing.assert_close(logits[-1], fresh_logits(tiny, tokens)[-1], atol=1e-4, rtol=1e-4)
        lm.commit([0])
        tokens.append(9)  # the cache again holds all but the last token
        tree = TokenTree((tokens[-1], *tree.tokens[1:]), tree.parents)


@pytest.mark.parametrize("n_accept", [0, 1, 3, 4])
def test_chain_commit_equals_fresh_prefill(tiny, n_accept):
    lm = CachedLM(tiny.model)
    tokens = [1, 2, 3, 4, 5]
    lm.extend(tokens[:-1])
    drafts = [20, 21, 22, 23]
    lm.forward_tree(TokenTree.chain(tokens[-1], drafts))
    lm.commit(list(range(n_accept + 1)))
    tokens = tokens + drafts[:n_accept] + [40]
    assert lm.cached_len == len(tokens) - 1
    logits = lm.forward_tree(TokenTree.chain(tokens[-1]))
    torch.testing.assert_close(logits[-1], fresh_logits(tiny, tokens)[-1], atol=1e-4, rtol=1e-4)


def check_tree_then_commit(lm_holder, cache: CachedLM, context, tree, logits, accepted, own, follow):
    """Every node's logits equal a plain pass over its path; after committing `accepted` plus the
    step's own token, a chain of `follow` tokens on top equals a plain pass too."""
    for node in range(len(tree)):
        path = [tree.tokens[i] for i in tree.path_to(node)]
        torch.testing.assert_close(logits[node], fresh_logits(lm_holder, context[:-1] + path)[-1], atol=1e-4, rtol=1e-4)
    cache.commit([0, *accepted])
    tokens = context + [tree.tokens[i] for i in accepted] + [own]
    after = cache.forward_tree(TokenTree.chain(tokens[-1], follow))
    torch.testing.assert_close(after, fresh_logits(lm_holder, tokens + follow)[-len(follow) - 1:], atol=1e-4, rtol=1e-4)


def tiny_gemma3(sliding_window: int = 4):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(5)
    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=sliding_window, max_position_embeddings=128,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], attn_implementation="sdpa",
    )
    return Gemma3ForCausalLM(config).float().eval()


@pytest.mark.parametrize("context_len", [3, 9])  # inside and beyond the sliding window of 4
def test_gemma3_tree_pass_and_commit_respect_the_sliding_window(context_len):
    class LM:
        model = tiny_gemma3()

    lm = CachedLM(LM.model)
    context = [(7 * i + 3) % 64 for i in range(context_len)]
    tree = TokenTree((context[-1], 11, 12, 13, 14, 15), (-1, 0, 0, 1, 1, 4))
    lm.extend(context[:-1])
    check_tree_then_commit(LM, lm, context, tree, lm.forward_tree(tree), accepted=[1, 4], own=30, follow=[31, 32])


def test_unchecked_architecture_refuses_trees():
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = CachedLM(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval())
    lm.extend([1, 2])
    with pytest.raises(NotImplementedError, match="use a chain draft"):
        lm.forward_tree(TokenTree((3, 4, 5), (-1, 0, 0)))


def test_auxiliary_nodes_ride_along_without_touching_the_tree(tiny):
    """Aux nodes (e.g. a Lookahead window) get their own logits; tree rows and the committed cache are unchanged."""
    context = [3, 14, 15, 92, 65, 35]
    # aux chain 40 -> 41 continues after the root at positions +1, +2 and sees the root
    aux_visible = torch.tensor([[True, False, False, True, False], [True, False, False, True, True]])
    tree = TokenTree((context[-1], 11, 12), (-1, 0, 0), aux_tokens=(40, 41), aux_positions=(1, 2), aux_visible=aux_visible)
    lm = CachedLM(tiny.model)
    lm.extend(context[:-1])
    logits = lm.forward_tree(tree)
    assert logits.shape[0] == 5
    for node in range(3):
        path = [tree.tokens[i] for i in tree.path_to(node)]
        torch.testing.assert_close(logits[node], fresh_logits(tiny, context[:-1] + path)[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[3:], fresh_logits(tiny, context + [40, 41])[-2:], atol=1e-4, rtol=1e-4)
    lm.commit([0, 2])
    tokens = context + [12, 50]
    after = lm.forward_tree(TokenTree.chain(tokens[-1]))
    torch.testing.assert_close(after[-1], fresh_logits(tiny, tokens)[-1], atol=1e-4, rtol=1e-4)


def test_aux_shape_is_checked():
    with pytest.raises(ValueError, match="auxiliary"):
        TokenTree((1, 2), (-1, 0), aux_tokens=(3,), aux_positions=(1,), aux_visible=torch.ones(1, 2, dtype=torch.bool))


@pytest.mark.parametrize("chain", [True, False])
def test_pending_context_goes_through_with_the_tree(tiny, chain):
    """The first step folds the uncached prompt into the tree pass; logits are the tree's only."""
    context = [3, 14, 15, 92, 65, 35]
    lm = CachedLM(tiny.model)
    lm.extend(context[:2])
    tree = TokenTree.chain(context[-1], [11, 12]) if chain else TokenTree((context[-1], 11, 12, 13), (-1, 0, 0, 1))
    logits = lm.forward_tree(tree, pending=context[2:-1])
    assert logits.shape[0] == len(tree)
    for node in range(len(tree)):
        path = [tree.tokens[i] for i in tree.path_to(node)]
        torch.testing.assert_close(logits[node], fresh_logits(tiny, context[:-1] + path)[-1], atol=1e-4, rtol=1e-4)
    lm.commit([0, 1])
    assert lm.cached_len == len(context) + 1


@pytest.mark.parametrize("pending", [False, True])
def test_qwen2_tree_pass_matches_plain_pass_per_node(pending):
    """Qwen2 (the realistic target's architecture) through the 4D-mask path: every node's
    logits equal a plain pass over its path, with and without an uncached prompt in the pass."""
    from conftest import tiny_qwen2

    qwen = tiny_qwen2()
    lm = CachedLM(qwen.model)
    context = [3, 14, 15, 92, 65, 35]
    tree = TokenTree((context[-1], 11, 12, 13, 14, 15, 16), (-1, 0, 0, 1, 1, 2, 5))
    if pending:
        lm.extend(context[:2])
        logits = lm.forward_tree(tree, pending=context[2:-1])
    else:
        lm.extend(context[:-1])
        logits = lm.forward_tree(tree)
    check_tree_then_commit(qwen, lm, context, tree, logits, accepted=[1, 3], own=40, follow=[41, 42])
