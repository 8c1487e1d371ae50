"""3D UX-Net and 3D RepUX-Net: large-kernel depthwise-convolution encoders under a UNETR-style decoder.

3D UX-Net (Lee et al., ICLR 2023; MASILab/3DUX-Net) stacks ConvNeXt-like ``ux_block``s (depthwise 7³ conv,
layer norm, grouped 1×1 MLP, layer scale, residual). 3D RepUX-Net (Lee et al., MICCAI 2023;
MASILab/RepUX-Net) replaces them with ``repux_block``s (depthwise ks³ conv, BatchNorm, GELU) whose kernel
is re-weighted during training by a Bayesian frequency matrix (BFM). Both feed the four layer-normed
stage outputs, and the input itself, to MONAI's UNETR blocks (residual conv blocks with instance norm
and leaky ReLU, transposed-conv upsampling).

Constructor arguments and state-dict keys are upstream's, so ``best_metric_model.pth`` files load with
their own keys. Upstream accepts and ignores some arguments (``conv_block``; UX-Net's
``layer_scale_init_value``, which it replaces by 1e-6; RepUX-Net's ``drop_path_rate`` and
``layer_scale_init_value``): so do we, so that upstream configurations build unchanged. Input sides
must be multiples of 16 (four halvings, then the decoder concatenates skips of matching size).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["UXNET", "REPUXNET", "BFRConv3d", "bayesian_frequency_matrix"]


def _named(conv: nn.Module) -> nn.Sequential:
    """``conv`` under the name ``conv``: the key layout of MONAI's ``Convolution`` that checkpoints carry."""
    return nn.Sequential(OrderedDict(conv=conv))


def _drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: drop a residual branch per sample, rescale the kept ones (identity in eval)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class ChannelNorm(nn.Module):
    """Layer norm over the channels of a ``B × C × *spatial`` map (upstream's channels_first LayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(rearrange(x, "b c ... -> b ... c"), (x.shape[1],), self.weight, self.bias, self.eps)
        return rearrange(y, "b ... c -> b c ...")


# --- encoder blocks --------------------------------------------------------------------------------

class UXBlock(nn.Module):
    """3D UX-Net's ``ux_block``: x + γ ⊙ MLP(LN(dwconv₇(x))), the MLP a grouped 1×1 conv (4 per channel)."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        self.dwconv = nn.Conv3d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = ChannelNorm(dim)
        self.pwconv1 = nn.Conv3d(dim, 4 * dim, kernel_size=1, groups=dim)
        self.pwconv2 = nn.Conv3d(4 * dim, dim, kernel_size=1, groups=dim)
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(self.dwconv(x)))))
        y = y * rearrange(self.gamma, "c -> c 1 1 1")
        return x + _drop_path(y, self.drop_path, self.training)


def bayesian_frequency_matrix(kernel_size: int, alpha: float) -> Tensor:
    """BFM[i, j, k] = α / (‖(i, j, k) − centre‖₂ + α), shaped ``1 × 1 × k³`` to scale a depthwise kernel.

    Computed in float64 and rounded once, as upstream does (NumPy, then float32).
    """
    offsets = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    i, j, k = torch.meshgrid(offsets, offsets, offsets, indexing="ij")
    distance = (i * i + j * j + k * k).sqrt()
    return rearrange(alpha / (distance + alpha), "i j k -> 1 1 i j k").to(torch.float32)


class BFRConv3d(nn.Conv3d):
    """Depthwise conv trained with Bayesian frequency re-parameterisation: the kernel used is W ⊙ BFM.

    ``weight`` is the latent W (the optimiser's parameter, which gets the gradient); the BFM is a
    non-persistent buffer (it follows ``.to()`` but is not saved: it is a function of ``kernel_size``
    and ``alpha``). Every call uses the same W ⊙ BFM, unlike upstream's release, which stores the
    product back as a new parameter on each call. ``reparameterized()`` folds the product into a plain
    conv for inference and export.
    """

    def __init__(self, dim: int, kernel_size: int, alpha: float) -> None:
        super().__init__(dim, dim, kernel_size=kernel_size, padding=kernel_size // 2, groups=dim)
        self.alpha = float(alpha)
        self.register_buffer("bfm", bayesian_frequency_matrix(kernel_size, alpha), persistent=False)
        self.bfm: Tensor

    def effective_weight(self) -> Tensor:
        return self.weight * self.bfm

    def forward(self, x: Tensor) -> Tensor:
        return F.conv3d(x, self.effective_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def reparameterized(self) -> nn.Conv3d:
        """A plain depthwise conv computing the same function (weights W ⊙ BFM, the same bias)."""
        plain = nn.Conv3d(self.in_channels, self.out_channels, self.kernel_size, padding=self.padding,
                          groups=self.groups, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(self.effective_weight())
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain


class RepUXBlock(nn.Module):
    """3D RepUX-Net's ``repux_block``: GELU(BN(dwconv_ks(x))), no residual; BFR in training form."""

    def __init__(self, dim: int, ks: int, a: float, deploy: bool) -> None:
        super().__init__()
        self.dwconv = (nn.Conv3d(dim, dim, kernel_size=ks, padding=ks // 2, groups=dim) if deploy
                       else BFRConv3d(dim, ks, a))
        self.norm = nn.BatchNorm3d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.norm(self.dwconv(x)))

    def reparameterize(self) -> None:
        if isinstance(self.dwconv, BFRConv3d):
            self.dwconv = self.dwconv.reparameterized()


class Backbone(nn.Module):
    """Stem (7³ conv, stride 2) and three 2³ stride-2 downsamplings, each followed by a stage of blocks.

    Returns the four stage outputs, each through its own channel norm (``norm0`` … ``norm3``), at
    1/2 … 1/16 of the input resolution.
    """

    def __init__(self, in_chans: int, dims: Sequence[int], stages: Sequence[Sequence[nn.Module]]) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv3d(in_chans, dims[0], kernel_size=7, stride=2, padding=3),
                           ChannelNorm(dims[0]))]
            + [nn.Sequential(ChannelNorm(dims[i]), nn.Conv3d(dims[i], dims[i + 1], kernel_size=2, stride=2))
               for i in range(3)]
        )
        self.stages = nn.ModuleList(nn.Sequential(*blocks) for blocks in stages)
        for i, dim in enumerate(dims):
            self.add_module(f"norm{i}", ChannelNorm(dim))

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, (down, stage) in enumerate(zip(self.downsample_layers, self.stages, strict=True)):
            x = stage(down(x))
            outs.append(getattr(self, f"norm{i}")(x))
        return outs


# --- decoder blocks (MONAI's UnetResBlock / UnetBasicBlock, UnetrUpBlock, UnetOutBlock) --------------

def _instance_norm(x: Tensor) -> Tensor:
    return F.instance_norm(x, eps=1e-5)


class ConvBlock(nn.Module):
    """Two 3³ convs, each instance-normed (no affine), leaky ReLU 0.01 between and after.

    ``residual``: MONAI's ``UnetResBlock``: the input is added before the last activation, through a
    1×1 conv and instance norm (``conv3``) where the widths differ. Else ``UnetBasicBlock``.
    """

    def __init__(self, in_channels: int, out_channels: int, residual: bool) -> None:
        super().__init__()
        self.conv1 = _named(nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False))
        self.conv2 = _named(nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=False))
        self.residual = residual
        self.conv3 = (_named(nn.Conv3d(in_channels, out_channels, kernel_size=1, bias=False))
                      if residual and in_channels != out_channels else None)

    def forward(self, x: Tensor) -> Tensor:
        y = _instance_norm(self.conv2(F.leaky_relu(_instance_norm(self.conv1(x)), 0.01)))
        if self.residual:
            y = y + (x if self.conv3 is None else _instance_norm(self.conv3(x)))
        return F.leaky_relu(y, 0.01)


def _basic_block(in_channels: int, out_channels: int, residual: bool) -> nn.Sequential:
    """MONAI's ``UnetrBasicBlock``: a conv block under the name ``layer``."""
    return nn.Sequential(OrderedDict(layer=ConvBlock(in_channels, out_channels, residual)))


class UpBlock(nn.Module):
    """MONAI's ``UnetrUpBlock``: 2³ stride-2 transposed conv (no bias), concatenated skip, conv block."""

    def __init__(self, in_channels: int, out_channels: int, residual: bool) -> None:
        super().__init__()
        self.transp_conv = _named(nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2,
                                                     bias=False))
        self.conv_block = ConvBlock(2 * out_channels, out_channels, residual)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv_block(torch.cat([self.transp_conv(x), skip], dim=1))


# --- the networks ----------------------------------------------------------------------------------

def _check(depths: Sequence[int], feat_size: Sequence[int], norm_name: object, spatial_dims: int) -> None:
    if len(depths) != 4 or len(feat_size) != 4:
        raise ConfigError(f"depths and feat_size need 4 entries (4 stages), got {list(depths)} and "
                          f"{list(feat_size)}")
    if spatial_dims != 3:
        raise ConfigError(f"only spatial_dims=3 is supported, got {spatial_dims}")
    if norm_name != "instance":
        raise ConfigError(f"only norm_name='instance' is supported (upstream's setting), got {norm_name!r}")


class _LargeKernelUNet(nn.Module):
    """The shared UNETR-style decoder: encoders 1–5 on the input and the four stage outputs, decoders 5–1.

    Subclasses set their backbone (under upstream's attribute name) before calling ``_build``, so that
    the state dict lists keys in upstream's order.
    """

    @property
    def backbone(self) -> Backbone:
        raise NotImplementedError

    def _build(self, in_chans: int, out_chans: int, feat_size: Sequence[int], hidden_size: int,
               res_block: bool) -> None:
        f = list(feat_size)
        self.encoder1 = _basic_block(in_chans, f[0], res_block)
        self.encoder2 = _basic_block(f[0], f[1], res_block)
        self.encoder3 = _basic_block(f[1], f[2], res_block)
        self.encoder4 = _basic_block(f[2], f[3], res_block)
        self.encoder5 = _basic_block(f[3], hidden_size, res_block)
        self.decoder5 = UpBlock(hidden_size, f[3], res_block)
        self.decoder4 = UpBlock(f[3], f[2], res_block)
        self.decoder3 = UpBlock(f[2], f[1], res_block)
        self.decoder2 = UpBlock(f[1], f[0], res_block)
        self.decoder1 = _basic_block(f[0], f[0], res_block)
        # Upstream hard-codes this input width to 48 (its feat_size[0] in every configuration).
        self.out = nn.Sequential(OrderedDict(conv=_named(nn.Conv3d(f[0], out_chans, kernel_size=1))))

    def forward(self, x: Tensor) -> Tensor:
        s1, s2, s3, s4 = self.backbone(x)
        d = self.decoder5(self.encoder5(s4), self.encoder4(s3))
        d = self.decoder4(d, self.encoder3(s2))
        d = self.decoder3(d, self.encoder2(s1))
        d = self.decoder2(d, self.encoder1(x))
        return self.out(self.decoder1(d))


class UXNET(_LargeKernelUNet):
    """3D UX-Net: a ``ux_block`` backbone (``uxnet_3d``) under the UNETR decoder; full-resolution logits."""

    def __init__(
        self,
        in_chans: int = 1,
        out_chans: int = 13,
        depths: Sequence[int] = (2, 2, 2, 2),
        feat_size: Sequence[int] = (48, 96, 192, 384),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,  # ignored, as upstream: the blocks start γ at 1e-6
        hidden_size: int = 768,
        norm_name: str = "instance",
        conv_block: bool = True,  # ignored, as upstream
        res_block: bool = True,
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        _check(depths, feat_size, norm_name, spatial_dims)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        starts = [sum(depths[:i]) for i in range(4)]
        stages = [[UXBlock(dim, rates[start + j]) for j in range(depth)]
                  for dim, depth, start in zip(feat_size, depths, starts, strict=True)]
        self.uxnet_3d = Backbone(in_chans, feat_size, stages)
        self._build(in_chans, out_chans, feat_size, hidden_size, res_block)

    @property
    def backbone(self) -> Backbone:
        return self.uxnet_3d


class REPUXNET(_LargeKernelUNet):
    """3D RepUX-Net: a ``repux_block`` backbone (``repuxnet_3d``) under the UNETR decoder.

    ``deploy=False`` is the training form (each depthwise kernel is W ⊙ BFM, see ``BFRConv3d``);
    ``deploy=True`` the inference form (plain depthwise convs, what upstream checkpoints load into
    directly). ``reparameterize()`` turns the first into the second in place.
    """

    def __init__(
        self,
        in_chans: int = 1,
        out_chans: int = 13,
        depths: Sequence[int] = (2, 2, 2, 2),
        feat_size: Sequence[int] = (48, 96, 192, 384),
        ks: int = 21,
        a: float = 1,
        drop_path_rate: float = 0.0,  # ignored, as upstream
        layer_scale_init_value: float = 1e-6,  # ignored, as upstream
        hidden_size: int = 768,
        norm_name: str = "instance",
        conv_block: bool = True,  # ignored, as upstream
        res_block: bool = True,
        spatial_dims: int = 3,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        _check(depths, feat_size, norm_name, spatial_dims)
        if ks < 1 or ks % 2 == 0:
            raise ConfigError(f"ks must be odd and positive (the kernel is centred), got {ks}")
        if not deploy and not (math.isfinite(a) and a > 0):
            raise ConfigError(f"a must be positive (BFM = a / (distance + a)), got {a}")
        self.deploy = bool(deploy)
        stages = [[RepUXBlock(dim, ks, a, self.deploy) for _ in range(depth)]
                  for dim, depth in zip(feat_size, depths, strict=True)]
        self.repuxnet_3d = Backbone(in_chans, feat_size, stages)
        self._build(in_chans, out_chans, feat_size, hidden_size, res_block)

    @property
    def backbone(self) -> Backbone:
        return self.repuxnet_3d

    def reparameterize(self) -> REPUXNET:
        """Fold every W ⊙ BFM into a plain depthwise conv (in place): the inference form; returns self."""
        for module in self.modules():
            if isinstance(module, RepUXBlock):
                module.reparameterize()
        self.deploy = True
        return self
