"""Head-aware federated aggregation (FedBN and FedAvg) over the SegViz parameter partition.

The partition (``shared`` / ``batchnorm`` / ``head:<organ>``) comes from
:func:`SegVizLogic.network.partition_state`; this module never re-derives it. Everything here
except :class:`SegVizStrategy` is a pure function over ``{group: {state key: numpy array}}``
dicts, so the rules are unit-testable without Flower:

- ``shared`` is averaged over every reply;
- ``head:<organ>`` is averaged only over the replies of sites that annotate that organ (a
  site that never saw a liver label must not drag the liver head towards its untrained copy);
  a head nobody trained this round keeps its previous global value;
- ``batchnorm`` is averaged over every reply under FedAvg, and under FedBN never leaves the
  client during training, so the global training model keeps its initial BatchNorm.

Weights are the replies' example counts (``weighting="examples"``, each capped at
:data:`EXAMPLES_CAP_FACTOR` times the round's lower-median count so one site cannot claim the
average: :func:`capped_example_counts`) or equal (``weighting="uniform"``, what the SegViz
paper used). The ServerApp applies these rules to each reply as it arrives, with running sums
(:mod:`~SegVizLogic.federated.aggregation`); there the cap's reference is the run's count book,
not the round's counts (that module's docstring says where the two differ).

The coordinator checks every reply before it averages anything (:func:`check_update`,
:func:`screen_updates`): finite tensors with the global model's keys, shapes and dtypes, only
the heads of the organs the site declared, a plausible example count. A rejected reply is
logged with the site and the reason, recorded in the round's metrics, and left out.

For inference at a site that never trained, :func:`batchnorm_variants` builds the BatchNorm
sets a model bundle carries (``averaged``, ``organ:<organ>``, ``site:<name>``) from the
BatchNorm each client shares once, with its final-round reply (see
``SegVizLogic.federated.server_app``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np

from ..network import HEAD_PREFIX, PARTITION_BATCHNORM, PARTITION_SHARED
from ..organs import ORGAN_NAMES
from . import AVERAGED_BATCHNORM_RECORD, FINAL_BATCHNORM_RECORD

__all__ = [
    "FINAL_BATCHNORM_RECORD",
    "HEAD_AGGREGATIONS",
    "STRATEGIES",
    "WEIGHTINGS",
    "Partition",
    "SegVizStrategy",
    "SiteUpdate",
    "aggregate_updates",
    "batchnorm_variants",
    "capped_example_counts",
    "check_update",
    "groups_sent_to_clients",
    "head_contributions",
    "reply_weights",
    "round_metrics",
    "screen_updates",
    "update_from_content",
    "weighted_average",
]

STRATEGIES = ("fedbn", "fedavg")
WEIGHTINGS = ("examples", "uniform")
HEAD_AGGREGATIONS = ("annotating", "evidence")

EXAMPLES_CAP_FACTOR = 3
"""Under ``weighting = "examples"`` no site counts more than this many times the round's
lower-median example count (:func:`capped_example_counts`)."""

MAX_EXAMPLES = 1_000_000
"""More training cases than this in one reply is implausible for one hospital: rejected."""

Partition = dict[str, dict[str, np.ndarray]]
"""``{group: {state-dict key: numpy array}}`` as :func:`~SegVizLogic.network.partition_state` returns it."""


@dataclass
class SiteUpdate:
    """One site's reply to a training round.

    Args:
        site: the site's name (from its ``site.json``).
        organs: organs the site annotated (its trained heads).
        num_examples: training cases used this round (the ``examples`` weight).
        partition: the groups the site sent: ``shared``, its ``head:<organ>`` groups, and
            ``batchnorm`` under FedAvg.
        metrics: scalar metrics (loss, validation Dice per organ, timings).
        batchnorm: the site's BatchNorm when it shared it (final round of FedBN), else ``None``.
    """

    site: str
    organs: tuple[str, ...]
    num_examples: int
    partition: Partition
    metrics: dict[str, float] = field(default_factory=dict)
    batchnorm: dict[str, np.ndarray] | None = None


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def reply_weights(num_examples: Sequence[int], weighting: str) -> np.ndarray:
    """Normalised aggregation weights of replies.

    Args:
        num_examples: example count of each reply.
        weighting: ``"examples"`` (proportional to the counts) or ``"uniform"`` (equal).

    Returns:
        float64 weights summing to 1.

    Raises:
        ValueError: unknown weighting, no replies, or all counts zero under ``"examples"``.

    Example::

        reply_weights([10, 30], "examples")  # -> array([0.25, 0.75])
    """
    _check_choice("weighting", weighting, WEIGHTINGS)
    if len(num_examples) == 0:
        raise ValueError("no replies to weight")
    if weighting == "uniform":
        return np.full(len(num_examples), 1.0 / len(num_examples))
    counts = np.asarray(num_examples, dtype=np.float64)
    if np.any(counts < 0) or counts.sum() <= 0:
        raise ValueError(f"example counts must be non-negative with a positive sum, got {list(num_examples)}")
    counts = capped_example_counts(counts)
    return counts / counts.sum()


def capped_example_counts(num_examples: Sequence[float]) -> np.ndarray:
    """Example counts with what one site can claim capped: at most
    :data:`EXAMPLES_CAP_FACTOR` (3) times the round's *lower median* count.

    A site's count is its own word; the cap bounds what one over-claiming site can take of the
    average (e.g. counts 10 and 10**6 weigh 10 and 30: 25 % and 75 %, not 0.001 % and 99.999 %)
    while leaving honest, moderately unequal sites as they are. The lower median (the smaller
    middle value) is used so the rule also binds with two sites, where the median would be
    the mean and so follow the over-claim.

    Example::

        capped_example_counts([10, 20, 1000])  # -> array([10., 20., 60.])
    """
    counts = np.asarray(num_examples, dtype=np.float64)
    if counts.size == 0:
        return counts
    lower_median = float(np.sort(counts)[(counts.size - 1) // 2])
    return np.minimum(counts, EXAMPLES_CAP_FACTOR * lower_median) if lower_median > 0 else counts


def _shapes_match(got: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    # Flower ships 0-d tensors (BatchNorm's num_batches_tracked) as shape (1,).
    return got == expected or (len(got) <= 1 and len(expected) <= 1 and int(np.prod(got)) == int(np.prod(expected)))


def _check_arrays(label: str, arrays: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> str | None:
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        parts = ([f"missing {missing[:2]}"] if missing else []) + ([f"unexpected {extra[:2]}"] if extra else [])
        return f"{label}: tensors do not match the global model's ({', '.join(parts)})"
    for key, value in arrays.items():
        value, reference = np.asarray(value), np.asarray(expected[key])
        if not _shapes_match(tuple(value.shape), tuple(reference.shape)):
            return f"{label}: {key} has shape {tuple(value.shape)}, the global model {tuple(reference.shape)}"
        if value.dtype.kind not in "fiub" or (value.dtype.kind == "f") != (reference.dtype.kind == "f"):
            return f"{label}: {key} has dtype {value.dtype}, the global model {reference.dtype}"
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            return f"{label}: {key} holds non-finite values (NaN or Inf)"
    return None


def check_update(
    update: SiteUpdate,
    current: Mapping[str, Mapping[str, np.ndarray]],
    strategy: str = "fedbn",
    known_organs: Sequence[str] | None = None,
    extra_heads: Iterable[str] = (),
) -> str | None:
    """Why the coordinator must not average this reply, or ``None`` when it may.

    A reply is rejected when its example count is implausible (not an integer from 1 to
    :data:`MAX_EXAMPLES`), it declares an organ outside the schema or other organs than it
    declared earlier in the run (``known_organs``), it lacks ``shared`` (and ``batchnorm``
    under FedAvg), it sends a group the global model does not have, BatchNorm in a FedBN
    training reply, or the head of an organ it did not declare (``extra_heads`` lists organs
    whose heads every site may send), or any tensor whose keys, shape or dtype differ from the
    global model's or that holds NaN or Inf (its shared final BatchNorm included).

    Args:
        update: the parsed reply.
        current: the global partition sent this round.
        strategy: ``"fedbn"`` or ``"fedavg"``.
        known_organs: what this site declared in an earlier round of the run, if any.
        extra_heads: organs whose heads a site may send without annotating them.

    Example::

        check_update(update, current)  # -> "head:spleen: a head of an organ it did not declare"
    """
    _check_choice("strategy", strategy, STRATEGIES)
    count = update.num_examples
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 1 <= count <= MAX_EXAMPLES:
        return f"implausible example count {count!r} (expected an integer from 1 to {MAX_EXAMPLES})"
    unknown = sorted(set(update.organs) - set(ORGAN_NAMES))
    if unknown or not update.organs:
        return f"declares organs outside the schema: {unknown or 'none'}"
    if known_organs is not None and set(known_organs) != set(update.organs):
        return f"declared {sorted(update.organs)} after {sorted(known_organs)} earlier in this run"
    required = [PARTITION_SHARED] + ([PARTITION_BATCHNORM] if strategy == "fedavg" else [])
    for group in required:
        if group not in update.partition:
            return f"no {group!r} tensors"
    allowed_heads = set(update.organs) | set(extra_heads)
    for group, arrays in update.partition.items():
        if group == PARTITION_BATCHNORM and strategy == "fedbn":
            return "BatchNorm in a FedBN training reply (it stays on site)"
        if group.startswith(HEAD_PREFIX) and group[len(HEAD_PREFIX) :] not in allowed_heads:
            return f"{group}: a head of an organ it did not declare"
        if group not in current:
            return f"{group}: a group the global model does not have"
        problem = _check_arrays(group, arrays, current[group])
        if problem:
            return problem
    if update.batchnorm is not None and PARTITION_BATCHNORM in current:
        problem = _check_arrays("final BatchNorm", update.batchnorm, current[PARTITION_BATCHNORM])
        if problem:
            return problem
    return None


def screen_updates(
    updates: Sequence[SiteUpdate],
    current: Mapping[str, Mapping[str, np.ndarray]],
    strategy: str = "fedbn",
    known_sites: Mapping[str, Sequence[str]] | None = None,
    extra_heads: Iterable[str] = (),
) -> tuple[list[SiteUpdate], dict[str, str]]:
    """Split a round's replies into those to average and those rejected (:func:`check_update`;
    a second reply under a site name already seen this round is rejected too).

    Returns:
        ``(accepted, {site: reason})``.
    """
    known_sites = known_sites or {}
    extra_heads = tuple(extra_heads)
    accepted: list[SiteUpdate] = []
    rejected: dict[str, str] = {}
    for update in updates:
        if any(u.site == update.site for u in accepted) or update.site in rejected:
            rejected[f"{update.site} (again)"] = "a second reply under the same site name this round"
            continue
        reason = check_update(update, current, strategy, known_sites.get(update.site), extra_heads)
        if reason is None:
            accepted.append(update)
        else:
            rejected[update.site] = reason
    return accepted, rejected


def weighted_average(arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Key-wise weighted mean of several ``{key: array}`` dicts with identical keys and shapes.

    Floating tensors are averaged in float64 and cast back to their dtype; integer tensors
    (BatchNorm's ``num_batches_tracked``) are rounded.

    Raises:
        ValueError: the dicts do not hold the same keys and shapes.
    """
    if len(arrays) != len(weights) or not arrays:
        raise ValueError(
            f"need one weight per dict and at least one dict, got {len(arrays)} dicts and {len(weights)} weights"
        )
    keys = list(arrays[0])
    for other in arrays[1:]:
        if set(other) != set(keys):
            missing = sorted(set(keys) ^ set(other))[:3]
            raise ValueError(f"replies hold different tensors (e.g. {missing}); all sites must run the same network")
    out: dict[str, np.ndarray] = {}
    for key in keys:
        first = np.asarray(arrays[0][key])
        total = np.zeros(first.shape, dtype=np.float64)
        for array, weight in zip(arrays, weights):
            array = np.asarray(array[key])
            if array.shape != first.shape:
                raise ValueError(f"tensor {key} has shape {array.shape} in one reply and {first.shape} in another")
            total += float(weight) * array.astype(np.float64)
        out[key] = (
            np.rint(total).astype(first.dtype) if np.issubdtype(first.dtype, np.integer) else total.astype(first.dtype)
        )
    return out


def groups_sent_to_clients(partition: Mapping[str, Mapping[str, np.ndarray]], strategy: str) -> list[str]:
    """Groups of the global model a client receives: everything but ``batchnorm`` under FedBN."""
    _check_choice("strategy", strategy, STRATEGIES)
    return [g for g in partition if strategy == "fedavg" or g != PARTITION_BATCHNORM]


def head_contributions(
    organ: str, updates: Sequence[SiteUpdate], head_aggregation: str, weighting: str
) -> tuple[list[SiteUpdate], np.ndarray]:
    """The replies an organ's head is averaged over, and their weights.

    ``"annotating"``: the sites that annotate the organ, weighted by ``weighting``.
    ``"evidence"``: every site that sent the head (annotating sites, and sites whose exclusion
    term taught it "not this organ" on their own organs' voxels), weighted by the voxels each
    taught it on (``evidence-<organ>`` metric: every voxel of an annotating site's patches, only
    the own-organ voxels of another site's); a head no replying site annotates stays as it is
    under both rules, since "not this organ" alone would only teach it to say no.

    Returns:
        ``(contributors, weights)``; no contributors when the head stays as it is.
    """
    _check_choice("head aggregation", head_aggregation, HEAD_AGGREGATIONS)
    group = HEAD_PREFIX + organ
    annotating = [u for u in updates if organ in u.organs and group in u.partition]
    if not annotating:
        return [], np.zeros(0)
    if head_aggregation == "annotating":
        return annotating, reply_weights([u.num_examples for u in annotating], weighting)
    senders = [u for u in updates if group in u.partition]
    evidence = np.array([float(u.metrics.get(f"evidence-{organ}", 0.0)) for u in senders])
    if not np.all(np.isfinite(evidence)) or np.any(evidence < 0) or evidence.sum() <= 0:
        raise ValueError(f"replies for head {organ!r} carry no usable evidence counts: {evidence.tolist()}")
    return senders, evidence / evidence.sum()


def aggregate_updates(
    current: Mapping[str, Mapping[str, np.ndarray]],
    updates: Sequence[SiteUpdate],
    strategy: str = "fedbn",
    weighting: str = "uniform",
    head_aggregation: str = "annotating",
) -> Partition:
    """The next global model from one round of replies (head-aware FedBN / FedAvg).

    Args:
        current: the global partition sent this round (the fallback for groups nobody trained).
        updates: the round's replies.
        strategy: ``"fedbn"`` (``batchnorm`` stays at ``current``) or ``"fedavg"``
            (``batchnorm`` averaged over all replies).
        weighting: ``"examples"`` or ``"uniform"`` (``shared``, ``batchnorm`` and, under
            ``"annotating"``, the heads).
        head_aggregation: which replies an organ's head is averaged over, with which weights
            (:func:`head_contributions`).

    Returns:
        A new partition with the same groups and keys as ``current``.

    Raises:
        ValueError: no replies, a reply missing ``shared`` (or ``batchnorm`` under FedAvg),
            or tensors that do not match ``current``.
    """
    _check_choice("strategy", strategy, STRATEGIES)
    _check_choice("weighting", weighting, WEIGHTINGS)
    _check_choice("head aggregation", head_aggregation, HEAD_AGGREGATIONS)
    if not updates:
        raise ValueError("cannot aggregate a round without replies")
    averaged_groups = [PARTITION_SHARED] + ([PARTITION_BATCHNORM] if strategy == "fedavg" else [])
    result: Partition = {g: {k: np.array(v, copy=True) for k, v in arrays.items()} for g, arrays in current.items()}
    for group in result:
        if group in averaged_groups:
            contributors = list(updates)
            for update in contributors:
                if group not in update.partition:
                    raise ValueError(f"site {update.site!r} sent no {group!r} tensors")
            weights = reply_weights([u.num_examples for u in contributors], weighting)
        elif group.startswith(HEAD_PREFIX):
            contributors, weights = head_contributions(group[len(HEAD_PREFIX) :], updates, head_aggregation, weighting)
        else:
            continue  # FedBN: the global BatchNorm is never trained by the federation
        if not contributors:
            continue
        averaged = weighted_average([u.partition[group] for u in contributors], weights)
        if set(averaged) != set(result[group]):
            raise ValueError(f"replies' {group!r} tensors do not match the global model's")
        result[group] = averaged
    return result


def batchnorm_variants(updates: Sequence[SiteUpdate], weighting: str = "uniform") -> dict[str, dict[str, np.ndarray]]:
    """BatchNorm sets for inference at a new site, from the BatchNorm the sites shared.

    Returns:
        ``{"averaged": mean over all sites, "organ:<organ>": mean over the sites that
        annotate the organ, "site:<name>": that site's own}``; empty when no site shared
        its BatchNorm. Means follow ``weighting`` like the training aggregation.
    """
    shared = [u for u in updates if u.batchnorm is not None]
    if not shared:
        return {}
    variants: dict[str, dict[str, np.ndarray]] = {}
    weights = reply_weights([u.num_examples for u in shared], weighting)
    variants["averaged"] = weighted_average([u.batchnorm for u in shared], weights)
    for organ in ORGAN_NAMES:
        sites = [u for u in shared if organ in u.organs]
        if sites:
            w = reply_weights([u.num_examples for u in sites], weighting)
            variants[f"organ:{organ}"] = weighted_average([u.batchnorm for u in sites], w)
    for update in shared:
        variants[f"site:{update.site}"] = {k: np.array(v, copy=True) for k, v in update.batchnorm.items()}
    return variants


def round_metrics(updates: Iterable[SiteUpdate]) -> dict:
    """Per-round metrics for bundles and progress.

    Returns:
        ``{"loss": mean site loss, "sites": {site: {metric: value}}, "dice": {organ: mean
        validation Dice over the sites that annotate it}, "num_examples": total}``.
    """
    updates = list(updates)
    sites = {u.site: {k: float(v) for k, v in u.metrics.items()} for u in updates}
    dice: dict[str, float] = {}
    for organ in ORGAN_NAMES:
        values = [
            float(u.metrics[f"dice-{organ}"])
            for u in updates
            if f"dice-{organ}" in u.metrics and np.isfinite(u.metrics[f"dice-{organ}"])
        ]
        if values:
            dice[organ] = float(np.mean(values))
    losses = [float(u.metrics["loss"]) for u in updates if "loss" in u.metrics]
    return {
        "loss": float(np.mean(losses)) if losses else float("nan"),
        "dice": dice,
        "sites": sites,
        "num_examples": int(sum(u.num_examples for u in updates)),
    }


# --- Flower adapter -------------------------------------------------------------------------

try:  # The pure functions above need only numpy; the Strategy class needs flwr.
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy
    from flwr.supercore import log as _flwr_log
except ImportError:  # pragma: no cover - exercised only without flwr
    Strategy = object  # type: ignore[assignment,misc]


class SegVizStrategy(Strategy):  # type: ignore[misc,valid-type]
    """Flower message-API strategy: the head-aware rule of :func:`aggregate_updates`, applied to
    the replies that pass :func:`check_update` one by one as they arrive
    (:mod:`~SegVizLogic.federated.aggregation`: running sums, no round held in memory).

    Messages carry one ``ArrayRecord`` per partition group (record names ``shared``,
    ``head:<organ>``, ``batchnorm``), a ``ConfigRecord`` ``config`` (server → client) or
    ``site`` (client → server: name, organs) and a ``MetricRecord`` ``metrics``. Under FedBN a
    train message also carries :attr:`averaged_batchnorm` when the caller set it (a run resumed
    from a bundle that has it), for sites that join late.

    Args:
        strategy: ``"fedbn"`` or ``"fedavg"``.
        weighting: ``"examples"`` or ``"uniform"``.
        min_clients: nodes required before a round starts and replies required to aggregate.
        head_aggregation: ``"annotating"`` or ``"evidence"`` (:func:`head_contributions`).
    """

    def __init__(
        self,
        strategy: str = "fedbn",
        weighting: str = "uniform",
        min_clients: int = 2,
        head_aggregation: str = "annotating",
    ) -> None:
        _check_choice("strategy", strategy, STRATEGIES)
        _check_choice("weighting", weighting, WEIGHTINGS)
        _check_choice("head aggregation", head_aggregation, HEAD_AGGREGATIONS)
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        self.strategy = strategy
        self.weighting = weighting
        self.min_clients = min_clients
        self.head_aggregation = head_aggregation
        self.current: Partition = {}
        self.averaged_batchnorm: dict[str, np.ndarray] | None = None
        self.last_updates: list[SiteUpdate] = []
        self.last_errors: list[str] = []
        self.last_rejected: dict[str, str] = {}
        self.last_nodes: dict[int, str] = {}
        self.known_sites: dict[str, tuple[str, ...]] = {}
        self.count_book: dict[str, int] = {}  # latest accepted example count per site (streaming cap)
        self.transfer_dtype = "float32"  # the shared body on the wire (transfer.py)
        self.extra_heads: tuple[str, ...] = ()
        self.privacy = None  # a privacy.DifferentialPrivacy: clip-checked replies, noised averages
        self.noise_rng = np.random.default_rng()

    def summary(self) -> None:
        """Log the strategy's settings."""
        _flwr_log(INFO, "\tSegViz %s, weighting %s, min clients %d", self.strategy, self.weighting, self.min_clients)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """One train message per connected node with the global groups and ``config``.

        ``arrays`` is ignored: the global model is the partition in :attr:`current`
        (set by the caller); every group travels in one packed record (``transfer.put_groups``).
        The shared body goes in :attr:`transfer_dtype`; the ServerApp then trains a sample of these nodes.
        """
        from .transfer import for_transfer, put_groups

        node_ids = sorted(grid.get_node_ids())
        content = RecordDict()
        groups = {
            group: for_transfer(group, self.current[group], self.transfer_dtype)
            for group in groups_sent_to_clients(self.current, self.strategy)
        }
        if self.strategy == "fedbn" and self.averaged_batchnorm is not None:
            # For a site without BatchNorm of its own in this lineage (one joining late).
            groups[AVERAGED_BATCHNORM_RECORD] = self.averaged_batchnorm
        put_groups(content, groups)
        config = ConfigRecord(dict(config))
        config["server-round"] = server_round
        content["config"] = config
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id) for node_id in node_ids]

    def start_round(self, final_round: bool = False):
        """A :class:`~SegVizLogic.federated.aggregation.RoundAggregator` for this round's replies,
        over :attr:`current` and the run's sites, counts and privacy (add replies as they arrive,
        then :meth:`finish_round`)."""
        from .aggregation import RoundAggregator

        return RoundAggregator(
            self.current,
            self.strategy,
            self.weighting,
            known_sites=self.known_sites,
            count_book=self.count_book,
            extra_heads=self.extra_heads,
            privacy=self.privacy,
            head_aggregation=self.head_aggregation,
            final_round=final_round,
        )

    def finish_round(self, server_round: int, aggregator) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Take the round's result into :attr:`current` when at least ``min_clients`` replies
        were accepted, and record :attr:`last_updates` (accepted, without tensors),
        :attr:`last_errors` (the sites' own failures), :attr:`last_rejected` (``{site: reason}``,
        each also logged) and :attr:`last_nodes`."""
        aggregator.flush()  # replies held back for the examples cap are accepted replies too
        updates = aggregator.accepted
        self.last_updates, self.last_errors = updates, aggregator.errors
        self.last_rejected, self.last_nodes = aggregator.rejected, aggregator.nodes
        for error in self.last_errors:
            _flwr_log(WARNING, "round %d: a site failed: %s", server_round, error)
        for site, reason in self.last_rejected.items():
            _flwr_log(WARNING, "round %d: rejected the reply of %s: %s", server_round, site, reason)
        if len(updates) < self.min_clients:
            return None, None
        self.current = aggregator.result(self.noise_rng)
        metrics = round_metrics(updates)
        flat = {"loss": metrics["loss"], "num-examples": metrics["num_examples"]}
        flat.update({f"dice-{o}": v for o, v in metrics["dice"].items()})
        flat_arrays = {k: v for arrays in self.current.values() for k, v in arrays.items()}
        return _arrays_to_record(flat_arrays), MetricRecord(flat)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply and aggregate the accepted ones into :attr:`current`
        (:meth:`start_round`, each reply, :meth:`finish_round`): Flower's batch interface over
        the streaming aggregation the ServerApp uses as replies arrive."""
        aggregator = self.start_round()
        for reply in replies:
            aggregator.add_reply(reply)
        return self.finish_round(server_round, aggregator)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """No separate evaluation round: validation Dice comes with each training reply."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None


def _arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    from .transfer import arrays_to_record

    return arrays_to_record(arrays)


def update_from_content(content: RecordDict) -> SiteUpdate:
    """Parse a client's reply content into a :class:`SiteUpdate` (the example count is kept
    as sent, so :func:`check_update` can judge it).

    Raises:
        ValueError: the reply lacks its ``site`` or ``metrics`` record.
    """
    if "site" not in content.config_records or "metrics" not in content.metric_records:
        raise ValueError("a reply lacks its 'site' or 'metrics' record (is every site running SegViz?)")
    site = content.config_records["site"]
    metrics = content.metric_records["metrics"]
    partition: Partition = {}
    batchnorm = None
    from .transfer import content_groups

    for name, arrays in content_groups(content).items():
        if name == FINAL_BATCHNORM_RECORD:
            batchnorm = arrays
        else:
            partition[name] = arrays
    return SiteUpdate(
        site=str(site["name"]),
        organs=tuple(str(o) for o in site["organs"]),
        num_examples=_example_count(metrics["num-examples"]),
        partition=partition,
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        batchnorm=batchnorm,
    )


def _example_count(value) -> int | float:
    """An integral count as ``int``; anything else unchanged, for :func:`check_update` to refuse."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
