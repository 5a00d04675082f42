"""BatchNorm choices that mean something for each kind of bundle, and model-info's description
of a manifest (torch-free)."""

from __future__ import annotations

import sys

import pytest

from SegVizLogic.bundle_description import describe_bundle, format_bundle_description
from SegVizLogic.bundle_manifest import BATCHNORM_DESCRIPTIONS, batchnorm_choices, describe_batchnorm
from SegVizLogic.organs import ORGAN_NAMES

VARIANTS = sorted(["averaged", *(f"organ:{o}" for o in ORGAN_NAMES), "site:a", "site:b"])


def _manifest(provenance: dict, variants=()) -> dict:
    return {"network": {"organs": list(ORGAN_NAMES)}, "provenance": provenance, "batchnorm_variants": list(variants)}


# [provenance, BatchNorm variants in the bundle, choices offered]
TEST_CASE_LOCAL = [{"strategy": "local"}, (), ["model", "adapt", "adapt-organs"]]
TEST_CASE_CENTRAL = [{"strategy": "central-partial"}, (), ["model", "adapt", "adapt-organs"]]
TEST_CASE_FEDAVG = [
    {"kind": "federated", "strategy": "fedavg"},
    VARIANTS,
    [
        "model",
        "per-organ",
        "adapt",
        "adapt-organs",
        *VARIANTS[1:],
    ],  # "averaged" is the model's own BatchNorm under FedAvg
]
TEST_CASE_FEDBN = [
    {"kind": "federated", "strategy": "fedbn"},
    VARIANTS,
    ["per-organ", "adapt", "adapt-organs", *VARIANTS],
]
TEST_CASE_FEDBN_PRIVATE = [
    {"kind": "federated", "strategy": "fedbn"},
    (),
    ["adapt", "adapt-organs"],
]  # BatchNorm never shared


@pytest.mark.parametrize(
    ("provenance", "variants", "expected"),
    [TEST_CASE_LOCAL, TEST_CASE_CENTRAL, TEST_CASE_FEDAVG, TEST_CASE_FEDBN, TEST_CASE_FEDBN_PRIVATE],
)
def test_batchnorm_choices_per_kind_of_bundle(provenance, variants, expected):
    assert batchnorm_choices(_manifest(provenance, variants)) == expected


def test_every_choice_is_described():
    for choice in ["model", "per-organ", "adapt", *VARIANTS]:
        assert describe_batchnorm(choice) != describe_batchnorm("unknown:thing"), choice
    assert describe_batchnorm("organ:liver") == "the mean BatchNorm of the sites that annotated the liver"
    assert describe_batchnorm("site:hospital-b").startswith("the BatchNorm of site hospital-b")
    assert {"model", "adapt", "per-organ", "averaged", "organ:", "site:"} <= set(BATCHNORM_DESCRIPTIONS)


def test_a_federated_bundle_of_an_older_segviz_says_what_it_does_not_know():
    manifest = _manifest(
        {
            "kind": "federated",
            "strategy": "fedbn",
            "rounds": 2,
            "local_epochs": 1,
            "weighting": "uniform",
            "sites": ["a"],
        },
        VARIANTS,
    )
    manifest["training"] = {"patch_size": [32, 32, 16], "lr": 0.01, "local_epochs": 1}
    manifest["metrics"] = {
        "rounds": [
            {"round": 1, "dice": {"liver": 0.2}, "sites": {"a": {"num-examples": 3.0, "dice-liver": 0.2}}},
            {"round": 2, "dice": {"liver": 0.4}, "sites": {"a": {"num-examples": 3.0, "dice-liver": 0.4, "loss": 0.5}}},
        ]
    }
    info = describe_bundle(manifest, "m.segviz")
    assert info["metrics"]["round"] == 2 and info["metrics"]["val_dice"] == {"liver": 0.4}
    assert info["cases_per_site"] == {"a": {"training": 3, "validation": None}}  # no num-val-examples metric then
    assert info["setup"]["training"] == {"patch_size": [32, 32, 16]}  # lr and local epochs are the budget
    assert info["budget"] == {"rounds": 2, "local_epochs": 1, "lr": 0.01, "weighting": "uniform"}
    text = format_bundle_description(info)
    assert "a: 3 training, ? held out for validation" in text
    assert "  a                liver 0.400   loss 0.5000" in text


def test_model_info_needs_no_torch():
    import subprocess

    code = "import sys; import SegVizLogic.bundle_description, SegVizLogic.cli; print('torch' in sys.modules)"
    assert (
        subprocess.check_output([sys.executable, "-c", code], text=True, encoding="utf-8", timeout=120).strip()
        == "False"
    )


def test_experiments_can_still_build_the_controls_inference_does_not_offer():
    from SegVizLogic.bundle_manifest import buildable_batchnorm

    fedbn = _manifest({"kind": "federated", "strategy": "fedbn"}, VARIANTS)
    assert buildable_batchnorm(fedbn) == ["model", "per-organ", "adapt", "adapt-organs", *VARIANTS]
    assert set(batchnorm_choices(fedbn)) == set(buildable_batchnorm(fedbn)) - {"model"}
