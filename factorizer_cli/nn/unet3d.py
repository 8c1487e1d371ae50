"""The Models Genesis 3D U-Net (``UNet3D``) and Semantic Genesis' two-headed ``YNet3D``.

Zhou et al., "Models Genesis" (MICCAI 2019, MrGiovanni/ModelsGenesis ``pytorch/unet3d.py``) and
Haghighi et al., "Learning Semantics-enriched Representation via Self-discovery, Self-classification,
and Self-restoration" (MICCAI 2020, fhaghighi/SemanticGenesis ``pytorch/models/ynet3d.py``, the same
U-Net plus a classification head). Written here from the facts of upstream's network:

- encoder: four blocks of two (3×3×3 conv, norm, activation); block ``d`` widens to ``w·2^d`` then
  ``w·2^(d+1)`` (``w = base_width``; upstream hard-codes 32: 32-64, 64-128, 128-256, 256-512), a 2×
  max-pool after each but the last;
- decoder: a 2×2×2 stride-2 transposed conv keeping the width, concatenation with the encoder block's
  output at that scale, two convs to ``w·2^(d+1)``; a 1×1 conv to ``n_class`` outputs;
- ``YNet3D`` adds the self-classification head on the bottleneck (3×3×3 conv to ``32·w``, norm,
  activation, global average pool, linear to ``cls_classes``, softmax or sigmoid).

Module names are upstream's (``down_tr64`` ... ``out_tr.final_conv``, ``clc_out``), so upstream's
state dicts load by key whatever the width; the names keep upstream's channel numbers of width 32.

**Normalisation** (``norm``). Upstream's ``ContBatchNorm3d`` (``norm="cont"``, the default, for
parity with imported weights) normalises with the *batch's* statistics even in eval mode; its running
statistics are updated by every forward and never used. A prediction then depends on what else is in
the batch (the sliding window's batch, the padding of the last window), so a model trained here for
inference should use ``norm="batch"``: ``nn.BatchNorm3d``, running statistics in eval mode. Both have
the same state-dict keys, so either loads the other's weights.

**Outputs.** Like upstream, ``forward`` returns probabilities (the sigmoid of the restoration /
segmentation head; ``YNet3D``: ``[segmentation, class probabilities]``). ``predict`` returns the
segmentation *logits* (before the sigmoid): what the tool's pipeline activates itself
(``families.full_resolution_logits``). ``encode`` gives the bottleneck features (upstream's
``model.out512``, which its classification fine-tuning pools). Upstream keeps every intermediate
output as an attribute of the module; these do not (they would hold a batch's activations alive).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, InputShapeError

__all__ = ["ContBatchNorm3d", "UNet3D", "YNet3D", "NORMS", "ACTIVATIONS"]

NORMS = ("cont", "batch")
ACTIVATIONS = ("relu", "prelu", "elu")
DEPTH = 4  # encoder blocks; the input's sides must be multiples of 2^(DEPTH-1)


class ContBatchNorm3d(nn.Module):
    """Batch normalisation that always uses the batch's statistics (upstream's ``ContBatchNorm3d``).

    Parameters and buffers are ``nn.BatchNorm3d``'s (same state-dict keys). Every forward, in training
    and eval mode alike, normalises with the batch's mean and biased variance and moves the running
    statistics towards them (momentum 0.1); the running statistics never enter the output, and
    ``num_batches_tracked`` is never advanced (upstream's does not either).

    Deliberately not a ``_BatchNorm`` subclass: code that treats every BatchNorm alike (folding into
    the convolution, ``SyncBatchNorm.convert_sync_batchnorm``) would give it eval-mode semantics that
    use running statistics, silently changing the network.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5:
            raise InputShapeError(f"ContBatchNorm3d takes (N, C, D, H, W) tensors, got {tuple(x.shape)}")
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            True, self.momentum, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum} (batch statistics always)"


def _norm(kind: str, channels: int) -> nn.Module:
    return ContBatchNorm3d(channels) if kind == "cont" else nn.BatchNorm3d(channels)


def _activation(kind: str, channels: int) -> nn.Module:
    """Upstream's three; PReLU has one slope per channel (a parameter, ``activation.weight``)."""
    if kind == "relu":
        return nn.ReLU()
    if kind == "prelu":
        return nn.PReLU(channels)
    return nn.ELU()


class LUConv(nn.Module):
    """3×3×3 convolution, norm, activation: upstream's unit (``conv1``, ``bn1``, ``activation``)."""

    def __init__(self, in_channels: int, out_channels: int, act: str, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = _norm(norm, out_channels)
        self.activation = _activation(act, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.bn1(self.conv1(x)))


def _two_convs(in_channels: int, middle: int, out_channels: int, act: str, norm: str) -> nn.Sequential:
    return nn.Sequential(LUConv(in_channels, middle, act, norm), LUConv(middle, out_channels, act, norm))


class DownTransition(nn.Module):
    """Two convolutions (``ops``), then a 2× max-pool unless it is the bottleneck.

    Returns ``(pooled, before_pool)``: the next block's input and the skip for the decoder.
    """

    def __init__(self, in_channels: int, width: int, act: str, norm: str, pool: bool) -> None:
        super().__init__()
        self.ops = _two_convs(in_channels, width, 2 * width, act, norm)
        self.pool = pool

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.ops(x)
        return (F.max_pool3d(out, 2) if self.pool else out), out


class UpTransition(nn.Module):
    """Transposed conv (×2, same width), concatenated with the skip, then two convolutions."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, act: str, norm: str) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2)
        self.ops = _two_convs(in_channels + skip_channels, out_channels, out_channels, act, norm)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), 1))


class OutputTransition(nn.Module):
    """The 1×1×1 convolution to the outputs (``final_conv``); it returns logits, the sigmoid is the
    network's."""

    def __init__(self, in_channels: int, n_class: int) -> None:
        super().__init__()
        self.final_conv = nn.Conv3d(in_channels, n_class, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.final_conv(x)


class ClassificationHead(nn.Module):
    """Self-classification on the bottleneck: conv 3×3×3 to ``width``, norm, activation, global average
    pool, linear to the pattern classes. ``forward`` returns logits (``fc1``'s output)."""

    def __init__(self, in_channels: int, width: int, cls_classes: int, act: str, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, width, kernel_size=3, padding=1)
        self.bn1 = _norm(norm, width)
        self.activation = _activation(act, width)
        self.fc1 = nn.Linear(width, cls_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = F.adaptive_avg_pool3d(self.activation(self.bn1(self.conv1(x))), 1)
        return self.fc1(torch.flatten(features, 1))


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive whole number, got {value!r}")
    return value


def _choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return str(value)


class UNet3D(nn.Module):
    """The Models Genesis 3D U-Net; upstream's arguments (``n_class``, ``act``) plus ours.

    ``base_width`` (upstream: 32, 19,073,665 parameters) scales every width; ``in_channels`` (upstream:
    1) takes several modalities; ``norm`` is ``"cont"`` (upstream's batch statistics always) or
    ``"batch"`` (``nn.BatchNorm3d``, for models trained here; see the module's docstring). Input
    ``(N, in_channels, X, Y, Z)`` with sides multiples of 8; ``forward`` gives probabilities,
    ``predict`` logits.
    """

    def __init__(self, n_class: int = 1, act: str = "relu", *, base_width: int = 32, in_channels: int = 1,
                 norm: str = "cont") -> None:
        super().__init__()
        self.n_class = _positive("n_class", n_class)
        self.in_channels = _positive("in_channels", in_channels)
        self.base_width = w = _positive("base_width", base_width)
        act = _choice("act", act, ACTIVATIONS)
        self.norm = norm = _choice("norm", norm, NORMS)
        self.down_tr64 = DownTransition(in_channels, w, act, norm, pool=True)
        self.down_tr128 = DownTransition(2 * w, 2 * w, act, norm, pool=True)
        self.down_tr256 = DownTransition(4 * w, 4 * w, act, norm, pool=True)
        self.down_tr512 = DownTransition(8 * w, 8 * w, act, norm, pool=False)
        self.up_tr256 = UpTransition(16 * w, 8 * w, 8 * w, act, norm)
        self.up_tr128 = UpTransition(8 * w, 4 * w, 4 * w, act, norm)
        self.up_tr64 = UpTransition(4 * w, 2 * w, 2 * w, act, norm)
        self.out_tr = OutputTransition(2 * w, n_class)

    def check_input(self, x: Tensor) -> None:
        """Raise ``InputShapeError`` unless ``x`` is ``(N, in_channels, X, Y, Z)`` with sides multiples of 8."""
        multiple = 2 ** (DEPTH - 1)
        if x.dim() != 5 or x.shape[1] != self.in_channels or any(s % multiple for s in x.shape[2:]):
            raise InputShapeError(
                f"{type(self).__name__} takes (N, {self.in_channels}, X, Y, Z) with X, Y, Z multiples of "
                f"{multiple}, got {tuple(x.shape)}")

    def encode_all(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The bottleneck features and the three skips (full resolution first)."""
        self.check_input(x)
        skips = []
        for block in (self.down_tr64, self.down_tr128, self.down_tr256):
            x, skip = block(x)
            skips.append(skip)
        bottleneck, _ = self.down_tr512(x)
        return bottleneck, skips

    def encode(self, x: Tensor) -> Tensor:
        """The bottleneck features (``16·base_width`` channels at 1/8 resolution): upstream's ``out512``."""
        return self.encode_all(x)[0]

    def decode(self, bottleneck: Tensor, skips: list[Tensor]) -> Tensor:
        """Segmentation logits from the encoder's outputs."""
        x = self.up_tr256(bottleneck, skips[2])
        x = self.up_tr128(x, skips[1])
        x = self.up_tr64(x, skips[0])
        return self.out_tr(x)

    def predict(self, x: Tensor) -> Tensor:
        """Segmentation / restoration logits ``(N, n_class, X, Y, Z)``, before upstream's sigmoid."""
        return self.decode(*self.encode_all(x))

    def forward(self, x: Tensor) -> Tensor:
        """Probabilities, as upstream's ``forward`` returns them."""
        return torch.sigmoid(self.predict(x))


class YNet3D(UNet3D):
    """Semantic Genesis' network: ``UNet3D`` plus the self-classification head ``clc_out``.

    Upstream's arguments (``n_class``, ``act``, ``lst_act``: ``"soft"`` for a softmax over the
    ``cls_classes`` pattern classes, anything else a sigmoid) plus ``UNet3D``'s. ``forward`` returns
    ``[segmentation probabilities, class probabilities]``; ``predict`` the segmentation logits,
    ``classify`` the class logits.
    """

    def __init__(self, n_class: int = 1, act: str = "relu", lst_act: str = "soft", cls_classes: int = 44, *,
                 base_width: int = 32, in_channels: int = 1, norm: str = "cont") -> None:
        super().__init__(n_class, act, base_width=base_width, in_channels=in_channels, norm=norm)
        if not isinstance(lst_act, str):
            raise ConfigError(f"lst_act must be a string ('soft' for a softmax, else a sigmoid), got {lst_act!r}")
        self.lst_act = lst_act
        self.cls_classes = _positive("cls_classes", cls_classes)
        w = self.base_width
        self.clc_out = ClassificationHead(16 * w, 32 * w, cls_classes, act, self.norm)

    def class_probabilities(self, logits: Tensor) -> Tensor:
        return logits.softmax(1) if self.lst_act == "soft" else torch.sigmoid(logits)

    def classify(self, x: Tensor) -> Tensor:
        """Class logits ``(N, cls_classes)`` (``fc1``'s output, before the softmax / sigmoid)."""
        return self.clc_out(self.encode(x))

    def forward_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Segmentation logits and class logits from one pass: what a training loss wants."""
        bottleneck, skips = self.encode_all(x)
        return self.decode(bottleneck, skips), self.clc_out(bottleneck)

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        segmentation, classes = self.forward_logits(x)
        return [torch.sigmoid(segmentation), self.class_probabilities(classes)]
