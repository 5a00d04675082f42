"""What differential privacy costs in Dice: the demo's FedBN federation on the phantom, with
client-side clipping and server-side Gaussian noise at several noise multipliers.

    python bench/bench_privacy.py --out /tmp/dp [--noise 0.1,1.0] [--rounds 24] [--json dp.json]

Arms (same phantom, seed, settings and budget as ``segviz demo``; Flower's simulation engine):

1. ``reference``: DP machinery on with a clipping norm of 1e6 and noise multiplier 1e-12, so
   neither binds (the demo's training), and every site's update norm is recorded.
2. one arm per ``--noise`` value, with the clipping norm fixed *before* any DP arm runs: the
   median of the update norms the reference run recorded (training-time norms only; no
   validation or external case is looked at to choose it).

Each arm's model segments the external set once (a scanner no site has). The figures, the
machine and epsilon (when ``dp-accounting`` is installed) go to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _update_norms(bundle) -> list[float]:
    return [
        float(site["dp-update-norm"])
        for record in bundle.metrics.get("rounds", [])
        for site in record.get("sites", {}).values()
        if "dp-update-norm" in site
    ]


def run_arm(name: str, layout, out: Path, settings, noise: float, clip: float, device, rounds: int) -> dict:
    """Train one arm and score it on the external set."""
    import numpy as np

    from SegVizLogic.bundle import load_bundle
    from SegVizLogic.external_evaluation import evaluate_on_site
    from SegVizLogic.federated.simulation import run_federated_simulation
    from SegVizLogic.progress import ProgressReporter

    started = time.perf_counter()
    path = run_federated_simulation(
        [str(s) for s in layout.sites],
        out / name,
        rounds=rounds,
        local_epochs=settings.local_epochs,
        strategy=settings.strategy,
        weighting=settings.weighting,
        lr=settings.lr,
        preprocessing=settings.preprocessing,
        training_config=settings.training(0),
        network_config=settings.network,
        reporter=ProgressReporter("none"),
        seed=0,
        dp_noise_multiplier=noise,
        dp_clipping_norm=clip,
    )
    train_seconds = time.perf_counter() - started
    bundle = load_bundle(path)
    summary = evaluate_on_site(bundle, layout.external, device, hd95=False).summary()
    norms = _update_norms(bundle)
    return {
        "arm": name,
        "noise_multiplier": noise,
        "clipping_norm": clip,
        "external_dice": {organ: round(s["mean"], 4) for organ, s in summary.items()},
        "update_norm_median": float(np.median(norms)) if norms else None,
        "clipped_fraction": float(np.mean([n > clip for n in norms])) if norms else None,
        "privacy": bundle.provenance.get("privacy"),
        "train_seconds": round(train_seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (phantom, runs)")
    parser.add_argument("--noise", default="0.1,1.0", help="noise multipliers of the DP arms (comma-separated)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: the demo's)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import numpy as np

    from SegVizLogic.demo import DemoSettings
    from SegVizLogic.experiments.report import machine_info
    from SegVizLogic.phantom import generate_phantom_sites
    from SegVizLogic.training import resolve_device

    settings = DemoSettings()
    rounds = args.rounds or settings.rounds
    device = resolve_device("auto")
    layout = generate_phantom_sites(args.out / "data", seed=0)
    results = {"machine": machine_info(), "rounds": rounds, "local_epochs": settings.local_epochs, "arms": []}
    reference = run_arm("reference", layout, args.out, settings, 1e-12, 1e6, device, rounds)
    results["arms"].append(reference)
    print(json.dumps(reference), flush=True)
    clip = float(np.round(reference["update_norm_median"], 3))
    for noise in (float(z) for z in args.noise.split(",")):
        arm = run_arm(f"dp-z{noise:g}", layout, args.out, settings, noise, clip, device, rounds)
        results["arms"].append(arm)
        print(json.dumps(arm), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
