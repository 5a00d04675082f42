"""Inference end to end: ``segviz infer`` as a subprocess on a 512×512×300 CT (0.8×0.8×1 mm).

The CT is the real TotalSegmentator example (3 mm) resampled with SimpleITK onto that grid and
written to a temporary ``.nii.gz``; the model is a paper-config bundle (``NetworkConfig()``,
``Preprocessing()`` = 1.5×1.5×2 mm) with random weights, or ``--model PATH``. Reports the wall
time and peak RSS of the child (its ``ru_maxrss``), and the split of its wall time: startup, load and read, then
preprocess / network / restore from ``segviz infer --stats`` (``timings_s``), write and exit, from
the times of its ``--progress json`` events.

    python bench/bench_inference.py [--device cpu|cuda] [--model M.segviz] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
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

__all__ = ["find_ct", "make_benchmark_ct", "make_random_bundle", "run_infer_benchmark", "segviz_command"]


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
    return save_bundle(
        out,
        model,
        Preprocessing(),
        provenance={"strategy": "benchmark (random weights)"},
        training=TrainingConfig().to_dict(),
        force=True,
    )


def segviz_command() -> list[str]:
    """``segviz`` of this Python environment (the script next to the interpreter, else ``python -m SegVizLogic.cli``)."""
    script = Path(sys.executable).parent / "segviz"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "SegVizLogic.cli"]


def _run_child(command: list[str], poll_s: float = 0.05) -> tuple[float, int, int, str, float]:
    """Run ``command``; return wall seconds, peak RSS in bytes, the exit status, its output and
    its start time (``time.time()``).

    The peak RSS is the child's own ``ru_maxrss`` from ``os.wait4`` (the kernel's high-water
    mark of that process and the children it waited for); where psutil is installed, polling
    the process tree cross-checks it and the larger is kept.
    """
    import threading

    try:
        import psutil
    except ImportError:
        psutil = None
    started_at = time.time()
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8")
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(child.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    polled = {"peak": 0}
    done = threading.Event()

    def poll() -> None:
        proc = psutil.Process(child.pid)
        while not done.is_set():
            try:
                rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
                polled["peak"] = max(polled["peak"], rss)
            except psutil.Error:
                return
            time.sleep(poll_s)

    poller = threading.Thread(target=poll, daemon=True) if psutil else None
    if poller:
        poller.start()
    _, status, usage = os.wait4(child.pid, 0)
    done.set()
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    output = "".join(chunks)
    if child.returncode != 0:
        print(output[-3000:], file=sys.stderr)
    peak = max(usage.ru_maxrss * 1024, polled["peak"])  # ru_maxrss is in KiB on Linux
    return wall, peak, child.returncode, output, started_at


def _timeline(output: str, started_at: float, wall: float, timings: dict) -> dict:
    """Split the child's wall time with the times of its ``--progress json`` events.

    ``startup`` (interpreter, imports) ends at the ``load`` stage; ``load_and_read`` (bundle,
    CT, device) at ``preprocess``; preprocess/network/restore come from ``timings_s``; ``write``
    is what remains until ``done``; ``exit`` is after ``done``.
    """
    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    at = {}
    for event in events:
        key = event.get("stage") if event.get("event") == "stage" else event.get("event")
        at.setdefault(key, event.get("time"))
    if not {"load", "preprocess", "network", "done"} <= set(at):
        return {}
    restore_end = at["network"] + timings.get("network_s", 0.0) + timings.get("restore_s", 0.0)
    return {
        "startup": round(at["load"] - started_at, 2),
        "load_and_read": round(at["preprocess"] - at["load"], 2),
        "preprocess": round(timings.get("preprocess_s", 0.0), 2),
        "network": round(timings.get("network_s", 0.0), 2),
        "restore": round(timings.get("restore_s", 0.0), 2),
        "write": round(at["done"] - restore_end, 2),
        "exit": round(started_at + wall - at["done"], 2),
    }


def run_infer_benchmark(
    device: str = "cpu",
    model: str | Path | None = None,
    ct: str | Path | None = None,
    repeats: int = 1,
    workdir: str | Path | None = None,
) -> dict:
    """Time ``segviz infer`` on the 512×512×300 benchmark CT.

    Returns:
        ``{"wall_s", "peak_rss_gb", "split_s": {startup, load_and_read, preprocess, network, restore, write, exit, read_ct_alone},
        "input": {...}, "model", "device", "runs": [...], "targets"}``; with ``repeats`` > 1 the
        figures are of the fastest run.
    """
    from SegVizLogic.io import read_image

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
            command = [
                *segviz_command(),
                "infer",
                "--model",
                str(model_path),
                "--input",
                str(ct_path),
                "--output",
                str(work / "labels.nii.gz"),
                "--device",
                device,
                "--stats",
                str(stats),
                "--progress",
                "json",
                "--force",
            ]
            wall, peak, status, output, started_at = _run_child(command)
            if status != 0:
                raise RuntimeError(f"segviz infer failed with exit status {status}: {' '.join(command)}")
            timings = json.loads(stats.read_text(encoding="utf-8"))["timings_s"]
            runs.append(
                {
                    "wall_s": round(wall, 2),
                    "peak_rss_gb": round(peak / 1e9, 3),
                    "timings_s": {k: round(v, 2) for k, v in timings.items()},
                    "timeline_s": _timeline(output, started_at, wall, timings),
                }
            )
        best = min(runs, key=lambda r: r["wall_s"])
        split = dict(best["timeline_s"])
        # Reading the CT alone, timed here with the CLI's own function (part of load_and_read).
        t = time.perf_counter()
        read_image(ct_path)
        split["read_ct_alone"] = round(time.perf_counter() - t, 2)
        return {
            "wall_s": best["wall_s"],
            "peak_rss_gb": best["peak_rss_gb"],
            "split_s": split,
            "runs": runs,
            "device": device,
            "input": {
                "size": list(GRID_SIZE),
                "spacing_mm": list(GRID_SPACING),
                "source": str(source),
                "prepare_s": round(prepare_s, 1),
            },
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
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
