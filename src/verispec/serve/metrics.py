"""Server counters and their Prometheus text exposition (format 0.0.4), written by hand: a
dozen lines of text do not need a client library."""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class _MethodTotals:
    generations: int = 0
    tokens: int = 0
    target_passes: int = 0
    seconds: float = 0.0


class Metrics:
    """Thread-safe totals: requests are counted on the event loop, generations on the worker."""

    def __init__(self):
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, int]] = Counter()
        self._methods: dict[str, _MethodTotals] = {}
        self._cancelled = 0

    def count_request(self, route: str, status: int) -> None:
        with self._lock:
            self._requests[(route, status)] += 1

    def record_generation(self, method: str, tokens: int, target_passes: int, seconds: float,
                          cancelled: bool) -> None:
        """One finished (or, cancelled: stopped because its client went away) generation."""
        with self._lock:
            totals = self._methods.setdefault(method, _MethodTotals())
            totals.generations += 1
            totals.tokens += tokens
            totals.target_passes += target_passes
            totals.seconds += seconds
            self._cancelled += cancelled

    def render(self, queue_depth: int, running: bool) -> str:
        """The Prometheus text page; queue state is read at request time, not stored here."""
        with self._lock:
            requests = sorted(self._requests.items())
            methods = sorted((m, _MethodTotals(**vars(t))) for m, t in self._methods.items())
            cancelled = self._cancelled
        lines: list[str] = []
        _family(lines, "verispec_requests_total", "counter", "HTTP requests by route and status",
                [({"route": route, "status": str(status)}, n) for (route, status), n in requests])
        per_method = [
            ("verispec_generations_total", "counter", "generations run", lambda t: t.generations),
            ("verispec_generated_tokens_total", "counter", "tokens generated", lambda t: t.tokens),
            ("verispec_target_passes_total", "counter", "target model passes (verification steps)",
             lambda t: t.target_passes),
            ("verispec_generation_seconds_total", "counter", "wall time spent generating", lambda t: t.seconds),
            ("verispec_tokens_per_second", "gauge", "tokens per second of generation time, all generations",
             lambda t: t.tokens / t.seconds if t.seconds else 0.0),
            ("verispec_mean_accepted_tokens", "gauge", "tokens per target pass, all generations (1.0 = no speedup)",
             lambda t: t.tokens / t.target_passes if t.target_passes else 0.0),
        ]
        for name, kind, help_text, value in per_method:
            _family(lines, name, kind, help_text + ", by method", [({"method": m}, value(t)) for m, t in methods])
        _family(lines, "verispec_cancelled_generations_total", "counter",
                "generations stopped early because the client disconnected", [({}, cancelled)])
        _family(lines, "verispec_queue_depth", "gauge", "requests waiting for the model", [({}, queue_depth)])
        _family(lines, "verispec_generation_running", "gauge", "1 while a generation runs", [({}, int(running))])
        return "\n".join(lines) + "\n"


def _family(lines: list[str], name: str, kind: str, help_text: str,
            samples: list[tuple[dict[str, str], float]]) -> None:
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        lines.append(f"{name}{_labels(labels)} {_number(value)}")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))
