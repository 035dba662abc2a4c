"""EAGLE-3: the head (fused low/mid/high target states, own draft vocabulary), its training-time
test, its vLLM layout, and the `eagle` drafter running it losslessly."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from verispec import SamplingConfig, SpeculativeGenerator
from verispec.engine.target import CachedLM
from verispec.heads.eagle3 import Eagle3Head, head_config, load_eagle3, save_eagle3
from verispec.models import tokenizer_identity
from verispec.training.data import Sample, write_dataset
from verispec.training.eagle3_train import Eagle3Settings, Eagle3Task
from verispec.training.trainer import TrainConfig, train
from conftest import exact_next_two, hf_greedy, tiny_llama
from stat_power import ALPHA, draws_for_power, pooled_chisquare, slipped_pair

LAYERS = [0, 1, 2]
TREES = [dict(tree="dynamic", depth=4, top_k=3, budget=10), dict(tree="chain", k=4),
         dict(tree=[[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])]


def tiny3(vocab=96, seed=0, hidden=64):
    return tiny_llama(vocab=vocab, layers=3, seed=seed, hidden=hidden)


def fresh_head(lm, draft_vocab=None, seed=0):
    torch.manual_seed(seed)
    V = lm.model.config.vocab_size
    head = Eagle3Head(head_config(lm.model.config, draft_vocab or V, LAYERS))
    with torch.no_grad():
        head.lm_head.weight.mul_(8.0)  # sharper drafts: ties impossible in practice
    # every (V // draft_vocab)-th token: a draft vocabulary that is not a prefix of the ids
    head.set_draft_vocab(torch.arange(0, V, V // draft_vocab)[:draft_vocab] if draft_vocab else torch.arange(V))
    return head


def fresh_head_dir(lm, path, draft_vocab=None, seed=0):
    return save_eagle3(fresh_head(lm, draft_vocab, seed), path, tokenizer_identity(lm))


@pytest.fixture(scope="module")
def target():
    return tiny3()


@pytest.mark.parametrize("options", TREES)
def test_greedy_identical_to_generate(target, tmp_path, options):
    path = fresh_head_dir(target, tmp_path / "head", draft_vocab=48)
    gen = SpeculativeGenerator(target, "eagle", drafter=str(path), **options)
    assert gen.drafter.version == 3
    for prompt in ([5, 6, 7, 8], [1, 90, 33, 2, 2, 14, 60]):
        out = gen.generate(prompt, max_new_tokens=40)
        assert out.token_ids == hf_greedy(target, prompt, 40)
        assert out.stats.drafted_tokens > 0


def test_drafts_come_from_the_draft_vocabulary(target, tmp_path):
    head = fresh_head(target, draft_vocab=24)
    logits = head.attach(target.model)(torch.tensor([[3, 4]]), torch.randn(1, 2, 3 * 64)).logits
    allowed = set(head.draft_ids.tolist())
    assert set(torch.isfinite(logits[0, 0]).nonzero()[:, 0].tolist()) == allowed
    assert all(i % 4 == 0 for i in allowed) and len(allowed) == 24


def test_training_unroll_is_what_the_drafter_computes(target):
    """Step k of the training-time test at position j equals the drafter's path: the context's
    pairs (target states_j, token_{j+1}) in the head's cache, then a chain of k nodes fed the
    head's own outputs, at the positions and with the visibility the tree pass gives them."""
    lm = target
    ids = torch.tensor([4, 9, 17, 3, 50, 8, 21, 33, 7, 12])
    task = Eagle3Task.__new__(Eagle3Task)  # the unroll alone: no dataset needed
    task.lm, task.s, task.device = lm, Eagle3Settings(layer_ids=LAYERS, ttt_steps=4), torch.device("cpu")
    task.head = fresh_head(lm, draft_vocab=48).float().attach(lm.model).eval()
    task.W = lm.model.get_output_embeddings().weight.detach().float()[task.head.draft_ids]
    logq = []
    with torch.no_grad():
        task.unroll([Sample(ids, 2, None)], logits_out=logq)
        aux, _ = task.target_states(ids[None], torch.ones(1, len(ids), dtype=torch.bool))
    n = 5  # the context: pairs j = 0..n-1; the chain continues with the true tokens
    cached = CachedLM(task.head)
    with torch.no_grad():
        logits = cached.extend(ids[1:n + 1].tolist(), features=aux[:, :n])[-1]
        torch.testing.assert_close(torch.log_softmax(logits[task.head.draft_ids], -1), logq[0][0, n - 1],
                                   atol=1e-4, rtol=1e-4)
        cached.begin_tree(root_cached=True)
        tokens, parents, hidden = [int(ids[n])], [-1], cached.last_output.hidden[0, -1]
        for k in range(1, 4):
            tokens.append(int(ids[n + k]))
            parents.append(k - 1)
            logits = cached.feed_nodes(tokens, parents, [k], features=hidden[None, None])[0]
            hidden = cached.last_output.hidden[0, -1]
            torch.testing.assert_close(torch.log_softmax(logits[task.head.draft_ids], -1), logq[k][0, n - 1],
                                       atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """The tiny target's own greedy continuations of random prompts (no stored states: EAGLE-3
    runs the target while it trains)."""
    lm = tiny3()
    g = torch.Generator().manual_seed(0)
    seqs, lens = [], []
    for _ in range(48):
        prompt = torch.randint(0, 96, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        seqs.append(prompt + hf_greedy(lm, prompt, 30))
        lens.append(len(prompt))
    return lm, write_dataset(lm, tmp_path_factory.mktemp("data"), seqs, lens, chunk_size=16, features=False), \
        [s[:n] for s, n in zip(seqs, lens)]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    lm, data, prompts = tiny_data
    out = tmp_path_factory.mktemp("eagle3")
    task = Eagle3Task(lm, Eagle3Settings(layer_ids=LAYERS, draft_vocab=96, ttt_steps=3, batch_tokens=512), data=data)
    before = task.evaluate(quick=False)
    report = train(task, TrainConfig(max_steps=150, lr=3e-3, warmup_steps=10, eval_every=50), out, show=False)
    return lm, out, report, before, prompts[:2]


def test_training_raises_heldout_agreement_at_every_depth(trained):
    _, _, report, before, _ = trained
    assert report["steps"] == 150
    for d in range(3):
        assert report["top1_by_depth"][d] > before["top1_by_depth"][d] + 0.1
    assert report["chain_accepted"] > before["chain_accepted"]


@pytest.mark.parametrize("options", TREES)
def test_trained_head_accepts_and_stays_identical(trained, options):
    lm, path, _, _, seen = trained
    gen = SpeculativeGenerator(lm, "eagle", drafter=str(path), **options)
    passes = tokens = 0
    for prompt in seen:
        out = gen.generate(prompt, max_new_tokens=30)
        assert out.token_ids == hf_greedy(lm, prompt, 30)
        passes, tokens = passes + out.stats.target_passes, tokens + len(out.token_ids)
    assert tokens / passes > 1.5


def test_saved_layout_is_vllms_eagle3_format(target, tmp_path):
    path = fresh_head_dir(target, tmp_path / "head", draft_vocab=48)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["draft_vocab_size"] == 48 and config["target_hidden_size"] == 64
    assert config["eagle_config"] == {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": LAYERS}
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]  # nothing beside them
    state = load_file(str(path / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in state.items()} == eagle3_tensor_shapes(H=64, I=128, kv=2 * 16, draft=48, V=96)
    d2t, t2d = state["d2t"], state["t2d"]
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool and t2d.sum() == 48
    assert ((torch.arange(48) + d2t) == t2d.nonzero()[:, 0]).all()  # target id = draft id + d2t[draft id]


@pytest.mark.parametrize("options", [dict(tree="dynamic", depth=2, top_k=2, budget=3),
                                     dict(tree=[[0], [1]], children="sample")])
def test_sampling_matches_target_distribution(tmp_path, options):
    """Tokens 2 and 3 (token 2 is the first one EAGLE drafts) follow the target's exact joint distribution."""
    target = tiny_llama(vocab=4, layers=3, seed=5)
    path = fresh_head_dir(target, tmp_path / "head", seed=1)
    prompt = [1, 2, 3]
    sampling = SamplingConfig(temperature=1.0)
    exact = exact_next_two(target.model, prompt, sampling)
    gen = SpeculativeGenerator(target, "eagle", drafter=str(path), **options)
    counts = torch.zeros(4, 4)
    drafted = 0
    # enough draws to catch a second token verified against the wrong context (stat_power)
    draws = draws_for_power(exact, slipped_pair(exact))
    for seed in range(draws):
        out = gen.generate(prompt, max_new_tokens=3, temperature=1.0, seed=seed)
        counts[out.token_ids[1], out.token_ids[2]] += 1
        drafted += out.stats.drafted_tokens
    assert drafted > 2 / 3 * draws  # the test exercises drafts, not just the target
    assert pooled_chisquare(counts.flatten(), exact.flatten()) > ALPHA


def test_bad_input(target, tmp_path):
    other = tiny3(hidden=32)
    path = fresh_head_dir(other, tmp_path / "other")
    with pytest.raises(ValueError, match="another model"):
        SpeculativeGenerator(target, "eagle", drafter=str(path))
    with pytest.raises(ValueError, match="three target layers"):
        head_config(target.model.config, 96, [0, 1, 7])
    path = fresh_head_dir(target, tmp_path / "head")
    config = json.loads((path / "config.json").read_text())
    config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [0, 1, 5]  # the target has 3 layers
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="three target layers"):
        SpeculativeGenerator(target, "eagle", drafter=str(path))
    with pytest.raises(ValueError, match="version"):
        SpeculativeGenerator(target, "eagle", drafter=str(path), version=2)


def test_a_truncated_data_chunk_is_one_clear_error(tiny_data, tmp_path):
    import shutil

    lm, data, _ = tiny_data
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    chunk = sorted(copy.glob("chunk-*.pt"))[0]
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{chunk.name}.*truncated or corrupt"):
        Eagle3Task(lm, Eagle3Settings(layer_ids=LAYERS, draft_vocab=96), data=copy)


def test_resuming_with_other_settings_is_refused(tiny_data, tmp_path):
    lm, data, _ = tiny_data
    task = Eagle3Task(lm, Eagle3Settings(layer_ids=LAYERS, draft_vocab=96, ttt_steps=2, batch_tokens=512), data=data)
    train(task, TrainConfig(max_steps=2, eval_every=1000, warmup_steps=1), tmp_path / "out", show=False)
    other = Eagle3Task(lm, Eagle3Settings(layer_ids=LAYERS, draft_vocab=96, ttt_steps=3, batch_tokens=512), data=data)
    with pytest.raises(ValueError, match="ttt_steps"):
        train(other, TrainConfig(max_steps=4, eval_every=1000, warmup_steps=1), tmp_path / "out", show=False)
    again = Eagle3Task(lm, Eagle3Settings(layer_ids=LAYERS, draft_vocab=96, ttt_steps=2, batch_tokens=512), data=data)
    report = train(again, TrainConfig(max_steps=4, eval_every=1000, warmup_steps=1), tmp_path / "out", show=False)
    assert report["steps"] == 4  # resumed at step 2, not restarted


def eagle3_tensor_shapes(H: int, I: int, kv: int, draft: int, V: int) -> dict[str, tuple[int, ...]]:
    """The tensors of a saved EAGLE-3 head (vLLM's LlamaForCausalLMEagle3 layout) and their shapes:
    hidden H, intermediate I, kv width kv, draft vocabulary `draft`, target vocabulary V."""
    return {"fc.weight": (H, 3 * H), "norm.weight": (H,), "lm_head.weight": (draft, H), "d2t": (draft,), "t2d": (V,),
            "midlayer.input_layernorm.weight": (H,), "midlayer.hidden_norm.weight": (H,),
            "midlayer.post_attention_layernorm.weight": (H,),
            "midlayer.self_attn.q_proj.weight": (H, 2 * H), "midlayer.self_attn.k_proj.weight": (kv, 2 * H),
            "midlayer.self_attn.v_proj.weight": (kv, 2 * H), "midlayer.self_attn.o_proj.weight": (H, H),
            "midlayer.mlp.gate_proj.weight": (I, H), "midlayer.mlp.up_proj.weight": (I, H),
            "midlayer.mlp.down_proj.weight": (H, I)}
