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
The held-out chunk is evaluated every --eval-every minutes; the heads of the evaluation with the
best held-out top-1 (decay-weighted over heads) are saved, unless --last; so the held-out
chunk also picks the checkpoint. On the 15-chunk smollm2 dataset held-out top-1 levels off
after ~5 epochs while training loss keeps falling (the data, not the budget, is the limit).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import token_ranking

IGNORE = -100
EVAL_RANKS = 10  # rank accuracies kept per head (they shape the drafter's default tree)


def add_arguments(p) -> None:
    p.add_argument("--heads", type=int, default=3, help="Medusa heads K (head k drafts the token k+1 ahead)")
    p.add_argument("--layers", type=int, default=1, help="residual blocks per head")
    p.add_argument("--vocab", type=int, default=4096, help="draft vocabulary size V' (0: the whole vocabulary)")
    p.add_argument("--shared-lm-head", action="store_true",
                   help="all heads share the target's (frozen) projection; only the blocks train")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (cosine decay over the budget)")
    p.add_argument("--batch-tokens", type=int, default=1024, help="positions per optimizer step")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of the loss against the target's full distribution (0: its tokens only)")
    p.add_argument("--decay", type=float, default=0.8, help="loss weight of head k is decay^(k-1)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="matrix-product precision (master weights stay float32)")
    p.add_argument("--eval-every", type=float, default=2.0, help="minutes between held-out evaluations")
    p.add_argument("--last", action="store_true",
                   help="save the heads as they end, not those with the lowest held-out loss of the evaluations")
    p.add_argument("--steps", type=int, default=0, help="stop after this many optimizer steps in all (0: the budget decides)")


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


def learning_rate(peak: float, step: int, fraction: float, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to 10% over the budget's fraction spent."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction))))


# ---------------------------------------------------------------- the command

HPARAMS = ("heads", "layers", "vocab", "shared_lm_head", "lr", "batch_tokens", "distill", "decay", "weight_decay",
           "dtype", "seed")


def run(args) -> int:
    import verispec
    from ..datastore import tokenizer_identity
    from ..heads.medusa import MedusaHeads, save_medusa
    from .cli import ensure_data
    from .common import Budget, Progress, load_split, load_state, plot_losses, save_state, split_chunks, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.heads < 1 or args.layers < 0 or args.batch_tokens < 1 or not 0 <= args.distill <= 1:
        raise ValueError("need --heads >= 1, --layers >= 0, --batch-tokens >= 1 and 0 <= --distill <= 1")
    out = Path(args.out)
    lm = verispec.load_model(args.model, dtype="auto")
    data_dirs = ensure_data(args, lm)
    train_chunks = [(str(d), split_chunks(d)[0]) for d in data_dirs]  # what a resumed run must train on again
    hidden, vocab = int(lm.model.config.hidden_size), int(lm.model.config.vocab_size)
    lm_head = lm.model.get_output_embeddings().weight.detach().float()  # [vocab, hidden]

    print(f"[medusa] loading features of {', '.join(map(str, data_dirs))} (each holds out its last chunk)", flush=True)
    train_samples, held_samples = load_split(data_dirs)
    hparams = {k: getattr(args, k) for k in HPARAMS}
    state = load_state(out)
    if state is not None:
        if state["hparams"] != hparams or state["train_chunks"] != train_chunks:
            changed = sorted(k for k in hparams if state["hparams"].get(k) != hparams[k])
            raise ValueError(f"{out} holds a Medusa run with other settings ({', '.join(changed) or 'data chunks'}); "
                             "resume with the same options or use another --out")
        token_map = state["token_map"]
        print(f"[medusa] resuming from step {state['step']} ({state['spent_s'] / 60:.1f} min spent)", flush=True)
    else:
        token_map = choose_token_map(train_samples, vocab, args.vocab)
    train = position_table(train_samples, args.heads)
    held = position_table(held_samples, args.heads)
    del train_samples, held_samples
    train_mapped = draft_labels(train.labels, token_map, vocab)
    held_mapped = draft_labels(held.labels, token_map, vocab)

    torch.manual_seed(args.seed)
    heads = MedusaHeads(hidden, vocab, args.heads, args.layers, token_map=token_map,
                        shared_lm_head=args.shared_lm_head).init_from_target(lm_head)
    if args.shared_lm_head:
        heads.lm_heads.requires_grad_(False)
    teacher = torch.nn.Linear(hidden, len(token_map), bias=False)
    teacher.weight.data.copy_(lm_head[token_map])
    teacher.requires_grad_(False)
    ident = tokenizer_identity(lm)
    del lm
    trainable = [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    autocast_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    if state is not None:
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["optimizer"])
        step, epoch, cursor, history = state["step"], state["epoch"], state["cursor"], state["history"]
        initial, best = state["initial"], state["best"]
    else:
        step, epoch, cursor = 0, 0, 0
        history = {"train loss": [], "held-out loss": []}
        initial = evaluate(heads, held, held_mapped, autocast_dtype)
        print(f"[medusa] untrained heads (the target's own head): held-out top-1 {initial['top1']}", flush=True)
        history["held-out loss"].append((0, _weighted(initial["loss"], args.decay)))
        best = {"step": 0, "heads": None, "eval": None}  # the evaluation with the best held-out top-1 so far
    budget = Budget(args.minutes, spent_s=state["spent_s"] if state else 0.0)
    progress = Progress("medusa", budget)
    print(f"[medusa] {len(train)} training positions ({train.samples} samples, {train.tokens} tokens), "
          f"{len(held)} held out; {args.heads} heads x {args.layers} blocks, draft vocabulary {len(token_map)}, "
          f"{sum(p.numel() for p in trainable) / 1e6:.1f}M trainable parameters", flush=True)

    def checkpoint(spent_s: float | None = None) -> None:
        save_state(out, {"hparams": hparams, "train_chunks": train_chunks, "token_map": token_map,
                         "heads": heads.state_dict(), "optimizer": opt.state_dict(), "step": step, "epoch": epoch,
                         "cursor": cursor, "history": history, "initial": initial, "best": best,
                         "spent_s": budget.spent_s if spent_s is None else spent_s})

    weights = torch.tensor([args.decay ** k for k in range(args.heads)])
    heads.train()
    last_save = last_eval = budget.spent_s
    window: list[float] = []
    train_start = time.perf_counter()
    positions_seen = 0

    def done() -> bool:
        return budget.expired() or 0 < args.steps <= step

    while not done():
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        while cursor < len(order) and not done():
            batch = order[cursor:cursor + args.batch_tokens]
            for group in opt.param_groups:
                group["lr"] = learning_rate(args.lr, step, max(budget.spent_s / budget.limit_s,
                                                               step / args.steps if args.steps else 0.0))
            with _autocast(autocast_dtype):
                losses = head_losses(heads, train, batch, train_mapped, teacher, args.distill)
            loss = sum(w * l for w, l in zip(weights.tolist(), losses))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, cursor = step + 1, cursor + len(batch)
            positions_seen += len(batch)
            window.append(loss.item())
            progress(step, loss=window[-1], **{f"h{k + 1}": l.item() for k, l in enumerate(losses)},
                     epoch=epoch + cursor / len(order))
            if budget.spent_s - last_eval >= args.eval_every * 60:
                history["train loss"].append((step, sum(window) / len(window)))
                window = []
                ev = evaluate(heads, held, held_mapped, autocast_dtype)
                history["held-out loss"].append((step, _weighted(ev["loss"], args.decay)))
                if _score(ev, args.decay) > _score(best["eval"], args.decay):
                    best = {"step": step, "eval": ev,
                            "heads": {k: v.detach().clone() for k, v in heads.state_dict().items()}}
                print(f"[medusa] step {step}: held-out top-1 {ev['top1']}", flush=True)
                last_eval = budget.spent_s
            if budget.spent_s - last_save >= 120:
                checkpoint()
                last_save = budget.spent_s
        if cursor >= len(order):
            epoch, cursor = epoch + 1, 0
    if window:
        history["train loss"].append((step, sum(window) / len(window)))
    spent = budget.spent_s  # training time: the final evaluation and the saving below do not count
    final = evaluate(heads, held, held_mapped, autocast_dtype)
    if history["held-out loss"][-1][0] != step:  # (a rerun after the budget is spent evaluates again)
        history["held-out loss"].append((step, _weighted(final["loss"], args.decay)))
    checkpoint(spent)
    elapsed = time.perf_counter() - train_start
    selected_step, last = step, final
    if not args.last and best["heads"] is not None and _score(best["eval"], args.decay) > _score(final, args.decay):
        heads.load_state_dict(best["heads"])  # the run overfitted after its best evaluation
        final, selected_step = best["eval"], best["step"]
        print(f"[medusa] keeping the heads of step {selected_step} (best held-out top-1)", flush=True)

    heads.meta = {"vocab_hash": ident["vocab_hash"], "hidden_size": hidden, "rank_accuracy": final["rank_accuracy"],
                  "held_out_top1": final["top1"]}
    save_medusa(heads, out, target_name=args.model, dtype=torch.bfloat16)
    plot_losses(history, out / "loss.png", f"Medusa heads ({args.heads} x {args.layers} blocks) on {Path(args.model).name}")
    report = {
        "method": "medusa", "model": args.model, "data": [str(d) for d in data_dirs],
        "train_chunks": train_chunks,
        "train_samples": train.samples, "train_tokens": train.tokens, "train_positions": len(train),
        "held_out_samples": held.samples, "held_out_positions": len(held),
        "hyperparameters": hparams, "steps": step, "epochs": round(epoch + cursor / max(1, len(train)), 3),
        "training_time_s": round(spent, 1), "positions_per_s_this_run": round(positions_seen / max(elapsed, 1e-9), 1),
        "saved_step": selected_step, "held_out": final, "held_out_last_step": last, "held_out_untrained": initial,
        "history": history,
    }
    write_report(out, report)
    print(f"[medusa] {step} steps, {report['epochs']} epochs in {spent / 60:.1f} min; held-out top-1 per head "
          f"{final['top1']} (untrained: {initial['top1']}); heads saved in {out}", flush=True)
    return 0


def _score(ev: dict | None, decay: float) -> float:
    """Checkpoint choice: held-out top-1 per head, weighted like the loss. Not the held-out loss:
    past a few epochs the heads grow overconfident (held-out loss rises) while their ranking,
    what a top-k tree uses, stays as good or improves."""
    return -math.inf if ev is None else _weighted(ev["top1"], decay)


def _weighted(losses: list[float], decay: float) -> float:
    weights = [decay ** k for k in range(len(losses))]
    return sum(w * l for w, l in zip(weights, losses)) / sum(weights)
