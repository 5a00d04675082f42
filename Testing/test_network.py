"""Network shape, the FedBN parameter partition and the partial-label loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from SegVizLogic.losses import NaiveSoftmaxLoss, PartialLabelLoss
from SegVizLogic.network import NetworkConfig, build_network, partition_state

TINY = NetworkConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=1, body_features=4)

# [config, input_shape, expected_shape]
TEST_CASE_1 = [TINY, (2, 1, 16, 16, 8), (2, 4, 16, 16, 8)]
TEST_CASE_2 = [
    NetworkConfig(organs=("liver", "kidney"), channels=(4, 8), strides=(2,), num_res_units=0),
    (1, 1, 8, 8, 8),
    (1, 2, 8, 8, 8),
]


@pytest.mark.parametrize("config, input_shape, expected_shape", [TEST_CASE_1, TEST_CASE_2])
def test_output_shape(config, input_shape, expected_shape):
    net = build_network(config).eval()
    with torch.no_grad():
        assert tuple(net(torch.rand(input_shape)).shape) == expected_shape


def test_paper_configuration():
    net = build_network()
    body = net.body
    assert net.config.channels == (16, 32, 64, 128, 256) and net.config.strides == (2, 2, 2, 2)
    assert net.config.num_res_units == 2
    assert any(isinstance(m, nn.BatchNorm3d) for m in body.modules())
    assert not any(isinstance(m, nn.InstanceNorm3d) for m in body.modules())


@pytest.mark.parametrize("bad", [{"organs": ("lung",)}, {"strides": (2,)}, {"output": "tanh"}, {"organs": ()}])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        NetworkConfig(**bad)


def test_config_round_trip():
    assert NetworkConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="unknown network config keys"):
        NetworkConfig.from_dict({**TINY.to_dict(), "depth": 3})


def test_partition_covers_every_tensor_once_and_batchnorm_is_complete():
    net = build_network()
    state = net.state_dict()
    groups = partition_state(net)
    keys = [k for g in groups.values() for k in g]
    assert sorted(keys) == sorted(state)  # every tensor exactly once
    assert len(keys) == len(set(keys))
    assert set(groups) == {"shared", "batchnorm", "head:liver", "head:spleen", "head:pancreas", "head:kidney"}
    bn_modules = {n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm3d)}
    bn_keys = {k for k in state if k.rsplit(".", 1)[0] in bn_modules}
    assert set(groups["batchnorm"]) == bn_keys
    suffixes = {k.rsplit(".", 1)[1] for k in groups["batchnorm"]}
    assert suffixes == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert all(k.startswith("heads.liver.") for k in groups["head:liver"])
    assert not any(k.startswith("heads.") for k in groups["shared"])


def test_exclusion_teaches_unannotated_heads_only_on_other_organs_voxels():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 8, 8, 8, requires_grad=True)
    target = torch.zeros(1, 4, 8, 8, 8)
    target[0, 0, 2:5, 2:5, 2:5] = 1  # liver annotated here
    target[0, 1, 6:8, 6:8, 6:8] = 1  # spleen visible but not annotated: must not matter
    annotated = torch.tensor([[True, False, False, False]])
    PartialLabelLoss(exclusion_weight=1.0)(logits, target, annotated).backward()
    grad = logits.grad[0]
    liver_voxels = target[0, 0].bool()
    for channel in (1, 2, 3):  # spleen, pancreas, kidney heads: pushed down on liver voxels only
        assert torch.count_nonzero(grad[channel][~liver_voxels]) == 0
        assert (grad[channel][liver_voxels] > 0).all()  # gradient of BCE towards 0 is positive
    assert torch.count_nonzero(grad[0]) > 0


def test_loss_gives_zero_gradient_to_unannotated_heads():
    torch.manual_seed(0)
    net = build_network(TINY)
    x = torch.rand(2, 1, 16, 16, 8)
    target = torch.zeros(2, 4, 16, 16, 8)
    target[:, 0, 4:10, 4:10, 2:6] = 1
    target[:, 1, 1:4, 1:4, 1:3] = 1  # spleen present in the image, but not annotated
    annotated = torch.tensor([[True, False, False, False], [True, False, False, False]])
    loss = PartialLabelLoss()(net(x), target, annotated)
    loss.backward()
    for organ in ("spleen", "pancreas", "kidney"):
        for p in net.heads[organ].parameters():
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, organ
    assert any(torch.count_nonzero(p.grad) > 0 for p in net.heads["liver"].parameters())


def test_loss_is_low_for_perfect_prediction_and_masks_per_sample():
    target = torch.zeros(2, 4, 8, 8, 8)
    target[0, 0, 2:6, 2:6, 2:6] = 1
    perfect = (target * 2 - 1) * 30
    annotated = torch.tensor([[True, False, False, False], [False, True, False, False]])
    loss = PartialLabelLoss()
    assert float(loss(perfect, target, annotated)) < 1e-3
    wrong = perfect.clone()
    wrong[1, 0] = 30  # unannotated organ of sample 1 predicted everywhere: no penalty
    assert float(loss(wrong, target, annotated)) < 1e-3
    wrong[0, 0] = -30  # annotated organ of sample 0 missed: penalised
    assert float(loss(wrong, target, annotated)) > 0.4
    with pytest.raises(ValueError, match="no annotated organ"):
        loss(perfect, target, torch.zeros(2, 4, dtype=torch.bool))


def test_naive_loss_teaches_unannotated_as_background():
    target = torch.zeros(1, 4, 8, 8, 8)
    logits = torch.full((1, 4, 8, 8, 8), -10.0)
    logits[:, 1] = 10.0  # spleen predicted everywhere; its site never labelled spleen
    assert float(NaiveSoftmaxLoss()(logits, target)) > 1.0
