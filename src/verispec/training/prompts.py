"""Training prompts made from local text, and the guard that keeps the evaluation set out.

Sequence-level distillation needs prompts whose answers the target writes. They come
from text a user has on disk (by default the Python standard library's source and, if
installed, the python3.11-doc HTML): passages become summarise / explain / continue /
translate / answer-from-context requests, docstrings become coding requests, and
templated arithmetic stories add step-by-step reasoning. Spec-Bench questions are the
evaluation set: a prompt that shares a long word run with one of them is refused.
"""
from __future__ import annotations

import json
import random
import re
import sysconfig
from pathlib import Path
from typing import Iterable, Sequence

from ..bench.suites import default_question_path  # the bench's own lookup of question.jsonl
from ..datastore import corpus_files, read_text

DOC_DIR = Path("/usr/share/doc/python3.11/html")
SHINGLE = 10  # words: a shared run this long means the prompt quotes an evaluation question


def default_sources() -> list[Path]:
    """The standard library's source (always there) and the Python docs when installed."""
    sources = [Path(sysconfig.get_paths()["stdlib"])]
    if DOC_DIR.is_dir():
        sources.append(DOC_DIR)
    return sources


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _shingles(text: str) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i:i + SHINGLE]) for i in range(max(0, len(w) - SHINGLE + 1))}


class EvalSetGuard:
    """Refuses training text that quotes the evaluation questions (Spec-Bench's question.jsonl)."""

    def __init__(self, question_files: Sequence[str | Path] = ()):
        self.files = [Path(f).resolve() for f in question_files if Path(f).is_file()]
        self.shingles: set[tuple[str, ...]] = set()
        for f in self.files:
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    for turn in json.loads(line).get("turns", []):
                        self.shingles |= _shingles(turn)

    def check_source(self, path: Path) -> None:
        if path.resolve() in self.files or path.name == "question.jsonl":
            raise ValueError(f"{path} is an evaluation question set (Spec-Bench); training data must not come "
                             "from it, or benchmark results would measure memorisation")

    def check_prompt(self, prompt: str) -> None:
        if self.shingles and not _shingles(prompt).isdisjoint(self.shingles):
            raise ValueError("a training prompt quotes a Spec-Bench question (the evaluation set); "
                             f"refusing it: {prompt[:120]!r}")

    def clean(self, prompt: str) -> bool:
        try:
            self.check_prompt(prompt)
            return True
        except ValueError:
            return False


def default_guard() -> EvalSetGuard:
    path = default_question_path()
    return EvalSetGuard([path] if path is not None else [])


# ---------------------------------------------------------------- passages

def _prose_passages(text: str, min_words: int = 40, max_words: int = 180) -> list[str]:
    paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    out = []
    for p in paras:
        n = len(p.split())
        if min_words <= n <= max_words and sum(c.isalpha() for c in p) > 0.6 * len(p):
            out.append(p)
    return out


def _code_chunks(source: str, min_lines: int = 6, max_lines: int = 30) -> list[str]:
    """Top-level functions and methods (by indentation), trimmed to max_lines."""
    lines = source.splitlines()
    chunks, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)def \w+\(", lines[i])
        if m:
            indent = len(m.group(1))
            j = i + 1
            while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
                j += 1
            body = lines[i:j]
            while body and not body[-1].strip():
                body.pop()
            if len(body) >= min_lines:
                chunks.append("\n".join(l[indent:] for l in body[:max_lines]))
            i = j
        else:
            i += 1
    return chunks


def _docstring_tasks(source: str) -> list[str]:
    """First lines of function docstrings: 'Return the ...' -> a coding request."""
    found = re.findall(r'def (\w+)\([^)]*\)[^:]*:\s*\n\s*"""([^\n"]{20,120})', source)
    return [f"{line.strip()}" for name, line in found if not name.startswith("_")]


LANGUAGES = ("French", "German", "Spanish", "Italian", "Portuguese", "Chinese")
WRITING = ("a short blog post", "an email to a colleague", "a short story", "a product description",
           "a persuasive paragraph", "a short poem", "a list of tips")


def _arithmetic(rng: random.Random) -> str:
    a, b, c = rng.randint(3, 60), rng.randint(2, 12), rng.randint(2, 40)
    things = rng.choice(["apples", "books", "tickets", "boxes", "marbles", "stamps", "chairs"])
    who = rng.choice(["Maria", "Tom", "A shop", "A school", "Ken", "Aisha", "The club"])
    forms = [
        f"{who} has {a} {things} and buys {b} packs of {c} {things} each. How many {things} are there now? "
        "Think step by step.",
        f"{who} sells {a} {things} a day for {b} days, then gives away {c}. How many were sold in all, and how "
        "many are left of the sold ones after the giveaway? Explain your reasoning.",
        f"There are {a * b} {things} shared equally among {b} people. Each person then gets {c} more. "
        "How many does each person have? Show your work.",
        f"If {b} workers make {a} {things} in {c} hours, how many do {b + 2} workers make in the same time? "
        "Solve it step by step.",
    ]
    return rng.choice(forms)


def make_prompts(sources: Sequence[str | Path], n: int, seed: int = 0, guard: EvalSetGuard | None = None,
                 max_files: int = 4000) -> list[str]:
    """n varied instruction prompts from the text files under `sources` (deterministic for a seed)."""
    guard = guard if guard is not None else EvalSetGuard()
    files = corpus_files(sources)
    if not any("site-packages" in Path(s).parts for s in sources):  # the stdlib dir holds installed packages too
        files = [f for f in files if "site-packages" not in f.parts]
    for f in files:
        guard.check_source(f)
    rng = random.Random(seed)
    rng.shuffle(files)
    prose, code, tasks = [], [], []
    for f in files[:max_files]:
        try:
            text = read_text(f)
        except (OSError, UnicodeDecodeError):
            continue
        if f.suffix == ".py":
            code += _code_chunks(text)
            tasks += _docstring_tasks(text)
        else:
            prose += _prose_passages(text)
        if len(prose) + len(code) > 20 * n and len(tasks) > n:
            break
    if not prose and not code:
        raise ValueError(f"no usable text under {', '.join(map(str, sources))} (need prose paragraphs or Python code)")
    makers = _makers(prose, code, tasks)
    prompts: list[str] = []
    while len(prompts) < n:
        prompt = rng.choice(makers)(rng)
        if prompt and guard.clean(prompt):
            prompts.append(prompt)
    return prompts


def _makers(prose: list[str], code: list[str], tasks: list[str]):
    def pick(pool, rng):
        return rng.choice(pool) if pool else None

    def summarise(rng):
        p = pick(prose, rng)
        return p and f"Summarize the following text in a few sentences.\n\n{p}"

    def explain(rng):
        c = pick(code, rng)
        return c and f"Explain what the following Python code does.\n\n```python\n{c}\n```"

    def continue_text(rng):
        p = pick(prose, rng)
        return p and f"Continue this text with one more paragraph.\n\n{p}"

    def translate(rng):
        p = pick(prose, rng)
        if not p:
            return None
        sentences = re.split(r"(?<=[.!?])\s+", p)
        return f"Translate into {rng.choice(LANGUAGES)}:\n\n{' '.join(sentences[:2])}"

    def answer(rng):
        p = pick(prose, rng)
        if not p:
            return None
        topic = max(p.split()[:30], key=len).strip(".,:;()`'\"")
        return f"Use the context to answer the question.\n\nContext: {p}\n\nQuestion: What does the context say about {topic}?"

    def code_request(rng):
        t = pick(tasks, rng)
        return t and f"Write a Python function that does the following: {t}"

    def write(rng):
        p = pick(prose, rng)
        if not p:
            return None
        topic = " ".join(p.split()[:8])
        return f"Write {rng.choice(WRITING)} inspired by this phrase: \"{topic}\""

    return [summarise, explain, continue_text, translate, answer, code_request, write, _arithmetic]
