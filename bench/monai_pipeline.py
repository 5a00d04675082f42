"""The standard MONAI inference pipeline, for comparison with ``segviz infer``: the same network and
weights (a SegViz bundle), the textbook transforms.

LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd -> ScaleIntensityRanged ->
``sliding_window_inference`` (the bundle's window, half overlap, Gaussian weights, float32) ->
sigmoid -> Invertd (every organ's probability back onto the input grid) -> label (the most
probable organ above 0.5) -> SaveImage.

    python bench/monai_pipeline.py --model M.segviz --input CT.nii.gz --output-dir DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["run_monai_pipeline"]


def run_monai_pipeline(model_path: Path, input_path: Path, output_dir: Path, device: str = "cpu") -> dict:
    """Segment ``input_path`` with the standard MONAI pipeline; returns the stage timings in seconds.

    On ``cuda`` the network and the stitching run on the GPU in bfloat16 autocast, as MONAI's
    tutorials do; the transforms stay on the CPU."""
    timings = {}
    t = time.perf_counter()
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        SaveImage,
        ScaleIntensityRanged,
        Spacingd,
    )

    from SegVizLogic.bundle import load_bundle
    from SegVizLogic.organs import organ_by_name

    timings["imports_s"] = time.perf_counter() - t
    t = time.perf_counter()
    bundle = load_bundle(model_path)
    model = bundle.build_model("model").eval().to(device)
    low, high = bundle.preprocessing.hu_window
    pre = Compose(
        [
            LoadImaged("image", image_only=False),
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd("image", pixdim=bundle.preprocessing.spacing, mode="bilinear"),
            ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
        ]
    )
    data = pre({"image": str(input_path)})
    timings["load_and_preprocess_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        logits = sliding_window_inference(
            data["image"][None].to(device),
            bundle.roi_size,
            4 if device == "cuda" else 1,
            model,
            overlap=0.5,
            mode="gaussian",
            progress=False,
        )
    data["pred"] = torch.sigmoid(logits[0].float()).cpu()
    timings["network_s"] = time.perf_counter() - t
    t = time.perf_counter()
    data = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(data)
    probabilities = data["pred"]
    values = torch.as_tensor([organ_by_name(o).label for o in bundle.organs], dtype=torch.uint8)
    best, index = probabilities.max(dim=0)
    labels = torch.where(best > 0.5, values[index], torch.zeros((), dtype=torch.uint8))
    timings["invert_s"] = time.perf_counter() - t
    t = time.perf_counter()
    saver = SaveImage(
        output_dir=str(output_dir),
        output_postfix="seg",
        separate_folder=False,
        output_dtype=np.uint8,
        resample=False,
        print_log=False,
    )
    saver(labels[None], meta_data=probabilities.meta)
    timings["write_s"] = time.perf_counter() - t
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    import json

    print(json.dumps(run_monai_pipeline(args.model, args.input, args.output_dir, args.device)))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
