"""Test-time BatchNorm adaptation: trained gamma/beta kept, windows spread over the body and
inside the volume (no padding read), statistics blended with the federation's by window count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from SegVizLogic.bundle import load_bundle, save_bundle
from SegVizLogic.inference import adapt_batchnorm, adaptation_windows, batchnorm_trained, bundle_probabilities
from SegVizLogic.network import PARTITION_BATCHNORM, NetworkConfig, build_network, partition_state
from SegVizLogic.preprocessing import Preprocessing

SMALL = NetworkConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=1, body_features=4)
CPU = torch.device("cpu")


def _body(shape=(120, 100, 60), centre_x=None) -> torch.Tensor:
    """A preprocessed volume: an elliptic body cylinder (soft tissue ~0.5) in air (0)."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    cx = shape[0] / 2 if centre_x is None else centre_x
    inside = ((x - cx) / (0.45 * shape[0])) ** 2 + ((y - shape[1] / 2) / (0.4 * shape[1])) ** 2 < 1
    rng = np.random.default_rng(0)
    volume = np.where(inside[..., None], 0.5 + 0.1 * rng.standard_normal(shape), 0.0).astype(np.float32)
    return torch.from_numpy(volume)[None]


def _trained_model(seed: int = 0) -> nn.Module:
    """A network whose BatchNorm looks trained: distinctive gamma, beta and statistics."""
    torch.manual_seed(seed)
    model = build_network(SMALL)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.weight.data.uniform_(0.5, 2.0)
            module.bias.data.uniform_(-0.5, 0.5)
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(40)
    return model.eval()


def _norms(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]


def test_adaptation_keeps_trained_gamma_and_beta_and_re_estimates_statistics():
    model = _trained_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    used = adapt_batchnorm(model, _body(), (32, 32, 16), CPU, max_windows=8)
    assert used == 8 and not model.training
    after = model.state_dict()
    for name, value in before.items():
        if name.endswith(("weight", "bias", "num_batches_tracked")):
            torch.testing.assert_close(after[name], value, rtol=0, atol=0)  # every trained parameter kept
    changed = [n for n in before if n.endswith("running_mean") and not torch.allclose(before[n], after[n])]
    assert len(changed) == len(_norms(model))  # every layer's statistics re-estimated


def test_statistics_blend_towards_the_trained_ones_by_window_count():
    volume = _body()
    alone = _trained_model()
    adapt_batchnorm(alone, volume, (32, 32, 16), CPU, max_windows=8, prior_windows=0)
    blended = _trained_model()
    prior = [(m.running_mean.clone(), m.running_var.clone()) for m in _norms(blended)]
    adapt_batchnorm(blended, volume, (32, 32, 16), CPU, max_windows=8, prior_windows=24)
    for a, b, (mean, var) in zip(_norms(alone), _norms(blended), prior):
        # 8 windows of the volume against a prior worth 24: a quarter volume, three quarters trained
        torch.testing.assert_close(b.running_mean, 0.25 * a.running_mean + 0.75 * mean)
        torch.testing.assert_close(b.running_var, 0.25 * a.running_var + 0.75 * var)


def test_windows_are_spread_over_the_body_not_taken_in_scan_order():
    volume = _body((160, 120, 80), centre_x=70)
    roi = (32, 32, 16)
    starts = np.array(adaptation_windows(volume, roi, max_windows=16))
    assert len(starts) == 16 and len({tuple(s) for s in starts}) == 16
    centres = starts + np.array(roi) / 2
    body = volume[0] > 0.01
    xs, ys, zs = (np.flatnonzero(body.any(dim=d).any(dim=e)) for d, e in ((2, 1), (2, 0), (1, 0)))
    for axis, coords in enumerate((xs, ys, zs)):
        extent = coords.max() - coords.min()
        # the centres reach across most of the body along every axis...
        assert np.ptp(centres[:, axis]) > 0.6 * (extent - roi[axis]), axis
        # ...with windows on both sides of the body's middle
        middle = (coords.max() + coords.min()) / 2
        assert (centres[:, axis] < middle).sum() >= 4 and (centres[:, axis] > middle).sum() >= 4, axis
    for a, b, c in starts:  # every window lies in the volume and is mostly body
        assert a + roi[0] <= 160 and b + roi[1] <= 120 and c + roi[2] <= 80
        assert float(body[a : a + roi[0], b : b + roi[1], c : c + roi[2]].float().mean()) >= 0.5


def test_no_padding_enters_the_statistics():
    model = _trained_model()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    volume = 0.5 + 0.5 * torch.rand(1, 70, 50, 13)  # thin along z and no voxel is 0
    adapt_batchnorm(model, volume, (32, 32, 16), CPU, max_windows=6)
    assert seen and all(batch.shape[2:] == (32, 32, 12) for batch in seen)  # z window shrunk to the volume (x4)
    assert all(float(batch.min()) >= 0.5 for batch in seen)  # not a single padded voxel
    # thinner than the network's divisor: no window fits without padding, statistics stay the trained ones
    thin = _trained_model()
    before = [m.running_mean.clone() for m in _norms(thin)]
    assert adapt_batchnorm(thin, 0.5 + torch.rand(1, 70, 50, 3), (32, 32, 16), CPU, prior_windows=4) == 0
    assert all(torch.equal(m.running_mean, b) for m, b in zip(_norms(thin), before))


def _adapted_by_bundle(bundle, monkeypatch, shape=(64, 64, 32)) -> nn.Module:
    """The model ``bundle_probabilities(..., "adapt")`` segments with."""
    from SegVizLogic import inference

    seen = {}
    original = inference.predict_probabilities

    def recording(model, *args, **kwargs):
        seen["model"] = model
        return original(model, *args, **kwargs)

    monkeypatch.setattr(inference, "predict_probabilities", recording)
    probabilities = bundle_probabilities(bundle, _body(shape), CPU, batchnorm="adapt")
    assert probabilities.shape == (4, *shape) and torch.isfinite(probabilities).all()
    return seen["model"]


def test_bundle_adapts_the_model_batchnorm_and_keeps_trained_gamma_and_beta(tmp_path, monkeypatch):
    """A local (or central, FedAvg) bundle's BatchNorm is trained: adaptation keeps its gamma and
    beta. A FedBN bundle's model BatchNorm is the initial one (gamma 1, beta 0): adaptation
    starts there, not from the sites' averaged BatchNorm (which validated worse, docs/METHOD.md)."""
    trained = _trained_model(2)
    local = load_bundle(
        save_bundle(tmp_path / "local.segviz", trained, Preprocessing(), training={"patch_size": [32, 32, 16]})
    )
    adapted = _adapted_by_bundle(local, monkeypatch)
    for mine, theirs in zip(_norms(adapted), _norms(trained)):
        assert torch.equal(mine.weight, theirs.weight) and torch.equal(mine.bias, theirs.bias)
        assert not torch.allclose(mine.running_mean, theirs.running_mean)  # statistics of this volume

    fedbn_model = build_network(SMALL)
    assert not batchnorm_trained(fedbn_model)
    averaged = partition_state(_trained_model(1))[PARTITION_BATCHNORM]
    fedbn = load_bundle(
        save_bundle(
            tmp_path / "fedbn.segviz",
            fedbn_model,
            Preprocessing(),
            batchnorm_variants={"averaged": averaged},
            default_batchnorm="adapt",
            training={"patch_size": [32, 32, 16]},
        )
    )
    adapted = _adapted_by_bundle(fedbn, monkeypatch)
    for module in _norms(adapted):
        assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
        assert not torch.allclose(module.running_var, torch.ones_like(module.running_var))
    # a volume too thin for any window: the federation's averaged BatchNorm rather than untrained statistics
    thin = _adapted_by_bundle(fedbn, monkeypatch, shape=(64, 64, 3))
    mean = next(k for k in averaged if k.endswith("running_mean"))
    np.testing.assert_array_equal(thin.state_dict()[mean].numpy(), averaged[mean])


@pytest.mark.parametrize("shape", [(40, 40, 20), (33, 70, 17)])
def test_windows_fit_small_volumes(shape):
    volume = 0.5 * torch.ones(1, *shape)
    roi = [min(32, s) // 4 * 4 for s in shape]
    starts = adaptation_windows(volume, roi, max_windows=16)
    assert starts and all(s + r <= n for start in starts for s, r, n in zip(start, roi, shape))


def test_organ_windows_are_centred_on_the_foreground_like_training_patches():
    """``adapt-organs``: two thirds of the windows centred on the organ mask (moved inside the
    volume where the organ is near an edge), the rest the body windows of ``adapt``; the same
    volume and mask give the same windows."""
    from SegVizLogic.inference import ADAPT_FOREGROUND_SHARE

    volume = _body((160, 120, 80), centre_x=70)
    roi = (32, 32, 16)
    organ = np.zeros((160, 120, 80), bool)
    organ[40:60, 30:50, 30:40] = True  # an organ inside the body
    organ[150:156, 55:65, 2:6] = True  # and one at the volume's edge
    starts = adaptation_windows(volume, roi, max_windows=16, foreground=organ)
    assert starts == adaptation_windows(volume, roi, max_windows=16, foreground=organ)
    centred = round(ADAPT_FOREGROUND_SHARE * 16)
    assert len(starts) == 16 and centred == 11
    for a, b, c in starts:  # inside the volume: no padding
        assert 0 <= a <= 160 - roi[0] and 0 <= b <= 120 - roi[1] and 0 <= c <= 80 - roi[2]
    for a, b, c in starts[:centred]:  # each of the first eleven holds organ voxels
        assert organ[a : a + roi[0], b : b + roi[1], c : c + roi[2]].any()
    assert starts[centred:] == adaptation_windows(volume, roi, max_windows=16 - centred)
    # no organ found: the body windows alone; a mask of another shape is refused
    assert adaptation_windows(volume, roi, 16, foreground=np.zeros_like(organ)) == adaptation_windows(volume, roi, 16)
    with pytest.raises(ValueError, match="not the volume's shape"):
        adaptation_windows(volume, roi, 16, foreground=organ[:-1])


def test_adapt_organs_reads_windows_around_what_a_first_pass_found(tmp_path, monkeypatch):
    """A first pass without overlap, with ``adapt``'s statistics, finds the organs; the final pass
    uses statistics re-estimated on windows centred on them."""
    from SegVizLogic import inference

    bundle = load_bundle(
        save_bundle(
            tmp_path / "local.segviz", _trained_model(3), Preprocessing(), training={"patch_size": [32, 32, 16]}
        )
    )
    passes, masks = [], []
    predict, windows = inference.predict_probabilities, inference.adaptation_windows

    def recording_predict(model, image, roi, device, **kwargs):
        passes.append(kwargs["overlap"])
        out = predict(model, image, roi, device, **kwargs)
        if len(passes) == 1:  # the first pass "finds" an organ in one corner of the volume
            out = torch.zeros_like(out)
            out[2, 4:12, 4:12, 2:8] = 0.9
        return out

    def recording_windows(image, roi, max_windows=16, threshold=0.01, foreground=None, **kwargs):
        masks.append(foreground)
        return windows(image, roi, max_windows, threshold, foreground=foreground, **kwargs)

    monkeypatch.setattr(inference, "predict_probabilities", recording_predict)
    monkeypatch.setattr(inference, "adaptation_windows", recording_windows)
    probabilities = bundle_probabilities(bundle, _body((64, 64, 32)), CPU, batchnorm="adapt-organs")
    assert probabilities.shape == (4, 64, 64, 32) and torch.isfinite(probabilities).all()
    assert passes == [inference.ADAPT_FIRST_PASS_OVERLAP, inference.INFERENCE_OVERLAP]
    assert masks[0] is None and masks[1] is not None
    assert int(masks[1].sum()) == 8 * 8 * 6 and masks[1][4:12, 4:12, 2:8].all()
    assert "adapt-organs" in bundle.batchnorm_choices()
    # With the fast path's body crop the first pass sees the body's box; the mask is the whole volume's.
    passes.clear(), masks.clear()
    body = torch.zeros(1, 160, 160, 32)
    body[0, 60:110, 60:110] = 0.5  # a body in the middle of much air
    box = inference.body_box(body, 0.01, (32, 32, 16), inference.INFERENCE_OVERLAP)
    assert box is not None and box[0].start > 0 and box[1].start > 0
    bundle_probabilities(bundle, body, CPU, batchnorm="adapt-organs", levers=inference.FAST)
    assert masks[1].shape == (160, 160, 32)
    assert masks[1][box].sum() == masks[1].sum() == 8 * 8 * 6  # the organ, at its place in the box
    # A head no site taught (this liver model's channel 2) places no window.
    liver_only = load_bundle(
        save_bundle(
            tmp_path / "liver.segviz",
            _trained_model(3),
            Preprocessing(),
            training={"patch_size": [32, 32, 16]},
            trained_organs=["liver"],
        )
    )
    passes.clear(), masks.clear()
    bundle_probabilities(liver_only, _body((64, 64, 32)), CPU, batchnorm="adapt-organs")
    assert masks[1] is not None and not masks[1].any()
