"""Inference end to end: ``segviz infer`` as a subprocess on a 512×512×300 CT (0.8×0.8×1 mm).

The CT is the real TotalSegmentator example (3 mm) resampled with SimpleITK onto that grid and
written to a temporary ``.nii.gz``; the model is a paper-config bundle (``NetworkConfig()``,
``Preprocessing()`` = 1.5×1.5×2 mm) with random weights, or ``--model PATH``. Reports the wall
time and peak RSS of the child, and the split from ``segviz infer --stats`` (``timings_s``)
plus read and write timed in this process.

    python bench/bench_inference.py [--device cpu|cuda] [--model M.segviz] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CT = REPO.parent / "shared" / "data" / "real" / "totalseg_example" / "example_ct.nii.gz"
GRID_SIZE = (512, 512, 300)
GRID_SPACING = (0.8, 0.8, 1.0)
TARGETS = {"cpu": {"wall_s": 30.0, "peak_rss_gb": 4.0}, "cuda": {"wall_s": 2.0}}

__all__ = ["find_ct", "make_benchmark_ct", "make_random_bundle", "segviz_command", "run_infer_benchmark"]


def find_ct(path: str | Path | None = None) -> Path:
    """The source CT: ``path``, ``$SEGVIZ_BENCH_CT``, or ``../shared/data/real/totalseg_example/example_ct.nii.gz``."""
    candidate = Path(path or os.environ.get("SEGVIZ_BENCH_CT") or DEFAULT_CT)
    if not candidate.is_file():
        raise FileNotFoundError(f"{candidate}: benchmark CT not found (pass --ct or set SEGVIZ_BENCH_CT)")
    return candidate


def make_benchmark_ct(source: Path, out: Path, size=GRID_SIZE, spacing=GRID_SPACING) -> Path:
    """Resample ``source`` onto a ``size`` grid of ``spacing`` mm centred on it (linear, air outside), int16 ``.nii.gz``."""
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(str(source), sitk.sitkFloat32)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
    half = direction @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2)
    reference = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    reference.SetSpacing([float(s) for s in spacing])
    reference.SetDirection(image.GetDirection())
    reference.SetOrigin([float(v) for v in centre - half])
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    sitk.WriteImage(resampled, str(out), useCompression=True)
    return out


def make_random_bundle(out: Path, seed: int = 0) -> Path:
    """A paper-config bundle (NetworkConfig(), Preprocessing() defaults) with random weights."""
    import torch

    from SegVizLogic.bundle import save_bundle
    from SegVizLogic.network import NetworkConfig, build_network
    from SegVizLogic.preprocessing import Preprocessing
    from SegVizLogic.training import TrainingConfig

    torch.manual_seed(seed)
    model = build_network(NetworkConfig())
    return save_bundle(out, model, Preprocessing(), provenance={"strategy": "benchmark (random weights)"},
                       training=TrainingConfig().to_dict(), force=True)


def segviz_command() -> list[str]:
    """``segviz`` of this Python environment (the script next to the interpreter, else ``python -m SegVizLogic.cli``)."""
    script = Path(sys.executable).parent / "segviz"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "SegVizLogic.cli"]


def _run_child(command: list[str], poll_s: float = 0.05) -> tuple[float, int, int]:
    """Run ``command``; return wall seconds, peak RSS in bytes (psutil polling of the process
    tree) and the exit status."""
    import psutil

    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(poll_s)
    wall = time.perf_counter() - start
    output = child.stdout.read() if child.stdout else ""
    if child.returncode != 0:
        print(output[-3000:], file=sys.stderr)
    return wall, peak, child.returncode


def run_infer_benchmark(device: str = "cpu", model: str | Path | None = None, ct: str | Path | None = None, repeats: int = 1,
                        workdir: str | Path | None = None) -> dict:
    """Time ``segviz infer`` on the 512×512×300 benchmark CT.

    Returns:
        ``{"wall_s", "peak_rss_gb", "split_s": {read, preprocess, network, restore, write, startup_and_other},
        "input": {...}, "model", "device", "runs": [...], "targets"}``; with ``repeats`` > 1 the
        figures are of the fastest run.
    """
    from SegVizLogic.io import read_image, write_label_map_like

    own_tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="segviz-bench-")) if own_tmp else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        source = find_ct(ct)
        t = time.perf_counter()
        ct_path = make_benchmark_ct(source, work / "ct_512x512x300.nii.gz")
        prepare_s = time.perf_counter() - t
        model_path = Path(model) if model else make_random_bundle(work / "paper-random.segviz")
        runs = []
        for index in range(repeats):
            stats = work / f"stats-{index}.json"
            command = [*segviz_command(), "infer", "--model", str(model_path), "--input", str(ct_path), "--output", str(work / "labels.nii.gz"),
                       "--device", device, "--stats", str(stats), "--progress", "none", "--force"]
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            wall, peak, status = _run_child(command)
            after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            if status != 0:
                raise RuntimeError(f"segviz infer failed with exit status {status}: {' '.join(command)}")
            timings = json.loads(stats.read_text())["timings_s"]
            runs.append({"wall_s": round(wall, 2), "peak_rss_gb": round(peak / 1e9, 3),
                         # ru_maxrss (KiB) is the max over all waited children; only meaningful when it grew.
                         "ru_maxrss_children_gb": round(after * 1024 / 1e9, 3) if after > before else None,
                         "timings_s": {k: round(v, 2) for k, v in timings.items()}})
        # Read and write timed here (same functions as the CLI), for the split.
        t = time.perf_counter()
        image = read_image(ct_path)
        read_s = time.perf_counter() - t
        import SimpleITK as sitk

        labels = sitk.ReadImage(str(work / "labels.nii.gz"))
        t = time.perf_counter()
        write_label_map_like(labels, image, work / "labels-rewrite.nii.gz", force=True)
        write_s = time.perf_counter() - t
        best = min(runs, key=lambda r: r["wall_s"])
        timings = best["timings_s"]
        split = {"read": round(read_s, 2), "preprocess": timings.get("preprocess_s"), "network": timings.get("network_s"),
                 "restore": timings.get("restore_s"), "write": round(write_s, 2)}
        if "read_s" in timings:  # newer CLIs time these themselves
            split["read"] = timings["read_s"]
        if "write_s" in timings:
            split["write"] = timings["write_s"]
        split["startup_and_other"] = round(best["wall_s"] - sum(v for v in split.values() if v is not None), 2)
        return {
            "wall_s": best["wall_s"], "peak_rss_gb": best["peak_rss_gb"], "split_s": split, "runs": runs, "device": device,
            "input": {"size": list(GRID_SIZE), "spacing_mm": list(GRID_SPACING), "source": str(source), "prepare_s": round(prepare_s, 1)},
            "model": str(model) if model else "paper config (NetworkConfig(), Preprocessing()), random weights",
            "targets": TARGETS.get(device, {}),
        }
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Command line of this benchmark alone."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--ct", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run_infer_benchmark(args.device, args.model, args.ct, args.repeats)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
