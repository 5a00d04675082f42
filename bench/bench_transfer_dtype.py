"""Benchmark: what float16 transfer of the shared body saves in bytes and costs in Dice.

Bytes: the shared body, heads and BatchNorm of the paper network and of the demo network, in
float32 and in float16 (``--transfer-dtype``: only the shared body is halved), computed from
the networks themselves.

Dice: the demo's FedBN federation (the ``demo`` preset, 4 single-organ phantom sites) trained
twice with the same seed, ``transfer-dtype`` float32 and float16, in Flower's simulation engine
(or the deployment engine without Ray); reported are the sites' validation Dice per organ of
the final round (their held-out cases, never the external set) and the bytes per site and
round the ServerApp recorded. One seed: a difference within a few hundredths is seed noise,
not a cost (the demo's own seeds differ by that much).

Usage::

    python bench/bench_transfer_dtype.py --json bench-transfer.json            # bytes and Dice
    python bench/bench_transfer_dtype.py --bytes-only                           # seconds
    python bench/bench_transfer_dtype.py --float32-from demo-out/model.segviz   # float16 only

``--float32-from`` takes the float32 arm from a bundle that federation already wrote (``segviz demo``
with the same ``--seed`` trains exactly it: the demo preset, FedBN, float32 transfer) instead of
training it again; the bundle's settings are checked against the demo's before it is used.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def network_bytes() -> dict:
    """Bytes of each group on the wire, float32 vs float16 transfer, for the paper and demo networks."""
    from SegVizLogic.federated.transfer import for_transfer
    from SegVizLogic.network import NetworkConfig, build_network, partition_state
    from SegVizLogic.training_setup import load_preset

    out = {}
    for name, config in (("paper", NetworkConfig()), ("demo", load_preset("demo").network)):
        partition = partition_state(build_network(config))
        row = {}
        for dtype in ("float32", "float16"):
            groups = {g: sum(v.nbytes for v in for_transfer(g, a, dtype).values()) for g, a in partition.items()}
            row[dtype] = {
                "shared": groups["shared"],
                "heads": sum(b for g, b in groups.items() if g.startswith("head:")),
                "batchnorm": groups.get("batchnorm", 0),
                "fedbn_message": sum(b for g, b in groups.items() if g != "batchnorm"),
            }
        out[name] = row
    return out


def _summary(path: Path, seconds: float | None) -> dict:
    from SegVizLogic.bundle import load_bundle

    rounds = load_bundle(path).metrics["rounds"]
    final = rounds[-1]
    return {
        "validation_dice": final["dice"],
        "validation_dice_per_round": [r["dice"] for r in rounds],
        "bytes_to_each_site": final["bytes"]["to_each_site"],
        "bytes_from_sites": final["bytes"]["from_site"],
        "seconds": None if seconds is None else round(seconds, 1),
    }


def reference_run(path: Path, seed: int) -> dict:
    """The float32 arm read from a bundle the demo's federation wrote with ``seed``.

    Raises:
        SystemExit: the bundle was trained otherwise (other preset, strategy, seed or transfer dtype).
    """
    from SegVizLogic.bundle import load_bundle
    from SegVizLogic.demo import DemoSettings

    provenance = load_bundle(path).manifest.get("provenance", {})
    demo = DemoSettings()
    expected = {
        "strategy": demo.strategy,
        "head_aggregation": demo.head_aggregation,
        "rounds": demo.rounds,
        "local_epochs": demo.local_epochs,
        "lr": demo.lr,
        "seed": seed,
        "transfer_dtype": "float32",
    }
    # Bundles written before the transfer dtype was recorded were all float32.
    found = {key: provenance.get(key, "float32" if key == "transfer_dtype" else None) for key in expected}
    if found != expected:
        raise SystemExit(f"{path}: not the demo's float32 federation with seed {seed}: {found} (expected {expected})")
    return _summary(path, None)


def federation_dice(work: Path, seed: int, engine: str, float32_from: Path | None = None) -> dict:
    """The demo federation in float32 and float16 transfer: final-round validation Dice, bytes, time."""
    from SegVizLogic.demo import DemoSettings
    from SegVizLogic.federated.simulation import run_federated_simulation
    from SegVizLogic.phantom import generate_phantom_sites
    from SegVizLogic.progress import ProgressReporter

    settings = DemoSettings()
    layout = generate_phantom_sites(work / "data", seed=seed)
    results = {}
    if float32_from is not None:
        results["float32"] = {**reference_run(float32_from, seed), "from": str(float32_from)}
    for dtype in ("float16",) if float32_from is not None else ("float32", "float16"):
        started = time.perf_counter()
        path = run_federated_simulation(
            [str(s) for s in layout.sites],
            work / dtype,
            reporter=ProgressReporter("none"),
            **settings.federation_options(seed),
            device="cpu",
            engine=engine,
            transfer_dtype=dtype,
        )
        results[dtype] = _summary(path, time.perf_counter() - started)
        print(dtype, json.dumps(results[dtype]["validation_dice"]), f"{results[dtype]['seconds']} s", flush=True)
    results["dice_difference_float16_minus_float32"] = {
        organ: results["float16"]["validation_dice"][organ] - dice
        for organ, dice in results["float32"]["validation_dice"].items()
    }
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--bytes-only", action="store_true", help="only the bytes (no federation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", choices=("auto", "simulation", "deployment"), default="auto")
    parser.add_argument(
        "--float32-from", type=Path, help="the float32 arm from this bundle of the demo's federation (segviz demo)"
    )
    args = parser.parse_args(argv)
    results = {"bytes": network_bytes()}
    for name, row in results["bytes"].items():
        print(
            f"{name} network: shared body {row['float32']['shared'] / 1e6:.2f} MB float32, "
            f"{row['float16']['shared'] / 1e6:.2f} MB float16; FedBN message "
            f"{row['float32']['fedbn_message'] / 1e6:.2f} -> {row['float16']['fedbn_message'] / 1e6:.2f} MB"
        )
    if not args.bytes_only:
        work = Path(tempfile.mkdtemp(prefix="segviz-bench-transfer-"))
        try:
            results["federation"] = federation_dice(work, args.seed, args.engine, args.float32_from)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
