"""Preprocessing: the one definition of how a CT volume becomes network input.

SimpleITK images (LPS physical space) are turned into MONAI ``MetaTensor`` objects with a
RAS affine, then MONAI dict transforms orient them to RAS, resample them to the model's
spacing and window the HU values to [0, 1]. The same :class:`Preprocessing` is stored in each
model bundle, so inference repeats exactly what training did.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureTyped,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

__all__ = [
    "LPS_TO_RAS",
    "Preprocessing",
    "metatensor_to_sitk",
    "preprocessing_transforms",
    "sitk_to_metatensor",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Preprocessing:
    """How CT is prepared for the network.

    Args:
        spacing: target voxel spacing in mm (RAS x, y, z) after resampling.
        hu_window: HU range mapped linearly to [0, 1] (values outside are clipped).
        orientation: axis codes of the resampled array (MONAI convention).
    """

    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)
    hu_window: tuple[float, float] = (-175.0, 250.0)
    orientation: str = "RAS"

    def __post_init__(self) -> None:
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive numbers in mm, got {self.spacing}")
        if len(self.hu_window) != 2 or self.hu_window[0] >= self.hu_window[1]:
            raise ValueError(f"hu_window must be (low, high) with low < high, got {self.hu_window}")

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> Preprocessing:
        """Inverse of :meth:`to_dict`."""
        return cls(
            spacing=tuple(data["spacing"]),
            hu_window=tuple(data["hu_window"]),
            orientation=data.get("orientation", "RAS"),
        )


def sitk_to_metatensor(image: sitk.Image, dtype: torch.dtype = torch.float32) -> MetaTensor:
    """Convert a 3D SimpleITK image to a channel-first MONAI ``MetaTensor`` ``(1, I, J, K)``.

    The array is indexed like SimpleITK's index (i, j, k); the affine maps (i, j, k) to RAS mm,
    which is what MONAI's spatial transforms expect.
    """
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
    array = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)  # z,y,x -> i,j,k
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    tensor = torch.as_tensor(np.ascontiguousarray(array)).to(dtype)[None]
    return MetaTensor(tensor, affine=torch.as_tensor(affine, dtype=torch.float64))


def metatensor_to_sitk(tensor: torch.Tensor | np.ndarray, affine: np.ndarray | torch.Tensor) -> sitk.Image:
    """Inverse of :func:`sitk_to_metatensor` for one channel: ``(I, J, K)`` or ``(1, I, J, K)``
    array plus its RAS affine -> SimpleITK image with LPS geometry."""
    array = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
    if array.ndim == 4:
        array = array[0]
    affine = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    matrix = LPS_TO_RAS @ affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(d) for d in (matrix / spacing).ravel()))
    image.SetOrigin(tuple(float(o) for o in LPS_TO_RAS @ affine[:3, 3]))
    return image


def preprocessing_transforms(
    preprocessing: Preprocessing, keys: Sequence[str] = ("image",), label_keys: Sequence[str] = ()
) -> Compose:
    """MONAI dict transforms from a loaded ``MetaTensor`` to network input.

    Args:
        preprocessing: the model's preprocessing.
        keys: image keys (linearly resampled and HU-windowed).
        label_keys: label keys (resampled nearest-neighbour, values kept).

    Returns:
        A ``Compose`` taking ``{"image": MetaTensor(1, I, J, K), ...}`` and returning the same
        keys oriented, resampled and (images) scaled to [0, 1]. It is invertible with MONAI's
        ``Invertd``.
    """
    all_keys = list(keys) + list(label_keys)
    modes = ["bilinear"] * len(keys) + ["nearest"] * len(label_keys)
    low, high = preprocessing.hu_window
    return Compose(
        [
            EnsureTyped(keys=all_keys, track_meta=True),
            Orientationd(keys=all_keys, axcodes=preprocessing.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys=all_keys, pixdim=preprocessing.spacing, mode=modes),
            ScaleIntensityRanged(keys=list(keys), a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
        ]
    )
