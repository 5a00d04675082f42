"""What differential privacy costs in Dice: the demo's FedBN federation on the phantom with
client-side clipping and server-side Gaussian noise, against the same run without them.

    python bench/bench_privacy.py --out /tmp/dp calibrate            # prints the clipping norm
    python bench/bench_privacy.py --out /tmp/dp arm --name reference --noise 0 --clip 0
    python bench/bench_privacy.py --out /tmp/dp arm --name z0.1 --noise 0.1 --clip C --json z0.1.json

Every arm: the demo's phantom (seed 0), network, preprocessing, patches, learning rate and
local epochs, four single-organ sites, FedBN with uniform weights, the same rounds; the external
set (a scanner no site has) is scored once, with the bundle's default BatchNorm (``adapt``).
The rounds run the federation's own functions in this process (``train_client_round`` at
each site, ``privacy.clip_update`` on its reply, ``strategy.aggregate_updates`` and
``privacy.add_group_noise`` at the coordinator), i.e. what the Flower apps call, without
Flower's message transport, so the arms can run side by side on a loaded machine where Ray's
start-up times out. Each arm has its own copy of the sites (their BatchNorm lives on disk).

``calibrate`` chooses the clipping norm before any DP arm runs: the median norm of the sites'
updates over the rounds of a run without DP (training-time norms only; nothing of the
validation or external cases is looked at to choose it). That run, scored on the external
set like the others, is the reference for DP arms with the same number of rounds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _layout(out: Path):
    from SegVizLogic.phantom import generate_phantom_sites

    marker = out / "data" / "phantom.json"
    if not marker.is_file():
        generate_phantom_sites(out / "data", seed=0)
    sites = sorted(p for p in (out / "data").iterdir() if p.is_dir() and p.name.startswith("site-"))
    return sites, out / "data" / "external"


def federate(out: Path, name: str, noise: float, clip: float, rounds: int, record_norms: bool = False) -> dict:
    """One arm: ``rounds`` FedBN rounds of the demo's federation, DP when ``noise`` and ``clip``."""
    import numpy as np

    from SegVizLogic.bundle import load_bundle, save_bundle
    from SegVizLogic.demo import DemoSettings
    from SegVizLogic.external_evaluation import evaluate_on_site
    from SegVizLogic.federated.privacy import add_group_noise, averaged_group_sizes, clip_update, privacy_report
    from SegVizLogic.federated.strategy import SiteUpdate, aggregate_updates, groups_sent_to_clients
    from SegVizLogic.federated.task import (
        FederationSettings,
        load_partition_into_model,
        new_lineage,
        train_client_round,
    )
    from SegVizLogic.network import build_network, partition_state
    from SegVizLogic.training import resolve_device, seed_everything

    demo = DemoSettings()
    sites, external = _layout(out)
    arm_dir = out / name
    shutil.rmtree(arm_dir, ignore_errors=True)
    copies = [shutil.copytree(s, arm_dir / "sites" / s.name, ignore=shutil.ignore_patterns("federated")) for s in sites]
    settings = FederationSettings(
        rounds=rounds,
        local_epochs=demo.local_epochs,
        lr=demo.lr,
        strategy=demo.strategy,
        weighting=demo.weighting,
        min_clients=len(sites),
        seed=0,
        network=demo.network,
        training=demo.training(0).to_dict(),
        preprocessing=demo.preprocessing,
        dp_noise_multiplier=noise,
        dp_clipping_norm=clip,
    )
    privacy = settings.privacy
    device = resolve_device("auto")
    seed_everything(0)
    model = build_network(settings.network)
    current = partition_state(model)
    lineage = new_lineage()
    rng = np.random.default_rng()
    norms: list[float] = []
    started = time.perf_counter()
    for server_round in range(1, rounds + 1):
        config = settings.client_config(server_round, lineage)
        sent = {g: current[g] for g in groups_sent_to_clients(current, settings.strategy)}
        updates = []
        for site in copies:
            result = train_client_round(site, sent, config, state=None, device=str(device.type))
            partition, norm = clip_update(result.partition, sent, clip if privacy else float("inf"))
            norms.append(norm)
            updates.append(SiteUpdate(result.site, result.organs, int(result.metrics["num-examples"]), partition))
        current = aggregate_updates(current, updates, settings.strategy, settings.weighting)
        if privacy is not None:
            current = add_group_noise(current, averaged_group_sizes(updates, settings.strategy), privacy, rng)
        print(f"{name}: round {server_round}/{rounds} ({time.perf_counter() - started:.0f} s)", flush=True)
    train_seconds = time.perf_counter() - started
    load_partition_into_model(model, current)
    report = privacy_report(privacy, rounds, len(sites))
    path = save_bundle(
        arm_dir / "model.segviz",
        model,
        settings.preprocessing,
        provenance={"kind": "federated", "strategy": "fedbn", "rounds": rounds, "privacy": report},
        default_batchnorm="adapt",
        training={**settings.training, "local_epochs": settings.local_epochs, "lr": settings.lr},
        force=True,
    )
    summary = evaluate_on_site(load_bundle(path), external, device, hd95=False).summary()
    return {
        "arm": name,
        "rounds": rounds,
        "noise_multiplier": noise,
        "clipping_norm": clip,
        "external_dice": {organ: round(s["mean"], 4) for organ, s in summary.items()},
        "external_cases": int(next(iter(summary.values()))["n"]) if summary else 0,
        "update_norm_median": float(np.median(norms)),
        "clipped_fraction": float(np.mean([n > clip for n in norms])) if privacy else 0.0,
        "epsilon": report.get("epsilon"),
        "epsilon_note": report.get("epsilon_note"),
        "train_seconds": round(train_seconds, 1),
        "update_norms": [round(n, 4) for n in norms] if record_norms else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (phantom, arms)")
    sub = parser.add_subparsers(dest="command", required=True)
    calibrate = sub.add_parser("calibrate", help="median update norm of the first rounds without DP")
    calibrate.add_argument("--rounds", type=int, default=2)
    arm = sub.add_parser("arm", help="train and score one arm")
    arm.add_argument("--name", required=True)
    arm.add_argument("--noise", type=float, default=0.0)
    arm.add_argument("--clip", type=float, default=0.0)
    arm.add_argument("--rounds", type=int, default=None, help="rounds (default: the demo's)")
    arm.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from SegVizLogic.demo import DemoSettings
    from SegVizLogic.experiments.report import machine_info

    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "calibrate":
        # Also the reference arm of DP arms with the same --rounds: the same run without DP.
        result = federate(args.out, "calibration", 0.0, 0.0, args.rounds, record_norms=True)
        result["clipping_norm_chosen"] = round(result["update_norm_median"], 3)
        print(json.dumps(result))
        return 0
    result = federate(args.out, args.name, args.noise, args.clip, args.rounds or DemoSettings().rounds)
    result["machine"] = machine_info()
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
