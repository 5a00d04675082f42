"""Benchmark: the coordinator's memory and time to aggregate a round of many sites.

Replies of the paper network (a 19.3 MB shared body and one head each; four single-organ site
kinds in turn) are aggregated two ways:

- streaming (:class:`~SegVizLogic.federated.aggregation.RoundAggregator`, what the ServerApp
  does): each reply checked and added to running sums the moment it arrives, then dropped;
- batch (:func:`~SegVizLogic.federated.strategy.aggregate_updates`, the rule before issue 12):
  every reply of the round held, then averaged.

Peak memory is what ``tracemalloc`` sees numpy allocate during aggregation, the replies
included (a reply is generated just before it is added, as if it had just arrived). Flower's own
message buffers are not in it (the SuperLink holds each reply until it is pulled).

Usage::

    python bench/bench_aggregation.py --sites 100 --batch-sites 20 --json bench-aggregation.json
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np

ORGANS = ("liver", "spleen", "pancreas", "kidney")


def _reply(current, index: int, rng):
    from SegVizLogic.federated.strategy import SiteUpdate

    organ = ORGANS[index % len(ORGANS)]
    partition = {
        group: {k: (v + 0.01 * rng.standard_normal(v.shape, dtype=np.float32)).astype(v.dtype) for k, v in a.items()}
        for group, a in current.items()
        if group in ("shared", f"head:{organ}")
    }
    return SiteUpdate(f"site-{index:03d}", (organ,), 10 + index % 7, partition, {"loss": 1.0})


def streaming(current, sites: int) -> dict:
    from SegVizLogic.federated.aggregation import RoundAggregator

    rng = np.random.default_rng(0)
    aggregator = RoundAggregator(current, "fedbn", "examples")
    tracemalloc.start()
    seconds = 0.0
    try:
        for index in range(sites):
            reply = _reply(current, index, rng)
            started = time.perf_counter()
            if not aggregator.add(reply):
                raise RuntimeError(aggregator.rejected)
            seconds += time.perf_counter() - started
            del reply
        started = time.perf_counter()
        aggregator.result()
        seconds += time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {"sites": sites, "peak_mb": round(peak / 1e6, 1), "aggregate_seconds": round(seconds, 2)}


def batch(current, sites: int) -> dict:
    from SegVizLogic.federated.strategy import aggregate_updates

    rng = np.random.default_rng(0)
    tracemalloc.start()
    try:
        replies = [_reply(current, index, rng) for index in range(sites)]
        started = time.perf_counter()
        aggregate_updates(current, replies, "fedbn", "examples")
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {"sites": sites, "peak_mb": round(peak / 1e6, 1), "aggregate_seconds": round(seconds, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=100, help="sites in the streaming round")
    parser.add_argument("--batch-sites", type=int, default=20, help="sites in the batch round (it holds them all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from SegVizLogic.network import NetworkConfig, build_network, partition_state

    current = partition_state(build_network(NetworkConfig()))
    shared_mb = sum(v.nbytes for v in current["shared"].values()) / 1e6
    results = {"shared_body_mb": round(shared_mb, 2)}
    for name, function, sites in (
        ("streaming", streaming, args.sites),
        ("streaming_small", streaming, 4),
        ("batch", batch, args.batch_sites),
        ("batch_small", batch, 4),
    ):
        results[name] = function(current, sites)
        print(name, results[name], flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
