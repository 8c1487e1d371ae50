"""Depthwise 3D convolution with a large kernel, computed directly or through the FFT, whichever pays.

A 21³ depthwise kernel costs 9,261 multiply-adds per voxel and channel done directly; through the FFT
the cost hardly depends on the kernel size. Which wins depends on the map: measured on a 2-core AVX-512
CPU (``benchmarks/repuxnet.py --layers``), a 21³ kernel over 48³ and 24³ maps is 3-4x faster through
the FFT, over 12³ and 6³ maps (where the kernel is larger than the map and mostly falls on padding)
slower. ``fft_pays`` holds that rule. Both paths give the same function (the FFT to float32 rounding,
about 1e-6 relative), so the choice is one of speed only and is made from shapes, never from timings,
so that a case always gives the same output.

Two exact reductions come first, whatever the path: taps farther from the centre than the map is
wide never meet a voxel (a 21³ kernel over a 6³ map uses only its central 11³), and all-zero borders
of a kernel (an upstream RepUX-Net trained for long enough keeps only its centre tap) are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LargeKernelDepthwise", "exporting", "fft_pays", "trimmed_kernel", "fold_batch_norm"]

_SPATIAL = (-3, -2, -1)


def exporting() -> bool:
    """Whether the module is being traced for ONNX (or TorchScript): then only standard operators."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def fold_batch_norm(weight: Tensor, bias: Tensor | None, norm: nn.BatchNorm3d) -> tuple[Tensor, Tensor]:
    """The kernel and bias of ``norm(conv(x))`` as one conv, with the norm's running statistics (eval)."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps) if norm.affine else \
        1 / torch.sqrt(norm.running_var + norm.eps)
    shift = (norm.bias if norm.affine else 0) - norm.running_mean * scale
    bias = shift if bias is None else bias * scale + shift
    return weight * scale.reshape(-1, *(1,) * (weight.dim() - 1)), bias


def trimmed_kernel(weight: Tensor) -> Tensor:
    """``weight`` without the all-zero shells around its centre (the same conv with 'same' padding)."""
    radius = [k // 2 for k in weight.shape[-3:]]
    for axis in range(3):
        while radius[axis] > 0:
            r = radius[axis]
            dim = weight.dim() - 3 + axis
            centre = weight.shape[dim] // 2
            edges = weight.narrow(dim, centre - r, 1), weight.narrow(dim, centre + r, 1)
            if any(bool(e.any()) for e in edges):
                break
            radius[axis] -= 1
    return _centre_crop(weight, radius)


def _centre_crop(weight: Tensor, radius: Sequence[int]) -> Tensor:
    """The central ``2r + 1`` taps per axis (one slicing, so that an exported graph has one Slice)."""
    centre = [k // 2 for k in weight.shape[-3:]]
    return weight[..., centre[0] - radius[0]:centre[0] + radius[0] + 1,
                  centre[1] - radius[1]:centre[1] + radius[1] + 1,
                  centre[2] - radius[2]:centre[2] + radius[2] + 1]


def fft_pays(spatial: Sequence[int], kernel: Sequence[int]) -> bool:
    """Whether the FFT beats the direct depthwise conv: a kernel of at least 11 that fits inside the map.

    Measured (``benchmarks/repuxnet.py --layers``): 21³ over 48³ and 24³ maps 3-4x faster by FFT,
    over 12³ and 6³ slower; kernels up to 7³ stay direct at every map size.
    """
    return min(kernel) >= 11 and all(n >= k for n, k in zip(spatial, kernel, strict=True))


def _fft_size(n: int) -> int:
    """The smallest 2^a·3^b·5^c at least ``n``: sizes pocketfft transforms fastest."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


class LargeKernelDepthwise(nn.Module):
    """Inference-only depthwise conv ('same' padding, stride 1) over ``B × C × D × H × W`` maps.

    Holds the kernel as a buffer (it is derived, never trained: the trainable module is upstream's
    ``Conv3d``); caches the kernel's spectrum for the last FFT size, device and dtype (windows
    share one size). ONNX export and tracing take the direct path, which has a standard operator.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        if weight.dim() != 5 or weight.shape[1] != 1 or any(k % 2 == 0 for k in weight.shape[-3:]):
            raise ValueError(f"expected a depthwise kernel C × 1 × odd³, got {tuple(weight.shape)}")
        self.register_buffer("weight", trimmed_kernel(weight.detach()).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.weight: Tensor
        self.bias: Tensor | None
        self._spectra: dict[tuple, Tensor] = {}

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, kernel_size={tuple(self.weight.shape[-3:])}"

    def _apply(self, fn, recurse: bool = True):  # a move or cast invalidates cached spectra
        self._spectra = {}
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        if exporting():  # a plain Conv on the kernel as it is
            return self._direct(x, self.weight, [k // 2 for k in self.weight.shape[-3:]])
        spatial = x.shape[-3:]
        # Taps beyond ±(n - 1) of the centre only ever meet padding.
        reach = [min(k // 2, n - 1) for k, n in zip(self.weight.shape[-3:], spatial, strict=True)]
        weight = _centre_crop(self.weight, reach)
        if fft_pays(spatial, weight.shape[-3:]):
            return self._fft(x, weight)
        return self._direct(x, weight, reach)

    def _direct(self, x: Tensor, weight: Tensor, padding: Sequence[int]) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv3d(x, weight.to(x.dtype), bias, padding=tuple(padding), groups=weight.shape[0])

    def _fft(self, x: Tensor, weight: Tensor) -> Tensor:
        # FFT needs float32 at least (no bf16/fp16 FFT on CPU); the result goes back to x's dtype.
        dtype = torch.promote_types(x.dtype, torch.float32)
        spatial = x.shape[-3:]
        half = [k // 2 for k in weight.shape[-3:]]
        # Circular convolution of period n + k//2 wraps nothing into the part that is kept.
        size = tuple(_fft_size(n + h) for n, h in zip(spatial, half, strict=True))
        key = (size, tuple(weight.shape), x.device, dtype)
        spectrum = self._spectra.get(key)
        if spectrum is None:
            # conv3d is a correlation: the flipped kernel turns it into the convolution the FFT does.
            spectrum = torch.fft.rfftn(weight[:, 0].flip(_SPATIAL).to(dtype), s=size, dim=_SPATIAL)
            self._spectra = {key: spectrum}  # one window size at a time: keep one
        product = torch.fft.rfftn(x.to(dtype), s=size, dim=_SPATIAL)
        product.mul_(spectrum)
        y = torch.fft.irfftn(product, s=size, dim=_SPATIAL)
        y = y[..., half[0]:half[0] + spatial[0], half[1]:half[1] + spatial[1], half[2]:half[2] + spatial[2]]
        out = torch.empty_like(x)  # the input's memory format (channels-last stays so) and dtype
        if self.bias is None:
            return out.copy_(y)
        return torch.add(y, self.bias.to(dtype).reshape(-1, 1, 1, 1), out=out)
