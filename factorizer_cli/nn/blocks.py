"""Factorizer blocks: NMF inside a residual, pre-norm block, as in the paper's Figure 2.

Two generations share the pieces:

- seed API (upstream 0.0.1/0.0.2): ``FactorizerBlock`` holds named residual subblocks, typically
  ``nmf=(FactorizerSubblock, ...)`` then ``mlp=(MLP, ...)``, each ``x + sub(LayerNorm(x))``;
- 2025 MONAI bundles: ``FactMixerBlock`` with fixed ``norm1 → fact → norm2 → mlp``.

``FactorizerStage`` stacks either kind after an optional channel adapter and positional embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from . import swin_gram
from .factorization import NMF
from .layers import MLP, LayerNorm, Linear, Residual, is_channels_last, mlp_residual_, norm_linear
from .matricize import Matricize, partition_mean, partition_mean_
from .partial import PartialSpec, partialize

_SLAB_ELEMENTS = 1 << 23  # inference matricizes ~32 MB of windows at a time, not the whole map


class FactorizerSubblock(nn.Module):
    """Linear → matricize → activation → factorize → inverse matricize → Linear → dropout.

    ``**kwargs`` go to the factorization (e.g. ``rank``, ``num_iters``, ``solver``).

    ``recorder``: None, or an object whose ``record(windows, factors)`` receives the NMF factors of
    every forward (``nn.components.capture`` sets and removes it); None costs one check.
    """

    recorder: Any = None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_size: Sequence[int],
        tensorize: PartialSpec = (Matricize, {"num_heads": 1, "grid_size": 1}),
        act: PartialSpec = nn.ReLU,
        factorize: PartialSpec = NMF,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.in_proj = Linear(in_channels, out_channels, bias=False)
        self.tensorize = partialize(tensorize)((None, out_channels, *spatial_size))
        self.act = partialize(act)()
        self.tensorized_size = tuple(self.tensorize.output_size[2:])
        self.factorize = partialize(factorize)(self.tensorized_size, **kwargs)
        self.out_proj = Linear(out_channels, out_channels)
        self.dropout = nn.Dropout(dropout)
        self._relu_act = type(self.act) is nn.ReLU
        if self._relu_act and hasattr(self.factorize, "input_is_nonnegative"):
            self.factorize.input_is_nonnegative = True

    @property
    def windows(self) -> list[nn.Module]:
        """The window partitions: one Matricize per shift."""
        return list(getattr(self.tensorize, "shifted_windows", [self.tensorize]))

    def forward(self, x: Tensor, norm: nn.Module | None = None) -> Tensor:
        """``norm`` (optional) is applied to ``x`` first: the block's pre-norm, fused in at inference."""
        if self.recorder is not None:
            return self._forward_recorded(x, norm)
        if not _inference(self):
            # The reference path, autograd-friendly: the same sum as upstream's stack-then-split.
            out = self.in_proj(x if norm is None else norm(x))
            acc = partition_mean(out, self.windows, lambda m: self.factorize(self.act(m)))
            return self.dropout(self.out_proj(acc))

        # Inference: a slab of windows at a time, folded back in place, the NMF reconstruction written
        # over its own input. An elementwise ReLU commutes with the partition: applied once, up front.
        if isinstance(norm, LayerNorm):
            out = norm_linear(x, norm, self.in_proj)
        else:
            out = self.in_proj(x if norm is None else norm(x))
        if self._relu_act:
            out = out.relu_()
        overwrite = {"overwrite_input": True} if isinstance(self.factorize, NMF) else {}

        def factorize(matrices: Tensor) -> Tensor:
            return self.factorize(matrices if self._relu_act else self.act(matrices), **overwrite)

        acc = partition_mean_(out, self.windows, factorize, _SLAB_ELEMENTS)
        del out
        return self.dropout(self.out_proj(acc))

    def _forward_recorded(self, x: Tensor, norm: nn.Module | None) -> Tensor:
        """The reference path with the factors kept and handed to ``self.recorder`` (opt-in, slower)."""
        if not isinstance(self.factorize, NMF):
            raise ConfigError(f"component capture needs an NMF factorization, not {type(self.factorize).__name__}")
        factors = []

        def factorize(matrices: Tensor) -> Tensor:
            u, v, reconstruction = self.factorize.fit(self.act(matrices))
            factors.append((u, v))
            return reconstruction

        acc = partition_mean(self.in_proj(x if norm is None else norm(x)), self.windows, factorize)
        self.recorder.record(self.windows, factors)
        return self.dropout(self.out_proj(acc))


def _inference(module: nn.Module) -> bool:
    """The memory-saving path: autograd off and eval mode (dropout must still act in training)."""
    return not torch.is_grad_enabled() and not module.training


def _pre_norm_residual(x: Tensor, norm: nn.Module, sub: nn.Module, x_is_ours: bool) -> Tensor:
    """``x + sub(norm(x))`` at inference, without full-size temporaries where the layers allow.

    ``x_is_ours``: ``x`` was made inside this block, so the MLP residual may update it in place.
    """
    if isinstance(norm, LayerNorm):
        if isinstance(sub, MLP) and x_is_ours and (x.is_contiguous() or is_channels_last(x)):
            return mlp_residual_(x, norm, sub)
        if isinstance(sub, FactorizerSubblock):
            if swin_gram.applies(x, norm, sub):
                return swin_gram.swin_gram_residual(x, norm, sub)
            return sub(x, norm=norm).add_(x)
    return sub(norm(x)) + x


class FactMixer(FactorizerSubblock):
    """The 2025 bundles' name for the subblock; takes ``reshape=`` where the seed API took ``tensorize=``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_size: Sequence[int],
        reshape: PartialSpec = (Matricize, {"num_heads": 1, "grid_size": 1}),
        **kwargs: Any,
    ) -> None:
        super().__init__(in_channels, out_channels, spatial_size, tensorize=reshape, **kwargs)


class FactorizerBlock(nn.Module):
    """Seed-API block: each keyword argument is a subblock run as ``x + sub(LayerNorm(x))``, in order."""

    def __init__(self, channels: int, spatial_size: Sequence[int], **subblocks: PartialSpec) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict(
            {
                name: Residual(
                    nn.Sequential(
                        LayerNorm(channels),
                        partialize(spec)(channels, channels, spatial_size=tuple(spatial_size)),
                    )
                )
                for name, spec in subblocks.items()
            }
        )

    def forward(self, x: Tensor) -> Tensor:
        if not _inference(self):
            for block in self.blocks.values():
                x = block(x)
            return x
        for i, block in enumerate(self.blocks.values()):
            norm, sub = block.fn
            x = _pre_norm_residual(x, norm, sub, x_is_ours=i > 0)
        return x


class FactMixerBlock(nn.Module):
    """2025-bundle block: ``x + fact(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        channels: int,
        spatial_size: Sequence[int],
        norm: PartialSpec = LayerNorm,
        dropout: float = 0.0,
        mlp_ratio: float = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.norm1 = partialize(norm)(channels)
        self.fact = FactMixer(channels, channels, spatial_size, dropout=dropout, **kwargs)
        self.norm2 = partialize(norm)(channels)
        self.mlp = MLP(channels, ratio=mlp_ratio, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        if not _inference(self):
            x = x + self.fact(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = _pre_norm_residual(x, self.norm1, self.fact, x_is_ours=False)
        return _pre_norm_residual(x, self.norm2, self.mlp, x_is_ours=True)


class FactorizerStage(nn.Module):
    """``depth`` blocks at one resolution, after a channel adapter (if needed) and a positional embedding.

    ``block`` is the block class (``FactorizerBlock`` for the seed API, ``FactMixerBlock`` for the 2025
    bundles); ``**block_kwargs`` are passed to every block.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_size: Sequence[int],
        depth: int = 1,
        adapter: PartialSpec = (Linear, {"bias": False}),
        pos_embed: PartialSpec = nn.Identity,
        dropout: float = 0.0,
        block: Callable[..., nn.Module] = FactorizerBlock,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        spatial_size = tuple(spatial_size)
        if in_channels != out_channels:
            self.adapter = partialize(adapter)(in_channels, out_channels)
        self.pos_embed = partialize(pos_embed)(out_channels, spatial_size)
        if any(True for _ in self.pos_embed.parameters()):
            self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            block(out_channels, spatial_size, **block_kwargs) for _ in range(depth)
        )

    def embed(self, *parts: Tensor) -> Tensor:
        """Adapter and positional embedding. Several inputs are taken as their channel concatenation
        (the decoder's skip and upsampled maps), built only if the adapter cannot take them apart."""
        if hasattr(self, "adapter"):
            x = self.adapter(*parts) if isinstance(self.adapter, Linear) else self.adapter(torch.cat(parts, 1))
        else:
            x = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        x = self.pos_embed(x)
        if hasattr(self, "pos_drop"):
            x = self.pos_drop(x)
        return x

    def run_blocks(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward(self, *parts: Tensor) -> Tensor:
        return self.run_blocks(self.embed(*parts))


__all__ = [
    "FactorizerSubblock",
    "FactMixer",
    "FactorizerBlock",
    "FactMixerBlock",
    "FactorizerStage",
]
