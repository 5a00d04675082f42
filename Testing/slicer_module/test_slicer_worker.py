"""The panel's warm worker on real MRML and a real `segviz serve` child: one worker for the
session, the second Apply without a bundle load, a dead worker restarted, cleanup ends it."""

from __future__ import annotations

import sys
import time

import pytest
from slicer_core_guard import require_mrml

slicer = require_mrml()

from SegVizSlicerLib.inference_worker import WorkerJob, WorkerRunner
from SegVizSlicerLib.logic import SegVizSlicerLogic
from SegVizSlicerLib.segment_import import ensure_conversion_rules, segment_voxel_counts


def _load_volume(scene, path):
    volume = slicer.vtkMRMLScalarVolumeNode()
    volume.SetName(path.name.split(".")[0])
    scene.AddNode(volume)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    volume.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(volume)
    return volume


def _gone(pid: int, timeout: float = 30.0) -> bool:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_one_warm_worker_serves_every_apply_of_the_session(small_model, tmp_path):
    ensure_conversion_rules()
    scene = slicer.vtkMRMLScene()
    volume = _load_volume(scene, small_model.ct)
    logic = SegVizSlicerLogic(scene=scene, temp_root=tmp_path / "temp", python=sys.executable)
    runner = logic.inference.runner
    assert isinstance(runner, WorkerRunner) and runner.worker.process is None, "started lazily, on the first apply"
    try:
        counts, jobs = [], []
        for _ in range(2):
            logic.startInference(volume, small_model.bundle, "cpu")
            jobs.append(logic.inference.job)
            segmentation, _table = logic.waitForInference(timeout=600)
            counts.append(segment_voxel_counts(segmentation))
        assert all(isinstance(job, WorkerJob) for job in jobs)
        assert runner.worker.starts == 1 and runner.worker.running, "one worker served both applies"
        assert [job.bundle_loaded for job in jobs] == [True, False], "the second apply loads no bundle"
        assert counts[0] == counts[1] and counts[0], "the same segments both times"
        assert not any((tmp_path / "temp").iterdir()), "every apply's files are removed"

        # A worker that died is started again on the next apply.
        first_pid = runner.worker.pid
        runner.worker.process.process.kill()
        assert _gone(first_pid)
        logic.startInference(volume, small_model.bundle, "cpu")
        logic.waitForInference(timeout=600)
        assert runner.worker.starts == 2 and runner.worker.pid != first_pid

        # Cancel ends the busy worker; the apply is cancelled and its files go.
        logic.startInference(volume, small_model.bundle, "cpu")
        busy_pid = runner.worker.pid
        logic.inference.cancel()
        deadline = time.monotonic() + 60
        while logic.pollInference().active and time.monotonic() < deadline:
            time.sleep(0.1)
        assert logic.inference.job.status.state.value == "cancelled" and _gone(busy_pid)
        assert not any((tmp_path / "temp").iterdir())
    finally:
        pid = runner.worker.pid
        logic.stopAll()
    assert pid is None or _gone(pid), "module cleanup ends the worker"
    assert not runner.worker.running
