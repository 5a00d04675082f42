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
    fake.write_text("hello", encoding="utf-8")
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


# ------------------------------------------------------------------ manifest schema and bounds (issue 11)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(sha256=["x"]), "sha256 must be an object, got ['x']"),
        (lambda m: m["sha256"].update({"weights.npz": 5}), "sha256['weights.npz'] must be 64 lower-case hexadecimal"),
        (lambda m: m["sha256"].pop("batchnorm/averaged.npz"), "manifest lists no checksum for batchnorm/averaged.npz"),
        (lambda m: m.update(network=[1]), "network must be an object, got [1]"),
        (lambda m: m.pop("network"), "network is missing"),
        (lambda m: m["network"].update(channels="abc"), "network.channels must be a list of 2 to 8 whole numbers"),
        (lambda m: m["network"].update(channels=[4, 8, 16.0]), "network.channels must be a list"),
        (lambda m: m["network"].update(channels=[True, 8, 16]), "network.channels must be a list"),
        (lambda m: m["network"].update(channels=[4096, 8192, 16384]), "from 1 to 1024, got [4096, 8192, 16384]"),
        (lambda m: m["network"].update(strides=[2]), "network.strides must be a list of 2 whole numbers from 1 to 4"),
        (lambda m: m["network"].update(num_res_units=-1), "network.num_res_units must be a whole number from 0 to 8"),
        (lambda m: m["network"].update(body_features=1e9), "network.body_features must be a whole number"),
        (lambda m: m["network"].update(dropout=1.5), "network.dropout must be a number from 0 to below 1"),
        (lambda m: m["network"].update(output="linear"), "network.output must be 'sigmoid' or 'softmax'"),
        (lambda m: m["network"].update(organs=["liver", "lung"]), "network.organs must be a list of distinct organ"),
        (lambda m: m["network"].update(depth=3), "unknown network keys depth"),
        (lambda m: m["preprocessing"].update(spacing=[0, 1, 1]), "preprocessing.spacing must be a list of 3 numbers"),
        (lambda m: m["preprocessing"].update(spacing=[1000, 1, 1]), "from 0.1 to 20, got [1000, 1, 1]"),
        (lambda m: m["preprocessing"].update(hu_window=[250, -175]), "hu_window must be [low, high] with low < high"),
        (lambda m: m["preprocessing"].update(hu_window=["a", "b"]), "hu_window must be a list of 2 numbers"),
        (lambda m: m["preprocessing"].update(orientation="RAR"), "orientation must be three axis letters"),
        (lambda m: m["training"].update(patch_size=[16, 16, 10]), "must be multiples of 4 (the product of"),
        (lambda m: m.update(inference={"roi_size": [1024, 1024, 1024]}), "a window of at most 16777216 voxels"),
        (lambda m: m.update(inference={"roi_size": [0, 0, 0]}), "inference.roi_size must be a list of 3 whole"),
        (lambda m: m.update(inference={"threshold": 1.5}), "inference.threshold must be a number between 0 and 1"),
        (lambda m: m.update(inference={"threshold": "0.3"}), "inference.threshold must be a number between 0 and 1"),
        (lambda m: m.update(trained_organs=["lung"]), "trained_organs must be a list of distinct organ names"),
        (lambda m: m.update(batchnorm_variants="averaged"), "batchnorm_variants must be a list of names"),
        (lambda m: m["batchnorm_variants"].append("site:../../x"), "each of batchnorm_variants must be"),
        (lambda m: m["batchnorm_variants"].append("averaged"), "batchnorm_variants must be a list of distinct names"),
        (lambda m: m.update(default_batchnorm="site:z"), "default_batchnorm must be one of model, per-organ, adapt"),
        (lambda m: m.update(provenance={"sites": "a,b"}), "provenance.sites must be a list of site names"),
        (lambda m: m.update(metrics=[]), "metrics must be an object, got []"),
        (lambda m: m.update(format_version="1"), "bundle format 1 is newer"),
    ],
)
def test_manifest_outside_its_schema_is_refused_in_one_line(saved, tmp_path, change, message):
    from SegVizLogic.bundle_manifest import read_manifest

    _, path = saved
    bad = _rewrite_manifest(path, tmp_path / "x.segviz", change)
    for read in (load_bundle, read_manifest):  # segviz infer and segviz model-info
        with pytest.raises(BundleError) as info:
            read(bad)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_duplicate_manifest_keys_are_refused(saved, tmp_path):
    _, path = saved
    with zipfile.ZipFile(path) as archive:
        text = archive.read("manifest.json").decode()
    forged = text.replace(
        '"default_batchnorm": "averaged"', '"default_batchnorm": "averaged", "default_batchnorm": "model"'
    )
    target = tmp_path / "dup.segviz"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, forged if item.filename == "manifest.json" else src.read(item.filename))
    with pytest.raises(BundleError, match="invalid manifest: key 'default_batchnorm' appears twice"):
        load_bundle(target)


def _rewrite_npz(path, target, member, change):
    """Change arrays of one member and recompute its checksum (a forger's bundle)."""
    import hashlib
    import io

    import numpy as np

    with zipfile.ZipFile(path) as src:
        members = {item.filename: src.read(item.filename) for item in src.infolist()}
    with np.load(io.BytesIO(members[member])) as npz:
        arrays = {k: npz[k] for k in npz.files}
    change(arrays)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    members[member] = buffer.getvalue()
    manifest = json.loads(members["manifest.json"])
    manifest["sha256"][member] = hashlib.sha256(members[member]).hexdigest()
    members["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(target, "w") as dst:
        for name, data in members.items():
            dst.writestr(name, data)
    return target


def test_non_finite_weights_are_refused_in_weights_and_variants(saved, tmp_path):
    import numpy as np

    _, path = saved

    def poison(arrays):
        key = sorted(arrays)[3]
        arrays[key] = np.full_like(arrays[key], np.inf)

    with pytest.raises(BundleError, match=r"is damaged: 1 tensor in weights.npz hold NaN or infinite values"):
        load_bundle(_rewrite_npz(path, tmp_path / "w.segviz", "weights.npz", poison))
    with pytest.raises(BundleError, match=r"tensor in batchnorm/averaged.npz hold NaN or infinite values"):
        load_bundle(_rewrite_npz(path, tmp_path / "v.segviz", "batchnorm/averaged.npz", poison))


def test_variant_that_does_not_fit_is_refused(saved, tmp_path):
    _, path = saved
    bad = _rewrite_npz(path, tmp_path / "v.segviz", "batchnorm/averaged.npz", lambda a: a.pop(min(a)))
    with pytest.raises(BundleError, match=r"BatchNorm variant 'averaged' do not fit its network config \(1 missing"):
        load_bundle(bad)


def test_member_sizes_are_bounded_before_unpacking(saved, tmp_path, monkeypatch):
    from SegVizLogic import bundle_manifest

    _, path = saved
    monkeypatch.setitem(bundle_manifest.MEMBER_LIMITS, "weights.npz", 1000)
    with pytest.raises(BundleError, match=r"is refused: weights.npz unpacks to \d+ bytes \(limit 1000 bytes\)"):
        load_bundle(path)
    monkeypatch.undo()
    # A zip directory that understates a member's size cannot smuggle more bytes past the cap:
    # Python's reader stops at the declared size and the CRC no longer matches.
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("manifest.json")
    central = data.index(b"PK\x01\x02" + data[data.index(b"PK\x01\x02") + 4 : data.index(b"PK\x01\x02") + 4])
    while data[central + 46 : central + 46 + len(b"manifest.json")] != b"manifest.json":
        central = data.index(b"PK\x01\x02", central + 4)
    data[central + 24 : central + 28] = (info.file_size // 2).to_bytes(4, "little")
    forged = tmp_path / "forged.segviz"
    forged.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"forged.segviz: is (damaged: manifest.json fails its CRC|not a readable)"):
        load_bundle(forged)


def test_large_config_is_checked_without_allocating_it(saved, tmp_path):
    import resource

    _, path = saved
    # Within the schema's bounds, but 333 million parameters (1.3 GB) that the weights do not hold.
    wide = _rewrite_manifest(
        path,
        tmp_path / "wide.segviz",
        lambda m: (
            m["network"].update(channels=[512] * 7, strides=[2] * 6, num_res_units=4),
            m["training"].update(patch_size=[64, 64, 64]),
        ),
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(BundleError, match="weights do not fit its network config"):
        load_bundle(wide)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, grown_mb


def test_threshold_chosen_for_a_bundle_is_recorded(saved, tmp_path):
    """A bundle carries the threshold chosen for it and the rule that chose it; without one it is 0.5;
    a threshold outside (0, 1) is refused when saving and when loading."""
    from SegVizLogic.bundle import DEFAULT_THRESHOLD

    model, path = saved
    before = load_bundle(path)
    assert before.threshold == DEFAULT_THRESHOLD == 0.5
    chosen = save_bundle(
        tmp_path / "chosen.segviz",
        model,
        Preprocessing(),
        roi_size=(32, 32, 32),
        inference={"threshold": 0.3, "threshold_rule": "chosen on validation"},
    )
    after = load_bundle(chosen)
    assert after.threshold == 0.3 and after.manifest["inference"]["threshold_rule"] == "chosen on validation"
    assert after.roi_size == (32, 32, 32)
    with pytest.raises(ValueError, match="between 0 and 1"):
        save_bundle(tmp_path / "bad.segviz", model, Preprocessing(), inference={"threshold": 1.0})
    assert not (tmp_path / "bad.segviz").exists()
    manifest = json.loads(zipfile.ZipFile(chosen).read("manifest.json"))
    manifest["inference"]["threshold"] = 1.5
    forged = tmp_path / "forged.segviz"
    with zipfile.ZipFile(chosen) as source, zipfile.ZipFile(forged, "w") as target:
        for name in source.namelist():
            data = json.dumps(manifest).encode() if name == "manifest.json" else source.read(name)
            target.writestr(name, data)
    with pytest.raises(BundleError, match="inference.threshold"):
        load_bundle(forged)
