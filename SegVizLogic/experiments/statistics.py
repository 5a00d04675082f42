"""Statistics of the comparison: seed-averaged per-case scores, paired Wilcoxon signed-rank tests,
Holm correction over organs, and bootstrap effect sizes.

Per-case records are plain dicts ``{"arm", "seed", "case", "organ", "dice", "hd95_mm"}``. The unit
of analysis is the external **case**: each arm's Dice of a case is first averaged over the training
seeds (:func:`seed_average`), so a case counts once however many seeds were run (several seeds of
one case are not independent observations). Two arms are then compared per organ on the cases
both scored:

- :func:`paired_wilcoxon`: :func:`scipy.stats.wilcoxon`, two-sided, ``zero_method="wilcox"`` (zero
  differences dropped), ``method="auto"`` (exact for small samples without ties);
- :func:`holm`: Holm's step-down correction over the organs of one comparison (family = the four
  organs of "FedBN against arm X");
- :func:`median_difference_ci`: the effect size, the median paired difference with a percentile
  bootstrap 95% confidence interval (:func:`scipy.stats.bootstrap`, fixed generator).

:func:`smallest_holm_p` is the arithmetic behind the number of external cases: with ``n`` cases
the smallest two-sided exact Wilcoxon p is ``2 / 2**n``, and Holm over four organs multiplies the
smallest by four, so n = 6 cannot go below 0.125 and n = 8 is the least that can reach 0.05.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "ALPHA",
    "BOOTSTRAP_KWARGS",
    "MIN_PAIRS",
    "WILCOXON_KWARGS",
    "compare_arms",
    "compare_to_reference",
    "describe",
    "holm",
    "median_difference_ci",
    "paired_values",
    "paired_wilcoxon",
    "seed_average",
    "seed_spread",
    "smallest_holm_p",
    "summarize",
]

ALPHA = 0.05
"""Significance level of the corrected p-values."""
MIN_PAIRS = 6
"""Fewest non-zero paired differences for which a p-value is reported: with 5, the smallest
two-sided exact p is 2/2**5 = 0.0625, which no correction can bring below 0.05."""
WILCOXON_KWARGS: dict = {"zero_method": "wilcox", "alternative": "two-sided", "method": "auto"}
"""Exactly how :func:`scipy.stats.wilcoxon` is called (tests recompute p with these)."""
BOOTSTRAP_KWARGS: dict = {"confidence_level": 0.95, "n_resamples": 9999, "method": "percentile"}
"""Exactly how :func:`scipy.stats.bootstrap` is called, with ``rng=np.random.default_rng(BOOTSTRAP_SEED)``.
Percentile, not BCa: BCa's jackknife acceleration is erratic for the median of a dozen values with
ties (it returns NaN when the jackknife values coincide)."""
BOOTSTRAP_SEED = 0


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


def seed_average(records: Iterable[Mapping], metrics: Sequence[str] = ("dice",)) -> list[dict]:
    """One record per (arm, case, organ): each of ``metrics`` averaged over the seeds that have it.

    Returns:
        ``[{"arm", "case", "organ", <metric>: mean over seeds (None if no seed has a value), "seeds": n}]``,
        sorted by arm, case and organ; ``seeds`` counts the seed records of the key. A missed organ has
        Dice 0 (never None), so it is averaged in; its HD95 is None and left out of the HD95 mean.

    Example::

        seed_average([{"arm": "a", "seed": 0, "case": "c", "organ": "liver", "dice": 0.8},
                      {"arm": "a", "seed": 1, "case": "c", "organ": "liver", "dice": 0.6}])
        # [{"arm": "a", "case": "c", "organ": "liver", "dice": 0.7, "seeds": 2}]
    """
    groups: dict[tuple, list[Mapping]] = {}
    for r in records:
        groups.setdefault((r["arm"], str(r["case"]), r["organ"]), []).append(r)
    out = []
    for (arm, case, organ), rows in sorted(groups.items()):
        row: dict = {"arm": arm, "case": case, "organ": organ}
        for metric in metrics:
            values = [float(r[metric]) for r in rows if r.get(metric) is not None]
            row[metric] = float(np.mean(values)) if values else None
        row["seeds"] = len({r.get("seed") for r in rows})
        out.append(row)
    return out


def seed_spread(records: Iterable[Mapping], arm: str, organ: str, metric: str = "dice") -> dict:
    """How much one arm's result moves with the training seed: ``describe`` of the per-seed means over cases."""
    per_seed: dict = {}
    for r in records:
        if r["arm"] == arm and r["organ"] == organ and r.get(metric) is not None:
            per_seed.setdefault(r["seed"], []).append(float(r[metric]))
    return {**describe([float(np.mean(v)) for v in per_seed.values()]), "seeds": sorted(per_seed)}


def paired_values(
    records: Iterable[Mapping], arm_a: str, arm_b: str, organ: str, metric: str = "dice"
) -> tuple[list, list[float], list[float]]:
    """The keys where both arms scored ``organ``, and both arms' values on them.

    The key is ``(seed, case)`` for per-seed records and ``case`` for seed-averaged ones
    (records without a ``seed``).

    Returns:
        ``(keys, values_a, values_b)``, sorted by key.
    """
    by_arm: dict[str, dict] = {arm_a: {}, arm_b: {}}
    for r in records:
        if r["arm"] in by_arm and r["organ"] == organ and r.get(metric) is not None:
            key = (r["seed"], str(r["case"])) if "seed" in r else str(r["case"])
            by_arm[r["arm"]][key] = float(r[metric])
    keys = sorted(set(by_arm[arm_a]) & set(by_arm[arm_b]), key=str)
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


def holm(p_values: Mapping[str, float | None], family: int | None = None) -> dict[str, float | None]:
    """Holm's step-down adjusted p-values of one family of tests.

    Sorted ascending, the ``i``-th smallest of ``m`` p-values becomes ``min(1, max_{j<=i} (m - j) p_(j))``
    (0-based ``j``): the smallest is multiplied by ``m``, the next by ``m - 1``..., never below the one
    before. Rejecting where the adjusted p < alpha controls the family-wise error rate at alpha.

    Args:
        p_values: name -> p; ``None`` for a comparison without a p-value (it stays ``None``).
        family: the family size ``m``; default the number of p-values. A comparison whose p could
            not be computed still belongs to the family: pass the number of comparisons made (as if
            its p were 1), so that dropping a test never makes the others look stronger.

    Example::

        holm({"liver": 0.01, "spleen": 0.04, "pancreas": 0.03, "kidney": 0.005})
        # {"kidney": 0.02, "liver": 0.03, "pancreas": 0.06, "spleen": 0.06}
    """
    tested = sorted(((p, name) for name, p in p_values.items() if p is not None), key=lambda t: t[0])
    m = len(tested) if family is None else family
    if m < len(tested):
        raise ValueError(f"family size {m} is smaller than the {len(tested)} p-values given")
    adjusted: dict[str, float | None] = {name: None for name in p_values}
    running = 0.0
    for j, (p, name) in enumerate(tested):
        running = max(running, min(1.0, (m - j) * p))
        adjusted[name] = running
    return adjusted


def median_difference_ci(differences: Sequence[float]) -> dict:
    """Median of paired differences and its percentile-bootstrap 95% confidence interval.

    Returns:
        ``{"median": .., "ci_low": .., "ci_high": .., "n": ..}`` (all None for no differences; a
        single difference, or identical ones, give a zero-width interval).
    """
    from scipy.stats import bootstrap

    d = np.asarray(differences, dtype=float)
    if d.size == 0:
        return {"median": None, "ci_low": None, "ci_high": None, "n": 0}
    median = float(np.median(d))
    if d.size == 1 or np.all(d == d[0]):
        # Every resample has the same median; scipy would warn about a degenerate distribution.
        return {"median": median, "ci_low": median, "ci_high": median, "n": int(d.size)}
    result = bootstrap((d,), np.median, rng=np.random.default_rng(BOOTSTRAP_SEED), **BOOTSTRAP_KWARGS)
    ci = result.confidence_interval
    return {"median": median, "ci_low": float(ci.low), "ci_high": float(ci.high), "n": int(d.size)}


def compare_arms(
    averaged: Iterable[Mapping], reference: str, arm: str, organs: Sequence[str], metric: str = "dice"
) -> dict[str, dict]:
    """``reference`` against ``arm`` on seed-averaged records, one test per organ, Holm over the organs.

    Returns:
        ``{organ: paired_wilcoxon(reference, arm) | {"p_holm", "significant", "effect", "cases"}}``;
        ``effect`` is :func:`median_difference_ci` of ``reference - arm`` (positive: the reference
        is better), ``significant`` is ``p_holm < ALPHA``.
    """
    averaged = list(averaged)
    out: dict[str, dict] = {}
    for organ in organs:
        keys, ref_values, arm_values = paired_values(averaged, reference, arm, organ, metric)
        if not keys:
            continue
        test = paired_wilcoxon(ref_values, arm_values)
        test["effect"] = median_difference_ci(np.subtract(ref_values, arm_values))
        test["cases"] = list(keys)
        out[organ] = test
    # The family is every organ compared, also one whose p could not be computed (identical arms).
    adjusted = holm({organ: test["p"] for organ, test in out.items()}, family=len(out))
    for organ, test in out.items():
        test["p_holm"] = adjusted[organ]
        test["significant"] = adjusted[organ] is not None and adjusted[organ] < ALPHA
    return out


def compare_to_reference(
    averaged: Iterable[Mapping], reference: str, arms: Sequence[str], organs: Sequence[str], metric: str = "dice"
) -> dict[str, dict[str, dict]]:
    """:func:`compare_arms` of ``reference`` (FedBN) against every other arm: ``{arm: {organ: test}}``."""
    averaged = list(averaged)
    return {arm: compare_arms(averaged, reference, arm, organs, metric) for arm in arms if arm != reference}


def summarize(averaged: Iterable[Mapping], arms: Sequence[str], organs: Sequence[str]) -> dict[str, dict[str, dict]]:
    """``{arm: {organ: {"dice": describe(...), "hd95_mm": describe(...)}}}`` over the seed-averaged cases.

    A missed organ counts as Dice 0 and has no HD95 (so HD95 is over the cases it was found).
    """
    averaged = list(averaged)
    out: dict[str, dict[str, dict]] = {}
    for arm in arms:
        out[arm] = {}
        for organ in organs:
            rows = [r for r in averaged if r["arm"] == arm and r["organ"] == organ]
            if rows:
                out[arm][organ] = {
                    "dice": describe([r.get("dice") for r in rows]),
                    "hd95_mm": describe([r.get("hd95_mm") for r in rows]),
                }
    return out


def smallest_holm_p(n_cases: int, family: int = 4) -> float:
    """The smallest Holm-adjusted p a two-sided Wilcoxon test can give with ``n_cases`` pairs in a
    family of ``family`` tests: every difference of one sign and distinct magnitudes gives the
    exact p ``2 / 2**n``, which Holm multiplies by ``family`` for the smallest p of the family.

    Computed with :func:`scipy.stats.wilcoxon` itself, not with the formula, so that it stays true to
    the test the report runs.
    """
    if n_cases < 1 or family < 1:
        raise ValueError(f"n_cases and family must be >= 1, got {n_cases} and {family}")
    from scipy.stats import wilcoxon

    differences = np.arange(1, n_cases + 1, dtype=float)
    p = float(wilcoxon(differences, np.zeros(n_cases), **WILCOXON_KWARGS).pvalue)
    return holm({str(i): p for i in range(family)})["0"]
