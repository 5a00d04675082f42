"""The training data path: how busy the device is during a real round, and what a round costs as a
site grows from 10 to 1000 cases.

``busy``: real federated rounds of one site (``train_client_round``: the site validated, its cases
from the preprocessing cache, local epochs, validation) on the full-size phantom, once with the
patches prepared on the training thread and once by worker threads; reports the share of the step
loops' wall time the device was busy (CUDA events around each step on a GPU; the steps' wall time on
a CPU), the time spent waiting for batches, and seconds per step. A first round fills the cache and
is not reported. On a lent GPU, in one command::

    python bench/bench_data_path.py busy --device cuda --size full --json busy.json

``scale``: synthetic sites of 10, 100 and 1000 small CT cases (64x64x40 at 1.5 mm, one organ);
each round runs in a fresh process, as a Flower ClientApp does: round 1 (the site validated and
preprocessed), round 2 (from the validation record and the cache); per round the wall time split
into site loading and training, and peak memory (peak RSS, and peak anonymous memory: what the
process holds itself, without the cache file pages the OS may drop). ``--legacy`` adds the data
path before this version for comparison (every case preprocessed into RAM, every image validated,
every round)::

    python bench/bench_data_path.py scale --cases 10 100 1000 --legacy --json scale.json --png scale.png
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

__all__ = ["run_busy_benchmark", "run_scale_benchmark", "write_synthetic_site"]

TINY_NETWORK = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1, "body_features": 8}
TINY_TRAINING = {"patch_size": [32, 32, 16], "batch_size": 8, "samples_per_case": 1, "amp": False, "val_fraction": 0.1}
TINY_PREPROCESSING = {"spacing": [3.0, 3.0, 3.0]}


def _settings(network: dict, training: dict, preprocessing: dict) -> tuple[dict, dict, dict]:
    """Complete settings dicts (every field) from the fields that differ from the defaults."""
    from SegVizLogic.network import NetworkConfig
    from SegVizLogic.preprocessing import Preprocessing
    from SegVizLogic.training import TrainingConfig

    return (
        NetworkConfig.from_dict({**NetworkConfig().to_dict(), **network}).to_dict(),
        TrainingConfig.from_dict({**TrainingConfig().to_dict(), **training}).to_dict(),
        Preprocessing.from_dict({**Preprocessing().to_dict(), **preprocessing}).to_dict(),
    )


# --- sites --------------------------------------------------------------------------------------


def write_synthetic_site(root: Path, cases: int, seed: int = 0) -> Path:
    """A liver site of ``cases`` small CT volumes (64x64x40 at 1.5 mm: air, a body at 40 HU, a
    liver at 90 HU, noise), each with its label map."""
    import SimpleITK as sitk

    from SegVizLogic.site import write_site

    write_site(root, "site-synthetic", ["liver"], {1: "liver"})
    grid = np.mgrid[0:40, 0:64, 0:64].astype(np.float32)  # z, y, x
    for index in range(cases):
        rng = np.random.default_rng([seed, index])
        centre = np.array([20, 32, 32]) + rng.normal(0, 2, 3)
        body = ((grid[1] - centre[1]) / 26) ** 2 + ((grid[2] - centre[2]) / 29) ** 2 < 1
        radii = rng.uniform([6, 8, 10], [9, 12, 14])
        organ = sum(((grid[a] - (centre[a] + (0, -4, -8)[a])) / radii[a]) ** 2 for a in range(3)) < 1
        ct = np.where(body, 40.0, -1000.0) + np.where(organ, 50.0, 0.0) + rng.normal(0, 12, grid.shape[1:])
        for array, folder in ((ct.astype(np.int16), "images"), (organ.astype(np.uint8), "labels")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((1.5, 1.5, 1.5))
            sitk.WriteImage(image, str(root / folder / f"case{index:04d}.nii.gz"), useCompression=True)
    return root


def _phantom_site(root: Path, cases: int, size: str, workers: int) -> Path:
    """The phantom's liver site with ``cases`` cases of ``size`` (bench_gpu_round's writer)."""
    from concurrent.futures import ProcessPoolExecutor

    from bench_gpu_round import _write_case

    from SegVizLogic.site import write_site

    write_site(root / "site-liver", "site-liver", ["liver"], {1: "liver"})
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_case, [("site-liver", "liver", case, str(root), size) for case in range(cases)]))
    return root / "site-liver"


# --- one round ----------------------------------------------------------------------------------


def _round_config(network: dict, training: dict, preprocessing: dict, local_epochs: int, server_round: int) -> dict:
    """A train message's config record (FedBN; the settings completed with their defaults)."""
    network, training, preprocessing = _settings(network, training, preprocessing)
    return {
        "server-round": server_round,
        "num-server-rounds": 10,
        "local-epochs": local_epochs,
        "lr": 1e-3,
        "strategy": "fedbn",
        "head-aggregation": "annotating",
        "share-final-batchnorm": False,
        "seed": 0,
        "lineage": "bench",
        "network-config": json.dumps(network),
        "training-config": json.dumps(training),
        "preprocessing": json.dumps(preprocessing),
    }


def _global_groups(network: dict) -> dict:
    import torch

    from SegVizLogic.network import PARTITION_BATCHNORM, NetworkConfig, build_network, partition_state

    torch.manual_seed(0)
    groups = partition_state(build_network(NetworkConfig.from_dict(network)))
    return {name: arrays for name, arrays in groups.items() if name != PARTITION_BATCHNORM}


def _timed_round(site: Path, config: dict, device: str) -> dict:
    """One ``train_client_round`` with its site loading timed apart from its training (the
    modules a round imports are imported first: a round's cost, not the interpreter's).

    Without Flower installed (some lent GPU machines), the same round without Flower's records:
    :func:`~SegVizLogic.training.load_site_data` and :func:`~SegVizLogic.training.train_site` with
    the settings ``train_client_round`` derives from the message (``"via": "train_site"``)."""
    from SegVizLogic import inference, training  # noqa: F401

    try:
        import flwr.app  # noqa: F401 - imported by train_client_round
    except ImportError:
        flower = False
    else:
        flower = True
    loading = []
    original = training.load_site_data

    def timed(*args, **kwargs):
        start = time.perf_counter()
        data = original(*args, **kwargs)
        loading.append(time.perf_counter() - start)
        return data

    training.load_site_data = timed
    try:
        start = time.perf_counter()
        if flower:
            from SegVizLogic.federated.task import train_client_round

            result = train_client_round(
                site, _global_groups(json.loads(config["network-config"])), config, device=device
            )
            steps, data_path = int(result.metrics["steps"]), result.data_path
        else:
            steps, data_path = _round_without_flower(site, config, device, training.load_site_data)
        wall = time.perf_counter() - start
    finally:
        training.load_site_data = original
    return {
        "via": "train_client_round" if flower else "train_site",
        "round_s": round(wall, 3),
        "load_site_s": round(loading[0], 3),
        "train_s": round(wall - loading[0], 3),
        "steps": steps,
        "data_path": {k: round(v, 4) if isinstance(v, float) else v for k, v in data_path.items()},
    }


def _round_without_flower(site: Path, config: dict, device: str, load_site_data) -> tuple[int, dict]:
    """``train_client_round``'s training, for a machine without Flower: ``(steps, data path)``."""
    from dataclasses import replace

    from SegVizLogic.federated.task import load_partition_into_model
    from SegVizLogic.network import NetworkConfig, build_network
    from SegVizLogic.preprocessing import Preprocessing
    from SegVizLogic.training import TrainingConfig, resolve_device, seed_everything, train_site

    server_round, rounds = int(config["server-round"]), int(config["num-server-rounds"])
    training = TrainingConfig.from_dict(json.loads(config["training-config"]))
    training = replace(training, seed=int(config["seed"]) * 1000 + training.seed + server_round)
    seed_everything(training.seed)
    data = load_site_data(site, Preprocessing.from_dict(json.loads(config["preprocessing"])), training)
    network = NetworkConfig.from_dict(json.loads(config["network-config"]))
    model = build_network(network)
    load_partition_into_model(model, _global_groups(network.to_dict()))
    result = train_site(
        model,
        data,
        int(config["local-epochs"]),
        float(config["lr"]),
        resolve_device(device),
        config=training,
        lr_span=((server_round - 1) / rounds, server_round / rounds),
    )
    return result.steps, result.data_path.to_dict()


# --- busy ---------------------------------------------------------------------------------------


def run_busy_benchmark(
    device: str = "cpu",
    size: str = "small",
    cases: int = 6,
    local_epochs: int = 4,
    workers: tuple[int, ...] = (0, -1),
    writers: int = 8,
    site: Path | None = None,
) -> dict:
    """Device busy fraction during real rounds of one phantom site, per number of patch workers.

    Args:
        device: ``cpu`` or ``cuda``.
        size: phantom size (``full``: 512x512 slices; ``small``: a CPU dry run).
        cases: cases of the site (a quarter held out for validation).
        local_epochs: epochs of each measured round.
        workers: patch worker threads per measured round; -1: :func:`default_loader_workers`.
        writers: processes writing the phantom.
        site: an existing site folder instead of a generated phantom site.

    Returns:
        ``{"device", "rounds": [{"workers", "round_s", "load_site_s", "train_s", "steps", "data_path"}], ...}``.
    """
    import torch

    from SegVizLogic.network import NetworkConfig
    from SegVizLogic.preprocessing import Preprocessing
    from SegVizLogic.training import LOADER_WORKERS_ENV, TrainingConfig, default_loader_workers

    network = NetworkConfig().to_dict() if size == "full" else TINY_NETWORK
    training = TrainingConfig().to_dict() if size == "full" else {**TINY_TRAINING, "samples_per_case": 8}
    preprocessing = Preprocessing().to_dict() if size == "full" else {"spacing": [4.0, 4.0, 4.0]}
    if size != "full":
        training["patch_size"] = [48, 48, 32]
    out: dict = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "size": size,
        "cases": cases,
        "local_epochs": local_epochs,
        "torch": torch.__version__,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "rounds": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        site = site or _phantom_site(Path(tmp), cases, size, writers)
        out["phantom_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        _timed_round(site, _round_config(network, training, preprocessing, 1, 1), device)  # fills the cache
        out["first_round_s"] = round(time.perf_counter() - start, 1)
        saved = os.environ.get(LOADER_WORKERS_ENV)
        try:
            for index, count in enumerate(workers):
                count = default_loader_workers(device) if count < 0 else count
                os.environ[LOADER_WORKERS_ENV] = str(count)
                row = _timed_round(
                    site, _round_config(network, training, preprocessing, local_epochs, 2 + index), device
                )
                row["workers"] = count
                out["rounds"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            os.environ.pop(LOADER_WORKERS_ENV, None)
            if saved is not None:
                os.environ[LOADER_WORKERS_ENV] = saved
    return out


# --- scale --------------------------------------------------------------------------------------


class _MemorySampler:
    """Peak anonymous and file-backed resident memory of this process, sampled from /proc."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _scale_child(site: Path, server_round: int, legacy: bool) -> dict:
    """One round in this (fresh) process: its costs and peak memory."""
    import torch

    from SegVizLogic import training

    torch.set_num_threads(1)  # the machine is shared; the figures compare sizes, not speed
    if legacy:
        # Before: every image read and checked, every case preprocessed into RAM, every round.
        from SegVizLogic.site import validate_site

        training.validated_site = validate_site
        cached = training._cached_case
        training._cached_case = lambda transform, item, key, cache_dir: cached(transform, item, key, None)
    config = _round_config(TINY_NETWORK, TINY_TRAINING, TINY_PREPROCESSING, 1, server_round)
    with _MemorySampler() as memory:
        row = _timed_round(site, config, "cpu")
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    row["peak_anon_mb"] = round(memory.peak["RssAnon"] / 2**20, 1)
    row["peak_file_mb"] = round(memory.peak["RssFile"] / 2**20, 1)
    return row


def run_scale_benchmark(sizes=(10, 100, 1000), legacy: bool = False, root: Path | None = None) -> dict:
    """Rounds 1 and 2 of synthetic sites of each size, every round in a fresh process.

    Returns:
        ``{"rows": [{"cases", "path", "round", "round_s", "load_site_s", "train_s", "steps",
        "peak_rss_mb", "peak_anon_mb", "peak_file_mb", "cache_mb"}]}``.
    """
    rows = []
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        for cases in sizes:
            start = time.perf_counter()
            site = write_synthetic_site(Path(tmp) / f"site-{cases}", cases)
            written = round(time.perf_counter() - start, 1)
            for path in ("legacy", "cached") if legacy else ("cached",):
                for server_round in (1, 2):
                    command = [sys.executable, __file__, "scale-child", str(site), str(server_round)]
                    command += ["--legacy"] if path == "legacy" else []
                    done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", check=False)
                    if done.returncode != 0:
                        raise RuntimeError(f"{cases} cases, round {server_round}: {done.stderr.strip()[-1500:]}")
                    row = {"cases": cases, "path": path, "round": server_round, **json.loads(done.stdout)}
                    cache = site / ".segviz" / "cache"
                    row["cache_mb"] = round(sum(p.stat().st_size for p in cache.glob("*.pt")) / 2**20, 1)
                    row["site_written_s"] = written
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                if path == "legacy":
                    for stale in (site / ".segviz").glob("**/*"):
                        if stale.is_file():
                            stale.unlink()
    return {"rows": rows}


def plot_scale(result: dict, path: Path) -> None:
    """Round time and peak memory against the number of cases (log scale): each size's round 2,
    or its round 1 where round 2 was not run (the legacy path repeats round 1's work every round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for path_name, style in (("cached", "o-"), ("legacy", "s--")):
        last = {}
        for row in result["rows"]:
            if row["path"] == path_name:
                last[row["cases"]] = max(last.get(row["cases"], row), row, key=lambda r: r["round"])
        rows = [last[cases] for cases in sorted(last)]
        if not rows:
            continue
        cases = [r["cases"] for r in rows]
        label = "this version" if path_name == "cached" else "before (validate + preprocess every round)"
        axes[0].plot(cases, [r["load_site_s"] for r in rows], style, label=f"site loading, {label}")
        axes[1].plot(cases, [r["peak_anon_mb"] for r in rows], style, label=f"anonymous, {label}")
        if path_name == "cached":
            axes[0].plot(cases, [r["train_s"] for r in rows], "^:", label="training + validation, this version")
            axes[1].plot(cases, [r["cache_mb"] for r in rows], "^:", label="cache on disk")
    for axis, title in zip(axes, ("seconds per round (cache warm)", "peak memory, MB (cache warm)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("cases at the site")
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=6.5)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``busy``, ``scale`` (and ``scale-child``, which ``scale`` runs)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    busy = sub.add_parser("busy", help="device busy fraction during real rounds")
    busy.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    busy.add_argument("--size", choices=("small", "full"), default="small")
    busy.add_argument("--cases", type=int, default=6)
    busy.add_argument("--local-epochs", type=int, default=4)
    busy.add_argument("--workers", type=int, nargs="+", default=[0, -1], help="-1: the default for the device")
    busy.add_argument("--json", type=Path)
    scale = sub.add_parser("scale", help="round cost and memory of sites of 10 to 1000 cases")
    scale.add_argument("--cases", type=int, nargs="+", default=[10, 100, 1000])
    scale.add_argument("--legacy", action="store_true", help="also the data path before this version")
    scale.add_argument("--json", type=Path)
    scale.add_argument("--png", type=Path)
    child = sub.add_parser("scale-child")
    child.add_argument("site", type=Path)
    child.add_argument("round", type=int)
    child.add_argument("--legacy", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "scale-child":
        print(json.dumps(_scale_child(args.site, args.round, args.legacy)))
        return 0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if args.command == "busy":
        result = run_busy_benchmark(args.device, args.size, args.cases, args.local_epochs, tuple(args.workers))
    else:
        result = run_scale_benchmark(tuple(args.cases), legacy=args.legacy)
        if args.png:
            plot_scale(result, args.png)
    result["load_average_at_start"] = load
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
