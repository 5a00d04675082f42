"""SegVizSlicerLogic itself on real MRML: a whole apply with a small model built by the `segviz` CLI
(the path SegVizSlicerTest runs inside Slicer), "Add to my site" with the reviewed result, and
Leave of a real `segviz federation join` whose Flower SuperNode runs in a session of its own."""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import numpy as np
import pytest
from slicer_core_guard import require_mrml

slicer = require_mrml()
sitk = pytest.importorskip("SimpleITK")

from SegVizSlicerLib.compatibility import segment_terminology
from SegVizSlicerLib.job import FederationJob, ProcessJob, join_command, segviz_command
from SegVizSlicerLib.logic import SegVizSlicerLogic
from SegVizSlicerLib.panel_state import FederationState
from SegVizSlicerLib.segment_import import ensure_conversion_rules, segment_voxel_counts
from SegVizSlicerLib.site_export import site_cases


def _load_volume(scene, path):
    """As Slicer's Add Data does: a volume node read by its storage node (it keeps the file name)."""
    volume = slicer.vtkMRMLScalarVolumeNode()
    volume.SetName(path.name.split(".")[0])
    scene.AddNode(volume)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    volume.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(volume)
    return volume


@pytest.mark.slow
def test_logic_applies_a_small_model_then_adds_the_reviewed_case_to_the_site(small_model, tmp_path):
    ensure_conversion_rules()
    scene = slicer.vtkMRMLScene()
    volume = _load_volume(scene, small_model.ct)
    logic = SegVizSlicerLogic(scene=scene, temp_root=tmp_path / "temp", python=sys.executable)
    summary = logic.describeModel(small_model.bundle)
    assert summary.usable and summary.organs == ("liver", "spleen", "pancreas", "kidney")

    request = logic.startInference(volume, small_model.bundle, "cpu")
    assert (request.input.path, request.input.copied) == (small_model.ct, False), "the volume's own file is read"
    segmentation, table = logic.waitForInference(timeout=600, splitKidney=True)
    logic.stopAll()  # the session's warm worker

    assert not request.input.work_dir.exists() and not any((tmp_path / "temp").iterdir()), "no file is left"
    segments = segmentation.GetSegmentation()
    names = [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]
    assert "liver" in names and set(names) <= {"liver", "spleen", "pancreas", "left kidney", "right kidney"}
    assert [table.GetTable().GetValue(r, 0).ToString() for r in range(table.GetTable().GetNumberOfRows())] == names
    liver_id = segments.GetSegmentIdBySegmentName("liver")
    assert segment_terminology(segments.GetSegment(liver_id)).startswith("Segmentation category and type - SegViz~")
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is volume
    assert (logic.resultVolume, logic.resultSegmentation) == (volume, segmentation)

    # Review: the person keeps only the liver; "Add to my site" saves that and its CT.
    for segment_id in [segments.GetNthSegmentID(i) for i in range(segments.GetNumberOfSegments())]:
        if segment_id != liver_id:
            segments.RemoveSegment(segment_id)
    liver_voxels = segment_voxel_counts(segmentation)["liver"][0]
    site = tmp_path / "site"
    saved = logic.addToSite(volume, segmentation, site, ["liver", "kidney"])
    assert [c.name for c in site_cases(site)] == [saved.name]
    labels = sitk.ReadImage(str(site / "labels" / f"{saved.name}.nii.gz"))
    image = sitk.ReadImage(str(site / "images" / f"{saved.name}.nii.gz"))
    assert labels.GetSize() == image.GetSize() and np.allclose(labels.GetOrigin(), image.GetOrigin())
    assert np.allclose(labels.GetDirection(), image.GetDirection())
    # Slicer's reader may store the slices in another order than the file: the same CT in space.
    source = sitk.Resample(sitk.ReadImage(str(small_model.ct)), image, sitk.Transform(), sitk.sitkNearestNeighbor)
    assert np.array_equal(sitk.GetArrayFromImage(source), sitk.GetArrayFromImage(image))
    values, counts = np.unique(sitk.GetArrayFromImage(labels), return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist()))[1] == liver_voxels and set(values.tolist()) == {0, 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="POSIX sessions")
def test_leave_ends_a_real_join_and_its_supernode(tmp_path):
    """Real `segviz federation superlink` and `join`: Leave ends join, the SuperNode it started in
    a session of its own, and everything under it."""
    pytest.importorskip("flwr")
    from SegVizLogic.phantom import generate_phantom_sites

    layout = generate_phantom_sites(tmp_path / "phantom", cases_per_site=2, external_cases=1)
    site = layout.sites[0]
    address = f"127.0.0.1:{_free_port()}"
    superlink = ProcessJob(
        segviz_command(sys.executable)
        + ["federation", "superlink", "--address", address, "--insecure", "--state-dir", str(tmp_path / "sl")]
        + ["--progress", "json"]
    )
    superlink.start()
    job = FederationJob(join_command(address, site, insecure=True, python=sys.executable), address, 240)
    try:
        job.start()
        deadline = time.monotonic() + 240
        while not job.poll().connected and time.monotonic() < deadline:
            superlink.poll()
            assert job.status.active, (job.status.message, job.process.stderr_tail[-5:])
            time.sleep(0.2)
        assert job.status.connected
        tree = job.process.descendants()
        import psutil

        commands = [" ".join(psutil.Process(pid).cmdline()) for pid in tree]
        supernodes = [pid for pid, command in zip(tree, commands) if "flower-supernode" in command]
        assert supernodes, commands
        assert os.getsid(supernodes[0]) != os.getsid(job.process.pid), "Flower's SuperNode has its own session"

        job.leave(timeout=20.0)
        deadline = time.monotonic() + 60
        while job.poll().active and time.monotonic() < deadline:
            time.sleep(0.1)
        assert job.status.state == FederationState.LEFT
        deadline = time.monotonic() + 20
        while not all(_gone(pid) for pid in [job.process.pid, *tree]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in [job.process.pid, *tree] if not _gone(pid)] == []
        assert json.loads((site / "site.json").read_text(encoding="utf-8"))["organs"]  # the site folder is untouched
    finally:
        job.leave(timeout=5.0, wait=True)
        superlink.stop(timeout=5.0, wait=True)
