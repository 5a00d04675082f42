"""SegViz ServerApp: head-aware FedBN/FedAvg rounds and a global model bundle after every round.

BatchNorm and the global bundle
-------------------------------
Under FedBN a site's BatchNorm never leaves it while the federation trains: train messages
carry ``shared`` and the heads only, replies carry ``shared`` and the site's annotated heads,
and the global training model keeps its initial BatchNorm. A site that never trained still
needs BatchNorm statistics to segment, so with ``share-final-batchnorm`` (default true, what
SegViz evaluation needs) each site adds its BatchNorm **once**, to its final-round reply,
after training has finished. The server never aggregates it into the training model; it only
builds the bundle's BatchNorm variants from it: ``averaged`` (all sites), ``organ:<organ>``
(sites that annotate the organ) and ``site:<name>``. Per-round bundles before the final round
therefore carry the initial BatchNorm and default to ``adapt`` (test-time re-estimation).
With ``share-final-batchnorm = false`` no BatchNorm ever leaves a site and every bundle
defaults to ``adapt``. Under FedAvg BatchNorm is averaged every round like ``shared``.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from .. import __version__
from ..errors import SegVizError
from ..network import PARTITION_BATCHNORM, build_network, partition_state
from ..progress import ProgressReporter
from .strategy import SegVizStrategy, SiteUpdate, batchnorm_variants, round_metrics
from .task import FederationSettings, load_partition_into_model, new_lineage

__all__ = ["app", "make_server_app", "run_federation", "PROGRESS_FILE", "round_bundle_name", "FINAL_BUNDLE"]

PROGRESS_FILE = "progress.jsonl"
FINAL_BUNDLE = "model.segviz"


def round_bundle_name(server_round: int) -> str:
    """File name of the bundle written after ``server_round`` (``round-001.segviz``)."""
    return f"round-{server_round:03d}.segviz"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _flat_metrics(metrics: dict) -> dict[str, float]:
    flat = {"loss": metrics["loss"], "num_examples": metrics["num_examples"]}
    flat.update({f"dice_{organ}": value for organ, value in metrics["dice"].items()})
    return flat


def _wait_for_clients(grid: Grid, settings: FederationSettings, reporter: ProgressReporter) -> None:
    deadline = time.monotonic() + settings.wait_timeout
    last_report = 0.0
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= settings.min_clients:
            return
        if time.monotonic() > deadline:
            raise SegVizError(f"only {connected} of {settings.min_clients} sites connected within {settings.wait_timeout:.0f} s")
        if time.monotonic() - last_report > 10:
            reporter.emit("waiting", message=f"{connected} of {settings.min_clients} sites connected")
            last_report = time.monotonic()
        time.sleep(0.5)


def run_federation(
    grid: Grid,
    settings: FederationSettings,
    reporter: ProgressReporter | None = None,
    on_round: Callable[[int, list[Message], dict], None] | None = None,
    mode: str = "deployment",
) -> Path:
    """Run ``settings.rounds`` head-aware rounds over ``grid`` and write the bundles.

    Args:
        grid: Flower grid (deployment or simulation).
        settings: the run's settings; ``out_dir`` receives ``round-NNN.segviz`` and
            ``model.segviz``.
        reporter: progress events (round_started, update_sent, round_finished, run_finished).
        on_round: called as ``(round, replies, global partition after aggregation)``
            (tests, benchmarks).
        mode: ``"deployment"`` or ``"simulation"`` (provenance).

    Returns:
        The final bundle's path.
    """
    from ..bundle import save_bundle
    from ..training import seed_everything

    reporter = reporter or ProgressReporter("none")
    if not settings.out_dir:
        raise SegVizError("the run has no out-dir: pass --run-config \"out-dir='/path'\" or use `segviz federation run --out`")
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    seed_everything(settings.seed)
    model = build_network(settings.network)
    lineage = new_lineage()
    if settings.resume_from:
        from ..bundle import load_bundle

        bundle = load_bundle(settings.resume_from)
        if bundle.network_config != settings.network:
            raise SegVizError(f"{settings.resume_from}: its network differs from this run's network config")
        model.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in bundle.state.items()})
        lineage = bundle.provenance.get("lineage", lineage)

    strategy = SegVizStrategy(settings.strategy, settings.weighting, settings.min_clients)
    strategy.current = partition_state(model)
    started = _now()
    history: list[dict] = []
    sites: dict[str, list[str]] = {}
    final_path = out_dir / FINAL_BUNDLE

    _wait_for_clients(grid, settings, reporter)
    writer = _BundleWriter()
    try:
        final_path = _run_rounds(grid, settings, reporter, on_round, mode, model, strategy, lineage, started, history, sites,
                                 out_dir, final_path, writer)
    finally:
        writer.close()
    reporter.emit("run_finished", rounds=settings.rounds,
                  outputs={"model": str(final_path), **{f"round_{r}": str(out_dir / round_bundle_name(r)) for r in range(1, settings.rounds + 1)}})
    return final_path


def _run_rounds(grid, settings, reporter, on_round, mode, model, strategy, lineage, started, history, sites, out_dir, final_path, writer):
    from ..bundle import save_bundle

    for server_round in range(1, settings.rounds + 1):
        reporter.emit("round_started", round=server_round, rounds=settings.rounds)
        round_start = time.perf_counter()
        messages = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(settings.client_config(server_round, lineage)), grid)
        replies = list(grid.send_and_receive(messages, timeout=settings.round_timeout))
        wire_seconds = time.perf_counter() - round_start
        aggregate_start = time.perf_counter()
        strategy.aggregate_train(server_round, replies)
        aggregate_seconds = time.perf_counter() - aggregate_start
        updates: list[SiteUpdate] = strategy.last_updates
        sent_bytes = _record_bytes(messages[0].content) if messages else 0
        reply_bytes = {update_site(r): _record_bytes(r.content) for r in replies if not r.has_error()}
        if len(updates) < settings.min_clients:
            problems = "; ".join(strategy.last_errors) or f"{len(replies)} of {len(messages)} sites replied in time"
            raise SegVizError(f"round {server_round}: only {len(updates)} usable replies, {settings.min_clients} needed ({problems})")
        for update in updates:
            sites[update.site] = list(update.organs)
            reporter.emit("update_sent", round=server_round, site=update.site, num_examples=update.num_examples)
        if on_round is not None:
            on_round(server_round, replies, strategy.current)

        metrics = round_metrics(updates)
        metrics.update(round=server_round, errors=strategy.last_errors,
                       bytes={"to_each_site": sent_bytes, "from_site": reply_bytes},
                       seconds={"wire_and_clients": round(wire_seconds, 3), "aggregate": round(aggregate_seconds, 3)})
        history.append(metrics)
        bundle_start = time.perf_counter()

        final = server_round == settings.rounds
        variants = {}
        if final:
            if settings.strategy == "fedavg":
                for update in updates:
                    update.batchnorm = update.partition.get(PARTITION_BATCHNORM)
            variants = batchnorm_variants(updates, settings.weighting)
        default = settings.default_batchnorm
        if default == "auto":
            default = "model" if settings.strategy == "fedavg" else ("averaged" if variants else "adapt")
        load_partition_into_model(model, strategy.current)
        provenance = {
            "kind": "federated",
            "mode": mode,
            "strategy": settings.strategy,
            "weighting": settings.weighting,
            "round": server_round,
            "rounds": settings.rounds,
            "local_epochs": settings.local_epochs,
            "lr": settings.lr,
            "sites": sorted(sites),
            "organs_per_site": dict(sorted(sites.items())),
            "share_final_batchnorm": settings.share_final_batchnorm,
            "batchnorm_source": (
                "averaged by FedAvg every round" if settings.strategy == "fedavg"
                else "shared once by each site with its final-round reply" if variants
                else "initial (FedBN keeps BatchNorm on site); re-estimate at inference (adapt)"
            ),
            "lineage": lineage,
            "seed": settings.seed,
            "started": started,
            "finished": _now(),
            "segviz_version": __version__,
            "flower_version": _flower_version(),
        }
        training = {**settings.training, "local_epochs": settings.local_epochs, "lr": settings.lr}
        # A round's own bundle holds its time up to writing; the next bundles hold the full time.
        metrics["seconds"]["round"] = round(time.perf_counter() - round_start, 3)
        path = out_dir / round_bundle_name(server_round)
        if final:
            final_path = save_bundle(final_path, model, settings.preprocessing, provenance=provenance,
                                     batchnorm_variants=variants, default_batchnorm=default, metrics={"rounds": history},
                                     training=training, force=True)
            writer.submit(shutil.copyfile, final_path, path)
        else:
            # Written while the sites train the next round: compressing ~20 MB of weights takes
            # seconds that need not hold up the federation.
            snapshot = copy.deepcopy(model)
            writer.submit(save_bundle, path, snapshot, settings.preprocessing, provenance=provenance,
                          batchnorm_variants=variants, default_batchnorm=default, metrics={"rounds": copy.deepcopy(history)},
                          training=training, force=True)
        metrics["seconds"]["bundle"] = round(time.perf_counter() - bundle_start, 3)
        metrics["seconds"]["round"] = round(time.perf_counter() - round_start, 3)
        writer.check()
        reporter.emit("round_finished", round=server_round, rounds=settings.rounds, metrics=_flat_metrics(metrics), bundle=str(path))
    return final_path


class _BundleWriter:
    """Writes round bundles on a background thread; errors surface at the next check/close."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segviz-bundle")
        self._futures: list = []

    def submit(self, fn, *args, **kwargs) -> None:
        self._futures.append(self._pool.submit(fn, *args, **kwargs))

    def check(self) -> None:
        """Raise the error of any finished write."""
        for future in [f for f in self._futures if f.done()]:
            self._futures.remove(future)
            future.result()

    def close(self) -> None:
        """Wait for every write and raise the first error."""
        self._pool.shutdown(wait=True)
        for future in self._futures:
            future.result()
        self._futures.clear()


def _record_bytes(content) -> int:
    """Payload bytes of a message's records (arrays, metrics, config)."""
    records = [*content.array_records.values(), *content.metric_records.values(), *content.config_records.values()]
    return int(sum(record.count_bytes() for record in records))


def update_site(reply: Message) -> str:
    """The site name a reply carries."""
    return str(reply.content.config_records["site"]["name"])


def _flower_version() -> str:
    from flwr import __version__ as version

    return version


def make_server_app(settings: FederationSettings, reporter: ProgressReporter | None = None,
                    on_round: Callable[[int, list[Message], dict], None] | None = None,
                    result: dict | None = None) -> ServerApp:
    """A ServerApp with its settings bound in Python (simulation: the run config is empty there).

    Args:
        settings: the run's settings.
        reporter: progress events.
        on_round: see :func:`run_federation`.
        result: if given, receives ``{"model": final bundle path}``.
    """
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        path = run_federation(grid, settings, reporter, on_round=on_round, mode="simulation")
        if result is not None:
            result["model"] = path

    return server


# Deployment: settings from the run config ([tool.flwr.app.config] + `flwr run --run-config`),
# progress as JSON lines in <out-dir>/progress.jsonl (`segviz federation run` relays it).
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation configured by ``context.run_config``."""
    settings = FederationSettings.from_run_config(context.run_config)
    stream = None
    if settings.out_dir:
        Path(settings.out_dir).mkdir(parents=True, exist_ok=True)
        stream = open(Path(settings.out_dir) / PROGRESS_FILE, "a", encoding="utf-8")
    reporter = ProgressReporter("json", stream=stream) if stream else ProgressReporter("none")
    try:
        run_federation(grid, settings, reporter, mode="deployment")
    except Exception as error:
        reporter.emit("error", message=str(error))
        raise
    finally:
        if stream:
            stream.close()
