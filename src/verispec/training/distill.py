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
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .divergences import DIVERGENCES, agreement_stats, value_and_grad

DRAFT_RECORD = "verispec-draft.json"
SETTINGS = ("model", "layers", "divergence", "beta", "temperature", "lr", "batch_tokens", "on_policy",
            "on_policy_tokens", "train_embeddings", "feature_loss", "seed")


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
    """A frozen target, a trainable layer-subset draft, and one training step.

    Usable without the CLI: Distiller(target_lm, layers=[0, 3]).train_step(batch)."""

    def __init__(self, target: Any, layers: list[int], divergence: str = "fkl", beta: float = 0.5,
                 temperature: float = 1.0, lr: float = 3e-3, train_embeddings: bool = False,
                 chunk: int = 512, amp: bool | None = None, feature_weight: float = 0.0):
        from ..draft_init import layer_subset
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
        decay = [p for n, p in self.trainable.items() if p.ndim >= 2]
        no_decay = [p for n, p in self.trainable.items() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
        self.lr = lr
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

    def train_step(self, batch: Batch, lr: float | None = None, use_features: bool = True) -> float:
        """One optimizer step on the batch; returns the mean divergence over its answer positions."""
        target_logits = self.target_logits(batch, use_features)
        self.draft.train()
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
        if self.feature_weight > 0 and use_features and batch.features is not None:
            # EAGLE-style regression on the target's last hidden state (cached features): dense signal
            # that moves a layer subset into the head's input space quickly
            f = batch.features.float()
            surrogate = surrogate + self.feature_weight * ((hidden.float() - f) ** 2).sum() / (f ** 2).sum()
        surrogate.backward()
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.draft.eval()
        self.step += 1
        return total

    @torch.no_grad()
    def evaluate(self, batches: Sequence[Batch], use_features: bool = True) -> dict[str, float]:
        """Held-out divergence, top-1 agreement and expected acceptance sum min(p, q) at temperature 1."""
        from .divergences import divergence as pick
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
        with self._autocast():
            out = self.draft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad,
                                      eos_token_id=eos or None)
        result = []
        for p, row in zip(prompts, out[:, width:].tolist()):
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            result.append(Seq(torch.tensor(p + row[:cut]), len(p), None))
        return result

    # -- state

    def state_dict(self) -> dict[str, Any]:
        return {"trainable": {n: p.detach().clone() for n, p in self.trainable.items()},
                "optimizer": self.optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(state["trainable"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]


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
    from .cli import data_dirs, ensure_data
    from .data import load_manifest
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


def _lr_at(args, step: int, spent_s: float, warmup: int = 20) -> float:
    frac = min(1.0, spent_s / (args.minutes * 60.0))
    cosine = 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))
    return args.lr * min(1.0, (step + 1) / warmup) * cosine


def run(args) -> int:
    import verispec
    from .common import Budget, Progress, command_line, load_split, load_state, plot_losses, save_state, write_report

    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    lm = verispec.load_model(args.model, dtype=args.dtype)
    total_layers = len(lm.model.model.layers) if hasattr(lm.model, "model") else 0
    layers = parse_layers(args.layers, total_layers)
    data_dirs, has_features = _load_data(args, lm)
    train_samples, held_samples = load_split(data_dirs)
    train = [Seq(s.ids, s.prompt_len, s.features) for s in train_samples]
    held = [Seq(s.ids, s.prompt_len, s.features) for s in held_samples][:args.eval_samples]
    settings = {k: getattr(args, k) for k in SETTINGS}
    settings["layers"] = layers
    settings["data"] = [str(d.resolve()) for d in data_dirs]

    state = load_state(out)
    if state is not None:
        changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
        if changed:
            raise ValueError(f"{out} holds a training run with other settings ({', '.join(changed)}: "
                             f"{', '.join(repr(state['settings'].get(k)) for k in changed)}); "
                             "rerun with those, or use another --out")
    distiller = Distiller(lm, layers, args.divergence, args.beta, args.temperature, args.lr, args.train_embeddings,
                          feature_weight=args.feature_loss)
    use_features = has_features and train[0].features is not None
    if use_features and not _features_match(distiller, held[0]):
        print("[distill] the dataset's features do not reproduce this target's predictions; "
              "computing target logits with a forward pass instead", flush=True)
        use_features = False

    def batches_of(seqs: Sequence[Seq]) -> list[Batch]:
        groups = epoch_batches([len(s.ids) for s in seqs], args.batch_tokens, 0, 0)
        return [make_batch([seqs[i] for i in g], use_features) for g in sorted(groups)]

    held_batches = batches_of(held)
    if state is not None:
        distiller.load_state_dict(state["distiller"])
        torch.set_rng_state(state["torch_rng"])
        print(f"[distill] resuming {out} at step {distiller.step} ({state['spent_s'] / 60:.1f} min spent)", flush=True)
    else:
        print(f"[distill] draft: layers {layers} of {total_layers}; "
              f"{sum(p.numel() for p in distiller.trainable.values()) / 1e6:.1f}M trainable parameters; "
              f"{len(train)} training samples, {len(held)} held out; target logits from "
              f"{'cached features' if use_features else 'a target forward'}", flush=True)
        t0 = time.perf_counter()
        before = distiller.evaluate(held_batches, use_features)
        print(f"[distill] before: held-out agreement {before['agreement']:.4f}, acceptance "
              f"{before['acceptance']:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
        state = {"settings": settings, "spent_s": 0.0, "epoch": 0, "batch": 0, "trained_positions": 0,
                 "on_policy_steps": 0, "history": {"train loss": [], "held-out loss": [(0, before["loss"])],
                                                   "held-out agreement": [(0, before["agreement"])],
                                                   "held-out acceptance": [(0, before["acceptance"])]},
                 "before": before, "after": None}

    budget = Budget(args.minutes, state["spent_s"])
    progress = Progress("distill", budget)
    history = state["history"]
    lengths = [len(s.ids) for s in train]
    epoch, cursor = state["epoch"], state["batch"]
    plan = epoch_batches(lengths, args.batch_tokens, args.seed, epoch)
    last_ckpt = last_eval = budget.spent_s
    smooth = None
    positions_at_start, start = state["trained_positions"], time.perf_counter()

    def checkpoint() -> None:
        state.update(spent_s=budget.spent_s, epoch=epoch, batch=cursor, distiller=distiller.state_dict(),
                     torch_rng=torch.get_rng_state())
        save_state(out, state)

    while not budget.expired() and (args.max_steps is None or distiller.step < args.max_steps):
        if cursor >= len(plan):
            epoch, cursor = epoch + 1, 0
            plan = epoch_batches(lengths, args.batch_tokens, args.seed, epoch)
        seqs = [train[i] for i in plan[cursor]]
        cursor += 1
        on_policy = args.on_policy > 0 and random.Random(args.seed * 7919 + distiller.step).random() < args.on_policy
        if on_policy:
            seqs = distiller.sample_on_policy(seqs, args.on_policy_tokens, seed=args.seed * 7919 + distiller.step)
            batch = make_batch(seqs, use_features=False)
            state["on_policy_steps"] += 1
        else:
            batch = make_batch(seqs, use_features)
        loss = distiller.train_step(batch, lr=_lr_at(args, distiller.step, budget.spent_s),
                                    use_features=use_features and not on_policy)
        state["trained_positions"] += batch.positions
        smooth = loss if smooth is None else 0.9 * smooth + 0.1 * loss
        history["train loss"].append((distiller.step, loss))
        rate = (state["trained_positions"] - positions_at_start) / max(time.perf_counter() - start, 1e-9)
        progress(distiller.step, loss=smooth, epoch=epoch + cursor / len(plan), positions_per_s=rate)
        if budget.spent_s - last_eval >= args.eval_minutes * 60 and not budget.expired():
            m = distiller.evaluate(held_batches, use_features)
            for key in ("loss", "agreement", "acceptance"):
                history[f"held-out {key}"].append((distiller.step, m[key]))
            print(f"[distill] step {distiller.step}: held-out agreement {m['agreement']:.4f}, "
                  f"acceptance {m['acceptance']:.4f}", flush=True)
            last_eval = budget.spent_s
        if budget.spent_s - last_ckpt >= args.checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = budget.spent_s

    train_s = budget.spent_s
    checkpoint()
    after = state.get("after")
    if not after or after.get("step") != distiller.step:
        after = {**distiller.evaluate(held_batches, use_features), "step": distiller.step}
        state["after"] = after
        if history["held-out loss"][-1][0] != distiller.step:
            for key in ("loss", "agreement", "acceptance"):
                history[f"held-out {key}"].append((distiller.step, after[key]))
        save_state(out, state)
    before = state["before"]
    print(f"[distill] after {distiller.step} steps: held-out agreement {before['agreement']:.4f} -> "
          f"{after['agreement']:.4f}, acceptance {before['acceptance']:.4f} -> {after['acceptance']:.4f}", flush=True)

    record = {
        "target": str(args.model), "layers": layers, "settings": settings,
        "command": command_line(),
        "train_minutes": train_s / 60, "steps": distiller.step, "epochs": epoch + cursor / max(len(plan), 1),
        "on_policy_steps": state["on_policy_steps"],
        "target_logits": "cached features" if use_features else "target forward",
        "data": {"dir": [str(d) for d in data_dirs], "train_samples": len(train), "train_tokens": sum(lengths),
                 "train_answer_tokens": sum(len(s.ids) - s.prompt_len for s in train),
                 "held_out_samples": len(held), "held_out_positions": after["positions"],
                 "trained_positions": state["trained_positions"]},
        "parameters": {"draft": sum(p.numel() for p in distiller.draft.parameters()),
                       "trained": sum(p.numel() for p in distiller.trainable.values())},
        "before": before, "after": after,
    }
    export_draft(distiller, out, record)
    losses = {k: v for k, v in history.items() if k.endswith("loss")}
    plot_losses(losses, out / "loss.png", f"distillation ({args.divergence}), layers {layers}")
    plot_losses({k: v for k, v in history.items() if not k.endswith("loss")}, out / "agreement.png",
                "held-out agreement with the target")
    write_report(out, {**record, "history": history})
    print(f"[distill] draft saved in {out} (use --method draft-model --draft {out})", flush=True)
    return 0
