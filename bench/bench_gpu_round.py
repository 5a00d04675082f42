"""One FedBN round on the full-size phantom: each site's local training (paper network, patch
128x128x32, batch 8) and the head-aware aggregation, timed on one device.

Flower's transport is not in this figure (bench/bench_federation.py measures it on the CPU): the
lent GPU machines cannot carry Ray. Usage::

    python bench/bench_gpu_round.py --device cuda --local-epochs 2 --cases-per-site 4 --json round.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _write_case(args: tuple[str, str, int, str, str]) -> tuple[int, ...]:
    """Write one full-size phantom case of one single-organ site (run in a worker process)."""
    import SimpleITK as sitk

    from SegVizLogic.organs import organ_by_name
    from SegVizLogic.phantom import PAPER_SITES, make_phantom_case, phantom_scanners

    site, organ, case, root, size = args
    scanner = phantom_scanners(size)[site]
    index = [name for name, _ in PAPER_SITES].index(site)
    ct, labels = make_phantom_case(np.random.default_rng([0, index, case]), scanner)
    local = sitk.GetImageFromArray((sitk.GetArrayViewFromImage(labels) == organ_by_name(organ).label).astype(np.uint8))
    local.CopyInformation(labels)
    name = f"case{case:03d}{scanner.file_format}"
    sitk.WriteImage(ct, str(Path(root) / site / "images" / name), useCompression=True)
    sitk.WriteImage(local, str(Path(root) / site / "labels" / name), useCompression=True)
    return ct.GetSize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--cases-per-site", type=int, default=4)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--size", choices=("small", "full"), default="full", help="small: a quick dry run on a CPU")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from SegVizLogic.federated.strategy import SiteUpdate, aggregate_updates
    from SegVizLogic.inference import resolve_device
    from SegVizLogic.network import PARTITION_BATCHNORM, build_network, partition_state
    from SegVizLogic.phantom import PAPER_SITES
    from SegVizLogic.preprocessing import Preprocessing
    from SegVizLogic.site import write_site
    from SegVizLogic.training import TrainingConfig, load_site_data, train_site

    device = resolve_device(args.device)
    out: dict = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "local_epochs": args.local_epochs,
        "cases_per_site": args.cases_per_site,
        "sites": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for site, organ in PAPER_SITES:
            write_site(Path(tmp) / site, site, [organ], {1: organ})
        start = time.perf_counter()
        jobs = [
            (site, organ, case, tmp, args.size) for site, organ in PAPER_SITES for case in range(args.cases_per_site)
        ]
        with ProcessPoolExecutor(args.workers) as pool:
            sizes = list(pool.map(_write_case, jobs))
        out["phantom_s"] = round(time.perf_counter() - start, 1)
        out["case_sizes"] = sorted({tuple(s) for s in sizes})
        print(f"phantom: {len(jobs)} {args.size} cases in {out['phantom_s']} s", flush=True)

        preprocessing, training = Preprocessing(), TrainingConfig()
        global_model = build_network()
        current = partition_state(global_model)
        updates = []
        round_start = time.perf_counter()
        for site, organ in PAPER_SITES:
            t0 = time.perf_counter()
            data = load_site_data(Path(tmp) / site, preprocessing, training)
            t1 = time.perf_counter()
            model = build_network()
            model.load_state_dict(global_model.state_dict())
            if device.type == "cuda":
                torch.cuda.synchronize()
            result = train_site(model, data, args.local_epochs, 1e-3, device, config=training)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            groups = partition_state(model.cpu())
            sent = {
                g: arrays
                for g, arrays in groups.items()
                if g != PARTITION_BATCHNORM and (not g.startswith("head:") or g == f"head:{organ}")
            }
            updates.append(SiteUpdate(site=site, organs=(organ,), num_examples=result.num_examples, partition=sent))
            out["sites"][site] = {
                "preprocess_s": round(t1 - t0, 2),
                "train_s": round(t2 - t1, 2),
                "steps": result.steps,
                "step_s": round((t2 - t1) / max(result.steps, 1), 3),
                "val_dice": result.val_dice,
                "bytes_sent": int(sum(a.nbytes for arrays in sent.values() for a in arrays.values())),
                "preprocessed_shape": list(data.train_items[0]["image"].shape),
            }
            print(site, out["sites"][site], flush=True)
        t3 = time.perf_counter()
        aggregate_updates(current, updates, strategy="fedbn", weighting="uniform")
        out["aggregation_s"] = round(time.perf_counter() - t3, 3)
        out["round_s_sequential"] = round(time.perf_counter() - round_start, 1)
        out["round_s_parallel_sites"] = round(
            max(s["preprocess_s"] + s["train_s"] for s in out["sites"].values()) + out["aggregation_s"], 1
        )
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
