"""Inference: a CT volume in any geometry -> SegViz label map in that exact geometry.

Steps: read (io) -> preprocessing (orient RAS, resample, HU window) -> sliding-window
network -> per-organ probabilities -> resample each probability back onto the input grid
(linear, one organ at a time to bound memory) -> label = most probable organ above 0.5
-> optional largest-connected-component clean-up -> file.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
import torch

# isort: off
from . import lean_monai  # noqa: F401  (before MONAI: keeps its heavy optional packages out)

# isort: on
from monai.inferers import sliding_window_inference

from .allocator import retain_freed_memory
from .errors import SegVizInputError
from .label_restore import grid_mapping, restore_labels
from .network import MultiOrganUNet
from .organs import organ_by_name
from .preprocessing import (
    check_preprocessed_size,
    metatensor_to_sitk,
    preprocessing_transforms,
    sitk_to_metatensor,
    sitk_to_metatensor_affine,
)
from .progress import ProgressReporter

if TYPE_CHECKING:
    from .bundle import ModelBundle

__all__ = [
    "ADAPT_BATCH",
    "ADAPT_FIRST_PASS_OVERLAP",
    "ADAPT_FOREGROUND_SHARE",
    "ADAPT_MAX_WINDOWS",
    "ADAPT_PRIOR_WINDOWS",
    "BODY_HU",
    "FAST",
    "INFERENCE_OVERLAP",
    "REFERENCE",
    "SegmentationResult",
    "SpeedLevers",
    "adapt_batchnorm",
    "adaptation_windows",
    "batchnorm_trained",
    "body_box",
    "body_threshold",
    "bundle_probabilities",
    "keep_largest_component",
    "organ_volumes_ml",
    "predict_probabilities",
    "probabilities_to_labels",
    "resolve_device",
    "segment_image",
    "segment_image_at_settings",
    "segment_image_at_thresholds",
    "windows_per_batch",
]


INFERENCE_OVERLAP = 0.5
"""Share of a window that its neighbour overlaps. Inference runs on windows of the training
patch, the input the network was trained and validated on. Half-window overlap was first picked
on the external phantom set (a mistake issue 9 corrected); the comparison now offers 0.25 and 0.5
to every arm on the sites' validation cases, and validation chose 0.5 for all five arms
(docs/RESULTS.md)."""


@dataclass(frozen=True)
class SpeedLevers:
    """What makes inference fast, each lever on or off (:data:`FAST`, :data:`REFERENCE`).

    None changes what a label map means: the same windows of the training patch, the same
    overlap, the same threshold rule, the label map in the input's exact grid.

    Args:
        bfloat16: the network in bfloat16 autocast on the CPU too (AMX / AVX512-BF16 matrix units;
            CUDA always runs in bfloat16); BatchNorm adaptation stays float32.
        channels_last: convolutions in channels-last 3-D memory layout (oneDNN's fast path).
        body_crop: slide windows over the body's bounding box only (air outside it is label 0).
        skip_air_windows: a window with no body voxel gets probability 0 without running the network.
        boundary_restore: label on the network grid and interpolate only in cells whose corners
            disagree (:mod:`SegVizLogic.label_restore`) instead of resampling every organ's
            probability onto the full input grid.
        device_pipeline: on a GPU, orientation and resampling, window stitching and restore run
            on the device (torch ops), not on the CPU with SimpleITK.
    """

    bfloat16: bool = True
    channels_last: bool = True
    body_crop: bool = True
    skip_air_windows: bool = True
    boundary_restore: bool = True
    device_pipeline: bool = True


FAST = SpeedLevers()
"""Every lever on: what ``segviz infer`` and ``segviz serve`` use (``--exact`` for :data:`REFERENCE`)."""
REFERENCE = SpeedLevers(False, False, False, False, False, False)
"""Today's path, every lever off: float32 over the whole preprocessed grid, each organ's
probability resampled onto the input grid. The experiments' default (their results stay as
measured)."""


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cpu"``; ``"cuda"`` (error if absent)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SegVizInputError(
            None, "--device cuda was asked for but no CUDA GPU is available (use --device auto or cpu)"
        )
    if name not in ("cpu", "cuda"):
        raise SegVizInputError(None, f"unknown device {name!r}: expected auto, cpu or cuda")
    return torch.device(name)


@torch.no_grad()
def predict_probabilities(
    model: MultiOrganUNet,
    image: torch.Tensor,
    roi_size: Sequence[int],
    device: torch.device,
    sw_batch_size: int = 1,
    overlap: float | Sequence[float] = INFERENCE_OVERLAP,
    on_batch: Callable[[int, int], None] | None = None,
    bfloat16: bool = False,
    channels_last: bool = False,
    skip_below: float | None = None,
    output_device: torch.device | None = None,
) -> torch.Tensor:
    """Per-organ probabilities for one preprocessed volume.

    Inference and the validation during training both come here, with the same windows and
    overlap, so what validation measures is what a site gets.

    Args:
        model: the network (put in eval mode here).
        image: ``(1, X, Y, Z)`` or ``(1, 1, X, Y, Z)`` preprocessed CT in [0, 1].
        roi_size: sliding-window size (a multiple of the network's stride product).
        device: where the network runs; the stitched output stays on the CPU.
        sw_batch_size: windows per network call (speed only: the model is in eval mode).
        overlap: share of a window its neighbour overlaps (default: :data:`INFERENCE_OVERLAP`).
        on_batch: called as ``(done, total)`` after each batch of windows (progress).
        bfloat16: bfloat16 autocast on the CPU as well (CUDA always uses it).
        channels_last: channels-last 3-D memory layout for the network and its windows.
        skip_below: a window whose every voxel is at or below this intensity (no body) gets
            probability 0 without running the network (None: every window runs).
        output_device: where the stitched probabilities are kept (default: the CPU).

    Returns:
        ``(C, X, Y, Z)`` float32 probabilities on ``output_device``, channel ``i`` for ``model.config.organs[i]``.
    """
    model.eval().to(device)
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    if channels_last:
        model.to(memory_format=layout)
    batch = image if image.dim() == 5 else image[None]
    batch = torch.as_tensor(batch, dtype=torch.float32)
    if device.type == "cuda":
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16)
    channels = len(model.config.organs)

    total = _window_batches(batch.shape[2:], roi_size, overlap, sw_batch_size)
    done = [0]

    def network(window: torch.Tensor) -> torch.Tensor:
        with autocast:
            return model.probabilities(model(window.to(device).contiguous(memory_format=layout))).float()

    def predictor(window: torch.Tensor) -> torch.Tensor:
        if skip_below is None:
            out = network(window)
        else:
            body = window.flatten(1).amax(dim=1) > skip_below
            out = torch.zeros((window.shape[0], channels, *window.shape[2:]), dtype=torch.float32, device=device)
            if bool(body.any()):
                out[body.to(device)] = network(window[body])
        done[0] += 1
        if on_batch is not None:
            on_batch(min(done[0], total), total)
        return out

    probabilities = sliding_window_inference(
        batch,
        roi_size=list(roi_size),
        sw_batch_size=sw_batch_size,
        predictor=predictor,
        overlap=overlap,
        mode="gaussian",
        sw_device=device,
        device=output_device or torch.device("cpu"),
        progress=False,
    )
    return torch.as_tensor(probabilities)[0].float()


def body_box(
    image: torch.Tensor, threshold: float, roi_size: Sequence[int], overlap: float | Sequence[float] = INFERENCE_OVERLAP
) -> tuple[slice, slice, slice] | None:
    """The part of a preprocessed volume that holds every sliding window touching the body, as
    slices on the sliding window's own lattice; None when no voxel is body.

    The box starts at the first window (of MONAI's lattice over the whole volume) that reaches
    the body's bounding box and ends with the last, so the windows MONAI lays over the box are
    exactly the whole volume's windows that touch the body: every body voxel is covered by the
    same windows with the same weights as without the box, and only air outside the body's
    bounding box loses windows (its probability there is 0).

    Args:
        image: ``(1, X, Y, Z)`` or ``(1, 1, X, Y, Z)`` preprocessed volume.
        threshold: body intensity (:func:`body_threshold`).
        roi_size: the sliding window.
        overlap: the sliding window's overlap (a number or one per axis).
    """
    from monai.data.utils import dense_patch_slices

    volume = image[0, 0] if image.dim() == 5 else image[0]
    body = volume > threshold
    overlaps = [overlap] * 3 if isinstance(overlap, (int, float)) else list(overlap)
    box = []
    for axis in range(3):
        size, roi = int(volume.shape[axis]), int(roi_size[axis])
        others = tuple(a for a in range(3) if a != axis)
        present = body.any(dim=others[1]).any(dim=others[0]).nonzero()
        if len(present) == 0:
            return None
        if size <= roi:  # one window (MONAI pads the volume to it): nothing to cut
            box.append(slice(0, size))
            continue
        low, high = int(present[0]), int(present[-1]) + 1
        interval = max(int(roi * (1 - overlaps[axis])), 1)  # MONAI's scan interval rule
        starts = [window[0].start for window in dense_patch_slices((size,), (roi,), (interval,))]
        touching = [start for start in starts if start < high and start + roi > low]
        box.append(slice(touching[0], touching[-1] + roi))
    return tuple(box)  # type: ignore[return-value]


def windows_per_batch(
    device: torch.device,
    roi_size: Sequence[int],
    channels: Sequence[int],
    free_bytes: int | None = None,
    share: float = 0.5,
    most: int = 32,
) -> int:
    """Windows per network call: 1 on the CPU (two cores gain nothing from a batch, and memory
    grows with it); on a GPU as many as ``share`` of its free memory holds (``free_bytes``,
    default ``torch.cuda.mem_get_info``), at most ``most``.

    A window costs about ``voxels x sum over levels (channels / 8**level) x 2 bytes`` (bfloat16) per
    live activation; a UNet forward keeps about 12 of them (each level's residual unit, the skip
    connection, the decoder's concatenation) plus the float32 output and MONAI's stitching buffers.
    """
    if device.type != "cuda":
        return 1
    if free_bytes is None:
        free_bytes = int(torch.cuda.mem_get_info(device)[0])
    voxels = math.prod(int(r) for r in roi_size)
    per_voxel = sum(c / 8**level for level, c in enumerate(channels)) * 2 * 12 + 4 * 8
    return max(1, min(most, int(free_bytes * share // (voxels * per_voxel))))


def _window_batches(
    shape: Sequence[int], roi_size: Sequence[int], overlap: float | Sequence[float], sw_batch_size: int
) -> int:
    """How many predictor calls MONAI's sliding window makes (its scan-interval rule)."""
    overlaps = [overlap] * len(roi_size) if isinstance(overlap, (int, float)) else list(overlap)
    count = 1
    for size, roi, ov in zip(shape, roi_size, overlaps):
        interval = max(int(roi * (1 - ov)), 1)
        count *= 1 if size <= roi else math.ceil((size - roi) / interval) + 1
    return math.ceil(count / sw_batch_size)


def probabilities_to_labels(
    probabilities: np.ndarray | torch.Tensor, organs: Sequence[str], threshold: float = 0.5
) -> np.ndarray:
    """Label map from ``(C, ...)`` probabilities: the schema value of the most probable organ
    where its probability exceeds ``threshold``, else 0."""
    p = probabilities.numpy() if isinstance(probabilities, torch.Tensor) else np.asarray(probabilities)
    values = np.array([organ_by_name(o).label for o in organs], dtype=np.uint8)
    best = p.argmax(axis=0)
    return np.where(p.max(axis=0) > threshold, values[best], 0).astype(np.uint8)


def keep_largest_component(
    labels: np.ndarray, organs: Sequence[str], components: dict[str, int] | None = None, workers: int = 2
) -> np.ndarray:
    """Keep, per organ, the largest connected component(s) (two for the kidneys).

    Organs are labelled on ``workers`` threads (scipy's labelling releases the GIL); each organ's
    removals are found in its own bounding box and applied afterwards, so the answer does not
    depend on the order or the number of workers."""
    from concurrent.futures import ThreadPoolExecutor

    from scipy import ndimage

    components = {"kidney": 2} if components is None else components
    # Each organ's bounding box (one pass over the volume): labelling components there gives the
    # same answer as over the whole volume, on a fraction of its voxels.
    boxes = ndimage.find_objects(labels)

    def removals(name: str):
        value = organ_by_name(name).label
        box = boxes[value - 1] if value <= len(boxes) else None
        if box is None:
            return None
        mask = labels[box] == value
        lab, count = ndimage.label(mask)
        if count <= 1:
            return None
        # Component sizes by counting the organ's voxels only (a few percent of its box, whose
        # int32 labels numpy would otherwise copy to int64 whole), and the kept ones (one or two)
        # by comparison: on a noisy 512x512x300 label map ndimage.sum_labels and np.isin took
        # seconds, these a fraction of one.
        sizes = np.bincount(lab[mask], minlength=count + 1)[1:]
        remove = mask
        for kept in np.argsort(-sizes, kind="stable")[: components.get(name, 1)] + 1:
            remove &= lab != kept
        return box, remove

    with ThreadPoolExecutor(max(1, workers)) as pool:
        found = [r for r in pool.map(removals, organs) if r is not None]
    cleaned = labels.copy()
    for box, remove in found:
        cleaned[box][remove] = 0
    return cleaned


ADAPT_MAX_WINDOWS = 16
"""Windows of the input volume that test-time BatchNorm adaptation reads (spread over the body)."""
ADAPT_BATCH = 4
"""Windows per forward pass while adapting: statistics are the mean of per-batch statistics, as a
site's running statistics are (training steps and its precise-BN recalibration)."""
ADAPT_PRIOR_WINDOWS = 0.0
"""Weight of the model's trained statistics in test-time adaptation, counted in windows: the
adapted mean and variance are ``(n x volume + k x trained) / (n + k)`` for ``n`` windows read
(Schneider et al., NeurIPS 2020). Chosen by the leave-site-out validation rule of docs/METHOD.md,
not on an external set: starting from the sites' averaged BatchNorm, every prior weight tried
(4, 16 windows) lowered validation Dice against the volume's statistics alone (0)."""
ADAPT_FOREGROUND_SHARE = 0.67
"""Share of ``adapt-organs``' windows centred on the organs a first pass found, the rest spread over
the body as ``adapt``'s: as a training patch is centred on an annotated organ with the training's
``pos_fraction`` (0.67), so the statistics are those of the inputs the BatchNorm was trained on."""
ADAPT_FIRST_PASS_OVERLAP = 0.0
"""Overlap of ``adapt-organs``' first pass, which only has to say roughly where the organs are:
without overlap it reads about an eighth of the windows of the final pass."""
BODY_HU = -500.0
"""Voxels above this HU are body (soft tissue, fat, bone); air, lung and the scanner's
outside-of-field padding are below it."""


def batchnorm_trained(model: torch.nn.Module) -> bool:
    """Whether the model's BatchNorm has seen data (a FedBN global model keeps its initial,
    untrained BatchNorm: running statistics 0/1, ``num_batches_tracked`` 0)."""
    from torch import nn

    return any(
        int(m.num_batches_tracked) > 0 for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    )


def body_threshold(hu_window: Sequence[float], hu: float = BODY_HU) -> float:
    """The preprocessed intensity of ``hu`` in a HU window mapped to [0, 1] (at least 0.01, so that
    clipped air is never body)."""
    low, high = float(hu_window[0]), float(hu_window[1])
    return max(0.01, (hu - low) / (high - low))


def adaptation_windows(
    image: torch.Tensor,
    roi_size: Sequence[int],
    max_windows: int = ADAPT_MAX_WINDOWS,
    threshold: float = 0.01,
    foreground: np.ndarray | None = None,
    foreground_share: float = ADAPT_FOREGROUND_SHARE,
) -> list[tuple[int, int, int]]:
    """Start corners of up to ``max_windows`` windows of ``roi_size`` spread over the body.

    Candidates tile the volume with half-window steps and lie wholly inside it (no padding is
    ever read); those at least half body (intensity above ``threshold``) are kept, or the
    fullest ones if none is; then windows are picked by farthest-point sampling of their
    centres, starting from the fullest, so they cover the body rather than one side of it.

    With a ``foreground`` mask (the volume's shape; ``adapt-organs``), ``foreground_share`` of the
    windows are centred on foreground voxels drawn at random (a fixed seed: the same volume gets
    the same windows), as a training patch is centred on an annotated organ, and moved inside the
    volume; the rest are the body windows above.

    Args:
        image: ``(1, X, Y, Z)`` or ``(1, 1, X, Y, Z)`` preprocessed volume.
        roi_size: the window, no larger than the volume along any axis.
        max_windows: how many windows at most.
        threshold: body intensity threshold (see :func:`body_threshold`).
        foreground: optional boolean mask of the organs; empty or None: body windows only.
        foreground_share: share of the windows centred on the foreground.
    """
    volume = image[0, 0] if image.dim() == 5 else image[0]
    shape = volume.shape
    if any(r > s for r, s in zip(roi_size, shape)):
        raise ValueError(f"window {tuple(roi_size)} does not fit the volume {tuple(shape)}")
    if foreground is not None:
        if tuple(foreground.shape) != tuple(shape):
            raise ValueError(f"foreground mask {tuple(foreground.shape)} is not the volume's shape {tuple(shape)}")
        points = np.argwhere(foreground)
        centred = round(foreground_share * max_windows) if len(points) else 0
        if centred:
            picks = points[np.random.default_rng(0).choice(len(points), size=centred, replace=len(points) < centred)]
            top = np.asarray(shape) - np.asarray(roi_size)
            corners = [tuple(int(v) for v in np.clip(p - np.asarray(roi_size) // 2, 0, top)) for p in picks]
            if centred >= max_windows:
                return corners
            return corners + adaptation_windows(image, roi_size, max_windows - centred, threshold)
    axes = [
        np.unique(np.round(np.linspace(0, s - r, num=int(np.ceil((s - r) / max(r // 2, 1))) + 1)).astype(int))
        for s, r in zip(shape, roi_size)
    ]
    body = (torch.as_tensor(volume) > threshold).double().cpu().numpy()
    integral = np.pad(body.cumsum(0).cumsum(1).cumsum(2), ((1, 0), (1, 0), (1, 0)))
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    lo, hi = grid, grid + np.asarray(roi_size)
    # Inclusion-exclusion over the eight corners of each box in the summed-volume table.
    share = np.zeros(len(grid))
    for corner in range(8):
        bits = [(corner >> k) & 1 for k in range(3)]
        index = tuple(np.where(bits[k], hi[:, k], lo[:, k]) for k in range(3))
        share += (-1) ** (3 - sum(bits)) * integral[index]
    share /= float(np.prod(roi_size))
    keep = np.flatnonzero(share >= 0.5)
    if keep.size == 0:
        keep = np.argsort(-share, kind="stable")[:max_windows]
    centres = grid[keep] + np.asarray(roi_size) / 2.0
    chosen = [int(np.argmax(share[keep]))]
    distance = np.linalg.norm(centres - centres[chosen[0]], axis=1)
    while len(chosen) < min(max_windows, len(keep)):
        nxt = int(np.argmax(distance))
        chosen.append(nxt)
        distance = np.minimum(distance, np.linalg.norm(centres - centres[nxt], axis=1))
    return [tuple(int(v) for v in grid[keep][i]) for i in chosen]


@torch.no_grad()
def adapt_batchnorm(
    model: MultiOrganUNet,
    image: torch.Tensor,
    roi_size: Sequence[int],
    device: torch.device,
    max_windows: int = ADAPT_MAX_WINDOWS,
    prior_windows: float = 0.0,
    threshold: float = 0.01,
    batch: int = ADAPT_BATCH,
    foreground: np.ndarray | None = None,
) -> int:
    """Test-time BatchNorm adaptation (AdaBN with a prior): re-estimate every BatchNorm layer's
    running mean and variance on windows of the input volume, keep its trained affine
    parameters (gamma, beta).

    The model arrives with the BatchNorm to adapt from (a FedBN model's initial one, a local
    model's own, or for a comparison the sites' averaged one). Windows are spread over the body and lie inside the volume, so no
    padding enters the statistics (:func:`adaptation_windows`); the estimate is blended with the
    statistics the model arrived with, ``(n x volume + prior_windows x trained) / (n +
    prior_windows)``. A volume thinner than the network's divisor along an axis has no window
    without padding: its statistics stay those it arrived with.

    Args:
        model: the network, changed in place (left in eval mode).
        image: ``(1, X, Y, Z)`` or ``(1, 1, X, Y, Z)`` preprocessed volume.
        roi_size: the window (the training patch), shrunk to the volume where it is smaller.
        device: where the network runs.
        max_windows: how many windows at most.
        prior_windows: weight of the arriving statistics, in windows (0: the volume's alone;
            use 0 when they are untrained).
        threshold: body intensity threshold (:func:`body_threshold`).
        batch: windows per forward pass (:data:`ADAPT_BATCH`).
        foreground: organ mask of the volume from a first pass (``adapt-organs``): windows
            centred on it too (:func:`adaptation_windows`).

    Returns:
        The number of windows read.
    """
    from torch import nn

    volume = image if image.dim() == 5 else image[None]
    shape = volume.shape[2:]
    divisor = model.config.divisor
    roi = [(min(r, s) // divisor) * divisor for r, s in zip(roi_size, shape)]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if min(roi) < divisor:
        model.eval()
        return 0
    windows = adaptation_windows(volume, roi, max_windows, threshold, foreground=foreground)
    prior = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum) for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average over the batches of windows
    model.train().to(device)
    for first in range(0, len(windows), batch):
        crops = [
            volume[0, :, a : a + roi[0], b : b + roi[1], c : c + roi[2]] for a, b, c in windows[first : first + batch]
        ]
        model(torch.stack(crops).float().to(device))
    n, k = float(len(windows)), float(prior_windows)
    for module, (mean, var, count, momentum) in zip(norms, prior):
        module.running_mean.mul_(n / (n + k)).add_(mean.to(module.running_mean.device), alpha=k / (n + k))
        module.running_var.mul_(n / (n + k)).add_(var.to(module.running_var.device), alpha=k / (n + k))
        module.num_batches_tracked.copy_(count)
        module.momentum = momentum
    model.eval()
    return len(windows)


@dataclass
class SegmentationResult:
    """Output of :func:`segment_image`: a label map on the input grid and timings."""

    labels: sitk.Image
    organs: tuple[str, ...]
    timings: dict[str, float] = field(default_factory=dict)


def organ_volumes_ml(labels: sitk.Image, organs: Sequence[str]) -> dict[str, dict[str, float]]:
    """Voxel count and volume in mL per organ of a SegViz label map."""
    array = sitk.GetArrayViewFromImage(labels)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    # One comparison per organ: np.bincount would first copy a 512x512x300 uint8 map to int64 (1.1 s).
    counts = {name: int(np.count_nonzero(array == organ_by_name(name).label)) for name in organs}
    return {name: {"voxels": count, "volume_ml": round(count * voxel_ml, 3)} for name, count in counts.items()}


def bundle_probabilities(
    bundle: ModelBundle,
    prepared: torch.Tensor,
    device: torch.device,
    batchnorm: str | None = None,
    roi_size: Sequence[int] | None = None,
    sw_batch_size: int = 1,
    on_batch: Callable[[int, int], None] | None = None,
    overlap: float | None = None,
    levers: SpeedLevers = REFERENCE,
) -> torch.Tensor:
    """Per-organ probabilities ``(C, X, Y, Z)`` of a bundle on a preprocessed volume.

    ``batchnorm``: ``None`` (bundle default), ``"model"``, a variant name (``averaged``,
    ``organ:<organ>``, ``site:<name>``), ``"per-organ"`` (each organ's head evaluated with the
    BatchNorm of the sites that trained that organ) or ``"adapt"`` (the model's BatchNorm with
    its statistics re-estimated on this volume by :func:`adapt_batchnorm`: gamma 1 and beta 0 in
    a FedBN model, trained ones in a local, central or FedAvg model; a volume too thin for any
    window keeps trained statistics, or gets the sites' ``averaged`` BatchNorm when the model's
    are untrained) or ``"adapt-organs"`` (the same, the statistics re-estimated on windows centred on
    the organs a first pass without overlap found, :data:`ADAPT_FOREGROUND_SHARE` of them, the rest
    spread over the body). ``roi_size``: the sliding window (default: the bundle's, its training
    patch), overlapping by ``overlap`` (default
    :data:`INFERENCE_OVERLAP`). ``levers``: the speed levers (:class:`SpeedLevers`; default
    :data:`REFERENCE`); with ``device_pipeline`` on a GPU the probabilities stay on the device.
    """
    choice = bundle.default_batchnorm if batchnorm is None else batchnorm
    roi = tuple(roi_size or bundle.roi_size)
    overlap = INFERENCE_OVERLAP if overlap is None else overlap
    body = body_threshold(bundle.preprocessing.hu_window)
    output_device = device if levers.device_pipeline and device.type == "cuda" else torch.device("cpu")
    window = {
        "sw_batch_size": sw_batch_size,
        "overlap": overlap,
        "on_batch": on_batch,
        "bfloat16": levers.bfloat16,
        "channels_last": levers.channels_last,
        "skip_below": body if levers.skip_air_windows else None,
        "output_device": output_device,
    }
    box = body_box(prepared, body, roi, overlap) if levers.body_crop else None
    volume = prepared if box is None else (prepared[(slice(None),) * (prepared.dim() - 3) + box])

    def predict(model: MultiOrganUNet) -> torch.Tensor:
        inside = predict_probabilities(model, volume, roi, device, **window)
        if box is None:
            return inside
        # Outside the body's box every voxel is air: probability 0.
        full = torch.zeros((inside.shape[0], *prepared.shape[-3:]), dtype=inside.dtype, device=inside.device)
        full[(slice(None), *box)] = inside
        return full

    if choice == "per-organ":
        channels = []
        for index, organ in enumerate(bundle.organs):
            model = bundle.build_model(f"organ:{organ}")
            channels.append(predict(model)[index])
        return torch.stack(channels)

    def adapted(foreground: np.ndarray | None = None) -> MultiOrganUNet:
        model = bundle.build_model("adapt")
        trained = batchnorm_trained(model)
        used = adapt_batchnorm(
            model,
            prepared,
            bundle.roi_size,
            device,
            # Untrained statistics (a FedBN model's, whose sites kept their BatchNorm) are no prior.
            prior_windows=ADAPT_PRIOR_WINDOWS if trained else 0.0,
            threshold=body,
            foreground=foreground,
        )
        if used == 0 and not trained and "averaged" in bundle.batchnorm_variants:
            # Too thin for a single window without padding: the federation's statistics, not none.
            return bundle.build_model("averaged")
        return model

    if choice == "adapt":
        return predict(adapted())
    if choice == "adapt-organs":
        # A first pass without overlap finds the organs; the statistics are then re-estimated on
        # windows centred on them as training patches were, and the final pass uses those.
        first = predict_probabilities(
            adapted(), volume, roi, device, **dict(window, overlap=ADAPT_FIRST_PASS_OVERLAP, on_batch=None)
        )
        # Only heads some site taught (a local model's other heads say nothing).
        taught = [bundle.organs.index(o) for o in bundle.trained_organs]
        organs = (first[taught].amax(0) > 0.5).cpu().numpy()
        del first
        if box is not None:
            full = np.zeros(prepared.shape[-3:], dtype=bool)
            full[box] = organs
            organs = full
        return predict(adapted(organs))
    return predict(bundle.build_model(choice))


def segment_image(
    bundle: ModelBundle,
    image: sitk.Image,
    device: torch.device,
    batchnorm: str | None = None,
    cleanup: bool = True,
    reporter: ProgressReporter | None = None,
    sw_batch_size: int = 1,
    overlap: float | None = None,
    threshold: float | None = None,
    levers: SpeedLevers | None = None,
) -> SegmentationResult:
    """Segment one CT image with a model bundle; the label map has the image's exact geometry
    (size, spacing, origin, direction) and SegViz label values.

    ``overlap`` (default :data:`INFERENCE_OVERLAP`) and ``threshold`` (a voxel is an organ where
    that organ's probability is the highest and above it; default the bundle's,
    :attr:`~SegVizLogic.bundle.ModelBundle.threshold`) are the test-time options the experiments
    choose on validation. ``levers``: the speed levers (:class:`SpeedLevers`;
    default :data:`REFERENCE`, today's path; ``segviz infer`` uses :data:`FAST`). ``sw_batch_size``
    0 chooses it from the device's free memory (:func:`windows_per_batch`).

    Raises:
        SegVizInputError: the preprocessed grid would not fit in memory (checked before allocating).
    """
    reporter = reporter or ProgressReporter("none")
    levers = REFERENCE if levers is None else levers
    threshold = bundle.threshold if threshold is None else threshold
    timings: dict[str, float] = {}
    prepared = _prepared_image(bundle, image, device, levers, reporter, timings)
    affine = prepared.affine
    probabilities = _network_probabilities(
        bundle, prepared, device, batchnorm, reporter, sw_batch_size, overlap, levers, timings
    )
    del prepared  # the resampled CT is not needed to restore the labels: free it first
    t2 = time.perf_counter()
    labels = _label_map(bundle, image, probabilities, affine, threshold, cleanup, levers, reporter)
    del probabilities
    timings["restore_s"] = time.perf_counter() - t2
    organs = tuple(o for o in bundle.organs if o in bundle.trained_organs)
    return SegmentationResult(labels=labels, organs=organs, timings=timings)


def segment_image_at_thresholds(
    bundle: ModelBundle,
    image: sitk.Image,
    device: torch.device,
    thresholds: Sequence[float],
    batchnorm: str | None = None,
    sw_batch_size: int = 1,
    overlap: float | None = None,
    levers: SpeedLevers | None = None,
) -> dict[float, sitk.Image]:
    """:func:`segment_image` at several thresholds from one network pass: ``{threshold: label map}``.

    Each label map equals ``segment_image(..., threshold=t).labels`` (clean-up on); the network runs
    once, so choosing a threshold on validation cases costs one pass per case, not one per candidate.
    """
    return segment_image_at_settings(bundle, image, device, thresholds, [batchnorm], sw_batch_size, overlap, levers)[
        batchnorm
    ]


def segment_image_at_settings(
    bundle: ModelBundle,
    image: sitk.Image,
    device: torch.device,
    thresholds: Sequence[float],
    batchnorms: Sequence[str | None],
    sw_batch_size: int = 1,
    overlap: float | None = None,
    levers: SpeedLevers | None = None,
) -> dict[str | None, dict[float, sitk.Image]]:
    """:func:`segment_image_at_thresholds` for each of ``batchnorms``: ``{batchnorm: {threshold: label map}}``.

    The image is preprocessed once; the network runs once per BatchNorm.
    """
    levers = REFERENCE if levers is None else levers
    reporter = ProgressReporter("none")
    prepared = _prepared_image(bundle, image, device, levers, reporter, {})
    maps = {}
    for batchnorm in batchnorms:
        probabilities = _network_probabilities(
            bundle, prepared, device, batchnorm, reporter, sw_batch_size, overlap, levers, {}
        )
        maps[batchnorm] = {
            float(t): _label_map(bundle, image, probabilities, prepared.affine, float(t), True, levers, reporter)
            for t in thresholds
        }
        del probabilities
    return maps


def _prepared_image(
    bundle: ModelBundle,
    image: sitk.Image,
    device: torch.device,
    levers: SpeedLevers,
    reporter: ProgressReporter,
    timings: dict[str, float],
):
    """``image`` oriented and resampled to the model's grid (a MetaTensor carrying its affine)."""
    check_preprocessed_size(image, bundle.preprocessing, len(bundle.organs))
    retain_freed_memory()  # the windows allocate and free the same large blocks
    t0 = time.perf_counter()
    reporter.emit("stage", stage="preprocess", message="orienting and resampling to the model's spacing")
    source = sitk_to_metatensor(image)
    if levers.device_pipeline and device.type == "cuda":
        source = source.to(device)  # MONAI's orientation and resampling then run on the GPU
    prepared = preprocessing_transforms(bundle.preprocessing)({"image": source})["image"]
    timings["preprocess_s"] = time.perf_counter() - t0
    return prepared


def _network_probabilities(
    bundle: ModelBundle,
    prepared,
    device: torch.device,
    batchnorm: str | None,
    reporter: ProgressReporter,
    sw_batch_size: int,
    overlap: float | None,
    levers: SpeedLevers,
    timings: dict[str, float],
) -> torch.Tensor:
    """The network's per-organ probabilities on the preprocessed grid (``prepared`` is read, not changed)."""
    if sw_batch_size < 1:
        sw_batch_size = windows_per_batch(device, bundle.roi_size, bundle.network_config.channels)
    t1 = time.perf_counter()
    reporter.emit("stage", stage="network", message=f"sliding-window inference on {device.type}")
    last = [0]

    def on_batch(done: int, total: int) -> None:
        # JSON progress at most every 5 % so the Slicer log stays readable.
        if done == total or done - last[0] >= max(1, total // 20):
            reporter.emit("progress", stage="network", current=done, total=total)
            last[0] = done

    probabilities = bundle_probabilities(
        bundle,
        prepared,
        device,
        batchnorm=batchnorm,
        sw_batch_size=sw_batch_size,
        on_batch=on_batch if reporter.mode == "json" else None,
        overlap=overlap,
        levers=levers,
    )
    if levers.device_pipeline and device.type == "cuda":
        torch.cuda.synchronize(device)
    timings["network_s"] = time.perf_counter() - t1
    return probabilities


def _label_map(
    bundle: ModelBundle,
    image: sitk.Image,
    probabilities: torch.Tensor,
    affine,
    threshold: float,
    cleanup: bool,
    levers: SpeedLevers,
    reporter: ProgressReporter,
) -> sitk.Image:
    """The label map on ``image``'s grid from the network's probabilities (read, not changed)."""
    organs = tuple(o for o in bundle.organs if o in bundle.trained_organs)
    mapping = grid_mapping(_input_affine(image), np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64))
    labels = None
    if levers.boundary_restore and mapping is not None and organs:
        with reporter.task("restore", total=1) as advance:
            channels = [bundle.organs.index(name) for name in organs]
            restored = restore_labels(
                probabilities[channels],
                mapping,
                image.GetSize(),
                [organ_by_name(name).label for name in organs],
                threshold,
            )
            if restored is not None:
                labels = np.ascontiguousarray(restored.cpu().numpy())
                del restored
            advance(1)
    if labels is None:  # an oblique grid, a noisy model, or the reference path
        labels = _restore_by_resampling(probabilities.cpu(), affine, image, bundle, organs, threshold, reporter)
    if cleanup:
        labels = keep_largest_component(labels, organs)
    result = sitk.GetImageFromArray(labels)
    result.CopyInformation(image)
    return result


def _input_affine(image: sitk.Image) -> np.ndarray:
    """The 4x4 from the image's (i, j, k) to RAS mm (the affine its MetaTensor carries)."""
    return np.asarray(sitk_to_metatensor_affine(image), dtype=np.float64)


def _restore_by_resampling(
    probabilities: torch.Tensor,
    affine,
    image: sitk.Image,
    bundle: ModelBundle,
    organs: Sequence[str],
    threshold: float,
    reporter: ProgressReporter,
) -> np.ndarray:
    """Today's restore: each organ's probability linearly resampled onto the input grid (SimpleITK)."""
    best = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.float32)
    labels = np.zeros(best.shape, dtype=np.uint8)
    with reporter.task("restore", total=len(organs)) as advance:
        for name in organs:
            index = bundle.organs.index(name)
            # One organ at a time: a 512x512x300 input never holds four float maps at once.
            channel = metatensor_to_sitk(probabilities[index], affine)
            on_input = sitk.Resample(channel, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            p = sitk.GetArrayViewFromImage(on_input)
            better = p > np.maximum(best, threshold)
            labels[better] = organ_by_name(name).label
            np.maximum(best, p, out=best)
            del on_input, p
            advance(1)
    return labels
