"""Question suites. Spec-Bench: 480 questions in six tasks (Xia et al. 2024, "Unlocking
Efficiency in Large Language Model Inference: A Comprehensive Survey of Speculative Decoding").

question.jsonl holds one {"question_id", "category", "turns"} per line. The eight MT-bench
categories (two turns each) form the task "multi-turn conversation" (`mt_bench`); the other
five categories are tasks of their own.
"""
from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..assets import SPEC_BENCH_QUESTIONS
from ..models import verispec_home

SPEC_BENCH_URL = "https://raw.githubusercontent.com/hemingkx/Spec-Bench/main/data/spec_bench/question.jsonl"

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
TASKS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
# column titles as in Spec-Bench's leaderboard
TASK_TITLES = {
    "mt_bench": "Multi-turn Conversation", "translation": "Translation", "summarization": "Summarization",
    "qa": "Question Answering", "math_reasoning": "Mathematical Reasoning", "rag": "Retrieval-aug. Generation",
}
SUITES = ("spec-bench",)


@dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    turns: tuple[str, ...]

    @property
    def task(self) -> str:
        return task_of(self.category)


def task_of(category: str) -> str:
    """Spec-Bench's task of a question category (MT-bench categories -> 'mt_bench')."""
    return "mt_bench" if category in MT_BENCH_CATEGORIES else category


def default_question_path() -> Path | None:
    """The Spec-Bench question.jsonl shipped with the package (verispec/assets/spec_bench, whose
    SOURCE.md gives its origin and licence), or None if the installation lacks it."""
    return SPEC_BENCH_QUESTIONS if SPEC_BENCH_QUESTIONS.is_file() else None


def cache_dir() -> Path:
    return verispec_home() / "data"


def resolve_questions(source: str | os.PathLike | None, cache: Path | None = None, timeout: float = 30.0) -> Path:
    """A local path to question.jsonl: `source` as a path, or downloaded once from a URL
    into the cache; None looks for the default location. Raises ValueError naming the fix."""
    if source is None:
        found = default_question_path()
        if found is None:
            raise ValueError(
                f"the Spec-Bench question set shipped with verispec is missing ({SPEC_BENCH_QUESTIONS}; "
                f"reinstall verispec); or pass --questions PATH_OR_URL, e.g. --questions {SPEC_BENCH_URL}"
            )
        return found
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        return _download_cached(text, cache or cache_dir(), timeout)
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueError(f"question file {path} does not exist; pass a path to question.jsonl or its URL "
                         f"({SPEC_BENCH_URL})")
    return path


def _download_cached(url: str, cache: Path, timeout: float) -> Path:
    name = Path(url.split("?")[0]).name or "questions.jsonl"
    target = cache / hashlib.sha256(url.encode()).hexdigest()[:12] / name
    if target.is_file():
        return target
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise ValueError(
            f"cannot download {url} ({err}) and it is not cached at {target}; check the network, or download "
            "question.jsonl yourself and pass its path with --questions"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".partial")
    partial.write_bytes(data)
    load_questions(partial)  # refuse to cache something that is not a question file
    os.replace(partial, target)
    return target


def load_questions(path: str | os.PathLike) -> list[Question]:
    """Parse question.jsonl; a malformed line raises ValueError with its line number."""
    questions, seen = [], set()
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                q = Question(int(raw["question_id"]), str(raw["category"]), tuple(str(t) for t in raw["turns"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}:{number}: not a question line "
                                 f'{{"question_id", "category", "turns"}} ({err})') from None
            if not q.turns:
                raise ValueError(f"{path}:{number}: question {q.question_id} has no turns")
            if q.question_id in seen:
                raise ValueError(f"{path}:{number}: question_id {q.question_id} appears twice")
            seen.add(q.question_id)
            questions.append(q)
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


def select(questions: list[Question], tasks: list[str] | None = None, per_task: int | None = None) -> list[Question]:
    """Questions of the given tasks (task names, or single categories such as 'writing'), in
    file order, the first `per_task` of each task."""
    if per_task is not None and per_task < 1:
        raise ValueError(f"--per-task must be >= 1, got {per_task}")
    known_tasks = {q.task for q in questions}
    known_categories = {q.category for q in questions}
    wanted = None
    if tasks:
        unknown = [t for t in tasks if t not in known_tasks and t not in known_categories]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; tasks: {', '.join(_ordered(known_tasks))} "
                             f"(or a category: {', '.join(sorted(known_categories))})")
        wanted = set(tasks)
    taken: dict[str, int] = {}
    chosen = []
    for q in questions:
        if wanted is not None and q.task not in wanted and q.category not in wanted:
            continue
        if per_task is not None and taken.get(q.task, 0) >= per_task:
            continue
        taken[q.task] = taken.get(q.task, 0) + 1
        chosen.append(q)
    return chosen


def _ordered(tasks) -> list[str]:
    return sorted(tasks, key=lambda t: (TASKS.index(t) if t in TASKS else len(TASKS), t))


def ordered_tasks(tasks) -> list[str]:
    """Tasks in Spec-Bench's column order, unknown ones after, alphabetically."""
    return _ordered(set(tasks))
