"""The partial-label loss's Dice is one batch Dice per organ: negative patches add their false
positives to it and nothing else, and an organ absent from its annotated patches has no Dice term."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from SegVizLogic.losses import PartialLabelLoss

SHAPE = (8, 8, 8)


def _batch(foreground: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Liver-annotated patches: a 4x4x4 liver cube where ``foreground`` says, nothing elsewhere."""
    target = torch.zeros(len(foreground), 4, *SHAPE)
    for i, has in enumerate(foreground):
        if has:
            target[i, 0, 2:6, 2:6, 2:6] = 1
    annotated = torch.zeros(len(foreground), 4, dtype=torch.bool)
    annotated[:, 0] = True
    return target, annotated


def _soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    return 1 - (2 * (p * target).sum() + 1e-5) / (p.sum() + target.sum() + 1e-5)


def test_negative_patch_only_adds_its_false_positives_to_the_batch_dice():
    target, annotated = _batch([True, False])
    logits = torch.where(target.bool(), 2.0, -2.0)  # a fair prediction: p 0.88 inside, 0.12 outside
    logits[1] = -8.0  # the negative patch predicted (almost) empty
    loss = PartialLabelLoss(exclusion_weight=0.0)(logits, target, annotated)
    bce = F.binary_cross_entropy_with_logits(logits[:, 0], target[:, 0])
    expected_dice = _soft_dice_loss(logits[:, 0], target[:, 0])
    torch.testing.assert_close(loss, bce + expected_dice)
    # Per patch, the negative patch's Dice would be 1 - 1e-5 / (sum p + 1e-5), about 0.99 here,
    # and the loss 0.5 higher; in the batch Dice it shifts the ratio by its few false positives.
    alone = _soft_dice_loss(logits[:1, 0], target[:1, 0])
    assert abs(float(expected_dice - alone)) < 0.01
    per_patch = (alone + _soft_dice_loss(logits[1:, 0], target[1:, 0])) / 2
    assert float(per_patch - expected_dice) > 0.3  # (0.35 + 1) / 2 against 0.35


def test_organ_without_foreground_in_its_patches_is_taught_by_cross_entropy_alone():
    target, annotated = _batch([False, False])
    logits = torch.full_like(target, -3.0)
    logits[:, 0, :2] = 1.0  # a few false positives
    loss = PartialLabelLoss(exclusion_weight=0.0)(logits, target, annotated)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits[:, 0], target[:, 0]))


def test_each_organ_has_its_own_batch_dice_over_the_patches_that_annotate_it():
    target = torch.zeros(2, 4, *SHAPE)
    target[0, 0, 2:6, 2:6, 2:6] = 1  # sample 0: liver site
    target[1, 1, 1:4, 1:4, 1:4] = 1  # sample 1: spleen site
    annotated = torch.tensor([[True, False, False, False], [False, True, False, False]])
    logits = torch.where(target.bool(), 1.5, -1.5)
    loss = PartialLabelLoss(exclusion_weight=0.0)(logits, target, annotated)
    dice = (_soft_dice_loss(logits[0, 0], target[0, 0]) + _soft_dice_loss(logits[1, 1], target[1, 1])) / 2
    bce = F.binary_cross_entropy_with_logits(logits[annotated], target[annotated])
    torch.testing.assert_close(loss, dice + bce)
