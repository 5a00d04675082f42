"""SegViz ClientApp: one hospital site trains the organs it annotated and keeps its BatchNorm.

In a real federation Flower starts a new ``flwr-clientapp`` process for every message, and
importing torch and MONAI alone takes seconds. ``segviz federation join`` therefore keeps a
warm *site worker* (torch imported, site data loaded) in its own process; this module imports
only Flower and numpy, and hands the round to that worker over an authenticated local
connection when one is running (:data:`WORKER_FILE`), training in-process otherwise
(simulation, or a SuperNode started by hand).
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import PARTITION_ID_KEY, ErrorCode

from .. import __version__
from ..errors import SegVizInputError
from ..progress import ProgressReporter
from . import FINAL_BATCHNORM_RECORD, LOCAL_STATE_DIR
from .privacy import dp_clipping_mod
from .site_failures import SiteRoundError, failure_category, site_name_for_reports
from .transfer import content_groups, for_transfer, put_groups

__all__ = [
    "ERRORS_FILE",
    "EVENTS_FILE",
    "SHARE_FINAL_BATCHNORM_KEY",
    "THRESHOLD_RECORD",
    "WORKER_FILE",
    "app",
    "handle_threshold_question",
    "handle_train",
    "make_client_app",
    "run_site_round",
    "site_consents_to_share_batchnorm",
    "site_dir_from_context",
]

EVENTS_FILE = "events.jsonl"
WORKER_FILE = "worker.json"
ERRORS_FILE = "errors.log"
THRESHOLD_RECORD = "threshold-validation"
"""Metric record of a site's answer to the threshold question: ``"<batchnorm>|<threshold>|<organ>|dice-sum"``
and ``"<batchnorm>|<threshold>|<organ>|count"`` (:func:`handle_threshold_question`)."""
SHARE_FINAL_BATCHNORM_KEY = "share-final-batchnorm"
"""Node config key of the site's consent to send its final BatchNorm (``segviz federation join
--share-final-batchnorm``). Absent (simulation): the coordinator's ``share-final-batchnorm`` decides."""


def site_dir_from_context(context: Context) -> Path:
    """The site folder of this SuperNode: ``--node-config site-dir=...``.

    Raises:
        SegVizInputError: the node was started without ``site-dir``.
    """
    site_dir = context.node_config.get("site-dir")
    if not site_dir:
        raise SegVizInputError(
            None, "this SuperNode has no site folder: start it with `segviz federation join --site DIR`"
        )
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


@contextmanager
def _event_reporter(events: Path | None) -> Iterator[ProgressReporter | None]:
    if events is None:
        yield None
        return
    with open(events, "a", encoding="utf-8") as stream:
        yield _EventFileReporter(stream)


def run_site_round(
    site_dir: Path, groups: dict, config: dict, state: RecordDict | None, events: Path | None, device: str
) -> dict:
    """Train one round in this process (what the site worker runs, and the fallback).

    Returns:
        ``{"site", "organs", "partition", "metrics", "final_batchnorm"}`` (plain data).
    """
    from .task import train_client_round

    with _event_reporter(events) as reporter:
        result = train_client_round(site_dir, groups, config, state=state, reporter=reporter, device=device)
    return {
        "site": result.site,
        "organs": list(result.organs),
        "partition": result.partition,
        "metrics": result.metrics,
        "final_batchnorm": result.final_batchnorm,
    }


def _worker_address(site_dir: Path) -> dict | None:
    try:
        info = json.loads((site_dir / LOCAL_STATE_DIR / WORKER_FILE).read_text(encoding="utf-8"))
        os.kill(int(info["pid"]), 0)
        return info
    except (OSError, ValueError, KeyError):
        return None


def _train(site_dir: Path, groups: dict, config: dict, context: Context, events: Path | None, device: str) -> dict:
    info = _worker_address(site_dir) if events is not None else None
    if info is not None:
        from multiprocessing.connection import Client

        try:
            connection = Client(("127.0.0.1", int(info["port"])), authkey=bytes.fromhex(info["authkey"]))
        except OSError:
            connection = None  # a stale worker file: train here
        if connection is not None:
            with connection:
                connection.send(
                    {
                        "site_dir": str(site_dir),
                        "groups": groups,
                        "config": config,
                        "state": context.state,
                        "events": str(events),
                        "device": device,
                    }
                )
                status, payload = connection.recv()
            if status != "ok":
                raise SiteRoundError(payload["category"], payload["detail"])
            state = payload.pop("state")
            for name in list(state.keys()):
                context.state[name] = state[name]
            return payload
    return run_site_round(site_dir, groups, config, context.state, events, device)


def site_consents_to_share_batchnorm(context: Context) -> bool:
    """Whether this site agreed to send its final-round BatchNorm (node config
    :data:`SHARE_FINAL_BATCHNORM_KEY`; absent, as in simulation, means yes: the coordinator's
    ``share-final-batchnorm`` then decides alone)."""
    value = context.node_config.get(SHARE_FINAL_BATCHNORM_KEY, True)
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def _keep_failure_on_site(site_dir: Path, events: Path | None, server_round: int, detail: str) -> None:
    """The full story of a failed round, for the site's own people only."""
    folder = site_dir / LOCAL_STATE_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ERRORS_FILE, "a", encoding="utf-8") as log:
            log.write(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} round {server_round}\n{detail}\n")
    except OSError:
        pass  # an unwritable site folder must not turn the failure report itself into a crash
    with _event_reporter(events) as reporter:
        if reporter:
            reporter.emit("error", message=f"round {server_round}: {detail.strip().splitlines()[-1]}")


def handle_train(
    message: Message, context: Context, site_dir: Path, events: Path | None = None, device: str | None = None
) -> Message:
    """Answer one train message: train the site and reply with what may leave it.

    Args:
        message: the server's train message (every group in one packed ``ArrayRecord``, ``config``).
        context: this node's context (its ``state`` keeps the site's BatchNorm during a run).
        site_dir: the site folder.
        events: JSON-lines file for progress events (``segviz federation join`` relays it).
        device: training device; default: node config ``device``, else ``$SEGVIZ_DEVICE``, else auto.
    """
    started = time.perf_counter()
    server_round, coordinator_version = 0, __version__
    try:
        if device is None:
            device = str(context.node_config.get("device", os.environ.get("SEGVIZ_DEVICE", "auto")))
        config = dict(message.content.config_records["config"])
        server_round, rounds = int(config["server-round"]), int(config["num-server-rounds"])
        coordinator_version = str(config.get("segviz-version", __version__))
        if coordinator_version.split(".")[:2] != __version__.split(".")[:2]:
            raise ValueError(f"the coordinator runs SegViz {coordinator_version} and this site SegViz {__version__}")
        with _event_reporter(events) as reporter:
            if reporter:
                reporter.emit("round_started", round=server_round, rounds=rounds)
        groups = content_groups(message.content)
        result = _train(site_dir, groups, config, context, events, device)
    except Exception as error:  # noqa: BLE001 - every failure becomes a fixed category for the coordinator
        detail = error.detail if isinstance(error, SiteRoundError) else traceback.format_exc()
        _keep_failure_on_site(site_dir, events, server_round, detail)
        category = failure_category(error, __version__, coordinator_version)
        # What the coordinator sees: the site's name and a fixed sentence, never a path or a file name.
        reason = f"{site_name_for_reports(site_dir)}: {category}"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
    # The shared body goes back in the dtype the coordinator sent it in (transfer.py).
    transfer_dtype = str(config.get("transfer-dtype", "float32"))
    groups = {name: for_transfer(name, arrays, transfer_dtype) for name, arrays in result["partition"].items()}
    if result["final_batchnorm"] is not None:
        if site_consents_to_share_batchnorm(context):
            groups[FINAL_BATCHNORM_RECORD] = result["final_batchnorm"]
        else:
            with _event_reporter(events) as reporter:
                if reporter:
                    reporter.emit(
                        "stage",
                        stage="batchnorm",
                        message="the coordinator asked for this site's final BatchNorm; not sent (not agreed)",
                    )
    content = RecordDict()
    put_groups(content, groups)
    metrics: dict[str, Any] = dict(result["metrics"])
    # Time in this handler (data, model, training, packing): the rest of a round is Flower's.
    metrics["client-seconds"] = time.perf_counter() - started
    content["metrics"] = MetricRecord(metrics)
    content["site"] = ConfigRecord({"name": result["site"], "organs": list(result["organs"])})
    with _event_reporter(events) as reporter:
        if reporter:
            reporter.emit("update_sent", round=server_round, num_examples=int(metrics["num-examples"]))
            reporter.emit(
                "round_finished",
                round=server_round,
                rounds=rounds,
                metrics={k: v for k, v in metrics.items() if k == "loss" or k.startswith("dice-")},
            )
            if server_round >= rounds and not config.get("choose-threshold", False):
                reporter.emit("run_finished", rounds=rounds, outputs={})
    return Message(content=content, reply_to=message)


def _run_finished(events: Path | None, rounds: int) -> None:
    """The site's part of the run is over (after the threshold question, when one follows the final round)."""
    with _event_reporter(events) as reporter:
        if reporter:
            reporter.emit("run_finished", rounds=rounds, outputs={})


def handle_threshold_question(
    message: Message, context: Context, site_dir: Path, events: Path | None = None, device: str | None = None
) -> Message:
    """Answer the coordinator's evaluate message after the final round: the final model (a bundle,
    ``bundle`` record) scored on this site's held-out validation cases with each candidate BatchNorm at
    each candidate threshold.

    Only scalars leave the site: per BatchNorm, threshold and annotated organ the sum of the cases'
    Dice and the number of cases (:data:`THRESHOLD_RECORD`, keys ``"<batchnorm>|<threshold>|<organ>|dice-sum"``
    and ``"...|count"``), and the site's name and organs. A failure answers with
    a fixed sentence, as a failed round does; the site's own log keeps the details.
    """
    from .task import score_thresholds_on_site

    server_round, coordinator_version = 0, __version__
    try:
        if device is None:
            device = str(context.node_config.get("device", os.environ.get("SEGVIZ_DEVICE", "auto")))
        config = dict(message.content.config_records["config"])
        server_round = int(config["server-round"])
        coordinator_version = str(config.get("segviz-version", __version__))
        if coordinator_version.split(".")[:2] != __version__.split(".")[:2]:
            raise ValueError(f"the coordinator runs SegViz {coordinator_version} and this site SegViz {__version__}")
        candidates = [float(t) for t in config["threshold-candidates"]]
        if not 0 < len(candidates) <= 20 or not all(0.0 < t < 1.0 for t in candidates):
            raise ValueError(f"threshold candidates must be 1-20 numbers in (0, 1), got {candidates}")
        batchnorms = [str(b) for b in config["batchnorm-candidates"]]
        if not 0 < len(batchnorms) <= 4 or any("|" in b for b in batchnorms):
            raise ValueError(f"BatchNorm candidates must be 1-4 names, got {batchnorms}")
        training = json.loads(str(config.get("training-config") or "{}"))
        bundle_bytes = message.content.config_records["bundle"]["bundle"]
        if not isinstance(bundle_bytes, bytes):
            raise TypeError("the final model did not come as bytes")
        with _event_reporter(events) as reporter:
            if reporter:
                reporter.emit("stage", stage="threshold", message="scoring the final model on the validation cases")
            site, tally = score_thresholds_on_site(
                site_dir, bundle_bytes, training, candidates, device, reporter, batchnorms
            )
    except Exception as error:  # noqa: BLE001 - every failure becomes a fixed category for the coordinator
        _keep_failure_on_site(site_dir, events, server_round, traceback.format_exc())
        _run_finished(events, server_round)
        category = failure_category(error, __version__, coordinator_version)
        reason = f"{site_name_for_reports(site_dir)}: {category}"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
    _run_finished(events, server_round)
    scores: dict[str, Any] = {}
    for batchnorm, by_threshold in tally.items():
        for threshold, organs in by_threshold.items():
            for organ, (dice_sum, cases) in organs.items():
                scores[f"{batchnorm}|{threshold:g}|{organ}|dice-sum"] = float(dice_sum)
                scores[f"{batchnorm}|{threshold:g}|{organ}|count"] = int(cases)
    organs_scored = sorted({organ for by_threshold in tally.values() for o in by_threshold.values() for organ in o})
    content = RecordDict(
        {THRESHOLD_RECORD: MetricRecord(scores), "site": ConfigRecord({"name": site, "organs": organs_scored})}
    )
    return Message(content=content, reply_to=message)


# Deployment: one SuperNode per site, ``flower-supernode --node-config 'site-dir="..."'``.
# With differential privacy the site clips its update before it leaves (privacy.py).
app = ClientApp(mods=[dp_clipping_mod])


def _site_and_events(context: Context) -> tuple[Path, Path]:
    """This SuperNode's site folder and the events file ``segviz federation join`` relays."""
    site_dir = site_dir_from_context(context)
    events = site_dir / LOCAL_STATE_DIR / EVENTS_FILE
    events.parent.mkdir(parents=True, exist_ok=True)
    return site_dir, events


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train this SuperNode's site for one round."""
    site_dir, events = _site_and_events(context)
    return handle_train(message, context, site_dir, events=events)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Score the final model on this SuperNode's validation cases at each candidate threshold."""
    site_dir, events = _site_and_events(context)
    return handle_threshold_question(message, context, site_dir, events=events)


def make_client_app(site_dirs: Sequence[str | Path], mods: Sequence = (), device: str = "auto") -> ClientApp:
    """A ClientApp for Flower's simulation engine: virtual node ``partition-id`` i is site i.

    Args:
        site_dirs: one site folder per virtual SuperNode.
        mods: Flower client mods (e.g. to record what leaves each site in tests).
        device: training device of every virtual site.
    """
    sites = [str(Path(s).resolve()) for s in site_dirs]
    simulated = ClientApp(mods=[*mods, dp_clipping_mod])  # clipping innermost: mods see what leaves

    @simulated.train()
    def train_simulated(message: Message, context: Context) -> Message:
        partition = int(context.node_config[PARTITION_ID_KEY])
        return handle_train(message, context, Path(sites[partition]), device=device)

    @simulated.evaluate()
    def evaluate_simulated(message: Message, context: Context) -> Message:
        partition = int(context.node_config[PARTITION_ID_KEY])
        return handle_threshold_question(message, context, Path(sites[partition]), device=device)

    return simulated
