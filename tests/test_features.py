"""The loop hands feature drafters the target's features of exactly the tokens it committed."""
import torch

from verispec import SpeculativeGenerator
from verispec.drafters.base import DraftContext
from verispec.engine.tree import TokenTree

from conftest import ScriptedDrafter, hf_greedy


class FeatureRecorder(ScriptedDrafter):
    needs_features = True

    def begin(self, prompt):
        self.seen = []

    def observe(self, tree, target_logits, verdict, new_tokens, features=None):
        self.seen.append(features)


def reference_features(lm, tokens):
    with torch.no_grad():
        return lm.model.model(input_ids=torch.tensor([tokens])).last_hidden_state[0]


def test_features_of_committed_tokens_match_a_fresh_pass(tiny):
    prompt = [5, 17, 3, 44, 9, 21]
    ref = hf_greedy(tiny, prompt, 20)
    drafter = FeatureRecorder(ref, len(prompt), k=4, correct=2, vocab=96)
    out = SpeculativeGenerator(tiny, drafter).generate(prompt, max_new_tokens=20)
    assert out.token_ids == ref
    got = torch.cat(drafter.seen)
    tokens = prompt + out.token_ids
    # every committed token but the newest has its feature, in order
    assert got.shape[0] == len(tokens) - 1
    torch.testing.assert_close(got, reference_features(tiny, tokens)[:-1], atol=1e-4, rtol=1e-4)
    # and the features are what the head reads: the head over them gives the target's logits
    logits = tiny.model.lm_head(got)
    assert logits.argmax(-1)[len(prompt) - 1:].tolist() == out.token_ids[: got.shape[0] - len(prompt) + 1]


def test_plain_drafters_get_no_features(tiny):
    prompt = [1, 2, 3]
    ref = hf_greedy(tiny, prompt, 8)
    drafter = ScriptedDrafter(ref, len(prompt), k=3, correct=3, vocab=96)
    seen = []
    drafter.observe = lambda *a, features=None: seen.append(features)
    SpeculativeGenerator(tiny, drafter).generate(prompt, max_new_tokens=8)
    assert seen and all(f is None for f in seen)
