"""Fixtures of the Slicer-module tests: the module's headless library on sys.path, real CT data.

This folder is deliberately not called ``slicer``: slicer-core's ``slicer`` package extends its
path over every ``slicer`` folder on ``sys.path`` and imports what it finds there, so a test
folder of that name would be imported as part of Slicer (and would satisfy an import guard
without slicer-core installed).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "SegVizSlicer"
REAL_DATA = REPO / ".." / "shared" / "data" / "real"

if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


@pytest.fixture(scope="session")
def totalseg_example() -> tuple[Path, Path]:
    """(CT, TotalSegmentator labels) of the real example case; skip when the data is absent."""
    folder = REAL_DATA / "totalseg_example"
    ct, labels = folder / "example_ct.nii.gz", folder / "example_seg_fast_force_split.nii.gz"
    if not (ct.is_file() and labels.is_file()):
        pytest.skip(f"real CT example not found under {folder}")
    return ct, labels


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    """A tiny real bundle built by the `segviz` CLI in children (what SegVizSlicerTest builds)."""
    from slicer_core_guard import require_mrml

    require_mrml()
    from SegVizSlicerLib.small_model import build_small_model

    return build_small_model(tmp_path_factory.mktemp("small-model"), python=sys.executable)
