"""Aggregating a round's replies as they arrive: one running weighted sum per parameter group.

The batch rule (:func:`~SegVizLogic.federated.strategy.aggregate_updates`) needs every reply of a
round in memory at once: with the paper network (19.3 MB of shared body per reply) that is 1.9 GB
at 100 sites. :class:`RoundAggregator` checks each reply the moment it is pulled
(:func:`~SegVizLogic.federated.strategy.check_update`, a second reply under the same name, the
DP clip check), adds it to float64 running sums ``sum(w * x)`` and ``sum(w)`` per group, and
drops its tensors; what it keeps of a reply is its name, organs, count and metrics, and in the
final round its BatchNorm (a few kB). The result is the batch rule's, group by group:

- ``shared`` (and ``batchnorm`` under FedAvg): every accepted reply;
- ``head:<organ>``, ``head_aggregation = "annotating"``: only the replies of sites that annotate
  the organ; ``"evidence"``: every reply that sent the head, weighted by the voxels it was
  taught on (its ``evidence-<organ>`` metric), and kept as it was unless a site that annotates
  the organ contributed (``"not this organ"`` alone would only teach it to say no);
- a group nobody contributed to keeps its previous global value; BatchNorm under FedBN never
  enters a sum (it stays on site).

Weights are 1 per reply (``weighting = "uniform"``) or its example count (``"examples"``),
capped at :data:`~SegVizLogic.federated.strategy.EXAMPLES_CAP_FACTOR` times a lower median
(so one site cannot claim the average). The batch rule takes the lower median of the round's
counts, which a running sum cannot know before the round ends. The streaming rule takes it over
the coordinator's *count book*: the latest accepted count of every site heard from in this run
(earlier rounds, and this round's replies so far). While the book holds fewer than
:data:`MIN_COUNTS_FOR_CAP` sites (the first replies of the first round), replies are held back
rather than summed, and summed once the book is large enough or the round ends. So the rule is
the batch rule exactly in a first round of at most three replies, and from the second round on the
reference covers every site that took part so far (counts are a site's number of training
cases, the same every round); in a first round of more than three replies the reference grows
from the first three counts. The memory bound is the running sums plus at most two held replies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import replace

import numpy as np

from ..network import HEAD_PREFIX, PARTITION_BATCHNORM, PARTITION_SHARED
from .strategy import (
    EXAMPLES_CAP_FACTOR,
    HEAD_AGGREGATIONS,
    STRATEGIES,
    WEIGHTINGS,
    Partition,
    SiteUpdate,
    check_update,
    update_from_content,
)

__all__ = [
    "MIN_COUNTS_FOR_CAP",
    "RoundAggregator",
    "RunningWeightedSum",
    "lower_median_cap",
]

MIN_COUNTS_FOR_CAP = 3
"""Under ``weighting = "examples"`` replies are held back until the count book knows this many
sites: the lower median of three counts cannot be set by one over-claiming site."""


def lower_median_cap(counts: Iterable[float]) -> float:
    """The most one site may count for: :data:`EXAMPLES_CAP_FACTOR` times the lower median of
    ``counts`` (``inf`` when there are none or the lower median is 0).

    Example::

        lower_median_cap([10, 20, 1000])  # -> 60.0
    """
    values = np.sort(np.asarray(list(counts), dtype=np.float64))
    if values.size == 0:
        return float("inf")
    lower_median = float(values[(values.size - 1) // 2])
    return EXAMPLES_CAP_FACTOR * lower_median if lower_median > 0 else float("inf")


class RunningWeightedSum:
    """``sum(w * x)`` and ``sum(w)`` over ``{key: array}`` dicts with the keys and shapes of
    ``reference``, in float64.

    Args:
        reference: the global group (keys, shapes and dtypes of the result).

    Example::

        running = RunningWeightedSum({"w": np.zeros(3, np.float32)})
        running.add({"w": np.ones(3, np.float16)}, 1.0)
        running.add({"w": np.full(3, 3.0, np.float32)}, 3.0)
        running.mean()["w"]  # -> array([2.5, 2.5, 2.5], dtype=float32)
    """

    def __init__(self, reference: Mapping[str, np.ndarray]) -> None:
        self.reference = {k: np.asarray(v) for k, v in reference.items()}
        self.sums: dict[str, np.ndarray] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, arrays: Mapping[str, np.ndarray], weight: float) -> None:
        """Add ``weight * arrays`` (any floating dtype; Flower's ``(1,)`` for a 0-d tensor is fine).

        Raises:
            ValueError: other keys, another size, or a weight that is negative or not finite.
        """
        if not np.isfinite(weight) or weight < 0:
            raise ValueError(f"a weight must be finite and >= 0, got {weight}")
        if set(arrays) != set(self.reference):
            different = sorted(set(arrays) ^ set(self.reference))[:3]
            raise ValueError(f"tensors differ from the global model's (e.g. {different})")
        for key, reference in self.reference.items():
            value = np.asarray(arrays[key])
            if value.size != reference.size:
                raise ValueError(f"tensor {key} has shape {value.shape}, the global model {reference.shape}")
            if key not in self.sums:
                self.sums[key] = np.zeros(reference.shape, dtype=np.float64)
            self.sums[key] += value.reshape(reference.shape).astype(np.float64) * float(weight)
        self.total_weight += float(weight)
        self.count += 1

    def mean(self) -> dict[str, np.ndarray]:
        """The weighted mean in the reference's dtypes (integer tensors rounded).

        Raises:
            ValueError: nothing with a positive weight was added.
        """
        if self.total_weight <= 0:
            raise ValueError("no contribution with a positive weight to average")
        out = {}
        for key, reference in self.reference.items():
            mean = self.sums[key] / self.total_weight
            out[key] = (
                np.rint(mean).astype(reference.dtype) if reference.dtype.kind in "iub" else mean.astype(reference.dtype)
            )
        return out


class RoundAggregator:
    """One round's replies, checked and summed as they arrive (see the module docstring).

    Args:
        current: the global partition sent this round.
        strategy: ``"fedbn"`` or ``"fedavg"``.
        weighting: ``"uniform"`` or ``"examples"``.
        known_sites: ``{site: organs}`` declared earlier in the run; accepted sites are added
            (the caller's dict is updated, so it carries over to the next round).
        count_book: ``{site: latest accepted example count}`` of the run (updated in place).
        extra_heads: organs whose heads every site may send (:func:`~.strategy.check_update`).
        privacy: a :class:`~SegVizLogic.federated.privacy.DifferentialPrivacy` to clip-check
            every reply against, and to noise the result with; ``None``: no DP.
        head_aggregation: ``"annotating"`` or ``"evidence"``.
        final_round: keep each accepted reply's BatchNorm (``batchnorm_variants``): under FedBN
            the BatchNorm it shared once, under FedAvg its averaged group.

    Attributes:
        accepted: the accepted replies without their tensors (site, organs, count, metrics,
            final BatchNorm).
        rejected: ``{site: why}`` for refused replies (``node <id>`` when it was unreadable).
        errors: the sites' own failure reports (error replies).
        nodes: ``{node id: site}`` of the replies read this round.
    """

    def __init__(
        self,
        current: Mapping[str, Mapping[str, np.ndarray]],
        strategy: str = "fedbn",
        weighting: str = "uniform",
        known_sites: MutableMapping[str, tuple[str, ...]] | None = None,
        count_book: MutableMapping[str, int] | None = None,
        extra_heads: Iterable[str] = (),
        privacy=None,
        head_aggregation: str = "annotating",
        final_round: bool = False,
    ) -> None:
        for name, value, choices in (
            ("strategy", strategy, STRATEGIES),
            ("weighting", weighting, WEIGHTINGS),
            ("head aggregation", head_aggregation, HEAD_AGGREGATIONS),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        self.current = current
        self.strategy, self.weighting, self.head_aggregation = strategy, weighting, head_aggregation
        self.known_sites = known_sites if known_sites is not None else {}
        self.count_book = count_book if count_book is not None else {}
        self.extra_heads = tuple(extra_heads)
        self.privacy = privacy
        self.final_round = final_round
        self.sums: dict[str, RunningWeightedSum] = {}
        self.annotated_heads: set[str] = set()
        self.accepted: list[SiteUpdate] = []
        self.rejected: dict[str, str] = {}
        self.errors: list[str] = []
        self.nodes: dict[int, str] = {}
        self._held: list[SiteUpdate] = []
        self._seen: set[str] = set()
        self._clip_margin = 0.0
        if privacy is not None:
            # A clipped update re-added to float32 weights is rounded by up to eps/2 per weight.
            self._clip_margin = 1e-6 * float(
                np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for a in current.values() for v in a.values()))
            )

    def add_reply(self, reply) -> bool:
        """Read one Flower reply: an error reply is recorded, a malformed or refused one is named
        in :attr:`rejected`, a usable one is summed (or held, see the module docstring).

        Returns:
            Whether the reply was accepted.
        """
        node = reply.metadata.src_node_id
        if reply.has_error():
            self.errors.append(f"node {node}: {reply.error.reason}")
            return False
        try:
            update = update_from_content(reply.content)
        except (ValueError, KeyError, TypeError) as error:
            self.rejected[f"node {node}"] = f"malformed reply: {error}"
            return False
        self.nodes[node] = update.site
        return self.add(update)

    def add(self, update: SiteUpdate) -> bool:
        """Check one parsed reply and sum it (its tensors are not kept).

        Returns:
            Whether it was accepted.
        """
        reason = self._refusal(update)
        if reason is not None:
            key = f"{update.site} (again)" if update.site in self._seen else update.site
            self.rejected[key] = reason
            self._seen.add(update.site)
            return False
        self._seen.add(update.site)
        self.known_sites.setdefault(update.site, tuple(update.organs))
        self.count_book[update.site] = int(update.num_examples)
        if self.weighting == "examples" and len(self.count_book) < MIN_COUNTS_FOR_CAP:
            self._held.append(update)
        else:
            self.flush()
            self._sum(update)
        return True

    def _refusal(self, update: SiteUpdate) -> str | None:
        if update.site in self._seen:
            return "a second reply under the same site name this round"
        reason = check_update(
            update, self.current, self.strategy, self.known_sites.get(update.site), extra_heads=self.extra_heads
        )
        if reason is not None:
            return reason
        if self.head_aggregation == "evidence":
            for group in update.partition:
                if group.startswith(HEAD_PREFIX):
                    evidence = update.metrics.get(f"evidence-{group[len(HEAD_PREFIX) :]}")
                    if evidence is None or not np.isfinite(evidence) or evidence < 0:
                        return f"{group}: no usable evidence count ({evidence!r}) for head aggregation by evidence"
        if self.privacy is not None:
            from .privacy import update_norm

            norm = update_norm(update.partition, self.current)
            if norm > self.privacy.clipping_norm * 1.001 + self._clip_margin:
                return f"update norm {norm:.4g} exceeds the DP clipping norm {self.privacy.clipping_norm:g}"
        return None

    def _base_weight(self, update: SiteUpdate) -> float:
        if self.weighting == "uniform":
            return 1.0
        return float(min(update.num_examples, lower_median_cap(self.count_book.values())))

    def _sum(self, update: SiteUpdate) -> None:
        base = self._base_weight(update)
        for group, arrays in update.partition.items():
            weight = base
            if group.startswith(HEAD_PREFIX):
                organ = group[len(HEAD_PREFIX) :]
                if self.head_aggregation == "evidence":
                    weight = float(update.metrics[f"evidence-{organ}"])
                elif organ not in update.organs:
                    continue  # only the sites that annotate an organ teach its head
                if organ in update.organs:
                    self.annotated_heads.add(group)
            elif group not in (PARTITION_SHARED, PARTITION_BATCHNORM):
                continue
            if group not in self.sums:
                self.sums[group] = RunningWeightedSum(self.current[group])
            self.sums[group].add(arrays, weight)
        batchnorm = update.batchnorm
        if self.final_round and self.strategy == "fedavg":
            batchnorm = update.partition.get(PARTITION_BATCHNORM)
        self.accepted.append(replace(update, partition={}, batchnorm=batchnorm if self.final_round else None))

    def flush(self) -> None:
        """Sum the replies held back for the examples cap (a round that ends with fewer sites known
        than :data:`MIN_COUNTS_FOR_CAP`, e.g. a two-site federation): they count as accepted."""
        held, self._held = self._held, []
        for update in held:
            self._sum(update)

    def result(self, noise_rng: np.random.Generator | None = None) -> Partition:
        """The next global partition: every group's weighted mean, or its previous value where
        nobody contributed (or, under ``"evidence"``, no annotating site did); DP noise added
        per averaged group when the run has DP.

        Raises:
            ValueError: no reply was accepted.
        """
        self.flush()
        if not self.accepted:
            raise ValueError("cannot aggregate a round without accepted replies")
        result: Partition = {}
        contributors: dict[str, int] = {}
        for group, arrays in self.current.items():
            running = self.sums.get(group)
            usable = running is not None and running.total_weight > 0
            if group.startswith(HEAD_PREFIX) and group not in self.annotated_heads:
                usable = False
            if usable:
                result[group] = running.mean()
                contributors[group] = running.count
            else:
                result[group] = {k: np.array(v, copy=True) for k, v in arrays.items()}
        if self.privacy is not None:
            from .privacy import add_group_noise

            result = add_group_noise(result, contributors, self.privacy, noise_rng)
        return result
