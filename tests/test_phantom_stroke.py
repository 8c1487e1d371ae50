"""Stroke phantoms: deterministic, image and labels on one clinical grid that lines up with the template
through the recorded pose, dark lesions from a few voxels to tens of cm³, and a dataset the readers find."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from factorizer_cli.atlas.template import brain_mask, template, template_path
from factorizer_cli.errors import ConfigError

try:
    template_path()
except ConfigError as err:
    pytest.skip(f"stroke phantoms need the MNI152 template: {err}", allow_module_level=True)

from factorizer_cli import phantom_stroke  # noqa: E402
from factorizer_cli.cli import app  # noqa: E402
from factorizer_cli.io import read_image  # noqa: E402
from factorizer_cli.io.cases import find_labelled_cases  # noqa: E402

SEED = 0
INDICES = range(6)  # among them: 1 mm, 3 mm and 5 mm slices, oblique grids, small-only cases
T1_SPECS = [("t1n", ("t1", "t1w"))]  # how a T1 model card names its input


@pytest.fixture(scope="module")
def cases() -> dict[int, phantom_stroke.StrokePhantom]:
    return {index: phantom_stroke.generate(SEED, index) for index in INDICES}


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(affine[:3, :3], axis=0)


def _components(labels: np.ndarray) -> np.ndarray:
    pieces, _ = ndimage.label(labels, np.ones((3, 3, 3)))
    return np.bincount(pieces.ravel())[1:]


def test_same_seed_same_case_other_index_other_case(cases):
    again = phantom_stroke.generate(SEED, 1)
    np.testing.assert_array_equal(again.t1, cases[1].t1)
    np.testing.assert_array_equal(again.labels, cases[1].labels)
    np.testing.assert_array_equal(again.affine, cases[1].affine)
    assert again.t1.shape != cases[2].t1.shape or not np.array_equal(again.t1, cases[2].t1)


def test_image_and_labels_share_a_clinical_grid(cases):
    thicknesses = set()
    for case in cases.values():
        assert case.t1.shape == case.labels.shape and case.t1.dtype == np.int16
        assert case.labels.dtype == np.uint8 and set(np.unique(case.labels)) == {0, 1}
        assert case.truth.shape == (197, 233, 189) and case.truth.any()
        spacing = _spacing(case.affine)
        fov = spacing * case.t1.shape
        assert (fov > 150).all() and (fov < 320).all(), f"field of view {fov} mm does not frame a head"
        assert 1 <= len(case.lesions) <= 3
        thicknesses.add(round(float(spacing[2])))
    assert len(thicknesses) >= 2, "the cases should not all share one slice thickness"


def test_lesions_are_darker_than_the_tissue_around_them(cases):
    """Lesion / surrounding-tissue intensity on the phantom, against the same ratio on the template's
    anatomy at the same voxels (a lesion in cortex next to CSF is darker than the white matter anyway)."""
    for index, case in cases.items():
        brain = phantom_stroke.template_to_grid(brain_mask(), case).astype(bool)
        anatomy = phantom_stroke.template_to_grid(template().array, case, nearest=False)
        lesion = case.labels > 0
        around = ndimage.binary_dilation(lesion, iterations=2) & ~lesion & brain
        ratio = case.t1[lesion].mean() / case.t1[around].mean()
        before = anatomy[lesion].mean() / anatomy[around].mean()
        limit = 0.7 if lesion.sum() >= 100 else 0.9  # thick slices dilute the smallest by partial volume
        assert ratio < limit * before, f"case {index} ({case.protocol}): {ratio:.2f} vs {before:.2f} before"
        assert case.t1[~brain].max() > 0.5 * case.t1[brain].mean(), "a scalp surrounds the brain"


def test_sizes_run_from_a_few_voxels_to_tens_of_cm3(cases):
    template_voxels = [lesion.voxels for case in cases.values() for lesion in case.lesions]
    assert min(template_voxels) <= 100 and max(template_voxels) >= 10_000
    clinical = []
    for case in cases.values():
        clinical += [(size, size * float(np.prod(_spacing(case.affine)))) for size in _components(case.labels)]
    voxels, mm3 = np.array(clinical).T
    assert (voxels <= 100).sum() >= 2, "small lesions (≤ 100 voxels) on the clinical grids"
    assert mm3.max() >= 10_000, "a lesion of at least 10 cm³"
    kinds = {lesion.kind for case in cases.values() for lesion in case.lesions}
    assert kinds == {"cortical", "subcortical"}
    assert any(all(lesion.radius_mm <= phantom_stroke.SMALL_RADIUS_MM[1] for lesion in case.lesions)
               for case in cases.values()), "a case with small lesions only"


def test_lesion_centroid_in_world_mm_follows_the_pose(cases):
    """The template's lesion, moved by the recorded pose, is where the clinical label map puts it."""
    atlas_affine = read_image(template_path()).affine
    checked = 0
    for index, case in cases.items():
        if len(_components(case.truth)) != 1:
            continue  # one lesion only: several may lose a small one between thick slices
        template_mm = atlas_affine[:3, :3] @ np.argwhere(case.truth).mean(0) + atlas_affine[:3, 3]
        expected = case.pose[:3, :3] @ template_mm + case.pose[:3, 3]
        found = case.affine[:3, :3] @ np.argwhere(case.labels).mean(0) + case.affine[:3, 3]
        error = float(np.linalg.norm(found - expected))
        assert error <= _spacing(case.affine).max(), f"case {index} ({case.protocol}): {error:.2f} mm off"
        checked += 1
    assert checked >= 2


def test_the_pose_turns_and_shifts_the_head_within_limits(cases):
    centre = phantom_stroke._anatomy().centre_mm  # the head turns about the brain's centroid
    tilts = []
    for case in cases.values():
        rotation = case.pose[:3, :3]
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-9)
        tilts.append(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1))))
        shift = rotation @ centre + case.pose[:3, 3] - centre
        assert np.linalg.norm(shift) <= phantom_stroke.MAX_SHIFT_MM + 1e-6
    assert max(tilts) <= phantom_stroke.MAX_TILT_DEG + 1e-6 and max(tilts) > 1.0


def test_thick_slices_average_across_their_thickness_centred_on_the_slice():
    """A linear ramp averaged over a slice equals its value at the slice centre (no half-slice shift)."""
    ramp = np.broadcast_to(np.arange(60, dtype=np.float32)[None, None, :] * 2.0, (20, 20, 60)).copy()
    out_to_in = np.diag([1.0, 1.0, 5.0, 1.0])  # output voxel k is 5 input voxels thick
    out_to_in[2, 3] = 7.0
    thick = phantom_stroke._resample(ramp, out_to_in, (20, 20, 9), nearest=False, supersample=5)
    centre = phantom_stroke._resample(ramp, out_to_in, (20, 20, 9), nearest=False)
    np.testing.assert_allclose(thick[5, 5], centre[5, 5], atol=1e-4)
    np.testing.assert_allclose(centre[5, 5], 2.0 * (7.0 + 5.0 * np.arange(9)), atol=1e-4)


def test_cli_writes_a_t1_dataset(tmp_path):
    result = CliRunner().invoke(app, ["phantom", str(tmp_path), "--kind", "stroke", "--cases", "1",
                                      "--seed", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    [(case, label_path)] = find_labelled_cases(tmp_path, T1_SPECS)
    assert case.name == "STROKE-PHT-00004-000"
    assert [p.name for p in case.files] == ["STROKE-PHT-00004-000-t1.nii.gz"]
    expected = phantom_stroke.generate(4, 0)
    t1, seg = read_image(case.files[0]), read_image(label_path)
    np.testing.assert_array_equal(seg.array, expected.labels)
    np.testing.assert_array_equal(t1.array, expected.t1)
    np.testing.assert_allclose(t1.affine, expected.affine, atol=1e-4)
    np.testing.assert_allclose(seg.affine, t1.affine, atol=1e-6)


def test_missing_nilearn_is_one_line(tmp_path, monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "nilearn" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    result = CliRunner().invoke(app, ["phantom", str(tmp_path), "--kind", "stroke", "--quiet"])
    assert result.exit_code == 2, result.output
    assert "nilearn" in result.output and "factorizer-cli[atlas]" in result.output and len(result.output.strip().splitlines()) == 1
