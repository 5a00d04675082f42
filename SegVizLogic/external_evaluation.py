"""Evaluating a model bundle on a fully-labelled external site (a scanner it never saw)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .bundle import ModelBundle
from .evaluation import evaluate_label_maps
from .inference import segment_image
from .organs import ORGAN_NAMES, organ_by_name
from .progress import ProgressReporter
from .site import load_case, validate_site

__all__ = ["ExternalResult", "dice_table_markdown", "evaluate_on_site"]


@dataclass
class ExternalResult:
    """Per-case scores of one model on one labelled site, and the per-organ summary."""

    per_case: dict[str, dict[str, dict]] = field(default_factory=dict)
    predictions: dict[str, sitk.Image] = field(default_factory=dict)

    def dice(self, organ: str) -> list[float]:
        """Dice of ``organ`` per case (cases where the reference has the organ)."""
        return [
            scores[organ]["dice"] for scores in self.per_case.values() if scores.get(organ, {}).get("dice") is not None
        ]

    def summary(self) -> dict[str, dict[str, float]]:
        """``{organ: {"mean": .., "std": .., "n": ..}}`` of Dice (and HD95 mean)."""
        organs = {o for scores in self.per_case.values() for o in scores}
        out = {}
        for organ in sorted(organs, key=ORGAN_NAMES.index):
            values = self.dice(organ)
            hd = [s[organ]["hd95_mm"] for s in self.per_case.values() if s.get(organ, {}).get("hd95_mm") is not None]
            if values:
                out[organ] = {
                    "mean": float(np.mean(values)),
                    "std": float(np.std(values)),
                    "n": len(values),
                    "hd95_mean_mm": float(np.mean(hd)) if hd else None,
                }
        return out


def evaluate_on_site(
    bundle: ModelBundle,
    site_dir: str | Path,
    device: torch.device,
    batchnorm: str | None = None,
    reporter: ProgressReporter | None = None,
    keep_predictions: bool = False,
    hd95: bool = True,
) -> ExternalResult:
    """Segment every case of a labelled site with ``bundle`` and score it per organ.

    Only organs the site declares are scored; label maps are compared on the input grid.
    """
    reporter = reporter or ProgressReporter("none")
    # Structure only: every image is read (and checked) by load_case below anyway, and the
    # experiments call this many times per external set.
    site = validate_site(site_dir, check_images=False)
    ref_map = {organ_by_name(o).label: o for o in site.organs}
    result = ExternalResult()
    with reporter.task(f"evaluate on {site.name}", total=len(site.cases)) as advance:
        for case in site.cases:
            image, reference = load_case(case, site)
            prediction = segment_image(bundle, image, device, batchnorm=batchnorm).labels
            result.per_case[case.name] = evaluate_label_maps(
                prediction,
                reference,
                ref_map,
                organs=site.organs,
                hd95=hd95,
                pred_path=f"prediction of {case.name}",
                ref_path=str(case.label_path),
            )
            if keep_predictions:
                result.predictions[case.name] = prediction
            advance(1)
    return result


def dice_table_markdown(
    rows: Mapping[str, Mapping[str, Mapping[str, float]]], organs: tuple[str, ...] = ORGAN_NAMES
) -> str:
    """Markdown table: one row per model (``{name: summary}``), ``mean ± std`` Dice per organ."""
    lines = ["| model | " + " | ".join(organs) + " |", "|---|" + "---|" * len(organs)]
    for name, summary in rows.items():
        cells = [f"{summary[o]['mean']:.3f} ± {summary[o]['std']:.3f}" if o in summary else "–" for o in organs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
