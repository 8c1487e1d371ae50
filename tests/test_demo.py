"""The bundled demo model and `factorizer demo`: offline, and as good as its card says."""

from __future__ import annotations

import re
from importlib.resources import files

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from factorizer_cli.cli import app
from factorizer_cli.zoo.package import sha256_of
from factorizer_cli.zoo.registry import zoo_card


def test_demo_weights_ship_small_and_checksummed():
    card = zoo_card("demo")
    (entry,) = card.weights
    assert entry["source"] == "package"
    path = files("factorizer_cli.models") / entry["path"]
    assert path.is_file() and sha256_of(path) == entry["sha256"]
    assert path.stat().st_size < 10 * 2**20
    heldout = card.metrics["heldout_phantoms"]["mean_dice"]  # the acceptance bar, as recorded
    assert heldout["WT"] >= 0.90 and heldout["TC"] >= 0.85 and heldout["ET"] >= 0.80


@pytest.mark.slow
def test_demo_runs_offline_and_matches_its_card(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORIZER_HOME", str(tmp_path / "empty-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # "-o demo": a folder named like the model must not stand in for it
    result = CliRunner().invoke(app, ["demo", "-o", "demo", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    recorded = zoo_card("demo").metrics["demo_case"]["dice"]
    for region in ("WT", "TC", "ET"):
        match = re.search(rf"^{region}\s+([0-9.]+)\s+([0-9.]+)", result.output, re.MULTILINE)
        assert match, result.output
        assert abs(float(match.group(1)) - recorded[region]) <= 0.02
        assert float(match.group(2)) == pytest.approx(recorded[region], abs=5e-4)
    case = tmp_path / "demo" / "BraTS-PHT-00003-000"
    prediction = nib.load(tmp_path / "demo" / "BraTS-PHT-00003-000-pred.nii.gz")
    reference = nib.load(case / "BraTS-PHT-00003-000-t2f.nii.gz")
    assert prediction.shape == reference.shape and np.allclose(prediction.affine, reference.affine)
    assert (tmp_path / "demo" / "BraTS-PHT-00003-000-preview.png").stat().st_size > 1000
