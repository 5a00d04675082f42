"""Preprocessing: SimpleITK <-> MetaTensor geometry, orientation, spacing and HU window."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SegVizLogic.preprocessing import Preprocessing, metatensor_to_sitk, preprocessing_transforms, sitk_to_metatensor


def _oblique_image():
    array = np.arange(6 * 5 * 4, dtype=np.float32).reshape(4, 5, 6)  # z, y, x
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 1.3, 2.5))
    image.SetOrigin((10.0, -20.0, 35.0))
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image.SetDirection(tuple(rot.ravel()))
    return image


def test_metatensor_affine_maps_indices_to_ras():
    image = _oblique_image()
    tensor = sitk_to_metatensor(image)
    assert tuple(tensor.shape) == (1, 6, 5, 4)
    index = (3, 2, 1)
    lps = np.asarray(image.TransformIndexToPhysicalPoint(index))
    ras = (tensor.affine.numpy() @ np.array([*index, 1.0]))[:3]
    np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-6)
    assert float(tensor[0, 3, 2, 1]) == float(sitk.GetArrayViewFromImage(image)[1, 2, 3])
    # Every voxel, transposed into (i, j, k); a copy, not a view of ITK's buffer, even though the
    # image is float32 already; converted when asked.
    expected = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    assert image.GetPixelID() == sitk.sitkFloat32 and tensor.dtype == torch.float32 and tensor.is_contiguous()
    assert np.array_equal(tensor[0].numpy(), expected)
    tensor[0, 3, 2, 1] = -7.0
    assert float(sitk.GetArrayViewFromImage(image)[1, 2, 3]) == float(expected[3, 2, 1]) != -7.0
    labels = sitk_to_metatensor(sitk.Cast(image > 0, sitk.sitkUInt8), dtype=torch.uint8)
    assert labels.dtype == torch.uint8 and np.array_equal(labels[0].numpy(), (expected > 0).astype(np.uint8))


def test_round_trip_is_exact():
    image = _oblique_image()
    tensor = sitk_to_metatensor(image)
    back = metatensor_to_sitk(tensor, tensor.affine)
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-9)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_transforms_orient_resample_and_window():
    array = np.full((20, 30, 40), -1000, dtype=np.float32)
    array[5:15, 10:20, 10:30] = 100  # a soft-tissue block
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.75, 0.75, 1.0))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS on disk
    pre = Preprocessing(spacing=(1.5, 1.5, 2.0), hu_window=(-175, 250))
    out = preprocessing_transforms(pre)({"image": sitk_to_metatensor(image)})["image"]
    affine = out.affine.numpy()
    np.testing.assert_allclose(np.diag(affine)[:3], [1.5, 1.5, 2.0], atol=1e-6)  # RAS, positive axes
    assert tuple(out.shape) == (1, 20, 16, 10)  # MONAI keeps the last voxel centre: ceil-like sizes
    assert float(out.min()) == 0.0
    assert abs(float(out.max()) - (100 + 175) / 425) < 1e-4
    # the physical centre of the block survives
    ones = torch.nonzero(out[0] > 0.5).float().mean(0).numpy()
    centre_ras = (affine @ np.array([*ones, 1.0]))[:3]
    block_index = np.array([19.5, 14.5, 9.5])  # x, y, z centre of the block in the input
    centre_lps = np.asarray(image.TransformContinuousIndexToPhysicalPoint(tuple(block_index)))
    np.testing.assert_allclose(centre_ras, centre_lps * [-1, -1, 1], atol=1.6)


@pytest.mark.parametrize("bad", [{"spacing": (1, 1)}, {"spacing": (0, 1, 1)}, {"hu_window": (100, -100)}])
def test_invalid_preprocessing(bad):
    with pytest.raises(ValueError):
        Preprocessing(**bad)
