"""Unit tests of SegVizLogic.experiments.statistics (fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import wilcoxon

from SegVizLogic.experiments.statistics import (
    MIN_PAIRS,
    WILCOXON_KWARGS,
    compare_to_reference,
    describe,
    paired_values,
    paired_wilcoxon,
    summarize,
)

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


def test_matches_scipy_without_ties():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.5, 1, 12), rng.uniform(0.3, 0.9, 12)
    out = paired_wilcoxon(a, b)
    expected = wilcoxon(a, b, **WILCOXON_KWARGS)
    assert out["reason"] is None
    assert out["p"] == pytest.approx(float(expected.pvalue), rel=1e-12)
    assert out["statistic"] == pytest.approx(float(expected.statistic))


def test_ties_and_zero_differences_match_scipy():
    # Two zero differences (dropped) and tied absolute differences (0.1 three times).
    a = [0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.4, 0.9, 0.3]
    b = [0.8, 0.7, 0.6, 0.7, 0.5, 0.3, 0.4, 0.2, 0.1]
    out = paired_wilcoxon(a, b)
    assert out["n"] == 9 and out["n_nonzero"] == 7
    assert out["p"] == pytest.approx(float(wilcoxon(a, b, **WILCOXON_KWARGS).pvalue), rel=1e-12)
    assert 0 < out["p"] <= 1


def test_min_pairs_boundary():
    a = np.linspace(0.6, 0.9, MIN_PAIRS)
    assert paired_wilcoxon(a, a - 0.1 - np.arange(MIN_PAIRS) * 0.01)["p"] is not None
    assert paired_wilcoxon(a[:-1], a[:-1] - 0.1)["p"] is None


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="differ in length"):
        paired_wilcoxon([1.0, 2.0], [1.0])


def test_describe():
    d = describe([0.9, 0.8, None, float("nan")])
    assert d["n"] == 2 and d["mean"] == pytest.approx(0.85) and d["std"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert describe([0.5])["std"] is None
    assert describe([])["mean"] is None


def _records():
    rows = []
    for seed in (0, 1):
        for case in ("c1", "c2", "c3", "c4"):
            rows.append(
                {
                    "arm": "fedbn",
                    "seed": seed,
                    "case": case,
                    "organ": "liver",
                    "dice": 0.9 - 0.01 * seed,
                    "hd95_mm": 3.0,
                }
            )
            rows.append(
                {
                    "arm": "local",
                    "seed": seed,
                    "case": case,
                    "organ": "liver",
                    "dice": 0.7 + 0.02 * int(case[1]),
                    "hd95_mm": None,
                }
            )
    rows.append(
        {"arm": "local", "seed": 2, "case": "c1", "organ": "liver", "dice": 0.1, "hd95_mm": None}
    )  # no fedbn partner
    return rows


def test_pairs_are_matched_by_seed_and_case():
    keys, a, b = paired_values(_records(), "fedbn", "local", "liver")
    assert keys == [(s, c) for s in (0, 1) for c in ("c1", "c2", "c3", "c4")]
    assert a[0] == pytest.approx(0.9) and b[0] == pytest.approx(0.72)


def test_compare_and_summarize():
    records = _records()
    tests = compare_to_reference(records, "fedbn", ["fedbn", "local"], ["liver"])
    assert set(tests) == {"local"}
    _, a, b = paired_values(records, "fedbn", "local", "liver")
    assert tests["local"]["liver"]["p"] == pytest.approx(float(wilcoxon(a, b, **WILCOXON_KWARGS).pvalue))
    summary = summarize(records, ["fedbn", "local"], ["liver"])
    assert summary["local"]["liver"]["dice"]["n"] == 9
    assert summary["local"]["liver"]["hd95_mm"]["n"] == 0
    assert not math.isnan(summary["fedbn"]["liver"]["hd95_mm"]["mean"])
