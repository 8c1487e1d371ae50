"""Preprocessing as card data: each step's record applies and inverts, in every orientation.

Labels go through the same ``apply`` as the images (training replays the steps this way) and come back
with ``invert`` onto the input grid: exactly for reorientation and crop, within interpolation error for
resampling. The card's ``preprocessing`` block and the first cards' top-level fields mean the same.
"""

from pathlib import Path

import numpy as np
import pytest

from factorizer_cli.errors import ConfigError
from factorizer_cli.io.images import Image
from factorizer_cli.pipeline.preprocess import (
    Crop,
    Reorientation,
    Resampling,
    foreground_box,
    normalize,
    preprocess,
    stack_slices,
)
from factorizer_cli.zoo.card import ModelCard, Normalization, Preprocessing

from .oracle import BRATS_INPUTS, oblique, oracle_card, phantom, reorient

ORIENTATIONS = ["RAS", "LPS", "LAS", "PIR", "SLA", "ILP"]


def _case(codes: str, angle: float, spacing=(1.0, 1.0, 1.0)):
    """The phantom stored along ``codes``: images, one-hot labels (4 channels: 0..3), affine."""
    images, labels = phantom()
    base = oblique(angle, spacing)
    data = np.stack([reorient(v, base, codes)[0] for v in images])
    stored_labels, affine = reorient(labels, base, codes)
    onehot = np.stack([stored_labels == v for v in range(4)]).astype(np.float32)
    return data, onehot, affine


def _images(data: np.ndarray, affine: np.ndarray) -> list[Image]:
    return [Image(v, affine, None, Path(f"c{i}.nii.gz")) for i, v in enumerate(data)]


@pytest.mark.parametrize("codes", ORIENTATIONS)
@pytest.mark.parametrize("angle", [0.0, 17.0])
def test_reorientation_and_crop_round_trip_exactly(codes, angle):
    data, onehot, affine = _case(codes, angle)
    step, after = Reorientation.fit(affine, data.shape[1:])
    canonical = step.apply(onehot)
    assert np.allclose(np.linalg.norm(after[:3, :3], axis=0), 1.0)
    assert (np.argmax(np.abs(after[:3, :3]), axis=0) == [0, 1, 2]).all()  # axes now closest to R, A, S
    np.testing.assert_array_equal(step.invert(canonical), onehot)

    crop = Crop(foreground_box(step.apply(data), [2, 2, 2]), canonical.shape[1:])
    cropped = crop.apply(canonical)
    assert cropped.shape[1:] != canonical.shape[1:]
    restored = step.invert(crop.invert(cropped))
    np.testing.assert_array_equal(restored[1:], onehot[1:])  # every lesion label, and its grid, exactly


@pytest.mark.parametrize("codes", ORIENTATIONS)
@pytest.mark.parametrize("angle", [0.0, 17.0])
def test_whole_inverse_applies_to_labels_and_inverts_onto_the_input_grid(codes, angle):
    data, onehot, affine = _case(codes, angle)
    steps = Preprocessing(spacing=(1.5, 1.5, 2.0), crop_margin_mm=3.0)
    prepared = preprocess(_images(data, affine), steps)
    assert [type(s) for s in prepared.inverse.steps] == [Reorientation, Crop, Resampling]

    on_network_grid = prepared.inverse.apply(onehot)
    assert on_network_grid.shape[1:] == prepared.array.shape[1:]
    back = prepared.inverse.invert(on_network_grid)
    assert back.shape == onehot.shape
    labels, restored = onehot.argmax(0), back.argmax(0)
    for value in (1, 2, 3):  # within interpolation error: a voxel's worth at the borders
        truth, found = labels == value, restored == value
        assert 2 * (truth & found).sum() / (truth.sum() + found.sum()) > 0.85, value
    assert (labels == restored).mean() > 0.99


@pytest.mark.parametrize("codes", ["LPS", "PIR"])
def test_resampling_round_trip_images_within_interpolation_error(codes):
    data, _, affine = _case(codes, 0.0)
    smooth = np.stack([np.fromfunction(lambda i, j, k: np.sin(i / 7) + np.cos(j / 9) + k / 20, d.shape)
                       for d in data]).astype(np.float32)
    step = Resampling(smooth.shape[1:], tuple(n // 2 + 3 for n in smooth.shape[1:]))
    small = step.apply(smooth)
    assert small.shape[1:] == step.target
    back = step.invert(small)
    assert back.shape == smooth.shape
    interior = (slice(None), *(slice(3, -3),) * 3)
    assert np.abs(back - smooth)[interior].max() < 0.02


def test_native_axes_are_kept_for_slice_wise_models():
    data, _, affine = _case("RAS", 0.0, spacing=(1.0, 1.0, 3.0))
    steps = Preprocessing(spacing=(2.0, 2.0, None), crop_margin_mm=None, slice_context=1)
    prepared = preprocess(_images(data, affine), steps)
    assert [type(s) for s in prepared.inverse.steps] == [Reorientation, Resampling]
    assert prepared.inverse.steps[1].target[2] == data.shape[3]  # the slices as they were
    assert prepared.array.shape[0] == 4 * 3  # each modality with one neighbour on either side


def test_slice_stacking_puts_neighbours_in_order_and_zero_beyond():
    volume = np.arange(2 * 2 * 2 * 4, dtype=np.float32).reshape(2, 2, 2, 4) + 1
    stacked = stack_slices(volume, 1)
    assert stacked.shape == (6, 2, 2, 4)
    np.testing.assert_array_equal(stacked[1], volume[0])  # channel 0, centre slice
    np.testing.assert_array_equal(stacked[0][..., 1:], volume[0][..., :-1])  # the slice below
    np.testing.assert_array_equal(stacked[2][..., :-1], volume[0][..., 1:])  # the slice above
    assert (stacked[0][..., 0] == 0).all() and (stacked[2][..., -1] == 0).all()
    np.testing.assert_array_equal(stacked[4], volume[1])
    assert np.moveaxis(stacked, -1, 0).flags["C_CONTIGUOUS"]  # slice by slice: a slice's stack is one block
    np.testing.assert_array_equal(stack_slices(volume, 0), volume)


def test_normalizations():
    rng = np.random.default_rng(0)
    x = np.zeros((2, 10, 10, 10), np.float32)
    x[:, 2:8, 2:8, 2:8] = rng.uniform(100, 300, (2, 6, 6, 6))
    z = normalize(x, Normalization())
    inside = x[0] != 0
    assert abs(z[0][inside].mean()) < 1e-5 and abs(z[0][inside].std() - 1) < 1e-4 and (z[0][~inside] == 0).all()
    fixed = normalize(x, Normalization("fixed", mean=30.2, std=35.2))
    np.testing.assert_allclose(fixed, (x - 30.2) / 35.2, rtol=1e-5, atol=1e-5)
    window = normalize(x, Normalization("window", low=150, high=250))
    np.testing.assert_allclose(window, np.clip((x - 150) / 100, 0, 1), atol=1e-6)
    pct = normalize(x, Normalization("percentile", low=1, high=99))
    lo, hi = np.percentile(x[1][x[1] != 0], [1, 99])
    np.testing.assert_allclose(pct[1], np.clip((x[1] - lo) / (hi - lo), 0, 1), atol=1e-5)
    assert pct.min() == 0 and pct.max() == 1


def test_old_cards_mean_the_default_steps_and_the_block_round_trips():
    old = oracle_card(spacing=(2.0, 2.0, 2.0))
    assert old.preprocessing == Preprocessing(spacing=(2.0, 2.0, 2.0), crop_margin_mm=2.0)
    again = ModelCard.from_dict(old.to_dict())
    assert again == old and "spacing" not in old.to_dict()
    block = {**old.to_dict(), "preprocessing": {
        "orientation": None, "spacing": [1.0, 1.0, None], "crop_foreground": None,
        "normalization": {"kind": "window", "low": -125, "high": 275}}}
    card = ModelCard.from_dict(block)
    assert card.preprocessing == Preprocessing((1.0, 1.0, None), None, None, Normalization("window", low=-125, high=275))
    assert ModelCard.from_dict(card.to_dict()) == card


@pytest.mark.parametrize("steps, message", [
    ({"spacing": [1, 1]}, "spacing needs 3"),
    ({"spacing": [1, 1, 1], "normalization": {"kind": "fixed", "mean": 3}}, "needs std"),
    ({"spacing": [1, 1, 1], "normalization": {"kind": "window", "low": 5, "high": 5}}, "low < high"),
    ({"spacing": [1, 1, 1], "normalization": {"kind": "minmax"}}, "normalization kind"),
    ({"spacing": [1, 1, 1], "normalization": {"kind": "fixed", "mean": 0, "std": 1, "gain": 2}}, "gain"),
    ({"spacing": [1, 1, 1], "orientation": "LPS"}, "orientation"),
    ({"spacing": [1, 1, 1], "slice_context": 2}, r"roi"),
])
def test_bad_preprocessing_blocks_are_refused_with_the_reason(steps, message):
    data = {"name": "bad", "inputs": BRATS_INPUTS, "roi": [16, 16, 16], "outputs": ["WT"],
            "labels": [{"region": "WT", "label": 1}], "architecture": {"class": "Conv3d"},
            "preprocessing": steps}
    with pytest.raises(ConfigError, match=message):
        ModelCard.from_dict(data)
