"""The experiment's outputs: results.json, report.md and PNG figures (matplotlib, Agg)."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..organs import ORGAN_NAMES, organ_by_name
from .config import ARMS, ExperimentConfig
from .statistics import ALPHA, BOOTSTRAP_KWARGS, MIN_PAIRS, WILCOXON_KWARGS

__all__ = [
    "ARM_TITLES",
    "LEVEL_MARGIN",
    "PAPER_DICE",
    "REFERENCE_ARM",
    "comparison_table",
    "dice_table",
    "machine_info",
    "macro_mean",
    "paper_claims",
    "plot_dice_by_arm",
    "plot_overlays",
    "plot_rounds",
    "plot_selection",
    "pyplot",
    "selection_table",
    "statistics_note",
    "utc_now",
    "verdict_table",
    "write_json",
    "write_report_md",
]

REFERENCE_ARM = "fedbn"
"""The arm every other arm is tested against."""

PAPER_DICE: dict[str, dict[str, float]] = {
    "fedbn": {"liver": 0.93, "spleen": 0.83, "pancreas": 0.55, "kidney": 0.75},
    "local": {"liver": 0.87, "spleen": 0.83, "pancreas": 0.42, "kidney": 0.48},
    "central-naive": {"liver": 0.65, "spleen": 0.0, "pancreas": 0.55, "kidney": 0.68},
}
"""The SegViz paper's external (BTCV) Dice: FedBN, single-site models, naive central pooling."""
LEVEL_MARGIN = 0.02
"""A paper difference within this margin is read as "level" (the paper reports two decimals)."""

ARM_TITLES = {
    "local": "local (each site's own model)",
    "central-naive": "central, naive (unannotated = background)",
    "central-partial": "central, partial-label loss",
    "fedavg": "FedAvg",
    "fedbn": "FedBN",
}


def macro_mean(summary_row: Mapping[str, Mapping]) -> float | None:
    """Mean over organs of the mean Dice of one row of the summary."""
    values = [s["dice"]["mean"] for s in summary_row.values() if s["dice"]["mean"] is not None]
    return float(np.mean(values)) if values else None


def machine_info() -> dict:
    """CPU model, cores, GPU, torch/monai/flwr versions (recorded with every result)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for module in ("monai", "flwr", "scipy"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - optional in some installs
            info[module] = None
    return info


def write_json(path: str | Path, data) -> Path:
    """Write JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    os.replace(tmp, path)
    return path


def utc_now() -> str:
    """ISO time stamp (UTC, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- tables ----------------------------------------------------------------------------------


def _p(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2g}" if value >= 0.001 else f"{value:.1e}"


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.3f}"


def dice_table(analysis: Mapping, organs: Sequence[str] = ORGAN_NAMES, metric: str = "dice") -> str:
    """Markdown: one row per arm, ``mean ± SD`` over the seed-averaged external cases per organ.

    Dice rows also carry the mean over organs and the spread over seeds (SD of the per-seed means, mean
    over organs).
    """
    summary = analysis["summary"]
    unit = " (mm)" if metric == "hd95_mm" else ""
    extra = " mean | seed SD |" if metric == "dice" else ""
    lines = [
        "| arm | " + " | ".join(f"{o}{unit}" for o in organs) + " |" + extra,
        "|---|" + "---|" * (len(organs) + (2 if metric == "dice" else 0)),
    ]
    for arm in analysis["rows"]:
        cells = []
        for organ in organs:
            s = summary.get(arm, {}).get(organ, {}).get(metric)
            if not s or s["mean"] is None:
                cells.append("–")
                continue
            fmt = ".1f" if metric == "hd95_mm" else ".3f"
            std = f" ± {s['std']:{fmt}}" if s["std"] is not None else ""
            cells.append(f"{s['mean']:{fmt}}{std}")
        if metric == "dice":
            m = macro_mean(summary.get(arm, {}))
            cells.append("–" if m is None else f"{m:.3f}")
            spreads = [
                analysis["seed_spread"].get(arm, {}).get(o, {}).get("std")
                for o in organs
                if analysis["seed_spread"].get(arm, {}).get(o, {}).get("std") is not None
            ]
            cells.append(f"{np.mean(spreads):.3f}" if spreads else "–")
        name = f"**{arm}**" if arm == REFERENCE_ARM else arm
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(analysis: Mapping, organs: Sequence[str] = ORGAN_NAMES) -> str:
    """Markdown: one row per comparison FedBN − arm; per organ the median paired difference of the
    seed-averaged Dice with its bootstrap 95% CI and the Holm-corrected p (``*`` below :data:`ALPHA`)."""
    lines = [
        "| FedBN − arm | " + " | ".join(organs) + " |",
        "|---|" + "---|" * len(organs),
    ]
    for arm, per_organ in analysis["tests"].items():
        cells = []
        for organ in organs:
            test = per_organ.get(organ)
            if not test:
                cells.append("–")
                continue
            e = test["effect"]
            ci = f" [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]" if e["ci_low"] is not None else ""
            star = "*" if test.get("significant") else ""
            cells.append(f"{_signed(e['median'])}{ci}, p={_p(test['p_holm'])}{star}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def selection_table(scores: Mapping[str, Mapping], chosen: Mapping[str, Mapping]) -> str:
    """Markdown: every arm's candidates with their validation score, the chosen one in bold."""
    lines = ["| arm | candidate | validation Dice | per organ | note |", "|---|---|---|---|---|"]
    for arm in [a for a in ARMS if a in scores]:
        for key, c in scores[arm].items():
            score = "–" if c["score"] is None else f"{c['score']:.3f}"
            organs = ", ".join(f"{o} {v:.3f}" for o, v in c["per_organ"].items())
            notes = []
            if c.get("own_statistics"):
                notes.append("own site's statistics")
            if not c.get("complete"):
                notes.append("not scoreable on every case")
            label = f"**{key}** (chosen)" if chosen.get(arm, {}).get("key") == key else key
            lines.append(f"| {arm} | {label} | {score} | {organs} | {'; '.join(notes)} |")
    return "\n".join(lines)


def paper_claims(organs: Sequence[str] = ORGAN_NAMES) -> dict[str, dict[str, float]]:
    """The paper's FedBN − arm differences per organ (arms the paper reports)."""
    ref = PAPER_DICE[REFERENCE_ARM]
    return {
        arm: {o: round(ref[o] - values[o], 3) for o in organs if o in values and o in ref}
        for arm, values in PAPER_DICE.items()
        if arm != REFERENCE_ARM
    }


def _verdict(paper: float | None, test: Mapping | None) -> str:
    if test is None:
        return "not measured"
    significant = bool(test.get("significant"))
    ours = test["effect"]["median"] or 0.0
    direction = "FedBN better" if ours > 0 else "FedBN worse"
    if paper is None:
        return direction if significant else "no significant difference"
    if abs(paper) <= LEVEL_MARGIN:
        return "held (level)" if not significant else f"differs: {direction}"
    if not significant:
        return "not shown"
    return "held" if (ours > 0) == (paper > 0) else "reversed"


def verdict_table(analysis: Mapping, organs: Sequence[str] = ORGAN_NAMES) -> str:
    """Markdown: per organ and comparison, the paper's FedBN − arm difference, ours with its CI and
    Holm p, and whether the paper's claim held (significant in its direction), was not shown, was
    reversed, or (paper level within :data:`LEVEL_MARGIN`) stayed level."""
    claims = paper_claims(organs)
    lines = [
        "| organ | FedBN − arm | paper | ours (median [95% CI]) | p (Holm) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for organ in organs:
        for arm, per_organ in analysis["tests"].items():
            test = per_organ.get(organ)
            paper = claims.get(arm, {}).get(organ)
            if test is None:
                continue
            e = test["effect"]
            ci = f" [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]" if e["ci_low"] is not None else ""
            lines.append(
                f"| {organ} | {arm} | {_signed(paper) if paper is not None else 'not in the paper'} | "
                f"{_signed(e['median'])}{ci} | {_p(test['p_holm'])} | {_verdict(paper, test)} |"
            )
    return "\n".join(lines)


def _paper_table(analysis: Mapping, organs: Sequence[str]) -> str:
    summary = analysis["summary"]
    lines = ["| arm | " + " | ".join(f"{o} (paper / ours)" for o in organs) + " |", "|---|" + "---|" * len(organs)]
    for arm in (a for a in ARMS if a in summary):
        cells = []
        for organ in organs:
            paper = PAPER_DICE.get(arm, {}).get(organ)
            ours = summary[arm].get(organ, {}).get("dice", {}).get("mean")
            cells.append(f"{'–' if paper is None else f'{paper:.2f}'} / {'–' if ours is None else f'{ours:.2f}'}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def statistics_note(analysis: Mapping, n_seeds: int, n_organs: int) -> str:
    """One paragraph: how the table's numbers and tests were computed, quoting the exact scipy calls."""
    kwargs = ", ".join(f"{k}={v!r}" for k, v in WILCOXON_KWARGS.items())
    boot = ", ".join(f"{k}={v!r}" for k, v in BOOTSTRAP_KWARGS.items())
    min_p = analysis.get("min_holm_p")
    return (
        f"Each external case's Dice is first averaged over the {n_seeds} training seed(s); the unit of analysis "
        f"is the case (n = {analysis['n_cases']}). Tests: paired two-sided Wilcoxon signed-rank of **fedbn** "
        f"against each arm per organ (`scipy.stats.wilcoxon(fedbn, arm, {kwargs})`), Holm-corrected over the "
        f"{n_organs} organs of each comparison; `*` corrected "
        f"p < {ALPHA}. With {analysis['n_cases']} cases the smallest corrected p any result can reach is "
        f"{_p(min_p)}. Effect: median of the paired differences fedbn − arm with a bootstrap 95% CI "
        f"(`scipy.stats.bootstrap(..., np.median, {boot})`). p is n/a when fewer than {MIN_PAIRS} cases "
        "differ. A missed organ counts as Dice 0."
    )


def write_report_md(path: str | Path, results: Mapping, config: ExperimentConfig, figures: Mapping[str, str]) -> Path:
    """Write report.md of a comparison: settings, the selection on validation, the Dice table, the
    comparisons against FedBN, the paper beside ours, the verdict per organ, figures, commands."""
    analysis = results["analysis"]["main"]
    organs = results["organs"]
    fed = config.federation
    data = (
        f"phantom `{json.dumps(config.data.phantom)}`"
        if config.data.phantom is not None
        else "site folders " + ", ".join(f"`{s}`" for s in config.data.sites) + f", external `{config.data.external}`"
    )
    machine = results["machine"]
    lines = [
        f"# {config.name}",
        "",
        config.description
        or "Local vs central (naive, partial-label) vs FedAvg vs FedBN on the same sites and external set.",
        "",
        "## Settings",
        "",
        f"- Data: {data}; training sites: "
        + ", ".join(f"`{s['name']}` ({', '.join(s['organs'])}, {s['cases']} cases)" for s in results["sites"])
        + f"; external set `{results['external']['name']}` ({results['external']['cases']} cases).",
        (
            f"- Budget: {fed.rounds} rounds × {fed.local_epochs} local epochs = **{fed.total_epochs} epochs for every "
            f"arm**; lr {fed.lr}, weighting `{fed.weighting}`; validation share {config.training.val_fraction} of each "
            "site's cases."
        ),
        (
            f"- Network: channels {list(config.network.channels)}, strides {list(config.network.strides)}, "
            f"{config.network.num_res_units} residual units; preprocessing spacing {list(config.preprocessing.spacing)} mm, "
            f"HU window {list(config.preprocessing.hu_window)}; patch {list(config.training.patch_size)}, batch "
            f"{config.training.batch_size}, {config.training.samples_per_case} patches per case per epoch."
        ),
        (
            f"- Seeds {list(results['seeds'])}; device `{results['device']}` ({machine['gpu'] or machine['cpu']}, "
            f"{machine['cores']} cores); total {results['seconds']:.0f} s (training {results['timings']['train_s']:.0f} s, "
            f"selection {results['timings']['select_s']:.0f} s, external {results['timings']['external_s']:.0f} s)."
        ),
        "",
        "## Test-time options, chosen on validation and frozen before the external set was opened",
        "",
        f"Rule: {results['selection_rule']}. Frozen at {results['frozen_at']}.",
        "",
        selection_table(results["validation"]["main"]["scores"], results["selection"]["main"]),
        "",
        f"## External Dice (mean ± SD over {analysis['n_cases']} cases, each averaged over seeds)",
        "",
        dice_table(analysis, organs),
        "",
        "## FedBN against each arm (median paired difference [bootstrap 95% CI], Holm-corrected p)",
        "",
        statistics_note(analysis, len(results["seeds"]), len(organs)),
        "",
        comparison_table(analysis, organs),
        "",
        "## The paper beside ours (external Dice, mean)",
        "",
        (
            "The paper's numbers are on BTCV with real CT; ours are on the configured external set. "
            "The paper has no FedAvg or partial-label central row."
        ),
        "",
        _paper_table(analysis, organs),
        "",
        "## Verdict, organ by organ",
        "",
        (
            f"A paper claim *held* when our Holm-corrected p < {ALPHA} in its direction; *not shown* when not "
            f"significant; *reversed* when significant the other way; a paper difference within ±{LEVEL_MARGIN} is "
            "read as level."
        ),
        "",
        verdict_table(analysis, organs),
        "",
    ]
    if any(
        s.get(o, {}).get("hd95_mm", {}).get("mean") is not None for s in analysis["summary"].values() for o in organs
    ):
        lines += [
            "## External HD95 (mm, mean ± SD over cases where the organ was predicted, each averaged over seeds)",
            "",
            dice_table(analysis, organs, "hd95_mm"),
            "",
        ]
    lines += ["## Figures", ""]
    for title, name in figures.items():
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    lines += ["## Reproduce", "", "```bash", *results["commands"], "```", ""]
    path = Path(path)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# --- figures ---------------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_dice_by_arm(path: str | Path, records: Sequence[Mapping], rows: Sequence[str], organs: Sequence[str]) -> Path:
    """Box plots of per-case external Dice by arm, one panel per organ, every case as a point."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(organs), figsize=(3.2 * len(organs) + 1, 4.2), sharey=True, squeeze=False)
    rng = np.random.default_rng(0)
    for ax, organ in zip(axes[0], organs):
        data = [
            [r["dice"] for r in records if r["arm"] == arm and r["organ"] == organ and r["dice"] is not None]
            for arm in rows
        ]
        positions = np.arange(1, len(rows) + 1)
        ax.boxplot([d if d else [np.nan] for d in data], positions=positions, widths=0.6, showfliers=False)
        for x, values in zip(positions, data):
            ax.scatter(
                x + rng.uniform(-0.15, 0.15, len(values)),
                values,
                s=10,
                alpha=0.7,
                color=organ_by_name(organ).colour_float,
                edgecolors="black",
                linewidths=0.3,
                zorder=3,
            )
        ax.set_title(organ)
        ax.set_xticks(positions)
        ax.set_xticklabels(rows, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("external Dice per case (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_rounds(path: str | Path, rounds: Mapping[str, Mapping[str, Sequence[Mapping]]], organs: Sequence[str]) -> Path:
    """Validation Dice per round (sites' held-out cases after local training, per organ) for FedAvg and FedBN.

    Args:
        rounds: ``{arm: {seed: bundle.metrics["rounds"]}}``.
    """
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(organs), figsize=(3.2 * len(organs) + 1, 3.4), sharey=True, squeeze=False)
    styles = {"fedavg": "--", "fedbn": "-"}
    for ax, organ in zip(axes[0], organs):
        for arm, per_seed in rounds.items():
            curves = [[h.get("dice", {}).get(organ, np.nan) for h in history] for history in per_seed.values()]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            values = np.array([c[:length] for c in curves], dtype=float)
            x = np.arange(1, length + 1)
            for c in values:
                ax.plot(x, c, styles.get(arm, "-"), color="grey", alpha=0.25, lw=0.8)
            ax.plot(
                x,
                np.nanmean(values, axis=0),
                styles.get(arm, "-"),
                marker="o",
                ms=3,
                label=arm,
                color=organ_by_name(organ).colour_float if arm == "fedbn" else "black",
            )
        ax.set_title(organ)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("validation Dice (sites' held-out cases)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_selection(path: str | Path, scores: Mapping[str, Mapping], chosen: Mapping[str, Mapping]) -> Path:
    """Bars: every arm's candidates by validation Dice (mean over organs and seeds); the chosen one filled."""
    plt = pyplot()
    arms = [a for a in ARMS if a in scores]
    width = max(len(scores[a]) for a in arms)
    # One row per arm: a comparison offers each arm tens of candidates (BatchNorm x overlap x threshold).
    fig, axes = plt.subplots(
        len(arms), 1, figsize=(max(6.0, 2.0 + 0.24 * width), 1.0 + 2.9 * len(arms)), sharey=True, squeeze=False
    )
    for ax, arm in zip(axes[:, 0], arms):
        keys = list(scores[arm])
        values = [scores[arm][k]["score"] or 0.0 for k in keys]
        picked = chosen.get(arm, {}).get("key")
        colours = ["#4c72b0" if k == picked else "white" for k in keys]
        ax.bar(range(len(keys)), values, color=colours, edgecolor="#4c72b0")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([_short_option(k) for k in keys], rotation=60, ha="right", fontsize=7)
        ax.set_title(arm, fontsize=9)
        ax.set_ylim(0, 1.0)
        ax.set_xlim(-0.6, width - 0.4)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylabel("validation Dice (mean)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _short_option(key: str) -> str:
    """``final, bn=adapt, overlap=0.5, threshold=0.5`` -> ``final adapt 0.5/0.5``."""
    checkpoint, bn, overlap, threshold = key.split(", ")
    return f"{checkpoint} {bn[3:]} {overlap.split('=')[1]}/{threshold.split('=')[1]}"


def plot_overlays(
    path: str | Path, image: sitk.Image, reference: sitk.Image, predictions: Mapping[str, sitk.Image], case: str
) -> Path:
    """Reference and every arm's prediction of one external case (via :func:`~SegVizLogic.figures.render_overlays`)."""
    from ..figures import render_overlays

    return render_overlays(
        image, {"reference": reference, **predictions}, path, title=f"external case {case}: reference and each arm"
    )
