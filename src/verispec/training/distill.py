"""Distil a draft model from the target (DistillSpec): a subset of its layers trained to agree with it.

DistillSpec (Zhou et al. 2024) trains the draft to minimise a divergence between the
target's next-token distribution p and its own q, on the target's own text (fixed data)
and on text the draft samples itself (on-policy data), because speculative decoding pays
off exactly as far as q agrees with p: a drafted token is accepted with probability
sum_v min(p(v), q(v)) = 1 - TVD(p, q).

How this trainer does it, and why:

- The draft starts as `draft_init.layer_subset` of the target (--layers: indices, ranges, or
  a count spread evenly from the first to the last layer). It keeps the target's
  embeddings, final norm and (tied) head.
- The embedding matrix, which is also the head (tied, as in SmolLM2), is frozen by default:
  it is 28M of SmolLM2-135M's 135M parameters and the bulk of a small draft; keeping it the
  target's means the draft only has to learn to reproduce the target's last hidden state,
  with far fewer trainable parameters (and optimizer state) for a CPU-sized budget.
  --train-embeddings trains it (still tied).
- Target logits on fixed data come from the dataset's cached features (the target's last
  hidden states after the final norm): p = softmax(head(features)), one matrix product per
  position instead of a target forward (about 14x cheaper on CPU). A dataset without
  features, features that do not reproduce the loaded target, and on-policy data get a
  frozen target forward instead (in the target's dtype, bfloat16 where fast).
- On-policy data is off by default (--on-policy 0): the fixed data is the target's own
  greedy text, which is exactly the context a draft sees in greedy speculative decoding,
  and an on-policy step (draft sampling plus a full target forward) costs about twice a
  fixed one; in a 4-minute comparison on SmolLM2 a 0.25 mix reached 19% held-out
  agreement against 28% without it.
- The loss covers answer positions only (where drafting happens); prompts are context.
  The head and the divergence run in chunks of positions with the gradient written out
  (divergences.value_and_grad), so no [positions, vocab] tensor outlives its chunk.
- Draft weights are float32; matrix products run in bfloat16 autocast where the target is
  bfloat16. The output directory is a Hugging Face model (float32 safetensors, the target's
  tokenizer and generation config) for `--draft DIR`, and the checkpoint beside it lets a
  rerun with the same --out (and a larger --minutes) continue.
- Training runs on the shared skeleton (trainer.py): its budget, schedule, resume, report and
  best-checkpoint choice, by held-out expected acceptance (what drafting pays for).
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..draft_init import layer_subset
from ..models import load_model, tokenizer_identity
from .common import as_dirs, command_line, data_dirs, ensure_data, load_split
from .data import load_manifest
from .divergences import DIVERGENCES, agreement_stats, divergence as pick, value_and_grad
from .trainer import TrainConfig, data_identity, train

DRAFT_RECORD = "verispec-draft.json"


def add_arguments(p) -> None:
    p.add_argument("--layers", default="4",
                   help="target decoder layers the draft keeps: a count N (spread evenly, first and last "
                        "included; default 4), or indices and ranges like '0,10,20,29' or '0-2,29'")
    p.add_argument("--divergence", default="fkl", choices=sorted(DIVERGENCES),
                   help="fkl = KL(p||q), rkl = KL(q||p), tvd = total variation, jsd = generalized JSD[beta]")
    p.add_argument("--beta", type=float, default=0.5, help="JSD's beta (0 < beta < 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of p and q in the loss")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (warmup, then cosine over "
                                                         "the time budget to a tenth)")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per training batch")
    p.add_argument("--on-policy", type=float, default=0.0,
                   help="fraction of steps on on-policy data: the draft samples continuations of dataset "
                        "prompts, the target scores them (DistillSpec's student-generated data)")
    p.add_argument("--on-policy-tokens", type=int, default=64, help="tokens the draft samples per prompt")
    p.add_argument("--train-embeddings", action="store_true",
                   help="train the (tied) embeddings/head too; default: frozen, the target's own")
    p.add_argument("--feature-loss", type=float, default=0.0,
                   help="weight of an extra regression of the draft's last hidden state on the target's "
                        "(cached features; relative squared error)")
    p.add_argument("--dtype", default="auto", help="the target's dtype (auto: bfloat16 where fast)")
    p.add_argument("--eval-samples", type=int, default=64, help="held-out samples for agreement/acceptance")
    p.add_argument("--eval-minutes", type=float, default=5.0, help="held-out evaluation every so many minutes")
    p.add_argument("--max-steps", type=int, help="also stop after this many optimizer steps (repeatable runs)")
    p.add_argument("--checkpoint-minutes", type=float, default=2.0, help="checkpoint every so many minutes")


@dataclass
class DistillSettings:
    layers: str | list[int] = "4"  # a count, or indices and ranges (parse_layers); the task resolves it
    divergence: str = "fkl"
    beta: float = 0.5
    temperature: float = 1.0
    batch_tokens: int = 2048
    on_policy: float = 0.0  # the fraction of batches the draft samples itself
    on_policy_tokens: int = 64
    train_embeddings: bool = False
    feature_loss: float = 0.0
    eval_samples: int = 64
    data: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- layers

def parse_layers(spec: str | int | Sequence[int], total: int) -> list[int]:
    """'4' (a count: evenly spread, first and last included), '0,10,20,29', '0-2,29', or a list."""
    if isinstance(spec, (list, tuple)):
        layers = [int(i) for i in spec]
    else:
        text = str(spec).replace(" ", "")
        if text.isdigit():
            n = int(text)
            if not 1 <= n <= total:
                raise ValueError(f"--layers {n}: a draft keeps between 1 and {total} of the target's {total} layers")
            layers = [0] if n == 1 else sorted({round(i * (total - 1) / (n - 1)) for i in range(n)})
        else:
            layers = []
            try:
                for part in filter(None, text.split(",")):
                    a, _, b = part.partition("-")
                    layers += list(range(int(a), int(b) + 1)) if b else [int(a)]
            except ValueError:
                raise ValueError(f"--layers {spec!r}: give a count like 4, or indices and ranges like "
                                 "'0,10,20,29' or '0-2,29'") from None
    if not layers or any(not 0 <= i < total for i in layers) or sorted(set(layers)) != layers:
        raise ValueError(f"--layers {spec!r}: need increasing, distinct layer indices in [0, {total - 1}] "
                         f"(the target has {total} layers)")
    return layers


# ----------------------------------------------------------------------------- batches

@dataclass
class Seq:
    ids: torch.Tensor  # [T] long
    prompt_len: int  # positions prompt_len-1 .. T-2 predict the answer tokens
    features: torch.Tensor | None  # [T, hidden] the target's last hidden states, or None


@dataclass
class Batch:
    ids: torch.Tensor  # [B, W] right padded
    attention_mask: torch.Tensor  # [B, W]
    rows: torch.Tensor  # [N] batch index of each answer position
    cols: torch.Tensor  # [N] its position (it predicts ids[row, col + 1])
    features: torch.Tensor | None  # [N, hidden] the target's features at those positions, or None

    @property
    def positions(self) -> int:
        return int(self.rows.numel())


def make_batch(seqs: Sequence[Seq], use_features: bool) -> Batch:
    width = max(len(s.ids) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, cols, feats = [], [], []
    for i, s in enumerate(seqs):
        n = len(s.ids)
        ids[i, :n], mask[i, :n] = s.ids, 1
        span = torch.arange(max(s.prompt_len - 1, 0), n - 1)
        rows.append(torch.full_like(span, i))
        cols.append(span)
        if use_features:
            feats.append(s.features[span])
    return Batch(ids, mask, torch.cat(rows), torch.cat(cols), torch.cat(feats) if use_features else None)


def epoch_batches(lengths: Sequence[int], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Sample indices of each batch of an epoch: shuffled, grouped by similar length (little
    padding), at most batch_tokens padded tokens each; deterministic for (seed, epoch)."""
    rng = random.Random(seed * 100003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = max(1, 8 * batch_tokens // max(1, int(sum(lengths) / max(1, len(lengths)))))
    batches: list[list[int]] = []
    for w in range(0, len(order), window):
        group = sorted(order[w:w + window], key=lambda i: lengths[i])
        current: list[int] = []
        for i in group:
            if current and (len(current) + 1) * max(lengths[j] for j in current + [i]) > batch_tokens:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
    rng.shuffle(batches)
    return batches


# ----------------------------------------------------------------------------- the trainer

class Distiller:
    """A frozen target, a trainable layer-subset draft, the loss of a batch and its evaluation.

    Usable without the CLI: Distiller(target_lm, layers=[0, 3]).train_step(batch) (one AdamW step
    of its own; `verispec train draft-model` trains with the skeleton's optimizer instead)."""

    def __init__(self, target: Any, layers: list[int], divergence: str = "fkl", beta: float = 0.5,
                 temperature: float = 1.0, lr: float = 3e-3, train_embeddings: bool = False,
                 chunk: int = 512, amp: bool | None = None, feature_weight: float = 0.0):
        if divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(sorted(DIVERGENCES))}")
        if divergence == "jsd" and not 0.0 < beta < 1.0:
            raise ValueError(f"JSD needs 0 < beta < 1, got {beta}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.target, self.layers, self.feature_weight = target, list(layers), feature_weight
        self.divergence, self.beta, self.temperature, self.chunk = divergence, beta, temperature, chunk
        target_dtype = next(target.model.parameters()).dtype
        self.amp = (target_dtype == torch.bfloat16) if amp is None else amp
        self.draft_lm = layer_subset(target, self.layers)
        self.draft = self.draft_lm.model.float()
        self.draft.requires_grad_(False)
        for module in (*self.draft.model.layers, self.draft.model.norm):
            module.requires_grad_(True)
        if train_embeddings:
            self.draft.get_input_embeddings().requires_grad_(True)
            self.draft.get_output_embeddings().requires_grad_(True)
        self.trainable = {n: p for n, p in self.draft.named_parameters() if p.requires_grad}
        self.lr = lr
        self.optimizer = None  # train_step's, made on first use
        self.step = 0

    # -- the two sides' logits

    def _autocast(self):
        return torch.autocast("cpu" if self.draft.device.type == "cpu" else self.draft.device.type,
                              dtype=torch.bfloat16, enabled=self.amp)

    @torch.no_grad()
    def target_logits(self, batch: Batch, use_features: bool = True) -> torch.Tensor:
        """p's logits at the batch's answer positions [N, vocab]: from cached features, or a target forward."""
        head = self.target.model.get_output_embeddings()
        if use_features and batch.features is not None:
            hidden = batch.features.to(head.weight.dtype)
        else:
            out = self.target.model.base_model(input_ids=batch.ids, attention_mask=batch.attention_mask)
            hidden = out.last_hidden_state[batch.rows, batch.cols]
        return head(hidden)

    def draft_hidden(self, batch: Batch) -> torch.Tensor:
        """The draft's last hidden states at the answer positions [N, hidden] (with grad if enabled)."""
        with self._autocast():
            out = self.draft.model(input_ids=batch.ids, attention_mask=batch.attention_mask)
        return out.last_hidden_state[batch.rows, batch.cols]

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.draft.get_output_embeddings()(hidden)

    # -- training and evaluation

    def loss(self, batch: Batch, use_features: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch's loss: its value is the mean divergence over the answer positions (plus the
        feature term), its gradient the divergence's. The head and the divergence run in chunks with
        their gradient written out, so this already accumulates the gradients of a trainable head;
        the returned tensor's backward carries the rest into the layers."""
        target_logits = self.target_logits(batch, use_features)
        hidden = self.draft_hidden(batch)
        leaf = hidden.detach().requires_grad_(True)
        weights = torch.full((batch.positions,), 1.0 / batch.positions)
        total = 0.0
        for c in range(0, batch.positions, self.chunk):
            logits = self._head(leaf[c:c + self.chunk])
            value, grad = value_and_grad(self.divergence, target_logits[c:c + self.chunk], logits,
                                         weights[c:c + self.chunk], self.temperature, self.beta)
            logits.backward(grad.to(logits.dtype))
            total += float(value)
        surrogate = (hidden.float() * leaf.grad).sum()  # carries the divergence's gradient into the layers
        parts = {"divergence": total}
        value = total
        if self.feature_weight > 0 and use_features and batch.features is not None:
            # EAGLE-style regression on the target's last hidden state (cached features): dense signal
            # that moves a layer subset into the head's input space quickly
            f = batch.features.float()
            feature = ((hidden.float() - f) ** 2).sum() / (f ** 2).sum()
            surrogate = surrogate + self.feature_weight * feature
            parts["feature"] = feature.item()
            value += self.feature_weight * feature.item()
        return surrogate - surrogate.detach() + value, parts

    def train_step(self, batch: Batch, lr: float | None = None, use_features: bool = True) -> float:
        """One AdamW step on the batch (weight decay 0.01 on matrices, as the CLI trains); returns the
        mean divergence over its answer positions."""
        if self.optimizer is None:
            matrices = [p for p in self.trainable.values() if p.ndim >= 2]
            others = [p for p in self.trainable.values() if p.ndim < 2]
            self.optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.01},
                                                {"params": others, "weight_decay": 0.0}], lr=self.lr, betas=(0.9, 0.98))
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self.draft.train()
        loss, parts = self.loss(batch, use_features)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.draft.eval()
        self.step += 1
        return parts["divergence"]

    @torch.no_grad()
    def evaluate(self, batches: Sequence[Batch], use_features: bool = True) -> dict[str, float]:
        """Held-out divergence, top-1 agreement and expected acceptance sum min(p, q) at temperature 1."""
        loss_fn = pick(self.divergence, self.beta)
        sums = {"loss": 0.0, "agree": 0.0, "accept": 0.0, "positions": 0.0}
        for batch in batches:
            target_logits = self.target_logits(batch, use_features)
            hidden = self.draft_hidden(batch)
            for c in range(0, batch.positions, self.chunk):
                t, d = target_logits[c:c + self.chunk], self._head(hidden[c:c + self.chunk])
                stats = agreement_stats(t, d, 1.0)
                sums["loss"] += float(loss_fn(t, d, self.temperature, reduction="none").sum())
                for k in ("agree", "accept", "positions"):
                    sums[k] += stats[k]
        n = max(sums["positions"], 1.0)
        return {"loss": sums["loss"] / n, "agreement": sums["agree"] / n, "acceptance": sums["accept"] / n,
                "positions": int(sums["positions"])}

    @torch.no_grad()
    def sample_on_policy(self, seqs: Sequence[Seq], max_new_tokens: int, seed: int) -> list[Seq]:
        """The draft's own continuations of the sequences' prompts (temperature 1), as new samples
        without features (the target scores them with a forward pass)."""
        prompts = [s.ids[:s.prompt_len].tolist() for s in seqs]
        eos = list(getattr(self.target, "eos_token_ids", []) or [])
        pad = eos[0] if eos else 0
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        torch.manual_seed(seed)
        training = self.draft.training
        self.draft.eval()
        with self._autocast():
            out = self.draft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad,
                                      eos_token_id=eos or None)
        self.draft.train(training)
        result = []
        for p, row in zip(prompts, out[:, width:].tolist()):
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            result.append(Seq(torch.tensor(p + row[:cut]), len(p), None))
        return result


def export_draft(distiller: Distiller, out: Path, record: dict[str, Any]) -> None:
    """Write the draft as a Hugging Face model directory usable as `--draft OUT`."""
    out.mkdir(parents=True, exist_ok=True)
    model = distiller.draft
    model.config.dtype = torch.float32
    model.save_pretrained(out)
    tokenizer = getattr(distiller.target, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / DRAFT_RECORD).write_text(json.dumps(record, indent=1))
    before, after = record.get("before") or {}, record.get("after") or {}

    def fmt(m, key):
        return f"{100 * m[key]:.1f}%" if key in m else "?"

    (out / "README.md").write_text(
        f"# Distilled draft for {record['target']}\n\n"
        f"A {len(record['layers'])}-layer draft model for `verispec --method draft-model --draft {out}`: "
        f"layers {record['layers']} of the target, trained with `verispec train draft-model` "
        f"(DistillSpec, divergence {record['settings']['divergence']}).\n\n"
        f"    {record['command']}\n\n"
        f"| held-out | before | after |\n|---|---|---|\n"
        f"| top-1 agreement with the target | {fmt(before, 'agreement')} | {fmt(after, 'agreement')} |\n"
        f"| expected acceptance sum min(p, q) | {fmt(before, 'acceptance')} | {fmt(after, 'acceptance')} |\n\n"
        f"Trained {record['train_minutes']:.1f} min, {record['steps']} steps, "
        f"{record['data']['trained_positions']} answer positions seen "
        f"({record['data']['train_samples']} samples, {record['data']['train_answer_tokens']} answer tokens "
        f"in the training split). Details: training.json, {DRAFT_RECORD}.\n")


# ----------------------------------------------------------------------------- the command

def _check_args(args) -> None:
    if args.divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {args.divergence!r}; choose one of {', '.join(sorted(DIVERGENCES))}")
    if args.divergence == "jsd" and not 0.0 < args.beta < 1.0:
        raise ValueError(f"--beta must be in (0, 1) for jsd, got {args.beta}")
    if not 0.0 <= args.on_policy <= 1.0:
        raise ValueError(f"--on-policy is a fraction of steps in [0, 1], got {args.on_policy}")
    for name in ("lr", "temperature", "minutes", "batch_tokens", "on_policy_tokens", "eval_samples"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")


def _load_data(args, lm) -> tuple[list[Path], bool]:
    """The dataset directories, and whether they all hold the target's features (which spare
    a target forward per step)."""
    paths = data_dirs(args)
    features = all(load_manifest(p).get("features") for p in paths if (p / "manifest.json").exists())
    return ensure_data(args, lm, features=features), features


def _features_match(distiller: Distiller, seq: Seq) -> bool:
    """Do the dataset's features reproduce the loaded target's own predictions? (another model
    with the same tokenizer, or another dtype far off, would not)."""
    batch = make_batch([seq], use_features=True)
    cached = distiller.target_logits(batch, use_features=True).float()
    fresh = distiller.target_logits(batch, use_features=False).float()
    agree = float((cached.argmax(-1) == fresh.argmax(-1)).float().mean())
    return agree >= 0.9


class DistillTask:
    """The draft-model distillation on the skeleton. Batches are sample groups of similar length,
    drawn per epoch (epoch_batches); with on-policy data, each epoch also decides (seeded) which
    batches the draft answers itself, and loss() samples those answers with the draft as it is at
    that step. Score: held-out expected acceptance sum min(p, q)."""

    name = "draft-model"
    score_name = "expected acceptance"

    def __init__(self, lm, settings: DistillSettings, data=None, target_name: str = "", seed: int = 0,
                 use_features: bool = True, show: bool = True):

        s = self.s = settings
        if not 0.0 <= s.on_policy <= 1.0:
            raise ValueError(f"on-policy is a fraction of batches in [0, 1], got {s.on_policy}")
        self.lm, self.target_name, self.seed = lm, str(target_name), seed
        self.total_layers = len(lm.model.model.layers) if hasattr(lm.model, "model") else 0
        s.layers = parse_layers(s.layers, self.total_layers)
        self.dirs = as_dirs(data if data is not None else s.data)
        train_samples, held_samples = load_split(self.dirs)
        self.train = [Seq(x.ids, x.prompt_len, x.features) for x in train_samples]
        self.held = [Seq(x.ids, x.prompt_len, x.features) for x in held_samples][:s.eval_samples]
        self.distiller = Distiller(lm, s.layers, s.divergence, s.beta, s.temperature,
                                   train_embeddings=s.train_embeddings, feature_weight=s.feature_loss)
        self.use_features = use_features and self.train[0].features is not None and self.held[0].features is not None
        if self.use_features and not _features_match(self.distiller, self.held[0]):
            if show:
                print("[distill] the dataset's features do not reproduce this target's predictions; "
                      "computing target logits with a forward pass instead", flush=True)
            self.use_features = False
        groups = epoch_batches([len(x.ids) for x in self.held], s.batch_tokens, 0, 0)
        self.held_batches = [make_batch([self.held[i] for i in g], self.use_features) for g in sorted(groups)]
        self.on_policy_steps = self.trained_positions = 0

    def settings(self) -> dict:

        s = asdict(self.s)
        s["data"] = data_identity(self.dirs)
        return {"model": self.target_name, **s, "target": tokenizer_identity(self.lm).get("vocab_hash")}

    def module(self):
        return self.distiller.draft

    def batches(self, epoch: int):
        groups = epoch_batches([len(x.ids) for x in self.train], self.s.batch_tokens, self.seed, epoch)
        rng = random.Random(self.seed * 7919 + epoch)
        return [{"samples": g, "on_policy": rng.randrange(2 ** 31) if rng.random() < self.s.on_policy else None}
                for g in groups]

    def loss(self, batch):
        seqs = [self.train[i] for i in batch["samples"]]
        on_policy = batch["on_policy"] is not None
        if on_policy:
            seqs = self.distiller.sample_on_policy(seqs, self.s.on_policy_tokens, seed=batch["on_policy"])
            self.on_policy_steps += 1
        b = make_batch(seqs, self.use_features and not on_policy)
        self.trained_positions += b.positions
        return self.distiller.loss(b, self.use_features and not on_policy)

    def evaluate(self, quick: bool) -> dict:
        m = self.distiller.evaluate(self.held_batches, self.use_features)
        return {"score": m["acceptance"], **m}

    def task_state(self) -> dict:
        return {"on_policy_steps": self.on_policy_steps, "trained_positions": self.trained_positions}

    def load_task_state(self, state: dict) -> None:
        self.on_policy_steps, self.trained_positions = state["on_policy_steps"], state["trained_positions"]

    def describe(self) -> dict:
        d = self.distiller
        return {"target": self.target_name, "layers": self.s.layers, "on_policy_steps": self.on_policy_steps,
                "target_logits": "cached features" if self.use_features else "target forward",
                "data": {"dir": [str(x) for x in self.dirs], "train_samples": len(self.train),
                         "train_tokens": sum(len(x.ids) for x in self.train),
                         "train_answer_tokens": sum(len(x.ids) - x.prompt_len for x in self.train),
                         "held_out_samples": len(self.held),
                         "held_out_positions": sum(b.positions for b in self.held_batches),
                         "trained_positions": self.trained_positions},
                "parameters": {"draft": sum(p.numel() for p in d.draft.parameters()),
                               "trained": sum(p.numel() for p in d.trainable.values())}}

    def save(self, out: Path, report: dict) -> None:
        keys = ("loss", "agreement", "acceptance", "positions")
        record = {**{k: report[k] for k in ("target", "layers", "settings", "command", "steps", "best_step", "epochs",
                                            "on_policy_steps", "target_logits", "data", "parameters")},
                  "train_minutes": report["train_minutes"], "before": report.get("before"),
                  "after": {k: report[k] for k in keys}}
        export_draft(self.distiller, out, record)


def run(args) -> int:

    _check_args(args)
    torch.manual_seed(args.seed)
    lm = load_model(args.model, dtype=args.dtype)
    total_layers = len(lm.model.model.layers) if hasattr(lm.model, "model") else 0
    layers = parse_layers(args.layers, total_layers)
    data_dirs, has_features = _load_data(args, lm)
    settings = DistillSettings(layers=layers, divergence=args.divergence, beta=args.beta, temperature=args.temperature,
                               batch_tokens=args.batch_tokens, on_policy=args.on_policy,
                               on_policy_tokens=args.on_policy_tokens, train_embeddings=args.train_embeddings,
                               feature_loss=args.feature_loss, eval_samples=args.eval_samples,
                               data=[str(d) for d in data_dirs])
    task = DistillTask(lm, settings, target_name=args.model, seed=args.seed, use_features=has_features)
    d = task.distiller
    print(f"[distill] draft: layers {layers} of {total_layers}; "
          f"{sum(p.numel() for p in d.trainable.values()) / 1e6:.1f}M trainable parameters; "
          f"{len(task.train)} training samples, {len(task.held)} held out; target logits from "
          f"{'cached features' if task.use_features else 'a target forward'}", flush=True)
    config = TrainConfig(minutes=args.minutes, max_steps=args.max_steps, lr=args.lr, warmup_steps=args.warmup_steps,
                         weight_decay=0.01, betas=(0.9, 0.98), clip=1.0, eval_every=0, eval_minutes=args.eval_minutes,
                         checkpoint_minutes=args.checkpoint_minutes, seed=args.seed)
    report = train(task, config, Path(args.out), command=command_line())
    before = report.get("before") or {}
    print(f"[distill] after {report['steps']} steps (kept: step {report['best_step']}): held-out agreement "
          f"{before.get('agreement', float('nan')):.4f} -> {report['agreement']:.4f}, acceptance "
          f"{before.get('acceptance', float('nan')):.4f} -> {report['acceptance']:.4f}", flush=True)
    print(f"[distill] draft saved in {args.out} (use --method draft-model --draft {args.out})", flush=True)
    return 0
