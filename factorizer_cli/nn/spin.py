"""SPiN: a 2D lesion segmenter that predicts at twice the input resolution and learns to come back.

Wong et al., "Small Lesion Segmentation in Brain MRIs with Subpixel Embedding" (MICCAI BrainLes 2021;
upstream alexklwong/subpixel-embedding-segmentation). Written here from the paper and the facts of
upstream's network (its code is licensed for non-commercial use only and is not reused):

- a *subpixel embedding*: a small residual encoder at full resolution, then a 1×1 conv and a pixel
  shuffle to ``M`` maps at 2H×2W;
- a ResNet-18/34 *segmentation encoder* (7×7 stride-2 stem, max-pool, four residual stages);
- *subpixel guidance*: the embedding, brought by space-to-depth to chosen decoder resolutions
  (0: 2H×2W, 1: H×W, 2: H/2, ...) and convolved, joins the encoder skips there;
- a decoder of (legacy ``nearest`` resize → conv, concat skip → conv) blocks up to 2H×2W, a linear
  3×3 head (``out2x``), and a *learnable downsampler*: space-to-depth of the 2H×2W features predicts,
  per output pixel, softmax weights over its four subpixels of ``out2x`` (``out1x``).

Constructor arguments are upstream's ``SPiNModel.__init__`` kwargs and parameter names are its five
sub-modules' keys under their attribute names, so upstream's checkpoints load by key. Upstream builds a
1×1 ``projection`` in every residual block but applies it only where the shapes change; the unused
ones are kept so its state dicts fit exactly. Only the options of the published configuration and
the alternatives its paper names (ResNet-34, the 7-layer embedding encoder) are accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..errors import ConfigError, InputShapeError
from .large_kernel import exporting

__all__ = ["SPiNModel"]

_SLOPE = 0.1  # upstream's LeakyReLU slope everywhere
_FINE_LEVELS = 2  # resolutions 0 (2H×2W) and 1 (H×W): the decoder's last two blocks
_RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
_EMBEDDING_BLOCKS = {"resnet5_subpixel_embedding": 2, "resnet7_subpixel_embedding": 3}
_INITIALIZERS = {
    "kaiming_uniform": None,  # torch's default for convolutions, which upstream keeps
    "kaiming_normal": nn.init.kaiming_normal_,
    "xavier_normal": nn.init.xavier_normal_,
    "xavier_uniform": nn.init.xavier_uniform_,
}


def fused_conv_available() -> bool:
    """Whether this PyTorch has oneDNN's conv with a fused activation (x86 and ARM CPU builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class ConvUnit(nn.Module):
    """Bias-free conv ('same' padding), optional BatchNorm, optional LeakyReLU 0.1: upstream's unit.

    Attribute names ``conv`` / ``batch_norm`` are upstream's, hence its state-dict keys. The inference
    form sets ``fused``: on the CPU in float32, without autograd or an export trace, conv and LeakyReLU
    then run as one oneDNN primitive (PyTorch's own fused op, the one its compiler emits): the same
    numbers, one pass over the map fewer.
    """

    fused = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, *,
                 norm: bool = True, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.batch_norm = nn.BatchNorm2d(out_channels) if norm else None
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        if self.fused and self.act and self._fusable(x):
            conv = self.conv
            return torch.ops.mkldnn._convolution_pointwise(
                x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
                "leaky_relu", [_SLOPE], "")
        x = self.conv(x)
        if self.batch_norm is not None:
            x = self.batch_norm(x)
        # in place where nothing records the graph: the conv's output is fresh, and a copy of a
        # 394×466 map per unit is a fifth of the forward's time at inference
        return F.leaky_relu(x, _SLOPE, inplace=not torch.is_grad_enabled()) if self.act else x

    def _fusable(self, x: Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype == torch.float32 and self.batch_norm is None
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and not exporting())


class ResidualBlock(nn.Module):
    """Two 3×3 units, each activated, then the sum activated again (upstream's activation order).

    The 1×1 ``projection`` carries the input only when the shapes differ, decided on the tensors as
    upstream does; it exists in every block so upstream's keys all have a home.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvUnit(in_channels, out_channels, 3, stride)
        self.conv2 = ConvUnit(out_channels, out_channels, 3)
        self.projection = ConvUnit(in_channels, out_channels, 1, stride, norm=False, act=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(self.conv1(x))
        shortcut = self.projection(x) if x.shape[1:] != y.shape[1:] else x
        if torch.is_grad_enabled():
            return F.leaky_relu(y + shortcut, _SLOPE)
        return F.leaky_relu_(y.add_(shortcut), _SLOPE)  # y is conv2's fresh output


def space_to_depth(x: Tensor, scale: int, order: str = "cab") -> Tensor:
    """``(N, C, H, W) -> (N, C·s², H//s, W//s)``; a remainder row or column is dropped, as upstream's
    unfold does. ``order`` of the new channels: ``"cab"`` (channel, row, column: upstream's, like
    ``F.unfold``) or ``"abc"`` (row, column, channel: on a channels-last tensor one contiguous copy,
    3x faster; the inference form permutes the weights that read it, ``nn.spin_inference``)."""
    if scale == 1:
        return x
    h, w = (x.shape[-2] // scale) * scale, (x.shape[-1] // scale) * scale
    x = x[..., :h, :w]
    if order == "cab":
        return rearrange(x, "n c (h a) (w b) -> n (c a b) h w", a=scale, b=scale)
    nhwc = rearrange(x.permute(0, 2, 3, 1), "n (h a) (w b) c -> n h w (a b c)", a=scale, b=scale)
    return nhwc.permute(0, 3, 1, 2)  # channels-last storage


def depth_to_space(x: Tensor, scale: int, order: str = "cab") -> Tensor:
    """The inverse of ``space_to_depth``: ``"cab"`` is ``nn.PixelShuffle``'s channel order."""
    if order == "cab":
        return F.pixel_shuffle(x, scale)
    nhwc = rearrange(x.permute(0, 2, 3, 1), "n h w (a b c) -> n (h a) (w b) c", a=scale, b=scale)
    return nhwc.permute(0, 3, 1, 2)


class EmbeddingEncoder(nn.Module):
    """5×5 unit, residual blocks, 3×3 unit; the first unit's output is added back (no activation)."""

    def __init__(self, in_channels: int, filters: Sequence[int], n_blocks: int) -> None:
        super().__init__()
        self.conv0 = ConvUnit(in_channels, filters[0], 5)
        self.blocks = nn.Sequential(*(ResidualBlock(filters[0] if i == 0 else filters[1], filters[1])
                                      for i in range(n_blocks)))
        self.conv1 = ConvUnit(filters[1], filters[2], 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv0(x)
        y = self.conv1(self.blocks(x))
        return y + x if torch.is_grad_enabled() else y.add_(x)


class EmbeddingDecoder(nn.Module):
    """1×1 unit to 4·F maps, pixel shuffle to F maps at 2H×2W, linear 3×3 to the embedding's M maps."""

    def __init__(self, in_channels: int, width: int, out_channels: int) -> None:
        super().__init__()
        # a Sequential for upstream's keys (upsampling_blocks.0.*); its pixel shuffle is depth_to_space
        self.upsampling_blocks = nn.Sequential(ConvUnit(in_channels, 4 * width, 1))
        self.output = ConvUnit(width, out_channels, 3, norm=False, act=False)
        self.order = "cab"  # of the 1×1 unit's output channels (see space_to_depth)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(depth_to_space(self.upsampling_blocks(x), 2, self.order))


class SubpixelGuidance(nn.Module):
    """The 2H×2W embedding at each guided resolution: space-to-depth by 2^r, a legacy ``nearest``
    resize to the skip it joins (odd sizes), then its units (none when its width is 0)."""

    def __init__(self, resolutions: Sequence[int], widths: Sequence[int], depths: Sequence[int],
                 embedding_channels: int) -> None:
        super().__init__()
        self.scales = [2 ** r for r in resolutions]
        self.orders = ["cab"] * len(self.scales)  # see space_to_depth
        self.conv_modules = nn.ModuleList()
        for scale, width, depth in zip(self.scales, widths, depths):
            channels = embedding_channels * scale ** 2
            units = [ConvUnit(channels if i == 0 else width, width) for i in range(max(1, depth))]
            self.conv_modules.append(nn.Sequential(*units) if width > 0 else nn.Identity())

    def forward(self, embedding: Tensor, sizes: Sequence[Sequence[int]]) -> list[Tensor]:
        out = []
        for scale, order, convs, size in zip(self.scales, self.orders, self.conv_modules, sizes):
            x = space_to_depth(embedding, scale, order)
            if tuple(x.shape[-2:]) != tuple(size):  # a resize to the same size would be a copy
                x = F.interpolate(x, size=tuple(size), mode="nearest")
            out.append(convs(x))
        return out


class ResNetEncoder(nn.Module):
    """ResNet-18/34 without the classifier: returns the 1/32 latent and the 1/2 … 1/16 skips."""

    def __init__(self, in_channels: int, filters: Sequence[int], blocks: Sequence[int]) -> None:
        super().__init__()
        self.conv1 = ConvUnit(in_channels, filters[0], 7, 2)
        self.max_pool = nn.MaxPool2d(3, 2, 1)
        for stage, n in enumerate(blocks):
            first_stride = 1 if stage == 0 else 2
            layers = [ResidualBlock(filters[stage] if i == 0 else filters[stage + 1], filters[stage + 1],
                                    first_stride if i == 0 else 1) for i in range(n)]
            self.add_module(f"blocks{stage + 2}", nn.Sequential(*layers))
        self.n_stages = len(blocks)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = [self.conv1(x)]
        x = self.max_pool(skips[0])
        for stage in range(self.n_stages):
            x = getattr(self, f"blocks{stage + 2}")(x)
            skips.append(x)
        return skips.pop(), skips


class UpConv(nn.Module):
    """Legacy ``nearest`` resize to the target size, then a unit (upstream's ``deconv.conv``).

    The inference form may set ``phase_weight``: for an exact 2x resize the 3×3 conv of the repeated pixels
    is, per output subpixel, a conv of the small map with summed taps, all four as one conv to
    ``4·C`` channels (``"abc"`` order) put in place by ``depth_to_space``: no resized copy, and
    oneDNN runs 4·C outputs at 1/4 of the pixels faster (``nn.spin_inference.phase_weights``).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = ConvUnit(in_channels, out_channels)
        self.register_buffer("phase_weight", None, persistent=False)  # set by the inference form
        self.register_buffer("phase_bias", None, persistent=False)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        if self.phase_weight is not None and tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            unit = self.conv
            if unit.fused and unit.act and unit._fusable(x):
                y = torch.ops.mkldnn._convolution_pointwise(x, self.phase_weight, self.phase_bias, [1, 1], [1, 1],
                                                            [1, 1], 1, "leaky_relu", [_SLOPE], "")
            else:
                y = F.conv2d(x, self.phase_weight, self.phase_bias, padding=1)
                if unit.act:
                    y = F.leaky_relu(y, _SLOPE, inplace=not torch.is_grad_enabled())
            return depth_to_space(y, 2, "abc")
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class DecoderBlock(nn.Module):
    """Up to the skip's size (twice the input's without one), concatenate the skip, one unit."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.deconv = UpConv(in_channels, out_channels)
        self.conv = ConvUnit(out_channels + skip_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        size = skip.shape[-2:] if skip is not None else (2 * x.shape[-2], 2 * x.shape[-1])
        x = self.deconv(x, size)
        return self.conv(x if skip is None else torch.cat([x, skip], 1))  # upstream's channel order


class LearnableDownsampler(nn.Module):
    """2H×2W → H×W: each output pixel is a softmax-weighted sum of its four subpixels of ``out2x``,
    the weights predicted from the space-to-depth of the decoder's last features (bias-free, no norm)."""

    def __init__(self, in_channels: int, widths: Sequence[int], kernel_sizes: Sequence[int]) -> None:
        super().__init__()
        channels = [4 * in_channels, *widths]
        self.conv_block = nn.Sequential(*(ConvUnit(c, w, k, norm=False)
                                          for c, w, k in zip(channels, widths, kernel_sizes)))
        self.weights = ConvUnit(widths[-1], 4, 1, norm=False, act=False)
        self.order = "cab"  # of the space-to-depth features (see space_to_depth)

    def forward(self, features: Tensor, out2x: Tensor) -> Tensor:
        weights = self.weights(self.conv_block(space_to_depth(features, 2, self.order))).softmax(1)
        if out2x.shape[1] == 1:  # SPiN's one output: no subpixel rearrangement needed
            return (space_to_depth(out2x, 2) * weights).sum(1, keepdim=True)
        subpixels = rearrange(space_to_depth(out2x, 2), "n (c k) h w -> n c k h w", k=4)
        return (subpixels * weights.unsqueeze(1)).sum(2)


class SegmentationDecoder(nn.Module):
    """Six decoder blocks (1/32 → 2H×2W), the linear ``out2x`` head and the learnable downsampler."""

    _NAMES = ("deconv4", "deconv3", "deconv2", "deconv1", "deconv0", "deconv_super_resolution")

    def __init__(self, in_channels: int, filters: Sequence[int], skip_channels: Sequence[int],
                 downsampler_widths: Sequence[int], downsampler_kernels: Sequence[int]) -> None:
        super().__init__()
        for name, c_in, c_skip, c_out in zip(self._NAMES, [in_channels, *filters], skip_channels, filters):
            self.add_module(name, DecoderBlock(c_in, c_skip, c_out))
        self.output = ConvUnit(filters[-1], 1, 3, norm=False, act=False)
        self.learnable_downsampler = LearnableDownsampler(filters[-1], downsampler_widths, downsampler_kernels)

    def forward(self, x: Tensor, skips: Sequence[Tensor | None]) -> list[Tensor]:
        """``skips`` from coarse (1/16) to fine (2H×2W), one per block."""
        return self.heads(self.upsample(x, skips, 0))

    def upsample(self, x: Tensor, skips: Sequence[Tensor | None], first: int, last: int | None = None) -> Tensor:
        """Blocks ``first`` to ``last`` (exclusive; block ``k`` ends at resolution ``5 - k``), with
        their ``skips`` (one per block run, coarse to fine)."""
        for name, skip in zip(self._NAMES[first:last], skips):
            x = getattr(self, name)(x, skip)
        return x

    def heads(self, x: Tensor) -> list[Tensor]:
        """``out2x`` and the learnable downsampler's ``out1x`` from the last block's 2H×2W features."""
        out2x = self.output(x)
        return [out2x, self.learnable_downsampler(x, out2x)]


def _one_of(name: str, value: Any, allowed: Sequence[str]) -> str:
    """Upstream passes types as one-element lists (``["resnet18"]``); accept that or a bare string."""
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    if len(items) != 1 or items[0] not in allowed:
        raise ConfigError(f"SPiNModel: {name} must be one of {', '.join(allowed)} (as upstream's one-element "
                          f"list), got {value!r}")
    return items[0]


def _ints(name: str, value: Any, length: int | None = None, minimum: int = 1) -> list[int]:
    ok = (isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool)
                                                   and v >= minimum for v in value)
          and (length is None or len(value) == length) and len(value) > 0)
    if not ok:
        size = f"{length} " if length is not None else ""
        raise ConfigError(f"SPiNModel: {name} must be a list of {size}whole numbers >= {minimum}, got {value!r}")
    return list(value)


def _positive(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"SPiNModel: {name} must be a whole number >= 1, got {value!r}")
    return value


class SPiNModel(nn.Module):
    """The SPiN network; ``forward(x)`` of ``(N, input_channels, H, W)`` returns ``[out2x, out1x]``
    logits, ``(N, 1, 2H, 2W)`` and ``(N, 1, H, W)``, as upstream does (``out1x`` is the prediction)."""

    def __init__(
        self,
        input_channels: int,
        encoder_type_subpixel_embedding: Sequence[str],
        n_filters_encoder_subpixel_embedding: Sequence[int],
        decoder_type_subpixel_embedding: Sequence[str],
        output_channels_subpixel_embedding: int,
        n_filter_decoder_subpixel_embedding: int,
        output_func_subpixel_embedding: str,
        encoder_type_segmentation: Sequence[str],
        n_filters_encoder_segmentation: Sequence[int],
        resolutions_subpixel_guidance: Sequence[int],
        n_filters_subpixel_guidance: Sequence[int],
        n_convolutions_subpixel_guidance: Sequence[int],
        decoder_type_segmentation: Sequence[str],
        n_filters_decoder_segmentation: Sequence[int],
        n_filters_learnable_downsampler: Sequence[int],
        kernel_sizes_learnable_downsampler: Sequence[int],
        weight_initializer: str = "kaiming_uniform",
        activation_func: str = "leaky_relu",
        use_batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.input_channels = _positive("input_channels", input_channels)
        embedding_blocks = _EMBEDDING_BLOCKS[_one_of(
            "encoder_type_subpixel_embedding", encoder_type_subpixel_embedding, tuple(_EMBEDDING_BLOCKS))]
        _one_of("decoder_type_subpixel_embedding", decoder_type_subpixel_embedding, ("subpixel",))
        _one_of("output_func_subpixel_embedding", [output_func_subpixel_embedding], ("linear",))
        resnet_blocks = _RESNET_BLOCKS[_one_of(
            "encoder_type_segmentation", encoder_type_segmentation, tuple(_RESNET_BLOCKS))]
        if sorted(decoder_type_segmentation or []) != ["learnable_downsampler", "subpixel_guidance"]:
            raise ConfigError("SPiNModel: decoder_type_segmentation must be ['subpixel_guidance', "
                              f"'learnable_downsampler'], got {decoder_type_segmentation!r}")
        _one_of("weight_initializer", [weight_initializer], tuple(_INITIALIZERS))
        _one_of("activation_func", [activation_func], ("leaky_relu",))
        if use_batch_norm is not True:
            raise ConfigError(f"SPiNModel: use_batch_norm must be true (as published), got {use_batch_norm!r}")

        embed_filters = _ints("n_filters_encoder_subpixel_embedding", n_filters_encoder_subpixel_embedding, 3)
        if embed_filters[2] != embed_filters[0]:
            raise ConfigError("SPiNModel: n_filters_encoder_subpixel_embedding must end with its first width "
                              f"(the first unit's output is added back), got {embed_filters}")
        embedding = _positive("output_channels_subpixel_embedding", output_channels_subpixel_embedding)
        seg_filters = _ints("n_filters_encoder_segmentation", n_filters_encoder_segmentation, 5)
        dec_filters = _ints("n_filters_decoder_segmentation", n_filters_decoder_segmentation, 6)
        resolutions = _ints("resolutions_subpixel_guidance", resolutions_subpixel_guidance, minimum=0)
        n = len(resolutions)
        if max(resolutions) > 5 or len(set(resolutions)) != n:
            raise ConfigError("SPiNModel: resolutions_subpixel_guidance must be distinct, from 0 (2H×2W) to 5 "
                              f"(1/16), got {resolutions}")
        guide_widths = _ints("n_filters_subpixel_guidance", n_filters_subpixel_guidance, n, minimum=0)
        guide_depths = _ints("n_convolutions_subpixel_guidance", n_convolutions_subpixel_guidance, n, minimum=0)
        down_widths = _ints("n_filters_learnable_downsampler", n_filters_learnable_downsampler)
        down_kernels = _ints("kernel_sizes_learnable_downsampler", kernel_sizes_learnable_downsampler,
                             len(down_widths))
        if any(k % 2 == 0 for k in down_kernels):
            raise ConfigError(f"SPiNModel: kernel_sizes_learnable_downsampler must be odd, got {down_kernels}")

        self.resolutions = resolutions
        # skip channels per resolution (0: 2H×2W, 1: H×W, 2: H/2 … 5: H/16), encoder skips plus guidance
        skip_channels = [0, 0, *seg_filters[:-1]]
        for r, width in zip(resolutions, guide_widths):
            skip_channels[r] += width if width > 0 else embedding * 4 ** r

        self.encoder_subpixel_embedding = EmbeddingEncoder(input_channels, embed_filters, embedding_blocks)
        self.decoder_subpixel_embedding = EmbeddingDecoder(
            embed_filters[2], _positive("n_filter_decoder_subpixel_embedding", n_filter_decoder_subpixel_embedding),
            embedding)
        self.subpixel_guidance = SubpixelGuidance(resolutions, guide_widths, guide_depths, embedding)
        self.encoder_segmentation = ResNetEncoder(input_channels, seg_filters, resnet_blocks)
        self.decoder_segmentation = SegmentationDecoder(
            seg_filters[-1], dec_filters, skip_channels[::-1], down_widths, down_kernels)

        init = _INITIALIZERS[weight_initializer]
        if init is not None:
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    init(module.weight)

    memory_format = torch.contiguous_format  # the inference form (nn.spin_inference) runs channels-last
    slice_by_slice = False  # the inference form runs the full-resolution levels one slice at a time

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.dim() == 5 and x.shape[2] == 1:  # upstream's loaders give N × C × 1 × H × W
            x = x[:, :, 0]
        if x.dim() != 4 or x.shape[1] != self.input_channels:
            raise InputShapeError(f"SPiNModel takes (N, {self.input_channels}, H, W) slices, got {tuple(x.shape)}")
        x = x.contiguous(memory_format=self.memory_format)
        features = self.encoder_subpixel_embedding(x)
        latent, encoder_skips = self.encoder_segmentation(x)
        skips: list[Tensor | None] = [None, None, *encoder_skips]  # index = resolution
        sizes = [(2 * x.shape[-2], 2 * x.shape[-1]), x.shape[-2:]] + [s.shape[-2:] for s in encoder_skips]
        decoder = self.decoder_segmentation
        if not self._slice_by_slice_tail(x):
            return decoder.heads(decoder.upsample(latent, self._guided(features, skips, sizes)[::-1], 0))
        coarse = decoder.upsample(latent, skips[:_FINE_LEVELS - 1:-1], 0, -_FINE_LEVELS)
        outputs = []
        for i in range(x.shape[0]):
            one = [skip if skip is None else skip[i:i + 1] for skip in skips[:_FINE_LEVELS]]
            fine = self._guided(features[i:i + 1], one, sizes)
            outputs.append(decoder.heads(decoder.upsample(coarse[i:i + 1], fine[::-1], -_FINE_LEVELS)))
        return [torch.cat(heads) for heads in zip(*outputs)]

    def _guided(self, features: Tensor, skips: list[Tensor | None],
                sizes: Sequence[Sequence[int]]) -> list[Tensor | None]:
        """``skips`` (index = resolution) with the subpixel guidance of ``features`` joined at its
        resolutions (those ``skips`` reaches)."""
        embedding = self.decoder_subpixel_embedding(features)
        joined = list(skips)
        guided = [r for r in self.resolutions if r < len(skips)]
        for r, guide in zip(guided, self.subpixel_guidance(embedding, [sizes[r] for r in guided])):
            joined[r] = guide if joined[r] is None else torch.cat([joined[r], guide], 1)
        return joined

    def _slice_by_slice_tail(self, x: Tensor) -> bool:
        """Whether to run the full-resolution levels one slice at a time (the inference form's choice,
        on the CPU; a GPU runs the batch whole).

        Measured on 2 CPU cores: batching slices pays in the coarse levels (fewer, larger calls: 42-54
        against 57-72 ms a slice for 4-8 slices), and costs at full resolution, whose 2H×2W maps of a
        batch leave the cache (2 slices per call: 103 against 85 ms a slice). Only where every guided
        resolution is a full-resolution level, so the coarse levels need no embedding.
        """
        return (self.slice_by_slice and x.shape[0] > 1 and x.device.type == "cpu" and not torch.is_grad_enabled()
                and not exporting() and max(self.resolutions) < _FINE_LEVELS)

    def predict(self, x: Tensor) -> Tensor:
        """Logits at the input's resolution (``out1x``): what upstream thresholds and the pipeline uses."""
        return self.forward(x)[1]
