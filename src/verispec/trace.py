"""See how each new token came about: an accepted draft token, the target's token at a
rejection (recovered), the target's token after every draft was accepted (bonus), or plain
decoding with nothing drafted (target).

Two views of one GenerationOutput: coloured text on a terminal (`print_terminal`) and a
self-contained HTML page (`write_html`): each token a span coloured by kind, with its token
id, kind and target-pass number as a tooltip, a legend and summary statistics.
"""
from __future__ import annotations

import html
import sys
from pathlib import Path
from typing import Any, Sequence

KINDS = ("accepted", "recovered", "bonus", "target")

LEGEND = {
    "accepted": "draft token accepted",
    "recovered": "target's token at a rejection",
    "bonus": "target's token after all drafts were accepted",
    "target": "plain decoding (nothing drafted)",
}

# terminal styles (rich) and HTML colours, one per kind
_RICH_STYLE = {"accepted": "black on green3", "recovered": "white on red3", "bonus": "black on deep_sky_blue1", "target": ""}
_HTML_COLOUR = {"accepted": "#b7ebb0", "recovered": "#f7b3ad", "bonus": "#a9d8fa", "target": "transparent"}

_REPLACEMENT = "\ufffd"  # what a byte-level tokenizer decodes an incomplete UTF-8 sequence to
_WINDOW = 16  # tokens of left context used when decoding one token's piece


# --------------------------------------------------------------------------- token pieces


def token_pieces(ids: Sequence[int], tokenizer: Any | None, context: Sequence[int] = ()) -> list[str]:
    """The text each token adds, in order; "".join(pieces) is the decoded text.

    Tokens are decoded with some left context and the piece is the difference, so leading
    spaces (SentencePiece) come out right, and a multi-byte character split over several
    byte-level tokens is given whole to the token that completes it (the others get "").
    Special tokens keep their text (e.g. the end-of-turn marker). Without a tokenizer the
    pieces are the ids in angle brackets.
    """
    ids = [int(t) for t in ids]
    if tokenizer is None:
        return [f"<{t}>" for t in ids]
    full = list(context)[-_WINDOW:] + ids
    offset = len(full) - len(ids)
    pieces: list[str] = []
    pending_from = None  # index in `full` where an incomplete character started
    for i in range(offset, len(full)):
        start = pending_from if pending_from is not None else i
        lo = max(0, start - _WINDOW)
        before = _decode(tokenizer, full[lo:start])
        after = _decode(tokenizer, full[lo:i + 1])
        if after.endswith(_REPLACEMENT) and i + 1 < len(full):
            # an incomplete multi-byte character: the token that completes it gets it whole
            pieces.append("")
            pending_from = start
            continue
        pending_from = None
        pieces.append(after[len(before):] if after.startswith(before) else _decode(tokenizer, full[start:i + 1]))
    return pieces


def _decode(tokenizer: Any, ids: list[int]) -> str:
    if not ids:
        return ""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def target_steps(out: Any) -> list[int]:
    """The target pass (1-based) that produced each new token."""
    n = len(out.token_ids)
    lengths = list(getattr(getattr(out, "stats", None), "accept_lengths", None) or [])
    if lengths and sum(lengths) == n:
        return [step for step, length in enumerate(lengths, 1) for _ in range(length)]
    steps, step = [], 1  # fall back on the kinds: a step ends with the target's own token
    for kind in _kinds(out):
        steps.append(step)
        if kind != "accepted":
            step += 1
    return steps


def _kinds(out: Any) -> list[str]:
    kinds = list(getattr(out, "kinds", None) or [])
    if len(kinds) != len(out.token_ids):
        return ["target"] * len(out.token_ids)
    return kinds


def _tokenizer(lm: Any) -> Any | None:
    return getattr(lm, "tokenizer", None) if lm is not None else None


def _special_ids(tokenizer: Any | None) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", None) or [])


def summary(out: Any) -> dict[str, Any]:
    """Counts per kind and the generation's headline numbers (for both views)."""
    kinds = _kinds(out)
    stats = getattr(out, "stats", None)
    counts = {k: kinds.count(k) for k in KINDS}
    result: dict[str, Any] = {"new_tokens": len(out.token_ids), "counts": counts}
    if stats is not None:
        result.update(
            target_passes=stats.target_passes, mean_accepted_tokens=stats.mean_accepted_tokens,
            drafted_tokens=stats.drafted_tokens, accepted_tokens=stats.accepted_tokens,
            acceptance_rate=stats.acceptance_rate, acceptance_rate_per_position=stats.acceptance_rate_per_position,
            wall_time_s=stats.wall_time_s, tokens_per_s=stats.tokens_per_s,
            time_s=dict(stats.time_s), time_other_s=stats.time_other_s,
        )
    return result


# --------------------------------------------------------------------------- terminal


def print_terminal(out: Any, lm: Any) -> None:
    """Print the new text with each token coloured by how it came, then a one-line legend."""
    from rich.console import Console
    from rich.text import Text

    tokenizer = _tokenizer(lm)
    pieces = token_pieces(out.token_ids, tokenizer, getattr(out, "prompt_ids", ()) or ())
    text = Text()
    for piece, kind in zip(pieces, _kinds(out)):
        text.append(piece, style=_RICH_STYLE.get(kind, ""))
    console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    console.print(text)
    legend = Text("legend: ")
    for kind in KINDS:
        legend.append(f" {kind} ", style=_RICH_STYLE[kind] or "underline")
        legend.append(f" {LEGEND[kind]}  ")
    s = summary(out)
    c = s["counts"]
    legend.append(f"| {c['accepted']} accepted, {c['recovered']} recovered, {c['bonus']} bonus, {c['target']} target")
    console.print(legend)


# --------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2em auto; max-width: 60em;
       color: #1d1d1f; line-height: 1.5; padding: 0 1em; }
h1 { font-size: 1.3em; }
.legend span.k, .text span { border-radius: 3px; }
.legend { margin: 1em 0; }
.legend span.k { padding: 0 .4em; margin-right: .3em; }
.legend .item { margin-right: 1.2em; white-space: nowrap; }
.text { white-space: pre-wrap; word-wrap: break-word; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
        font-size: .92em; border: 1px solid #ddd; border-radius: 6px; padding: 1em; background: #fcfcfc; }
.text span:hover { outline: 1px solid #333; }
.text span.empty { display: inline-block; width: 3px; height: 1em; vertical-align: text-bottom; }
.text span.special { font-style: italic; opacity: .75; }
.accepted { background: %(accepted)s; }
.recovered { background: %(recovered)s; }
.bonus { background: %(bonus)s; }
.target { background: %(target)s; }
.legend .target { border: 1px solid #bbb; }
table.stats { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
table.stats td, table.stats th { border-bottom: 1px solid #e4e4e4; padding: .2em .8em .2em 0; text-align: left; }
details { margin: 1em 0; }
details pre { white-space: pre-wrap; font-size: .85em; background: #f4f4f4; padding: .8em; border-radius: 6px; }
""" % _HTML_COLOUR


def render_html(out: Any, lm: Any, title: str = "verispec trace") -> str:
    """The trace of one generation as a self-contained HTML page (inline CSS, no scripts)."""
    tokenizer = _tokenizer(lm)
    special = _special_ids(tokenizer)
    prompt_ids = list(getattr(out, "prompt_ids", None) or [])
    pieces = token_pieces(out.token_ids, tokenizer, prompt_ids)
    spans = []
    for token, piece, kind, step in zip(out.token_ids, pieces, _kinds(out), target_steps(out)):
        classes = [kind] + (["empty"] if piece == "" else []) + (["special"] if int(token) in special else [])
        tip = f"token {int(token)} · {kind} · target pass {step}"
        spans.append(f'<span class="{" ".join(classes)}" title="{html.escape(tip)}">{html.escape(piece)}</span>')
    legend = "".join(
        f'<span class="item"><span class="k {k}">{k}</span>{html.escape(LEGEND[k])}</span>' for k in KINDS
    )
    prompt_html = ""
    if prompt_ids:
        prompt_text = _decode(tokenizer, prompt_ids) if tokenizer is not None else " ".join(map(str, prompt_ids))
        prompt_html = (f"<details><summary>prompt ({len(prompt_ids)} tokens)</summary>"
                       f"<pre>{html.escape(prompt_text)}</pre></details>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n<div class=\"legend\">{legend}</div>\n"
        f"{_stats_table(summary(out))}\n{prompt_html}\n"
        f"<div class=\"text\">{''.join(spans)}</div>\n"
        "<p style=\"font-size:.8em;color:#777\">Hover a token for its id, kind and target pass. "
        "Made by verispec.</p>\n</body></html>\n"
    )


def write_html(out: Any, lm: Any, path: str | Path, title: str = "verispec trace") -> Path:
    """Write the trace page to `path` (parent folders are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(out, lm, title), encoding="utf-8")
    return path


def _stats_table(s: dict[str, Any]) -> str:
    c = s["counts"]
    rows = [("new tokens", str(s["new_tokens"])),
            ("by kind", ", ".join(f"{c[k]} {k}" for k in KINDS))]
    if "target_passes" in s:
        rows += [
            ("target passes", str(s["target_passes"])),
            ("mean accepted tokens (new tokens per target pass)", f"{s['mean_accepted_tokens']:.2f}"),
            ("drafted / accepted", f"{s['drafted_tokens']} / {s['accepted_tokens']}"
             + (f" ({s['acceptance_rate']:.0%})" if s["drafted_tokens"] else "")),
        ]
        if s["acceptance_rate_per_position"]:
            rows.append(("acceptance rate per draft position",
                         " ".join(f"{r:.2f}" for r in s["acceptance_rate_per_position"][:16])))
        if s["wall_time_s"] > 0:
            t = s["time_s"]
            rows += [
                ("wall time", f"{s['wall_time_s']:.3f} s ({s['tokens_per_s']:.1f} tokens/s)"),
                ("time split", ", ".join(f"{k} {v:.3f} s" for k, v in t.items()) + f", other {s['time_other_s']:.3f} s"),
            ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="stats">{body}</table>'
