"""Unit tests of the selection rule, leave-site-out BatchNorm and the sealed external set (fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from SegVizLogic.bundle import load_bundle, save_bundle
from SegVizLogic.experiments.arms import BEST_EPOCH, FINAL_ROUND, TrainedArm
from SegVizLogic.experiments.config import SelectionConfig
from SegVizLogic.experiments.external import SealedExternalSet
from SegVizLogic.experiments.selection import (
    Option,
    arm_candidates,
    leave_site_out,
    select_options,
    validation_scores,
)
from SegVizLogic.network import PARTITION_BATCHNORM, NetworkConfig, build_network, partition_state
from SegVizLogic.preprocessing import Preprocessing

TINY = NetworkConfig(channels=(4, 8), strides=(2,), num_res_units=0, body_features=4)
# site -> (organs, BatchNorm fill value, training cases)
SITES = {
    "site-a": (["liver"], 1.0, 1),
    "site-b": (["spleen"], 2.0, 1),
    "site-c": (["liver"], 3.0, 3),
    "site-d": (["kidney"], 4.0, 1),
}


def _filled(model, value: float) -> dict[str, np.ndarray]:
    return {
        k: (np.full(v.shape, value, np.float32) if v.dtype.kind == "f" else np.asarray(v))
        for k, v in partition_state(model)[PARTITION_BATCHNORM].items()
    }


def _federated_bundle(tmp_path, with_sites: bool = True):
    model = build_network(TINY)
    variants = {}
    if with_sites:
        variants = {f"site:{name}": _filled(model, fill) for name, (_, fill, _) in SITES.items()}
        variants["averaged"] = _filled(model, 2.5)
        for organ in TINY.organs:
            variants[f"organ:{organ}"] = _filled(model, 2.5)
    path = save_bundle(
        tmp_path / ("fed.segviz" if with_sites else "local.segviz"),
        model,
        Preprocessing(),
        provenance={"strategy": "fedbn", "organs_per_site": {n: o for n, (o, _, _) in SITES.items()}},
        metrics={"rounds": [{"sites": {n: {"num-examples": c} for n, (_, _, c) in SITES.items()}}]},
        batchnorm_variants=variants,
        force=True,
    )
    return load_bundle(path)


def _value(variant: dict[str, np.ndarray]) -> float:
    key = next(k for k in variant if k.endswith("running_mean"))
    return float(np.unique(variant[key])[0])


def test_leave_site_out_rebuilds_the_shared_batchnorm_from_the_other_sites(tmp_path):
    bundle = _federated_bundle(tmp_path)
    view = leave_site_out(bundle, "site-a")
    assert "site:site-a" not in view.batchnorm_variants
    assert {n for n in view.batchnorm_variants if n.startswith("site:")} == {
        "site:site-b",
        "site:site-c",
        "site:site-d",
    }
    assert _value(view.batchnorm_variants["averaged"]) == pytest.approx((2 + 3 + 4) / 3)
    assert _value(view.batchnorm_variants["organ:liver"]) == pytest.approx(3.0)  # site-c, the other liver site
    assert _value(view.batchnorm_variants["organ:spleen"]) == pytest.approx(2.0)
    assert _value(view.batchnorm_variants["organ:kidney"]) == pytest.approx(4.0)
    # No other site trained the pancreas: its head gets the other sites' average.
    assert _value(view.batchnorm_variants["organ:pancreas"]) == pytest.approx(3.0)
    assert "per-organ" in view.batchnorm_choices()
    # The weights and the original bundle are untouched; the view builds a working model.
    assert all(np.array_equal(view.state[k], bundle.state[k]) for k in bundle.state)
    assert "site:site-a" in bundle.batchnorm_variants and _value(bundle.batchnorm_variants["averaged"]) == 2.5
    model = view.build_model("averaged")
    key = next(k for k in model.state_dict() if k.endswith("running_mean"))
    assert float(model.state_dict()[key].flatten()[0]) == pytest.approx(3.0)


def test_leave_site_out_weights_by_examples_like_the_federation(tmp_path):
    view = leave_site_out(_federated_bundle(tmp_path), "site-b", weighting="examples")
    # a (1 case, 1.0), c (3 cases, 3.0), d (1 case, 4.0): (1 + 9 + 4) / 5.
    assert _value(view.batchnorm_variants["averaged"]) == pytest.approx(14 / 5)
    assert _value(view.batchnorm_variants["organ:liver"]) == pytest.approx((1 + 9) / 4)


def test_leave_site_out_keeps_a_bundle_without_per_site_batchnorm(tmp_path):
    local = _federated_bundle(tmp_path, with_sites=False)
    assert leave_site_out(local, "site-a") is local
    fed = _federated_bundle(tmp_path)
    assert leave_site_out(fed, "a-site-it-never-saw") is fed


def test_candidates_are_what_each_bundle_offers_in_selection_order(tmp_path):
    fed = _federated_bundle(tmp_path)
    local = _federated_bundle(tmp_path, with_sites=False)
    selection = SelectionConfig(
        batchnorm=("adapt", "per-organ", "averaged", "model"), overlap=(0.25, 0.5), threshold=(0.5,)
    )
    federated = TrainedArm("fedbn", 0, models={"fedbn": {FINAL_ROUND: str(fed.path)}})
    options = arm_candidates(federated, selection)
    assert [(o.batchnorm, o.overlap) for o in options] == [
        (bn, ov) for bn in ("adapt", "per-organ", "averaged", "model") for ov in (0.25, 0.5)
    ]
    single = TrainedArm("local", 0, models={"local:site-a": {BEST_EPOCH: str(local.path)}})
    assert [o.batchnorm for o in arm_candidates(single, selection)] == ["adapt", "adapt", "model", "model"]
    # "all": every choice but a single site's BatchNorm.
    everything = arm_candidates(federated, SelectionConfig(batchnorm=("all",)))
    assert {o.batchnorm for o in everything} == {"model", "per-organ", "adapt", "adapt-organs", "averaged"} | {
        f"organ:{o}" for o in TINY.organs
    }


def _val(arm, seed, option, site, case, organ, dice, model=None):
    return {
        "arm": arm,
        "model": model or arm,
        "seed": seed,
        "option": option,
        "site": site,
        "case": case,
        "organ": organ,
        "dice": dice,
    }


A = Option("final", "adapt", 0.5, 0.5)
B = Option("final", "averaged", 0.5, 0.5)
C = Option("final", "model", 0.5, 0.5)


def test_validation_score_by_hand():
    records = []
    for seed, shift in ((0, 0.0), (1, 0.1)):
        records += [
            _val("fedbn", seed, A.key, "site-liver", "c3", "liver", 0.8 + shift),
            _val("fedbn", seed, A.key, "site-liver", "c4", "liver", 0.6 + shift),
            _val("fedbn", seed, A.key, "site-spleen", "c3", "spleen", 0.5 + shift),
            _val("fedbn", seed, C.key, "site-liver", "c3", "liver", 0.1),
            _val("fedbn", seed, C.key, "site-liver", "c4", "liver", 0.1),
            _val("fedbn", seed, C.key, "site-spleen", "c3", "spleen", 0.1),
        ]
        # B was not scoreable on the spleen site's case.
        records += [_val("fedbn", seed, B.key, "site-liver", c, "liver", 0.99) for c in ("c3", "c4")]
    scores = validation_scores(records, {"fedbn": [A, B, C]}, seeds=[0, 1])["fedbn"]
    # Seed 0: liver mean(0.8, 0.6) = 0.7, spleen 0.5 -> 0.6; seed 1: 0.8 and 0.6 -> 0.7; mean 0.65.
    assert scores[A.key]["score"] == pytest.approx(0.65)
    assert scores[A.key]["per_seed"] == {"0": pytest.approx(0.6), "1": pytest.approx(0.7)}
    assert scores[A.key]["per_organ"] == {"liver": pytest.approx(0.75), "spleen": pytest.approx(0.55)}
    # Incomplete candidates are never chosen, however high their partial score.
    assert scores[B.key]["complete"] is False and scores[B.key]["score"] is None
    assert scores[C.key]["score"] == pytest.approx(0.1)
    assert select_options({"fedbn": scores})["fedbn"]["key"] == A.key
    assert scores[C.key]["own_statistics"] is False  # FedBN's model BatchNorm is no site's


def test_own_statistics_are_flagged_where_they_cannot_be_left_out():
    records = [_val("fedavg", 0, C.key, "s", "c", "liver", 0.5), _val("local", 0, C.key, "s", "c", "liver", 0.5)]
    scores = validation_scores(records, {"fedavg": [C], "local": [C]}, seeds=[0])
    assert scores["fedavg"][C.key]["own_statistics"] and scores["local"][C.key]["own_statistics"]


def test_select_options_ties_go_to_the_earlier_candidate():
    def entry(option, score):
        return {"option": option.to_dict(), "score": score, "per_organ": {}}

    chosen = select_options({"fedbn": {A.key: entry(A, 0.7), B.key: entry(B, 0.7), C.key: entry(C, 0.9)}})
    assert chosen["fedbn"]["key"] == C.key and chosen["fedbn"]["validation_score"] == 0.9
    chosen = select_options({"fedbn": {B.key: entry(B, 0.7), A.key: entry(A, 0.7)}})
    assert chosen["fedbn"]["key"] == B.key and Option.from_dict(chosen["fedbn"]["option"]) == B
    with pytest.raises(ValueError, match="fedavg: no candidate"):
        select_options({"fedavg": {A.key: entry(A, None)}})


def _tiny_site(root):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "site.json").write_text(
        json.dumps({"name": "external", "organs": ["liver"], "labels": {"1": "liver"}}), encoding="utf-8"
    )
    image = sitk.GetImageFromArray(np.linspace(-1000, 300, 512, dtype=np.float32).reshape(8, 8, 8))
    labels = sitk.Image(8, 8, 8, sitk.sitkUInt8)
    labels[2:5, 2:5, 2:5] = 1
    sitk.WriteImage(image, str(root / "images" / "case000.nii.gz"))
    sitk.WriteImage(labels, str(root / "labels" / "case000.nii.gz"))
    return root


# [freeze record content (None: no file), message fragment]
TEST_CASE_NO_RECORD = [None, "no freeze record"]
TEST_CASE_NOT_FROZEN = [{"stage": "training", "selection": {}}, "not frozen"]
TEST_CASE_ARM_MISSING = [
    {"stage": "frozen", "frozen_at": "now", "selection": {"main": {"fedbn": {}}}},
    "no frozen choice for ['fedavg']",
]
TEST_CASE_EMPTY = [{"stage": "frozen", "frozen_at": "now", "selection": {}}, "holds no choice"]


@pytest.mark.parametrize(
    "record, message", [TEST_CASE_NO_RECORD, TEST_CASE_NOT_FROZEN, TEST_CASE_ARM_MISSING, TEST_CASE_EMPTY]
)
def test_external_set_stays_sealed_until_every_arm_is_frozen(tmp_path, record, message):
    sealed = SealedExternalSet(_tiny_site(tmp_path / "external"))
    freeze = tmp_path / "results.json"
    if record is not None:
        freeze.write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        sealed.open(freeze, ["fedbn", "fedavg"])


def test_external_set_opens_after_the_freeze(tmp_path):
    sealed = SealedExternalSet(_tiny_site(tmp_path / "external"))
    freeze = tmp_path / "results.json"
    freeze.write_text(
        json.dumps({"stage": "frozen", "frozen_at": "now", "selection": {"main": {"fedbn": {}}}}), encoding="utf-8"
    )
    site = sealed.open(freeze, ["fedbn"])
    assert site.name == "external" and [c.name for c in site.cases] == ["case000"]
