"""Model bundles: round trip, BatchNorm variants, and refusal of damaged or incompatible files."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

from SegVizLogic.bundle import load_bundle, save_bundle
from SegVizLogic.errors import BundleError, SegVizInputError
from SegVizLogic.network import NetworkConfig, build_network, partition_state
from SegVizLogic.preprocessing import Preprocessing

TINY = NetworkConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=1, body_features=4)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(1)
    model = build_network(TINY)
    bn = partition_state(model)["batchnorm"]
    variants = {"averaged": {k: v + 1 for k, v in bn.items()}, **{f"organ:{o}": bn for o in TINY.organs}}
    path = save_bundle(
        tmp_path / "m.segviz",
        model,
        Preprocessing(spacing=(3, 3, 3)),
        {"strategy": "fedbn", "rounds": 2, "sites": ["a", "b"]},
        batchnorm_variants=variants,
        default_batchnorm="averaged",
        metrics={"final": {"dice": 0.5}},
        training={"patch_size": [16, 16, 8]},
    )
    return model, path


def test_round_trip_restores_weights_and_metadata(saved):
    model, path = saved
    bundle = load_bundle(path)
    assert bundle.network_config == TINY
    assert bundle.preprocessing.spacing == (3, 3, 3)
    assert bundle.provenance["sites"] == ["a", "b"] and bundle.metrics["final"]["dice"] == 0.5
    assert bundle.roi_size == (16, 16, 8)
    assert bundle.batchnorm_choices()[:2] == ["model", "per-organ"]
    restored = bundle.build_model("model").state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(restored[key], value), key
    averaged = bundle.build_model().state_dict()  # default: averaged variant
    key = next(k for k in averaged if k.endswith("running_mean"))
    assert torch.allclose(averaged[key], model.state_dict()[key] + 1)
    with pytest.raises(BundleError, match="no BatchNorm variant 'site:x'"):
        bundle.build_model("site:x")


def test_existing_file_is_not_overwritten_without_force(saved, tmp_path):
    model, path = saved
    before = path.read_bytes()
    with pytest.raises(SegVizInputError, match="already exists; use --force"):
        save_bundle(path, model, Preprocessing())
    assert path.read_bytes() == before
    save_bundle(path, model, Preprocessing(), force=True)
    assert load_bundle(path).preprocessing.spacing == (1.5, 1.5, 2.0)
    assert [p.name for p in tmp_path.iterdir()] == ["m.segviz"]  # no temp file left


def test_truncated_bundle_is_refused(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    cut = tmp_path / "cut.segviz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=r"cut\.segviz: is not a readable SegViz model bundle \(damaged or truncated"):
        load_bundle(cut)


def test_corrupted_weights_are_refused(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "bad.segviz"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "weights.npz":
                data = data[:-50] + bytes(50)
            dst.writestr(item, data)
    with pytest.raises(BundleError, match="checksum of weights.npz does not match"):
        load_bundle(bad)


def _rewrite_manifest(path, target, change):
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "manifest.json":
                manifest = json.loads(data)
                change(manifest)
                data = json.dumps(manifest).encode()
            dst.writestr(item, data)
    return target


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(format_version=99), "bundle format 99 is newer"),
        (lambda m: m["organ_schema"][0].update(label=7), "organ schema"),
        (lambda m: m["network"].update(channels=[8, 16, 32]), "weights do not fit its network config"),
        (lambda m: m.update(format="something-else"), "is not a SegViz model bundle"),
    ],
)
def test_incompatible_bundles_are_refused(saved, tmp_path, change, message):
    _, path = saved
    with pytest.raises(BundleError, match=message):
        load_bundle(_rewrite_manifest(path, tmp_path / "x.segviz", change))


def test_not_a_bundle_and_missing_file(tmp_path):
    fake = tmp_path / "fake.segviz"
    fake.write_text("hello")
    with pytest.raises(BundleError, match="fake.segviz: is not a readable SegViz model bundle"):
        load_bundle(fake)
    with pytest.raises(BundleError, match="model bundle not found"):
        load_bundle(tmp_path / "none.segviz")


def test_cli_refuses_damaged_bundle_with_one_line(saved, tmp_path, capsys):
    from SegVizLogic.cli import main

    _, path = saved
    cut = tmp_path / "cut.segviz"
    cut.write_bytes(path.read_bytes()[:300])
    assert main(["model-info", str(cut)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {cut}: is not a readable SegViz model bundle")
