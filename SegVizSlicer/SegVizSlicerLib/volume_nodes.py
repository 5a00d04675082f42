"""Volume nodes <-> SimpleITK images, keeping the geometry voxel for voxel.

MRML stores a volume's geometry in RAS (``IJKToRAS``); ITK and the files it writes (NIfTI, NRRD)
use LPS. The two differ by a sign flip of the first two axes, applied to both the direction
columns and the origin: ``IJKToRAS = diag(-1, -1, 1) @ [D * spacing | origin]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

__all__ = [
    "LPS_TO_RAS",
    "array_from_volume_node",
    "geometry_from_ijk_to_ras",
    "ijk_to_ras_array",
    "ijk_to_ras_from_image",
    "image_from_volume_node",
    "volume_node_from_image",
    "write_volume_node",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def ijk_to_ras_from_image(image: sitk.Image) -> np.ndarray:
    """Return the 4x4 IJK-to-RAS matrix of a 3D SimpleITK image (whose geometry is LPS)."""
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin(), dtype=float)
    return matrix


def geometry_from_ijk_to_ras(matrix: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Split an IJK-to-RAS matrix into ITK ``(origin, spacing, direction)`` in LPS.

    Raises:
        ValueError: the matrix has a zero-length axis.
    """
    matrix = np.asarray(matrix, dtype=float)
    axes = LPS_TO_RAS @ matrix[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"IJK-to-RAS matrix has a zero-length axis: spacing {spacing.tolist()}")
    direction = axes / spacing
    origin = LPS_TO_RAS @ matrix[:3, 3]
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def _vtk_matrix(matrix: np.ndarray) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(matrix[r, c]))
    return out


def ijk_to_ras_array(node) -> np.ndarray:
    """Return the IJK-to-RAS matrix of a volume node as a 4x4 numpy array."""
    vtk_matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(vtk_matrix)
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_node_from_image(scene, image: sitk.Image, name: str, labelmap: bool = False):
    """Add a volume node holding ``image`` (pixels and geometry) to ``scene`` and return it.

    Args:
        scene: the vtkMRMLScene to add the node to.
        image: a 3D scalar SimpleITK image.
        name: node name.
        labelmap: create a vtkMRMLLabelMapVolumeNode instead of a vtkMRMLScalarVolumeNode.
    """
    import slicer

    array = sitk.GetArrayFromImage(image)  # (k, j, i): the same memory order as vtkImageData
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(*image.GetSize())
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    image_data.GetPointData().SetScalars(scalars)
    node = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras_from_image(image)))
    node.SetAndObserveImageData(image_data)
    return node


def array_from_volume_node(node) -> np.ndarray:
    """Return the voxels of a volume node as a (k, j, i) numpy array (a copy)."""
    image_data = node.GetImageData()
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise ValueError(f"volume {node.GetName()!r} has no image data")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise ValueError(
            f"volume {node.GetName()!r} has {image_data.GetNumberOfScalarComponents()} components; expected a scalar volume"
        )
    dims = image_data.GetDimensions()
    array = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    return array.reshape(dims[2], dims[1], dims[0]).copy()


def image_from_volume_node(node) -> sitk.Image:
    """Return a volume node's voxels and geometry as a SimpleITK image (LPS geometry).

    A parent transform is not applied: the image is in the node's own IJK-to-RAS space. Callers
    that accept transformed volumes must harden the transform first.
    """
    image = sitk.GetImageFromArray(array_from_volume_node(node))
    origin, spacing, direction = geometry_from_ijk_to_ras(ijk_to_ras_array(node))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def write_volume_node(node, path: str | Path) -> Path:
    """Write a volume node to ``path`` (NIfTI, NRRD, MHA by extension) with its exact geometry.

    Raises:
        ValueError: the node is under a (non-hardened) transform, so its file geometry would be wrong.
    """
    if node.GetParentTransformNode() is not None:
        raise ValueError(f"volume {node.GetName()!r} is under a transform; harden the transform first")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image_from_volume_node(node), str(path), useCompression=True)
    return path
