"""The manifest of a model bundle (``*.segviz``), read and checked without torch or MONAI.

A bundle is a zip file whose ``manifest.json`` describes everything else in it (format, network,
preprocessing, training, organ schema, provenance, metrics, BatchNorm variants and the SHA-256
of every other member). What only needs the description (``segviz model-info``, the Slicer
panel choosing a model) reads it here in milliseconds; :func:`SegVizLogic.bundle.load_bundle`
reads the manifest here too and then the weights.

A bundle comes from another hospital or a coordinator, so nothing in it is trusted before it
is checked: :func:`check_archive` bounds the number and the unpacked size of its members (read
from the zip directory, before anything is unpacked), :func:`read_member` reads one member with
that cap, and :func:`validate_manifest` checks the manifest against its schema, with bounds,
before anything is built from it. Every refusal is a :class:`~SegVizLogic.errors.BundleError`
of one line naming the bundle, the field and the value.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import BundleError
from .organs import ORGAN_NAMES, ORGANS
from .site_names import site_name_problem

__all__ = [
    "ADAPTATIONS",
    "BATCHNORM_DESCRIPTIONS",
    "BUNDLE_FORMAT",
    "DEFAULT_THRESHOLD",
    "FORMAT_NAME",
    "MANIFEST_MEMBER",
    "MAX_MEMBERS",
    "MEMBER_LIMITS",
    "WEIGHTS_MEMBER",
    "batchnorm_choices",
    "buildable_batchnorm",
    "check_archive",
    "describe_batchnorm",
    "manifest_threshold",
    "member_limit",
    "organ_schema",
    "read_manifest",
    "read_manifest_from_archive",
    "read_member",
    "validate_manifest",
    "variant_member",
]

BUNDLE_FORMAT = 1
"""The newest bundle format this SegViz reads and the one it writes."""
FORMAT_NAME = "segviz-model"
MANIFEST_MEMBER = "manifest.json"
WEIGHTS_MEMBER = "weights.npz"

_MiB = 1 << 20
MEMBER_LIMITS: dict[str, int] = {
    MANIFEST_MEMBER: 16 * _MiB,
    WEIGHTS_MEMBER: 1024 * _MiB,
    "batchnorm/": 64 * _MiB,
    "": 16 * _MiB,
}
"""Largest unpacked size of a member: the manifest, the weights, each BatchNorm variant
(``batchnorm/...``) and anything else (``""``). The paper's network is 19 MB of weights and
the largest the schema admits about 1 GB; a manifest with per-round metrics of a long run is
well under 1 MB. A 722 KB bundle whose manifest inflates to 600 MB is refused before unpacking."""
MAX_MEMBERS = 2048
"""Most members a bundle may have (weights, manifest and one BatchNorm set per site and organ)."""

# Bounds of the schema: generous for any real network, and far from what would exhaust memory
# (channels 4096-16384 asked for 14.5 GB before anything could be checked).
_MAX_CHANNELS = 1024
_LEVELS = (2, 8)
_MAX_STRIDE = 4
_MAX_RES_UNITS = 8
_MAX_BODY_FEATURES = 256
_SPACING_MM = (0.1, 20.0)
_HU_LIMITS = (-5000.0, 50000.0)
_WINDOW_LIMITS = (8, 1024)
_MAX_WINDOW_VOXELS = 256**3
_NETWORK_KEYS = ("organs", "channels", "strides", "num_res_units", "body_features", "dropout", "output")
_PREPROCESSING_KEYS = ("spacing", "hu_window", "orientation")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def organ_schema() -> list[dict]:
    """The organ schema a bundle records (label value, name, SNOMED CT code per organ)."""
    return [{"label": o.label, "name": o.name, "snomed": o.snomed_code} for o in ORGANS]


def variant_member(name: str) -> str:
    """Zip member holding BatchNorm variant ``name`` (``organ:liver`` -> ``batchnorm/organ__liver.npz``)."""
    return "batchnorm/" + name.replace(":", "__") + ".npz"


DEFAULT_THRESHOLD = 0.5
"""Organ probability above which inference labels a voxel, for a bundle that carries no threshold
chosen on validation (``inference`` of :func:`SegVizLogic.bundle.save_bundle`; a federation asks its sites)."""


def manifest_threshold(manifest: dict) -> float:
    """The organ probability threshold a bundle's manifest sets (``inference.threshold``), else
    :data:`DEFAULT_THRESHOLD`."""
    return float(manifest.get("inference", {}).get("threshold", DEFAULT_THRESHOLD))


ADAPTATIONS = ("adapt", "adapt-organs")
"""The BatchNorm choices whose statistics are re-estimated on the input CT itself; every bundle offers them."""

BATCHNORM_DESCRIPTIONS: dict[str, str] = {
    "model": "the BatchNorm stored with the weights, learnt with them (local or pooled training; FedAvg averages it "
    "every round)",
    "per-organ": "each organ's head with the BatchNorm of the sites that annotated that organ (organ:<organ>), "
    "one network pass per organ",
    "adapt": "BatchNorm statistics re-estimated on the input CT itself (test-time adaptation; needs nothing from any "
    "site)",
    "adapt-organs": "as adapt, the statistics read mostly around the organs a first quick pass finds, as training "
    "patches were (a little better across scanners in validation; one more pass)",
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

    - local, central and FedAvg bundles: ``model`` (the BatchNorm trained with the weights), ``adapt``
      and ``adapt-organs``;
    - FedBN bundles: never ``model``: under FedBN BatchNorm stays at the sites, so the global model
      holds its initial BatchNorm, which no site trained with (empty label maps); ``adapt``, ``adapt-organs``;
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
    if all(f"organ:{o}" in variants for o in manifest.get("network", {}).get("organs", ORGAN_NAMES)):
        choices.append("per-organ")
    return [*choices, *ADAPTATIONS, *variants]


def buildable_batchnorm(manifest: dict) -> list[str]:
    """Every BatchNorm choice :meth:`SegVizLogic.bundle.ModelBundle.build_model` can build for this
    bundle, meaningful or not: ``model``, ``per-organ`` (with every ``organ:<organ>``), ``adapt``,
    ``adapt-organs`` and every variant. Experiments measure controls from it (a FedBN model's untrained ``model``
    BatchNorm); inference offers :func:`batchnorm_choices`."""
    variants = sorted(manifest.get("batchnorm_variants", []))
    choices = ["model", *ADAPTATIONS, *variants]
    if all(f"organ:{o}" in variants for o in manifest.get("network", {}).get("organs", ORGAN_NAMES)):
        choices.insert(1, "per-organ")
    return choices


# --------------------------------------------------------------------------------------
# Members: count and unpacked size, checked on the zip directory before anything is unpacked
# --------------------------------------------------------------------------------------


def member_limit(name: str) -> int:
    """Largest unpacked size in bytes of member ``name`` (see :data:`MEMBER_LIMITS`)."""
    if name in MEMBER_LIMITS:
        return MEMBER_LIMITS[name]
    return MEMBER_LIMITS["batchnorm/"] if name.startswith("batchnorm/") else MEMBER_LIMITS[""]


def _size(n: int) -> str:
    return f"{n / _MiB:.0f} MB" if n >= _MiB else f"{n} bytes"


def check_archive(archive: zipfile.ZipFile, path: str | Path) -> None:
    """Refuse a bundle with too many members or a member that would unpack beyond its limit.

    Only the zip directory is read. :func:`read_member` caps the actual read as well, since a
    forged directory can understate a size.

    Raises:
        BundleError: naming the member, its unpacked size and the limit.
    """
    members = archive.infolist()
    if len(members) > MAX_MEMBERS:
        raise BundleError(path, f"is not a SegViz model bundle ({len(members)} members; at most {MAX_MEMBERS})")
    for info in members:
        limit = member_limit(info.filename)
        if info.file_size > limit:
            raise BundleError(
                path, f"is refused: {info.filename} unpacks to {_size(info.file_size)} (limit {_size(limit)})"
            )


def read_member(archive: zipfile.ZipFile, name: str, path: str | Path) -> bytes:
    """Read member ``name``, never more than its limit, whatever the zip directory says.

    Raises:
        KeyError: no such member (the caller says what it means).
        BundleError: the member is larger than its limit.
    """
    limit = member_limit(name)
    info = archive.getinfo(name)
    if info.file_size > limit:
        raise BundleError(path, f"is refused: {name} unpacks to {_size(info.file_size)} (limit {_size(limit)})")
    with archive.open(info) as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise BundleError(path, f"is refused: {name} unpacks to more than {_size(limit)}")
    return data


# --------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


class _Checker:
    """Collects nothing: the first problem raises, naming the bundle and the field."""

    def __init__(self, path: str | Path) -> None:
        self.path = path

    def fail(self, field: str, expected: str, value: Any) -> None:
        raise BundleError(self.path, f"invalid manifest: {field} must be {expected}, got {_shown(value)}")

    def mapping(self, data: Mapping, key: str, field: str, required: bool = False) -> dict:
        if key not in data:
            if required:
                raise BundleError(self.path, f"invalid manifest: {field} is missing")
            return {}
        value = data[key]
        if not isinstance(value, dict):
            self.fail(field, "an object", value)
        return value

    def string(self, data: Mapping, key: str, field: str) -> None:
        if key in data and not isinstance(data[key], str):
            self.fail(field, "a string", data[key])

    def int_list(self, value: Any, field: str, length: tuple[int, int], bounds: tuple[int, int]) -> list[int]:
        low, high = bounds
        expected = (
            f"a list of {length[0]} whole numbers from {low} to {high}"
            if length[0] == length[1]
            else f"a list of {length[0]} to {length[1]} whole numbers from {low} to {high}"
        )
        if (
            not isinstance(value, list)
            or not length[0] <= len(value) <= length[1]
            or not all(_is_int(v) and low <= v <= high for v in value)
        ):
            self.fail(field, expected, value)
        return value

    def number_list(self, value: Any, field: str, length: int, bounds: tuple[float, float]) -> list[float]:
        low, high = bounds
        if (
            not isinstance(value, list)
            or len(value) != length
            or not all(_is_number(v) and low <= v <= high for v in value)
        ):
            self.fail(field, f"a list of {length} numbers from {low:g} to {high:g}", value)
        return value

    def organ_list(self, value: Any, field: str, allowed: tuple[str, ...]) -> list[str]:
        if (
            not isinstance(value, list)
            or not all(isinstance(v, str) and v in allowed for v in value)
            or len(set(value)) != len(value)
        ):
            self.fail(field, f"a list of distinct organ names from {', '.join(allowed)}", value)
        return value

    def unknown_keys(self, data: Mapping, known: tuple[str, ...], field: str) -> None:
        unknown = sorted(str(k) for k in set(data) - set(known))
        if unknown:
            raise BundleError(
                self.path, f"invalid manifest: unknown {field} keys {', '.join(unknown)} (known: {', '.join(known)})"
            )


def _check_network(check: _Checker, network: dict) -> tuple[str, ...]:
    check.unknown_keys(network, _NETWORK_KEYS, "network")
    organs = tuple(check.organ_list(network.get("organs", list(ORGAN_NAMES)), "network.organs", ORGAN_NAMES))
    if not organs:
        check.fail("network.organs", "a non-empty list of organ names", [])
    channels = check.int_list(network.get("channels", [16, 32]), "network.channels", _LEVELS, (1, _MAX_CHANNELS))
    levels = len(channels) - 1
    check.int_list(network.get("strides", [2] * levels), "network.strides", (levels, levels), (1, _MAX_STRIDE))
    for key, bounds in (("num_res_units", (0, _MAX_RES_UNITS)), ("body_features", (1, _MAX_BODY_FEATURES))):
        value = network.get(key, bounds[0])
        if not _is_int(value) or not bounds[0] <= value <= bounds[1]:
            check.fail(f"network.{key}", f"a whole number from {bounds[0]} to {bounds[1]}", value)
    dropout = network.get("dropout", 0.0)
    if not _is_number(dropout) or not 0 <= dropout < 1:
        check.fail("network.dropout", "a number from 0 to below 1", dropout)
    if network.get("output", "sigmoid") not in ("sigmoid", "softmax"):
        check.fail("network.output", "'sigmoid' or 'softmax'", network.get("output"))
    return organs


def _check_preprocessing(check: _Checker, preprocessing: dict) -> None:
    check.unknown_keys(preprocessing, _PREPROCESSING_KEYS, "preprocessing")
    for key in ("spacing", "hu_window"):
        if key not in preprocessing:
            raise BundleError(check.path, f"invalid manifest: preprocessing.{key} is missing")
    check.number_list(preprocessing["spacing"], "preprocessing.spacing", 3, _SPACING_MM)
    low, high = check.number_list(preprocessing["hu_window"], "preprocessing.hu_window", 2, _HU_LIMITS)
    if low >= high:
        check.fail("preprocessing.hu_window", "[low, high] with low < high", preprocessing["hu_window"])
    orientation = preprocessing.get("orientation", "RAS")
    if (
        not isinstance(orientation, str)
        or len(orientation) != 3
        or sorted(_AXIS_OF.get(c, "?") for c in orientation.upper()) != ["ap", "lr", "si"]
    ):
        check.fail("preprocessing.orientation", "three axis letters such as 'RAS' or 'LPS'", orientation)


_AXIS_OF = {"L": "lr", "R": "lr", "A": "ap", "P": "ap", "S": "si", "I": "si"}


def _check_window(check: _Checker, value: Any, field: str, divisor: int) -> None:
    low, high = _WINDOW_LIMITS
    roi = check.int_list(value, field, (3, 3), (low, high))
    if any(r % divisor for r in roi):
        check.fail(field, f"multiples of {divisor} (the product of the network's strides)", value)
    if math.prod(roi) > _MAX_WINDOW_VOXELS:
        check.fail(field, f"a window of at most {_MAX_WINDOW_VOXELS} voxels", value)


def _check_variants(check: _Checker, manifest: dict, organs: tuple[str, ...]) -> list[str]:
    variants = manifest.get("batchnorm_variants", [])
    if not isinstance(variants, list) or not all(isinstance(v, str) for v in variants):
        check.fail("batchnorm_variants", "a list of names", variants)
    if len(set(variants)) != len(variants):
        check.fail("batchnorm_variants", "a list of distinct names", variants)
    for name in variants:
        kind, _, rest = name.partition(":")
        if name == "averaged" or (kind == "organ" and rest in organs):
            continue
        if kind == "site" and site_name_problem(rest) is None:
            continue
        check.fail(
            "each of batchnorm_variants", "'averaged', 'organ:<organ of the network>' or 'site:<site name>'", name
        )
    return variants


def validate_manifest(manifest: Any, path: str | Path) -> dict:
    """Check a bundle manifest against its schema, with bounds; return it unchanged.

    Checked before anything is built from it: the format and version, the organ schema, the
    network (known keys; organs; 2-8 levels of 1-1024 channels; strides 1-4; residual units,
    body features, dropout, output), the preprocessing (spacing 0.1-20 mm, an increasing HU
    window, an orientation code), the inference window and training patch (8-1024 voxels a
    side, multiples of the strides' product, at most 256³ voxels), the inference threshold
    (between 0 and 1), trained organs, BatchNorm
    variants (``averaged``, ``organ:<organ>``, ``site:<valid site name>``), the default
    BatchNorm, and a SHA-256 for the weights and every variant. Descriptive sections
    (``training``, ``provenance``, ``metrics``) must be objects.

    Args:
        manifest: the parsed ``manifest.json`` (any JSON value).
        path: the bundle, named in the error.

    Returns:
        ``manifest``.

    Raises:
        BundleError: one line naming the field, what it must be, and what it is.

    Example::

        validate_manifest({"format": "segviz-model", "format_version": 1, ...}, "m.segviz")
    """
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(path, f"is not a SegViz model bundle (manifest format is not {FORMAT_NAME})")
    version = manifest.get("format_version")
    if not _is_int(version) or version > BUNDLE_FORMAT:
        raise BundleError(
            path,
            f"is incompatible: bundle format {version} is newer than this SegViz reads ({BUNDLE_FORMAT}); update SegViz",
        )
    if manifest.get("organ_schema") != organ_schema():
        raise BundleError(path, "is incompatible: its organ schema (label values/codes) differs from this SegViz's")
    check = _Checker(path)
    for key in ("created", "segviz_version", "default_batchnorm"):
        check.string(manifest, key, key)
    for key in ("training", "provenance", "metrics", "inference"):
        check.mapping(manifest, key, key)
    network = check.mapping(manifest, "network", "network", required=True)
    organs = _check_network(check, network)
    _check_preprocessing(check, check.mapping(manifest, "preprocessing", "preprocessing", required=True))
    divisor = math.prod(network.get("strides", [2] * (len(network.get("channels", [16, 32])) - 1)))
    inference = manifest.get("inference", {})
    if "roi_size" in inference:
        _check_window(check, inference["roi_size"], "inference.roi_size", divisor)
    if "threshold" in inference:
        value = inference["threshold"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
            check.fail("inference.threshold", "a number between 0 and 1 (exclusive)", value)
    training = manifest.get("training", {})
    if "patch_size" in training:
        _check_window(check, training["patch_size"], "training.patch_size", divisor)
    sites = manifest.get("provenance", {}).get("sites", [])
    if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
        check.fail("provenance.sites", "a list of site names", sites)
    if "trained_organs" in manifest:
        check.organ_list(manifest["trained_organs"], "trained_organs", organs)
    variants = _check_variants(check, manifest, organs)
    default = manifest.get("default_batchnorm", "model")
    choices = batchnorm_choices(manifest)
    if default not in choices:
        check.fail("default_batchnorm", f"one of {', '.join(choices)}", default)
    checksums = check.mapping(manifest, "sha256", "sha256", required=True)
    for member in [WEIGHTS_MEMBER, *(variant_member(v) for v in variants)]:
        if member not in checksums:
            raise BundleError(path, f"is damaged: manifest lists no checksum for {member}")
    for member, digest in checksums.items():
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            check.fail(f"sha256[{member!r}]", "64 lower-case hexadecimal digits", digest)
    return manifest


def read_manifest_from_archive(archive: zipfile.ZipFile, path: str | Path) -> dict:
    """The checked manifest of an open bundle archive (members bounded, schema validated).

    Raises:
        BundleError: too many or too large members, no manifest, not JSON, not a SegViz
            bundle, a newer format, another organ schema, or a manifest :func:`validate_manifest` refuses.
    """
    check_archive(archive, path)
    try:
        manifest = json.loads(read_member(archive, MANIFEST_MEMBER, path), object_pairs_hook=_no_duplicate_keys)
    except KeyError:
        raise BundleError(path, f"is not a SegViz model bundle (no {MANIFEST_MEMBER})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(path, f"is damaged: {MANIFEST_MEMBER} is not valid JSON ({error})") from None
    except _DuplicateKey as error:
        raise BundleError(path, f"invalid manifest: key {error.args[0]!r} appears twice") from None
    return validate_manifest(manifest, path)


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """``json`` keeps the last of repeated keys silently; a manifest saying two things is refused."""
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _read_archive(path: str | Path, read: Callable[[zipfile.ZipFile], Any]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise BundleError(path, "model bundle not found")
    try:
        with zipfile.ZipFile(path) as archive:
            return read(archive)
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise BundleError(path, f"is not a readable SegViz model bundle (damaged or truncated: {error})") from None


def read_manifest(path: str | Path) -> dict:
    """The checked manifest of the bundle at ``path`` (no weights are read).

    Raises:
        BundleError: missing, not a zip file, or a manifest :func:`read_manifest_from_archive` refuses.
    """
    return _read_archive(path, lambda archive: read_manifest_from_archive(archive, path))
