"""Unit tests of SegVizLogic.experiments.config and the report tables (fast)."""

from __future__ import annotations

from pathlib import Path

import pytest

from SegVizLogic.experiments.config import (
    ARMS,
    LEARNING_CURVE_ARMS,
    SelectionConfig,
    config_from_dict,
    load_config,
)
from SegVizLogic.experiments.report import comparison_table, dice_table, verdict_table
from SegVizLogic.training_setup import setup_sections

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ["ci.toml", "cpu.toml", "paper.toml", "learning-curve.toml", "learning-curve-ci.toml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name):
    config = load_config(REPO / "experiments" / name)
    if config.is_learning_curve:
        assert set(config.arms) <= set(LEARNING_CURVE_ARMS) and "fedbn" in config.arms
    else:
        assert config.arms == ARMS
    assert config.federation.total_epochs == config.federation.rounds * config.federation.local_epochs
    assert config.data.phantom is not None
    # Every arm is offered test-time re-estimation, chosen on validation like the rest.
    assert "adapt" in config.selection.batchnorm and "model" in config.selection.batchnorm


@pytest.mark.parametrize("name", ["cpu.toml", "paper.toml", "learning-curve.toml"])
def test_science_configs_have_three_seeds_and_twelve_external_cases(name):
    config = load_config(REPO / "experiments" / name)
    assert len(config.seeds) >= 3
    assert config.data.phantom["external_cases"] >= 12


def test_learning_curve_config_is_the_issues_design():
    config = load_config(REPO / "experiments" / "learning-curve.toml")
    curve = config.learning_curve
    assert curve.cases_per_site == (1, 2, 4, 8) and curve.unequal == ((8, 4, 2, 1),)
    assert set(config.arms) == {"local", "central-partial", "fedavg", "fedbn"}


def test_paper_config_is_the_papers_network_and_patch():
    from SegVizLogic.network import NetworkConfig

    config = load_config(REPO / "experiments" / "paper.toml")
    assert config.network == NetworkConfig()
    assert config.training.patch_size == (128, 128, 32) and config.training.batch_size == 8
    assert config.data.phantom["size"] == "full"


def test_real_sites_are_resolved_relative_to_the_file(tmp_path):
    config = config_from_dict({"data": {"sites": ["a", "b"], "external": "ext"}}, base_dir=tmp_path)
    assert config.data.sites == (str((tmp_path / "a").resolve()), str((tmp_path / "b").resolve()))
    assert config.data.external == str((tmp_path / "ext").resolve())


def test_training_sections_are_readable_alone():
    network, _, training, federation = setup_sections(
        {"network": {"channels": [8, 16], "strides": [2]}, "federation": {"rounds": 5}, "other": {"x": 1}}
    )
    assert network.channels == (8, 16) and federation.rounds == 5
    assert training.patch_size == (128, 128, 32)  # defaults for absent sections
    with pytest.raises(ValueError, match=r"unknown \[federation\] keys"):
        setup_sections({"federation": {"round": 5}})


def test_selection_and_learning_curve_sections():
    config = config_from_dict(
        {
            "data": {"phantom": {}},
            "federation": {"rounds": 4},
            "selection": {"batchnorm": "adapt", "overlap": [0.25, 0.5], "checkpoints": ["final", 2]},
            "learning_curve": {"cases_per_site": [1, 3], "unequal": [[3, 1, 1, 1]]},
        }
    )
    assert config.selection == SelectionConfig(batchnorm=("adapt",), overlap=(0.25, 0.5), checkpoints=("final", 2))
    assert config.is_learning_curve and config.learning_curve.max_cases == 3
    assert config.arms == LEARNING_CURVE_ARMS


# [mapping, message fragment]
TEST_CASE_UNKNOWN_TOP = [{"data": {"phantom": {}}, "epochs": 3}, "unknown top-level"]
TEST_CASE_BOTH = [{"data": {"phantom": {}, "sites": ["a"], "external": "e"}}, "not both"]
TEST_CASE_NO_EXTERNAL = [{"data": {"sites": ["a"]}}, "external"]
TEST_CASE_BAD_ARM = [{"data": {"phantom": {}}, "arms": {"run": ["fedprox"]}}, "[arms] run"]
TEST_CASE_LABEL_MODE = [{"data": {"phantom": {}}, "training": {"label_mode": "naive"}}, "per arm"]
TEST_CASE_PATCH = [{"data": {"phantom": {}}, "training": {"patch_size": [20, 32, 32]}}, "multiple of 16"]
TEST_CASE_WEIGHTING = [{"data": {"phantom": {}}, "federation": {"weighting": "votes"}}, "weighting"]
TEST_CASE_PHANTOM_KEY = [{"data": {"phantom": {"sizes": "full"}}}, "phantom keys"]
TEST_CASE_OLD_BATCHNORM = [{"data": {"phantom": {}}, "arms": {"batchnorm": ["adapt"]}}, "moved to [selection]"]
TEST_CASE_OVERLAP = [{"data": {"phantom": {}}, "selection": {"overlap": [1.0]}}, "overlap values"]
TEST_CASE_THRESHOLD = [{"data": {"phantom": {}}, "selection": {"threshold": [0.0]}}, "threshold values"]
TEST_CASE_CHECKPOINT = [{"data": {"phantom": {}}, "selection": {"checkpoints": ["best"]}}, "checkpoints must be"]
TEST_CASE_LATE_ROUND = [
    {"data": {"phantom": {}}, "federation": {"rounds": 3}, "selection": {"checkpoints": [5]}},
    "beyond [federation] rounds",
]
TEST_CASE_CURVE_COUNT = [{"data": {"phantom": {}}, "learning_curve": {"cases_per_site": [0, 2]}}, "counts >= 1"]
TEST_CASE_CURVE_BUDGET = [{"data": {"phantom": {}}, "learning_curve": {"budget": "hours"}}, "budget"]
TEST_CASE_CURVE_FEW_CASES = [
    {"data": {"phantom": {"cases_per_site": 4}}, "learning_curve": {"cases_per_site": [1, 4]}},
    "too few for the learning curve",
]


@pytest.mark.parametrize(
    "data, message",
    [
        TEST_CASE_UNKNOWN_TOP,
        TEST_CASE_BOTH,
        TEST_CASE_NO_EXTERNAL,
        TEST_CASE_BAD_ARM,
        TEST_CASE_LABEL_MODE,
        TEST_CASE_PATCH,
        TEST_CASE_WEIGHTING,
        TEST_CASE_PHANTOM_KEY,
        TEST_CASE_OLD_BATCHNORM,
        TEST_CASE_OVERLAP,
        TEST_CASE_THRESHOLD,
        TEST_CASE_CHECKPOINT,
        TEST_CASE_LATE_ROUND,
        TEST_CASE_CURVE_COUNT,
        TEST_CASE_CURVE_BUDGET,
        TEST_CASE_CURVE_FEW_CASES,
    ],
)
def test_invalid_configs_name_the_problem(data, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict(data)


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("seeds = [0, 0]\n[data]\nphantom = {}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.toml: seeds"):
        load_config(path)


def _analysis():
    dice = {"mean": 0.5, "std": 0.1, "median": 0.5, "n": 12}
    test = {
        "p": 0.001,
        "p_holm": 0.004,
        "significant": True,
        "effect": {"median": 0.07, "ci_low": 0.02, "ci_high": 0.11, "n": 12},
    }
    return {
        "rows": ["local", "fedbn"],
        "summary": {arm: {"liver": {"dice": dice}} for arm in ("local", "fedbn")},
        "seed_spread": {"local": {"liver": {"std": 0.02}}, "fedbn": {"liver": {"std": 0.04}}},
        "tests": {"local": {"liver": test}},
    }


def test_tables_show_dice_effects_and_holm_p():
    analysis = _analysis()
    assert "| local | 0.500 ± 0.100 | 0.500 | 0.020 |" in dice_table(analysis, ("liver",))
    assert "| **fedbn** |" in dice_table(analysis, ("liver",))
    assert "| local | +0.070 [+0.020, +0.110], p=0.004* |" in comparison_table(analysis, ("liver",))
    # Paper: FedBN 0.93 vs local 0.87 liver (+0.06); ours significant in that direction.
    assert "| liver | local | +0.060 | +0.070 [+0.020, +0.110] | 0.004 | held |" in verdict_table(analysis, ("liver",))


# [our median difference, significant, verdict on the paper's liver claim (+0.06, FedBN better than local)]
@pytest.mark.parametrize(
    "median, significant, verdict",
    [(0.07, True, "held"), (0.07, False, "not shown"), (-0.05, True, "reversed")],
)
def test_verdict_against_the_paper(median, significant, verdict):
    analysis = _analysis()
    analysis["tests"]["local"]["liver"].update(significant=significant, effect={"median": median, "ci_low": None})
    assert verdict_table(analysis, ("liver",)).splitlines()[-1].endswith(f"| {verdict} |")
