"""Medusa-1 heads: K heads learn the target's next tokens from its cached features (target frozen).

Data: a `verispec train data` dataset (prompts, the target's greedy answers, the target's
feature at every position). Head k (1-based) reads the feature at position t and learns the
token at t + 1 + k (the target's own head on that feature predicts t + 1).

Positions: only those whose next token t + 1 is an answer token, i.e. t >= prompt_len - 1.
These are the positions the heads meet when drafting (the feature of the last committed
token, the prompt's last token on the first step); prompt text is the user's, not the
target's, so heads trained on it would learn to predict text the target does not write.

Loss: cross-entropy against the target's answer tokens (its greedy choices), optionally
mixed (--distill a) with the cross-entropy against the target's full distribution at that
position (its LM head over the feature at t + k, restricted to the draft vocabulary). Head k
is weighted decay^(k-1) (Medusa: 0.8). Only the residual blocks and the heads' projections
train; the target is never run.

Draft vocabulary (--vocab): the heads project onto the V' tokens most frequent in the
training answers (then in the prompts, then by token id: BPE ids come roughly in merge
order, a frequency prior), which the checkpoint stores as vLLM's token_map. On this CPU a
full 49152-token projection per head would cost ~8x the time of an 8192-token one.

Precision (--dtype): float32 master weights; "bfloat16" runs the matrix products under CPU
autocast (measured on this machine, 4 heads, V' = 8192, 1024 positions: 0.58 s per step
against 1.47 s in float32).

Defaults, from 2-minute runs on 11 chunks of the smollm2-135m-instruct dataset: 3 heads (with
4, the best 16-node tree never reaches depth 4), V' = 4096 (twice the steps of 8192 in the
same time and better held-out top-1; ~94% of answer tokens; the drafting cost is one V' x
hidden product per head, ~1 ms per head at 8192 on one core), per-head projections (shared:
-10% top-1), lr 1e-3, no distillation term (it halves the step rate without gaining top-1).
Training runs on the shared skeleton (trainer.py: budget, schedule, resume, report). The
held-out chunk is evaluated every --eval-every minutes; the heads of the evaluation with the
best held-out top-1 (decay-weighted over heads) are saved, unless --last; so the held-out
chunk also picks the checkpoint. On the 15-chunk smollm2 dataset held-out top-1 levels off
after ~5 epochs while training loss keeps falling (the data, not the budget, is the limit).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..heads.medusa import MedusaHeads, save_medusa
from ..models import load_model, tokenizer_identity
from .common import as_dirs, command_line, ensure_data, load_split
from .data import check_dataset_for, token_ranking
from .trainer import TrainConfig, data_identity, train

IGNORE = -100
EVAL_RANKS = 10  # rank accuracies kept per head (they shape the drafter's default tree)


def add_arguments(p) -> None:
    p.add_argument("--heads", type=int, default=3, help="Medusa heads K (head k drafts the token k+1 ahead)")
    p.add_argument("--layers", type=int, default=1, help="residual blocks per head")
    p.add_argument("--vocab", type=int, default=4096, help="draft vocabulary size V' (0: the whole vocabulary)")
    p.add_argument("--shared-lm-head", action="store_true",
                   help="all heads share the target's (frozen) projection; only the blocks train")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (cosine decay over the budget)")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--batch-tokens", type=int, default=1024, help="positions per optimizer step")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of the loss against the target's full distribution (0: its tokens only)")
    p.add_argument("--decay", type=float, default=0.8, help="loss weight of head k is decay^(k-1)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="matrix-product precision (master weights stay float32)")
    p.add_argument("--eval-every", type=float, default=2.0, help="minutes between held-out evaluations")
    p.add_argument("--last", action="store_true",
                   help="save the heads as they end, not those of the evaluation with the best held-out top-1")
    p.add_argument("--steps", "--max-steps", dest="steps", type=int, default=0,
                   help="stop after this many optimizer steps in all (0: the budget decides)")


@dataclass
class MedusaSettings:
    heads: int = 3
    layers: int = 1
    vocab: int = 4096  # the draft vocabulary V' (0: the whole vocabulary)
    shared_lm_head: bool = False
    batch_tokens: int = 1024  # positions per step
    distill: float = 0.0
    decay: float = 0.8
    dtype: str = "bfloat16"  # the matrix products' precision (master weights float32)
    data: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- data

@dataclass
class PositionTable:
    """Every training position of a set of samples, ready for batching.

    features: [R, hidden] the target's features of rows P-1 .. T-1 of every sample
    rows: [N] the feature row of each training position t (t = P-1 .. T-2)
    labels: [N, K] target token ids at t+1+k (IGNORE past the sample's end)
    """

    features: torch.Tensor
    rows: torch.Tensor
    labels: torch.Tensor
    samples: int
    tokens: int  # all tokens of the samples, prompts included

    def __len__(self) -> int:
        return len(self.rows)


def position_table(samples, num_heads: int) -> PositionTable:
    feats, rows, labels = [], [], []
    offset, n_samples, n_tokens = 0, 0, 0
    for s in samples:
        if s.features is None:
            raise ValueError("the dataset has no target features; rebuild it with features (verispec train data)")
        ids, T, P = s.ids.long(), len(s.ids), max(int(s.prompt_len), 1)
        n_samples, n_tokens = n_samples + 1, n_tokens + T
        if T - P < 1:
            continue
        feats.append(s.features[P - 1:T])
        t = torch.arange(P - 1, T - 1)  # positions whose next token is an answer token
        rows.append(offset + t - (P - 1))
        target = t[:, None] + 1 + torch.arange(1, num_heads + 1)[None]  # [n, K] token index t+1+k
        lab = torch.full(target.shape, IGNORE, dtype=torch.long)
        ok = target < T
        lab[ok] = ids[target[ok]]
        labels.append(lab)
        offset += T - P + 1
    if not rows:
        raise ValueError("the dataset has no answer tokens to learn from")
    return PositionTable(torch.cat(feats), torch.cat(rows), torch.cat(labels), n_samples, n_tokens)


def choose_token_map(samples, vocab_size: int, size: int) -> torch.Tensor:
    """The draft vocabulary: most frequent answer tokens, then prompt tokens, then lowest ids."""
    if size <= 0 or size >= vocab_size:
        return torch.arange(vocab_size)
    return torch.sort(token_ranking(samples, vocab_size)[:size]).values


def draft_labels(labels: torch.Tensor, token_map: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Target token ids -> draft vocabulary indices (IGNORE where absent or out of the map)."""
    inverse = torch.full((vocab_size,), IGNORE, dtype=torch.long)
    inverse[token_map] = torch.arange(len(token_map))
    out = torch.full_like(labels, IGNORE)
    ok = labels != IGNORE
    out[ok] = inverse[labels[ok]]
    return out


# ---------------------------------------------------------------- training step and evaluation

def head_losses(heads, table: PositionTable, batch: torch.Tensor, mapped: torch.Tensor,
                teacher: torch.Tensor | None = None, distill: float = 0.0) -> list[torch.Tensor]:
    """Per-head mean loss over the batch positions `batch` (indices into table)."""
    x = table.features[table.rows[batch]].float()  # [B, hidden]
    losses = []
    for k, block in enumerate(heads.blocks):
        logits = heads.head_projection(k)(block(x)).float()  # [B, V']
        y = mapped[batch, k]
        hard = F.cross_entropy(logits, y, ignore_index=IGNORE) if (y != IGNORE).any() else logits.sum() * 0
        if distill > 0 and teacher is not None:
            valid = table.labels[batch, k] != IGNORE  # the position t+k exists
            if valid.any():
                with torch.no_grad():  # the target's distribution over token t+1+k, from its feature at t+k
                    p = torch.softmax(teacher(table.features[table.rows[batch[valid]] + k + 1].float()).float(), -1)
                soft = -(p * torch.log_softmax(logits[valid], -1)).sum(-1).mean()
                hard = (1 - distill) * hard + distill * soft
        losses.append(hard)
    return losses


@torch.no_grad()
def evaluate(heads, table: PositionTable, mapped: torch.Tensor, autocast_dtype=None, batch: int = 2048) -> dict:
    """Held-out loss and rank accuracies per head: rank_accuracy[k][r] = P(the true token is head k's
    rank-r candidate); tokens outside the draft vocabulary count as misses."""
    K = heads.num_heads
    hits = torch.zeros(K, EVAL_RANKS)
    count = torch.zeros(K)
    loss_sum, loss_n = torch.zeros(K), torch.zeros(K)
    heads.eval()
    with _autocast(autocast_dtype):
        for start in range(0, len(table), batch):
            idx = torch.arange(start, min(start + batch, len(table)))
            x = table.features[table.rows[idx]].float()
            for k, block in enumerate(heads.blocks):
                logits = heads.head_projection(k)(block(x)).float()
                present = table.labels[idx, k] != IGNORE
                y = mapped[idx, k]
                count[k] += present.sum()
                top = torch.topk(logits, min(EVAL_RANKS, logits.shape[-1]), dim=-1).indices  # [B, R]
                match = (top == y[:, None]) & (y[:, None] != IGNORE)
                hits[k, :match.shape[1]] += match.sum(0).float()
                inmap = y != IGNORE
                if inmap.any():
                    loss_sum[k] += F.cross_entropy(logits[inmap], y[inmap], reduction="sum")
                    loss_n[k] += inmap.sum()
    heads.train()
    acc = hits / count.clamp_min(1)[:, None]
    return {
        "top1": [round(float(a), 4) for a in acc[:, 0]],
        "top5": [round(float(a), 4) for a in acc[:, :5].sum(1)],
        "rank_accuracy": [[round(float(a), 4) for a in row] for row in acc],
        "loss": [round(float(l), 4) for l in loss_sum / loss_n.clamp_min(1)],
        "positions": [int(c) for c in count],
        "in_draft_vocab": round(float((mapped[:, 0] != IGNORE).sum() / count[0].clamp_min(1)), 4),
    }


class _autocast:
    def __init__(self, dtype):
        self.ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx else False


# ---------------------------------------------------------------- the task and the command

class MedusaTask:
    """Medusa-1 heads on the skeleton: batches of training positions (a fresh permutation per epoch),
    the decay-weighted head losses, and the decay-weighted held-out top-1 as the score."""

    name = "medusa"
    score_name = "top-1 (decay-weighted over heads)"

    def __init__(self, lm, settings: MedusaSettings, data=None, target_name: str = "", seed: int = 0):

        s = self.s = settings
        if s.heads < 1 or s.layers < 0 or s.batch_tokens < 1 or not 0 <= s.distill <= 1:
            raise ValueError("need --heads >= 1, --layers >= 0, --batch-tokens >= 1 and 0 <= --distill <= 1")
        if s.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be bfloat16 or float32, got {s.dtype!r}")
        self.dirs = as_dirs(data if data is not None else s.data)
        for d in self.dirs:
            check_dataset_for(lm, d, need_features=True)
        self.target_name, self.seed, self.ident = str(target_name), seed, tokenizer_identity(lm)
        hidden, vocab = int(lm.model.config.hidden_size), int(lm.model.config.vocab_size)
        self.hidden, self.vocab = hidden, vocab
        lm_head = lm.model.get_output_embeddings().weight.detach().float().cpu()  # [vocab, hidden]
        train_samples, held_samples = load_split(self.dirs)
        self.token_map = choose_token_map(train_samples, vocab, s.vocab)
        self.train = position_table(train_samples, s.heads)
        self.held = position_table(held_samples, s.heads)
        del train_samples, held_samples
        self.train_mapped = draft_labels(self.train.labels, self.token_map, vocab)
        self.held_mapped = draft_labels(self.held.labels, self.token_map, vocab)
        self.heads = MedusaHeads(hidden, vocab, s.heads, s.layers, token_map=self.token_map,
                                 shared_lm_head=s.shared_lm_head).init_from_target(lm_head)
        if s.shared_lm_head:
            self.heads.lm_heads.requires_grad_(False)
        self.teacher = None
        if s.distill > 0:
            self.teacher = torch.nn.Linear(hidden, len(self.token_map), bias=False)
            self.teacher.weight.data.copy_(lm_head[self.token_map])
            self.teacher.requires_grad_(False)
        self.autocast_dtype = torch.bfloat16 if s.dtype == "bfloat16" else None
        self.weights = [s.decay ** k for k in range(s.heads)]

    def settings(self) -> dict:
        s = asdict(self.s)
        s["data"] = data_identity(self.dirs)  # the draft vocabulary comes from the training chunks
        return {**s, "target": self.ident.get("vocab_hash")}

    def module(self):
        return self.heads

    def batches(self, epoch: int):
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        return list(order.split(self.s.batch_tokens))

    def loss(self, batch):
        with _autocast(self.autocast_dtype):
            losses = head_losses(self.heads, self.train, batch, self.train_mapped, self.teacher, self.s.distill)
        return sum(w * l for w, l in zip(self.weights, losses)), {f"h{k + 1}": l.item() for k, l in enumerate(losses)}

    def evaluate(self, quick: bool) -> dict:
        ev = evaluate(self.heads, self.held, self.held_mapped, self.autocast_dtype)
        return {"score": _score(ev, self.s.decay), **ev}

    def describe(self) -> dict:
        return {"model": self.target_name, "data": [str(d) for d in self.dirs], "draft_vocab": len(self.token_map),
                "train_samples": self.train.samples, "train_tokens": self.train.tokens,
                "train_positions": len(self.train), "held_out_samples": self.held.samples,
                "held_out_positions": len(self.held),
                "trainable_parameters": sum(p.numel() for p in self.heads.parameters() if p.requires_grad)}

    def save(self, out: Path, report: dict) -> None:

        self.heads.meta = {"vocab_hash": self.ident["vocab_hash"], "hidden_size": self.hidden,
                           "rank_accuracy": report["rank_accuracy"], "held_out_top1": report["top1"]}
        save_medusa(self.heads, out, target_name=self.target_name, dtype=torch.bfloat16)


def run(args) -> int:

    lm = load_model(args.model, dtype="auto")
    settings = MedusaSettings(heads=args.heads, layers=args.layers, vocab=args.vocab,
                              shared_lm_head=args.shared_lm_head, batch_tokens=args.batch_tokens,
                              distill=args.distill, decay=args.decay, dtype=args.dtype,
                              data=[str(d) for d in ensure_data(args, lm)])
    print(f"[medusa] loading features of {', '.join(settings.data)} (each holds out its last chunk)", flush=True)
    torch.manual_seed(args.seed)  # the heads' initialisation
    task = MedusaTask(lm, settings, target_name=args.model, seed=args.seed)
    del lm  # the heads train on the stored features alone
    config = TrainConfig(minutes=args.minutes, max_steps=args.steps or None, lr=args.lr, warmup_steps=args.warmup_steps,
                         weight_decay=args.weight_decay, clip=0.0, eval_every=0, eval_minutes=args.eval_every,
                         checkpoint_minutes=2.0, keep="last" if args.last else "best", seed=args.seed)
    info = task.describe()
    print(f"[medusa] {info['train_positions']} training positions ({info['train_samples']} samples, "
          f"{info['train_tokens']} tokens), {info['held_out_positions']} held out; {args.heads} heads x {args.layers} "
          f"blocks, draft vocabulary {info['draft_vocab']}, {info['trainable_parameters'] / 1e6:.1f}M trainable "
          "parameters", flush=True)
    report = train(task, config, Path(args.out), command=command_line())
    kept = "" if report["best_step"] == report["steps"] else f" (the heads of step {report['best_step']}, the best)"
    print(f"[medusa] {report['steps']} steps, {report['epochs']} epochs in {report['train_minutes']:.1f} min; held-out "
          f"top-1 per head {report['top1']}{kept} (untrained: {report.get('before', {}).get('top1')}); heads saved in "
          f"{args.out}", flush=True)
    return 0


def _score(ev: dict | None, decay: float) -> float:
    """Checkpoint choice: held-out top-1 per head, weighted like the loss. Not the held-out loss:
    past a few epochs the heads grow overconfident (held-out loss rises) while their ranking,
    what a top-k tree uses, stays as good or improves."""
    return -math.inf if ev is None else _weighted(ev["top1"], decay)


def _weighted(losses: list[float], decay: float) -> float:
    weights = [decay ** k for k in range(len(losses))]
    return sum(w * l for w, l in zip(weights, losses)) / sum(weights)
