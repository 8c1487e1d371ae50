"""The half-window-block formulation of a Swin Factorizer subblock (nn.swin_gram) against the windowed one."""

from __future__ import annotations

import pytest
import torch

import factorizer_cli as ft
from factorizer_cli.nn import swin_gram
from factorizer_cli.nn.blocks import FactorizerSubblock
from factorizer_cli.nn.layers import LayerNorm


def subblock(channels: int, spatial: tuple[int, int, int], patch, shifts=None, **nmf) -> FactorizerSubblock:
    torch.manual_seed(0)
    tensorize = (ft.SWMatricize, {"head_dim": 4, "patch_size": patch, **({"shifts": shifts} if shifts else {})})
    sub = FactorizerSubblock(channels, channels, spatial, tensorize=tensorize, rank=1, num_iters=4,
                             **nmf).eval()
    with torch.no_grad():  # biases and norm affines away from their defaults, so that each one counts
        sub.out_proj.linear.bias.normal_()
    return sub


def norm(channels: int) -> LayerNorm:
    layer = LayerNorm(channels).eval()
    with torch.no_grad():
        layer.norm.weight.normal_()
        layer.norm.bias.normal_()
    return layer


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("spatial, patch", [((8, 16, 24), (4, 8, 4)), ((4, 4, 8), (2, 2, 2)), ((12, 4, 8), (4, 2, 2))])
def test_blocks_equal_the_windowed_subblock(spatial, patch, memory_format):
    """Non-cubic maps and windows, 2-6 windows per axis (3: an odd count, the shifted ones wrap), batch 2."""
    channels = 12
    sub, layer = subblock(channels, spatial, patch), norm(channels)
    x = torch.randn(2, channels, *spatial, generator=torch.Generator().manual_seed(1))
    x[:, :, : patch[0]] = -5.0  # ReLU(in_proj(LayerNorm(x))) is not zero here: LayerNorm centres it
    x = x.contiguous(memory_format=memory_format)
    with torch.no_grad():
        assert swin_gram.applies(x, layer, sub)
        expected = sub(x, norm=layer) + x
        got = swin_gram.swin_gram_residual(x, layer, sub)
    assert got.shape == x.shape and got.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def test_zero_windows_take_their_factors_from_eps():
    """An all-zero input to the NMF (every voxel's ReLU is 0): ε alone makes the reconstruction."""
    channels, spatial = 8, (8, 8, 8)
    sub, layer = subblock(channels, spatial, 4, eps=1e-2), norm(channels)
    with torch.no_grad():
        sub.in_proj.linear.weight.zero_()
        x = torch.randn(1, channels, *spatial)
        expected = sub(x, norm=layer) + x
        got = swin_gram.swin_gram_residual(x, layer, sub)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("patch, shifts, why", [
    ((3, 4, 4), None, "odd window: no half-window blocks"),
    (4, [None, 1], "a shift other than half a window"),
    (4, [None, 2, 1], "three partitions"),
])
def test_other_partitions_keep_the_windowed_path(patch, shifts, why):
    sub, layer = subblock(8, (12, 8, 8), patch, shifts), norm(8)
    assert not swin_gram.applies(torch.zeros(1, 8, 12, 8, 8), layer, sub), why


def test_other_solvers_and_autocast_keep_the_windowed_path():
    layer, x = norm(8), torch.zeros(1, 8, 8, 8, 8)
    assert not swin_gram.applies(x, layer, subblock(8, (8, 8, 8), 4, solver="mu"))
    sub = subblock(8, (8, 8, 8), 4)
    assert swin_gram.applies(x, layer, sub)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not swin_gram.applies(x, layer, sub)
