"""Export the site's cases (volume + segmentation nodes) to a SegViz site folder.

The folder is what ``segviz federation join --site DIR`` reads::

    site.json               {"name": ..., "organs": [...], "labels": {"1": "liver", ...}}
    images/<case>.nii.gz    the CT, voxel for voxel and in the volume node's geometry
    labels/<case>.nii.gz    SegViz label values (1 liver, 2 spleen, 3 pancreas, 4 kidney)

Segments are matched to organs by terminology (SNOMED type code) first, then by name
("Liver", "kidney_left", "Right kidney", ...).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SegVizLogic.errors import SegVizInputError
from SegVizLogic.organs import ORGAN_NAMES, organ_by_name, parse_organ_list

from .segment_import import organ_of_terminology, segment_terminology
from .volume_nodes import array_from_volume_node, ijk_to_ras_array, image_from_volume_node

__all__ = [
    "Case",
    "annotated_organs",
    "case_label_array",
    "cases_from_scene",
    "export_site",
    "match_segments",
    "organ_of_segment_name",
    "safe_file_stem",
]

_SIDE_WORDS = {"left", "right", "l", "r", "lt", "rt"}
_IGNORED_WORDS = {"segment", "total", "whole", "organ"}


@dataclass
class Case:
    """One annotated case: a CT volume node and the segmentation node drawn on it.

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


def annotated_organs(cases: list[Case]) -> tuple[str, ...]:
    """Organs that have a matched segment in at least one case, in schema order."""
    found = {organ for case in cases for organ in case.segment_organs.values()}
    return tuple(n for n in ORGAN_NAMES if n in found)


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


def export_site(
    cases: list[Case], site_dir: str | Path, site_name: str, organs: tuple[str, ...] | list[str] | None = None
) -> Path:
    """Write the cases to a SegViz site folder and return the path of its ``site.json``.

    Args:
        cases: the annotated cases.
        site_dir: the site folder (created; existing case files of the same names are replaced).
        site_name: the site's name in the federation.
        organs: the organs this site annotated (the checked boxes); by default every organ that
            has a matched segment in some case.

    Raises:
        SegVizInputError: no case, no annotated organ, a case's volume under a transform.
    """
    if not cases:
        raise SegVizInputError(None, "no case to export: add at least one volume with its segmentation")
    organs = annotated_organs(cases) if organs is None else tuple(organs)
    if not organs:
        raise SegVizInputError(
            None,
            "no annotated organ: tick the organs this site annotated "
            f"(segments named or coded as {', '.join(ORGAN_NAMES)})",
        )
    organs = parse_organ_list(list(organs))
    if not site_name.strip():
        raise SegVizInputError(None, "the site needs a name")
    # A ticked organ is taught as "annotated here": a case without that organ's segment would
    # teach the model it is background. An empty segment is fine (the organ is truly absent).
    for case in cases:
        missing = [o for o in organs if o not in case.segment_organs.values()]
        if missing:
            raise SegVizInputError(
                case.name,
                f"has no {' or '.join(missing)} segment, but the site is marked as "
                f"annotating it: add the segment (even empty) or untick {', '.join(missing)}",
            )
    names = [case.name for case in cases]
    if len(set(names)) != len(names):
        raise SegVizInputError(None, f"two cases share a name: {sorted(n for n in names if names.count(n) > 1)}")

    site_dir = Path(site_dir)
    (site_dir / "images").mkdir(parents=True, exist_ok=True)
    (site_dir / "labels").mkdir(parents=True, exist_ok=True)
    # A case removed from the panel must not train on: drop exported cases not in this export.
    # (.segviz/, the site's own BatchNorm state, is kept across exports.)
    for sub in ("images", "labels"):
        for old in (site_dir / sub).glob("*.nii.gz"):
            if old.name[: -len(".nii.gz")] not in names:
                old.unlink()
    for case in cases:
        if case.volume_node.GetParentTransformNode() is not None:
            raise SegVizInputError(case.name, "the volume is under a transform: harden it before joining")
        image = image_from_volume_node(case.volume_node)
        labels = sitk.GetImageFromArray(case_label_array(case, organs))
        labels.CopyInformation(image)
        sitk.WriteImage(image, str(site_dir / "images" / f"{case.name}.nii.gz"), useCompression=True)
        sitk.WriteImage(labels, str(site_dir / "labels" / f"{case.name}.nii.gz"), useCompression=True)

    site_json = site_dir / "site.json"
    description = {
        "name": site_name.strip(),
        "organs": list(organs),
        "labels": {str(organ_by_name(n).label): n for n in organs},
    }
    site_json.write_text(json.dumps(description, indent=2) + "\n")
    return site_json
