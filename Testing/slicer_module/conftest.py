"""Fixtures of the Slicer-module tests: the module's headless library on sys.path, real CT data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "SegVizSlicer"
REAL_DATA = REPO / ".." / "shared" / "data" / "real"

if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

# TotalSegmentator ("fast", kidney split) label values of the example case -> SegViz organ.
TOTALSEG_VALUES = {"liver": 5, "spleen": 1, "pancreas": 7, "kidney_left": 3, "kidney_right": 2}


@pytest.fixture(scope="session")
def totalseg_example() -> tuple[Path, Path]:
    """(CT, TotalSegmentator labels) of the real example case; skip when the data is absent."""
    folder = REAL_DATA / "totalseg_example"
    ct, labels = folder / "example_ct.nii.gz", folder / "example_seg_fast_force_split.nii.gz"
    if not (ct.is_file() and labels.is_file()):
        pytest.skip(f"real CT example not found under {folder}")
    return ct, labels
