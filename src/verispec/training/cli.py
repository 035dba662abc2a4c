"""`verispec train {data,draft-model,medusa,eagle}`: argparse only; each trainer module
has add_arguments(parser) and run(args) -> exit code."""
from __future__ import annotations

import importlib
from pathlib import Path

TRAINERS = {  # subcommand -> module
    "draft-model": "verispec.training.distill",
    "medusa": "verispec.training.medusa_train",
    "eagle": "verispec.training.eagle_train",
}


def default_data_dir(model: str) -> Path:
    from ..models import verispec_home
    return verispec_home() / "training-data" / Path(model).name


def add_common(p) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="the target: zoo name or local HF directory")
    p.add_argument("--data", nargs="+", help="distillation dataset directories, trained on together (default: "
                                             "$VERISPEC_HOME/training-data/<model>, built on first use)")
    p.add_argument("--samples", type=int, default=1024, help="prompts in a dataset built on first use")
    p.add_argument("--threads", type=int, help="torch CPU threads")
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
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-features", action="store_true", help="skip the target's features (draft-model only)")
    p.set_defaults(func=cmd_data)
    for name, module in TRAINERS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=mod.__doc__.strip().splitlines()[0])
        add_common(p)
        p.add_argument("--out", required=True, help="output directory (rerun with the same --out to resume)")
        p.add_argument("--minutes", type=float, default=30.0, help="wall-clock training budget")
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)


def data_dirs(args) -> list[Path]:
    """The dataset directories of --data, or the model's default one."""
    return [Path(d) for d in args.data] if args.data else [default_data_dir(args.model)]


def ensure_data(args, lm, features: bool = True) -> list[Path]:
    """The datasets of --data, or the default one for the model, built (or resumed) first."""
    from .data import build_dataset, check_dataset_for
    paths = data_dirs(args)
    for path in paths:
        if not (path / "manifest.json").exists() or args.data is None:
            if len(paths) > 1:  # building each the same way would make copies of one dataset
                raise ValueError(f"{path} is not a dataset; build each of several --data directories first "
                                 "with 'verispec train data --out DIR'")
            build_dataset(lm, path, n_samples=args.samples, seed=args.seed, features=features)
        check_dataset_for(lm, path, need_features=features)
    return paths


def cmd_data(args) -> int:
    import torch

    import verispec
    from .data import build_dataset
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = verispec.load_model(args.model, dtype="auto")
    out = Path(args.out or default_data_dir(args.model))
    build_dataset(lm, out, n_samples=args.samples, sources=args.sources, max_new_tokens=args.max_new_tokens,
                  batch_size=args.batch_size, seed=args.seed, features=not args.no_features)
    print(f"dataset ready in {out}")
    return 0
