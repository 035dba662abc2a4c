"""`verispec calibrate --method layer-skip`: choose which layers the layer-skip drafter skips.

The search scores a skip set by the speedup it would give under greedy decoding, estimated
from one teacher-forced pass of the skipping model over the target's own greedy
continuations of a few calibration prompts: while a chain draft agrees with the target, its
inputs are the target's tokens, so the draft's prediction at each position of that pass is
what it would draft there. Replaying the loop over those predictions gives the accepted
tokens per step exactly, for every chain length k and early-stop threshold at once (only
the draft's cost after a wrong token is assumed: it drafts on to k). Cost model (per target
pass = 1): a draft forward costs r = (kept layers' + head's parameters) / (all layers' +
head's parameters); estimated speedup = emitted tokens / (steps + r * draft forwards).

Search (time-boxed, seeded): order layers by how little they change the residual stream
(block influence, 1 - cos(input, output) of each layer, from one target pass), evaluate
skipping the 1, 2, 3, ... least influential layers (until 4 sizes in a row do worse), then
hill-climb with random add/remove/swap moves, restarting a few moves away from the best set
whenever a neighbourhood is seen through, until the time is spent. The result is saved as
JSON with the model's identity (name + config hash); layer-skip refuses a file made for
another model. The calibration prompts are verispec's own (none from Spec-Bench), or
given with --prompts.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .layers import decoder_layers, keep_last, skip_layers_view
from .models import load_model, verispec_home
from .progress import progress as progress_bar
from .progress import say

FORMAT = "verispec-calibration/1"
METHODS = ("layer-skip",)
K_GRID = tuple(range(1, 9))
THRESHOLD_GRID = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

# Written for verispec; deliberately not Spec-Bench questions, so the benchmark stays unseen.
CALIBRATION_PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, in simple terms.",
    "Write a Python function that returns the prime numbers below n, with a docstring.",
    "A shop sells pencils at 3 for 45 cents. How much do 12 pencils cost? Explain step by step.",
    "Translate into French: The library opens at nine and closes at six on weekdays.",
    "Summarize the main causes of the French Revolution in a few sentences.",
    "List five tips for staying focused while studying at home.",
    "What is the difference between weather and climate?",
)

# config keys that do not change what the model computes
_VOLATILE_KEYS = {
    "transformers_version", "dtype", "torch_dtype", "name_or_path", "attn_implementation", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "architectures", "tie_word_embeddings",
}


# --------------------------------------------------------------------------- identity and files


def config_hash(config: Any) -> str:
    """sha256 of the model's architecture config, ignoring dtype, attention backend and bookkeeping keys."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    kept = {k: v for k, v in data.items() if not k.startswith("_") and k not in _VOLATILE_KEYS}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_identity(lm: Any) -> dict[str, str]:
    return {"model": str(getattr(lm, "name", "?")), "config_hash": config_hash(lm.model.config)}


def default_calibration_path(lm_or_name: Any, method: str = "layer-skip", home: str | os.PathLike | None = None) -> Path:
    """<verispec home>/calibration/<method>/<model name>.json (the file used when no skip is given)."""
    name = lm_or_name if isinstance(lm_or_name, str) else str(getattr(lm_or_name, "name", "model"))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    root = Path(home).expanduser() if home is not None else verispec_home()
    return root / "calibration" / method / f"{slug}.json"


def load_calibration(path: str | os.PathLike, lm: Any, method: str = "layer-skip") -> dict:
    """Read a calibration file and check it was made for this model and method."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"calibration file {path} does not exist; make one with "
                         f"`verispec calibrate --model {getattr(lm, 'name', 'MODEL')} --method {method} --out {path}`")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"calibration file {path} is not valid JSON ({err}); calibrate again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("method") != method:
        raise ValueError(f"{path} is not a {method} calibration file ({FORMAT}); calibrate again")
    ident = model_identity(lm)
    if (data.get("model"), data.get("config_hash")) != (ident["model"], ident["config_hash"]):
        raise ValueError(
            f"calibration file {path} was made for model {data.get('model')!r} (config {data.get('config_hash')}), "
            f"not for {ident['model']!r} (config {ident['config_hash']}); calibrate this model with "
            f"`verispec calibrate --model {ident['model']} --method {method}`"
        )
    return data


def resolve_layer_skip(lm: Any, skip: Any) -> tuple[list[int], dict]:
    """The layer-skip drafter's `skip` option -> (layers to skip, suggested options k/threshold)."""
    if skip is None:
        path = default_calibration_path(lm)
        if not path.is_file():
            name = getattr(lm, "name", "MODEL")
            raise ValueError(
                f"layer-skip needs to know which layers to skip and no calibration of {name!r} exists at {path}: "
                f"run `verispec calibrate --model {name} --method layer-skip`, or pass skip=FILE or skip=[layer indices]"
            )
        skip = path
    if isinstance(skip, (str, os.PathLike)):
        data = load_calibration(skip, lm)
        return list(data["skip"]), {k: data[k] for k in ("k", "threshold") if data.get(k) is not None}
    if isinstance(skip, (list, tuple)):
        return list(skip), {}
    raise ValueError(f"skip must be a calibration file or a list of layer indices, got {skip!r}")


# --------------------------------------------------------------------------- scoring


@dataclass
class CalibrationSequence:
    ids: torch.Tensor  # [len] prompt + the target's greedy continuation
    n_prompt: int


@dataclass
class Score:
    speedup: float  # estimated, vs plain decoding, under the cost model above
    k: int
    threshold: float
    mean_accepted_tokens: float  # emitted tokens per target pass
    acceptance_rate: float
    draft_cost_ratio: float


def target_continuations(lm: Any, prompts: Sequence[list[int]], max_new_tokens: int) -> list[CalibrationSequence]:
    """The target's own greedy continuation of each prompt (stopping at its end-of-sequence ids)."""
    eos = list(getattr(lm, "eos_token_ids", []) or []) or None
    out = []
    for ids in prompts:
        x = torch.tensor([ids], device=lm.model.device)
        with torch.inference_mode():
            full = lm.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=eos, pad_token_id=(eos or [0])[0])
        if full.shape[1] - len(ids) >= 2:
            out.append(CalibrationSequence(full[0].cpu(), len(ids)))
    if not out:
        raise ValueError("the target stopped at once on every calibration prompt; give other prompts (--prompts)")
    return out


def teacher_forced(model: torch.nn.Module, data: list[CalibrationSequence]) -> list[tuple[list[bool], list[float]]]:
    """Per sequence: does the model's argmax equal the target's next token at each continuation
    position, and the model's probability of its argmax there."""
    result = []
    device = next(model.parameters()).device
    for seq in data:
        n_new = len(seq.ids) - seq.n_prompt
        with torch.inference_mode():
            logits = model(input_ids=seq.ids[None, :-1].to(device), logits_to_keep=keep_last(n_new, len(seq.ids) - 1, device)).logits[0].float()
        probs = torch.softmax(logits, -1)
        conf, guess = probs.max(-1)
        result.append(((guess.cpu() == seq.ids[seq.n_prompt:]).tolist(), conf.cpu().tolist()))
    return result


def replay(agreement, k: int, threshold: float) -> tuple[int, int, int, int]:
    """Replay chain drafting over teacher-forced predictions: (emitted, steps, draft forwards, accepted).
    Exact for the accepted tokens; after a wrong draft token the draft is assumed to go on to k
    (its later tokens are unknown), which can only overcount its cost."""
    emitted = steps = forwards = accepted = 0
    for match, conf in agreement:
        n, t = len(match), 0
        while t < n:
            good = drafted = 0
            for i in range(min(k, n - t)):
                drafted += 1
                if not match[t + i]:
                    if conf[t + i] >= threshold:
                        drafted = min(k, n - t)
                    break
                good += 1
                if conf[t + i] < threshold:
                    break
            steps += 1
            forwards += drafted
            accepted += good
            emitted += min(good + 1, n - t)
            t += good + 1
    return emitted, steps, forwards, accepted


def best_setting(agreement, ratio: float) -> Score:
    best = None
    for k in K_GRID:
        for threshold in THRESHOLD_GRID:
            emitted, steps, forwards, accepted = replay(agreement, k, threshold)
            speedup = emitted / (steps + ratio * forwards)
            if best is None or speedup > best.speedup + 1e-9:
                best = Score(speedup, k, threshold, emitted / steps, accepted / max(forwards, 1), ratio)
    return best


def draft_cost_ratio(model: torch.nn.Module, skip: Sequence[int]) -> float:
    layers = decoder_layers(model)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    head = model.get_output_embeddings().weight.numel()
    kept = sum(c for i, c in enumerate(per_layer) if i not in set(skip))
    return (kept + head) / (sum(per_layer) + head)


def block_influence(model: torch.nn.Module, data: list[CalibrationSequence]) -> list[float]:
    """Per layer: 1 - mean cosine similarity of its input and output hidden states (ShortGPT's BI)."""
    device = next(model.parameters()).device
    totals, count = None, 0
    for seq in data:
        with torch.inference_mode():
            hidden = model(input_ids=seq.ids[None].to(device), output_hidden_states=True, logits_to_keep=keep_last(1, len(seq.ids), device)).hidden_states
        # hidden[i] is layer i's input; the last entry is after the final norm, so compare
        # consecutive raw states only (the last layer's output is approximated by the normed state)
        sims = [torch.nn.functional.cosine_similarity(hidden[i][0].float(), hidden[i + 1][0].float(), dim=-1).sum()
                for i in range(len(hidden) - 1)]
        sims = torch.stack(sims)
        totals = sims if totals is None else totals + sims
        count += hidden[0].shape[1]
    return (1 - totals / count).tolist()


# --------------------------------------------------------------------------- search


def calibrate_layer_skip(lm: Any, prompts: Sequence[str | list[int]] | None = None, minutes: float = 3.0,
                         max_new_tokens: int = 48, seed: int = 0, max_evals: int | None = None,
                         progress: bool = True) -> dict:
    """Search the skip set with the best estimated speedup; returns the calibration record (not saved)."""
    started = time.perf_counter()
    deadline = started + 60 * minutes
    total = len(decoder_layers(lm.model))
    if total < 2:
        raise ValueError(f"{getattr(lm, 'name', 'this model')} has {total} decoder layer(s); layer-skip needs at least 2")
    encoded = [_encode_prompt(lm, p) for p in (prompts or CALIBRATION_PROMPTS)]
    _say(progress, f"target continuations of {len(encoded)} calibration prompts ({max_new_tokens} new tokens each)")
    data = target_continuations(lm, encoded, max_new_tokens)
    rng = random.Random(seed)
    scores: dict[frozenset, Score] = {}

    def score(skip) -> Score:
        key = frozenset(skip)
        if key not in scores:
            view = skip_layers_view(lm.model, sorted(key))
            scores[key] = best_setting(teacher_forced(view, data), draft_cost_ratio(lm.model, sorted(key)))
        return scores[key]

    def out_of_budget() -> bool:
        return time.perf_counter() > deadline or (max_evals is not None and len(scores) >= max_evals)

    bar = _bar(progress, 60 * minutes)
    influence = block_influence(lm.model, data)
    order = sorted(range(total), key=lambda i: influence[i])
    best_skip, best = None, None
    worse_in_a_row = 0
    for n in range(1, total):  # skip the n least influential layers
        if out_of_budget():
            break
        candidate = sorted(order[:n])
        s = score(candidate)
        if best is None or s.speedup > best.speedup:
            best_skip, best, worse_in_a_row = candidate, s, 0
        else:
            worse_in_a_row += 1
            if worse_in_a_row >= 4:
                break
        _tick(bar, started, best)
    # iterated local search: hill-climb from the best set with one-layer moves; once its
    # neighbourhood is seen through, restart from a few random moves away from the best
    if best is None:  # the budget ran out before a single set was scored: score the first one anyway
        best_skip = sorted(order[:1])
        best = score(best_skip)
    current_skip, current, stale = best_skip, best, 0
    while not out_of_budget():
        kick = stale >= 100
        candidate = _moved(best_skip if kick else current_skip, 3 if kick else 1, total, rng)
        if frozenset(candidate) in scores:
            stale += 1
            if stale > 2000:  # every set near the best is scored
                break
            continue
        stale = 0
        s = score(candidate)
        if kick or s.speedup > current.speedup:
            current_skip, current = candidate, s
        if s.speedup > best.speedup:
            best_skip, best = candidate, s
        _tick(bar, started, best)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - started
    return {
        "format": FORMAT, "method": "layer-skip", **model_identity(lm), "num_layers": total,
        "skip": sorted(best_skip), "kept": [i for i in range(total) if i not in set(best_skip)],
        "k": best.k, "threshold": best.threshold,
        "estimate": {"speedup": round(best.speedup, 4), "mean_accepted_tokens": round(best.mean_accepted_tokens, 4),
                     "acceptance_rate": round(best.acceptance_rate, 4),
                     "draft_cost_ratio": round(best.draft_cost_ratio, 4)},
        "search": {"evaluations": len(scores), "seconds": round(elapsed, 1), "prompts": len(data),
                   "tokens": sum(len(s.ids) - s.n_prompt for s in data), "max_new_tokens": max_new_tokens,
                   "seed": seed, "custom_prompts": prompts is not None,
                   "cost_model": "target pass = 1; draft forward = (kept layers + head) / (all layers + head) parameters"},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _moved(skip: list[int], moves: int, total: int, rng: random.Random) -> list[int]:
    """skip after `moves` random moves: add a layer, remove one, or swap one skipped for a kept one
    (at least one layer skipped, at least one kept)."""
    current = set(skip)
    for _ in range(moves):
        kept = [i for i in range(total) if i not in current]
        move = rng.choice(["add", "remove", "swap"])
        if move == "add" and len(kept) > 1:
            current.add(rng.choice(kept))
        elif move == "remove" and len(current) > 1:
            current.remove(rng.choice(sorted(current)))
        else:
            current.remove(rng.choice(sorted(current)))
            current.add(rng.choice(kept))
    return sorted(current)


def save_calibration(record: dict, path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _encode_prompt(lm: Any, prompt: str | list[int]) -> list[int]:
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    if getattr(lm, "tokenizer", None) is None:
        raise ValueError("this model has no tokenizer: give calibration prompts as lists of token ids")
    return lm.encode(prompt, chat=bool(getattr(lm.tokenizer, "chat_template", None)))


def _say(progress: bool, message: str) -> None:
    say(message, "verispec calibrate", progress)


def _bar(progress: bool, seconds: float):
    if not progress:
        return None
    return progress_bar(total=round(seconds), unit="s", desc="layer-skip search")


def _tick(bar, started: float, best: Score) -> None:
    if bar is None:
        return
    bar.n = min(bar.total, round(time.perf_counter() - started))
    bar.set_postfix_str(f"best est. speedup {best.speedup:.3f} (k={best.k}, thr={best.threshold})")


def read_prompts(items: Sequence[str]) -> list[str]:
    """--prompts items: a .jsonl file (a "prompt"/"text" field or the first of "turns" per line),
    another text file (one prompt per non-empty line), or else the prompt text itself."""
    prompts = []
    for item in items:
        path = Path(item).expanduser()
        if not path.is_file():
            prompts.append(item)
            continue
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                    prompts.append(record.get("prompt") or record.get("text") or record["turns"][0])
                except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
                    raise ValueError(f"{path}:{number}: expected a JSON object with 'prompt', 'text' or 'turns'") from None
        else:
            prompts.extend(lines)
    if not prompts:
        raise ValueError("--prompts gave no prompts")
    return prompts


# --------------------------------------------------------------------------- CLI


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="calibrate a method for a model (layer-skip: which layers to skip)",
        description="Search the layers the layer-skip drafter skips, on calibration prompts that are not "
                    "Spec-Bench's, and save them with the model's identity.")
    p.add_argument("--model", default="smollm2-135m-instruct", help="zoo name or local Hugging Face directory")
    p.add_argument("--method", default="layer-skip", choices=METHODS)
    p.add_argument("--out", metavar="FILE", help="where to write the JSON (default: the model's default calibration "
                                                 "file in verispec's cache, used by layer-skip when no skip is given)")
    p.add_argument("--prompts", nargs="+", metavar="FILE_OR_TEXT",
                   help="calibration prompts: .jsonl / text files or prompt strings (default: verispec's own)")
    p.add_argument("--minutes", type=float, default=3.0, help="search time budget")
    p.add_argument("--max-new-tokens", type=int, default=48, help="target continuation length per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args) -> int:
    if args.minutes <= 0 or args.max_new_tokens < 2:
        raise ValueError("--minutes must be > 0 and --max-new-tokens at least 2")
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    prompts = read_prompts(args.prompts) if args.prompts else None
    record = calibrate_layer_skip(lm, prompts, minutes=args.minutes, max_new_tokens=args.max_new_tokens, seed=args.seed)
    path = save_calibration(record, args.out or default_calibration_path(lm))
    est = record["estimate"]
    print(f"{path}\nskip {record['skip']} (keep {len(record['kept'])} of {record['num_layers']} layers), "
          f"k={record['k']}, threshold={record['threshold']}: estimated speedup {est['speedup']:.2f}x, "
          f"mean accepted tokens {est['mean_accepted_tokens']:.2f} "
          f"({record['search']['evaluations']} skip sets in {record['search']['seconds']:.0f} s)")
    return 0
