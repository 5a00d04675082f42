"""Tests of SegVizLogic.io: reading CT and labels, geometry round trips, clear errors, atomic writes."""

from __future__ import annotations

import gzip
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegVizLogic import io
from SegVizLogic.errors import SegVizInputError

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real"
TOTALSEG = REAL / "totalseg_example"
DCMQI = REAL / "dcmqi_ct3slice"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real test data not found: {path}")
    return path


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_ct(size=(20, 16, 12)) -> sitk.Image:
    """CT-like int16 volume with an oblique direction and anisotropic spacing (LPS)."""
    rng = np.random.default_rng(0)
    array = np.full(size[::-1], -1000, np.int16)
    array[2:-2, 3:-3, 4:-4] = rng.integers(-100, 300, size=array[2:-2, 3:-3, 4:-4].shape)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.73, 1.31, 2.9))
    image.SetOrigin((-123.4, 56.7, 89.01))
    image.SetDirection(tuple(_rotation(0.35, -0.6, 0.2).ravel()))
    return image


def assert_geometry_equal(a: sitk.Image, b: sitk.Image, tol: float) -> None:
    ga, gb = io.geometry(a), io.geometry(b)
    assert ga["size"] == gb["size"]
    for key in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(ga[key], gb[key], rtol=0, atol=tol, err_msg=key)


# ------------------------------------------------------------------ geometry round trips


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_round_trip_real_ct_geometry_and_voxels(tmp_path, suffix):
    ct = io.read_image(_need(TOTALSEG / "example_ct.nii.gz"))
    seg = io.read_label_map(TOTALSEG / "example_seg_fast_force_split.nii.gz")
    assert ct.GetPixelID() == sitk.sitkFloat32
    assert ct.GetSize() == (122, 101, 112)
    assert ct.GetSpacing() == (3.0, 3.0, 3.0)
    # RAS on disk is LPS in ITK: the first two axes point the other way.
    assert ct.GetDirection() == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)

    out = io.write_label_map_like(sitk.GetArrayFromImage(seg), ct, tmp_path / f"labels{suffix}")
    back = io.read_label_map(out)
    # Bit-identical geometry: the reference's values are float32-exact, so NIfTI keeps them too.
    assert io.geometry(back) == io.geometry(ct)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(seg))
    assert back.GetPixelID() == sitk.sitkUInt8


@pytest.mark.parametrize("suffix, tol", [(".nii.gz", 1e-5), (".nii", 1e-5), (".nrrd", 1e-12), (".mha", 1e-12)])
def test_round_trip_oblique_anisotropic(tmp_path, suffix, tol):
    """NIfTI stores the affine as float32 (about 1e-6 relative); NRRD and MHA keep doubles."""
    source = oblique_ct()
    sitk.WriteImage(source, str(tmp_path / f"ct{suffix}"))
    ct = io.read_image(tmp_path / f"ct{suffix}")
    assert_geometry_equal(ct, source, tol)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(source).astype(np.float32))

    labels = (sitk.GetArrayViewFromImage(ct) > 100).astype(np.uint8) * 3
    assert labels.sum() > 0
    out = io.write_label_map_like(labels, ct, tmp_path / f"out{suffix}")
    back = io.read_label_map(out)
    assert_geometry_equal(back, ct, tol)
    assert io.same_geometry(back, source, tol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), labels)


def test_geometry_differences_name_the_numbers():
    a = oblique_ct()
    b = oblique_ct()
    b.SetSpacing((0.73, 1.31, 2.5))
    assert io.same_geometry(a, a) and not io.same_geometry(a, b)
    (difference,) = io.geometry_differences(a, b)
    assert difference == "spacing (0.73, 1.31, 2.9) vs (0.73, 1.31, 2.5)"
    c = sitk.Image(3, 3, 3, sitk.sitkUInt8)
    assert io.geometry_differences(a, c)[0] == "size 20×16×12 vs 3×3×3"


# ------------------------------------------------------------------ DICOM and NRRD (real)


def test_dicom_series_geometry_hu_and_liver_seg():
    ct = io.read_image(_need(DCMQI / "ct-3slice"))
    assert ct.GetSize() == (512, 512, 3)
    np.testing.assert_allclose(ct.GetSpacing(), (0.810547, 0.810547, 1.0), atol=1e-6)
    array = sitk.GetArrayViewFromImage(ct)
    # Rescale slope/intercept applied: outside-FOV padding is -3024, air about -1000.
    assert array.min() == -3024 and 1000 < array.max() < 3100
    assert ((array > -1050) & (array < -950)).mean() > 0.10  # a large share of the field is air
    assert -1030 < float(np.median(array[0, 256, :8])) < -950  # air at the left edge of the middle row
    assert io.ct_intensity_problem(ct) is None

    liver = io.read_label_map(DCMQI / "liver_seg.nrrd")
    assert liver.GetPixelID() == sitk.sitkInt16  # as stored
    # Same grid: the NRRD stores the origin with more digits than DICOM (-235.2 vs -235.199997),
    # a 3e-6 mm difference, well inside the 1e-4 tolerance.
    assert io.same_geometry(ct, liver)
    assert not io.same_geometry(ct, liver, tol=1e-9)
    counts = np.bincount(sitk.GetArrayViewFromImage(liver).ravel())
    assert counts.size == 2 and counts[1] > 1000
    assert io.read_segment_names(DCMQI / "liver_seg.nrrd") == {}  # a plain label map

    spine = io.read_label_map(DCMQI / "liver_spine_seg.nrrd")
    assert set(np.unique(sitk.GetArrayViewFromImage(spine))) == {0, 1, 2}
    assert io.geometry(spine) == io.geometry(ct) or io.same_geometry(spine, ct)


def test_single_dicom_file_reads_its_whole_series():
    folder = io.read_image(_need(DCMQI / "ct-3slice"))
    one = io.read_image(DCMQI / "ct-3slice" / "02.dcm")
    assert io.geometry(one) == io.geometry(folder)


def test_empty_dicom_folder_is_refused(tmp_path):
    (tmp_path / "series").mkdir()
    with pytest.raises(SegVizInputError, match=r"series: no DICOM series found in folder"):
        io.read_image(tmp_path / "series")


# ------------------------------------------------------------------ TotalSegmentator mapping

TOTALSEG_ORGANS = {5: "liver", 1: "spleen", 7: "pancreas", 3: "kidney", 2: "kidney"}


def test_totalsegmentator_mapping_voxel_counts():
    seg = io.read_label_map(_need(TOTALSEG / "example_seg_fast_force_split.nii.gz"))
    raw = sitk.GetArrayViewFromImage(seg)
    assert (raw == 3).sum() == 5090 and (raw == 2).sum() == 7134
    mapping = {int(v): None for v in np.unique(raw)} | TOTALSEG_ORGANS
    organs = io.to_organ_labels(seg, mapping)
    assert organs.GetPixelID() == sitk.sitkUInt8
    assert io.geometry(organs) == io.geometry(seg)
    counts = np.bincount(sitk.GetArrayViewFromImage(organs).ravel(), minlength=5)
    assert counts[1:].tolist() == [41692, 9668, 695, 5090 + 7134]  # liver, spleen, pancreas, kidney


def test_to_organ_labels_refuses_undeclared_values():
    seg = io.read_label_map(_need(TOTALSEG / "example_seg_fast_force_split.nii.gz"))
    with pytest.raises(
        SegVizInputError, match=r"seg.nii.gz: label values 4, 6, 8, 9, .* \.\.\. \(\d+ values\) are not declared"
    ):
        io.to_organ_labels(seg, TOTALSEG_ORGANS, path="seg.nii.gz")
    with pytest.raises(SegVizInputError, match="unknown organ 'heart'"):
        io.to_organ_labels(seg, {5: "heart"})


# ------------------------------------------------------------------ Slicer .seg.nrrd


def _segment_metadata(image: sitk.Image, segments: list[tuple[str, int, int, str]]) -> None:
    """segments: (name, layer, label value, extent)."""
    for i, (name, layer, value, extent) in enumerate(segments):
        image.SetMetaData(f"Segment{i}_ID", f"Segment_{i + 1}")
        image.SetMetaData(f"Segment{i}_Name", name)
        image.SetMetaData(f"Segment{i}_LabelValue", str(value))
        image.SetMetaData(f"Segment{i}_Layer", str(layer))
        image.SetMetaData(f"Segment{i}_Extent", extent)
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "2 3 1")


def test_layered_seg_nrrd_written_with_simpleitk(tmp_path):
    """Two layers (liver+spleen in layer 0, left kidney in layer 1 overlapping), cropped grid."""
    layers = np.zeros((4, 5, 6, 2), np.uint8)  # z, y, x, layer
    layers[1:3, 1:3, 1:3, 0] = 1  # liver: 8 voxels
    layers[0, 4, 5, 0] = 2  # spleen: 1 voxel
    layers[2:4, 2:4, 2:4, 1] = 1  # kidney overlapping liver at (2, 2, 2): 8 voxels
    seg = sitk.GetImageFromArray(layers, isVector=True)
    seg.SetSpacing((0.8, 0.8, 2.0))
    seg.SetOrigin((1.6, 2.4, 2.0))  # index (2, 3, 1) of the reference grid below
    _segment_metadata(
        seg,
        [
            ("Liver", 0, 1, "1 2 1 2 1 2"),
            ("Spleen segmentation", 0, 2, "5 5 4 4 0 0"),
            ("left kidney", 1, 1, "2 3 2 3 2 3"),
        ],
    )
    path = tmp_path / "case.seg.nrrd"
    sitk.WriteImage(seg, str(path), useCompression=True)

    names = io.read_segment_names(path)
    # Values 1, 2, 1 repeat across layers, so segments are renumbered 1..3 in file order.
    assert names == {1: "Liver", 2: "Spleen segmentation", 3: "left kidney"}
    assert io.organ_map_from_segment_names(names) == {1: "liver", 2: "spleen", 3: "kidney"}

    merged = io.read_label_map(path)
    assert merged.GetDimension() == 3 and merged.GetNumberOfComponentsPerPixel() == 1
    assert merged.GetSize() == (6, 5, 4) and merged.GetOrigin() == (1.6, 2.4, 2.0)
    counts = np.bincount(sitk.GetArrayViewFromImage(merged).ravel(), minlength=4)
    assert counts.tolist() == [120 - 8 - 1 - 8 + 1, 7, 1, 8]  # the later segment (kidney) wins the overlap

    organs = io.to_organ_labels(merged, io.organ_map_from_segment_names(names))
    assert np.bincount(sitk.GetArrayViewFromImage(organs).ravel(), minlength=5).tolist()[1:] == [7, 1, 0, 8]

    reference = sitk.Image(12, 10, 8, sitk.sitkInt16)
    reference.SetSpacing((0.8, 0.8, 2.0))
    on_grid = io.resample_to_reference(merged, reference)
    assert io.geometry(on_grid) == io.geometry(reference)
    moved = sitk.GetArrayViewFromImage(on_grid)
    assert np.bincount(moved.ravel(), minlength=4).tolist()[1:] == [7, 1, 8]
    # Voxel (x=1, y=1, z=1) of the crop is voxel (3, 4, 2) of the reference.
    assert moved[2, 4, 3] == 1 and moved[1, 4, 3] == 0
    assert moved[1, 7, 7] == 2  # spleen voxel (x=5, y=4, z=0) of the crop


def test_slicer_style_header_list_axis_and_unique_values(tmp_path):
    """Header as Slicer writes it ('kinds: list domain domain domain', 'space directions: none ...')."""
    data = np.zeros((3, 4, 5, 2), np.uint8)  # z, y, x, layer: NRRD's fastest axis is the layer
    data[1, 1, 1, 0] = 1
    data[2, 2, 2, 0] = 2
    data[1, 2, 3, 1] = 7
    header = (
        "NRRD0004\n# Complete NRRD file format specification at:\n# http://teem.sourceforge.net/nrrd/format.html\n"
        "type: unsigned char\ndimension: 4\nspace: left-posterior-superior\nsizes: 2 5 4 3\n"
        "space directions: none (0.5,0,0) (0,0.5,0) (0,0,2)\nkinds: list domain domain domain\n"
        "encoding: gzip\nspace origin: (10,20,30)\n"
        "Segment0_Name:=Liver\nSegment0_LabelValue:=1\nSegment0_Layer:=0\nSegment0_Extent:=1 1 1 1 1 1\n"
        "Segment1_Name:=Pancreas\nSegment1_LabelValue:=2\nSegment1_Layer:=0\nSegment1_Extent:=2 2 2 2 2 2\n"
        "Segment2_Name:=Kidney_Right\nSegment2_LabelValue:=7\nSegment2_Layer:=1\nSegment2_Extent:=3 3 2 2 1 1\n\n"
    )
    path = tmp_path / "slicer.seg.nrrd"
    path.write_bytes(header.encode() + gzip.compress(data.tobytes()))
    assert io.read_segment_names(path) == {1: "Liver", 2: "Pancreas", 7: "Kidney_Right"}  # unique: kept
    merged = io.read_label_map(path)
    assert merged.GetSize() == (5, 4, 3) and merged.GetSpacing() == (0.5, 0.5, 2.0)
    array = sitk.GetArrayViewFromImage(merged)
    assert (array[1, 1, 1], array[2, 2, 2], array[1, 2, 3]) == (1, 2, 7) and np.count_nonzero(array) == 3


@pytest.mark.parametrize(
    "name, organ",
    [
        ("Liver", "liver"),
        ("liver", "liver"),
        ("LIVER", "liver"),
        ("left kidney", "kidney"),
        ("kidney_right", "kidney"),
        ("Kidney (R)", "kidney"),
        ("RightKidney", "kidney"),
        ("kidneys", "kidney"),
        ("Spleen segmentation", "spleen"),
        ("spleen_1", "spleen"),
        ("Pancreas", "pancreas"),
        ("liver tumor", None),
        ("hepatic vein", None),
        ("kidney cyst", None),
        ("Segment_1", None),
        ("adrenal gland left", None),
        ("pancreatic duct", None),
        ("liver and spleen", None),
    ],
)
def test_organ_map_from_segment_names(name, organ):
    assert io.organ_map_from_segment_names({4: name}) == {4: organ}


# ------------------------------------------------------------------ errors


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(SegVizInputError, match=r"nothere.nii.gz: no such file or folder"):
        io.read_image(tmp_path / "nothere.nii.gz")
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    with pytest.raises(SegVizInputError, match=r"scan.png: unsupported file type '.png'"):
        io.read_image(tmp_path / "scan.png")
    with pytest.raises(SegVizInputError, match=r"scan.png: unsupported file type"):
        io.read_label_map(tmp_path / "scan.png")
    with pytest.raises(SegVizInputError, match=r"a folder; a label map must be one file"):
        io.read_label_map(tmp_path)


@pytest.mark.parametrize("fraction", [0.5, 0.999])
def test_truncated_nifti_gz_is_refused(tmp_path, fraction):
    """ITK alone reads a truncated .nii.gz silently (zero-filled); io must not."""
    data = _need(TOTALSEG / "example_ct.nii.gz").read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(data[: int(len(data) * fraction)])
    assert sitk.ReadImage(str(path)).GetSize() == (122, 101, 112)  # the silent failure this guards against
    with pytest.raises(SegVizInputError, match=r"cut.nii.gz: file is truncated"):
        io.read_image(path)
    with pytest.raises(SegVizInputError, match=r"cut.nii.gz: file is truncated"):
        io.read_label_map(path)


@pytest.mark.parametrize(
    "suffix, message",
    [
        (".nii", r"file is truncated \(\d+ of \d+ bytes\)"),
        (".nrrd", r"unreadable, truncated or corrupt NRRD file \(expected \d+ bytes but received \d+\)"),
        (".mha", r"unreadable, truncated or corrupt MetaImage file"),
    ],
)
def test_truncated_files_are_refused(tmp_path, suffix, message):
    full = tmp_path / f"full{suffix}"
    sitk.WriteImage(oblique_ct(), str(full), useCompression=suffix == ".nrrd")
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(SegVizInputError, match=f"cut{suffix}: {message}"):
        io.read_image(cut)


@pytest.mark.parametrize("read_size, chunk_size", [(1 << 22, 1 << 24), (1000, 4096), (3, 5)])
def test_gzip_check_pass_reads_what_gzip_reads_and_refuses_what_it_refuses(read_size, chunk_size):
    """The check pass decompresses with zlib in large pieces (beside the imports on another thread):
    byte for byte what ``gzip`` gives, for one member, several, and zero padding, at any read and
    chunk size; a cut stream, a failed checksum and trailing junk are refused as ``gzip`` refuses them."""
    import io as stdio
    import zlib

    data = os.urandom(3000) + bytes(200_000) + os.urandom(500)
    one = gzip.compress(data)
    for blob in (one, gzip.compress(data[:100]) + bytes(9) + gzip.compress(data[100:]), one + bytes(50)):
        chunks = list(io._gunzipped_chunks(stdio.BytesIO(blob), read_size, chunk_size))
        assert b"".join(chunks) == gzip.decompress(blob) == data
        assert max(len(c) for c in chunks) <= chunk_size
    assert list(io._gunzipped_chunks(stdio.BytesIO(b""), read_size, chunk_size)) == []
    flipped_crc = one[:-8] + bytes([one[-8] ^ 1]) + one[-7:]
    for blob, error in (
        (one[: len(one) // 2], EOFError),
        (one[:-3], EOFError),
        (flipped_crc, zlib.error),
        (one + b"junk", zlib.error),
    ):
        with pytest.raises(error):
            b"".join(io._gunzipped_chunks(stdio.BytesIO(blob), read_size, chunk_size))
        with pytest.raises((EOFError, gzip.BadGzipFile)):
            gzip.decompress(blob)


def test_corrupt_file_is_refused(tmp_path):
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(b"not an image at all" * 20)
    with pytest.raises(SegVizInputError, match=r"junk.nii.gz: (unreadable or corrupt NIfTI|corrupt gzip)") as info:
        io.read_image(path)
    assert "\n" not in str(info.value)


def test_dimensions_2d_refused_4d_singleton_accepted(tmp_path):
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.Image(5, 4, sitk.sitkInt16), str(flat))
    with pytest.raises(SegVizInputError, match=r"flat.nrrd: 2-D image \(5×4\); SegViz needs a 3-D volume"):
        io.read_image(flat)
    one = sitk.JoinSeries([oblique_ct()])
    assert one.GetDimension() == 4
    sitk.WriteImage(one, str(tmp_path / "t1.mha"))
    image = io.read_image(tmp_path / "t1.mha")
    assert image.GetSize() == (20, 16, 12)
    np.testing.assert_allclose(image.GetSpacing(), (0.73, 1.31, 2.9))
    two = sitk.JoinSeries([oblique_ct(), oblique_ct()])
    sitk.WriteImage(two, str(tmp_path / "t2.mha"))
    with pytest.raises(SegVizInputError, match=r"t2.mha: 4-D image \(20×16×12×2\)"):
        io.read_image(tmp_path / "t2.mha")


def test_ct_intensity_problem():
    ct = io.read_image(_need(TOTALSEG / "example_ct.nii.gz"))
    assert io.ct_intensity_problem(ct) is None
    mr = sitk.GetImageFromArray(np.tile(np.arange(256, dtype=np.float32), (4, 4, 1)))
    assert io.ct_intensity_problem(mr).startswith("intensity range 0..255 is not CT in HU")
    unit = sitk.GetImageFromArray(np.linspace(0, 1, 1000, dtype=np.float32).reshape(10, 10, 10))
    assert io.ct_intensity_problem(unit).startswith("intensity range 0..1 is not CT in HU")
    assert "constant" in io.ct_intensity_problem(sitk.Image(4, 4, 4, sitk.sitkFloat32))


# ------------------------------------------------------------------ writing


def test_overwrite_refused_without_force(tmp_path):
    ct = oblique_ct()
    path = io.write_label_map_like(np.zeros((12, 16, 20), np.uint8), ct, tmp_path / "out.nii.gz")
    before = path.read_bytes()
    with pytest.raises(SegVizInputError, match=r"out.nii.gz: exists; use --force to overwrite"):
        io.write_label_map_like(np.ones((12, 16, 20), np.uint8), ct, path)
    assert path.read_bytes() == before
    io.write_label_map_like(np.ones((12, 16, 20), np.uint8), ct, path, force=True)
    assert sitk.GetArrayViewFromImage(io.read_label_map(path)).min() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_write_refuses_shape_grid_and_suffix_mismatch(tmp_path):
    ct = oblique_ct()
    with pytest.raises(
        SegVizInputError, match=r"labels have shape \(12, 16, 19\) but the reference needs \(12, 16, 20\)"
    ):
        io.write_label_map_like(np.zeros((12, 16, 19), np.uint8), ct, tmp_path / "a.nii.gz")
    shifted = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    with pytest.raises(SegVizInputError, match=r"labels are not on the reference grid: spacing"):
        io.write_label_map_like(shifted, ct, tmp_path / "b.nrrd")
    with pytest.raises(SegVizInputError, match=r"c.mhd: unsupported file type '.mhd' for writing"):
        io.write_label_map_like(np.zeros((12, 16, 20), np.uint8), ct, tmp_path / "c.mhd")
    with pytest.raises(SegVizInputError, match=r"not whole numbers"):
        io.write_label_map_like(np.full((12, 16, 20), 0.5), ct, tmp_path / "d.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_write_accepts_image_on_reference_grid_and_picks_dtype(tmp_path):
    ct = oblique_ct()
    labels = sitk.Cast(ct > 100, sitk.sitkUInt8)
    out = io.write_label_map_like(labels, ct, tmp_path / "m.mha")
    assert io.read_label_map(out).GetPixelID() == sitk.sitkUInt8
    big = np.zeros((12, 16, 20), np.int64)
    big[0, 0, 0] = 1000
    assert io.read_label_map(io.write_label_map_like(big, ct, tmp_path / "big.nrrd")).GetPixelID() == sitk.sitkUInt16


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    ct = oblique_ct()
    target = io.write_label_map_like(np.zeros((12, 16, 20), np.uint8), ct, tmp_path / "seg.nii.gz")
    before = target.read_bytes()

    def broken_write(image, path, io_name, compress):
        Path(path).write_bytes(b"partial")  # a writer that dies half-way (disk full, killed)
        raise RuntimeError("No space left on device")

    monkeypatch.setattr(io, "_itk_write", broken_write)
    with pytest.raises(
        SegVizInputError, match=r"new.nii.gz: could not write the label map \(No space left on device\)"
    ):
        io.write_label_map_like(np.ones((12, 16, 20), np.uint8), ct, tmp_path / "new.nii.gz")
    with pytest.raises(SegVizInputError, match=r"seg.nii.gz: could not write"):
        io.write_label_map_like(np.ones((12, 16, 20), np.uint8), ct, target, force=True)
    assert sorted(os.listdir(tmp_path)) == ["seg.nii.gz"]  # no temp file, no partial output
    assert target.read_bytes() == before  # the existing file is untouched


def test_suffix_helpers():
    assert io.file_suffix("a/Case.SEG.NRRD") == ".seg.nrrd"
    assert io.strip_suffix("labels/case001.seg.nrrd") == "case001"
    assert io.strip_suffix("images/case001.nii.gz") == "case001"
    assert io.strip_suffix("images/case.001.mha") == "case.001"
    assert io.strip_suffix("images/case001") == "case001"


# ------------------------------------------------------------------ inputs that are not CT (issue 11)


def _float_ct(values: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.SetSpacing((1.5, 1.5, 2.0))
    return image


def test_ct_intensity_problem_counts_non_finite_and_honours_the_waiver():
    ct = np.full((6, 8, 10), -1000.0, np.float32)
    ct[1:-1, 2:-2, 2:-2] = 40.0
    assert io.ct_intensity_problem(_float_ct(ct)) is None
    holes = ct.copy()
    holes[0, 0, :3] = [np.nan, np.inf, -np.inf]
    assert io.ct_intensity_problem(_float_ct(holes)) == (
        "3 of 480 voxels are NaN or infinite; replace them (e.g. with -1024 HU) first"
    )
    nan = np.full_like(ct, np.nan)
    assert io.ct_intensity_problem(_float_ct(nan)) == "image has no finite voxel values (all NaN or infinite)"
    screenshot = np.linspace(0, 255, ct.size).reshape(ct.shape)
    assert io.ct_intensity_problem(_float_ct(screenshot), waiver="say so") == (
        "intensity range 0..255 is not CT in HU (expected air near -1000 and soft tissue near 0..100); say so"
    )
    # The waiver covers the range only: NaN and constant images mean nothing to the network.
    assert io.ct_intensity_problem(_float_ct(screenshot), allow_nonstandard=True) is None
    assert io.ct_intensity_problem(_float_ct(holes), allow_nonstandard=True).startswith("3 of 480 voxels")
    constant = np.full_like(ct, -1000.0)
    assert io.ct_intensity_problem(_float_ct(constant), allow_nonstandard=True) == "image is constant (-1000); not a CT"
    # A constant stride sample with one different voxel off the stride is not constant.
    big = np.full((64, 64, 64), -1000.0, np.float32)
    big[1, 1, 1] = 50.0
    assert "constant" not in (io.ct_intensity_problem(_float_ct(big), max_samples=1000) or "")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_nan_voxels_are_refused_although_itk_reads_them_as_zero(tmp_path, suffix):
    values = np.full((6, 8, 10), -1000.0, np.float32)
    values[2:4, 2:6, 2:8] = 60.0
    values[0, 0, :5] = np.nan
    path = tmp_path / f"nan{suffix}"
    sitk.WriteImage(_float_ct(values), str(path))
    assert np.isfinite(sitk.GetArrayViewFromImage(sitk.ReadImage(str(path)))).all()  # ITK's silent 0 HU
    with pytest.raises(SegVizInputError, match=rf"nan{re.escape(suffix)}: 5 of 480 voxels are NaN or infinite"):
        io.read_image(path)
    sitk.WriteImage(_float_ct(np.nan_to_num(values, nan=-1000.0)), str(path))
    assert io.read_image(path).GetSize() == (10, 8, 6)


def test_zero_pixdim_nifti_is_refused_without_noise(tmp_path, capfd):
    path = tmp_path / "nopix.nii"
    sitk.WriteImage(oblique_ct(), str(path))
    data = bytearray(path.read_bytes())
    data[84:88] = np.float32(0.0).tobytes()  # pixdim[2]
    path.write_bytes(bytes(data))
    assert sitk.ReadImage(str(path)).GetSpacing()[1] == 1.0  # ITK's silent guess
    capfd.readouterr()
    with pytest.raises(
        SegVizInputError, match=r"nopix.nii: voxel size \(pixdim\) in the NIfTI header is 0.73 × 0 × 2.9"
    ):
        io.read_image(path)
    assert capfd.readouterr() == ("", "")  # no nibabel log line, no ITK warning


def test_ct_geometry_problem():
    ct = oblique_ct()
    assert io.ct_geometry_problem(ct) is None
    assert "a single slice along an axis" in io.ct_geometry_problem(sitk.Image(20, 16, 1, sitk.sitkInt16))
    far = sitk.Image(20, 16, 12, sitk.sitkInt16)
    far.SetSpacing((1000.0, 1000.0, 1000.0))
    assert io.ct_geometry_problem(far) == (
        "image extent 2e+04 × 1.6e+04 × 1.2e+04 mm is larger than any body "
        "(voxel spacing 1000 × 1000 × 1000 mm: is the spacing in the header right?)"
    )


# ------------------------------------------------------------------ DICOM oddities (real slices)


def _copy_series(tmp_path: Path) -> Path:
    folder = tmp_path / "series"
    folder.mkdir()
    for path in sorted(_need(DCMQI / "ct-3slice").iterdir()):
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


@pytest.mark.parametrize("victim", ["01.dcm", "02.dcm", "03.dcm"])
def test_truncated_dicom_slice_is_named(tmp_path, victim):
    folder = _copy_series(tmp_path)
    data = (folder / victim).read_bytes()
    (folder / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(SegVizInputError, match=rf"{victim}: truncated or unreadable DICOM file \(\d+ bytes\)"):
        io.read_image(folder)


def test_several_dicom_series_are_listed_and_one_is_chosen(tmp_path):
    folder = _copy_series(tmp_path)
    other = io.read_image(folder)
    real_uid = io.list_dicom_series(folder)[0].uid
    # A second series in the same folder: the same slices re-exported with another UID and description.
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for index, path in enumerate(sorted(folder.glob("0*.dcm"))):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.LoadPrivateTagsOn()
        plane = reader.Execute()
        for key in reader.GetMetaDataKeys():
            plane.SetMetaData(key, reader.GetMetaData(key))
        plane.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.99")
        plane.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.2.1125.99.{index}")
        plane.SetMetaData("0008|103e", "re-export")
        writer.SetFileName(str(folder / f"copy{index}.dcm"))
        writer.Execute(plane)
    listed = io.list_dicom_series(folder)
    assert sorted(s.uid for s in listed) == sorted([real_uid, "1.2.826.0.1.3680043.2.1125.99"])
    assert all(len(s.files) == 3 for s in listed)
    with pytest.raises(
        SegVizInputError, match=r"series: holds 2 DICOM series: .*'re-export', series .*3 slices.*--series UID"
    ):
        io.read_image(folder)
    chosen = io.read_image(folder, series=real_uid)
    assert io.geometry(chosen) == io.geometry(other)
    with pytest.raises(SegVizInputError, match=r"copy0.dcm: belongs to series 1.2.826.0.1.3680043.2.1125.99"):
        io.read_image(folder / "copy0.dcm", series=real_uid)


# ------------------------------------------------------------------ directions a format cannot keep


def _tilted(size=(12, 10, 8)) -> sitk.Image:
    image = sitk.GetImageFromArray(np.zeros(size[::-1], np.uint8))
    direction = np.eye(3)
    direction[:, 2] = [0.0, math.sin(math.radians(20)), math.cos(math.radians(20))]
    image.SetDirection(tuple(direction.ravel()))
    return image


def test_label_format_problem_names_the_formats_that_keep_a_tilt():
    tilted = _tilted()
    assert not io.is_orthogonal(tilted.GetDirection()) and io.is_orthogonal(oblique_ct().GetDirection())
    problem = io.label_format_problem(tilted, "labels.nii.gz")
    assert problem.startswith("the input's direction matrix is not orthogonal (axes 20° off square")
    assert problem.endswith("write the label map as .nrrd or .mha, which keep it")
    assert io.label_format_problem(tilted, "labels.nrrd") is None
    assert io.label_format_problem(oblique_ct(), "labels.nii.gz") is None


def test_write_reads_the_header_back_and_keeps_nothing_unfaithful(tmp_path, monkeypatch, capfd):
    tilted = _tilted()
    for suffix in (".nrrd", ".mha"):
        written = io.read_label_map(
            io.write_label_map_like(np.ones((8, 10, 12), np.uint8), tilted, tmp_path / f"ok{suffix}")
        )
        assert io.geometry_differences(written, tilted, tol=1e-6) == []
    with pytest.raises(SegVizInputError, match=r"bad.nii.gz: the input's direction matrix is not orthogonal"):
        io.write_label_map_like(np.ones((8, 10, 12), np.uint8), tilted, tmp_path / "bad.nii.gz")
    # Without the up-front check ITK coerces the direction; reading the header back catches it.
    monkeypatch.setattr(io, "label_format_problem", lambda reference, path: None)
    capfd.readouterr()
    with pytest.raises(
        SegVizInputError,
        match=r"bad.nii.gz: the written file's grid differs from the input's, so nothing was kept: direction",
    ):
        io.write_label_map_like(np.ones((8, 10, 12), np.uint8), tilted, tmp_path / "bad.nii.gz")
    assert capfd.readouterr().err == ""  # ITK's "coerced to orthogonal" warning is not printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.mha", "ok.nrrd"]


# ------------------------------------------------------------------ output locations


def test_output_locations_are_checked_before_any_work(tmp_path):
    from SegVizLogic.output_paths import check_output_folder, check_output_path

    ct = tmp_path / "ct.nii.gz"
    ct.write_bytes(b"ct")
    (tmp_path / "link.nii.gz").symlink_to(ct)
    with pytest.raises(SegVizInputError, match=r"link.nii.gz: is also an input \(.*ct.nii.gz\)"):
        check_output_path(tmp_path / "link.nii.gz", force=True, inputs=[ct])
    with pytest.raises(
        SegVizInputError, match=r"labels.nii.gz: cannot be created: .*ct.nii.gz is a file, not a folder"
    ):
        check_output_path(ct / "deeper" / "labels.nii.gz")
    with pytest.raises(
        SegVizInputError, match=r"out.png: unsupported file type '.png' for writing: expected .nii.gz, .nrrd"
    ):
        check_output_path(tmp_path / "out.png", suffixes=(".nii.gz", ".nrrd"))
    assert check_output_path(tmp_path / "new" / "deeper" / "l.nii.gz", suffixes=(".nii.gz",)).name == "l.nii.gz"
    assert check_output_folder(tmp_path / "tls" / "inner") == tmp_path / "tls" / "inner"
    with pytest.raises(SegVizInputError, match=r"ct.nii.gz: is a file; expected a folder"):
        check_output_folder(ct)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "link.nii.gz"]  # nothing created
