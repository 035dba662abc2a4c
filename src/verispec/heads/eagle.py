"""The EAGLE draft head (Li et al. 2024): one decoder layer that predicts the target's next
feature from its current feature and the next token.

Input at position j: fc([embed(token_{j+1}); feature_j]); the layer's output is the
predicted feature_{j+1}, and the target's own LM head turns it into the draft
distribution over token_{j+2}. Features are the target's last hidden states after its
final norm (what its LM head reads).

The architecture and tensor names are those vLLM loads as EAGLE-1
(vllm/model_executor/models/llama_eagle.py, EagleLlamaForCausalLM): `fc.weight`
[hidden, 2*hidden] without bias, embeddings first in the concatenation; `layers.0.*` a
Llama decoder layer whose input RMSNorm is absent (layer 0 reads fc's output directly);
no final norm; embeddings and LM head are the target's (not saved). config.json is a
Llama config with one hidden layer and architectures ["EagleLlamaForCausalLM"].

Internally the layer runs inside a one-layer transformers LlamaModel (input norm and final
norm replaced by identities), so the head gets transformers' KV cache, rotary positions
and 4D tree masks for free and drafts trees through the same CachedLM as a draft model.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel

from ..compat import cache_kwargs
from ..layers import last_rows

ARCHITECTURE = "EagleLlamaForCausalLM"
WEIGHTS = "model.safetensors"
DRAFT_VOCAB = "draft_vocab.safetensors"  # verispec's own: token ids by training-data frequency


def head_config(target_config) -> LlamaConfig:
    """A one-layer Llama config with the target's widths (its attention shape, rope, vocab)."""
    t = target_config
    rope = getattr(t, "rope_parameters", None)
    config = LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=1, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=getattr(t, "num_key_value_heads", t.num_attention_heads),
        head_dim=getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
        hidden_act=getattr(t, "hidden_act", "silu"), max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=getattr(t, "rms_norm_eps", 1e-6), rope_parameters=getattr(t, "rope_parameters", None),
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        architectures=[ARCHITECTURE],
    )
    if isinstance(rope, dict) and "rope_theta" in rope:
        # serving engines on transformers 4 read the flat field; without it they assume 10000
        config.rope_theta = rope["rope_theta"]
    return config


@dataclass
class HeadOutput:
    logits: torch.Tensor  # [B, kept positions, vocab] (-inf outside a reduced draft vocabulary)
    hidden: torch.Tensor  # [B, kept positions, hidden]: the predicted next features


class EagleHead(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        inner = copy.deepcopy(config)
        inner.vocab_size = 1  # the inner model's own embedding table is never used
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.model = LlamaModel(inner)
        self.model.layers[0].input_layernorm = nn.Identity()
        self.model.norm = nn.Identity()
        # the target's embeddings, LM head and a draft vocabulary: attached, not owned
        self._target: tuple[nn.Module, nn.Module] | None = None
        self.vocab_ids: torch.Tensor | None = None

    def attach(self, target_model: nn.Module, vocab_ids: torch.Tensor | None = None) -> "EagleHead":
        """Use this target's embeddings and LM head; optionally draft only over vocab_ids."""
        object.__setattr__(self, "_target", (target_model.get_input_embeddings(), target_model.get_output_embeddings()))
        self.vocab_ids = None if vocab_ids is None else vocab_ids.to(self.fc.weight.device)
        # the LM head's rows of the draft vocabulary, gathered once (not per drafted level)
        head = self._target[1].weight
        self._small_head = None if vocab_ids is None else head.detach()[self.vocab_ids].contiguous()
        return self

    @property
    def base_model(self) -> nn.Module:  # CachedLM's feature hook looks for it; the head has none to give
        return self.model

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, cache=None, use_cache: bool = False,
                logits_to_keep: int = 0, position_ids=None, attention_mask=None) -> HeadOutput:
        if self._target is None:
            raise RuntimeError("attach(target_model) before running an EAGLE head")
        embed, head = self._target
        x = self.fc(torch.cat([embed(input_ids).to(self.fc.weight.dtype), features.to(self.fc.weight.dtype)], -1))
        hidden = self.model(inputs_embeds=x, **cache_kwargs(self.model, cache), use_cache=use_cache,
                            position_ids=position_ids, attention_mask=attention_mask).last_hidden_state
        hidden = last_rows(hidden, logits_to_keep)  # 0 keeps every row
        return HeadOutput(self.logits(hidden), hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self._target[1]
        if self.vocab_ids is None:
            return head(hidden.to(head.weight.dtype))
        small = nn.functional.linear(hidden.to(head.weight.dtype), self._small_head)
        full = torch.full((*small.shape[:-1], head.weight.shape[0]), float("-inf"), dtype=small.dtype, device=small.device)
        full[..., self.vocab_ids] = small
        return full


def save_eagle(head: EagleHead, out: str | Path, target_identity: dict, token_ranking: torch.Tensor | None = None,
               extra: dict | None = None) -> Path:
    """config.json + model.safetensors in vLLM's EAGLE-1 layout; verispec's own extras beside them."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = head.config.to_dict()
    config["verispec"] = {"target": target_identity, **(extra or {})}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in vllm_state_dict(head).items()}
    save_file(state, str(out / WEIGHTS))
    if token_ranking is not None:
        save_file({"token_ids": token_ranking.to(torch.int64).contiguous()}, str(out / DRAFT_VOCAB))
    return out


def vllm_state_dict(head: EagleHead) -> dict[str, torch.Tensor]:
    """Our module's tensors under vLLM's names: fc.*, layers.0.* (no embeddings, no LM head)."""
    state = {}
    for name, value in head.state_dict().items():
        if name.startswith("model.layers."):
            state[name[len("model."):]] = value
        elif name.startswith("fc."):
            state[name] = value
        elif name.startswith("model.rotary_emb") or name.startswith("model.embed_tokens"):
            continue  # buffers / the unused placeholder table
        else:
            raise AssertionError(f"unexpected EAGLE head tensor {name}")
    return state


def load_eagle(path: str | Path, target_model: nn.Module, target_identity: dict | None = None,
               draft_vocab: int | None = None) -> EagleHead:
    """A saved head attached to `target_model` (checked to be the model it was trained for)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").exists() or not (path / WEIGHTS).exists():
        raise ValueError(f"{path} is not an EAGLE head directory (config.json and {WEIGHTS} expected); "
                         "train one with 'verispec train eagle'")
    raw = json.loads((path / "config.json").read_text())
    if ARCHITECTURE not in raw.get("architectures", []):
        raise ValueError(f"{path} holds a {raw.get('architectures')} model, not an EAGLE head")
    mine = raw.pop("verispec", {})
    tc = target_model.config
    trained_for = mine.get("target", {})
    if raw["hidden_size"] != tc.hidden_size or raw["vocab_size"] != tc.vocab_size or (
            target_identity and trained_for.get("vocab_hash") not in (None, target_identity.get("vocab_hash"))):
        raise ValueError(f"the EAGLE head in {path} was trained for another model ({trained_for.get('name_or_path')}, "
                         f"hidden {raw['hidden_size']}, vocab {raw['vocab_size']}); train one for this target")
    head = EagleHead(LlamaConfig(**raw))
    state = {("model." + k if k.startswith("layers.") else k): v for k, v in load_file(str(path / WEIGHTS)).items()}
    missing, unexpected = head.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.startswith(("model.rotary_emb", "model.embed_tokens"))]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match an EAGLE head (missing {missing}, unexpected {unexpected})")
    dtype = next(target_model.parameters()).dtype
    head = head.to(dtype=dtype, device=next(target_model.parameters()).device).eval().requires_grad_(False)
    vocab_ids = None
    if draft_vocab:
        if not (path / DRAFT_VOCAB).exists():
            raise ValueError(f"{path} has no draft vocabulary ranking; drop the draft_vocab option")
        ranking = load_file(str(path / DRAFT_VOCAB))["token_ids"]
        vocab_ids = ranking[:draft_vocab].sort().values
    return head.attach(target_model, vocab_ids)
