"""Affine registration to the MNI152 2009a template, as a preprocessing step that comes back.

The cases are the template itself, moved by a known rigid transform and resampled (by scipy, not by the
code under test) onto an oblique, flipped 1×1×3 mm grid: the transform the registration finds is
compared with the known one at the corners of the template's brain, and a map computed on the template
grid must land on the input's exact grid, at the brain of the input. Tests that need the template skip
with a message where nilearn (the optional extra ``atlas``) is absent.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest

from factorizer_cli.atlas import template as template_module
from factorizer_cli.atlas.registration import Registration, match_template_scale
from factorizer_cli.errors import ConfigError, InputError
from factorizer_cli.io.images import Image
from factorizer_cli.pipeline.preprocess import Reorientation, preprocess
from factorizer_cli.zoo.card import ModelCard, Normalization, Preprocessing

ndimage = pytest.importorskip("scipy.ndimage", reason="scipy (a dev dependency) makes the test cases")
MNI = "mni152-2009a"
ROTATIONS_DEG, SHIFT_MM = (12.0, -9.0, 15.0), (15.0, -20.0, 12.0)  # the acceptance case
TILT_DEG, FLIP = (20.0, -10.0, 25.0), (-1.0, 1.0, -1.0)  # its oblique grid, stored with two axes flipped


def _template() -> Image:
    try:
        return template_module.template(MNI)
    except ConfigError as exc:
        pytest.skip(f"the MNI152 template is not installed: {exc}")


def _rotation(angles_deg) -> np.ndarray:
    """4×4 rotation about x, then y, then z (RAS axes), by ``angles_deg``."""
    out = np.eye(4)
    for axis, angle in enumerate(np.deg2rad(angles_deg)):
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(4)
        r[i, i] = r[j, j] = np.cos(angle)
        r[i, j], r[j, i] = -np.sin(angle), np.sin(angle)
        out = r @ out
    return out


def _rigid(angles_deg, shift_mm) -> np.ndarray:
    """Template RAS mm → moved RAS mm: rotation about the origin, then a shift."""
    m = _rotation(angles_deg)
    m[:3, 3] = shift_mm
    return m


def _brain_corners() -> np.ndarray:
    """The 8 corners of the template brain's bounding box, RAS mm, as 4×8 homogeneous columns."""
    atlas, brain = _template(), template_module.brain_mask(MNI)
    hit = np.argwhere(brain)
    corners = np.array(np.meshgrid(*zip(hit.min(0), hit.max(0)), indexing="ij")).reshape(3, -1)
    return atlas.affine @ np.vstack([corners, np.ones(8)])


def _moved(truth: np.ndarray, spacing=(1.0, 1.0, 3.0), tilt=TILT_DEG, flip=FLIP, scale=1.0) -> Image:
    """The template seen through ``truth`` (its point p at truth·p), sampled on an oblique grid of
    ``spacing`` mm whose axes are rotated by ``tilt`` and flipped by ``flip``, covering the moved brain
    and 15 mm around it. Resampled by scipy, so the code under test makes none of its geometry."""
    atlas = _template()
    direction = _rotation(tilt)[:3, :3] @ np.diag(flip)
    hit = np.argwhere(template_module.brain_mask(MNI))
    box = np.array(np.meshgrid(*zip(hit.min(0) - 15, hit.max(0) + 15), indexing="ij")).reshape(3, -1)
    local = direction.T @ (truth @ atlas.affine @ np.vstack([box, np.ones(8)]))[:3]
    start = local.min(axis=1)
    shape = tuple(int(np.ceil(e / s)) + 1 for e, s in zip(local.max(axis=1) - start, spacing))
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = direction @ np.diag(spacing), direction @ start
    voxels = np.linalg.inv(atlas.affine) @ np.linalg.inv(truth) @ affine  # native voxel → template voxel
    array = ndimage.affine_transform(np.asarray(atlas.array), voxels[:3, :3], voxels[:3, 3],
                                     output_shape=shape, order=1)
    return Image((array * scale).astype(np.float32), affine, None, Path("moved_t1.nii.gz"))


def _known(image: Image, truth: np.ndarray) -> Registration:
    """The record the registration should find for ``image``: built from the known transform."""
    atlas = _template()
    return Registration(MNI, truth, image.affine, image.shape, atlas.affine, atlas.shape)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def moved_case():
    truth = _rigid(ROTATIONS_DEG, SHIFT_MM)
    return _moved(truth), truth


@pytest.fixture(scope="module")
def registered(moved_case):
    image, _ = moved_case
    start = time.perf_counter()
    step = Registration.fit(image, MNI)
    return step, time.perf_counter() - start


def test_a_moved_template_on_an_oblique_1x1x3_grid_registers_back_within_1_5_mm(moved_case, registered):
    image, truth = moved_case
    step, seconds = registered
    assert image.spacing == pytest.approx((1.0, 1.0, 3.0))
    corners = _brain_corners()
    errors = np.linalg.norm((step.matrix @ corners - truth @ corners)[:3], axis=0)
    print(f"brain-corner error {errors.mean():.2f} mm (max {errors.max():.2f}) in {seconds:.1f} s")
    assert errors.mean() < 1.5
    assert errors.max() < 3.0
    assert step.native_shape == image.shape and np.array_equal(step.native_affine, image.affine)


def test_the_largest_motion_of_the_acceptance_range_registers_back():
    """All three rotations at 15° and every shift at 20 mm, on another oblique grid."""
    truth = _rigid((15.0, -15.0, 15.0), (-20.0, 20.0, -20.0))
    image = _moved(truth, tilt=(-25.0, 15.0, -30.0), flip=(1.0, -1.0, 1.0))
    corners = _brain_corners()
    found = Registration.fit(image, MNI).matrix
    assert np.linalg.norm((found @ corners - truth @ corners)[:3], axis=0).mean() < 1.5


def _left(shape, affine, to_template=np.eye(4)) -> np.ndarray:
    """Voxels of a grid whose template point (``to_template`` of their RAS mm) lies left of x = 0 mm:
    the template is left-right symmetric, so only such a map can tell a flipped result."""
    ijk = np.indices(shape).reshape(3, -1)
    world = (to_template @ affine)[:3, :3] @ ijk + (to_template @ affine)[:3, 3:4]
    return (world[0] < 0).reshape(shape)


def test_apply_samples_the_native_image_where_the_transform_says(moved_case):
    """With the known transform: the moved case brought back is the template (up to the 3 mm slices'
    interpolation), and the left half of its brain lands on the template's left half."""
    image, truth = moved_case
    step, atlas = _known(image, truth), _template()
    back = step.apply(image.array[None])[0]
    brain = template_module.brain_mask(MNI)
    assert back.dtype == np.float32 and back.shape == atlas.shape
    assert np.corrcoef(back[brain], atlas.array[brain])[0, 1] > 0.95
    native_left = ((image.array > 0) & _left(image.shape, image.affine, np.linalg.inv(truth))).astype(np.uint8)
    landed = step.apply(native_left[None])[0]  # integer: nearest neighbour, dtype kept
    assert landed.dtype == np.uint8 and set(np.unique(landed)) <= {0, 1}
    assert _dice(landed > 0, brain & _left(atlas.shape, atlas.affine)) > 0.95


def test_invert_of_apply_returns_a_smooth_field_on_the_native_grid(moved_case):
    image, truth = moved_case
    step, atlas = _known(image, truth), _template()
    ijk = np.indices(image.shape).reshape(3, -1)
    world = image.affine[:3, :3] @ ijk + image.affine[:3, 3:4]
    field = (np.sin(world[0] / 20) + np.cos(world[1] / 25) + np.sin(world[2] / 30 + 1)).reshape(image.shape)
    back = step.invert(step.apply(field[None].astype(np.float32)), fill=-7.0)[0]
    assert back.shape == image.shape
    # Away from the borders of both grids (2 voxels), only interpolation error.
    template_voxel = np.linalg.inv(atlas.affine) @ np.linalg.inv(truth) @ image.affine
    t = template_voxel[:3, :3] @ ijk + template_voxel[:3, 3:4]
    inside = np.all((t >= 2) & (t <= np.array(atlas.shape)[:, None] - 3), axis=0).reshape(image.shape)
    inside &= np.all((ijk >= 2) & (ijk <= np.array(image.shape)[:, None] - 3), axis=0).reshape(image.shape)
    outside = np.any((t < -1) | (t > np.array(atlas.shape)[:, None]), axis=0).reshape(image.shape)
    assert inside.mean() > 0.5 and outside.any()
    assert np.abs(back - field)[inside].max() < 0.02
    assert np.all(back[outside] == -7.0)  # ``fill`` beyond the template grid


def test_label_maps_go_through_apply_as_training_gives_them(moved_case):
    """train/data.py gives one-hot float channels (linear, thresholded at 0.5); integer maps are
    resampled by nearest neighbour, or linearly when asked."""
    image, truth = moved_case
    step = _known(image, truth)
    labels = np.zeros(image.shape, np.int64)
    labels[image.array > 150] = 2
    labels[(image.array > 0) & (image.array <= 150)] = 1
    nearest = step.apply(labels[None])[0]
    assert nearest.dtype == np.int64 and set(np.unique(nearest)) <= {0, 1, 2}
    onehot = step.apply(np.stack([labels == v for v in range(3)]).astype(np.float32))
    assert onehot.dtype == np.float32
    agree = (np.argmax(onehot, axis=0) == nearest)[nearest > 0].mean()
    assert agree > 0.95
    linear = step.apply(labels[None], nearest=False)[0]
    assert linear.dtype == np.float32 and len(np.unique(linear)) > 3


def test_the_intensity_rule_brings_a_scaled_copy_to_the_templates_scale():
    atlas, brain = _template(), template_module.brain_mask(MNI)
    scaled = np.asarray(atlas.array)[None] * np.float32(0.37)
    out, factors = match_template_scale(np.concatenate([scaled, scaled * 4]), MNI)
    assert factors == pytest.approx([1 / 0.37, 1 / 1.48], rel=1e-5)
    np.testing.assert_allclose(out[0], atlas.array, atol=1e-3)
    np.testing.assert_allclose(out[1], atlas.array, atol=1e-3)
    assert float(np.median(out[0][brain])) == pytest.approx(178.0, abs=1e-3)
    assert np.all(out[:, ~brain] == 0)  # zero stays zero
    with pytest.raises(InputError, match="no positive signal"):
        match_template_scale(np.zeros((1, *atlas.shape), np.float32), MNI)


def test_registered_card_round_trips_and_refuses_unknown_templates():
    steps = Preprocessing(spacing=(1.0, 1.0, 1.0), orientation="RAS", crop_margin_mm=None,
                          normalization=Normalization("fixed", mean=30.20063, std=35.221165),
                          slice_context=2, register=MNI)
    block = steps.to_dict()
    assert block["register"] == MNI
    assert Preprocessing.from_card({"preprocessing": json.loads(json.dumps(block))}) == steps
    assert "registration to mni152-2009a" in steps.describe()
    assert "register" not in Preprocessing(spacing=(1.0, 1.0, 1.0)).to_dict()  # other cards unchanged
    assert any("register" in p for p in Preprocessing(spacing=(1.0, 1.0, 1.0), register="mni305").problems())
    card = {"name": "atlas-t1", "inputs": [{"name": "t1"}], "preprocessing": block, "roi": [197, 233, 1],
            "outputs": ["lesion"], "labels": [{"region": "lesion", "label": 1}],
            "architecture": {"class": "Conv2d"}}
    assert ModelCard.from_dict(card).to_dict()["preprocessing"] == block
    with pytest.raises(ConfigError, match="register must be null or one of mni152-2009a"):
        ModelCard.from_dict({**card, "preprocessing": {**block, "register": "mni305"}})


def test_preprocess_with_a_registered_card_runs_on_the_template_grid_and_lands_on_the_input(moved_case):
    image, truth = moved_case
    atlas, brain = _template(), template_module.brain_mask(MNI)
    steps = Preprocessing(spacing=(1.0, 1.0, 1.0), orientation="RAS", crop_margin_mm=None,
                          normalization=Normalization("fixed", mean=30.20063, std=35.221165),
                          slice_context=2, register=MNI)
    reference = Image(image.array * np.float32(0.3), image.affine, None, image.path)  # another scanner's scale
    prepared = preprocess([reference], steps)
    assert prepared.array.shape == (5, 197, 233, 189)
    registration, reorientation = prepared.inverse.steps
    assert isinstance(registration, Registration) and isinstance(reorientation, Reorientation)
    assert any("registered moved_t1.nii.gz to mni152-2009a" in n for n in prepared.notes)
    middle = prepared.array[2] * np.float32(35.221165) + np.float32(30.20063)  # the centre slice channel
    assert float(np.median(middle[brain & (middle != 0)])) == pytest.approx(178.0, abs=0.5)

    left = brain & _left(atlas.shape, atlas.affine)
    probabilities = left[None].astype(np.float32)  # a "prediction" on the network grid: the left brain
    landed = prepared.inverse.invert(probabilities)
    assert landed.shape == (1, *reference.shape)
    assert prepared.reference.shape == reference.shape
    assert np.array_equal(prepared.reference.affine, reference.affine)
    native_left = (reference.array > 0) & _left(reference.shape, reference.affine, np.linalg.inv(truth))
    assert _dice(landed[0] > 0.5, native_left) > 0.95

    labels = prepared.inverse.apply(native_left[None].astype(np.float32))  # as training does
    assert labels.shape == (1, 197, 233, 189)
    assert _dice(labels[0] > 0.5, left) > 0.95


def test_an_image_too_small_to_register_is_refused_in_one_line():
    _template()
    tiny = Image(np.ones((8, 8, 8), np.float32), np.eye(4), None, Path("tiny.nii.gz"))
    with pytest.raises(InputError, match=r"^tiny.nii.gz: cannot be registered to the mni152-2009a template \(") as err:
        Registration.fit(tiny, MNI)
    assert "\n" not in str(err.value)


def test_a_registered_card_without_nilearn_says_what_to_install(monkeypatch):
    image = Image(np.ones((8, 8, 8), np.float32), np.eye(4), None, Path("t1.nii.gz"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nilearn" else real(name, *a))
    template_module.template.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"needs nilearn: pip install 'factorizer-cli\[atlas\]'"):
            preprocess([image], Preprocessing(spacing=(1.0, 1.0, 1.0), crop_margin_mm=None, register=MNI))
    finally:
        monkeypatch.undo()
        template_module.template.cache_clear()
