"""The organ probability threshold of a bundle, chosen on the sites' validation cases.

A voxel is labelled with an organ where that organ's probability is the highest and above the
threshold. 0.5 is the textbook value, not a chosen one: on another scanner a model is less sure
of an organ than on its own (docs/METHOD.md section 5: the demo's cross-scanner validation gained
0.09 mean Dice from 0.5 to 0.2). So the threshold is chosen like every other test-time default
(docs/RESULTS.md's rule): on each training site's held-out validation cases, segmented as at a
hospital that never trained (the bundle with that site's BatchNorm left out, its default
BatchNorm), Dice on the organs the site annotated, mean over cases per organ, then over organs;
the highest wins, a tie goes to the earlier candidate (0.5 first). No external case is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .bundle import ModelBundle
from .evaluation import evaluate_label_maps
from .inference import segment_image_at_thresholds
from .organs import organ_by_name
from .progress import ProgressReporter
from .site import load_case, validate_site
from .training import held_out_case_names

__all__ = ["THRESHOLD_CANDIDATES", "choose_threshold"]

THRESHOLD_CANDIDATES: tuple[float, ...] = (0.5, 0.4, 0.3, 0.2, 0.1)
"""The thresholds offered, in tie-breaking order."""


def choose_threshold(
    bundle: ModelBundle,
    site_dirs: Sequence[str | Path],
    val_fraction: float,
    device: torch.device,
    candidates: Sequence[float] = THRESHOLD_CANDIDATES,
    reporter: ProgressReporter | None = None,
) -> tuple[float, dict[str, dict[str, float]]]:
    """The candidate threshold with the best validation Dice, and every candidate's scores.

    Args:
        bundle: the trained bundle (federated: each site's own BatchNorm is left out for its cases).
        site_dirs: the training sites; each holds out the cases training held out
            (:func:`~SegVizLogic.training.held_out_case_names` with ``val_fraction``).
        val_fraction: the training's ``val_fraction``.
        device: where the network runs.
        candidates: thresholds to try, in tie-breaking order.
        reporter: progress.

    Returns:
        ``(chosen, {str(threshold): {organ: mean Dice, ..., "mean": mean over organs}})``.

    Raises:
        ValueError: no site holds out a case that has an annotated organ.
    """
    from .experiments.selection import leave_site_out

    reporter = reporter or ProgressReporter("none")
    dice: dict[float, dict[str, list[float]]] = {t: {} for t in candidates}
    for site_dir in site_dirs:
        site = validate_site(site_dir, check_images=False)
        held_out = set(held_out_case_names([c.name for c in site.cases], val_fraction))
        view = leave_site_out(bundle, site.name)
        labels = {organ_by_name(o).label: o for o in site.organs}
        cases = [c for c in site.cases if c.name in held_out]
        with reporter.task(f"threshold on {site.name}'s validation", total=len(cases) * len(candidates)) as advance:
            for case in cases:
                image, reference = load_case(case, site)
                maps = segment_image_at_thresholds(view, image, device, candidates)  # one network pass
                for threshold in candidates:
                    scores = evaluate_label_maps(maps[threshold], reference, labels, organs=site.organs, hd95=False)
                    for organ in site.organs:
                        value = scores.get(organ, {}).get("dice")
                        if value is not None:
                            dice[threshold].setdefault(organ, []).append(float(value))
                    advance(1)
    table = {}
    for threshold, per_organ in dice.items():
        if not per_organ:
            raise ValueError("no training site holds out a validation case with an annotated organ")
        means = {organ: float(np.mean(values)) for organ, values in per_organ.items()}
        table[f"{threshold:g}"] = {**means, "mean": float(np.mean(list(means.values())))}
    chosen = max(candidates, key=lambda t: (table[f"{t:g}"]["mean"], -candidates.index(t)))
    return float(chosen), table
