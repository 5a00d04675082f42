"""Evaluation against any reference: other label values, the same voxels stored in another
orientation (exact), another grid (refused with what differs, or resampled), folders paired by
case name, and the CSV/JSON/PNG report."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from SegVizLogic.cli import main
from SegVizLogic.errors import SegVizInputError
from SegVizLogic.evaluation import align_reference, evaluate_label_maps, grid_differences, parse_ref_map

TOTALSEG_MAP = "liver=5,spleen=1,pancreas=7,kidney=2+3"
TOTALSEG_TO_SEGVIZ = {5: 1, 1: 2, 7: 3, 2: 4, 3: 4}


def _image(array, spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    image = sitk.GetImageFromArray(np.asarray(array).astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def _stored_flipped(image: sitk.Image, axis: int) -> sitk.Image:
    """The same voxels at the same places, stored with index axis ``axis`` reversed."""
    array = sitk.GetArrayFromImage(image)
    flipped = sitk.GetImageFromArray(np.flip(array, axis=2 - axis).copy())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    origin = np.asarray(image.GetOrigin()) + direction[:, axis] * image.GetSpacing()[axis] * (image.GetSize()[axis] - 1)
    direction[:, axis] *= -1
    flipped.SetSpacing(image.GetSpacing())
    flipped.SetOrigin(tuple(origin))
    flipped.SetDirection(tuple(direction.ravel()))
    return flipped


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_dice_hd95_volumes_and_organs_left_out_of_the_map():
    ref = np.zeros((10, 20, 20), np.uint8)
    ref[2:8, 5:15, 5:15] = 5  # liver in TotalSegmentator values
    ref[2:8, 0:2, 0:2] = 3  # left kidney
    pred = np.zeros_like(ref)
    pred[2:8, 5:15, 5:10] = 1  # half the liver
    scores = evaluate_label_maps(_image(pred), _image(ref), parse_ref_map("liver=5,kidney=2+3"))
    assert list(scores) == ["liver", "kidney"]  # spleen and pancreas are not in the map: not in the table
    liver = scores["liver"]
    assert liver["dice"] == pytest.approx(2 * 300 / (300 + 600))
    assert liver["hd95_mm"] == pytest.approx(10.0)  # 5 voxels of 2 mm along x (the last array axis)
    assert liver["pred_ml"] == pytest.approx(0.6) and liver["ref_ml"] == pytest.approx(1.2)  # 2 mm^3 voxels
    assert liver["volume_diff_ml"] == pytest.approx(-0.6) and liver["volume_diff_percent"] == pytest.approx(-50.0)
    assert scores["kidney"]["dice"] == 0.0 and scores["kidney"]["status"] == "missed (not predicted)"
    default = evaluate_label_maps(_image(pred), _image(np.where(ref == 5, 1, 0)))
    assert default["spleen"]["status"] == "absent in reference" and default["spleen"]["dice"] is None


def test_grid_mismatch_is_refused():
    a = _image(np.zeros((4, 4, 4)))
    b = _image(np.zeros((4, 4, 4)), spacing=(1, 1, 1))
    with pytest.raises(
        SegVizInputError, match=r"p.nii.gz: grid differs from r.nii.gz: spacing \(2, 1, 1\) vs \(1, 1, 1\)"
    ):
        evaluate_label_maps(a, b, pred_path="p.nii.gz", ref_path="r.nii.gz")


def test_ref_map_parsing():
    assert parse_ref_map("liver=5,spleen=1,kidney=2+3") == {5: "liver", 1: "spleen", 2: "kidney", 3: "kidney"}
    assert parse_ref_map(None) == {1: "liver", 2: "spleen", 3: "pancreas", 4: "kidney"}
    with pytest.raises(ValueError, match="not organ=value"):
        parse_ref_map("liver5")
    with pytest.raises(ValueError, match="unknown organ"):
        parse_ref_map("lung=3")
    # one value cannot be two organs (it used to keep the last silently)
    with pytest.raises(ValueError, match="--ref-map: value 5 is given to both liver and spleen"):
        parse_ref_map("liver=5,spleen=5")
    assert parse_ref_map("kidney=2,kidney=2") == {2: "kidney"}


def test_a_direction_that_differs_is_named_by_axis_and_angle():
    rotated = (math.cos(math.radians(10)), math.sin(math.radians(10)), 0.0)
    direction = (rotated[0], -rotated[1], 0.0, rotated[1], rotated[0], 0.0, 0.0, 0.0, 1.0)
    pred = _image(np.zeros((4, 5, 6)), spacing=(1, 1, 1))
    ref = _image(np.zeros((4, 5, 6)), spacing=(1, 1, 1), direction=direction)
    problems = grid_differences(pred, ref)
    # size, spacing and origin agree and are not listed; the two axes that differ are, with the angle
    assert len(problems) == 2
    assert problems[0] == "direction of index axis x: (1, 0, 0) vs (0.984808, 0.173648, 0), 10 degrees apart"
    assert problems[1].startswith("direction of index axis y: (0, 1, 0) vs (-0.173648, 0.984808, 0)")


def test_flipped_and_permuted_real_reference_is_compared_exactly(real_data, tmp_path, capsys):
    reference = sitk.ReadImage(str(real_data / "totalseg_example" / "example_seg_fast_force_split.nii.gz"))
    values = sitk.GetArrayFromImage(reference)
    segviz = np.zeros_like(values)
    for total, ours in TOTALSEG_TO_SEGVIZ.items():
        segviz[values == total] = ours
    prediction = sitk.GetImageFromArray(segviz)
    prediction.CopyInformation(reference)
    pred_path = tmp_path / "pred.nii.gz"
    sitk.WriteImage(prediction, str(pred_path))
    # stored with x reversed (what TotalSegmentator's DICOM example reference looks like), and
    # with every axis moved (ASL), as two tools might write the same segmentation
    references = {"flipped": _stored_flipped(reference, 0), "permuted": sitk.DICOMOrient(reference, "ASL")}
    for name, stored in references.items():
        path = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(stored, str(path))
        assert grid_differences(prediction, sitk.ReadImage(str(path)))  # not the same grid on disk
        report = tmp_path / f"{name}.json"
        code = main(
            ["evaluate", "--pred", str(pred_path), "--ref", str(path), "--ref-map", TOTALSEG_MAP, "--json", str(report)]
        )
        assert code == 0
        case = json.loads(report.read_text(encoding="utf-8"))["cases"]["pred"]
        # voxel for voxel: a perfect copy scores a perfect Dice, zero HD95, zero volume difference
        for organ in ("liver", "spleen", "pancreas", "kidney"):
            scores = case["organs"][organ]
            assert scores["dice"] == 1.0 and scores["hd95_mm"] == 0.0 and scores["volume_diff_ml"] == 0.0, (name, organ)
        assert case["organs"]["liver"]["ref_voxels"] == 41692  # the README's count: nothing lost or gained
        assert len(case["notes"]) == 1 and "same voxels in another orientation" in case["notes"][0]
        assert "exact" in case["notes"][0]
        assert "note: the reference stores the same voxels" in capsys.readouterr().out
    assert (
        "x = -x, y = y, z = z"
        in json.loads((tmp_path / "flipped.json").read_text(encoding="utf-8"))["cases"]["pred"]["notes"][0]
    )


def test_reference_on_another_grid_is_refused_or_resampled(real_data, tmp_path, capsys):
    reference = sitk.ReadImage(str(real_data / "totalseg_example" / "example_seg_fast_force_split.nii.gz"))
    pred_path, coarse_path = tmp_path / "pred.nii.gz", tmp_path / "coarse.nii.gz"
    sitk.WriteImage(reference, str(pred_path))
    coarse = sitk.Resample(
        reference,
        [61, 51, 56],
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        reference.GetOrigin(),
        (6.0, 6.0, 6.0),
        reference.GetDirection(),
        0,
        reference.GetPixelID(),
    )
    sitk.WriteImage(coarse, str(coarse_path))
    args = [
        "evaluate",
        "--pred",
        str(pred_path),
        "--ref",
        str(coarse_path),
        "--ref-map",
        "liver=5",
        "--pred-map",
        "liver=5",
    ]
    report = tmp_path / "report.json"
    assert main([*args, "--json", str(report)]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "size 122x101x112 vs 61x51x56 voxels" in errors[0]
    assert "spacing (3, 3, 3) vs (6, 6, 6) mm" in errors[0] and "--resample-ref" in errors[0]
    assert not report.exists()

    assert main([*args, "--json", str(report), "--resample-ref"]) == 0
    case = json.loads(report.read_text(encoding="utf-8"))["cases"]["pred"]
    liver = case["organs"]["liver"]
    assert 0.85 < liver["dice"] < 0.99  # the same liver, once at 6 mm
    assert case["notes"][0].startswith("reference resampled onto the prediction's grid (nearest neighbour)")
    assert "liver 1101.8 -> 1101.8 mL" in case["notes"][2]  # a 2x nearest-neighbour upsampling keeps the volume
    assert case["notes"][1] == "60 other label values of the prediction are not in --pred-map and are left out"

    shifted = sitk.Image(reference)
    shifted.SetOrigin(tuple(np.asarray(reference.GetOrigin()) + (1.5, 0.0, 0.0)))  # half a voxel: another lattice
    with pytest.raises(
        SegVizInputError, match=r"origin \(177\.956, -11\.319, 94\.3018\) vs \(179\.456, .*1\.5 mm apart"
    ):
        align_reference(reference, shifted)


def test_a_reference_cropped_on_the_same_lattice_is_exact():
    pred = np.zeros((8, 10, 12), np.uint8)
    pred[2:5, 3:7, 4:9] = 1
    pred_image = _image(pred, spacing=(1.0, 1.0, 1.0), origin=(10.0, 20.0, 30.0))
    crop = _image(pred[1:6, 2:8, 3:10], spacing=(1.0, 1.0, 1.0), origin=(13.0, 22.0, 31.0))
    aligned, note = align_reference(pred_image, crop)
    assert "cropped" in note and np.array_equal(sitk.GetArrayFromImage(aligned), pred)
    assert evaluate_label_maps(pred_image, crop)["liver"]["dice"] == 1.0


def test_prediction_values_outside_the_schema_are_refused(tmp_path, capsys):
    pred = np.zeros((4, 6, 6), np.uint8)
    pred[1:3, 1:4, 1:4] = 5  # a TotalSegmentator liver passed as a prediction
    pred[0, 0, 0] = 9
    ref = np.where(pred == 5, 1, 0)
    sitk.WriteImage(_image(pred), str(tmp_path / "p.nii.gz"))
    sitk.WriteImage(_image(ref), str(tmp_path / "r.nii.gz"))
    args = ["evaluate", "--pred", str(tmp_path / "p.nii.gz"), "--ref", str(tmp_path / "r.nii.gz"), "--no-hd95"]
    assert main(args) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "p.nii.gz: label values 5, 9 are not SegViz organs" in errors[0]
    assert "--pred-map" in errors[0]
    assert main([*args, "--pred-map", "liver=5,spleen=9"]) == 0
    assert "liver      1.000" in capsys.readouterr().out


def _write_case(folder, name, array, suffix=".nii.gz"):
    folder.mkdir(exist_ok=True)
    sitk.WriteImage(_image(array, spacing=(1.0, 1.0, 1.0)), str(folder / f"{name}{suffix}"))


def test_folders_are_paired_by_case_name_into_one_table_and_figure(tmp_path, capsys):
    preds, refs = tmp_path / "pred", tmp_path / "ref"
    liver = np.zeros((6, 10, 10), np.uint8)
    liver[1:5, 2:8, 2:8] = 1
    half = liver.copy()
    half[:, :, 5:] = 0
    _write_case(preds, "case-a", liver)  # perfect
    _write_case(refs, "case-a", liver * 5)
    _write_case(preds, "case-b", half)  # half the liver: Dice 2/3, volume -50 %
    _write_case(refs, "case-b", liver * 5, suffix=".nrrd")
    _write_case(preds, "case-c", liver)  # no reference
    _write_case(refs, "case-d", liver * 5)  # no prediction
    outputs = [tmp_path / "out" / name for name in ("scores.csv", "scores.json", "dice.png")]
    args = ["evaluate", "--pred", str(preds), "--ref", str(refs), "--ref-map", "liver=5", "--progress", "none"]
    args += ["--csv", str(outputs[0]), "--json", str(outputs[1]), "--png", str(outputs[2])]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "2 cases" in text and "predictions without a reference: case-c" in text
    assert "references without a prediction: case-d" in text

    rows = list(csv.DictReader(outputs[0].open()))
    assert [(r["case"], r["organ"]) for r in rows] == [("case-a", "liver"), ("case-b", "liver"), ("mean", "liver")]
    assert float(rows[1]["dice"]) == pytest.approx(2 / 3, abs=1e-5) and float(rows[1]["volume_diff_percent"]) == -50
    assert float(rows[2]["dice"]) == pytest.approx((1 + 2 / 3) / 2, abs=1e-5)
    document = json.loads(outputs[1].read_text(encoding="utf-8"))
    assert set(document["cases"]) == {"case-a", "case-b"} and set(document["cases"]["case-a"]["organs"]) == {"liver"}
    assert document["mean"]["liver"]["n"] == 2 and document["mean"]["liver"]["dice_mean"] == pytest.approx(5 / 6)
    assert document["unmatched"] == {
        "predictions_without_reference": ["case-c"],
        "references_without_prediction": ["case-d"],
    }
    png = outputs[2].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 800 and height > 300  # three panels side by side
    assert sorted(p.name for p in outputs[0].parent.iterdir()) == ["dice.png", "scores.csv", "scores.json"]

    # nothing is overwritten without --force, and the refusal comes before any work
    before = [p.read_bytes() for p in outputs]
    assert main(args) == 2
    assert "scores.json: already exists; use --force" in _errors(capsys)[0]
    assert [p.read_bytes() for p in outputs] == before
    assert main([*args[:-2], "--png", str(tmp_path / "x.jpg"), "--force"]) == 2
    assert "--png needs a .png file name" in _errors(capsys)[0]
