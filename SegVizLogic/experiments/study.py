"""The phases every experiment runs in this order, whatever its shape (one comparison, a learning curve):

1. **train** every arm of every point for every seed (:func:`~SegVizLogic.experiments.arms.train_arms`);
2. **select** each arm's test-time options on the sites' validation cases
   (:mod:`~SegVizLogic.experiments.selection`);
3. **freeze** the choices into results.json (``"stage": "frozen"``);
4. **open** the external set (:class:`~SegVizLogic.experiments.external.SealedExternalSet` refuses
   before step 3) and score it once per arm with the frozen options;
5. **analyse**: seed-averaged per-case Dice, Wilcoxon + Holm + bootstrap effect sizes against FedBN.

A *point* is one comparison: a set of training sites (a learning curve has one point per
training-set size) with its own budget; all points share the seeds, the arms and the external set.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..organs import ORGAN_NAMES
from ..progress import ProgressReporter
from ..site import load_site
from .arms import TrainedArm, train_arms
from .config import ARMS, ExperimentConfig
from .external import ExternalScores, SealedExternalSet, score_external
from .report import REFERENCE_ARM, machine_info, utc_now, write_json
from .selection import SELECTION_RULE, score_on_validation, select_options, validation_scores
from .statistics import compare_to_reference, seed_average, seed_spread, smallest_holm_p, summarize

__all__ = ["Point", "StudyState", "analyse_point", "run_study", "table_rows"]


@dataclass
class Point:
    """One comparison of a study.

    Args:
        name: ``"main"`` for a single comparison; ``"1"``, ``"8/4/2/1"``... on a learning curve.
        config: the experiment as this point runs it (its own validation split, if any).
        site_dirs: training site folders.
        cases: training cases per site name.
        local_epochs: local epochs per round at this point (a learning curve may scale them).
    """

    name: str
    config: ExperimentConfig
    site_dirs: list[str]
    cases: dict[str, int]
    local_epochs: int

    @property
    def folder(self) -> str:
        """Folder-safe name (``8/4/2/1`` -> ``8-4-2-1``)."""
        return self.name.replace("/", "-")


@dataclass
class StudyState:
    """Everything the phases produced, per point."""

    trained: dict[str, list[TrainedArm]] = field(default_factory=dict)
    validation: dict[str, dict] = field(default_factory=dict)
    selection: dict[str, dict[str, dict]] = field(default_factory=dict)
    external: ExternalScores | None = None
    organs: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def table_rows(arms_present: Sequence[str]) -> list[str]:
    """Table order: the main arms as :data:`~SegVizLogic.experiments.config.ARMS` lists them."""
    return [a for a in ARMS if a in arms_present]


def analyse_point(records: Sequence[Mapping], organs: Sequence[str]) -> dict:
    """Statistics of one point's external records (every seed).

    Returns:
        ``{"rows", "detail_rows", "seed_averaged", "summary", "seed_spread", "tests", "n_cases",
        "min_holm_p"}``; ``tests`` is FedBN against every other row (seed-averaged, paired by case,
        Holm over the organs), empty without a FedBN row.
    """
    present = {r["arm"] for r in records}
    rows = table_rows(present)
    detail_rows = sorted(present - set(rows))
    averaged = seed_average(records, metrics=("dice", "hd95_mm"))
    n_cases = len({r["case"] for r in averaged})
    return {
        "rows": rows,
        "detail_rows": detail_rows,
        "seed_averaged": averaged,
        "summary": summarize(averaged, rows + detail_rows, organs),
        "seed_spread": {arm: {o: seed_spread(records, arm, o) for o in organs} for arm in rows},
        "tests": compare_to_reference(averaged, REFERENCE_ARM, rows, organs) if REFERENCE_ARM in rows else {},
        "n_cases": n_cases,
        "min_holm_p": smallest_holm_p(n_cases, len(organs)) if n_cases else None,
    }


def run_study(
    points: Sequence[Point],
    config: ExperimentConfig,
    external: str,
    out: Path,
    header: Mapping,
    reporter: ProgressReporter,
) -> tuple[dict, StudyState]:
    """Run the five phases over ``points``; results.json is written at the freeze and at the end.

    Args:
        points: the comparisons to run.
        config: the experiment (seeds, arms, device, hd95 are taken from it).
        external: the external site folder (sealed until the freeze).
        out: output folder (``results.json``, ``<point>/seed-<s>/<arm>/`` bundles).
        header: entries every results.json starts with (name, kind, config, commands...).
        reporter: progress.

    Returns:
        ``(results, state)``: the final results.json content (without figures) and the phases' outputs.
    """
    from ..inference import resolve_device

    device = resolve_device(config.device)
    state = StudyState()
    results_path = out / "results.json"
    sealed = SealedExternalSet(external)

    t0 = time.perf_counter()
    for point in points:
        reporter.emit("stage", stage="train", message=f"point {point.name}: training {', '.join(config.arms)}")
        state.trained[point.name] = train_arms(
            point.config, point.site_dirs, out / point.folder, reporter, local_epochs=point.local_epochs
        )
    state.timings["train_s"] = round(time.perf_counter() - t0, 1)

    t1 = time.perf_counter()
    for point in points:
        reporter.emit("stage", stage="select", message=f"point {point.name}: scoring candidates on validation")
        records, candidates = score_on_validation(
            state.trained[point.name], point.site_dirs, point.config, device, reporter
        )
        scores = validation_scores(records, candidates, config.seeds)
        state.validation[point.name] = {"scores": scores, "records": records}
        state.selection[point.name] = select_options(scores)
    state.timings["select_s"] = round(time.perf_counter() - t1, 1)

    frozen = {
        **header,
        "stage": "frozen",
        "frozen_at": utc_now(),
        "machine": machine_info(),
        "selection_rule": SELECTION_RULE,
        "selection": state.selection,
        "validation": state.validation,
        "points": {p.name: _point_info(p, state.trained[p.name]) for p in points},
    }
    write_json(results_path, frozen)
    reporter.emit("stage", stage="freeze", message=f"test-time options frozen in {results_path}")

    t2 = time.perf_counter()
    external_site = sealed.open(results_path, config.arms)
    training_organs = {o for p in points for s in p.site_dirs for o in load_site(s).organs}
    state.organs = [o for o in ORGAN_NAMES if o in external_site.organs and o in training_organs]
    state.external = score_external(
        external_site,
        state.trained,
        state.selection,
        state.organs,
        device,
        hd95=config.hd95,
        reporter=reporter,
    )
    state.timings["external_s"] = round(time.perf_counter() - t2, 1)

    analysis = {}
    for point in points:
        records = [r for r in state.external.records if r["point"] == point.name]
        analysis[point.name] = analyse_point(records, state.organs)
    results = {
        **frozen,
        "stage": "complete",
        "external": {
            "name": external_site.name,
            "organs": list(external_site.organs),
            "cases": len(external_site.cases),
            "path": str(external_site.root),
        },
        "organs": state.organs,
        "reference_arm": REFERENCE_ARM,
        "records": state.external.records,
        "analysis": analysis,
        "seconds_external": state.external.seconds,
        "timings": state.timings,
    }
    return results, state


def _point_info(point: Point, trained: Sequence[TrainedArm]) -> dict:
    return {
        "cases": point.cases,
        "local_epochs": point.local_epochs,
        "rounds": point.config.federation.rounds,
        "val_fraction": point.config.training.val_fraction,
        "sites": [str(s) for s in point.site_dirs],
        "trained": [t.to_dict() for t in trained],
        "rounds_metrics": {f"{t.arm}/seed-{t.seed}": t.rounds for t in trained if t.rounds},
    }
