"""Channels-first layers and the inference helpers that avoid full-size temporaries."""

import pytest
import torch
from torch import nn

import factorizer_cli as ft
from factorizer_cli.nn import layers


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many chunks and window slabs (and ragged last ones) on small test tensors."""
    from factorizer_cli.nn import blocks

    monkeypatch.setattr(layers, "_CHUNK_ELEMENTS", 4096)
    monkeypatch.setattr(blocks, "_SLAB_ELEMENTS", 3000)


def _upstream_style_layer_norm(norm: ft.LayerNorm, x):
    out = torch.einsum("b c ... -> b ... c", x)
    return torch.einsum("b ... c -> b c ...", norm.norm(out))


def test_layer_norm_normalizes_channels_at_each_voxel():
    torch.manual_seed(0)
    norm = ft.LayerNorm(6)
    nn.init.normal_(norm.norm.weight), nn.init.normal_(norm.norm.bias)
    x = torch.randn(2, 6, 5, 4, 3)
    torch.testing.assert_close(norm(x), _upstream_style_layer_norm(norm, x))


def test_linear_mixes_channels_like_a_1x1_convolution():
    torch.manual_seed(0)
    linear = ft.Linear(6, 4)
    x = torch.randn(2, 6, 5, 4, 3)
    expected = nn.functional.conv3d(x, linear.linear.weight[..., None, None], linear.linear.bias)
    torch.testing.assert_close(linear(x), expected)


def test_linear_over_several_inputs_equals_linear_over_their_concatenation():
    torch.manual_seed(0)
    linear = ft.Linear(10, 4, bias=False)
    a, b = torch.randn(2, 6, 4, 4, 4), torch.randn(2, 4, 4, 4, 4)
    torch.testing.assert_close(linear(a, b), linear(torch.cat([a, b], 1)))
    with pytest.raises(ValueError, match="expects 10 input channels, got 6"):
        linear(a)


# Channels last: CPU inference's layout (voxel rows, chunks over both samples' voxels).
FORMATS = [torch.contiguous_format, torch.channels_last_3d]


@pytest.mark.parametrize("memory_format", FORMATS)
def test_linear_in_either_layout_keeps_it(memory_format):
    torch.manual_seed(0)
    linear = ft.Linear(10, 4)
    a, b = (torch.randn(2, c, 5, 4, 3).contiguous(memory_format=memory_format) for c in (6, 4))
    expected = nn.functional.conv3d(torch.cat([a, b], 1), linear.linear.weight[..., None, None],
                                    linear.linear.bias)
    out = linear(a, b)
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("bias", [True, False])
def test_norm_linear_equals_linear_of_norm(small_chunks, bias, memory_format):
    torch.manual_seed(0)
    norm, linear = ft.LayerNorm(8), ft.Linear(8, 5, bias=bias)
    x = torch.randn(2, 8, 13, 12, 11)  # 1716 voxels: chunks of 1024 and a ragged 692
    expected = linear(norm(x))
    out = layers.norm_linear(x.contiguous(memory_format=memory_format), norm, linear)
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("memory_format", FORMATS)
def test_mlp_residual_in_place_equals_the_residual_sum(small_chunks, memory_format):
    torch.manual_seed(0)
    norm, mlp = ft.LayerNorm(8), ft.MLP(8, ratio=3)
    x = torch.randn(2, 8, 13, 12, 11).contiguous(memory_format=memory_format)
    expected = x + mlp(norm(x))
    out = layers.mlp_residual_(x, norm, mlp)
    assert out is x
    torch.testing.assert_close(out, expected)


def test_positional_embedding_is_a_learned_additive_map():
    emb = ft.PositionalEmbedding(4, (3, 5, 2))
    assert emb.pos.shape == (1, 4, 3, 5, 2) and emb.pos.requires_grad
    x = torch.zeros(2, 4, 3, 5, 2)
    torch.testing.assert_close(emb(x), emb.pos.expand(2, -1, -1, -1, -1))


def test_block_inference_path_equals_autograd_path(small_chunks):
    torch.manual_seed(0)
    block = ft.FactorizerBlock(
        channels=16, spatial_size=(8, 8, 8),
        nmf=(ft.FactorizerSubblock, {"tensorize": (ft.SWMatricize, {"head_dim": 8, "patch_size": 4}),
                                      "rank": 1, "solver": "hals"}),
        mlp=(ft.MLP, {"ratio": 2}),
    ).eval()
    x = torch.rand(2, 16, 8, 8, 8)
    reference = block(x).detach()
    before = x.clone()
    with torch.inference_mode():
        fast = block(x)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(x, before), "inference must not modify the block's input"
