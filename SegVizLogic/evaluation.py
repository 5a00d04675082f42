"""Evaluation of predicted label maps against references: Dice, HD95 and volume difference per organ.

A reference may come from any tool and any scanner software:

- other label values: ``--ref-map liver=5,kidney=2+3`` (TotalSegmentator's values); organs the map
  does not name are left out; a prediction from another tool gets ``--pred-map``;
- the same voxels stored in another orientation (a flipped or permuted axis, as TotalSegmentator's
  DICOM example reference is stored): compared voxel for voxel on the prediction's grid, exactly,
  and the report says so; a reference cropped on the same voxel lattice likewise;
- another grid: refused with a message naming what differs (size, spacing, origin, direction, with
  values), or resampled onto the prediction's grid (nearest neighbour) with ``--resample-ref``, and
  the report says so.

Several cases at once (two folders paired by case name) give one table, written as CSV and JSON
with per-case and mean Dice, HD95 and volume difference, and a PNG of the per-case distribution.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .errors import SegVizInputError
from .organs import ORGAN_NAMES, ORGANS, organ_by_name

__all__ = [
    "CaseEvaluation",
    "OrganScore",
    "align_reference",
    "check_report_paths",
    "evaluate_case",
    "evaluate_label_maps",
    "grid_differences",
    "pair_cases",
    "parse_ref_map",
    "plot_evaluation",
    "score_label_maps",
    "summarize",
    "table_rows",
    "write_evaluation",
]

OrganScore = dict
"""``{"dice", "hd95_mm", "status", "pred_voxels", "ref_voxels", "pred_ml", "ref_ml",
"volume_diff_ml", "volume_diff_percent"}`` (``None`` where a score does not exist)."""

SEGVIZ_VALUES: dict[int, str] = {o.label: o.name for o in ORGANS}
"""SegViz label values (1 liver ... 4 kidney): the default meaning of a prediction's and a reference's values."""
TABLE_COLUMNS = (
    "case",
    "organ",
    "dice",
    "hd95_mm",
    "pred_ml",
    "ref_ml",
    "volume_diff_ml",
    "volume_diff_percent",
    "status",
)
"""Columns of the CSV table (one row per case and organ, then one ``mean`` row per organ)."""
REPORT_SUFFIXES = {"json": ".json", "csv": ".csv", "png": ".png"}

# Geometry tolerances: spacing and origin in mm, direction cosines unitless.
_SPACING_TOL = 1e-3
_ORIGIN_TOL = 1e-2
_DIRECTION_TOL = 1e-4
_AXES = "xyz"


def parse_ref_map(text: str | None, option: str = "--ref-map") -> dict[int, str]:
    """Parse ``"liver=5,spleen=1,kidney=2+3"`` into ``{5: "liver", 1: "spleen", 2: "kidney", 3: "kidney"}``.

    ``None`` or ``""`` means SegViz values (1 liver ... 4 kidney).

    Raises:
        ValueError: a malformed entry, an unknown organ, or one value given to two organs
            (the message names ``option``).
    """
    if not text:
        return dict(SEGVIZ_VALUES)
    mapping: dict[int, str] = {}
    for entry in text.split(","):
        if not entry.strip():
            continue
        name, sep, value = entry.partition("=")
        if not sep:
            raise ValueError(f"{option} entry {entry!r} is not organ=value")
        organ = organ_by_name(name.strip()).name
        for part in value.split("+"):
            try:
                number = int(part)
            except ValueError:
                raise ValueError(f"{option} entry {entry!r}: {part!r} is not an integer label value") from None
            if number == 0:
                raise ValueError(f"{option} entry {entry!r}: 0 is background, not an organ")
            if mapping.get(number, organ) != organ:
                raise ValueError(f"{option}: value {number} is given to both {mapping[number]} and {organ}")
            mapping[number] = organ
    return mapping


# --- geometry -------------------------------------------------------------------------------


def _direction(image: sitk.Image) -> np.ndarray:
    return np.asarray(image.GetDirection(), float).reshape(3, 3)


def _numbers(values) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def grid_differences(pred: sitk.Image, ref: sitk.Image) -> list[str]:
    """What differs between two grids, with the values of both (empty: the same grid).

    A direction is compared per index axis, so two matrices that print alike are told apart by
    the axis that differs, the angle between them and the largest difference.

    Example::

        grid_differences(pred, ref)
        # ['spacing (0.8, 0.8, 1) vs (1.6, 1.6, 2) mm', 'direction of index axis x: (1, 0, 0) vs (-1, 0, 0), 180 degrees apart']
    """
    problems = []
    if tuple(pred.GetSize()) != tuple(ref.GetSize()):
        problems.append(f"size {'x'.join(map(str, pred.GetSize()))} vs {'x'.join(map(str, ref.GetSize()))} voxels")
    if not np.allclose(pred.GetSpacing(), ref.GetSpacing(), rtol=0, atol=_SPACING_TOL):
        problems.append(f"spacing {_numbers(pred.GetSpacing())} vs {_numbers(ref.GetSpacing())} mm")
    a, b = np.asarray(pred.GetOrigin()), np.asarray(ref.GetOrigin())
    if not np.allclose(a, b, rtol=0, atol=_ORIGIN_TOL):
        problems.append(f"origin {_numbers(a)} vs {_numbers(b)} mm ({np.linalg.norm(a - b):.3g} mm apart)")
    da, db = _direction(pred), _direction(ref)
    for axis in range(3):
        u, v = da[:, axis], db[:, axis]
        if np.allclose(u, v, rtol=0, atol=_DIRECTION_TOL):
            continue
        angle = math.degrees(math.acos(float(np.clip(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)), -1, 1))))
        text = f"direction of index axis {_AXES[axis]}: {_numbers(u)} vs {_numbers(v)}, {angle:.3g} degrees apart"
        if _numbers(u) == _numbers(v):  # alike at 6 digits: say by how much they differ
            text += f" (largest difference {np.abs(u - v).max():.2g})"
        problems.append(text)
    return problems


def _index_map(pred: sitk.Image, ref: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """``A, b`` with reference continuous index ``= A @ prediction index + b``."""
    to_world_pred = _direction(pred) @ np.diag(pred.GetSpacing())
    to_world_ref = _direction(ref) @ np.diag(ref.GetSpacing())
    inverse = np.linalg.inv(to_world_ref)
    return inverse @ to_world_pred, inverse @ (np.asarray(pred.GetOrigin()) - np.asarray(ref.GetOrigin()))


def _lattice_relation(pred: sitk.Image, ref: sitk.Image) -> tuple[str, np.ndarray] | None:
    """How ``ref``'s voxels sit on ``pred``'s lattice: ``("same voxels", P)`` (another order of the
    same voxels), ``("inside", P)`` (a crop of the prediction's lattice), or ``None``. ``P`` is the
    signed permutation from prediction axes to reference axes."""
    matrix, offset = _index_map(pred, ref)
    permutation = np.round(matrix)
    signed_permutation = (
        np.all(np.isin(permutation, (-1.0, 0.0, 1.0)))
        and np.all(np.abs(permutation).sum(axis=0) == 1)
        and np.all(np.abs(permutation).sum(axis=1) == 1)
    )
    if not signed_permutation or np.abs(matrix - permutation).max() > 1e-3:
        return None
    size = np.asarray(pred.GetSize()) - 1
    corners = np.array([[i, j, k] for i in (0, size[0]) for j in (0, size[1]) for k in (0, size[2])], float)
    mapped = corners @ matrix.T + offset
    # An affine map is furthest from whole indices at a corner: whole corners, whole lattice.
    if np.abs(mapped - np.round(mapped)).max() > 0.01:
        return None
    low, high = np.round(mapped.min(axis=0)), np.round(mapped.max(axis=0))
    last = np.asarray(ref.GetSize()) - 1
    if np.all(low == 0) and np.all(high == last):
        return "same voxels", permutation
    if np.all(low <= 0) and np.all(high >= last):
        return "inside", permutation
    return None


def _orientation(image: sitk.Image) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def _axis_changes(permutation: np.ndarray) -> str:
    """``"x = -z, y = x, z = y"``: which reference index axis each prediction index axis is."""
    parts = []
    for axis in range(3):
        target = int(np.flatnonzero(permutation[:, axis])[0])
        parts.append(f"{_AXES[axis]} = {'-' if permutation[target, axis] < 0 else ''}{_AXES[target]}")
    return ", ".join(parts)


def _on_grid(ref: sitk.Image, pred: sitk.Image) -> sitk.Image:
    return sitk.Resample(ref, pred, sitk.Transform(), sitk.sitkNearestNeighbor, 0, ref.GetPixelID())


def align_reference(
    pred: sitk.Image,
    ref: sitk.Image,
    resample: bool = False,
    pred_path: str = "prediction",
    ref_path: str = "reference",
) -> tuple[sitk.Image, str | None]:
    """The reference on the prediction's grid, and a note saying how it got there (``None``: it was).

    - same grid: as is;
    - the same voxels in another orientation, or a crop on the same voxel lattice: moved onto the
      prediction's grid voxel for voxel (nearest neighbour at whole indices, exact);
    - another grid: resampled by nearest neighbour when ``resample``, else refused.

    Raises:
        SegVizInputError: the grids differ and ``resample`` is false (the message says what differs).
    """
    problems = grid_differences(pred, ref)
    if not problems:
        return ref, None
    relation = _lattice_relation(pred, ref)
    if relation is not None:
        kind, permutation = relation
        if kind == "same voxels":
            note = (
                f"the reference stores the same voxels in another orientation ({_orientation(ref)} vs the "
                f"prediction's {_orientation(pred)}; prediction index axes as reference axes: "
                f"{_axis_changes(permutation)}): compared voxel for voxel on the prediction's grid, exact"
            )
        else:
            note = (
                f"the reference covers {'x'.join(map(str, ref.GetSize()))} voxels of the prediction's "
                f"{'x'.join(map(str, pred.GetSize()))} on the same voxel lattice (cropped): compared on the "
                "prediction's grid, voxels outside the reference count as background"
            )
        return _on_grid(ref, pred), note
    if not resample:
        raise SegVizInputError(
            pred_path,
            f"grid differs from {ref_path}: {'; '.join(problems)}. The two do not cover the same voxels; "
            "--resample-ref resamples the reference onto the prediction's grid (nearest neighbour)",
        )
    note = f"reference resampled onto the prediction's grid (nearest neighbour); it differed in {'; '.join(problems)}"
    return _on_grid(ref, pred), note


# --- scores ---------------------------------------------------------------------------------


def _present_values(array: np.ndarray) -> set[int]:
    if array.dtype.kind in "ui" and array.size and array.min() >= 0 and array.max() < 1 << 16:
        return {int(v) for v in np.flatnonzero(np.bincount(array.ravel()))}  # linear time, unlike np.unique
    return {int(v) for v in np.unique(array)}


def _values_text(values) -> str:
    values = sorted(values)
    return ", ".join(map(str, values[:12])) + (f" ... ({len(values)} values)" if len(values) > 12 else "")


def score_label_maps(
    pred: sitk.Image,
    ref: sitk.Image,
    ref_map: Mapping[int, str] | None = None,
    organs: Sequence[str] | None = None,
    hd95: bool = True,
    pred_map: Mapping[int, str] | None = None,
    pred_path: str = "prediction",
) -> dict[str, OrganScore]:
    """Dice, HD95 (mm) and volumes per organ of two label maps on the same grid.

    Args:
        pred: the prediction (SegViz values unless ``pred_map``).
        ref: the reference, on ``pred``'s grid.
        ref_map: reference value -> organ (default SegViz values); several values may name one organ.
        organs: organs to score (default: the organs ``ref_map`` names, in schema order).
        hd95: also compute the 95th-percentile Hausdorff distance.
        pred_map: prediction value -> organ (another tool's prediction, whose other values are
            other structures and left out); ``None``: SegViz values, and any other value is an error.
        pred_path: names the prediction in errors.

    Raises:
        SegVizInputError: a prediction in SegViz values (no ``pred_map``) holds another value: a
            SegViz prediction never does, so it is the wrong file or another tool's labels.
    """
    # isort: off
    from . import lean_monai  # noqa: F401  (before MONAI)

    # isort: on
    from monai.metrics import compute_dice, compute_hausdorff_distance

    ref_map = dict(SEGVIZ_VALUES if ref_map is None else ref_map)
    strict = pred_map is None
    pred_map = dict(SEGVIZ_VALUES if pred_map is None else pred_map)
    if organs is None:
        organs = [name for name in ORGAN_NAMES if name in ref_map.values()]
    pred_array = sitk.GetArrayViewFromImage(pred)
    ref_array = sitk.GetArrayViewFromImage(ref)
    unknown = _present_values(pred_array) - {0} - set(pred_map) if strict else set()
    if unknown:
        raise SegVizInputError(
            pred_path,
            f"label values {_values_text(unknown)} are not SegViz organs (1 liver, 2 spleen, 3 pancreas, 4 kidney); "
            "a prediction with other values needs --pred-map",
        )
    spacing = tuple(reversed(pred.GetSpacing()))  # arrays are z, y, x
    voxel_ml = float(np.prod(pred.GetSpacing())) / 1000.0
    scores: dict[str, OrganScore] = {}
    for name in organs:
        organ_by_name(name)
        ref_mask = np.isin(ref_array, [v for v, o in ref_map.items() if o == name])
        pred_mask = np.isin(pred_array, [v for v, o in pred_map.items() if o == name])
        pred_ml, ref_ml = float(pred_mask.sum()) * voxel_ml, float(ref_mask.sum()) * voxel_ml
        score: OrganScore = {
            "dice": None,
            "hd95_mm": None,
            "pred_voxels": int(pred_mask.sum()),
            "ref_voxels": int(ref_mask.sum()),
            "pred_ml": pred_ml,
            "ref_ml": ref_ml,
            "volume_diff_ml": pred_ml - ref_ml,
            "volume_diff_percent": 100.0 * (pred_ml - ref_ml) / ref_ml if ref_ml else None,
        }
        if not ref_mask.any():
            score["status"] = "absent in reference"
        else:
            import torch

            p = torch.from_numpy(np.ascontiguousarray(pred_mask))[None, None]
            r = torch.from_numpy(np.ascontiguousarray(ref_mask))[None, None]
            score["dice"] = float(compute_dice(p, r, include_background=True)[0, 0])
            if hd95 and pred_mask.any():
                with warnings.catch_warnings():  # MONAI 1.5+ deprecation notice inside its own call
                    warnings.simplefilter("ignore", FutureWarning)
                    score["hd95_mm"] = float(
                        compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing)[0, 0]
                    )
            score["status"] = "scored" if pred_mask.any() else "missed (not predicted)"
        scores[name] = score
    return scores


def evaluate_label_maps(
    pred: sitk.Image,
    ref: sitk.Image,
    ref_map: Mapping[int, str] | None = None,
    organs: Sequence[str] | None = None,
    hd95: bool = True,
    pred_path: str = "prediction",
    ref_path: str = "reference",
    pred_map: Mapping[int, str] | None = None,
    resample_ref: bool = False,
) -> dict[str, OrganScore]:
    """Scores per organ of a prediction against a reference (see :func:`score_label_maps`),
    after :func:`align_reference` put the reference on the prediction's grid.

    An organ that ``ref_map`` names but the reference does not contain is reported with
    ``status: "absent in reference"`` and no Dice.

    Raises:
        SegVizInputError: the grids differ (without ``resample_ref``) or the prediction holds
            values that are not organs.
    """
    aligned, _ = align_reference(pred, ref, resample_ref, pred_path, ref_path)
    return score_label_maps(pred, aligned, ref_map, organs, hd95, pred_map, pred_path)


@dataclass
class CaseEvaluation:
    """One prediction scored against its reference.

    Args:
        case: the case name.
        pred_path: the prediction file.
        ref_path: the reference file.
        organs: scores per organ.
        notes: how the reference was brought onto the prediction's grid, if it had to be.
    """

    case: str
    pred_path: str
    ref_path: str
    organs: dict[str, OrganScore]
    notes: list[str] = field(default_factory=list)


def evaluate_case(
    pred_path: str | Path,
    ref_path: str | Path,
    ref_map: Mapping[int, str] | None = None,
    pred_map: Mapping[int, str] | None = None,
    hd95: bool = True,
    resample_ref: bool = False,
    case: str | None = None,
) -> CaseEvaluation:
    """Read a prediction and a reference file and score them (see :func:`evaluate_label_maps`).

    Raises:
        SegVizInputError: an unreadable file, grids that differ (without ``resample_ref``), or
            prediction values that are not organs.
    """
    from .io import read_label_map, strip_suffix

    pred = read_label_map(pred_path)
    ref = read_label_map(ref_path)
    aligned, note = align_reference(pred, ref, resample_ref, str(pred_path), str(ref_path))
    scores = score_label_maps(pred, aligned, ref_map, None, hd95, pred_map, str(pred_path))
    notes = [note] if note else []
    if pred_map is not None:
        others = _present_values(sitk.GetArrayViewFromImage(pred)) - {0} - set(pred_map)
        if others:
            notes.append(f"{len(others)} other label values of the prediction are not in --pred-map and are left out")
    if resample_ref and note and note.startswith("reference resampled"):
        # Nearest-neighbour resampling gains or loses voxels at every boundary: say how much.
        voxel_ml = float(np.prod(ref.GetSpacing())) / 1000.0
        ref_array = sitk.GetArrayViewFromImage(ref)
        changes = []
        for organ, score in scores.items():
            values = [v for v, o in (ref_map or SEGVIZ_VALUES).items() if o == organ]
            before = float(np.isin(ref_array, values).sum()) * voxel_ml
            if before:
                changes.append(f"{organ} {before:.1f} -> {score['ref_ml']:.1f} mL")
        if changes:
            notes.append("reference volumes before -> after resampling: " + ", ".join(changes))
    return CaseEvaluation(case or strip_suffix(pred_path), str(pred_path), str(ref_path), scores, notes)


def pair_cases(pred_dir: str | Path, ref_dir: str | Path) -> tuple[list[tuple[str, Path, Path]], list[str], list[str]]:
    """Pair the label maps of two folders by case name (file name without its suffix).

    Returns:
        ``(pairs, predictions without a reference, references without a prediction)``; pairs
        are ``(case, prediction, reference)`` sorted by case.

    Raises:
        SegVizInputError: a folder holds no label maps, or two files of one case.
    """
    from .io import LABEL_SUFFIXES, file_suffix, strip_suffix

    def cases(folder: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.is_file() or file_suffix(path) not in LABEL_SUFFIXES:
                continue
            name = strip_suffix(path)
            if name in found:
                raise SegVizInputError(folder, f"case {name!r} has two label maps: {found[name].name} and {path.name}")
            found[name] = path
        if not found:
            raise SegVizInputError(folder, f"holds no label maps ({', '.join(LABEL_SUFFIXES)})")
        return found

    preds, refs = cases(Path(pred_dir)), cases(Path(ref_dir))
    pairs = [(name, preds[name], refs[name]) for name in sorted(set(preds) & set(refs))]
    return pairs, sorted(set(preds) - set(refs)), sorted(set(refs) - set(preds))


# --- tables and figure ----------------------------------------------------------------------


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _mean(values) -> float | None:
    values = _finite(values)
    return float(np.mean(values)) if values else None


def summarize(cases: Sequence[CaseEvaluation]) -> dict[str, dict[str, Any]]:
    """Per organ over the cases whose reference contains it: ``n``, mean and standard deviation of
    Dice, mean HD95, mean (signed and absolute) volume difference in mL and %."""
    organs = [o for o in ORGAN_NAMES if any(o in c.organs for c in cases)]
    summary = {}
    for organ in organs:
        scored = [c.organs[organ] for c in cases if organ in c.organs and c.organs[organ]["dice"] is not None]
        dice = _finite(s["dice"] for s in scored)
        summary[organ] = {
            "n": len(scored),
            "dice_mean": _mean(dice),
            "dice_sd": float(np.std(dice, ddof=1)) if len(dice) > 1 else None,
            "hd95_mean_mm": _mean(s["hd95_mm"] for s in scored),
            "volume_diff_mean_ml": _mean(s["volume_diff_ml"] for s in scored),
            "abs_volume_diff_mean_ml": _mean(abs(s["volume_diff_ml"]) for s in scored),
            "volume_diff_mean_percent": _mean(s["volume_diff_percent"] for s in scored),
        }
    return summary


def table_rows(cases: Sequence[CaseEvaluation], summary: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the CSV table: one per case and organ, then a ``mean`` row per organ."""
    rows = [
        {"case": c.case, "organ": organ, **{k: s.get(k) for k in TABLE_COLUMNS[2:]}}
        for c in cases
        for organ, s in c.organs.items()
    ]
    for organ, s in summary.items():
        rows.append(
            {
                "case": "mean",
                "organ": organ,
                "dice": s["dice_mean"],
                "hd95_mm": s["hd95_mean_mm"],
                "pred_ml": _mean(c.organs[organ]["pred_ml"] for c in cases if organ in c.organs),
                "ref_ml": _mean(c.organs[organ]["ref_ml"] for c in cases if organ in c.organs),
                "volume_diff_ml": s["volume_diff_mean_ml"],
                "volume_diff_percent": s["volume_diff_mean_percent"],
                "status": f"{s['n']} cases",
            }
        )
    return rows


def plot_evaluation(cases: Sequence[CaseEvaluation], summary: Mapping[str, Mapping[str, Any]], path) -> None:
    """PNG of the per-case distribution: Dice, HD95 and volume difference per organ (one dot per
    case over a box plot), written to ``path`` (a file name or a binary stream)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    organs = list(summary)
    panels = [
        ("dice", "Dice", (0.0, 1.0)),
        ("hd95_mm", "HD95 (mm)", None),
        ("volume_diff_percent", "volume difference (%)", None),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    rng = np.random.default_rng(0)  # jitter only spreads the dots; a fixed seed keeps figures identical
    for ax, (key, label, limits) in zip(axes[0], panels):
        data = [
            _finite(c.organs[o][key] for c in cases if o in c.organs and c.organs[o]["dice"] is not None)
            for o in organs
        ]
        positions = range(1, len(organs) + 1)
        if any(data):
            ax.boxplot([d if d else [np.nan] for d in data], positions=list(positions), widths=0.5, showfliers=False)
        for x, organ, values in zip(positions, organs, data):
            ax.scatter(
                x + rng.uniform(-0.12, 0.12, len(values)),
                values,
                s=18,
                color=organ_by_name(organ).colour_float,
                edgecolor="black",
                linewidth=0.4,
                zorder=3,
            )
        ax.set_xticks(list(positions), [f"{o}\n(n={len(d)})" for o, d in zip(organs, data)])
        ax.set_ylabel(label)
        if limits:
            ax.set_ylim(*limits)
        if key == "volume_diff_percent":
            ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"SegViz evaluation: {len(cases)} case{'s' if len(cases) != 1 else ''}")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def check_report_paths(paths: Mapping[str, Path | None], force: bool) -> None:
    """Refuse, before any work, report files that exist (without ``force``), have the wrong
    suffix, or whose folder cannot be a folder.

    Raises:
        SegVizInputError: naming the file and the problem.
    """
    seen = set()
    for kind, path in paths.items():
        if path is None:
            continue
        path = Path(path)
        if path.suffix.lower() != REPORT_SUFFIXES[kind]:
            raise SegVizInputError(path, f"--{kind} needs a {REPORT_SUFFIXES[kind]} file name")
        if path.resolve() in seen:
            raise SegVizInputError(path, "is given for two reports")
        seen.add(path.resolve())
        if path.is_dir():
            raise SegVizInputError(path, "is a folder; give a file name")
        if path.exists() and not force:
            raise SegVizInputError(path, "already exists; use --force to overwrite")
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise SegVizInputError(path, f"cannot be written: {parent} is a file, not a folder")
                break


def write_evaluation(
    cases: Sequence[CaseEvaluation],
    unmatched: Mapping[str, Sequence[str]],
    json_path: Path | None = None,
    csv_path: Path | None = None,
    png_path: Path | None = None,
    sources: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the evaluation as JSON, CSV and PNG (each optional) and return the JSON document.

    Every file is rendered in memory first and then moved into place, so a failure leaves no
    partial report behind.
    """
    summary = summarize(cases)
    document = {
        **dict(sources or {}),
        "cases": {
            c.case: {"pred": c.pred_path, "ref": c.ref_path, "notes": c.notes, "organs": c.organs} for c in cases
        },
        "mean": summary,
        "unmatched": {k: list(v) for k, v in unmatched.items()},
    }
    if len(cases) == 1:
        document["organs"] = cases[0].organs  # the single-case layout of earlier SegViz versions
    contents: dict[Path, bytes] = {}
    if json_path is not None:
        contents[Path(json_path)] = json.dumps(document, indent=2).encode()
    if csv_path is not None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=TABLE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in table_rows(cases, summary):
            writer.writerow(
                {k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )
        contents[Path(csv_path)] = text.getvalue().encode()
    if png_path is not None:
        buffer = io.BytesIO()
        plot_evaluation(cases, summary, buffer)
        contents[Path(png_path)] = buffer.getvalue()
    temps = []
    try:
        for path, data in contents.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            temp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
            temps.append(temp)
            temp.write_bytes(data)
        for (path, _), temp in zip(contents.items(), temps):
            os.replace(temp, path)
    except OSError as error:
        raise SegVizInputError(None, f"could not write the evaluation report ({error})") from None
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
    return document
