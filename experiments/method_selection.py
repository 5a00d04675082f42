"""Method choices of the demo's FedBN training, made on the sites' validation cases only.

Trains the demo's federation (``segviz demo`` settings and phantom, seed 0) with one variant of the
method and scores it on five further cases per site (cases 008-012: the demo trains on 000-005 and
holds out 006-007; the runs in docs/METHOD.md were made for the three-patient demo, on cases 003-007),
each site's cases segmented as at a hospital that never trained (leave-site-out BatchNorm,
:mod:`SegVizLogic.site_validation`). The external set is never read here. docs/METHOD.md
records the runs::

    OMP_WAIT_POLICY=PASSIVE python experiments/method_selection.py --work sel --variant base
    OMP_WAIT_POLICY=PASSIVE python experiments/method_selection.py --work sel --variant annotating \
        --head-aggregation annotating
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from SegVizLogic.demo import DEMO_CASES_PER_SITE, DemoSettings
from SegVizLogic.federated.simulation import run_federated_simulation
from SegVizLogic.phantom import generate_phantom_sites
from SegVizLogic.progress import ProgressReporter
from SegVizLogic.site_validation import AVERAGED_ADAPT, LEGACY_ADAPT, summarise, validation_scores

VALIDATION_CASES = [f"case{k:03d}" for k in range(DEMO_CASES_PER_SITE, DEMO_CASES_PER_SITE + 5)]
CHOICES = [
    "model",
    "averaged",
    LEGACY_ADAPT,
    "adapt",
    *(f"{AVERAGED_ADAPT}[{k}]" for k in (0, 4, 16)),
    "own-site",
]


def _phantom(root: Path, cases: int) -> list[Path]:
    if not (root / "phantom.json").is_file():
        generate_phantom_sites(root, seed=0, cases_per_site=cases, external_cases=1, force=True)
    return [root / name for name in ("site-liver", "site-spleen", "site-pancreas", "site-kidney")]


def markdown_table(records: list[dict], reference: str) -> str:
    """Validation Dice per choice and organ, with the paired difference to ``reference`` over the
    20 (site, case) pairs: mean and Wilcoxon signed-rank p (scipy.stats)."""
    import numpy as np
    from scipy.stats import wilcoxon

    summary = summarise(records)
    organs = [o for o in ("liver", "spleen", "pancreas", "kidney") if o in summary[reference]]
    lines = [
        "| choice | " + " | ".join(organs) + " | mean | paired diff. to " + reference + " (p) |",
        "|---|" + "---|" * (len(organs) + 2),
    ]
    keyed = {(r["choice"], r["site"], r["case"], r["organ"]): r["dice"] for r in records}
    pairs = sorted({(r["site"], r["case"], r["organ"]) for r in records if r["choice"] == reference})
    for choice, scores in summary.items():
        cells = [f"{scores[o]:.3f}" if o in scores else "–" for o in organs]
        diff = "–"
        if choice != reference:
            d = np.array([keyed[(choice, *p)] - keyed[(reference, *p)] for p in pairs if (choice, *p) in keyed])
            p_value = wilcoxon(d).pvalue if len(d) and np.any(d != 0) else 1.0
            diff = f"{d.mean():+.3f} (p={p_value:.2g})"
        lines.append(f"| {choice} | " + " | ".join(cells) + f" | {scores['mean']:.3f} | {diff} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--head-aggregation", default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--samples-per-case", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--choices", nargs="+", default=CHOICES)
    parser.add_argument(
        "--model", type=Path, default=None, help="score this bundle (e.g. segviz demo's) instead of training"
    )
    args = parser.parse_args()

    settings = DemoSettings()
    changes = {
        section: {k: v for k, v in values.items() if v is not None}
        for section, values in {
            "training": {"batch_size": args.batch_size, "samples_per_case": args.samples_per_case},
            "federation": {"lr": args.lr, "rounds": args.rounds},
        }.items()
    }
    settings = replace(settings, setup=settings.setup.override({k: v for k, v in changes.items() if v}))
    if args.head_aggregation is not None:
        settings = replace(settings, head_aggregation=args.head_aggregation)
    train_sites = _phantom(args.work / "data", settings.cases_per_site)  # what `segviz demo` trains on
    pool_sites = _phantom(args.work / "pool", settings.cases_per_site + 5)  # the same cases and five more a site
    out = args.work / "runs" / args.variant
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or out / "model.segviz"
    started = time.perf_counter()
    if not model.is_file():
        model = run_federated_simulation(
            [str(s) for s in train_sites],
            out,
            reporter=ProgressReporter("none"),
            **settings.federation_options(args.seed),
        )
    train_seconds = time.perf_counter() - started
    from SegVizLogic.bundle import load_bundle

    bundle = load_bundle(model)
    records = validation_scores(bundle, pool_sites, VALIDATION_CASES, args.choices, "cpu")
    summary = summarise(records)
    rounds = bundle.metrics.get("rounds", [])
    client_seconds = [site.get("client-seconds", 0.0) for r in rounds for site in r.get("sites", {}).values()]
    steps = [site.get("steps", 0.0) for r in rounds for site in r.get("sites", {}).values()]
    train = [site.get("train-seconds", 0.0) for r in rounds for site in r.get("sites", {}).values()]
    result = {
        "variant": args.variant,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "train_seconds": round(train_seconds, 1),
        "mean_client_seconds_per_round": sum(client_seconds) / max(len(client_seconds), 1),
        "steps_per_second": sum(steps) / max(sum(train), 1e-9),
        "final_round_val_dice_own_bn": rounds[-1]["dice"] if rounds else {},
        "summary": summary,
        "records": records,
    }
    (out / "validation.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "records"}, indent=2))


if __name__ == "__main__":
    main()
