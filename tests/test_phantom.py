"""Phantoms: deterministic per seed, BraTS naming and labels, contrasts that follow the sequences."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from factorizer_cli import phantom
from factorizer_cli.cli import app
from factorizer_cli.io import find_modalities, read_image
from factorizer_cli.zoo.registry import zoo_card


@pytest.fixture(scope="module")
def case() -> phantom.Phantom:
    return phantom.generate(seed=11, index=2)


def test_same_seed_same_case_other_index_other_case(case):
    again = phantom.generate(seed=11, index=2)
    np.testing.assert_array_equal(again.labels, case.labels)
    for name in phantom.MODALITIES:
        np.testing.assert_array_equal(again.images[name], case.images[name])
    assert not np.array_equal(phantom.generate(seed=11, index=3).labels, case.labels)


def test_labels_and_brain(case):
    assert case.labels.shape == phantom.SHAPE and case.labels.dtype == np.uint8
    assert set(np.unique(case.labels)) == {0, 1, 2, 3}
    brain = case.images["t1n"] != 0
    assert (brain[case.labels > 0]).all(), "the tumour lies inside the brain"
    for volume in case.images.values():
        assert volume.dtype == np.int16 and ((volume != 0) == brain).all()  # skull-stripped


def _mean(case, modality, mask):
    return float(case.images[modality][mask].mean())


def test_contrasts_follow_the_sequences(case):
    """Relative means, so the random scanner scale drops out."""
    labels, t1n = case.labels, case.images["t1n"]
    healthy = (labels == 0) & (t1n != 0)
    white = healthy & (t1n > np.percentile(t1n[healthy], 70))  # T1-bright healthy tissue
    necrosis, oedema, enhancing = labels == 1, labels == 2, labels == 3
    assert _mean(case, "t1c", enhancing) > 1.3 * _mean(case, "t1c", white)  # enhancing rim bright on T1c
    assert _mean(case, "t1c", necrosis) < 0.5 * _mean(case, "t1c", white)  # necrotic core dark on T1c
    for modality in ("t2w", "t2f"):  # oedema bright on T2 and FLAIR
        assert _mean(case, modality, oedema) > 1.4 * _mean(case, modality, white)
    assert _mean(case, "t1n", oedema) < 0.8 * _mean(case, "t1n", white)


def test_cli_writes_brats_layout(tmp_path):
    result = CliRunner().invoke(app, ["phantom", str(tmp_path), "--cases", "1", "--seed", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "BraTS-PHT-00004-000"
    found = find_modalities(folder, zoo_card("demo").modality_specs)
    assert [p.name for p in found.values()] == [f"BraTS-PHT-00004-000-{m}.nii.gz" for m in phantom.MODALITIES]
    seg = read_image(folder / "BraTS-PHT-00004-000-seg.nii.gz")
    np.testing.assert_array_equal(seg.array, phantom.generate(4, 0).labels)
    np.testing.assert_allclose(seg.spacing, (1.0, 1.0, 1.0))
