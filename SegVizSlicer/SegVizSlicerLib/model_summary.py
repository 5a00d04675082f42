"""What the panel says about a model bundle, read in-process from its manifest (no torch, no child).

A bundle is a zip whose ``manifest.json`` describes it; :func:`SegVizLogic.bundle_manifest.read_manifest`
reads and checks it in milliseconds, so choosing a bundle (and opening the module with the last
one) never blocks Slicer. Whether the federation's coordinator signed the bundle is asked of
``SegVizLogic.signing`` when this SegViz has it; the panel shows that line under the summary.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from SegVizLogic.bundle_manifest import batchnorm_choices, read_manifest
from SegVizLogic.errors import SegVizError

__all__ = ["ModelSummary", "describe_model", "signature_line"]


@dataclass(frozen=True)
class ModelSummary:
    """The model section's text and whether Apply may use the bundle."""

    text: str
    usable: bool
    signature: str
    organs: tuple[str, ...] = ()
    batchnorm: tuple[str, ...] = ()


def describe_model(path: str | Path | None, trust: str | Path | None = None) -> ModelSummary:
    """Summarise the bundle at ``path`` for the panel; never raises for a bad file.

    Args:
        path: the ``*.segviz`` file (None or "" when none is chosen).
        trust: the federation's trusted-entities file, to check the bundle's signature against.
    """
    if path is None or str(path) in ("", "."):
        return ModelSummary("No model bundle selected.", False, "")
    try:
        manifest = read_manifest(path)
    except SegVizError as error:  # BundleError names the file and what is wrong with it
        return ModelSummary(f"Cannot use this model: {error}", False, "")
    provenance = manifest.get("provenance", {})
    organs = tuple(manifest.get("network", {}).get("organs", []))
    sites = provenance.get("sites") or []
    rounds = provenance.get("rounds")
    trained = f"{rounds} federated rounds" if rounds else "not federated"
    metrics = manifest.get("metrics", {}).get("final", {})
    dice = metrics.get("val_dice") if isinstance(metrics.get("val_dice"), dict) else {}
    dice = {str(organ): value for organ, value in dice.items() if _is_number(value)}
    lines = [
        f"Organs: {', '.join(organs) or '?'}",
        f"Trained by: {', '.join(str(s) for s in sites) or '?'} ({provenance.get('strategy', 'local')}, {trained})",
        f"Created: {str(manifest.get('created') or provenance.get('trained') or '?')[:10]}",
    ]
    if dice:
        lines.append("Validation Dice: " + ", ".join(f"{organ} {value:.2f}" for organ, value in dice.items()))
    return ModelSummary(
        "\n".join(lines),
        True,
        signature_line(path, trust),
        organs,
        tuple(batchnorm_choices(manifest)),
    )


def signature_line(path: str | Path, trust: str | Path | None = None) -> str:
    """One line on the bundle's signature, from ``SegVizLogic.signing.signature_status`` (torch-free)
    when this SegViz has it; otherwise says that it cannot be checked here."""
    try:
        signing = importlib.import_module("SegVizLogic.signing")
    except ImportError:
        return "Signature: not checked (this SegViz version cannot verify bundle signatures)"
    status = getattr(signing, "signature_status", None)
    if status is None:
        return "Signature: not checked (this SegViz version cannot verify bundle signatures)"
    try:
        result = status(path, trust) if trust else status(path)
    except SegVizError as error:
        return f"Signature: {error}"
    return f"Signature: {getattr(result, 'message', result)}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
