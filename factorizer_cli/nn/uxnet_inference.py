"""The inference form of 3D UX-Net and RepUX-Net: the same function, computed faster in less memory.

Measured on a 2-core AVX-512 CPU (``benchmarks/repuxnet.py``), most of the time goes to the
decoder's dense 3³ convs at full resolution and to the full-size maps between them, so:

- the whole network runs channels-last (``N × D × H × W × C`` in memory): oneDNN's convs then skip
  the reorders into and out of their own layout (25-30% faster each, and two fewer map-sized buffers),
  and the channel layer norms become plain ``layer_norm`` over the last axis;
- instance norm, leaky ReLU and residual adds work in place on the conv's output (a map-sized
  buffer each fewer, in time and in peak memory); the statistics in float32, shifted, in one pass;
- the decoder's upsampled maps and skip concatenations are never built: each up-block's transposed
  conv is folded into the convs that read it (``InferenceUpBlock``);
- the full-resolution blocks need no map-sized buffer beyond their input and output: a block's second
  3³ conv is written over its own input slab by slab (``_conv_over_input``), an up-block's residual
  1×1 conv over the skip it reads, and a one-channel input's normalised 1×1 residual is one broadcast;
- RepUX-Net's BatchNorm is folded into its depthwise kernel, and large kernels go through
  ``LargeKernelDepthwise`` (trimmed, FFT where it pays).

Inference only (no autograd): ``fuse_for_inference`` swaps the modules of a trained network in place.
Under ONNX export every block computes the textbook way, whose operators exporters know.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from itertools import product

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .large_kernel import LargeKernelDepthwise, exporting, fold_batch_norm
from .uxnet import REPUXNET, UXNET, ChannelNorm, ConvBlock, RepUXBlock, UpBlock, UXBlock

__all__ = ["fuse_for_inference"]

CHANNELS_LAST = torch.channels_last_3d
_PARITIES = tuple(product((0, 1), repeat=3))  # (πd, πh, πw) of a fine voxel 2q + π, in this order


def _autocast_off(device_type: str) -> AbstractContextManager:
    """Autocast switched off where it is on (so that BLAS sums stay in float32), untouched elsewhere."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def _moments(values: Tensor, rows: int = 8192) -> tuple[Tensor, Tensor]:
    """Mean and (biased) variance of each column of an ``n × C`` matrix, in float32, in one pass.

    ``rows`` rows at a time into one reused buffer, so that each chunk's deviations stay in the cache
    (squaring the whole map would write and read back a map-sized buffer), summed by a matrix-vector
    product (BLAS: 3x faster than reductions over the rows); deviations from the first rows' mean, so
    that a channel whose mean is far larger than its spread loses no precision.
    """
    n, channels = values.shape
    shift = values[:4096].float().mean(0)
    buffer = values.new_empty((min(rows, n), channels), dtype=torch.float32)
    ones = buffer.new_ones(buffer.shape[0])
    first, second = torch.zeros_like(shift), torch.zeros_like(shift)
    with _autocast_off(values.device.type):  # sums of squares in half precision would overflow
        for chunk in values.split(rows):
            deviation = torch.sub(chunk, shift, out=buffer[:chunk.shape[0]])
            first += ones[:chunk.shape[0]] @ deviation
            second += ones[:chunk.shape[0]] @ deviation.square_()
    offset = first / n
    return shift + offset, second / n - offset.square()


def _instance_norm_(y: Tensor, eps: float = 1e-5) -> Tensor:
    """Instance norm (no affine) of a ``1 × C × *spatial`` map in place; its statistics in float32."""
    if y.shape[0] != 1 or not y.is_contiguous(memory_format=CHANNELS_LAST):
        return y.copy_(F.instance_norm(y, eps=eps))
    values = y.permute(0, 2, 3, 4, 1).reshape(-1, y.shape[1])  # a view: channels are the last axis
    mean, variance = _moments(values)
    scale = variance.clamp_(min=0).add_(eps).rsqrt_()
    torch.addcmul((-mean * scale).to(values.dtype), values, scale.to(values.dtype), out=values)
    return y


def _conv(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """``conv(x)``, channels-last even from one input channel.

    From a single input channel PyTorch leaves oneDNN for a slow reference kernel with an NCDHW
    output. A 1×1×1 conv is then an outer product: one broadcast, written channels-last. A k³ conv
    becomes a conv of its input's k depth-shifted copies, taken as k channels, with a 1×k×k kernel:
    oneDNN again, 3x faster than the reference kernel or a product with the k³ neighbourhoods
    (1 → 48 channels at 96³, 2 cores). (The strided 7³ stem measured no faster this way.)
    """
    weight, bias = conv.weight, conv.bias
    if (x.shape[1] != 1 or weight.shape[1] != 1 or conv.stride != (1, 1, 1) or x.shape[0] != 1
            or x.device.type != "cpu"):  # cuDNN handles one input channel well
        return F.conv3d(x, weight, bias, conv.stride, conv.padding)
    kernel, padding = weight.shape[2:], conv.padding
    if tuple(kernel) == (1, 1, 1):
        y = torch.empty((1, weight.shape[0], *x.shape[2:]), dtype=x.dtype, device=x.device,
                        memory_format=CHANNELS_LAST)
        torch.mul(x, weight.reshape(1, -1, 1, 1, 1), out=y)
        return y if bias is None else y.add_(bias.reshape(1, -1, 1, 1, 1))
    padded = F.pad(x[0, 0], (0, 0, 0, 0, padding[0], padding[0]))
    depth = padded.shape[0] - kernel[0] + 1
    shifted = torch.stack([padded[k:k + depth] for k in range(kernel[0])], dim=-1)  # D × H × W × k
    taps = weight.reshape(weight.shape[0], kernel[0], 1, *kernel[1:]).contiguous(memory_format=CHANNELS_LAST)
    y = F.conv3d(shifted[None].permute(0, 4, 1, 2, 3), taps, bias, padding=(0, *padding[1:]))
    return y.contiguous(memory_format=CHANNELS_LAST)  # small maps may take a reference kernel (NCDHW)


def _conv_over_input(conv: nn.Conv3d, x: Tensor, slab: int = 8) -> Tensor:
    """``conv(x)`` for a same-width 3³ conv (stride 1, padding 1), written over ``x`` itself.

    Slab by slab along depth, each slab's output written back one slab late: slab ``k`` reads its own
    slices and one on either side, and the last slice of slab ``k - 1`` is still the input when it does.
    The map-sized output buffer, the block's peak at full resolution, is never allocated; the slabs'
    convs read views of ``x`` (only the two edge slabs get a zero slice joined) and run as fast as the
    whole conv (the same oneDNN kernel, thousands of rows each).
    """
    weight, bias = conv.weight, conv.bias
    depth = x.shape[2]
    zero = x.new_zeros((*x.shape[:2], 1, *x.shape[3:])).contiguous(memory_format=CHANNELS_LAST)
    pending: tuple[int, Tensor] | None = None  # a slab's output not yet written back
    for start in range(0, depth, slab):
        stop = min(start + slab, depth)
        low, high = max(start - 1, 0), min(stop + 1, depth)
        window = x[:, :, low:high]
        if start == 0 or stop == depth:
            window = torch.cat([zero] * (start == 0) + [window] + [zero] * (stop == depth), dim=2)
        output = F.conv3d(window, weight, bias, padding=(0, 1, 1))
        if pending is not None:
            x[:, :, pending[0]:pending[0] + pending[1].shape[2]] = pending[1]
        pending = (start, output)
    if pending is not None:
        x[:, :, pending[0]:pending[0] + pending[1].shape[2]] = pending[1]
    return x


def _pointwise_over_input(weight: Tensor, bias: Tensor | None, x: Tensor, rows: int = 32768) -> Tensor:
    """The 1×1 conv ``weight`` (``C × C × 1³``) of a channels-last ``x``, written over ``x`` a block of
    voxels at a time (a product with the ``C × C`` matrix each, through one reused buffer)."""
    channels = x.shape[1]
    if (weight.shape[:2] != (channels, channels) or x.shape[0] != 1 or x.device.type != "cpu"
            or not x.is_contiguous(memory_format=CHANNELS_LAST)):
        return F.conv3d(x, weight, bias)
    matrix = weight.reshape(channels, channels).t()
    voxels = x.permute(0, 2, 3, 4, 1).reshape(-1, channels)  # a view: channels-last is voxels × C
    buffer = x.new_empty((min(rows, voxels.shape[0]), channels))
    with _autocast_off(x.device.type):  # the products land in x's own dtype
        for chunk in voxels.split(rows):
            product = buffer[:chunk.shape[0]]
            if bias is None:
                torch.mm(chunk, matrix.to(chunk.dtype), out=product)
            else:
                torch.addmm(bias.to(chunk.dtype), chunk, matrix.to(chunk.dtype), out=product)
            chunk.copy_(product)
    return x


def _plain_pointwise(conv: nn.Conv3d) -> bool:
    """A 1×1×1 conv of stride 1 without padding: a per-voxel linear map of the channels."""
    return tuple(conv.weight.shape[2:]) == (1, 1, 1) and conv.stride == (1, 1, 1) and conv.padding == (0, 0, 0)


def _add_normalized_pointwise_(y: Tensor, conv: nn.Conv3d, x: Tensor, eps: float = 1e-5) -> Tensor:
    """``y += instance_norm(conv(x))`` for a 1×1 ``conv`` of a one-channel ``x``, without ``conv(x)``.

    Channel ``c`` of ``conv(x)`` is ``w_c·x + b_c``; normalised it is ``w_c / sqrt(w_c²·var(x) + eps)``
    times ``x - mean(x)``, whatever ``b_c``: one broadcast multiply-add instead of a map-sized buffer.
    """
    mean, variance = _moments(x.reshape(-1, 1))
    variance.clamp_(min=0)  # rounding may leave a constant input's variance just below 0
    weight = conv.weight.reshape(1, -1, 1, 1, 1).float()
    scale = weight * (weight.square() * variance + eps).rsqrt()
    return y.addcmul_((x - mean).to(y.dtype), scale.to(y.dtype))


def _same_width_3x3x3(conv: nn.Conv3d, x: Tensor) -> bool:
    """Whether ``conv`` can be computed over its channels-last input on the CPU (``_conv_over_input``)."""
    return (conv.weight.shape[0] == conv.weight.shape[1] == x.shape[1] and tuple(conv.weight.shape[2:]) == (3, 3, 3)
            and conv.stride == (1, 1, 1) and conv.padding == (1, 1, 1) and x.shape[0] == 1 and x.device.type == "cpu"
            and x.is_contiguous(memory_format=CHANNELS_LAST))


class InferenceConvBlock(nn.Module):
    """``ConvBlock`` (MONAI's UnetResBlock / UnetBasicBlock) with its norms and adds in place."""

    def __init__(self, block: ConvBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        block = self.block
        conv1, conv2 = block.conv1.conv, block.conv2.conv
        if exporting():
            return block(x)
        y = F.leaky_relu_(_instance_norm_(_conv(conv1, x)), 0.01)
        y = _instance_norm_(_conv_over_input(conv2, y) if _same_width_3x3x3(conv2, y) else _conv(conv2, y))
        if block.residual and block.conv3 is None:
            y.add_(x)
        elif block.residual and x.shape[:2] == (1, 1) and _plain_pointwise(block.conv3.conv):
            _add_normalized_pointwise_(y, block.conv3.conv, x)
        elif block.residual:
            y.add_(_instance_norm_(_conv(block.conv3.conv, x)))
        return F.leaky_relu_(y, 0.01)


def _parity_kernels(conv: Tensor, transposed: Tensor) -> Tensor:
    """One 2³ kernel per output parity for ``conv3³ ∘ transposed-conv2³/2``, stacked on the outputs.

    Fine voxel ``p = 2q + π`` of the conv (padding 1) of the upsampled map reads upsampled voxels
    ``p - 1 .. p + 1``, i.e. coarse voxels ``q + π - 1 .. q + π`` per axis (two, not three): a 2³
    conv over the coarse map padded by 1, whose output ``j = q + π`` is fine voxel ``2q + π``.
    ``conv``: ``O × M × 3³``; ``transposed``: ``C × M × 2³`` → ``8·O × C × 2³`` (in ``_PARITIES``
    order; 5D, so that the network's move to channels-last reaches it).
    """
    out_channels, in_channels = conv.shape[0], transposed.shape[0]
    kernels = conv.new_zeros(2, 2, 2, out_channels, in_channels, 2, 2, 2)
    for parity in _PARITIES:
        for tap in product(range(3), repeat=3):
            shifted = [p + t - 1 for p, t in zip(parity, tap, strict=True)]  # upsampled offset from 2q
            sub = tuple(m % 2 for m in shifted)  # which output of the transposed conv
            coarse = tuple(m // 2 - p + 1 for m, p in zip(shifted, parity, strict=True))  # 0 or 1
            kernels[(*parity, slice(None), slice(None), *coarse)] += \
                conv[(slice(None), slice(None), *tap)] @ transposed[(slice(None), slice(None), *sub)].t()
    return kernels.reshape(8 * out_channels, in_channels, 2, 2, 2)


class InferenceUpBlock(nn.Module):
    """``UpBlock`` without its upsampled map: the transposed conv folded into the convs that read it.

    The first conv of the block reads ``cat(up(x), skip)``; its part on ``up(x)`` becomes one 2³ conv
    per output parity on ``x`` itself (``_parity_kernels``: about 60% of the multiply-adds at twice the
    resolution), added into the strided parities of the skip part; the residual 1×1 conv's part on
    ``up(x)`` becomes a transposed conv of ``x``. Exact up to float32 summation order.

    The block uses ``skip`` up: its storage ends holding the residual branch (a map-sized buffer fewer
    at the peak). The networks' forward passes the encoder's output straight in and never reads it again.
    """

    def __init__(self, block: UpBlock) -> None:
        super().__init__()
        self.block = block
        inner = block.conv_block
        transposed = block.transp_conv.conv.weight  # C × M × 2³, no bias
        width = transposed.shape[1]
        conv1 = inner.conv1.conv
        self.register_buffer("parity_kernels", _parity_kernels(conv1.weight[:, :width], transposed))
        self.register_buffer("skip_kernel", conv1.weight[:, width:].clone())
        self.register_buffer("conv1_bias", None if conv1.bias is None else conv1.bias.clone())
        self.conv2 = inner.conv2.conv
        conv3 = inner.conv3.conv  # a residual block from 2·M to M channels always has one
        residual = conv3.weight[:, :width, 0, 0, 0]  # O × M
        # the 1×1 conv of up(x) at parity π: a 1×1 conv of x (8·O × C × 1³, in _PARITIES order)
        parities = torch.einsum("om,cmdhw->dhwoc", residual, transposed)
        self.register_buffer("residual_parities", parities.reshape(-1, transposed.shape[0], 1, 1, 1).contiguous())
        self.register_buffer("residual_skip", conv3.weight[:, width:].clone())
        self.register_buffer("conv3_bias", None if conv3.bias is None else conv3.bias.clone())

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        if exporting():
            return self.block(x, skip)
        y = F.conv3d(skip, self.skip_kernel, self.conv1_bias, padding=1)
        n = x.shape[2:]
        # one parity at a time: an eighth of the fine map in flight, not all eight
        for kernel, (a, b, c) in zip(self.parity_kernels.unflatten(0, (8, -1)), _PARITIES, strict=True):
            parity = F.conv3d(x, kernel, padding=1)
            y[:, :, a::2, b::2, c::2].add_(parity[:, :, a:a + n[0], b:b + n[1], c:c + n[2]])
        y = F.leaky_relu_(_instance_norm_(y), 0.01)
        y = _instance_norm_(_conv_over_input(self.conv2, y) if _same_width_3x3x3(self.conv2, y) else self.conv2(y))
        residual = _pointwise_over_input(self.residual_skip, self.conv3_bias, skip)  # skip is used up
        for kernel, (a, b, c) in zip(self.residual_parities.unflatten(0, (8, -1)), _PARITIES, strict=True):
            residual[:, :, a::2, b::2, c::2].add_(F.conv3d(x, kernel))
        y.add_(_instance_norm_(residual))
        return F.leaky_relu_(y, 0.01)


class _ChannelsLast(nn.Module):
    """Runs ``network`` on a channels-last copy of its input and returns a contiguous output."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network.to(memory_format=CHANNELS_LAST)

    def forward(self, x: Tensor) -> Tensor:
        if exporting():
            return self.network(x)
        return self.network(x.contiguous(memory_format=CHANNELS_LAST)).contiguous()


def _channel_norm(norm: ChannelNorm, x: Tensor) -> Tensor:
    """``ChannelNorm`` of a channels-last map: a layer norm over the last axis of a free view."""
    if exporting() or not x.is_contiguous(memory_format=CHANNELS_LAST):
        return ChannelNorm.forward(norm, x)
    y = F.layer_norm(x.permute(0, 2, 3, 4, 1), (x.shape[1],), norm.weight, norm.bias, norm.eps)
    return y.permute(0, 4, 1, 2, 3)


class _LastAxisChannelNorm(ChannelNorm):
    forward = _channel_norm


def _swap_children(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, UpBlock) and child.conv_block.residual:
            setattr(module, name, InferenceUpBlock(child))
        elif isinstance(child, ConvBlock):
            setattr(module, name, InferenceConvBlock(child))
        elif type(child) is ChannelNorm:
            child.__class__ = _LastAxisChannelNorm
        elif isinstance(child, RepUXBlock):
            child.reparameterize()
            child.dwconv = LargeKernelDepthwise(*fold_batch_norm(child.dwconv.weight, child.dwconv.bias,
                                                                 child.norm))
            child.norm = nn.Identity()
        elif isinstance(child, UXBlock):
            child.dwconv = LargeKernelDepthwise(child.dwconv.weight, child.dwconv.bias)
            _swap_children(child)  # its channel norm
        else:
            _swap_children(child)


def fuse_for_inference(network: UXNET | REPUXNET) -> nn.Module:
    """The inference form of a trained UX-Net or RepUX-Net (its modules swapped in place), in eval mode.

    Its state dict is not upstream's (norms folded, blocks wrapped): save the network before, never
    this form. Its forward computes the same function (to float32 rounding: FFT and summation order).
    """
    network.eval()
    if isinstance(network, REPUXNET):
        network.reparameterize()
    with torch.no_grad():
        _swap_children(network)
    return _ChannelsLast(network).eval()
