"""The manifest of a model bundle (``*.segviz``), read without torch or MONAI.

A bundle is a zip file whose ``manifest.json`` describes everything else in it (format, network,
preprocessing, training, organ schema, provenance, metrics, BatchNorm variants and the SHA-256
of every other member). What only needs the description (``segviz model-info``, the Slicer
panel choosing a model) reads it here in milliseconds; :func:`SegVizLogic.bundle.load_bundle`
reads the manifest here too and then the weights.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from .errors import BundleError
from .organs import ORGANS

__all__ = [
    "BATCHNORM_DESCRIPTIONS",
    "BUNDLE_FORMAT",
    "FORMAT_NAME",
    "MANIFEST_MEMBER",
    "WEIGHTS_MEMBER",
    "batchnorm_choices",
    "buildable_batchnorm",
    "describe_batchnorm",
    "organ_schema",
    "read_manifest",
    "read_manifest_from_archive",
    "variant_member",
]

BUNDLE_FORMAT = 1
"""The newest bundle format this SegViz reads and the one it writes."""
FORMAT_NAME = "segviz-model"
MANIFEST_MEMBER = "manifest.json"
WEIGHTS_MEMBER = "weights.npz"


def organ_schema() -> list[dict]:
    """The organ schema a bundle records (label value, name, SNOMED CT code per organ)."""
    return [{"label": o.label, "name": o.name, "snomed": o.snomed_code} for o in ORGANS]


def variant_member(name: str) -> str:
    """Zip member holding BatchNorm variant ``name`` (``organ:liver`` -> ``batchnorm/organ__liver.npz``)."""
    return "batchnorm/" + name.replace(":", "__") + ".npz"


BATCHNORM_DESCRIPTIONS: dict[str, str] = {
    "model": "the BatchNorm stored with the weights, learnt with them (local or pooled training; FedAvg averages it "
    "every round)",
    "per-organ": "each organ's head with the BatchNorm of the sites that annotated that organ (organ:<organ>), "
    "one network pass per organ",
    "adapt": "BatchNorm statistics re-estimated on the input CT itself (test-time adaptation; needs nothing from any "
    "site)",
    "averaged": "the mean of every site's BatchNorm, each shared once at the end of training",
    "organ:": "the mean BatchNorm of the sites that annotated the {name}",
    "site:": "the BatchNorm of site {name}: for scans from that site's scanners",
}
"""What each BatchNorm choice means (``organ:`` and ``site:`` stand for every ``organ:<organ>`` and
``site:<name>``; ``{name}`` is filled in). The one table of them: ``model-info`` and the Slicer panel
show it."""


def describe_batchnorm(choice: str) -> str:
    """One line saying what BatchNorm choice ``choice`` means (see :data:`BATCHNORM_DESCRIPTIONS`)."""
    if choice in BATCHNORM_DESCRIPTIONS:
        return BATCHNORM_DESCRIPTIONS[choice]
    prefix, _, name = choice.partition(":")
    template = BATCHNORM_DESCRIPTIONS.get(prefix + ":")
    return template.format(name=name) if template and name else "a BatchNorm variant carried by the bundle"


def batchnorm_choices(manifest: dict) -> list[str]:
    """The BatchNorm choices that mean something for this bundle, for inference at a new site.

    - local, central and FedAvg bundles: ``model`` (the BatchNorm trained with the weights) and ``adapt``;
    - FedBN bundles: never ``model``: under FedBN BatchNorm stays at the sites, so the global model
      holds its initial BatchNorm, which no site trained with (empty label maps); ``adapt``;
    - with the BatchNorm the sites shared at the end: ``per-organ`` (an ``organ:<organ>`` variant
      for every organ), ``averaged``, ``organ:<organ>``, ``site:<name>``; under FedAvg ``averaged``
      is left out, being the ``model`` BatchNorm again.
    """
    provenance = manifest.get("provenance") or {}
    federated = provenance.get("kind") == "federated"
    strategy = provenance.get("strategy")
    variants = sorted(manifest.get("batchnorm_variants", []))
    if federated and strategy == "fedavg":
        variants = [v for v in variants if v != "averaged"]
    choices = [] if federated and strategy == "fedbn" else ["model"]
    if all(f"organ:{o}" in variants for o in manifest.get("network", {}).get("organs", [])):
        choices.append("per-organ")
    return [*choices, "adapt", *variants]


def buildable_batchnorm(manifest: dict) -> list[str]:
    """Every BatchNorm choice :meth:`SegVizLogic.bundle.ModelBundle.build_model` can build for this
    bundle, meaningful or not: ``model``, ``per-organ`` (with every ``organ:<organ>``), ``adapt`` and
    every variant. Experiments measure controls from it (a FedBN model's untrained ``model``
    BatchNorm); inference offers :func:`batchnorm_choices`."""
    variants = sorted(manifest.get("batchnorm_variants", []))
    choices = ["model", "adapt", *variants]
    if all(f"organ:{o}" in variants for o in manifest.get("network", {}).get("organs", [])):
        choices.insert(1, "per-organ")
    return choices


def read_manifest_from_archive(archive: zipfile.ZipFile, path: str | Path) -> dict:
    """The checked manifest of an open bundle archive.

    Raises:
        BundleError: no manifest, not JSON, not a SegViz bundle, a newer format, or another
            organ schema.
    """
    try:
        manifest = json.loads(archive.read(MANIFEST_MEMBER))
    except KeyError:
        raise BundleError(path, f"is not a SegViz model bundle (no {MANIFEST_MEMBER})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(path, f"is damaged: {MANIFEST_MEMBER} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(path, f"is not a SegViz model bundle (manifest format is not {FORMAT_NAME})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > BUNDLE_FORMAT:
        raise BundleError(
            path,
            f"is incompatible: bundle format {version} is newer than this SegViz reads ({BUNDLE_FORMAT}); update SegViz",
        )
    if manifest.get("organ_schema") != organ_schema():
        raise BundleError(path, "is incompatible: its organ schema (label values/codes) differs from this SegViz's")
    return manifest


def read_manifest(path: str | Path) -> dict:
    """The checked manifest of the bundle at ``path`` (no weights are read).

    Raises:
        BundleError: missing, not a zip file, or a manifest :func:`read_manifest_from_archive` refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(path, "model bundle not found")
    try:
        with zipfile.ZipFile(path) as archive:
            return read_manifest_from_archive(archive, path)
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise BundleError(path, f"is not a readable SegViz model bundle (damaged or truncated: {error})") from None
