"""SegViz ServerApp: head-aware FedBN/FedAvg rounds and a global model bundle after every round.

BatchNorm and the global bundle
-------------------------------
Under FedBN a site's BatchNorm never leaves it while the federation trains: train messages
carry ``shared`` and the heads only, replies carry ``shared`` and the heads the site taught,
and the global training model keeps its initial BatchNorm. A site that never trained still
needs BatchNorm statistics to segment, so with ``share-final-batchnorm`` (default true, what
SegViz evaluation needs) each site adds its BatchNorm **once**, to its final-round reply,
after training has finished. The server never aggregates it into the training model; it only
builds the bundle's BatchNorm variants from it: ``averaged`` (all sites), ``organ:<organ>``
(sites that annotate the organ) and ``site:<name>``. Per-round bundles before the final round
carry the initial BatchNorm. Every FedBN bundle defaults to
:data:`~SegVizLogic.bundle.FEDBN_DEFAULT_BATCHNORM`, chosen on the sites' validation cases by
the leave-site-out rule of docs/METHOD.md (never on an external set); the shared variants stay
selectable. With ``share-final-batchnorm = false`` no BatchNorm ever leaves a site. Under
FedAvg BatchNorm is averaged every round like ``shared``.

Faults
------
A round pushes its train messages and then pulls replies every second while watching which
destination nodes are still connected (:func:`collect_replies`): a site whose SuperNode
signed off (its join ended) is dropped at once, one that vanished without a word as soon as
Flower marks it offline (no heartbeat for 2 x 30 s in Flower 1.42), never after the whole
``round-timeout``. The round goes on when at least ``min-clients`` usable replies came; its
record (``progress.jsonl`` events ``site_dropped`` / ``reply_rejected`` and the bundle's
round metrics ``dropped`` / ``rejected``) names who dropped out and whose reply was refused.
Each round waits (up to ``wait-timeout``) until ``min-clients`` sites are connected.

A run started with ``resume-from`` (a ``round-NNN.segviz`` this ServerApp wrote) continues
after that round: same lineage (each site restores its own BatchNorm), round numbers, total
rounds and cosine learning-rate schedule, and the earlier rounds' records.

The one way BatchNorm flows to the sites under FedBN: a run resumed from a bundle that has
``averaged`` sends that averaged BatchNorm (already in the bundle every site holds) with each
train message, and a site with no BatchNorm of its own for the lineage (one joining late)
starts from it instead of the initial one.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from .. import __version__
from ..bundle import FEDBN_DEFAULT_BATCHNORM
from ..bundle_manifest import DEFAULT_THRESHOLD
from ..errors import SegVizError
from ..network import build_network, partition_state
from ..progress import ProgressReporter
from .privacy import privacy_report
from .sampling import sample_nodes
from .strategy import SegVizStrategy, SiteUpdate, batchnorm_variants, round_metrics
from .task import FederationSettings, load_partition_into_model, new_lineage

__all__ = [
    "FINAL_BUNDLE",
    "PROGRESS_FILE",
    "app",
    "collect_replies",
    "make_server_app",
    "round_bundle_name",
    "run_federation",
    "threshold_answer",
]

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
            raise SegVizError(
                f"only {connected} of {settings.min_clients} sites connected within {settings.wait_timeout:.0f} s"
            )
        if time.monotonic() - last_report > 10:
            reporter.emit("waiting", message=f"{connected} of {settings.min_clients} sites connected")
            last_report = time.monotonic()
        time.sleep(0.5)


DISCONNECTED = "disconnected: its SuperNode signed off or stopped sending heartbeats"

POLL_SECONDS = 1.0
"""How often the ServerApp pulls replies (each pull is one request to the SuperLink). 0.25 s was
tried for issue 12: on a loaded 2-core machine the SuperLink's SQLite state database (``--database``)
then answered "database is locked" and a run lost its ServerApp, so the interval stays at 1 s."""
CONNECTED_CHECK_SECONDS = 2.0
"""How often it asks which destination nodes are still connected."""


def collect_replies(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    poll: float = POLL_SECONDS,
    on_reply: Callable[[Message], bool] | None = None,
    needed: int | None = None,
    deadline: float = 0.0,
) -> tuple[list[Message], dict[int, str]]:
    """Push ``messages`` and pull their replies until every destination replied, went away,
    or was left behind by the round's deadline.

    Unlike ``grid.send_and_receive`` this stops waiting for a node as soon as it is no longer
    connected (``grid.get_node_ids()``; Flower also answers a message to an offline node with
    a ``NODE_UNAVAILABLE`` error reply), so a site that dropped out costs the round seconds
    (its sign-off, or Flower's heartbeat patience), not ``timeout``.

    Args:
        grid: the Flower grid.
        messages: one train message per sampled node.
        timeout: seconds after which every node still pending is given up.
        poll: seconds between pulls.
        on_reply: called with each reply the moment it is pulled and returns whether it was
            usable; the reply is then not kept (the ServerApp sums it and drops it). Without
            it every reply is returned.
        needed: usable replies the round needs (replies when ``on_reply`` is not given).
        deadline: with ``needed``, seconds to wait for the other nodes once ``needed`` usable
            replies came; those still pending then are dropped as late (0: no deadline).

    Returns:
        ``(replies kept, {node id: why it gave no reply})``; error replies other than
        ``NODE_UNAVAILABLE`` go to ``on_reply`` (or among the replies) like any other.
    """
    accepted = {mid for mid in grid.push_messages(messages) if mid}
    # Both grids stamp each pushed message with its id; a message the SuperLink refused has none.
    pending = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id in accepted}
    missing = {
        m.metadata.dst_node_id: "the SuperLink did not accept its message"
        for m in messages
        if m.metadata.message_id not in accepted
    }
    replies: list[Message] = []
    usable = 0
    enough_at: float | None = None
    started = time.monotonic()
    last_check = started
    while pending:
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is None:
                continue
            if reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                missing[node] = DISCONNECTED
            elif on_reply is not None:
                usable += bool(on_reply(reply))
            else:
                replies.append(reply)
                usable += not reply.has_error()
        now = time.monotonic()
        if needed is not None and enough_at is None and usable >= needed:
            enough_at = now
        if not pending:
            break
        if now - last_check >= CONNECTED_CHECK_SECONDS:
            last_check = now
            connected = set(grid.get_node_ids())
            for mid, node in list(pending.items()):
                if node not in connected:
                    del pending[mid]
                    missing[node] = DISCONNECTED
        if pending and deadline > 0 and enough_at is not None and now - enough_at > deadline:
            late = (
                f"late: no reply within the round deadline ({deadline:g} s after the round had {needed} usable replies)"
            )
            missing.update({node: late for node in pending.values()})
            break
        if pending and now - started > timeout:
            missing.update({node: f"no reply within the round timeout ({timeout:.0f} s)" for node in pending.values()})
            break
        if pending:
            time.sleep(poll)
    return replies, missing


def threshold_answer(
    content,
    candidates: list[float],
    batchnorms: list[str],
    sites: dict[str, list[str]],
    node_site: str | None = None,
    max_cases: int | None = None,
):
    """A site's answer to the threshold question, checked:
    ``(site, {batchnorm: {threshold: {organ: (Dice sum, cases)}}})``.

    Every asked (BatchNorm, threshold) pair must be there for each organ the site scored, with a case
    count of 0-10000 (0 to ``max_cases``, the validation cases the site reported while it trained,
    when known) and a Dice sum between 0 and that count; the organs must be ones the site trained (a
    site of this run) or known organs; a node whose site is known (``node_site``, from its training
    replies or its registration) must answer under that name. A site can still lean the choice towards
    one of the candidates: no more.

    Raises:
        ValueError: the answer is malformed or out of range.
    """
    from ..organs import ORGAN_NAMES
    from .client_app import THRESHOLD_RECORD

    if THRESHOLD_RECORD not in content.metric_records or "site" not in content.config_records:
        raise ValueError("no threshold scores in the reply")
    site = str(content.config_records["site"].get("name", ""))
    organs = [str(o) for o in content.config_records["site"].get("organs", [])]
    if node_site is not None and site != node_site:
        raise ValueError(f"answered as {site!r}, but this node is {node_site!r}")
    allowed = sites.get(site, ORGAN_NAMES)
    if not site or any(o not in allowed for o in organs):
        raise ValueError(f"organs {organs} are not organs site {site!r} trained")
    scores = dict(content.metric_records[THRESHOLD_RECORD])
    keys = [(b, t, o) for b in batchnorms for t in candidates for o in organs]
    if set(scores) != {f"{b}|{t:g}|{o}|{kind}" for b, t, o in keys for kind in ("dice-sum", "count")}:
        raise ValueError("the scores do not cover exactly the asked BatchNorm, thresholds and the site's organs")
    limit = 10000 if max_cases is None else max_cases
    tally: dict[str, dict[float, dict[str, tuple[float, int]]]] = {}
    for batchnorm, t, organ in keys:
        dice_sum = float(scores[f"{batchnorm}|{t:g}|{organ}|dice-sum"])
        cases = scores[f"{batchnorm}|{t:g}|{organ}|count"]
        if not isinstance(cases, int) or not 0.0 <= dice_sum <= cases <= 10000:
            raise ValueError(f"Dice sum {dice_sum} over {cases} cases is out of range")
        if cases > limit:
            raise ValueError(f"{cases} cases counted, more than the {limit} validation cases the site holds out")
        tally.setdefault(batchnorm, {}).setdefault(float(t), {})[organ] = (dice_sum, cases)
    return site, tally


def run_federation(
    grid: Grid,
    settings: FederationSettings,
    reporter: ProgressReporter | None = None,
    on_round: Callable[[int, list[Message], dict], None] | None = None,
    mode: str = "deployment",
) -> Path:
    """Run ``settings.rounds`` head-aware rounds over ``grid`` and write the bundles.

    Round bundles are written atomically on a background thread while the sites train the
    next round; ``model.segviz`` (and the last round's bundle) exist when ``run_finished`` is
    reported.

    Args:
        grid: Flower grid (deployment or simulation).
        settings: the run's settings; ``out_dir`` receives ``round-NNN.segviz`` and
            ``model.segviz``.
        reporter: progress events (round_started, update_sent, round_finished, run_finished).
        on_round: called as ``(round, replies, global partition after aggregation)``
            (tests, benchmarks).
        mode: ``"deployment"`` or ``"simulation"`` (provenance). With ``settings.signing_key``
            every bundle is signed before it appears under its name
            (:func:`SegVizLogic.signing.sign_bundle`).

    Returns:
        The final bundle's path.
    """
    return _Federation(grid, settings, reporter or ProgressReporter("none"), on_round, mode).run()


class _Federation:
    """One run of the ServerApp: the global model, the strategy and the history of rounds."""

    def __init__(
        self,
        grid: Grid,
        settings: FederationSettings,
        reporter: ProgressReporter,
        on_round: Callable[[int, list[Message], dict], None] | None,
        mode: str,
    ) -> None:
        from ..signing import load_signing_key
        from ..training import seed_everything

        if not settings.out_dir:
            raise SegVizError(
                "the run has no out-dir: pass --run-config \"out-dir='/path'\" or use `segviz federation run --out`"
            )
        self.grid, self.settings, self.reporter, self.on_round, self.mode = grid, settings, reporter, on_round, mode
        # Loaded now: a bad key fails the run before any round, not after the first bundle.
        self.signing_key = load_signing_key(settings.signing_key) if settings.signing_key else None
        self.out_dir = Path(settings.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(settings.seed)
        self.model = build_network(settings.network)
        self.lineage = new_lineage()
        self.first_round = 1
        self.history: list[dict] = []
        self.sites: dict[str, list[str]] = {}
        self.node_sites: dict[int, str] = {}
        self.strategy = SegVizStrategy(
            settings.strategy, settings.weighting, settings.replies_needed, settings.head_aggregation
        )
        self.strategy.transfer_dtype = settings.transfer_dtype
        if settings.head_aggregation == "evidence":
            # Sites also send the heads their exclusion term taught ("not this organ"), each with
            # its evidence count; the reply checks must let those through.
            self.strategy.extra_heads = tuple(settings.network.organs)
        # DP noise comes from fresh OS entropy, never from the run's seed: the bundle records
        # the seed, and noise anyone can regenerate could be subtracted again.
        self.strategy.privacy = settings.privacy
        self.strategy.noise_rng = np.random.default_rng()
        self.started = _now()
        if settings.resume_from:
            self._resume(Path(settings.resume_from))
        self.strategy.current = partition_state(self.model)
        self.final_path = self.out_dir / FINAL_BUNDLE
        self.writer = _BundleWriter()

    def _resume(self, path: Path) -> None:
        """Continue after the round ``path`` was written: its weights, lineage, round count,
        earlier rounds' records and sites."""
        from ..bundle import load_bundle

        bundle = load_bundle(path)
        provenance = bundle.provenance
        settings = self.settings
        if bundle.network_config != settings.network:
            raise SegVizError(f"{path}: its network differs from this run's network config")
        if provenance.get("kind") != "federated" or "lineage" not in provenance:
            raise SegVizError(f"{path}: not a bundle of a federated run; resume from a round-NNN.segviz of one")
        if provenance.get("strategy") != settings.strategy:
            raise SegVizError(f"{path}: trained with {provenance.get('strategy')}, this run uses {settings.strategy}")
        done = int(provenance.get("round", 0))
        if done >= settings.rounds:
            raise SegVizError(f"{path}: round {done} of {settings.rounds} is already done; nothing to resume")
        self.model.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in bundle.state.items()})
        self.lineage = provenance["lineage"]
        self.first_round = done + 1
        self.history = list(bundle.metrics.get("rounds", []))[:done]
        self.sites = {site: list(organs) for site, organs in provenance.get("organs_per_site", {}).items()}
        self.strategy.known_sites = {site: tuple(organs) for site, organs in self.sites.items()}
        for entry in self.history:  # the example-count cap's reference (aggregation.py)
            for site, site_metrics in entry.get("sites", {}).items():
                if "num-examples" in site_metrics:
                    self.strategy.count_book[site] = int(site_metrics["num-examples"])
        if settings.strategy == "fedbn" and "averaged" in bundle.batchnorm_variants:
            # a site without BatchNorm of this lineage (one joining late) starts from it
            self.strategy.averaged_batchnorm = bundle.batchnorm_variants["averaged"]
        self.started = provenance.get("started", self.started)
        self.reporter.emit(
            "stage", stage="resume", message=f"resuming after round {done} of {settings.rounds} from {path.name}"
        )

    def run(self) -> Path:
        try:
            for server_round in range(self.first_round, self.settings.rounds + 1):
                _wait_for_clients(self.grid, self.settings, self.reporter)
                self._round(server_round)
        finally:
            self.writer.close()
        rounds = self.settings.rounds
        self.reporter.emit(
            "run_finished",
            rounds=rounds,
            outputs={
                "model": str(self.final_path),
                **{
                    f"round_{r}": str(self.out_dir / round_bundle_name(r))
                    for r in range(1, rounds + 1)
                    if (self.out_dir / round_bundle_name(r)).is_file()
                },
            },
        )
        return self.final_path

    def _round(self, server_round: int) -> None:
        settings, strategy = self.settings, self.strategy
        self.reporter.emit("round_started", round=server_round, rounds=settings.rounds)
        round_start = time.perf_counter()
        config = ConfigRecord(settings.client_config(server_round, self.lineage))
        messages = strategy.configure_train(server_round, ArrayRecord(), config, self.grid)
        connected = len(messages)
        sampled = set(
            sample_nodes(
                [m.metadata.dst_node_id for m in messages],
                settings.fraction_train,
                settings.replies_needed,
                settings.seed,
                server_round,
            )
        )
        messages = [m for m in messages if m.metadata.dst_node_id in sampled]
        # Names for a node that drops out before its first reply: the name it was registered
        # under (node authentication); a reply's own site name takes precedence.
        for node in self.grid.get_nodes():
            if getattr(node, "name", ""):
                self.node_sites.setdefault(node.node_id, str(node.name))
        aggregator = strategy.start_round(final_round=server_round == settings.rounds)
        kept: list[Message] = []  # only for the on_round hook (tests, benchmarks)
        reply_bytes: dict[str, int] = {}
        aggregate_seconds = 0.0

        def on_reply(reply: Message) -> bool:
            nonlocal aggregate_seconds
            started = time.perf_counter()
            if self.on_round is not None:
                kept.append(reply)
            usable = aggregator.add_reply(reply)
            if not reply.has_error():
                reply_bytes[aggregator.nodes.get(reply.metadata.src_node_id, f"node {reply.metadata.src_node_id}")] = (
                    _record_bytes(reply.content)
                )
            aggregate_seconds += time.perf_counter() - started
            return usable

        _, missing = collect_replies(
            self.grid,
            messages,
            settings.round_timeout,
            on_reply=on_reply,
            needed=settings.replies_needed,
            deadline=settings.round_deadline,
        )
        wire_seconds = time.perf_counter() - round_start
        aggregate_start = time.perf_counter()
        strategy.finish_round(server_round, aggregator)
        aggregate_seconds += time.perf_counter() - aggregate_start
        self.node_sites.update(strategy.last_nodes)  # replies name their site
        dropped = {self.node_sites.get(node, f"node {node}"): why for node, why in missing.items()}
        for site, why in dropped.items():
            self.reporter.emit("site_dropped", round=server_round, site=site, reason=why)
        for site, why in strategy.last_rejected.items():
            self.reporter.emit("reply_rejected", round=server_round, site=site, reason=why)
        updates: list[SiteUpdate] = strategy.last_updates
        if len(updates) < settings.replies_needed:
            problems = (
                "; ".join(
                    [*strategy.last_errors, *(f"{s}: {w}" for s, w in {**dropped, **strategy.last_rejected}.items())]
                )
                or f"{len(reply_bytes)} of {len(messages)} sites replied in time"
            )
            raise SegVizError(
                f"round {server_round}: only {len(updates)} usable replies, {settings.replies_needed} needed ({problems})"
            )
        for update in updates:
            self.sites[update.site] = list(update.organs)
            self.reporter.emit("update_sent", round=server_round, site=update.site, num_examples=update.num_examples)
        if self.on_round is not None:
            self.on_round(server_round, kept, strategy.current)

        metrics = round_metrics(updates)
        metrics.update(
            round=server_round,
            errors=strategy.last_errors,
            dropped=dropped,
            rejected=dict(strategy.last_rejected),
            sampled={"connected": connected, "trained": len(messages)},
            bytes={
                "to_each_site": _record_bytes(messages[0].content) if messages else 0,
                "from_site": reply_bytes,
            },
            seconds={"wire_and_clients": round(wire_seconds, 3), "aggregate": round(aggregate_seconds, 3)},
        )
        self.history.append(metrics)

        bundle_start = time.perf_counter()
        final = server_round == settings.rounds
        variants = {}
        if final:
            # The aggregator kept each final reply's BatchNorm (FedAvg: its averaged group).
            variants = batchnorm_variants(updates, settings.weighting)
        default = settings.default_batchnorm
        if default == "auto":
            # FedAvg's model BatchNorm is the federation's average; FedBN's is the initial one,
            # so a FedBN bundle gets the default chosen on validation (docs/METHOD.md).
            default = "model" if settings.strategy == "fedavg" else FEDBN_DEFAULT_BATCHNORM
        load_partition_into_model(self.model, strategy.current)
        # A round's own bundle holds its time up to writing; later bundles hold the full time.
        metrics["seconds"]["round"] = round(time.perf_counter() - round_start, 3)
        bundle_args = {
            "provenance": self._provenance(server_round, bool(variants)),
            "batchnorm_variants": variants,
            "default_batchnorm": default,
            "training": {**settings.training, "local_epochs": settings.local_epochs, "lr": settings.lr},
            "force": True,
        }
        path = self.out_dir / round_bundle_name(server_round)
        final_metrics: dict[str, Any] = {"rounds": self.history}
        if final and settings.choose_threshold:
            # Chosen on the sites' validation cases before the final bundle is written (and signed).
            batchnorm, threshold, record = self._threshold_question(server_round, bundle_args)
            final_metrics["threshold_validation"] = record
            # Its own time, not the round's or the bundle's (the round's timings measure the federation).
            metrics["seconds"]["threshold_question"] = record["seconds"]
            round_start += record["seconds"]
            bundle_start += record["seconds"]
            if threshold is not None:
                bundle_args["inference"] = {"threshold": threshold, "threshold_rule": record["rule"]}
                bundle_args["default_batchnorm"] = batchnorm
        if final:
            self.final_path = self._save(self.final_path, self.model, final_metrics, bundle_args)
            self.writer.submit(shutil.copyfile, self.final_path, path)
        else:
            # Written while the sites train the next round: compressing tens of MB of weights
            # takes seconds that need not hold up the federation.
            self.writer.submit(
                self._save, path, copy.deepcopy(self.model), {"rounds": copy.deepcopy(self.history)}, bundle_args
            )
        metrics["seconds"]["bundle"] = round(time.perf_counter() - bundle_start, 3)
        metrics["seconds"]["round"] = round(time.perf_counter() - round_start, 3)
        self.writer.check()
        self.reporter.emit(
            "round_finished",
            round=server_round,
            rounds=settings.rounds,
            metrics=_flat_metrics(metrics),
            bundle=str(path),
        )

    def _threshold_question(self, server_round: int, bundle_args: dict) -> tuple[str, float | None, dict]:
        """Ask every connected site to score the final model on its held-out validation cases with each
        candidate BatchNorm (:func:`~SegVizLogic.threshold_selection.batchnorm_candidates`) at each
        candidate threshold, and choose the pair (:func:`~SegVizLogic.threshold_selection.choose_from_tally`).

        Returns:
            ``(batchnorm, threshold, record)``: the threshold is ``None`` when no site gave a usable
            answer (the bundle keeps its defaults); ``record`` holds the rule, the table, the sites that
            answered, those that did not.
        """
        import tempfile

        from ..bundle import save_bundle
        from ..threshold_selection import (
            THRESHOLD_CANDIDATES,
            batchnorm_candidates,
            choose_from_tally,
            describe_table,
        )

        settings, started = self.settings, time.perf_counter()
        candidates = list(THRESHOLD_CANDIDATES)
        batchnorms = batchnorm_candidates(bundle_args["default_batchnorm"])
        self.reporter.emit(
            "stage", stage="threshold", message="asking the sites to score the final model's BatchNorm and threshold"
        )
        handle, name = tempfile.mkstemp(prefix=".threshold-", suffix=".segviz", dir=self.out_dir)
        os.close(handle)
        try:
            save_bundle(name, self.model, settings.preprocessing, metrics={}, **bundle_args)
            data = Path(name).read_bytes()
        finally:
            Path(name).unlink(missing_ok=True)
        config = ConfigRecord(
            {
                **settings.client_config(server_round, self.lineage),
                "threshold-candidates": candidates,
                "batchnorm-candidates": batchnorms,
            }
        )
        messages = [
            Message(
                content=RecordDict({"bundle": ConfigRecord({"bundle": data}), "config": config}),
                message_type=MessageType.EVALUATE,
                dst_node_id=node,
            )
            for node in sorted(self.grid.get_node_ids())
        ]
        # The same waiting rules as a round: every site up to the round timeout, a site that leaves is
        # dropped at once, and with a round deadline the late ones are left out once min-clients answered.
        replies, missing = collect_replies(
            self.grid,
            messages,
            settings.round_timeout,
            needed=settings.replies_needed,
            deadline=settings.round_deadline,
        )
        # What each site that trained reported holding out (its last training reply): no answer counts more.
        held_out = {
            site: int(site_metrics["num-val-examples"])
            for entry in self.history
            for site, site_metrics in entry.get("sites", {}).items()
            if "num-val-examples" in site_metrics
        }
        tallies, answered, failed = [], [], {}
        for reply in replies:
            node = reply.metadata.src_node_id
            site = self.node_sites.get(node, f"node {node}")
            if reply.has_error():
                failed[site] = reply.error.reason
                continue
            try:
                # A node that trained answers under that site's name (a registered name may differ from it).
                trained_as = site if site in self.sites else None
                site, tally = threshold_answer(
                    reply.content, candidates, batchnorms, self.sites, trained_as, held_out.get(trained_as)
                )
            except ValueError as error:
                failed[site] = f"reply refused: {error}"
                continue
            tallies.append(tally)
            answered.append(site)
        failed.update({self.node_sites.get(node, f"node {node}"): why for node, why in missing.items()})
        record: dict[str, Any] = {
            "candidates": candidates,
            "batchnorm_candidates": batchnorms,
            "sites": sorted(answered),
            "failed": failed,
        }
        batchnorm, threshold = bundle_args["default_batchnorm"], None
        try:
            batchnorm, threshold, table = choose_from_tally(tallies, candidates, batchnorms)
            record["table"] = table
            record["rule"] = (
                f"chosen on {len(answered)} sites' held-out validation cases ({', '.join(sorted(answered))}), "
                f"leave-site-out, among BatchNorm {'/'.join(batchnorms)} and thresholds "
                f"{'/'.join(f'{t:g}' for t in candidates)}: mean Dice {describe_table(table)}"
            )
        except ValueError as error:
            record["rule"] = (
                f"not chosen ({error}); the defaults (BatchNorm {batchnorm}, threshold {DEFAULT_THRESHOLD:g}) are kept"
            )
        record["batchnorm"] = batchnorm
        record["threshold"] = threshold
        record["seconds"] = round(time.perf_counter() - started, 3)
        for site, why in failed.items():
            self.reporter.emit("site_dropped", round=server_round, site=site, reason=f"threshold question: {why}")
        self.reporter.emit(
            "stage",
            stage="threshold",
            message=(
                f"BatchNorm {batchnorm}, organ threshold {threshold:g} ({record['rule']})"
                if threshold is not None
                else record["rule"]
            ),
        )
        return batchnorm, threshold, record

    def _save(self, path: Path, model, metrics: dict, bundle_args: dict) -> Path:
        from ..bundle import save_bundle
        from ..signing import sign_bundle

        if self.signing_key is None:
            return save_bundle(path, model, self.settings.preprocessing, metrics=metrics, **bundle_args)
        # Signed under a temporary name, so no unsigned bundle ever carries the final name.
        unsigned = path.with_name(f".unsigned-{path.name}")
        try:
            save_bundle(unsigned, model, self.settings.preprocessing, metrics=metrics, **bundle_args)
            sign_bundle(unsigned, self.signing_key)
            os.replace(unsigned, path)
        finally:
            unsigned.unlink(missing_ok=True)
        return path

    def _provenance(self, server_round: int, shared_batchnorm: bool) -> dict[str, Any]:
        settings = self.settings
        return {
            "kind": "federated",
            "mode": self.mode,
            "strategy": settings.strategy,
            "weighting": settings.weighting,
            "head_aggregation": settings.head_aggregation,
            "round": server_round,
            "rounds": settings.rounds,
            "local_epochs": settings.local_epochs,
            "lr": settings.lr,
            "transfer_dtype": settings.transfer_dtype,
            "sites": sorted(self.sites),
            "organs_per_site": dict(sorted(self.sites.items())),
            "share_final_batchnorm": settings.share_final_batchnorm,
            "batchnorm_source": (
                "averaged by FedAvg every round"
                if settings.strategy == "fedavg"
                else "shared once by each site with its final-round reply"
                if shared_batchnorm
                else "initial (FedBN keeps BatchNorm on site); re-estimated on the input at inference (adapt)"
            ),
            "lineage": self.lineage,
            "privacy": privacy_report(settings.privacy, server_round, len(self.sites)),
            "seed": settings.seed,
            "started": self.started,
            "finished": _now(),
            "segviz_version": __version__,
            "flower_version": _flower_version(),
        }


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


def _flower_version() -> str:
    from flwr import __version__ as version

    return version


def make_server_app(
    settings: FederationSettings,
    reporter: ProgressReporter | None = None,
    on_round: Callable[[int, list[Message], dict], None] | None = None,
    result: dict | None = None,
) -> ServerApp:
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
    from .processes import exit_when_orphaned

    exit_when_orphaned()  # nothing outlives the SuperLink's SuperExec (see its docstring)
    settings = FederationSettings.from_run_config(context.run_config)
    stream = None
    if settings.out_dir:
        Path(settings.out_dir).mkdir(parents=True, exist_ok=True)
        stream = open(Path(settings.out_dir) / PROGRESS_FILE, "a", encoding="utf-8")  # noqa: SIM115 - closed by stop()/finally
    reporter = ProgressReporter("json", stream=stream) if stream else ProgressReporter("none")
    try:
        run_federation(grid, settings, reporter, mode="deployment")
    except Exception as error:
        reporter.emit("error", message=str(error))
        raise
    finally:
        if stream:
            stream.close()
