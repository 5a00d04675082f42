"""The external set: sealed until the arms' options are frozen, then scored once per arm.

:class:`SealedExternalSet` holds only the external folder's path. :meth:`SealedExternalSet.open`
reads the freeze record (results.json with ``"stage": "frozen"`` and a choice for every arm) and
only then lists and reads the folder; everything that scores the external set takes the opened
:class:`~SegVizLogic.site.Site`, so no code path reaches an external case before the freeze.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..organs import organ_by_name
from ..progress import ProgressReporter
from ..site import Site, load_case, validate_site
from .arms import TrainedArm
from .selection import BundleCache, Option, score_bundle_on_case

__all__ = ["ExternalScores", "SealedExternalSet", "score_external"]


class SealedExternalSet:
    """The external set's folder, not to be read before the test-time options are frozen.

    Args:
        path: the fully-labelled external site folder (nothing in it is touched here).
    """

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)

    @property
    def location(self) -> str:
        """The folder's path, for provenance (never opened through this)."""
        return str(self._path)

    def open(self, freeze_record: str | Path, arms: Sequence[str]) -> Site:
        """Validate and return the external site, once ``freeze_record`` freezes a choice for every arm.

        Args:
            freeze_record: results.json written by the selection phase.
            arms: arms that will be scored (each must have a frozen choice in every point).

        Raises:
            RuntimeError: the record is missing, not frozen, or lacks an arm's choice (a bug in the runner:
                scoring the external set then would be choosing on it).
        """
        path = Path(freeze_record)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise RuntimeError(f"{path}: no freeze record ({error}); the external set stays sealed") from None
        if record.get("stage") not in ("frozen", "complete") or not record.get("frozen_at"):
            raise RuntimeError(f"{path}: the test-time options are not frozen; the external set stays sealed")
        for point, chosen in record.get("selection", {}).items():
            missing = [a for a in arms if a not in chosen]
            if missing:
                raise RuntimeError(f"{path}: no frozen choice for {missing} at {point}; the external set stays sealed")
        if not record.get("selection"):
            raise RuntimeError(f"{path}: the freeze record holds no choice; the external set stays sealed")
        return validate_site(self._path)


@dataclass
class ExternalScores:
    """Per-case external scores of every arm and seed, and one predicted case per arm (figure).

    Args:
        records: ``{"point", "arm", "seed", "case", "organ", "dice", "hd95_mm", "status"}`` per case and
            organ; ``arm`` is the table row (``local`` is each organ from its own site's model;
            ``local:<site>`` rows are the single models).
        overlays: ``{point: {arm: (case, label map)}}`` of the first external case, first seed.
        seconds: scoring time per point and arm.
    """

    records: list[dict] = field(default_factory=list)
    overlays: dict[str, dict[str, tuple[str, sitk.Image]]] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)


def _row(point: str, arm: str, seed: int, case: str, organ: str, score: Mapping) -> dict:
    return {
        "point": point,
        "arm": arm,
        "seed": seed,
        "case": case,
        "organ": organ,
        "dice": score["dice"],
        "hd95_mm": score.get("hd95_mm"),
        "status": score.get("status"),
    }


def score_external(
    site: Site,
    trained: Mapping[str, Sequence[TrainedArm]],
    chosen: Mapping[str, Mapping[str, Mapping]],
    organs: Sequence[str],
    device: torch.device,
    hd95: bool = True,
    reporter: ProgressReporter | None = None,
) -> ExternalScores:
    """Score every external case once per (point, arm, seed) with the frozen options.

    Args:
        site: the opened external site (:meth:`SealedExternalSet.open`).
        trained: ``{point: trained arms}``.
        chosen: ``{point: {arm: select_options entry}}`` (the frozen choices).
        organs: organs to score (those the external set and some training site both have).
        device: inference device.
        hd95: also compute HD95.
        reporter: progress.
    """
    reporter = reporter or ProgressReporter("none")
    out = ExternalScores()
    images: dict[str, tuple[sitk.Image, sitk.Image]] = {}
    cache = BundleCache()
    first_seed = {point: min(t.seed for t in arms) for point, arms in trained.items() if arms}
    total = sum(len(t.models) * len(site.cases) for arms in trained.values() for t in arms)
    with reporter.task(f"external set ({len(site.cases)} cases)", total=total) as advance:
        for point, arms in trained.items():
            for t in arms:
                start = time.perf_counter()
                option = Option.from_dict(chosen[point][t.arm]["option"])
                local_parts: dict[tuple[str, str], list[dict]] = {}
                composite: dict[str, np.ndarray] = {}
                for model, checkpoints in t.models.items():
                    bundle = cache.get(checkpoints[option.checkpoint])
                    scored = [o for o in organs if o in bundle.trained_organs]
                    for case in site.cases:
                        if case.name not in images:
                            images[case.name] = load_case(case, site)
                        image, reference = images[case.name]
                        scores, labels = score_bundle_on_case(
                            bundle, image, reference, scored, option, device, hd95=hd95, case_name=case.name
                        )
                        rows = [
                            _row(point, model, t.seed, case.name, o, s)
                            for o, s in scores.items()
                            if s["dice"] is not None
                        ]
                        out.records += rows
                        if t.arm == "local":
                            for r in rows:
                                local_parts.setdefault((case.name, r["organ"]), []).append(r)
                        if t.seed == first_seed[point] and case.name == site.cases[0].name:
                            if t.arm == "local":
                                # The "local" overlay: each organ as its own site's model predicts it.
                                array = sitk.GetArrayFromImage(labels)
                                for organ in scored:
                                    composite[organ] = array == organ_by_name(organ).label
                                out.overlays.setdefault(point, {})["local"] = (case.name, labels)
                            else:
                                out.overlays.setdefault(point, {})[t.arm] = (case.name, labels)
                        advance(1)
                if t.arm == "local":
                    out.records += _local_composite(point, t.seed, local_parts)
                    if composite and "local" in out.overlays.get(point, {}):
                        case_name, reference_image = out.overlays[point]["local"]
                        array = np.zeros(sitk.GetArrayViewFromImage(reference_image).shape, np.uint8)
                        for organ, mask in composite.items():
                            array[mask & (array == 0)] = organ_by_name(organ).label
                        image = sitk.GetImageFromArray(array)
                        image.CopyInformation(reference_image)
                        out.overlays[point]["local"] = (case_name, image)
                seconds = out.seconds.setdefault(point, {})
                seconds[t.arm] = round(seconds.get(t.arm, 0.0) + time.perf_counter() - start, 1)
                cache.clear()
    return out


def _local_composite(point: str, seed: int, parts: Mapping[tuple[str, str], list[dict]]) -> list[dict]:
    """The ``local`` row: each (case, organ) from the local model(s) of the site(s) that annotated the organ
    (the mean when several sites did)."""
    rows = []
    for (case, organ), scored in sorted(parts.items()):
        hd = [r["hd95_mm"] for r in scored if r["hd95_mm"] is not None]
        rows.append(
            {
                "point": point,
                "arm": "local",
                "seed": seed,
                "case": case,
                "organ": organ,
                "dice": float(np.mean([r["dice"] for r in scored])),
                "hd95_mm": float(np.mean(hd)) if hd else None,
                "status": "mean of " + ", ".join(r["arm"] for r in scored) if len(scored) > 1 else scored[0]["status"],
            }
        )
    return rows
