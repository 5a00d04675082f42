"""Local training on one or more site folders, with the partial-label loss.

Preprocessed cases are cached under each site's ``.segviz/cache`` (one file per case and setting,
with the foreground/background voxel indices the patch sampler needs), patches are drawn around
organ foreground and background (``RandCropByPosNegLabeld``), every step is one batch of
``batch_size`` patches drawn from several patients, and validation Dice per annotated organ is
measured on held-out cases through the inference path (:func:`~SegVizLogic.inference.predict_probabilities`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import monai
import numpy as np
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.metrics import DiceMetric
from monai.transforms import (
    Compose,
    FgBgToIndicesd,
    MapTransform,
    RandAdjustContrastd,
    RandCropByPosNegLabeld,
    RandGaussianNoised,
    RandHistogramShiftd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from .allocator import retain_freed_memory
from .inference import predict_probabilities, probabilities_to_labels, resolve_device
from .losses import NaiveSoftmaxLoss, PartialLabelLoss
from .network import MultiOrganUNet
from .organs import organ_by_name
from .preprocessing import Preprocessing, preprocessing_transforms, sitk_to_metatensor
from .progress import ProgressReporter
from .site import Site, load_case, state_dir, validate_site

__all__ = [
    "CACHE_VERSION",
    "SiteData",
    "TrainResult",
    "TrainingConfig",
    "cache_key",
    "evaluate_dice",
    "load_site_data",
    "patch_loader",
    "resolve_device",
    "seed_everything",
    "train_site",
]


@dataclass(frozen=True)
class TrainingConfig:
    """How a site trains (stored in bundles as provenance).

    Args:
        patch_size: training patch in voxels of the preprocessed grid (paper: 128x128x32).
        batch_size: patches per step (paper: 8).
        samples_per_case: patches drawn from each case per epoch.
        pos_fraction: share of patches centred on annotated foreground.
        val_fraction: share of a site's cases held out for validation (at least one when
            the site has two or more cases).
        label_mode: ``"partial"`` (loss on annotated organs only) or ``"naive"`` (the paper's
            pooled baseline: softmax, unannotated organs counted as background).
        amp: bfloat16 autocast on CUDA.
        weight_decay: AdamW weight decay.
        exclusion_weight: weight of the partial-label loss's exclusion term (a voxel of an
            annotated organ is no other organ); 0 gives unannotated heads no gradient at all.
        recalibration_batches: batches used to re-estimate BatchNorm running statistics after
            training (0 keeps the running averages of training).
        seed: seeds Python, numpy, torch and the patch sampler.
    """

    patch_size: tuple[int, int, int] = (128, 128, 32)
    batch_size: int = 8
    samples_per_case: int = 8
    pos_fraction: float = 0.67
    val_fraction: float = 0.25
    label_mode: str = "partial"
    amp: bool = True
    weight_decay: float = 1e-5
    recalibration_batches: int = 4
    exclusion_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.patch_size) != 3 or min(self.patch_size) < 8:
            raise ValueError(f"patch_size must be three sizes >= 8, got {self.patch_size}")
        if self.batch_size < 1 or self.samples_per_case < 1:
            raise ValueError(
                f"batch_size and samples_per_case must be >= 1, got {self.batch_size}, {self.samples_per_case}"
            )
        if not 0.0 <= self.pos_fraction <= 1.0 or not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(
                f"pos_fraction must be in [0, 1] and val_fraction in [0, 1), got {self.pos_fraction}, {self.val_fraction}"
            )
        if self.label_mode not in ("partial", "naive"):
            raise ValueError(f"label_mode must be 'partial' or 'naive', got {self.label_mode!r}")

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> TrainingConfig:
        """Inverse of :meth:`to_dict` (unknown keys raise ``ValueError``)."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class LoadSiteCased(MapTransform):
    """Load one case of a site: ``image`` as a MetaTensor in HU and ``label`` as SegViz values."""

    def __init__(self, sites: Mapping[str, Site]) -> None:
        super().__init__(keys=("image", "label"))
        self.sites = sites

    def __call__(self, item: Mapping) -> dict:
        site = self.sites[item["site"]]
        case = next(c for c in site.cases if c.name == item["case"])
        image, labels = load_case(case, site)
        return {**item, "image": sitk_to_metatensor(image), "label": sitk_to_metatensor(labels, dtype=torch.uint8)}


@dataclass
class SiteData:
    """A site's preprocessed cases, split into training and validation.

    Items are dicts with ``image`` ``(1, X, Y, Z)`` in [0, 1], ``label`` ``(1, X, Y, Z)``
    SegViz values (only the site's annotated organs are non-zero), ``site``, ``case``.
    """

    name: str
    organs: tuple[str, ...]
    root: Path
    train_items: list[dict]
    val_items: list[dict]

    @property
    def num_train_cases(self) -> int:
        """Number of training cases (the example count reported to a federation)."""
        return len(self.train_items)


CACHE_VERSION = 2
"""Version of what a cache entry holds and of SegViz's own preprocessing code. Bump it whenever
either changes: the cache key includes it (and MONAI's version, whose transforms do the
resampling), so an entry written by other code is never read as if it were current.
Version 2: foreground/background voxel indices stored with the tensors."""

FG_INDICES = "label_fg_indices"
BG_INDICES = "label_bg_indices"


def cache_key(image_path: Path, label_path: Path, preprocessing: Preprocessing) -> str:
    """The cache entry's name for one case: a hash of the files (path, size, mtime), the
    preprocessing settings, :data:`CACHE_VERSION` and MONAI's version."""
    stamp = json.dumps(
        [_file_stamp(image_path), _file_stamp(label_path), preprocessing.to_dict(), CACHE_VERSION, monai.__version__]
    )
    return hashlib.sha1(stamp.encode()).hexdigest()


def load_site_data(
    site_dir: str | Path,
    preprocessing: Preprocessing,
    config: TrainingConfig | None = None,
    cache: bool = True,
    reporter: ProgressReporter | None = None,
) -> SiteData:
    """Validate a site folder and load its preprocessed cases (cached under ``.segviz/cache``).

    Raises:
        SiteValidationError: the site folder is not usable (one line per problem).
    """
    config = config or TrainingConfig()
    reporter = reporter or ProgressReporter("none")
    site = validate_site(site_dir)
    transform = Compose(
        [
            LoadSiteCased({site.name: site}),
            preprocessing_transforms(preprocessing, keys=("image",), label_keys=("label",)),
        ]
    )
    cache_dir = state_dir(site) / "cache" if cache else None
    items = []
    with reporter.task(f"preprocess {site.name}", total=len(site.cases)) as advance:
        for case in site.cases:
            key = cache_key(case.image_path, case.label_path, preprocessing)
            items.append(_cached_case(transform, {"site": site.name, "case": case.name}, key, cache_dir))
            advance(1)
    num_val = 0 if len(items) < 2 or config.val_fraction == 0 else max(1, round(config.val_fraction * len(items)))
    # Deterministic split: the last cases by name are validation.
    order = sorted(range(len(items)), key=lambda i: items[i]["case"])
    val_idx = set(order[len(order) - num_val :])
    return SiteData(
        name=site.name,
        organs=tuple(site.organs),
        root=Path(site.root),
        train_items=[items[i] for i in order if i not in val_idx],
        val_items=[items[i] for i in order if i in val_idx],
    )


def _voxel_indices(label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat foreground (any annotated organ) and background voxel indices of a ``(1, X, Y, Z)``
    label, as int32 (half the bytes of int64; volumes stay far below 2**31 voxels)."""
    out = FgBgToIndicesd(keys="label")({"label": torch.as_tensor(label)})
    return (
        torch.as_tensor(out[FG_INDICES]).to(torch.int32),
        torch.as_tensor(out[BG_INDICES]).to(torch.int32),
    )


def _cached_case(transform: Compose, item: dict, key: str, cache_dir: Path | None) -> dict:
    """Preprocess one case, or read it from ``cache_dir``: image, label, affine and the
    label's foreground/background indices (the patch sampler's input, computed once per case
    instead of at every draw)."""
    path = None if cache_dir is None else cache_dir / (key + ".pt")
    if path is not None and path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            affine = saved["affine"]
            return {
                **item,
                "image": MetaTensor(saved["image"], affine=affine),
                "label": MetaTensor(saved["label"], affine=affine),
                FG_INDICES: saved["fg"],
                BG_INDICES: saved["bg"],
            }
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed, never trusted
            path.unlink(missing_ok=True)
    out = transform(dict(item))
    image, label = out["image"], out["label"].to(torch.uint8)
    fg, bg = _voxel_indices(label)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(
            {
                "image": image.as_tensor().contiguous(),
                "label": label.as_tensor().contiguous(),
                "affine": image.affine.clone(),
                "fg": fg,
                "bg": bg,
            },
            tmp,
        )
        os.replace(tmp, path)
    return {**item, "image": image, "label": label, FG_INDICES: fg, BG_INDICES: bg}


def _file_stamp(path: Path) -> list:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        return [
            str(path.resolve()),
            sum(p.stat().st_size for p in files),
            max((p.stat().st_mtime_ns for p in files), default=0),
        ]
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


@dataclass
class TrainResult:
    """What a round (or a whole local training) of one site produced.

    ``head_evidence`` counts, per organ, the voxels on which that organ's head was taught
    anything: every voxel of a patch whose site annotated the organ, and (with the exclusion
    term) the voxels of a site's own organs in a patch whose site did not ("not this organ").
    """

    loss: float
    losses: list[float]
    num_examples: int
    steps: int
    val_dice: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    head_evidence: dict[str, float] = field(default_factory=dict)


def _targets(label: torch.Tensor, organs: Sequence[str]) -> torch.Tensor:
    """``(B, 1, ...)`` SegViz values -> ``(B, C, ...)`` binary channels in network order."""
    return torch.cat([(label == organ_by_name(o).label) for o in organs], dim=1).float()


def _patch_transform(config: TrainingConfig) -> Compose:
    """One random patch of a case (centred on annotated foreground with ``pos_fraction``) with
    intensity augmentation."""
    pos = config.pos_fraction
    return Compose(
        [
            RandCropByPosNegLabeld(
                keys=("image", "label"),
                label_key="label",
                spatial_size=config.patch_size,
                pos=pos,
                neg=1.0 - pos,
                num_samples=1,
                fg_indices_key=FG_INDICES,
                bg_indices_key=BG_INDICES,
                allow_smaller=False,
            ),
            # Contrast phase (tens of HU per organ), calibration and noise differ between
            # scanners: a head taught at one site must still fire at another. Shifts of 0.15 are
            # about 60 HU in the default window. Flips are not used: left and right organs differ.
            RandScaleIntensityd(keys="image", factors=0.2, prob=0.8),
            RandShiftIntensityd(keys="image", offsets=0.15, prob=0.8),
            RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.3),
            # Contrast phases move organs against each other (the spleen 50 HU before contrast,
            # 120 HU portal-venous; the kidney cortex far more): a random monotone remapping of
            # the intensity histogram shows each head its organ at other contrasts.
            RandHistogramShiftd(keys="image", num_control_points=(8, 14), prob=0.3),
            RandGaussianNoised(keys="image", std=0.02, prob=0.3),
        ]
    )


def _padded_to_patch(item: dict, patch_size: Sequence[int]) -> dict:
    """A case smaller than the patch along some axis, padded to it (indices recomputed for the
    padded grid); other cases unchanged."""
    if all(s >= p for s, p in zip(item["image"].shape[1:], patch_size)):
        return item
    padded = SpatialPadd(keys=("image", "label"), spatial_size=patch_size)(
        {"image": item["image"], "label": item["label"]}
    )
    fg, bg = _voxel_indices(padded["label"])
    return {**item, "image": padded["image"], "label": padded["label"], FG_INDICES: fg, BG_INDICES: bg}


def patch_loader(items: Sequence[dict], config: TrainingConfig) -> DataLoader:
    """Batches of exactly ``batch_size`` patches (the last of an epoch may be smaller), drawn
    from every case in a shuffled order so that a batch mixes patients.

    An epoch draws ``samples_per_case`` patches from each case: the dataset lists every case
    that many times and each entry crops one patch, so the loader's shuffle spreads one
    patient's patches over the epoch instead of filling a batch with them. Sampling and
    augmentation are seeded by ``config.seed``.

    Args:
        items: cases with ``image``, ``label``, their voxel indices and any per-case keys
            (``annotated``, ``site``, ``case``), which every patch of the case carries.
        config: patch size, batch size, samples per case, positive share, seed.
    """
    cases = [_padded_to_patch(item, config.patch_size) for item in items]
    transform = _patch_transform(config)
    transform.set_random_state(seed=config.seed % 2**32)
    dataset = Dataset([case for case in cases for _ in range(config.samples_per_case)], transform=transform)
    generator = torch.Generator().manual_seed(config.seed)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=True, num_workers=0, generator=generator)


def _head_evidence(target: torch.Tensor, annotated: torch.Tensor, exclusion: bool) -> torch.Tensor:
    """Per organ channel, the voxels of a batch where that head's target is known (see
    :class:`TrainResult`): ``(C,)`` float64."""
    voxels = float(np.prod(target.shape[2:]))
    evidence = annotated.sum(0).double() * voxels
    if exclusion:
        known = (target.bool() & annotated[:, :, None, None, None]).flatten(2).any(1).sum(1).double()  # (B,)
        evidence += ((~annotated).double() * known[:, None]).sum(0)
    return evidence


def train_site(
    model: MultiOrganUNet,
    data: SiteData | Sequence[SiteData],
    epochs: int,
    lr: float,
    device: torch.device | str = "auto",
    reporter: ProgressReporter | None = None,
    config: TrainingConfig | None = None,
    validate: bool = True,
    on_epoch_end: Callable[[int, float, dict[str, float]], None] | None = None,
    lr_span: tuple[float, float] = (0.0, 1.0),
) -> TrainResult:
    """Train ``model`` in place on one site (or several pooled sites) for ``epochs`` epochs.

    Each sample's loss covers only the organs its own site annotated (``label_mode="partial"``).

    Args:
        model: the network; trained in place.
        data: one :class:`SiteData`, or several to pool (central training).
        epochs: passes over the training cases (``samples_per_case`` patches each).
        lr: AdamW learning rate.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a ``torch.device``.
        reporter: progress (``epoch`` events with loss and validation Dice).
        config: patch sampling and optimisation settings.
        validate: measure validation Dice per organ after the last epoch (every epoch when
            ``on_epoch_end`` is given).
        on_epoch_end: called as ``(epoch, mean loss, validation Dice)`` after every epoch
            (checkpoints, best-model selection).
        lr_span: the part of a cosine learning-rate schedule (from ``lr`` down to ``lr/10``)
            these epochs cover: ``(0, 1)`` for a whole training; a federated round ``r`` of
            ``R`` covers ``((r-1)/R, r/R)``, so federated and local arms decay alike.

    Returns:
        :class:`TrainResult` with per-epoch losses, the last validation Dice and the evidence
        each head was taught on.
    """
    retain_freed_memory()  # a step frees and re-allocates the same large blocks: keep them mapped
    config = config or TrainingConfig()
    reporter = reporter or ProgressReporter("none")
    sites = [data] if isinstance(data, SiteData) else list(data)
    device = resolve_device(device) if isinstance(device, str) else device
    organs = tuple(model.config.organs)
    items = []
    for site in sites:
        mask = [o in site.organs for o in organs]
        items += [{**item, "annotated": torch.tensor(mask)} for item in site.train_items]
    if not items:
        raise ValueError("no training cases: every case of the site(s) is held out for validation")
    if not any(any(item["annotated"]) for item in items):
        raise ValueError(f"the sites annotate none of the network's organs {organs}")

    loader = patch_loader(items, config)
    loss_fn = (
        PartialLabelLoss(exclusion_weight=config.exclusion_weight)
        if config.label_mode == "partial"
        else NaiveSoftmaxLoss()
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    model.to(device)
    use_amp = config.amp and device.type == "cuda"
    exclusion = config.label_mode == "partial" and config.exclusion_weight > 0

    losses: list[float] = []
    steps = 0
    evidence = torch.zeros(len(organs), dtype=torch.float64)
    val_dice: dict[str, float] = {}
    start = time.perf_counter()
    with reporter.task("train", total=epochs * len(loader)) as advance:
        for epoch in range(1, epochs + 1):
            for group in optimizer.param_groups:
                group["lr"] = lr * cosine_factor(lr_span[0] + (lr_span[1] - lr_span[0]) * (epoch - 1) / epochs)
            model.train()
            epoch_losses = []
            for batch in loader:
                image = batch["image"].to(device).float()
                target = _targets(batch["label"].to(device), organs)
                annotated = batch["annotated"].to(device).bool()
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    logits = model(image)
                loss = loss_fn(logits.float(), target, annotated)
                loss.backward()
                optimizer.step()
                evidence += _head_evidence(target, annotated, exclusion).cpu()
                epoch_losses.append(float(loss.detach()))
                steps += 1
                advance(1, loss=epoch_losses[-1])
            losses.append(float(np.mean(epoch_losses)))
            last = epoch == epochs
            # Validation costs a whole-volume inference per case: after the last epoch, or every
            # epoch when the caller selects the best epoch.
            if last or (validate and on_epoch_end is not None):
                recalibrate_batchnorm(model, loader, device, config.recalibration_batches)
            if validate and (last or on_epoch_end is not None):
                val_dice = evaluate_dice(model, sites, device, config)
            reporter.emit("epoch", epoch=epoch, epochs=epochs, loss=losses[-1], dice=val_dice)
            if on_epoch_end is not None:
                on_epoch_end(epoch, losses[-1], val_dice)
    return TrainResult(
        loss=losses[-1],
        losses=losses,
        num_examples=len(items),
        steps=steps,
        val_dice=val_dice,
        seconds=time.perf_counter() - start,
        head_evidence={organ: float(evidence[i]) for i, organ in enumerate(organs) if evidence[i] > 0},
    )


@torch.no_grad()
def recalibrate_batchnorm(model: MultiOrganUNet, batches, device: torch.device, max_batches: int) -> int:
    """Recompute BatchNorm running statistics with the current weights ("precise BN").

    Training normalises with batch statistics, inference with running averages that lag the
    weights by the momentum. After a federated round the shared weights change at once, so a
    site's running statistics would describe a network that no longer exists; re-estimating
    them on a few training batches makes evaluation match training. Weights are not touched.

    Returns:
        The number of batches used.
    """
    if max_batches <= 0:
        return 0
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    # num_batches_tracked keeps counting training batches (it is how a restored site's
    # BatchNorm shows its history); only the running mean and variance are re-estimated.
    tracked = [m.num_batches_tracked.clone() for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    used = 0
    for batch in batches:
        model(batch["image"].to(device).float())
        used += 1
        if used >= max_batches:
            break
    for m, momentum, count in zip(norms, momenta, tracked):
        m.momentum = momentum
        m.num_batches_tracked.copy_(count)
    model.eval()
    return used


def cosine_factor(progress: float, floor: float = 0.1) -> float:
    """Learning-rate factor at ``progress`` in [0, 1] of a training: cosine from 1 to ``floor``."""
    progress = min(max(progress, 0.0), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate_dice(
    model: MultiOrganUNet,
    sites: SiteData | Sequence[SiteData],
    device: torch.device | str = "auto",
    config: TrainingConfig | None = None,
) -> dict[str, float]:
    """Mean validation Dice per organ over the sites' validation cases, counting for each case
    only the organs its site annotated, predicted by those organs' heads with the model's
    BatchNorm (the site's own) through the inference path (training-patch windows overlapping
    by :data:`~SegVizLogic.inference.INFERENCE_OVERLAP`), on the preprocessed grid, no clean-up."""
    config = config or TrainingConfig()
    device = resolve_device(device) if isinstance(device, str) else device
    sites = [sites] if isinstance(sites, SiteData) else list(sites)
    organs = tuple(model.config.organs)
    scores: dict[str, list[float]] = {}
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
    for site in sites:
        for item in site.val_items:
            # The inference path: windows of the training patch with the inference overlap.
            prob = predict_probabilities(model, item["image"], config.patch_size, device)
            # A site can judge only the organs it annotated: the label map competes those heads
            # alone (the others run with this site's BatchNorm, which they were not trained with).
            own = [i for i, organ in enumerate(organs) if organ in site.organs]
            labels = probabilities_to_labels(prob[own], [organs[i] for i in own])
            pred_labels = torch.from_numpy(labels)[None, None]
            target = _targets(torch.as_tensor(item["label"])[None], organs)
            pred = _targets(pred_labels, organs)
            dice = metric(pred, target)[0]
            for index, organ in enumerate(organs):
                if organ in site.organs and not torch.isnan(dice[index]):
                    scores.setdefault(organ, []).append(float(dice[index]))
    return {organ: float(np.mean(v)) for organ, v in scores.items()}
