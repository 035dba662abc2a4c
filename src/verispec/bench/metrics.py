"""Metrics from answer records (Spec-Bench's answer layout), per task and overall.

Definitions, following Spec-Bench (evaluation/speed.py):
  tokens/s of a question   sum of its turns' new tokens / sum of their wall times
  tokens/s of a method     mean over questions of the per-question tokens/s
  speedup                  tokens/s of the method / tokens/s of the baseline (ar, same run),
                           both over the questions the two have in common
  mean accepted tokens     mean of accept_lengths (new tokens per target pass, 1.00 for ar)
Besides: acceptance rate per draft position (accepted / drafted at that depth, over all
steps), the time split (share of wall time spent drafting, in target passes (prefill
included), in acceptance, and elsewhere), and losslessness: the share of questions whose
output tokens are identical to the baseline's, with the first difference of each other one.
Numbers a method did not measure are None (shown as n/a), never zero.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Iterable

from .suites import TASKS, task_of

OVERALL = "overall"
PHASES = ("prefill", "draft", "target", "accept")


def record_task(record: dict) -> str:
    return (record.get("verispec") or {}).get("task") or task_of(record["category"])


def question_speed(record: dict, repeat: int | None = None) -> float:
    """New tokens per second of one question (all turns); `repeat` picks one repeat's wall times."""
    choice = record["choices"][0]
    tokens = sum(choice["new_tokens"])
    if repeat is None:
        seconds = sum(choice["wall_time"])
    else:
        seconds = sum(w[repeat] for w in record["verispec"]["wall_time_repeats"])
    return tokens / seconds if seconds > 0 else 0.0


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _repeats(records: list[dict]) -> int:
    counts = {len(w) for r in records for w in (r.get("verispec") or {}).get("wall_time_repeats", [[]])}
    return min(counts) if counts and min(counts) > 0 else 0


def speedup(records: list[dict], baseline: list[dict]) -> dict[str, Any]:
    """Spec-Bench speedup over the common questions; with repeats, also one ratio per repeat."""
    base = {r["question_id"]: r for r in baseline}
    mine = [r for r in records if r["question_id"] in base]
    theirs = [base[r["question_id"]] for r in mine]
    result: dict[str, Any] = {"speedup": None, "speedup_repeats": None, "common_questions": len(mine),
                              "tokens_per_s_common": None, "baseline_tokens_per_s": None}
    if not mine:
        return result
    tps, base_tps = _mean([question_speed(r) for r in mine]), _mean([question_speed(r) for r in theirs])
    result.update(tokens_per_s_common=tps, baseline_tokens_per_s=base_tps,
                  speedup=tps / base_tps if base_tps else None)
    n = min(_repeats(mine), _repeats(theirs))
    if n > 1:
        ratios = []
        for rep in range(n):
            b = _mean([question_speed(r, rep) for r in theirs])
            ratios.append(_mean([question_speed(r, rep) for r in mine]) / b if b else math.nan)
        result["speedup_repeats"] = ratios
    return result


def mean_accepted_tokens(records: list[dict]) -> float | None:
    """Mean new tokens per target pass; None when any record did not measure it."""
    lengths = []
    for r in records:
        if not _accept_measured(r):
            return None
        lengths += r["choices"][0]["accept_lengths"]
    return _mean(lengths)


def _accept_measured(record: dict) -> bool:
    details = record.get("verispec")
    if details is not None:
        return bool(details.get("accept_measured"))
    choice = record["choices"][0]  # a foreign answer file: trust non-empty accept_lengths
    return bool(choice.get("accept_lengths")) or sum(choice.get("new_tokens", [])) == 0


def acceptance_per_position(records: list[dict]) -> dict[str, Any] | None:
    """Accepted / drafted per draft depth, summed over every step of every turn."""
    drafted: list[int] = []
    accepted: list[int] = []
    for r in records:
        details = r.get("verispec") or {}
        if not details.get("accept_measured") or details.get("drafted_per_position") is None:
            return None
        for d_turn, a_turn in zip(details["drafted_per_position"], details["accepted_per_position"]):
            _add(drafted, d_turn)
            _add(accepted, a_turn)
    rates = [a / d if d else 0.0 for a, d in zip(accepted, drafted)]
    total_d, total_a = sum(_flatten(r["verispec"]["drafted_tokens"] for r in records)), \
        sum(_flatten(r["verispec"]["accepted_tokens"] for r in records))
    return {"rates": rates, "drafted": drafted, "accepted": accepted, "drafted_tokens": total_d,
            "accepted_tokens": total_a, "acceptance_rate": total_a / total_d if total_d else None}


def _flatten(lists: Iterable[list]) -> list:
    return [x for xs in lists for x in xs if x is not None]


def _add(total: list[int], values: list[int]) -> None:
    total.extend([0] * (len(values) - len(total)))
    for i, v in enumerate(values):
        total[i] += v


def time_split(records: list[dict]) -> dict[str, Any] | None:
    """Shares of total wall time: draft, target (prefill included), accept, other.
    A phase the method did not measure is None; 'other' then holds it too (flagged)."""
    wall = sum(sum(r["choices"][0]["wall_time"]) for r in records)
    if wall <= 0 or any(r.get("verispec") is None for r in records):
        return None
    sums: dict[str, float | None] = dict.fromkeys(PHASES, 0.0)
    for r in records:
        for turn in r["verispec"]["time_s"]:
            for phase in PHASES:
                value = turn.get(phase)
                if value is None:
                    sums[phase] = None
                elif sums[phase] is not None:
                    sums[phase] += value
    target = None if sums["target"] is None else sums["target"] + (sums["prefill"] or 0.0)
    shares = {"draft": sums["draft"], "target": target, "accept": sums["accept"]}
    known = sum(v for v in shares.values() if v is not None)
    unmeasured = [k for k, v in shares.items() if v is None]
    result = {k: (None if v is None else v / wall) for k, v in shares.items()}
    result["other"] = max(0.0, wall - known) / wall
    result["unmeasured"] = unmeasured
    return result


def target_pass_ms(records: list[dict]) -> float | None:
    """Mean wall time of one verification pass after the first (the prefill), in ms: what a
    method's trees cost the target, to compare with ar's one-token pass. A pass ends every
    step with one token of the target's own (bonus / recovered / target kind)."""
    time_s = passes = 0.0
    for r in records:
        v = r.get("verispec")
        if v is None or "kinds" not in v:
            return None
        for kinds, t in zip(v["kinds"], v["time_s"]):
            n = sum(k != "accepted" for k in kinds) - 1
            if n > 0 and t.get("target") is not None:
                time_s, passes = time_s + t["target"], passes + n
    return 1000 * time_s / passes if passes else None


def first_difference(a: list, b: list) -> int | None:
    """Index of the first differing element (the shorter length if one is a prefix), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def losslessness(records: list[dict], baseline: list[dict]) -> dict[str, Any]:
    """Share of the common questions whose every turn's tokens equal the baseline's; for each
    other question, the first differing turn and position (tokens where both records have
    token ids, else characters of the answer text)."""
    base = {r["question_id"]: r for r in baseline}
    compared, identical, differences = 0, 0, []
    for r in records:
        b = base.get(r["question_id"])
        if b is None:
            continue
        compared += 1
        mine, theirs = _turn_sequences(r, b)
        diff = None
        for turn, (x, y) in enumerate(zip(mine[0], theirs[0])):
            pos = first_difference(x, y)
            if pos is not None:
                diff = {"question_id": r["question_id"], "category": r["category"], "turn": turn + 1,
                        "position": pos, "unit": mine[1],
                        "token": x[pos] if pos < len(x) else None, "baseline_token": y[pos] if pos < len(y) else None}
                text, base_text = r["choices"][0]["turns"][turn], b["choices"][0]["turns"][turn]
                cpos = first_difference(list(text), list(base_text))
                if cpos is not None:
                    diff.update(snippet=_around(text, cpos), baseline_snippet=_around(base_text, cpos))
                break
        if diff is None and len(mine[0]) != len(theirs[0]):
            diff = {"question_id": r["question_id"], "category": r["category"], "turn": min(len(mine[0]), len(theirs[0])) + 1,
                    "position": 0, "unit": mine[1], "token": None, "baseline_token": None}
        if diff is None:
            identical += 1
        else:
            differences.append(diff)
    return {"compared": compared, "identical": identical, "share": identical / compared if compared else None,
            "differences": sorted(differences, key=lambda d: d["question_id"])}


def _turn_sequences(r: dict, b: dict) -> tuple[tuple[list, str], tuple[list, str]]:
    ids_r, ids_b = (r.get("verispec") or {}).get("token_ids"), (b.get("verispec") or {}).get("token_ids")
    if ids_r is not None and ids_b is not None:
        return (ids_r, "token"), (ids_b, "token")
    return ([list(t) for t in r["choices"][0]["turns"]], "char"), ([list(t) for t in b["choices"][0]["turns"]], "char")


def _around(text: str, pos: int, width: int = 24) -> str:
    start = max(0, pos - width)
    return ("…" if start else "") + text[start:pos + width] + ("…" if pos + width < len(text) else "")


def accept_length_counts(records: list[dict]) -> dict[int, int] | None:
    """How many target passes emitted 1, 2, ... tokens (None if not measured)."""
    if any(not _accept_measured(r) for r in records):
        return None
    counts: dict[int, int] = {}
    for r in records:
        for n in r["choices"][0]["accept_lengths"]:
            counts[int(n)] = counts.get(int(n), 0) + 1
    return dict(sorted(counts.items()))


def group_metrics(records: list[dict], baseline: list[dict] | None, greedy: bool = True) -> dict[str, Any]:
    """All metrics of one method over one group of questions (a task, or all)."""
    speeds = [question_speed(r) for r in records]
    result: dict[str, Any] = {
        "questions": len(records),
        "new_tokens": sum(sum(r["choices"][0]["new_tokens"]) for r in records),
        "wall_time": sum(sum(r["choices"][0]["wall_time"]) for r in records),
        "tokens_per_s": _mean(speeds),
        "mean_accepted_tokens": mean_accepted_tokens(records),
        "acceptance": acceptance_per_position(records),
        "time_split": time_split(records),
        "target_pass_ms": target_pass_ms(records),
    }
    if baseline is not None:
        result.update(speedup(records, baseline))
        result["lossless"] = losslessness(records, baseline) if greedy else None
    return result


def summarize(answers: dict[str, list[dict]], baseline: str = "ar", greedy: bool = True) -> dict[str, Any]:
    """Metrics per method, per task and overall. answers: method -> its records."""
    tasks = sorted({record_task(r) for recs in answers.values() for r in recs},
                   key=lambda t: (TASKS.index(t) if t in TASKS else len(TASKS), t))
    base = answers.get(baseline)
    methods: dict[str, Any] = {}
    for method, records in answers.items():
        per_task = {}
        for task in tasks:
            mine = [r for r in records if record_task(r) == task]
            theirs = [r for r in base if record_task(r) == task] if base is not None else None
            if mine:
                per_task[task] = group_metrics(mine, theirs, greedy)
        per_task[OVERALL] = group_metrics(records, base, greedy) if records else None
        methods[method] = per_task
    return {"baseline": baseline if base is not None else None, "greedy": greedy, "tasks": tasks,
            "methods": methods, "own_engine": own_engine(answers, greedy)}


# each engine's plain decoding: the fair baseline for that engine's own speculation
ENGINE_BASELINES = {"verispec": "ar", "hf": "hf-greedy", "vllm": "vllm-ar"}


def engine_of(records: list[dict]) -> str:
    return ((records[0].get("verispec") or {}).get("kind") or "verispec") if records else "verispec"


def own_engine(answers: dict[str, list[dict]], greedy: bool = True) -> dict[str, Any]:
    """Per method (all tasks): speedup over and identity with its own engine's plain decoding
    (verispec's ar, hf-greedy, vllm-ar), where that baseline ran; engines differ in overheads,
    so this is how each engine's speculation is judged on its own terms."""
    result: dict[str, Any] = {}
    for method, records in answers.items():
        engine = engine_of(records)
        base = ENGINE_BASELINES.get(engine)
        if not records or base is None or not answers.get(base):
            continue
        entry = {"engine": engine, "baseline": base, "tokens_per_s": _mean([question_speed(r) for r in records]),
                 "mean_accepted_tokens": mean_accepted_tokens(records), **speedup(records, answers[base])}
        entry["lossless"] = losslessness(records, answers[base]) if greedy else None
        result[method] = entry
    return result


def spread(values: list[float] | None) -> tuple[float, float, float] | None:
    """(median, min, max) of repeated measurements."""
    if not values:
        return None
    clean = [v for v in values if v is not None and not math.isnan(v)]
    return (statistics.median(clean), min(clean), max(clean)) if clean else None
