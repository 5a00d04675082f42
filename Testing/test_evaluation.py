"""Dice/HD95 per organ with reference label maps in other value schemes."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from SegVizLogic.errors import SegVizInputError
from SegVizLogic.evaluation import evaluate_label_maps, parse_ref_map


def _image(array, spacing=(2.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    return image


def test_dice_hd95_and_absent_organs():
    ref = np.zeros((10, 20, 20), np.uint8)
    ref[2:8, 5:15, 5:15] = 5  # liver in TotalSegmentator values
    ref[2:8, 0:2, 0:2] = 3  # left kidney
    pred = np.zeros_like(ref)
    pred[2:8, 5:15, 5:10] = 1  # half the liver
    scores = evaluate_label_maps(_image(pred), _image(ref), parse_ref_map("liver=5,kidney=2+3"))
    assert scores["liver"]["dice"] == pytest.approx(2 * 300 / (300 + 600))
    assert scores["liver"]["hd95_mm"] == pytest.approx(10.0)  # 5 voxels of 2 mm along x (the last array axis)
    assert scores["kidney"]["dice"] == 0.0 and scores["kidney"]["status"] == "missed (not predicted)"
    assert scores["spleen"]["dice"] is None and scores["spleen"]["status"] == "absent in reference"


def test_grid_mismatch_is_refused():
    a = _image(np.zeros((4, 4, 4)))
    b = _image(np.zeros((4, 4, 4)), spacing=(1, 1, 1))
    with pytest.raises(SegVizInputError, match="p.nii.gz: grid differs from r.nii.gz"):
        evaluate_label_maps(a, b, pred_path="p.nii.gz", ref_path="r.nii.gz")


def test_ref_map_parsing():
    assert parse_ref_map("liver=5,spleen=1,kidney=2+3") == {5: "liver", 1: "spleen", 2: "kidney", 3: "kidney"}
    assert parse_ref_map(None) == {1: "liver", 2: "spleen", 3: "pancreas", 4: "kidney"}
    with pytest.raises(ValueError, match="not organ=value"):
        parse_ref_map("liver5")
    with pytest.raises(ValueError, match="unknown organ"):
        parse_ref_map("lung=3")
