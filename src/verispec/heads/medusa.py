"""Medusa heads (Cai et al. 2024, Medusa-1): K extra decoding heads on the target's features.

Head k (1-based) reads the target's feature at position t (its last hidden state after the
final norm, what the target's LM head reads) and predicts the token at t + 1 + k: the
target's own head predicts t + 1, so head 1 guesses one token further, head 2 two, ...
Each head is L residual blocks, x <- x + SiLU(W x + b), followed by a vocabulary
projection. W and b start at zero, so a fresh block is the identity and a fresh head is
the target's own head (restricted to the draft vocabulary, below).

Draft vocabulary: a full projection is vocab x hidden per head (49152 x 576 for SmolLM2,
56 MB in bfloat16 each) and dominates training cost on a CPU. The heads project onto a
truncated vocabulary instead: `token_map` [V'] lists the target token ids the heads can
propose (the most frequent answer tokens of the training data), and the projection rows
start as the target's LM head rows of those tokens. Logits of tokens outside the map are
-inf (such tokens are never drafted; the target still verifies exactly as always).

On-disk layout: the one vLLM loads as a Medusa draft model
(vllm/model_executor/models/medusa.py, class Medusa, and its config class
vllm/transformers_utils/configs/medusa.py, MedusaConfig):

  config.json        architectures ["MedusaModel"], model_type "medusa", hidden_size,
                     vocab_size (the target's), num_heads, num_hidden_layers (blocks per
                     head), truncated_vocab_size, medusa_fc_bias (true: our blocks have a
                     bias; vLLM's default is false), original_lm_head (true: one projection
                     shared by all heads), max_paths, topk; plus our own "verispec" entry
                     (target name, tokenizer hash, measured per-head rank accuracies).
                     Note: vLLM renames any top-level key containing "num" and "heads" or
                     "layers", so our own keys avoid "num".
  model.safetensors  blocks.{h}.layers.{l}.weight [hidden, hidden], blocks.{h}.layers.{l}.bias
                     [hidden], lm_heads.{h}.weight [truncated_vocab_size, hidden] (only
                     lm_heads.0.weight when original_lm_head), token_map [truncated_vocab_size]
                     int64 (only when truncated_vocab_size < vocab_size; vLLM scatters the
                     truncated logits into the full vocabulary with -inf elsewhere, as here).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
ARCHITECTURE = "MedusaModel"
FORMAT_VERSION = 1


class ResidualBlock(nn.Module):
    """x <- x + SiLU(W x + b), `layers` times; W, b start at zero (the identity)."""

    def __init__(self, hidden_size: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden_size, hidden_size, bias=True) for _ in range(layers))
        for layer in self.layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + self.act(layer(x))
        return x


class MedusaHeads(nn.Module):
    """K Medusa heads over a draft vocabulary of `token_map` (default: the whole vocabulary).

    forward(features [..., hidden]) -> logits [..., K, V'] over the draft vocabulary;
    full_logits() scatters them into the target's vocabulary (-inf outside the map).
    """

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int = 4, num_layers: int = 1,
                 token_map: torch.Tensor | None = None, shared_lm_head: bool = False):
        super().__init__()
        if num_heads < 1 or num_layers < 0:
            raise ValueError(f"Medusa needs >= 1 head and >= 0 layers per head (got {num_heads}, {num_layers})")
        if token_map is None:
            token_map = torch.arange(vocab_size)
        token_map = torch.as_tensor(token_map, dtype=torch.long)
        if token_map.ndim != 1 or not len(token_map) or len(set(token_map.tolist())) != len(token_map) \
                or int(token_map.min()) < 0 or int(token_map.max()) >= vocab_size:
            raise ValueError(f"token_map must list distinct token ids in [0, {vocab_size})")
        self.hidden_size, self.vocab_size = int(hidden_size), int(vocab_size)
        self.num_heads, self.num_layers, self.shared_lm_head = int(num_heads), int(num_layers), bool(shared_lm_head)
        self.blocks = nn.ModuleList(ResidualBlock(hidden_size, num_layers) for _ in range(num_heads))
        draft_vocab = len(token_map)
        self.lm_heads = nn.ModuleList(nn.Linear(hidden_size, draft_vocab, bias=False)
                                      for _ in range(1 if shared_lm_head else num_heads))
        self.register_buffer("token_map", token_map, persistent=True)
        self.meta: dict[str, Any] = {}  # the "verispec" entry of config.json

    @property
    def draft_vocab_size(self) -> int:
        return len(self.token_map)

    @property
    def truncated(self) -> bool:
        return self.draft_vocab_size < self.vocab_size

    def init_from_target(self, lm_head_weight: torch.Tensor) -> "MedusaHeads":
        """Projection rows := the target's LM head rows of the draft vocabulary."""
        if tuple(lm_head_weight.shape) != (self.vocab_size, self.hidden_size):
            raise ValueError(f"the target's LM head is {tuple(lm_head_weight.shape)}, the heads expect "
                             f"({self.vocab_size}, {self.hidden_size})")
        rows = lm_head_weight.detach()[self.token_map.to(lm_head_weight.device)]
        with torch.no_grad():
            for head in self.lm_heads:
                head.weight.copy_(rows.to(head.weight))
        return self

    def head_projection(self, k: int) -> nn.Linear:
        """The vocabulary projection of head k (0-based)."""
        return self.lm_heads[0 if self.shared_lm_head else k]

    def hidden(self, features: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., K, hidden]: every head's block output."""
        return torch.stack([block(features) for block in self.blocks], dim=-2)

    def forward(self, features: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """[..., hidden] -> logits [..., K, V'] over the draft vocabulary (only the first `upto` heads if given)."""
        blocks = self.blocks[: self.num_heads if upto is None else upto]
        return torch.stack([self.head_projection(k)(block(features)) for k, block in enumerate(blocks)], dim=-2)

    def full_logits(self, features: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """[..., hidden] -> logits [..., K, vocab]: -inf for tokens outside the draft vocabulary."""
        return self.to_full_vocab(self(features, upto))

    def to_full_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [..., V'] -> [..., vocab], -inf outside the map."""
        if not self.truncated:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        full[..., self.token_map] = logits
        return full


# ---------------------------------------------------------------- checkpoint (vLLM's layout)

def medusa_config(heads: MedusaHeads, target_name: str, dtype: torch.dtype) -> dict:
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "medusa",
        "hidden_size": heads.hidden_size,
        "vocab_size": heads.vocab_size,
        "num_heads": heads.num_heads,
        "num_hidden_layers": heads.num_layers,
        "truncated_vocab_size": heads.draft_vocab_size,
        "medusa_fc_bias": True,
        "original_lm_head": heads.shared_lm_head,
        "max_paths": 64,
        "topk": 10,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "verispec": {"format": FORMAT_VERSION, "target": str(target_name), **heads.meta},
    }


def save_medusa(heads: MedusaHeads, directory: str | Path, target_name: str,
                dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write config.json + model.safetensors in vLLM's Medusa layout (see the module docstring).

    heads.meta goes into config.json's "verispec" entry; the drafter expects "vocab_hash"
    there (the target tokenizer's identity, verispec.models.tokenizer_identity)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, value in heads.state_dict().items():
        if name == "token_map":
            if heads.truncated:
                tensors[name] = value.detach().to(torch.int64).contiguous().cpu()
            continue
        tensors[name] = value.detach().to(dtype).contiguous().cpu()
    tmp = directory / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.rename(directory / WEIGHTS)
    (directory / CONFIG).write_text(json.dumps(medusa_config(heads, target_name, dtype), indent=1))
    return directory


def read_medusa_config(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / CONFIG
    if not directory.is_dir() or not path.is_file() or not (directory / WEIGHTS).is_file():
        raise ValueError(f"{directory} holds no Medusa heads (config.json + {WEIGHTS}); train some with "
                         "'verispec train medusa --out DIR'")
    config = json.loads(path.read_text())
    if config.get("model_type") != "medusa":
        raise ValueError(f"{path} is not a Medusa config (model_type {config.get('model_type')!r})")
    return config


def load_medusa(directory: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> MedusaHeads:
    """Heads saved by save_medusa (or any vLLM-layout Medusa checkpoint with bias blocks)."""
    directory = Path(directory)
    config = read_medusa_config(directory)
    tensors = {k.removeprefix("medusa_heads."): v for k, v in load_file(str(directory / WEIGHTS)).items()}
    vocab, draft_vocab = int(config["vocab_size"]), int(config.get("truncated_vocab_size") or config["vocab_size"])
    token_map = tensors.pop("token_map", None)
    if draft_vocab < vocab and token_map is None:
        raise ValueError(f"{directory}: truncated_vocab_size {draft_vocab} < vocab_size {vocab} but no token_map tensor")
    heads = MedusaHeads(int(config["hidden_size"]), vocab, int(config["num_heads"]), int(config["num_hidden_layers"]),
                        token_map=token_map if draft_vocab < vocab else None,
                        shared_lm_head=bool(config.get("original_lm_head", False)))
    expected = {k: tuple(v.shape) for k, v in heads.state_dict().items() if k != "token_map"}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise ValueError(f"{directory}/{WEIGHTS} does not match its config: missing {missing}, unexpected {extra}, "
                         f"wrong shapes {wrong}")
    target_dtype = dtype or next(iter(tensors.values())).dtype
    heads.load_state_dict({**tensors, "token_map": heads.token_map}, strict=True)
    heads.meta = dict(config.get("verispec", {}))
    heads.meta.pop("format", None)
    heads.meta.pop("target", None)
    heads.target_name = config.get("verispec", {}).get("target")
    return heads.to(device=device, dtype=target_dtype).requires_grad_(False).eval()
