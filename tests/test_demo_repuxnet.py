"""The bundled phantom-trained 3D RepUX-Net: offline, as good as its card says, and the same under ONNX.

``demo-repuxnet`` is what lets the large-kernel family run without a download: a RepUX-Net trained
with BFR by ``factorizer train`` and shipped in its reparameterised form.
"""

from __future__ import annotations

from importlib.resources import files

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from factorizer_cli.api import generate_phantoms
from factorizer_cli.cli import app
from factorizer_cli.pipeline.metrics import dice, region_masks
from factorizer_cli.zoo.package import sha256_of
from factorizer_cli.zoo.registry import zoo_card

runner = CliRunner()


def test_the_card_ships_small_checksummed_reparameterised_weights():
    card = zoo_card("demo-repuxnet")
    (entry,) = card.weights
    path = files("factorizer_cli.models") / entry["path"]
    assert entry["source"] == "package" and sha256_of(path) == entry["sha256"]
    assert path.stat().st_size < 10 * 2**20
    assert card.architecture["class"] == "REPUXNET" and card.architecture["deploy"] is True
    assert card.activation == "softmax" and card.outputs[0] == "background"
    heldout = card.metrics["heldout_phantoms"]["mean_dice"]
    assert min(heldout.values()) >= 0.9


@pytest.mark.slow
def test_a_phantom_is_segmented_offline_and_onnx_agrees(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORIZER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (case,) = generate_phantoms(tmp_path / "cases", cases=1, seed=2)  # seed 2: never seen in training
    labels = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / f"{backend}.nii.gz"
        result = runner.invoke(app, ["segment", str(case), "-o", str(out), "--model", "demo-repuxnet",
                                     "--backend", backend, "--device", "cpu", "--quiet"])
        assert result.exit_code == 0, result.output
        labels[backend] = np.asarray(nib.load(out).dataobj)
    truth = np.asarray(nib.load(next(case.glob("*-seg.nii.gz"))).dataobj)
    predicted = region_masks(labels["torch"], "brats")
    expected = region_masks(truth, "brats")
    scores = {region: dice(predicted[region], expected[region]) for region in ("WT", "TC", "ET")}
    assert min(scores.values()) >= 0.8, scores
    assert set(np.unique(labels["torch"])) <= {0, 1, 2, 3}
    assert (labels["onnx"] == labels["torch"]).mean() >= 0.999
