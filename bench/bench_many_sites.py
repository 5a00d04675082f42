"""Benchmark: a federation of many small sites in Flower's simulation engine (issue 12).

Makes N real site folders cheaply (one small phantom of 2 cases per site, generated once; site
*i* hard-links the images and label maps of the phantom's single-organ site *i* mod 4 and has
its own ``site.json`` with its own name), then runs
:func:`~SegVizLogic.federated.simulation.run_federated_simulation` over all N with a tiny network
(the federated tests' sizes), FedBN, a seeded sample of the sites per round (``--fraction-train``,
at least ``--min-train-nodes``) and an optional ``--round-deadline``. It reports:

- seconds to build the N folders, to validate and preprocess them (what a site does once, before
  its first round), to start the simulation (Ray, the ServerApp's model) and per round: the wall
  time between the ServerApp's ``round_started`` and ``round_finished`` events, and the
  ServerApp's own timings from the final bundle's metrics (``summarise`` of
  ``bench/bench_federation.py``: round, sites' handler time, aggregation, bundle writing);
- how many sites were connected, sampled to train, replied and were dropped in each round;
- bytes sent to each site and back from each site;
- memory, sampled by a psutil thread every ``--interval`` seconds: peak RSS of this process
  (the driver: Flower's simulation driver, the ServerApp and its aggregation run here), peak of
  the summed RSS of this process and all its descendants (Ray's GCS, raylet, dashboard and the
  worker that runs the ClientApps) and the peak of their summed PSS (shared pages counted once
  between processes; sampled every fifth look), each per phase; plus ``ru_maxrss`` of this
  process.

Usage::

    python bench/bench_many_sites.py --sites 100 --rounds 3 --json many100.json

The sites train one at a time on all CPUs (``--sites-at-once 1``, the simulation's default):
the round time grows with the number of sites *trained*, which ``--fraction-train`` keeps small.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_federation import print_columns, summarise

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from SegVizLogic.progress import ProgressReporter

__all__ = ["Timeline", "TreeMemory", "build_sites", "main", "make_phantom", "prepare_sites", "run_rounds"]

MB = 1024 * 1024


class Timeline(ProgressReporter):
    """A progress reporter that also records every event with its time (the ServerApp runs in
    this process in the simulation engine, so its ``round_started`` / ``round_finished`` land
    here)."""

    def __init__(self, mode: str = "none") -> None:
        super().__init__(mode)
        self.events: list[tuple[str, float, dict]] = []

    def emit(self, event: str, **fields) -> None:
        self.events.append((event, time.time(), fields))
        super().emit(event, **fields)
        if self.mode == "none" and event in ("round_started", "round_finished"):
            print(f"  {event} {fields.get('round')}/{fields.get('rounds')}", file=sys.stderr, flush=True)

    def times(self, event: str) -> dict[int, float]:
        """``round -> time`` of one event kind."""
        return {fields["round"]: t for name, t, fields in self.events if name == event and "round" in fields}


class TreeMemory(threading.Thread):
    """Samples the RSS of this process and of all its descendants, and their PSS, until stopped;
    keeps the peaks per phase (set :attr:`phase` from the main thread)."""

    def __init__(self, interval: float = 0.2, pss_every: int = 5) -> None:
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.root = psutil.Process()
        self.interval = interval
        self.pss_every = pss_every
        self.phase = "start"
        self.peaks: dict[str, dict[str, float]] = {}
        self.samples = 0
        self.largest: dict[str, float] = {}
        """RSS per process name (MB) when the summed RSS was largest."""
        self._largest_rss = 0
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def run(self) -> None:
        psutil = self.psutil
        while not self._halt.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                processes = [self.root]
            rss, pss = 0, 0
            driver = 0
            by_name: dict[str, float] = {}
            with_pss = self.samples % self.pss_every == 0
            for process in processes:
                try:
                    if with_pss:
                        info = process.memory_full_info()
                        pss += info.pss
                    else:
                        info = process.memory_info()
                except psutil.Error:  # ended between listing and reading
                    continue
                rss += info.rss
                if process.pid == self.root.pid:
                    driver = info.rss
                    name = "driver (this process)"
                else:
                    try:
                        name = process.name()
                    except psutil.Error:
                        name = "?"
                by_name[name] = by_name.get(name, 0.0) + info.rss / MB
            if rss > self._largest_rss:
                self._largest_rss = rss
                self.largest = by_name
            peak = self.peaks.setdefault(
                self.phase, {"driver_rss_mb": 0.0, "tree_rss_mb": 0.0, "tree_pss_mb": 0.0, "processes": 0}
            )
            peak["driver_rss_mb"] = max(peak["driver_rss_mb"], driver / MB)
            peak["tree_rss_mb"] = max(peak["tree_rss_mb"], rss / MB)
            if with_pss:
                peak["tree_pss_mb"] = max(peak["tree_pss_mb"], pss / MB)
            peak["processes"] = max(peak["processes"], len(processes))
            self.samples += 1
            self._halt.wait(self.interval)

    def overall(self) -> dict[str, float]:
        """The peaks over every phase."""
        keys = ("driver_rss_mb", "tree_rss_mb", "tree_pss_mb", "processes")
        return {k: max((p[k] for p in self.peaks.values()), default=0.0) for k in keys}


def _network_and_training(args):
    from SegVizLogic.network import NetworkConfig
    from SegVizLogic.preprocessing import Preprocessing
    from SegVizLogic.training import TrainingConfig

    # The federated tests' tiny run (Testing/federated/federated_tiny.py): one optimiser step
    # per epoch on a 2-case site.
    network = NetworkConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=1, body_features=4)
    preprocessing = Preprocessing(spacing=(6.0, 6.0, 6.0))
    training = TrainingConfig(patch_size=(32, 32, 16), batch_size=2, samples_per_case=2, amp=False, seed=args.seed)
    return network, preprocessing, training


def make_phantom(root: Path, seed: int = 0) -> list[Path]:
    """The small phantom's four single-organ sites (2 cases each) under ``root / "phantom"``."""
    from SegVizLogic.phantom import generate_phantom_sites

    return generate_phantom_sites(root / "phantom", seed=seed, cases_per_site=2, external_cases=1).sites


def build_sites(phantom: list[Path], root: Path, count: int) -> list[Path]:
    """``count`` site folders under ``root / "sites"``: site *i* holds hard links to the images
    and label maps of ``phantom[i % len(phantom)]`` (copies where links are not possible) and its
    own ``site.json`` named ``<phantom site>-<i>``.

    Raises:
        SiteValidationError: a folder is not a valid site (the pairing and site.json are checked;
            the images are checked when the site is prepared).
    """
    from SegVizLogic.site import SITE_FILE, STATE_DIR, validate_site

    def link(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:  # another file system
            shutil.copy2(source, target)

    sites = []
    width = len(str(count - 1))
    for index in range(count):
        source = phantom[index % len(phantom)]
        target = root / "sites" / f"{source.name}-{index:0{width}d}"
        # site.json is written anew, never through a link: editing it would edit the phantom's.
        shutil.copytree(source, target, copy_function=link, ignore=shutil.ignore_patterns(SITE_FILE, STATE_DIR))
        declaration = json.loads((source / SITE_FILE).read_text(encoding="utf-8"))
        declaration["name"] = target.name
        (target / SITE_FILE).write_text(json.dumps(declaration, indent=2) + "\n", encoding="utf-8")
        validate_site(target, check_images=False)
        sites.append(target)
    return sites


def prepare_sites(sites: list[Path], args, reporter: ProgressReporter) -> None:
    """Validate every site's images and preprocess its cases into its cache, as a site does once
    before its first round (``run_federated_simulation`` then finds every cache filled)."""
    from SegVizLogic.training import load_site_data

    _, preprocessing, training = _network_and_training(args)
    for site in sites:
        load_site_data(site, preprocessing, training, reporter=reporter)


def run_rounds(sites: list[Path], out: Path, args, reporter: ProgressReporter) -> Path:
    """The federation over every site in the simulation engine; returns the final bundle."""
    from SegVizLogic.federated.simulation import run_federated_simulation

    network, preprocessing, training = _network_and_training(args)
    return run_federated_simulation(
        sites,
        out,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        strategy="fedbn",
        weighting="uniform",
        lr=1e-2,
        preprocessing=preprocessing,
        training_config=training,
        network_config=network,
        reporter=reporter,
        seed=args.seed,
        device=args.device,
        engine=args.engine,
        num_cpus=args.num_cpus,
        fraction_train=args.fraction_train,
        min_train_nodes=args.min_train_nodes,
        round_deadline=args.round_deadline,
        sites_at_once=args.sites_at_once,
        choose_threshold=False,  # the rounds are measured, not the question after them
    )


def round_rows(bundle: Path, timeline: Timeline) -> list[dict]:
    """Per round: ``summarise``'s row, the sampling, the dropped sites and the wall time between
    the ServerApp's round events."""
    from SegVizLogic.bundle import load_bundle

    started, finished = timeline.times("round_started"), timeline.times("round_finished")
    history = {entry["round"]: entry for entry in load_bundle(bundle).metrics["rounds"]}
    rows = []
    for row in summarise(bundle, "simulation"):
        entry = history[row["round"]]
        sampled = entry.get("sampled", {})
        from_site = row["bytes_from_site"]
        rows.append(
            {
                **row,
                "connected": sampled.get("connected"),
                "trained": sampled.get("trained"),
                "replied": len(entry["sites"]),
                "dropped": sorted(entry.get("dropped", {})),
                "wall_s": round(finished[row["round"]] - started[row["round"]], 2),
                "bytes_from_site_mean": round(sum(from_site.values()) / max(1, len(from_site))),
            }
        )
    return rows


def print_table(result: dict) -> None:
    """The rounds, then the phases and the memory."""
    header = (
        "round",
        "connected",
        "trained",
        "replied",
        "dropped",
        "wall s",
        "round s",
        "sites' handler s (sum)",
        "aggregate s",
        "to each site",
        "from a site",
    )
    lines = [header]
    for r in result["rounds"]:
        lines.append(
            (
                str(r["round"]),
                str(r["connected"]),
                str(r["trained"]),
                str(r["replied"]),
                str(len(r["dropped"])),
                f"{r['wall_s']:.1f}",
                f"{r['round_s']:.1f}",
                f"{r['client_handler_s_sum']:.1f}",
                f"{r['aggregate_s']:.2f}",
                f"{r['bytes_to_each_site'] / 1e6:.3f} MB",
                f"{r['bytes_from_site_mean'] / 1e6:.3f} MB",
            )
        )
    print_columns(lines)
    seconds = result["seconds"]
    print(
        f"\n{result['settings']['sites']} sites: phantom {seconds['phantom']:.1f} s, build {seconds['build']:.1f} s, validate + preprocess "
        f"{seconds['prepare']:.1f} s, simulation start-up {seconds['startup']:.1f} s, rounds "
        f"{seconds['rounds']:.1f} s, shutdown {seconds['shutdown']:.1f} s"
    )
    print(f"{'phase':<12} {'driver RSS':>12} {'tree RSS':>12} {'tree PSS':>12} {'processes':>10}")
    for phase, peak in [*result["memory"]["peaks"].items(), ("all", result["memory"]["overall"])]:
        print(
            f"{phase:<12} {peak['driver_rss_mb']:>9.0f} MB {peak['tree_rss_mb']:>9.0f} MB "
            f"{peak['tree_pss_mb']:>9.0f} MB {peak['processes']:>10.0f}"
        )
    by_process = result["memory"]["tree_rss_mb_by_process_at_peak"]
    print("tree RSS at its peak: " + ", ".join(f"{name} {mb:.0f} MB" for name, mb in by_process.items()))
    print(f"ru_maxrss of this process: {result['memory']['ru_maxrss_mb']:.0f} MB")
    load = result["load_average"]
    print(f"load average (1 min) at start {load['start'][0]:.2f}, at end {load['end'][0]:.2f} on {os.cpu_count()} CPUs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=100, help="number of sites (default 100)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--fraction-train", type=float, default=0.1, help="share of the sites trained per round")
    parser.add_argument(
        "--min-train-nodes", type=int, default=2, help="at least this many sites trained and replies needed"
    )
    parser.add_argument(
        "--round-deadline",
        type=float,
        default=0.0,
        help="seconds a round waits for more replies once it has the replies it needs (0: every sampled site)",
    )
    parser.add_argument("--sites-at-once", type=int, default=1, help="virtual sites trained at the same time")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs given to the simulation (default: all)")
    parser.add_argument("--engine", choices=("auto", "simulation", "deployment"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: temporary, removed)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--progress", choices=("rich", "json", "none"), default="none")
    args = parser.parse_args(argv)
    if args.sites < 1 or args.rounds < 1:
        parser.error("--sites and --rounds must be >= 1")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from SegVizLogic.experiments.report import machine_info
    from SegVizLogic.federated.simulation import choose_engine

    engine = choose_engine(args.engine)
    load_start = os.getloadavg()
    work = args.work or Path(tempfile.mkdtemp(prefix="segviz-bench-sites-"))
    work.mkdir(parents=True, exist_ok=True)
    memory = TreeMemory(args.interval)
    memory.start()
    timeline = Timeline(args.progress)
    seconds: dict[str, float] = {}
    try:
        memory.phase = "build"
        t0 = time.perf_counter()
        phantom = make_phantom(work, args.seed)
        seconds["phantom"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sites = build_sites(phantom, work, args.sites)
        seconds["build"] = time.perf_counter() - t0
        print(
            f"phantom in {seconds['phantom']:.1f} s, {len(sites)} sites built in {seconds['build']:.1f} s",
            file=sys.stderr,
            flush=True,
        )

        memory.phase = "prepare"
        t0 = time.perf_counter()
        prepare_sites(sites, args, timeline)
        seconds["prepare"] = time.perf_counter() - t0
        print(f"validated and preprocessed in {seconds['prepare']:.1f} s", file=sys.stderr, flush=True)

        memory.phase = "rounds"
        t0 = time.time()
        bundle = run_rounds(sites, work / "out", args, timeline)
        ended = time.time()
        started, finished = timeline.times("round_started"), timeline.times("round_finished")
        seconds["startup"] = started[1] - t0
        seconds["rounds"] = finished[args.rounds] - started[1]
        seconds["shutdown"] = ended - finished[args.rounds]
        memory.phase = "after"
        time.sleep(max(1.0, 3 * args.interval))  # a last look after Ray's shutdown
        rows = round_rows(bundle, timeline)
    finally:
        memory.stop()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    load_end = os.getloadavg()
    # Linux reports ru_maxrss in kB.
    result = {
        "settings": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "engine_used": engine,
        },
        "machine": machine_info(),
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in load_end]},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "rounds": rows,
        "memory": {
            "peaks": {
                phase: {k: round(v, 1) for k, v in peak.items()}
                for phase, peak in memory.peaks.items()
                if phase != "start"
            },
            "overall": {k: round(v, 1) for k, v in memory.overall().items()},
            "tree_rss_mb_by_process_at_peak": {
                name: round(mb, 1) for name, mb in sorted(memory.largest.items(), key=lambda item: -item[1])
            },
            "samples": memory.samples,
            "interval_s": args.interval,
            # Only this process's: a child's ru_maxrss starts at its parent's size when forked.
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        },
    }
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
