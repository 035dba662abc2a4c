"""report.md, metrics.json and PNG charts from a run folder's answer files (and run.json).

`verispec bench report DIR` calls build_report(DIR): everything is rebuilt from what is on
disk, so a report can be remade after an interrupted run or on another machine.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from . import metrics
from .layout import BASELINE, CHARTS, FAILURES_FILE, METRICS_FILE, REPORT_FILE, RUN_FILE, read_answers, trace_path
from .suites import TASK_TITLES

MAX_POSITIONS = 10  # acceptance-rate columns shown
MAX_DIFFERENCES = 8  # losslessness differences listed per method


def load_run(out: Path) -> tuple[dict, dict[str, list[dict]]]:
    """run.json (or {}) and method -> answer records, methods in run order, then the rest by name."""
    out = Path(out)
    if not out.is_dir():
        raise ValueError(f"{out} is not a folder; pass the --out folder of a bench run")
    run_path = out / RUN_FILE
    run = json.loads(run_path.read_text()) if run_path.is_file() else {}
    files = {p.stem: p for p in sorted(out.glob("*.jsonl")) if p.name != FAILURES_FILE}
    if not files:
        raise ValueError(f"{out} holds no answer files (*.jsonl); run `verispec bench ... --out {out}` first")
    order = [m for m in run.get("methods", []) if m in files] + sorted(m for m in files if m not in run.get("methods", []))
    answers = {m: read_answers(files[m]) for m in order}
    return run, {m: recs for m, recs in answers.items() if recs}


def build_report(out: str | Path) -> Path:
    """Write report.md, metrics.json and the charts into `out`; returns the report's path."""
    out = Path(out)
    run, answers = load_run(out)
    if not answers:
        raise ValueError(f"the answer files in {out} are empty; nothing to report")
    baseline = run.get("baseline", BASELINE)
    # outputs are comparable with ar's when greedy, or sampled with the gumbel rule (a function of the seed)
    comparable = not sampled(run) or run.get("rule") == "gumbel"
    summary = metrics.summarize(answers, baseline=baseline, greedy=comparable)
    (out / METRICS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    charts = write_charts(out, summary, answers)
    path = out / REPORT_FILE
    path.write_text(render_markdown(out, run, summary, charts), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- markdown


def _fmt(value: float | None, pattern: str = "{:.2f}") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


def _table(header: list[str], rows: list[list[str]], align: str = ":-:") -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + [align] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _speedup_cell(m: dict | None) -> str:
    if m is None or m.get("speedup") is None:
        return "n/a"
    cell = f"{m['speedup']:.2f}x"
    spread = metrics.spread(m.get("speedup_repeats"))
    if spread is not None:
        cell += f" ({spread[1]:.2f}–{spread[2]:.2f})"
    return cell


def sampled(run: dict) -> bool:
    """Whether the run sampled (temperature > 0) rather than decoding greedily."""
    return float(run.get("temperature", 0.0) or 0.0) > 0


def exact_mode(run: dict) -> bool:
    """Whether the run's verispec targets ran in exact mode (older runs recorded only the setting)."""
    return bool(run.get("exact_mode", run.get("exact") is True))


def lossy_methods(run: dict) -> set[str]:
    """Methods run with a lossy verification rule (typical acceptance): flagged wherever shown."""
    return {m for m, opts in (run.get("options") or {}).items() if (opts or {}).get("rule") == "typical"}


def render_markdown(out: Path, run: dict, summary: dict, charts: dict[str, str]) -> str:
    tasks = summary["tasks"]
    methods = summary["methods"]
    columns = tasks + [metrics.OVERALL]
    n_questions = {t: max((methods[m].get(t) or {}).get("questions", 0) for m in methods) for t in columns}
    titles = [f"{TASK_TITLES.get(t, t)} ({n_questions[t]})" for t in tasks]
    parts = [f"# verispec bench: {run.get('model', '?')} on {run.get('suite', 'spec-bench')}", ""]
    parts.append(_settings_line(run, n_questions[metrics.OVERALL]))
    parts.append("")

    if summary["baseline"]:
        parts += ["## Speedup over ar", "",
                  "Spec-Bench's definition: mean tokens/s of the method over that of `ar` (plain autoregressive "
                  "decoding through the same loop) in this run, on the same questions. Columns are tasks "
                  "(questions in brackets), as in Spec-Bench's leaderboard."
                  + (" With repeats: median over repeats of each turn's wall time; (min–max) of the per-repeat "
                     "speedups." if int(run.get("repeats", 1) or 1) > 1 else ""), ""]
        rows, lossy = [], lossy_methods(run)
        for m, per in methods.items():
            overall = per.get(metrics.OVERALL) or {}
            name = f"`{m}` (LOSSY: typical acceptance)" if m in lossy else f"`{m}`"
            rows.append([name] + [_speedup_cell(per.get(t)) for t in tasks]
                        + [_fmt(overall.get("mean_accepted_tokens")), f"**{_speedup_cell(overall)}**"])
        parts += [_table(["Method"] + titles + ["#Mean Accepted Tokens", "Overall"], rows), ""]
    else:
        parts += ["No `ar` answers in this folder, so no speedup (it is measured against ar in the same run).", ""]

    parts += ["## Tokens per second", "", "Mean over questions of each question's new tokens / wall time.", ""]
    rows = [[f"`{m}`"] + [_fmt((per.get(t) or {}).get("tokens_per_s"), "{:.1f}") for t in columns]
            for m, per in methods.items()]
    parts += [_table(["Method"] + titles + ["Overall"], rows), ""]

    parts += ["## Mean accepted tokens per target pass", "",
              "New tokens per target (verification) pass; 1.00 for plain decoding. For the `hf-*` peers it is "
              "measured from the outside (target forward passes and the tokens each emitted); for the `vllm-*` "
              "peers it comes from vLLM's own per-request spec-decode metrics; n/a where it could not be measured.", ""]
    rows = [[f"`{m}`"] + [_fmt((per.get(t) or {}).get("mean_accepted_tokens")) for t in columns]
            for m, per in methods.items()]
    parts += [_table(["Method"] + titles + ["Overall"], rows), ""]

    parts += _own_engine_section(summary)
    parts += _acceptance_section(methods)
    parts += _time_section(methods, summary["baseline"])
    parts += _lossless_section(summary, (run.get("environment") or {}).get("dtype"), exact_mode(run), sampled(run))
    parts += _failures_section(out)
    parts += _trace_section(out, methods, tasks)
    if charts:
        parts += ["## Charts", ""]
        for name, file in charts.items():
            parts += [f"![{name}]({file})", ""]
    parts += _environment_section(run)
    files = ", ".join(f"`{m}.jsonl`" for m in methods)
    parts += ["## Files", "",
              f"Answers, one JSONL per method in Spec-Bench's answer layout: {files}. Spec-Bench's own "
              "`evaluation/speed.py` reads them (`--file-path` a method's file, `--base-path` `ar.jsonl`); its "
              "baseline speed re-tokenizes the baseline's answer text (minus one token for a BOS), so it can "
              "differ slightly from the speedup here, which counts generated tokens for both. "
              f"All numbers above: `{METRICS_FILE}`. Rebuild this report: `verispec bench report {out}`.", ""]
    return "\n".join(parts)


def _settings_line(run: dict, questions: int) -> str:
    bits = [f"**{questions} questions**"]
    if run.get("per_task"):
        bits.append(f"first {run['per_task']} per task")
    if run.get("tasks"):
        bits.append(f"tasks {', '.join(run['tasks'])}")
    env = run.get("environment", {})
    for key, label in (("dtype", "dtype"), ("max_new_tokens", "max new tokens"), ("temperature", "temperature"),
                       ("repeats", "repeats"), ("seed", "seed")):
        value = env.get(key) if key == "dtype" else run.get(key)
        if value is not None:
            bits.append(f"{label} {value}")
    if exact_mode(run):
        bits.append("exact mode (row-invariant target passes)")
    if run.get("rule") not in (None, "auto"):
        bits.append(f"rule `{run['rule']}` for every verispec method")
    if run.get("draft"):
        bits.append(f"draft `{run['draft']}`")
    if run.get("universal_draft"):
        bits.append(f"universal draft `{run['universal_draft']}`")
    if run.get("options"):
        opts = "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in o.items()) for m, o in run["options"].items() if o)
        if opts:
            bits.append(f"options {opts}")
    if "chat_template" in run:
        bits.append("chat template applied" if run["chat_template"] else "no chat template (plain User/Assistant prompt)")
    return ", ".join(bits) + "."


def _acceptance_section(methods: dict) -> list[str]:
    rows, width = [], 0
    for m, per in methods.items():
        acc = (per.get(metrics.OVERALL) or {}).get("acceptance")
        if acc and acc["drafted_tokens"]:
            width = max(width, min(MAX_POSITIONS, len(acc["rates"])))
    if not width:
        return []
    for m, per in methods.items():
        acc = (per.get(metrics.OVERALL) or {}).get("acceptance")
        if acc is None:
            rows.append([f"`{m}`"] + ["n/a"] * (width + 1))
        elif not acc["drafted_tokens"]:
            rows.append([f"`{m}`"] + ["–"] * width + ["no drafts"])
        else:
            rates = acc["rates"][:width] + [None] * (width - len(acc["rates"][:width]))
            rows.append([f"`{m}`"] + [_fmt(r) for r in rates]
                        + [f"{acc['accepted_tokens']}/{acc['drafted_tokens']} = {acc['acceptance_rate']:.2f}"])
    return ["## Acceptance rate per draft position (all tasks)", "",
            "Position i: of the steps that drafted at least i tokens, the share whose i-th draft token was accepted.",
            "", _table(["Method"] + [str(i + 1) for i in range(width)] + ["accepted/drafted"], rows), ""]


def _time_section(methods: dict, baseline: str | None = None) -> list[str]:
    rows = []
    footnote = False
    base_ms = ((methods.get(baseline) or {}).get(metrics.OVERALL) or {}).get("target_pass_ms") if baseline else None
    for m, per in methods.items():
        split = (per.get(metrics.OVERALL) or {}).get("time_split")
        ms = (per.get(metrics.OVERALL) or {}).get("target_pass_ms")
        pass_cell = "n/a" if ms is None else f"{ms:.1f} ms" + (f" ({ms / base_ms:.2f}x)" if base_ms else "")
        if split is None:
            rows.append([f"`{m}`"] + ["n/a"] * 4 + [pass_cell])
            continue
        other = _fmt(split["other"], "{:.0%}")
        if split["unmeasured"]:
            other += "*"
            footnote = True
        rows.append([f"`{m}`"] + [_fmt(split[k], "{:.0%}") for k in ("draft", "target", "accept")] + [other, pass_cell])
    lines = ["## Where the time goes (all tasks, share of wall time)", "",
             _table(["Method", "draft", "target passes (prefill included)", "acceptance", "other",
                     "one verification pass (vs ar's one-token pass)"], rows), ""]
    if footnote:
        lines += ["\\* includes the phases that method does not expose (n/a): for `hf-*` peers only the target's "
                  "(and an assistant model's) forward passes are timed, with forward hooks; `vllm-*` peers "
                  "expose none.", ""]
    return lines


def _own_engine_section(summary: dict) -> list[str]:
    """Each method against its own engine's plain decoding; shown when another engine ran."""
    own = summary.get("own_engine") or {}
    if all(e["engine"] == "verispec" for e in own.values()):
        return []
    rows = []
    for m, e in own.items():
        loss = e.get("lossless")
        same = f"{loss['identical']}/{loss['compared']}" if loss else "n/a"
        rows.append([f"`{m}`", e["engine"], f"`{e['baseline']}`", _fmt(e["tokens_per_s"], "{:.1f}"),
                     _speedup_cell(e), _fmt(e["mean_accepted_tokens"]), same])
    return ["## Speedup over each engine's own plain decoding", "",
            "Engines differ in per-pass overheads, so each one's speculation is also measured against its own "
            "plain decoding in this run (verispec: `ar`, transformers: `hf-greedy`, vLLM: `vllm-ar`); tokens/s "
            "are absolute (all tasks). *Identical* counts questions whose tokens equal that baseline's.", "",
            _table(["Method", "engine", "baseline", "tokens/s", "speedup over baseline", "mean accepted tokens",
                    "identical to baseline"], rows), ""]


def _failures_section(out: Path) -> list[str]:
    path = Path(out) / FAILURES_FILE
    if not path.is_file():
        return []
    failed = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = ["## Failures", "", "Questions a method raised on; they have no answer from it and are left out "
             "of its numbers (a rerun of the same command tries them again).", ""]
    return lines + [f"- `{f['method']}` q{f['question_id']} ({f['category']}): {f['error'][:200]}" for f in failed] + [""]


def _lossless_section(summary: dict, dtype: str | None = None, exact: bool = False, gumbel: bool = False) -> list[str]:
    """gumbel: a sampled run whose outputs are compared all the same (only the gumbel rule's are)."""
    if not summary["baseline"]:
        return []
    if not summary["greedy"]:
        return ["## Losslessness", "",
                "Not checked: with temperature > 0 outputs are random draws, so equality with `ar` is not expected "
                "(verispec's sampling rules are checked for the target's distribution by its statistical tests).", ""]
    rows, details = [], []
    for m, per in summary["methods"].items():
        if m == summary["baseline"]:
            continue
        loss = (per.get(metrics.OVERALL) or {}).get("lossless")
        if not loss or not loss["compared"]:
            rows.append([f"`{m}`", "n/a", ""])
            continue
        diffs = loss["differences"]
        firsts = ", ".join(f"q{d['question_id']} turn {d['turn']} @{d['unit']} {d['position']}"
                           for d in diffs[:MAX_DIFFERENCES]) + (" …" if len(diffs) > MAX_DIFFERENCES else "")
        rows.append([f"`{m}`", f"{loss['identical']}/{loss['compared']} ({loss['share']:.0%})", firsts or "–"])
        for d in diffs[:MAX_DIFFERENCES]:
            if "snippet" in d:
                details.append(f"- `{m}` q{d['question_id']} ({d['category']}) turn {d['turn']}, {d['unit']} "
                               f"{d['position']} (ar {d['baseline_token']!r} vs {d['token']!r}): ar "
                               f"`{_code(d['baseline_snippet'])}` vs `{_code(d['snippet'])}`")
    if exact:
        note = (f"This run is in exact mode ({dtype}): every verispec target pass computes each row as a one-token "
                "pass would, so a verispec method that differs from `ar` is a bug; peers run their own numerics.")
    elif dtype in ("bfloat16", "float16"):
        note = (f"This run is in {dtype}: a pass over several tokens rounds differently from a pass over one "
                "(other matrix shapes, other kernels), and with 8 (bfloat16) or 11 (float16) mantissa bits that "
                "flips near-tie argmaxes, so differences here are expected numerics, not lost exactness; run with "
                "`--dtype float32` to check losslessness strictly.")
    else:
        note = ("In float32 a verispec method that differs from `ar` is a bug; an `hf-*` peer may still differ "
                "where its passes have other shapes (e.g. the whole prompt at once) and a near-tie flips.")
    if gumbel:
        note = ("Sampled with the gumbel rule: each token is the Gumbel-max draw keyed by the seed and its position, "
                "for every verispec method alike, so a lossless method's output equals `ar`'s for the same seed. " + note)
    lines = [f"## Losslessness ({'gumbel sampling' if gumbel else 'greedy'})", "",
             "Share of questions whose output tokens (every turn) are identical to `ar`'s, and where each other "
             "one first differs. " + note, "",
             _table(["Method", "identical to ar", "first differences"], rows, align=":--"), ""]
    if details:
        lines += details + [""]
    return lines


def _code(text: str) -> str:
    return text.replace("`", "'").replace("\n", "⏎")


def _trace_section(out: Path, methods: dict, tasks: list[str]) -> list[str]:
    rows = []
    for m in methods:
        cells = []
        for t in tasks:
            p = trace_path(out, m, t)
            cells.append(f"[trace]({p.relative_to(out).as_posix()})" if p.is_file() else "–")
        if any(c != "–" for c in cells):
            rows.append([f"`{m}`"] + cells)
    if not rows:
        return []
    return ["## Traces", "",
            "Each new token of the first question of each task (turn 1), coloured by how it came: accepted draft "
            "token, recovered (the target's token at a rejection), bonus (the target's token after all drafts "
            "were accepted), or plain decoding.", "",
            _table(["Method"] + [TASK_TITLES.get(t, t) for t in tasks], rows), ""]


def _environment_section(run: dict) -> list[str]:
    env = run.get("environment")
    if not env:
        return []
    items = [
        ("CPU", f"{env.get('cpu')} ({env.get('cpu_count')} logical cores), torch threads {env.get('torch_threads')}"),
        ("device", env.get("device") + (f" ({env['gpu']})" if env.get("gpu") else "") if env.get("device") else None),
        ("dtype", env.get("dtype")),
        ("versions", f"verispec {env.get('verispec')}, torch {env.get('torch')}, transformers {env.get('transformers')}, "
                     f"Python {env.get('python')}"),
        ("platform", env.get("platform")),
        ("load average (1, 5, 15 min) when the run started", env.get("load_average_at_start")),
        ("seed", run.get("seed")),
        ("questions", run.get("questions_file")),
        ("run", f"started {run.get('started')}, last updated {run.get('updated')}"),
        ("command", f"`{run['command']}`" if run.get("command") else None),
    ]
    return ["## Environment", ""] + [f"- {k}: {v}" for k, v in items if v is not None] + [""]


# --------------------------------------------------------------------------- charts


def write_charts(out: Path, summary: dict, answers: dict[str, list[dict]]) -> dict[str, str]:
    """PNG charts; returns {name: file} of those written. matplotlib's object-oriented API
    (Figure.savefig renders PNG through Agg): no pyplot, no global backend."""
    import matplotlib
    from matplotlib.figure import Figure

    written = {}
    methods = summary["methods"]
    tasks = summary["tasks"]
    base = summary["baseline"]
    with matplotlib.rc_context({"figure.dpi": 110, "font.size": 9}):
        shown = [m for m in methods if m != base and (methods[m].get(metrics.OVERALL) or {}).get("speedup") is not None]
        if shown:
            columns = tasks + [metrics.OVERALL]
            fig = Figure(figsize=(max(6.5, 1.3 * len(columns) + 0.4 * len(shown)), 4))
            ax = fig.subplots()
            width = 0.8 / len(shown)
            for i, m in enumerate(shown):
                values, lows, highs = [], [], []
                for t in columns:
                    g = methods[m].get(t) or {}
                    s = g.get("speedup")
                    values.append(s if s is not None else 0.0)
                    sp = metrics.spread(g.get("speedup_repeats"))
                    lows.append(max(0.0, (s - sp[1])) if sp and s is not None else 0.0)
                    highs.append(max(0.0, (sp[2] - s)) if sp and s is not None else 0.0)
                xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(columns))]
                errors = [lows, highs] if any(lows) or any(highs) else None
                bars = ax.bar(xs, values, width, label=m, yerr=errors, capsize=2)
                ax.bar_label(bars, labels=[f"{v:.2f}" if v else "" for v in values], fontsize=6, padding=1)
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label=f"{base} = 1.00")
            ax.set_xticks(range(len(columns)))
            ax.set_xticklabels([_wrap(TASK_TITLES.get(t, t.capitalize())) for t in columns])
            ax.set_ylabel(f"speedup over {base}")
            ax.set_title("Speedup per task (mean tokens/s over that of ar)")
            ax.legend(fontsize=7, ncols=min(4, len(shown) + 1))
            ax.set_ylim(0, max([1.2] + [v * 1.2 for v in _all_speedups(methods, shown, columns)]))
            fig.tight_layout()
            fig.savefig(out / CHARTS["speedup"])
            written["speedup"] = CHARTS["speedup"]

        hist = {m: metrics.accept_length_counts(answers[m]) for m in methods}
        hist = {m: c for m, c in hist.items() if c}
        drafting = {m: c for m, c in hist.items() if max(c) > 1}
        hist = drafting or hist
        if hist:
            longest = max(max(c) for c in hist.values())
            fig = Figure(figsize=(max(6.5, 0.45 * longest + 2), 3.8))
            ax = fig.subplots()
            width = 0.8 / len(hist)
            for i, (m, counts) in enumerate(hist.items()):
                total = sum(counts.values())
                xs = [n + (i - (len(hist) - 1) / 2) * width for n in range(1, longest + 1)]
                mean = sum(n * c for n, c in counts.items()) / total
                ax.bar(xs, [counts.get(n, 0) / total for n in range(1, longest + 1)], width,
                       label=f"{m} (mean {mean:.2f})")
            ax.set_xticks(range(1, longest + 1))
            ax.set_xlabel("tokens emitted by one target pass (accepted drafts + 1)")
            ax.set_ylabel("share of target passes")
            ax.set_title("Accepted length per target pass (all tasks)")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / CHARTS["accept_lengths"])
            written["accept_lengths"] = CHARTS["accept_lengths"]

        splits = {m: (methods[m].get(metrics.OVERALL) or {}).get("time_split") for m in methods}
        splits = {m: s for m, s in splits.items() if s}
        if splits:
            fig = Figure(figsize=(6.5, 0.45 * len(splits) + 1.4))
            ax = fig.subplots()
            names = list(splits)
            left = [0.0] * len(names)
            colours = {"draft": "#4c9be8", "target": "#f28e2b", "accept": "#59a14f", "other": "#bab0ac"}
            for phase in ("draft", "target", "accept", "other"):
                values = [splits[m][phase] or 0.0 for m in names]
                ax.barh(names, values, left=left, color=colours[phase], label=phase)
                left = [a + b for a, b in zip(left, values)]
            ax.invert_yaxis()
            ax.set_xlim(0, 1)
            ax.set_xlabel("share of wall time (unmeasured phases count as other)")
            ax.set_title("Where the time goes (all tasks)")
            ax.legend(fontsize=7, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.35))
            fig.tight_layout()
            fig.savefig(out / CHARTS["time_split"])
            written["time_split"] = CHARTS["time_split"]
    return written


def _all_speedups(methods: dict, shown: list[str], columns: list[str]) -> list[float]:
    values = []
    for m in shown:
        for t in columns:
            g = methods[m].get(t) or {}
            sp = metrics.spread(g.get("speedup_repeats"))
            values += [v for v in (g.get("speedup"), sp[2] if sp else None) if v is not None]
    return values


def _wrap(title: str) -> str:
    words = title.split()
    if len(words) < 2:
        return title
    half = (len(words) + 1) // 2
    return " ".join(words[:half]) + "\n" + " ".join(words[half:])
