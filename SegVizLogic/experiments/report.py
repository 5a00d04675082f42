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
from .statistics import MIN_PAIRS, WILCOXON_KWARGS

__all__ = [
    "PAPER_DICE",
    "REFERENCE_ARM",
    "dice_table",
    "machine_info",
    "macro_mean",
    "plot_batchnorm",
    "plot_dice_by_arm",
    "plot_overlays",
    "plot_rounds",
    "table_rows",
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

_ARM_TITLES = {
    "local": "local (each site's own model)",
    "central-naive": "central, naive (unannotated = background)",
    "central-partial": "central, partial-label loss",
    "fedavg": "FedAvg",
    "fedbn": "FedBN",
}


def table_rows(arms_present: Sequence[str]) -> list[str]:
    """Table order: the main arms, then the FedBN BatchNorm rows (``fedbn[bn=...]``)."""
    main = [a for a in ARMS if a in arms_present]
    return main + sorted(a for a in arms_present if a.startswith("fedbn[bn="))


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


def _p_text(test: Mapping | None) -> str:
    if not test:
        return ""
    if test.get("p") is None:
        return " (p n/a)"
    p = test["p"]
    return f" (p={p:.2g}{'*' if p < 0.05 else ''})"


def dice_table(results: Mapping, organs: Sequence[str] = ORGAN_NAMES, metric: str = "dice") -> str:
    """Markdown: one row per arm, ``mean ± std`` per organ and (Dice) the p-value against FedBN."""
    summary, tests = results["summary"], results["wilcoxon_vs_fedbn"]
    unit = " (mm)" if metric == "hd95_mm" else ""
    lines = [
        "| arm | " + " | ".join(f"{o}{unit}" for o in organs) + (" | mean |" if metric == "dice" else " |"),
        "|---|" + "---|" * (len(organs) + (1 if metric == "dice" else 0)),
    ]
    for arm in results["rows"]:
        cells = []
        for organ in organs:
            s = summary.get(arm, {}).get(organ, {}).get(metric)
            if not s or s["mean"] is None:
                cells.append("–")
                continue
            fmt = ".1f" if metric == "hd95_mm" else ".3f"
            std = f" ± {s['std']:{fmt}}" if s["std"] is not None else ""
            text = f"{s['mean']:{fmt}}{std}"
            if metric == "dice":
                text += _p_text(tests.get(arm, {}).get(organ))
            cells.append(text)
        if metric == "dice":
            m = macro_mean(summary.get(arm, {}))
            cells.append("–" if m is None else f"{m:.3f}")
        name = f"**{arm}**" if arm == REFERENCE_ARM else arm
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paper_table(results: Mapping, organs: Sequence[str]) -> str:
    summary = results["summary"]
    lines = ["| arm | " + " | ".join(f"{o} (paper / ours)" for o in organs) + " |", "|---|" + "---|" * len(organs)]
    for arm in (a for a in ARMS if a in summary):
        cells = []
        for organ in organs:
            paper = PAPER_DICE.get(arm, {}).get(organ)
            ours = summary[arm].get(organ, {}).get("dice", {}).get("mean")
            cells.append(f"{'–' if paper is None else f'{paper:.2f}'} / {'–' if ours is None else f'{ours:.2f}'}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report_md(path: str | Path, results: Mapping, config: ExperimentConfig, figures: Mapping[str, str]) -> Path:
    """Write report.md: settings, the paper-style table with p-values, the paper beside ours,
    the BatchNorm measurement, figures and the commands to reproduce."""
    organs = results["organs"]
    fed = config.federation
    n_cases = len({(r["seed"], r["case"]) for r in results["records"] if r["arm"] == REFERENCE_ARM}) or "–"
    bn = results.get("batchnorm", {})
    data = (
        f"phantom `{json.dumps(config.data.phantom)}`"
        if config.data.phantom is not None
        else "site folders " + ", ".join(f"`{s}`" for s in config.data.sites) + f", external `{config.data.external}`"
    )
    lines = [
        f"# {config.name}",
        "",
        config.description
        or "Local vs central (naive, partial-label) vs FedAvg vs FedBN on the same sites and external set.",
        "",
        "## Settings",
        "",
        f"- Data: {data}; training sites: "
        + ", ".join(f"`{s['name']}` ({', '.join(s['organs'])})" for s in results["sites"])
        + f"; external set `{results['external']['name']}` ({results['external']['cases']} cases).",
        (
            f"- Budget: {fed.rounds} rounds × {fed.local_epochs} local epochs = **{fed.total_epochs} epochs for every arm**; "
            f"lr {fed.lr}, weighting `{fed.weighting}`."
        ),
        (
            f"- Network: channels {list(config.network.channels)}, strides {list(config.network.strides)}, "
            f"{config.network.num_res_units} residual units; preprocessing spacing {list(config.preprocessing.spacing)} mm, "
            f"HU window {list(config.preprocessing.hu_window)}; patch {list(config.training.patch_size)}, batch {config.training.batch_size}, "
            f"{config.training.samples_per_case} patches per case per epoch."
        ),
        (
            f"- Seeds {list(results['seeds'])}; device `{results['device']}` ({results['machine']['gpu'] or results['machine']['cpu']}); "
            f"total {results['seconds']:.0f} s."
        ),
        "- Local and central arms keep their best validation epoch (`segviz train`); federated arms keep the final round.",
        "",
        "## External Dice (mean ± std over cases"
        + (" and seeds" if len(results["seeds"]) > 1 else "")
        + f", n = {n_cases})",
        "",
        (
            f"p: paired two-sided Wilcoxon signed-rank test of **fedbn** against the row, per organ, on (seed, case) pairs "
            f"(`scipy.stats.wilcoxon(fedbn, arm, {', '.join(f'{k}={v!r}' for k, v in WILCOXON_KWARGS.items())})`); "
            f"`p n/a` when fewer than {MIN_PAIRS} pairs differ or the arms are identical (reasons in results.json); "
            "`*` p < 0.05, uncorrected for multiple comparisons. A missed organ counts as Dice 0. "
            "`fedbn` uses the bundle's default BatchNorm "
            f"(`{bn.get('bundle_default')}`); `fedbn[bn=...]` rows are the same model with each BatchNorm choice."
        ),
        "",
        dice_table(results, organs),
        "",
        "## The paper beside ours (external Dice, mean)",
        "",
        (
            "The paper's numbers are on BTCV with real CT; ours are on the configured external set. "
            "The paper has no FedAvg or partial-label central row."
        ),
        "",
        _paper_table(results, organs),
        "",
    ]
    if any(
        s.get(o, {}).get("hd95_mm", {}).get("mean") is not None for s in results["summary"].values() for o in organs
    ):
        lines += [
            "## External HD95 (mm, mean ± std over cases where the organ was predicted)",
            "",
            dice_table(results, organs, "hd95_mm"),
            "",
        ]
    if bn.get("choices"):
        lines += [
            "## BatchNorm at the external site (FedBN model)",
            "",
            "| BatchNorm | " + " | ".join(organs) + " | mean |",
            "|---|" + "---|" * (len(organs) + 1),
        ]
        for choice, row in bn["choices"].items():
            cells = [("–" if row["organs"].get(o) is None else f"{row['organs'][o]:.3f}") for o in organs]
            mean = "–" if row["mean"] is None else f"{row['mean']:.3f}"
            lines.append(
                f"| `{choice}`{' (recommended)' if choice == bn['recommended'] else ''} | "
                + " | ".join(cells)
                + f" | {mean} |"
            )
        lines += [
            "",
            (
                f"Recommended default: **`{bn['recommended']}`** (highest mean Dice over organs; the bundle's default is "
                f"`{bn.get('bundle_default')}`). Chosen on this external set, so it is a measurement for the next "
                "federation's default, not an unbiased estimate of its Dice."
            ),
            "",
        ]
    lines += ["## Figures", ""]
    for title, name in figures.items():
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    lines += ["## Reproduce", "", "```bash", *results["commands"], "```", ""]
    path = Path(path)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_dice_by_arm(path: str | Path, records: Sequence[Mapping], rows: Sequence[str], organs: Sequence[str]) -> Path:
    """Box plots of per-case external Dice by arm, one panel per organ, every case as a point."""
    plt = _plt()
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
    axes[0][0].set_ylabel("external Dice per case")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_rounds(path: str | Path, rounds: Mapping[str, Mapping[str, Sequence[Mapping]]], organs: Sequence[str]) -> Path:
    """Validation Dice per round (sites' held-out cases after local training, per organ) for FedAvg and FedBN.

    Args:
        rounds: ``{arm: {seed: bundle.metrics["rounds"]}}``.
    """
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(organs), figsize=(3.2 * len(organs) + 1, 3.4), sharey=True, squeeze=False)
    styles = {"fedavg": "--", "fedbn": "-"}
    for ax, organ in zip(axes[0], organs):
        for arm, per_seed in rounds.items():
            curves = []
            for history in per_seed.values():
                curves.append([h.get("dice", {}).get(organ, np.nan) for h in history])
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


def plot_batchnorm(
    path: str | Path, choices: Mapping[str, Mapping], organs: Sequence[str], recommended: str | None
) -> Path:
    """Grouped bars: external Dice per organ for each BatchNorm choice of the FedBN model."""
    plt = _plt()
    names = list(choices)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) * len(organs) / 2 + 3, 3.6))
    width = 0.8 / len(organs)
    x = np.arange(len(names))
    for i, organ in enumerate(organs):
        values = [choices[n]["organs"].get(organ) or 0.0 for n in names]
        ax.bar(
            x + (i - (len(organs) - 1) / 2) * width, values, width, label=organ, color=organ_by_name(organ).colour_float
        )
    ax.set_xticks(x)
    ax.set_xticklabels([f"{n}\n(recommended)" if n == recommended else n for n in names], fontsize=8)
    ax.set_ylabel("external Dice (mean)")
    ax.set_ylim(0, 1.0)
    ax.legend(fontsize=8, ncol=len(organs))
    ax.set_title("FedBN model: BatchNorm at the external site")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_overlays(
    path: str | Path, image: sitk.Image, reference: sitk.Image, predictions: Mapping[str, sitk.Image], case: str
) -> Path:
    """Reference and every arm's prediction of one external case (via :func:`~SegVizLogic.figures.render_overlays`)."""
    from ..figures import render_overlays

    return render_overlays(
        image, {"reference": reference, **predictions}, path, title=f"external case {case}: reference and each arm"
    )


def utc_now() -> str:
    """ISO time stamp (UTC, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
