"""Reading CT volumes and label maps, and writing label maps in the input's exact geometry.

Every image that enters SegViz goes through :func:`read_image` (CT, float32 HU) or
:func:`read_label_map` (integer labels as stored); every label map that leaves it goes
through :func:`write_label_map_like`, which copies the reference's size, spacing, origin and
direction exactly and writes atomically. Any failure is a :class:`~SegVizLogic.errors.SegVizInputError`
whose message is one line naming the file and the problem.

Formats: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``,
``.mhd``), a DICOM series folder (or one ``.dcm`` file of a series) for CT, and 3D Slicer
segmentation files (``.seg.nrrd``, layered or not) for labels.

Arrays are in SimpleITK order: a volume of size (x, y, z) is a numpy array of shape (z, y, x).
"""

from __future__ import annotations

import gzip
import os
import re
import threading
import uuid
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .errors import SegVizInputError
from .organs import organ_by_name
from .output_paths import check_parent_folder

__all__ = [
    "IMAGE_SUFFIXES",
    "LABEL_SUFFIXES",
    "WRITE_SUFFIXES",
    "DicomSeries",
    "ct_geometry_problem",
    "ct_intensity_problem",
    "file_suffix",
    "geometry",
    "geometry_differences",
    "is_orthogonal",
    "label_format_problem",
    "list_dicom_series",
    "organ_map_from_segment_names",
    "read_image",
    "read_image_ahead",
    "read_label_map",
    "read_segment_names",
    "resample_to_reference",
    "same_geometry",
    "strip_suffix",
    "to_organ_labels",
    "write_label_map_like",
    "write_text_atomic",
]

# Longest first, so that ".seg.nrrd" wins over ".nrrd" and ".nii.gz" over ".gz".
_SUFFIX_FORMAT = {
    ".seg.nrrd": ("NrrdImageIO", "NRRD"),
    ".nii.gz": ("NiftiImageIO", "NIfTI"),
    ".nii": ("NiftiImageIO", "NIfTI"),
    ".nrrd": ("NrrdImageIO", "NRRD"),
    ".nhdr": ("NrrdImageIO", "NRRD"),
    ".mha": ("MetaImageIO", "MetaImage"),
    ".mhd": ("MetaImageIO", "MetaImage"),
    ".dcm": ("GDCMImageIO", "DICOM"),
}
IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
"""File suffixes :func:`read_image` reads (and any folder holding a DICOM series)."""
LABEL_SUFFIXES: tuple[str, ...] = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
"""File suffixes :func:`read_label_map` reads."""
WRITE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha")
"""File suffixes :func:`write_label_map_like` writes (single-file formats only, so the write is atomic)."""

# Default tolerance of geometry comparisons: mm for spacing/origin, unitless for direction.
_GEOMETRY_TOL = 1e-4
# A written header against its reference: NIfTI keeps spacing and origin as float32 and the
# direction as a quaternion, so a faithful write differs by ~1e-5; a coerced one by far more.
_WRITTEN_GEOMETRY_TOL = 1e-3
# Direction matrices within this of orthonormal are what every format stores as a rotation.
_ORTHOGONAL_TOL = 1e-3


# --------------------------------------------------------------------------------------
# Names and suffixes
# --------------------------------------------------------------------------------------


def file_suffix(path: str | Path) -> str:
    """Return the SegViz-known suffix of ``path`` (lower case, e.g. ``".nii.gz"``, ``".seg.nrrd"``).

    Returns ``""`` for a folder and the last plain suffix for a file of an unknown type.
    """
    name = Path(path).name.lower()
    for suffix in _SUFFIX_FORMAT:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return Path(name).suffix


def strip_suffix(path: str | Path) -> str:
    """Return the file name of ``path`` without its known suffix: the case name.

    Example::

        strip_suffix("labels/case001.seg.nrrd")  # "case001"
        strip_suffix("images/case001")           # "case001" (a DICOM series folder)
    """
    name = Path(path).name
    suffix = file_suffix(name)
    return name[: len(name) - len(suffix)] if suffix and name.lower().endswith(suffix) else name


def _unsupported(path: Path, accepted: tuple[str, ...], what: str) -> SegVizInputError:
    suffix = file_suffix(path) or "(none)"
    return SegVizInputError(path, f"unsupported file type {suffix!r} for {what}: expected {', '.join(accepted)}")


def _itk_detail(error: Exception) -> str:
    """Reduce a multi-line ITK exception to its most telling line."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    # ITK's "Reason:" line is errno at the time, often "Success" or a misleading "No such file".
    useful = [ln for ln in lines if not ln.startswith(("Exception thrown", "sitk::ERROR", "Reason:"))]
    if not useful:
        return ""
    text = re.sub(r"^\[\w+\]\s*_?\w+:\s*", "", useful[-1])  # "[nrrd] _nrrdEncodingGzip_read: ..." -> "..."
    text = re.sub(r"^ITK ERROR:\s*\w+\(0x[0-9a-f]+\):\s*", "", text)
    return text[:160]


def _with_detail(problem: str, error: Exception) -> str:
    detail = _itk_detail(error)
    return f"{problem} ({detail})" if detail else problem


# --------------------------------------------------------------------------------------
# Low-level reading
# --------------------------------------------------------------------------------------


@contextmanager
def _itk_quiet() -> Iterator[None]:
    """Silence ITK's warnings (printed straight to stderr) while SegViz reads or writes.

    What they warn about (coerced directions, missing slices, odd NIfTI scales) is checked
    here and reported as one line naming the file; the raw multi-line warning would be a
    second, confusing message. The previous setting is restored: Slicer's own use of
    SimpleITK is untouched when SegViz runs in its process.
    """
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise SegVizInputError(path, "no such file or folder")


def _read_nifti_header(path: Path, opener) -> Any:
    """The NIfTI-1 or -2 header as stored: nibabel's loader would 'fix' a zero pixdim to 1
    (and log that on stderr), which is the silent change this check exists to catch."""
    import nibabel as nib

    with opener(path, "rb") as stream:
        sizes = {int.from_bytes(stream.read(4), order) for order in ("little", "big")}
        stream.seek(0)
        header_class = nib.Nifti2Header if 540 in sizes else nib.Nifti1Header
        with warnings.catch_warnings():
            # A damaged header makes nibabel warn before it fails; the failure is reported, not the warning.
            warnings.simplefilter("ignore")
            return header_class.from_fileobj(stream, check=False)


def _non_finite_problem(bad: int, total: int) -> str | None:
    """One wording for NaN/infinite voxels, wherever they are found."""
    if bad == 0:
        return None
    if bad >= total:
        return "image has no finite voxel values (all NaN or infinite)"
    return f"{bad} of {total} voxels are NaN or infinite; replace them (e.g. with -1024 HU) first"


def _gunzipped_chunks(stream, read_size: int = 1 << 22, chunk_size: int = 1 << 24) -> Iterator[bytes]:
    """The decompressed bytes of a gzip ``stream`` (every member, as ``gzip`` reads them), in chunks
    of at most ``chunk_size``.

    ``zlib`` works on large pieces here and releases the GIL for each, so this pass runs beside
    work on another thread (``infer`` reads its input while it imports torch and MONAI); the
    ``gzip`` module's small reads would wait for the GIL at every step.

    Raises:
        EOFError: the stream ends inside a member (a truncated file).
        zlib.error: corrupt data, a failed checksum, or trailing bytes that are not a member.
    """
    inflater, fed, members = zlib.decompressobj(wbits=31), False, 0
    while data := stream.read(read_size):
        while data:
            if not fed and members:
                data = data.lstrip(b"\0")  # zero padding between or after members, as gzip allows
                if not data:
                    break
            fed = True
            out = inflater.decompress(data, chunk_size)
            if out:
                yield out
            if inflater.eof:
                data, members = inflater.unused_data, members + 1
                inflater, fed = zlib.decompressobj(wbits=31), False
            else:
                data = inflater.unconsumed_tail
    # Output zlib still holds when a full chunk took the last input.
    while fed and not inflater.eof and (out := inflater.decompress(b"", chunk_size)):
        yield out
    if fed and not inflater.eof:
        raise EOFError("the gzip stream ends early")


def _check_nifti_header(path: Path) -> None:
    """Refuse a truncated or corrupt NIfTI file, one whose header has no voxel size, or one
    holding NaN or infinite values.

    ITK reads a truncated ``.nii``/``.nii.gz`` without complaint and fills the missing voxels,
    so the byte count is checked against the header here. ITK also turns a zero or non-finite
    ``pixdim`` into 1 mm, and NaN voxels of a NIfTI into 0 (water, in HU), without a word;
    SegViz refuses both: every volume and resampling would be wrong by an unknown factor, and a
    NaN-filled scan would be segmented as if it were a body of water.
    """
    gz = file_suffix(path) == ".nii.gz"
    opener = gzip.open if gz else open
    try:
        header = _read_nifti_header(path, opener)
        shape = header.get_data_shape()
        dtype = header.get_data_dtype()
        voxels = int(np.prod(shape, dtype=np.int64))
        offset = int(header.get_data_offset())
        expected = offset + voxels * dtype.itemsize
        pixdim = [float(v) for v in header["pixdim"][1 : 1 + min(len(shape), 3)]]
    except Exception as error:  # noqa: BLE001 - nibabel raises many types for a damaged header
        detail = (str(error).splitlines() or [type(error).__name__])[0][:120]
        raise SegVizInputError(path, f"unreadable or corrupt NIfTI file ({detail})") from None
    if not all(np.isfinite(v) and v != 0 for v in pixdim):
        shown = " × ".join(f"{v:g}" for v in pixdim)
        raise SegVizInputError(
            path, f"voxel size (pixdim) in the NIfTI header is {shown} mm: zero or undefined, so SegViz cannot tell it"
        )
    check_values = dtype.kind == "f"
    if not gz and not check_values:
        total = path.stat().st_size
    else:
        total, bad, seen = 0, 0, 0
        carry = b""  # bytes of a voxel split between two chunks
        try:
            with open(path, "rb") as stream:
                for chunk in _gunzipped_chunks(stream) if gz else iter(lambda: stream.read(1 << 22), b""):
                    if check_values and seen < voxels and total + len(chunk) > offset:
                        data = carry + chunk[max(0, offset - total) :] if carry else chunk[max(0, offset - total) :]
                        usable = min(len(data) // dtype.itemsize, voxels - seen)
                        values = np.frombuffer(data, dtype, count=usable)
                        bad += usable - int(np.count_nonzero(np.isfinite(values)))
                        seen += usable
                        carry = data[usable * dtype.itemsize :] if seen < voxels else b""
                    total += len(chunk)
        except EOFError:
            raise SegVizInputError(path, "file is truncated (the gzip stream ends early)") from None
        except (OSError, zlib.error) as error:
            raise SegVizInputError(path, f"corrupt gzip data ({error})") from None
        if total >= expected:
            problem = _non_finite_problem(bad, voxels)
            if problem:
                raise SegVizInputError(path, problem)
    if total < expected:
        raise SegVizInputError(path, f"file is truncated ({total} of {expected} bytes)")


# ITK's words for a header SegViz cannot use -> what to tell a person.
_ITK_HEADER_PROBLEMS = (
    ("Zero-valued spacing", "voxel spacing in the header is zero, so SegViz cannot tell the voxel size"),
    (
        "orthonormal",
        (
            "direction matrix in the header is not orthogonal (sheared, e.g. gantry tilt) and ITK cannot read it: "
            "resample it onto an orthogonal grid, or save it as NRRD"
        ),
    ),
)


def _read_itk_file(path: Path, *, information_only: bool = False) -> sitk.Image | sitk.ImageFileReader:
    """Read one image file with the ImageIO its suffix names; errors become SegVizInputError."""
    suffix = file_suffix(path)
    io_name, format_name = _SUFFIX_FORMAT[suffix]
    if path.stat().st_size == 0:
        raise SegVizInputError(path, f"file is empty (0 bytes); expected a {format_name} image")
    reader = sitk.ImageFileReader()
    reader.SetImageIO(io_name)
    reader.SetFileName(str(path))
    try:
        with _itk_quiet():
            if information_only:
                reader.ReadImageInformation()
                return reader
            if format_name == "NIfTI":
                _check_nifti_header(path)
            return reader.Execute()
    except RuntimeError as error:
        for words, problem in _ITK_HEADER_PROBLEMS:
            if words in str(error):
                raise SegVizInputError(path, problem) from None
        raise SegVizInputError(
            path, _with_detail(f"unreadable, truncated or corrupt {format_name} file", error)
        ) from None


# --------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found in a folder.

    Args:
        uid: Series Instance UID (0020,000E): what ``--series`` takes.
        description: Series Description (0008,103E), may be empty.
        number: Series Number (0020,0011), may be empty.
        files: the series' slice files, in GDCM's spatial order.
    """

    uid: str
    description: str
    number: str
    files: tuple[str, ...]

    def describe(self) -> str:
        """``1.2.3 ('abdomen venous', series 3, 120 slices)``."""
        return f"{self.uid} ({self.description or 'no description'!r}, series {self.number or '?'}, {len(self.files)} slices)"


def _dicom_tag(reader: sitk.ImageFileReader, tag: str) -> str:
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""


def list_dicom_series(folder: str | Path) -> list[DicomSeries]:
    """Every DICOM series in ``folder`` (not its sub-folders), largest first.

    Only headers are read (of one file per series). A file that looks like DICOM (``.dcm``,
    ``.ima`` or the ``DICM`` marker) but belongs to no readable series is a truncated or
    damaged slice and is named.

    Raises:
        SegVizInputError: the folder cannot be scanned, or holds a damaged DICOM file.
    """
    folder = Path(folder)
    scanner = sitk.ImageSeriesReader()
    try:
        with _itk_quiet():
            uids = scanner.GetGDCMSeriesIDs(str(folder))
            files = {uid: tuple(scanner.GetGDCMSeriesFileNames(str(folder), uid)) for uid in uids}
    except RuntimeError as error:
        raise SegVizInputError(folder, _with_detail("cannot scan for DICOM files", error)) from None
    _check_stray_dicom_files(folder, {os.path.realpath(f) for names in files.values() for f in names})
    series = []
    for uid, names in files.items():
        header = sitk.ImageFileReader()
        header.SetImageIO("GDCMImageIO")
        header.SetFileName(names[0])
        try:
            with _itk_quiet():
                header.ReadImageInformation()
        except RuntimeError:
            raise SegVizInputError(names[0], "truncated or unreadable DICOM file") from None
        series.append(DicomSeries(uid, _dicom_tag(header, "0008|103e"), _dicom_tag(header, "0020|0011"), names))
    return sorted(series, key=lambda s: (-len(s.files), s.uid))


def _looks_like_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".ima", ".dicom"):
        return True
    try:
        with path.open("rb") as stream:
            return stream.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _check_stray_dicom_files(folder: Path, in_series: set[str]) -> None:
    """Name a DICOM file that GDCM left out of every series: GDCM drops a truncated slice
    silently, and the series would then be read with a slice missing."""
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name.upper() == "DICOMDIR" or not path.is_file():
            continue
        if os.path.realpath(path) in in_series or not _looks_like_dicom(path):
            continue
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(str(path))
        try:
            with _itk_quiet():
                reader.ReadImageInformation()
        except RuntimeError:
            size = path.stat().st_size
            raise SegVizInputError(
                path, f"truncated or unreadable DICOM file ({size} bytes); its series cannot be read whole"
            ) from None


def _choose_series(folder: Path, series: list[DicomSeries], wanted: str | None, only_file: Path | None) -> DicomSeries:
    if only_file is not None:
        target = os.path.realpath(only_file)
        matches = [s for s in series if target in {os.path.realpath(f) for f in s.files}]
        if not matches:
            raise SegVizInputError(only_file, "not part of any readable DICOM series in its folder")
        if wanted is not None and matches[0].uid != wanted:
            raise SegVizInputError(only_file, f"belongs to series {matches[0].describe()}, not to --series {wanted}")
        return matches[0]
    shown = "; ".join(s.describe() for s in series[:6]) + (f"; ... ({len(series) - 6} more)" if len(series) > 6 else "")
    if wanted is not None:
        for candidate in series:
            if candidate.uid == wanted:
                return candidate
        raise SegVizInputError(folder, f"has no DICOM series {wanted}; it holds: {shown}")
    if len(series) > 1:
        # Two series of one size (arterial and venous phase) would otherwise be a coin toss.
        raise SegVizInputError(
            folder,
            f"holds {len(series)} DICOM series: {shown}; choose one with --series UID (or keep one series per folder)",
        )
    return series[0]


def _read_dicom_series(folder: Path, only_file: Path | None = None, series_uid: str | None = None) -> sitk.Image:
    """Read the one DICOM series in ``folder`` (or the one ``series_uid`` names, or the one
    ``only_file`` belongs to)."""
    series = list_dicom_series(folder)
    if not series:
        raise SegVizInputError(folder, "no DICOM series found in folder (is it empty, or are the files not DICOM?)")
    chosen = _choose_series(folder, series, series_uid, only_file)
    files = list(chosen.files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with _itk_quiet():
            image = reader.Execute()  # GDCM applies Rescale Slope/Intercept here
    except RuntimeError as error:
        culprit = _first_unreadable(files)
        if culprit is not None:
            raise SegVizInputError(culprit, "truncated or unreadable DICOM file; its series cannot be read") from None
        raise SegVizInputError(folder, _with_detail("unreadable DICOM series", error)) from None
    _check_dicom_slice_spacing(folder, reader, len(files))
    return image


def _first_unreadable(files: list[str]) -> str | None:
    """The first slice that fails to read on its own (only looked for once the series failed)."""
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(name)
        try:
            with _itk_quiet():
                reader.Execute()
        except RuntimeError:
            return name
    return None


def _check_dicom_slice_spacing(folder: Path, reader: sitk.ImageSeriesReader, n_files: int) -> None:
    """Refuse a series with missing slices: ITK would assume uniform spacing and misplace voxels."""
    if n_files < 3:
        return
    try:
        positions = np.array(
            [[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n_files)]
        )
        cosines = [float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")]
    except (RuntimeError, ValueError, IndexError):
        return  # no positions to check (e.g. a multi-frame file): trust the reader
    normal = np.cross(cosines[:3], cosines[3:6])
    gaps = np.diff(np.sort(positions @ normal))
    if gaps.size and (gaps.min() <= 0 or gaps.max() - gaps.min() > 0.01 * max(abs(np.median(gaps)), 1e-6) + 1e-3):
        raise SegVizInputError(
            folder,
            f"DICOM slice spacing is not uniform ({gaps.min():.3g}..{gaps.max():.3g} mm): missing or duplicate slices",
        )


def _is_vector(image: sitk.Image) -> bool:
    return image.GetPixelIDTypeAsString().startswith("vector")


def _as_3d(image: sitk.Image, path: Path) -> sitk.Image:
    """Drop a singleton 4th dimension; refuse 2D and true 4D images."""
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 3:
        return image
    if dim == 4 and size[3] == 1:
        return sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, 0])
    shape = "×".join(str(s) for s in size)
    if dim == 2:
        raise SegVizInputError(path, f"2-D image ({shape}); SegViz needs a 3-D volume")
    raise SegVizInputError(path, f"{dim}-D image ({shape}); SegViz needs a 3-D volume (one time point)")


# --------------------------------------------------------------------------------------
# CT images
# --------------------------------------------------------------------------------------


def read_image_ahead(path: str | Path, series: str | None = None) -> Future[sitk.Image]:
    """:func:`read_image` started at once on a background thread.

    SimpleITK's reader and the check pass's ``zlib`` release the GIL while they work, so the read
    runs beside what the caller does meanwhile (``infer`` imports torch and MONAI and loads the
    model: about 2 s of a 512x512x300 ``.nii.gz`` read hidden on two cores).

    Returns:
        a future whose ``result()`` is the image, or raises what :func:`read_image` raised.
    """
    future: Future[sitk.Image] = Future()

    def read() -> None:
        try:
            future.set_result(read_image(path, series=series))
        except BaseException as error:  # noqa: BLE001 - handed to whoever waits for the image
            future.set_exception(error)

    threading.Thread(target=read, name="segviz-read-ahead", daemon=True).start()
    return future


def read_image(path: str | Path, series: str | None = None) -> sitk.Image:
    """Read a CT volume as a float32 SimpleITK image in Hounsfield units.

    Reads NIfTI, NRRD, MetaImage, a DICOM series folder (rescale slope/intercept applied), or
    one ``.dcm`` file (its whole series). A folder with several series is refused with the list
    of them unless ``series`` names one. The original geometry (size, spacing, origin,
    direction) is kept exactly; a 4-D image with one time point is reduced to 3-D.

    Args:
        path: file, or folder of DICOM files.
        series: DICOM Series Instance UID to read from a folder with several series (a
            single-volume file has one series, and ignores it).

    Returns:
        3-D ``sitk.Image`` of pixel type float32 (array shape z, y, x).

    Raises:
        SegVizInputError: missing path, unsupported suffix, unreadable/truncated file (a
            truncated DICOM slice is named), zero voxel size, empty DICOM folder, several
            DICOM series and none chosen, non-uniform DICOM slices, a 2-D or
            multi-time-point or multi-channel image.

    Example::

        ct = read_image("site1/images/case001.nii.gz")
        ct.GetPixelID() == sitk.sitkFloat32
    """
    path = Path(path)
    _check_exists(path)
    if path.is_dir():
        image = _read_dicom_series(path, series_uid=series)
    else:
        suffix = file_suffix(path)
        if suffix not in IMAGE_SUFFIXES:
            raise _unsupported(path, IMAGE_SUFFIXES + ("a DICOM series folder",), "a CT image")
        if suffix == ".dcm":
            image = _read_dicom_series(path.parent, only_file=path, series_uid=series)
        else:
            # One volume per file: ``series`` has nothing to choose (the Slicer module passes the
            # loaded volume's series UID whatever format it exported the volume in).
            image = _read_itk_file(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        components = image.GetNumberOfComponentsPerPixel()
        raise SegVizInputError(
            path, f"image has {components} values per voxel (colour or multi-channel); expected greyscale CT"
        )
    if _is_vector(image):
        image = sitk.VectorIndexSelectionCast(image, 0)
    return sitk.Cast(_as_3d(image, path), sitk.sitkFloat32)


_MAX_EXTENT_MM = 2500.0
"""Longest side of a CT SegViz accepts: a whole-body scan is under 2 m."""


def ct_geometry_problem(image: sitk.Image) -> str | None:
    """Say why the grid of ``image`` cannot be a CT of a body, or return ``None``.

    Refused: a single slice along an axis, a non-positive or non-finite spacing, a direction
    matrix that is not invertible, and a side longer than 2.5 m (a spacing of 1000 mm in the
    header, where 1 mm was meant, asks for a grid of hundreds of terabytes).
    """
    size = np.asarray(image.GetSize(), dtype=float)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    shape = "×".join(str(int(s)) for s in size)
    if size.min() < 2:
        return f"image is {shape} voxels: a single slice along an axis; SegViz needs a 3-D volume"
    if not np.all(np.isfinite(spacing)) or spacing.min() <= 0:
        return f"voxel spacing {_fmt(tuple(spacing))} mm is not positive"
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        return f"direction matrix {_fmt(tuple(direction.ravel()))} is degenerate (not invertible)"
    extent = size * spacing
    if extent.max() > _MAX_EXTENT_MM:
        return (
            f"image extent {' × '.join(f'{e:.4g}' for e in extent)} mm is larger than any body "
            f"(voxel spacing {' × '.join(f'{s:.4g}' for s in spacing)} mm: is the spacing in the header right?)"
        )
    return None


def ct_intensity_problem(
    image: sitk.Image, allow_nonstandard: bool = False, waiver: str = "", max_samples: int = 2_000_000
) -> str | None:
    """Say why the voxel values of ``image`` are not CT in Hounsfield units, or return ``None``.

    The one test every entry point applies (``infer``, ``validate-site``, training's site
    loading, and the Slicer module through ``segviz infer``). Always refused: any NaN or
    infinite voxel (counted over the whole volume) and a constant image; neither can give a
    meaningful segmentation. Refused unless ``allow_nonstandard``: an intensity range that is
    not HU. CT in HU has air near -1000 (or padding down to -3024) and soft tissue near
    0..100; an image whose low end is above -200 (MR, 0..255 screenshots, [0, 1] normalised
    data, raw stored values without rescale) is refused. The range uses the 0.1 and 99.9
    percentiles of up to ``max_samples`` voxels, so a few odd voxels do not decide.

    Args:
        image: the volume, as returned by :func:`read_image`.
        allow_nonstandard: accept an intensity range that is not HU (the user knows better).
        waiver: appended to a range problem (how this caller's user can allow it).
        max_samples: voxels sampled on a regular stride for the percentiles.

    Returns:
        one-line problem such as ``"intensity range 0..255 is not CT in HU (...)"``, or None.
    """
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f":
        # Slab by slab: a whole-volume boolean mask would cost a quarter of the image again.
        bad = sum(int(np.count_nonzero(~np.isfinite(array[z : z + 16]))) for z in range(0, array.shape[0], 16))
        problem = _non_finite_problem(bad, array.size)
        if problem:
            return problem
    step = max(1, int(np.ceil((array.size / max_samples) ** (1 / 3))))
    sample = np.asarray(array[::step, ::step, ::step], dtype=np.float64).ravel()
    lowest, highest = float(sample.min()), float(sample.max())
    if highest - lowest < 1e-6 and float(np.min(array)) == float(np.max(array)):
        return f"image is constant ({lowest:.4g}); not a CT"
    if allow_nonstandard:
        return None
    low, high = np.percentile(sample, [0.1, 99.9])
    if low > -200 or high < -200 or high > 40000:
        problem = (
            f"intensity range {lowest:.4g}..{highest:.4g} is not CT in HU "
            "(expected air near -1000 and soft tissue near 0..100)"
        )
        return f"{problem}; {waiver}" if waiver else problem
    return None


# --------------------------------------------------------------------------------------
# Label maps and Slicer segmentations
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Segment:
    index: int
    name: str
    layer: int
    label_value: int
    merged_value: int


def _metadata(source: sitk.Image | sitk.ImageFileReader) -> dict[str, str]:
    return {key: source.GetMetaData(key) for key in source.GetMetaDataKeys()}


def _segments(meta: Mapping[str, str], n_layers: int, path: Path) -> list[_Segment]:
    """Parse Slicer's ``Segment{i}_*`` keys; compute each segment's value in the merged 3-D map.

    In a single-layer file the merged value is the stored label value. In a layered file the
    stored values are kept if they are unique across layers, otherwise segment ``i`` becomes
    ``i + 1`` (Slicer puts overlapping segments in separate layers, often all with value 1).
    """
    indices = sorted({int(m.group(1)) for key in meta if (m := re.fullmatch(r"Segment(\d+)_\w+", key))})
    raw = []
    for i in indices:
        try:
            # Files from Slicer before 4.11 have no LabelValue/Layer: one segment per layer, value 1.
            layer = int(meta.get(f"Segment{i}_Layer", i if n_layers > 1 else 0))
            value = int(meta.get(f"Segment{i}_LabelValue", 1))
        except ValueError:
            raise SegVizInputError(path, f"segment {i} has a non-integer label value or layer") from None
        if not 0 <= layer < n_layers:
            raise SegVizInputError(path, f"segment {i} is in layer {layer} but the file has {n_layers} layer(s)")
        raw.append((i, meta.get(f"Segment{i}_Name", meta.get(f"Segment{i}_ID", f"Segment_{i}")), layer, value))
    values = [value for _, _, _, value in raw]
    renumber = n_layers > 1 and len(set(values)) != len(values)
    return [
        _Segment(i, name, layer, value, (k + 1) if renumber else value) for k, (i, name, layer, value) in enumerate(raw)
    ]


def _integer_labels(image: sitk.Image, path: Path) -> sitk.Image:
    """Keep integer labels as stored; cast float labels that hold whole numbers."""
    pixel = image.GetPixelID()
    if pixel in (sitk.sitkFloat32, sitk.sitkFloat64):
        array = sitk.GetArrayViewFromImage(image)
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise SegVizInputError(path, "label map holds non-integer values; expected integer labels")
        cast = sitk.Cast(image, sitk.sitkInt32)
        cast.CopyInformation(image)
        return cast
    return image


def read_label_map(path: str | Path) -> sitk.Image:
    """Read a label map as an integer SimpleITK image, values as stored on disk.

    Plain NIfTI/NRRD/MetaImage label maps keep their pixel type. A 3D Slicer segmentation
    (``.seg.nrrd``, or any NRRD carrying ``Segment{i}_*`` keys) is merged into one 3-D map: one
    layer is returned as stored; several layers are merged with the values that
    :func:`read_segment_names` reports (where segments overlap, the later segment wins). A
    segmentation keeps its own geometry, which Slicer may have cropped to the segments'
    extent: use :func:`resample_to_reference` to bring it onto the CT grid.

    Args:
        path: label map file.

    Returns:
        3-D integer ``sitk.Image`` (array shape z, y, x).

    Raises:
        SegVizInputError: missing file, unsupported suffix, unreadable/truncated file,
            non-integer values, several components in a file that is not a segmentation.
    """
    path = Path(path)
    _check_exists(path)
    if path.is_dir():
        raise SegVizInputError(path, f"is a folder; a label map must be one file ({', '.join(LABEL_SUFFIXES)})")
    if file_suffix(path) not in LABEL_SUFFIXES:
        raise _unsupported(path, LABEL_SUFFIXES, "a label map")
    image = _read_itk_file(path)
    meta = _metadata(image)
    n_layers = image.GetNumberOfComponentsPerPixel()
    is_segmentation = any(re.fullmatch(r"Segment\d+_\w+", key) for key in meta)
    if n_layers > 1 and not is_segmentation:
        raise SegVizInputError(path, f"label map has {n_layers} values per voxel but no Slicer segment metadata")
    segments = _segments(meta, n_layers, path) if is_segmentation else []  # also validates the metadata
    if is_segmentation and _is_vector(image):
        image = _merge_layers(image, segments, path)
    elif _is_vector(image):
        image = sitk.VectorIndexSelectionCast(image, 0)
    return _integer_labels(_as_3d(image, path), path)


def _merge_layers(image: sitk.Image, segments: list[_Segment], path: Path) -> sitk.Image:
    layers = sitk.GetArrayViewFromImage(image)  # (z, y, x, layer)
    if layers.ndim != 4:
        raise SegVizInputError(path, f"segmentation layers have an unexpected array shape {layers.shape}")
    top = max((s.merged_value for s in segments), default=0)
    merged = np.zeros(layers.shape[:3], dtype=np.uint8 if top <= 255 else np.uint16)
    for segment in segments:
        merged[layers[..., segment.layer] == segment.label_value] = segment.merged_value
    result = sitk.GetImageFromArray(merged)
    result.CopyInformation(image)
    return result


def read_segment_names(path: str | Path) -> dict[int, str]:
    """Return ``{label value: segment name}`` of a 3D Slicer segmentation file.

    The values are those of the 3-D map :func:`read_label_map` returns for the same file. Only
    the header is read. A plain label map (no ``Segment{i}_*`` keys) gives ``{}``; JSON sidecars
    (dcmqi segment descriptions) are not read.

    Raises:
        SegVizInputError: missing, unsupported or unreadable file.
    """
    path = Path(path)
    _check_exists(path)
    suffix = file_suffix(path)
    if path.is_dir() or suffix not in LABEL_SUFFIXES:
        raise _unsupported(path, LABEL_SUFFIXES, "a label map")
    if _SUFFIX_FORMAT[suffix][0] != "NrrdImageIO":
        return {}
    reader = _read_itk_file(path, information_only=True)
    segments = _segments(_metadata(reader), reader.GetNumberOfComponents(), path)
    return {s.merged_value: s.name for s in segments}


# Words that say nothing about which organ a segment is.
_SIDE_WORDS = {"left", "right", "l", "r", "lt", "rt", "sinister", "dexter", "sin", "dex"}
_FILLER_WORDS = {
    "segmentation",
    "segment",
    "seg",
    "label",
    "labels",
    "labelmap",
    "mask",
    "roi",
    "whole",
    "total",
    "organ",
    "structure",
    "gt",
    "manual",
    "auto",
    "the",
    "of",
    "and",
    "volume",
    "region",
    "s",
}
_SYNONYMS = {
    "liver": "liver",
    "hepar": "liver",
    "spleen": "spleen",
    "lien": "spleen",
    "pancreas": "pancreas",
    "kidney": "kidney",
    "kidneys": "kidney",
    "ren": "kidney",
}


def organ_map_from_segment_names(names: Mapping[int, str]) -> dict[int, str | None]:
    """Match segment names to SegViz organs (case-insensitive); unmatched segments map to None.

    A name matches when, after dropping laterality and filler words ("left", "R",
    "segmentation", "mask", numbers...), exactly one organ word remains. So "Liver",
    "left kidney", "kidney_right", "RightKidney" and "Spleen segmentation" match, while
    "liver tumor", "hepatic vein" and "kidney cyst" do not.

    Args:
        names: label value -> segment name, as from :func:`read_segment_names`.

    Returns:
        label value -> organ name (one of liver, spleen, pancreas, kidney) or None.

    Example::

        organ_map_from_segment_names({1: "Liver", 2: "kidney_left", 3: "Liver tumor"})
        # {1: "liver", 2: "kidney", 3: None}
    """
    result: dict[int, str | None] = {}
    for value, name in names.items():
        spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", str(name)).lower()
        words = [w for w in re.findall(r"[a-z]+", spaced) if w not in _SIDE_WORDS and w not in _FILLER_WORDS]
        organs = {_SYNONYMS.get(w) for w in words}
        result[int(value)] = organs.pop() if len(organs) == 1 and None not in organs else None
    return result


def to_organ_labels(
    label_image: sitk.Image, value_to_organ: Mapping[int, str | None], path: str | Path | None = None
) -> sitk.Image:
    """Map local label values to SegViz organ labels (1 liver, 2 spleen, 3 pancreas, 4 kidney).

    Values mapped to None, and 0, become background. Several values may map to one organ
    (left and right kidney -> kidney).

    Args:
        label_image: integer label map (any geometry, kept as is).
        value_to_organ: local value -> organ name or None. Keys may be int or numeric str.
        path: file the labels came from, named in error messages.

    Returns:
        uint8 ``sitk.Image`` with the same geometry.

    Raises:
        SegVizInputError: the image holds a non-zero value that the mapping does not list,
            or the mapping names an unknown organ.
    """
    mapping: dict[int, str | None] = {}
    for key, organ in value_to_organ.items():
        try:
            mapping[int(key)] = None if organ is None else organ_by_name(organ).name
        except ValueError as error:
            raise SegVizInputError(path, f"label value {key!r}: {error}") from None
    array = sitk.GetArrayViewFromImage(label_image)
    present = np.unique(array)
    undeclared = [int(v) for v in present if v != 0 and int(v) not in mapping]
    if undeclared:
        shown = ", ".join(str(v) for v in undeclared[:12]) + (
            f" ... ({len(undeclared)} values)" if len(undeclared) > 12 else ""
        )
        raise SegVizInputError(path, f"label values {shown} are not declared (map them to an organ or to null)")
    out = np.zeros(array.shape, dtype=np.uint8)
    for value, organ in mapping.items():
        if organ is not None and value != 0:
            out[array == value] = organ_by_name(organ).label
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(label_image)
    return result


def resample_to_reference(label_image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Put a label map onto ``reference``'s grid by nearest-neighbour resampling.

    For a Slicer segmentation cropped to its extent this is an exact shift (voxels outside the
    cropped box become 0); voxels of ``label_image`` outside ``reference`` are dropped.

    Returns:
        label image with the pixel type of ``label_image`` and exactly the geometry of ``reference``.
    """
    return sitk.Resample(
        label_image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label_image.GetPixelID()
    )


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------


def geometry(image: sitk.Image | sitk.ImageFileReader) -> dict[str, tuple]:
    """Return ``{"size", "spacing", "origin", "direction"}`` of an image (tuples, LPS, mm).

    ``direction`` is the row-major 3×3 direction cosine matrix as 9 numbers (column j is the
    world direction of index axis j), as SimpleITK gives it.
    """
    return {
        "size": tuple(image.GetSize()),
        "spacing": tuple(image.GetSpacing()),
        "origin": tuple(image.GetOrigin()),
        "direction": tuple(image.GetDirection()),
    }


def _as_geometry(item: sitk.Image | Mapping[str, Any]) -> Mapping[str, Any]:
    return item if isinstance(item, Mapping) else geometry(item)


def _fmt(values: tuple) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def geometry_differences(
    a: sitk.Image | Mapping[str, Any], b: sitk.Image | Mapping[str, Any], tol: float = _GEOMETRY_TOL
) -> list[str]:
    """Describe, with numbers, how the grids of ``a`` and ``b`` differ (empty list: same grid).

    Sizes must be equal; spacing and origin (mm) and direction must agree within ``tol``.

    Example::

        geometry_differences(ct, labels)
        # ["spacing (0.8, 0.8, 1) vs (0.8, 0.8, 2.5)"]
    """
    ga, gb = _as_geometry(a), _as_geometry(b)
    problems = []
    if tuple(ga["size"]) != tuple(gb["size"]):
        problems.append(f"size {'×'.join(map(str, ga['size']))} vs {'×'.join(map(str, gb['size']))}")
    for key in ("spacing", "origin", "direction"):
        va, vb = np.asarray(ga[key], float), np.asarray(gb[key], float)
        if va.shape != vb.shape or not np.allclose(va, vb, rtol=0, atol=tol):
            problems.append(f"{key} {_fmt(tuple(va))} vs {_fmt(tuple(vb))}")
    return problems


def same_geometry(
    a: sitk.Image | Mapping[str, Any], b: sitk.Image | Mapping[str, Any], tol: float = _GEOMETRY_TOL
) -> bool:
    """True when ``a`` and ``b`` (images or :func:`geometry` dicts) have the same grid within ``tol``."""
    return not geometry_differences(a, b, tol)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _label_array(labels: np.ndarray | sitk.Image, path: Path) -> np.ndarray:
    array = sitk.GetArrayFromImage(labels) if isinstance(labels, sitk.Image) else np.asarray(labels)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer) and (
        not np.issubdtype(array.dtype, np.floating) or not np.array_equal(array, np.round(array))
    ):
        raise SegVizInputError(path, f"labels of type {array.dtype} are not whole numbers")
    if array.size == 0:
        return array.astype(np.uint8)
    low, high = int(array.min()), int(array.max())
    for dtype in (np.uint8, np.uint16, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return array.astype(dtype, copy=False)
    raise SegVizInputError(path, f"label values {low}..{high} do not fit in 32-bit integers")


def _itk_write(image: sitk.Image, path: Path, io_name: str, compress: bool) -> None:
    """Write with an explicit ImageIO (the temp file's name must not decide the format)."""
    writer = sitk.ImageFileWriter()
    writer.SetImageIO(io_name)
    writer.SetFileName(str(path))
    writer.SetUseCompression(compress)
    writer.Execute(image)


def is_orthogonal(direction: Sequence[float], tol: float = _ORTHOGONAL_TOL) -> bool:
    """True when the 3×3 direction matrix (9 numbers, row-major) has orthonormal columns within ``tol``."""
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    return bool(np.allclose(matrix.T @ matrix, np.eye(3), rtol=0, atol=tol))


def label_format_problem(reference: sitk.Image | Mapping[str, Any], path: str | Path) -> str | None:
    """Say why a label map on ``reference``'s grid cannot be stored faithfully at ``path``, or None.

    NIfTI stores a direction as a rotation (quaternion or orthonormal sform), so ITK coerces a
    non-orthogonal matrix (gantry tilt, some resampled or MR-derived files) to the nearest
    rotation: the labels would sit elsewhere than the CT's voxels. NRRD and MetaImage keep any
    direction, so the answer names them.
    """
    direction = _as_geometry(reference)["direction"]
    if _SUFFIX_FORMAT.get(file_suffix(path), ("", ""))[1] == "NIfTI" and not is_orthogonal(direction):
        matrix = np.asarray(direction, dtype=float).reshape(3, 3)
        norms = np.linalg.norm(matrix, axis=0)
        cosines = np.clip((matrix.T @ matrix) / np.outer(norms, norms), -1, 1)
        skew = float(np.degrees(np.max(np.abs(np.arcsin(cosines[np.triu_indices(3, 1)])))))
        return (
            f"the input's direction matrix is not orthogonal (axes {skew:.3g}° off square, e.g. gantry tilt) and "
            "NIfTI cannot store it: write the label map as .nrrd or .mha, which keep it"
        )
    return None


def _written_geometry(path: Path, io_name: str) -> dict[str, tuple]:
    reader = sitk.ImageFileReader()
    reader.SetImageIO(io_name)
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return geometry(reader)


def write_label_map_like(
    labels: np.ndarray | sitk.Image, reference: sitk.Image, path: str | Path, force: bool = False
) -> Path:
    """Write a label map with exactly the size, spacing, origin and direction of ``reference``.

    The format follows the suffix (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``; compressed where
    the format allows). The pixel type is the smallest integer type holding the values (uint8
    for SegViz organ labels). The file is written to a temporary name in the same folder, its
    header read back and compared with ``reference`` (size, and spacing, origin and direction
    within 1e-3), and only then moved into place: a failed, interrupted or unfaithful write
    never leaves a file, and an existing file is kept unless ``force``.

    Args:
        labels: numpy array of shape (z, y, x) == reference size reversed, or a ``sitk.Image``
            of the reference's size (and grid, within 1e-3).
        reference: the image whose grid the output takes (usually the CT as read).
        path: output file; its folder is created if missing.
        force: replace an existing file.

    Returns:
        ``path`` as a Path.

    Raises:
        SegVizInputError: unsupported suffix, existing file without ``force``, shape or grid
            mismatch with ``reference``, non-integer labels, a direction the format cannot
            store (:func:`label_format_problem`), a written header that differs from
            ``reference``, or a failed write.

    Example::

        ct = read_image("case.nii.gz")
        write_label_map_like(np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8), ct, "out.nii.gz")
    """
    path = Path(path)
    suffix = file_suffix(path)
    if suffix not in WRITE_SUFFIXES:
        raise _unsupported(path, WRITE_SUFFIXES, "writing a label map")
    if path.is_dir():
        raise SegVizInputError(path, "is a folder; expected a file name to write")
    if path.exists() and not force:
        raise SegVizInputError(path, "exists; use --force to overwrite")
    if reference.GetDimension() != 3:
        raise SegVizInputError(path, f"reference image is {reference.GetDimension()}-D; expected 3-D")
    problem = label_format_problem(reference, path)
    if problem:
        raise SegVizInputError(path, problem)
    expected = tuple(reversed(reference.GetSize()))
    if isinstance(labels, sitk.Image):
        differences = geometry_differences(labels, reference, tol=1e-3)
        if differences:
            raise SegVizInputError(path, "labels are not on the reference grid: " + "; ".join(differences))
    array = _label_array(labels, path)
    if array.shape != expected:
        raise SegVizInputError(path, f"labels have shape {array.shape} but the reference needs {expected} (z, y, x)")
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(reference.GetSpacing())
    image.SetOrigin(reference.GetOrigin())
    image.SetDirection(reference.GetDirection())

    check_parent_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{strip_suffix(path)}.tmp-{uuid.uuid4().hex[:8]}{suffix}")
    io_name = _SUFFIX_FORMAT[suffix][0]
    try:
        with _itk_quiet():
            _itk_write(image, temp, io_name, compress=suffix != ".nii")
            differences = geometry_differences(_written_geometry(temp, io_name), reference, tol=_WRITTEN_GEOMETRY_TOL)
        if differences:
            raise SegVizInputError(
                path, "the written file's grid differs from the input's, so nothing was kept: " + "; ".join(differences)
            )
        if force:
            os.replace(temp, path)
        else:
            _move_no_clobber(temp, path)
    except SegVizInputError:
        raise
    except (RuntimeError, OSError) as error:
        raise SegVizInputError(path, _with_detail("could not write the label map", error)) from None
    finally:
        temp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a small text file (JSON reports, ``site.json``) through a temporary file in the
    same folder, so a reader never sees half of it and a failure leaves the old file intact.

    Raises:
        SegVizInputError: the file could not be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, path)
    except OSError as error:
        raise SegVizInputError(path, f"could not write ({error})") from None
    finally:
        temp.unlink(missing_ok=True)
    return path


def _move_no_clobber(temp: Path, path: Path) -> None:
    """Move ``temp`` to ``path`` unless ``path`` appeared meanwhile (link() fails on an existing name)."""
    try:
        os.link(temp, path)
    except FileExistsError:
        raise SegVizInputError(path, "exists; use --force to overwrite") from None
    except OSError:  # file system without hard links
        if path.exists():
            raise SegVizInputError(path, "exists; use --force to overwrite") from None
        os.replace(temp, path)
