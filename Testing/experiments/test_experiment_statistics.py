"""Unit tests of SegVizLogic.experiments.statistics against hand-computed values (fast)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import bootstrap, wilcoxon

from SegVizLogic.experiments.config import load_config
from SegVizLogic.experiments.statistics import (
    ALPHA,
    BOOTSTRAP_KWARGS,
    MIN_PAIRS,
    WILCOXON_KWARGS,
    compare_arms,
    compare_to_reference,
    describe,
    holm,
    median_difference_ci,
    paired_values,
    paired_wilcoxon,
    seed_average,
    seed_spread,
    smallest_holm_p,
    summarize,
)

REPO = Path(__file__).resolve().parents[2]

# [a, b, expected p is None, reason contains]
TEST_CASE_IDENTICAL = [[0.8, 0.7, 0.9, 0.6, 0.5, 0.4, 0.3], [0.8, 0.7, 0.9, 0.6, 0.5, 0.4, 0.3], True, "identical"]
TEST_CASE_FEW = [[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4, 0.45], True, "< 6"]
TEST_CASE_EMPTY = [[], [], True, "no paired"]
TEST_CASE_ZEROS_LEAVE_FEW = [[0.5] * 5 + [0.9, 0.8, 0.7], [0.5] * 5 + [0.1, 0.2, 0.3], True, "3 non-zero"]


@pytest.mark.parametrize(
    "a, b, none, reason", [TEST_CASE_IDENTICAL, TEST_CASE_FEW, TEST_CASE_EMPTY, TEST_CASE_ZEROS_LEAVE_FEW]
)
def test_no_p_value_with_reason(a, b, none, reason):
    out = paired_wilcoxon(a, b)
    assert (out["p"] is None) == none
    assert reason in out["reason"]
    assert out["n"] == len(a)


# [differences, exact two-sided p by hand]
# Six positive differences of distinct size: only the all-positive and all-negative sign patterns are as
# extreme, 2 of 2**6.
TEST_CASE_SIX_POSITIVE = [[0.01, 0.02, 0.03, 0.04, 0.05, 0.06], 2 / 64]
# Eight differences, the smallest negative: W- = 1; rank sets with sum <= 1 are {} and {1}, so
# P(W- <= 1) = 2/256 and the two-sided p is 4/256.
TEST_CASE_ONE_SMALL_NEGATIVE = [[-0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08], 4 / 256]
# Eight differences, the second smallest negative: W- = 2; sets {}, {1}, {2} -> 3/256, two-sided 6/256.
TEST_CASE_SECOND_NEGATIVE = [[0.01, -0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08], 6 / 256]


@pytest.mark.parametrize(
    "differences, p", [TEST_CASE_SIX_POSITIVE, TEST_CASE_ONE_SMALL_NEGATIVE, TEST_CASE_SECOND_NEGATIVE]
)
def test_wilcoxon_exact_p_by_hand(differences, p):
    b = np.full(len(differences), 0.5)
    out = paired_wilcoxon(b + np.asarray(differences), b)
    assert out["p"] == pytest.approx(p, rel=1e-12)
    assert out["median_difference"] == pytest.approx(float(np.median(differences)))


def test_ties_and_zero_differences_match_scipy():
    # Two zero differences (dropped) and tied absolute differences (0.1 three times).
    a = [0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.4, 0.9, 0.3]
    b = [0.8, 0.7, 0.6, 0.7, 0.5, 0.3, 0.4, 0.2, 0.1]
    out = paired_wilcoxon(a, b)
    assert out["n"] == 9 and out["n_nonzero"] == 7
    assert out["p"] == pytest.approx(float(wilcoxon(a, b, **WILCOXON_KWARGS).pvalue), rel=1e-12)


def test_min_pairs_boundary():
    a = np.linspace(0.6, 0.9, MIN_PAIRS)
    assert paired_wilcoxon(a, a - 0.1 - np.arange(MIN_PAIRS) * 0.01)["p"] is not None
    assert paired_wilcoxon(a[:-1], a[:-1] - 0.1)["p"] is None


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="differ in length"):
        paired_wilcoxon([1.0, 2.0], [1.0])


# [p-values, Holm-adjusted by hand]
# Sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06 for spleen.
TEST_CASE_HOLM_FOUR = [
    {"liver": 0.01, "spleen": 0.04, "pancreas": 0.03, "kidney": 0.005},
    {"liver": 0.03, "spleen": 0.06, "pancreas": 0.06, "kidney": 0.02},
]
# Capped at 1, and an organ without a test stays without one and does not count in the family.
TEST_CASE_HOLM_CAP = [{"liver": 0.5, "spleen": 0.6, "kidney": None}, {"liver": 1.0, "spleen": 1.0, "kidney": None}]
TEST_CASE_HOLM_ONE = [{"liver": 0.02}, {"liver": 0.02}]


# An untestable comparison still counts in the family of three: 0.01 x 3 = 0.03, 0.03 x 2 = 0.06.
TEST_CASE_HOLM_FAMILY = [
    {"liver": 0.01, "spleen": 0.03, "kidney": None},
    {"liver": 0.03, "spleen": 0.06, "kidney": None},
    3,
]


@pytest.mark.parametrize(
    "p, expected, family",
    [[*TEST_CASE_HOLM_FOUR, None], [*TEST_CASE_HOLM_CAP, None], [*TEST_CASE_HOLM_ONE, None], TEST_CASE_HOLM_FAMILY],
)
def test_holm_by_hand(p, expected, family):
    adjusted = holm(p, family=family)
    assert set(adjusted) == set(expected)
    for organ, value in expected.items():
        assert adjusted[organ] == (None if value is None else pytest.approx(value, rel=1e-12)), organ


# [n cases, smallest Holm-corrected p over four organs by hand: 4 * 2 / 2**n]
@pytest.mark.parametrize("n, p", [(6, 0.125), (7, 0.0625), (8, 0.03125), (12, 4 * 2 / 4096)])
def test_smallest_holm_p(n, p):
    assert smallest_holm_p(n, family=4) == pytest.approx(p, rel=1e-12)


def test_six_cases_cannot_reach_significance_but_the_shipped_configs_can():
    assert smallest_holm_p(6) > ALPHA and smallest_holm_p(7) > ALPHA
    assert smallest_holm_p(8) < ALPHA  # the least n for which p < 0.05 is reachable after Holm
    for name in ("cpu.toml", "paper.toml", "learning-curve.toml"):
        config = load_config(REPO / "experiments" / name)
        n = config.data.phantom["external_cases"]
        assert n >= 12, name
        assert smallest_holm_p(n) < ALPHA / 10, name  # room for a few cases that go the other way


def test_median_difference_ci_by_hand():
    # Two values: a resample's median is 0 (1/4), 0.5 (1/2) or 1 (1/4): the 2.5 and 97.5 percentiles are 0 and 1.
    out = median_difference_ci([0.0, 1.0])
    assert out == {"median": 0.5, "ci_low": 0.0, "ci_high": 1.0, "n": 2}
    # Identical differences: every resample has the same median.
    assert median_difference_ci([0.05] * 5) == {"median": 0.05, "ci_low": 0.05, "ci_high": 0.05, "n": 5}
    assert median_difference_ci([])["median"] is None


def test_median_difference_ci_is_scipys_percentile_bootstrap():
    d = np.array([0.05, 0.02, 0.03, -0.01, 0.04, 0.06, 0.02, 0.01, 0.03, 0.05, 0.04, 0.02])
    out = median_difference_ci(d)
    expected = bootstrap((d,), np.median, rng=np.random.default_rng(0), **BOOTSTRAP_KWARGS).confidence_interval
    assert out["median"] == pytest.approx(0.03)
    assert (out["ci_low"], out["ci_high"]) == (pytest.approx(expected.low), pytest.approx(expected.high))
    assert out["ci_low"] <= out["median"] <= out["ci_high"]


def test_describe():
    d = describe([0.9, 0.8, None, float("nan")])
    assert d["n"] == 2 and d["mean"] == pytest.approx(0.85) and d["std"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert describe([0.5])["std"] is None
    assert describe([])["mean"] is None


def _record(arm, seed, case, organ, dice, hd95=None):
    return {"arm": arm, "seed": seed, "case": case, "organ": organ, "dice": dice, "hd95_mm": hd95}


def test_seed_average_by_hand():
    records = [
        _record("fedbn", 0, "c1", "liver", 0.8, 4.0),
        _record("fedbn", 1, "c1", "liver", 0.6, None),  # missed: no HD95, Dice still averaged in
        _record("fedbn", 2, "c1", "liver", 0.7, 6.0),
        _record("fedbn", 0, "c2", "liver", 0.9, 3.0),
    ]
    out = seed_average(records, metrics=("dice", "hd95_mm"))
    assert out == [
        {"arm": "fedbn", "case": "c1", "organ": "liver", "dice": pytest.approx(0.7), "hd95_mm": 5.0, "seeds": 3},
        {"arm": "fedbn", "case": "c2", "organ": "liver", "dice": 0.9, "hd95_mm": 3.0, "seeds": 1},
    ]
    spread = seed_spread(records, "fedbn", "liver")
    # Seed 0: mean(0.8, 0.9) = 0.85; seed 1: 0.6; seed 2: 0.7.
    assert spread["seeds"] == [0, 1, 2] and spread["mean"] == pytest.approx((0.85 + 0.6 + 0.7) / 3)


def test_cases_are_the_unit_not_seed_case_pairs():
    # Three seeds of eight cases: 24 records per arm, but 8 paired observations after seed averaging.
    records = []
    for seed in range(3):
        for case in range(8):
            records.append(_record("fedbn", seed, f"c{case}", "liver", 0.8 + 0.01 * case + 0.001 * seed))
            records.append(_record("local", seed, f"c{case}", "liver", 0.7 + 0.005 * case))
    averaged = seed_average(records)
    keys, a, b = paired_values(averaged, "fedbn", "local", "liver")
    assert keys == [f"c{i}" for i in range(8)] and len(a) == len(b) == 8
    test = compare_arms(averaged, "fedbn", "local", ["liver"])["liver"]
    assert test["n"] == 8
    assert test["p"] == pytest.approx(2 / 256)  # all eight positive
    assert test["p_holm"] == pytest.approx(2 / 256)  # one organ: nothing to correct
    # Differences 0.101 + 0.005 k, k = 0..7: median at k = 3.5 -> 0.1185.
    assert test["effect"]["median"] == pytest.approx(0.1185)


def test_compare_to_reference_holm_over_organs():
    records = []
    for case in range(8):
        for organ, sign in (("liver", 1), ("spleen", 1), ("pancreas", -1), ("kidney", 0)):
            records.append(_record("fedbn", 0, f"c{case}", organ, 0.5 + sign * 0.01 * (case + 1)))
            records.append(_record("fedavg", 0, f"c{case}", organ, 0.5))
    tests = compare_to_reference(
        seed_average(records), "fedbn", ["fedavg", "fedbn"], ["liver", "spleen", "pancreas", "kidney"]
    )
    assert set(tests) == {"fedavg"}
    t = tests["fedavg"]
    # Three organs with a p of 2/256 each; the kidney (identical: no p) still counts in the family of
    # four: 4p, 3p, 2p -> running maximum 4p for all three.
    for organ in ("liver", "spleen", "pancreas"):
        assert t[organ]["p"] == pytest.approx(2 / 256)
        assert t[organ]["p_holm"] == pytest.approx(8 / 256)
        assert t[organ]["significant"]
    assert t["kidney"]["p"] is None and t["kidney"]["p_holm"] is None and not t["kidney"]["significant"]
    assert t["pancreas"]["effect"]["median"] == pytest.approx(-0.045)
    assert t["liver"]["effect"]["ci_low"] > 0 and t["pancreas"]["effect"]["ci_high"] < 0


def test_summarize_over_seed_averaged_cases():
    records = [_record("fedbn", s, c, "liver", 0.5 + 0.1 * s, 2.0) for s in (0, 1) for c in ("c1", "c2", "c3")]
    summary = summarize(seed_average(records, ("dice", "hd95_mm")), ["fedbn"], ["liver"])
    assert summary["fedbn"]["liver"]["dice"]["n"] == 3
    assert summary["fedbn"]["liver"]["dice"]["mean"] == pytest.approx(0.55)
    assert not math.isnan(summary["fedbn"]["liver"]["hd95_mm"]["mean"])
