"""The training skeleton (training/trainer.py) on a toy task: per-epoch batches, exact resume in the
middle of an epoch, what a checkpoint holds, the best-or-last export, and the evaluation cadences."""
from __future__ import annotations

import json

import pytest
import torch

from verispec.training.common import load_state
from verispec.training.trainer import TrainConfig, train


class Toy:
    """Fit y = x @ w_true with a linear layer beside a frozen one; the score is minus the held-out error."""

    name = "toy"

    def __init__(self, width: int = 4, batches: int = 5, ascend: bool = False, crash_at: int | None = None):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(width, 1), torch.nn.Linear(1, 1))
        self.net[1].requires_grad_(False)
        self.w = torch.arange(1.0, width + 1)[:, None] / width
        self.x = torch.randn(batches * 8, width)
        self.held = torch.randn(16, width)
        self.n_batches, self.ascend, self.crash_at = batches, ascend, crash_at
        self.epochs_asked, self.seen, self.evaluations = [], 0, 0

    def settings(self):
        return {"width": self.w.shape[0]}

    def module(self):
        return self.net

    def batches(self, epoch):
        self.epochs_asked.append(epoch)
        return list(self.x[torch.randperm(len(self.x), generator=torch.Generator().manual_seed(epoch))]
                    .split(len(self.x) // self.n_batches))

    def loss(self, x):
        if self.crash_at is not None and self.seen >= self.crash_at * 8:
            raise KeyboardInterrupt  # the run is stopped
        self.seen += len(x)
        error = ((self.net(x) - self.net[1](x @ self.w)) ** 2).mean()
        return error, {"mse": error.item()}

    @torch.no_grad()
    def evaluate(self, quick):
        self.evaluations += 1
        error = ((self.net(self.held) - self.net[1](self.held @ self.w)) ** 2).mean().item()
        # ascend: a score that falls as training goes on (its first evaluation is the best)
        return {"score": error if self.ascend else -error, "mse": error}

    def task_state(self):
        return {"seen": self.seen}

    def load_task_state(self, state):
        self.seen = state["seen"]

    def describe(self):
        return {"seen": self.seen}

    def save(self, out, report):
        torch.save({k: v.clone() for k, v in self.net.state_dict().items()}, out / "toy.pt")


def config(**kw):
    return TrainConfig(**{"minutes": 1000, "lr": 0.2, "warmup_steps": 2, "eval_every": 4, **kw})


def test_batches_per_epoch_report_and_plots(tmp_path):
    task = Toy()
    report = train(task, config(max_steps=12), tmp_path, show=False)
    assert task.epochs_asked == [0, 1, 2]  # 5 batches an epoch: steps 1-5, 6-10, 11-12
    assert report["steps"] == 12 and report["epochs"] == 2.4 and report["seen"] == 12 * 8
    assert report["before"]["mse"] > 2 * report["mse"]
    assert [s for s, _ in report["history"]["held-out score"]] == [0, 4, 8, 12]  # before, every 4, final
    assert report["settings"] == {"task": "toy", "width": 4}
    for name in ("training.json", "loss.png", "heldout.png", "toy.pt"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "training.json").read_text())["best_step"] == 12


def test_resume_mid_epoch_is_the_uninterrupted_run(tmp_path):
    whole = Toy()
    train(whole, config(max_steps=13, eval_every=7), tmp_path / "whole", show=False)
    with pytest.raises(KeyboardInterrupt):  # stopped at step 9, after the checkpoint of step 7 (in epoch 1)
        train(Toy(crash_at=9), config(max_steps=13, eval_every=7), tmp_path / "parts", show=False)
    again = Toy()
    report = train(again, config(max_steps=13, eval_every=7), tmp_path / "parts", show=False)
    assert again.epochs_asked == [1, 2]  # continues epoch 1 where it stopped
    assert report["seen"] == 13 * 8  # the task's own state came back with the checkpoint
    for k, v in whole.net.state_dict().items():
        torch.testing.assert_close(again.net.state_dict()[k], v, rtol=0, atol=0)
    state = load_state(tmp_path / "parts")
    assert not any(k.startswith("1.") for k in state["module"])  # frozen parameters are not checkpointed
    assert state["before"] == report["before"]


def test_other_settings_are_refused(tmp_path):
    train(Toy(), config(max_steps=2), tmp_path, show=False)
    with pytest.raises(ValueError, match=r"other settings \(width\)"):
        train(Toy(width=3), config(max_steps=4), tmp_path, show=False)
    with pytest.raises(ValueError, match=r"other settings \(train\.weight_decay\)"):
        train(Toy(), config(max_steps=4, weight_decay=0.1), tmp_path, show=False)
    # budget, cadences and the export choice may change on a resume
    assert train(Toy(), config(max_steps=4, eval_every=3, keep="last"), tmp_path, show=False)["steps"] == 4


def test_best_or_last_is_exported(tmp_path):
    best = train(Toy(ascend=True), config(max_steps=12), tmp_path / "best", show=False)
    assert best["best_step"] == 4 and best["last"]["mse"] < best["mse"]  # the earliest evaluation scored best
    saved = torch.load(tmp_path / "best" / "toy.pt", weights_only=True)
    last = train(Toy(ascend=True), config(max_steps=12, keep="last"), tmp_path / "last", show=False)
    assert last["best_step"] == 12 and "last" not in last
    assert not torch.equal(saved["0.weight"], torch.load(tmp_path / "last" / "toy.pt", weights_only=True)["0.weight"])


def test_evaluation_by_minutes_and_none_by_steps(tmp_path):
    task = Toy()
    report = train(task, config(max_steps=6, eval_every=0, eval_minutes=1e-9, eval_before=False), tmp_path,
                   show=False)
    assert "before" not in report
    assert [s for s, _ in report["history"]["held-out score"]] == [1, 2, 3, 4, 5, 6]  # every step, then the final
    task = Toy()
    report = train(task, config(max_steps=6, eval_every=0), tmp_path / "none", show=False)
    assert [s for s, _ in report["history"]["held-out score"]] == [0, 6] and task.evaluations == 2
