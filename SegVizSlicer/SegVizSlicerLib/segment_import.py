"""Import a SegViz label map as segments with organ names, colours and SNOMED CT terminology.

Label values come from ``SegVizLogic.organs`` (the single source of truth); each segment's name,
colour and terminology entry come from SegViz's terminology file loaded through Slicer's
Terminologies logic (:mod:`.terminology`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SegVizLogic.organs import ORGANS, Organ, organ_by_label

from .compatibility import set_segment_terminology
from .terminology import SegVizTerminology
from .volume_nodes import volume_node_from_image

__all__ = [
    "SegmentSpec",
    "body_midline_ras_x",
    "ensure_conversion_rules",
    "import_label_map",
    "organ_volume_table",
    "segment_voxel_counts",
    "show_in_3d",
    "split_kidney_by_side",
]


@dataclass(frozen=True)
class SegmentSpec:
    """One segment to create: the organ and an optional side (kidney split)."""

    organ: Organ
    side: str | None = None


def split_kidney_by_side(kidney: sitk.Image, midline_ras_x: float | None = None) -> dict[str, np.ndarray]:
    """Split a binary kidney mask into left and right by connected component.

    Each connected component goes wholly to the side its centroid lies on, so a kidney that
    touches the midline is never cut in two.

    Args:
        kidney: binary mask (SimpleITK, non-zero = kidney) in the volume's geometry.
        midline_ras_x: RAS x of the body's mid-sagittal plane; defaults to the centre of the
            field of view.

    Returns:
        ``{"left": mask, "right": mask}`` as boolean numpy arrays in (k, j, i) order.
    """
    mask = sitk.Cast(kidney != 0, sitk.sitkUInt8)
    if midline_ras_x is None:
        midline_ras_x = _field_of_view_centre_ras_x(mask)
    components = sitk.ConnectedComponent(mask, True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(components)
    component_array = sitk.GetArrayViewFromImage(components)
    sides = {"left": np.zeros(component_array.shape, bool), "right": np.zeros(component_array.shape, bool)}
    for label in stats.GetLabels():
        centroid_lps = stats.GetCentroid(label)
        sides[_side_of(-centroid_lps[0], midline_ras_x)] |= component_array == label
    return sides


def _side_of(ras_x: float, midline_ras_x: float) -> str:
    """The patient's side of a point: RAS x grows toward the patient's right (LPS x toward the left)."""
    return "right" if ras_x > midline_ras_x else "left"


def _field_of_view_centre_ras_x(image: sitk.Image) -> float:
    size = np.array(image.GetSize(), dtype=float)
    centre_lps = image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist())
    return -centre_lps[0]


def body_midline_ras_x(ct: sitk.Image, threshold_hu: float = -500.0) -> float:
    """RAS x of the centroid of the body (voxels above ``threshold_hu``); FOV centre if none."""
    body = sitk.Cast(ct > threshold_hu, sitk.sitkUInt8)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(body)
    if 1 not in stats.GetLabels():
        return _field_of_view_centre_ras_x(ct)
    return -stats.GetCentroid(1)[0]


def ensure_conversion_rules() -> None:
    """Register the labelmap <-> closed surface rules when running without the Slicer app
    (the application registers them at startup; the bare slicer-core wheel does not). Call it
    before creating segmentation nodes: each copies the factory's rules when it is created."""
    import slicer

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    rules = factory.GetConverterRules()
    if hasattr(rules, "GetNumberOfItems"):
        rules = [rules.GetItemAsObject(i) for i in range(rules.GetNumberOfItems())]
    names = {rule.GetClassName() for rule in rules}
    for rule in ("vtkBinaryLabelmapToClosedSurfaceConversionRule", "vtkClosedSurfaceToBinaryLabelmapConversionRule"):
        if rule not in names:
            factory.RegisterConverterRule(getattr(slicer, rule)())


def import_label_map(
    scene,
    label_map: sitk.Image | str | Path,
    name: str = "SegViz organs",
    segmentation_node=None,
    reference_volume_node=None,
    split_kidney: bool = False,
    midline_ras_x: float | None = None,
    terminology: SegVizTerminology | None = None,
):
    """Load a SegViz label map (1 liver, 2 spleen, 3 pancreas, 4 kidney) as a segmentation node.

    One segment per organ present, named, coloured and coded by the SegViz terminology. With
    ``split_kidney`` the kidney becomes "left kidney" and "right kidney" segments (laterality
    modifiers SCT 7771000 / 24028007).

    Args:
        scene: vtkMRMLScene.
        label_map: the label map (SimpleITK image or file path).
        name: name of a new segmentation node.
        segmentation_node: existing node to fill (its segments are replaced); a new one if None.
        reference_volume_node: the CT; sets the segmentation's reference geometry and (for the
            kidney split) the body midline.
        split_kidney: split the kidney by side.
        midline_ras_x: override the midline used for the kidney split.
        terminology: the loaded terminology (default: loaded once through Slicer's logic).

    Returns:
        the vtkMRMLSegmentationNode.

    Raises:
        ValueError: the label map holds a value that is not an organ label.
    """
    import slicer

    ensure_conversion_rules()  # a segmentation copies the factory's rules when it is created
    terminology = terminology or SegVizTerminology()
    labels = sitk.ReadImage(str(label_map)) if isinstance(label_map, (str, Path)) else label_map
    labels = sitk.Cast(labels, sitk.sitkUInt8)
    array = sitk.GetArrayFromImage(labels)
    present = [int(v) for v in np.unique(array) if v != 0]
    for value in present:
        organ_by_label(value)  # raises ValueError with the offending value

    specs: list[tuple[SegmentSpec, np.ndarray]] = []
    for organ in ORGANS:
        if organ.label not in present:
            continue
        mask = array == organ.label
        if split_kidney and organ.name == "kidney":
            if midline_ras_x is None and reference_volume_node is not None:
                from .volume_nodes import image_from_volume_node

                midline_ras_x = body_midline_ras_x(image_from_volume_node(reference_volume_node))
            kidney = sitk.GetImageFromArray(mask.astype(np.uint8))
            kidney.CopyInformation(labels)
            for side, side_mask in split_kidney_by_side(kidney, midline_ras_x).items():
                if side_mask.any():
                    specs.append((SegmentSpec(organ, side), side_mask))
        else:
            specs.append((SegmentSpec(organ), mask))

    # One label value per segment, then one import: segments share a labelmap layer as in Slicer.
    indexed = np.zeros(array.shape, np.uint8)
    for index, (_, mask) in enumerate(specs, start=1):
        indexed[mask] = index
    indexed_image = sitk.GetImageFromArray(indexed)
    indexed_image.CopyInformation(labels)
    labelmap_node = volume_node_from_image(scene, indexed_image, "SegViz import", labelmap=True)
    try:
        if segmentation_node is None:
            segmentation_node = slicer.vtkMRMLSegmentationNode()
            segmentation_node.SetName(name)
            scene.AddNode(segmentation_node)
            segmentation_node.CreateDefaultDisplayNodes()
        else:
            segmentation_node.GetSegmentation().RemoveAllSegments()
        if reference_volume_node is not None:
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            labelmap_node, segmentation_node
        ):
            raise RuntimeError("Slicer could not import the label map as segments")
    finally:
        scene.RemoveNode(labelmap_node)

    segmentation = segmentation_node.GetSegmentation()
    by_value = {}
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        by_value[segment.GetLabelValue()] = segment
    for index, (spec, _) in enumerate(specs, start=1):
        segment = by_value.get(index)
        if segment is None:
            continue
        coded = terminology.organ(spec.organ.name, spec.side)
        segment.SetName(coded.name)
        segment.SetColor(*coded.colour)
        set_segment_terminology(segment, coded.entry)
    return segmentation_node


def segment_voxel_counts(segmentation_node) -> dict[str, tuple[int, float]]:
    """Return ``{segment name: (voxels, volume in mL)}`` from each segment's binary labelmap."""
    import slicer
    from vtk.util import numpy_support

    counts = {}
    segmentation = segmentation_node.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        image = slicer.vtkOrientedImageData()
        slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentation_node, segment_id, image
        )
        scalars = image.GetPointData().GetScalars()
        # Segments share labelmap layers: a segment is the voxels holding its own label value.
        label_value = segmentation.GetNthSegment(i).GetLabelValue()
        voxels = 0 if scalars is None else int(np.count_nonzero(numpy_support.vtk_to_numpy(scalars) == label_value))
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        counts[segmentation.GetNthSegment(i).GetName()] = (voxels, voxels * voxel_ml)
    return counts


def organ_volume_table(segmentation_node, table_node=None):
    """Fill (or create) a vtkMRMLTableNode with each segment's volume (mL) and voxel count."""
    import slicer
    import vtk

    scene = segmentation_node.GetScene()
    if table_node is None:
        table_node = slicer.vtkMRMLTableNode()
        table_node.SetName(f"{segmentation_node.GetName()} volumes")
        scene.AddNode(table_node)
    table = table_node.GetTable()
    table.Initialize()
    names, volumes, voxels = vtk.vtkStringArray(), vtk.vtkDoubleArray(), vtk.vtkIntArray()
    names.SetName("Segment")
    volumes.SetName("Volume (mL)")
    voxels.SetName("Voxels")
    for name, (count, volume_ml) in segment_voxel_counts(segmentation_node).items():
        names.InsertNextValue(name)
        volumes.InsertNextValue(round(volume_ml, 2))
        voxels.InsertNextValue(count)
    for column in (names, volumes, voxels):
        table.AddColumn(column)
    table_node.Modified()
    return table_node


def show_in_3d(segmentation_node) -> bool:
    """Create the closed-surface representation so the segments show in 3D views."""
    ensure_conversion_rules()
    return bool(segmentation_node.CreateClosedSurfaceRepresentation())
