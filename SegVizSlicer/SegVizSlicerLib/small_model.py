"""A small real model bundle for the module's self-test, built by the ``segviz`` CLI in children.

The in-Slicer self-test (``SegVizSlicerTest``) and the headless pytest both build it and then run
the panel's whole apply path on a CT the model never saw. It is a tiny network trained for a few
epochs on one phantom site: what is tested is the path (files, geometry, segments, volumes), not
the model's accuracy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .job import ProcessJob, segviz_command

__all__ = ["SmallModel", "build_small_model"]

# A few-second model: 6 mm voxels, two levels of 4 and 8 channels, 4 epochs on 2 cases.
TRAIN_OPTIONS = [
    "--epochs",
    "4",
    "--spacing",
    "6,6,6",
    "--patch",
    "48,48,32",
    "--channels",
    "4,8",
    "--batch-size",
    "2",
    "--samples-per-case",
    "2",
    "--device",
    "cpu",
]


@dataclass(frozen=True)
class SmallModel:
    """The built bundle and a CT with its reference labels from another scanner."""

    bundle: Path
    ct: Path
    labels: Path


def _run(argv: list[str], timeout: float) -> None:
    job = ProcessJob(argv)
    job.start()
    deadline = time.monotonic() + timeout
    while job.returncode is None:
        if time.monotonic() > deadline:
            job.stop(timeout=5.0, wait=True)
            raise RuntimeError(f"{' '.join(argv[3:5])} took longer than {timeout:.0f} s")
        job.poll()
        time.sleep(0.1)
    if job.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[3:5])} failed: " + " | ".join(job.stderr_tail[-5:]))


def build_small_model(folder: str | Path, python: str | None = None, timeout: float = 900.0) -> SmallModel:
    """Generate a small phantom and train a tiny liver model on one of its sites.

    Args:
        folder: an empty or new folder for the phantom and the bundle.
        python: interpreter of the children (default: PythonSlicer inside Slicer).
        timeout: seconds each step may take.

    Raises:
        RuntimeError: a step failed (its last error lines) or timed out.
    """
    folder = Path(folder)
    phantom = folder / "phantom"
    _run(
        segviz_command(python)
        + ["phantom", "--out", str(phantom), "--cases-per-site", "2", "--external-cases", "1", "--progress", "none"],
        timeout,
    )
    bundle = folder / "small.segviz"
    _run(
        segviz_command(python)
        + ["train", "--site", str(phantom / "site-liver"), "--out", str(bundle), *TRAIN_OPTIONS, "--progress", "none"],
        timeout,
    )
    ct = next(iter(sorted((phantom / "external" / "images").iterdir())))
    labels = phantom / "external" / "labels" / ct.name
    return SmallModel(bundle, ct, labels)
