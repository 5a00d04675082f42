"""Every input a hospital has gets a right answer or a clear refusal (issue 11).

A table of bad and unusual inputs, each built here from scratch (tiny images, a tiny bundle),
run through the ``segviz`` command line. For each refusal: the exit code, exactly one line on
stderr that names the file and the problem, no traceback, no file left behind and nothing
overwritten. Most rows call :func:`SegVizLogic.cli.main` in this process with file-descriptor
capture (so ITK's C++ warnings would show too); the rows where the process itself matters run
``python -m SegVizLogic.cli`` as a subprocess. Rows that must succeed check the result: exit 0
and a label map on the input's exact grid.
"""

from __future__ import annotations

import gc
import hashlib
import io as bytes_io
import json
import os
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SegVizLogic import io
from SegVizLogic.bundle import save_bundle
from SegVizLogic.cli import main
from SegVizLogic.network import NetworkConfig, build_network
from SegVizLogic.preprocessing import Preprocessing
from SegVizLogic.site import write_site

TINY = NetworkConfig(channels=(4, 8), strides=(2,), num_res_units=0, body_features=4)
SIZE = (24, 24, 16)  # x, y, z
SPACING = (2.0, 2.0, 2.0)
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ building inputs


def ct_array(size=SIZE) -> np.ndarray:
    """Air around a soft-tissue body with a brighter 'organ': values a CT in HU has."""
    array = np.full(size[::-1], -1000.0, np.float32)
    array[2:-2, 4:-4, 4:-4] = 40.0
    array[4:-4, 8:-8, 6:-10] = 120.0
    return array


def image_of(array: np.ndarray, spacing=SPACING, direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-20.0, 10.0, 5.0))
    if direction is not None:
        image.SetDirection(tuple(np.asarray(direction, float).ravel()))
    return image


def write(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def sheared_direction(degrees: float = 15.0) -> np.ndarray:
    """Slice axis tilted in y-z, in-plane axes unchanged: the direction of a gantry-tilted CT."""
    direction = np.eye(3)
    direction[:, 2] = [0.0, np.sin(np.radians(degrees)), np.cos(np.radians(degrees))]
    return direction


def write_dicom_series(folder: Path, uid: str, description: str, number: int, slices: int = 6) -> list[Path]:
    """A CT series of ``slices`` 16×16 slices, 2 mm apart, as one file per slice."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = image_of(ct_array((16, 16, slices)).astype(np.int16))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(slices):
        plane = volume[:, :, k]
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{uid}.{k + 1}",
            "0008|0060": "CT",
            "0008|103e": description,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": uid,
            "0020|0011": str(number),
            "0020|0013": str(k + 1),
            "0020|0032": f"-20\\10\\{5 + 2.0 * k}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for key, value in tags.items():
            plane.SetMetaData(key, value)
        path = folder / f"{uid.rsplit('.', 1)[1]}-{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(plane)
        files.append(path)
    return files


SERIES_A = "1.2.826.0.1.3680043.2.1125.21"
SERIES_B = "1.2.826.0.1.3680043.2.1125.22"


def zero_pixdim_nifti(path: Path) -> Path:
    """A NIfTI whose header says the voxel size is 0 × 2 × 2 mm (ITK alone reads it as 1 mm)."""
    plain = path.with_name("plain.nii")
    sitk.WriteImage(image_of(ct_array().astype(np.int16)), str(plain))
    header = bytearray(plain.read_bytes())
    header[80:84] = np.float32(0.0).tobytes()  # pixdim[1]: pixdim starts at byte 76
    path.write_bytes(bytes(header))
    plain.unlink()
    return path


def sheared_nifti(path: Path) -> Path:
    """A NIfTI whose only orientation is a sheared sform (qform code 0)."""
    import nibabel as nib

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[1, 2] = 0.8
    nifti = nib.Nifti1Image(ct_array().transpose(2, 1, 0).astype(np.int16), affine)
    nifti.set_sform(affine, code=1)
    nifti.set_qform(None, code=0)
    nib.save(nifti, str(path))
    return path


# ------------------------------------------------------------------ bundles


def tiny_bundle(path: Path, spacing=(4.0, 4.0, 4.0)) -> Path:
    torch.manual_seed(0)
    return save_bundle(
        path,
        build_network(TINY),
        Preprocessing(spacing=spacing),
        {"strategy": "local", "sites": ["a"]},
        training={"patch_size": [16, 16, 8]},
    )


def rewrite_bundle(
    source: Path,
    target: Path,
    manifest: Callable[[dict], object] | None = None,
    raw_manifest: bytes | None = None,
    weights: Callable[[dict], None] | None = None,
) -> Path:
    """Copy a bundle, changing its manifest or its weights; changed weights get a recomputed
    checksum, as a forger (or a buggy exporter) would write them."""
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    document = json.loads(members["manifest.json"])
    if weights is not None:
        with np.load(bytes_io.BytesIO(members["weights.npz"])) as npz:
            arrays = {k: npz[k] for k in npz.files}
        weights(arrays)
        buffer = bytes_io.BytesIO()
        np.savez(buffer, **arrays)
        members["weights.npz"] = buffer.getvalue()
        document["sha256"]["weights.npz"] = hashlib.sha256(members["weights.npz"]).hexdigest()
    if manifest is not None:
        document = manifest(document) or document
    members["manifest.json"] = raw_manifest if raw_manifest is not None else json.dumps(document).encode()
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return target


@dataclass
class Kit:
    """What every row shares (read-only): a valid CT, a tiny bundle and one with a very fine spacing."""

    folder: Path
    ct: Path
    bundle: Path
    fine_bundle: Path


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Kit:
    folder = tmp_path_factory.mktemp("kit")
    return Kit(
        folder,
        write(image_of(ct_array().astype(np.int16)), folder / "ct.nii.gz"),
        tiny_bundle(folder / "model.segviz"),
        tiny_bundle(folder / "fine.segviz", spacing=(0.5, 0.5, 0.5)),
    )


def infer(kit: Kit, source: Path, output: Path, *extra: str, model: Path | None = None) -> list[str]:
    return [
        "infer",
        "--model",
        str(model or kit.bundle),
        "--input",
        str(source),
        "--output",
        str(output),
        "--device",
        "cpu",
        "--progress",
        "none",
        *extra,
    ]


def good_site(root: Path, name: str | None = None, **site_options) -> Path:
    write_site(root, name or root.name, ["liver"], {1: "liver"}, **site_options)
    write(image_of(ct_array().astype(np.int16)), root / "images" / "case001.nii.gz")
    labels = (ct_array() > 100).astype(np.uint8)
    write(image_of(labels), root / "labels" / "case001.nii.gz")
    return root


def site_with_json(root: Path, text: str | bytes) -> Path:
    good_site(root)
    (root / "site.json").write_bytes(text.encode() if isinstance(text, str) else text)
    return root


def site_with_image(root: Path, array: np.ndarray, **site_options) -> Path:
    good_site(root, **site_options)
    write(image_of(array.astype(np.float32)), root / "images" / "case001.nii.gz")
    return root


# ------------------------------------------------------------------ the table of refusals

ROWS: dict[str, tuple[Callable[[Path, Kit], tuple[list[str], Path]], str, bool]] = {}


def row(fragment: str, subprocess_run: bool = False):
    """Register a refusal: ``build(tmp, kit) -> (argv, path the error line must name)``."""

    def register(build):
        ROWS[build.__name__] = (build, fragment, subprocess_run)
        return build

    return register


# --- CT files that cannot be read


@row("no such file or folder")
def ct_missing(tmp, kit):
    return infer(kit, tmp / "nothere.nii.gz", tmp / "out.nii.gz"), tmp / "nothere.nii.gz"


@row("file is empty (0 bytes); expected a NIfTI image")
def ct_empty_file(tmp, kit):
    (tmp / "empty.nii.gz").write_bytes(b"")
    return infer(kit, tmp / "empty.nii.gz", tmp / "out.nii.gz"), tmp / "empty.nii.gz"


@row("file is truncated")
def ct_truncated_nifti(tmp, kit):
    data = kit.ct.read_bytes()
    (tmp / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    return infer(kit, tmp / "cut.nii.gz", tmp / "out.nii.gz"), tmp / "cut.nii.gz"


@row("unreadable, truncated or corrupt NRRD file")
def ct_truncated_nrrd(tmp, kit):
    full = write(image_of(ct_array()), tmp / "full.nrrd")
    (tmp / "cut.nrrd").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()
    return infer(kit, tmp / "cut.nrrd", tmp / "out.nii.gz"), tmp / "cut.nrrd"


@row("unsupported file type '.png' for a CT image")
def ct_wrong_format(tmp, kit):
    (tmp / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    return infer(kit, tmp / "scan.png", tmp / "out.nii.gz"), tmp / "scan.png"


@row("unreadable or corrupt NIfTI file")
def ct_junk_bytes(tmp, kit):
    (tmp / "junk.nii").write_bytes(b"not an image at all" * 30)
    return infer(kit, tmp / "junk.nii", tmp / "out.nii.gz"), tmp / "junk.nii"


# --- CT files of the wrong shape


@row("2-D image (24×24); SegViz needs a 3-D volume")
def ct_2d(tmp, kit):
    write(sitk.GetImageFromArray(ct_array()[8]), tmp / "flat.nrrd")
    return infer(kit, tmp / "flat.nrrd", tmp / "out.nii.gz"), tmp / "flat.nrrd"


@row("4-D image (24×24×16×2)")
def ct_4d(tmp, kit):
    volume = image_of(ct_array())
    write(sitk.JoinSeries([volume, volume]), tmp / "time.mha")
    return infer(kit, tmp / "time.mha", tmp / "out.nii.gz"), tmp / "time.mha"


@row("image has 3 values per voxel (colour or multi-channel)")
def ct_vector(tmp, kit):
    rgb = sitk.GetImageFromArray(np.zeros((*SIZE[::-1], 3), np.uint8), isVector=True)
    write(rgb, tmp / "rgb.mha")
    return infer(kit, tmp / "rgb.mha", tmp / "out.nii.gz"), tmp / "rgb.mha"


@row("single slice along an axis")
def ct_tiny(tmp, kit):
    write(image_of(ct_array((24, 24, 1))), tmp / "slice.nii.gz")
    return infer(kit, tmp / "slice.nii.gz", tmp / "out.nii.gz"), tmp / "slice.nii.gz"


@row("is larger than any body")
def ct_huge_spacing(tmp, kit):
    write(image_of(ct_array(), spacing=(1000.0, 1000.0, 1000.0)), tmp / "km.nii.gz")
    return infer(kit, tmp / "km.nii.gz", tmp / "out.nii.gz"), tmp / "km.nii.gz"


@row("grid that needs about")
def ct_grid_beyond_memory(tmp, kit):
    # 2.4 m × 2.4 m × 1.6 m at the fine model's 0.5 mm: terabytes, refused before MONAI allocates.
    write(image_of(ct_array(), spacing=(100.0, 100.0, 100.0)), tmp / "coarse.nii.gz")
    return infer(kit, tmp / "coarse.nii.gz", tmp / "out.nii.gz", model=kit.fine_bundle), tmp / "coarse.nii.gz"


@row("voxel size (pixdim) in the NIfTI header is 0 × 2 × 2 mm")
def ct_zero_pixdim(tmp, kit):
    path = zero_pixdim_nifti(tmp / "nopix.nii")
    return infer(kit, path, tmp / "out.nii.gz"), path


@row("voxel spacing in the header is zero")
def ct_zero_spacing_nrrd(tmp, kit):
    path = write(image_of(ct_array()), tmp / "spacing.nrrd")
    text = path.read_bytes().replace(b"space directions: (2,0,0)", b"space directions: (0,0,0)")
    assert b"(0,0,0)" in text
    path.write_bytes(text)
    return infer(kit, path, tmp / "out.nii.gz"), path


@row("direction matrix in the header is not orthogonal")
def ct_sheared_nifti(tmp, kit):
    path = sheared_nifti(tmp / "sheared.nii.gz")
    return infer(kit, path, tmp / "out.nii.gz"), path


@row("NIfTI cannot store it: write the label map as .nrrd or .mha")
def ct_non_orthogonal_to_nifti(tmp, kit):
    # Read fine from NRRD; ITK would coerce the direction when writing .nii.gz (and warn on stderr).
    path = write(image_of(ct_array(), direction=sheared_direction()), tmp / "tilted.nrrd")
    return infer(kit, path, tmp / "labels.nii.gz"), tmp / "labels.nii.gz"


# --- CT values that are not CT


@row("image has no finite voxel values")
def ct_all_nan(tmp, kit):
    write(image_of(np.full(SIZE[::-1], np.nan, np.float32)), tmp / "nan.nii.gz")
    return infer(kit, tmp / "nan.nii.gz", tmp / "out.nii.gz"), tmp / "nan.nii.gz"


@row("37 of 9216 voxels are NaN or infinite")
def ct_some_nan(tmp, kit):
    array = ct_array()
    array.ravel()[::250] = np.nan
    write(image_of(array), tmp / "holes.nii.gz")
    return infer(kit, tmp / "holes.nii.gz", tmp / "out.nii.gz"), tmp / "holes.nii.gz"


@row("2 of 9216 voxels are NaN or infinite")
def ct_infinite(tmp, kit):
    array = ct_array()
    array[0, 0, :2] = [np.inf, -np.inf]
    write(image_of(array), tmp / "inf.nrrd")
    return infer(kit, tmp / "inf.nrrd", tmp / "out.nii.gz"), tmp / "inf.nrrd"


@row("image is constant (-1000); not a CT")
def ct_constant(tmp, kit):
    write(image_of(np.full(SIZE[::-1], -1000, np.int16)), tmp / "air.nii.gz")
    return infer(kit, tmp / "air.nii.gz", tmp / "out.nii.gz", "--allow-nonstandard-intensities"), tmp / "air.nii.gz"


@row("intensity range 0..255 is not CT in HU (expected air near -1000 and soft tissue near 0..100); pass --allow")
def ct_screenshot_values(tmp, kit):
    array = np.linspace(0, 255, np.prod(SIZE)).reshape(SIZE[::-1]).round().astype(np.uint8)
    write(image_of(array), tmp / "screenshot.nrrd")
    return infer(kit, tmp / "screenshot.nrrd", tmp / "out.nii.gz"), tmp / "screenshot.nrrd"


# --- DICOM


@row("holds 2 DICOM series: ")
def dicom_two_series(tmp, kit):
    write_dicom_series(tmp / "dicom", SERIES_A, "abdomen venous", 3)
    write_dicom_series(tmp / "dicom", SERIES_B, "abdomen arterial", 4)
    return infer(kit, tmp / "dicom", tmp / "out.nii.gz"), tmp / "dicom"


@row("has no DICOM series 1.2.3; it holds: 1.2.826.0.1.3680043.2.1125.21 ('abdomen venous', series 3, 6 slices)")
def dicom_unknown_series(tmp, kit):
    write_dicom_series(tmp / "dicom", SERIES_A, "abdomen venous", 3)
    return infer(kit, tmp / "dicom", tmp / "out.nii.gz", "--series", "1.2.3"), tmp / "dicom"


@row("truncated or unreadable DICOM file", subprocess_run=True)
def dicom_truncated_slice(tmp, kit):
    files = write_dicom_series(tmp / "dicom", SERIES_A, "abdomen venous", 3)
    files[-1].write_bytes(files[-1].read_bytes()[:-200])  # the last slice: the spacing check would not see it
    return infer(kit, tmp / "dicom", tmp / "out.nii.gz"), files[-1]


@row("DICOM slice spacing is not uniform")
def dicom_missing_slice(tmp, kit):
    files = write_dicom_series(tmp / "dicom", SERIES_A, "abdomen venous", 3)
    files[2].unlink()
    return infer(kit, tmp / "dicom", tmp / "out.nii.gz"), tmp / "dicom"


@row("no DICOM series found in folder")
def dicom_empty_folder(tmp, kit):
    (tmp / "dicom").mkdir()
    (tmp / "dicom" / "notes.txt").write_text("scanned 2026-11-02", encoding="utf-8")
    return infer(kit, tmp / "dicom", tmp / "out.nii.gz"), tmp / "dicom"


@row("belongs to series 1.2.826.0.1.3680043.2.1125.21 ('abdomen venous', series 3, 6 slices), not to --series")
def dicom_file_of_another_series(tmp, kit):
    files = write_dicom_series(tmp / "dicom", SERIES_A, "abdomen venous", 3)
    return infer(kit, files[0], tmp / "out.nii.gz", "--series", SERIES_B), files[0]


# --- model bundles


@row("model bundle not found")
def bundle_missing(tmp, kit):
    return infer(kit, kit.ct, tmp / "out.nii.gz", model=tmp / "none.segviz"), tmp / "none.segviz"


@row("is not a readable SegViz model bundle")
def bundle_not_a_zip(tmp, kit):
    (tmp / "fake.segviz").write_text("hello", encoding="utf-8")
    return infer(kit, kit.ct, tmp / "out.nii.gz", model=tmp / "fake.segviz"), tmp / "fake.segviz"


@row("is not a readable SegViz model bundle (damaged or truncated")
def bundle_truncated(tmp, kit):
    (tmp / "cut.segviz").write_bytes(kit.bundle.read_bytes()[:-400])
    return infer(kit, kit.ct, tmp / "out.nii.gz", model=tmp / "cut.segviz"), tmp / "cut.segviz"


@row("is not a readable SegViz model bundle (damaged or truncated")
def bundle_truncated_and_ct_truncated(tmp, kit):
    """The CT is read on a thread while the model loads: a bad model is still named first, and
    only once, with nothing of the CT's error on stderr."""
    (tmp / "cut.segviz").write_bytes(kit.bundle.read_bytes()[:-400])
    data = kit.ct.read_bytes()
    (tmp / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    return infer(kit, tmp / "cut.nii.gz", tmp / "out.nii.gz", model=tmp / "cut.segviz"), tmp / "cut.segviz"


@row("manifest format is not segviz-model")
def bundle_manifest_a_list(tmp, kit):
    path = rewrite_bundle(kit.bundle, tmp / "list.segviz", raw_manifest=b"[1, 2, 3]")
    return ["model-info", str(path)], path


@row("invalid manifest: sha256 must be an object, got ['")
def bundle_sha256_a_list(tmp, kit):
    path = rewrite_bundle(
        kit.bundle, tmp / "sha.segviz", manifest=lambda m: m.update(sha256=list(m["sha256"].values()))
    )
    return infer(kit, kit.ct, tmp / "out.nii.gz", model=path), path


@row("invalid manifest: preprocessing.hu_window must be a list of 2 numbers from -5000 to 50000, got ['-175', '250']")
def bundle_hu_window_strings(tmp, kit):
    path = rewrite_bundle(
        kit.bundle, tmp / "hu.segviz", manifest=lambda m: m["preprocessing"].update(hu_window=["-175", "250"])
    )
    return infer(kit, kit.ct, tmp / "out.nii.gz", model=path), path


@row("invalid manifest: inference.roi_size must be a list of 3 whole numbers from 8 to 1024, got 'abc'")
def bundle_roi_size_text(tmp, kit):
    path = rewrite_bundle(kit.bundle, tmp / "roi.segviz", manifest=lambda m: m.update(inference={"roi_size": "abc"}))
    return infer(kit, kit.ct, tmp / "out.nii.gz", model=path), path


@row("invalid manifest: training.patch_size must be a list of 3 whole numbers from 8 to 1024, got [0, 0, 0]")
def bundle_patch_zero(tmp, kit):
    path = rewrite_bundle(
        kit.bundle, tmp / "zero.segviz", manifest=lambda m: m["training"].update(patch_size=[0, 0, 0])
    )
    return infer(kit, kit.ct, tmp / "out.nii.gz", model=path), path


@row("invalid manifest: network.channels must be a list of 2 to 8 whole numbers from 1 to 1024, got [4096, 16384]")
def bundle_channels_huge(tmp, kit):
    # model-info too: before the schema, these channels asked for 14.5 GB.
    path = rewrite_bundle(
        kit.bundle, tmp / "wide.segviz", manifest=lambda m: m["network"].update(channels=[4096, 16384])
    )
    return ["model-info", str(path)], path


@row("is refused: manifest.json unpacks to 17 MB (limit 16 MB)")
def bundle_manifest_bomb(tmp, kit):
    with zipfile.ZipFile(kit.bundle) as archive:
        manifest = archive.read("manifest.json")
    bomb = manifest[:-1] + b" " * (17 << 20) + b"}"  # valid JSON; deflates to a few KB
    path = rewrite_bundle(kit.bundle, tmp / "bomb.segviz", raw_manifest=bomb)
    assert path.stat().st_size < 1 << 20
    return ["model-info", str(path)], path


@row("hold NaN or infinite values (first: ")
def bundle_nan_weights(tmp, kit):
    def poison(arrays):
        key = next(k for k in arrays if k.endswith("conv.weight"))
        arrays[key][...] = np.nan

    path = rewrite_bundle(kit.bundle, tmp / "nan.segviz", weights=poison)
    return infer(kit, kit.ct, tmp / "out.nii.gz", model=path), path


@row("holds <U3 values, not numbers")
def bundle_string_weights(tmp, kit):
    def as_text(arrays):
        key = next(k for k in arrays if k.endswith("conv.bias"))
        arrays[key] = arrays[key].round().astype(int).astype(str).astype("<U3")

    path = rewrite_bundle(kit.bundle, tmp / "text.segviz", weights=as_text)
    return infer(kit, kit.ct, tmp / "out.nii.gz", model=path), path


@row("is incompatible: weights do not fit its network config")
def bundle_weights_do_not_fit(tmp, kit):
    path = rewrite_bundle(kit.bundle, tmp / "fit.segviz", manifest=lambda m: m["network"].update(channels=[8, 16]))
    return infer(kit, kit.ct, tmp / "out.nii.gz", model=path), path


@row("bundle format 99 is newer than this SegViz reads")
def bundle_newer_format(tmp, kit):
    path = rewrite_bundle(kit.bundle, tmp / "new.segviz", manifest=lambda m: m.update(format_version=99))
    return infer(kit, kit.ct, tmp / "out.nii.gz", model=path), path


@row("--batchnorm 'site:x' is not available; choose from model, adapt")
def bundle_unknown_batchnorm(tmp, kit):
    return infer(kit, kit.ct, tmp / "out.nii.gz", "--batchnorm", "site:x"), kit.bundle


# --- output locations (all checked before the bundle or the CT is read)


@row("cannot be created: ")
def output_parent_is_file(tmp, kit):
    (tmp / "notes").write_text("a file where a folder should be", encoding="utf-8")
    return infer(kit, kit.ct, tmp / "notes" / "labels.nii.gz"), tmp / "notes" / "labels.nii.gz"


@row("is also an input")
def output_is_input(tmp, kit):
    ct = write(image_of(ct_array().astype(np.int16)), tmp / "ct.nii.gz")
    return infer(kit, ct, ct, "--force"), ct


@row("unsupported file type '.png' for writing: expected .nii.gz, .nii, .nrrd, .mha")
def output_png(tmp, kit):
    return infer(kit, kit.ct, tmp / "labels.png"), tmp / "labels.png"


@row("already exists; use --force to overwrite")
def output_exists(tmp, kit):
    (tmp / "labels.nii.gz").write_bytes(b"yesterday's result")
    return infer(kit, kit.ct, tmp / "labels.nii.gz"), tmp / "labels.nii.gz"


@row("is a folder; expected a file name to write")
def output_is_folder(tmp, kit):
    (tmp / "labels.nii.gz").mkdir()
    return infer(kit, kit.ct, tmp / "labels.nii.gz"), tmp / "labels.nii.gz"


@row("--stats and --output name the same file")
def output_stats_same_as_output(tmp, kit):
    return infer(kit, kit.ct, tmp / "l.nii.gz", "--stats", str(tmp / "l.nii.gz")), tmp / "l.nii.gz"


@row("cannot be created: ")
def output_stats_parent_is_file(tmp, kit):
    (tmp / "report").write_text("a file", encoding="utf-8")
    stats = tmp / "report" / "volumes.json"
    return infer(kit, kit.ct, tmp / "labels.nii.gz", "--stats", str(stats)), stats


@row("is a file; expected a folder to write into")
def output_certs_into_file(tmp, kit):
    (tmp / "tls").write_text("a file", encoding="utf-8")
    return ["federation", "certs", "--out", str(tmp / "tls")], tmp / "tls"


# --- site folders (validate-site; training loads sites through the same checks)


@row("key 'organs' appears twice; keep one")
def site_duplicate_keys(tmp, kit):
    text = '{"name": "s", "organs": ["liver"], "organs": ["spleen"], "labels": {"1": "liver"}}'
    return ["validate-site", str(site_with_json(tmp / "s", text))], tmp / "s" / "site.json"


@row("site name 'a/b' contains '/'")
def site_name_with_slash(tmp, kit):
    text = json.dumps({"name": "a/b", "organs": ["liver"], "labels": {"1": "liver"}})
    return ["validate-site", str(site_with_json(tmp / "s", text))], tmp / "s" / "site.json"


@row("site name '..' contains '..'")
def site_name_dot_dot(tmp, kit):
    text = json.dumps({"name": "..", "organs": ["liver"], "labels": {"1": "liver"}})
    return ["validate-site", str(site_with_json(tmp / "s", text))], tmp / "s" / "site.json"


@row("contains control or invisible characters (U+000A)")
def site_name_with_newline(tmp, kit):
    text = json.dumps({"name": "site\nerror: forged", "organs": ["liver"], "labels": {"1": "liver"}})
    return ["validate-site", str(site_with_json(tmp / "s", text))], tmp / "s" / "site.json"


@row("invalid JSON (Expecting")
def site_invalid_json(tmp, kit):
    return ["validate-site", str(site_with_json(tmp / "s", '{"name": "s", organs}'))], tmp / "s" / "site.json"


@row("no such site folder")
def site_missing(tmp, kit):
    return ["validate-site", str(tmp / "nowhere")], tmp / "nowhere"


@row("voxels are NaN or infinite")
def site_image_with_nan(tmp, kit):
    array = ct_array()
    array[3, 3, 3] = np.nan
    root = site_with_image(tmp / "s", array)
    return ["validate-site", str(root)], root / "images" / "case001.nii.gz"


@row('is not CT in HU (expected air near -1000 and soft tissue near 0..100); set "allow_nonstandard_intensities"')
def site_image_not_hu(tmp, kit):
    root = site_with_image(tmp / "s", np.linspace(0, 255, np.prod(SIZE)).reshape(SIZE[::-1]))
    return ["validate-site", str(root)], root / "images" / "case001.nii.gz"


# --- evaluate (its refusals that already worked)


@row("no such file or folder")
def evaluate_missing_prediction(tmp, kit):
    return ["evaluate", "--pred", str(tmp / "pred.nii.gz"), "--ref", str(kit.ct)], tmp / "pred.nii.gz"


@row("unsupported file type '.png' for a label map")
def evaluate_wrong_format(tmp, kit):
    (tmp / "ref.png").write_bytes(b"\x89PNG")
    return ["evaluate", "--pred", str(kit.ct), "--ref", str(tmp / "ref.png")], tmp / "ref.png"


def _snapshot(*folders: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for folder in folders
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    } | {str(p): (-1, "folder") for folder in folders for p in folder.rglob("*") if p.is_dir()}


def _run(argv: list[str], in_process: bool, capfd) -> tuple[int, str, str]:
    if in_process:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = main(argv)
        out, err = capfd.readouterr()
        # Outside pytest these would be printed on stderr (Python hides only the deprecation kinds).
        shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
        return code, out, err + "".join(f"{w.category.__name__}: {w.message}\n" for w in shown)
    done = segviz_process(argv)
    return done.returncode, done.stdout, done.stderr


def segviz_process(argv: list[str]) -> subprocess.CompletedProcess:
    """``segviz ...`` as its own process (the way the Slicer module runs it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.run(
        [sys.executable, "-m", "SegVizLogic.cli", *argv],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=300,
        check=False,
    )


def test_the_table_is_large_enough():
    assert len(ROWS) >= 40, len(ROWS)


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input_is_refused_with_one_line(name, tmp_path, kit, capfd):
    build, fragment, in_subprocess = ROWS[name]
    argv, named = build(tmp_path, kit)
    before = _snapshot(tmp_path, kit.folder)
    gc.collect()  # earlier tests' garbage warns (ResourceWarning) now, not inside this command's stderr
    capfd.readouterr()
    code, out, err = _run(argv, not in_subprocess, capfd)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert "Traceback" not in err + out
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {named}: "), (lines[0], str(named))
    assert fragment in lines[0], (fragment, lines[0])
    assert _snapshot(tmp_path, kit.folder) == before  # nothing left behind, nothing overwritten


# ------------------------------------------------------------------ inputs that get a right answer


def _infer_ok(argv: list[str], capfd) -> str:
    capfd.readouterr()
    code = main(argv)
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "Traceback" not in err + out
    return out


def test_non_orthogonal_input_to_nrrd_keeps_its_direction(tmp_path, kit, capfd):
    tilted = image_of(ct_array(), direction=sheared_direction())
    path = write(tilted, tmp_path / "tilted.nrrd")
    assert not io.is_orthogonal(io.read_image(path).GetDirection())
    _infer_ok(infer(kit, path, tmp_path / "labels.nrrd"), capfd)
    labels = io.read_label_map(tmp_path / "labels.nrrd")
    assert io.geometry_differences(labels, tilted, tol=1e-5) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nrrd", "tilted.nrrd"]


def test_dicom_series_chosen_by_uid(tmp_path, kit, capfd):
    write_dicom_series(tmp_path / "dicom", SERIES_A, "abdomen venous", 3, slices=6)
    write_dicom_series(tmp_path / "dicom", SERIES_B, "abdomen arterial", 4, slices=9)
    chosen = io.read_image(tmp_path / "dicom", series=SERIES_B)
    assert chosen.GetSize() == (16, 16, 9)
    _infer_ok(infer(kit, tmp_path / "dicom", tmp_path / "labels.nii.gz", "--series", SERIES_B), capfd)
    assert io.geometry_differences(io.read_label_map(tmp_path / "labels.nii.gz"), chosen) == []
    # The Slicer module passes its volume's series UID with the volume it exported as NIfTI: one series, no choice.
    _infer_ok(infer(kit, kit.ct, tmp_path / "exported.nii.gz", "--series", SERIES_B), capfd)
    assert io.read_label_map(tmp_path / "exported.nii.gz").GetSize() == SIZE
    listed = io.list_dicom_series(tmp_path / "dicom")
    assert [(s.uid, s.description, s.number, len(s.files)) for s in listed] == [
        (SERIES_B, "abdomen arterial", "4", 9),
        (SERIES_A, "abdomen venous", "3", 6),
    ]


def test_nonstandard_intensities_allowed_when_asked(tmp_path, kit, capfd):
    array = np.linspace(0, 255, np.prod(SIZE)).reshape(SIZE[::-1]).astype(np.float32)
    path = write(image_of(array), tmp_path / "mr.nii.gz")
    out = tmp_path / "labels.nii.gz"
    _infer_ok(infer(kit, path, out, "--allow-nonstandard-intensities", "--stats", str(tmp_path / "v.json")), capfd)
    assert io.geometry_differences(io.read_label_map(out), io.read_image(path)) == []
    assert set(json.loads((tmp_path / "v.json").read_text(encoding="utf-8"))["organs"]) == set(TINY.organs)


def test_site_json_with_bom_and_waiver_is_valid(tmp_path, capfd):
    root = good_site(tmp_path / "s")
    text = (root / "site.json").read_text(encoding="utf-8")
    (root / "site.json").write_bytes(b"\xef\xbb\xbf" + text.encode())  # what Notepad writes
    assert main(["validate-site", str(root)]) == 0
    assert "valid" in capfd.readouterr().out
    waived = site_with_image(
        tmp_path / "w", np.linspace(0, 255, np.prod(SIZE)).reshape(SIZE[::-1]), allow_nonstandard_intensities=True
    )
    assert main(["validate-site", str(waived)]) == 0, capfd.readouterr().err


def test_json_progress_reports_the_refusal_for_slicer(tmp_path, kit):
    """What the Slicer module reads from ``segviz infer --progress json``: an error event, exit 2."""
    array = ct_array()
    array[0] = np.nan
    path = write(image_of(array), tmp_path / "nan.nii.gz")
    argv = [a if a != "none" else "json" for a in infer(kit, path, tmp_path / "labels.nii.gz")]
    done = segviz_process(argv)
    assert done.returncode == 2
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["event"] for e in events] == ["stage", "error"]
    assert (
        events[-1]["message"]
        == f"{path}: 576 of 9216 voxels are NaN or infinite; replace them (e.g. with -1024 HU) first"
    )
    assert done.stderr.strip().splitlines() == [f"error: {events[-1]['message']}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.nii.gz"]


# ------------------------------------------------------------------ the grid-size estimate behind "huge"


@pytest.mark.parametrize(
    "spacing, direction",
    [
        ((0.8, 0.8, 2.5), np.eye(3)),
        ((3.0, 1.0, 1.0), np.diag([-1.0, -1.0, 1.0])),  # stored RAS on disk
        ((6.0, 6.0, 6.0), np.eye(3)),  # coarser than the model
        ((0.7, 1.3, 2.9), np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]], float)),  # axes permuted
    ],
)
def test_preprocessed_shape_is_what_monai_makes(spacing, direction):
    from SegVizLogic.preprocessing import preprocessed_shape, preprocessing_transforms, sitk_to_metatensor

    image = image_of(ct_array((30, 20, 12)), spacing=spacing, direction=direction)
    preprocessing = Preprocessing(spacing=(1.5, 1.5, 2.0))
    made = preprocessing_transforms(preprocessing)({"image": sitk_to_metatensor(image)})["image"].shape[1:]
    estimate = preprocessed_shape(image, preprocessing)
    # Equal but for an exact half (…6.5 voxels), which MONAI's own float arithmetic may round either way.
    assert all(abs(a - b) <= 1 for a, b in zip(made, estimate)) and sum(a != b for a, b in zip(made, estimate)) <= 1, (
        tuple(made),
        estimate,
    )


def test_memory_refusal_says_what_it_would_need():
    from SegVizLogic.errors import SegVizInputError
    from SegVizLogic.preprocessing import check_preprocessed_size

    image = image_of(ct_array(), spacing=(20.0, 20.0, 20.0))  # 480 × 480 × 320 mm
    preprocessing = Preprocessing(spacing=(0.5, 0.5, 0.5))
    with pytest.raises(SegVizInputError) as info:
        check_preprocessed_size(image, preprocessing, channels=4, path="ct.nii.gz", limit_bytes=8 * 10**9)
    # 921 × 921 × 601 voxels × 4 bytes × (4 organ maps + 4): 16.3 GB.
    assert str(info.value) == (
        "ct.nii.gz: resampled to the model's 0.5 × 0.5 × 0.5 mm this image becomes a 921 × 921 × 601 grid that "
        "needs about 16.3 GB of memory; this machine has 8 GB (input spacing 20 × 20 × 20 mm: is it right?)"
    )
    assert check_preprocessed_size(image, Preprocessing(spacing=(4.0, 4.0, 4.0)), 4, limit_bytes=8 * 10**9) == (
        116,
        116,
        76,
    )
