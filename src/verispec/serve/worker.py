"""The model's one worker thread: queued jobs run one at a time, first come first served.

One generation at a time per model: a speculative step already fills the machine with a
whole tree of tokens, and the KV cache holds one sequence. The generation runs in this thread,
so the event loop keeps answering (health, metrics, new requests) meanwhile; each job's events
(its text pieces, then the end) go back to the event loop through an asyncio queue."""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from ..generator import SpeculativeGenerator
from .errors import APIError
from .metrics import Metrics
from .stream import TextStream
from .validation import MethodChoice, Sampling

__all__ = ["ClientGone", "Engine", "Failed", "Finished", "Job", "Started", "TextPiece"]

log = logging.getLogger("verispec.serve")

CACHED_GENERATORS = 8  # per-request (method, options) generators kept besides the server's own


# --- the events a job sends to its request handler, in this order: Started, TextPiece..., Finished
# (or Failed at any point)

@dataclass(frozen=True)
class Started:
    method: str  # the method that runs (auto resolved)


@dataclass(frozen=True)
class TextPiece:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (a stop token or string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    mean_accepted_tokens: float
    method: str

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "mean_accepted_tokens": self.mean_accepted_tokens, "method": self.method}


@dataclass(frozen=True)
class Failed:
    error: APIError


class ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


@dataclass(eq=False)  # identity: a job is removed from the queue by identity
class Job:
    prompt_ids: list[int]
    sampling: Sampling  # max_tokens resolved (never None here)
    stop: tuple[str, ...]
    choice: MethodChoice
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, event: Started | TextPiece | Finished | Failed) -> None:
        """From the worker thread: hand an event to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed (server shut down): nobody is listening
            self.cancelled.set()

    async def next_event(self, gone: asyncio.Future | None = None):
        """The next event; ClientGone if `gone` (a disconnect watch) completes first."""
        if gone is None:
            return await self.events.get()
        getter = asyncio.ensure_future(self.events.get())
        await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
        raise ClientGone


class Engine:
    """Runs jobs on one model, one at a time, in FIFO order, with at most `queue_size` waiting
    (a job beyond that is refused with a 503). Generators are built once per (method, options)
    and reused: the server's own at start (a bad --method or --option fails there), others on
    their first request, the least recently used dropped past CACHED_GENERATORS."""

    def __init__(self, lm: Any, method: str = "auto", options: dict[str, Any] | None = None,
                 queue_size: int = 16, metrics: Metrics | None = None):
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self.lm, self.method, self.options = lm, method, dict(options or {})
        self.queue_size = queue_size
        self.metrics = metrics or Metrics()
        self.default = SpeculativeGenerator(lm, method=method, **self.options)
        self._generators: OrderedDict[tuple[str, str], SpeculativeGenerator] = OrderedDict()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="verispec-serve-worker", daemon=True)
        self._thread.start()

    # --- the event loop's side

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._waiting)

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._running is not None

    def submit(self, job: Job) -> None:
        """Queue a job, or raise a 503 APIError when the queue is full."""
        with self._cond:
            if self._closed:
                raise APIError(503, "the server is shutting down", None, "shutting_down")
            # an idle worker takes the next job at once, so it does not count against the queue
            free = self.queue_size + (self._running is None) - len(self._waiting)
            if free <= 0:
                raise APIError(503, f"the server is busy: {len(self._waiting)} requests already wait for the "
                                    f"model (queue size {self.queue_size}); retry later", None, "queue_full",
                               headers={"Retry-After": "1"})
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job: dropped from the queue if it waits, stopped after its current step if it runs."""
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, fail the waiting ones, stop the running one, end the thread."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            if self._running is not None:
                self._running.cancelled.set()
            self._cond.notify_all()
        for job in waiting:
            job.emit(Failed(APIError(503, "the server is shutting down", None, "shutting_down")))
        self._thread.join(timeout)

    # --- the worker thread's side

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._running = self._waiting.popleft()
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running = None

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():  # its client left between the queue and here
            return
        try:
            gen = self._generator(job.choice)
        except Exception as err:  # ValueError for a bad option, OSError for a missing drafter...: all
            # come from the request's method and options, so the request's fault, not the server's
            job.emit(Failed(APIError(400, f"cannot set up the method: {err}", "verispec", "invalid_value")))
            return
        job.emit(Started(gen.method))
        try:
            job.emit(self._generate(gen, job))
        except ValueError as err:  # the generator's checks of the request (lengths, ids)
            job.emit(Failed(APIError(400, str(err), None, "invalid_value")))
        except Exception:  # never take the worker down: log it, tell the client, serve the next
            log.exception("generation failed")
            job.emit(Failed(APIError(500, "the generation failed; see the server log", None, "internal_error")))

    def _generate(self, gen: SpeculativeGenerator, job: Job) -> Finished:
        text = TextStream(self.lm.decode, job.stop)

        def on_step(new_ids: list[int]) -> bool:
            piece = text.push(new_ids)
            if piece:
                job.emit(TextPiece(piece))
            return not (job.cancelled.is_set() or text.stopped)  # False stops the generation

        s = job.sampling
        out = gen.generate(job.prompt_ids, max_new_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                           seed=s.seed, on_step=on_step)
        tail = text.finish()
        if tail:
            job.emit(TextPiece(tail))
        stats = out.stats
        stopped = text.stopped or bool(out.token_ids and out.token_ids[-1] in set(self.lm.eos_token_ids))
        ended = stopped or len(out.token_ids) >= s.max_tokens  # else on_step cut it: the client left
        self.metrics.record_generation(gen.method, stats.new_tokens, stats.target_passes, stats.wall_time_s,
                                       cancelled=not ended)
        return Finished("stop" if stopped else "length", len(job.prompt_ids), len(out.token_ids),
                        stats.mean_accepted_tokens, gen.method)

    def _generator(self, choice: MethodChoice) -> SpeculativeGenerator:
        method = choice.method or self.method
        options = choice.options
        if options is None:  # the server's options go with the server's method only
            options = self.options if method == self.method else {}
        if method == self.method and options == self.options:
            return self.default
        key = (method, json.dumps(options, sort_keys=True, default=repr))
        gen = self._generators.pop(key, None) or SpeculativeGenerator(self.lm, method=method, **options)
        self._generators[key] = gen  # most recently used last
        while len(self._generators) > CACHED_GENERATORS:
            self._generators.popitem(last=False)
        return gen
