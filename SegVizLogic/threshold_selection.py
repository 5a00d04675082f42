"""The organ probability threshold of a bundle, and its BatchNorm, chosen on the sites' validation cases.

A voxel is labelled with an organ where that organ's probability is the highest and above the
threshold. 0.5 is the textbook value, not a chosen one: on another scanner a model is less sure
of an organ than on its own (docs/METHOD.md section 5: the demo's cross-scanner validation gained
0.09 mean Dice from 0.5 to 0.2). So the threshold is chosen like every other test-time default
(docs/RESULTS.md's rule): on each training site's held-out validation cases, segmented as at a
hospital that never trained (the bundle with that site's BatchNorm left out), Dice on the organs
the site annotated, mean over cases per organ, then over organs; the highest wins, a tie goes to the
earlier candidate (0.5 first). A federation chooses the BatchNorm the same way, jointly with the
threshold: its bundle's default and each test-time adaptation (:func:`batchnorm_candidates`), one
network pass each. No external case is read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .bundle import ModelBundle
from .bundle_manifest import ADAPTATIONS
from .evaluation import evaluate_label_maps
from .inference import segment_image_at_settings
from .organs import organ_by_name
from .progress import ProgressReporter
from .site import Site, load_case, validate_site
from .training import held_out_case_names

__all__ = [
    "THRESHOLD_CANDIDATES",
    "SettingsTable",
    "SiteTally",
    "ThresholdTally",
    "batchnorm_candidates",
    "choose_from_tally",
    "choose_threshold",
    "describe_table",
    "site_threshold_tally",
]

THRESHOLD_CANDIDATES: tuple[float, ...] = (0.5, 0.4, 0.3, 0.2, 0.1)
"""The thresholds offered, in tie-breaking order."""

ThresholdTally = dict[float, dict[str, tuple[float, int]]]
"""``{threshold: {organ: (sum of the cases' Dice, cases)}}``: what a site's validation cases say at one
BatchNorm, in a form sites' tallies add up in (a federated site sends only these scalars)."""

SiteTally = dict[str, ThresholdTally]
"""``{batchnorm: ThresholdTally}``: a site's answer for every BatchNorm candidate."""

SettingsTable = dict[str, dict[str, dict[str, float]]]
"""``{batchnorm: {str(threshold): {organ: mean Dice, ..., "mean": mean over organs}}}``."""


def batchnorm_candidates(default: str) -> list[str]:
    """The BatchNorm choices offered with the thresholds: the bundle's default first (ties go to it),
    then each test-time adaptation (:data:`~SegVizLogic.bundle_manifest.ADAPTATIONS`), which every
    bundle offers and which reads nothing of any site."""
    return [default, *(choice for choice in ADAPTATIONS if choice != default)]


def site_threshold_tally(
    bundle: ModelBundle,
    site_dir: str | Path | Site,
    val_fraction: float,
    device: torch.device,
    candidates: Sequence[float] = THRESHOLD_CANDIDATES,
    reporter: ProgressReporter | None = None,
    batchnorms: Sequence[str] | None = None,
) -> SiteTally:
    """Segment one site's held-out validation cases once per BatchNorm candidate and score every
    candidate threshold.

    The site's cases are those training held out (:func:`~SegVizLogic.training.held_out_case_names`
    with ``val_fraction``); each is segmented with ``bundle`` as a hospital that never trained it would
    (the site's own BatchNorm left out), with each of ``batchnorms`` (default: the bundle's default
    BatchNorm alone), Dice on the organs the site annotated. A case whose reference lacks an organ adds
    nothing for it. ``site_dir`` may be a :class:`~SegVizLogic.site.Site` its caller has already validated.

    Raises:
        ValueError: a BatchNorm candidate the bundle does not offer.
    """
    from .experiments.selection import leave_site_out

    reporter = reporter or ProgressReporter("none")
    site = site_dir if isinstance(site_dir, Site) else validate_site(site_dir, check_images=False)
    held_out = set(held_out_case_names([c.name for c in site.cases], val_fraction))
    view = leave_site_out(bundle, site.name)
    batchnorms = [bundle.default_batchnorm] if batchnorms is None else list(batchnorms)
    unknown = [b for b in batchnorms if b not in view.batchnorm_choices()]
    if unknown:
        raise ValueError(f"BatchNorm {unknown} is not offered by this bundle ({', '.join(view.batchnorm_choices())})")
    labels = {organ_by_name(o).label: o for o in site.organs}
    cases = [c for c in site.cases if c.name in held_out]
    tally: dict[str, dict[float, dict[str, list]]] = {b: {float(t): {} for t in candidates} for b in batchnorms}
    with reporter.task(f"threshold on {site.name}'s validation", total=len(cases) * len(batchnorms)) as advance:
        for case in cases:
            image, reference = load_case(case, site)
            # Preprocessed once, one network pass per BatchNorm, labelled at every threshold.
            by_batchnorm = segment_image_at_settings(view, image, device, candidates, batchnorms)
            for batchnorm, maps in by_batchnorm.items():
                for threshold in candidates:
                    scores = evaluate_label_maps(maps[threshold], reference, labels, organs=site.organs, hd95=False)
                    for organ in site.organs:
                        value = scores.get(organ, {}).get("dice")
                        if value is not None:
                            total = tally[batchnorm][float(threshold)].setdefault(organ, [0.0, 0])
                            total[0] += float(value)
                            total[1] += 1
                advance(1)
    return {
        b: {t: {organ: (total[0], total[1]) for organ, total in organs.items()} for t, organs in by_t.items()}
        for b, by_t in tally.items()
    }


def choose_from_tally(
    tallies: Sequence[SiteTally],
    candidates: Sequence[float] = THRESHOLD_CANDIDATES,
    batchnorms: Sequence[str] | None = None,
) -> tuple[str, float, SettingsTable]:
    """THE rule: sites' tallies summed, mean Dice over cases per organ, then over organs; the highest
    mean wins among every (BatchNorm, threshold) pair, a tie goes to the earlier BatchNorm, then the
    earlier threshold.

    Args:
        tallies: each site's :data:`SiteTally`.
        candidates: the thresholds, in tie-breaking order.
        batchnorms: the BatchNorm candidates, in tie-breaking order (default: those of the first tally).

    Returns:
        ``(batchnorm, threshold, table)``: the chosen pair and every pair's scores (:data:`SettingsTable`).

    Raises:
        ValueError: no tally holds a case with an annotated organ.
    """
    batchnorms = list(batchnorms if batchnorms is not None else (tallies[0] if tallies else []))
    table: SettingsTable = {}
    for batchnorm in batchnorms:
        table[batchnorm] = {}
        for threshold in candidates:
            sums: dict[str, list] = {}
            for tally in tallies:
                for organ, (dice_sum, cases) in tally.get(batchnorm, {}).get(float(threshold), {}).items():
                    total = sums.setdefault(organ, [0.0, 0])
                    total[0] += float(dice_sum)
                    total[1] += int(cases)
            means = {organ: total[0] / total[1] for organ, total in sorted(sums.items()) if total[1] > 0}
            if not means:
                raise ValueError("no training site holds out a validation case with an annotated organ")
            table[batchnorm][f"{threshold:g}"] = {**means, "mean": float(np.mean(list(means.values())))}
    if not table:
        raise ValueError("no training site holds out a validation case with an annotated organ")
    order = [(b, float(t)) for b in batchnorms for t in candidates]
    chosen = max(order, key=lambda pair: (table[pair[0]][f"{pair[1]:g}"]["mean"], -order.index(pair)))
    return chosen[0], chosen[1], table


def describe_table(table: SettingsTable) -> str:
    """Every pair's mean Dice in one line: ``"adapt: 0.5: 0.755, 0.4: 0.766; adapt-organs: ..."``."""
    return "; ".join(
        f"{batchnorm}: " + ", ".join(f"{t}: {row['mean']:.3f}" for t, row in rows.items())
        for batchnorm, rows in table.items()
    )


def choose_threshold(
    bundle: ModelBundle,
    site_dirs: Sequence[str | Path],
    val_fraction: float,
    device: torch.device,
    candidates: Sequence[float] = THRESHOLD_CANDIDATES,
    reporter: ProgressReporter | None = None,
    batchnorms: Sequence[str] | None = None,
) -> tuple[str, float, SettingsTable]:
    """The (BatchNorm, threshold) pair with the best validation Dice over ``site_dirs`` (all on this
    machine, as in an experiment), and every pair's scores: :func:`site_threshold_tally` per site,
    then :func:`choose_from_tally`. ``batchnorms`` default to the bundle's default BatchNorm alone.

    Raises:
        ValueError: no site holds out a case that has an annotated organ.
    """
    tallies = [
        site_threshold_tally(bundle, d, val_fraction, device, candidates, reporter, batchnorms) for d in site_dirs
    ]
    return choose_from_tally(tallies, candidates, batchnorms)
