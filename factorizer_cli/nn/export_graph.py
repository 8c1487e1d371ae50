"""The network's full-resolution head as a graph that exports well to ONNX and runs fast in ONNX Runtime.

The PyTorch inference path saves memory with in-place slab loops and block copies into views; traced,
those become thousands of Slice and ScatterND nodes. ``ExportGraph`` computes the same function with
the same parameters as plain tensor algebra, laid out for ONNX Runtime:

- features stay channels last (``B × D × H × W × C``) from the stem to the head: every 1×1 layer is
  one MatMul, every LayerNorm ONNX's own (last axis); the stride-k, kernel-k down- and upsampling
  convolutions are a patch reshape and a MatMul. Only the stem's output is transposed once;
- a (shifted) window partition is one Gather of voxel rows, the cyclic roll included, to
  ``(windows, voxels, C)``, and one Gather back: no roll copies, no 9-dimensional transposes;
- rank-1 HALS on nonnegative input (every published Factorizer) runs on each window's Gram matrix, as
  the PyTorch inference path does (see ``nn.factorization``), all heads at once: one MatMul gives
  the ``C × C`` Gram matrix whose diagonal ``d × d`` blocks are the heads'; the tiny iterations run
  unrolled in float64; the reconstruction is two thin MatMuls. Other NMF configurations run the
  solver's updates unrolled on each head's ``d × voxels`` matrices.

The arithmetic is not repeated here: the half-precision guard, the update loop, the Gram iterations,
the solvers' updates and the shifted-window average are ``nn.factorization``'s and ``nn.matricize``'s
kernels, called with a tensor ε and with Gathers as the window partition.

Layers it does not know are called as they are (channels first). A network that is not a U-shaped
Factorizer is exported through ``predict`` (or ``forward``) unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ExportError
from .blocks import FactMixerBlock, FactorizerBlock, FactorizerStage, FactorizerSubblock
from .factorization import (
    HALF,
    HALS,
    NMF,
    MultiplicativeUpdate,
    in_float32,
    iterate,
    rank1_hals_gram,
)
from .layers import MLP, LayerNorm, Linear, PositionalEmbedding, Residual
from .matricize import Matricize, partition_mean
from .networks import UNet


def channels_last(x: Tensor) -> Tensor:
    return x.permute(0, *range(2, x.ndim), 1)  # not movedim: its negative axes export wrongly


def channels_first(x: Tensor) -> Tensor:
    return x.permute(0, x.ndim - 1, *range(1, x.ndim - 1))


def linear(layer: Linear, *parts: Tensor) -> Tensor:
    """Our 1×1 ``Linear`` on channels-last parts (taken as their concatenation)."""
    weight, out, start = layer.linear.weight[..., 0], None, 0
    for part in parts:
        width = part.shape[-1]
        y = part @ weight[:, start : start + width].t()
        out, start = (y if out is None else out + y), start + width
    return out if layer.linear.bias is None else out + layer.linear.bias


def layer_norm(norm: nn.Module, x: Tensor) -> Tensor:
    if isinstance(norm, LayerNorm):
        n = norm.norm
        return F.layer_norm(x, n.normalized_shape, n.weight, n.bias, n.eps)
    return channels_last(norm(channels_first(x)))


def mlp(module: MLP, x: Tensor) -> Tensor:
    fc1, act, _, fc2, _ = module.block  # dropouts: identity in eval mode
    return linear(fc2, act(linear(fc1, x)))


def sublayer(module: nn.Module, x: Tensor) -> Tensor:
    """A subblock on a channels-last map."""
    if isinstance(module, FactorizerSubblock):
        return subblock(module, x)
    if isinstance(module, MLP):
        return mlp(module, x)
    return channels_last(module(channels_first(x)))


def block(module: nn.Module, x: Tensor) -> Tensor:
    if isinstance(module, FactorizerBlock):
        for residual in module.blocks.values():
            assert isinstance(residual, Residual)
            norm, sub = residual.fn
            x = x + sublayer(sub, layer_norm(norm, x))
        return x
    if isinstance(module, FactMixerBlock):
        x = x + subblock(module.fact, layer_norm(module.norm1, x))
        return x + sublayer(module.mlp, layer_norm(module.norm2, x))
    return channels_last(module(channels_first(x)))


def stage(module: FactorizerStage, *parts: Tensor) -> Tensor:
    """Adapter, positional embedding and blocks; channels-last parts in, channels last out."""
    adapter = getattr(module, "adapter", None)
    if isinstance(adapter, Linear):
        x = linear(adapter, *parts)
    elif adapter is not None:
        x = channels_last(adapter(channels_first(torch.cat(parts, -1))))
    else:
        x = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
    if isinstance(module.pos_embed, PositionalEmbedding):
        x = x + channels_last(module.pos_embed.pos)
    elif not isinstance(module.pos_embed, nn.Identity):
        x = channels_last(module.pos_embed(channels_first(x)))
    for blk in module.blocks:
        x = block(blk, x)
    return x


# --- window partitions ---------------------------------------------------------------------------

def _strides(sizes: list[int]) -> list[int]:
    return [math.prod(sizes[i + 1 :]) for i in range(len(sizes))]


def window_index(window: Matricize) -> Tensor:
    """For each voxel of the partition's windows, in ``(g0, g1, g2, p0, p1, p2)`` order, the flat index
    of the (unrolled) voxel it holds. Separable: a sum of one small vector per axis."""
    grid, patch = list(window.grid_size), list(window.patch_size)
    shifts = list(window.shifts or [0] * len(grid))
    spatial = [g * p for g, p in zip(grid, patch)]
    ndim, index = len(grid), None
    for k, (g, p, s, stride) in enumerate(zip(grid, patch, shifts, _strides(spatial))):
        rolled = torch.arange(g * p)  # window voxel g·P + p holds spatial voxel (g·P + p - s) mod D
        term = ((rolled - s) % (g * p) * stride).reshape(g, p)
        shape = [1] * (2 * ndim)
        shape[k], shape[ndim + k] = g, p
        term = term.reshape(shape)
        index = term if index is None else index + term
    return index.reshape(-1)


def voxel_index(window: Matricize) -> Tensor:
    """The inverse of ``window_index``: for each spatial voxel, its place among the windows' voxels."""
    grid, patch = list(window.grid_size), list(window.patch_size)
    shifts = list(window.shifts or [0] * len(grid))
    ndim, index = len(grid), None
    grid_strides = [s * math.prod(patch) for s in _strides(grid)]
    for k, (g, p, s) in enumerate(zip(grid, patch, shifts)):
        rolled = (torch.arange(g * p) + s) % (g * p)
        term = rolled // p * grid_strides[k] + rolled % p * _strides(patch)[k]
        shape = [1] * ndim
        shape[k] = g * p
        term = term.reshape(shape)
        index = term if index is None else index + term
    return index.reshape(-1)


def unfold(window: Matricize, x: Tensor) -> Tensor:
    """Channels-last ``x`` to the partition's windows: ``(B·G, voxels, C)``, roll included."""
    rows = torch.index_select(x.reshape(x.shape[0], -1, x.shape[-1]), 1, window_index(window))
    return rows.reshape(-1, math.prod(window.patch_size), x.shape[-1])


def fold(window: Matricize, y: Tensor, like: Tensor) -> Tensor:
    """The inverse of ``unfold``: windows back to a channels-last map shaped as ``like``."""
    rows = y.reshape(like.shape[0], -1, y.shape[-1])
    return torch.index_select(rows, 1, voxel_index(window)).reshape(like.shape)


class GatherPartition:
    """``window``'s partition of channels-last maps shaped as ``like``, as ``unfold`` and ``fold``: a
    ``nn.matricize.Partition``, so the subblock's shifted-window loop is ``partition_mean``."""

    def __init__(self, window: Matricize, like: Tensor) -> None:
        self.window, self.like = window, like

    def __call__(self, x: Tensor) -> Tensor:
        return unfold(self.window, x)

    def inverse_forward(self, y: Tensor) -> Tensor:
        return fold(self.window, y, self.like)


# --- NMF -----------------------------------------------------------------------------------------

def tensor_eps(value: float, dtype: torch.dtype) -> Tensor:
    """``ε`` as a 1-element tensor. The exporter's graph optimizer (onnxscript) takes a scalar constant
    within 1e-8 of zero for zero and drops ``x + 1e-8`` as ``x + 0``: NMF's ε, whose job is to keep
    ``0 / 0`` out of an all-zero window. It leaves tensors alone."""
    return torch.full((1,), value, dtype=dtype)


def gram_path_applies(nmf: nn.Module) -> bool:
    return isinstance(nmf, NMF) and nmf.gram_shortcut


def gram_nmf(nmf: NMF, xw: Tensor, heads: int) -> Tensor:
    """Rank-1 HALS of every head's ``d × voxels`` matrix of the windows ``xw`` (``B × voxels × C``,
    nonnegative, ``C = heads · d``) on its Gram matrix: the reconstructions, laid out as ``xw``.

    The iterations are ``nn.factorization.rank1_hals_gram``'s; only the data layout is this module's.
    """
    batch, n, channels = xw.shape
    d = channels // heads
    eps = nmf.solver.eps
    eye = torch.eye(heads, dtype=xw.dtype)
    # One pass over the windows: the C × C Gram matrix (its diagonal d × d blocks are the heads'),
    # and each row's sum and product with v0.
    gram = (xw.transpose(-1, -2) @ xw).reshape(batch, heads, d, heads, d)
    gram = (gram * eye.reshape(1, heads, 1, heads, 1)).sum(3).double()  # batch × heads × d × d
    v0 = nmf.init.v0.to(xw.dtype)  # voxels × 1
    rows = (torch.cat([torch.ones_like(v0), v0], 1).t() @ xw).reshape(batch, 2, heads, d, 1).double()
    u, scaled = rank1_hals_gram(gram, rows[:, 0], rows[:, 1], v0.double(), nmf.num_iters,
                                tensor_eps(eps, torch.float64))  # batch × heads × d × 1, twice
    # Reconstruction (u / c)(uᵀ x + ε 1ᵀ) per head: s = xᵀu for all heads with one MatMul against the
    # heads' u stacked block-diagonally (C × heads), then [s 1] @ [uᵀ/c; ε uᵀ/c] back to C channels.
    u_blocks = (u.to(xw.dtype) * eye.reshape(1, heads, 1, heads)).reshape(batch, channels, heads)
    s = xw @ u_blocks  # batch × voxels × heads
    scaled = scaled.to(xw.dtype)
    back = scaled.reshape(batch, 1, heads, d) * eye.reshape(1, heads, heads, 1)
    back = back.reshape(batch, heads, channels)  # row h: head h's uᵀ/c in its channels, zeros elsewhere
    offset = (eps * scaled).reshape(batch, 1, channels)
    ones = torch.ones_like(s[..., :1])
    return torch.cat([s, ones], -1) @ torch.cat([back, offset], 1)


def unrolled_nmf(nmf: NMF, x: Tensor) -> Tensor:
    """``nmf(x)`` for ``x`` (``... × M × N``): ``NMF.decompose``'s iterations, unrolled, with a tensor ε."""
    if not isinstance(nmf.solver, (MultiplicativeUpdate, HALS)):
        raise ExportError(f"cannot export the NMF solver {type(nmf.solver).__name__}")
    eps = tensor_eps(nmf.solver.eps, x.dtype)
    u, v = (f.to(x.dtype) for f in nmf.init(x))
    u, v = iterate(lambda x, u, v: nmf.solver.update(x, u, v, eps=eps), x, u, v, nmf.num_iters)
    return u @ v.transpose(-1, -2)


def factorize(nmf: nn.Module, xw: Tensor, heads: int) -> Tensor:
    """The factorization of every head's matrix of the windows ``xw`` (``B × voxels × C``), as ``xw``."""
    if xw.dtype in HALF:  # as NMF.forward: in float32
        return in_float32(lambda x32: factorize(nmf, x32, heads), xw).to(xw.dtype)
    if gram_path_applies(nmf):
        return gram_nmf(nmf, xw, heads)
    batch, n, channels = xw.shape
    matrices = xw.reshape(batch, n, heads, channels // heads).permute(0, 2, 3, 1)  # B × h × d × voxels
    out = unrolled_nmf(nmf, matrices) if isinstance(nmf, NMF) else nmf(matrices)
    return out.permute(0, 3, 1, 2).reshape(batch, n, channels)


def subblock(module: FactorizerSubblock, x: Tensor) -> Tensor:
    """in_proj → activation → NMF on every window partition → mean over partitions → out_proj."""
    out = module.act(linear(module.in_proj, x))  # elementwise: commutes with the partition
    partitions = [GatherPartition(window, out) for window in module.windows]
    heads = module.windows[0].num_heads
    total = partition_mean(out, partitions, lambda xw: factorize(module.factorize, xw, heads))
    return linear(module.out_proj, total)


# --- convolutions --------------------------------------------------------------------------------

def _patchwise(layer: nn.Module) -> bool:
    """A convolution whose kernel equals its stride (no padding, dilation or groups): a patch MatMul."""
    return (isinstance(layer, nn.modules.conv._ConvNd) and tuple(layer.kernel_size) == tuple(layer.stride)
            and not any(layer.padding if not isinstance(layer.padding, str) else (1,))
            and set(layer.dilation) == {1} and layer.groups == 1
            and not any(getattr(layer, "output_padding", ()) or ()))


def downsample(layer: nn.Module, x: Tensor) -> Tensor:
    """A convolution on a channels-last map (stride-k kernel-k: reshape and MatMul)."""
    if isinstance(layer, nn.Identity):
        return x
    if not (_patchwise(layer) and not layer.transposed):
        return channels_last(layer(channels_first(x)))
    k, ndim, (b, *spatial, c) = layer.kernel_size, len(layer.kernel_size), x.shape
    split = [n for size, kk in zip(spatial, k) for n in (size // kk, kk)]
    x = x.reshape(b, *split, c).permute(0, *range(1, 2 * ndim, 2), *range(2, 2 * ndim + 1, 2), 2 * ndim + 1)
    x = x.reshape(b, *(size // kk for size, kk in zip(spatial, k)), -1)
    weight = layer.weight.permute(0, *range(2, 2 + ndim), 1).reshape(layer.out_channels, -1)
    y = x @ weight.t()
    return y if layer.bias is None else y + layer.bias


def upsample(layer: nn.Module, x: Tensor) -> Tensor:
    """A transposed convolution on a channels-last map (stride-k kernel-k: MatMul and reshape)."""
    if not (_patchwise(layer) and layer.transposed):
        return channels_last(layer(channels_first(x)))
    k, ndim, (b, *spatial, _) = layer.kernel_size, len(layer.kernel_size), x.shape
    weight = layer.weight.permute(0, *range(2, 2 + ndim), 1).reshape(layer.in_channels, -1)
    y = (x @ weight).reshape(b, *spatial, *k, layer.out_channels)
    order = [0] + [i for a in range(ndim) for i in (1 + a, 1 + ndim + a)] + [1 + 2 * ndim]
    y = y.permute(*order).reshape(b, *(size * kk for size, kk in zip(spatial, k)), layer.out_channels)
    return y if layer.bias is None else y + layer.bias


def head(layer: nn.Module, x: Tensor) -> Tensor:
    """The 1×1 output convolution on a channels-last map; channels first out."""
    if isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed and set(layer.kernel_size) == {1} \
            and _patchwise(layer):
        y = x @ layer.weight.flatten(1).t()
        return channels_first(y if layer.bias is None else y + layer.bias)
    return layer(channels_first(x))


class ExportGraph(nn.Module):
    """``network``'s full-resolution logits, ``(B, C, *roi) → (B, K, *roi)``, in export-friendly ops."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.train(network.training)

    def forward(self, x: Tensor) -> Tensor:
        net = self.network
        if not _is_factorizer_unet(net):
            out = net.predict(x) if hasattr(net, "predict") else net(x)
            return out[0] if isinstance(out, list | tuple) else out
        h = channels_last(net.stem(x))
        features = []
        for level in net.encoder.blocks:
            h = stage(level.block, downsample(level.downsample, h))
            features.append(h)
        h = features.pop()
        for level in net.decoder.blocks:
            h = stage(level.block, features.pop(), upsample(level.upsample, h))
        return head(net.heads[0] if net.num_deep_supr else net.head, h)


def _is_factorizer_unet(net: nn.Module) -> bool:
    return isinstance(net, UNet) and all(
        isinstance(level.block, FactorizerStage) for level in [*net.encoder.blocks, *net.decoder.blocks]
    )
