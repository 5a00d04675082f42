"""Inference: label maps in the input's exact geometry, for any orientation and format."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SegVizLogic.bundle import load_bundle, save_bundle
from SegVizLogic.evaluation import evaluate_label_maps
from SegVizLogic.inference import keep_largest_component, probabilities_to_labels, resolve_device, segment_image
from SegVizLogic.network import NetworkConfig, build_network
from SegVizLogic.preprocessing import Preprocessing
from SegVizLogic.site import load_case, validate_site

SMALL = NetworkConfig(channels=(8, 16, 32), strides=(2, 2), num_res_units=1, body_features=8)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def constant_bundle(tmp_path_factory):
    """An untrained model whose liver head says 'liver' everywhere (for geometry checks)."""
    model = build_network(SMALL)
    with torch.no_grad():
        for organ, bias in (("liver", 10.0), ("spleen", -10.0), ("pancreas", -10.0), ("kidney", -10.0)):
            model.heads[organ][1].weight.zero_()
            model.heads[organ][1].bias.fill_(bias)
    path = tmp_path_factory.mktemp("model") / "constant.segviz"
    return save_bundle(path, model, Preprocessing(spacing=(4.0, 4.0, 4.0)), training={"patch_size": [32, 32, 32]})


def _oblique(image: sitk.Image) -> sitk.Image:
    """The same voxels on an oblique, anisotropic LPS grid (what some scanners write)."""
    out = sitk.Image(image)
    angle = np.deg2rad(15)
    rot = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    out.SetDirection(tuple(rot.ravel()))
    out.SetSpacing((2.1, 2.7, 3.3))
    return out


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_output_grid_equals_input_grid_for_real_and_oblique_ct(real_data, constant_bundle, tmp_path, suffix):
    from SegVizLogic.io import read_image, read_label_map, write_label_map_like

    ct = read_image(real_data / "totalseg_example" / "example_ct.nii.gz")
    for image in (ct, _oblique(ct)):
        source = tmp_path / f"ct{suffix}"
        sitk.WriteImage(image, str(source))
        result = segment_image(load_bundle(constant_bundle), read_image(source), CPU)
        out = tmp_path / f"pred{suffix}"
        write_label_map_like(result.labels, image, out, force=True)
        written = read_label_map(out)
        assert written.GetSize() == image.GetSize()
        np.testing.assert_allclose(written.GetSpacing(), image.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(written.GetDirection(), image.GetDirection(), atol=1e-5)
        # "liver everywhere" must cover the whole field of view, up to the border voxels
        assert (sitk.GetArrayViewFromImage(written) == 1).mean() > 0.9


def test_trained_model_finds_liver_on_unseen_scanner_in_any_on_disk_orientation(small_phantom, liver_bundle, tmp_path):
    bundle = load_bundle(liver_bundle)
    site = validate_site(small_phantom.external)
    image, reference = load_case(site.cases[0], site)
    labels = segment_image(bundle, image, CPU).labels
    dice = evaluate_label_maps(labels, reference, organs=("liver",))["liver"]["dice"]
    assert dice > 0.5
    assert set(np.unique(sitk.GetArrayViewFromImage(labels))) <= {0, 1}  # only the trained organ
    # The same scan stored in another voxel order gives the same physical segmentation.
    flipped = sitk.DICOMOrient(image, "ASL")
    labels_flipped = segment_image(bundle, flipped, CPU).labels
    back = sitk.DICOMOrient(
        labels_flipped, sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    )
    same = (sitk.GetArrayViewFromImage(back) == sitk.GetArrayViewFromImage(labels)).mean()
    assert same > 0.995


def test_cli_infer_dicom_series_with_stats_and_json_progress(real_data, constant_bundle, tmp_path):
    out, stats = tmp_path / "pred.nrrd", tmp_path / "stats.json"
    cmd = [
        sys.executable,
        "-m",
        "SegVizLogic.cli",
        "infer",
        "--model",
        str(constant_bundle),
        "--input",
        str(real_data / "dcmqi_ct3slice" / "ct-3slice"),
        "--output",
        str(out),
        "--stats",
        str(stats),
        "--progress",
        "json",
        "--device",
        "cpu",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert events[0]["event"] == "stage" and events[-1]["event"] == "done"
    assert events[-1]["outputs"]["labels"] == str(out)
    image = sitk.ReadImage(str(out))
    assert image.GetSize() == (512, 512, 3)
    data = json.loads(stats.read_text(encoding="utf-8"))
    voxels = data["organs"]["liver"]["voxels"]
    assert voxels == int((sitk.GetArrayViewFromImage(image) == 1).sum()) > 0
    assert data["organs"]["liver"]["volume_ml"] == pytest.approx(voxels * np.prod(image.GetSpacing()) / 1000, rel=1e-3)
    # a second run does not overwrite without --force, and says so on one line
    again = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", timeout=300, check=False)
    assert again.returncode == 2
    assert again.stderr.strip() == f"error: {out}: already exists; use --force to overwrite"


def test_cli_infer_bad_input_fails_cleanly(constant_bundle, tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    out = tmp_path / "pred.nii.gz"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "SegVizLogic.cli",
            "infer",
            "--model",
            str(constant_bundle),
            "--input",
            str(bad),
            "--output",
            str(out),
            "--progress",
            "none",
        ],
        capture_output=True,
        check=False,
        text=True,
        encoding="utf-8",
        timeout=120,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}:")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["broken.nii.gz"]


def test_labels_cleanup_and_batchnorm_adaptation(small_phantom, liver_bundle):
    probs = np.zeros((2, 4, 4, 4), np.float32)
    probs[0, :2] = 0.9
    probs[1, 2:] = 0.6
    probs[1, 0, 0, 0] = 0.95
    labels = probabilities_to_labels(probs, ("liver", "kidney"))
    assert labels[0, 0, 0] == 4 and labels[1, 1, 1] == 1 and labels[3, 3, 3] == 4
    blobs = np.zeros((10, 10, 10), np.uint8)
    blobs[0:4, 0:4, 0:4] = 1
    blobs[8, 8, 8] = 1
    blobs[6:9, 0:2, 0:2] = 4
    blobs[0:2, 7:9, 7:9] = 4
    blobs[5, 5, 5] = 4
    cleaned = keep_largest_component(blobs, ("liver", "kidney"))
    assert cleaned[8, 8, 8] == 0 and (cleaned == 1).sum() == 64
    assert (cleaned == 4).sum() == 12 + 8  # two kidneys kept, the speck dropped
    # Organs labelled on threads: the same answer as one at a time, on a speckled map of four organs.
    speckled = np.random.default_rng(0).choice(np.array([0, 1, 2, 3, 4], np.uint8), (30, 30, 30), p=[0.6] + [0.1] * 4)
    one = keep_largest_component(speckled, ("liver", "spleen", "pancreas", "kidney"), workers=1)
    assert np.array_equal(keep_largest_component(speckled, ("liver", "spleen", "pancreas", "kidney"), workers=2), one)
    assert 0 < (one != speckled).sum() and set(np.unique(one[one != speckled])) == {0}
    bundle = load_bundle(liver_bundle)
    site = validate_site(small_phantom.external)
    image, reference = load_case(site.cases[0], site)
    adapted = segment_image(bundle, image, CPU, batchnorm="adapt").labels
    assert evaluate_label_maps(adapted, reference, organs=("liver",))["liver"]["dice"] > 0.3
    assert resolve_device("auto").type in ("cpu", "cuda")


def test_inference_windows_are_the_training_patch_with_half_overlap(real_data, constant_bundle, monkeypatch):
    """The network runs on what it was trained on: windows of the bundle's training patch (larger
    windows cost the demo 0.24 external liver Dice), overlapping by half."""
    from SegVizLogic import inference

    calls = []
    original = inference.sliding_window_inference

    def recording(inputs, roi_size, sw_batch_size, predictor, overlap, **kwargs):
        calls.append((tuple(inputs.shape[2:]), tuple(roi_size), overlap))
        return original(inputs, roi_size, sw_batch_size, predictor, overlap, **kwargs)

    monkeypatch.setattr(inference, "sliding_window_inference", recording)
    bundle = load_bundle(constant_bundle)
    image = sitk.ReadImage(str(real_data / "totalseg_example" / "example_ct.nii.gz"))
    labels = segment_image(bundle, image, CPU).labels
    assert bundle.roi_size == (32, 32, 32) and inference.INFERENCE_OVERLAP == 0.5
    ((grid, roi, overlap),) = calls
    assert roi == (32, 32, 32) and overlap == 0.5
    assert all(size > 32 for size in grid)  # several windows per axis, so the overlap matters
    assert sitk.GetArrayViewFromImage(labels).max() == 1


def test_console_script_skips_finalisation_only_after_infer(constant_bundle, tmp_path, monkeypatch, capsys):
    """``segviz infer`` exits at once when done (os._exit, after flushing), with its status and
    its outputs complete; other commands, and infer's errors, keep their status too."""
    import os

    from SegVizLogic import cli

    class Exited(Exception):
        pass

    def record(kind):
        def exit_with(status=0):
            raise Exited(kind, status)

        return exit_with

    monkeypatch.setattr(os, "_exit", record("at once"))
    monkeypatch.setattr(sys, "exit", record("finalised"))
    ct = tmp_path / "ct.nii.gz"
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 400, (8, 24, 24)).astype(np.int16))
    sitk.WriteImage(image, str(ct))
    out = tmp_path / "labels.nii.gz"
    args = ["segviz", "infer", "--model", str(constant_bundle), "--input", str(ct), "--output", str(out)]
    for argv, expected in [
        (args + ["--device", "cpu", "--progress", "none"], ("at once", 0)),
        (args + ["--device", "cpu", "--progress", "none"], ("at once", 2)),  # exists, no --force
        (["segviz", "organs"], ("finalised", 0)),
    ]:
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(Exited) as exited:
            cli.entry_point()
        assert exited.value.args == expected, argv
    assert sitk.ReadImage(str(out)).GetSize() == image.GetSize()
    assert "already exists" in capsys.readouterr().err


def test_segmentation_uses_the_bundles_threshold_unless_told(constant_bundle, tmp_path, monkeypatch):
    """A voxel is an organ where its probability is the highest and above the threshold: the
    bundle's (chosen on validation) by default, ``threshold=`` or ``--threshold`` when given."""
    from SegVizLogic import inference
    from SegVizLogic.cli import main

    path = constant_bundle
    image = sitk.GetImageFromArray(np.random.default_rng(1).integers(-200, 200, (8, 24, 24)).astype(np.int16))

    def liver_at_0_4(bundle, prepared, device, **kwargs):
        out = torch.zeros((len(bundle.organs), *prepared.shape[-3:]))
        out[bundle.organs.index("liver")] = 0.4
        return out

    monkeypatch.setattr(inference, "bundle_probabilities", liver_at_0_4)

    def liver_voxels(**kwargs) -> int:
        labels = segment_image(load_bundle(path), image, CPU, cleanup=False, **kwargs).labels
        return int((sitk.GetArrayViewFromImage(labels) == 1).sum())

    assert liver_voxels() == 0  # 0.5: no bundle threshold recorded
    constant = load_bundle(constant_bundle)
    path = save_bundle(
        tmp_path / "chosen.segviz",
        constant.build_model("model"),
        constant.preprocessing,
        training=constant.manifest["training"],
        inference={"threshold": 0.3, "threshold_rule": "test"},
    )
    assert liver_voxels() == image.GetNumberOfPixels()
    assert liver_voxels(threshold=0.45) == 0
    with pytest.raises(SystemExit):  # argparse: one line, exit status 2
        main(["infer", "--model", str(path), "--input", "x.nii.gz", "--output", "y.nii.gz", "--threshold", "1.2"])


def test_threshold_is_chosen_on_the_sites_validation_cases(small_phantom, liver_bundle, monkeypatch):
    """The (BatchNorm, threshold) pair with the best mean validation Dice; a tie goes to the earlier
    BatchNorm, then the earlier threshold."""
    from SegVizLogic import threshold_selection
    from SegVizLogic.threshold_selection import THRESHOLD_CANDIDATES, batchnorm_candidates, choose_threshold

    bundle = load_bundle(liver_bundle)
    liver_site = next(s for s in small_phantom.sites if s.name == "site-liver")
    batchnorm, chosen, table = choose_threshold(bundle, [str(liver_site)], 0.34, CPU)
    assert batchnorm == bundle.default_batchnorm and list(table) == [bundle.default_batchnorm]
    rows = table[batchnorm]
    assert list(rows) == [f"{t:g}" for t in THRESHOLD_CANDIDATES] and chosen in THRESHOLD_CANDIDATES
    assert set(rows["0.5"]) == {"liver", "mean"} and all(0.0 <= row["mean"] <= 1.0 for row in rows.values())
    assert rows[f"{chosen:g}"]["mean"] == max(row["mean"] for row in rows.values())
    # with the test-time adaptations offered too: one pass per BatchNorm, the best pair overall
    offered = batchnorm_candidates("model")
    assert offered == ["model", "adapt", "adapt-organs"]
    batchnorm, chosen, table = choose_threshold(bundle, [str(liver_site)], 0.34, CPU, batchnorms=offered)
    assert list(table) == offered and table["model"] == rows  # the same scores for the same BatchNorm
    best = max(row["mean"] for rows_b in table.values() for row in rows_b.values())
    assert table[batchnorm][f"{chosen:g}"]["mean"] == best
    with pytest.raises(ValueError, match="not offered"):
        choose_threshold(bundle, [str(liver_site)], 0.34, CPU, batchnorms=["site:elsewhere"])
    # every candidate equally good (the reference itself): the first BatchNorm, the first threshold
    site = validate_site(liver_site)
    held_out = {c.name: load_case(c, site)[1] for c in site.cases}
    passes = []

    def perfect(bundle, image, device, thresholds, batchnorms):
        passes.extend(batchnorms)  # one network pass per case and BatchNorm
        return {b: {t: held_out[max(held_out)] for t in thresholds} for b in batchnorms}

    monkeypatch.setattr(threshold_selection, "segment_image_at_settings", perfect)
    assert choose_threshold(bundle, [str(liver_site)], 0.34, CPU, batchnorms=["adapt", "model"]) == (
        "adapt",
        0.5,
        {b: {f"{t:g}": {"liver": 1.0, "mean": 1.0} for t in THRESHOLD_CANDIDATES} for b in ("adapt", "model")},
    )
    assert passes == ["adapt", "model"]


def test_labels_at_several_thresholds_come_from_one_network_pass(small_phantom, liver_bundle, monkeypatch):
    """``segment_image_at_thresholds`` gives, from one pass, each threshold's ``segment_image`` label map."""
    from SegVizLogic import inference
    from SegVizLogic.experiments.selection import Option, _pass_groups
    from SegVizLogic.inference import segment_image_at_thresholds

    bundle = load_bundle(liver_bundle)
    site = validate_site(small_phantom.external)
    image, _ = load_case(site.cases[0], site)
    passes = []
    original = inference.bundle_probabilities
    monkeypatch.setattr(inference, "bundle_probabilities", lambda *a, **k: passes.append(1) or original(*a, **k))
    thresholds = (0.5, 0.3, 0.1)
    maps = segment_image_at_thresholds(bundle, image, CPU, thresholds, batchnorm="adapt", overlap=0.25)
    assert len(passes) == 1 and list(maps) == list(thresholds)
    livers = []
    for t in thresholds:
        alone = segment_image(bundle, image, CPU, batchnorm="adapt", overlap=0.25, threshold=t).labels
        assert maps[t].GetSize() == image.GetSize() and maps[t].GetDirection() == image.GetDirection()
        assert np.array_equal(sitk.GetArrayViewFromImage(maps[t]), sitk.GetArrayViewFromImage(alone))
        livers.append(int((sitk.GetArrayViewFromImage(alone) == 1).sum()))
    assert 0 < livers[0] < livers[2]  # a lower threshold labels more liver
    # Several BatchNorm choices: the image preprocessed once, one network pass each, the same maps.
    preprocessed = []
    original_prepare = inference._prepared_image
    monkeypatch.setattr(
        inference, "_prepared_image", lambda *a, **k: preprocessed.append(1) or original_prepare(*a, **k)
    )
    passes.clear()
    both = inference.segment_image_at_settings(bundle, image, CPU, thresholds, ["adapt", "model"], overlap=0.25)
    assert len(preprocessed) == 1 and len(passes) == 2 and list(both) == ["adapt", "model"]
    for t in thresholds:
        assert np.array_equal(sitk.GetArrayViewFromImage(both["adapt"][t]), sitk.GetArrayViewFromImage(maps[t]))
    alone = segment_image(bundle, image, CPU, batchnorm="model", overlap=0.25, threshold=0.3).labels
    assert np.array_equal(sitk.GetArrayViewFromImage(both["model"][0.3]), sitk.GetArrayViewFromImage(alone))
    # The comparison's validation groups its candidates the same way: one pass per (checkpoint, BatchNorm, overlap).
    options = [Option("final", bn, o, t) for bn in ("model", "adapt") for o in (0.25, 0.5) for t in (0.5, 0.3)]
    groups = _pass_groups(options)
    assert [[o.key for o in g] for g in groups] == [[o.key for o in options[i : i + 2]] for i in range(0, 8, 2)]
