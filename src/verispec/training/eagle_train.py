"""Train an EAGLE head on the target's cached features (EAGLE-1 losses; it drafts EAGLE-2 trees).

The target is frozen and never run: the dataset holds its features. For each position j
the head reads [embed(token_{j+1}); feature_j] and predicts feature_{j+1}; the losses are
EAGLE's: a smooth-L1 regression on the feature and a cross-entropy between the target's
distribution (its LM head on the true feature) and the head's (the LM head on the
predicted one), over the N most frequent tokens of the training data (the LM-head product
over the full 49k vocabulary would dominate the step). Input features get uniform noise,
as in EAGLE, so the head tolerates its own imperfect features when it drafts deeper.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import Budget, Progress, as_dirs, command_line, load_split, load_state, plot_losses, save_state, write_report
from .data import token_ranking


def add_arguments(p) -> None:
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per optimisation step")
    p.add_argument("--train-vocab", type=int, default=16384,
                   help="tokens (by training-data frequency) in the cross-entropy; 0 = the full vocabulary")
    p.add_argument("--feature-weight", type=float, default=1.0)
    p.add_argument("--token-weight", type=float, default=0.1)
    p.add_argument("--noise", type=float, default=0.2, help="uniform input-feature noise, in units of the feature RMS")
    p.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (with --minutes, whichever comes first; "
                                                 "steps make a run repeatable across machines)")


def run(args) -> int:
    import verispec
    from .cli import ensure_data

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = verispec.load_model(args.model, dtype="bfloat16")  # the features' dtype; the head trains in float32
    data = ensure_data(args, lm, features=True)
    report = train_eagle(lm, data, Path(args.out), minutes=args.minutes, max_steps=args.max_steps, lr=args.lr, batch_tokens=args.batch_tokens,
                         train_vocab=args.train_vocab, feature_weight=args.feature_weight,
                         token_weight=args.token_weight, noise=args.noise, eval_every=args.eval_every,
                         seed=args.seed, command=command_line())
    print(f"[eagle] done: {report['steps']} steps, {report['train_minutes']:.1f} min, {report['train_samples']} samples / "
          f"{report['train_tokens']} tokens; held-out top-1 {report['top1']:.3f}, at depth 2 "
          f"{report['top1_depth2']:.3f}; saved to {args.out}")
    return 0


def train_eagle(lm, data, out: Path, minutes: float, max_steps: int | None = None, lr: float = 1e-3,
                batch_tokens: int = 4096, train_vocab: int = 16384, feature_weight: float = 1.0,
                token_weight: float = 0.1, noise: float = 0.2, eval_every: int = 100, seed: int = 0,
                command: str = "", progress: bool = True) -> dict:
    """Train (or resume training) an EAGLE head for `lm` on dataset `data`; save it into `out`."""
    from ..datastore import tokenizer_identity
    from ..heads.eagle import EagleHead, head_config, save_eagle

    torch.manual_seed(seed)
    out = Path(out)
    train, held = load_split(data)
    train.sort(key=lambda s: len(s.ids))  # batches of like lengths pad less
    vocab = lm.model.config.vocab_size
    ranking = token_ranking(train, vocab)
    vocab_ids = ranking[:train_vocab].sort().values if train_vocab and train_vocab < vocab else None

    head = EagleHead(head_config(lm.model.config)).float().attach(lm.model)
    W = lm.model.get_output_embeddings().weight.detach().float()
    W = W if vocab_ids is None else W[vocab_ids]
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    state = load_state(out)
    step, history, spent = 0, {"train loss": [], "held-out top-1": []}, 0.0
    if state is not None:
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        step, history, spent = state["step"], state["history"], state["spent_s"]
        if progress:
            print(f"[eagle] resuming at step {step} ({spent / 60:.1f} min done)")
    budget = Budget(minutes, spent)
    show = Progress("eagle", budget, show=progress)
    rms = torch.cat([s.features.float() for s in train[:64]]).pow(2).mean().sqrt().item()
    rng = random.Random(seed + step)
    all_batches = list(batches(train, batch_tokens))

    def checkpoint():
        save_state(out, {"head": head.state_dict(), "opt": opt.state_dict(), "step": step, "history": history,
                         "spent_s": budget.spent_s})

    def done():
        return budget.expired() or (max_steps is not None and step >= max_steps)

    while not done():
        rng.shuffle(all_batches)
        for batch in all_batches:
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / 50)  # short warm-up, then constant
            loss, parts = eagle_loss(head, W, batch, feature_weight, token_weight, noise * rms)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            step += 1
            history["train loss"].append((step, loss.item()))
            show(step, loss=loss.item(), **parts)
            if step % eval_every == 0:
                # a quarter of the held-out set: the full-vocabulary check is costly
                history["held-out top-1"].append((step, evaluate(head, lm, held[::4])["top1"]))
                checkpoint()
            if done():
                break
    metrics = evaluate(head, lm, held)
    history["held-out top-1"].append((step, metrics["top1"]))
    checkpoint()
    save_eagle(head, out, tokenizer_identity(lm), ranking, extra={"command": command})
    plot_losses({"train loss": history["train loss"]}, out / "loss.png", "EAGLE head: training loss")
    plot_losses({"held-out top-1": history["held-out top-1"]}, out / "heldout.png", "EAGLE head: held-out top-1")
    report = {"steps": step, "train_minutes": round(budget.spent_s / 60, 2), "train_samples": len(train),
              "train_tokens": sum(len(s.ids) for s in train), "heldout_samples": len(held), **metrics,
              "data": [str(d) for d in as_dirs(data)], "command": command}
    write_report(out, report)
    return report


def batches(samples, batch_tokens: int):
    """Consecutive samples packed until their padded size reaches batch_tokens."""
    batch, width = [], 0
    for s in samples:
        w = max(width, len(s.ids))
        if batch and w * (len(batch) + 1) > batch_tokens:
            yield batch
            batch, w = [], len(s.ids)
        batch.append(s)
        width = w
    if batch:
        yield batch


def _pad(batch):
    T = max(len(s.ids) for s in batch)
    H = batch[0].features.shape[-1]
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    feats = torch.zeros(len(batch), T, H)
    valid = torch.zeros(len(batch), T, dtype=torch.bool)
    for i, s in enumerate(batch):
        n = len(s.ids)
        ids[i, :n], feats[i, :n], valid[i, :n] = s.ids, s.features.float(), True
    return ids, feats, valid


def eagle_loss(head, W, batch, feature_weight: float, token_weight: float, noise: float):
    """EAGLE's training loss on a batch; returns (loss, {part: value})."""
    ids, feats, valid = _pad(batch)
    inputs = feats[:, :-1]
    if noise > 0:
        inputs = inputs + (torch.rand_like(inputs) - 0.5) * 2 * noise
    mask = valid[:, 1:]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = head(ids[:, 1:], inputs, attention_mask=mask.long()).hidden.float()
    target = feats[:, 1:]
    m = mask.float()
    f_loss = (F.smooth_l1_loss(pred, target, reduction="none").mean(-1) * m).sum() / m.sum()
    with torch.no_grad():
        p = torch.softmax(target @ W.T, -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logq = torch.log_softmax((pred @ W.T).float(), -1)
    t_loss = (-(p * logq).sum(-1) * m).sum() / m.sum()
    loss = feature_weight * f_loss + token_weight * t_loss
    return loss, {"feature": f_loss.item(), "token": t_loss.item()}


@torch.no_grad()
def evaluate(head, lm, held, batch_tokens: int = 4096) -> dict:
    """Held-out agreement with the target's greedy next token (full vocabulary, argmax of the
    target's LM head on its true feature) over the answers (what the head drafts):
    teacher-forced (depth 1) and with the head's own predicted feature as input one step
    later (depth 2, how it drafts a chain's second token)."""
    Wfull = lm.model.get_output_embeddings().weight.float()
    hits1 = hits2 = n1 = n2 = 0
    for batch in batches(held, batch_tokens):
        ids, feats, valid = _pad(batch)
        # position j predicts token j+2; count the predictions of answer tokens only
        answer = torch.arange(valid.shape[1] - 1)[None] >= torch.tensor([s.prompt_len - 2 for s in batch])[:, None]
        mask = valid[:, 1:] & answer
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = head(ids[:, 1:], feats[:, :-1], attention_mask=valid[:, 1:].long()).hidden.float()
        truth = (feats[:, 1:] @ Wfull.T).argmax(-1)
        guess = (pred @ Wfull.T).argmax(-1)
        hits1 += ((guess == truth) & mask).sum().item()
        n1 += mask.sum().item()
        # depth 2: position j+1 reads the head's own prediction of feature_{j+1}
        mask2 = mask[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred2 = head(ids[:, 2:], pred[:, :-1], attention_mask=valid[:, 2:].long()).hidden.float()
        guess2 = (pred2 @ Wfull.T).argmax(-1)
        hits2 += ((guess2 == truth[:, 1:]) & mask2).sum().item()
        n2 += mask2.sum().item()
    return {"top1": hits1 / max(n1, 1), "top1_depth2": hits2 / max(n2, 1), "positions": n1}
