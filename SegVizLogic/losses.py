"""Losses for partially-annotated sites.

A site teaches only the organs it annotated: the loss of :class:`PartialLabelLoss` is computed
on those organs' channels, and the head of an organ the site did not annotate is never taught
that anything is background. One thing a site does know about the other organs: organs do not
overlap, so a voxel it labelled as its own organ is *not* any other organ. The optional
exclusion term teaches exactly that, on those voxels alone (Shi et al., "Marginal loss and
exclusion loss for partially supervised multi-organ segmentation", MedIA 2021). Without it, a
head trained at one site (the liver's, say) is never shown the spleen or a kidney as
"not liver" under another scanner and over-fires there; with ``exclusion_weight=0`` an
unannotated head gets exactly zero gradient.
"""

from __future__ import annotations

import torch

# isort: off
from . import lean_monai  # noqa: F401  (before MONAI: keeps its heavy optional packages out)

# isort: on
from monai.losses import DiceLoss
from torch import nn
from torch.nn import functional as F

__all__ = ["NaiveSoftmaxLoss", "PartialLabelLoss"]


class PartialLabelLoss(nn.Module):
    """Per-organ batch soft Dice + binary cross-entropy over annotated organs only.

    The Dice of an organ is one batch Dice over every patch of the batch whose site annotated
    that organ (MONAI ``DiceLoss(batch=True)``): intersections and volumes are summed over those
    patches before the ratio. A per-patch Dice would be about 1 on a patch without the organ
    whatever the prediction, with a gradient spike as the predicted volume nears zero; in a batch
    Dice such a patch adds its false positives to the denominator and nothing else. An organ
    with no foreground in any of its annotated patches of the batch gets no Dice term (the ratio
    would be empty) and is taught by the cross-entropy alone.

    Args:
        dice_weight: weight of the Dice term.
        bce_weight: weight of the BCE term.
        exclusion_weight: weight of the exclusion term (unannotated heads pushed to 0 on the
            voxels of the sample's annotated organs only; 0 disables it).

    Shapes: ``logits`` and ``target`` ``(B, C, X, Y, Z)`` (target binary, one channel per
    organ of the network), ``annotated`` ``(B, C)`` bool: which organs the sample's site
    annotated. Returns a scalar: the mean batch Dice over organs with annotated foreground plus
    the mean cross-entropy over annotated (sample, organ) pairs (plus the exclusion term).

    Example::

        loss = PartialLabelLoss()(logits, target, annotated=torch.tensor([[True, False, False, False]]))
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, exclusion_weight: float = 0.0) -> None:
        super().__init__()
        if dice_weight < 0 or bce_weight < 0 or dice_weight + bce_weight == 0 or exclusion_weight < 0:
            raise ValueError(
                f"weights must be non-negative and dice/bce not both zero, got {dice_weight}, {bce_weight}, {exclusion_weight}"
            )
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.exclusion_weight = exclusion_weight
        self.dice = DiceLoss(sigmoid=True, batch=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
        if annotated.shape != logits.shape[:2]:
            raise ValueError(f"annotated must be (B, C) = {tuple(logits.shape[:2])}, got {tuple(annotated.shape)}")
        annotated = annotated.bool()
        if not annotated.any():
            raise ValueError("no annotated organ in the batch: nothing to learn from")
        # Select the annotated (sample, organ) pairs before any arithmetic, so the other
        # channels are not in the graph at all (zero gradient, and no 0 * NaN surprises).
        dice_terms = []
        for organ in range(logits.shape[1]):
            rows = annotated[:, organ]
            organ_target = target[rows, organ]
            if organ_target.numel() and organ_target.any():
                dice_terms.append(self.dice(logits[rows, organ][:, None], organ_target[:, None].to(logits.dtype)))
        picked_logits = logits[annotated]  # (N, X, Y, Z)
        picked_target = target[annotated].to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(picked_logits, picked_target)
        loss = self.bce_weight * bce
        if dice_terms:
            loss = loss + self.dice_weight * torch.stack(dice_terms).mean()
        unannotated = ~annotated
        if self.exclusion_weight > 0 and unannotated.any():
            # Voxels some annotated organ of the sample occupies: certainly not another organ.
            known = (target.bool() & annotated[:, :, None, None, None]).any(dim=1)  # (B, X, Y, Z)
            samples = unannotated.nonzero()[:, 0]
            mask = known[samples].flatten(1).to(logits.dtype)
            other = logits[unannotated].flatten(1)
            pushed = F.binary_cross_entropy_with_logits(other, torch.zeros_like(other), reduction="none")
            per_pair = (pushed * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            loss = loss + self.exclusion_weight * per_pair.mean()
        return loss


class NaiveSoftmaxLoss(nn.Module):
    """The paper's naive central baseline: one softmax over background + organs, where every
    voxel not labelled as an organ by its site counts as background (even organs the site
    never annotated). Exists only for the experiments, to show why it fails.

    Shapes as :class:`PartialLabelLoss`; ``annotated`` is accepted and ignored.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dice = DiceLoss(softmax=True, include_background=False)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor | None = None
    ) -> torch.Tensor:
        background_logit = torch.zeros_like(logits[:, :1])
        full_logits = torch.cat([background_logit, logits], dim=1)
        background = 1 - target.amax(dim=1, keepdim=True)
        full_target = torch.cat([background, target], dim=1).to(logits.dtype)
        ce = F.cross_entropy(full_logits, full_target.argmax(dim=1))
        return self.dice(full_logits, full_target) + ce
