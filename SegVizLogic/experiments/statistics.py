"""Statistics of the comparison: per-case scores, mean ± std, paired Wilcoxon signed-rank tests.

Per-case records are plain dicts ``{"arm", "seed", "case", "organ", "dice", "hd95_mm"}``.
Two arms are compared on the (seed, case) pairs where both have a Dice for the organ, with
:func:`scipy.stats.wilcoxon` (two-sided, ``zero_method="wilcox"``: zero differences dropped,
``method="auto"``). A p-value is reported as ``None`` with a reason when it would mean nothing:
fewer than :data:`MIN_PAIRS` non-zero differences (then even a perfect ranking cannot reach
p < 0.05), or identical arms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "MIN_PAIRS",
    "WILCOXON_KWARGS",
    "compare_to_reference",
    "describe",
    "paired_values",
    "paired_wilcoxon",
    "summarize",
]

MIN_PAIRS = 6
"""Fewest non-zero paired differences for which a p-value is reported: with 5, the smallest
two-sided exact p is 2/2**5 = 0.0625."""
WILCOXON_KWARGS: dict = {"zero_method": "wilcox", "alternative": "two-sided", "method": "auto"}
"""Exactly how :func:`scipy.stats.wilcoxon` is called (tests recompute p with these)."""


def describe(values: Sequence[float | None]) -> dict:
    """``{"mean", "std", "median", "n"}`` of the non-None values (std with ddof=1; None when n < 2).

    Example::

        describe([0.9, 0.8, None])  # {"mean": 0.85, "std": 0.0707..., "median": 0.85, "n": 2}
    """
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=float)
    if v.size == 0:
        return {"mean": None, "std": None, "median": None, "n": 0}
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if v.size > 1 else None,
        "median": float(np.median(v)),
        "n": int(v.size),
    }


def paired_values(
    records: Iterable[Mapping], arm_a: str, arm_b: str, organ: str, metric: str = "dice"
) -> tuple[list[tuple], list[float], list[float]]:
    """The (seed, case) keys where both arms scored ``organ``, and both arms' values on them.

    Returns:
        ``(keys, values_a, values_b)``, sorted by key.
    """
    by_arm: dict[str, dict[tuple, float]] = {arm_a: {}, arm_b: {}}
    for r in records:
        if r["arm"] in by_arm and r["organ"] == organ and r.get(metric) is not None:
            by_arm[r["arm"]][(r["seed"], r["case"])] = float(r[metric])
    keys = sorted(set(by_arm[arm_a]) & set(by_arm[arm_b]), key=lambda k: (k[0], str(k[1])))
    return keys, [by_arm[arm_a][k] for k in keys], [by_arm[arm_b][k] for k in keys]


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired two-sided Wilcoxon signed-rank test of ``a`` against ``b``.

    Returns:
        ``{"p": float | None, "statistic": float | None, "n": pairs, "n_nonzero": pairs with a
        difference, "median_difference": median of a - b, "reason": why p is None (else None)}``.

    Raises:
        ValueError: ``a`` and ``b`` differ in length.

    Example::

        paired_wilcoxon([0.9] * 8, [0.9] * 8)["reason"]  # "all paired differences are zero (identical results)"
    """
    from scipy.stats import wilcoxon

    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = x - y
    nonzero = int(np.count_nonzero(d))
    out = {
        "p": None,
        "statistic": None,
        "n": int(d.size),
        "n_nonzero": nonzero,
        "median_difference": float(np.median(d)) if d.size else None,
        "reason": None,
    }
    if d.size == 0:
        out["reason"] = "no paired cases"
    elif nonzero == 0:
        out["reason"] = "all paired differences are zero (identical results)"
    elif nonzero < MIN_PAIRS:
        out["reason"] = f"only {nonzero} non-zero paired differences (< {MIN_PAIRS}: no p-value can reach 0.05)"
    else:
        result = wilcoxon(x, y, **WILCOXON_KWARGS)
        out["p"], out["statistic"] = float(result.pvalue), float(result.statistic)
    return out


def summarize(records: Iterable[Mapping], arms: Sequence[str], organs: Sequence[str]) -> dict[str, dict[str, dict]]:
    """``{arm: {organ: {"dice": describe(...), "hd95_mm": describe(...)}}}`` over all seeds and cases.

    A missed organ counts as Dice 0 and has no HD95 (so HD95 is over the cases it was found).
    """
    records = list(records)
    out: dict[str, dict[str, dict]] = {}
    for arm in arms:
        out[arm] = {}
        for organ in organs:
            rows = [r for r in records if r["arm"] == arm and r["organ"] == organ]
            if rows:
                out[arm][organ] = {
                    "dice": describe([r.get("dice") for r in rows]),
                    "hd95_mm": describe([r.get("hd95_mm") for r in rows]),
                }
    return out


def compare_to_reference(
    records: Iterable[Mapping], reference: str, arms: Sequence[str], organs: Sequence[str], metric: str = "dice"
) -> dict[str, dict[str, dict]]:
    """Paired Wilcoxon tests of ``reference`` (FedBN) against every other arm, per organ.

    Returns:
        ``{arm: {organ: paired_wilcoxon(reference, arm) | {"pairs": [[seed, case], ...]}}}``.
    """
    records = list(records)
    out: dict[str, dict[str, dict]] = {}
    for arm in arms:
        if arm == reference:
            continue
        out[arm] = {}
        for organ in organs:
            keys, ref_values, arm_values = paired_values(records, reference, arm, organ, metric)
            if not keys:
                continue
            out[arm][organ] = {**paired_wilcoxon(ref_values, arm_values), "pairs": [list(k) for k in keys]}
    return out
