"""Dice + binary cross-entropy over the deep-supervision heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def dice_bce(logits: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """Soft Dice over the batch (per region, averaged) plus BCE: Dice for overlap, BCE for calibration."""
    probabilities = torch.sigmoid(logits)
    axes = [0, *range(2, logits.dim())]
    intersection = (probabilities * target).sum(axes)
    total = probabilities.sum(axes) + target.sum(axes)
    dice = (2 * intersection + smooth) / (total + smooth)
    return (1 - dice).mean() + F.binary_cross_entropy_with_logits(logits, target)


def deep_supervision_loss(outputs: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
    """Heads weighted 1, 1/2, 1/4, ... (normalized), each against the target averaged to its size."""
    outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    weights = [0.5**i for i in range(len(outputs))]
    total = 0.0
    for weight, logits in zip(weights, outputs):
        scaled = target if logits.shape[2:] == target.shape[2:] else \
            F.interpolate(target, size=logits.shape[2:], mode="area")
        total = total + weight * dice_bce(logits.float(), scaled)
    return total / sum(weights)
