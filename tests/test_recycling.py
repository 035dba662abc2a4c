"""`recycling` (Token Recycling): the adjacency matrix and its update, the static tree drafted
from it, greedy equality with transformers' generate, the sampled distribution."""
from __future__ import annotations

import pytest
import torch

import verispec.drafters.recycling  # noqa: F401  (registers the method)
from verispec import SpeculativeGenerator
from verispec.acceptance.base import Verdict
from verispec.config import SamplingConfig
from verispec.drafters.base import DraftContext, make_drafter
from verispec.drafters.recycling import EMPTY, default_tree
from verispec.drafters.tree_growth import static_shape
from verispec.engine.sampling import probabilities
from verispec.engine.tree import TokenTree
from conftest import hf_greedy, tiny_llama
from stat_power import ALPHA, draws_for_power, pooled_chisquare, slipped_pair

PROMPTS = [[5, 17, 33, 2, 8, 61, 5, 17], [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3], [42], [9, 9, 9, 9, 10, 11, 9, 9]]
V = 96


def ctx(tokens, max_depth=10):
    return DraftContext(list(tokens), max_depth, SamplingConfig(), None)


def logits_ranking(rows: list[list[int]], vocab: int = V) -> torch.Tensor:
    """Logits [len(rows), vocab] whose top tokens are each row's tokens, in that order."""
    out = torch.zeros(len(rows), vocab)
    for i, row in enumerate(rows):
        for rank, tok in enumerate(row):
            out[i, tok] = 100.0 - rank
    return out


def paths(tree: TokenTree) -> set[tuple[int, ...]]:
    return {tuple(tree.tokens[i] for i in tree.path_to(n)[1:]) for n in range(1, len(tree))}


def test_default_tree_shape():
    tree = default_tree()
    parents, ranks = static_shape(tree)  # a valid shape: every path's parent path is in it
    depths = [len(p) for p in tree]
    assert len(tree) == 64 and max(depths) == 6 and max(ranks) == 7
    assert [0] * 6 in tree and [[r] for r in range(8)] == [p for p in tree if len(p) == 1]
    assert len(default_tree(nodes=20, depth=3, k=4)) == 20 and max(map(len, default_tree(20, 3, 4))) <= 3


def test_adjacency_update_takes_top_k_at_every_node():
    drafter = make_drafter("recycling", tiny_llama(), k=3, warm_start=False)
    assert (drafter.adjacency == EMPTY).all() and drafter.adjacency.shape == (V, 3)
    tree = TokenTree((10, 11, 12, 13), (-1, 0, 0, 2))
    logits = logits_ranking([[1, 2, 3], [4, 5, 6], [7, 8, 9], [20, 21, 22]])
    drafter.observe(tree, logits, Verdict([2, 3], 20, "bonus"), [12, 13, 20])
    assert drafter.adjacency[[10, 11, 12, 13]].tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [20, 21, 22]]
    assert (drafter.adjacency[14:] == EMPTY).all()
    # new rows overwrite old ones
    drafter.observe(TokenTree((10,), (-1,)), logits_ranking([[30, 31, 32]]), Verdict([], 30, "target"), [30])
    assert drafter.adjacency[10].tolist() == [30, 31, 32] and drafter.adjacency[11].tolist() == [4, 5, 6]


def test_token_at_several_nodes_keeps_the_accepted_paths_row():
    drafter = make_drafter("recycling", tiny_llama(), k=2, warm_start=False)
    tree = TokenTree((10, 7, 8, 7, 9), (-1, 0, 0, 2, 1))  # token 7 at nodes 1 and 3
    logits = logits_ranking([[1, 2], [3, 4], [5, 6], [40, 41], [50, 51]])
    drafter.observe(tree, logits, Verdict([1], 3, "recovered"), [7, 3])  # node 1 is on the accepted path
    assert drafter.adjacency[7].tolist() == [3, 4]
    drafter.observe(tree, logits, Verdict([2, 3], 40, "bonus"), [8, 7, 40])  # now node 3 is
    assert drafter.adjacency[7].tolist() == [40, 41]


def test_k_larger_than_the_vocabulary_leaves_the_rest_empty():
    drafter = make_drafter("recycling", tiny_llama(vocab=6), k=8, tree=[[0], [1]], warm_start=False)
    drafter.observe(TokenTree((1,), (-1,)), torch.randn(1, 6), Verdict([], 0, "target"), [0])
    assert (drafter.adjacency[1, :6] != EMPTY).all() and (drafter.adjacency[1, 6:] == EMPTY).all()


def test_tree_follows_ranks_and_skips_tokens_without_successors():
    shape = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [2, 0], [0, 0, 0]]
    drafter = make_drafter("recycling", tiny_llama(), k=3, tree=shape, warm_start=False)
    assert drafter.propose(ctx([3, 10])).tokens == (10,)  # an empty matrix drafts nothing
    drafter.adjacency[10] = torch.tensor([20, 21, 22])
    drafter.adjacency[20] = torch.tensor([30, 31, 32])
    drafter.adjacency[30] = torch.tensor([40, EMPTY, EMPTY])
    drafter.adjacency[22] = torch.tensor([EMPTY, EMPTY, EMPTY])
    tree = drafter.propose(ctx([3, 10]))
    # 21 and 22 have no row: [1, 0] and [2, 0] are dropped; [0, 0, 0] = 20 -> 30 -> 40
    assert paths(tree) == {(20,), (21,), (22,), (20, 30), (20, 31), (20, 30, 40)}
    assert tree.tokens[0] == 10 and all(p < i for i, p in enumerate(tree.parents) if i)
    shallow = drafter.propose(ctx([3, 10], max_depth=1))
    assert paths(shallow) == {(20,), (21,), (22,)}
    assert drafter.propose(ctx([3, 10], max_depth=0)).tokens == (10,)


def test_a_gap_in_a_row_drops_that_rank_only():
    drafter = make_drafter("recycling", tiny_llama(), k=3, tree=[[0], [1], [2], [1, 0]], warm_start=False)
    drafter.adjacency[10] = torch.tensor([20, EMPTY, 22])
    assert paths(drafter.propose(ctx([10]))) == {(20,), (22,)}


def test_warm_start_fills_empty_rows_from_the_prompt():
    drafter = make_drafter("recycling", tiny_llama(), k=2)
    drafter.adjacency[5] = torch.tensor([60, 61])  # a row from the target is kept
    drafter.begin([1, 2, 5, 3, 1, 4, 5])
    assert drafter.adjacency[1].tolist() == [4, EMPTY]  # the latest successor wins
    assert drafter.adjacency[2].tolist() == [5, EMPTY] and drafter.adjacency[3].tolist() == [1, EMPTY]
    assert drafter.adjacency[4].tolist() == [5, EMPTY] and drafter.adjacency[5].tolist() == [60, 61]
    assert (drafter.adjacency[6:] == EMPTY).all()
    cold = make_drafter("recycling", tiny_llama(), k=2, warm_start=False)
    cold.begin([1, 2, 5, 3])
    assert (cold.adjacency == EMPTY).all()


def test_persist_keeps_or_resets_the_matrix_between_generations():
    for persist in (True, False):
        drafter = make_drafter("recycling", tiny_llama(), k=2, warm_start=False, persist=persist)
        drafter.adjacency[7] = torch.tensor([1, 2])
        drafter.begin([3, 4])
        assert (drafter.adjacency[7].tolist() == [1, 2]) == persist


def test_bad_options():
    with pytest.raises(ValueError, match="rank 3"):
        make_drafter("recycling", tiny_llama(), k=2, tree=[[0], [3]])
    with pytest.raises(ValueError, match="k >= 1"):
        make_drafter("recycling", tiny_llama(), k=0)


@pytest.mark.parametrize("options", [{}, {"k": 2, "tree": [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]},
                                     {"warm_start": False, "persist": False}])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_output_equals_hf_generate(tiny, prompt, options):
    ref = hf_greedy(tiny, prompt, 48)
    out = SpeculativeGenerator(tiny, method="recycling", **options).generate(prompt, max_new_tokens=48)
    assert out.token_ids == ref


def test_reused_generator_keeps_greedy_output_and_accepts_drafts(tiny):
    gen = SpeculativeGenerator(tiny, method="recycling")
    passes = tokens = 0
    for prompt in PROMPTS * 2:  # the matrix carries over from prompt to prompt
        out = gen.generate(prompt, max_new_tokens=40)
        assert out.token_ids == hf_greedy(tiny, prompt, 40)
        passes, tokens = passes + out.stats.target_passes, tokens + out.stats.new_tokens
    assert tokens / passes > 2


def test_stops_at_eos_inside_a_tree(tiny):
    prompt = PROMPTS[1]
    full = hf_greedy(tiny, prompt, 40)
    eos = full[12]
    ref = hf_greedy(tiny, prompt, 40, eos=eos)
    out = SpeculativeGenerator(tiny, method="recycling").generate(prompt, max_new_tokens=40, stop_token_ids=[eos])
    assert out.token_ids == ref


def test_sampling_matches_target_joint_distribution():
    """Sibling drafts are deterministic (one-hot q): the output must still follow p exactly."""
    target = tiny_llama(vocab=6, seed=3)
    prompt, sampling = [1, 2, 3], SamplingConfig(temperature=1.0)
    with torch.inference_mode():
        p1 = probabilities(target.model(torch.tensor([prompt])).logits[0, -1], sampling)
        batch = torch.cat([torch.tensor([prompt]).expand(6, -1), torch.arange(6)[:, None]], 1)
        p2 = probabilities(target.model(batch).logits[:, -1], sampling)  # [6, 6]
    exact = (p1[:, None] * p2).flatten()
    gen = SpeculativeGenerator(target, method="recycling", k=3, tree=[[0], [1], [2], [0, 0], [1, 0]])
    counts = torch.zeros(36)
    # enough draws to catch a second token verified against the wrong context (stat_power)
    for seed in range(draws_for_power(exact, slipped_pair(exact.view(6, 6)))):
        out = gen.generate(prompt, max_new_tokens=2, temperature=1.0, seed=seed)
        counts[out.token_ids[0] * 6 + out.token_ids[1]] += 1
    assert len(gen.drafter.propose(DraftContext(prompt, 1, sampling, None))) == 4  # three siblings by now
    assert pooled_chisquare(counts, exact) > ALPHA


# --- the real model -------------------------------------------------------------------------

@pytest.mark.real
def test_real_model_greedy_equals_generate(smol):  # smol: the shared model check_real_greedy uses
    from test_real_model import check_real_greedy

    assert check_real_greedy("recycling") > 1.3
