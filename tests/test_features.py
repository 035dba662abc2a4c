"""The loop hands feature drafters the target's features of exactly the tokens it committed."""
import inspect

import pytest
import torch

from verispec import SpeculativeGenerator
from verispec.drafters.base import DraftContext, Drafter
from verispec.engine.tree import TokenTree

from conftest import ScriptedDrafter, hf_greedy


def features_passed(args, kwargs):
    """The `features` observe() got, whether the loop passed it by position or by name."""
    return inspect.signature(Drafter.observe).bind(None, *args, **kwargs).arguments.get("features")


class FeatureRecorder(ScriptedDrafter):
    needs_features = True

    def begin(self, prompt):
        self.seen = []

    def observe(self, *args, **kwargs):
        self.seen.append(features_passed(args, kwargs))


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
    drafter.observe = lambda *a, **kw: seen.append(features_passed(a, kw))
    out = SpeculativeGenerator(tiny, drafter).generate(prompt, max_new_tokens=8)
    assert len(seen) == out.stats.target_passes and all(f is None for f in seen)
    # the same drafter asking for features gets them through the same call
    drafter.needs_features = True
    SpeculativeGenerator(tiny, drafter).generate(prompt, max_new_tokens=8)
    assert seen[-1] is not None and seen[-1].shape[-1] == tiny.model.config.hidden_size


def test_features_stop_at_a_stop_token_inside_the_accepted_path(tiny):
    """A stop token among the accepted drafts ends the output there: features come for the
    committed tokens but the newest (the stop token), none for drafts after it."""
    prompt = [5, 17, 3, 44, 9, 21]
    full = hf_greedy(tiny, prompt, 20)
    at = next(i for i in range(3, len(full)) if full[i] not in full[:i])  # its first occurrence: mid-path
    stop = full[at]
    ref = hf_greedy(tiny, prompt, 20, eos=stop)
    drafter = FeatureRecorder(full, len(prompt), k=6, correct=6, vocab=96)  # all right: the stop is mid-path
    out = SpeculativeGenerator(tiny, drafter).generate(prompt, max_new_tokens=20, stop_token_ids=[stop])
    assert out.token_ids == ref and out.token_ids[-1] == stop and len(ref) == at + 1 < len(full)
    tokens = prompt + out.token_ids
    got = torch.cat(drafter.seen)
    assert got.shape[0] == len(tokens) - 1
    torch.testing.assert_close(got, reference_features(tiny, tokens)[:-1], atol=1e-4, rtol=1e-4)
