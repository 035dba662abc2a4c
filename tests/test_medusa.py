"""Medusa: heads, checkpoint layout (vLLM's), drafter (greedy, lossless sampling, typical), trainer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import verispec
from verispec import SamplingConfig, SpeculativeGenerator
from verispec.datastore import tokenizer_identity
from verispec.drafters.base import DraftContext
from verispec.drafters.medusa import MedusaDrafter, default_tree, expected_accepted
from verispec.engine.sampling import probabilities
from verispec.heads.medusa import MedusaHeads, load_medusa, save_medusa
from verispec.training import medusa_train
from verispec.training.data import Sample, write_dataset
from conftest import check_typical_acceptance, hf_greedy, tiny_llama
from stat_power import ALPHA, draws_for_power, pooled_chisquare, slipped_pair

PROMPTS = [[5, 17, 3, 44, 9, 21], [1, 2, 3], [60, 61, 60, 61, 60]]


def random_heads(lm, num_heads: int = 3, layers: int = 1, draft_vocab: int | None = None, shared: bool = False,
                 scale: float = 0.5, seed: int = 0) -> MedusaHeads:
    """Heads made from the target's head with random residual blocks (so they differ from it)."""
    config = lm.model.config
    token_map = None
    if draft_vocab is not None:
        token_map = torch.randperm(config.vocab_size, generator=torch.Generator().manual_seed(seed))[:draft_vocab]
    heads = MedusaHeads(config.hidden_size, config.vocab_size, num_heads, layers, token_map=token_map,
                        shared_lm_head=shared).init_from_target(lm.model.lm_head.weight)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in heads.blocks:
            for layer in block.layers:
                layer.weight.copy_(scale * torch.randn(layer.weight.shape, generator=g))
                layer.bias.copy_(scale * torch.randn(layer.bias.shape, generator=g))
    heads.meta = {"vocab_hash": tokenizer_identity(lm)["vocab_hash"], "hidden_size": config.hidden_size}
    return heads


def saved_heads(lm, directory: Path, **kwargs) -> Path:
    return save_medusa(random_heads(lm, **kwargs), directory, target_name="tiny", dtype=torch.float32)


# ---------------------------------------------------------------- heads and the checkpoint layout

def test_fresh_heads_are_the_targets_own_head(tiny):
    config = tiny.model.config
    heads = MedusaHeads(config.hidden_size, config.vocab_size, 3, 2).init_from_target(tiny.model.lm_head.weight)
    x = torch.randn(4, config.hidden_size)
    with torch.no_grad():
        logits = heads(x)  # [4, K, vocab]
        torch.testing.assert_close(logits, tiny.model.lm_head(x)[:, None].expand(-1, 3, -1))


def test_truncated_vocabulary_scatters_into_the_full_one(tiny):
    heads = random_heads(tiny, draft_vocab=20)
    x = torch.randn(2, tiny.model.config.hidden_size)
    with torch.no_grad():
        full, small = heads.full_logits(x), heads(x)
    assert full.shape == (2, 3, 96) and small.shape == (2, 3, 20)
    outside = torch.ones(96, dtype=torch.bool)
    outside[heads.token_map] = False
    assert torch.isinf(full[..., outside]).all() and (full[..., outside] < 0).all()
    torch.testing.assert_close(full[..., heads.token_map], small)


@pytest.mark.parametrize("draft_vocab,shared", [(None, False), (20, False), (20, True), (None, True)])
def test_save_load_round_trip(tiny, tmp_path, draft_vocab, shared):
    heads = random_heads(tiny, num_heads=3, layers=2, draft_vocab=draft_vocab, shared=shared)
    save_medusa(heads, tmp_path, target_name="tiny", dtype=torch.float32)
    loaded = load_medusa(tmp_path)
    assert (loaded.num_heads, loaded.num_layers, loaded.shared_lm_head) == (3, 2, shared)
    assert loaded.token_map.tolist() == heads.token_map.tolist()
    for name, value in heads.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)
    assert loaded.meta["vocab_hash"] == heads.meta["vocab_hash"]
    x = torch.randn(5, tiny.model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.full_logits(x), heads.full_logits(x))
    bf16 = load_medusa(save_medusa(heads, tmp_path / "bf16", "tiny"))  # the default save dtype
    assert bf16.blocks[0].layers[0].weight.dtype == torch.bfloat16 and bf16.token_map.dtype == torch.long


def vllm_expected_layout(hidden: int, vocab: int, heads: int, layers: int, draft_vocab: int, shared: bool):
    """What vLLM loads as a Medusa draft model, written from its source:
    vllm/transformers_utils/configs/medusa.py (MedusaConfig: model_type "medusa", architectures
    ["MedusaModel"], hidden_size, vocab_size, num_heads, num_hidden_layers, max_paths, topk,
    truncated_vocab_size; from_pretrained renames keys containing "num" + "heads"/"layers") and
    vllm/model_executor/models/medusa.py (class Medusa: blocks[h] = ResidualBlock whose
    layers[l] = nn.Linear(hidden, hidden, bias=config.medusa_fc_bias (default False)); lm_heads[h] =
    ParallelLMHead(truncated_vocab_size, hidden), or one lm_head when config.original_lm_head,
    loaded from "lm_heads.0.weight"; optional "token_map" tensor, used only when
    truncated_vocab_size < vocab_size, indexes logits and lm_head rows (so: integer ids))."""
    config = {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": hidden, "vocab_size": vocab,
              "num_heads": heads, "num_hidden_layers": layers, "truncated_vocab_size": draft_vocab,
              "medusa_fc_bias": True, "original_lm_head": shared}
    tensors = {}
    for h in range(heads):
        for l in range(layers):
            tensors[f"blocks.{h}.layers.{l}.weight"] = (hidden, hidden)
            tensors[f"blocks.{h}.layers.{l}.bias"] = (hidden,)
    for h in range(1 if shared else heads):
        tensors[f"lm_heads.{h}.weight"] = (draft_vocab, hidden)
    if draft_vocab < vocab:
        tensors["token_map"] = (draft_vocab,)
    return config, tensors


@pytest.mark.parametrize("draft_vocab,shared", [(None, False), (20, False), (20, True)])
def test_checkpoint_is_vllms_medusa_layout(tiny, tmp_path, draft_vocab, shared):
    from safetensors import safe_open

    heads = random_heads(tiny, num_heads=3, layers=2, draft_vocab=draft_vocab, shared=shared)
    save_medusa(heads, tmp_path, target_name="tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    want_config, want_tensors = vllm_expected_layout(64, 96, 3, 2, draft_vocab or 96, shared)
    assert {k: config[k] for k in want_config} == want_config
    # vLLM's MedusaConfig.from_pretrained renames every key holding "num" and "heads"/"layers":
    # only the two documented keys may match, or ours would overwrite them
    assert sorted(k for k in config if "num" in k and ("heads" in k or "layers" in k)) == ["num_heads", "num_hidden_layers"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        got = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        assert got == want_tensors
        if "token_map" in got:
            assert f.get_tensor("token_map").dtype == torch.int64
            assert f.get_tensor("token_map").tolist() == heads.token_map.tolist()
        assert all(f.get_tensor(n).dtype == torch.bfloat16 for n in got if n != "token_map")


# ---------------------------------------------------------------- drafter

def test_each_depth_holds_its_heads_candidates(tiny, tmp_path):
    drafter = MedusaDrafter(tiny, drafter=saved_heads(tiny, tmp_path), tree=[[0], [1], [0, 0], [0, 1], [0, 0, 0]])
    prompt = [3, 4, 5, 6]
    drafter.begin(prompt)
    ctx = DraftContext(prompt, 10, SamplingConfig(), None)
    assert drafter.propose(ctx).num_drafted == 0  # no feature before the first pass
    feature = torch.randn(3, 64)  # features of the 3 tokens before the root
    drafter.observe(None, None, None, [], feature)
    tree = drafter.propose(ctx)
    with torch.no_grad():
        top = [torch.topk(l, 2).indices.tolist() for l in drafter.heads.full_logits(feature[-1])]  # [K][2]
    assert tree.parents == (-1, 0, 0, 1, 1, 3)
    assert list(tree.tokens) == [6, top[0][0], top[0][1], top[1][0], top[1][1], top[2][0]]
    assert drafter.propose(DraftContext(prompt, 1, SamplingConfig(), None)).tokens == (6, top[0][0], top[0][1])


def test_default_tree_follows_rank_accuracies():
    acc = [[0.6, 0.1, 0.05], [0.4, 0.1, 0.05], [0.3, 0.05, 0.02]]
    paths = default_tree(acc, nodes=5)
    assert paths == [[0], [0, 0], [1], [0, 0, 0], [0, 1]]
    assert expected_accepted(paths, acc) == pytest.approx(1 + 0.6 + 0.24 + 0.1 + 0.072 + 0.06)
    assert len(default_tree(acc, nodes=16)) == 16


@pytest.mark.parametrize("options", [{}, {"tree": [[0], [0, 0], [0, 0, 0]]}, {"nodes": 30},
                                     {"tree": [[0], [1], [2], [0, 0], [1, 0], [0, 1]]}])
@pytest.mark.parametrize("draft_vocab", [None, 24])
def test_greedy_matches_generate_with_random_heads(tiny, tmp_path, options, draft_vocab):
    gen = SpeculativeGenerator(tiny, method="medusa", drafter=saved_heads(tiny, tmp_path, draft_vocab=draft_vocab),
                               **options)
    for prompt in PROMPTS:
        assert gen.generate(prompt, max_new_tokens=30).token_ids == hf_greedy(tiny, prompt, 30)


def test_heads_that_know_the_answer_are_accepted(tiny, tmp_path):
    """Heads rigged to predict the target's greedy continuation must get long acceptances:
    the drafter reads the right feature and puts head d's guess at depth d."""
    prompt = PROMPTS[0]
    ref = hf_greedy(tiny, prompt, 40)
    tokens = prompt + ref
    with torch.no_grad():
        feats = tiny.model.model(input_ids=torch.tensor([tokens])).last_hidden_state[0]  # [T, hidden]
    # Least-squares projections mapping feature t to one-hot(token t+1+k) on this very sequence.
    K, H, V = 2, 64, 96
    heads = random_heads(tiny, num_heads=K, scale=0.0)
    rows = torch.arange(len(prompt) - 1, len(tokens) - 1 - K)
    with torch.no_grad():
        for k in range(K):
            target = torch.nn.functional.one_hot(torch.tensor(tokens)[rows + 1 + k + 1], V).float() * 50
            solution = torch.linalg.lstsq(feats[rows], target).solution  # [H, V]
            heads.lm_heads[k].weight.copy_(solution.T)
    save_medusa(heads, tmp_path, "tiny", dtype=torch.float32)
    gen = SpeculativeGenerator(tiny, method="medusa", drafter=tmp_path, tree=[[0], [0, 0]])
    out = gen.generate(prompt, max_new_tokens=30)
    assert out.token_ids == ref[:30]
    assert out.stats.mean_accepted_tokens > 2.0


# ---------------------------------------------------------------- sampling: lossless, and typical

@pytest.mark.parametrize("options", [
    {"tree": [[0], [1], [0, 0], [1, 0]], "children": "sample-unique"},
    {"tree": [[0], [1], [0, 0], [0, 1]], "children": "sample"},
    {"tree": [[0], [1], [0, 0]], "children": "topk"},
])
def test_sampling_matches_target_distribution(tmp_path, options):
    """Tokens 2 and 3 (drafted by heads 1 and 2 at the second step: the first has no feature yet)
    follow the target's marginal exactly."""
    target = tiny_llama(vocab=6, seed=3)
    heads = random_heads(target, num_heads=2, scale=1.0, seed=5)
    save_medusa(heads, tmp_path, "tiny", dtype=torch.float32)
    prompt, V = [1, 2, 3], 6
    sampling = SamplingConfig(temperature=1.0)
    with torch.inference_mode():
        p1 = probabilities(target.model(torch.tensor([prompt])).logits[0, -1], sampling)  # [V]
        two = torch.cat([torch.tensor([prompt]).expand(V, -1), torch.arange(V)[:, None]], 1)
        p2 = probabilities(target.model(two).logits[:, -1], sampling)  # [V (t1), V (t2)]
        three = torch.cat([two.repeat_interleave(V, 0), torch.arange(V).repeat(V)[:, None]], 1)
        p3 = probabilities(target.model(three).logits[:, -1], sampling).view(V, V, V)  # [t1, t2, t3]
    exact = torch.einsum("a,ab,abc->bc", p1, p2, p3)  # marginal of (t2, t3)
    gen = SpeculativeGenerator(target, method="medusa", drafter=tmp_path, **options)
    counts, drafted = torch.zeros(V, V), 0
    # enough draws to catch a second token verified against the wrong context (stat_power)
    draws = draws_for_power(exact, slipped_pair(exact))
    for seed in range(draws):
        out = gen.generate(prompt, max_new_tokens=4, temperature=1.0, seed=seed)
        counts[out.token_ids[1], out.token_ids[2]] += 1
        drafted += out.stats.accepted_tokens
    assert drafted > 0.2 * draws  # the heads' drafts were really accepted along the way
    assert pooled_chisquare(counts, exact) > ALPHA


def test_typical_acceptance_runs(tiny, tmp_path):
    gen = SpeculativeGenerator(tiny, method="medusa", drafter=saved_heads(tiny, tmp_path), rule="typical",
                               rule_options={"epsilon": 0.2, "delta": 0.5})
    out = gen.generate([1, 2, 3], max_new_tokens=30, temperature=1.0, seed=0)
    assert len(out.token_ids) == 30
    accepted = check_typical_acceptance(tiny, [1, 2, 3], out, temperature=1.0, epsilon=0.2, delta=0.5)
    # each pass commits its accepted drafts plus one token of its own, so the heads' accepted
    # drafts are exactly the tokens the target did not have to make itself
    assert out.stats.target_passes == 30 - accepted and accepted > 0
    greedy = gen.generate([1, 2, 3], max_new_tokens=20)  # at temperature 0, typical keeps the argmax path
    assert greedy.token_ids == hf_greedy(tiny, [1, 2, 3], 20)


# ---------------------------------------------------------------- errors a user can cause

def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(ValueError, match="needs trained heads"):
        SpeculativeGenerator(tiny, method="medusa")
    with pytest.raises(ValueError, match="holds no Medusa heads"):
        SpeculativeGenerator(tiny, method="medusa", drafter=tmp_path / "nowhere")
    good = saved_heads(tiny, tmp_path / "good")
    other = tiny_llama(vocab=80, hidden=32, seed=2)
    with pytest.raises(ValueError, match="trained for 'tiny'.*not for this target"):
        SpeculativeGenerator(other, method="medusa", drafter=good)
    same_width = tiny_llama(vocab=80, seed=2)  # same hidden size, other vocabulary
    with pytest.raises(ValueError, match="not for this target"):
        SpeculativeGenerator(same_width, method="medusa", drafter=good)
    with pytest.raises(ValueError, match="only 3 heads"):
        SpeculativeGenerator(tiny, method="medusa", drafter=good, tree=[[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="children"):
        SpeculativeGenerator(tiny, method="medusa", drafter=good, children="best")
    (tmp_path / "notmedusa").mkdir()
    (tmp_path / "notmedusa" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "notmedusa" / "model.safetensors").write_text("")
    with pytest.raises(ValueError, match="not a Medusa config"):
        SpeculativeGenerator(tiny, method="medusa", drafter=tmp_path / "notmedusa")


# ---------------------------------------------------------------- training

def test_position_table_indexing():
    """Head k (1-based) at position t learns token t+1+k; positions start at the prompt's last token."""
    ids = torch.arange(100, 110)  # T = 10
    feats = torch.arange(10, dtype=torch.float32)[:, None].expand(10, 4).clone()  # feature t = t
    table = medusa_train.position_table([Sample(ids, 4, feats)], num_heads=2)
    t = table.features[table.rows, 0].long()
    assert t.tolist() == [3, 4, 5, 6, 7, 8]
    assert table.labels[:, 0].tolist() == [105, 106, 107, 108, 109, -100]  # t + 2
    assert table.labels[:, 1].tolist() == [106, 107, 108, 109, -100, -100]  # t + 3
    # the teacher's distribution for head k comes from the feature at t + k
    assert (table.features[table.rows[:4] + 2, 0].long() == t[:4] + 2).all()


def write_tiny_dataset(lm, directory: Path, chunks: int = 2, per_chunk: int = 4, answer: int = 24) -> Path:
    """A dataset in `verispec train data`'s format: random prompts, the tiny target's greedy answers."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 96, (6,), generator=g).tolist() for _ in range(chunks * per_chunk)]
    return write_dataset(lm, directory, [p + hf_greedy(lm, p, answer) for p in prompts], [len(p) for p in prompts],
                         chunk_size=per_chunk)


def test_train_command_then_generate(tiny, tmp_path, capsys):
    from verispec.cli import main

    model_dir = tmp_path / "tiny-model"
    tiny.model.save_pretrained(model_dir)
    data = write_tiny_dataset(tiny, tmp_path / "data")
    out = tmp_path / "heads"
    common = ["train", "medusa", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--heads", "3",
              "--vocab", "48", "--batch-tokens", "32", "--lr", "3e-3", "--minutes", "5", "--threads", "1"]
    assert main(common + ["--steps", "4"]) == 0
    first = json.loads((out / "training.json").read_text())
    assert first["steps"] == 4 and first["train_samples"] == 4 and first["held_out_samples"] == 4
    assert len(first["top1"]) == 3 and (out / "loss.png").stat().st_size > 0 and (out / "heldout.png").is_file()
    assert first["settings"]["heads"] == 3 and len(first["before"]["top1"]) == 3
    assert main(common + ["--steps", "10"]) == 0  # resumes from the checkpoint in --out
    second = json.loads((out / "training.json").read_text())
    assert second["steps"] == 10 and second["train_minutes"] >= first["train_minutes"]
    assert "resuming at step 4" in capsys.readouterr().out
    assert main(common + ["--steps", "10", "--heads", "2"]) == 2  # other settings: refused, not mixed
    config = json.loads((out / "config.json").read_text())
    assert config["truncated_vocab_size"] == 48 and len(config["verispec"]["rank_accuracy"]) == 3

    lm = verispec.load_model(model_dir, dtype="float32")
    gen = SpeculativeGenerator(lm, method="medusa", drafter=out)
    for prompt in PROMPTS:
        assert gen.generate(prompt, max_new_tokens=30).token_ids == hf_greedy(lm, prompt, 30)


def test_training_learns_the_targets_continuations(tiny):
    """A few hundred steps on the target's own answers: head 1's top-1 on them rises well above
    the untrained head's (which is the target's own head, predicting one token too early)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        data = write_tiny_dataset(tiny, Path(d) / "data", chunks=2, per_chunk=8, answer=40)
        from verispec.training.data import iter_samples
        train = medusa_train.position_table(list(iter_samples(data, [0, 1])), 2)
    token_map = torch.arange(96)
    heads = MedusaHeads(64, 96, 2, 1).init_from_target(tiny.model.lm_head.weight)
    mapped = medusa_train.draft_labels(train.labels, token_map, 96)
    before = medusa_train.evaluate(heads, train, mapped)
    opt = torch.optim.AdamW(heads.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch = torch.randint(0, len(train), (64,), generator=g)
        loss = sum(medusa_train.head_losses(heads, train, batch, mapped))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = medusa_train.evaluate(heads, train, mapped)
    assert after["top1"][0] > before["top1"][0] + 0.3


# ---------------------------------------------------------------- the real model

@pytest.mark.real
def test_real_trained_heads_are_lossless(smol):
    from verispec.heads import find_drafter

    lm = smol
    directory = find_drafter(lm, "medusa", "verispec train medusa")  # the cached or the shipped heads
    gen = SpeculativeGenerator(lm, method="medusa", drafter=directory)
    accepted = []
    for text in ["Explain how a bicycle gear works.", "Write a haiku about autumn rain.",
                 "List three uses of a paperclip."]:
        ids = lm.encode(text, chat=True)
        with torch.inference_mode():
            ref = lm.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=40, do_sample=False)[0, len(ids):].tolist()
        out = gen.generate(ids, max_new_tokens=40)
        stop = next((i + 1 for i, t in enumerate(ref) if t in set(lm.eos_token_ids)), len(ref))
        assert out.token_ids == ref[:stop]
        accepted.append(out.stats.mean_accepted_tokens)
    assert sum(accepted) / len(accepted) > 1.2  # trained heads draft something the target keeps
