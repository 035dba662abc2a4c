"""Per-generation statistics, in Spec-Bench's terms."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

PHASES = ("prefill", "draft", "target", "accept")


@dataclass
class GenerationStats:
    new_tokens: int = 0
    target_passes: int = 0  # verification passes; the first also reads the prompt (its time is "prefill")
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    accept_lengths: list[int] = field(default_factory=list)  # tokens emitted per target pass
    drafted_per_position: list[int] = field(default_factory=list)  # steps that drafted depth i+1
    accepted_per_position: list[int] = field(default_factory=list)  # steps that accepted depth i+1
    time_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    wall_time_s: float = 0.0

    def record_step(self, draft_depth: int, drafted: int, accepted: int, emitted: int) -> None:
        self.target_passes += 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.new_tokens += emitted
        self.accept_lengths.append(emitted)
        _grow(self.drafted_per_position, draft_depth)
        _grow(self.accepted_per_position, draft_depth)
        for i in range(draft_depth):
            self.drafted_per_position[i] += 1
        for i in range(accepted):
            self.accepted_per_position[i] += 1

    @property
    def mean_accepted_tokens(self) -> float:
        """Spec-Bench's #mean accepted tokens: new tokens per target pass (1.0 for plain decoding)."""
        return self.new_tokens / self.target_passes if self.target_passes else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def time_other_s(self) -> float:
        return max(0.0, self.wall_time_s - sum(self.time_s.values()))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            mean_accepted_tokens=self.mean_accepted_tokens, acceptance_rate=self.acceptance_rate,
            acceptance_rate_per_position=self.acceptance_rate_per_position,
            tokens_per_s=self.tokens_per_s, time_other_s=self.time_other_s,
        )
        return d


def _grow(counts: list[int], size: int) -> None:
    counts.extend([0] * (size - len(counts)))


class PhaseTimer:
    """Adds the wall time of `with timer.phase(name):` blocks to stats.time_s[name]."""

    def __init__(self, stats: GenerationStats, device: torch.device):
        self.stats = stats
        # CUDA kernels run asynchronously: synchronise so time lands in the phase that spent it
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @contextmanager
    def phase(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.stats.time_s[name] += time.perf_counter() - start
