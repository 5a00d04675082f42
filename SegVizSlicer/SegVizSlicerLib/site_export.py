"""This site's training cases: MRML volume + segmentation nodes <-> the SegViz site folder.

The folder is what ``segviz federation join --site DIR`` reads, and it outlives Slicer sessions::

    site.json                   {"name": ..., "organs": [the ticked organs], "labels": {"1": "liver", ...}}
    images/<case>.nii.gz        the CT, voxel for voxel and in the volume node's geometry
    labels/<case>.nii.gz        SegViz label values (1 liver, 2 spleen, 3 pancreas, 4 kidney)
    .segviz/slicer-cases.json   which organs were declared when the panel saved each case

The organ ticks are the site's declaration: a case is saved with the ticked organs only, and a
ticked organ without a segment (or with an empty one) in a case is saved as absent, which is an
annotation too. Segments are matched to organs by terminology (SNOMED CT type code) first, then by
name ("Liver", "kidney_left", "Right kidney", ...).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SegVizLogic.errors import SegVizInputError
from SegVizLogic.organs import ORGAN_NAMES, organ_by_name, parse_organ_list

from .compatibility import segment_terminology
from .terminology import organ_of_terminology
from .volume_nodes import array_from_volume_node, ijk_to_ras_array, image_from_volume_node

__all__ = [
    "CASE_RECORD",
    "Case",
    "SiteCase",
    "case_label_array",
    "cases_from_scene",
    "declaration_problems",
    "match_segments",
    "organ_of_segment_name",
    "read_declaration",
    "remove_case",
    "replace_question",
    "safe_file_stem",
    "site_cases",
    "write_case",
    "write_declaration",
]

CASE_RECORD = Path(".segviz") / "slicer-cases.json"
"""Per case, the organs declared when the panel saved it (so a later tick can be checked)."""

_SIDE_WORDS = {"left", "right", "l", "r", "lt", "rt"}
_IGNORED_WORDS = {"segment", "total", "whole", "organ"}
_SUFFIX = ".nii.gz"


@dataclass
class Case:
    """One annotated case in the scene: a CT volume node and the segmentation node drawn on it.

    Args:
        volume_node: vtkMRMLScalarVolumeNode (the CT).
        segmentation_node: vtkMRMLSegmentationNode.
        name: file stem; defaults to the volume node's name, made file-safe.
    """

    volume_node: object
    segmentation_node: object
    name: str = ""
    segment_organs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = safe_file_stem(self.volume_node.GetName())
        if not self.segment_organs:
            self.segment_organs = match_segments(self.segmentation_node)


@dataclass(frozen=True)
class SiteCase:
    """A case saved in the site folder."""

    name: str
    present: tuple[str, ...]
    """Organs with at least one voxel in its label map (as recorded when saved)."""
    declared: tuple[str, ...] | None
    """Organs declared when the panel saved it; None for a case saved by another tool."""


def safe_file_stem(name: str) -> str:
    """A file name stem from a node name: letters, digits, ``-``, ``_`` and ``.`` only."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._")
    return stem or "case"


def organ_of_segment_name(name: str) -> str | None:
    """Organ named by a segment name, or None: "Liver", "kidney_left", "Right Kidney" match;
    "liver vessels" or "kidney cyst" do not (only side words may accompany the organ)."""
    words = [w for w in re.split(r"[\s_\-.,()]+", name.lower()) if w]
    organs = [w for w in words if w in ORGAN_NAMES or w.rstrip("s") in ORGAN_NAMES]
    other = [w for w in words if w not in organs and w not in _SIDE_WORDS and w not in _IGNORED_WORDS]
    if len(organs) != 1 or other:
        return None
    word = organs[0]
    return word if word in ORGAN_NAMES else word.rstrip("s")


def match_segments(segmentation_node) -> dict[str, str]:
    """Return ``{segment id: organ name}`` for the segments that are SegViz organs."""
    matches = {}
    segmentation = segmentation_node.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetNthSegment(i)
        organ, _ = organ_of_terminology(segment_terminology(segment))
        organ_name = organ.name if organ is not None else organ_of_segment_name(segment.GetName())
        if organ_name is not None:
            matches[segment_id] = organ_name
    return matches


def cases_from_scene(scene) -> list[Case]:
    """Pair every segmentation node in ``scene`` with its CT: the segmentation's reference
    geometry volume, else the only scalar volume in the scene. Unpaired segmentations are skipped."""
    volumes = [
        scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))
    ]
    volumes = [v for v in volumes if not v.IsA("vtkMRMLLabelMapVolumeNode")]
    cases = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        segmentation = scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
        volume = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
        if volume is None or not volume.IsA("vtkMRMLScalarVolumeNode") or volume.IsA("vtkMRMLLabelMapVolumeNode"):
            volume = volumes[0] if len(volumes) == 1 else None
        if volume is not None:
            cases.append(Case(volume, segmentation))
    return cases


def case_label_array(case: Case, organs: tuple[str, ...]) -> np.ndarray:
    """SegViz label map of one case as (k, j, i) uint8, in the volume node's exact grid.

    Organs in ``organs`` without a segment in the case stay 0 (absent).

    Raises:
        SegVizInputError: Slicer cannot resample a segment into the volume's geometry.
    """
    import slicer
    import vtk

    volume = case.volume_node
    scene = volume.GetScene()
    shape = array_from_volume_node(volume).shape
    labels = np.zeros(shape, np.uint8)
    for organ_name in organs:
        segment_ids = [sid for sid, name in case.segment_organs.items() if name == organ_name]
        if not segment_ids:
            continue
        ids = vtk.vtkStringArray()
        for sid in segment_ids:
            ids.InsertNextValue(sid)
        labelmap = slicer.vtkMRMLLabelMapVolumeNode()
        scene.AddNode(labelmap)
        try:
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                case.segmentation_node, ids, labelmap, volume
            )
            if not ok or labelmap.GetImageData() is None:
                raise SegVizInputError(
                    case.name, f"could not export the {organ_name} segments in the volume's geometry"
                )
            mask = array_from_volume_node(labelmap)
            if mask.shape != shape or not np.allclose(ijk_to_ras_array(labelmap), ijk_to_ras_array(volume), atol=1e-4):
                raise SegVizInputError(case.name, f"the {organ_name} segments did not land on the volume's voxel grid")
        finally:
            scene.RemoveNode(labelmap)
        labels[mask != 0] = organ_by_name(organ_name).label
    return labels


def _read_record(site_dir: Path) -> dict[str, dict]:
    path = site_dir / CASE_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as error:
        raise SegVizInputError(path, f"is damaged ({error}); delete it to start the record afresh") from None
    return record if isinstance(record, dict) else {}


def _write_record(site_dir: Path, record: dict[str, dict]) -> None:
    path = site_dir / CASE_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_case(case: Case, site_dir: str | Path, organs, replace: bool = False) -> SiteCase:
    """Save one case (CT and SegViz label map) into the site folder.

    The label map holds the declared ``organs`` only; a declared organ the case has no segment
    for is saved as absent. Both files are written beside their destination and moved into place
    together, so a failure leaves the folder as it was.

    Args:
        case: the scene case.
        site_dir: the site folder (created).
        organs: the declared organs (the ticks).
        replace: overwrite a case of the same name.

    Raises:
        SegVizInputError: no organ declared, a case of that name exists (without ``replace``),
            the volume is under a transform, or its segments do not fit the volume's grid.
    """
    organs = _declared(organs)
    site_dir = Path(site_dir)
    image_path = site_dir / "images" / f"{case.name}{_SUFFIX}"
    label_path = site_dir / "labels" / f"{case.name}{_SUFFIX}"
    if not replace and (image_path.exists() or label_path.exists()):
        raise SegVizInputError(image_path, f"case {case.name!r} is already in the site folder")
    if case.volume_node.GetParentTransformNode() is not None:
        raise SegVizInputError(case.name, "the volume is under a transform: harden it first (Data module)")
    image = image_from_volume_node(case.volume_node)
    array = case_label_array(case, organs)
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(image)
    present = tuple(n for n in organs if np.any(array == organ_by_name(n).label))
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=site_dir, prefix=".writing-") as staging:
        staged_image, staged_label = Path(staging) / "image.nii.gz", Path(staging) / "label.nii.gz"
        sitk.WriteImage(image, str(staged_image), useCompression=True)
        sitk.WriteImage(labels, str(staged_label), useCompression=True)
        staged_image.replace(image_path)
        staged_label.replace(label_path)
    record = _read_record(site_dir)
    record[case.name] = {"declared": list(organs), "present": list(present)}
    _write_record(site_dir, record)
    return SiteCase(case.name, present, organs)


def replace_question(site_dir: str | Path | None, name: str) -> str | None:
    """The question to ask before a case of the same name in the site folder is overwritten, or
    None when there is none (nothing is overwritten without asking)."""
    if site_dir is None:
        return None
    site_dir = Path(site_dir)
    if (site_dir / "images" / f"{name}{_SUFFIX}").exists() or (site_dir / "labels" / f"{name}{_SUFFIX}").exists():
        return f"Case {name} is already in the site folder {site_dir}. Replace it?"
    return None


def site_cases(site_dir: str | Path) -> list[SiteCase]:
    """The cases in the site folder (an image with its label map), by name."""
    site_dir = Path(site_dir)
    record = _read_record(site_dir) if site_dir.is_dir() else {}
    cases = []
    for image in sorted((site_dir / "images").glob(f"*{_SUFFIX}")) if (site_dir / "images").is_dir() else []:
        name = image.name[: -len(_SUFFIX)]
        if not (site_dir / "labels" / image.name).is_file():
            continue
        saved = record.get(name, {})
        declared = saved.get("declared")
        cases.append(SiteCase(name, tuple(saved.get("present", ())), tuple(declared) if declared is not None else None))
    return cases


def remove_case(site_dir: str | Path, name: str) -> None:
    """Delete a case (image, label map, record) from the site folder."""
    site_dir = Path(site_dir)
    for sub in ("images", "labels"):
        (site_dir / sub / f"{name}{_SUFFIX}").unlink(missing_ok=True)
    record = _read_record(site_dir)
    if record.pop(name, None) is not None:
        _write_record(site_dir, record)


def read_declaration(site_dir: str | Path) -> tuple[str, tuple[str, ...]] | None:
    """``(site name, declared organs)`` from the folder's ``site.json``, None when it has none."""
    path = Path(site_dir) / "site.json"
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
        return str(description["name"]), parse_organ_list(list(description["organs"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SegVizInputError(path, f"is not a readable site description ({error})") from None


def write_declaration(site_dir: str | Path, site_name: str, organs) -> Path:
    """Write ``site.json`` for the declared organs; returns its path.

    Raises:
        SegVizInputError: no site name or no organ.
    """
    organs = _declared(organs)
    if not site_name.strip():
        raise SegVizInputError(None, "the site needs a name")
    site_json = Path(site_dir) / "site.json"
    site_json.parent.mkdir(parents=True, exist_ok=True)
    description = {
        "name": site_name.strip(),
        "organs": list(organs),
        "labels": {str(organ_by_name(n).label): n for n in organs},
    }
    site_json.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    return site_json


def declaration_problems(site_dir: str | Path, organs) -> list[str]:
    """What stops the site from training with the declared ``organs``, one line each.

    A case the panel saved while an organ now ticked was not declared holds no annotation of it,
    yet training would read it as "absent here"; and an organ no case contains cannot be learnt.
    """
    try:
        organs = _declared(organs)
    except SegVizInputError as error:
        return [error.problem]
    cases = site_cases(site_dir)
    if not cases:
        return ["the site folder has no case yet: add annotated cases first"]
    problems = []
    for case in cases:
        if case.declared is None:
            continue
        missing = [o for o in organs if o not in case.declared]
        if missing:
            problems.append(
                f"case {case.name} was saved before {', '.join(missing)} was ticked: add it again "
                f"with {', '.join(missing)} annotated, or remove it"
            )
    recorded = [c for c in cases if c.declared is not None]
    if recorded and len(recorded) == len(cases):
        for organ in organs:
            if not any(organ in c.present for c in cases):
                problems.append(f"{organ} is ticked but no case in the site folder contains it")
    return problems


def _declared(organs) -> tuple[str, ...]:
    organs = tuple(organs or ())
    if not organs:
        raise SegVizInputError(
            None, f"no annotated organ: tick the organs this site annotated ({', '.join(ORGAN_NAMES)})"
        )
    try:
        return parse_organ_list(list(organs))
    except ValueError as error:
        raise SegVizInputError(None, str(error)) from None
