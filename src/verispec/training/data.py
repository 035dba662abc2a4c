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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..datastore import tokenizer_identity
from .prompts import EvalSetGuard, default_guard, default_sources, make_prompts
from .self_instruct import self_instruct_prompts

SELF = "self"  # the source "self": the target writes the prompts (self-instruct)


@dataclass
class Sample:
    ids: torch.Tensor  # [T] long: prompt + answer
    prompt_len: int
    features: torch.Tensor | None  # [T, hidden] the target's features, or None


def encode_prompt(lm: Any, prompt: str) -> list[int]:
    """The prompt exactly as the bench presents a question: the chat template, else its plain
    User/Assistant layout (one formatter for both, so drafters train on what they are run on)."""
    from ..bench.runner import ChatFormatter

    return ChatFormatter(lm).encode([{"role": "user", "content": prompt}])


@torch.inference_mode()
def generate_answers(lm: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy answers for a batch (left padding), each cut after its first EOS."""
    pad = lm.tokenizer.pad_token_id
    pad = pad if pad is not None else lm.eos_token_ids[0]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=pad, eos_token_id=lm.eos_token_ids or None)
    eos = set(lm.eos_token_ids)
    answers = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        answers.append(row[:cut])
    return answers


@torch.inference_mode()
def target_features(model: torch.nn.Module, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Last hidden states after the final norm, per position, for each sequence (right padding)."""
    width = max(map(len, sequences))
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    return [hidden[i, :len(s)].to(torch.bfloat16).clone() for i, s in enumerate(sequences)]


def build_dataset(lm: Any, out: str | Path, n_samples: int = 1024, sources: Sequence[str | Path] | None = None,
                  max_new_tokens: int = 192, batch_size: int = 16, chunk_size: int = 64, seed: int = 0,
                  features: bool = True, max_prompt_tokens: int = 384, guard: EvalSetGuard | None = None,
                  progress: bool = True) -> Path:
    """Write (or finish writing) a distillation dataset for `lm` into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(map(str, sources or [SELF]))
    sources = [SELF] if names == [SELF] else default_sources() if names == ["docs"] else [Path(s) for s in names]
    manifest = {
        "model": getattr(lm, "name", "?"), "tokenizer": tokenizer_identity(lm), "n_samples": n_samples,
        "sources": [str(s) for s in sources], "max_new_tokens": max_new_tokens, "seed": seed,
        "features": features, "chunk_size": chunk_size, "max_prompt_tokens": max_prompt_tokens,
        "hidden_size": lm.model.config.hidden_size,
    }
    _check_or_write_manifest(out, manifest)
    n_chunks = (n_samples + chunk_size - 1) // chunk_size
    if all((out / f"chunk-{c:05d}.pt").exists() for c in range(n_chunks)):
        return out  # complete: nothing to generate
    guard = guard if guard is not None else default_guard()
    texts = _prompts(lm, out, sources, n_samples, seed, guard, batch_size, progress)
    prompts = [encode_prompt(lm, t)[-max_prompt_tokens:] for t in texts]
    start = time.perf_counter()
    for c in range(n_chunks):
        path = out / f"chunk-{c:05d}.pt"
        if path.exists():
            continue
        chunk = prompts[c * chunk_size:(c + 1) * chunk_size]
        sequences = []
        for b in range(0, len(chunk), batch_size):
            batch = chunk[b:b + batch_size]
            sequences += [p + a for p, a in zip(batch, generate_answers(lm, batch, max_new_tokens))]
        write_chunk(path, lm.model, sequences, [len(p) for p in chunk], features, batch_size)
        if progress:
            done = c + 1
            print(f"[data] chunk {done}/{n_chunks}  {time.perf_counter() - start:.0f}s", flush=True)
    return out


def _prompts(lm: Any, out: Path, sources: list, n: int, seed: int, guard: EvalSetGuard, batch_size: int,
             progress: bool) -> list[str]:
    """The dataset's prompt texts, kept in prompts.json: a resumed build reuses them (sampling
    the target's own user turns is a good part of the build's time)."""
    path = out / "prompts.json"
    if path.exists():
        return json.loads(path.read_text())
    if sources == [SELF]:
        texts = self_instruct_prompts(lm, n, seed=seed, guard=guard, batch_size=batch_size, progress=progress)
    else:
        texts = make_prompts(sources, n, seed=seed, guard=guard)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(texts, indent=0))
    tmp.rename(path)  # whole or absent
    return texts


def write_chunk(path: Path, model: torch.nn.Module, sequences: list[list[int]], prompt_lens: list[int],
                features: bool = True, batch_size: int = 16) -> None:
    """One chunk file; written whole or not at all, so an interrupted build resumes cleanly."""
    record = {"ids": [torch.tensor(s) for s in sequences], "prompt_lens": list(prompt_lens)}
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
        if old != manifest:
            diff = sorted(k for k in manifest if old.get(k) != manifest[k])
            raise ValueError(f"{out} holds a dataset built with other settings ({', '.join(diff)}); "
                             "use another --data directory or delete this one")
    else:
        path.write_text(json.dumps(manifest, indent=1))


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
        record = torch.load(f, weights_only=True)
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
