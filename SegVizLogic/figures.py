"""PNG figures a person would rather see than read: label overlays on CT slices."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .organs import ORGANS

__all__ = ["axial_display", "overlay_rgb", "render_overlays"]


def axial_display(image: sitk.Image) -> np.ndarray:
    """Array ``(z, y, x)`` reoriented so that an axial slice shows in radiological convention
    (patient right on the image's left, anterior at the top), superior slices last."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))


def overlay_rgb(
    ct_slice: np.ndarray, label_slice: np.ndarray | None, window: tuple[float, float] = (40, 400), alpha: float = 0.45
) -> np.ndarray:
    """RGB float image of a CT slice (window level, width) with organ colours blended in."""
    level, width = window
    grey = np.clip((ct_slice - (level - width / 2)) / width, 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if label_slice is not None:
        for organ in ORGANS:
            mask = label_slice == organ.label
            rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(organ.colour_float)
    return rgb


def render_overlays(
    image: sitk.Image, label_maps: Mapping[str, sitk.Image | None], path: str | Path, title: str = "", slices: int = 3
) -> Path:
    """Write a PNG: rows = axial slices through the organs, columns = CT then each label map.

    Args:
        image: the CT.
        label_maps: column title -> SegViz label map on the image's grid (``None`` for a
            column without labels).
        path: PNG to write.
        title: figure title.
        slices: number of axial slices (spread over the reference organs' extent).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ct = axial_display(image)
    maps = {name: (None if lab is None else axial_display(lab)) for name, lab in label_maps.items()}
    reference = next((m for m in maps.values() if m is not None), None)
    if reference is not None and reference.any():
        z = np.nonzero(reference.any(axis=(1, 2)))[0]
        picks = np.linspace(z.min(), z.max(), slices + 2)[1:-1].round().astype(int)
    else:
        picks = np.linspace(0, ct.shape[0] - 1, slices + 2)[1:-1].round().astype(int)
    spacing = sitk.DICOMOrient(image, "LPS").GetSpacing()
    aspect = spacing[1] / spacing[0]
    columns = ["CT", *maps]
    fig, axes = plt.subplots(
        len(picks),
        len(columns),
        figsize=(2.6 * len(columns), 2.6 * len(picks) * aspect * ct.shape[1] / ct.shape[2] + 0.6),
        squeeze=False,
    )
    for row, z in enumerate(picks):
        for col, name in enumerate(columns):
            labels = None if name == "CT" else maps[name]
            axes[row, col].imshow(overlay_rgb(ct[z], None if labels is None else labels[z]), aspect=aspect)
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(name, fontsize=9)
    fig.legend(
        handles=[Patch(color=o.colour_float, label=o.name) for o in ORGANS],
        loc="lower center",
        ncol=len(ORGANS),
        fontsize=8,
        frameon=False,
    )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
