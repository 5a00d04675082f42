"""Benchmark: what a SegViz federation round costs besides training.

Runs a real federation on this machine (a TLS SuperLink, one SuperNode per phantom site, a run
started with ``flwr run``; every process the real Flower one) and/or the same federation in
Flower's simulation engine, then reads the per-round timings and payload sizes that the
ServerApp records in the final bundle:

- bytes sent to each site and by each site (array/metric/config payload of the messages);
- per site: time in the ClientApp handler (data, model, training, packing) and in training;
- Flower overhead = round time minus the slowest site's handler time (deployment: sites run in
  parallel) or minus the sum of the handler times (simulation: one virtual site at a time).
  It contains ClientApp process start and imports, serialisation, transport, polling,
  aggregation and bundle writing (the last two are also shown on their own).

Usage::

    python bench/bench_federation.py --mode both --rounds 2 --local-epochs 2 --json bench-federation.json

The phantom and the demo's training settings (2 local epochs, 4 single-organ sites) are the
default; the target is overhead <= 15 % of the round time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

TARGET_OVERHEAD = 0.15


def _settings(args):
    from SegVizLogic.demo import DemoSettings

    demo = DemoSettings()
    return demo, demo.training(args.seed)


def _phantom(work: Path, args) -> list[Path]:
    from SegVizLogic.demo import DEMO_CASES_PER_SITE
    from SegVizLogic.phantom import generate_phantom_sites

    cases = DEMO_CASES_PER_SITE if args.cases_per_site is None else args.cases_per_site
    layout = generate_phantom_sites(work / "data", seed=args.seed, cases_per_site=cases)
    return layout.sites[: args.sites]


def _fresh_sites(sites: list[Path], work: Path, tag: str) -> list[Path]:
    out = []
    for site in sites:
        target = work / tag / site.name
        shutil.copytree(site, target, ignore=shutil.ignore_patterns("federated"))
        out.append(target)
    return out


def run_deployment(sites: list[Path], work: Path, args) -> Path:
    """A real federation with TLS; returns the final bundle."""
    from SegVizLogic.federated.certs import write_certificates, write_node_key_pair
    from SegVizLogic.federated.processes import free_port
    from SegVizLogic.federated.runs import follow_run, register_node, start_run
    from SegVizLogic.federated.site_node import join_federation
    from SegVizLogic.federated.superlink import start_superlink
    from SegVizLogic.federated.task import FederationSettings
    from SegVizLogic.progress import ProgressReporter

    demo, training = _settings(args)
    tls = write_certificates(work / "tls", force=True)
    address = f"127.0.0.1:{free_port()}"
    link = start_superlink(
        address, tls_dir=work / "tls", state_dir=work / "superlink", control_address=f"127.0.0.1:{free_port()}"
    )
    stops, threads = [], []
    try:
        for site in sites:
            # As deployed: each site's key registered, the signed app verified, final BatchNorm
            # shared (as the simulation arm does).
            key, public = write_node_key_pair(work / "keys" / site.name, force=True)
            register_node(link.control_address, public, tls["ca.crt"], name=site.name)
            stop = threading.Event()
            thread = threading.Thread(
                target=join_federation,
                args=(address, site),
                kwargs={
                    "root_cert": tls["ca.crt"],
                    "auth_key": key,
                    "stop": stop,
                    "device": args.device,
                    "share_final_batchnorm": True,
                },
                daemon=True,
            )
            thread.start()
            stops.append(stop)
            threads.append(thread)
        settings = FederationSettings(
            rounds=args.rounds,
            local_epochs=args.local_epochs,
            lr=demo.lr,
            strategy="fedbn",
            weighting="uniform",
            min_clients=len(sites),
            wait_timeout=300,
            seed=args.seed,
            network=demo.network,
            training=training.to_dict(),
            preprocessing=demo.preprocessing,
        )
        config = settings.to_run_config()
        config.pop("out-dir")
        run_id = start_run(
            link.control_address,
            work / "out-deployment",
            config,
            root_cert=tls["ca.crt"],
            work_dir=work / "run",
            registry_port=link.registry_port,
        )
        return follow_run(
            work / "out-deployment",
            ProgressReporter(args.progress),
            run_id=run_id,
            flwr_home=work / "run" / "flwr-home",
            superlink=link.control_address,  # a slow `flwr list` on a busy machine is not a SuperLink gone
        )
    finally:
        for stop in stops:
            stop.set()
        for thread in threads:
            thread.join(timeout=60)
        link.stop()


def run_simulation(sites: list[Path], work: Path, args) -> Path:
    """The same federation in Flower's simulation engine; returns the final bundle."""
    from SegVizLogic.federated.simulation import run_federated_simulation
    from SegVizLogic.progress import ProgressReporter

    demo, training = _settings(args)
    return run_federated_simulation(
        sites,
        work / "out-simulation",
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        strategy="fedbn",
        weighting="uniform",
        lr=demo.lr,
        preprocessing=demo.preprocessing,
        training_config=training,
        network_config=demo.network,
        seed=args.seed,
        reporter=ProgressReporter(args.progress),
        device=args.device,
        choose_threshold=False,  # the rounds are measured, not the question after them
    )


def summarise(bundle_path: Path, mode: str) -> list[dict]:
    """Per-round rows from the bundle's metrics."""
    from SegVizLogic.bundle import load_bundle

    rows = []
    for entry in load_bundle(bundle_path).metrics["rounds"]:
        sites = entry["sites"]
        client = [s.get("client-seconds", 0.0) for s in sites.values()]
        train = [s.get("train-seconds", 0.0) for s in sites.values()]
        busy = max(client) if mode == "deployment" else sum(client)
        round_seconds = entry["seconds"]["round"]
        overhead = max(0.0, round_seconds - busy)
        rows.append(
            {
                "mode": mode,
                "round": entry["round"],
                "sites": len(sites),
                "round_s": round(round_seconds, 2),
                "client_handler_s_max": round(max(client), 2),
                "client_handler_s_sum": round(sum(client), 2),
                "train_s_max": round(max(train), 2),
                "train_s_sum": round(sum(train), 2),
                "aggregate_s": entry["seconds"].get("aggregate", 0.0),
                # the final round's bundle is written after its metrics were recorded
                "bundle_s": entry["seconds"].get("bundle", 0.0),
                "overhead_s": round(overhead, 2),
                "overhead_fraction": round(overhead / round_seconds, 4) if round_seconds else None,
                "bytes_to_each_site": entry["bytes"]["to_each_site"],
                "bytes_from_site": entry["bytes"]["from_site"],
            }
        )
    return rows


def latency_breakdown(bundle_path: Path, sites: list[Path]) -> list[dict]:
    """Deployment only: per round, how long a message took to reach each site's handler
    (SuperNode polling, ClientApp process start and imports, transfer) and how long its reply
    took back to the ServerApp, from the time stamps of the server's and the sites' progress
    files (one machine, one clock)."""
    from SegVizLogic.bundle import load_bundle
    from SegVizLogic.progress import parse_progress_line

    def events(path: Path) -> list[dict]:
        if not path.exists():
            return []
        return [e for e in map(parse_progress_line, path.read_text(encoding="utf-8").splitlines()) if e]

    server = events(bundle_path.parent / "progress.jsonl")
    starts = {e["round"]: e["time"] for e in server if e["event"] == "round_started"}
    history = {h["round"]: h for h in load_bundle(bundle_path).metrics["rounds"]}
    rows = []
    for site in sites:
        site_events = events(site / ".segviz" / "federated" / "events.jsonl")
        for server_round, start in sorted(starts.items()):
            begun = [e["time"] for e in site_events if e["event"] == "round_started" and e.get("round") == server_round]
            sent = [e["time"] for e in site_events if e["event"] == "update_sent" and e.get("round") == server_round]
            if begun and sent:
                received = start + history[server_round]["seconds"]["wire_and_clients"]
                rows.append(
                    {
                        "round": server_round,
                        "site": site.name,
                        "dispatch_s": round(begun[-1] - start, 2),
                        "handler_s": round(sent[-1] - begun[-1], 2),
                        "return_s": round(received - sent[-1], 2),
                    }
                )
    return rows


def print_table(rows: list[dict]) -> None:
    """A plain-text table of the rows."""
    header = (
        "mode",
        "round",
        "round s",
        "client s (max/sum)",
        "train s (max/sum)",
        "aggr s",
        "bundle s",
        "overhead",
        "to site",
        "from site (mean)",
    )
    lines = [header]
    for r in rows:
        mean_from = sum(r["bytes_from_site"].values()) / max(1, len(r["bytes_from_site"]))
        lines.append(
            (
                r["mode"],
                str(r["round"]),
                f"{r['round_s']:.1f}",
                f"{r['client_handler_s_max']:.1f}/{r['client_handler_s_sum']:.1f}",
                f"{r['train_s_max']:.1f}/{r['train_s_sum']:.1f}",
                f"{r['aggregate_s']:.3f}",
                f"{r['bundle_s']:.3f}",
                f"{r['overhead_s']:.1f} s ({100 * r['overhead_fraction']:.0f} %)",
                f"{r['bytes_to_each_site'] / 1e6:.2f} MB",
                f"{mean_from / 1e6:.2f} MB",
            )
        )
    print_columns(lines)


def print_columns(lines: list[tuple[str, ...]]) -> None:
    """Print ``lines`` (the first is the header) as left-aligned columns with a rule under the header."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for index, line in enumerate(lines):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("deployment", "simulation", "both"), default="deployment")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument(
        "--cases-per-site", type=int, default=None, help="phantom cases per site (default: the demo's, 8)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: temporary, removed)")
    parser.add_argument("--json", type=Path, default=Path("bench-federation.json"), help="where to write the results")
    parser.add_argument("--progress", choices=("rich", "json", "none"), default="none")
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

    work = args.work or Path(tempfile.mkdtemp(prefix="segviz-bench-fl-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        sites = _phantom(work, args)
        rows, latency = [], []
        modes = ("deployment", "simulation") if args.mode == "both" else (args.mode,)
        for mode in modes:
            fresh = _fresh_sites(sites, work, mode)
            t0 = time.perf_counter()
            bundle = (run_deployment if mode == "deployment" else run_simulation)(fresh, work, args)
            print(
                f"{mode}: {args.rounds} rounds in {time.perf_counter() - t0:.1f} s (including start-up)",
                file=sys.stderr,
            )
            rows += summarise(bundle, mode)
            if mode == "deployment":
                latency = latency_breakdown(bundle, fresh)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    if latency:
        print(
            "\ndeployment latency per site (dispatch: server sends -> handler starts; return: reply sent -> server has all)"
        )
        for row in latency:
            print(
                f"  round {row['round']} {row['site']:<14} dispatch {row['dispatch_s']:5.1f} s  handler {row['handler_s']:6.1f} s  return {row['return_s']:5.1f} s"
            )
    worst = {mode: max(r["overhead_fraction"] for r in rows if r["mode"] == mode) for mode in {r["mode"] for r in rows}}
    result = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpu_count": os.cpu_count(),
        "target_overhead_fraction": TARGET_OVERHEAD,
        "worst_overhead_fraction": worst,
        "rounds": rows,
        "latency": latency,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(
        f"\nworst overhead per mode: {', '.join(f'{m} {100 * f:.0f} %' for m, f in worst.items())} (target <= {100 * TARGET_OVERHEAD:.0f} %)"
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
