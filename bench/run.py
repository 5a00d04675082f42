"""All SegViz benchmarks in one table: inference end to end, training step, federated round.

    python bench/run.py [--quick] [--device cpu|cuda] [--json OUT] [--model M.segviz] [--only inference,training,federation]

``--only ...,sites`` adds the many-sites federation (``bench/bench_many_sites.py``: 100 tiny
sites in the simulation engine, 10 with ``--quick``); it is not run by default.

Every figure is recorded with the machine (CPU model, cores, GPU, torch version) and the date.
Needs nothing outside the repository except ``../shared/data/real/totalseg_example/example_ct.nii.gz``
(or ``--ct`` / ``$SEGVIZ_BENCH_CT``), and no network access. The federated part runs
``bench/bench_federation.py`` when it exists.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

SECTIONS = ("inference", "training", "federation", "sites")
DEFAULT_SECTIONS = ("inference", "training", "federation")


def machine() -> dict:
    """The machine every figure is measured on."""
    from SegVizLogic.experiments.report import machine_info

    info = machine_info()
    info["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        info["load_average_1min_at_start"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def bench_federation(quick: bool, device: str) -> dict:
    """Run ``bench/bench_federation.py`` (owned by the federated code) and return its JSON.

    Full: ``--mode both`` (a real TLS federation and the simulation engine, 2 rounds x 2 local
    epochs on the phantom); ``--quick``: simulation only, 2 rounds x 1 local epoch, 2 cases per site.
    """
    script = BENCH / "bench_federation.py"
    if not script.is_file():
        return {"skipped": "bench/bench_federation.py is not present"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "federation.json"
        command = [sys.executable, str(script), "--json", str(out), "--device", device, "--progress", "none"]
        command += (
            ["--mode", "simulation", "--rounds", "2", "--local-epochs", "1", "--cases-per-site", "2"]
            if quick
            else ["--mode", "both"]
        )
        env = dict(os.environ)
        if device == "cuda":
            # The simulation engine's Ray actors ask for no GPU, and Ray then hides every GPU from them.
            env.setdefault("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
            env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", cwd=REPO, env=env, check=False)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"bench_federation.py failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
        return json.loads(out.read_text(encoding="utf-8"))


def bench_sites(quick: bool, device: str) -> dict:
    """Run ``bench/bench_many_sites.py`` and return its JSON: 100 tiny sites, 3 rounds, a tenth
    of them trained per round; ``--quick``: 10 sites, 2 rounds."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sites.json"
        command = [sys.executable, str(BENCH / "bench_many_sites.py"), "--json", str(out), "--device", device]
        command += ["--sites", "10", "--rounds", "2"] if quick else ["--sites", "100", "--rounds", "3"]
        done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", cwd=REPO, check=False)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"bench_many_sites.py failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
        return json.loads(out.read_text(encoding="utf-8"))


def _sites_rows(result: dict) -> list[tuple[str, str, str, str]]:
    rounds = result["rounds"]
    sites = result["settings"]["sites"]
    later = rounds[1:] or rounds  # round 1 also starts the Ray worker
    memory = result["memory"]["overall"]
    return [
        _row(
            f"FL {sites} sites, round (simulation)",
            f"{sum(r['wall_s'] for r in later) / len(later):.1f} s",
            "",
            f"{rounds[0]['trained']} of {rounds[0]['connected']} sites trained per round; "
            f"round 1 {rounds[0]['wall_s']:.1f} s (Ray worker start)",
        ),
        _row(
            f"FL {sites} sites, peak memory",
            f"{memory['driver_rss_mb']:.0f} MB driver, {memory['tree_rss_mb']:.0f} MB tree",
            "",
            f"RSS; tree PSS {memory['tree_pss_mb']:.0f} MB; preprocess {result['seconds']['prepare']:.0f} s",
        ),
    ]


def _federation_rows(fed: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    target = fed.get("target_overhead_fraction")
    by_mode: dict[str, list[dict]] = {}
    for row in fed.get("rounds", []):
        by_mode.setdefault(row["mode"], []).append(row)
    for mode, entries in by_mode.items():
        worst = max(r["overhead_fraction"] or 0.0 for r in entries)
        mean_round = sum(r["round_s"] for r in entries) / len(entries)
        mean_overhead = sum(r["overhead_s"] for r in entries) / len(entries)
        ok = "" if target is None else (" ✓" if worst <= target else " ✗")
        rows.append(
            _row(
                f"FL round overhead ({mode})",
                f"{mean_overhead:.1f} s of {mean_round:.1f} s, worst {100 * worst:.0f} %{ok}",
                "" if target is None else f"≤ {100 * target:.0f} %",
                f"{len(entries)} rounds, {entries[0]['sites']} sites",
            )
        )
        rows.append(
            _row(
                f"FL bytes per round ({mode})",
                f"{_mb(entries[-1]['bytes_to_each_site'])} to each site, "
                f"{_mb(entries[-1]['bytes_from_site'])} from a site",
                "",
                "last round",
            )
        )
    return rows


def _mb(value) -> str:
    if isinstance(value, dict):  # per site
        values = list(value.values())
        return f"{min(values) / 1e6:.2f}-{max(values) / 1e6:.2f} MB" if values else "–"
    return f"{float(value) / 1e6:.2f} MB" if isinstance(value, (int, float)) else str(value)


def _row(name: str, value: str, target: str = "", note: str = "") -> tuple[str, str, str, str]:
    return name, value, target, note


def table(results: dict) -> str:
    """The printed table: benchmark, figure, target, note."""
    rows = []
    inf = results.get("inference", {})
    device = results["device"]
    if "wall_s" in inf:
        t = inf.get("targets", {})
        ok = lambda v, lim: "" if lim is None else (" ✓" if v <= lim else " ✗")
        rows.append(
            _row(
                "infer 512×512×300 wall",
                f"{inf['wall_s']:.1f} s{ok(inf['wall_s'], t.get('wall_s'))}",
                f"≤ {t['wall_s']:g} s" if "wall_s" in t else "",
                f"segviz infer --device {device}",
            )
        )
        rows.append(
            _row(
                "infer peak RSS (child)",
                f"{inf['peak_rss_gb']:.2f} GB{ok(inf['peak_rss_gb'], t.get('peak_rss_gb'))}",
                f"≤ {t['peak_rss_gb']:g} GB" if "peak_rss_gb" in t else "",
                "ru_maxrss of the child",
            )
        )
        for name, label in (
            ("exact", "infer --exact (every lever off)"),
            ("monai_pipeline", "standard MONAI pipeline"),
        ):
            if name in inf:
                other = inf[name]
                rows.append(
                    _row(
                        f"  {label}",
                        f"{other['wall_s']:.1f} s, {other['peak_rss_gb']:.2f} GB",
                        "",
                        f"{other['ratio_to_fast']:.2f}× the fast path's wall; CPU {other['cpu_s']:.0f} s vs {inf['cpu_s']:.0f} s",
                    )
                )
        warm = inf.get("warm_worker")
        if warm:
            walls = [r["wall_s"] for r in warm["requests"]]
            rows.append(
                _row(
                    "  warm worker (segviz serve)",
                    " / ".join(f"{w:.1f}" for w in walls) + " s",
                    f"≤ {t['warm_wall_s']:g} s" if "warm_wall_s" in t else "",
                    f"request 1 (bundle load) / 2; worker startup {warm['startup_s']:.1f} s",
                )
            )
        organs = inf.get("restore_on_organs") or {}
        if "boundary_restore_s" in organs:
            rows.append(
                _row(
                    "  restore on real organ shapes",
                    f"{organs['boundary_restore_s']:.2f} s vs {organs['resampling_restore_s']:.2f} s",
                    "",
                    f"boundary vs full resampling; equal label maps: {organs['equal']}",
                )
            )
        split = inf["split_s"]
        keys = ("startup", "load_and_read", "preprocess", "network", "restore", "write", "exit")
        rows.append(
            _row(
                "  split " + "/".join(keys),
                " / ".join("–" if split.get(k) is None else f"{split[k]:.1f}" for k in keys) + " s",
                "",
                f"CT read alone {split.get('read_ct_alone', float('nan')):.1f} s",
            )
        )
    elif "error" in inf or "skipped" in inf:
        rows.append(_row("inference", inf.get("error") or inf.get("skipped")))
    tr = results.get("training", {})
    if "median_step_s" in tr:
        note = f"{tr['patches_per_s']:.1f} patches/s" + (
            f", peak {tr['peak_gpu_memory_gb']} GB GPU" if "peak_gpu_memory_gb" in tr else ""
        )
        rows.append(
            _row(
                "train step 128×128×32 ×8",
                f"{tr['median_step_s']:.3f} s",
                "",
                f"median of {len(tr['steps_s'])}; {note}",
            )
        )
    elif tr:
        rows.append(_row("training", tr.get("error") or tr.get("skipped", "")))
    fed = results.get("federation", {})
    if fed.get("rounds"):
        rows += _federation_rows(fed)
    elif fed:
        rows.append(_row("federation", fed.get("error") or fed.get("skipped", "")))
    many = results.get("sites", {})
    if many.get("rounds"):
        rows += _sites_rows(many)
    elif many:
        rows.append(_row("many sites", many.get("error", "")))
    widths = [max(len(r[i]) for r in rows + [("benchmark", "figure", "target", "note")]) for i in range(4)]
    lines = [
        " | ".join(h.ljust(w) for h, w in zip(("benchmark", "figure", "target", "note"), widths)),
        "-+-".join("-" * w for w in widths),
    ]
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    m = results["machine"]
    lines.append(
        f"\nmachine: {m['cpu']} ({m['cores']} cores), GPU {m['gpu'] or 'none'}, torch {m['torch']}, {m['date']}"
    )
    return "\n".join(lines)


def _guarded(benchmark) -> dict:
    """``benchmark()``'s results, or ``{"error": ...}`` with the traceback printed: one failed
    benchmark must not hide the others."""
    try:
        return benchmark()
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}"}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; print the table; optionally write JSON."""
    parser = argparse.ArgumentParser(description="SegViz benchmarks (inference, training step, federated round)")
    parser.add_argument("--quick", action="store_true", help="fewer training steps and a quick federation run")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="write all results (with the machine and date) here")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="bundle for the inference benchmark (default: paper config, random weights)",
    )
    parser.add_argument(
        "--ct",
        type=Path,
        default=None,
        help="source CT (default ../shared/data/real/totalseg_example/example_ct.nii.gz)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed training steps (default 5 on CPU, 20 on CUDA; 3 with --quick)"
    )
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated subset of {', '.join(SECTIONS)} (default: {', '.join(DEFAULT_SECTIONS)})",
    )
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU is available")

    results: dict = {
        "device": args.device,
        "quick": args.quick,
        "machine": machine(),
        "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
    }
    started = time.perf_counter()
    if "inference" in only:
        from bench_inference import run_infer_benchmark

        results["inference"] = _guarded(
            lambda: run_infer_benchmark(
                args.device,
                args.model,
                args.ct,
                repeats=1 if args.quick or args.device == "cpu" else 3,
                compare=not args.quick,
            )
        )
    if "training" in only:
        from bench_training import run_training_step_benchmark

        steps = args.steps or (3 if args.quick else (20 if args.device == "cuda" else 5))
        warmup = 3 if args.device == "cuda" else (1 if args.quick else 2)
        results["training"] = _guarded(lambda: run_training_step_benchmark(args.device, steps=steps, warmup=warmup))
    if "federation" in only:
        results["federation"] = _guarded(lambda: bench_federation(args.quick, args.device))
    if "sites" in only:
        results["sites"] = _guarded(lambda: bench_sites(args.quick, args.device))
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
        print(f"wrote {args.json}")
    failed = [s for s in only if isinstance(results.get(s), dict) and "error" in results[s]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
