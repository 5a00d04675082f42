"""Replies aggregated as they arrive (aggregation.RoundAggregator): the batch rule's result
without holding a round in memory, every reply checked before it enters a sum, per-group
weights for heads, the streaming example-count cap; seeded client sampling; float16 transfer."""

from __future__ import annotations

import tracemalloc
from collections import Counter

import numpy as np
import pytest
from federated_tiny import TINY_NETWORK
from scipy.stats import chisquare

from SegVizLogic.federated.aggregation import RoundAggregator, RunningWeightedSum, lower_median_cap
from SegVizLogic.federated.privacy import DifferentialPrivacy, update_norm
from SegVizLogic.federated.sampling import sample_nodes, sample_size
from SegVizLogic.federated.strategy import SiteUpdate, aggregate_updates, batchnorm_variants
from SegVizLogic.federated.transfer import for_transfer
from SegVizLogic.network import build_network, partition_state


@pytest.fixture(scope="module")
def current():
    return partition_state(build_network(TINY_NETWORK))


def _update(current, site, organs, n, rng, strategy="fedbn", scale=0.1, batchnorm=False):
    groups = ["shared", *(f"head:{o}" for o in organs)] + (["batchnorm"] if strategy == "fedavg" else [])
    partition = {
        g: {
            k: (v + scale * rng.standard_normal(v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v + 1
            for k, v in current[g].items()
        }
        for g in groups
    }
    bn = {k: v + 0.5 if v.dtype.kind == "f" else v for k, v in current["batchnorm"].items()} if batchnorm else None
    return SiteUpdate(site, tuple(organs), n, partition, {"loss": 1.0, **{f"dice-{o}": 0.5 for o in organs}}, bn)


SPECS = [("a", ("liver",), 10), ("b", ("liver", "spleen"), 30), ("c", ("kidney",), 20), ("d", ("spleen",), 25)]


def _assert_partitions_close(got, expected, rtol=1e-6, atol=1e-7):
    assert set(got) == set(expected)
    for group, arrays in expected.items():
        assert set(got[group]) == set(arrays)
        for key, value in arrays.items():
            assert got[group][key].dtype == value.dtype and got[group][key].shape == value.shape, (group, key)
            np.testing.assert_allclose(got[group][key], value, rtol=rtol, atol=atol, err_msg=f"{group}/{key}")


# [strategy, weighting]
RULES = [["fedbn", "uniform"], ["fedavg", "uniform"], ["fedbn", "examples"], ["fedavg", "examples"]]


@pytest.mark.parametrize("strategy,weighting", RULES)
def test_streaming_sum_equals_the_batch_rule(current, strategy, weighting):
    """Counts 10..30 are within 3x of their lower median, so the cap binds in neither rule."""
    rng = np.random.default_rng(1)
    updates = [_update(current, s, o, n, rng, strategy) for s, o, n in SPECS]
    aggregator = RoundAggregator(current, strategy, weighting)
    for update in updates:
        assert aggregator.add(update)
    expected = aggregate_updates(current, updates, strategy, weighting)
    _assert_partitions_close(aggregator.result(), expected)
    # the pancreas head: nobody annotates it, so it keeps the global value exactly
    for key, value in current["head:pancreas"].items():
        np.testing.assert_array_equal(aggregator.result()["head:pancreas"][key], value)
    # what is kept of a reply: no tensors
    assert all(u.partition == {} for u in aggregator.accepted)


@pytest.mark.parametrize("weighting", ["uniform", "examples"])
def test_streaming_evidence_heads_equal_the_batch_rule(current, weighting):
    """head_aggregation "evidence": sites send heads their exclusion term taught, weighted by voxels."""
    rng = np.random.default_rng(11)
    updates = [_update(current, s, o, n, rng) for s, o, n in SPECS]
    extra = ("liver", "pancreas")
    for i, update in enumerate(updates):
        for organ in extra:  # every site taught the liver and pancreas heads "not this organ"
            if organ not in update.organs:
                update.partition[f"head:{organ}"] = _update(current, "x", (organ,), 1, rng).partition[f"head:{organ}"]
        for group in update.partition:
            if group.startswith("head:"):
                update.metrics[f"evidence-{group[5:]}"] = float(
                    100 * (i + 1) + (400 if group[5:] in update.organs else 0)
                )
    aggregator = RoundAggregator(current, "fedbn", weighting, head_aggregation="evidence", extra_heads=extra)
    for update in updates:
        assert aggregator.add(update), aggregator.rejected
    expected = aggregate_updates(current, updates, "fedbn", weighting, "evidence")
    result = aggregator.result()
    _assert_partitions_close(result, expected)
    # the pancreas head: taught only "not pancreas", so both rules keep it as it was
    for key, value in current["head:pancreas"].items():
        np.testing.assert_array_equal(result["head:pancreas"][key], value)
    # and the evidence rule differs from the annotating rule on the liver head (b, c, d taught it too)
    annotating = aggregate_updates(current, updates, "fedbn", weighting, "annotating")
    key = next(iter(current["head:liver"]))
    assert not np.allclose(result["head:liver"][key], annotating["head:liver"][key])


def test_head_weights_are_per_group_uniform_over_the_annotating_sites(current):
    rng = np.random.default_rng(2)
    updates = [_update(current, s, o, n, rng) for s, o, n in SPECS]
    aggregator = RoundAggregator(current, "fedbn", "uniform")
    for update in updates:
        aggregator.add(update)
    result = aggregator.result()
    key = next(iter(current["head:spleen"]))
    spleen = [u.partition["head:spleen"][key].astype(np.float64) for u in updates if "spleen" in u.organs]
    np.testing.assert_allclose(result["head:spleen"][key], np.mean(spleen, axis=0), rtol=1e-6)
    key = next(iter(current["shared"]))
    shared = [u.partition["shared"][key].astype(np.float64) for u in updates]
    np.testing.assert_allclose(result["shared"][key], np.mean(shared, axis=0), rtol=1e-6)


def test_evidence_heads_are_weighted_by_their_voxels_and_need_an_annotating_site(current):
    rng = np.random.default_rng(3)
    # a: annotates the liver; b: taught the liver head "not liver" on 300 voxels; c: only sends the pancreas head
    a = _update(current, "a", ("liver",), 10, rng)
    b = _update(current, "b", ("spleen",), 10, rng)
    b.partition["head:liver"] = _update(current, "x", ("liver",), 1, rng).partition["head:liver"]
    c = _update(current, "c", ("kidney",), 10, rng)
    c.partition["head:pancreas"] = _update(current, "y", ("pancreas",), 1, rng).partition["head:pancreas"]
    a.metrics["evidence-liver"], b.metrics["evidence-liver"] = 100.0, 300.0
    b.metrics["evidence-spleen"], c.metrics["evidence-kidney"], c.metrics["evidence-pancreas"] = 50.0, 50.0, 40.0
    aggregator = RoundAggregator(
        current, "fedbn", "uniform", head_aggregation="evidence", extra_heads=("liver", "pancreas")
    )
    assert aggregator.add(a) and aggregator.add(b) and aggregator.add(c)
    result = aggregator.result()
    key = next(iter(current["head:liver"]))
    expected = 0.25 * a.partition["head:liver"][key].astype(np.float64) + 0.75 * b.partition["head:liver"][key]
    np.testing.assert_allclose(result["head:liver"][key], expected, rtol=1e-6)
    for key, value in current["head:pancreas"].items():  # "not pancreas" alone teaches it nothing: kept
        np.testing.assert_array_equal(result["head:pancreas"][key], value)
    # a head sent without its evidence count is refused, whole reply
    d = _update(current, "d", ("liver",), 10, rng)
    aggregator = RoundAggregator(current, "fedbn", "uniform", head_aggregation="evidence")
    assert not aggregator.add(d) and "evidence" in aggregator.rejected["d"]


def test_every_reply_is_checked_before_it_enters_a_sum(current):
    rng = np.random.default_rng(4)
    good = [_update(current, s, o, n, rng) for s, o, n in SPECS[:2]]
    nan = _update(current, "c", ("kidney",), 20, rng)
    nan.partition["shared"][next(iter(nan.partition["shared"]))].flat[0] = np.nan
    again = _update(current, "a", ("liver",), 10, rng, scale=5.0)
    aggregator = RoundAggregator(current, "fedbn", "uniform")
    assert [aggregator.add(u) for u in (good[0], nan, good[1], again)] == [True, False, True, False]
    assert "non-finite" in aggregator.rejected["c"]
    assert aggregator.rejected["a (again)"] == "a second reply under the same site name this round"
    _assert_partitions_close(aggregator.result(), aggregate_updates(current, good, "fedbn", "uniform"))


def test_dp_clip_check_and_noise_per_group(current):
    rng = np.random.default_rng(5)
    privacy = DifferentialPrivacy(noise_multiplier=1.0, clipping_norm=0.5)
    small = [_update(current, s, o, n, rng, scale=1e-4) for s, o, n in SPECS[:2]]
    large = _update(current, "c", ("kidney",), 20, rng, scale=1.0)
    assert update_norm(large.partition, current) > 0.5
    aggregator = RoundAggregator(current, "fedbn", "uniform", privacy=privacy)
    assert aggregator.add(small[0]) and aggregator.add(small[1]) and not aggregator.add(large)
    assert "exceeds the DP clipping norm" in aggregator.rejected["c"]
    noised = aggregator.result(np.random.default_rng(0))
    plain = aggregate_updates(current, small, "fedbn", "uniform")
    key = max(current["shared"], key=lambda k: current["shared"][k].size)
    # noise std z*C/k = 0.25 on shared (k = 2 sites)
    assert np.std(noised["shared"][key] - plain["shared"][key]) == pytest.approx(0.25, rel=0.1)
    for key, value in current["head:kidney"].items():  # nobody contributed: no noise either
        np.testing.assert_array_equal(noised["head:kidney"][key], value)


def test_final_round_keeps_only_batchnorm_for_the_variants(current):
    rng = np.random.default_rng(6)
    updates = [_update(current, s, o, n, rng, batchnorm=True) for s, o, n in SPECS]
    aggregator = RoundAggregator(current, "fedbn", "uniform", final_round=True)
    for update in updates:
        aggregator.add(update)
    assert all(u.partition == {} and u.batchnorm is not None for u in aggregator.accepted)
    variants = batchnorm_variants(aggregator.accepted)
    expected = batchnorm_variants(updates)
    assert set(variants) == set(expected)
    _assert_partitions_close(variants, expected)
    fedavg = [_update(current, s, o, n, rng, "fedavg") for s, o, n in SPECS]
    aggregator = RoundAggregator(current, "fedavg", "uniform", final_round=True)
    for update in fedavg:
        aggregator.add(update)
    for kept, update in zip(aggregator.accepted, fedavg):
        assert kept.batchnorm is update.partition["batchnorm"]


# [arrival order, capped weights in the first round]
CAP_ORDERS = [
    [(10, 20, 1000), (10, 20, 60)],  # honest sites first: the batch rule's 3 x lower median 20
    [(1000, 10, 20), (60, 10, 20)],  # over-claimer first: held until three counts are known, then capped
    [(1000, 10), (30, 10)],  # two sites: both held to the end, the batch rule exactly
]


@pytest.mark.parametrize("order,weights", CAP_ORDERS)
def test_example_count_cap_of_the_streaming_rule(current, order, weights):
    rng = np.random.default_rng(7)
    updates = [_update(current, f"s{n}", ("liver",), n, rng) for n in order]
    aggregator = RoundAggregator(current, "fedbn", "examples")
    for update in updates:
        aggregator.add(update)
    key = next(iter(current["shared"]))
    w = np.asarray(weights, np.float64) / sum(weights)
    expected = sum(wi * u.partition["shared"][key].astype(np.float64) for wi, u in zip(w, updates))
    np.testing.assert_allclose(aggregator.result()["shared"][key], expected, rtol=1e-6, atol=1e-7)


def test_count_book_carries_over_rounds_so_a_late_over_claimer_is_capped(current):
    rng = np.random.default_rng(8)
    book, known = {}, {}
    round1 = [_update(current, s, ("liver",), n, rng) for s, n in (("a", 10), ("b", 20), ("c", 30), ("d", 40))]
    aggregator = RoundAggregator(current, "fedbn", "examples", known_sites=known, count_book=book)
    for update in round1:
        aggregator.add(update)
    assert book == {"a": 10, "b": 20, "c": 30, "d": 40} and set(known) == {"a", "b", "c", "d"}
    # round 2: site "e" arrives first claiming 10**6; the book (its claim included) has lower median 30 -> cap 90
    claim = _update(current, "e", ("liver",), 1_000_000, rng)
    honest = _update(current, "a", ("liver",), 10, rng)
    aggregator = RoundAggregator(current, "fedbn", "examples", known_sites=known, count_book=book)
    aggregator.add(claim)
    aggregator.add(honest)
    key = next(iter(current["shared"]))
    expected = (90 * claim.partition["shared"][key].astype(np.float64) + 10 * honest.partition["shared"][key]) / 100
    np.testing.assert_allclose(aggregator.result()["shared"][key], expected, rtol=1e-6, atol=1e-7)
    assert lower_median_cap(book.values()) == 90


def test_memory_holds_the_sums_not_the_round(current):
    """40 replies of a 1 M-weight body: the aggregator's peak is a few bodies, not 40."""
    body = {"shared": {"w": np.zeros(1_000_000, np.float32)}, "head:liver": {"b": np.zeros(2, np.float32)}}
    rng = np.random.default_rng(9)
    aggregator = RoundAggregator(body, "fedbn", "uniform")
    tracemalloc.start()
    try:
        for i in range(40):
            update = SiteUpdate(
                f"s{i}",
                ("liver",),
                5,
                {
                    "shared": {"w": rng.standard_normal(1_000_000).astype(np.float32)},
                    "head:liver": {"b": np.ones(2, np.float32)},
                },
            )
            aggregator.add(update)
            del update
        result = aggregator.result()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one_body = 4_000_000
    assert peak < 6 * one_body, f"peak {peak / 1e6:.1f} MB for 40 replies of {one_body / 1e6:.0f} MB"
    assert abs(float(result["shared"]["w"].mean())) < 0.01 and result["shared"]["w"].std() == pytest.approx(
        1 / np.sqrt(40), rel=0.01
    )


def test_running_sum_refuses_what_does_not_fit():
    running = RunningWeightedSum({"w": np.zeros(3, np.float32), "n": np.zeros((), np.int64)})
    running.add({"w": np.ones(3, np.float16), "n": np.array([4])}, 1.0)  # float16 and Flower's (1,) for 0-d
    running.add({"w": np.full(3, 3.0, np.float32), "n": np.array([8])}, 3.0)
    mean = running.mean()
    assert mean["w"].dtype == np.float32 and mean["n"].shape == () and int(mean["n"]) == 7
    np.testing.assert_allclose(mean["w"], 2.5)
    with pytest.raises(ValueError, match="differ"):
        running.add({"w": np.ones(3)}, 1.0)
    with pytest.raises(ValueError, match="shape"):
        running.add({"w": np.ones(4), "n": np.array([1])}, 1.0)
    with pytest.raises(ValueError, match="finite"):
        running.add({"w": np.ones(3), "n": np.array([1])}, float("nan"))
    with pytest.raises(ValueError, match="positive weight"):
        RunningWeightedSum({"w": np.zeros(1)}).mean()


# [connected, fraction, minimum, expected size]
SAMPLE_SIZES = [[100, 0.1, 2, 10], [100, 0.1, 15, 15], [4, 1.0, 2, 4], [4, 0.25, 2, 2], [3, 0.5, 5, 3], [10, 0.3, 0, 3]]


@pytest.mark.parametrize("connected,fraction,minimum,size", SAMPLE_SIZES)
def test_sample_size(connected, fraction, minimum, size):
    assert sample_size(connected, fraction, minimum) == size


def test_sampling_is_seeded_per_round_and_covers_the_sites():
    # Flower's node ids are unsigned 64-bit: beyond int64 and float64's exact range
    nodes = [int(n) for n in np.random.default_rng(0).integers(1, 2**64 - 1, 100, dtype=np.uint64)]
    first = sample_nodes(nodes, 0.1, 2, seed=3, server_round=1)
    assert first == sample_nodes(list(reversed(nodes)), 0.1, 2, seed=3, server_round=1)  # order of ids is irrelevant
    assert len(first) == 10 and set(first) <= set(nodes) and first == sorted(first)
    assert first != sample_nodes(nodes, 0.1, 2, seed=3, server_round=2)
    assert first != sample_nodes(nodes, 0.1, 2, seed=4, server_round=1)
    assert sample_nodes(nodes, 1.0, 2, seed=3, server_round=1) == sorted(nodes)
    # 200 rounds of 10 of 100: every site about 20 turns, none favoured (chi-square against uniform)
    turns = Counter(n for r in range(1, 201) for n in sample_nodes(nodes, 0.1, 2, seed=3, server_round=r))
    counts = np.array([turns[n] for n in nodes])
    assert counts.min() > 0 and chisquare(counts).pvalue > 0.01
    with pytest.raises(ValueError, match="fraction"):
        sample_size(10, 0.0, 1)


def test_float16_transfer_halves_the_shared_body_and_leaves_the_rest(current):
    shared = for_transfer("shared", current["shared"], "float16")
    for key, value in current["shared"].items():
        if value.dtype.kind == "f":
            assert shared[key].dtype == np.float16
            np.testing.assert_allclose(shared[key], value, rtol=2**-11, atol=2**-24)
    head = for_transfer("head:liver", current["head:liver"], "float16")
    assert all(head[k].dtype == v.dtype for k, v in current["head:liver"].items())
    assert for_transfer("shared", current["shared"], "float32") == current["shared"]
    assert sum(v.nbytes for v in shared.values()) == pytest.approx(
        sum(v.nbytes for v in current["shared"].values()) / 2, rel=0.01
    )
    with pytest.raises(ValueError, match="transfer-dtype"):
        for_transfer("shared", current["shared"], "bfloat16")


def test_a_two_site_examples_round_aggregates_both_replies(current):
    """Under ``weighting = "examples"`` replies wait until three sites are known; a federation of
    two never gets there in its first round, and its round must still count and sum both."""
    from SegVizLogic.federated.strategy import SegVizStrategy

    rng = np.random.default_rng(3)
    updates = [_update(current, "a", ("liver",), 10, rng), _update(current, "c", ("kidney",), 20, rng)]
    strategy = SegVizStrategy("fedbn", "examples", 2)
    strategy.current = current
    aggregator = strategy.start_round()
    for update in updates:
        assert aggregator.add(update)
    arrays, _ = strategy.finish_round(1, aggregator)
    assert arrays is not None and [u.site for u in strategy.last_updates] == ["a", "c"]
    _assert_partitions_close(strategy.current, aggregate_updates(current, updates, "fedbn", "examples"))
