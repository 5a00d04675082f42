"""``segviz experiment --config experiments/ci.toml`` end to end on the CPU (a few minutes).

One run (module fixture) is checked for: per-case Dice from every arm, the report with its table
and figures, p-values equal to scipy's on the same per-case numbers, and FedBN keeping one
BatchNorm per site while FedAvg shares one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import wilcoxon

from SegVizLogic.bundle import load_bundle
from SegVizLogic.experiments.config import ARMS, load_config
from SegVizLogic.experiments.statistics import MIN_PAIRS, WILCOXON_KWARGS
from SegVizLogic.network import PARTITION_BATCHNORM, build_network, partition_state

REPO = Path(__file__).resolve().parents[2]
CI_CONFIG = REPO / "experiments" / "ci.toml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment") / "ci"
    # PASSIVE: on a busy machine spinning OpenMP threads make the tiny network 10-30x slower.
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "SegVizLogic.cli",
            "experiment",
            "--config",
            str(CI_CONFIG),
            "--out",
            str(out),
            "--progress",
            "json",
        ],
        capture_output=True,
        check=False,
        text=True,
        cwd=REPO,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return out, results, events


def test_every_arm_has_per_case_dice(run):
    _out, results, events = run
    config = load_config(CI_CONFIG)
    n_cases = results["external"]["cases"]
    for arm in ARMS:
        assert arm in results["rows"], arm
        for organ in results["organs"]:
            values = [r["dice"] for r in results["records"] if r["arm"] == arm and r["organ"] == organ]
            assert len(values) == n_cases * len(config.seeds), (arm, organ)
            assert all(0.0 <= v <= 1.0 for v in values)
    assert events[-1]["event"] == "done"
    assert results["recommended_batchnorm"] in results["batchnorm"]["choices"]
    assert set(results["batchnorm"]["choices"]) == set(config.batchnorm)
    # The same budget for every arm: rounds x local epochs.
    assert results["config"]["federation"]["total_epochs"] == config.federation.rounds * config.federation.local_epochs
    for arm in ("fedavg", "fedbn"):
        rounds = results["rounds"][arm]["0"]
        assert [r["round"] for r in rounds] == list(range(1, config.federation.rounds + 1))


def test_report_has_table_and_figures(run):
    out, results, _ = run
    report = (out / "report.md").read_text(encoding="utf-8")
    table = [line for line in report.splitlines() if line.startswith("| ")]
    for arm in results["rows"]:
        assert any(line.startswith((f"| {arm} |", f"| **{arm}** |")) for line in table), arm
    assert "paper / ours" in report and "segviz experiment --config" in report
    for name in ("dice_by_arm.png", "val_dice_rounds.png", "overlays.png", "batchnorm_choices.png"):
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC, name
        assert f"]({name})" in report


def test_wilcoxon_p_values_match_scipy(run):
    _, results, _ = run
    checked = 0
    for arm, per_organ in results["wilcoxon_vs_fedbn"].items():
        for organ, test in per_organ.items():
            ref = {
                (r["seed"], r["case"]): r["dice"]
                for r in results["records"]
                if r["arm"] == "fedbn" and r["organ"] == organ
            }
            other = {
                (r["seed"], r["case"]): r["dice"] for r in results["records"] if r["arm"] == arm and r["organ"] == organ
            }
            keys = sorted(set(ref) & set(other))
            a, b = np.array([ref[k] for k in keys]), np.array([other[k] for k in keys])
            assert test["n"] == len(keys)
            nonzero = int(np.count_nonzero(a - b))
            if nonzero < MIN_PAIRS:
                assert test["p"] is None and test["reason"]
            else:
                assert test["p"] == pytest.approx(float(wilcoxon(a, b, **WILCOXON_KWARGS).pvalue), rel=1e-9)
                checked += 1
    assert checked > 0, "no p-value was computed: the CI config needs >= 6 external cases"


def _float_bn(arrays):
    return {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items() if "num_batches_tracked" not in k}


def test_fedbn_keeps_batchnorm_per_site_fedavg_shares_it(run):
    _, results, _ = run
    bundles = results["bundles"]["seed-0"]
    fedbn, fedavg = load_bundle(bundles["fedbn"]), load_bundle(bundles["fedavg"])
    sites = [s["name"] for s in results["sites"]]
    model = build_network(fedbn.network_config)
    bn_keys = sorted(partition_state(model)[PARTITION_BATCHNORM])
    first_mean = next(k for k in bn_keys if k.endswith("running_mean"))

    # FedBN: each site's own BatchNorm, different between sites that scan differently.
    per_site = {s: _float_bn(fedbn.batchnorm_variants[f"site:{s}"]) for s in sites}
    for i, a in enumerate(sites):
        for b in sites[i + 1 :]:
            assert not np.allclose(per_site[a][first_mean], per_site[b][first_mean], atol=1e-4), (a, b)
    # ... never averaged into the global model (the server keeps the initial BatchNorm)...
    averaged = _float_bn(fedbn.batchnorm_variants["averaged"])
    assert not all(np.allclose(fedbn.state[k], averaged[k]) for k in averaged)
    # ... and kept on site between rounds (the sites' .segviz state, written by the last run: fedbn).
    for s in results["sites"]:
        state = json.loads((Path(s["path"]) / ".segviz" / "federated" / "state.json").read_text(encoding="utf-8"))
        assert state["strategy"] == "fedbn"
        with np.load(Path(s["path"]) / ".segviz" / "federated" / "batchnorm.npz") as saved:
            for key in per_site[s["name"]]:
                np.testing.assert_allclose(saved[key], per_site[s["name"]][key], rtol=1e-6, atol=1e-7)

    # FedAvg: one BatchNorm for every site, the average of the sites' updates.
    assert fedavg.default_batchnorm == "model"
    shared = _float_bn({k: fedavg.state[k] for k in bn_keys})
    fedavg_avg = _float_bn(fedavg.batchnorm_variants["averaged"])
    for key, value in shared.items():
        np.testing.assert_allclose(value, fedavg_avg[key], rtol=1e-5, atol=1e-6)
