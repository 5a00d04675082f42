"""One entry point, two Flower engines: ``engine="auto"`` picks the simulation engine only when Ray
imports, and a tiny federation trained in the deployment engine on loopback (a SuperLink and one
site process each, no Ray) gives the simulation engine's model, round by round."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from federated_tiny import TINY_NETWORK, tiny_run_options

from SegVizLogic.bundle import load_bundle
from SegVizLogic.errors import SegVizInputError
from SegVizLogic.federated import simulation
from SegVizLogic.federated.simulation import choose_engine, run_federated_simulation, simulation_available
from SegVizLogic.network import build_network
from SegVizLogic.training import seed_everything


def test_auto_is_the_deployment_engine_without_ray(monkeypatch):
    monkeypatch.setattr(simulation, "simulation_available", lambda: False)
    assert choose_engine("auto") == "deployment"
    assert choose_engine("deployment") == "deployment"
    with pytest.raises(SegVizInputError, match=r"needs Ray: pip install 'segviz\[simulation\]'"):
        choose_engine("simulation")
    monkeypatch.setattr(simulation, "simulation_available", lambda: True)
    assert choose_engine("auto") == "simulation"
    with pytest.raises(SegVizInputError, match="engine must be one of"):
        choose_engine("ray")


def test_hooks_need_the_simulation_engine(make_sites, tmp_path):
    with pytest.raises(SegVizInputError, match="need the simulation engine"):
        run_federated_simulation(make_sites()[:1], tmp_path / "out", engine="deployment", on_round=print)
    assert not (tmp_path / "out").exists()


def _train(sites, out, engine):
    return load_bundle(run_federated_simulation(sites, out, **tiny_run_options(engine=engine)))


@pytest.fixture(scope="module")
def two_sites(phantom_root, tmp_path_factory):
    import shutil

    tmp = tmp_path_factory.mktemp("engines")
    return [shutil.copytree(phantom_root / n, tmp / "sites" / n) for n in ("site-liver", "site-spleen")], tmp


@pytest.fixture(scope="module")
def deployed(two_sites):
    """The federation in Flower's deployment engine on loopback: runs with or without Ray."""
    sites, tmp = two_sites
    return _train(sites, tmp / "deployment", "deployment")


def test_the_deployment_engine_runs_the_federation_without_ray(deployed):
    assert deployed.provenance["mode"] == "deployment"
    assert [r["round"] for r in deployed.metrics["rounds"]] == [1, 2]
    for entry in deployed.metrics["rounds"]:
        assert set(entry["sites"]) == {"site-liver", "site-spleen"} and not entry["dropped"]
        assert 0 <= entry["dice"]["liver"] <= 1 and entry["sites"]["site-liver"]["num-examples"] == 1
    # round 2: each site process restored its own BatchNorm from round 1 (FedBN)
    assert all(m["batchnorm-restored"] == 1 for m in deployed.metrics["rounds"][1]["sites"].values())
    assert {"averaged", "site:site-liver", "site:site-spleen"} <= set(deployed.batchnorm_variants)
    # after the final round each SuperNode's ClientApp answered the threshold question
    asked = deployed.metrics["threshold_validation"]
    assert asked["sites"] == ["site-liver", "site-spleen"] and asked["failed"] == {}
    assert (deployed.default_batchnorm, deployed.threshold) == (asked["batchnorm"], asked["threshold"])
    assert list(asked["table"]) == ["adapt", "adapt-organs"]
    assert all(set(rows) == {"0.5", "0.4", "0.3", "0.2", "0.1"} for rows in asked["table"].values())


@pytest.mark.skipif(not simulation_available(), reason="the comparison needs Flower's simulation engine (ray)")
def test_both_engines_train_the_same_model(two_sites, deployed):
    """Same sites, seed and settings. Each site seeds torch the same way in both engines, so what
    differs is only floating-point order (threads per process, summation order of the replies):
    per-round loss agrees to 1e-4. Validation runs the network in bfloat16 as ``segviz infer`` does,
    whose 8-bit mantissa turns those differences into a few flipped voxels near the threshold: its
    Dice agrees to 0.01 (seen: 2.5e-4). Weight tensors agree to 1e-3 of their norm; the conv biases
    in front of a BatchNorm only to 2 x rounds x lr, because BatchNorm removes them, their
    gradient is rounding noise, and Adam scales any gradient to a step of about lr."""
    sites, tmp = two_sites
    simulated = _train(sites, tmp / "simulation", "simulation")
    assert (simulated.provenance["mode"], deployed.provenance["mode"]) == ("simulation", "deployment")
    for sim_round, dep_round in zip(simulated.metrics["rounds"], deployed.metrics["rounds"], strict=True):
        assert set(sim_round["sites"]) == set(dep_round["sites"]) == {"site-liver", "site-spleen"}
        assert dep_round["loss"] == pytest.approx(sim_round["loss"], rel=1e-4)
        for organ, dice in sim_round["dice"].items():
            assert dep_round["dice"][organ] == pytest.approx(dice, abs=0.01)
    assert set(simulated.state) == set(deployed.state)
    for batchnorm, rows in simulated.metrics["threshold_validation"]["table"].items():
        for threshold, row in rows.items():
            for organ, dice in row.items():
                deployed_dice = deployed.metrics["threshold_validation"]["table"][batchnorm][threshold][organ]
                assert deployed_dice == pytest.approx(dice, abs=0.02)
    # a conv whose output goes through BatchNorm: its block has an ``adn.N`` (MONAI's norm)
    before_batchnorm = {
        key
        for key in simulated.state
        if key.endswith("conv.bias") and key[: -len("conv.bias")] + "adn.N.weight" in simulated.state
    }
    assert before_batchnorm
    for key, value in simulated.state.items():
        a, b = np.asarray(value, np.float64), np.asarray(deployed.state[key], np.float64)
        if key in before_batchnorm:
            np.testing.assert_allclose(b, a, rtol=0, atol=2 * 2 * 1e-2, err_msg=key)
        else:
            # Adam turns a near-zero gradient's rounding noise into a step of up to lr for that one
            # element (one of 2592 moved 1.8e-4 once), so compare each tensor as a whole: its
            # difference is a thousandth of its norm at most.
            assert np.linalg.norm(b - a) <= 1e-3 * max(np.linalg.norm(a), 1e-6), key
    # and the comparison is not of two untrained models: training moved the weights by far more
    seed_everything(0)
    initial = build_network(TINY_NETWORK).state_dict()
    assert (
        max(
            float((initial[k].double() - torch.as_tensor(np.asarray(v, np.float64))).abs().max())
            for k, v in simulated.state.items()
            if k.endswith("conv.weight")
        )
        > 1e-3
    )
