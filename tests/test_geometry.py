"""Geometry helpers: reorientation and resampling round trips, one channel or many."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from factorizer_cli.io import geometry


def _oblique_lps() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.array([[0, 0, -2.0], [0.9, 0.1, 0], [-0.1, 0.9, 0]])
    affine[:3, 3] = [10, -20, 30]
    return affine


def test_canonical_round_trip_keeps_world_coordinates():
    rng = np.random.default_rng(0)
    affine = _oblique_lps()
    array = rng.random((2, 5, 6, 7)).astype(np.float32)
    canonical, canonical_affine, back = geometry.to_canonical(array, affine)
    assert canonical.shape == (2, 7, 5, 6)
    for index in [(0, 0, 0), (1, 2, 3), (4, 5, 6)]:
        world = affine @ [*index, 1]
        mapped = np.linalg.solve(canonical_affine, world)[:3].round().astype(int)
        assert canonical[(1, *mapped)] == array[(1, *index)]
    np.testing.assert_array_equal(geometry.from_canonical(canonical, back), array)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("shape", [(15, 8, 9), (5, 24, 4), (10, 12, 9)])
def test_resample_linear_equals_trilinear_with_corners_aligned(channels, shape):
    x = np.random.default_rng(1).random((channels, 10, 12, 9)).astype(np.float32)
    y = geometry.resample_linear(x, shape)
    expected = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=shape, mode="trilinear",
                                               align_corners=False)[0].numpy()
    assert y.shape == (channels, *shape)
    np.testing.assert_allclose(y, expected, atol=1e-6)


def test_resample_to_grid_follows_world_coordinates():
    v = np.random.default_rng(2).random((6, 7, 8)).astype(np.float32)
    affine = _oblique_lps()
    np.testing.assert_allclose(geometry.resample_to_grid(v, affine, v.shape, affine), v, atol=1e-6)
    flip_i = np.array([[-1, 0, 0, 5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    flipped = geometry.resample_to_grid(v, affine, v.shape, affine @ flip_i)
    np.testing.assert_allclose(flipped, v[::-1], atol=1e-6)


def test_sitk_conversion_round_trip():
    affine = _oblique_lps()
    image = geometry.to_sitk(np.zeros((4, 5, 6), np.float32), affine)
    assert image.GetSize() == (4, 5, 6)
    np.testing.assert_allclose(geometry.ras_affine_of(image), affine, atol=1e-9)
    assert isinstance(image, sitk.Image)
