"""``segviz experiment``: the paper's comparison from a TOML file."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

__all__ = ["add_experiment_command"]


def add_experiment_command(subparsers) -> argparse.ArgumentParser:
    """Add ``segviz experiment`` to the ``segviz`` sub-command parsers."""
    p = subparsers.add_parser(
        "experiment",
        help="the paper's comparison: local vs central (naive, partial) vs FedAvg vs FedBN, with statistics and a report",
        description="Train every arm on the same sites with the same budget, evaluate on the same external set, and write "
        "results.json, report.md and PNG figures to --out.",
    )
    p.add_argument(
        "--config", required=True, type=Path, help="experiment TOML (experiments/paper.toml, experiments/ci.toml)"
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (results.json, report.md, figures, bundles)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="repeat the comparison with seeds 0..N-1 (overrides the config's seeds)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="override the config's device")
    p.add_argument(
        "--progress",
        choices=("rich", "json", "none"),
        default="rich",
        help="progress bars for people (rich), JSON lines (json), or none",
    )
    p.set_defaults(func=_cmd_experiment)
    return p


def _cmd_experiment(args) -> int:
    from ..errors import SegVizError
    from ..progress import ProgressReporter
    from .comparison import run_comparison
    from .config import load_config

    try:
        config = load_config(args.config)
        if args.seeds is not None:
            if args.seeds < 1:
                raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
            config = replace(config, seeds=tuple(range(args.seeds)))
        if args.device is not None:
            config = replace(config, device=args.device)
    except ValueError as error:
        raise SegVizError(str(error)) from None
    reporter = ProgressReporter(args.progress)
    results = run_comparison(
        config,
        args.out,
        force=args.force,
        reporter=reporter,
        command=["segviz", *sys.argv[1:]] if sys.argv[1:2] == ["experiment"] else None,
    )
    if args.progress != "json":
        print((args.out / "report.md").resolve())
        print(f"recommended BatchNorm: {results['recommended_batchnorm']}")
    return 0
