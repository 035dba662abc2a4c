"""What every trainer shares: a wall-clock budget, resumable checkpoints, loss curves as PNG,
and the held-out split of a dataset (the training loop itself is trainer.py's)."""
from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..models import verispec_home
from .data import Sample, build_dataset, check_dataset_for, chunk_indices, iter_samples

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
    return torch.load(path, weights_only=True) if path.exists() else None


def plot_losses(history: dict[str, list[tuple[int, float]]], path: Path, title: str) -> Path:
    """One line per series (step, value); log scale when values span more than a decade.
    matplotlib's object API: no global backend is chosen or changed (the caller's stays)."""
    from matplotlib.figure import Figure  # heavy and only needed here

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
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
    return path


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "training.json").write_text(json.dumps(report, indent=1))


def batches_by_tokens(samples: list[Sample], batch_tokens: int):
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


def pad_samples(batch: list[Sample], device: torch.device | str = "cpu"):
    """ids [B, T] (right-padded with 0), valid [B, T] bool, prompt_lens [B]."""
    T = max(len(s.ids) for s in batch)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    valid = torch.zeros(len(batch), T, dtype=torch.bool)
    for i, s in enumerate(batch):
        ids[i, :len(s.ids)], valid[i, :len(s.ids)] = s.ids, True
    lens = torch.tensor([s.prompt_len for s in batch])
    return ids.to(device), valid.to(device), lens.to(device)


def default_data_dir(model: str) -> Path:
    return verispec_home() / "training-data" / Path(model).name


def data_dirs(args) -> list[Path]:
    """The dataset directories of --data, or the model's default one."""
    return [Path(d) for d in args.data] if args.data else [default_data_dir(args.model)]


def ensure_data(args, lm, features: bool = True) -> list[Path]:
    """The datasets of --data, or the default one for the model, built (or resumed) first."""
    paths = data_dirs(args)
    for path in paths:
        if not (path / "manifest.json").exists() or args.data is None:
            if len(paths) > 1:  # building each the same way would make copies of one dataset
                raise ValueError(f"{path} is not a dataset; build each of several --data directories first "
                                 "with 'verispec train data --out DIR'")
            build_dataset(lm, path, n_samples=args.samples, seed=args.seed, features=features)
        check_dataset_for(lm, path, need_features=features)
    return paths
