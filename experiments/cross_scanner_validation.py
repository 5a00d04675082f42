"""Cross-scanner validation: each organ on the scanners of the sites that did not annotate it.

The external scanner costs the demo most on the spleen and the pancreas, organs each annotated at
one site, in one contrast phase. A site's own validation cases cannot show that shift (its organ
is on its own scanner), so a choice meant to help there is scored here instead: fully labelled
phantom patients imaged by each *site's* scanner and drawn from that site's population (new
seeds, never trained on), each organ scored on the three scanners of the other sites ("cross")
and, for reference, on its own site's ("own"). Each scanner's cases are segmented as at a
hospital that never trained: ``adapt`` with that site's BatchNorm left out. The external scanner
is never used here. docs/METHOD.md section 5 records the runs::

    OMP_WAIT_POLICY=PASSIVE python experiments/cross_scanner_validation.py demo-out/model.segviz other.segviz
    OMP_WAIT_POLICY=PASSIVE python experiments/cross_scanner_validation.py demo-out/model.segviz --batchnorm adapt adapt-organs
    OMP_WAIT_POLICY=PASSIVE python experiments/cross_scanner_validation.py a.segviz b.segviz --batchnorm default --threshold bundle
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SegVizLogic.phantom import PAPER_SITES, make_phantom_case, phantom_populations, phantom_scanners

SITE_OF_ORGAN = {organ: site for site, organ in PAPER_SITES}
SEED = 777
"""Cases are ``numpy.random.default_rng([SEED, site index, k])``: apart from every phantom the demo trains on."""


def cross_scanner_scores(
    bundle_path: Path, cases: int, batchnorm: str = "adapt", threshold: float | None = 0.5
) -> dict:
    """Dice of every organ on every site scanner's ``cases`` new patients: ``{organ: {"own": [...], "cross": [...]}}``,
    each scanner's cases segmented with ``batchnorm`` (``adapt``, ``adapt-organs``, or ``default``: the bundle's)
    and that site's BatchNorm left out, at ``threshold`` (``None``: the bundle's own)."""
    import torch

    from SegVizLogic.bundle import load_bundle
    from SegVizLogic.experiments.selection import Option, leave_site_out, score_bundle_on_case

    bundle = load_bundle(bundle_path)
    batchnorm = bundle.default_batchnorm if batchnorm == "default" else batchnorm
    threshold = bundle.threshold if threshold is None else threshold
    scanners, populations = phantom_scanners("small"), phantom_populations()
    organs = list(SITE_OF_ORGAN)
    scores: dict[str, dict[str, list[float]]] = {organ: {"own": [], "cross": []} for organ in organs}
    for index, site in enumerate(SITE_OF_ORGAN.values()):
        view = leave_site_out(bundle, site)
        for k in range(cases):
            ct, labels = make_phantom_case(
                np.random.default_rng([SEED, index, k]), scanners[site], population=populations[site]
            )
            dice, _ = score_bundle_on_case(
                view,
                sitk.Cast(ct, sitk.sitkFloat32),
                labels,
                organs,
                Option("final", batchnorm, 0.5, threshold),
                torch.device("cpu"),
                case_name=f"{site} patient {k}",
            )
            for organ in organs:
                scores[organ]["own" if SITE_OF_ORGAN[organ] == site else "cross"].append(float(dice[organ]["dice"]))
    return scores


def summary(scores: dict) -> dict:
    """Mean Dice per organ and kind, and the means over organs."""
    out = {organ: {kind: round(float(np.mean(v)), 3) for kind, v in kinds.items()} for organ, kinds in scores.items()}
    for kind in ("cross", "own"):
        out[f"mean_{kind}"] = round(float(np.mean([out[organ][kind] for organ in SITE_OF_ORGAN])), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path, help="model bundles trained on the demo's phantom")
    parser.add_argument("--cases", type=int, default=3, help="new patients per site scanner (default 3)")
    parser.add_argument("--json", type=Path, help="also write every Dice here")
    parser.add_argument(
        "--batchnorm",
        nargs="+",
        default=["adapt"],
        help="test-time BatchNorm choices to score (default: adapt; 'default': each bundle's own)",
    )
    parser.add_argument(
        "--threshold",
        default="0.5",
        help="organ threshold (default 0.5; 'bundle': each bundle's own, as infer uses it)",
    )
    args = parser.parse_args()
    results = {}
    for path in args.bundles:
        for choice in args.batchnorm:
            threshold = None if args.threshold == "bundle" else float(args.threshold)
            scores = cross_scanner_scores(path, args.cases, choice, threshold)
            key = f"{path} [{choice}, threshold {args.threshold}]"
            results[key] = {"summary": summary(scores), "dice": scores}
            print(json.dumps({key: results[key]["summary"]}))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
