"""The two things the panel does, as headless steps: apply the global model, join a round.

``SegVizSlicerLogic`` (in SegVizSlicer.py) delegates here so the whole path from MRML nodes to a
running ``segviz`` child and back to segments is testable without the Slicer application.
"""

from __future__ import annotations

import time
from pathlib import Path

from .job import FederationJob, InferenceJob, infer_command, join_command
from .segment_import import import_label_map, organ_volume_table, show_in_3d
from .site_export import Case, export_site, safe_file_stem
from .volume_nodes import write_volume_node

__all__ = ["load_inference_result", "site_folder", "start_inference", "start_join"]


def start_inference(
    volume_node, model_path: str | Path, work_dir: str | Path, device: str = "auto", python: str | None = None
) -> InferenceJob:
    """Write ``volume_node`` to ``work_dir/inference/<volume>-<time>/input.nii.gz`` and start
    ``segviz infer`` on it. Returns the running job; poll it until ``output_ready``."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: no such model bundle")
    run_dir = Path(work_dir) / "inference" / f"{safe_file_stem(volume_node.GetName())}-{time.strftime('%Y%m%d-%H%M%S')}"
    input_path = write_volume_node(volume_node, run_dir / "input.nii.gz")
    output = run_dir / "organs.nii.gz"
    stats = run_dir / "stats.json"
    job = InferenceJob(
        infer_command(model_path, input_path, output, device, stats, python=python),
        output=output,
        stats=stats,
        cwd=run_dir,
    )
    job.start()
    return job


def load_inference_result(
    job: InferenceJob,
    volume_node,
    segmentation_node=None,
    split_kidney: bool = False,
    show_3d: bool = True,
    table_node=None,
):
    """Load a finished job's label map as organ segments on ``volume_node``; fill the volume table.

    Returns:
        ``(segmentation_node, table_node)``.

    Raises:
        RuntimeError: the job has not produced its output.
    """
    if not job.output_ready:
        raise RuntimeError(f"no result to load: {job.status.message or 'inference has not finished'}")
    scene = volume_node.GetScene()
    segmentation_node = import_label_map(
        scene,
        job.output,
        name=f"{volume_node.GetName()} organs",
        segmentation_node=segmentation_node,
        reference_volume_node=volume_node,
        split_kidney=split_kidney,
    )
    if show_3d:
        show_in_3d(segmentation_node)
    table_node = organ_volume_table(segmentation_node, table_node)
    job.status.finish(f"{segmentation_node.GetSegmentation().GetNumberOfSegments()} organ segments loaded")
    return segmentation_node, table_node


def site_folder(work_dir: str | Path, site_name: str) -> Path:
    """The site folder for ``site_name`` under the working folder."""
    return Path(work_dir) / "sites" / safe_file_stem(site_name)


def start_join(
    cases: list[Case],
    organs: list[str] | tuple[str, ...],
    site_name: str,
    work_dir: str | Path,
    superlink: str,
    root_cert: str | Path | None = None,
    insecure: bool = False,
    connect_timeout: float | None = 120.0,
    python: str | None = None,
) -> FederationJob:
    """Export the cases to the site folder, then start ``segviz federation join`` for it.

    Raises:
        SegVizInputError: nothing to export (no case, no annotated organ).
        ValueError: a malformed SuperLink address, or neither certificate nor insecure.
    """
    argv_check = join_command(superlink, "SITE", root_cert, insecure, python=python)  # validate before exporting
    del argv_check
    site_dir = site_folder(work_dir, site_name)
    export_site(cases, site_dir, site_name, organs)
    job = FederationJob(
        join_command(superlink, site_dir, root_cert, insecure, python=python),
        superlink=superlink.strip(),
        connect_timeout=connect_timeout,
        cwd=site_dir,
    )
    job.start()
    return job
