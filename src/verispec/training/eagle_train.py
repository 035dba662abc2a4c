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

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..heads.eagle import EagleHead, head_config, save_eagle
from ..models import load_model, tokenizer_identity
from .common import as_dirs, batches_by_tokens, command_line, ensure_data, load_split
from .data import check_dataset_for, token_ranking
from .trainer import TrainConfig, data_identity, train


@dataclass
class EagleSettings:
    train_vocab: int = 16384  # tokens (by training-data frequency) in the cross-entropy; 0: the whole vocabulary
    feature_weight: float = 1.0
    token_weight: float = 0.1
    noise: float = 0.2  # uniform input-feature noise, in units of the feature RMS
    batch_tokens: int = 4096
    data: list[str] = field(default_factory=list)


def add_arguments(p) -> None:
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
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

    lm = load_model(args.model, dtype="bfloat16", device=args.device)  # the features' dtype; the head trains in float32
    settings = EagleSettings(train_vocab=args.train_vocab, feature_weight=args.feature_weight,
                             token_weight=args.token_weight, noise=args.noise, batch_tokens=args.batch_tokens,
                             data=[str(d) for d in ensure_data(args, lm, features=True)])
    config = TrainConfig(minutes=args.minutes, max_steps=args.max_steps, lr=args.lr, warmup_steps=args.warmup_steps,
                         eval_every=args.eval_every, seed=args.seed)
    torch.manual_seed(args.seed)  # the head's initialisation
    report = train(EagleTask(lm, settings), config, Path(args.out), command=command_line())
    print(f"[eagle1] done: {report['steps']} steps (best {report['best_step']}), {report['train_minutes']:.1f} min, "
          f"{report['train_samples']} samples / {report['train_tokens']} tokens; held-out top-1 {report['top1']:.3f}, "
          f"at depth 2 {report['top1_depth2']:.3f}; saved to {args.out}")
    return 0


class EagleTask:
    """EAGLE-1's head on the skeleton: the losses of eagle_loss, scored by evaluate."""

    name = "eagle1"
    score_name = "2-token chain: expected tokens per pass"

    def __init__(self, lm, settings: EagleSettings, data=None):

        self.lm, self.s = lm, settings
        self.dirs = as_dirs(data if data is not None else settings.data)
        for d in self.dirs:
            check_dataset_for(lm, d, need_features=True)
        self.train_samples, self.held = load_split(self.dirs)
        self.train_samples.sort(key=lambda s: len(s.ids))  # batches of like lengths pad less
        vocab = lm.model.config.vocab_size
        self.ranking = token_ranking(self.train_samples, vocab)
        n = settings.train_vocab
        vocab_ids = self.ranking[:n].sort().values if n and n < vocab else None
        self.device = next(lm.model.parameters()).device
        self.head = EagleHead(head_config(lm.model.config)).float().to(self.device).attach(lm.model)
        W = lm.model.get_output_embeddings().weight.detach().float()
        self.W = W if vocab_ids is None else W[vocab_ids.to(W.device)]
        rms = torch.cat([s.features.float() for s in self.train_samples[:64]]).pow(2).mean().sqrt().item()
        self.noise = settings.noise * rms
        self._batches = list(batches_by_tokens(self.train_samples, settings.batch_tokens))

    def settings(self) -> dict:

        s = asdict(self.s)
        s["data"] = data_identity(self.dirs)
        return {**s, "target": tokenizer_identity(self.lm).get("vocab_hash")}

    def module(self):
        return self.head

    def batches(self, epoch: int):
        return self._batches

    def loss(self, batch):
        return eagle_loss(self.head, self.W, batch, self.s.feature_weight, self.s.token_weight, self.noise)

    def evaluate(self, quick: bool) -> dict:
        """evaluate()'s agreements (quick: a quarter of the held-out set, the full-vocabulary check is
        costly); score: the expected tokens per target pass of a 2-token chain, 1 + top1 (1 + top1_depth2)
        (depth 2 is measured with the true first token fed, as a chain continues only when its first
        draft was right; the product treats the two as independent): top-1 alone
        would ignore how well the head drafts from its own features, which EAGLE's trees depend on."""
        m = evaluate(self.head, self.lm, self.held[::4] if quick else self.held, self.s.batch_tokens)
        return {"score": 1 + m["top1"] * (1 + m["top1_depth2"]), **m}

    def describe(self) -> dict:
        return {"train_samples": len(self.train_samples), "train_tokens": sum(len(s.ids) for s in self.train_samples),
                "heldout_samples": len(self.held), "data": [str(d) for d in self.dirs]}

    def save(self, out: Path, report: dict) -> None:

        save_eagle(self.head, out, tokenizer_identity(self.lm), self.ranking,
                   extra={"command": report.get("command", ""), "top1": report.get("top1"),
                          "top1_depth2": report.get("top1_depth2")})


def _pad(batch, device=None):
    T = max(len(s.ids) for s in batch)
    H = batch[0].features.shape[-1]
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    feats = torch.zeros(len(batch), T, H)
    valid = torch.zeros(len(batch), T, dtype=torch.bool)
    for i, s in enumerate(batch):
        n = len(s.ids)
        ids[i, :n], feats[i, :n], valid[i, :n] = s.ids, s.features.float(), True
    return ids.to(device), feats.to(device), valid.to(device)


def eagle_loss(head, W, batch, feature_weight: float, token_weight: float, noise: float):
    """EAGLE's training loss on a batch; returns (loss, {part: value})."""
    ids, feats, valid = _pad(batch, W.device)
    inputs = feats[:, :-1]
    if noise > 0:
        inputs = inputs + (torch.rand_like(inputs) - 0.5) * 2 * noise
    mask = valid[:, 1:]
    with torch.autocast(W.device.type, dtype=torch.bfloat16):
        pred = head(ids[:, 1:], inputs, attention_mask=mask.long()).hidden.float()
    target = feats[:, 1:]
    m = mask.float()
    f_loss = (F.smooth_l1_loss(pred, target, reduction="none").mean(-1) * m).sum() / m.sum()
    with torch.no_grad():
        p = torch.softmax(target @ W.T, -1)
    with torch.autocast(W.device.type, dtype=torch.bfloat16):
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
    for batch in batches_by_tokens(held, batch_tokens):
        ids, feats, valid = _pad(batch, Wfull.device)
        # position j predicts token j+2; count the predictions of answer tokens only
        answer = (torch.arange(valid.shape[1] - 1)[None] >= torch.tensor([s.prompt_len - 2 for s in batch])[:, None]
                  ).to(valid.device)
        mask = valid[:, 1:] & answer
        with torch.autocast(Wfull.device.type, dtype=torch.bfloat16):
            pred = head(ids[:, 1:], feats[:, :-1], attention_mask=valid[:, 1:].long()).hidden.float()
        truth = (feats[:, 1:] @ Wfull.T).argmax(-1)
        guess = (pred @ Wfull.T).argmax(-1)
        hits1 += ((guess == truth) & mask).sum().item()
        n1 += mask.sum().item()
        # depth 2: position j+1 reads the head's own prediction of feature_{j+1}
        mask2 = mask[:, 1:]
        with torch.autocast(Wfull.device.type, dtype=torch.bfloat16):
            pred2 = head(ids[:, 2:], pred[:, :-1], attention_mask=valid[:, 2:].long()).hidden.float()
        guess2 = (pred2 @ Wfull.T).argmax(-1)
        hits2 += ((guess2 == truth[:, 1:]) & mask2).sum().item()
        n2 += mask2.sum().item()
    return {"top1": hits1 / max(n1, 1), "top1_depth2": hits2 / max(n2, 1), "positions": n1}
