"""``segviz experiment``: the paper's comparison, or a learning curve, from a TOML file."""

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
        help="the paper's comparison (local vs central vs FedAvg vs FedBN) or a learning curve, with statistics and a report",
        description="Train every arm on the same sites with the same budget for every seed, choose each arm's test-time "
        "options on the sites' validation cases and freeze them, then score the external set once per arm and write "
        "results.json, report.md and PNG figures to --out. A config with a [learning_curve] section repeats this at "
        "several training-set sizes (experiments/learning-curve.toml).",
    )
    p.add_argument(
        "--config",
        required=True,
        type=Path,
        help="experiment TOML (experiments/cpu.toml, paper.toml, learning-curve.toml, ci.toml)",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (results.json, report.md, figures, bundles)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="train with seeds 0..N-1 (overrides the config's seeds)",
    )
    p.add_argument(
        "--arms",
        default=None,
        metavar="ARM[,ARM...]",
        help="run only these arms (overrides [arms] run; e.g. to time one arm of a config)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="override the config's device")
    p.add_argument(
        "--engine",
        choices=("auto", "simulation", "deployment"),
        default=None,
        help="how the federated arms run (override the config's engine; default auto: Flower's simulation engine "
        "when Ray imports, else its deployment engine on 127.0.0.1)",
    )
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
    from .comparison import run_experiment
    from .config import load_config

    try:
        config = load_config(args.config)
        if args.seeds is not None:
            if args.seeds < 1:
                raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
            config = replace(config, seeds=tuple(range(args.seeds)))
        if args.device is not None:
            config = replace(config, device=args.device)
        if args.engine is not None:
            config = replace(config, engine=args.engine)
        if args.arms is not None:
            config = replace(config, arms=tuple(a.strip() for a in args.arms.split(",") if a.strip()))
    except ValueError as error:
        raise SegVizError(str(error)) from None
    reporter = ProgressReporter(args.progress)
    results = run_experiment(
        config,
        args.out,
        force=args.force,
        reporter=reporter,
        command=["segviz", *sys.argv[1:]] if sys.argv[1:2] == ["experiment"] else None,
    )
    if args.progress != "json":
        print((args.out / "report.md").resolve())
        for point, chosen in results["selection"].items():
            prefix = "" if point == "main" else f"point {point}: "
            print(prefix + "chosen on validation: " + "; ".join(f"{arm} {c['key']}" for arm, c in chosen.items()))
    return 0
