"""U-shaped Factorizer networks.

``UNet`` is the skeleton (stem, encoder stages with downsampling, decoder stages with upsampling and
skip connections, 1×1 heads); a Factorizer is that skeleton with a ``FactorizerStage`` at every level and
a learnable positional embedding at the bottleneck. Module names match upstream, so upstream state
dicts load with their own keys.

``SegmentationFactorizer`` is the seed API (upstream 0.0.2): deep-supervision heads, forward returns a
list of logits, full resolution first. ``Factorizer`` is the 2025 MONAI-bundle network: by default one
head, forward returns one tensor. Either way ``predict(x)`` returns the full-resolution logits only,
which is all inference needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputShapeError
from .blocks import FactMixerBlock, FactorizerStage
from .layers import PositionalEmbedding
from .partial import PartialSpec, partialize


class _EncoderStage(nn.Module):
    def __init__(self, downsample: nn.Module, block: nn.Module) -> None:
        super().__init__()
        self.downsample, self.block = downsample, block

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.downsample(x))


class _DecoderStage(nn.Module):
    """Upsampling and a stage; ``UNet.forward_features`` runs the two (see there why not here)."""

    def __init__(self, upsample: nn.Module, block: FactorizerStage) -> None:
        super().__init__()
        self.upsample, self.block = upsample, block


class _Path(nn.Module):
    """Holds a ModuleList under the name ``blocks`` (upstream's ``encoder.blocks.N`` keys)."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


class UNet(nn.Module):
    """U-Net skeleton. ``stages[i]`` is a ``(class, kwargs)`` for level ``i`` (encoder, then decoder)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_size: Sequence[int],
        encoder_depth: Sequence[int],
        encoder_width: Sequence[int],
        strides: Sequence[int],
        decoder_depth: Sequence[int],
        stages: Sequence[PartialSpec],
        stem: PartialSpec | None = None,
        downsample: PartialSpec | None = None,
        upsample: PartialSpec | None = None,
        head: PartialSpec | None = None,
        num_deep_supr: int | bool = 1,
    ) -> None:
        super().__init__()
        if spatial_size is None:
            raise ConfigError("spatial_size is required: NMF sizes and embeddings depend on it")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.spatial_size = tuple(int(s) for s in spatial_size)
        ndim = len(self.spatial_size)
        levels = len(encoder_depth)
        if not (len(encoder_width) == len(strides) == levels) or len(decoder_depth) >= levels:
            raise ConfigError(
                f"encoder_depth, encoder_width and strides need one entry per level ({levels}), "
                f"decoder_depth fewer; got {len(encoder_width)}, {len(strides)}, {len(decoder_depth)}"
            )
        conv, tconv = getattr(nn, f"Conv{ndim}d"), getattr(nn, f"ConvTranspose{ndim}d")
        total_stride = 1
        for s in strides:
            total_stride *= s
        bad = [s for s in self.spatial_size if s % total_stride]
        if bad:
            raise ConfigError(
                f"spatial_size {self.spatial_size} must be a multiple of the total stride {total_stride}"
            )

        if stem is None or stem is nn.Identity:
            self.stem, width = nn.Identity(), in_channels
        else:
            self.stem, width = partialize(stem)(in_channels, encoder_width[0]), encoder_width[0]
        downsample = partialize(downsample or (conv, {"kernel_size": 2}))
        upsample = partialize(upsample or (tconv, {"kernel_size": 2}))
        head = partialize(head or (conv, {"kernel_size": 1}))

        size = self.spatial_size
        encoder = []
        for i in range(levels):
            size = tuple(d // strides[i] for d in size)
            down = nn.Identity() if strides[i] == 1 else downsample(width, encoder_width[i], stride=strides[i])
            block_in = width if strides[i] == 1 else encoder_width[i]
            stage = partialize(stages[i])(block_in, encoder_width[i], spatial_size=size, depth=encoder_depth[i])
            encoder.append(_EncoderStage(down, stage))
            width = encoder_width[i]
        self.encoder = _Path(encoder)

        decoder = []
        for i in range(len(decoder_depth)):
            stride = strides[levels - 1 - i]
            size = tuple(d * stride for d in size)
            c_in, c_out = encoder_width[levels - 1 - i], encoder_width[levels - 2 - i]
            stage = partialize(stages[levels + i])(2 * c_out, c_out, spatial_size=size, depth=decoder_depth[i])
            decoder.append(_DecoderStage(upsample(c_in, c_out, stride=stride), stage))
        self.decoder = _Path(decoder)

        if num_deep_supr is False or num_deep_supr is None:
            self.num_deep_supr = False
            self.head = head(encoder_width[0], out_channels)
        else:
            self.num_deep_supr = 3 if num_deep_supr is True else int(num_deep_supr)
            self.heads = nn.ModuleList(
                head(encoder_width[j], out_channels) for j in range(self.num_deep_supr)
            )

    def check_input(self, x: Tensor) -> None:
        """Raise ``InputShapeError`` naming the expected shape when ``x`` does not fit."""
        expected = (self.in_channels, *self.spatial_size)
        if x.dim() != 2 + len(self.spatial_size) or tuple(x.shape[1:]) != expected:
            raise InputShapeError(
                f"network expects input of shape (batch, {', '.join(map(str, expected))}) "
                f"({self.in_channels} channels, spatial size {self.spatial_size}); got {tuple(x.shape)}"
            )

    def forward_features(self, x: Tensor, levels: int = 1) -> list[Tensor]:
        """Decoder outputs, full resolution first; only the first ``levels`` are kept."""
        self.check_input(x)
        if _channels_last_inference(self, x):
            x = x.contiguous(memory_format=torch.channels_last_3d)
        features = []
        h = self.stem(x)
        for stage in self.encoder.blocks:
            h = stage(h)
            features.append(h)
        del h
        outputs = [features.pop()]
        for i, stage in enumerate(self.decoder.blocks):
            up = stage.upsample(outputs[-1])
            if len(self.encoder.blocks) - 1 - i >= levels:
                outputs[-1] = None  # no head reads this level: free it now
            h = stage.block.embed(features.pop(), up)  # skip ⊕ upsampled, freed once adapted
            del up
            outputs.append(stage.block.run_blocks(h))
            del h
        outputs.reverse()
        return outputs[:levels]

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if not self.num_deep_supr:
            return self.head(self.forward_features(x)[0]).contiguous()
        features = self.forward_features(x, levels=self.num_deep_supr)
        return [head(f).contiguous() for head, f in zip(self.heads, features)]

    def predict(self, x: Tensor) -> Tensor:
        """Full-resolution logits only (the other deep-supervision heads are skipped)."""
        head = self.head if not self.num_deep_supr else self.heads[0]
        return head(self.forward_features(x)[0]).contiguous()


def _channels_last_inference(net: nn.Module, x: Tensor) -> bool:
    """3D inference on the CPU runs channels last: oneDNN's convolutions take it without reorders and
    every per-voxel layer (norms, 1×1 layers, the Gram path's blocks) reads voxels as rows, with no
    transposes (``layers.voxel_rows``). Training, tracing and other devices keep the default format."""
    return (x.dim() == 5 and x.device.type == "cpu" and not torch.is_grad_enabled() and not net.training
            and not torch.jit.is_tracing())


def _stage(pos_embed: PartialSpec | None = None, **kwargs: Any) -> PartialSpec:
    return (FactorizerStage, kwargs if pos_embed is None else {"pos_embed": pos_embed, **kwargs})


def _factorizer_stages(levels: int, decoder_levels: int, pos_embed: Any, **kwargs: Any) -> list:
    if pos_embed is True:
        pos_embed = PositionalEmbedding
    elif pos_embed in (False, None):
        pos_embed = nn.Identity
    return (
        [_stage(**kwargs)] * (levels - 1)
        + [_stage(pos_embed=pos_embed, **kwargs)]
        + [_stage(**kwargs)] * decoder_levels
    )


class SegmentationFactorizer(UNet):
    """The seed API's U-shaped Factorizer; ``**kwargs`` (``nmf=``, ``mlp=``, ``dropout=``) go to every stage.

    ``pos_embed`` (the bottleneck's embedding) also takes True/False, as upstream 0.0.1 did.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_size: Sequence[int],
        encoder_depth: Sequence[int] = (1, 1, 1, 1, 1),
        encoder_width: Sequence[int] = (32, 64, 128, 256, 512),
        strides: Sequence[int] = (1, 2, 2, 2, 2),
        decoder_depth: Sequence[int] = (1, 1, 1, 1),
        stem: PartialSpec | None = None,
        downsample: PartialSpec | None = None,
        upsample: PartialSpec | None = None,
        head: PartialSpec | None = None,
        pos_embed: PartialSpec | bool = PositionalEmbedding,
        num_deep_supr: int | bool = 1,
        **kwargs: Any,
    ) -> None:
        stages = _factorizer_stages(len(encoder_depth), len(decoder_depth), pos_embed, **kwargs)
        super().__init__(
            in_channels, out_channels, spatial_size, encoder_depth, encoder_width, strides,
            decoder_depth, stages, stem, downsample, upsample, head, num_deep_supr,
        )


class Factorizer(SegmentationFactorizer):
    """The 2025 MONAI-bundle Factorizer: ``FactMixerBlock`` stages, one head unless ``num_deep_supr``.

    Same arguments as ``SegmentationFactorizer``, with the bundles' defaults: a 3×3×3 stem, one head,
    and ``eps=1e-16`` in the solvers. ``**kwargs`` go to every block (``norm``, ``mlp_ratio``,
    ``reshape``, ``act``, ``factorize`` and the factorization's own arguments).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_size: Sequence[int],
        stem: PartialSpec | None = None,
        num_deep_supr: int | bool = False,
        **kwargs: Any,
    ) -> None:
        if stem is None:
            conv = getattr(nn, f"Conv{len(spatial_size)}d")
            stem = (conv, {"kernel_size": 3, "padding": 1, "bias": False})
        kwargs.setdefault("eps", 1e-16)
        super().__init__(in_channels, out_channels, spatial_size, stem=stem, num_deep_supr=num_deep_supr,
                         block=FactMixerBlock, **kwargs)
