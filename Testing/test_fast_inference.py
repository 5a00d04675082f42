"""The speed levers of inference (bfloat16, channels-last, body crop, air windows skipped, boundary
restore): what each changes and what it must not (the label map's meaning and grid)."""

from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk
import torch
from monai.data.utils import dense_patch_slices

from SegVizLogic.bundle import load_bundle
from SegVizLogic.evaluation import evaluate_label_maps
from SegVizLogic.inference import (
    FAST,
    REFERENCE,
    body_box,
    predict_probabilities,
    segment_image,
    windows_per_batch,
)
from SegVizLogic.network import NetworkConfig, build_network
from SegVizLogic.site import load_case, validate_site

CPU = torch.device("cpu")


def _starts(size, roi, overlap=0.5):
    interval = max(int(roi * (1 - overlap)), 1)
    return [w[0].start for w in dense_patch_slices((size,), (roi,), (interval,))]


def test_body_box_keeps_exactly_the_windows_that_touch_the_body():
    volume = torch.zeros((1, 90, 70, 40))
    volume[0, 37:52, 20:60, 5:9] = 0.6  # the body, off-centre
    roi = (32, 32, 16)
    box = body_box(volume, 0.01, roi, 0.5)
    assert box is not None
    for axis, (size, r) in enumerate(zip(volume.shape[1:], roi)):
        body = (37, 52) if axis == 0 else (20, 60) if axis == 1 else (5, 9)
        touching = [s for s in _starts(size, r) if s < body[1] and s + r > body[0]]
        inside = [box[axis].start + s for s in _starts(box[axis].stop - box[axis].start, r)]
        assert inside == touching, f"axis {axis}: the box's windows are the whole volume's that touch the body"
    assert body_box(torch.zeros((1, 40, 40, 20)), 0.01, roi) is None


def test_air_windows_are_skipped_without_changing_the_body():
    torch.manual_seed(0)
    model = build_network(NetworkConfig(channels=(8, 16, 32), strides=(2, 2), num_res_units=1, body_features=8))
    volume = torch.zeros((1, 96, 48, 32))
    volume[0, :40] = torch.rand((40, 48, 32)) * 0.8 + 0.1  # body in the first 40 voxels, air beyond
    calls = []
    model.body.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    full = predict_probabilities(model, volume, (32, 32, 32), CPU)
    ran_all = sum(calls)
    calls.clear()
    skipped = predict_probabilities(model, volume, (32, 32, 32), CPU, skip_below=0.01)
    assert sum(calls) < ran_all, "all-air windows never reach the network"
    # Every window covering a body voxel ran in both: the body's probabilities are the same.
    assert torch.allclose(full[:, :40], skipped[:, :40], atol=1e-6)
    assert skipped[:, 80:].abs().max() == 0, "voxels only air windows cover get probability 0"


def test_bfloat16_and_channels_last_stay_close_to_float32():
    torch.manual_seed(1)
    model = build_network(NetworkConfig(channels=(8, 16, 32), strides=(2, 2), num_res_units=1, body_features=8))
    volume = torch.rand((1, 48, 48, 32))
    reference = predict_probabilities(model, volume, (32, 32, 32), CPU)
    fast = predict_probabilities(model, volume, (32, 32, 32), CPU, bfloat16=True, channels_last=True)
    assert fast.dtype == torch.float32 and fast.shape == reference.shape
    assert (fast - reference).abs().max() < 0.02


def test_window_batch_from_free_memory():
    channels = NetworkConfig().channels
    assert windows_per_batch(CPU, (128, 128, 32), channels) == 1
    cuda = torch.device("cuda")
    # The paper network's 128x128x32 window: about 285 MB of bfloat16 activations and buffers.
    assert windows_per_batch(cuda, (128, 128, 32), channels, free_bytes=80 * 10**9) == 32
    assert 3 <= windows_per_batch(cuda, (128, 128, 32), channels, free_bytes=2 * 10**9) <= 6
    assert windows_per_batch(cuda, (128, 128, 32), channels, free_bytes=10**8) == 1


def test_fast_path_gives_todays_labels_on_the_external_phantom(small_phantom, liver_bundle):
    """Crop, skipped air windows and boundary restore give today's label map exactly; bfloat16 and
    channels-last move a few voxels at the threshold; the label map keeps the input's grid."""
    bundle = load_bundle(liver_bundle)
    site = validate_site(small_phantom.external)
    exact_levers = dataclasses.replace(FAST, bfloat16=False, channels_last=False)
    for case in site.cases:
        image, reference = load_case(case, site)
        today = segment_image(bundle, image, CPU, levers=REFERENCE).labels
        exact = segment_image(bundle, image, CPU, levers=exact_levers).labels
        fast = segment_image(bundle, image, CPU, levers=FAST).labels
        for labels in (exact, fast):
            assert labels.GetSize() == image.GetSize() and labels.GetOrigin() == image.GetOrigin()
            assert labels.GetSpacing() == image.GetSpacing() and labels.GetDirection() == image.GetDirection()
        today_array = sitk.GetArrayFromImage(today)
        assert (today_array == 1).sum() > 1000, "the model finds a liver: the comparison means something"
        assert np.array_equal(sitk.GetArrayFromImage(exact), today_array)
        assert (sitk.GetArrayFromImage(fast) == today_array).mean() > 0.999
        dice = [evaluate_label_maps(x, reference, organs=("liver",))["liver"]["dice"] for x in (today, fast)]
        assert abs(dice[0] - dice[1]) < 0.01
