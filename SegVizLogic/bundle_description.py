"""What ``segviz model-info`` says about a model bundle, from its manifest alone (no torch).

:func:`describe_bundle` gathers everything a bundle records into one JSON-ready dict: how it was
trained (strategy, sites, budget), every setting (network, preprocessing, training, federation),
how many cases each site held out for validation (counts, never names), the BatchNorm choices
that mean something for it with what each does, and its last validation metrics.
:func:`format_bundle_description` turns that dict into the text people read; its setup sections
are TOML, so they can be copied into a ``--config`` file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .bundle_manifest import batchnorm_choices, describe_batchnorm, manifest_threshold

__all__ = ["describe_bundle", "format_bundle_description"]

# Keys of the manifest's [training] that are the budget, not TrainingConfig fields.
_BUDGET_KEYS = ("local_epochs", "lr", "epochs")
_STRATEGY_NAMES = {"fedbn": "FedBN", "fedavg": "FedAvg"}
# Per-site metrics a federated site reports each round, and how model-info names them.
_SITE_METRICS = {"num-examples": "training_cases", "num-val-examples": "validation_cases", "loss": "loss"}


def _kind(provenance: dict) -> str:
    if provenance.get("kind") == "federated":
        return str(provenance.get("strategy", "fedbn"))
    return str(provenance.get("strategy", "local"))


def _federated_metrics(rounds: list) -> dict[str, Any]:
    last = rounds[-1] if rounds and isinstance(rounds[-1], dict) else {}
    sites = {}
    for site, values in sorted((last.get("sites") or {}).items()):
        entry: dict[str, Any] = {name: values[key] for key, name in _SITE_METRICS.items() if key in values}
        for name in ("training_cases", "validation_cases"):  # metric records carry every number as a float
            if isinstance(entry.get(name), float):
                entry[name] = int(entry[name])
        entry["val_dice"] = {k[len("dice-") :]: v for k, v in values.items() if k.startswith("dice-")}
        if "train-seconds" in values:
            entry["train_seconds"] = values["train-seconds"]
        sites[site] = entry
    return {
        "round": last.get("round"),
        "loss": last.get("loss"),
        "val_dice": dict(last.get("dice") or {}),
        "sites": sites,
    }


def _cases_per_site(provenance: dict, metrics: dict) -> dict[str, dict[str, int | None]]:
    if provenance.get("cases_per_site"):
        return {site: dict(counts) for site, counts in provenance["cases_per_site"].items()}
    # A federation learns the counts from the sites' replies of the last round.
    return {
        site: {"training": values.get("training_cases"), "validation": values.get("validation_cases")}
        for site, values in (metrics.get("sites") or {}).items()
    }


def describe_bundle(manifest: dict, path: str | Path) -> dict[str, Any]:
    """Everything a bundle's manifest says about how it was trained, as a JSON-ready dict.

    Args:
        manifest: the checked manifest (:func:`SegVizLogic.bundle_manifest.read_manifest`).
        path: the bundle's path (reported as given).

    Returns:
        ``path``, ``organs``, ``trained_organs``, ``strategy``, ``rounds``, ``sites``,
        ``site_organs``, ``cases_per_site`` ({site: {"training": n, "validation": n}}),
        ``created``, ``segviz_version``, ``spacing_mm``, ``budget`` (epochs or rounds x local
        epochs, lr, weighting), ``setup`` ({network, preprocessing, training[, federation]}),
        ``setup_source``, ``default_batchnorm``, ``batchnorm_choices``, ``batchnorm`` ({choice:
        what it means}) and ``metrics`` (the last validation Dice per organ, and per site for a
        federation).
    """
    provenance = dict(manifest.get("provenance") or {})
    recorded = dict(manifest.get("metrics") or {})
    federated = provenance.get("kind") == "federated"
    training = dict(manifest.get("training") or {})
    budget_values = {key: training.pop(key) for key in _BUDGET_KEYS if key in training}
    lr = budget_values.get("lr", provenance.get("lr"))
    setup: dict[str, dict] = {
        "network": dict(manifest.get("network") or {}),
        "preprocessing": dict(manifest.get("preprocessing") or {}),
        "training": training,
    }
    if federated:
        budget = {
            "rounds": provenance.get("rounds"),
            "local_epochs": budget_values.get("local_epochs", provenance.get("local_epochs")),
            "lr": lr,
            "weighting": provenance.get("weighting"),
        }
        setup["federation"] = dict(budget)
        metrics = _federated_metrics(list(recorded.get("rounds") or []))
    else:
        budget = {"epochs": provenance.get("epochs"), "lr": lr}
        final = dict(recorded.get("final") or {})
        metrics = {
            "epoch": provenance.get("best_epoch"),
            "selection": provenance.get("selection", "best mean validation Dice"),
            "val_dice": dict(final.get("val_dice") or {}),
        }
    choices = batchnorm_choices(manifest)
    network = setup["network"]
    return {
        "path": str(path),
        "organs": list(network.get("organs", [])),
        "trained_organs": list(manifest.get("trained_organs", network.get("organs", []))),
        "strategy": _kind(provenance),
        "mode": provenance.get("mode"),
        "rounds": provenance.get("rounds"),
        "sites": list(provenance.get("sites", [])),
        "site_organs": dict(provenance.get("organs_per_site") or provenance.get("site_organs") or {}),
        "cases_per_site": _cases_per_site(provenance, metrics),
        "created": manifest.get("created"),
        "segviz_version": manifest.get("segviz_version"),
        "flower_version": provenance.get("flower_version"),
        "spacing_mm": list(setup["preprocessing"].get("spacing", [])),
        "budget": budget,
        "setup": setup,
        "setup_source": provenance.get("setup"),
        "default_batchnorm": manifest.get("default_batchnorm", "model"),
        "batchnorm_choices": choices,
        "batchnorm": {choice: describe_batchnorm(choice) for choice in choices},
        "threshold": manifest_threshold(manifest),
        "threshold_rule": manifest.get("inference", {}).get("threshold_rule"),
        "metrics": metrics,
    }


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "null" if value is None else str(value)


def _dice_text(dice: dict) -> str:
    return "  ".join(f"{organ} {value:.3f}" for organ, value in dice.items() if isinstance(value, (int, float))) or "-"


def _counts_text(counts: dict) -> str:
    training, validation = counts.get("training"), counts.get("validation")
    if training is None and validation is None:
        return "case counts not recorded"
    held = "?" if validation is None else str(validation)
    return f"{'?' if training is None else training} training, {held} held out for validation"


def format_bundle_description(info: dict[str, Any]) -> str:
    """The text of ``segviz model-info`` for a :func:`describe_bundle` dict."""
    budget = info["budget"]
    strategy = info["strategy"]
    lines = [f"{'model':<14} {info['path']}"]
    trained = info["trained_organs"]
    organs = ", ".join(info["organs"])
    if trained != info["organs"]:
        organs += f" (heads trained: {', '.join(trained) or 'none'})"
    lines.append(f"{'organs':<14} {organs}")
    sites = info["sites"]
    if "rounds" in budget and budget.get("rounds") is not None:
        how = (
            f"{_STRATEGY_NAMES.get(strategy, strategy)} federation"
            f"{' (' + info['mode'] + ')' if info.get('mode') else ''} of {len(sites)} sites, "
            f"{budget['rounds']} rounds x {budget.get('local_epochs')} local epochs, lr {budget.get('lr')}, "
            f"{budget.get('weighting')} weighting"
        )
    else:
        metrics = info["metrics"]
        kept = f" (kept epoch {metrics['epoch']}: {metrics.get('selection')})" if metrics.get("epoch") else ""
        how = f"{strategy} on {', '.join(sites) or '?'}, {budget.get('epochs')} epochs{kept}, lr {budget.get('lr')}"
    lines.append(f"{'training':<14} {how}")
    for site in sites:
        declared = info["site_organs"].get(site)
        counts = info["cases_per_site"].get(site, {})
        lines.append(
            f"{'sites' if site == sites[0] else '':<14} {site}"
            f"{' (' + ', '.join(declared) + ')' if declared else ''}: {_counts_text(counts)}"
        )
    made = f"{info.get('created') or '?'} with SegViz {info.get('segviz_version') or '?'}"
    if info.get("flower_version"):
        made += f", Flower {info['flower_version']}"
    lines.append(f"{'created':<14} {made}")
    if info.get("signature"):
        lines.append(f"{'signature':<14} {info['signature']['message']}")
    if info.get("setup_source"):
        lines.append(f"{'setup':<14} {info['setup_source']}")

    lines += ["", "# every setting, as a --config file would hold it"]
    for section, values in info["setup"].items():
        lines += ["", f"[{section}]"] + [f"{key} = {_toml(value)}" for key, value in values.items()]

    lines += [
        "",
        f"BatchNorm for a new site (default {info['default_batchnorm']}; choose with segviz infer --batchnorm):",
    ]
    width = max((len(c) for c in info["batchnorm"]), default=0)
    lines += [f"  {choice:<{width}}  {text}" for choice, text in info["batchnorm"].items()]
    rule = info["threshold_rule"] or "the default; not chosen on validation"
    lines += ["", f"Organ probability threshold {info['threshold']:g} ({rule}; change with segviz infer --threshold)"]

    metrics = info["metrics"]
    if metrics.get("round") is not None:
        lines += [
            "",
            (
                f"validation in round {metrics['round']} (Dice on each site's held-out cases, at the site, of the"
                " site's model after its local training, before averaging: not the bundle's averaged model, which"
                " segviz experiment validates):"
            ),
        ]
        lines.append(f"  {'all sites':<16} {_dice_text(metrics.get('val_dice') or {})}")
        for site, values in metrics.get("sites", {}).items():
            extra = []
            if isinstance(values.get("loss"), (int, float)):
                extra.append(f"loss {values['loss']:.4f}")
            if isinstance(values.get("train_seconds"), (int, float)):
                extra.append(f"{values['train_seconds']:.1f} s training")
            lines.append(f"  {site:<16} {_dice_text(values.get('val_dice') or {})}   {', '.join(extra)}".rstrip())
    elif "epoch" in metrics:
        where = f"epoch {metrics['epoch']}" if metrics.get("epoch") else "no epoch recorded"
        lines += ["", f"validation ({where}; Dice on the held-out cases):"]
        lines.append(f"  {'Dice':<16} {_dice_text(metrics.get('val_dice') or {})}")
    return "\n".join(lines)
