"""Shared fixtures: tiny random causal LMs (fast, deterministic) and scripted drafters."""
from __future__ import annotations

from dataclasses import dataclass

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


@pytest.fixture(scope="session")
def tiny() -> TinyLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_draft() -> TinyLM:
    return tiny_llama(layers=1, seed=1)


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
