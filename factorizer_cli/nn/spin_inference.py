"""SPiN's inference form: the same function, rearranged for the CPU.

Measured on a 2-core AVX-512 CPU (one 197×233 slice of the published configuration, batch 1): oneDNN's
convolutions with 8-24 channels run about 3x faster on channels-last (NHWC) tensors than on NCHW;
each BatchNorm, activation copy, resize and concatenation over a 16×394×466 map costs a third to a
half of the convolution beside it. So the inference form

- folds every BatchNorm (running statistics) into its convolution's weights and bias;
- runs channels-last, each conv and its LeakyReLU as one oneDNN primitive where PyTorch has it
  (``ConvUnit.fused``), other activations in place (``nn.spin``: where autograd is off);
- reorders the channels of each space-to-depth and pixel shuffle to (row, column, channel), which on
  channels-last storage is one contiguous copy, and permutes the weights that read or write them to
  match (``space_to_depth``'s ``order``);
- turns each exact 2x nearest resize followed by a 3×3 conv into one conv of the small map to the four
  subpixels (``phase_weights``);
- given several slices, runs the coarse levels on all of them at once and the full-resolution levels
  one slice at a time (``SPiNModel.slice_by_slice``: whole-volume 32.1 s at 1 slice per call, 23.6 s
  at 8).

Outputs agree with the training form to float rounding (tests: ≤ 1e-5 on the parity fixtures), and
the form exports to ONNX as plain convolutions.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .spin import (
    ConvUnit,
    EmbeddingDecoder,
    LearnableDownsampler,
    SPiNModel,
    SubpixelGuidance,
    UpConv,
    fused_conv_available,
)


def fold_batch_norm(unit: ConvUnit) -> None:
    """Fold an eval-mode BatchNorm (running statistics) into the convolution before it, in place."""
    norm = unit.batch_norm
    if norm is None:
        return
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    conv = unit.conv
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    conv.weight = nn.Parameter(conv.weight * scale[:, None, None, None])
    conv.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias)
    unit.batch_norm = None


def subpixel_order(channels: int, scale: int) -> Tensor:
    """Index ``i`` of the (row, column, channel) order holds channel ``order[i]`` of the
    (channel, row, column) order, for ``channels`` channels of ``scale``² subpixels."""
    k = scale * scale
    return torch.arange(channels * k).reshape(channels, k).t().reshape(-1)


def read_subpixels_abc(unit: ConvUnit, scale: int) -> None:
    """Let ``unit``'s conv read a (row, column, channel) space-to-depth instead of upstream's order."""
    conv = unit.conv
    index = subpixel_order(conv.in_channels // (scale * scale), scale)
    conv.weight = nn.Parameter(conv.weight[:, index])


def write_subpixels_abc(unit: ConvUnit, scale: int) -> None:
    """Let ``unit``'s conv write a (row, column, channel) pixel shuffle input instead of upstream's order."""
    conv = unit.conv
    index = subpixel_order(conv.out_channels // (scale * scale), scale)
    conv.weight = nn.Parameter(conv.weight[index])
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias[index])


def phase_weights(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """A 3×3 conv of a map resized 2x by repetition, as one 3×3 conv of the small map to its four
    subpixels: ``(4·C_out, C_in, 3, 3)`` in (row, column, channel) order, and the bias repeated.

    Output row ``2i + a`` sees resized rows ``2i + a - 1 .. 2i + a + 1``, i.e. small rows ``i - 1, i, i``
    (``a = 0``) or ``i, i, i + 1`` (``a = 1``): taps landing on the same small row are summed. The zero
    padding of the resized map is the small map's, so borders agree too.
    """
    taps = weight.new_zeros(2, 3, 3)  # (phase, small-map offset -1/0/+1, original tap)
    taps[0, 0, 0] = taps[0, 1, 1] = taps[0, 1, 2] = 1
    taps[1, 1, 0] = taps[1, 1, 1] = taps[1, 2, 2] = 1
    phased = torch.einsum("aup,bvq,oipq->aboiuv", taps, taps, weight)
    out_channels = weight.shape[0]
    bias = weight.new_zeros(out_channels) if bias is None else bias
    return phased.reshape(4 * out_channels, *weight.shape[1:]).contiguous(), bias.repeat(4)


@torch.no_grad()
def fuse_for_inference(model: SPiNModel) -> SPiNModel:
    """A copy of ``model`` for inference (see the module's docstring); ``model`` is untouched."""
    fused = copy.deepcopy(model).eval()
    fuse = fused_conv_available()
    for module in fused.modules():
        if isinstance(module, ConvUnit):
            fold_batch_norm(module)
            module.fused = fuse
    for module in fused.modules():
        if isinstance(module, EmbeddingDecoder):
            write_subpixels_abc(module.upsampling_blocks[0], 2)
            module.order = "abc"
        elif isinstance(module, LearnableDownsampler):
            read_subpixels_abc(module.conv_block[0], 2)
            module.order = "abc"
        elif isinstance(module, SubpixelGuidance):
            for i, (scale, convs) in enumerate(zip(module.scales, module.conv_modules)):
                if scale > 1 and isinstance(convs, nn.Sequential):  # a width of 0 passes the raw maps on
                    read_subpixels_abc(convs[0], scale)
                    module.orders[i] = "abc"
        elif isinstance(module, UpConv):
            module.phase_weight, module.phase_bias = phase_weights(module.conv.conv.weight, module.conv.conv.bias)
    fused.memory_format = torch.channels_last
    fused.slice_by_slice = True
    return fused.to(memory_format=torch.channels_last)
