"""Restore a label map from the network's grid onto the input's grid, linearly interpolating only
where the answer can change.

Today's restore resamples each organ's probability onto the full input grid (SimpleITK, linear)
and labels every voxel: on a 512x512x300 CT that is four maps of 78 million floats. But the label
of a point inside a cell of the network's grid whose eight corners all carry the same label is
that label: trilinear interpolation is a convex combination of the corners, so an organ that is
above the threshold and ahead of every other organ at all eight corners stays so, and a cell whose
corners are all below the threshold stays background. So the label map is computed on the
network's grid, each input voxel takes its cell's label by indexing (no arithmetic), and only
voxels in cells with mixed corners (organ boundaries, a few percent) get the interpolated
probabilities. The result equals today's restore, up to float rounding.

Everything is torch on the probabilities' device: the same code restores on the GPU.
The fast path needs the input's axes parallel to the network grid's (true after MONAI's
orientation and spacing, which keep the direction up to a flip or permutation); otherwise
:func:`grid_mapping` returns None and the caller uses the full resampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "BOUNDARY_SHARE_LIMIT",
    "MIXED",
    "GridMapping",
    "cell_labels",
    "grid_mapping",
    "labels_from_probabilities",
    "restore_labels",
]

MIXED = 255
"""Cell label of a cell whose eight corners do not all carry the same label."""


@dataclass(frozen=True)
class GridMapping:
    """How each input axis maps onto the network grid: input axis ``a`` (SimpleITK index order
    i, j, k) runs along network axis ``axis[a]``, at continuous network index
    ``scale[a] * index + offset[a]``."""

    axis: tuple[int, int, int]
    scale: tuple[float, float, float]
    offset: tuple[float, float, float]


def grid_mapping(input_affine: np.ndarray, network_affine: np.ndarray, tolerance: float = 1e-4) -> GridMapping | None:
    """The per-axis mapping from the input's voxel index to the network grid's, or None when the
    two grids are not axis-parallel (an oblique resampling).

    Args:
        input_affine: 4x4 from the input's (i, j, k) to RAS mm.
        network_affine: 4x4 from the network grid's index to RAS mm.
        tolerance: largest off-axis coefficient, relative to the axis' own, taken as zero.
    """
    matrix = np.linalg.inv(np.asarray(network_affine, dtype=np.float64)) @ np.asarray(input_affine, dtype=np.float64)
    linear = matrix[:3, :3]
    axis = tuple(int(np.argmax(np.abs(linear[:, a]))) for a in range(3))
    if sorted(axis) != [0, 1, 2]:
        return None
    for a in range(3):
        column = np.abs(linear[:, a])
        if np.delete(column, axis[a]).max() > tolerance * column[axis[a]]:
            return None
    return GridMapping(
        axis=axis,  # type: ignore[arg-type]
        scale=tuple(float(linear[axis[a], a]) for a in range(3)),  # type: ignore[arg-type]
        offset=tuple(float(matrix[axis[a], 3]) for a in range(3)),  # type: ignore[arg-type]
    )


def labels_from_probabilities(
    probabilities: torch.Tensor, values: Sequence[int], threshold: float = 0.5
) -> torch.Tensor:
    """``(C, ...)`` probabilities -> uint8 labels: the value of the most probable organ (the first
    on a tie) where its probability is above ``threshold``, else 0."""
    best, index = probabilities.max(dim=0)
    table = torch.as_tensor(list(values), dtype=torch.uint8, device=probabilities.device)
    return torch.where(best > threshold, table[index], torch.zeros((), dtype=torch.uint8, device=best.device))


def cell_labels(labels: torch.Tensor) -> torch.Tensor:
    """Label of each cell ``[x, x+1] x [y, y+1] x [z, z+1]`` of a label grid: the corners' label
    where all eight agree, else :data:`MIXED`. The last cell along an axis repeats its last
    voxel (a point past the last voxel centre takes the edge value, as ITK's linear interpolator
    clamps), so the result has the grid's shape."""
    padded = torch.nn.functional.pad(labels[None, None].float(), (0, 1, 0, 1, 0, 1), mode="replicate")[0, 0]
    padded = padded.to(torch.uint8)
    first = padded[:-1, :-1, :-1]
    same = torch.ones_like(first, dtype=torch.bool)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                if dx or dy or dz:
                    same &= (
                        padded[dx : dx + first.shape[0], dy : dy + first.shape[1], dz : dz + first.shape[2]] == first
                    )
    return torch.where(same, first, torch.full((), MIXED, dtype=torch.uint8, device=first.device))


def _axis_positions(mapping: GridMapping, size: Sequence[int], shape: Sequence[int], device) -> list:
    """Per input axis: clamped continuous network index, its cell and whether it lies in the buffer."""
    out = []
    for a in range(3):
        extent = shape[mapping.axis[a]]
        c = torch.arange(size[a], dtype=torch.float64, device=device) * mapping.scale[a] + mapping.offset[a]
        # ITK's buffer: continuous indices from -0.5 to size - 0.5 (exclusive).
        inside = (c >= -0.5) & (c < extent - 0.5)
        c = c.clamp(0, extent - 1)
        cell = c.floor().long().clamp(max=extent - 1)
        out.append((c, cell, inside))
    return out


def _take(tensor: torch.Tensor, index: torch.Tensor, dim: int, torch_only: bool = False) -> torch.Tensor:
    """``tensor.index_select(dim, index)``; on the CPU through numpy's ``take`` (several times
    faster for uint8 volumes of this size) unless ``torch_only`` (the GPU's code, tested on CPU)."""
    if tensor.device.type == "cpu" and not torch_only:
        return torch.from_numpy(np.take(tensor.numpy(), index.numpy(), axis=dim))
    return tensor.index_select(dim, index)


BOUNDARY_SHARE_LIMIT = 0.1
"""Above this share of input voxels in mixed cells (a noisy, e.g. untrained, model, whose every
cell is a boundary), :func:`restore_labels` declines: interpolating nearly every voxel one by one
costs more than resampling the organ maps whole."""


@torch.no_grad()
def restore_labels(
    probabilities: torch.Tensor,
    mapping: GridMapping,
    size: Sequence[int],
    values: Sequence[int],
    threshold: float = 0.5,
    chunk: int = 1 << 21,
    torch_only: bool = False,
) -> torch.Tensor | None:
    """Label map on the input grid from per-organ probabilities on the network grid.

    Args:
        probabilities: ``(C, X, Y, Z)`` on the network grid (any device, float).
        mapping: :func:`grid_mapping` of the input onto that grid.
        size: the input's size in SimpleITK order (i, j, k).
        values: the label value of each channel.
        threshold: an organ is labelled where its probability is the highest and above this.
        chunk: input voxels per slab of slices whose mixed voxels are interpolated together (bounds
            the memory of the gather).
        torch_only: torch ops only, as on a GPU (on the CPU, numpy indexes the cells faster).

    Returns:
        uint8 labels shaped ``(k, j, i)`` (numpy order of a SimpleITK image of ``size``), on the
        probabilities' device; None when more than :data:`BOUNDARY_SHARE_LIMIT` of the voxels lie
        in mixed cells (the caller resamples the organ maps whole instead).
    """
    device = probabilities.device
    shape = probabilities.shape[1:]
    table = torch.as_tensor(list(values), dtype=torch.uint8, device=device)
    cells = cell_labels(labels_from_probabilities(probabilities, values, threshold))
    positions = _axis_positions(mapping, size, shape, device)
    if _mixed_voxels(cells, mapping, positions) > BOUNDARY_SHARE_LIMIT * float(np.prod(list(size))):
        return None
    # Index (k, j, i) directly: network axes permuted into the input's reversed order.
    order = (2, 1, 0)
    out = cells.permute(*(mapping.axis[a] for a in order)).contiguous()
    for dim, a in enumerate(order):
        out = _take(out, positions[a][1], dim, torch_only)
    for dim, a in enumerate(order):
        outside = (~positions[a][2]).nonzero()[:, 0]
        if len(outside):
            out.index_fill_(dim, outside, 0)
    probs = probabilities.float().permute(0, *(1 + mapping.axis[a] for a in order)).contiguous()
    # Each output axis' two network neighbours and the weight of the upper one.
    lerp = [_neighbours(positions[a][0], probs.shape[1 + dim]) for dim, a in enumerate(order)]
    # Slabs of slices with about ``chunk`` voxels each. Trilinear interpolation is separable on
    # axis-parallel grids: a slab's probabilities are interpolated along the first two output axes
    # for the whole slab (small: network resolution along the last axis), and each mixed voxel
    # then needs only its two neighbours along the last axis.
    rows = max(1, chunk // max(1, out.shape[1] * out.shape[2]))
    for first in range(0, out.shape[0], rows):
        idx = (out[first : first + rows] == MIXED).nonzero()
        if not len(idx):
            continue
        stop = min(first + rows, out.shape[0])
        slab = _interpolate_axis(probs, 1, *(t[first:stop] for t in lerp[0]))
        slab = _interpolate_axis(slab, 2, *lerp[1])  # (C, rows, J, network extent along i)
        low, high, frac = (t[idx[:, 2]] for t in lerp[2])
        flat = slab.reshape(slab.shape[0], -1)
        base = (idx[:, 0] * slab.shape[2] + idx[:, 1]) * slab.shape[3]
        values = flat.index_select(1, base + low) * (1 - frac) + flat.index_select(1, base + high) * frac
        best, arg = values.max(dim=0)
        out[idx[:, 0] + first, idx[:, 1], idx[:, 2]] = torch.where(
            best > threshold, table[arg], torch.zeros((), dtype=torch.uint8, device=device)
        )
    return out


def _mixed_voxels(cells: torch.Tensor, mapping: GridMapping, positions: list) -> float:
    """Input voxels (inside the network grid's buffer) that fall in mixed cells, counted on the network grid:
    each mixed cell times the number of input indices mapping into it along each axis."""
    counts = []
    for a in range(3):
        _, cell, inside = positions[a]
        counts.append(torch.bincount(cell[inside], minlength=cells.shape[mapping.axis[a]]).double())
    per_axis = [counts[mapping.axis.index(n)] for n in range(3)]  # indexed by network axis
    return float(torch.einsum("abc,a,b,c->", (cells == MIXED).double(), *per_axis))


def _neighbours(coords: torch.Tensor, extent: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lower and upper network index around each (clamped) continuous coordinate, and the upper's
    float32 weight (ITK's linear interpolation at the last voxel repeats it)."""
    low = coords.floor().long().clamp(max=extent - 1)
    high = (low + 1).clamp(max=extent - 1)
    return low, high, (coords - low).float()


def _interpolate_axis(
    volume: torch.Tensor, dim: int, low: torch.Tensor, high: torch.Tensor, frac: torch.Tensor
) -> torch.Tensor:
    """Linear interpolation of ``volume`` along ``dim`` at the points given by their two neighbours' indices and the
    upper one's weight: ``volume[low] * (1 - frac) + volume[high] * frac``, the points along ``dim``."""
    shape = [1] * volume.dim()
    shape[dim] = len(frac)
    weight = frac.reshape(shape)
    return volume.index_select(dim, low) * (1 - weight) + volume.index_select(dim, high) * weight
