"""Evaluation of a predicted label map against a reference: Dice and HD95 per organ."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from .errors import SegVizInputError
from .organs import ORGAN_NAMES, organ_by_label, organ_by_name

__all__ = ["OrganScore", "evaluate_label_maps", "parse_ref_map"]

OrganScore = (
    dict  # {"dice": float | None, "hd95_mm": float | None, "status": str, "pred_voxels": int, "ref_voxels": int}
)


def parse_ref_map(text: str | None) -> dict[int, str]:
    """Parse ``"liver=5,spleen=1,kidney=2,kidney=3"`` into ``{5: "liver", 1: "spleen", ...}``.

    ``None`` means the reference already uses SegViz values (1 liver ... 4 kidney).

    Raises:
        ValueError: malformed entry or unknown organ.
    """
    if not text:
        return {organ.label: organ.name for organ in map(organ_by_label, range(1, len(ORGAN_NAMES) + 1))}
    mapping: dict[int, str] = {}
    for entry in text.split(","):
        if not entry.strip():
            continue
        name, sep, value = entry.partition("=")
        if not sep:
            raise ValueError(f"--ref-map entry {entry!r} is not organ=value")
        organ = organ_by_name(name).name
        for part in value.split("+"):
            try:
                mapping[int(part)] = organ
            except ValueError:
                raise ValueError(f"--ref-map entry {entry!r}: {part!r} is not an integer label value") from None
    return mapping


def evaluate_label_maps(
    pred: sitk.Image,
    ref: sitk.Image,
    ref_map: Mapping[int, str] | None = None,
    organs: Sequence[str] = ORGAN_NAMES,
    hd95: bool = True,
    pred_path: str = "prediction",
    ref_path: str = "reference",
) -> dict[str, OrganScore]:
    """Dice and HD95 (mm) per organ of a SegViz-valued prediction against a reference.

    The reference may use other label values (``ref_map``: value -> organ; several values may
    map to one organ, e.g. left and right kidney). An organ absent from the reference is
    reported with ``status: "absent in reference"`` and no score.

    Raises:
        SegVizInputError: the two label maps are not on the same grid.
    """
    if (
        pred.GetSize() != ref.GetSize()
        or not np.allclose(pred.GetSpacing(), ref.GetSpacing(), atol=1e-3)
        or not np.allclose(pred.GetOrigin(), ref.GetOrigin(), atol=1e-2)
        or not np.allclose(pred.GetDirection(), ref.GetDirection(), atol=1e-4)
    ):
        raise SegVizInputError(
            pred_path,
            f"grid differs from {ref_path} (size {pred.GetSize()} vs {ref.GetSize()}, spacing "
            f"{tuple(round(s, 3) for s in pred.GetSpacing())} vs {tuple(round(s, 3) for s in ref.GetSpacing())})",
        )
    ref_map = dict(ref_map) if ref_map is not None else parse_ref_map(None)
    pred_array = sitk.GetArrayViewFromImage(pred)
    ref_array = sitk.GetArrayViewFromImage(ref)
    # SimpleITK arrays are z, y, x: spacing reversed.
    spacing = tuple(reversed(pred.GetSpacing()))
    scores: dict[str, OrganScore] = {}
    for name in organs:
        values = [v for v, o in ref_map.items() if o == name]
        ref_mask = np.isin(ref_array, values) if values else np.zeros(ref_array.shape, bool)
        pred_mask = pred_array == organ_by_name(name).label
        score: OrganScore = {"pred_voxels": int(pred_mask.sum()), "ref_voxels": int(ref_mask.sum())}
        if not ref_mask.any():
            score.update(dice=None, hd95_mm=None, status="absent in reference")
        else:
            p = torch.from_numpy(pred_mask)[None, None]
            r = torch.from_numpy(ref_mask)[None, None]
            score["dice"] = float(compute_dice(p, r, include_background=True)[0, 0])
            if hd95 and pred_mask.any():
                with warnings.catch_warnings():  # MONAI 1.5+ deprecation notice inside its own call
                    warnings.simplefilter("ignore", FutureWarning)
                    score["hd95_mm"] = float(
                        compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing)[0, 0]
                    )
            else:
                score["hd95_mm"] = None
            score["status"] = "scored" if pred_mask.any() else "missed (not predicted)"
        scores[name] = score
    return scores
