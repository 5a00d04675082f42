"""The coordinator checks every reply before it averages it (strategy.check_update /
screen_updates), caps what one site can claim under example weighting, and does both on a live
round: a site that sends NaN is named, left out, and the model stays finite."""

from __future__ import annotations

import numpy as np
import pytest
from federated_tiny import TINY_NETWORK

from SegVizLogic.federated.strategy import (
    MAX_EXAMPLES,
    SiteUpdate,
    aggregate_updates,
    capped_example_counts,
    check_update,
    reply_weights,
    screen_updates,
)
from SegVizLogic.network import build_network, partition_state


@pytest.fixture(scope="module")
def current():
    return partition_state(build_network(TINY_NETWORK))


def _update(current, site="a", organs=("liver",), n=10, shift=0.1, strategy="fedbn"):
    groups = ["shared", *(f"head:{o}" for o in organs)] + (["batchnorm"] if strategy == "fedavg" else [])
    partition = {
        g: {k: (v + shift).astype(v.dtype) if v.dtype.kind == "f" else v.copy() for k, v in current[g].items()}
        for g in groups
    }
    return SiteUpdate(site, tuple(organs), n, partition, {"loss": 1.0})


def _poison_nan(u, c):
    key = next(iter(u.partition["shared"]))
    u.partition["shared"][key] = u.partition["shared"][key].copy()
    u.partition["shared"][key].flat[3] = np.nan


def _poison_inf_head(u, c):
    key = next(iter(u.partition["head:liver"]))
    u.partition["head:liver"][key] = np.full_like(u.partition["head:liver"][key], np.inf)


def _poison_shape(u, c):
    key = next(k for k, v in u.partition["shared"].items() if v.ndim > 1)
    u.partition["shared"][key] = u.partition["shared"][key][:1]


def _poison_missing_key(u, c):
    u.partition["shared"].pop(next(iter(u.partition["shared"])))


def _poison_extra_key(u, c):
    u.partition["shared"]["body.injected"] = np.zeros(3, np.float32)


def _poison_dtype(u, c):
    key = next(iter(u.partition["shared"]))
    u.partition["shared"][key] = u.partition["shared"][key].astype(np.int64)


def _poison_undeclared_head(u, c):
    u.partition["head:spleen"] = {k: v.copy() for k, v in c["head:spleen"].items()}


def _poison_batchnorm_under_fedbn(u, c):
    u.partition["batchnorm"] = {k: v.copy() for k, v in c["batchnorm"].items()}


def _poison_no_shared(u, c):
    u.partition.pop("shared")


def _poison_unknown_group(u, c):
    u.partition["decoder"] = {"w": np.zeros(2, np.float32)}


def _poison_final_batchnorm(u, c):
    u.batchnorm = {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in c["batchnorm"].items()}


def _count(value):
    def poison(u, c):
        u.num_examples = value

    return poison


def _organs(organs):
    def poison(u, c):
        u.organs = organs

    return poison


# [name, poison, fragment of the reason]
BAD_REPLIES = [
    ["nan", _poison_nan, "non-finite"],
    ["inf head", _poison_inf_head, "head:liver"],
    ["shape", _poison_shape, "has shape"],
    ["missing key", _poison_missing_key, "missing"],
    ["extra key", _poison_extra_key, "unexpected"],
    ["dtype", _poison_dtype, "dtype"],
    ["undeclared head", _poison_undeclared_head, "did not declare"],
    ["batchnorm under fedbn", _poison_batchnorm_under_fedbn, "stays on site"],
    ["no shared", _poison_no_shared, "no 'shared'"],
    ["unknown group", _poison_unknown_group, "does not have"],
    ["nan final batchnorm", _poison_final_batchnorm, "final BatchNorm"],
    ["zero count", _count(0), "implausible example count"],
    ["negative count", _count(-5), "implausible example count"],
    ["fractional count", _count(2.5), "implausible example count"],
    ["huge count", _count(MAX_EXAMPLES + 1), "implausible example count"],
    ["bool count", _count(True), "implausible example count"],
    ["organ outside schema", _organs(("liver", "brain")), "outside the schema"],
]


@pytest.mark.parametrize("name,poison,fragment", BAD_REPLIES, ids=[c[0] for c in BAD_REPLIES])
def test_a_bad_reply_is_rejected_with_its_reason_and_left_out_of_the_average(current, name, poison, fragment):
    good = [_update(current, "a", shift=0.1), _update(current, "b", ("liver", "spleen"), shift=0.3)]
    bad = _update(current, "c", shift=0.2)
    poison(bad, current)
    accepted, rejected = screen_updates([*good, bad], current)
    assert [u.site for u in accepted] == ["a", "b"]
    assert list(rejected) == ["c"] and fragment in rejected["c"], rejected
    averaged = aggregate_updates(current, accepted, "fedbn", "uniform")
    expected = aggregate_updates(current, good, "fedbn", "uniform")
    for group, arrays in expected.items():
        for key, value in arrays.items():
            np.testing.assert_array_equal(averaged[group][key], value)
    assert all(np.all(np.isfinite(v)) for arrays in averaged.values() for v in arrays.values() if v.dtype.kind == "f")


def test_honest_replies_pass_under_both_strategies(current):
    for strategy in ("fedbn", "fedavg"):
        update = _update(current, strategy=strategy)
        update.batchnorm = {k: v.copy() for k, v in current["batchnorm"].items()}
        assert check_update(update, current, strategy) is None
    # Flower ships BatchNorm's 0-d num_batches_tracked as shape (1,): still the same tensor.
    update = _update(current, strategy="fedavg")
    update.partition["batchnorm"] = {k: v.reshape(-1) if v.ndim == 0 else v for k, v in current["batchnorm"].items()}
    assert check_update(update, current, "fedavg") is None


def test_declarations_must_hold_for_the_whole_run_and_one_reply_per_site(current):
    update = _update(current, "a", ("liver",))
    assert "earlier in this run" in check_update(update, current, known_organs=("spleen",))
    assert check_update(update, current, known_organs=("liver",)) is None
    accepted, rejected = screen_updates([_update(current, "a"), _update(current, "a", shift=5.0)], current)
    assert len(accepted) == 1 and rejected == {"a (again)": "a second reply under the same site name this round"}
    # Heads a configuration allows every site to send (e.g. exclusion-trained heads) pass.
    extra = _update(current, "a", ("liver",))
    _poison_undeclared_head(extra, current)
    assert check_update(extra, current, extra_heads=("spleen",)) is None


# [counts, capped]
CAP_CASES = [
    [[10, 1_000_000], [10, 30]],  # two sites: the lower median binds where the median would not
    [[10, 20, 1000], [10, 20, 60]],
    [[20, 50, 100], [20, 50, 100]],  # honest, moderately unequal sites are left alone
    [[7], [7]],
]


@pytest.mark.parametrize("counts,capped", CAP_CASES)
def test_example_counts_are_capped_at_three_times_the_lower_median(counts, capped):
    assert capped_example_counts(counts).tolist() == capped


def test_an_over_claiming_site_cannot_take_the_average():
    weights = reply_weights([10, 10, 1_000_000], "examples")
    assert weights == pytest.approx([0.2, 0.2, 0.6])
    assert reply_weights([10, 10, 1_000_000], "uniform") == pytest.approx([1 / 3] * 3)
