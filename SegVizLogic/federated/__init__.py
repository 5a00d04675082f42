"""Federated SegViz on Flower: head-aware FedBN/FedAvg, simulation and real federations.

Modules: ``strategy`` (aggregation over the parameter partition), ``task`` (settings and one
site's round), ``client_app`` / ``server_app`` (the Flower apps), ``simulation`` (Flower's
simulation engine), ``deployment`` (SuperLink/SuperNode processes), ``certs`` (TLS) and
``cli`` (``segviz federation ...``). Importing this package imports nothing heavy.
"""

from __future__ import annotations

__all__: list[str] = []
