"""Restoring the label map at the network's resolution: the same labels as resampling every organ's
probability onto the input grid (SimpleITK, linear), with interpolation only in boundary cells."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SegVizLogic.label_restore import (
    MIXED,
    GridMapping,
    cell_labels,
    grid_mapping,
    labels_from_probabilities,
    restore_labels,
)
from SegVizLogic.preprocessing import metatensor_to_sitk, sitk_to_metatensor_affine

VALUES = (1, 2, 3, 4)


def _smooth_organs(shape, seed=0) -> torch.Tensor:
    """Four overlapping soft spheres: probabilities with real boundaries and competing organs."""
    generator = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    maps = []
    for _ in VALUES:
        centre, radius = generator.uniform(-0.4, 0.4, 3), generator.uniform(0.2, 0.45)
        distance = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
        maps.append(1 / (1 + np.exp((distance - radius) * 25)))
    return torch.as_tensor(np.stack(maps), dtype=torch.float32)


def _reference(probabilities: torch.Tensor, network_affine: np.ndarray, image: sitk.Image) -> np.ndarray:
    """Today's restore: each organ resampled onto the input grid, the most probable above 0.5."""
    best = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.float32)
    labels = np.zeros(best.shape, np.uint8)
    for value, channel in zip(VALUES, probabilities):
        moved = sitk.Resample(
            metatensor_to_sitk(channel, network_affine), image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32
        )
        p = sitk.GetArrayViewFromImage(moved)
        labels[p > np.maximum(best, 0.5)] = value
        np.maximum(best, p, out=best)
    return labels


# Input grids: LPS identity, flipped and permuted axes (a sagittal acquisition), anisotropic.
GRIDS = [
    ((61, 53, 40), (0.8, 0.8, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
    ((47, 66, 35), (0.7, 1.1, 1.3), (0, 0, -1, 1, 0, 0, 0, -1, 0)),
]


@pytest.mark.parametrize("size, spacing, direction", GRIDS)
def test_restore_equals_resampling_every_organ(size, spacing, direction):
    image = sitk.Image(list(size), sitk.sitkInt16)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin((-20.0, 13.0, 7.5))
    # The network grid: the input's box, RAS-oriented, 1.5 x 1.5 x 2 mm, shifted by a fraction of a voxel.
    input_affine = sitk_to_metatensor_affine(image)
    corners = np.array([[i, j, k, 1] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
    ras = (input_affine @ corners.T).T[:, :3]
    network_affine = np.diag([1.5, 1.5, 2.0, 1.0])
    network_affine[:3, 3] = ras.min(0) - 0.3
    shape = tuple(int(np.ceil((ras.max(0)[a] - ras.min(0)[a]) / network_affine[a, a])) + 1 for a in range(3))
    probabilities = _smooth_organs(shape)

    mapping = grid_mapping(input_affine, network_affine)
    assert mapping is not None
    restored = restore_labels(probabilities, mapping, size, VALUES)
    expected = _reference(probabilities, network_affine, image)
    assert restored is not None and restored.shape == expected.shape
    assert set(np.unique(expected)) >= {0, 1, 2, 3, 4}, "every organ and background take part"
    assert np.array_equal(restored.numpy(), expected)
    # The GPU's code (torch indexing only), run on CPU tensors: the same labels.
    assert np.array_equal(restore_labels(probabilities, mapping, size, VALUES, torch_only=True).numpy(), expected)


def test_cells_and_declines():
    labels = torch.zeros((4, 4, 4), dtype=torch.uint8)
    labels[2:, :, :] = 1
    cells = cell_labels(labels)
    assert cells.shape == labels.shape
    assert (cells[0] == 0).all() and (cells[1] == MIXED).all() and (cells[2:] == 1).all()
    probabilities = torch.tensor([[0.2, 0.6], [0.6, 0.6]]).reshape(2, 2, 1, 1)  # a tie goes to the first organ
    assert labels_from_probabilities(probabilities, (1, 2)).flatten().tolist() == [2, 1]

    oblique = np.eye(4)
    angle = np.deg2rad(10)
    oblique[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    assert grid_mapping(oblique, np.eye(4)) is None, "an oblique input is left to full resampling"
    noise = torch.rand((4, 20, 20, 10), generator=torch.Generator().manual_seed(0))
    mapping = grid_mapping(np.diag([0.5, 0.5, 0.5, 1.0]), np.eye(4))
    assert restore_labels(noise, mapping, (40, 40, 20), VALUES) is None, "a noisy model: every cell a boundary"


@pytest.mark.parametrize("axis", [(0, 1, 2), (2, 0, 1)])
def test_mixed_voxels_are_counted_on_the_network_grid(axis):
    """Whether to decline is decided before the input-sized map exists: the mixed voxels counted
    cell by cell equal a voxel-by-voxel count, voxels outside the network grid's buffer excluded."""
    from SegVizLogic.label_restore import _axis_positions, _mixed_voxels

    shape = (9, 7, 5)
    cells = cell_labels(labels_from_probabilities(_smooth_organs(shape, seed=3), VALUES))
    assert 0 < int((cells == MIXED).sum()) < cells.numel()
    mapping = GridMapping(axis=axis, scale=(0.3, 0.45, 0.6), offset=(-1.2, 0.1, -0.8))
    size = (40, 22, 16)  # reaches past the grid on both sides of some axes
    positions = _axis_positions(mapping, size, shape, "cpu")
    assert not all(bool(p[2].all()) for p in positions), "some input voxels lie outside the buffer"
    expected = 0
    for index in np.ndindex(*size):
        if all(bool(positions[a][2][index[a]]) for a in range(3)):
            cell = [0, 0, 0]
            for a in range(3):
                cell[mapping.axis[a]] = int(positions[a][1][index[a]])
            expected += int(cells[tuple(cell)] == MIXED)
    assert expected > 0
    assert _mixed_voxels(cells, mapping, positions) == expected
