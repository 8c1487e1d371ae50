"""Geometry is exact: labels land on the right voxels whatever the orientation, obliquity or spacing."""

import nibabel as nib
import numpy as np
import pytest

from factorizer_cli.io.images import read_image
from factorizer_cli.pipeline.segment import InferenceOptions, Segmenter

from .oracle import oblique, oracle_card, oracle_package, phantom, reorient, write_case


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    package = oracle_package(tmp_path_factory.mktemp("oracle"))
    return Segmenter(package, InferenceOptions(device="cpu", overlap=0.5))


def _segment(segmenter, paths, out):
    result = segmenter([read_image(p) for p in paths])
    result.write(out)
    return nib.load(out)


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "PIR", "SLA", "ILP"])
@pytest.mark.parametrize("angle", [0.0, 17.0])
def test_labels_land_on_the_same_world_voxels_in_every_orientation(segmenter, tmp_path, codes, angle):
    images, expected = phantom()
    base = oblique(angle)
    data = np.stack([reorient(v, base, codes)[0] for v in images])
    _, affine = reorient(images[0], base, codes)
    paths = write_case(tmp_path / "case", data, affine, qform_code=2, sform_code=4)
    out = _segment(segmenter, paths, tmp_path / "seg.nii.gz")

    reference = nib.load(paths[0])
    assert out.shape == reference.shape and out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(out.affine, reference.affine)
    np.testing.assert_allclose(out.header.get_qform(), reference.header.get_qform(), atol=1e-6)
    np.testing.assert_allclose(out.header.get_sform(), reference.header.get_sform(), atol=1e-6)
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (2, 4)
    # Back to the phantom's own orientation: every label where the phantom put it.
    labels_back, _ = reorient(np.asarray(out.dataobj), affine, nib.aff2axcodes(base))
    np.testing.assert_array_equal(labels_back, expected)


@pytest.mark.parametrize("shape", [(40, 44, 36), (17, 45, 23)])
def test_shapes_that_are_not_multiples_of_the_roi(segmenter, tmp_path, shape):
    images, expected = phantom(shape=(40, 45, 36))
    crop = tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(images.shape[1:], shape))
    images, expected = images[(slice(None), *crop)], expected[crop]
    paths = write_case(tmp_path / "case", images, oblique(0.0))
    out = np.asarray(_segment(segmenter, paths, tmp_path / "seg.nii.gz").dataobj)
    assert out.shape == shape
    np.testing.assert_array_equal(out, expected)


def test_volume_smaller_than_the_roi(tmp_path):
    images, expected = phantom(shape=(40, 44, 36))
    segmenter = Segmenter(oracle_package(tmp_path / "model", roi=(64, 64, 64)), InferenceOptions(device="cpu"))
    paths = write_case(tmp_path / "case", images, oblique(5.0))
    out = np.asarray(_segment(segmenter, paths, tmp_path / "seg.nii.gz").dataobj)
    np.testing.assert_array_equal(out, expected)


def test_anisotropic_spacing_is_resampled_and_mapped_back(tmp_path):
    # 1 x 1 x 3 mm voxels, model at 1 mm: resampled for the network, labels brought back.
    images, expected = phantom(shape=(40, 44, 36))
    thick = (slice(None), slice(None), slice(None), slice(None, None, 3))
    images, expected = np.ascontiguousarray(images[thick]), expected[..., ::3]
    affine = oblique(10.0, spacing=(1.0, 1.0, 3.0))
    paths = write_case(tmp_path / "case", images, affine)
    segmenter = Segmenter(oracle_package(tmp_path / "model"), InferenceOptions(device="cpu"))
    result = segmenter([read_image(p) for p in paths], keep_probabilities=True)
    assert result.labels.shape == expected.shape
    assert result.probabilities.shape == (3, *expected.shape)
    # Linear resampling blurs edges by a voxel at most: interiors are exact, volumes close.
    for label in (1, 2, 3):
        truth, found = expected == label, result.labels == label
        dice = 2 * (truth & found).sum() / (truth.sum() + found.sum())
        assert dice > 0.8, (label, dice)
    whole = expected > 0
    assert 2 * (whole & (result.labels > 0)).sum() / (whole.sum() + (result.labels > 0).sum()) > 0.95


def test_volumes_and_label_convention(tmp_path):
    images, expected = phantom()
    affine = oblique(0.0, spacing=(1.0, 1.0, 1.0))
    paths = write_case(tmp_path / "case", images, affine)
    package = oracle_package(tmp_path / "model")
    seg = Segmenter(package, InferenceOptions(device="cpu", label_convention="brats2021"))
    result = seg([read_image(p) for p in paths])
    assert set(np.unique(result.labels)) == {0, 1, 2, 4}
    volumes = result.volumes()
    assert volumes["regions_ml"]["WT"] == pytest.approx((expected > 0).sum() / 1000)
    assert volumes["regions_ml"]["TC"] == pytest.approx(np.isin(expected, [1, 3]).sum() / 1000)
    assert volumes["regions_ml"]["ET"] == pytest.approx((expected == 3).sum() / 1000)
    assert volumes["labels_ml"]["ED"] == pytest.approx((expected == 2).sum() / 1000)


def test_single_output_model_at_coarser_spacing(tmp_path):
    """One output channel (like ISLES'22) and a 2 mm model on 1 mm images: resampled both ways."""
    from factorizer_cli.zoo.card import ModelCard
    from factorizer_cli.zoo.package import save_package

    from .oracle import oracle_weights

    card = oracle_card(spacing=(2.0, 2.0, 2.0)).to_dict()
    card.update(outputs=["WT"], labels=[{"region": "WT", "label": 1}], label_conventions={},
                architecture={"class": "Conv3d", "in_channels": 4, "out_channels": 1, "kernel_size": 1})
    weights = {k: v[1:2] for k, v in oracle_weights().items()}
    segmenter = Segmenter(save_package(tmp_path / "model", ModelCard.from_dict(card), [weights]),
                          InferenceOptions(device="cpu"))
    images, expected = phantom()
    paths = write_case(tmp_path / "case", images, oblique(12.0))
    result = segmenter([read_image(p) for p in paths], keep_probabilities=True)
    assert result.labels.shape == expected.shape and result.probabilities.shape == (1, *expected.shape)
    truth, found = expected > 0, result.labels == 1
    assert 2 * (truth & found).sum() / (truth.sum() + found.sum()) > 0.9
