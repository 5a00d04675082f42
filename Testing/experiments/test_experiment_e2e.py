"""``segviz experiment --config experiments/ci.toml`` end to end on the CPU (a few minutes).

One run (module fixture), under an audit hook that logs every access to the external set's folder,
is checked for: the external set untouched until every arm's options were frozen in results.json;
each arm's choice being the best of its candidates on the training sites' validation cases; per-case
Dice from every arm and seed; p-values, Holm correction and effect sizes equal to scipy's on the
seed-averaged cases; the report; and FedBN keeping one BatchNorm per site while FedAvg shares one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import bootstrap, wilcoxon

from SegVizLogic.bundle import load_bundle
from SegVizLogic.experiments.config import ARMS, load_config
from SegVizLogic.experiments.statistics import BOOTSTRAP_KWARGS, MIN_PAIRS, WILCOXON_KWARGS, holm
from SegVizLogic.network import PARTITION_BATCHNORM, build_network, partition_state

REPO = Path(__file__).resolve().parents[2]
CI_CONFIG = REPO / "experiments" / "ci.toml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow

# Runs `segviz` with a hook that records every open, listing and SimpleITK read of a path inside the
# external folder, and whether results.json held the frozen choices at that moment.
AUDITED_CLI = textwrap.dedent(
    """
    import json, os, sys
    import SimpleITK as sitk

    external, freeze, log = (os.path.abspath(p) for p in sys.argv[1:4])
    busy = []

    def frozen():
        try:
            with open(freeze, encoding="utf-8") as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            return False
        return record.get("stage") in ("frozen", "complete") and bool(record.get("selection"))

    def touched(path, how):
        if busy or not isinstance(path, (str, bytes, os.PathLike)):
            return
        path = os.path.abspath(os.fsdecode(path))
        if path == external or path.startswith(external + os.sep):
            busy.append(1)
            try:
                entry = {"path": path, "how": how, "frozen": frozen()}
                with open(log, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(entry) + "\\n")
            finally:
                busy.clear()

    def hook(event, args):
        if event in ("open", "os.listdir", "os.scandir") and args:
            touched(args[0], event)

    sys.addaudithook(hook)
    for cls, method in ((sitk.ImageFileReader, "SetFileName"), (sitk.ImageSeriesReader, "SetFileNames")):
        original = getattr(cls, method)

        def wrapped(self, name, _original=original, _method=method):
            for item in [name] if isinstance(name, (str, os.PathLike)) else list(name):
                touched(item, "SimpleITK." + _method)
            return _original(self, name)

        setattr(cls, method, wrapped)
    original_read = sitk.ReadImage

    def read_image(name, *args, **kwargs):
        touched(name, "SimpleITK.ReadImage")
        return original_read(name, *args, **kwargs)

    sitk.ReadImage = read_image
    from SegVizLogic.cli import main

    sys.exit(main(sys.argv[4:]))
    """
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment") / "ci"
    log = out.parent / "external-access.jsonl"
    # PASSIVE: on a busy machine spinning OpenMP threads make the tiny network 10-30x slower.
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            AUDITED_CLI,
            str(out / "data" / "external"),
            str(out / "results.json"),
            str(log),
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
        encoding="utf-8",
        cwd=REPO,
        env=env,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    accesses = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []
    return out, results, events, accesses


def test_external_set_untouched_until_the_arms_are_frozen(run):
    _, results, events, accesses = run
    reads = [a for a in accesses if a["how"].startswith("SimpleITK")]
    # The hook saw the external set being read (every case), and never before the freeze.
    assert len({a["path"] for a in reads}) >= 2 * results["external"]["cases"]
    assert accesses and all(a["frozen"] for a in accesses), [a for a in accesses if not a["frozen"]][:3]
    stages = [e.get("stage") for e in events if e["event"] == "stage"]
    assert stages.index("freeze") < max(i for i, s in enumerate(stages) if s == "report")
    # What was frozen is what was scored.
    assert results["stage"] == "complete" and results["frozen_at"] <= results["finished"]


def test_each_arm_gets_its_best_validation_candidate(run):
    _, results, _, _ = run
    training_sites = {s["name"] for s in results["sites"]}
    validation = results["validation"]["main"]
    assert {r["site"] for r in validation["records"]} == training_sites  # never the external set
    for arm in ARMS:
        scores = validation["scores"][arm]
        chosen = results["selection"]["main"][arm]
        complete = {k: c["score"] for k, c in scores.items() if c["score"] is not None}
        assert chosen["key"] == max(complete, key=complete.get)
        assert chosen["validation_score"] == pytest.approx(max(complete.values()))
        # Every arm is offered test-time BatchNorm re-estimation, not only FedBN; every arm but FedBN
        # also its own trained BatchNorm (FedBN's `model` BatchNorm was never trained by any site).
        offered = {c["option"]["batchnorm"] for c in scores.values()}
        assert "adapt" in offered and ("model" in offered) == (arm != "fedbn"), (arm, offered)
    assert {c["option"]["batchnorm"] for c in validation["scores"]["fedbn"].values()} == {"averaged", "adapt"}
    assert {c["option"]["batchnorm"] for c in validation["scores"]["fedavg"].values()} == {"model", "averaged", "adapt"}


def test_every_arm_and_seed_has_per_case_dice(run):
    _, results, events, _ = run
    config = load_config(CI_CONFIG)
    n_cases = results["external"]["cases"]
    analysis = results["analysis"]["main"]
    assert len(config.seeds) >= 2 and results["seeds"] == list(config.seeds)
    for arm in ARMS:
        assert arm in analysis["rows"], arm
        for organ in results["organs"]:
            rows = [r for r in results["records"] if r["arm"] == arm and r["organ"] == organ]
            assert sorted({r["seed"] for r in rows}) == list(config.seeds)
            assert len(rows) == n_cases * len(config.seeds), (arm, organ)
            assert all(0.0 <= r["dice"] <= 1.0 for r in rows)
            # Seed-averaged: one value per case, the mean over seeds.
            averaged = {
                r["case"]: r["dice"] for r in analysis["seed_averaged"] if r["arm"] == arm and r["organ"] == organ
            }
            assert len(averaged) == n_cases
            for case, value in averaged.items():
                assert value == pytest.approx(np.mean([r["dice"] for r in rows if r["case"] == case]))
    assert events[-1]["event"] == "done"
    fed = results["config"]["federation"]
    assert fed["total_epochs"] == fed["rounds"] * fed["local_epochs"]
    trained = results["points"]["main"]["trained"]
    assert {(t["arm"], t["seed"]) for t in trained} == {(a, s) for a in ARMS for s in config.seeds}
    rounds = results["points"]["main"]["rounds_metrics"]
    for arm in ("fedavg", "fedbn"):
        assert [r["round"] for r in rounds[f"{arm}/seed-0"]] == list(range(1, fed["rounds"] + 1))


def test_statistics_match_scipy_on_seed_averaged_cases(run):
    _, results, _, _ = run
    analysis = results["analysis"]["main"]
    averaged = analysis["seed_averaged"]
    computed = 0
    for arm, per_organ in analysis["tests"].items():
        raw = {}
        for organ, test in per_organ.items():
            ref = {r["case"]: r["dice"] for r in averaged if r["arm"] == "fedbn" and r["organ"] == organ}
            other = {r["case"]: r["dice"] for r in averaged if r["arm"] == arm and r["organ"] == organ}
            cases = sorted(set(ref) & set(other))
            a, b = np.array([ref[c] for c in cases]), np.array([other[c] for c in cases])
            assert test["n"] == len(cases) == results["external"]["cases"]
            assert test["effect"]["median"] == pytest.approx(float(np.median(a - b)))
            if np.ptp(a - b) > 0:
                ci = bootstrap(
                    (a - b,), np.median, rng=np.random.default_rng(0), **BOOTSTRAP_KWARGS
                ).confidence_interval
                assert (test["effect"]["ci_low"], test["effect"]["ci_high"]) == (
                    pytest.approx(ci.low),
                    pytest.approx(ci.high),
                )
            if np.count_nonzero(a - b) < MIN_PAIRS:
                assert test["p"] is None and test["reason"]
                raw[organ] = None
            else:
                raw[organ] = float(wilcoxon(a, b, **WILCOXON_KWARGS).pvalue)
                assert test["p"] == pytest.approx(raw[organ], rel=1e-9)
                computed += 1
        for organ, p in holm(raw, family=len(raw)).items():
            assert per_organ[organ]["p_holm"] == (None if p is None else pytest.approx(p, rel=1e-9))
            assert per_organ[organ]["p_holm"] is None or per_organ[organ]["p_holm"] >= per_organ[organ]["p"]
    assert computed > 0, "no p-value was computed: the CI config needs >= 6 external cases"
    assert analysis["min_holm_p"] == pytest.approx(4 * 2 / 2 ** results["external"]["cases"])


def test_report_has_tables_verdict_and_figures(run):
    out, results, _, _ = run
    report = (out / "report.md").read_text(encoding="utf-8")
    table = [line for line in report.splitlines() if line.startswith("| ")]
    for arm in results["analysis"]["main"]["rows"]:
        assert any(line.startswith((f"| {arm} |", f"| **{arm}** |")) for line in table), arm
    assert "paper / ours" in report and "segviz experiment --config" in report
    assert "Verdict, organ by organ" in report and "| liver | local | +0.060 |" in report
    assert results["selection_rule"] in report
    for name in ("dice_by_arm.png", "selection.png", "val_dice_rounds.png", "overlays.png"):
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC, name
        assert f"]({name})" in report


def _float_bn(arrays):
    return {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items() if "num_batches_tracked" not in k}


def test_fedbn_keeps_batchnorm_per_site_fedavg_shares_it(run):
    _, results, _, _ = run
    final = {
        t["arm"]: t["models"][t["arm"]]["final"]
        for t in results["points"]["main"]["trained"]
        if t["seed"] == 1 and t["arm"] in ("fedavg", "fedbn")
    }
    fedbn, fedavg = load_bundle(final["fedbn"]), load_bundle(final["fedavg"])
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
    # ... and kept on site between rounds (the sites' .segviz state, written by the last run: seed 1's fedbn).
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
