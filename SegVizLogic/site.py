"""Site folders: one hospital's CT images, label maps and the declaration of what it annotated.

A site folder::

    site-a/
      site.json            {"name": "site-a", "organs": ["liver"], "labels": {"1": "liver", "2": null}}
      images/case001.nii.gz        CT (NIfTI, NRRD, MHA, or a DICOM series sub-folder images/case001/)
      labels/case001.nii.gz        label map with the same case name (NIfTI, NRRD, MHA, .seg.nrrd)
      .segviz/                     local state (BatchNorm, checkpoints); never listed as data

``site.json`` keys:

- ``name`` (str): the site's name, shown in logs and in the model's provenance.
- ``organs`` (list of str): the organs this site annotated, from liver, spleen, pancreas, kidney.
  Training teaches only these organs' heads from this site.
- ``labels``: either an object mapping each local label value (a string key: ``"1"``) to an
  organ name or ``null`` (a structure that exists in the label maps but is not a SegViz
  organ; it is treated as background), or the string ``"segment-names"``: label maps are 3D
  Slicer ``.seg.nrrd`` files whose segment names say the organ ("Liver", "left kidney").
- ``description`` (str, optional).
- ``allow_nonstandard_intensities`` (bool, optional, default false): accept images whose values
  are not Hounsfield units (a site that knows its data is, say, rescaled MR-like CT). NaN,
  infinite and constant images are refused regardless.

The name is one printable line of at most 64 characters without ``/``, ``\\`` or ``..``: it
ends up in file names and logs (:func:`~SegVizLogic.site_names.site_name_problem`). The file
may start with a UTF-8 byte-order mark (Windows editors write one); a key given twice is refused
(JSON readers would silently keep the last).

Every organ in ``labels`` must be in ``organs`` and, with a value mapping, every organ in
``organs`` must have a label value.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .errors import SegVizInputError
from .io import (
    IMAGE_SUFFIXES,
    LABEL_SUFFIXES,
    ct_geometry_problem,
    ct_intensity_problem,
    file_suffix,
    geometry_differences,
    organ_map_from_segment_names,
    read_image,
    read_label_map,
    read_segment_names,
    resample_to_reference,
    strip_suffix,
    to_organ_labels,
    write_text_atomic,
)
from .organs import ORGAN_NAMES, organ_by_name
from .site_names import site_name_problem

__all__ = [
    "IMAGES_DIR",
    "LABELS_DIR",
    "SEGMENT_NAMES",
    "SITE_FILE",
    "STATE_DIR",
    "VALIDATION_RECORD",
    "VALIDATION_VERSION",
    "Case",
    "Site",
    "SiteValidationError",
    "case_organ_map",
    "file_stamp",
    "load_case",
    "load_site",
    "site_stamp",
    "state_dir",
    "validate_site",
    "validated_site",
    "write_site",
]

SITE_FILE = "site.json"
IMAGES_DIR = "images"
LABELS_DIR = "labels"
STATE_DIR = ".segviz"
SEGMENT_NAMES = "segment-names"
"""Value of ``labels`` in site.json meaning: map .seg.nrrd segments to organs by their names."""
VALIDATION_RECORD = "validation.json"
"""File under ``.segviz/`` recording that the site, as its files stand, passed :func:`validate_site`."""
VALIDATION_VERSION = 1
"""Version of the checks :func:`validate_site` applies; bump it when they change, so that a record
written under older rules is not taken as a pass under the new ones."""

# Data files of .mhd headers sit beside them and are not cases.
_COMPANION_SUFFIXES = (".raw", ".zraw", ".img")
# A cropped segmentation is on the image's voxel lattice when its origin is this close (in voxels).
_LATTICE_TOL = 1e-3
_ALLOW_KEY = "allow_nonstandard_intensities"


@dataclass(frozen=True)
class Case:
    """One image with its label map.

    Args:
        name: case name: the file name without its suffix (``case001``).
        image_path: CT file, or DICOM series folder.
        label_path: label map file.
    """

    name: str
    image_path: Path
    label_path: Path


@dataclass(frozen=True)
class Site:
    """A parsed site folder.

    Args:
        root: the site folder.
        name: ``name`` from site.json.
        organs: annotated organs, in schema order (liver, spleen, pancreas, kidney).
        label_values: local label value -> organ name or None; empty when ``segment_names``.
        cases: paired cases, sorted by name.
        description: optional free text from site.json.
        segment_names: labels are mapped by .seg.nrrd segment names (``"labels": "segment-names"``).
        allow_nonstandard_intensities: images need not be in Hounsfield units.
    """

    root: Path
    name: str
    organs: tuple[str, ...]
    label_values: dict[int, str | None]
    cases: tuple[Case, ...]
    description: str = ""
    segment_names: bool = False
    allow_nonstandard_intensities: bool = False

    @property
    def site_file(self) -> Path:
        """Path of this site's site.json."""
        return self.root / SITE_FILE


class SiteValidationError(SegVizInputError):
    """A site folder that cannot be used, with every problem found.

    Attributes:
        problems: one line per problem, each naming the file and the problem.

    ``str(error)`` is the first problem, followed by ``(and N more problems)`` when there are more.
    """

    def __init__(self, root: str | Path, problems: list[str]) -> None:
        self.problems = list(problems)
        more = len(self.problems) - 1
        message = self.problems[0] if self.problems else f"{root}: invalid site folder"
        if more > 0:
            message += f" (and {more} more problem{'s' if more > 1 else ''})"
        super().__init__(None, message)
        self.path = str(root)


# --------------------------------------------------------------------------------------
# site.json
# --------------------------------------------------------------------------------------


@dataclass
class _Declaration:
    name: str = ""
    organs: tuple[str, ...] = ()
    label_values: dict[int, str | None] = field(default_factory=dict)
    description: str = ""
    segment_names: bool = False
    allow_nonstandard_intensities: bool = False


def _check_declaration(data: Any, where: Path, problems: list[str]) -> _Declaration:
    """Check the content of site.json; append one line per problem."""
    declaration = _Declaration()
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a JSON object with keys name, organs, labels")
        return declaration
    for key in ("name", "organs", "labels"):
        if key not in data:
            problems.append(f"{where}: missing key {key!r}")
    valid = ", ".join(ORGAN_NAMES)

    name = data.get("name")
    if "name" in data:
        problem = site_name_problem(name)
        if problem:
            problems.append(f"{where}: {problem}")
        else:
            declaration.name = name
    allow = data.get(_ALLOW_KEY, False)
    if not isinstance(allow, bool):
        problems.append(f"{where}: {_ALLOW_KEY!r} must be true or false, got {allow!r}")
    else:
        declaration.allow_nonstandard_intensities = allow
    description = data.get("description", "")
    if not isinstance(description, str):
        problems.append(f"{where}: 'description' must be a string, got {type(description).__name__}")
    else:
        declaration.description = description

    organs: list[str] = []
    if "organs" in data:
        raw = data["organs"]
        if not isinstance(raw, list) or not raw:
            problems.append(f"{where}: 'organs' must be a non-empty list of organ names ({valid}), got {raw!r}")
        else:
            for item in raw:
                try:
                    organs.append(organ_by_name(str(item)).name)
                except ValueError:
                    problems.append(f"{where}: unknown organ {item!r} in 'organs' (valid: {valid})")
    declaration.organs = tuple(n for n in ORGAN_NAMES if n in organs)

    if "labels" not in data:
        return declaration
    raw_labels = data["labels"]
    if raw_labels == SEGMENT_NAMES:
        declaration.segment_names = True
        return declaration
    if not isinstance(raw_labels, dict) or not raw_labels:
        problems.append(
            f"{where}: 'labels' must map label values to organ names or null "
            f'(e.g. {{"1": "liver"}}), or be {SEGMENT_NAMES!r}; got {raw_labels!r}'
        )
        return declaration
    for key, organ in raw_labels.items():
        try:
            value = int(str(key).strip())
        except ValueError:
            problems.append(f"{where}: label value {key!r} in 'labels' is not an integer")
            continue
        if organ is None:
            declaration.label_values[value] = None
            continue
        try:
            organ_name = organ_by_name(str(organ)).name
        except ValueError:
            problems.append(
                f"{where}: unknown organ {organ!r} for label value {value} in 'labels' (valid: {valid}, or null)"
            )
            continue
        if value == 0:
            problems.append(f"{where}: label value 0 is background and cannot be {organ_name!r}")
            continue
        declaration.label_values[value] = organ_name
        if declaration.organs and organ_name not in declaration.organs:
            problems.append(
                f"{where}: label value {value} is {organ_name!r}, which is not in 'organs' "
                f"[{', '.join(declaration.organs)}]"
            )
    mapped = {v for v in declaration.label_values.values() if v}
    for organ_name in declaration.organs:
        if organ_name not in mapped:
            problems.append(f"{where}: organ {organ_name!r} is in 'organs' but no label value in 'labels' maps to it")
    return declaration


def _read_declaration(root: Path, problems: list[str]) -> _Declaration | None:
    site_file = root / SITE_FILE
    if not root.is_dir():
        problems.append(f"{root}: no such site folder")
        return None
    if not site_file.is_file():
        problems.append(f"{site_file}: missing (a site folder needs {SITE_FILE}, {IMAGES_DIR}/ and {LABELS_DIR}/)")
        return None
    try:
        # utf-8-sig: Windows editors (Notepad) start the file with a byte-order mark.
        data = json.loads(site_file.read_text(encoding="utf-8-sig"), object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as error:
        problems.append(f"{site_file}: invalid JSON ({error.msg} at line {error.lineno} column {error.colno})")
        return None
    except _DuplicateKeyError as error:
        problems.append(f"{site_file}: key {error.args[0]!r} appears twice; keep one")
        return None
    except (OSError, UnicodeDecodeError) as error:
        problems.append(f"{site_file}: unreadable ({error})")
        return None
    return _check_declaration(data, site_file, problems)


class _DuplicateKeyError(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """JSON readers keep the last of two equal keys without a word; a declaration that says
    two things is refused instead."""
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


# --------------------------------------------------------------------------------------
# Pairing images with labels
# --------------------------------------------------------------------------------------


def _list_entries(folder: Path, problems: list[str], images: bool) -> dict[str, list[Path]]:
    """Case name -> paths found in images/ or labels/ (hidden entries and .mhd data skipped)."""
    entries: dict[str, list[Path]] = {}
    if not folder.is_dir():
        problems.append(f"{folder}: missing folder")
        return entries
    accepted = IMAGE_SUFFIXES if images else LABEL_SUFFIXES
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() in _COMPANION_SUFFIXES:
            continue
        if path.is_dir():
            if not images:
                problems.append(
                    f"{path}: a folder in {LABELS_DIR}/; a label map must be one file ({', '.join(LABEL_SUFFIXES)})"
                )
                continue
        elif file_suffix(path) == ".dcm":
            problems.append(f"{path}: DICOM files must be in one sub-folder per case ({IMAGES_DIR}/<case>/)")
            continue
        elif file_suffix(path) not in accepted:
            kinds = ", ".join(accepted) + (" or a DICOM series folder" if images else "")
            problems.append(f"{path}: unsupported file type {file_suffix(path) or '(none)'!r} (expected {kinds})")
            continue
        entries.setdefault(strip_suffix(path), []).append(path)
    return entries


def _pair(root: Path, problems: list[str]) -> tuple[Case, ...]:
    images = _list_entries(root / IMAGES_DIR, problems, images=True)
    labels = _list_entries(root / LABELS_DIR, problems, images=False)
    cases = []
    for name in sorted(set(images) | set(labels)):
        image_paths, label_paths = images.get(name, []), labels.get(name, [])
        for kind, paths in (("images", image_paths), ("label maps", label_paths)):
            if len(paths) > 1:
                problems.append(
                    f"{paths[0].parent}: {len(paths)} {kind} for case {name!r}: "
                    f"{', '.join(p.name for p in paths)}; keep one"
                )
        if image_paths and not label_paths:
            problems.append(
                f"{image_paths[0]}: no label map for case {name!r} "
                f"(expected {root / LABELS_DIR / name}.nii.gz, .nrrd, .mha or .seg.nrrd)"
            )
        elif label_paths and not image_paths:
            problems.append(f"{label_paths[0]}: no image for case {name!r} in {root / IMAGES_DIR}")
        elif len(image_paths) == 1 and len(label_paths) == 1:
            cases.append(Case(name, image_paths[0], label_paths[0]))
    if not cases and (root / IMAGES_DIR).is_dir() and (root / LABELS_DIR).is_dir():
        problems.append(
            f"{root}: no cases (no image in {IMAGES_DIR}/ has a label map of the same name in {LABELS_DIR}/)"
        )
    return tuple(cases)


def _collect(path: str | Path, check_images: bool) -> Site:
    root = Path(path)
    problems: list[str] = []
    declaration = _read_declaration(root, problems)
    cases = _pair(root, problems) if root.is_dir() else ()
    if declaration is None:
        raise SiteValidationError(root, problems)
    site = Site(
        root,
        declaration.name,
        declaration.organs,
        dict(declaration.label_values),
        cases,
        declaration.description,
        declaration.segment_names,
        declaration.allow_nonstandard_intensities,
    )
    if check_images and not problems:
        _check_cases(site, problems)
    if problems:
        raise SiteValidationError(root, problems)
    return site


def load_site(path: str | Path) -> Site:
    """Parse site.json and pair images with label maps, without reading any image.

    Args:
        path: the site folder.

    Returns:
        the :class:`Site`, cases sorted by name.

    Raises:
        SiteValidationError: problems in site.json or the pairing (``.problems`` lists all).
    """
    return _collect(path, check_images=False)


def validate_site(path: str | Path, check_images: bool = True) -> Site:
    """Check a site folder thoroughly; write nothing.

    Beyond :func:`load_site`, with ``check_images`` every image and label map is read and
    checked: readable and complete; image is CT in HU; label map on the image's grid (or, for
    a Slicer segmentation, on a crop of it); every label value present is declared; every
    declared organ appears in at least one label map.

    Args:
        path: the site folder.
        check_images: read the images and label maps (slow for big sites).

    Returns:
        the :class:`Site`.

    Raises:
        SiteValidationError: with ``.problems``, one line each naming the file and the problem.

    Example::

        try:
            validate_site("site-a")
        except SiteValidationError as error:
            print("\\n".join(error.problems))
    """
    return _collect(path, check_images=check_images)


def file_stamp(path: str | Path) -> list:
    """``[resolved path, size, mtime_ns]`` of a file; for a folder (a DICOM series), the total
    size and the newest mtime of its files. What decides that a file is unchanged, for the
    validation record and the preprocessing cache.

    Raises:
        OSError: the path does not exist.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        return [
            str(path.resolve()),
            sum(p.stat().st_size for p in files),
            max((p.stat().st_mtime_ns for p in files), default=0),
        ]
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def site_stamp(site: Site) -> str:
    """A hash of everything :func:`validate_site` looks at: site.json's content, every case's
    image and label map (:func:`file_stamp`: path, size, mtime), :data:`VALIDATION_VERSION`
    and SegViz's version. Any added, removed, replaced or touched file changes it."""
    from . import __version__

    cases = [[case.name, file_stamp(case.image_path), file_stamp(case.label_path)] for case in site.cases]
    declaration = hashlib.sha1(site.site_file.read_bytes()).hexdigest()
    text = json.dumps([VALIDATION_VERSION, __version__, declaration, cases])
    return hashlib.sha1(text.encode()).hexdigest()


def validated_site(path: str | Path) -> Site:
    """:func:`validate_site` once per change of the site folder, not at every use.

    Reading every image and label map of a 1000-case site takes minutes; a federated round
    would pay it every time. The folder is parsed and paired (cheap, always), and its
    :func:`site_stamp` compared with the one recorded in ``.segviz/validation.json`` by the
    last thorough validation that passed; only when they differ (a file added, removed,
    replaced or touched, site.json edited, new checks) is every image read and checked again.
    A site that fails is never recorded, so it is checked in full each time.

    Args:
        path: the site folder.

    Returns:
        the :class:`Site`.

    Raises:
        SiteValidationError: as :func:`validate_site`.
    """
    site = load_site(path)
    record = site.root / STATE_DIR / VALIDATION_RECORD
    stamp = site_stamp(site)
    try:
        if json.loads(record.read_text(encoding="utf-8")).get("stamp") == stamp:
            return site
    except (OSError, ValueError, AttributeError):
        pass  # no record, or a damaged one: validate in full
    site = validate_site(path)
    try:
        write_text_atomic(record, json.dumps({"stamp": stamp, "cases": len(site.cases)}) + "\n")
    except SegVizInputError:
        pass  # a read-only site folder: it stays usable, only validated in full each time
    return site


# --------------------------------------------------------------------------------------
# Per-case checks
# --------------------------------------------------------------------------------------


def _is_segmentation(label_path: Path, names: Mapping[int, str] | None = None) -> bool:
    if file_suffix(label_path) == ".seg.nrrd":
        return True
    return bool(names) if names is not None else bool(read_segment_names(label_path))


def _grid_problem(labels: sitk.Image, image: sitk.Image, segmentation: bool) -> str | None:
    """None when ``labels`` is on ``image``'s grid (or, for a segmentation, on a crop of it)."""
    differences = geometry_differences(labels, image)
    if not differences:
        return None
    if segmentation:
        lattice = [d for d in differences if not d.startswith(("size", "origin"))]
        if not lattice:
            index = np.array(image.TransformPhysicalPointToContinuousIndex(labels.GetOrigin()))
            if np.max(np.abs(index - np.round(index))) <= _LATTICE_TOL:
                return None
            return (
                f"segmentation origin is not on the image's voxel grid "
                f"(at index ({', '.join(f'{v:.3f}' for v in index)}) of the image)"
            )
        differences = lattice
    return "geometry differs from the image (label vs image): " + "; ".join(differences)


def _ct_problem(image: sitk.Image, site: Site) -> str | None:
    """The CT checks every entry point applies (io's single definitions), with this site's waiver."""
    return ct_geometry_problem(image) or ct_intensity_problem(
        image,
        allow_nonstandard=site.allow_nonstandard_intensities,
        waiver=f'set "{_ALLOW_KEY}": true in {site.site_file} if this is intended',
    )


def case_organ_map(case: Case, site: Site) -> dict[int, str | None]:
    """Return local label value -> organ name (or None) for ``case``, restricted to the site's organs.

    With ``"labels": "segment-names"`` the map comes from the case's segment names; otherwise
    it is the site's ``labels``.
    """
    if site.segment_names:
        mapping = organ_map_from_segment_names(read_segment_names(case.label_path))
    else:
        mapping = dict(site.label_values)
    return {value: (organ if organ in site.organs else None) for value, organ in mapping.items()}


def _check_cases(site: Site, problems: list[str]) -> None:
    found: set[str] = set()
    complete = True
    for case in site.cases:
        image = labels = None
        try:
            image = read_image(case.image_path)
            problem = _ct_problem(image, site)
            if problem:
                problems.append(f"{case.image_path}: {problem}")
        except SegVizInputError as error:
            problems.append(str(error))
        try:
            labels = read_label_map(case.label_path)
            names = read_segment_names(case.label_path)
        except SegVizInputError as error:
            problems.append(str(error))
            complete = False
            continue
        if image is not None:
            problem = _grid_problem(labels, image, _is_segmentation(case.label_path, names))
            if problem:
                problems.append(f"{case.label_path}: {problem}")
        present = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v != 0]
        if site.segment_names:
            if not names:
                problems.append(f'{case.label_path}: no segment names, but site.json says "labels": {SEGMENT_NAMES!r}')
                complete = False  # its organs are unknown, so "organ absent" would be a false alarm
                continue
            mapping = organ_map_from_segment_names(names)
            for value, organ in mapping.items():
                if organ is not None and organ not in site.organs:
                    problems.append(
                        f"{case.label_path}: segment {names[value]!r} is {organ!r}, "
                        f"which is not in 'organs' [{', '.join(site.organs)}] of {site.site_file}"
                    )
            undeclared = [v for v in present if v not in mapping]
            what = "have no segment"
        else:
            mapping = site.label_values
            undeclared = [v for v in present if v not in mapping]
            what = f"are not declared in 'labels' of {site.site_file}"
        if undeclared:
            shown = ", ".join(map(str, undeclared[:12])) + (
                f" ... ({len(undeclared)} values)" if len(undeclared) > 12 else ""
            )
            problems.append(f"{case.label_path}: label values {shown} {what}")
        found.update(mapping[v] for v in present if mapping.get(v) in site.organs)
    if complete:
        for organ in site.organs:
            if organ not in found:
                problems.append(
                    f"{site.site_file}: organ {organ!r} is declared but absent from every label map of the site"
                )


# --------------------------------------------------------------------------------------
# Writing, loading, state
# --------------------------------------------------------------------------------------


def write_site(
    root: str | Path,
    name: str,
    organs: str | list[str] | tuple[str, ...],
    label_values: Mapping[int, str | None] | str,
    force: bool = False,
    description: str = "",
    allow_nonstandard_intensities: bool = False,
) -> Path:
    """Write ``site.json`` (and create ``images/`` and ``labels/``) in ``root``.

    Args:
        root: the site folder (created if missing).
        name: the site's name.
        organs: annotated organs, e.g. ``["liver", "kidney"]`` or ``"liver,kidney"``.
        label_values: local label value -> organ name or None, or ``"segment-names"``.
        force: replace an existing site.json.
        description: optional free text.
        allow_nonstandard_intensities: the site's images need not be in Hounsfield units.

    Returns:
        path of the written site.json.

    Raises:
        SiteValidationError: the declaration is inconsistent (same checks as :func:`load_site`).
        SegVizInputError: site.json exists and ``force`` is false.

    Example::

        write_site("site-a", "site-a", ["liver"], {1: "liver", 2: None})
    """
    root = Path(root)
    site_file = root / SITE_FILE
    organ_list = organs.split(",") if isinstance(organs, str) else list(organs)
    data: dict[str, Any] = {"name": name, "organs": [o.strip().lower() for o in organ_list if str(o).strip()]}
    if isinstance(label_values, str):
        data["labels"] = label_values
    else:
        data["labels"] = {str(int(k)): (None if v is None else str(v).lower()) for k, v in sorted(label_values.items())}
    if description:
        data["description"] = description
    if allow_nonstandard_intensities:
        data[_ALLOW_KEY] = True
    problems: list[str] = []
    _check_declaration(data, site_file, problems)
    if problems:
        raise SiteValidationError(root, problems)
    if site_file.exists() and not force:
        raise SegVizInputError(site_file, "exists; use --force to overwrite")
    for folder in (root, root / IMAGES_DIR, root / LABELS_DIR):
        folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(site_file, json.dumps(data, indent=2) + "\n")
    return site_file


def load_case(case: Case, site: Site) -> tuple[sitk.Image, sitk.Image]:
    """Read one case: the CT and its labels in SegViz organ values on the CT's grid.

    A Slicer segmentation cropped to its extent is placed back onto the CT grid; local
    values mapped to null, and organs the site did not declare, become background.

    Returns:
        ``(image, organ_labels)``: float32 HU image, and uint8 labels (1 liver, 2 spleen,
        3 pancreas, 4 kidney, 0 background) with exactly the image's geometry.

    Raises:
        SegVizInputError: unreadable files, an image that is not CT (grid or values), labels
            not on the image grid, undeclared values.
    """
    image = read_image(case.image_path)
    problem = _ct_problem(image, site)
    if problem:
        raise SegVizInputError(case.image_path, problem)
    labels = read_label_map(case.label_path)
    problem = _grid_problem(labels, image, _is_segmentation(case.label_path))
    if problem:
        raise SegVizInputError(case.label_path, problem)
    if geometry_differences(labels, image):
        labels = resample_to_reference(labels, image)
    organ_labels = to_organ_labels(labels, case_organ_map(case, site), path=case.label_path)
    organ_labels.CopyInformation(image)  # bit-identical geometry, not just within tolerance
    return image, organ_labels


def state_dir(site: Site | str | Path) -> Path:
    """Return the site's local state folder ``<root>/.segviz``, creating it if needed."""
    root = site.root if isinstance(site, Site) else Path(site)
    folder = root / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder
