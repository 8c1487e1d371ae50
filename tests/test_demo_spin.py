"""The bundled phantom-trained SPiN: offline on a clinical-grid T1, as its card says, and the same under ONNX.

``demo-spin`` is what lets the SPiN family, atlas registration and lesion-wise evaluation run without a
download. It needs the MNI152 template (nilearn, the ``atlas`` extra).
"""

from __future__ import annotations

import importlib.util
from importlib.resources import files

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from factorizer_cli.api import generate_phantoms
from factorizer_cli.cli import app
from factorizer_cli.pipeline.metrics import dice
from factorizer_cli.zoo.package import sha256_of
from factorizer_cli.zoo.registry import zoo_card

runner = CliRunner()
needs_template = pytest.mark.skipif(importlib.util.find_spec("nilearn") is None,
                                    reason="the MNI152 template needs nilearn: pip install 'factorizer-cli[atlas]'")


def test_the_card_ships_small_checksummed_weights_and_its_scores():
    card = zoo_card("demo-spin")
    (entry,) = card.weights
    path = files("factorizer_cli.models") / entry["path"]
    assert entry["source"] == "package" and sha256_of(path) == entry["sha256"]
    assert path.stat().st_size < 5 * 2**20
    assert card.architecture["class"] == "SPiNModel"
    assert card.preprocessing.register == "mni152-2009a" and card.preprocessing.slice_context == 2
    heldout = card.metrics["heldout_phantoms"]
    assert heldout["per_patient"]["dice"] >= 0.3 and heldout["detection_f1_by_size_mm3"]["gt1000"] >= 0.8
    assert {"le100", "100-1000", "gt1000"} <= set(heldout["detection_f1_by_size_mm3"])


@needs_template
@pytest.mark.slow
def test_a_stroke_phantom_is_segmented_offline_and_onnx_agrees(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORIZER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (case,) = generate_phantoms(tmp_path / "cases", cases=1, seed=2, kind="stroke")  # seed 2: never trained on
    t1 = next(case.glob("*-t1.nii.gz"))
    labels = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / f"{backend}.nii.gz"
        result = runner.invoke(app, ["segment", str(t1), "-m", "t1", "-o", str(out), "--model", "demo-spin",
                                     "--backend", backend, "--device", "cpu", "--quiet"])
        assert result.exit_code == 0, result.output
        labels[backend] = np.asarray(nib.load(out).dataobj)
    source = nib.load(t1)
    assert labels["torch"].shape == source.shape and np.array_equal(nib.load(out).affine, source.affine)
    truth = np.asarray(nib.load(next(case.glob("*-seg.nii.gz"))).dataobj) > 0
    recorded = zoo_card("demo-spin").metrics["heldout_phantoms"]["case_STROKE-PHT-00002-000_dice"]
    assert abs(dice(labels["torch"] > 0, truth) - recorded) <= 0.02  # what the card says, here
    assert (labels["onnx"] == labels["torch"]).mean() >= 0.999
