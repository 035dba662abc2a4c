"""Train an EAGLE-3 head (Li et al. 2025) with the training-time test; the default `eagle`.

The target is frozen and run on each batch (its states are not stored: a dataset of answers
is all it needs, and any layer choice works on it). Per position j, the head reads the
target's hidden states entering layers low/mid/high, fused, and token_{j+1}, and learns the
target's distribution over token_{j+2}, restricted to the draft vocabulary (the most frequent
answer tokens of the training data). Training-time test: the head is then unrolled
`ttt_steps - 1` more times on its own outputs, as it drafts: at step k, position j reads the
head's output of step k-1 at j and token_{j+1+k}, attends to the context's step-0 keys and to
its own keys of steps 1..k at j (the path a drafted node sees), and learns token_{j+2+k}; the
losses of step k are weighted `step_decay ** k`. Loss positions: those predicting an answer token.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models import load_model, tokenizer_identity
from ..heads.eagle3 import Eagle3Head, check_layer_ids, default_layer_ids, head_config, save_eagle3
from .common import as_dirs, batches_by_tokens, command_line, ensure_data, load_split, pad_samples
from .data import check_dataset_for, token_ranking
from .trainer import TrainConfig, data_identity, train


@dataclass
class Eagle3Settings:
    layer_ids: list[int] | None = None  # None: vLLM's default (2, L/2, L-3)
    draft_vocab: int = 8192
    ttt_steps: int = 5
    step_decay: float = 0.8
    batch_tokens: int = 4096
    data: list[str] = field(default_factory=list)


def add_arguments(p) -> None:
    p.add_argument("--layers", type=int, nargs=3, metavar=("LOW", "MID", "HIGH"),
                   help="target layers whose entering hidden states the head reads (default: 2, L/2, L-3)")
    p.add_argument("--draft-vocab", type=int, default=8192, help="tokens the head drafts over (d2t/t2d maps)")
    p.add_argument("--ttt-steps", type=int, default=5, help="unrolled steps of the training-time test (1: none)")
    p.add_argument("--step-decay", type=float, default=0.8, help="loss weight of unrolled step k is decay^k")
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per optimisation step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (with --minutes, whichever comes first)")
    p.add_argument("--memory-gb", type=float, default=4.0,
                   help="memory for keeping the target's states of training batches after the first epoch")


def run(args) -> int:
    # float32: the target's states are what the head learns from (and bfloat16 matmuls are slow on CPUs
    # without avx512_bf16); on a GPU, autocast is not needed at this size either
    lm = load_model(args.model, dtype="float32", device=args.device)
    settings = Eagle3Settings(layer_ids=args.layers, draft_vocab=args.draft_vocab, ttt_steps=args.ttt_steps,
                              step_decay=args.step_decay, batch_tokens=args.batch_tokens,
                              data=[str(d) for d in ensure_data(args, lm, features=False)])
    config = TrainConfig(minutes=args.minutes, max_steps=args.max_steps, lr=args.lr, warmup_steps=args.warmup_steps,
                         eval_every=args.eval_every, seed=args.seed)
    report = train(Eagle3Task(lm, settings, memory_gb=args.memory_gb), config, Path(args.out), command=command_line())
    depths = "  ".join(f"{d + 1}: {a:.3f}" for d, a in enumerate(report["top1_by_depth"]))
    print(f"[eagle3] {report['steps']} steps (best {report['best_step']}), {report['train_minutes']:.1f} min, "
          f"{report['train_tokens']} training tokens; held-out top-1 by depth {depths}; expected accepted tokens "
          f"of a {settings.ttt_steps}-token chain {report['chain_accepted']:.2f}; saved to {args.out}")
    return 0


class Eagle3Task:
    name = "eagle3"

    def __init__(self, lm, settings: Eagle3Settings, data=None, memory_gb: float = 4.0):
        self.lm, self.s = lm, settings
        self.dirs = dirs = as_dirs(data if data is not None else settings.data)
        for d in dirs:
            check_dataset_for(lm, d)
        config = lm.model.config
        layer_ids = settings.layer_ids if settings.layer_ids is not None else default_layer_ids(config.num_hidden_layers)
        check_layer_ids(layer_ids, config.num_hidden_layers)
        self.s.layer_ids = list(layer_ids)
        if settings.ttt_steps < 1:
            raise ValueError("ttt_steps must be >= 1 (1 trains without the training-time test)")
        self.train_samples, self.held = load_split(dirs)
        self.train_samples.sort(key=lambda s: len(s.ids))  # batches of like lengths pad less
        self.device = next(lm.model.parameters()).device
        ranking = token_ranking(self.train_samples, config.vocab_size)
        vocab = min(settings.draft_vocab, config.vocab_size)
        self.head = Eagle3Head(head_config(config, vocab, layer_ids)).float()
        self.head.set_draft_vocab(ranking[:vocab])
        self.head = self.head.to(self.device).attach(lm.model)
        # the target's LM-head rows of the draft vocabulary: its distribution the head learns
        self.W = lm.model.get_output_embeddings().weight.detach().float()[self.head.draft_ids]
        self._batches = list(batches_by_tokens(self.train_samples, settings.batch_tokens))
        self._memo: dict = {}
        self._memo_bytes = 0
        self.memory_gb = memory_gb

    # ---------------------------------------------------------------- the skeleton's hooks

    def settings(self) -> dict:
        s = asdict(self.s)
        s["data"] = data_identity(self.dirs)  # the draft vocabulary comes from the training chunks
        return {**s, "target": tokenizer_identity(self.lm).get("vocab_hash")}

    def module(self):
        return self.head

    def batches(self, epoch: int):
        return self._batches

    def loss(self, batch):
        losses, _ = self.unroll(batch)
        total = sum(self.s.step_decay ** k * l for k, l in enumerate(losses))
        return total, {f"step{k}": l.item() for k, l in enumerate(losses)}

    @torch.no_grad()
    def evaluate(self, quick: bool) -> dict:
        """Held-out agreement with the target's greedy token at each draft depth (the head fed its
        own outputs, as it drafts a chain), and the expected accepted tokens of such a chain."""
        held = self.held[::4] if quick else self.held
        steps = self.s.ttt_steps
        hits, seen, chain = torch.zeros(steps), torch.zeros(steps), torch.zeros(steps)
        for batch in batches_by_tokens(held, self.s.batch_tokens):
            _, (right, counted) = self.unroll(batch)  # [steps, B, L]
            run = counted[0].clone()
            for k in range(len(right)):
                hits[k] += (right[k] & counted[k]).sum().item()
                seen[k] += counted[k].sum().item()
                run &= right[k] & counted[k]  # the first k+1 drafts all right
                chain[k] += run.sum().item()
        top1 = (hits / seen.clamp(min=1)).tolist()
        chain_rate = (chain / seen[0].clamp(min=1)).tolist()
        accepted = 1.0 + sum(chain_rate)  # a chain's accepted drafts plus the target's own token
        return {"score": accepted, "top1_by_depth": top1, "chain_accept_by_depth": chain_rate,
                "chain_accepted": accepted, "heldout_positions": int(seen[0]), "train_tokens": self.train_tokens}

    def save(self, out: Path, report: dict) -> None:
        save_eagle3(self.head, out, tokenizer_identity(self.lm),
                    extra={"command": report.get("command", ""), "top1_by_depth": report.get("top1_by_depth")})

    @property
    def train_tokens(self) -> int:
        return sum(len(s.ids) for s in self.train_samples)

    # ---------------------------------------------------------------- the training-time test

    def target_states(self, ids: torch.Tensor, valid: torch.Tensor, key=None):
        """The target's fused-layer inputs [B, T, 3H] and its draft-vocabulary distribution [B, T, V'].
        With a key (a training batch), the states are kept in memory (bfloat16) while they fit
        in `memory_gb`: later epochs then skip the target's forward, half of a step's cost."""
        cached = self._memo.get(key) if key is not None else None
        if cached is None:
            with torch.no_grad():
                out = self.lm.model.model(input_ids=ids, attention_mask=valid.long(), output_hidden_states=True)
                states = out.hidden_states  # [0] embeddings, [L] the input of layer L, [-1] after the final norm
                cached = (torch.cat([states[i] for i in self.s.layer_ids], -1), states[-1])
            if key is not None and self._memo_bytes + _nbytes(cached) // 2 <= self.memory_gb * 2**30:
                self._memo[key] = tuple(t.to(torch.bfloat16) for t in cached)
                self._memo_bytes += _nbytes(cached) // 2
        aux, last = (t.float() for t in cached)
        with torch.no_grad():
            p = torch.softmax(last @ self.W.T, -1)
        return aux, p

    def unroll(self, batch, logits_out: list | None = None):
        """Losses per unrolled step and, for evaluation, (right [steps, B, L], counted [steps, B, L]).
        logits_out: if given, receives each step's draft-vocabulary log-probabilities [B, L, V']."""
        ids, valid, prompt_lens = pad_samples(batch, self.device)
        B, T = ids.shape
        L = T - 1  # query j reads token j+1
        aux, p = self.target_states(ids, valid, key=id(batch) if self.head.training else None)
        head, layer = self.head, self.head.midlayer
        embeds = head.embed(ids)
        hidden = head.fuse(aux[:, :L])
        keys, values, losses, rights, masks = [], [], [], [], []
        j = torch.arange(L, device=self.device)
        causal = (j[None, :] <= j[:, None])  # [L, L]
        eye = torch.eye(L, dtype=torch.bool, device=self.device)
        for k in range(self.s.ttt_steps):
            if L - k <= 0:
                break
            tok = _shift(ids, 1 + k, L)  # token j+1+k
            # a step-k query is defined where token j+2+k exists (its label) and counts if it is an answer token
            target_pos = j + 1 + k  # the target's distribution at j+1+k predicts token j+2+k
            defined = (target_pos[None] < T) & _shift(valid, 1 + k, L) & _shift(valid, 2 + k, L)
            counted = defined & ((j + 2 + k)[None] >= prompt_lens[:, None])
            positions = (j + k)[None].expand(B, L)
            cos, sin = head.rotary_emb(hidden, positions)
            q, kk, v = layer.self_attn.qkv(layer.attn_input(_shift(embeds, 1 + k, L), hidden), cos, sin)
            keys.append(kk)
            values.append(v)
            # step 0: the context, causal over valid keys; steps 1..k: only the same position
            first = causal[None] & (_shift(valid, 0, L)[:, None, :] | eye[None])
            mask = torch.cat([first] + [eye[None].expand(B, L, L)] * k, -1)[:, None]
            out = layer.finish(hidden, layer.self_attn.attend(q, torch.cat(keys, 2), torch.cat(values, 2), mask))
            logq = torch.log_softmax(head.draft_logits(out).float(), -1)
            if logits_out is not None:
                logits_out.append(logq.detach())
            p_k = _shift(p, 1 + k, L)
            m = counted.float()
            losses.append((-(p_k * logq).sum(-1) * m).sum() / m.sum().clamp(min=1))
            label = _shift(ids, 2 + k, L)
            rights.append(head.draft_ids[logq.argmax(-1)] == label)
            masks.append(counted)
            hidden = out
        return losses, (torch.stack(rights), torch.stack(masks))


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _shift(x: torch.Tensor, by: int, length: int) -> torch.Tensor:
    """x[:, by:by+length] along dim 1, zero-padded at the end to `length`."""
    part = x[:, by:by + length]
    if part.shape[1] < length:
        pad = torch.zeros((x.shape[0], length - part.shape[1], *x.shape[2:]), dtype=x.dtype, device=x.device)
        part = torch.cat([part, pad], 1)
    return part

