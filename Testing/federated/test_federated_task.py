"""One site's round without Flower's runtime: BatchNorm restored from context.state and, after
leaving and re-joining, from the site folder; what the reply holds; settings round trips."""

from __future__ import annotations

import numpy as np
import pytest
from federated_tiny import TINY_NETWORK, TINY_PREPROCESSING, tiny_training

from SegVizLogic.federated.task import (
    APP_CONFIG_DEFAULTS,
    FederationSettings,
    load_local_batchnorm,
    train_client_round,
)
from SegVizLogic.network import build_network, partition_state


def _config(server_round, rounds=2, lineage="L1", strategy="fedbn"):
    settings = FederationSettings(
        rounds=rounds,
        local_epochs=1,
        strategy=strategy,
        network=TINY_NETWORK,
        training=tiny_training().to_dict(),
        preprocessing=TINY_PREPROCESSING,
    )
    return settings.client_config(server_round, lineage)


def _global(strategy="fedbn"):
    groups = partition_state(build_network(TINY_NETWORK))
    return {g: a for g, a in groups.items() if strategy == "fedavg" or g != "batchnorm"}


def test_batchnorm_survives_leaving_and_rejoining(make_sites):
    from flwr.app import RecordDict

    (site,) = make_sites(["site-liver"])
    state = RecordDict()
    first = train_client_round(site, _global(), _config(1), state=state, device="cpu")
    assert first.metrics["batchnorm-restored"] == 0
    assert set(first.partition) == {"shared", "head:liver"} and first.final_batchnorm is None
    # its head was taught on every voxel of its patches (one step of 2 patches of 32x32x16)
    assert first.metrics["evidence-liver"] == 2 * 32 * 32 * 16
    saved = load_local_batchnorm(site, "L1", TINY_NETWORK)
    assert saved is not None and saved[1]["round"] == 1
    # same run, new SuperNode process (context.state lost): resumes from the site folder
    second = train_client_round(site, _global(), _config(2), state=None, device="cpu")
    assert second.metrics["batchnorm-restored"] == 2
    assert second.final_batchnorm is not None  # final round: shared once, for the bundle
    count = next(k for k in second.final_batchnorm if k.endswith("num_batches_tracked"))
    assert int(np.asarray(second.final_batchnorm[count]).reshape(())) == 2
    # during a run: from context.state
    third = train_client_round(site, _global(), _config(2), state=state, device="cpu")
    assert third.metrics["batchnorm-restored"] == 1
    # another model lineage (a fresh run) must not reuse these statistics
    fresh = train_client_round(site, _global(), _config(1, lineage="L2"), state=None, device="cpu")
    assert fresh.metrics["batchnorm-restored"] == 0


def test_fedavg_reply_carries_batchnorm_and_no_final_copy(make_sites):
    (site,) = make_sites(["site-spleen"])
    result = train_client_round(site, _global("fedavg"), _config(2, strategy="fedavg"), device="cpu")
    assert set(result.partition) == {"shared", "head:spleen", "batchnorm"} and result.final_batchnorm is None
    assert result.site == "site-spleen" and result.organs == ("spleen",)
    assert {"num-examples", "loss", "train-seconds"} <= set(result.metrics)
    assert all(isinstance(v, (int, float)) for v in result.metrics.values())


def test_settings_round_trip_through_the_run_config():
    settings = FederationSettings(
        rounds=4,
        strategy="fedavg",
        weighting="examples",
        network=TINY_NETWORK,
        training=tiny_training().to_dict(),
        preprocessing=TINY_PREPROCESSING,
        out_dir="/x",
    )
    config = settings.to_run_config()
    assert set(config) == set(APP_CONFIG_DEFAULTS)
    assert FederationSettings.from_run_config(config) == settings
    assert FederationSettings.from_run_config({}) == FederationSettings()
    with pytest.raises(ValueError, match="strategy"):
        FederationSettings(strategy="fedprox")


def test_a_site_joining_late_starts_from_the_averaged_batchnorm(make_sites):
    """No BatchNorm of this lineage at the site: it starts from the federation's averaged
    BatchNorm the coordinator sent (gamma 3 here), not from the initial gamma 1."""
    from SegVizLogic.federated import AVERAGED_BATCHNORM_RECORD

    (site,) = make_sites(["site-kidney"])
    averaged = partition_state(build_network(TINY_NETWORK))["batchnorm"]
    averaged = {k: np.full_like(v, 3.0) if k.endswith(".weight") else v for k, v in averaged.items()}
    groups = {**_global(), AVERAGED_BATCHNORM_RECORD: averaged}
    late = train_client_round(site, groups, _config(1), state=None, device="cpu")
    assert late.metrics["batchnorm-restored"] == 3
    saved, _ = load_local_batchnorm(site, "L1", TINY_NETWORK)
    gammas = np.concatenate([np.ravel(v) for k, v in saved.items() if k.endswith(".weight")])
    assert np.all(np.abs(gammas - 3.0) < 0.05)  # one local step away from the averaged gamma
    # a site with its own BatchNorm of the lineage keeps it: the averaged one is only a start
    again = train_client_round(site, groups, _config(2), state=None, device="cpu")
    assert again.metrics["batchnorm-restored"] == 2
    # without the record a newcomer starts from the initial BatchNorm, as before
    (fresh,) = make_sites(["site-liver"])
    initial = train_client_round(fresh, _global(), _config(1), state=None, device="cpu")
    assert initial.metrics["batchnorm-restored"] == 0
    saved, _ = load_local_batchnorm(fresh, "L1", TINY_NETWORK)
    gammas = np.concatenate([np.ravel(v) for k, v in saved.items() if k.endswith(".weight")])
    assert np.all(np.abs(gammas - 1.0) < 0.05)


def test_under_evidence_aggregation_a_site_also_sends_the_heads_its_exclusion_term_taught(make_sites):
    (site,) = make_sites(["site-spleen"])
    config = {**_config(1), "head-aggregation": "evidence"}
    result = train_client_round(site, _global(), config, device="cpu")
    extra = set(result.partition) - {"shared", "head:spleen"}
    assert extra and extra <= {"head:liver", "head:pancreas", "head:kidney"}
    for group in extra:  # "not <organ>" on the spleen voxels of its patches: fewer than all their voxels
        assert 0 < result.metrics["evidence-" + group.split(":")[1]] < result.metrics["evidence-spleen"]
