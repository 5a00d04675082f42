"""Tests of SegVizLogic.site: site.json, pairing, validation (every problem, one line each), loading."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegVizLogic import io
from SegVizLogic.errors import SegVizInputError
from SegVizLogic.site import (
    SITE_FILE,
    Case,
    Site,
    SiteValidationError,
    load_case,
    load_site,
    state_dir,
    validate_site,
    write_site,
)

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real"
TOTALSEG = REAL / "totalseg_example"
DCMQI = REAL / "dcmqi_ct3slice"

SIZE = (16, 14, 10)  # x, y, z
SPACING = (1.5, 1.5, 2.0)
ORIGIN = (-10.0, 20.0, 5.0)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real test data not found: {path}")
    return path


def ct_image(spacing=SPACING, origin=ORIGIN, low=-1000.0, high=60.0) -> sitk.Image:
    """Small CT-like volume: air around a soft-tissue block."""
    array = np.full(SIZE[::-1], low, np.float32)
    array[2:8, 3:11, 3:13] = high
    array[4:6, 5:7, 5:7] = high + 200  # "bone"
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def label_image(values=(1, 2), spacing=SPACING, origin=ORIGIN) -> sitk.Image:
    array = np.zeros(SIZE[::-1], np.uint8)
    blocks = [
        (slice(2, 5), slice(3, 7), slice(3, 8)),
        (slice(5, 8), slice(7, 11), slice(8, 13)),
        (slice(2, 4), slice(8, 10), slice(3, 5)),
        (slice(6, 8), slice(3, 5), slice(10, 12)),
    ]
    for value, block in zip(values, blocks):
        array[block] = value
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def make_site(root: Path, organs=("liver", "kidney"), labels=None, cases=("case001", "case002"), values=(1, 2)) -> Path:
    """Site with local values 1 = liver, 2 = kidney unless told otherwise."""
    write_site(root, root.name, list(organs), labels if labels is not None else {1: "liver", 2: "kidney"})
    for case in cases:
        sitk.WriteImage(ct_image(), str(root / "images" / f"{case}.nii.gz"))
        sitk.WriteImage(label_image(values), str(root / "labels" / f"{case}.nrrd"), useCompression=True)
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def problems_of(root: Path, check_images: bool = True) -> list[str]:
    """Validate; return the problems, and prove validation wrote nothing."""
    before = snapshot(root)
    with pytest.raises(SiteValidationError) as info:
        validate_site(root, check_images=check_images)
    assert snapshot(root) == before
    assert not (root / ".segviz").exists()
    assert all("\n" not in p for p in info.value.problems)
    return info.value.problems


def one_problem(root: Path, *fragments: str, check_images: bool = True) -> str:
    problems = problems_of(root, check_images)
    assert len(problems) == 1, problems
    for fragment in fragments:
        assert fragment in problems[0], (fragment, problems[0])
    return problems[0]


# ------------------------------------------------------------------ valid sites


def test_valid_site_loads_and_pairs(tmp_path):
    root = make_site(tmp_path / "site-a")
    (root / ".segviz").mkdir()
    (root / ".segviz" / "bn.pt").write_bytes(b"state")
    (root / "images" / ".DS_Store").write_bytes(b"")
    site = validate_site(root)
    assert isinstance(site, Site)
    assert (site.name, site.organs, site.label_values) == ("site-a", ("liver", "kidney"), {1: "liver", 2: "kidney"})
    assert [c.name for c in site.cases] == ["case001", "case002"]
    assert site.cases[0] == Case("case001", root / "images" / "case001.nii.gz", root / "labels" / "case001.nrrd")
    assert load_site(root) == site
    assert json.loads((root / SITE_FILE).read_text(encoding="utf-8")) == {
        "name": "site-a",
        "organs": ["liver", "kidney"],
        "labels": {"1": "liver", "2": "kidney"},
    }

    image, organs = load_case(site.cases[0], site)
    assert image.GetPixelID() == sitk.sitkFloat32 and organs.GetPixelID() == sitk.sitkUInt8
    assert io.geometry(organs) == io.geometry(image)
    counts = np.bincount(sitk.GetArrayViewFromImage(organs).ravel(), minlength=5)
    assert counts.tolist() == [SIZE[0] * SIZE[1] * SIZE[2] - 60 - 60, 60, 0, 0, 60]


def test_null_values_and_several_values_per_organ(tmp_path):
    root = make_site(
        tmp_path / "s", organs=("kidney",), labels={1: "kidney", 2: "kidney", 3: None, 4: None}, values=(1, 2, 3, 4)
    )
    site = validate_site(root)
    _, organs = load_case(site.cases[0], site)
    counts = np.bincount(sitk.GetArrayViewFromImage(organs).ravel(), minlength=5)
    assert counts[4] == 60 + 60 and counts[1:4].tolist() == [0, 0, 0]  # left+right kidney; nulls are background


def test_real_dicom_and_totalsegmentator_sites(tmp_path):
    """Real data, linked in place: a DICOM series folder as an image, and TotalSegmentator labels."""
    dicom_site = tmp_path / "dicom-site"
    write_site(dicom_site, "dicom-site", ["liver"], {1: "liver"})
    (dicom_site / "images" / "ct3").symlink_to(_need(DCMQI / "ct-3slice").resolve(), target_is_directory=True)
    (dicom_site / "labels" / "ct3.nrrd").symlink_to((DCMQI / "liver_seg.nrrd").resolve())
    site = validate_site(dicom_site)
    image, organs = load_case(site.cases[0], site)
    assert image.GetSize() == (512, 512, 3)
    liver = int((sitk.GetArrayViewFromImage(organs) == 1).sum())
    assert liver == int((sitk.GetArrayViewFromImage(io.read_label_map(DCMQI / "liver_seg.nrrd")) == 1).sum()) > 1000

    ts_site = tmp_path / "ts-site"
    seg_path = _need(TOTALSEG / "example_seg_fast_force_split.nii.gz").resolve()
    values = np.unique(sitk.GetArrayViewFromImage(io.read_label_map(seg_path)))
    mapping = {int(v): None for v in values if v} | {5: "liver", 1: "spleen", 7: "pancreas", 3: "kidney", 2: "kidney"}
    write_site(ts_site, "ts", ["liver", "spleen", "pancreas", "kidney"], mapping)
    (ts_site / "images" / "ex.nii.gz").symlink_to((TOTALSEG / "example_ct.nii.gz").resolve())
    (ts_site / "labels" / "ex.nii.gz").symlink_to(seg_path)
    site = validate_site(ts_site)
    _, organs = load_case(site.cases[0], site)
    assert np.bincount(sitk.GetArrayViewFromImage(organs).ravel(), minlength=5)[1:].tolist() == [
        41692,
        9668,
        695,
        12224,
    ]

    # The same site declaring only liver and spleen: pancreas and kidney voxels become background.
    write_site(
        ts_site,
        "ts",
        ["liver", "spleen"],
        {k: (v if v in ("liver", "spleen") else None) for k, v in mapping.items()},
        force=True,
    )
    site = validate_site(ts_site)
    _, organs = load_case(site.cases[0], site)
    assert np.bincount(sitk.GetArrayViewFromImage(organs).ravel(), minlength=5)[1:].tolist() == [41692, 9668, 0, 0]


def _write_seg_nrrd(path: Path, names: list[str], origin=ORIGIN, spacing=SPACING, size=SIZE) -> None:
    """Single-layer Slicer segmentation: segment i has label value i + 1, a 2x2x2 block."""
    array = np.zeros(size[::-1], np.uint8)
    for i in range(len(names)):
        array[1:3, 1:3, 2 * i + 1 : 2 * i + 3] = i + 1
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    for i, name in enumerate(names):
        image.SetMetaData(f"Segment{i}_Name", name)
        image.SetMetaData(f"Segment{i}_LabelValue", str(i + 1))
        image.SetMetaData(f"Segment{i}_Layer", "0")
    sitk.WriteImage(image, str(path), useCompression=True)


def test_segment_names_site_with_cropped_segmentation(tmp_path):
    root = tmp_path / "slicer-site"
    write_site(root, "slicer-site", ["liver", "kidney"], "segment-names")
    sitk.WriteImage(ct_image(), str(root / "images" / "c1.nrrd"))
    # Cropped by Slicer to 8x6x4 voxels starting at voxel (3, 2, 1) of the CT.
    crop_origin = (ORIGIN[0] + 3 * SPACING[0], ORIGIN[1] + 2 * SPACING[1], ORIGIN[2] + 1 * SPACING[2])
    _write_seg_nrrd(
        root / "labels" / "c1.seg.nrrd", ["Liver", "kidney_left", "Liver tumor"], origin=crop_origin, size=(8, 6, 4)
    )
    site = validate_site(root)
    assert site.segment_names and site.label_values == {}
    image, organs = load_case(site.cases[0], site)
    assert io.geometry(organs) == io.geometry(image)
    array = sitk.GetArrayViewFromImage(organs)
    assert np.bincount(array.ravel(), minlength=5)[1:].tolist() == [8, 0, 0, 8]  # the tumour segment is ignored
    # Crop voxel (x=1, y=1, z=1) is CT voxel (4, 3, 2).
    assert array[2, 3, 4] == 1 and array[2, 3, 3] == 0


def test_segmentation_off_the_image_grid_is_refused(tmp_path):
    root = tmp_path / "s"
    write_site(root, "s", ["liver"], "segment-names")
    sitk.WriteImage(ct_image(), str(root / "images" / "c1.nii.gz"))
    _write_seg_nrrd(root / "labels" / "c1.seg.nrrd", ["Liver"], origin=(ORIGIN[0] + 0.5, ORIGIN[1], ORIGIN[2]))
    message = one_problem(root, "c1.seg.nrrd: segmentation origin is not on the image's voxel grid")
    assert "(0.333, 0.000, 0.000)" in message
    with pytest.raises(SegVizInputError, match="not on the image's voxel grid"):
        load_case(load_site(root).cases[0], load_site(root))


def test_segment_names_problems(tmp_path):
    root = tmp_path / "s"
    write_site(root, "s", ["liver"], "segment-names")
    sitk.WriteImage(ct_image(), str(root / "images" / "c1.nii.gz"))
    _write_seg_nrrd(root / "labels" / "c1.seg.nrrd", ["Liver", "Spleen"])
    one_problem(root, "c1.seg.nrrd: segment 'Spleen' is 'spleen', which is not in 'organs' [liver]")
    (root / "labels" / "c1.seg.nrrd").unlink()
    sitk.WriteImage(label_image((1,)), str(root / "labels" / "c1.nii.gz"))
    one_problem(root, "c1.nii.gz: no segment names, but site.json says \"labels\": 'segment-names'")


# ------------------------------------------------------------------ site.json problems


def test_missing_site_json(tmp_path):
    root = make_site(tmp_path / "s")
    (root / SITE_FILE).unlink()
    one_problem(root, f"{root / SITE_FILE}: missing (a site folder needs site.json, images/ and labels/)")
    with pytest.raises(SiteValidationError, match="site.json: missing"):
        load_site(root)
    with pytest.raises(SiteValidationError, match="nowhere: no such site folder"):
        validate_site(tmp_path / "nowhere")


def test_invalid_json(tmp_path):
    root = make_site(tmp_path / "s")
    (root / SITE_FILE).write_text('{"name": "s", "organs": ["liver",]}', encoding="utf-8")
    one_problem(root, "site.json: invalid JSON (", "line 1 column")


def test_missing_keys(tmp_path):
    root = make_site(tmp_path / "s")
    (root / SITE_FILE).write_text(json.dumps({"name": "s"}), encoding="utf-8")
    problems = problems_of(root)
    assert problems == [f"{root / SITE_FILE}: missing key 'organs'", f"{root / SITE_FILE}: missing key 'labels'"]
    with pytest.raises(SiteValidationError) as info:
        load_site(root)
    assert str(info.value) == f"{root / SITE_FILE}: missing key 'organs' (and 1 more problem)"


def test_unknown_organ_names_the_valid_ones(tmp_path):
    root = make_site(tmp_path / "s")
    (root / SITE_FILE).write_text(
        json.dumps({"name": "s", "organs": ["liver", "livr", "kidney"], "labels": {"1": "liver", "2": "kidney"}}),
        encoding="utf-8",
    )
    one_problem(root, "site.json: unknown organ 'livr' in 'organs' (valid: liver, spleen, pancreas, kidney)")
    (root / SITE_FILE).write_text(
        json.dumps({"name": "s", "organs": ["liver", "kidney"], "labels": {"1": "liver", "2": "kidney", "3": "heart"}}),
        encoding="utf-8",
    )
    one_problem(root, "site.json: unknown organ 'heart' for label value 3 in 'labels'")


def test_organ_in_labels_not_in_organs_and_vice_versa(tmp_path):
    root = make_site(tmp_path / "s")
    (root / SITE_FILE).write_text(
        json.dumps({"name": "s", "organs": ["liver"], "labels": {"1": "liver", "2": "kidney"}}), encoding="utf-8"
    )
    one_problem(root, "site.json: label value 2 is 'kidney', which is not in 'organs' [liver]")
    (root / SITE_FILE).write_text(
        json.dumps({"name": "s", "organs": ["liver", "kidney", "spleen"], "labels": {"1": "liver", "2": "kidney"}}),
        encoding="utf-8",
    )
    one_problem(root, "site.json: organ 'spleen' is in 'organs' but no label value in 'labels' maps to it")


def test_bad_label_keys(tmp_path):
    root = make_site(tmp_path / "s")
    (root / SITE_FILE).write_text(
        json.dumps(
            {
                "name": "s",
                "organs": ["liver", "kidney"],
                "labels": {"one": "liver", "0": "liver", "2": "kidney", "1": "liver"},
            }
        ),
        encoding="utf-8",
    )
    problems = problems_of(root)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "label value 'one' in 'labels' is not an integer",
        "label value 0 is background and cannot be 'liver'",
    ]


# ------------------------------------------------------------------ pairing problems


def test_image_without_label_and_label_without_image(tmp_path):
    root = make_site(tmp_path / "s")
    (root / "labels" / "case002.nrrd").unlink()
    sitk.WriteImage(label_image(), str(root / "labels" / "case003.seg.nrrd"))
    problems = problems_of(root)
    assert problems == [
        (
            f"{root / 'images' / 'case002.nii.gz'}: no label map for case 'case002' "
            f"(expected {root / 'labels' / 'case002'}.nii.gz, .nrrd, .mha or .seg.nrrd)"
        ),
        f"{root / 'labels' / 'case003.seg.nrrd'}: no image for case 'case003' in {root / 'images'}",
    ]
    with pytest.raises(SiteValidationError) as info:
        load_site(root)
    assert str(info.value) == problems[0] + " (and 1 more problem)"


def test_no_cases(tmp_path):
    root = make_site(tmp_path / "s", cases=())
    one_problem(root, f"{root}: no cases (no image in images/ has a label map of the same name in labels/)")


def test_duplicate_and_unsupported_entries(tmp_path):
    root = make_site(tmp_path / "s", cases=("case001",))
    sitk.WriteImage(label_image(), str(root / "labels" / "case001.nii.gz"))
    (root / "images" / "notes.txt").write_text("x", encoding="utf-8")
    (root / "images" / "slice.dcm").write_bytes(b"")
    problems = problems_of(root)
    assert len(problems) == 4
    assert "notes.txt: unsupported file type '.txt'" in problems[0]
    assert "slice.dcm: DICOM files must be in one sub-folder per case" in problems[1]
    assert "labels: 2 label maps for case 'case001': case001.nii.gz, case001.nrrd; keep one" in problems[2]
    assert problems[3] == f"{root}: no cases (no image in images/ has a label map of the same name in labels/)"


def test_error_message_counts_more_problems(tmp_path):
    root = make_site(tmp_path / "s", cases=("a", "b", "c"))
    for case in ("a", "b", "c"):
        (root / "labels" / f"{case}.nrrd").unlink()
    problems = problems_of(root)
    assert len(problems) == 4  # three unpaired images and no cases
    with pytest.raises(SiteValidationError) as info:
        validate_site(root)
    assert str(info.value) == problems[0] + " (and 3 more problems)"
    assert isinstance(info.value, SegVizInputError) and info.value.path == str(root)


# ------------------------------------------------------------------ image and label content problems


def test_geometry_mismatch_names_the_numbers(tmp_path):
    root = make_site(tmp_path / "s", cases=("case001",))
    sitk.WriteImage(label_image(spacing=(1.5, 1.5, 2.5)), str(root / "labels" / "case001.nrrd"))
    one_problem(
        root, "case001.nrrd: geometry differs from the image (label vs image): spacing (1.5, 1.5, 2.5) vs (1.5, 1.5, 2)"
    )
    sitk.WriteImage(label_image(origin=(-10.0, 20.0, 7.0)), str(root / "labels" / "case001.nrrd"))
    one_problem(root, "origin (-10, 20, 7) vs (-10, 20, 5)")
    flipped = label_image()
    flipped.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(flipped, str(root / "labels" / "case001.nrrd"))
    one_problem(root, "direction (-1, 0, 0, 0, -1, 0, 0, 0, 1) vs (1, 0, 0, 0, 1, 0, 0, 0, 1)")
    small = sitk.GetImageFromArray(np.zeros((10, 14, 15), np.uint8))
    small.SetSpacing(SPACING)
    small.SetOrigin(ORIGIN)
    sitk.WriteImage(small, str(root / "labels" / "case001.nrrd"))
    problems = problems_of(root)
    assert "size 15×14×10 vs 16×14×10" in problems[0]


def test_undeclared_label_values(tmp_path):
    root = make_site(tmp_path / "s", cases=("case001",), values=(1, 2, 7, 9))
    one_problem(root, "case001.nrrd: label values 7, 9 are not declared in 'labels' of", "site.json")
    with pytest.raises(SegVizInputError, match=r"case001.nrrd: label values 7, 9 are not declared"):
        load_case(load_site(root).cases[0], load_site(root))


def test_declared_organ_absent_from_every_label_map(tmp_path):
    root = make_site(tmp_path / "s", values=(1,))  # kidney (2) declared but never drawn
    one_problem(root, "site.json: organ 'kidney' is declared but absent from every label map of the site")


@pytest.mark.parametrize("low, high, shown", [(0, 255, "0..255"), (0.0, 1.0, "0..1"), (0, 4095, "0..4095")])
def test_image_that_is_not_ct(tmp_path, low, high, shown):
    root = make_site(tmp_path / "s", cases=("case001",))
    mr = (
        sitk.Cast(ct_image(low=low, high=high - 200), sitk.sitkFloat32)
        if high > 1
        else sitk.GetImageFromArray(np.linspace(low, high, np.prod(SIZE), dtype=np.float32).reshape(SIZE[::-1]))
    )
    mr.CopyInformation(ct_image())
    sitk.WriteImage(mr, str(root / "images" / "case001.nii.gz"))
    one_problem(root, f"case001.nii.gz: intensity range {shown} is not CT in HU")


def test_truncated_image_and_label(tmp_path):
    root = make_site(tmp_path / "s", cases=("case001", "case002"))
    image = root / "images" / "case001.nii.gz"
    image.write_bytes(image.read_bytes()[:-40])
    label = root / "labels" / "case002.nrrd"
    label.write_bytes(label.read_bytes()[:-20])
    problems = problems_of(root)
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{image}: file is truncated")
    assert problems[1].startswith(f"{label}: unreadable, truncated or corrupt NRRD file")
    # A structural check alone does not read images.
    assert load_site(root).cases[0].image_path == image


# ------------------------------------------------------------------ write_site, state_dir


def test_write_site_refuses_overwrite_and_bad_declarations(tmp_path):
    root = tmp_path / "s"
    path = write_site(root, "s", "liver", {1: "liver"})
    assert path == root / SITE_FILE and (root / "images").is_dir() and (root / "labels").is_dir()
    with pytest.raises(SegVizInputError, match=r"site.json: exists; use --force to overwrite"):
        write_site(root, "s", ["spleen"], {1: "spleen"})
    assert json.loads(path.read_text(encoding="utf-8"))["organs"] == ["liver"]
    write_site(root, "s", ["spleen"], {1: "spleen"}, force=True, description="test site")
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "name": "s",
        "organs": ["spleen"],
        "labels": {"1": "spleen"},
        "description": "test site",
    }
    with pytest.raises(SiteValidationError, match="unknown organ 'lung'"):
        write_site(tmp_path / "t", "t", ["lung"], {1: "lung"})
    with pytest.raises(SiteValidationError, match="label value 2 is 'kidney', which is not in 'organs'"):
        write_site(tmp_path / "t", "t", ["liver"], {1: "liver", 2: "kidney"})
    assert not (tmp_path / "t").exists()
    assert sorted(p.name for p in root.iterdir()) == ["images", "labels", "site.json"]


def test_state_dir(tmp_path):
    root = make_site(tmp_path / "s")
    site = load_site(root)
    folder = state_dir(site)
    assert folder == root / ".segviz" and folder.is_dir()
    (folder / "batchnorm.pt").write_bytes(b"x")
    assert state_dir(root) == folder
    assert load_site(root) == site  # local state is never listed as data
    assert os.listdir(folder) == ["batchnorm.pt"]


# ------------------------------------------------------------------ site.json oddities (issue 11)


def test_site_json_with_byte_order_mark_is_read(tmp_path):
    root = make_site(tmp_path / "s")
    text = (root / SITE_FILE).read_text(encoding="utf-8")
    (root / SITE_FILE).write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    assert validate_site(root).organs == ("liver", "kidney")


def test_duplicate_keys_are_refused(tmp_path):
    root = make_site(tmp_path / "s")
    (root / SITE_FILE).write_text(
        '{"name": "s", "organs": ["liver", "kidney"], "labels": {"1": "liver", "1": "kidney"}}', encoding="utf-8"
    )
    one_problem(root, "site.json: key '1' appears twice; keep one", check_images=False)


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("a/b", "contains '/'"),
        ("a\\b", "contains '\\\\'"),
        ("..", "contains '..'"),
        ("x..y", "contains '..'"),
        ("site\nb", "control or invisible characters (U+000A)"),
        ("site\tb", "control or invisible characters (U+0009)"),
        ("evil\u202etxt", "control or invisible characters (U+202E)"),
        (" padded", "starts or ends with white space"),
        ("x" * 65, "65 characters long (at most 64)"),
        ("", "must be a non-empty string"),
        (7, "must be a non-empty string, got 7"),
    ],
)
def test_site_names_that_could_name_a_path_or_forge_a_line(tmp_path, name, fragment):
    root = make_site(tmp_path / "s")
    data = json.loads((root / SITE_FILE).read_text(encoding="utf-8"))
    (root / SITE_FILE).write_text(json.dumps({**data, "name": name}), encoding="utf-8")
    one_problem(root, fragment, check_images=False)
    with pytest.raises(SiteValidationError, match=re.escape(fragment)):
        write_site(tmp_path / "t", name, ["liver"], {1: "liver"})
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("name", ["site-a", "Hôpital Saint-Éloi", "CHU_Lyon.2", "病院A"])
def test_good_site_names(tmp_path, name):
    root = make_site(tmp_path / "s")
    data = json.loads((root / SITE_FILE).read_text(encoding="utf-8"))
    (root / SITE_FILE).write_text(json.dumps({**data, "name": name}), encoding="utf-8")
    assert load_site(root).name == name


def test_non_finite_ct_is_refused_in_validation_and_loading(tmp_path):
    root = make_site(tmp_path / "s", cases=("case001",))
    array = sitk.GetArrayFromImage(ct_image()).astype(np.float32)
    array[1, 2, 3] = np.inf
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ct_image())
    sitk.WriteImage(image, str(root / "images" / "case001.nrrd"))
    (root / "images" / "case001.nii.gz").unlink()
    one_problem(root, "case001.nrrd: 1 of 2240 voxels are NaN or infinite")
    site = load_site(root)
    with pytest.raises(SegVizInputError, match=r"case001.nrrd: 1 of 2240 voxels are NaN or infinite"):
        load_case(site.cases[0], site)


def test_nonstandard_intensities_allowed_by_the_site(tmp_path):
    root = make_site(tmp_path / "s", cases=("case001",))
    sitk.WriteImage(ct_image(low=0, high=55), str(root / "images" / "case001.nii.gz"))
    problem = one_problem(root, "case001.nii.gz: intensity range 0..255 is not CT in HU")
    assert problem.endswith(f'set "allow_nonstandard_intensities": true in {root / SITE_FILE} if this is intended')
    write_site(
        root, "s", ["liver", "kidney"], {1: "liver", 2: "kidney"}, force=True, allow_nonstandard_intensities=True
    )
    site = validate_site(root)
    assert site.allow_nonstandard_intensities
    image, labels = load_case(site.cases[0], site)
    assert sitk.GetArrayViewFromImage(image).min() == 0 and sitk.GetArrayViewFromImage(labels).max() == 4
    data = json.loads((root / SITE_FILE).read_text(encoding="utf-8"))
    (root / SITE_FILE).write_text(json.dumps({**data, "allow_nonstandard_intensities": "yes"}), encoding="utf-8")
    one_problem(root, "'allow_nonstandard_intensities' must be true or false, got 'yes'", check_images=False)


def test_implausible_ct_grid_is_refused(tmp_path):
    root = make_site(tmp_path / "s", cases=("case001",))
    sitk.WriteImage(ct_image(spacing=(1000.0, 1000.0, 1000.0)), str(root / "images" / "case001.nii.gz"))
    sitk.WriteImage(label_image(spacing=(1000.0, 1000.0, 1000.0)), str(root / "labels" / "case001.nrrd"))
    one_problem(root, "case001.nii.gz: image extent 1.6e+04 × 1.4e+04 × 1e+04 mm is larger than any body")
