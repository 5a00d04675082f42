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

__all__ = ["THRESHOLD_CANDIDATES", "ThresholdTally", "choose_from_tally", "choose_threshold", "site_threshold_tally"]

THRESHOLD_CANDIDATES: tuple[float, ...] = (0.5, 0.4, 0.3, 0.2, 0.1)
"""The thresholds offered, in tie-breaking order."""

ThresholdTally = dict[float, dict[str, tuple[float, int]]]
"""``{threshold: {organ: (sum of the cases' Dice, cases)}}``: what a site's validation cases say, in
a form sites' tallies add up in (a federated site sends only these scalars)."""


def site_threshold_tally(
    bundle: ModelBundle,
    site_dir: str | Path,
    val_fraction: float,
    device: torch.device,
    candidates: Sequence[float] = THRESHOLD_CANDIDATES,
    reporter: ProgressReporter | None = None,
) -> ThresholdTally:
    """Segment one site's held-out validation cases once each and score every candidate threshold.

    The site's cases are those training held out (:func:`~SegVizLogic.training.held_out_case_names`
    with ``val_fraction``); each is segmented with ``bundle`` as a hospital that never trained it would
    (the site's own BatchNorm left out, the bundle's default BatchNorm), Dice on the organs the site
    annotated. A case whose reference lacks an organ adds nothing for it.
    """
    from .experiments.selection import leave_site_out

    reporter = reporter or ProgressReporter("none")
    site = validate_site(site_dir, check_images=False)
    held_out = set(held_out_case_names([c.name for c in site.cases], val_fraction))
    view = leave_site_out(bundle, site.name)
    labels = {organ_by_name(o).label: o for o in site.organs}
    cases = [c for c in site.cases if c.name in held_out]
    tally: dict[float, dict[str, list]] = {float(t): {} for t in candidates}
    with reporter.task(f"threshold on {site.name}'s validation", total=len(cases)) as advance:
        for case in cases:
            image, reference = load_case(case, site)
            maps = segment_image_at_thresholds(view, image, device, candidates)  # one network pass
            for threshold in candidates:
                scores = evaluate_label_maps(maps[threshold], reference, labels, organs=site.organs, hd95=False)
                for organ in site.organs:
                    value = scores.get(organ, {}).get("dice")
                    if value is not None:
                        total = tally[float(threshold)].setdefault(organ, [0.0, 0])
                        total[0] += float(value)
                        total[1] += 1
            advance(1)
    return {t: {organ: (total[0], total[1]) for organ, total in organs.items()} for t, organs in tally.items()}


def choose_from_tally(
    tallies: Sequence[ThresholdTally], candidates: Sequence[float] = THRESHOLD_CANDIDATES
) -> tuple[float, dict[str, dict[str, float]]]:
    """THE rule: sites' tallies summed, mean Dice over cases per organ, then over organs; the highest
    mean wins, a tie goes to the earlier candidate.

    Returns:
        ``(chosen, {str(threshold): {organ: mean Dice, ..., "mean": mean over organs}})``.

    Raises:
        ValueError: no tally holds a case with an annotated organ.
    """
    table = {}
    for threshold in candidates:
        sums: dict[str, list] = {}
        for tally in tallies:
            for organ, (dice_sum, cases) in tally.get(float(threshold), {}).items():
                total = sums.setdefault(organ, [0.0, 0])
                total[0] += float(dice_sum)
                total[1] += int(cases)
        means = {organ: total[0] / total[1] for organ, total in sorted(sums.items()) if total[1] > 0}
        if not means:
            raise ValueError("no training site holds out a validation case with an annotated organ")
        table[f"{threshold:g}"] = {**means, "mean": float(np.mean(list(means.values())))}
    order = list(candidates)
    chosen = max(order, key=lambda t: (table[f"{t:g}"]["mean"], -order.index(t)))
    return float(chosen), table


def choose_threshold(
    bundle: ModelBundle,
    site_dirs: Sequence[str | Path],
    val_fraction: float,
    device: torch.device,
    candidates: Sequence[float] = THRESHOLD_CANDIDATES,
    reporter: ProgressReporter | None = None,
) -> tuple[float, dict[str, dict[str, float]]]:
    """The candidate threshold with the best validation Dice over ``site_dirs`` (all on this machine,
    as in an experiment), and every candidate's scores: :func:`site_threshold_tally` per site, then
    :func:`choose_from_tally`.

    Raises:
        ValueError: no site holds out a case that has an annotated organ.
    """
    tallies = [site_threshold_tally(bundle, d, val_fraction, device, candidates, reporter) for d in site_dirs]
    return choose_from_tally(tallies, candidates)
