"""Bring a finished inference job's label map into the scene as organ segments with their volumes."""

from __future__ import annotations

from .segment_import import import_label_map, organ_volume_table, show_in_3d

__all__ = ["load_inference_result"]


def load_inference_result(
    job,
    volume_node,
    segmentation_node=None,
    split_kidney: bool = False,
    show_3d: bool = True,
    table_node=None,
    terminology=None,
):
    """Load a finished job's label map as organ segments on ``volume_node``; fill the volume table.

    Returns:
        ``(segmentation_node, table_node)``.

    Raises:
        RuntimeError: the job has not produced its output.
    """
    if not job.output_ready:
        raise RuntimeError(f"no result to load: {job.status.message or 'inference has not finished'}")
    if volume_node.GetScene() is None:
        raise RuntimeError("the segmented volume is no longer in the scene")
    scene = volume_node.GetScene()
    segmentation_node = import_label_map(
        scene,
        job.output,
        name=f"{volume_node.GetName()} organs",
        segmentation_node=segmentation_node,
        reference_volume_node=volume_node,
        split_kidney=split_kidney,
        terminology=terminology,
    )
    if show_3d:
        show_in_3d(segmentation_node)
    table_node = organ_volume_table(segmentation_node, table_node)
    job.status.finish(f"{segmentation_node.GetSegmentation().GetNumberOfSegments()} organ segments loaded")
    return segmentation_node, table_node
