"""Draft heads over part of the vocabulary (verispec.vocab_subset): the first n ids and the special
ones score as the full head scores them, every other id gets -inf, the model the copy came from
is untouched, and drafting with such a head stays lossless (the target verifies every token)."""
from __future__ import annotations

import random

import pytest
import torch

from verispec import SpeculativeGenerator
from verispec.drafters.base import DraftContext
from verispec.drafters.draft_model import DraftModel
from verispec.engine.sampling import SamplingConfig
from verispec.quantize import Int4Linear, quantized_copy
from verispec.vocab_subset import ALIGN, SubsetHead, subset_ids, vocab_subset_copy
from conftest import tiny_llama, tiny_qwen2

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 160


def _prompt(seed: int, n: int = 24) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


def test_the_ids_are_the_first_n_the_end_tokens_and_a_tiled_count():
    lm = tiny_llama(vocab=VOCAB)
    lm.model.generation_config.eos_token_id = 150  # an end token far past the first ids
    ids = subset_ids(lm, 40).tolist()
    assert ids == sorted(ids) and len(ids) % ALIGN == 0
    assert set(range(40)) <= set(ids) and 150 in ids
    assert len(ids) == ALIGN  # 40 + the end token, filled up with the next ids
    with pytest.raises(ValueError, match="positive"):
        subset_ids(lm, 0)


def test_the_subset_head_scores_its_ids_as_the_full_head_and_no_other():
    lm = tiny_llama(vocab=VOCAB, hidden=64, seed=3)
    copy = vocab_subset_copy(lm, 40)
    ids = subset_ids(lm, 40)
    assert isinstance(copy.model.get_output_embeddings(), SubsetHead)
    prompt = torch.tensor([_prompt(1)])
    with torch.inference_mode():
        full, part = lm.model(prompt).logits[0], copy.model(prompt).logits[0]
    assert full.shape == part.shape
    torch.testing.assert_close(part[:, ids], full[:, ids])
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(part[:, outside]).all()


def test_the_copy_leaves_the_model_it_came_from_and_shares_its_other_weights():
    lm = tiny_qwen2(vocab=VOCAB, hidden=64, seed=4)
    head = lm.model.get_output_embeddings()
    copy = vocab_subset_copy(lm, 40)
    assert lm.model.get_output_embeddings() is head and isinstance(head, torch.nn.Linear)
    embed, copy_embed = lm.model.get_input_embeddings().weight, copy.model.get_input_embeddings().weight
    assert copy_embed.data_ptr() == embed.data_ptr()
    assert copy.model.model.layers[0].mlp.up_proj.weight.data_ptr() == lm.model.model.layers[0].mlp.up_proj.weight.data_ptr()
    assert vocab_subset_copy(lm, VOCAB) is lm  # the whole vocabulary: nothing to restrict


@pytest.mark.parametrize("order", ["subset, then int4", "int4, then subset"])
def test_an_int4_draft_gets_an_int4_subset_head_either_way(order):
    lm = tiny_llama(vocab=VOCAB, hidden=64, seed=5)
    if order == "subset, then int4":
        draft = quantized_copy(vocab_subset_copy(lm, 40), "int4")
    else:
        draft = vocab_subset_copy(quantized_copy(lm, "int4"), 40)
    head = draft.model.get_output_embeddings()
    assert isinstance(head, SubsetHead) and isinstance(head.head, Int4Linear)
    ids = subset_ids(lm, 40)
    whole = quantized_copy(lm, "int4")
    for n in (4, 24):  # under FULL_ROWS rows: the int4 kernel; from it on, the kept original rows
        prompt = torch.tensor([_prompt(2, n)])
        with torch.inference_mode():
            part, int4 = draft.model(prompt).logits[0], whole.model(prompt).logits[0]
        # the same int4 scheme over the same rows: what the whole int4 head gives there, up to bf16 rounding
        torch.testing.assert_close(part[:, ids], int4[:, ids], atol=0.05, rtol=0.02)


def test_drafts_come_from_the_subset_and_the_output_is_the_targets():
    target = tiny_llama(vocab=VOCAB, layers=2, seed=6)
    draft = tiny_llama(vocab=VOCAB, layers=1, seed=7)
    prompt = _prompt(3)
    drafter = DraftModel(target, draft=draft, k=6, min_confidence=0.0, draft_vocab=40)
    ids = set(subset_ids(draft, 40).tolist())
    drafter.begin(prompt)
    tree = drafter.propose(DraftContext(prompt, 6, SamplingConfig(), None))
    assert tree.num_drafted == 6 and set(tree.tokens[1:]) <= ids
    for seed in range(3):
        p = _prompt(10 + seed)
        ref = SpeculativeGenerator(target, method="ar").generate(p, max_new_tokens=24).token_ids
        out = SpeculativeGenerator(target, method="draft-model", draft=draft, k=4, draft_vocab=40,
                                   min_confidence=0.0).generate(p, max_new_tokens=24)
        assert out.token_ids == ref
