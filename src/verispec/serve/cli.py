"""`verispec serve`: argparse -> create_app -> uvicorn."""
from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Callable
from typing import Any

import uvicorn

from ..generator import methods
from ..models import load_model
from .app import create_app

_EPILOG = """examples:
  verispec serve --model smollm2-135m-instruct --method prompt-lookup --option k=8
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'
A request may pick another method: "verispec": {"method": "ar"} or {"method": "prompt-lookup", "options": {"k": 4}}.
One generation runs at a time; up to --queue-size requests wait (first come, first served), more get a 503."""


def add_parser(subparsers, parse_options: Callable[[list[str]], dict[str, Any]]) -> None:
    """Register `serve`; parse_options turns --option KEY=VALUE pairs into a dict (the CLI's own)."""
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (completions, chat, streaming) with speculative decoding",
        description="Serve one model over an OpenAI-compatible API: /v1/models, /v1/completions, "
                    "/v1/chat/completions (stream: true for server-sent events), /health, /metrics (Prometheus). "
                    "One generation runs at a time on the model; the others queue.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m-instruct", help="zoo name or local Hugging Face directory")
    p.add_argument("--model-name", help="the model's id in the API (default: --model)")
    p.add_argument("--method", default="auto", help=f"default method, one of: {', '.join(methods())}")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="option of --method, repeatable (e.g. k=8)")
    p.add_argument("--draft", help="draft model (zoo name or directory) for --method draft-model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--device", default="auto")
    p.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait while one generates (default 16); more get HTTP 503")
    p.set_defaults(func=lambda args: cmd_serve(args, parse_options))


def cmd_serve(args, parse_options: Callable[[list[str]], dict[str, Any]]) -> int:
    options = parse_options(args.option)  # malformed pairs fail before the model loads
    if args.queue_size < 0:
        raise ValueError(f"--queue-size must be >= 0, got {args.queue_size}")
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.draft:
        options["draft"] = load_model(args.draft, dtype=args.dtype, device=args.device)
    app = create_app(lm, args.method, options, api_key=args.api_key, queue_size=args.queue_size,
                     model_name=args.model_name)
    engine = app.state.engine
    if engine.default.auto_reason:
        print(f"auto: {engine.default.method} ({engine.default.auto_reason})", file=sys.stderr)
    if not args.api_key and not _is_loopback(args.host):
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    print(f"serving {args.model_name or args.model} with {engine.default.method} on http://{args.host}:{args.port}/v1 "
          f"(one generation at a time, queue {args.queue_size})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False
