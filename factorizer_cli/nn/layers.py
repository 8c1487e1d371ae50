"""Small channels-first layers shared by every Factorizer variant.

Parameter names and shapes match upstream (``linear.weight`` of shape ``out × in × 1``, ``norm.weight``,
``pos``), so upstream checkpoints load unchanged; the forward passes avoid upstream's transposes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair


class Linear(nn.Module):
    """A 1×1 convolution: mixes channels at every voxel of a ``B × C × *spatial`` map."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__()
        # Kept as a Conv1d so that the parameter layout is upstream's (`linear.weight`: out × in × 1).
        self.linear = nn.Conv1d(in_channels, out_channels, kernel_size=1, bias=bool(bias))

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.linear.weight[..., 0], self.linear.bias
        out = torch.matmul(weight, x.flatten(2))
        if bias is not None:
            out.add_(bias[:, None])  # in place: matmul's backward does not need its output
        return out.view(x.shape[0], -1, *x.shape[2:])


class LayerNorm(nn.Module):
    """Layer norm over the channel axis of a channels-first map."""

    def __init__(self, dim: int, eps: float = 1e-5, **kwargs) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.movedim(1, -1), self.norm.normalized_shape, self.norm.weight,
                            self.norm.bias, self.norm.eps).movedim(-1, 1)


class MLP(nn.Module):
    """Channel MLP: Linear → GELU → Dropout → Linear → Dropout, hidden width ``ratio × in_channels``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        hidden_channels: int | None = None,
        ratio: float = 2,
        dropout: float | tuple[float, float] = 0.0,
        spatial_size: tuple[int, ...] | None = None,  # part of the block calling convention; unused
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        hidden_channels = int(ratio * in_channels) if hidden_channels is None else hidden_channels
        drop_hidden, drop_out = _pair(dropout)
        self.block = nn.Sequential(
            Linear(in_channels, hidden_channels),
            nn.GELU(),
            nn.Dropout(drop_hidden),
            Linear(hidden_channels, out_channels),
            nn.Dropout(drop_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class PositionalEmbedding(nn.Module):
    """A learnable map ``pos`` (1 × C × *spatial) added to the input; ties the network to its ROI size."""

    def __init__(self, channels: int, spatial_size: tuple[int, ...]) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.empty(1, channels, *spatial_size))
        nn.init.normal_(self.pos, std=1.0)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pos


class Residual(nn.Module):
    """``fn(x) + x``; the attribute is named ``fn`` as upstream's, for checkpoint keys."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x) + x
