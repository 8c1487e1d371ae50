"""Matricize and SWMatricize: shapes, window contents and exact inverses."""

import pytest
import torch
from einops import rearrange

import factorizer_cli as ft
from factorizer_cli.errors import ConfigError


def test_seed_readme_shapes():
    sw = ft.SWMatricize((None, 32, 16, 16, 16), head_dim=8, patch_size=8)
    y = sw(torch.rand(1, 32, 16, 16, 16))
    # 2 shifts × 4 heads, 2³ windows, 8 channels per head, 8³ voxels per window
    assert y.shape == (8, 8, 8, 512)
    assert sw.output_size == (None, 8, 8, 512)


def test_window_holds_the_heads_channels_over_its_voxels():
    x = torch.arange(2 * 4 * 6 * 4, dtype=torch.float32).view(1, 2 * 4, 6, 4)  # 2D, 8 channels
    mat = ft.Matricize((None, 8, 6, 4), head_dim=4, patch_size=(3, 2))
    y = mat(x)  # (b h) (g0 g1) d (p0 p1)
    assert y.shape == (2, 4, 4, 6)
    head, window = 1, 3  # window (g0=1, g1=1): rows 3..5, columns 2..3
    expected = x[0, 4:8, 3:6, 2:4].reshape(4, 6)
    assert torch.equal(y[head, window], expected)


@pytest.mark.parametrize("shifts", [None, 1, (1, 2, 3), (4, 0, 7), (9, -3, 13), (-1, -5, 2)])
def test_matches_roll_then_rearrange(shifts):
    x = torch.randn(2, 12, 8, 12, 16)
    mat = ft.Matricize((None, 12, 8, 12, 16), head_dim=4, patch_size=(4, 6, 8), shifts=shifts)
    rolled = x if shifts is None else torch.roll(x, mat.shifts, (2, 3, 4))
    expected = rearrange(rolled, "b (h d) (g0 p0) (g1 p1) (g2 p2) -> (b h) (g0 g1 g2) d (p0 p1 p2)",
                         d=4, p0=4, p1=6, p2=8)
    assert torch.equal(mat(x), expected)
    acc = torch.ones_like(x)
    assert torch.equal(mat.fold_add_(acc, expected), x + 1)


def test_gradient_flows_through_the_block_copies():
    x = torch.randn(1, 8, 8, 8, requires_grad=True)
    sw = ft.SWMatricize((None, 8, 8, 8), head_dim=4, patch_size=4, shifts=[None, 1, (2, 3)])
    weights = torch.randn(sw(x).shape)
    (sw(x) * weights).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    reference = torch.cat([
        rearrange(torch.roll(x_ref, s, (2, 3)), "b (h d) (g0 p0) (g1 p1) -> (b h) (g0 g1) d (p0 p1)", d=4, p0=4, p1=4)
        for s in [(0, 0), (1, 1), (2, 3)]
    ])
    (reference * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_shift_rolls_before_partitioning():
    x = torch.rand(1, 4, 8, 8)
    shifted = ft.Matricize((None, 4, 8, 8), num_heads=1, patch_size=4, shifts=(1, 2))
    plain = ft.Matricize((None, 4, 8, 8), num_heads=1, patch_size=4)
    assert torch.equal(shifted(x), plain(torch.roll(x, (1, 2), (2, 3))))


@pytest.mark.parametrize(
    "shifts",
    [None, [None], [None, 1], [None, 1, 2], [None, 1, 2, 3], [(1, 2, 3), None, 5], [0, 1, 2, 3, 4, 5, 6]],
)
def test_inverse_is_exact_for_every_shift(shifts):
    sw = ft.SWMatricize((None, 16, 8, 12, 8), head_dim=4, patch_size=(4, 6, 4), shifts=shifts)
    x = torch.randn(2, 16, 8, 12, 8) * 100
    assert torch.equal(sw.inverse_forward(sw(x)), x)
    for window in sw.shifted_windows:
        assert torch.equal(window.inverse_forward(window(x)), x)


def test_grid_size_instead_of_patch_size():
    mat = ft.Matricize((None, 8, 8, 8, 8), num_heads=2, grid_size=2)
    assert mat.output_size == (None, 8, 4, 64)


def test_sizes_that_do_not_divide_are_refused_with_the_numbers():
    with pytest.raises(ConfigError, match=r"spatial size \(10, 8, 8\) cannot be cut into windows of \(4, 4, 4\): 10 on axis 0"):
        ft.Matricize((None, 8, 10, 8, 8), head_dim=4, patch_size=4)
    with pytest.raises(ConfigError, match="12 channels cannot be split into heads of 8"):
        ft.Matricize((None, 12, 8, 8, 8), head_dim=8, patch_size=4)


@pytest.mark.parametrize("shifts", [None, (1, 2, 3), (5, 0, 9)])
def test_windows_a_slab_at_a_time_match_the_whole(shifts):
    x = torch.randn(2, 8, 12, 8, 16)
    mat = ft.Matricize((None, 8, 12, 8, 16), head_dim=4, patch_size=(4, 4, 8), shifts=shifts)
    whole = mat(x)  # (b h), (3 * 2 * 2) windows, 4, 128
    per_row = 2 * 2
    acc = torch.zeros_like(x)
    for start, stop in [(0, 1), (1, 3)]:
        part = mat(x, rows=(start, stop))
        assert torch.equal(part, whole[:, start * per_row : stop * per_row])
        mat.fold_add_(acc, part, rows=(start, stop))
    assert torch.equal(acc, x)
