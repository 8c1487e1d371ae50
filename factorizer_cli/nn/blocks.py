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

from .factorization import NMF
from .layers import MLP, LayerNorm, Linear, Residual
from .matricize import Matricize
from .partial import PartialSpec, partialize


class FactorizerSubblock(nn.Module):
    """Linear → matricize → activation → factorize → inverse matricize → Linear → dropout.

    ``**kwargs`` go to the factorization (e.g. ``rank``, ``num_iters``, ``solver``).
    """

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

    def forward(self, x: Tensor) -> Tensor:
        out = self.in_proj(x)
        windows = getattr(self.tensorize, "shifted_windows", [self.tensorize])
        # One window partition at a time: the same sum as upstream's stack-then-split, a fraction of
        # the memory. The sum is accumulated in place when autograd is off.
        acc = None
        for window in windows:
            matrices = window(out)
            if self._relu_act and not torch.is_grad_enabled() and not _shares_memory(matrices, out):
                matrices = matrices.relu_()
            else:
                matrices = self.act(matrices)
            folded = window.inverse_forward(self.factorize(matrices))
            del matrices
            if acc is None:
                acc = folded
            elif torch.is_grad_enabled():
                acc = acc + folded
            else:
                acc.add_(folded)
        if len(windows) > 1:
            acc = acc / len(windows)
        return self.dropout(self.out_proj(acc))


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


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
        for block in self.blocks.values():
            x = block(x)
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
        x = x + self.fact(self.norm1(x))
        return x + self.mlp(self.norm2(x))


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

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "adapter"):
            x = self.adapter(x)
        x = self.pos_embed(x)
        if hasattr(self, "pos_drop"):
            x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x)
        return x


__all__ = [
    "FactorizerSubblock",
    "FactMixer",
    "FactorizerBlock",
    "FactMixerBlock",
    "FactorizerStage",
]
