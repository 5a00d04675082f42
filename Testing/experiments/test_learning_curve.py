"""The learning curve: site views and validation split (fast), and
``segviz experiment --config experiments/learning-curve-ci.toml`` end to end (a few minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from SegVizLogic.experiments.config import config_from_dict, load_config
from SegVizLogic.experiments.learning_curve import curve_points, site_view, validation_fraction
from SegVizLogic.site import load_site

REPO = Path(__file__).resolve().parents[2]
CURVE_CONFIG = REPO / "experiments" / "learning-curve-ci.toml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _held_out(fraction: float, total: int) -> int:
    # SegVizLogic.training.load_site_data's rule: at least one case once a site has two.
    return 0 if total < 2 or fraction == 0 else max(1, round(fraction * total))


# [training cases per site, validation cases]
@pytest.mark.parametrize(
    "counts, validation", [([1, 1, 1, 1], 1), ([8, 8, 8, 8], 1), ([8, 4, 2, 1], 1), ([4, 4, 4, 4], 2), ([3, 2], 2)]
)
def test_validation_fraction_holds_out_exactly_the_validation_cases(counts, validation):
    fraction = validation_fraction(counts, validation)
    assert 0 < fraction < 1
    assert all(_held_out(fraction, n + validation) == validation for n in counts)


def test_validation_fraction_refuses_what_one_share_cannot_do():
    with pytest.raises(ValueError, match="validation_cases = 2"):
        validation_fraction([8, 4, 2, 1], 2)


def _fake_site(root: Path, name: str, n: int) -> Path:
    # Pairing only: load_site reads no image, so empty files stand in for the cases.
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "site.json").write_text(
        json.dumps({"name": name, "organs": ["liver"], "labels": {"1": "liver"}}), encoding="utf-8"
    )
    for i in range(n):
        (root / "images" / f"case{i:03d}.nii.gz").write_bytes(b"")
        (root / "labels" / f"case{i:03d}.nii.gz").write_bytes(b"")
    return root


def test_site_view_links_the_first_cases_and_the_validation_cases(tmp_path):
    source = load_site(_fake_site(tmp_path / "full" / "site-a", "site-a", 9))
    view = load_site(site_view(source, tmp_path / "view" / "site-a", train_cases=2, validation_cases=1))
    assert view.name == "site-a"
    assert [c.name for c in view.cases] == ["case000", "case001", "case008"]
    assert all(Path(c.image_path).resolve().parent == (source.root / "images").resolve() for c in view.cases)
    # One preprocessing cache for every view of a site.
    assert (view.root / ".segviz" / "cache").resolve() == (source.root / ".segviz" / "cache").resolve()
    with pytest.raises(Exception, match="needs 10"):
        site_view(source, tmp_path / "view2" / "site-a", train_cases=9, validation_cases=1)


def test_curve_points_nest_the_cases_and_scale_the_budget(tmp_path):
    sites = [str(_fake_site(tmp_path / "data" / n, n, 9)) for n in ("site-a", "site-b", "site-c", "site-d")]
    config = config_from_dict(
        {
            "data": {"sites": sites, "external": str(tmp_path / "ext")},
            "federation": {"rounds": 2, "local_epochs": 1},
            "learning_curve": {"cases_per_site": [1, 2, 8], "unequal": [[8, 4, 2, 1]], "budget": "steps"},
        }
    )
    points = curve_points(config, sites, tmp_path / "out")
    assert [p.name for p in points] == ["1", "2", "8", "8/4/2/1"]
    assert [p.local_epochs for p in points] == [8, 4, 1, 1]  # steps: 8 / largest count of the point
    unequal = points[-1]
    assert unequal.cases == {"site-a": 8, "site-b": 4, "site-c": 2, "site-d": 1}
    views = {load_site(v).name: [c.name for c in load_site(v).cases] for v in unequal.site_dirs}
    assert views["site-d"] == ["case000", "case008"] and len(views["site-a"]) == 9
    for point in points:
        for view, n in zip(point.site_dirs, point.cases.values()):
            assert _held_out(point.config.training.val_fraction, n + 1) == 1, (point.name, view)
    with pytest.raises(ValueError, match="one count per site"):
        curve_points(
            config_from_dict({"data": {"sites": sites, "external": "e"}, "learning_curve": {"unequal": [[2, 1]]}}),
            sites,
            tmp_path / "out2",
        )


@pytest.fixture(scope="module")
def curve_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("curve") / "ci"
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(
        [sys.executable, "-m", "SegVizLogic.cli", "experiment", "--config", str(CURVE_CONFIG), "--out", str(out)]
        + ["--progress", "json"],
        capture_output=True,
        check=False,
        text=True,
        encoding="utf-8",
        cwd=REPO,
        env=env,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out, json.loads((out / "results.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_learning_curve_end_to_end(curve_run):
    out, results = curve_run
    config = load_config(CURVE_CONFIG)
    assert results["kind"] == "learning-curve"
    assert list(results["points"]) == ["1", "2", "2/1/1/1"]
    assert results["points"]["2/1/1/1"]["cases"] == {
        "site-liver": 2,
        "site-spleen": 1,
        "site-pancreas": 1,
        "site-kidney": 1,
    }
    # The same validation case at every point: each site's last phantom case.
    for point in results["points"]:
        held = {(r["site"], r["case"]) for r in results["validation"][point]["records"]}
        assert held == {(s["name"], "case002") for s in results["sites"]}, point
        assert set(results["selection"][point]) == set(config.arms)
    # Every point, arm and seed scored every external case once.
    n = results["external"]["cases"]
    for point in results["points"]:
        for arm in config.arms:
            rows = [r for r in results["records"] if r["point"] == point and r["arm"] == arm and r["organ"] == "liver"]
            assert sorted((r["seed"], r["case"]) for r in rows) == sorted(
                (s, f"case{c:03d}") for s in config.seeds for c in range(n)
            ), (point, arm)
        assert set(results["analysis"][point]["tests"]) == {"local"}
    # More training cases for the liver site changes what its local model learned.
    local = {p: results["analysis"][p]["summary"]["local"]["liver"]["dice"]["mean"] for p in ("1", "2")}
    assert local["1"] != local["2"]
    figure = (out / "learning_curve.png").read_bytes()
    assert figure[:8] == PNG_MAGIC and len(figure) > 5000
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "](learning_curve.png)" in report and "FedBN against **local**" in report
    assert "| liver | " in report and "### Point `2/1/1/1`" in report
