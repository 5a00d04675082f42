"""The learning curve: where federation starts to pay.

The comparison is repeated with 1, 2, 4, 8 training cases per site (and with unequal sites, e.g.
8/4/2/1), every point on the same validation cases and the same external set, every arm of a point
with the same budget. Each point's training sites are views of the full site folders (symlinks to
the first ``n`` cases plus the held-out validation cases, sharing the preprocessing cache), so the
cases of a smaller point are a subset of a larger one's, as in a consortium that keeps annotating.

The figure plots external Dice against training cases per site, one panel per organ, one line per
arm (mean over cases of the seed-averaged Dice), each seed's mean as a dot; the unequal points are
hollow markers at the count of the site that annotated the organ.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import SegVizInputError
from ..federated.simulation import choose_engine
from ..progress import ProgressReporter
from ..site import SITE_FILE, Site, load_site, state_dir
from .arms import prepare_data
from .comparison import REPORT_FILE, RESULTS_FILE, prepare_output, reproduce_commands
from .config import ARMS, ExperimentConfig
from .report import (
    REFERENCE_ARM,
    comparison_table,
    pyplot,
    selection_table,
    statistics_note,
    utc_now,
    write_json,
)
from .statistics import ALPHA
from .study import Point, run_study

__all__ = [
    "CURVE_FIGURE",
    "curve_points",
    "plot_learning_curve",
    "run_learning_curve",
    "site_view",
    "validation_fraction",
    "where_federation_pays",
    "write_curve_report_md",
]

CURVE_FIGURE = "learning_curve.png"


def validation_fraction(counts: Sequence[int], validation_cases: int) -> float:
    """The ``val_fraction`` that holds out exactly ``validation_cases`` of every site with ``count +
    validation_cases`` cases (the training split rounds ``val_fraction × cases``, at least one).

    Raises:
        ValueError: no single fraction does it for these counts (e.g. 2 validation cases with 8/4/2/1 sites).
    """
    low, high = 0.0, 1.0
    for n in counts:
        total = n + validation_cases
        # round(f * total) == v  <=>  f * total in [v - 0.5, v + 0.5] (one validation case: anything up to 1.5).
        low = max(low, (validation_cases - 0.5) / total if validation_cases > 1 else 0.0)
        high = min(high, (validation_cases + 0.5) / total)
    if low >= high:
        raise ValueError(
            f"[learning_curve] validation_cases = {validation_cases} cannot be held out of sites with "
            f"{list(counts)} training cases by one validation share; use validation_cases = 1"
        )
    return (low + high) / 2 if low > 0 else high * 0.9


def site_view(source: Site, dest: Path, train_cases: int, validation_cases: int) -> Path:
    """A site folder holding the first ``train_cases`` cases of ``source`` and its last ``validation_cases``
    (by name: the training split holds out the last cases), as symlinks; the preprocessing cache is shared.

    Raises:
        SegVizInputError: ``source`` has too few cases.
    """
    needed = train_cases + validation_cases
    if len(source.cases) < needed:
        raise SegVizInputError(
            source.root,
            f"has {len(source.cases)} cases; the learning curve needs {needed} "
            f"({train_cases} training + {validation_cases} validation)",
        )
    cases = [*source.cases[:train_cases], *source.cases[len(source.cases) - validation_cases :]]
    (dest / "images").mkdir(parents=True)
    (dest / "labels").mkdir()
    os.symlink((source.root / SITE_FILE).resolve(), dest / SITE_FILE)
    for case in cases:
        os.symlink(Path(case.image_path).resolve(), dest / "images" / Path(case.image_path).name)
        os.symlink(Path(case.label_path).resolve(), dest / "labels" / Path(case.label_path).name)
    cache = state_dir(source) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    os.symlink(cache.resolve(), state_dir(dest) / "cache")
    return dest


def curve_points(
    config: ExperimentConfig, site_dirs: Sequence[str], out: Path, reporter: ProgressReporter | None = None
) -> list[Point]:
    """The learning curve's points, with their site views under ``out/<point>/sites/``.

    Raises:
        ValueError: an unequal point does not give one count per site, or the validation split cannot
            hold out the same cases at every point.
        SegVizInputError: a site has too few cases.
    """
    curve = config.learning_curve
    if curve is None:
        raise ValueError("not a learning-curve config (no [learning_curve] section)")
    sources = [load_site(s) for s in site_dirs]
    plan: list[tuple[str, list[int]]] = [(str(n), [n] * len(sources)) for n in curve.cases_per_site]
    for counts in curve.unequal:
        if len(counts) != len(sources):
            raise ValueError(
                f"[learning_curve] unequal {list(counts)} must give one count per site ({len(sources)} sites: "
                + ", ".join(s.name for s in sources)
                + ")"
            )
        plan.append(("/".join(str(c) for c in counts), list(counts)))
    points = []
    for name, counts in plan:
        fraction = validation_fraction(counts, curve.validation_cases)
        folder = out / name.replace("/", "-") / "sites"
        views = [str(site_view(s, folder / s.root.name, n, curve.validation_cases)) for s, n in zip(sources, counts)]
        local_epochs = config.federation.local_epochs
        if curve.budget == "steps":
            local_epochs = math.ceil(local_epochs * curve.max_cases / max(counts))
        point_config = replace(config, training=replace(config.training, val_fraction=fraction))
        points.append(
            Point(name, point_config, views, {s.name: n for s, n in zip(sources, counts)}, local_epochs=local_epochs)
        )
        if reporter is not None:
            reporter.emit(
                "stage",
                stage="learning-curve",
                message=f"point {name}: {dict(zip([s.name for s in sources], counts))} training cases, "
                f"{local_epochs} local epochs x {config.federation.rounds} rounds",
            )
    return points


def _organ_count(point: Mapping, sites: Sequence[Mapping], organ: str) -> float:
    """Training cases of the site(s) that annotated ``organ`` at a point (their mean when several did)."""
    counts = [point["cases"][s["name"]] for s in sites if organ in s["organs"]]
    return float(np.mean(counts)) if counts else float("nan")


def where_federation_pays(results: Mapping, against: str = "local") -> dict[str, dict[str, str]]:
    """Per organ and point: ``"+"`` FedBN significantly better than ``against`` (Holm p < 0.05),
    ``"−"`` significantly worse, ``"·"`` no significant difference, ``"n/a"`` not tested."""
    out: dict[str, dict[str, str]] = {}
    for organ in results["organs"]:
        out[organ] = {}
        for point, analysis in results["analysis"].items():
            test = analysis["tests"].get(against, {}).get(organ)
            if test is None or test.get("p_holm") is None:
                out[organ][point] = "n/a"
            elif test["significant"]:
                out[organ][point] = "+" if test["effect"]["median"] > 0 else "−"
            else:
                out[organ][point] = "·"
    return out


def plot_learning_curve(path: str | Path, results: Mapping) -> Path:
    """External Dice against training cases per site, one panel per organ, one line per arm; dots are
    each seed's mean over cases, hollow markers the unequal points."""
    plt = pyplot()
    organs = results["organs"]
    arms = [a for a in ARMS if a in results["config"]["arms"]]
    # One colour per arm in every panel (an organ's own colour made FedBN's liver line the colour of FedAvg's).
    colours = {
        "local": "#8c8c8c",
        "central-partial": "#55a868",
        "central-naive": "#c44e52",
        "fedavg": "#dd8452",
        "fedbn": "#4c72b0",
    }
    equal = [p for p in results["points"] if p.isdigit()]
    unequal = [p for p in results["points"] if not p.isdigit()]
    fig, axes = plt.subplots(1, len(organs), figsize=(3.4 * len(organs) + 1, 3.8), sharey=True, squeeze=False)
    offsets = {arm: (i - (len(arms) - 1) / 2) * 0.04 for i, arm in enumerate(arms)}
    for ax, organ in zip(axes[0], organs):
        for arm in arms:
            colour = colours.get(arm, "black")
            xs, ys = [], []
            for point in equal + unequal:
                analysis = results["analysis"][point]
                mean = analysis["summary"].get(arm, {}).get(organ, {}).get("dice", {}).get("mean")
                if mean is None:
                    continue
                n = _organ_count(results["points"][point], results["sites"], organ)
                x = n * 2 ** offsets[arm]
                per_seed = _per_seed_means(results["records"], point, arm, organ)
                ax.scatter([x] * len(per_seed), per_seed, s=8, color=colour, alpha=0.45, zorder=2)
                if point in equal:
                    xs.append(x)
                    ys.append(mean)
                else:
                    ax.scatter([x], [mean], s=46, facecolors="none", edgecolors=colour, linewidths=1.4, zorder=3)
            if xs:
                ax.plot(xs, ys, "-o", color=colour, ms=4, lw=1.8 if arm == REFERENCE_ARM else 1.2, label=arm, zorder=3)
        ticks = sorted({int(p) for p in equal})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.set_title(organ)
        ax.set_xlabel("training cases at the organ's site")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("external Dice (mean over cases)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    if unequal:
        fig.suptitle(f"lines: equal sites; hollow: unequal sites ({', '.join(unequal)}); dots: one seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _per_seed_means(records: Sequence[Mapping], point: str, arm: str, organ: str) -> list[float]:
    per_seed: dict[int, list[float]] = {}
    for r in records:
        if r["point"] == point and r["arm"] == arm and r["organ"] == organ and r["dice"] is not None:
            per_seed.setdefault(r["seed"], []).append(r["dice"])
    return [float(np.mean(v)) for _, v in sorted(per_seed.items())]


def write_curve_report_md(path: str | Path, results: Mapping, config: ExperimentConfig) -> Path:
    """report.md of a learning curve: settings, selection per point, Dice per organ and point, where
    FedBN beats each arm, the comparisons per point, the figure and the commands."""
    organs = results["organs"]
    points = list(results["points"])
    curve = config.learning_curve
    machine = results["machine"]
    lines = [
        f"# {config.name}",
        "",
        config.description or "Where federation starts to pay: the comparison at 1, 2, 4, 8 training cases per site.",
        "",
        "## Settings",
        "",
        f"- Points (training cases per site, in site order {', '.join(s['name'] for s in results['sites'])}): "
        + "; ".join(
            f"`{p}` ({results['points'][p]['local_epochs']} local epochs × {results['points'][p]['rounds']} rounds)"
            for p in points
        )
        + f". Budget rule `{curve.budget}`; {curve.validation_cases} validation case(s) per site, the same at every "
        "point; the same external set.",
        (
            f"- Arms {', '.join(config.arms)}; seeds {list(results['seeds'])}; network channels "
            f"{list(config.network.channels)}; spacing {list(config.preprocessing.spacing)} mm; patch "
            f"{list(config.training.patch_size)}."
        ),
        (
            f"- External set `{results['external']['name']}` ({results['external']['cases']} cases). Device "
            f"`{results['device']}` ({machine['gpu'] or machine['cpu']}, {machine['cores']} cores); total "
            f"{results['seconds']:.0f} s."
        ),
        "",
        f"![Learning curve]({CURVE_FIGURE})",
        "",
        "## Where FedBN beats each arm",
        "",
        f"`+` FedBN better (Holm-corrected p < {ALPHA}), `−` worse, `·` no significant difference.",
        "",
    ]
    for against in [a for a in config.arms if a != REFERENCE_ARM]:
        pays = where_federation_pays(results, against)
        lines += [
            f"FedBN against **{against}**:",
            "",
            "| organ | " + " | ".join(points) + " |",
            "|---|" + "---|" * len(points),
            *(f"| {o} | " + " | ".join(pays[o][p] for p in points) + " |" for o in organs),
            "",
        ]
    lines += ["## External Dice per point (mean over cases of the seed-averaged Dice; seed SD)", ""]
    for organ in organs:
        lines += [f"**{organ}**", "", "| arm | " + " | ".join(points) + " |", "|---|" + "---|" * len(points)]
        for arm in [a for a in ARMS if a in config.arms]:
            cells = []
            for p in points:
                a = results["analysis"][p]
                s = a["summary"].get(arm, {}).get(organ, {}).get("dice", {})
                sd = a["seed_spread"].get(arm, {}).get(organ, {}).get("std")
                cells.append("–" if s.get("mean") is None else f"{s['mean']:.3f}" + (f" ({sd:.3f})" if sd else ""))
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Comparisons per point (FedBN − arm: median [bootstrap 95% CI], Holm-corrected p)", ""]
    first = results["analysis"][points[0]]
    lines += [statistics_note(first, len(results["seeds"]), len(organs)), ""]
    for p in points:
        lines += [f"### Point `{p}`", "", comparison_table(results["analysis"][p], organs), ""]
    lines += ["## Test-time options chosen on validation, per point", "", f"Rule: {results['selection_rule']}.", ""]
    for p in points:
        lines += [
            f"### Point `{p}`",
            "",
            selection_table(results["validation"][p]["scores"], results["selection"][p]),
            "",
        ]
    lines += ["## Reproduce", "", "```bash", *results["commands"], "```", ""]
    path = Path(path)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def run_learning_curve(
    config: ExperimentConfig,
    out_dir: str | Path,
    force: bool = False,
    reporter: ProgressReporter | None = None,
    command: list[str] | None = None,
) -> dict:
    """Run the learning curve of ``config`` into ``out_dir`` and return what ``results.json`` holds.

    ``out_dir`` receives ``results.json`` (first written at the freeze, before the external set is
    opened), ``report.md``, ``learning_curve.png``, the phantom (``data/``) and, per point, the site
    views and bundles (``<point>/sites/``, ``<point>/seed-<s>/<arm>/``).

    Raises:
        SegVizInputError: ``out_dir`` is not empty and ``force`` is false, or a site has too few cases.
        ValueError: the points do not fit the sites (see :func:`curve_points`).
    """
    reporter = reporter or ProgressReporter("none")
    out = prepare_output(out_dir, force)
    started, t0 = utc_now(), time.perf_counter()
    site_dirs, external = prepare_data(config, out, reporter)
    sites = [load_site(s) for s in site_dirs]
    if len({s.name for s in sites}) != len(sites):
        raise SegVizInputError(None, "two training sites have the same name in site.json; site names must be unique")
    points = curve_points(config, site_dirs, out, reporter)
    header = {
        "kind": "learning-curve",
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
    results, _ = run_study(points, config, external, out, header, reporter)
    reporter.emit("stage", stage="report", message="writing the learning curve and report")
    results.update(
        finished=utc_now(), seconds=round(time.perf_counter() - t0, 1), figures={"Learning curve": CURVE_FIGURE}
    )
    plot_learning_curve(out / CURVE_FIGURE, results)
    write_json(out / RESULTS_FILE, results)
    write_curve_report_md(out / REPORT_FILE, results, config)
    reporter.emit(
        "done",
        outputs={
            "results": str(out / RESULTS_FILE),
            "report": str(out / REPORT_FILE),
            "figure": str(out / CURVE_FIGURE),
        },
        pays={o: v for o, v in where_federation_pays(results).items()},
    )
    return results
