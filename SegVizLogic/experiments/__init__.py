"""The paper's comparison, measured: local vs central (naive, partial-label) vs FedAvg vs FedBN,
and the learning curve that shows where federation starts to pay.

Modules, in the order a run uses them: ``config`` (the TOML experiment file), ``arms`` (training
every arm), ``selection`` (each arm's test-time options chosen on the sites' validation cases: the
selection rule), ``external`` (the external set, sealed until the choices are frozen, then scored
once per arm), ``statistics`` (seed-averaged cases, Wilcoxon, Holm, bootstrap effect sizes),
``study`` (the phases in order), ``comparison`` and ``learning_curve`` (the two kinds of
experiment), ``report`` (results.json, report.md, PNG figures) and ``cli`` (``segviz experiment``).
Importing this package imports nothing heavy.
"""

from __future__ import annotations

__all__: list[str] = []
