"""The paper's comparison, measured: local vs central (naive, partial-label) vs FedAvg vs FedBN.

Modules: ``config`` (the TOML experiment file), ``arms`` (training and external evaluation of
each arm), ``statistics`` (per-case Dice/HD95, mean ± std, paired Wilcoxon tests), ``report``
(results.json, report.md, PNG figures) and ``cli`` (``segviz experiment``). Importing this
package imports nothing heavy.
"""

from __future__ import annotations

__all__: list[str] = []
