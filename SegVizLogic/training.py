"""Local training on one or more site folders, with the partial-label loss.

Preprocessed cases are cached under each site's ``.segviz/cache`` (one file per case and setting,
with the foreground/background voxel indices the patch sampler needs) and memory-mapped from there,
so a site of a thousand cases does not hold them in RAM; the site's raw images are validated once per
change of its files (:func:`~SegVizLogic.site.validated_site`). Patches are drawn around organ
foreground and background (``RandCropByPosNegLabeld``) and augmented in worker threads, each patch
from its own seed, so the batches are the same whatever the number of workers
(:class:`PatchBatches`); every step is one batch of ``batch_size`` patches drawn from several
patients, and validation Dice per annotated organ is measured on held-out cases through the
inference path (:func:`~SegVizLogic.inference.predict_probabilities`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import monai
import numpy as np
import torch
from monai.data import MetaTensor, list_data_collate
from monai.metrics import DiceMetric
from monai.transforms import (
    Compose,
    FgBgToIndicesd,
    MapTransform,
    RandAdjustContrastd,
    RandCropByPosNegLabeld,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandHistogramShiftd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    SpatialPadd,
)
from monai.utils import convert_to_tensor

from .allocator import retain_freed_memory
from .inference import FAST, predict_probabilities, probabilities_to_labels, resolve_device
from .losses import NaiveSoftmaxLoss, PartialLabelLoss
from .network import MultiOrganUNet
from .organs import organ_by_name
from .preprocessing import Preprocessing, preprocessing_transforms, sitk_to_metatensor
from .progress import ProgressReporter
from .site import Site, file_stamp, load_case, state_dir, validated_site

__all__ = [
    "CACHE_VERSION",
    "LOADER_WORKERS_ENV",
    "DataPathTimes",
    "PatchBatches",
    "SiteData",
    "TrainResult",
    "TrainingConfig",
    "cache_key",
    "default_loader_workers",
    "evaluate_dice",
    "held_out_case_names",
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
        scanner_augmentation: also show each patch as other scanners would image it (nnU-Net's
            stronger noise, Gaussian blur of a softer kernel, low-resolution simulation).
        organ_contrast_augmentation: shift each annotated organ's intensity by its own random
            offset (up to about 80 HU), as another contrast phase would show it.
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
    scanner_augmentation: bool = False
    organ_contrast_augmentation: bool = False
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


CACHE_VERSION = 3
"""Version of what a cache entry holds and of SegViz's own preprocessing code. Bump it whenever
either changes: the cache key includes it (and MONAI's version, whose transforms do the
resampling), so an entry written by other code is never read as if it were current.
Version 2: foreground/background voxel indices stored with the tensors. Version 3: those
indices as plain tensors (version 2 stored MetaTensors, which ``weights_only`` loading refuses,
so every entry was recomputed at every load)."""

FG_INDICES = "label_fg_indices"
BG_INDICES = "label_bg_indices"


def cache_key(image_path: Path, label_path: Path, preprocessing: Preprocessing) -> str:
    """The cache entry's name for one case: a hash of the files (path, size, mtime), the
    preprocessing settings, :data:`CACHE_VERSION` and MONAI's version."""
    stamp = json.dumps(
        [file_stamp(image_path), file_stamp(label_path), preprocessing.to_dict(), CACHE_VERSION, monai.__version__]
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

    The raw images are read and checked only when the site's files changed since the last
    validation that passed (:func:`~SegVizLogic.site.validated_site`); cached cases are
    memory-mapped from their files (their pages are read when a patch touches them and can be
    dropped by the OS), so the RAM a site needs does not grow with its number of cases.
    ``cache=False`` preprocesses every case into RAM and writes nothing.

    Raises:
        SiteValidationError: the site folder is not usable (one line per problem).
    """
    config = config or TrainingConfig()
    reporter = reporter or ProgressReporter("none")
    site = validated_site(site_dir)
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
    held_out = set(held_out_case_names([item["case"] for item in items], config.val_fraction))
    order = sorted(range(len(items)), key=lambda i: items[i]["case"])
    val_idx = {i for i in order if items[i]["case"] in held_out}
    return SiteData(
        name=site.name,
        organs=tuple(site.organs),
        root=Path(site.root),
        train_items=[items[i] for i in order if i not in val_idx],
        val_items=[items[i] for i in order if i in val_idx],
    )


def held_out_case_names(names: Sequence[str], val_fraction: float) -> list[str]:
    """The cases a site holds out for validation, a deterministic split: the last
    ``round(val_fraction x n)`` by name, at least one when the site has two or more cases and
    ``val_fraction`` is not 0."""
    num_val = 0 if len(names) < 2 or val_fraction == 0 else max(1, round(val_fraction * len(names)))
    ordered = sorted(names)
    return ordered[len(ordered) - num_val :]


def _voxel_indices(label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat foreground (any annotated organ) and background voxel indices of a ``(1, X, Y, Z)``
    label, as int32 (half the bytes of int64; volumes stay far below 2**31 voxels)."""
    out = FgBgToIndicesd(keys="label")({"label": torch.as_tensor(label)})
    # Plain tensors: a MetaTensor in a cache entry makes it unreadable with weights_only=True.
    return (
        convert_to_tensor(out[FG_INDICES], track_meta=False).to(torch.int32),
        convert_to_tensor(out[BG_INDICES], track_meta=False).to(torch.int32),
    )


def _cached_case(transform: Compose, item: dict, key: str, cache_dir: Path | None) -> dict:
    """Preprocess one case, or read it from ``cache_dir``: image, label, affine and the
    label's foreground/background indices (the patch sampler's input, computed once per case
    instead of at every draw). A cached case's tensors are memory-mapped from its file."""
    path = None if cache_dir is None else cache_dir / (key + ".pt")
    if path is not None and path.is_file():
        try:
            return _mapped_case(item, path)
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed, never trusted
            path.unlink(missing_ok=True)
    out = transform(dict(item))
    image, label = out["image"], out["label"].to(torch.uint8)
    fg, bg = _voxel_indices(label)
    if path is None:
        return {**item, "image": image, "label": label, FG_INDICES: fg, BG_INDICES: bg}
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
    # Read back mapped: a first round over a thousand cases must not keep them all in RAM.
    return _mapped_case(item, path)


def _mapped_case(item: dict, path: Path) -> dict:
    """A cache entry with its tensors memory-mapped (copy-on-write: the file is never written)."""
    saved = torch.load(path, weights_only=True, mmap=True)
    affine = saved["affine"].clone()
    return {
        **item,
        "image": MetaTensor(saved["image"], affine=affine),
        "label": MetaTensor(saved["label"], affine=affine),
        FG_INDICES: saved["fg"],
        BG_INDICES: saved["bg"],
    }


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
    data_path: DataPathTimes | None = None


@dataclass
class DataPathTimes:
    """Where the training steps' wall time went: the device computing, or waiting for data.

    Attributes:
        steps_seconds: wall time of the epochs' step loops (from asking for the first batch to
            the last step done; validation excluded).
        data_wait_seconds: of that, the time the training thread waited for the next batch.
        busy_seconds: time the device spent on the steps (forward, backward, optimiser): on a GPU
            the sum of CUDA-event intervals around each step, on a CPU the steps' wall time.
        device: ``"cuda"`` or ``"cpu"``.
        workers: patch worker threads used.
    """

    steps_seconds: float
    data_wait_seconds: float
    busy_seconds: float
    device: str
    workers: int

    @property
    def busy_fraction(self) -> float:
        """Share of the step loops' wall time the device was busy (0 when nothing ran)."""
        return self.busy_seconds / self.steps_seconds if self.steps_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        """JSON-ready dict, with the busy fraction."""
        return {**asdict(self), "busy_fraction": self.busy_fraction}


class _StepClock:
    """Times the device's work on each step: CUDA events on a GPU (the host does not wait for
    them until :meth:`busy_seconds`), wall time on a CPU (where a step is synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events: list = []
        self.cpu_seconds = 0.0
        self._started = 0.0

    def start(self) -> None:
        if self.cuda:
            self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.events[-1][0].record()
        else:
            self._started = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.cpu_seconds += time.perf_counter() - self._started

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def busy_seconds(self) -> float:
        if not self.cuda:
            return self.cpu_seconds
        self.synchronize()
        return sum(start.elapsed_time(end) for start, end in self.events) / 1000.0


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
            *([RandAnnotatedOrganShiftd(offsets=0.19, prob=0.5)] if config.organ_contrast_augmentation else []),
            *(
                _scanner_transforms()
                if config.scanner_augmentation
                else [RandGaussianNoised(keys="image", std=0.02, prob=0.3)]
            ),
        ]
    )


class RandAnnotatedOrganShiftd(RandomizableTransform, MapTransform):
    """Add to each annotated organ's voxels its own random offset (``image`` in [0, 1] units).

    A site sees its organ in one contrast phase (the spleen at 50 HU before contrast, 120 HU
    portal-venous); shifting the organ, and only it, shows its head the organ brighter or darker
    against the same surroundings, as another phase would. ``label`` holds SegViz values of the
    site's annotated organs (0 elsewhere).

    Args:
        offsets: each organ's offset is drawn from ``[-offsets, offsets]`` (0.19: about 80 HU in
            the default 425 HU window).
        prob: probability of shifting a patch.
    """

    def __init__(self, offsets: float = 0.19, prob: float = 0.5) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys=("image",))
        self.offsets = offsets

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        image, label = d["image"], d["label"]
        shift = torch.zeros_like(image)
        for value in torch.unique(label).tolist():
            if value:
                offset = float(self.R.uniform(-self.offsets, self.offsets))
                shift = torch.where(label == value, torch.as_tensor(offset, dtype=image.dtype), shift)
        d["image"] = image + shift
        return d


def _scanner_transforms() -> list:
    """nnU-Net's scanner augmentations: noise up to 21 HU (0.05 of the default window), blurred
    with probability 0.2 (a softer kernel: blotchier noise, softer edges), and a patch
    down-sampled up to 2x and restored (thicker slices, coarser pixels) with probability 0.25."""
    return [
        RandGaussianNoised(keys="image", std=0.05, prob=0.3),
        RandGaussianSmoothd(keys="image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
        RandSimulateLowResolutiond(keys="image", zoom_range=(0.5, 1.0), prob=0.25),
    ]


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


LOADER_WORKERS_ENV = "SEGVIZ_LOADER_WORKERS"
"""Environment variable that sets the number of patch worker threads (0: on the training thread)."""


def default_loader_workers(device: torch.device | str = "cpu") -> int:
    """Patch worker threads for training on ``device``: :data:`LOADER_WORKERS_ENV` when set;
    else on a GPU one per spare CPU core up to 8 (cropping and augmenting a batch of the paper's
    patches takes a core several times as long as the GPU's step), and on a CPU one thread, which
    prepares the next batch while the network's step runs.

    Raises:
        ValueError: the environment variable is not a whole number >= 0.
    """
    text = os.environ.get(LOADER_WORKERS_ENV, "").strip()
    if text:
        if not text.isdigit():
            raise ValueError(f"{LOADER_WORKERS_ENV} must be a whole number >= 0, got {text!r}")
        return int(text)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.device(device).type == "cuda":
        return max(1, min(8, cores - 1))
    return 1 if cores > 1 else 0


class PatchBatches:
    """The training batches of one epoch each time it is iterated: ``batch_size`` patches (the last
    of an epoch may be fewer) drawn from every case in a shuffled order, so that a batch mixes
    patients, cropped and augmented by ``workers`` threads ahead of the training step.

    An epoch draws ``samples_per_case`` patches from each case: every case is listed that many
    times and each entry crops one patch, shuffled with a generator seeded by ``config.seed``
    (a new order each epoch), so one patient's patches spread over the epoch instead of filling a
    batch. Each patch is cropped and augmented with its own seed, drawn from ``config.seed``, the
    epoch and its position in the epoch: a patch does not depend on which thread made it or when,
    so the batches are the same with any number of workers, 0 included (on the calling thread).
    Workers are threads, not processes: they share the memory-mapped cases without copying them,
    and the crops and intensity transforms spend their time in numpy and torch, which release the
    GIL.

    Args:
        items: cases with ``image``, ``label`` ``(1, X, Y, Z)``, their voxel indices and any
            per-case keys (``annotated``, ``site``, ``case``), which every patch of the case carries.
        config: patch size, batch size, samples per case, positive share, seed.
        workers: threads preparing batches (0: the iterating thread prepares each batch when asked).
        pin_memory: put each batch's tensors in page-locked memory (for asynchronous copies to a GPU).

    Example::

        batches = PatchBatches(site.train_items, TrainingConfig(batch_size=8), workers=4)
        for batch in batches:  # one epoch
            batch["image"].shape  # (8, 1, 128, 128, 32), a plain tensor
    """

    def __init__(
        self, items: Sequence[dict], config: TrainingConfig, workers: int = 0, pin_memory: bool = False
    ) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.cases = [_padded_to_patch(item, config.patch_size) for item in items]
        self.config = config
        self.workers = workers
        self.pin_memory = pin_memory
        self._transform = _patch_transform(config)
        self._generator = torch.Generator().manual_seed(config.seed)
        self._epoch = 0
        self._thread = threading.local()

    def __len__(self) -> int:
        return math.ceil(len(self.cases) * self.config.samples_per_case / self.config.batch_size)

    def _epoch_plan(self) -> list[list[tuple[int, int]]]:
        """``(case index, patch seed)`` of every patch of the next epoch, batch by batch."""
        per_case = self.config.samples_per_case
        count = len(self.cases) * per_case
        order = torch.randperm(count, generator=self._generator).tolist()
        seeds = np.random.SeedSequence([self.config.seed % 2**63, self._epoch]).generate_state(count)
        self._epoch += 1
        patches = [(entry // per_case, int(seed)) for entry, seed in zip(order, seeds)]
        size = self.config.batch_size
        return [patches[i : i + size] for i in range(0, count, size)]

    def _patch(self, case: int, seed: int) -> list[dict]:
        # MONAI's random transforms keep their state in the object: one copy per thread.
        transform = getattr(self._thread, "transform", None)
        if transform is None:
            transform = self._thread.transform = copy.deepcopy(self._transform)
        transform.set_random_state(seed=seed)
        return transform(dict(self.cases[case]))

    def _batch(self, plan: list[tuple[int, int]]) -> dict:
        batch = list_data_collate([self._patch(case, seed) for case, seed in plan])
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                # A plain tensor: MetaTensor's bookkeeping on every operation of the network
                # would cost the GPU step its launch speed; training needs no metadata.
                value = value.as_tensor() if isinstance(value, MetaTensor) else value
                batch[key] = value.pin_memory() if self.pin_memory else value
        return batch

    def __iter__(self) -> Iterator[dict]:
        plan = self._epoch_plan()
        if self.workers == 0:
            for batch in plan:
                yield self._batch(batch)
            return
        executor = ThreadPoolExecutor(self.workers, thread_name_prefix="segviz-patches")
        ahead: deque = deque()
        upcoming = iter(plan)
        try:
            # Two batches per worker in flight: a worker never waits for the training step to
            # take a batch, and at most that many batches are held in memory.
            for batch in upcoming:
                ahead.append(executor.submit(self._batch, batch))
                if len(ahead) >= 2 * self.workers:
                    break
            while ahead:
                ready = ahead.popleft().result()
                following = next(upcoming, None)
                if following is not None:
                    ahead.append(executor.submit(self._batch, following))
                yield ready
        finally:
            executor.shutdown(wait=True, cancel_futures=True)


def patch_loader(
    items: Sequence[dict], config: TrainingConfig, workers: int = 0, pin_memory: bool = False
) -> PatchBatches:
    """The training batches of ``items`` (:class:`PatchBatches`); each iteration is an epoch."""
    return PatchBatches(items, config, workers=workers, pin_memory=pin_memory)


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
    loader_workers: int | None = None,
    validate_every: int = 1,
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
        on_epoch_end: called as ``(epoch, mean loss, validation Dice)`` after every validated
            epoch (checkpoints, best-model selection).
        lr_span: the part of a cosine learning-rate schedule (from ``lr`` down to ``lr/10``)
            these epochs cover: ``(0, 1)`` for a whole training; a federated round ``r`` of
            ``R`` covers ``((r-1)/R, r/R)``, so federated and local arms decay alike.
        loader_workers: threads preparing patches (:class:`PatchBatches`); ``None``:
            :func:`default_loader_workers`. The batches, and so the training, are the same for
            any number.
        validate_every: with ``on_epoch_end``, validate (and call it) after every
            ``validate_every``-th epoch and after the last; 1: every epoch.

    Returns:
        :class:`TrainResult` with per-epoch losses, the last validation Dice, the evidence
        each head was taught on, and where the steps' time went (:class:`DataPathTimes`).
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
    if validate_every < 1:
        raise ValueError(f"validate_every must be >= 1, got {validate_every}")

    workers = default_loader_workers(device) if loader_workers is None else loader_workers
    loader = PatchBatches(items, config, workers=workers, pin_memory=device.type == "cuda")
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
    evidence = torch.zeros(len(organs), dtype=torch.float64, device=device)
    val_dice: dict[str, float] = {}
    clock = _StepClock(device)
    steps_seconds = waited = 0.0
    start = time.perf_counter()
    with reporter.task("train", total=epochs * len(loader)) as advance:
        for epoch in range(1, epochs + 1):
            for group in optimizer.param_groups:
                group["lr"] = lr * cosine_factor(lr_span[0] + (lr_span[1] - lr_span[0]) * (epoch - 1) / epochs)
            model.train()
            epoch_losses: list[float] = []
            # A step's loss is read after the next step is queued, so that reading it never
            # leaves the GPU without work; the progress bar shows each loss one step late.
            unread = None
            loop_start = time.perf_counter()
            batches = iter(loader)
            while True:
                asked = time.perf_counter()
                batch = next(batches, None)
                waited += time.perf_counter() - asked
                if batch is None:
                    break
                image = batch["image"].to(device, non_blocking=True).float()
                target = _targets(batch["label"].to(device, non_blocking=True), organs)
                annotated = batch["annotated"].to(device, non_blocking=True).bool()
                clock.start()
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    logits = model(image)
                loss = loss_fn(logits.float(), target, annotated)
                loss.backward()
                optimizer.step()
                clock.stop()
                evidence += _head_evidence(target, annotated, exclusion)
                if unread is not None:
                    epoch_losses.append(float(unread))
                    advance(1, loss=epoch_losses[-1])
                unread = loss.detach()
                steps += 1
            if unread is not None:
                epoch_losses.append(float(unread))
                advance(1, loss=epoch_losses[-1])
            clock.synchronize()
            steps_seconds += time.perf_counter() - loop_start
            losses.append(float(np.mean(epoch_losses)))
            last = epoch == epochs
            # Validation costs a whole-volume inference per case: after the last epoch, and every
            # validate_every-th epoch when the caller selects the best epoch.
            checkpoint = on_epoch_end is not None and (last or epoch % validate_every == 0)
            if last or (validate and checkpoint):
                recalibrate_batchnorm(model, loader, device, config.recalibration_batches)
            if validate and (last or checkpoint):
                val_dice = evaluate_dice(model, sites, device, config)
            reporter.emit("epoch", epoch=epoch, epochs=epochs, loss=losses[-1], dice=val_dice)
            if checkpoint:
                on_epoch_end(epoch, losses[-1], val_dice)
    evidence = evidence.cpu()
    data_path = DataPathTimes(
        steps_seconds=steps_seconds,
        data_wait_seconds=waited,
        busy_seconds=clock.busy_seconds(),
        device=device.type,
        workers=workers,
    )
    return TrainResult(
        loss=losses[-1],
        losses=losses,
        num_examples=len(items),
        steps=steps,
        val_dice=val_dice,
        seconds=time.perf_counter() - start,
        head_evidence={organ: float(evidence[i]) for i, organ in enumerate(organs) if evidence[i] > 0},
        data_path=data_path,
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
    by :data:`~SegVizLogic.inference.INFERENCE_OVERLAP`, the network in bfloat16 as ``segviz infer``
    runs it: :data:`~SegVizLogic.inference.FAST`), on the preprocessed grid, no clean-up."""
    config = config or TrainingConfig()
    device = resolve_device(device) if isinstance(device, str) else device
    sites = [sites] if isinstance(sites, SiteData) else list(sites)
    organs = tuple(model.config.organs)
    scores: dict[str, list[float]] = {}
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
    for site in sites:
        for item in site.val_items:
            # The inference path: windows of the training patch with the inference overlap.
            prob = predict_probabilities(model, item["image"], config.patch_size, device, bfloat16=FAST.bfloat16)
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
