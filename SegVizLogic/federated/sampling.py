"""Which sites train in a round: every connected site, or a seeded sample of them.

With 100 hospitals a round need not wait for all of them: ``fraction-train`` trains a share of
the connected sites each round, at least ``min-train-nodes`` of them. The sample is drawn from
the run's seed and the round number, so a rerun with the same sites draws the same sample.
(Flower's own ``sample_nodes`` draws from Python's global random state and waits on the grid
itself; here waiting is the ServerApp's, with its own messages.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

__all__ = ["sample_nodes", "sample_size"]


def sample_size(connected: int, fraction: float, minimum: int) -> int:
    """How many of ``connected`` sites train: ``ceil(fraction * connected)``, at least
    ``minimum``, at most ``connected``.

    Example::

        sample_size(100, 0.1, 8)  # -> 10
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"the fraction of sites trained per round must be in (0, 1], got {fraction}")
    return min(connected, max(math.ceil(fraction * connected - 1e-9), minimum))


def sample_nodes(node_ids: Iterable[int], fraction: float, minimum: int, seed: int, server_round: int) -> list[int]:
    """The nodes that train in ``server_round``: all of them when ``fraction`` is 1, else a
    sample of :func:`sample_size` nodes without replacement, drawn with
    ``numpy.random.default_rng([seed, server_round])`` from the sorted node ids.

    Returns:
        The sampled node ids, sorted.

    Example::

        sample_nodes(range(100), 0.1, 2, seed=0, server_round=1)  # -> 10 ids, the same every time
    """
    nodes = sorted({int(n) for n in node_ids})
    size = sample_size(len(nodes), fraction, minimum)
    if size >= len(nodes):
        return nodes
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(server_round)])
    # Draw positions, not ids: Flower's node ids are unsigned 64-bit, which numpy would hold as
    # float64 (and round) in a mixed array.
    return sorted(nodes[int(i)] for i in rng.choice(len(nodes), size=size, replace=False))
