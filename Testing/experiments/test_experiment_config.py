"""Unit tests of SegVizLogic.experiments.config and the report table (fast)."""

from __future__ import annotations

from pathlib import Path

import pytest

from SegVizLogic.experiments.config import ARMS, config_from_dict, load_config
from SegVizLogic.experiments.report import dice_table, table_rows

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["ci.toml", "paper.toml"])
def test_shipped_configs_load(name):
    config = load_config(REPO / "experiments" / name)
    assert config.arms == ARMS
    assert config.federation.total_epochs == config.federation.rounds * config.federation.local_epochs
    assert config.data.phantom is not None


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


# [mapping, message fragment]
TEST_CASE_UNKNOWN_TOP = [{"data": {"phantom": {}}, "epochs": 3}, "unknown top-level"]
TEST_CASE_BOTH = [{"data": {"phantom": {}, "sites": ["a"], "external": "e"}}, "not both"]
TEST_CASE_NO_EXTERNAL = [{"data": {"sites": ["a"]}}, "external"]
TEST_CASE_BAD_ARM = [{"data": {"phantom": {}}, "arms": {"run": ["fedprox"]}}, "[arms] run"]
TEST_CASE_LABEL_MODE = [{"data": {"phantom": {}}, "training": {"label_mode": "naive"}}, "per arm"]
TEST_CASE_PATCH = [{"data": {"phantom": {}}, "training": {"patch_size": [20, 32, 32]}}, "multiple of 16"]
TEST_CASE_WEIGHTING = [{"data": {"phantom": {}}, "federation": {"weighting": "votes"}}, "weighting"]
TEST_CASE_PHANTOM_KEY = [{"data": {"phantom": {"sizes": "full"}}}, "phantom keys"]


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


def test_table_has_a_row_per_arm_with_p_values():
    summary = {
        arm: {"liver": {"dice": {"mean": 0.5, "std": 0.1, "median": 0.5, "n": 6}}}
        for arm in ("local", "fedbn", "fedbn[bn=adapt]")
    }
    results = {
        "summary": summary,
        "rows": table_rows(summary),
        "wilcoxon_vs_fedbn": {"local": {"liver": {"p": 0.03125}}, "fedbn[bn=adapt]": {"liver": {"p": None}}},
    }
    table = dice_table(results, ("liver",))
    assert results["rows"] == ["local", "fedbn", "fedbn[bn=adapt]"]
    assert "| local | 0.500 ± 0.100 (p=0.031*) | 0.500 |" in table
    assert "| **fedbn** |" in table and "(p n/a)" in table
