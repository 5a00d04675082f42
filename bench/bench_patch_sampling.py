"""Patch sampling per case: foreground indices recomputed at every draw vs precomputed once.

Preprocesses one phantom case at the paper's spacing (1.5 x 1.5 x 2 mm), then times drawing
``samples`` patches of the paper's 128x128x32 from it with ``RandCropByPosNegLabeld``: as SegViz
did before (indices recomputed from the label at every call) and as it does now (indices
computed once per cached case by ``FgBgToIndicesd``, one patch per call as the training loader
draws them). Reports the median over repeats.

    python bench/bench_patch_sampling.py [--repeats N] [--samples 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

__all__ = ["run_patch_sampling_benchmark"]


def run_patch_sampling_benchmark(repeats: int = 10, samples: int = 8, patch=(128, 128, 32)) -> dict:
    """Median seconds to draw ``samples`` patches from one case, both ways.

    Returns:
        ``{"recomputed_s", "precomputed_s", "indices_once_s", "speedup", "grid", "patch", "samples"}``.
    """
    import numpy as np
    import torch
    from monai.transforms import RandCropByPosNegLabeld

    from SegVizLogic.phantom import make_phantom_case, phantom_scanners
    from SegVizLogic.preprocessing import Preprocessing, preprocessing_transforms, sitk_to_metatensor
    from SegVizLogic.training import BG_INDICES, FG_INDICES, _voxel_indices

    ct, labels = make_phantom_case(np.random.default_rng(0), phantom_scanners()["site-liver"])
    item = preprocessing_transforms(Preprocessing(), keys=("image",), label_keys=("label",))(
        {"image": sitk_to_metatensor(ct), "label": sitk_to_metatensor(labels, dtype=torch.uint8)}
    )
    item["label"] = (torch.as_tensor(item["label"]) == 1).to(torch.uint8)  # the liver site's annotation
    start = time.perf_counter()
    fg, bg = _voxel_indices(item["label"])
    indices_once = time.perf_counter() - start
    common = {"keys": ("image", "label"), "label_key": "label", "spatial_size": patch, "pos": 0.67, "neg": 0.33}
    recompute = RandCropByPosNegLabeld(num_samples=samples, **common).set_random_state(0)
    precomputed = RandCropByPosNegLabeld(
        num_samples=1, fg_indices_key=FG_INDICES, bg_indices_key=BG_INDICES, **common
    ).set_random_state(0)

    def old() -> float:
        begin = time.perf_counter()
        recompute(item)
        return time.perf_counter() - begin

    def new() -> float:
        begin = time.perf_counter()
        for _ in range(samples):
            precomputed({**item, FG_INDICES: fg, BG_INDICES: bg})
        return time.perf_counter() - begin

    old_s = statistics.median(old() for _ in range(repeats))
    new_s = statistics.median(new() for _ in range(repeats))
    return {
        "recomputed_s": round(old_s, 4),
        "precomputed_s": round(new_s, 4),
        "indices_once_s": round(indices_once, 4),
        "speedup": round(old_s / new_s, 1),
        "grid": list(item["image"].shape[1:]),
        "patch": list(patch),
        "samples": samples,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line of this benchmark alone."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run_patch_sampling_benchmark(args.repeats, args.samples)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
