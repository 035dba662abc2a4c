"""`verispec train {data,draft-model,medusa,eagle,eagle1}`: argparse only; each trainer module
has add_arguments(parser) and run(args) -> exit code."""
from __future__ import annotations

from pathlib import Path

import torch

from ..models import load_model
from . import distill, eagle3_train, eagle_train, medusa_train
from .common import data_dirs, default_data_dir, ensure_data  # noqa: F401  (the trainers' CLI helpers)
from .data import build_dataset

TRAINERS = {  # subcommand -> module
    "draft-model": distill,
    "medusa": medusa_train,
    "eagle": eagle3_train,  # EAGLE-3: the default head
    "eagle1": eagle_train,
}


def add_common(p) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="the target: zoo name or local HF directory")
    p.add_argument("--data", nargs="+", help="distillation dataset directories, trained on together (default: "
                                             "$VERISPEC_HOME/training-data/<model>, built on first use)")
    p.add_argument("--samples", type=int, default=1024, help="prompts in a dataset built on first use")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: a GPU when there is one)")
    p.add_argument("--seed", type=int, default=0)


def add_parser(subparsers) -> None:
    train = subparsers.add_parser("train", help="build distillation data; train draft models, Medusa and EAGLE heads")
    sub = train.add_subparsers(dest="trainer", required=True)
    p = sub.add_parser("data", help="the target answers prompts (its own self-instruct user turns, or "
                                                "made from local text); answers and features saved")
    add_common(p)
    p.add_argument("--out", help="dataset directory (default: $VERISPEC_HOME/training-data/<model>)")
    p.add_argument("--from", dest="sources", nargs="+",
                   help="where prompts come from: 'self' (default: the target writes them, self-instruct), 'docs' "
                        "(the stdlib source and python3.11-doc if installed), or text/HTML/.py files or folders")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--answer-tokens", type=int, help="grow the dataset until it holds this many answer tokens "
                                                     "(instead of --samples samples)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts answered at once")
    p.add_argument("--chunk-size", type=int, default=64, help="samples per chunk file (the unit of resumption)")
    p.add_argument("--dtype", default="auto", help="the target's dtype while generating")
    p.add_argument("--no-features", action="store_true", help="skip the target's features (draft-model only)")
    p.set_defaults(func=cmd_data)
    for name, mod in TRAINERS.items():
        p = sub.add_parser(name, help=mod.__doc__.strip().splitlines()[0])
        add_common(p)
        p.add_argument("--out", required=True, help="output directory (rerun with the same --out to resume)")
        p.add_argument("--minutes", type=float, default=30.0, help="wall-clock training budget")
        mod.add_arguments(p)
        p.set_defaults(func=_with_threads(mod.run))


def cmd_data(args) -> int:
    _set_threads(args)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    out = Path(args.out or default_data_dir(args.model))
    build_dataset(lm, out, n_samples=args.samples, sources=args.sources, max_new_tokens=args.max_new_tokens,
                  batch_size=args.batch_size, chunk_size=args.chunk_size, seed=args.seed,
                  features=not args.no_features, answer_tokens=args.answer_tokens)
    print(f"dataset ready in {out}")
    return 0


def _set_threads(args) -> None:
    """--threads: the process's torch thread count, set here in the CLI (library code never sets it)."""
    if args.threads:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def _with_threads(run):
    def wrapped(args) -> int:
        _set_threads(args)
        return run(args)
    return wrapped
