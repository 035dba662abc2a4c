"""The one training skeleton every drafter trainer runs on.

A trainer supplies a `TrainingTask`: its parameters, its batches, the loss of a batch, an
evaluation and how to save what it trained. The skeleton owns everything else, the same
way for every method: the wall-clock and step budget, the learning-rate schedule (linear
warm-up, then cosine decay to a tenth), AdamW (weight decay on matrices only), gradient
clipping, a baseline evaluation of the untrained drafter, held-out evaluation every
`eval_every` steps and/or `eval_minutes` minutes, the best checkpoint by the task's score
(or the last one), resuming (a rerun with the same --out continues where it stopped, in the
same epoch; a checkpoint made with other settings is refused, naming them), the report
(training.json) and the loss / held-out curves (loss.png, heldout.png).

The task's batches are asked for at every epoch start (`batches(epoch)`), so a task can draw
new ones per epoch (a fresh permutation, or on-policy samples decided per epoch).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..progress import progress as progress_bar
from .common import Budget, as_dirs, load_state, plot_losses, save_state, split_chunks, write_report


@dataclass
class TrainConfig:
    """What the skeleton needs; each trainer's own settings live in its task."""

    minutes: float = 30.0
    max_steps: int | None = None  # steps make a run repeatable across machines
    lr: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0  # AdamW's, on matrices only (never on norms and biases)
    betas: tuple[float, float] = (0.9, 0.999)
    clip: float = 1.0
    eval_every: int = 100  # steps between held-out evaluations (0: none by steps)
    eval_minutes: float = 0.0  # also evaluate once this many minutes passed since the last (0: never by time)
    checkpoint_minutes: float = 0.0  # also checkpoint between evaluations this often (0: at evaluations only)
    eval_before: bool = True  # evaluate the untrained drafter first: the report's "before" (not a candidate)
    keep: str = "best"  # export "best" (the best-scoring evaluation's weights) or "last" (the final ones)
    seed: int = 0


class TrainingTask(Protocol):
    name: str

    def settings(self) -> dict:
        """Everything a resumed run must share with the run that made the checkpoint."""

    def module(self) -> torch.nn.Module:
        """What is trained: its trainable parameters and buffers are checkpointed (frozen parameters
        are not: a resumed run rebuilds them from the same target)."""

    def batches(self, epoch: int) -> list:
        """The training batches of epoch `epoch` (the skeleton shuffles their order, seeded by the epoch);
        deterministic per epoch, so that a resumed run continues the epoch it stopped in."""

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch's loss and named parts to report (gradients may also be accumulated here:
        the skeleton zeroes them before the call)."""

    def evaluate(self, quick: bool) -> dict[str, float]:
        """Held-out metrics; must hold "score" (higher is better: picks the best checkpoint).
        quick: a cheaper evaluation for the periodic checks."""

    def save(self, out: Path, report: dict) -> None:
        """Export the trained drafter into out (in its serving layout); report: the metrics of
        what is exported and everything else the skeleton writes to training.json."""

    # optional: describe() -> dict, facts about the data and model merged into the report;
    # task_state() -> dict and load_task_state(dict), the task's own counters, checkpointed;
    # score_name: str, what the score is (the held-out plot's label)


def lr_factor(step: int, config: TrainConfig, progress: float) -> float:
    """Linear warm-up over warmup_steps, then cosine from 1 to min_lr_ratio over the budget."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


def train(task: TrainingTask, config: TrainConfig, out: str | Path, command: str = "", show: bool = True) -> dict:
    """Train (or resume training) task into out; returns the report (also written to training.json)."""
    if config.keep not in ("best", "last"):
        raise ValueError(f"keep must be 'best' or 'last', got {config.keep!r}")
    out = Path(out)
    torch.manual_seed(config.seed)
    module = task.module()
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=tuple(config.betas))
    settings = {"task": task.name, **task.settings(), "train": _resumable(config)}
    step, epoch, cursor, spent, best, before = 0, 0, 0, 0.0, None, None
    history = {"train loss": [], "held-out score": []}

    def weights(clone: bool = False) -> dict:
        return {k: (v.detach().clone() if clone else v) for k, v in module.state_dict().items() if k not in frozen}

    def load_weights(state: dict) -> None:
        missing, unexpected = module.load_state_dict(state, strict=False)
        if unexpected or set(missing) - frozen:
            raise ValueError(f"{out}: the checkpoint does not fit {task.name}'s module (missing "
                             f"{sorted(set(missing) - frozen)[:3]}, unexpected {sorted(unexpected)[:3]})")

    state = load_state(out)
    if state is not None:
        _check_settings(out, state.get("settings"), settings)
        load_weights(state["module"])
        opt.load_state_dict(state["opt"])
        step, spent, history, best = state["step"], state["spent_s"], state["history"], state["best"]
        epoch, cursor, before = state.get("epoch", 0), state.get("cursor", 0), state.get("before")
        if state.get("task_state") is not None and hasattr(task, "load_task_state"):
            task.load_task_state(state["task_state"])
        if state.get("rng") is not None:
            torch.set_rng_state(state["rng"])
        if show:
            print(f"[{task.name}] resuming at step {step} ({spent / 60:.1f} min done)", flush=True)
    elif config.eval_before:  # not in the budget: it is the baseline, not training
        module.eval()
        before = task.evaluate(quick=False)
        history["held-out score"].append((0, before["score"]))
        if show:
            print(f"[{task.name}] before training: held-out score {before['score']:.4f}", flush=True)
    budget = Budget(config.minutes, spent)
    last_eval = last_checkpoint = budget.spent_s
    n_batches = 1

    def progress() -> float:
        by_time = budget.spent_s / budget.limit_s if budget.limit_s > 0 else 1.0
        return max(by_time, step / config.max_steps) if config.max_steps else by_time

    def done() -> bool:
        return budget.expired() or (config.max_steps is not None and step >= config.max_steps)

    def checkpoint(spent_s: float | None = None) -> None:
        save_state(out, {"settings": settings, "module": weights(), "opt": opt.state_dict(), "step": step,
                         "epoch": epoch, "cursor": cursor, "spent_s": budget.spent_s if spent_s is None else spent_s,
                         "history": history, "best": best, "before": before, "rng": torch.get_rng_state(),
                         "task_state": task.task_state() if hasattr(task, "task_state") else None})

    def consider(metrics: dict) -> None:
        nonlocal best
        if not history["held-out score"] or history["held-out score"][-1][0] != step:
            history["held-out score"].append((step, metrics["score"]))
        if best is None or metrics["score"] > best["score"]:
            best = {"score": metrics["score"], "step": step, "module": weights(clone=True)}

    bar = progress_bar(total=config.max_steps or None, desc=f"train {task.name}", initial=step, enabled=show)
    module.train()
    while not done():
        batches = task.batches(epoch)
        if not batches:
            raise ValueError(f"{task.name}: no training batches (is the dataset empty?)")
        n_batches = len(batches)
        order = list(range(n_batches))
        random.Random(config.seed * 1_000_003 + epoch).shuffle(order)
        while cursor < n_batches and not done():
            for group in opt.param_groups:
                group["lr"] = config.lr * lr_factor(step, config, progress())
            opt.zero_grad(set_to_none=True)  # before the loss: a task may accumulate gradients in it
            loss, parts = task.loss(batches[order[cursor]])
            loss.backward()
            if config.clip:
                torch.nn.utils.clip_grad_norm_(params, config.clip)
            opt.step()
            step, cursor = step + 1, cursor + 1
            history["train loss"].append((step, loss.item()))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", **{k: f"{v:.3f}" for k, v in parts.items()},
                            min=f"{budget.spent_s / 60:.1f}/{config.minutes:g}")
            if done():
                break  # the final evaluation follows
            if (config.eval_every and step % config.eval_every == 0) or \
                    (config.eval_minutes and budget.spent_s - last_eval >= config.eval_minutes * 60):
                module.eval()
                consider(task.evaluate(quick=True))
                module.train()
                checkpoint()
                last_eval = last_checkpoint = budget.spent_s
            elif config.checkpoint_minutes and budget.spent_s - last_checkpoint >= config.checkpoint_minutes * 60:
                checkpoint()
                last_checkpoint = budget.spent_s
        if cursor >= n_batches:
            epoch, cursor = epoch + 1, 0
    bar.close()
    train_s = budget.spent_s  # the final evaluation and the export are not training time
    module.eval()
    final = last = task.evaluate(quick=False)
    consider(final)
    checkpoint(train_s)
    chosen = step
    if config.keep == "best" and best["step"] != step:
        # an earlier (maybe quick) evaluation scored higher: export it if its full evaluation agrees
        final_weights = weights(clone=True)
        load_weights(best["module"])
        candidate = task.evaluate(quick=False)
        if candidate["score"] > last["score"]:
            final, chosen = candidate, best["step"]
        else:
            load_weights(final_weights)
    describe = task.describe() if hasattr(task, "describe") else {}
    report = {"task": task.name, "steps": step, "best_step": chosen, "epochs": round(epoch + cursor / n_batches, 3),
              "train_minutes": round(train_s / 60, 2), **final,
              **({"before": before} if before is not None else {}), **({"last": last} if chosen != step else {}),
              **describe, "settings": {k: v for k, v in settings.items() if k != "train"}, "train": asdict(config),
              "command": command, "history": history}
    task.save(out, report)
    score_name = getattr(task, "score_name", "score")
    plot_losses({"train loss": history["train loss"]}, out / "loss.png", f"{task.name}: training loss")
    plot_losses({f"held-out {score_name}": history["held-out score"]}, out / "heldout.png",
                f"{task.name}: held-out {score_name}")
    write_report(out, report)
    return report


def _resumable(config: TrainConfig) -> dict:
    """The training settings a resumed run must share (its budget, cadences and export choice may change)."""
    return {k: v for k, v in asdict(config).items()
            if k not in ("minutes", "max_steps", "eval_every", "eval_minutes", "checkpoint_minutes", "eval_before",
                         "keep")}


def data_identity(dirs) -> list[list]:
    """What a dataset contributes to a checkpoint: each directory and its training chunks (a dataset
    grown since, or another one, trains on other samples and may give another draft vocabulary)."""

    return [[str(Path(d).resolve()), split_chunks(d)[0]] for d in as_dirs(dirs)]


def _check_settings(out: Path, old: dict | None, new: dict) -> None:
    if old is None:
        raise ValueError(f"{out} holds a checkpoint from an older verispec without its settings; "
                         "use another --out or delete the checkpoint there")
    old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))  # compare as saved
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if "train" in diff:
        diff.remove("train")
        diff += [f"train.{k}" for k in sorted(set(old["train"]) | set(new["train"]))
                 if old["train"].get(k) != new["train"].get(k)]
    if diff:
        raise ValueError(f"{out} holds a checkpoint trained with other settings ({', '.join(diff)}); rerun with "
                         "the same settings to resume, or use another --out")
