"""Differential privacy (client-side clipping with Flower's functions, server-side noise per
averaged group) and a live round in Flower's simulation engine where one site sends NaN: the
coordinator names it and leaves it out, every other reply is clipped, and the bundle states
the privacy parameters."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from federated_tiny import TINY_NETWORK, TINY_PREPROCESSING, tiny_training

from SegVizLogic.bundle import load_bundle
from SegVizLogic.federated.privacy import (
    DifferentialPrivacy,
    add_group_noise,
    averaged_group_sizes,
    clip_update,
    privacy_report,
    update_norm,
)
from SegVizLogic.federated.simulation import run_federated_simulation, simulation_available
from SegVizLogic.federated.strategy import SiteUpdate
from SegVizLogic.federated.task import FederationSettings
from SegVizLogic.progress import ProgressReporter, parse_progress_line


def test_clipping_bounds_the_whole_update_and_keeps_its_direction():
    rng = np.random.default_rng(0)
    received = {
        "shared": {"w": rng.standard_normal((8, 5)).astype(np.float32), "n": np.array([3])},
        "head:liver": {"h": rng.standard_normal(7).astype(np.float32)},
    }
    delta = {"shared": {"w": np.full((8, 5), 0.5, np.float32)}, "head:liver": {"h": np.full(7, -0.5, np.float32)}}
    sent = {
        "shared": {"w": received["shared"]["w"] + delta["shared"]["w"], "n": np.array([9])},
        "head:liver": {"h": received["head:liver"]["h"] + delta["head:liver"]["h"]},
        "head:spleen": {"h": np.ones(7, np.float32)},  # not received: passes untouched
    }
    norm = 0.5 * math.sqrt(40 + 7)
    clipped, before = clip_update(sent, received, clipping_norm=1.0)
    assert before == pytest.approx(norm, rel=1e-5)
    assert update_norm(clipped, received) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(clipped["shared"]["w"] - received["shared"]["w"], delta["shared"]["w"] / norm, rtol=1e-4)
    assert clipped["shared"]["n"].tolist() == [9] and clipped["shared"]["w"].dtype == np.float32
    np.testing.assert_array_equal(clipped["head:spleen"]["h"], sent["head:spleen"]["h"])
    unclipped, _ = clip_update(sent, received, clipping_norm=100.0)
    np.testing.assert_array_equal(unclipped["shared"]["w"], sent["shared"]["w"])


def test_noise_is_z_times_c_over_the_sites_averaged_into_each_group():
    privacy = DifferentialPrivacy(noise_multiplier=0.5, clipping_norm=2.0)
    zeros = {
        "shared": {"w": np.zeros(200_000, np.float32)},
        "head:liver": {"w": np.zeros(200_000, np.float32)},
        "head:pancreas": {"w": np.zeros(10, np.float32), "n": np.array([4])},
    }
    noised = add_group_noise(zeros, {"shared": 4, "head:liver": 1}, privacy, np.random.default_rng(1))
    assert np.std(noised["shared"]["w"]) == pytest.approx(0.5 * 2.0 / 4, rel=0.01)
    assert np.std(noised["head:liver"]["w"]) == pytest.approx(0.5 * 2.0 / 1, rel=0.01)
    np.testing.assert_array_equal(noised["head:pancreas"]["w"], 0)  # nobody trained it this round
    updates = [
        SiteUpdate("a", ("liver",), 1, {"shared": {}, "head:liver": {}}),
        SiteUpdate("b", ("liver", "kidney"), 1, {"shared": {}, "head:liver": {}, "head:kidney": {}}),
    ]
    assert averaged_group_sizes(updates, "fedbn") == {"shared": 2, "head:liver": 2, "head:kidney": 1}


def test_settings_and_report_state_the_privacy_parameters():
    with pytest.raises(ValueError, match="both"):
        FederationSettings(dp_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="uniform"):
        FederationSettings(dp_noise_multiplier=1.0, dp_clipping_norm=0.5, weighting="examples")
    settings = FederationSettings(dp_noise_multiplier=1.0, dp_clipping_norm=0.5)
    assert settings.share_final_batchnorm is False  # BatchNorm statistics would leave un-noised
    assert settings.client_config(1, "x")["dp-clipping-norm"] == 0.5
    assert "dp-clipping-norm" not in FederationSettings().client_config(1, "x")
    again = FederationSettings.from_run_config(settings.to_run_config())
    assert again.privacy == DifferentialPrivacy(1.0, 0.5)
    assert privacy_report(None, 3, 4) == {"differential_privacy": False}
    report = privacy_report(settings.privacy, rounds=24, sites=4)
    assert report["noise_multiplier"] == 1.0 and report["clipping_norm"] == 0.5 and report["rounds"] == 24
    assert (report["epsilon"] is None and "dp-accounting" in report["epsilon_note"]) or report["epsilon"] > 0


def poison_mod(message, context, call_next):
    """Site 2 (kidney) sends NaN in its shared body in round 1, after clipping."""
    reply = call_next(message, context)
    if (
        int(context.node_config["partition-id"]) == 2
        and int(message.content.config_records["config"]["server-round"]) == 1
    ):
        from SegVizLogic.federated.transfer import content_groups, put_groups

        groups = content_groups(reply.content)
        arrays = {k: v.copy() for k, v in groups["shared"].items()}
        first = next(iter(arrays))
        arrays[first].flat[0] = np.nan
        put_groups(reply.content, {**groups, "shared": arrays})
    return reply


def clip_check_mod(folder: str):
    """Writes each reply's update norm as it leaves the site (after dp_clipping_mod) and the
    norm before clipping; a file per reply (the virtual sites run in Ray's processes)."""

    def mod(message, context, call_next):
        from SegVizLogic.federated.transfer import content_groups

        received = content_groups(message.content)
        reply = call_next(message, context)
        sent = content_groups(reply.content)
        before = float(reply.content.metric_records["metrics"]["dp-update-norm"])
        name = f"{context.node_config['partition-id']}-{message.content.config_records['config']['server-round']}"
        (Path(folder) / f"{name}.json").write_text(json.dumps([update_norm(sent, received), before]), encoding="utf-8")
        return reply

    return mod


@pytest.mark.skipif(not simulation_available(), reason="Flower's simulation engine needs ray")
def test_live_round_rejects_a_nan_site_and_clips_every_reply(phantom_root, tmp_path):
    sites = [shutil.copytree(phantom_root / n, tmp_path / n) for n in ("site-liver", "site-spleen", "site-kidney")]
    (tmp_path / "norms").mkdir()
    progress = tmp_path / "progress.jsonl"
    with open(progress, "w") as stream:
        path = run_federated_simulation(
            sites,
            tmp_path / "out",
            rounds=2,
            local_epochs=1,
            lr=1e-2,
            preprocessing=TINY_PREPROCESSING,
            training_config=tiny_training(),
            network_config=TINY_NETWORK,
            reporter=ProgressReporter("json", stream=stream),
            device="cpu",
            client_mods=[poison_mod, clip_check_mod(str(tmp_path / "norms"))],
            min_clients=2,
            dp_noise_multiplier=0.01,
            dp_clipping_norm=1e-4,  # far below a tiny round's update: clipping binds
        )
    events = [e for e in map(parse_progress_line, progress.read_text(encoding="utf-8").splitlines()) if e]
    rejected = [e for e in events if e["event"] == "reply_rejected"]
    assert [(e["round"], e["site"]) for e in rejected] == [(1, "site-kidney")]
    assert "non-finite" in rejected[0]["reason"]
    finished = {e["round"]: e["metrics"]["num_examples"] for e in events if e["event"] == "round_finished"}
    assert finished == {1: 2, 2: 3}  # kidney left out of round 1 only

    norms = [json.loads(p.read_text(encoding="utf-8")) for p in (tmp_path / "norms").glob("*.json")]
    assert len(norms) == 6
    assert all(after <= 1e-4 * 1.001 for after, _ in norms)
    assert all(before > 1e-4 for _, before in norms)  # clipping did bind

    bundle = load_bundle(path)
    assert all(np.all(np.isfinite(v)) for v in bundle.state.values() if np.asarray(v).dtype.kind == "f")
    privacy = bundle.provenance["privacy"]
    assert privacy["differential_privacy"] and privacy["noise_multiplier"] == 0.01
    assert privacy["clipping_norm"] == 1e-4 and privacy["rounds"] == 2
    assert bundle.provenance["share_final_batchnorm"] is False and not bundle.batchnorm_variants
    assert bundle.metrics["rounds"][0]["rejected"] == {"site-kidney": rejected[0]["reason"]}
