"""What every trainer shares: a wall-clock budget, resumable checkpoints, progress lines,
loss curves as PNG, and the held-out split of a dataset."""
from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .data import Sample, chunk_indices, iter_samples

CHECKPOINT = "trainer-state.pt"


def command_line() -> str:
    """The command being run, as a user would type it (recorded with what it trains)."""
    if Path(sys.argv[0]).name == "verispec":
        return shlex.join(["verispec", *sys.argv[1:]])
    return shlex.join(sys.argv)


class Budget:
    """Training stops when `minutes` of wall time are spent (time already spent before a resume counts)."""

    def __init__(self, minutes: float, spent_s: float = 0.0):
        self.limit_s, self.spent_before = minutes * 60.0, spent_s
        self.start = time.perf_counter()

    @property
    def spent_s(self) -> float:
        return self.spent_before + time.perf_counter() - self.start

    def expired(self) -> bool:
        return self.spent_s >= self.limit_s


def split_chunks(data_dir: str | Path, holdout: int = 1) -> tuple[list[int], list[int]]:
    """Train and held-out chunk indices: the last `holdout` chunks are held out."""
    chunks = chunk_indices(data_dir)
    if len(chunks) <= holdout:
        raise ValueError(f"{data_dir} has {len(chunks)} chunk(s); training needs more than the {holdout} held out")
    return chunks[:-holdout], chunks[-holdout:]


def as_dirs(data: str | Path | list) -> list[Path]:
    """One dataset directory or several, as a list."""
    return [Path(d) for d in data] if isinstance(data, (list, tuple)) else [Path(data)]


def load_split(data: str | Path | list, holdout: int = 1) -> tuple[list[Sample], list[Sample]]:
    """Training and held-out samples of one dataset or several (each holds out its own last chunks,
    so every source is measured)."""
    train: list[Sample] = []
    held: list[Sample] = []
    for d in as_dirs(data):
        train_chunks, held_chunks = split_chunks(d, holdout)
        train += iter_samples(d, train_chunks)
        held += iter_samples(d, held_chunks)
    return train, held


def save_state(out: Path, state: dict[str, Any]) -> None:
    """Atomic: an interrupted save never leaves a half-written checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    tmp.rename(out / CHECKPOINT)


def load_state(out: Path) -> dict[str, Any] | None:
    path = out / CHECKPOINT
    return torch.load(path, weights_only=False) if path.exists() else None


class Progress:
    def __init__(self, name: str, budget: Budget, every_s: float = 15.0, show: bool = True):
        self.name, self.budget, self.every_s, self.show = name, budget, every_s, show
        self.last = 0.0

    def __call__(self, step: int, **values: float) -> None:
        now = self.budget.spent_s
        if not self.show or now - self.last < self.every_s:
            return
        self.last = now
        left = max(0.0, self.budget.limit_s - now)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in values.items())
        print(f"[{self.name}] step {step}  {shown}  {now / 60:.1f} min, {left / 60:.1f} min left", flush=True)


def plot_losses(history: dict[str, list[tuple[int, float]]], path: Path, title: str) -> Path:
    """One line per series (step, value); log scale when values span more than a decade."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    values = []
    for name, points in history.items():
        if points:
            steps, ys = zip(*points)
            ax.plot(steps, ys, label=name, marker="o" if len(points) < 30 else None)
            values += [y for y in ys if y > 0 and math.isfinite(y)]
    if values and max(values) / min(values) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "training.json").write_text(json.dumps(report, indent=1))
