"""Sequence-level distillation data: the target answers prompts (its own self-instruct user
turns, or prompts made from local text); its answers and its features are stored in chunks
on disk.

A dataset directory holds manifest.json (model, tokenizer identity, settings) and
chunk-00000.pt, ... each with up to `chunk_size` samples: token ids (prompt + the
target's greedy answer), the prompt length, and (with features=True) the target's
features for every position (last hidden states after the final norm, bfloat16), which
Medusa and EAGLE heads learn from. Building is resumable: existing chunks are kept, and
prompts are a deterministic function of the seed.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..chat import ChatFormatter
from ..models import tokenizer_identity
from .batched import decode_batch
from .prompts import EvalSetGuard, default_guard, default_sources, make_prompts
from .self_instruct import key as prompt_key, self_instruct_prompts

SELF = "self"  # the source "self": the target writes the prompts (self-instruct)


@dataclass
class Sample:
    ids: torch.Tensor  # [T] long: prompt + answer
    prompt_len: int
    features: torch.Tensor | None  # [T, hidden] the target's features, or None


def encode_prompt(lm: Any, prompt: str) -> list[int]:
    """The prompt exactly as the bench presents a question: the chat template, else its plain
    User/Assistant layout (one formatter for both, so drafters train on what they are run on)."""

    return ChatFormatter(lm).encode([{"role": "user", "content": prompt}])


def generate_answers(lm: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy answers for a batch, each ending with its EOS (or cut at max_new_tokens)."""
    return [answer for answer, _ in decode_batch(lm.model, prompts, max_new_tokens, lm.eos_token_ids, pad_id(lm))]


def pad_id(lm: Any) -> int:
    pad = lm.tokenizer.pad_token_id if lm.tokenizer is not None else None
    return pad if pad is not None else lm.eos_token_ids[0]


@torch.inference_mode()
def target_features(model: torch.nn.Module, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Last hidden states after the final norm, per position, for each sequence (right padding)."""
    device = next(model.parameters()).device
    width = max(map(len, sequences))
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    return [hidden[i, :len(s)].to(torch.bfloat16).cpu().clone() for i, s in enumerate(sequences)]


# Settings that may change between runs of one build: the size targets (a rerun with a larger
# target grows the dataset).
GROWABLE = ("n_samples", "answer_tokens")
BUILD_REPORT = "build.json"


@dataclass
class _BuildState:
    """What the chunks on disk already hold (read on resume)."""
    samples: int = 0
    answer_tokens: int = 0
    seconds: float = 0.0
    dropped: int = 0
    seen_prompts: set = field(default_factory=set)
    seen_answers: set = field(default_factory=set)

    def add(self, prompts: list[str], answers: list[list[int]]) -> None:
        self.samples += len(answers)
        self.answer_tokens += sum(map(len, answers))
        self.seen_prompts.update(map(prompt_key, prompts))
        self.seen_answers.update(map(tuple, answers))


def build_dataset(lm: Any, out: str | Path, n_samples: int = 1024, sources: Sequence[str | Path] | None = None,
                  max_new_tokens: int = 192, batch_size: int = 16, chunk_size: int = 64, seed: int = 0,
                  features: bool = True, max_prompt_tokens: int = 384, guard: EvalSetGuard | None = None,
                  progress: bool = True, answer_tokens: int | None = None) -> Path:
    """Write (or go on writing) a distillation dataset for `lm` into `out`.

    The build grows chunk by chunk until it holds n_samples samples or, given answer_tokens,
    that many answer tokens. Each chunk is written whole or not at all and holds its prompt
    texts, so an interrupted build resumes where it stopped (rerun the same command; a larger
    target grows a finished dataset). Prompts repeated (case and spacing aside) and answers
    repeated token for token are dropped; prompts quoting the evaluation set are refused.
    Runs on whatever device `lm` is on."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(map(str, sources or [SELF]))
    sources = [SELF] if names == [SELF] else default_sources() if names == ["docs"] else [Path(s) for s in names]
    manifest = {
        "model": getattr(lm, "name", "?"), "tokenizer": tokenizer_identity(lm), "n_samples": n_samples,
        "answer_tokens": answer_tokens,
        "sources": [str(s) for s in sources], "max_new_tokens": max_new_tokens, "seed": seed,
        "features": features, "chunk_size": chunk_size, "max_prompt_tokens": max_prompt_tokens,
        "hidden_size": lm.model.config.hidden_size,
    }
    _check_or_write_manifest(out, manifest)
    state = _scan(out)

    def finished() -> bool:
        return state.answer_tokens >= answer_tokens if answer_tokens else state.samples >= n_samples

    if finished():
        return out
    guard = guard if guard is not None else default_guard()
    legacy = json.loads((out / "prompts.json").read_text()) if (out / "prompts.json").exists() else None
    fixed = legacy if legacy is not None else None if sources == [SELF] else \
        make_prompts(sources, n_samples, seed=seed, guard=guard)
    device = next(lm.model.parameters()).device
    c = 0
    while not finished():
        path = out / f"chunk-{c:05d}.pt"
        if path.exists():
            c += 1
            continue
        if fixed is not None:  # prompts known in advance: chunk c is its slice of them
            texts = [t for t in fixed[c * chunk_size:(c + 1) * chunk_size] if prompt_key(t) not in state.seen_prompts]
            if c * chunk_size >= len(fixed):
                break  # every given prompt is answered
        else:
            texts = self_instruct_prompts(lm, chunk_size, seed=seed * 1_000_003 + c, guard=guard,
                                          batch_size=batch_size, seen=state.seen_prompts)
        start = time.perf_counter()
        texts, prompts, answers = _answer(lm, texts, max_new_tokens, max_prompt_tokens, batch_size, state)
        seconds = time.perf_counter() - start
        write_chunk(path, lm.model, [p + a for p, a in zip(prompts, answers)], [len(p) for p in prompts], features,
                    batch_size, texts=texts, stats={"seconds": seconds, "device": str(device)})
        state.add(texts, answers)
        state.seconds += seconds
        _write_build_report(out, state, device)
        if progress:
            target = f"{state.answer_tokens}/{answer_tokens} answer tokens" if answer_tokens else \
                f"{state.samples}/{n_samples} samples"
            print(f"[data] chunk {c}: {target}; {sum(map(len, answers)) / max(seconds, 1e-9):.0f} answer tokens/s "
                  f"on {device}; {state.dropped} duplicates dropped so far", flush=True)
        c += 1
    return out


def _answer(lm: Any, texts: list[str], max_new_tokens: int, max_prompt_tokens: int, batch_size: int,
            state: _BuildState) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """The target's greedy answers to texts, batched by prompt length; repeated answers dropped."""
    prompts = [encode_prompt(lm, t)[-max_prompt_tokens:] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(prompts[i]))  # like lengths pad less
    answers: dict[int, list[int]] = {}
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        for i, a in zip(batch, generate_answers(lm, [prompts[i] for i in batch], max_new_tokens)):
            answers[i] = a
    kept, seen = [], set()
    for i in range(len(texts)):
        key = tuple(answers[i])
        if not key or key in seen or key in state.seen_answers:
            state.dropped += 1
            continue
        seen.add(key)
        kept.append(i)
    return [texts[i] for i in kept], [prompts[i] for i in kept], [answers[i] for i in kept]


def _scan(out: Path) -> _BuildState:
    """The state of the chunks already written (their prompts and answers, for deduplication)."""
    state = _BuildState()
    if (out / BUILD_REPORT).exists():
        old = json.loads((out / BUILD_REPORT).read_text())
        state.seconds, state.dropped = old.get("seconds", 0.0), old.get("dropped", 0)
    legacy = json.loads((out / "prompts.json").read_text()) if (out / "prompts.json").exists() else []
    for c in chunk_indices(out):
        record = load_chunk(out / f"chunk-{c:05d}.pt")
        answers = [ids[n:].tolist() for ids, n in zip(record["ids"], record["prompt_lens"])]
        size = len(answers)
        state.add(record.get("texts") or legacy[c * size:(c + 1) * size], answers)
    return state


def _write_build_report(out: Path, state: _BuildState, device: torch.device) -> None:
    """build.json: size so far, generation time and throughput (rewritten after each chunk)."""
    report = {"samples": state.samples, "answer_tokens": state.answer_tokens, "seconds": round(state.seconds, 1),
              "answer_tokens_per_s": round(state.answer_tokens / max(state.seconds, 1e-9), 1),
              "duplicates_dropped": state.dropped, "device": str(device)}
    tmp = out / (BUILD_REPORT + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.rename(out / BUILD_REPORT)


def write_chunk(path: Path, model: torch.nn.Module, sequences: list[list[int]], prompt_lens: list[int],
                features: bool = True, batch_size: int = 16, texts: list[str] | None = None,
                stats: dict | None = None) -> None:
    """One chunk file; written whole or not at all, so an interrupted build resumes cleanly."""
    record = {"ids": [torch.tensor(s) for s in sequences], "prompt_lens": list(prompt_lens)}
    if texts is not None:
        record["texts"] = list(texts)
    if stats:
        record["stats"] = dict(stats)
    if features:
        record["features"] = [f for b in range(0, len(sequences), batch_size)
                              for f in target_features(model, sequences[b:b + batch_size])]
    tmp = path.with_suffix(".tmp")
    torch.save(record, tmp)
    tmp.rename(path)


def write_dataset(lm: Any, out: str | Path, sequences: list[list[int]], prompt_lens: list[int],
                  chunk_size: int = 64, features: bool = True, **manifest) -> Path:
    """A dataset from given sequences (e.g. made by other means, or for tests)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_or_write_manifest(out, {"model": getattr(lm, "name", "?"), "tokenizer": tokenizer_identity(lm),
                                   "n_samples": len(sequences), "features": features, "chunk_size": chunk_size,
                                   "hidden_size": lm.model.config.hidden_size, **manifest})
    for c in range(0, len(sequences), chunk_size):
        write_chunk(out / f"chunk-{c // chunk_size:05d}.pt", lm.model, sequences[c:c + chunk_size],
                    prompt_lens[c:c + chunk_size], features)
    return out


def _check_or_write_manifest(out: Path, manifest: dict) -> None:
    path = out / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in manifest if k not in GROWABLE and old.get(k) != manifest[k])
        if diff:
            raise ValueError(f"{out} holds a dataset built with other settings ({', '.join(diff)}); "
                             "use another --data directory or delete this one")
    path.write_text(json.dumps(manifest, indent=1))  # the size targets are the latest run's


def load_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not (path / "manifest.json").exists():
        raise ValueError(f"{path} is not a verispec training dataset (no manifest.json); build one with "
                         "'verispec train data'")
    return json.loads((path / "manifest.json").read_text())


def check_dataset_for(lm: Any, path: str | Path, need_features: bool = False) -> dict:
    """The dataset's manifest, after checking it was made by this target (same tokenizer)."""
    manifest = load_manifest(path)
    if manifest["tokenizer"]["vocab_hash"] != tokenizer_identity(lm)["vocab_hash"]:
        raise ValueError(f"the dataset in {path} was built with another tokenizer ({manifest['model']}); "
                         "build one for this model")
    if need_features and not manifest["features"]:
        raise ValueError(f"the dataset in {path} has no target features; rebuild it with features")
    if need_features and manifest["hidden_size"] != lm.model.config.hidden_size:
        raise ValueError(f"the dataset in {path} holds features of width {manifest['hidden_size']}, "
                         f"not this model's {lm.model.config.hidden_size}")
    return manifest


def iter_samples(path: str | Path, chunks: Sequence[int] | None = None) -> Iterator[Sample]:
    """Samples of the given chunk indices (default all present), in order."""
    files = sorted(Path(path).glob("chunk-*.pt"))
    if chunks is not None:
        wanted = {f"chunk-{c:05d}.pt" for c in chunks}
        files = [f for f in files if f.name in wanted]
    for f in files:
        record = load_chunk(f)
        feats = record.get("features") or [None] * len(record["ids"])
        for ids, n, h in zip(record["ids"], record["prompt_lens"], feats):
            yield Sample(ids, n, h)


def token_ranking(samples: Sequence[Sample], vocab_size: int) -> torch.Tensor:
    """Every token id, most useful to a drafter first: by count in the answers (what drafters
    draft), then by count anywhere, then lowest id. Draft vocabularies are its prefixes."""
    answer = torch.zeros(vocab_size, dtype=torch.long)
    every = torch.zeros(vocab_size, dtype=torch.long)
    for s in samples:
        ids = s.ids.long()
        answer += torch.bincount(ids[s.prompt_len:], minlength=vocab_size)
        every += torch.bincount(ids, minlength=vocab_size)
    order = torch.arange(vocab_size)  # stable sorts, least significant key first
    order = order[torch.sort(-every[order], stable=True).indices]
    return order[torch.sort(-answer[order], stable=True).indices]


def chunk_indices(path: str | Path) -> list[int]:
    return sorted(int(f.stem.split("-")[1]) for f in Path(path).glob("chunk-*.pt"))


def load_chunk(path: Path) -> dict:
    """One chunk file, or a clear error naming it if it cannot be read."""
    try:
        return torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"{path} is truncated or corrupt ({type(err).__name__}); delete it and rerun the "
                         "'verispec train data' command that built this dataset: it rebuilds missing chunks") from err
