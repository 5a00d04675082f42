"""Model bundles (``*.segviz``): weights, network config, organ schema, preprocessing,
provenance and checksums in one zip file.

Layout of the zip:

- ``manifest.json``: format, network, preprocessing, training, organ schema, provenance,
  metrics, BatchNorm variants, SHA-256 of every array file.
- ``weights.npz``: the full state dict (numpy arrays, no pickle).
- ``batchnorm/<variant>.npz``: BatchNorm tensors for inference at a site that never trained:
  ``averaged``, ``organ:<organ>`` (from the sites that trained that organ), ``site:<name>``.

Loading verifies the zip, the checksums, the schema and the state-dict keys, and refuses a
damaged, truncated or incompatible bundle with a :class:`~SegVizLogic.errors.BundleError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .bundle_manifest import (
    ADAPTATIONS,
    BUNDLE_FORMAT,
    DEFAULT_THRESHOLD,
    FORMAT_NAME,
    MANIFEST_MEMBER,
    WEIGHTS_MEMBER,
    batchnorm_choices,
    check_archive,
    manifest_threshold,
    member_limit,
    organ_schema,
    read_manifest_from_archive,
    read_member,
    variant_member,
)
from .errors import BundleError, SegVizInputError
from .network import (
    PARTITION_BATCHNORM,
    MultiOrganUNet,
    NetworkConfig,
    build_network,
    partition_state,
)
from .preprocessing import Preprocessing

__all__ = [
    "BUNDLE_FORMAT",
    "DEFAULT_THRESHOLD",
    "FEDBN_DEFAULT_BATCHNORM",
    "ModelBundle",
    "batchnorm_variant_names",
    "load_bundle",
    "save_bundle",
]

FEDBN_DEFAULT_BATCHNORM = "adapt"
"""The BatchNorm a FedBN bundle segments with by default at a site that never trained: test-time
adaptation (:func:`~SegVizLogic.inference.adapt_batchnorm`) of the model's BatchNorm, whose gamma
and beta are the initial 1 and 0 in a FedBN model. Chosen by the leave-site-out rule on the
sites' validation cases (docs/METHOD.md: each site's held-out cases segmented with BatchNorm that
holds nothing of its own), never on an external set: +0.15 mean Dice over the sites' averaged
BatchNorm, +0.05 over adapting from the averaged gamma and beta, level with the previous
adaptation (-0.004 and +0.005 in two trainings) whose windows could be padding or one side of
the body. A federation that asks its sites the threshold question offers it first, beside
``adapt-organs``, and keeps the pair its sites' validation cases prefer
(:func:`~SegVizLogic.threshold_selection.batchnorm_candidates`)."""


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    return buffer.getvalue()


def batchnorm_variant_names(organs: tuple[str, ...], sites: tuple[str, ...] = ()) -> list[str]:
    """All BatchNorm variant names a bundle can carry for these organs and sites."""
    return ["averaged"] + [f"organ:{o}" for o in organs] + [f"site:{s}" for s in sites]


def save_bundle(
    path: str | Path,
    model: MultiOrganUNet,
    preprocessing: Preprocessing,
    provenance: Mapping | None = None,
    batchnorm_variants: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    default_batchnorm: str = "model",
    metrics: Mapping | None = None,
    training: Mapping | None = None,
    roi_size: tuple[int, int, int] | None = None,
    trained_organs: tuple[str, ...] | list[str] | None = None,
    force: bool = False,
    inference: Mapping | None = None,
) -> Path:
    """Write a model bundle atomically.

    Args:
        path: destination (``*.segviz``).
        model: the network whose state is saved (its BatchNorm is the ``model`` variant).
        preprocessing: how inputs must be prepared.
        provenance: strategy, rounds, sites, organs per site, dates, commands.
        batchnorm_variants: extra BatchNorm sets (``averaged``, ``organ:<organ>``,
            ``site:<name>``), each a ``{state key: array}`` of the BatchNorm tensors.
        default_batchnorm: the variant inference uses by default: ``model``, a variant name,
            ``per-organ`` (each organ's head with its ``organ:<organ>`` BatchNorm) or
            ``adapt`` (re-estimated on the input).
        metrics: metrics to carry (per round, per organ...).
        training: the training config.
        roi_size: sliding-window size for inference (default: the training patch size).
        trained_organs: organs whose heads were trained (default: all); inference never
            outputs an organ whose head no site taught.
        force: overwrite an existing file.
        inference: inference settings chosen for it (``threshold``, ``threshold_rule``), checked on load.

    Raises:
        SegVizInputError: the file exists and ``force`` is false.
    """
    path = Path(path)
    if path.exists() and not force:
        raise SegVizInputError(path, "already exists; use --force to overwrite")
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    variants = {
        name: {k: np.asarray(v) for k, v in arrays.items()} for name, arrays in (batchnorm_variants or {}).items()
    }
    bn_keys = set(partition_state(model).get(PARTITION_BATCHNORM, {}))
    for name, arrays in variants.items():
        # Flower ships 0-d tensors (num_batches_tracked) as shape (1,): store each in the model's shape.
        for key, array in arrays.items():
            if key in state and array.shape != state[key].shape and array.size == state[key].size:
                arrays[key] = array.reshape(state[key].shape)
        if set(arrays) != bn_keys:
            raise ValueError(f"BatchNorm variant {name!r} does not hold exactly the model's BatchNorm tensors")
    threshold = (inference or {}).get("threshold")
    if threshold is not None and not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold!r}")
    valid_defaults = {"model", "per-organ", *ADAPTATIONS, *variants}
    if default_batchnorm not in valid_defaults:
        raise ValueError(f"default_batchnorm {default_batchnorm!r} is not one of {sorted(valid_defaults)}")
    if default_batchnorm == "per-organ" and not all(f"organ:{o}" in variants for o in model.config.organs):
        raise ValueError("default_batchnorm 'per-organ' needs an organ:<organ> variant for every organ")

    files = {WEIGHTS_MEMBER: _npz_bytes(state)}
    files.update({variant_member(name): _npz_bytes(arrays) for name, arrays in variants.items()})
    manifest = {
        "format": FORMAT_NAME,
        "format_version": BUNDLE_FORMAT,
        "segviz_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "organ_schema": organ_schema(),
        "network": model.config.to_dict(),
        "preprocessing": preprocessing.to_dict(),
        "training": dict(training or {}),
        "provenance": dict(provenance or {}),
        "metrics": dict(metrics or {}),
        "inference": {**({"roi_size": list(roi_size)} if roi_size else {}), **dict(inference or {})},
        "trained_organs": list(
            model.config.organs if trained_organs is None else [o for o in model.config.organs if o in trained_organs]
        ),
        "batchnorm_variants": sorted(variants),
        "default_batchnorm": default_batchnorm,
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".segviz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle, zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(MANIFEST_MEMBER, json.dumps(manifest, indent=2, default=_json_default))
            for name, data in files.items():
                archive.writestr(name, data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@dataclass
class ModelBundle:
    """A loaded, verified model bundle."""

    path: Path
    manifest: dict
    network_config: NetworkConfig
    preprocessing: Preprocessing
    state: dict[str, np.ndarray]
    batchnorm_variants: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def provenance(self) -> dict:
        """Strategy, rounds, sites and dates of the training that made this model."""
        return self.manifest.get("provenance", {})

    @property
    def metrics(self) -> dict:
        """Metrics recorded at training time."""
        return self.manifest.get("metrics", {})

    @property
    def default_batchnorm(self) -> str:
        """The BatchNorm choice inference uses unless told otherwise."""
        return self.manifest.get("default_batchnorm", "model")

    @property
    def threshold(self) -> float:
        """Probability above which inference labels an organ (chosen on validation where the
        bundle says so, ``inference.threshold_rule``; else :data:`DEFAULT_THRESHOLD`)."""
        return manifest_threshold(self.manifest)

    @property
    def organs(self) -> tuple[str, ...]:
        """Organs with an output head."""
        return tuple(self.network_config.organs)

    @property
    def trained_organs(self) -> tuple[str, ...]:
        """Organs whose heads some site taught (a local model knows only its site's organs)."""
        return tuple(self.manifest.get("trained_organs", self.organs))

    @property
    def roi_size(self) -> tuple[int, int, int]:
        """Sliding-window size for inference (the training patch unless set otherwise)."""
        roi = self.manifest.get("inference", {}).get("roi_size") or self.manifest.get("training", {}).get("patch_size")
        return tuple(int(r) for r in roi) if roi else (128, 128, 32)

    def batchnorm_choices(self) -> list[str]:
        """Every valid value for ``build_model(batchnorm=...)``."""
        return batchnorm_choices(self.manifest)

    def build_model(self, batchnorm: str | None = None) -> MultiOrganUNet:
        """The network with the bundle's weights and the chosen BatchNorm variant.

        ``batchnorm`` is ``None`` (the bundle's default), ``"model"``, ``"adapt"`` or
        ``"adapt-organs"`` (the model's BatchNorm, whose statistics the caller re-estimates on the
        input) or a variant name. ``"per-organ"`` is handled by the inference code, which builds one model per organ.
        """
        choice = self.default_batchnorm if batchnorm is None else batchnorm
        model = build_network(self.network_config)
        state = {k: torch.from_numpy(np.array(v)) for k, v in self.state.items()}
        if choice not in ("model", "per-organ", *ADAPTATIONS):
            if choice not in self.batchnorm_variants:
                raise BundleError(
                    self.path, f"has no BatchNorm variant {choice!r}; available: {', '.join(self.batchnorm_choices())}"
                )
            state.update({k: torch.from_numpy(np.array(v)) for k, v in self.batchnorm_variants[choice].items()})
        model.load_state_dict(state)
        return model.eval()


def _read_npz(archive: zipfile.ZipFile, name: str, expected_sha: str, path: Path) -> dict[str, np.ndarray]:
    """Read one array member: checksum, then the arrays, each bounded before it is unpacked."""
    data = read_member(archive, name, path)
    if hashlib.sha256(data).hexdigest() != expected_sha:
        raise BundleError(path, f"is damaged: checksum of {name} does not match the manifest")
    # An .npz is itself a zip: its arrays may be compressed, so their sizes are bounded too.
    limit = member_limit(name)
    with zipfile.ZipFile(io.BytesIO(data)) as inner:
        unpacked = sum(info.file_size for info in inner.infolist())
    if unpacked > limit:
        raise BundleError(
            path, f"is refused: the arrays of {name} unpack to {unpacked >> 20} MB (limit {limit >> 20} MB)"
        )
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    for key, array in arrays.items():
        if array.dtype.kind not in "fiub":
            raise BundleError(path, f"is damaged: tensor {key!r} in {name} holds {array.dtype} values, not numbers")
    not_finite = [k for k, a in arrays.items() if a.dtype.kind == "f" and not np.isfinite(a).all()]
    if not_finite:
        # A NaN weight turns every probability into NaN: an all-background map with exit 0.
        raise BundleError(
            path,
            f"is damaged: {len(not_finite)} tensor{'s' if len(not_finite) > 1 else ''} in {name} hold NaN or "
            f"infinite values (first: {not_finite[0]})",
        )
    return arrays


def _expected_shapes(config: NetworkConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """State-dict shapes of the network ``config`` describes, and its BatchNorm keys; the network
    is built on torch's meta device, so this allocates nothing whatever the config says."""
    with torch.device("meta"):
        model = build_network(config)
    state = model.state_dict()
    groups = partition_state(model, {k: torch.empty(0) for k in state})
    return {k: tuple(v.shape) for k, v in state.items()}, set(groups.get(PARTITION_BATCHNORM, {}))


def _check_tensors(
    arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], what: str, path: Path
) -> None:
    missing = set(expected) - set(arrays)
    unexpected = set(arrays) - set(expected)
    mis_shaped = sorted(k for k in set(expected) & set(arrays) if tuple(arrays[k].shape) != expected[k])
    if missing or unexpected or mis_shaped:
        first = sorted(missing | unexpected)[:1] or mis_shaped[:1]
        raise BundleError(
            path,
            f"is incompatible: {what} do not fit its network config ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(mis_shaped)} mis-shaped tensors; first: {first[0]})",
        )


def load_bundle(path: str | Path) -> ModelBundle:
    """Load and verify a model bundle.

    In order, before any network is built: member count and unpacked sizes (from the zip
    directory), CRCs, the manifest's schema and bounds
    (:func:`~SegVizLogic.bundle_manifest.validate_manifest`), checksums, array types (numbers
    only) and values (finite only), and the shape of every tensor against the network the
    manifest describes (built on torch's meta device, so a forged config allocates nothing).

    Raises:
        BundleError: missing, not a bundle, truncated/damaged (zip CRC or checksum), too large,
            made by a newer SegViz format, an organ schema that differs from this SegViz, a
            manifest outside its schema, non-numeric or non-finite weights, or weights that
            do not fit the network config.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(path, "model bundle not found")
    try:
        with zipfile.ZipFile(path) as archive:
            check_archive(archive, path)
            bad = archive.testzip()
            if bad is not None:
                raise BundleError(path, f"is damaged: {bad} fails its CRC check")
            manifest = read_manifest_from_archive(archive, path)
            checksums = manifest["sha256"]
            try:
                state = _read_npz(archive, WEIGHTS_MEMBER, checksums[WEIGHTS_MEMBER], path)
                variants = {
                    name: _read_npz(archive, variant_member(name), checksums[variant_member(name)], path)
                    for name in manifest.get("batchnorm_variants", [])
                }
            except KeyError as error:
                raise BundleError(path, f"is damaged: missing member {error}") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        if isinstance(error, BundleError):
            raise
        raise BundleError(path, f"is not a readable SegViz model bundle (damaged or truncated: {error})") from None
    try:
        network = NetworkConfig.from_dict(manifest["network"])
        preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(path, f"is incompatible: invalid network or preprocessing settings ({error})") from None
    expected, batchnorm_keys = _expected_shapes(network)
    _check_tensors(state, expected, "weights", path)
    for name, arrays in variants.items():
        _check_tensors(arrays, {k: expected[k] for k in batchnorm_keys}, f"BatchNorm variant {name!r}", path)
    return ModelBundle(
        path=path,
        manifest=manifest,
        network_config=network,
        preprocessing=preprocessing,
        state=state,
        batchnorm_variants=variants,
    )
