"""The EAGLE-3 draft head (Li et al. 2025): one decoder layer over the target's low, mid and
high hidden states, fused by one linear layer, predicting tokens over its own reduced draft
vocabulary.

Input at position j: the target's hidden states at j from three layers, concatenated and
fused by `fc` into one hidden vector (or, when drafting deeper, the head's own output at its
parent), plus the embedding of token_{j+1}. The layer reads [norm(embed); norm(hidden)]
(width 2*hidden) in attention, keeps `hidden` as its residual, and its output, after a final
norm and its own LM head over `draft_vocab_size` tokens, predicts token_{j+2}. Its output
before the norm is the hidden vector its children read. No feature regression: the head is
trained on tokens only, unrolled on its own outputs ("training-time test").

Saved in the layout vLLM loads as EAGLE-3 (vllm/model_executor/models/llama_eagle3.py,
architecture "LlamaForCausalLMEagle3"): config.json is a one-layer Llama config with
`draft_vocab_size`, `target_hidden_size` and `eagle_config` ({"use_aux_hidden_state": true,
"eagle_aux_hidden_state_layer_ids": [...]}); model.safetensors holds fc.weight
[hidden, 3*target_hidden], midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight,
midlayer.self_attn.{q,k,v,o}_proj.weight (q/k/v read 2*hidden), midlayer.mlp.{gate,up,down}_proj.weight,
norm.weight, lm_head.weight [draft_vocab, hidden], d2t [draft_vocab] (target id = draft id +
d2t[draft id]) and t2d [vocab] (bool: in the draft vocabulary). Embeddings are the target's
(not saved; vLLM shares them when absent). Layer ids follow vLLM's meaning: the hidden state
entering decoder layer L, i.e. transformers' `hidden_states[L]`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from ..compat import cache_append, cache_length
from ..layers import last_rows
from .eagle import head_config as one_layer_config
from ..models import tokenizer_identity

ARCHITECTURE = "LlamaForCausalLMEagle3"
WEIGHTS = "model.safetensors"


def default_layer_ids(num_layers: int) -> list[int]:
    """Low, mid and high: vLLM's default choice for EAGLE-3 targets."""
    return [2, num_layers // 2, num_layers - 3]


def head_config(target_config, draft_vocab_size: int, layer_ids: list[int] | None = None) -> LlamaConfig:
    """A one-layer Llama config with the target's widths, rope and vocabulary."""
    layer_ids = list(layer_ids) if layer_ids is not None else default_layer_ids(target_config.num_hidden_layers)
    check_layer_ids(layer_ids, target_config.num_hidden_layers)
    config = one_layer_config(target_config)  # the same widths, rope and vocabulary as EAGLE-1's
    config.architectures = [ARCHITECTURE]
    config.draft_vocab_size = int(draft_vocab_size)
    config.target_hidden_size = target_config.hidden_size
    config.eagle_config = {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": layer_ids}
    # vLLM's model runner reads the layer ids from the top level only (else it silently taps
    # its default layers), SGLang and speculators from eagle_config: both
    config.eagle_aux_hidden_state_layer_ids = layer_ids
    return config


def check_layer_ids(layer_ids, num_layers: int) -> None:
    if len(layer_ids) != 3 or any(not isinstance(i, int) or not 0 <= i < num_layers for i in layer_ids):
        raise ValueError(f"EAGLE-3 reads three target layers, each an id in 0..{num_layers - 1} "
                         f"(the hidden state entering that layer); got {list(layer_ids)}")


@dataclass
class HeadOutput:
    logits: torch.Tensor  # [B, kept positions, vocab]: -inf outside the draft vocabulary
    hidden: torch.Tensor  # [B, kept positions, hidden]: what the children of these positions read


class _Attention(nn.Module):
    """Llama attention whose q/k/v read [norm(embed); norm(hidden)] (width 2*hidden)."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(2 * c.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, 2H] -> q [B, heads, T, d], k and v [B, kv_heads, T, d], rotated."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def attend(self, q, k, v, mask: torch.Tensor) -> torch.Tensor:
        """mask: bool [B or 1, 1, T, S] (True = visible) or additive float."""
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        B, _, T, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class _MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _MidLayer(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.self_attn = _Attention(c)
        self.mlp = _MLP(c)

    def attn_input(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], -1)

    def finish(self, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual over the fused hidden, then the MLP block; the output before the final norm."""
        h = hidden + attn_out
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Head(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        H, V = config.hidden_size, config.draft_vocab_size
        self.layer_ids = list(config.eagle_config["eagle_aux_hidden_state_layer_ids"])
        self.fc = nn.Linear(3 * config.target_hidden_size, H, bias=False)
        self.midlayer = _MidLayer(config)
        self.norm = LlamaRMSNorm(H, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(H, V, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.register_buffer("d2t", torch.zeros(V, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))
        self._embed: nn.Module | None = None  # the target's embeddings: attached, not owned

    # ------------------------------------------------------------ vocabulary and target

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        """Draft over these target token ids (any order; kept sorted, as d2t offsets assume)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).unique().sort().values
        if len(ids) != self.config.draft_vocab_size:
            raise ValueError(f"the draft vocabulary has {len(ids)} distinct tokens, the head {self.config.draft_vocab_size}")
        self.d2t.copy_(ids - torch.arange(len(ids)))
        self.t2d.zero_()
        self.t2d[ids] = True

    @property
    def draft_ids(self) -> torch.Tensor:
        """Target token id of each draft token [draft_vocab]."""
        return torch.arange(len(self.d2t), device=self.d2t.device) + self.d2t

    def attach(self, target_model: nn.Module) -> "Eagle3Head":
        object.__setattr__(self, "_embed", target_model.get_input_embeddings())
        return self

    @property
    def base_model(self) -> nn.Module:  # CachedLM looks for it; the head has no features to give
        return self

    # ------------------------------------------------------------ one pass (drafting)

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, cache=None, use_cache: bool = False,
                logits_to_keep: int = 0, position_ids=None, attention_mask=None) -> HeadOutput:
        """input_ids [B, T]; features [B, T, 3*target_hidden] (the target's, fused here) or
        [B, T, hidden] (the head's own outputs, for nodes drafted from drafted tokens).
        A KV cache (DynamicCache, as CachedLM passes it) is extended in place; attention_mask
        is None (causal over cache + new) or an additive/boolean 4D mask [1, 1, T, cached + T]."""
        hidden = self.fuse(features)
        B, T = input_ids.shape
        past = cache_length(cache) if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)[None]
        layer = self.midlayer
        cos, sin = self.rotary_emb(hidden, position_ids)
        q, k, v = layer.self_attn.qkv(layer.attn_input(self.embed(input_ids), hidden), cos, sin)
        if cache is not None:
            k, v = cache_append(cache, k, v, 0)
        if attention_mask is None:
            attention_mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(past)[None, None]
        out = layer.finish(hidden, layer.self_attn.attend(q, k, v, attention_mask.to(q.device)))
        out = last_rows(out, logits_to_keep)  # 0 keeps every row
        return HeadOutput(self.full_logits(self.draft_logits(out)), out)

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        features = features.to(self.fc.weight.dtype)
        return self.fc(features) if features.shape[-1] == self.fc.in_features else features

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._embed is None:
            raise RuntimeError("attach(target_model) before running an EAGLE-3 head")
        return self._embed(input_ids).to(self.fc.weight.dtype)

    def draft_logits(self, out: torch.Tensor) -> torch.Tensor:
        """[..., draft_vocab]"""
        return self.lm_head(self.norm(out))

    def full_logits(self, small: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits spread over the target's vocabulary (-inf elsewhere)."""
        full = small.new_full((*small.shape[:-1], self.config.vocab_size), float("-inf"))
        full[..., self.draft_ids] = small
        return full


# ---------------------------------------------------------------- saving and loading

def vllm_state_dict(head: Eagle3Head) -> dict[str, torch.Tensor]:
    """The head's tensors under the names vLLM's EAGLE-3 loader reads."""
    state = {}
    for name, value in head.state_dict().items():
        if name.startswith("rotary_emb"):
            continue  # derived from the config
        state[name] = value
    return state


def save_eagle3(head: Eagle3Head, out: str | Path, target_identity: dict, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = head.config.to_dict()
    config["verispec"] = {"target": target_identity, **(extra or {})}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    state = {k: (v.detach().to(torch.bfloat16) if v.is_floating_point() else v.detach()).contiguous()
             for k, v in vllm_state_dict(head).items()}
    save_file(state, str(out / WEIGHTS))
    return out


def is_eagle3_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.exists() and ARCHITECTURE in json.loads(config.read_text()).get("architectures", [])


def load_eagle3(path: str | Path, target_lm) -> Eagle3Head:
    """A saved head attached to target_lm (a LoadedModel), checked to be trained for it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").exists() or not (path / WEIGHTS).exists():
        raise ValueError(f"{path} is not an EAGLE-3 head directory (config.json and {WEIGHTS} expected); "
                         "train one with 'verispec train eagle3'")
    raw = json.loads((path / "config.json").read_text())
    if ARCHITECTURE not in raw.get("architectures", []):
        raise ValueError(f"{path} holds a {raw.get('architectures')} model, not an EAGLE-3 head")
    mine = raw.pop("verispec", {})
    tc = target_lm.model.config
    trained_for = mine.get("target", {})
    vocab_hash = tokenizer_identity(target_lm).get("vocab_hash") if getattr(target_lm, "tokenizer", None) else None
    if (raw.get("target_hidden_size", raw["hidden_size"]) != tc.hidden_size or raw["vocab_size"] != tc.vocab_size
            or (vocab_hash and trained_for.get("vocab_hash") not in (None, vocab_hash))):
        raise ValueError(f"the EAGLE-3 head in {path} was trained for another model "
                         f"({trained_for.get('name_or_path', '?')}: hidden {raw.get('target_hidden_size')}, vocab "
                         f"{raw['vocab_size']}); train one for this target with 'verispec train eagle3'")
    config = LlamaConfig(**raw)
    check_layer_ids(config.eagle_config["eagle_aux_hidden_state_layer_ids"], tc.num_hidden_layers)
    head = Eagle3Head(config)
    state = load_file(str(path / WEIGHTS))
    missing, unexpected = head.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.startswith("rotary_emb")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match an EAGLE-3 head (missing {missing}, unexpected {unexpected})")
    param = next(target_lm.model.parameters())
    head = head.to(dtype=param.dtype, device=param.device).eval().requires_grad_(False)
    return head.attach(target_lm.model)
