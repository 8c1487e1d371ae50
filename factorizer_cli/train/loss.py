"""The training losses, over the deep-supervision heads: Dice + BCE for sigmoid regions, Dice +
cross-entropy for softmax classes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Pooled = Callable[[Tensor], Tensor]  # sums batch statistics over the processes of a run (identity alone)


def _alone(statistics: Tensor) -> Tensor:
    return statistics


def dice_bce(logits: Tensor, target: Tensor, smooth: float = 1e-5, pooled: Pooled = _alone) -> Tensor:
    """Soft Dice over the batch (per region, averaged) plus BCE: Dice for overlap, BCE for calibration.

    The Dice pools the whole batch, so with several processes its sums are ``pooled`` over them:
    every process then holds the Dice of the global batch, as one process would.
    """
    probabilities = torch.sigmoid(logits)
    axes = [0, *range(2, logits.dim())]
    intersection = pooled((probabilities * target).sum(axes))
    total = pooled(probabilities.sum(axes) + target.sum(axes))
    dice = (2 * intersection + smooth) / (total + smooth)
    return (1 - dice).mean() + F.binary_cross_entropy_with_logits(logits, target)


def dice_ce(logits: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """Soft Dice of the softmax against one-hot ``target`` plus cross-entropy, as 3D UX-Net and RepUX-Net
    train (MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)``: the background is a class like any
    other, Dice per crop and class then averaged, smoothing 1e-5 above and below, both terms weighted 1).

    ``target`` may be soft (a one-hot averaged down to a smaller head): cross-entropy takes
    probabilities.
    """
    probabilities = logits.softmax(1)
    axes = list(range(2, logits.dim()))
    intersection = (probabilities * target).sum(axes)
    total = probabilities.sum(axes) + target.sum(axes)
    dice = (2 * intersection + smooth) / (total + smooth)
    return (1 - dice).mean() + F.cross_entropy(logits, target)


def one_hot(classes: Tensor, channels: int) -> Tensor:
    """``(B, 1, *grid)`` class indices as ``(B, channels, *grid)`` float one-hot."""
    return F.one_hot(classes[:, 0], channels).movedim(-1, 1).float()


def deep_supervision_loss(outputs: Tensor | Sequence[Tensor], target: Tensor,
                          activation: str = "sigmoid", pooled: Pooled = _alone) -> Tensor:
    """Heads weighted 1, 1/2, 1/4, ... (normalized), each against the target averaged to its size.

    Sigmoid: ``target`` is ``(B, regions, *grid)`` float, the loss Dice + BCE. Softmax: ``target`` is
    ``(B, 1, *grid)`` class indices, made one-hot for the loss, Dice + cross-entropy (per crop: nothing
    to pool between processes, whose mean DistributedDataParallel takes).
    """
    outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    softmax = activation == "softmax"
    if softmax:
        target = one_hot(target, outputs[0].shape[1])
    weights = [0.5**i for i in range(len(outputs))]
    total = 0.0
    for weight, logits in zip(weights, outputs):
        scaled = target if logits.shape[2:] == target.shape[2:] else \
            F.interpolate(target, size=logits.shape[2:], mode="area")
        term = dice_ce(logits.float(), scaled) if softmax else dice_bce(logits.float(), scaled, pooled=pooled)
        total = total + weight * term
    return total / sum(weights)
