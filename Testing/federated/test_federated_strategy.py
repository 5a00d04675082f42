"""Head-aware FedBN/FedAvg aggregation on plain numpy partitions (no Flower run needed)."""

from __future__ import annotations

import numpy as np
import pytest

from SegVizLogic.federated.strategy import (
    SiteUpdate,
    aggregate_updates,
    batchnorm_variants,
    groups_sent_to_clients,
    reply_weights,
    round_metrics,
    weighted_average,
)
from SegVizLogic.network import NetworkConfig, build_network, partition_state

TINY = NetworkConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=1, body_features=4)


def _perturbed(partition, rng, scale=1.0):
    return {
        g: {
            k: (v + scale * rng.standard_normal(v.shape)).astype(v.dtype)
            if v.dtype.kind == "f"
            else v + rng.integers(1, 5)
            for k, v in arrays.items()
        }
        for g, arrays in partition.items()
    }


@pytest.fixture
def setup():
    rng = np.random.default_rng(0)
    current = partition_state(build_network(TINY))
    specs = [("a", ("liver",), 10), ("b", ("liver", "spleen"), 30), ("c", ("kidney",), 20)]
    updates = []
    for name, organs, n in specs:
        full = _perturbed(current, rng)
        sent = {
            "shared": full["shared"],
            "batchnorm": full["batchnorm"],
            **{f"head:{o}": full[f"head:{o}"] for o in organs},
        }
        updates.append(
            SiteUpdate(
                name, organs, n, sent, {"loss": float(n), **{f"dice-{o}": 0.5 for o in organs}}, full["batchnorm"]
            )
        )
    return current, updates


TEST_WEIGHTS = [
    [[10, 30], "examples", [0.25, 0.75]],
    [[10, 30], "uniform", [0.5, 0.5]],
    [[0, 5, 5], "examples", [0.0, 0.5, 0.5]],
]


@pytest.mark.parametrize("counts, weighting, expected", TEST_WEIGHTS)
def test_reply_weights(counts, weighting, expected):
    np.testing.assert_allclose(reply_weights(counts, weighting), expected)


def test_reply_weights_rejects_bad_input():
    with pytest.raises(ValueError, match="weighting"):
        reply_weights([1], "median")
    with pytest.raises(ValueError, match="positive sum"):
        reply_weights([0, 0], "examples")


def test_weighted_average_keeps_dtypes_and_checks_keys():
    out = weighted_average(
        [{"w": np.float32([1, 2]), "n": np.int64(3)}, {"w": np.float32([3, 4]), "n": np.int64(6)}], [0.5, 0.5]
    )
    assert out["w"].dtype == np.float32 and out["n"].dtype == np.int64
    np.testing.assert_allclose(out["w"], [2, 3])
    assert int(out["n"]) == 4  # 4.5 rounds to even
    with pytest.raises(ValueError, match="different tensors"):
        weighted_average([{"w": np.zeros(1)}, {"v": np.zeros(1)}], [0.5, 0.5])


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_fedbn_shared_heads_and_batchnorm(setup, weighting):
    current, updates = setup
    result = aggregate_updates(current, updates, "fedbn", weighting)
    counts = np.array([u.num_examples for u in updates], float)
    w = counts / counts.sum() if weighting == "examples" else np.full(3, 1 / 3)
    for key, value in result["shared"].items():
        expected = sum(wi * u.partition["shared"][key].astype(np.float64) for wi, u in zip(w, updates))
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
    # liver: sites a and b only
    wl = counts[:2] / counts[:2].sum() if weighting == "examples" else np.array([0.5, 0.5])
    for key, value in result["head:liver"].items():
        expected = wl[0] * updates[0].partition["head:liver"][key] + wl[1] * updates[1].partition["head:liver"][key]
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
    # spleen and kidney: one site each -> exactly that site's head
    for organ, site in (("spleen", 1), ("kidney", 2)):
        for key, value in result[f"head:{organ}"].items():
            np.testing.assert_array_equal(value, updates[site].partition[f"head:{organ}"][key])
    # pancreas: nobody trained it -> unchanged
    for key, value in result["head:pancreas"].items():
        np.testing.assert_array_equal(value, current["head:pancreas"][key])
    # FedBN: the global BatchNorm is never touched
    for key, value in result["batchnorm"].items():
        np.testing.assert_array_equal(value, current["batchnorm"][key])


def test_fedavg_averages_batchnorm(setup):
    current, updates = setup
    result = aggregate_updates(current, updates, "fedavg", "uniform")
    for key, value in result["batchnorm"].items():
        if value.dtype.kind == "f":
            expected = np.mean([u.partition["batchnorm"][key].astype(np.float64) for u in updates], axis=0)
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)


def test_a_head_sent_by_a_site_that_does_not_annotate_the_organ_is_ignored(setup):
    current, updates = setup
    intruder = updates[2]
    intruder.partition["head:liver"] = {k: v + 100 for k, v in current["head:liver"].items()}
    result = aggregate_updates(current, updates, "fedbn", "uniform")
    for value in result["head:liver"].values():
        assert np.all(np.abs(value) < 50)


def test_missing_shared_is_an_error(setup):
    current, updates = setup
    del updates[0].partition["shared"]
    with pytest.raises(ValueError, match="sent no 'shared'"):
        aggregate_updates(current, updates)
    with pytest.raises(ValueError, match="without replies"):
        aggregate_updates(current, [])


def test_groups_sent_to_clients(setup):
    current, _ = setup
    assert "batchnorm" not in groups_sent_to_clients(current, "fedbn")
    assert "batchnorm" in groups_sent_to_clients(current, "fedavg")


def test_batchnorm_variants(setup):
    _, updates = setup
    variants = batchnorm_variants(updates, "uniform")
    assert set(variants) == {"averaged", "organ:liver", "organ:spleen", "organ:kidney", "site:a", "site:b", "site:c"}
    key = next(k for k, v in updates[0].batchnorm.items() if v.dtype.kind == "f")
    np.testing.assert_allclose(
        variants["organ:liver"][key], (updates[0].batchnorm[key] + updates[1].batchnorm[key]) / 2, rtol=1e-5
    )
    np.testing.assert_array_equal(variants["organ:spleen"][key], updates[1].batchnorm[key])
    np.testing.assert_array_equal(variants["site:c"][key], updates[2].batchnorm[key])
    assert batchnorm_variants([SiteUpdate("x", ("liver",), 1, {}, {}, None)]) == {}


def test_round_metrics(setup):
    _, updates = setup
    metrics = round_metrics(updates)
    assert metrics["loss"] == pytest.approx(20.0)
    assert metrics["dice"] == {"liver": 0.5, "spleen": 0.5, "kidney": 0.5}
    assert metrics["num_examples"] == 60 and set(metrics["sites"]) == {"a", "b", "c"}


def test_evidence_rule_averages_each_head_by_the_voxels_it_was_taught_on(setup):
    """Sites also send the heads their exclusion term taught; each head is averaged over its
    senders, weighted by their evidence counts; a head nobody annotates stays as it is."""
    current, updates = setup
    a, b, c = updates
    rng = np.random.default_rng(1)
    for update, extra in ((a, ("kidney", "pancreas")), (b, ("kidney",)), (c, ("liver",))):
        for organ in extra:  # taught "not <organ>" on the site's own organ voxels
            update.partition[f"head:{organ}"] = _perturbed({"h": current[f"head:{organ}"]}, rng)["h"]
    evidence = {
        "a": {"liver": 100.0, "kidney": 30.0, "pancreas": 30.0},
        "b": {"liver": 300.0, "spleen": 200.0, "kidney": 50.0},
        "c": {"kidney": 100.0, "liver": 20.0},
    }
    for update in updates:
        update.metrics.update({f"evidence-{o}": v for o, v in evidence[update.site].items()})
    result = aggregate_updates(current, updates, "fedbn", "uniform", head_aggregation="evidence")
    for organ, senders in (("liver", (a, b, c)), ("kidney", (a, b, c)), ("spleen", (b,))):
        weights = np.array([evidence[u.site][organ] for u in senders])
        weights /= weights.sum()
        for key, value in result[f"head:{organ}"].items():
            expected = sum(w * u.partition[f"head:{organ}"][key].astype(np.float64) for w, u in zip(weights, senders))
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
    for key, value in result["head:pancreas"].items():  # only "not pancreas" was taught: unchanged
        np.testing.assert_array_equal(value, current["head:pancreas"][key])
    # the previous rule ignores the exclusion-only heads
    annotating = aggregate_updates(current, updates, "fedbn", "uniform", head_aggregation="annotating")
    for key, value in annotating["head:kidney"].items():
        np.testing.assert_array_equal(value, c.partition["head:kidney"][key])
    del c.metrics["evidence-kidney"], a.metrics["evidence-kidney"], b.metrics["evidence-kidney"]
    with pytest.raises(ValueError, match="evidence"):
        aggregate_updates(current, updates, "fedbn", "uniform", head_aggregation="evidence")
