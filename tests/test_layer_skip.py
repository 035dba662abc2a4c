"""Layer-skip self-speculation: the weight-sharing skip view, greedy equality, sampling
losslessness, the calibration search and its file (identity checks), the CLI hook."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from verispec import SamplingConfig, SpeculativeGenerator
from verispec import calibrate
from verispec.draft_init import layer_subset
from verispec.drafters.layer_skip import LayerSkip, skip_layers_view
from verispec.engine.sampling import probabilities
from conftest import TinyLM, hf_greedy, tiny_llama
from stat_power import ALPHA, draws_for_power, pooled_chisquare, slipped_pair

PROMPTS = [[5, 17, 33, 2, 8, 61, 5, 17], [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3], [42], [9, 9, 9, 9, 10, 11, 9, 9]]


@pytest.fixture(scope="module")
def deep() -> TinyLM:
    return tiny_llama(layers=5, seed=2)


def test_view_shares_the_targets_weights_and_leaves_it_intact(deep):
    before = [p.clone() for p in deep.model.parameters()]
    layers_before = list(deep.model.model.layers)
    view = skip_layers_view(deep.model, [1, 3])
    assert len(view.model.layers) == 3 and view.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in view.model.layers] == [0, 1, 2]  # its own cache indices
    assert view.model.layers[1].mlp.up_proj.weight is deep.model.model.layers[2].mlp.up_proj.weight
    assert view.model.embed_tokens.weight is deep.model.model.embed_tokens.weight
    assert view.lm_head.weight is deep.model.lm_head.weight
    assert not any(p.is_meta for p in view.parameters()) and not any(b.is_meta for b in view.buffers())
    assert list(deep.model.model.layers) == layers_before and deep.model.config.num_hidden_layers == 5
    assert all(torch.equal(a, b) for a, b in zip(before, deep.model.parameters()))


def test_view_computes_what_the_kept_layers_compute(deep):
    """Same logits as a real copy of the model with only those layers (draft_init.layer_subset)."""
    view = skip_layers_view(deep.model, [0, 2])
    copy = layer_subset(deep, [1, 3, 4]).model
    ids = torch.tensor([PROMPTS[1]])
    with torch.inference_mode():
        torch.testing.assert_close(view(input_ids=ids).logits, copy(input_ids=ids).logits)


def test_view_of_gemma3_keeps_the_layer_types():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                              max_position_embeddings=128, attn_implementation="sdpa",
                              layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(config).eval()
    lm = TinyLM(model)
    view = skip_layers_view(model, [0])
    assert view.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    copy = layer_subset(lm, [1, 2, 3]).model
    ids = torch.tensor([[(7 * i + 3) % 64 for i in range(12)]])
    with torch.inference_mode():
        torch.testing.assert_close(view(input_ids=ids).logits, copy(input_ids=ids).logits)
    prompt = ids[0].tolist()
    ref = hf_greedy(lm, prompt, 24)
    assert SpeculativeGenerator(lm, method="layer-skip", skip=[0], k=3).generate(prompt, max_new_tokens=24).token_ids == ref


@pytest.mark.parametrize("options", [
    dict(skip=[1, 3], k=4),
    dict(skip=[0], k=3, threshold=0.6),
    dict(skip=[], k=5),  # skipping nothing: the target drafts for itself
    dict(skip=[0, 1, 2, 3], k=2),
    dict(skip=[2], tree=[[0], [1], [0, 0], [0, 1], [0, 0, 0]]),
    dict(skip=[4], tree="dynamic", depth=3, top_k=2, budget=6),
])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_generate(deep, prompt, options):
    ref = hf_greedy(deep, prompt, 40)
    out = SpeculativeGenerator(deep, method="layer-skip", **options).generate(prompt, max_new_tokens=40)
    assert out.token_ids == ref


def test_skipping_nothing_accepts_everything(deep):
    out = SpeculativeGenerator(deep, method="layer-skip", skip=[], k=4).generate(PROMPTS[0], max_new_tokens=25)
    assert out.stats.accept_lengths == [5] * 5


def test_threshold_stops_drafting_early(deep):
    full = SpeculativeGenerator(deep, method="layer-skip", skip=[2], k=6).generate(PROMPTS[0], max_new_tokens=30)
    assert full.stats.drafted_per_position[5] > 0
    never_sure = SpeculativeGenerator(deep, method="layer-skip", skip=[2], k=6, threshold=1.0)
    out = never_sure.generate(PROMPTS[0], max_new_tokens=30)
    assert out.token_ids == full.token_ids
    assert len(out.stats.drafted_per_position) == 1  # every chain stopped after its first token


@pytest.mark.parametrize("bad,match", [
    (dict(skip=[5]), "skip must name layers"),
    (dict(skip=[0, 1, 2, 3, 4]), "keep at least one"),
    (dict(skip=["a"]), "skip must be"),
    (dict(skip=3), "skip must be"),
    (dict(skip=[1], threshold=1.5), "threshold"),
    (dict(skip=[1], k=0), "k"),
])
def test_bad_options(deep, bad, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeGenerator(deep, method="layer-skip", **bad)


@pytest.mark.parametrize("options", [dict(skip=[1], k=2), dict(skip=[0], k=3, threshold=0.5)])
def test_sampling_matches_target_joint_distribution(options):
    target = tiny_llama(vocab=6, layers=3, seed=3)
    prompt = [1, 2, 3]
    sampling = SamplingConfig(temperature=1.0)
    with torch.inference_mode():
        p1 = probabilities(target.model(torch.tensor([prompt])).logits[0, -1], sampling)
        batch = torch.cat([torch.tensor([prompt]).expand(6, -1), torch.arange(6)[:, None]], 1)
        p2 = probabilities(target.model(batch).logits[:, -1], sampling)
    exact = p1[:, None] * p2
    gen = SpeculativeGenerator(target, method="layer-skip", **options)
    counts = torch.zeros(6, 6)
    # enough draws to catch a second token verified against the wrong context (stat_power)
    for seed in range(draws_for_power(exact, slipped_pair(exact))):
        out = gen.generate(prompt, max_new_tokens=2, temperature=1.0, seed=seed)
        counts[out.token_ids[0], out.token_ids[1]] += 1
    assert pooled_chisquare(counts, exact) > ALPHA


# --- calibration ---

def test_replay_on_plain_lists():
    match = [True, True, False, True, True, True, False, True]
    conf = [0.9, 0.8, 0.7, 0.9, 0.2, 0.9, 0.9, 0.9]
    # k=3, no threshold: steps accept 2 (+1), then 2 of [T,T,T] at t=3 -> ... replay by hand:
    # t=0: T,T,F -> 2 accepted, 3 drafted, emit 3 -> t=3; t=3: T,T,T -> 3, emit 4 -> t=7; t=7: T -> 1 (end), emit 1
    assert calibrate.replay([(match, conf)], k=3, threshold=0.0) == (8, 3, 7, 6)
    # threshold 0.5: t=3 stops after the unsure 0.2 (accepted) token: 2 accepted, emit 3 -> t=6; t=6: F (sure) -> 2 drafted
    assert calibrate.replay([(match, conf)], k=3, threshold=0.5) == (8, 4, 8, 5)


def test_calibration_finds_a_set_and_the_drafter_uses_it(deep, tmp_path):
    record = calibrate.calibrate_layer_skip(deep, prompts=PROMPTS[:3], minutes=1.0, max_new_tokens=12, max_evals=6,
                                            progress=False)
    assert record["model"] == "tiny" and record["num_layers"] == 5 and 1 <= len(record["kept"]) <= 5
    assert record["search"]["evaluations"] <= 6 and record["k"] in calibrate.K_GRID
    path = calibrate.save_calibration(record, tmp_path / "tiny.json")
    drafter = LayerSkip(deep, skip=str(path))
    assert drafter.skip == record["skip"] and drafter.k == record["k"] and drafter.threshold == record["threshold"]
    assert LayerSkip(deep, skip=path, k=2, threshold=0.1).k == 2  # explicit options win over the file's
    ref = hf_greedy(deep, PROMPTS[0], 30)
    out = SpeculativeGenerator(deep, method="layer-skip", skip=str(path)).generate(PROMPTS[0], max_new_tokens=30)
    assert out.token_ids == ref


def fake_record(lm, skip=(1,)) -> dict:
    return {"format": calibrate.FORMAT, "method": "layer-skip", **calibrate.model_identity(lm), "skip": list(skip),
            "k": 3, "threshold": 0.0}


def test_a_calibration_of_another_model_is_refused(deep, tmp_path):
    other_config = tiny_llama(layers=4, seed=2)  # another architecture, same name
    path = calibrate.save_calibration(fake_record(other_config), tmp_path / "other.json")
    with pytest.raises(ValueError, match="was made for model 'tiny'.*calibrate this model"):
        LayerSkip(deep, skip=str(path))
    renamed = TinyLM(deep.model, name="another")  # same architecture, another model
    path = calibrate.save_calibration(fake_record(renamed), tmp_path / "renamed.json")
    with pytest.raises(ValueError, match="was made for model 'another'"):
        LayerSkip(deep, skip=str(path))
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LayerSkip(deep, skip=str(tmp_path / "junk.json"))
    with pytest.raises(ValueError, match="does not exist"):
        LayerSkip(deep, skip=str(tmp_path / "missing.json"))


def test_config_hash_ignores_dtype_and_backend(deep):
    import copy

    config = copy.deepcopy(deep.model.config)
    config.dtype = torch.bfloat16
    config._attn_implementation = "eager"
    assert calibrate.config_hash(config) == calibrate.config_hash(deep.model.config)
    config.num_hidden_layers = 4
    assert calibrate.config_hash(config) != calibrate.config_hash(deep.model.config)


def test_default_calibration_file(deep, tmp_path, monkeypatch):
    monkeypatch.setenv("VERISPEC_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="verispec calibrate --model tiny --method layer-skip"):
        LayerSkip(deep)
    path = calibrate.default_calibration_path(deep)
    assert path == tmp_path / "calibration" / "layer-skip" / "tiny.json"
    calibrate.save_calibration(fake_record(deep, skip=[2, 3]), path)
    assert LayerSkip(deep).skip == [2, 3]


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"turns": ["a question", "a follow-up"]}) + "\n"
                                      + json.dumps({"prompt": "plain"}) + "\n")
    assert calibrate.read_prompts([str(tmp_path / "p.txt"), str(tmp_path / "p.jsonl"), "literal text"]) == [
        "first prompt", "second prompt", "a question", "plain", "literal text"]
    (tmp_path / "bad.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        calibrate.read_prompts([str(tmp_path / "bad.jsonl")])


@pytest.mark.real  # the real tokenizer
def test_cli_calibrates_a_model_directory(tmp_path, monkeypatch, real_model_dir):
    """`verispec calibrate` end to end on a tiny model saved with a real tokenizer."""
    from transformers import AutoTokenizer

    smol_dir = real_model_dir
    tiny = tiny_llama(vocab=49152, hidden=32, layers=3, seed=4)
    tiny.model.save_pretrained(tmp_path / "tiny-smol")
    AutoTokenizer.from_pretrained(smol_dir).save_pretrained(tmp_path / "tiny-smol")
    monkeypatch.setenv("VERISPEC_HOME", str(tmp_path / "home"))
    parser = argparse.ArgumentParser()
    calibrate.add_parser(parser.add_subparsers(dest="command"))
    model = str(tmp_path / "tiny-smol")
    args = parser.parse_args(["calibrate", "--model", model, "--method", "layer-skip", "--minutes", "0.05",
                              "--max-new-tokens", "8", "--prompts", "Hello there", "Count to five", "--dtype", "float32"])
    assert args.func(args) == 0
    path = calibrate.default_calibration_path(model)
    record = json.loads(path.read_text())
    assert record["model"] == model and record["search"]["prompts"] == 2 and record["search"]["custom_prompts"]
    out = tmp_path / "explicit.json"
    args = parser.parse_args(["calibrate", "--model", model, "--minutes", "0.02", "--max-new-tokens", "8",
                              "--out", str(out), "--dtype", "float32"])
    assert args.func(args) == 0 and json.loads(out.read_text())["skip"]


# --- the real model ---

@pytest.mark.real
def test_real_model_greedy_equals_generate(smol):  # smol: the shared model check_real_greedy uses
    from test_real_model import check_real_greedy

    # over one token per target pass: some drafts were accepted
    assert check_real_greedy("layer-skip", skip=[12, 13, 14, 15, 17], k=4, threshold=0.5) > 1.0
