"""Federated SegViz on Flower: head-aware FedBN/FedAvg, simulation and real federations.

Modules: ``strategy`` (aggregation over the parameter partition), ``task`` (settings and one
site's round), ``client_app`` / ``server_app`` (the Flower apps), ``simulation`` (Flower's
simulation engine), ``processes`` (Flower processes and their supervision), ``superlink`` (the
coordinator's SuperLink), ``site_node`` (a site's SuperNode, warm worker and ``join``), ``runs``
(submitting and following runs), ``certs`` (TLS) and ``cli`` (``segviz federation ...``). Importing this package imports nothing heavy.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["AVERAGED_BATCHNORM_RECORD", "FINAL_BATCHNORM_RECORD", "LOCAL_STATE_DIR"]

AVERAGED_BATCHNORM_RECORD = "averaged-batchnorm"
"""Train-message record of a FedBN run resumed from a bundle: the federation's averaged
BatchNorm (already in that bundle), which a site without BatchNorm of its own for the run's
lineage starts from. It flows from the coordinator to the sites only."""

FINAL_BATCHNORM_RECORD = "final-batchnorm"
"""Reply record holding a site's BatchNorm, shared once with its final-round reply."""

LOCAL_STATE_DIR = Path(".segviz") / "federated"
"""A site's federated state, inside its folder: BatchNorm, round info, events, logs."""
