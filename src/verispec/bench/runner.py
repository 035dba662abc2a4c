"""Run a suite: every method on the same prompts, interleaved per question, saved as
Spec-Bench answer files (one JSONL per method) so a run can be resumed and re-reported.

Per question, each repeat runs every method that still lacks the question, in an order
rotated per question and repeat (machine drift and warm caches hit all methods alike). A
question's records are written when all its repeats are done, so an interrupted run keeps
every finished question and a rerun of the same command picks up where it stopped.
"""
from __future__ import annotations

import inspect
import json
import os
import platform
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import transformers

from ..chat import ChatFormatter
from ..draft_init import draft_for, load_draft
from ..engine.exact import resolve as resolve_exact
from ..drafters import drafter_class
from ..generator import SpeculativeGenerator, methods as verispec_methods
from ..models import load_model
from ..progress import progress, say
from ..trace import write_html
from ..version import __version__
from . import suites
from .layout import BASELINE, FAILURES_FILE, RUN_FILE, answer_path, append_answer, read_answers, trace_path
from .peers import PEERS, HFPeer, is_peer
from .vllm_peer import VLLM_PEERS, VLLMPeer, is_vllm_peer
from .report import build_report

DEFAULT_METHODS = ("ar", "prompt-lookup", "hf-greedy", "hf-prompt-lookup")
PHASES = ("prefill", "draft", "target", "accept")
# settings that must match to resume into (or add methods to) an existing output folder
_SAME_RUN_KEYS = ("suite", "model", "dtype", "max_new_tokens", "temperature", "seed", "repeats", "draft",
                  "universal_draft", "exact", "rule")


@dataclass
class BenchConfig:
    out: Path
    model: str = "smollm2-135m-instruct"
    methods: Sequence[str] = DEFAULT_METHODS
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> its options
    suite: str = "spec-bench"
    questions: str | None = None  # path or URL of question.jsonl; None: the default location
    tasks: Sequence[str] | None = None
    per_task: int | None = None
    max_new_tokens: int = 1024  # Spec-Bench's setting
    temperature: float = 0.0
    dtype: str = "auto"
    device: str = "auto"
    repeats: int = 1
    seed: int = 0
    draft: str | None = None  # draft model for draft-model / hf-assisted ("layers:0,1,2" = a subset of the target)
    universal_draft: str | None = None  # draft with another tokenizer for hf-universal (default: draft)
    warmup: int = 1  # warm-up generations per method before timing
    traces: bool = True  # trace pages for the first question of each task and method
    exact: bool | str = "auto"  # every verispec method's exact setting (ar included): True, False or "auto"
    rule: str = "auto"  # every verispec method's verification rule (ar included); gumbel: outputs comparable when sampling
    command: str | None = None  # the command line, recorded in run.json by the CLI

    def __post_init__(self):
        self.out = Path(self.out)
        methods = [m.strip() for m in self.methods if m.strip()]
        if not methods:
            raise ValueError("--methods is empty; give e.g. ar,prompt-lookup,hf-greedy")
        if len(set(methods)) != len(methods):
            raise ValueError(f"--methods lists a method twice: {','.join(methods)}")
        if BASELINE not in methods:  # speedup and losslessness are measured against ar in the same run
            methods.insert(0, BASELINE)
        self.methods = tuple(methods)
        unknown = set(self.options) - set(self.methods)
        if unknown:
            raise ValueError(f"--option names method(s) not in --methods: {', '.join(sorted(unknown))}")
        if self.suite not in suites.SUITES:
            raise ValueError(f"unknown suite {self.suite!r}; suites: {', '.join(suites.SUITES)}")
        for name, value, low in (("max_new_tokens", self.max_new_tokens, 1), ("repeats", self.repeats, 1),
                                 ("warmup", self.warmup, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")


@dataclass
class BenchResult:
    out: Path
    questions: int  # questions selected
    ran: int  # questions run now (all methods)
    skipped: int  # questions every method already had
    interrupted: bool = False
    report: Path | None = None


# --------------------------------------------------------------------------- methods


class VerispecMethod:
    """A verispec method (see verispec.methods()) behind the bench's method interface."""

    kind = "verispec"
    measured_phases = PHASES

    def __init__(self, name: str, lm: Any, **options: Any):
        self.name, self.lm = name, lm
        self.generator = SpeculativeGenerator(lm, method=name, **options)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, seed: int | None = None):
        return self.generator.generate(list(prompt_ids), max_new_tokens=max_new_tokens, temperature=temperature,
                                       seed=seed)


def takes_draft(method: str) -> bool:
    """Whether a verispec method's drafter takes a `draft` model option."""
    if method not in verispec_methods() or method == "auto":
        return False
    return "draft" in inspect.signature(drafter_class(method).__init__).parameters


def base_method(name: str) -> str:
    """"draft-model@static" -> "draft-model": a label after @ names a variant of a method,
    so one run can compare several settings of it (options go to --option LABELLED.key=v)."""
    return name.partition("@")[0]


def build_method(name: str, lm: Any, options: dict[str, Any], draft: Any | None = None,
                 universal_draft: Any | None = None, exact: bool | str = "auto", rule: str = "auto"):
    base = base_method(name)
    if is_peer(base) or is_vllm_peer(base):
        options = dict(options)
        if "draft" in options:  # a labelled variant's own draft (e.g. hf-assisted@int4.draft='int4:M')
            draft = universal_draft = draft_for(options.pop("draft"), lm)
    if is_peer(base):
        chosen = (universal_draft or draft) if base == "hf-universal" else draft
        return HFPeer(base, lm, draft=chosen, **options)
    if is_vllm_peer(base):
        return VLLMPeer(base, lm, draft=draft, **options)
    if base not in verispec_methods():
        raise ValueError(f"unknown method {base!r}; verispec methods: {', '.join(verispec_methods())}; "
                         f"peers: {', '.join(PEERS + VLLM_PEERS)} (NAME@LABEL runs a variant of NAME)")
    options = dict(options)
    chosen = universal_draft if base == "universal" and universal_draft is not None else draft
    if takes_draft(base) and "draft" not in options and chosen is not None:
        options["draft"] = chosen
    options.setdefault("exact", exact)
    if rule != "auto":
        options.setdefault("rule", rule)
    return VerispecMethod(base, lm, **options)


# --------------------------------------------------------------------------- environment


def environment(lm: Any | None = None) -> dict[str, Any]:
    """Where the numbers come from: machine, threads, versions."""
    env: dict[str, Any] = {
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "verispec": __version__,
    }
    if hasattr(os, "getloadavg"):  # other work on the machine skews timings: keep a trace of it
        env["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if lm is not None:
        device = next(lm.model.parameters()).device
        env["device"] = str(device)
        env["dtype"] = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
        if device.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------- the run


def _bar(enabled: bool, total: int):
    """The run's progress bar (question, method, ETA) on stderr, or a silent one."""
    return progress(total=total, desc="bench", unit="run", enabled=enabled and bool(total))


def _say(enabled: bool, message: str) -> None:
    say(message, "verispec bench", enabled)


def run_bench(config: BenchConfig, lm: Any | None = None, draft: Any | None = None, universal_draft: Any | None = None,
              formatter: Any | None = None, progress: bool = True, report: bool = True) -> BenchResult:
    """Run (or resume) the benchmark described by `config`; returns what was done.

    lm / draft / universal_draft: LoadedModel-like objects to use instead of loading
    config.model / config.draft (tests pass tiny models). formatter: turns a conversation
    into prompt ids and an answer into text (default: the tokenizer's chat template).
    """
    out = config.out
    question_file = suites.resolve_questions(config.questions)
    selected = suites.select(suites.load_questions(question_file), config.tasks, config.per_task)
    if not selected:
        raise ValueError("no questions selected; check --tasks and --per-task")
    out.mkdir(parents=True, exist_ok=True)
    previous = _read_run(out)
    _check_same_run(previous, config)  # torch's thread count is the caller's (CLI: --threads); run.json records it

    if lm is None:
        _say(progress, f"loading {config.model} ({config.dtype})")
        lm = load_model(config.model, dtype=config.dtype, device=config.device)
    if draft is None and config.draft:
        _say(progress, f"loading draft {config.draft}")
        draft = load_draft(config.draft, lm, config.dtype, config.device)
    if universal_draft is None and config.universal_draft:
        _say(progress, f"loading universal draft {config.universal_draft}")
        universal_draft = load_draft(config.universal_draft, lm, config.dtype, config.device)
    formatter = formatter or ChatFormatter(lm)

    runners = {m: build_method(m, lm, config.options.get(m, {}), draft, universal_draft, config.exact, config.rule)
               for m in config.methods}
    _write_run(out, config, previous, lm, question_file, formatter)

    done = {m: {r["question_id"] for r in read_answers(answer_path(out, m), repair=True)} for m in config.methods}
    pending = [q for q in selected if any(q.question_id not in done[m] for m in config.methods)]
    result = BenchResult(out, len(selected), 0, len(selected) - len(pending))
    if result.skipped:
        _say(progress, f"resuming: {result.skipped} of {len(selected)} questions already done in {out}")
    if pending:
        _check_prompt_lengths(pending, formatter, lm, config.max_new_tokens)
        needed = [m for m in config.methods if any(q.question_id not in done[m] for q in pending)]
        first_of_task = _first_of_each_task(selected)
        units = sum(config.repeats for q in pending for m in config.methods if q.question_id not in done[m])
        _start_engines(runners, needed, progress)
        try:
            _warm_up(runners, needed, pending[0], formatter, config, progress)
            with _bar(progress, units) as bar:
                for number, q in enumerate(pending):
                    todo = [m for m in config.methods if q.question_id not in done[m]]
                    runs, failures = _run_question(q, todo, runners, formatter, config, bar, number)
                    for m, error in failures.items():  # no answer record: a rerun tries it again
                        _record_failure(out, q, m, error)
                    for m in (m for m in todo if m not in failures):
                        append_answer(answer_path(out, m), _record(q, m, runners[m], runs[m], config))
                        done[m].add(q.question_id)
                        if config.traces and first_of_task.get(q.task) == q.question_id:
                            _write_trace(out, m, q, runs[m][0][0][0], lm, config)
                    result.ran += 1
        except KeyboardInterrupt:
            result.interrupted = True
            _say(True, f"interrupted: {result.skipped + result.ran} of {len(selected)} questions are saved in {out}; "
                       "rerun the same command to resume")
    if report and any(read_answers(answer_path(out, m)) for m in config.methods):
        result.report = build_report(out)
        _say(progress, f"report: {result.report}")
    return result


def _run_question(q, todo, runners, formatter, config, bar, number) -> tuple[dict[str, list], dict[str, str]]:
    """runs[method][repeat] = [(GenerationOutput, wall seconds, answer text) per turn], and
    failures[method] = the error of a method that raised on this question."""
    runs: dict[str, list] = {m: [] for m in todo}
    failures: dict[str, str] = {}
    for repeat in range(config.repeats):
        shift = (number + repeat) % len(todo)
        for m in todo[shift:] + todo[:shift]:
            bar.set_description_str(f"q{q.question_id} {q.task} · {m}" + (f" · repeat {repeat + 1}" if config.repeats > 1 else ""))
            if m not in failures:
                try:
                    runs[m].append(_converse(q, runners[m], formatter, config))
                except Exception as e:  # one method failing on one question must not end the whole run
                    failures[m] = f"{type(e).__name__}: {e}"
            bar.update()
    return runs, failures


def _record_failure(out: Path, q, method: str, error: str) -> None:
    with open(out / FAILURES_FILE, "a") as fh:
        fh.write(json.dumps({"question_id": q.question_id, "category": q.category, "method": method,
                             "error": error}) + "\n")
    _say(True, f"{method} failed on q{q.question_id} ({error}); recorded in {out / FAILURES_FILE}; the run goes on")


def _converse(q, runner, formatter, config, max_new_tokens: int | None = None, turns: int | None = None):
    """All turns of a question, each answered after the previous answers, as Spec-Bench does."""
    messages, results = [], []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for turn, text in enumerate(q.turns[:turns]):
        messages.append({"role": "user", "content": text})
        prompt = formatter.encode(messages)
        seed = None if config.temperature == 0 else config.seed * 1_000_003 + q.question_id * 16 + turn
        sync()
        start = time.perf_counter()
        out = runner.generate(prompt, max_new_tokens or config.max_new_tokens, config.temperature, seed)
        sync()
        wall = time.perf_counter() - start
        answer = formatter.answer(out.token_ids)
        results.append((out, wall, answer))
        messages.append({"role": "assistant", "content": answer})
    return results


def _start_engines(runners, methods, progress) -> None:
    """Peers that run another engine start it now, so no timed question pays for its start-up.
    One that cannot start fails each of its questions with the reason (in failures.jsonl)."""
    for m in methods:
        start = getattr(runners[m], "start", None)
        if start is None:
            continue
        _say(progress, f"starting {m}")
        try:
            start()
        except Exception as e:
            _say(True, f"{m} did not start ({str(e).splitlines()[0]}); its questions are recorded as failures")


def _warm_up(runners, methods, question, formatter, config, progress) -> None:
    if not config.warmup:
        return
    _say(progress, f"warming up {', '.join(methods)}")
    for _ in range(config.warmup):
        for m in methods:
            _converse(question, runners[m], formatter, config, max_new_tokens=min(32, config.max_new_tokens), turns=1)


def _check_prompt_lengths(questions, formatter, lm, max_new_tokens) -> None:
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    if limit is None:
        return
    too_long = []
    for q in questions:
        n = len(formatter.encode([{"role": "user", "content": q.turns[0]}]))
        if n + max_new_tokens > limit:
            too_long.append(f"{q.question_id} ({n} tokens)")
    if too_long:
        raise ValueError(f"prompt + --max-new-tokens {max_new_tokens} exceeds the model's context of {limit} for "
                         f"question(s) {', '.join(too_long[:10])}; lower --max-new-tokens or leave those tasks out")


def _first_of_each_task(questions) -> dict[str, int]:
    first: dict[str, int] = {}
    for q in questions:
        first.setdefault(q.task, q.question_id)
    return first


def _write_trace(out, method, q, gen_out, lm, config) -> None:
    title = f"{method} on {config.model}: question {q.question_id} ({q.category}), turn 1"
    write_html(gen_out, lm, trace_path(out, method, q.task), title=title)


# --------------------------------------------------------------------------- records


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _record(q, method: str, runner, repeats: list[list[tuple]], config: BenchConfig) -> dict:
    """One Spec-Bench answer record (plus verispec's own details under "verispec")."""
    first = repeats[0]
    outs = [o for o, _, _ in first]
    walls = [[rep[t][1] for rep in repeats] for t in range(len(first))]
    measured = set(getattr(runner, "measured_phases", PHASES))
    accept_measured = all(o.stats.accept_lengths or not o.token_ids for o in outs)
    time_s = []
    for t in range(len(first)):
        phases = {}
        for phase in PHASES:
            if phase in measured:
                phases[phase] = _median([rep[t][0].stats.time_s.get(phase, 0.0) for rep in repeats])
            else:
                phases[phase] = None
        time_s.append(phases)
    accept_lengths = [n for o in outs for n in o.stats.accept_lengths] if accept_measured else []
    choice = {
        "index": 0,
        "turns": [answer for _, _, answer in first],
        "decoding_steps": [o.stats.target_passes if accept_measured else None for o in outs],
        "new_tokens": [len(o.token_ids) for o in outs],
        "wall_time": [_median(w) for w in walls],
        "accept_lengths": accept_lengths,
    }
    choice["idxs"] = choice["decoding_steps"]  # the same count under EAGLE's name
    details = {
        "method": method,
        "kind": getattr(runner, "kind", "verispec"),
        "task": q.task,
        "options": _jsonable(config.options.get(method, {})),
        "prompt_tokens": [len(o.prompt_ids) for o in outs],
        "token_ids": [list(o.token_ids) for o in outs],
        "kinds": [list(o.kinds) for o in outs],
        "accept_measured": accept_measured,
        "drafted_tokens": [o.stats.drafted_tokens if accept_measured else None for o in outs],
        "accepted_tokens": [o.stats.accepted_tokens if accept_measured else None for o in outs],
        "drafted_per_position": [list(o.stats.drafted_per_position) for o in outs] if accept_measured else None,
        "accepted_per_position": [list(o.stats.accepted_per_position) for o in outs] if accept_measured else None,
        "time_s": time_s,
        "wall_time_repeats": walls,
        "repeats_identical": all([o.token_ids for o, _, _ in rep] == [o.token_ids for o in outs] for rep in repeats),
        "temperature": config.temperature,
        "max_new_tokens": config.max_new_tokens,
    }
    if hasattr(runner, "describe"):  # another engine: its version and settings
        details["engine"] = runner.describe()
    return {
        "question_id": q.question_id,
        "category": q.category,
        "answer_id": uuid.uuid4().hex[:22],
        "model_id": f"{config.model}-{method}-{dtype_name(runner)}",
        "choices": [choice],
        "tstamp": time.time(),
        "verispec": details,
    }


def dtype_name(runner) -> str:
    lm = getattr(runner, "lm", None)
    try:
        return str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    except (AttributeError, StopIteration):
        return "unknown"


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else repr(v))
            for k, v in options.items()}


# --------------------------------------------------------------------------- run.json


def _read_run(out: Path) -> dict | None:
    path = Path(out) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _settings(config: BenchConfig) -> dict[str, Any]:
    return {"suite": config.suite, "model": config.model, "dtype": config.dtype, "max_new_tokens": config.max_new_tokens,
            "temperature": config.temperature, "seed": config.seed, "repeats": config.repeats, "draft": config.draft,
            "universal_draft": config.universal_draft, "exact": config.exact,
            "rule": config.rule}


def _check_same_run(previous: dict | None, config: BenchConfig) -> None:
    if not previous:
        return
    now = _settings(config)
    changed = [f"{k}: {previous.get(k)!r} there, {now[k]!r} now" for k in _SAME_RUN_KEYS
               if k in previous and previous.get(k) != now[k]]
    old_options = previous.get("options", {})
    for m in config.methods:
        if m in old_options and old_options[m] != _jsonable(config.options.get(m, {})):
            changed.append(f"options of {m}: {old_options[m]} there, {_jsonable(config.options.get(m, {}))} now")
    if changed:
        raise ValueError(f"{config.out} holds a run with other settings ({'; '.join(changed)}); rerun with the same "
                         "settings to resume, or use another --out")


def _write_run(out: Path, config: BenchConfig, previous: dict | None, lm: Any, question_file: Path, formatter) -> None:
    info = dict(previous or {})
    methods = list(info.get("methods", []))
    methods += [m for m in config.methods if m not in methods]
    options = dict(info.get("options", {}))
    options.update({m: _jsonable(o) for m, o in config.options.items()})
    info.update(_settings(config))
    info.update(
        methods=methods, options=options, baseline=BASELINE, questions_file=str(question_file),
        tasks=list(config.tasks) if config.tasks else None, per_task=config.per_task,
        chat_template=bool(getattr(formatter, "chat_template", False)), environment=environment(lm),
        exact_mode=resolve_exact(config.exact, lm.model),  # what "auto" chose for this target
        command=config.command or info.get("command"),
        started=info.get("started") or time.strftime("%Y-%m-%d %H:%M:%S"), updated=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    (Path(out) / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")
