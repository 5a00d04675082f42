"""SegViz ClientApp: one hospital site trains the organs it annotated and keeps its BatchNorm."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import PARTITION_ID_KEY

from ..errors import SegVizInputError
from ..progress import ProgressReporter
from .strategy import FINAL_BATCHNORM_RECORD
from .task import local_state_dir, scrub_paths, train_client_round

__all__ = ["app", "make_client_app", "handle_train", "site_dir_from_context", "EVENTS_FILE"]

EVENTS_FILE = "events.jsonl"


def site_dir_from_context(context: Context) -> Path:
    """The site folder of this SuperNode: ``--node-config site-dir=...``.

    Raises:
        SegVizInputError: the node was started without ``site-dir``.
    """
    site_dir = context.node_config.get("site-dir")
    if not site_dir:
        raise SegVizInputError(None, "this SuperNode has no site folder: start it with `segviz federation join --site DIR`")
    return Path(str(site_dir))


class _EventFileReporter(ProgressReporter):
    """JSON-line events into the site's events file.

    Its mode is ``none`` so training validates only after the last local epoch, as it does
    without a reporter; every event still goes to the file.
    """

    def __init__(self, stream) -> None:
        super().__init__("none")
        self._json = ProgressReporter("json", stream=stream)

    def emit(self, event: str, **fields) -> None:
        self._json.emit(event, **fields)


def _record(arrays) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def handle_train(message: Message, context: Context, site_dir: Path, events: Path | None = None, device: str | None = None) -> Message:
    """Answer one train message: train the site and reply with what may leave it.

    Args:
        message: the server's train message (one ``ArrayRecord`` per group, ``config``).
        context: this node's context (its ``state`` keeps the site's BatchNorm during a run).
        site_dir: the site folder.
        events: JSON-lines file for progress events (``segviz federation join`` relays it).
        device: training device; default: node config ``device``, else ``$SEGVIZ_DEVICE``, else auto.
    """
    if device is None:
        device = str(context.node_config.get("device", os.environ.get("SEGVIZ_DEVICE", "auto")))
    started = time.perf_counter()
    config = dict(message.content.config_records["config"])
    server_round, rounds = int(config["server-round"]), int(config["num-server-rounds"])
    stream = open(events, "a", encoding="utf-8") if events else None
    reporter = _EventFileReporter(stream) if stream else None
    try:
        if reporter:
            reporter.emit("round_started", round=server_round, rounds=rounds)
        groups = {name: {k: v.numpy() for k, v in record.items()} for name, record in message.content.array_records.items()}
        try:
            result = train_client_round(site_dir, groups, config, state=context.state, reporter=reporter, device=device)
        except Exception as error:
            if reporter:
                reporter.emit("error", message=f"round {server_round}: {error}")
            # What the coordinator sees: the error without this site's paths.
            raise RuntimeError(scrub_paths(f"{type(error).__name__}: {error}", site_dir)) from None
        content = RecordDict({name: _record(arrays) for name, arrays in result.partition.items()})
        if result.final_batchnorm is not None:
            content[FINAL_BATCHNORM_RECORD] = _record(result.final_batchnorm)
        # Time in this handler (data, model, training, packing): the rest of a round is Flower's.
        result.metrics["client-seconds"] = time.perf_counter() - started
        content["metrics"] = MetricRecord(result.metrics)
        content["site"] = ConfigRecord({"name": result.site, "organs": list(result.organs)})
        if reporter:
            reporter.emit("update_sent", round=server_round, num_examples=int(result.metrics["num-examples"]))
            reporter.emit("round_finished", round=server_round, rounds=rounds,
                          metrics={k: v for k, v in result.metrics.items() if k == "loss" or k.startswith("dice-")})
            if server_round >= rounds:
                reporter.emit("run_finished", rounds=rounds, outputs={})
        return Message(content=content, reply_to=message)
    finally:
        if stream:
            stream.close()


# Deployment: one SuperNode per site, ``flower-supernode --node-config 'site-dir="..."'``.
app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train this SuperNode's site for one round."""
    site_dir = site_dir_from_context(context)
    events = local_state_dir(site_dir) / EVENTS_FILE
    events.parent.mkdir(parents=True, exist_ok=True)
    return handle_train(message, context, site_dir, events=events)


def make_client_app(site_dirs: Sequence[str | Path], mods: Sequence = (), device: str = "auto") -> ClientApp:
    """A ClientApp for Flower's simulation engine: virtual node ``partition-id`` i is site i.

    Args:
        site_dirs: one site folder per virtual SuperNode.
        mods: Flower client mods (e.g. to record what leaves each site in tests).
        device: training device of every virtual site.
    """
    sites = [str(Path(s).resolve()) for s in site_dirs]
    simulated = ClientApp(mods=list(mods))

    @simulated.train()
    def train_simulated(message: Message, context: Context) -> Message:
        partition = int(context.node_config[PARTITION_ID_KEY])
        return handle_train(message, context, Path(sites[partition]), device=device)

    return simulated
