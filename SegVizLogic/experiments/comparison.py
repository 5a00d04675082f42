"""Run a whole experiment into a folder: the comparison (one point) or a learning curve, then its
statistics, figures and report."""

from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path

from ..errors import SegVizInputError
from ..federated.simulation import choose_engine
from ..progress import ProgressReporter
from ..site import load_case, load_site
from .arms import prepare_data
from .config import ExperimentConfig
from .report import (
    PAPER_DICE,
    macro_mean,
    plot_dice_by_arm,
    plot_overlays,
    plot_rounds,
    plot_selection,
    utc_now,
    write_json,
    write_report_md,
)
from .study import Point, run_study

__all__ = ["REPORT_FILE", "RESULTS_FILE", "prepare_output", "reproduce_commands", "run_comparison", "run_experiment"]

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
MAIN_POINT = "main"


def prepare_output(out_dir: str | Path, force: bool) -> Path:
    """An empty output folder (``force`` replaces a non-empty one).

    Raises:
        SegVizInputError: ``out_dir`` is a file, or not empty and ``force`` is false.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SegVizInputError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise SegVizInputError(out, "is not empty; use --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def reproduce_commands(config: ExperimentConfig, out: Path, command: list[str] | None) -> list[str]:
    """The command lines that reproduce this run (from the config file, and as invoked)."""
    commands = []
    if config.source:
        commands.append(
            f"segviz experiment --config {shlex.quote(config.source)} --out {shlex.quote(str(out))} --force"
        )
    commands.append(" ".join(shlex.quote(a) for a in (command or ["segviz", "experiment"])))
    return list(dict.fromkeys(commands))


def _check_sites(site_dirs: list[str]) -> list:
    sites = [load_site(s) for s in site_dirs]
    if len({s.name for s in sites}) != len(sites):
        raise SegVizInputError(None, "two training sites have the same name in site.json; site names must be unique")
    return sites


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | Path,
    force: bool = False,
    reporter: ProgressReporter | None = None,
    command: list[str] | None = None,
) -> dict:
    """The comparison, or the learning curve when ``config`` has a ``[learning_curve]`` section."""
    if config.is_learning_curve:
        from .learning_curve import run_learning_curve

        return run_learning_curve(config, out_dir, force=force, reporter=reporter, command=command)
    return run_comparison(config, out_dir, force=force, reporter=reporter, command=command)


def run_comparison(
    config: ExperimentConfig,
    out_dir: str | Path,
    force: bool = False,
    reporter: ProgressReporter | None = None,
    command: list[str] | None = None,
) -> dict:
    """Run ``config`` into ``out_dir`` and return what ``results.json`` holds.

    ``out_dir`` receives ``results.json`` (first written when the test-time options are frozen, before
    the external set is opened), ``report.md``, the PNG figures, the phantom data (``data/``, when the
    config uses one) and every bundle (``main/seed-<s>/<arm>/``).

    Raises:
        SegVizInputError: ``out_dir`` is not empty and ``force`` is false, or a site folder is unusable.
    """
    reporter = reporter or ProgressReporter("none")
    out = prepare_output(out_dir, force)
    started, t0 = utc_now(), time.perf_counter()
    site_dirs, external = prepare_data(config, out, reporter)
    sites = _check_sites(site_dirs)
    point = Point(
        MAIN_POINT,
        config,
        site_dirs,
        {s.name: len(s.cases) for s in sites},
        config.federation.local_epochs,
    )
    header = {
        "kind": "comparison",
        "name": config.name,
        "started": started,
        "commands": reproduce_commands(config, out, command),
        "config": config.to_dict(),
        "device": config.device,
        "engine": choose_engine(config.engine),  # the federated arms' Flower engine (fails early without Ray)
        "seeds": list(config.seeds),
        "sites": [
            {"name": s.name, "organs": list(s.organs), "cases": len(s.cases), "path": str(s.root)} for s in sites
        ],
    }
    results, state = run_study([point], config, external, out, header, reporter)
    analysis = results["analysis"][MAIN_POINT]
    organs = results["organs"]

    reporter.emit("stage", stage="report", message="writing figures and report")
    figures: dict[str, str] = {}
    averaged = analysis["seed_averaged"]
    plot_dice_by_arm(out / "dice_by_arm.png", averaged, analysis["rows"], organs)
    figures["External Dice per case (mean over seeds), by arm"] = "dice_by_arm.png"
    plot_selection(out / "selection.png", results["validation"][MAIN_POINT]["scores"], results["selection"][MAIN_POINT])
    figures["Test-time options of every arm on the sites' validation cases (chosen: filled)"] = "selection.png"
    rounds = {
        arm: {str(t.seed): t.rounds for t in state.trained[MAIN_POINT] if t.arm == arm and t.rounds}
        for arm in ("fedavg", "fedbn")
    }
    rounds = {arm: v for arm, v in rounds.items() if v}
    if rounds:
        plot_rounds(out / "val_dice_rounds.png", rounds, organs)
        figures["Validation Dice per round reported by the sites (FedAvg, FedBN)"] = "val_dice_rounds.png"
    overlays = state.external.overlays.get(MAIN_POINT, {}) if state.external else {}
    if overlays:
        from ..site import validate_site

        external_site = validate_site(results["external"]["path"], check_images=False)
        case_name = min(c for c, _ in overlays.values())
        case = next(c for c in external_site.cases if c.name == case_name)
        image, reference = load_case(case, external_site)
        predictions = {a: overlays[a][1] for a in analysis["rows"] if a in overlays and overlays[a][0] == case_name}
        plot_overlays(out / "overlays.png", image, reference, predictions, case_name)
        figures[f"External case {case_name}: reference and each arm (first seed)"] = "overlays.png"

    results.update(
        finished=utc_now(),
        seconds=round(time.perf_counter() - t0, 1),
        figures=figures,
        paper_dice=PAPER_DICE,
    )
    write_json(out / RESULTS_FILE, results)
    write_report_md(out / REPORT_FILE, results, config, figures)
    reporter.emit(
        "done",
        outputs={
            "results": str(out / RESULTS_FILE),
            "report": str(out / REPORT_FILE),
            **{name: str(out / name) for name in figures.values()},
        },
        metrics={arm: macro_mean(analysis["summary"][arm]) for arm in analysis["rows"]},
        selection={arm: chosen["key"] for arm, chosen in results["selection"][MAIN_POINT].items()},
    )
    return results
