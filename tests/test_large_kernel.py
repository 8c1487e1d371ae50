"""The inference form of the large-kernel CNNs computes the same function as the textbook modules.

``LargeKernelDepthwise`` (trimmed kernels, the FFT path), BatchNorm folding, and the in-place,
channels-last pieces of ``nn.uxnet_inference``, each against the plain PyTorch operation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from factorizer_cli.nn.large_kernel import (
    LargeKernelDepthwise,
    fft_pays,
    fold_batch_norm,
    trimmed_kernel,
)
from factorizer_cli.nn.uxnet_inference import (
    CHANNELS_LAST,
    _add_normalized_pointwise_,
    _conv,
    _conv_over_input,
    _instance_norm_,
    _moments,
    _pointwise_over_input,
)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _direct(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.conv3d(x, weight, bias, padding=[k // 2 for k in weight.shape[2:]], groups=weight.shape[0])


def test_zero_shells_are_trimmed_and_the_conv_is_unchanged():
    weight = torch.zeros(3, 1, 21, 21, 21)
    weight[..., 10, 10, 10] = torch.tensor([1.0, -2.0, 0.5]).reshape(3, 1)
    assert trimmed_kernel(weight).shape[2:] == (1, 1, 1)  # an upstream-trained kernel: its centre
    weight[0, 0, 8, 10, 12] = 0.3  # reaches two taps out along the first and third axes
    assert trimmed_kernel(weight).shape[2:] == (5, 1, 5)
    x = torch.randn(1, 3, 12, 14, 16, generator=_generator())
    assert torch.allclose(LargeKernelDepthwise(weight, None)(x), _direct(x, weight, None), atol=1e-6)


@pytest.mark.parametrize("spatial", [(24, 24, 24), (26, 30, 22), (6, 6, 6), (12, 30, 5)])
def test_large_kernels_agree_with_the_direct_conv_at_every_map_size(spatial):
    g = _generator(1)
    weight, bias = torch.randn(4, 1, 21, 21, 21, generator=g) * 0.01, torch.randn(4, generator=g)
    x = torch.randn(2, 4, *spatial, generator=g)
    layer = LargeKernelDepthwise(weight, bias)
    expected = _direct(x, weight, bias)
    got = layer(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    # channels-last in, channels-last out (the FFT path writes into the input's layout)
    cl = layer(x.contiguous(memory_format=CHANNELS_LAST))
    assert cl.is_contiguous(memory_format=CHANNELS_LAST)
    torch.testing.assert_close(cl, got, rtol=1e-5, atol=1e-6)


def test_the_fft_is_taken_only_where_it_pays_and_bf16_comes_back_as_bf16():
    assert fft_pays((48, 48, 48), (21, 21, 21)) and fft_pays((24, 24, 24), (21, 21, 21))
    assert not fft_pays((12, 12, 12), (21, 21, 21)) and not fft_pays((48, 48, 48), (7, 7, 7))
    layer = LargeKernelDepthwise(torch.randn(2, 1, 11, 11, 11) * 0.05, torch.zeros(2))
    x = torch.randn(1, 2, 16, 16, 16, generator=_generator(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=3e-2, atol=3e-2)


def test_a_folded_batch_norm_is_the_conv_then_the_norm():
    g = _generator(3)
    conv = nn.Conv3d(5, 5, 3, padding=1, groups=5)
    norm = nn.BatchNorm3d(5).eval()
    with torch.no_grad():
        norm.running_mean.normal_(generator=g)
        norm.running_var.uniform_(0.3, 3.0, generator=g)
        norm.weight.normal_(generator=g)
        norm.bias.normal_(generator=g)
    x = torch.randn(1, 5, 9, 9, 9, generator=g)
    with torch.no_grad():
        expected = norm(conv(x))
        weight, bias = fold_batch_norm(conv.weight, conv.bias, norm)
        torch.testing.assert_close(_direct(x, weight, bias), expected, rtol=1e-5, atol=1e-5)


def test_in_place_instance_norm_matches_pytorch_even_far_from_zero():
    g = _generator(4)
    # a channel whose mean is 100x its spread: the statistics must not cancel catastrophically
    y = (torch.randn(1, 6, 20, 21, 22, generator=g) + 100 * torch.arange(6.0).reshape(1, 6, 1, 1, 1))
    expected = F.instance_norm(y, eps=1e-5)
    cl = y.contiguous(memory_format=CHANNELS_LAST)
    assert _instance_norm_(cl) is cl
    torch.testing.assert_close(cl, expected, rtol=1e-4, atol=1e-4)
    plain = y.clone()  # not channels-last: the textbook path, still in place
    assert _instance_norm_(plain) is plain
    torch.testing.assert_close(plain, expected)


def test_moments_cover_the_rows_beyond_the_last_chunk():
    values = torch.randn(8192 * 3 + 17, 5, generator=_generator(5), dtype=torch.float64) * 3 + 50
    mean, variance = _moments(values.float())
    torch.testing.assert_close(mean.double(), values.mean(0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(variance.double(), values.var(0, correction=0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("depth, slab", [(20, 8), (16, 8), (8, 8), (9, 4), (3, 8), (1, 8), (5, 1)])
def test_a_conv_over_its_own_input_is_the_conv(depth, slab):
    """Slabs written back one slab late: every slab reads its neighbours' inputs, never their outputs."""
    g = _generator(7)
    conv = nn.Conv3d(6, 6, 3, padding=1)
    x = torch.randn(1, 6, depth, 7, 5, generator=g).contiguous(memory_format=CHANNELS_LAST)
    with torch.no_grad():
        expected = conv(x)
        y = _conv_over_input(conv, x, slab)
    assert y is x and y.is_contiguous(memory_format=CHANNELS_LAST)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


def test_moments_stay_float32_under_autocast():
    """Under autocast a BLAS sum would run in half precision (squares overflow fp16, bf16 keeps 3 digits)."""
    values = torch.randn(8192 * 2 + 5, 4, generator=_generator(10), dtype=torch.float64) * 40 + 300
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mean, variance = _moments(values.float())
    assert mean.dtype == variance.dtype == torch.float32
    torch.testing.assert_close(mean.double(), values.mean(0), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(variance.double(), values.var(0, correction=0), rtol=1e-4, atol=1e-3)


def test_a_pointwise_conv_over_its_own_input_is_the_conv():
    g = _generator(8)
    weight, bias = torch.randn(6, 6, 1, 1, 1, generator=g), torch.randn(6, generator=g)
    x = torch.randn(1, 6, 9, 10, 11, generator=g).contiguous(memory_format=CHANNELS_LAST)
    expected = F.conv3d(x, weight, bias)
    y = _pointwise_over_input(weight, bias, x, rows=64)  # several blocks and a short last one
    assert y is x
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_a_normalized_one_channel_residual_needs_no_conv_output():
    g = _generator(9)
    conv = nn.Conv3d(1, 8, 1)
    x = torch.randn(1, 1, 9, 10, 11, generator=g) * 4 + 30
    y = torch.randn(1, 8, 9, 10, 11, generator=g).contiguous(memory_format=CHANNELS_LAST)
    with torch.no_grad():
        expected = y + F.instance_norm(conv(x), eps=1e-5)
        _add_normalized_pointwise_(y, conv, x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_convs_from_one_channel_stay_channels_last(kernel):
    g = _generator(6)
    conv = nn.Conv3d(1, 8, kernel, padding=kernel // 2)
    x = torch.randn(1, 1, 10, 11, 13, generator=g)
    with torch.no_grad():
        y = _conv(conv, x)
        torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=CHANNELS_LAST)


@pytest.mark.parametrize("network", ["UXNET", "REPUXNET"])
def test_the_inference_form_computes_the_network_without_fixtures(network):
    """The whole prepared network (slabbed convs over their inputs, the skip used up, the one-channel
    residual as a broadcast) against the training-form forward; 48³: the 12³ stage's 12 slices are one
    full slab of 8 and a short one. Runs where ../shared is absent too."""
    from factorizer_cli.families import build, family_of

    config = {"class": network, "in_chans": 1, "out_chans": 3, "depths": [1, 1, 1, 1], "feat_size": [8, 8, 8, 8],
              "hidden_size": 8, **({"ks": 7, "a": 1, "deploy": True} if network == "REPUXNET" else {})}
    model = build(config).eval()
    x = torch.rand(1, 1, 48, 48, 48, generator=_generator(11)) * 50 + 10
    with torch.no_grad():
        for name, tensor in model.state_dict().items():  # no norm may be an identity
            if "norm" in name and name.endswith(("running_mean", "bias")):
                tensor.normal_(0, 0.1, generator=_generator(12))
        expected = model(x)
        got = family_of(model).prepare(model)(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
