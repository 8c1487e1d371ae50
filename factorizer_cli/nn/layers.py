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
    """A 1×1 convolution: mixes channels at every voxel of a ``B × C × *spatial`` map.

    Several maps may be given; they are treated as their concatenation along the channels, without
    building it (the decoder's skip connection and upsampled features, 2 × C channels at full size).
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__()
        # Kept as a Conv1d so that the parameter layout is upstream's (`linear.weight`: out × in × 1).
        self.linear = nn.Conv1d(in_channels, out_channels, kernel_size=1, bias=bool(bias))

    def forward(self, *parts: Tensor) -> Tensor:
        weight, bias = self.linear.weight[..., 0], self.linear.bias
        first = parts[0]
        channels = sum(part.shape[1] for part in parts)
        if channels != weight.shape[1]:
            raise ValueError(f"Linear expects {weight.shape[1]} input channels, got {channels}")
        if all(is_channels_last(part) for part in parts):
            return self._forward_rows(parts, weight, bias)
        out, start = None, 0
        for part in parts:
            flat = part.flatten(2)
            w = weight[:, start : start + flat.shape[1]].expand(flat.shape[0], -1, -1)
            start += flat.shape[1]
            # Out of place: under autocast an in-place op would mix the fp16 ``out`` with fp32 inputs.
            out = torch.bmm(w, flat) if out is None else torch.baddbmm(out, w, flat)
        if bias is not None:
            out.add_(bias[:, None])  # in place: bmm's backward does not need its output
        return out.view(first.shape[0], -1, *first.shape[2:])

    @staticmethod
    def _forward_rows(parts: tuple[Tensor, ...], weight: Tensor, bias: Tensor | None) -> Tensor:
        """Channels-last maps are voxel rows already: one matrix product per part, no transposes."""
        out, start = None, 0
        for part in parts:
            rows, channels = voxel_rows(part), part.shape[1]
            w = weight[:, start : start + channels].t()
            start += channels
            if out is None:
                out = rows @ w if bias is None else torch.addmm(bias, rows, w)
            else:
                out = torch.addmm(out, rows, w)
        return from_voxel_rows(out, parts[0].shape)


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


# Inference helpers. A channel-wise LayerNorm followed by per-voxel layers can run over a few thousand
# voxels at a time, so the normalized map and the MLP's hidden map (2-4 × C channels) never exist at
# full size: on a 128³ input that is hundreds of MB per block.

_CHUNK_ELEMENTS = 1 << 20


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` (``B × C × *spatial``) is stored channels last, so that its voxels are rows."""
    return x.dim() > 2 and x.shape[1] > 1 and x.movedim(1, -1).is_contiguous() and not x.is_contiguous()


def voxel_rows(x: Tensor) -> Tensor:
    """A channels-last map as a ``voxels × channels`` matrix, a view."""
    return x.movedim(1, -1).view(-1, x.shape[1])


def from_voxel_rows(rows: Tensor, shape: torch.Size) -> Tensor:
    """``voxels × C'`` rows as a channels-last ``B × C' × *spatial`` map, a view."""
    return rows.view(shape[0], *shape[2:], rows.shape[1]).movedim(-1, 1)


def _voxel_chunks(flat: Tensor):
    batch, channels, length = flat.shape
    step = max(1024, _CHUNK_ELEMENTS // channels)
    for b in range(batch):
        for start in range(0, length, step):
            yield b, slice(start, start + step)


def _row_chunks(rows: Tensor):
    step = max(1024, _CHUNK_ELEMENTS // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        yield slice(start, start + step)


def layer_norm_rows(rows: Tensor, norm: LayerNorm) -> Tensor:
    """``norm`` applied to ``rows`` (voxels × channels)."""
    n = norm.norm
    return F.layer_norm(rows, n.normalized_shape, n.weight, n.bias, n.eps)


def norm_linear(x: Tensor, norm: LayerNorm, linear: Linear) -> Tensor:
    """``linear(norm(x))`` without materializing ``norm(x)``; channels-last in, channels-last out."""
    weight, bias = linear.linear.weight[..., 0], linear.linear.bias
    if is_channels_last(x):
        rows = voxel_rows(x)
        out = rows.new_empty((rows.shape[0], weight.shape[0]))
        for voxels in _row_chunks(rows):
            normed = layer_norm_rows(rows[voxels], norm)
            # Out of place, then copied: ``out=`` would bypass autocast.
            out[voxels] = normed @ weight.t() if bias is None else torch.addmm(bias, normed, weight.t())
        return from_voxel_rows(out, x.shape)
    flat = x.flatten(2)
    out = x.new_empty((flat.shape[0], weight.shape[0], flat.shape[2]))
    for b, voxels in _voxel_chunks(flat):
        rows = layer_norm_rows(flat[b, :, voxels].t(), norm)
        result = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
        out[b, :, voxels] = result.t()
    return out.view(x.shape[0], -1, *x.shape[2:])


def mlp_rows_(rows: Tensor, norm: LayerNorm, mlp: MLP) -> Tensor:
    """``rows += mlp(norm(rows))`` in place for voxel rows (``voxels × C``), in one piece."""
    fc1, act, _, fc2, _ = mlp.block
    hidden = act(torch.addmm(fc1.linear.bias, layer_norm_rows(rows, norm), fc1.linear.weight[..., 0].t()))
    return rows.add_(torch.addmm(fc2.linear.bias, hidden, fc2.linear.weight[..., 0].t()))


def mlp_residual_(x: Tensor, norm: LayerNorm, mlp: MLP) -> Tensor:
    """``x += mlp(norm(x))`` in place, chunk by chunk (inference; dropout is the identity)."""
    if is_channels_last(x):
        rows = voxel_rows(x)
        for voxels in _row_chunks(rows):
            mlp_rows_(rows[voxels], norm, mlp)
        return x
    flat = x.flatten(2)
    for b, voxels in _voxel_chunks(flat):
        mlp_rows_(flat[b, :, voxels].t(), norm, mlp)  # a transposed view: the sum lands in ``x``
    return x
