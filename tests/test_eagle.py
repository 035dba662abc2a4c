"""EAGLE: the head, its drafter (lossless with every tree kind), its vLLM layout, training."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from verispec import SamplingConfig, SpeculativeGenerator
from verispec.datastore import tokenizer_identity
from verispec.heads.eagle import EagleHead, head_config, load_eagle, save_eagle
from verispec.training.data import write_dataset
from verispec.training.eagle_train import EagleSettings, EagleTask, evaluate
from verispec.training.trainer import TrainConfig, train
from conftest import check_typical_acceptance, exact_next_two, hf_greedy, tiny_llama
from stat_power import ALPHA, draws_for_power, pooled_chisquare, slipped_pair

TREES = [dict(tree="dynamic", depth=4, top_k=3, budget=10), dict(tree="chain", k=4),
         dict(tree=[[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])]


def fresh_head_dir(lm, path, seed=0):
    torch.manual_seed(seed)
    head = EagleHead(head_config(lm.model.config))
    return save_eagle(head, path, tokenizer_identity(lm))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """The tiny target's own greedy continuations of random prompts, with its features. A one-layer
    target: a one-layer head can learn it from this little data (a deeper random target needs far more)."""
    lm = tiny_llama(layers=1)
    g = torch.Generator().manual_seed(0)
    seqs, lens = [], []
    for i in range(48):
        prompt = torch.randint(0, 96, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        seqs.append(prompt + hf_greedy(lm, prompt, 40))
        lens.append(len(prompt))
    prompts = [s[:n] for s, n in zip(seqs, lens)]
    return lm, write_dataset(lm, tmp_path_factory.mktemp("data"), seqs, lens, chunk_size=16), prompts


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    lm, data, prompts = tiny_data
    out = tmp_path_factory.mktemp("eagle")
    report = train(EagleTask(lm, EagleSettings(batch_tokens=512, train_vocab=0), data=data),
                   TrainConfig(minutes=5, max_steps=100, lr=3e-3, eval_every=1000), out, show=False)
    return lm, out, report, prompts[:2]  # prompts of the training chunks


@pytest.mark.parametrize("options", TREES)
def test_greedy_identical_to_generate_untrained_head(tiny, tmp_path, options):
    path = fresh_head_dir(tiny, tmp_path / "head")
    gen = SpeculativeGenerator(tiny, "eagle", drafter=str(path), draft_vocab=0, **options)
    for prompt in ([5, 6, 7, 8], [1, 90, 33, 2, 2, 14, 60]):
        assert gen.generate(prompt, max_new_tokens=40).token_ids == hf_greedy(tiny, prompt, 40)


@pytest.mark.parametrize("options", TREES)
def test_trained_head_accepts_and_stays_identical(trained, options):
    lm, path, _, seen = trained
    gen = SpeculativeGenerator(lm, "eagle", drafter=str(path), draft_vocab=0, **options)
    total_passes = total_tokens = 0
    for prompt in seen:
        out = gen.generate(prompt, max_new_tokens=40)
        assert out.token_ids == hf_greedy(lm, prompt, 40)
        total_passes += out.stats.target_passes
        total_tokens += len(out.token_ids)
    # the head learned the target's continuations of these prompts: well over one token per pass
    assert total_tokens / total_passes > 1.5


def test_training_lowers_loss_and_raises_heldout_agreement(tiny_data, trained):
    lm, path, report, _ = trained
    untrained = EagleHead(head_config(lm.model.config)).float().attach(lm.model)
    from verispec.training.data import iter_samples
    from verispec.training.common import split_chunks
    held = list(iter_samples(tiny_data[1], split_chunks(tiny_data[1])[1]))  # prompts never trained on
    before = evaluate(untrained, lm, held)
    assert report["top1"] > before["top1"] + 0.2
    # only the target's predictions after the prompt count (of tokens prompt_len .. len): what the head drafts
    assert before["positions"] == sum(len(s.ids) - s.prompt_len + 1 for s in held) < sum(len(s.ids) - 1 for s in held)
    losses = [v for _, v in torch.load(path / "trainer-state.pt", weights_only=False)["history"]["train loss"]]
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    assert (path / "loss.png").stat().st_size > 0 and json.loads((path / "training.json").read_text())["steps"] == 100


def test_training_resumes_from_its_checkpoint(tiny_data, tmp_path):
    lm, data, _ = tiny_data
    settings = EagleSettings(batch_tokens=512, train_vocab=0)
    first = train(EagleTask(lm, settings, data=data), TrainConfig(minutes=5, max_steps=5), tmp_path, show=False)
    second = train(EagleTask(lm, settings, data=data), TrainConfig(minutes=5, max_steps=8), tmp_path, show=False)
    assert first["steps"] == 5 and second["steps"] == 8
    history = torch.load(tmp_path / "trainer-state.pt", weights_only=False)["history"]["train loss"]
    assert [s for s, _ in history] == list(range(1, 9))


def test_resuming_with_other_settings_is_refused(tiny_data, tmp_path):
    """The checkpoint of one set of losses is not continued with another (the EAGLE-1 trainer once
    resumed any checkpoint in --out)."""
    lm, data, _ = tiny_data
    train(EagleTask(lm, EagleSettings(batch_tokens=512, train_vocab=0), data=data), TrainConfig(max_steps=2),
          tmp_path, show=False)
    with pytest.raises(ValueError, match=r"other settings \(token_weight\)"):
        train(EagleTask(lm, EagleSettings(batch_tokens=512, train_vocab=0, token_weight=0.5), data=data),
              TrainConfig(max_steps=4), tmp_path, show=False)
    with pytest.raises(ValueError, match=r"other settings \(train\.lr\)"):
        train(EagleTask(lm, EagleSettings(batch_tokens=512, train_vocab=0), data=data),
              TrainConfig(max_steps=4, lr=3e-3), tmp_path, show=False)


def test_saved_layout_is_vllms_eagle1_format(tiny, tmp_path):
    """vLLM's EagleLlamaForCausalLM (vllm/model_executor/models/llama_eagle.py) loads `fc.weight`
    [hidden, 2*hidden] (no bias) and `layers.<i>.*` of Llama decoder layers whose layer 0 has no
    input_layernorm; embeddings and LM head come from the target; the config is a Llama config."""
    path = fresh_head_dir(tiny, tmp_path / "head")
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["EagleLlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 1
    H, I = config["hidden_size"], config["intermediate_size"]
    heads, kv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    expected = {
        "fc.weight": (H, 2 * H),
        "layers.0.self_attn.q_proj.weight": (heads * hd, H), "layers.0.self_attn.k_proj.weight": (kv * hd, H),
        "layers.0.self_attn.v_proj.weight": (kv * hd, H), "layers.0.self_attn.o_proj.weight": (H, heads * hd),
        "layers.0.mlp.gate_proj.weight": (I, H), "layers.0.mlp.up_proj.weight": (I, H),
        "layers.0.mlp.down_proj.weight": (H, I), "layers.0.post_attention_layernorm.weight": (H,),
    }
    tensors = load_file(str(path / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected


def test_head_computes_what_the_layout_says(tiny, tmp_path):
    """fc over [embeddings; features], one decoder layer without input norm, no final norm,
    then the target's LM head: recomputed by hand from the saved tensors."""
    path = fresh_head_dir(tiny, tmp_path / "head", seed=3)
    head = load_eagle(path, tiny.model)
    ids, feats = torch.tensor([[4, 8, 15]]), torch.randn(1, 3, 64)
    t = load_file(str(path / "model.safetensors"))
    x = torch.cat([tiny.model.model.embed_tokens(ids), feats], -1) @ t["fc.weight"].float().T
    layer = head.model.layers[0]
    rope = head.model.rotary_emb(x, torch.arange(3)[None])
    attn = layer.self_attn(x, position_embeddings=rope, attention_mask=None)[0]  # no input norm
    h = x + attn
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    out = head(ids, feats)
    torch.testing.assert_close(out.hidden, h, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.logits, tiny.model.lm_head(h), atol=1e-4, rtol=1e-4)


def test_draft_vocab_restricts_drafts_to_frequent_tokens(trained):
    lm, path, _, _ = trained
    gen = SpeculativeGenerator(lm, "eagle", drafter=str(path), draft_vocab=20)
    allowed = set(load_eagle(path, lm.model, draft_vocab=20).vocab_ids.tolist())
    seen = []
    original = gen.drafter.propose
    gen.drafter.propose = lambda ctx: seen.append(t := original(ctx)) or t
    out = gen.generate([3, 1, 4, 1, 5], max_new_tokens=30)
    assert out.token_ids == hf_greedy(lm, [3, 1, 4, 1, 5], 30)
    drafted = {tok for tree in seen for tok in tree.tokens[1:]}
    assert drafted and drafted <= allowed and len(allowed) == 20


@pytest.mark.parametrize("options", [dict(tree="dynamic", depth=2, top_k=2, budget=3),
                                     dict(tree=[[0], [1]], children="sample")])
def test_sampling_matches_target_distribution(tmp_path, options):
    """Tokens 2 and 3 (token 2 is the first one EAGLE drafts: the prompt's pass gives the
    first features) follow the target's exact joint distribution."""
    target = tiny_llama(vocab=4, seed=5)
    path = fresh_head_dir(target, tmp_path / "head", seed=1)
    prompt = [1, 2, 3]
    sampling = SamplingConfig(temperature=1.0)
    exact = exact_next_two(target.model, prompt, sampling)
    gen = SpeculativeGenerator(target, "eagle", drafter=str(path), draft_vocab=0, **options)
    counts = torch.zeros(4, 4)
    drafted = 0
    # enough draws to catch a second token verified against the wrong context (stat_power)
    draws = draws_for_power(exact, slipped_pair(exact))
    for seed in range(draws):
        out = gen.generate(prompt, max_new_tokens=3, temperature=1.0, seed=seed)
        counts[out.token_ids[1], out.token_ids[2]] += 1
        drafted += out.stats.drafted_tokens
    assert drafted > 2 / 3 * draws  # the test exercises drafts, not just the target
    assert pooled_chisquare(counts, exact) > ALPHA


def test_typical_acceptance_runs_with_eagle(trained):
    lm, path, _, _ = trained
    gen = SpeculativeGenerator(lm, "eagle", drafter=str(path), draft_vocab=0, rule="typical",
                               rule_options={"epsilon": 0.09, "delta": 0.3})
    out = gen.generate([3, 1, 4, 1, 5], max_new_tokens=20, temperature=0.7, seed=0)
    assert len(out.token_ids) == 20
    accepted = check_typical_acceptance(lm, [3, 1, 4, 1, 5], out, temperature=0.7, epsilon=0.09, delta=0.3)
    assert accepted > 0 and out.stats.target_passes == 20 - accepted  # the trained head's drafts were kept
    # at temperature 0 typical acceptance keeps the argmax path: greedy decoding, exactly
    assert gen.generate([3, 1, 4, 1, 5], max_new_tokens=20).token_ids == hf_greedy(lm, [3, 1, 4, 1, 5], 20)


def test_bad_input(tiny, tmp_path):
    with pytest.raises(ValueError, match="not an EAGLE head"):
        SpeculativeGenerator(tiny, "eagle", drafter=str(tmp_path))
    other = tiny_llama(hidden=32)
    path = fresh_head_dir(other, tmp_path / "other")
    with pytest.raises(ValueError, match="another model"):
        SpeculativeGenerator(tiny, "eagle", drafter=str(path))
    path = fresh_head_dir(tiny, tmp_path / "head")
    with pytest.raises(ValueError, match="no draft vocabulary"):
        SpeculativeGenerator(tiny, "eagle", drafter=str(path), draft_vocab=10)
    with pytest.raises(ValueError, match="k, depth"):
        SpeculativeGenerator(tiny, "eagle", drafter=str(path), budget=0)
