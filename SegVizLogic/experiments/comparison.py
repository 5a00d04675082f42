"""Run a whole comparison: every arm for every seed, then statistics, figures and the report."""

from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path

from ..errors import SegVizInputError
from ..organs import ORGAN_NAMES
from ..progress import ProgressReporter
from ..site import load_case, load_site, validate_site
from .arms import ArmOutcome, prepare_data, run_seed
from .config import ExperimentConfig
from .report import (
    PAPER_DICE,
    REFERENCE_ARM,
    machine_info,
    macro_mean,
    plot_batchnorm,
    plot_dice_by_arm,
    plot_overlays,
    plot_rounds,
    table_rows,
    utc_now,
    write_json,
    write_report_md,
)
from .statistics import compare_to_reference, summarize

__all__ = ["REPORT_FILE", "RESULTS_FILE", "run_comparison"]

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"


def _batchnorm_measurement(summary: dict, organs: list[str], default: str | None) -> dict:
    choices = {}
    for arm, row in summary.items():
        if arm.startswith("fedbn[bn="):
            choice = arm[len("fedbn[bn=") : -1]
            choices[choice] = {
                "organs": {o: row[o]["dice"]["mean"] for o in organs if o in row},
                "mean": macro_mean(row),
            }
    scored = {c: v["mean"] for c, v in choices.items() if v["mean"] is not None}
    best = max(scored.values()) if scored else None
    # Ties go to the bundle's default, then to the order measured.
    winners = [c for c, m in scored.items() if m == best]
    recommended = default if default in winners else (winners[0] if winners else None)
    return {
        "choices": choices,
        "recommended": recommended,
        "bundle_default": default,
        "criterion": "highest mean over organs of the mean external Dice, pooled over seeds",
    }


def run_comparison(
    config: ExperimentConfig,
    out_dir: str | Path,
    force: bool = False,
    reporter: ProgressReporter | None = None,
    command: list[str] | None = None,
) -> dict:
    """Run ``config`` into ``out_dir`` and return what ``results.json`` holds.

    ``out_dir`` receives ``results.json``, ``report.md``, the PNG figures, the phantom data
    (``data/``, when the config uses one) and every bundle (``seed-<s>/<arm>/``).

    Raises:
        SegVizInputError: ``out_dir`` is not empty and ``force`` is false, or a site folder is unusable.
    """
    reporter = reporter or ProgressReporter("none")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SegVizInputError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise SegVizInputError(out, "is not empty; use --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started, t0 = utc_now(), time.perf_counter()

    site_dirs, external = prepare_data(config, out, reporter)
    sites = [load_site(s) for s in site_dirs]
    if len({s.name for s in sites}) != len(sites):
        raise SegVizInputError(None, "two training sites have the same name in site.json; site names must be unique")
    external_site = validate_site(external)
    organs = [o for o in ORGAN_NAMES if o in external_site.organs and any(o in s.organs for s in sites)]

    outcomes: list[ArmOutcome] = []
    for seed in config.seeds:
        outcomes += run_seed(config, site_dirs, external, out, seed, reporter)

    records = [r for o in outcomes for r in o.records]
    present = {r["arm"] for r in records}
    rows = table_rows(present)
    detail_rows = sorted(present - set(rows))  # local:<site>
    summary = summarize(records, rows + detail_rows, organs)
    tests = compare_to_reference(records, REFERENCE_ARM, rows, organs) if REFERENCE_ARM in present else {}
    default_bn = next((o.default_batchnorm for o in outcomes if o.arm == "fedbn"), None)
    batchnorm = _batchnorm_measurement(summary, organs, default_bn)

    reporter.emit("stage", stage="report", message="writing figures and report")
    figures: dict[str, str] = {}
    plot_dice_by_arm(out / "dice_by_arm.png", records, rows, organs)
    figures["External Dice per case, by arm"] = "dice_by_arm.png"
    rounds = {
        arm: {str(o.seed): o.rounds for o in outcomes if o.arm == arm and o.rounds} for arm in ("fedavg", "fedbn")
    }
    rounds = {arm: v for arm, v in rounds.items() if v}
    if rounds:
        plot_rounds(out / "val_dice_rounds.png", rounds, organs)
        figures["Validation Dice per round (FedAvg, FedBN)"] = "val_dice_rounds.png"
    if batchnorm["choices"]:
        plot_batchnorm(out / "batchnorm_choices.png", batchnorm["choices"], organs, batchnorm["recommended"])
        figures["FedBN: BatchNorm choices at the external site"] = "batchnorm_choices.png"
    first_seed = config.seeds[0]
    overlays = {arm: pair for o in outcomes if o.seed == first_seed for arm, pair in o.overlay.items()}
    if overlays:
        case_name = min({c for c, _ in overlays.values()})
        case = next(c for c in external_site.cases if c.name == case_name)
        image, reference = load_case(case, external_site)
        predictions = {arm: overlays[arm][1] for arm in rows if arm in overlays and overlays[arm][0] == case_name}
        plot_overlays(out / "overlays.png", image, reference, predictions, case_name)
        figures[f"External case {case_name}: reference and each arm"] = "overlays.png"

    argv = command or ["segviz", "experiment"]
    commands = []
    if config.source:
        commands.append(
            f"segviz experiment --config {shlex.quote(config.source)} --out {shlex.quote(str(out))} --force"
        )
    commands.append(" ".join(shlex.quote(a) for a in argv))
    results = {
        "name": config.name,
        "started": started,
        "finished": utc_now(),
        "seconds": round(time.perf_counter() - t0, 1),
        "commands": list(dict.fromkeys(commands)),
        "config": config.to_dict(),
        "machine": machine_info(),
        "device": config.device,
        "seeds": list(config.seeds),
        "sites": [
            {"name": s.name, "organs": list(s.organs), "cases": len(s.cases), "path": str(s.root)} for s in sites
        ],
        "external": {
            "name": external_site.name,
            "organs": list(external_site.organs),
            "cases": len(external_site.cases),
            "path": str(external_site.root),
        },
        "organs": organs,
        "rows": rows,
        "detail_rows": detail_rows,
        "reference_arm": REFERENCE_ARM,
        "records": records,
        "summary": summary,
        "wilcoxon_vs_fedbn": tests,
        "batchnorm": batchnorm,
        "recommended_batchnorm": batchnorm["recommended"],
        "rounds": rounds,
        "bundles": {f"seed-{o.seed}": {} for o in outcomes},
        "seconds_per_arm": {},
        "figures": figures,
    }
    for o in outcomes:
        results["bundles"][f"seed-{o.seed}"].update(o.bundles)
        results["seconds_per_arm"].setdefault(f"seed-{o.seed}", {})[o.arm] = o.seconds
    results["paper_dice"] = PAPER_DICE
    write_json(out / RESULTS_FILE, results)
    write_report_md(out / REPORT_FILE, results, config, figures)
    reporter.emit(
        "done",
        outputs={
            "results": str(out / RESULTS_FILE),
            "report": str(out / REPORT_FILE),
            **{name: str(out / name) for name in figures.values()},
        },
        metrics={arm: macro_mean(summary[arm]) for arm in rows},
        recommended_batchnorm=batchnorm["recommended"],
    )
    return results
