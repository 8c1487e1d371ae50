"""Plain PyTorch layers as a family: what other families' descriptions nest (a stem, a head, an
activation), and what a one-layer model is (the test suite's oracle networks, a 1×1 convolution)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .registry import Family, UpstreamFormat, register


def _is_state_dict(checkpoint: Any) -> bool:
    return (isinstance(checkpoint, Mapping) and bool(checkpoint)
            and all(isinstance(v, torch.Tensor) for v in checkpoint.values()))


FAMILY = register(Family(
    name="layers",
    title="plain PyTorch layer",
    classes={
        cls.__name__: cls
        for cls in (
            nn.Conv1d, nn.Conv2d, nn.Conv3d,
            nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
            nn.ReLU, nn.GELU, nn.LeakyReLU, nn.Identity,
        )
    },
    upstream=(UpstreamFormat("state-dict", _is_state_dict, lambda checkpoint, model: dict(checkpoint)),),
))
