"""ONNX export of 3D RepUX-Net and 3D UX-Net: the graph is the inference form, and it segments like PyTorch.

A training-form RepUX-Net (``deploy: false``: depthwise kernels W ⊙ BFM) must export as plain depthwise
convolutions: the same graph, initializers included, as the package of its reparameterised form, with
no BFM left to multiply. Both networks are verified by the exporter's rule (outputs within rounding
of the logits' scale, labels agreeing on ≥ 99.9% of voxels), and ``segment --backend onnx`` labels a
case as the PyTorch backend does. Small random networks at 32³ keep each test to seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from factorizer_cli.cli import app
from factorizer_cli.export import cached_onnx, export_onnx
from factorizer_cli.export.exporter import TOLERANCE_FP32
from factorizer_cli.families import build
from factorizer_cli.nn.uxnet import bayesian_frequency_matrix
from factorizer_cli.zoo.card import ModelCard
from factorizer_cli.zoo.onnx_file import META_VERIFICATION
from factorizer_cli.zoo.package import ModelPackage, save_package

from .oracle import phantom, write_case

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
runner = CliRunner()

KS = 7
SMALL = {"in_chans": 1, "out_chans": 3, "feat_size": [8, 16, 16, 32], "depths": [1, 1, 1, 1], "hidden_size": 32}
NETWORKS = {
    "repuxnet": {"class": "REPUXNET", **SMALL, "ks": KS, "deploy": False},
    "uxnet": {"class": "UXNET", **SMALL},
}


def small_card(architecture: dict, name: str) -> ModelCard:
    """Softmax over background and two classes, one FLAIR input (the phantom case's t2f), 32³ windows."""
    return ModelCard.from_dict({
        "name": name, "task": "test", "inputs": [{"name": "t2f", "aliases": ["flair"]}], "spacing": [1, 1, 1],
        "roi": [32, 32, 32], "overlap": 0.5, "activation": "softmax", "outputs": ["background", "a", "b"],
        "labels": [{"region": "a", "label": 1}, {"region": "b", "label": 2}], "architecture": architecture,
    })


def random_network(architecture: dict, seed: int = 0) -> torch.nn.Module:
    """Random weights, and random BatchNorm statistics and affines (so that folding them would show)."""
    torch.manual_seed(seed)
    network = build(architecture).eval()
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return network


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One cache for the module: the export made by ``cached_onnx`` is the one ``--backend onnx`` finds."""
    path = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FACTORIZER_HOME", str(path))
        yield path


@pytest.fixture(scope="module", params=list(NETWORKS))
def exported(request, home, tmp_path_factory) -> tuple[ModelPackage, Path]:
    """A small package of each network, exported (and verified) into the cache by the real exporter."""
    architecture = NETWORKS[request.param]
    package = save_package(tmp_path_factory.mktemp(request.param), small_card(architecture, request.param),
                           [random_network(architecture).state_dict()])
    return package, cached_onnx(package)


def test_the_export_is_verified_within_rounding_and_on_the_labels(exported):
    _, path = exported
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    verification = json.loads(meta[META_VERIFICATION])
    assert set(verification) == {"random", "realistic"}
    for numbers in verification.values():
        assert numbers["max_abs_diff"] <= numbers["allowed"]
        assert numbers["allowed"] > TOLERANCE_FP32.atol  # relative to the logits' scale
        assert numbers["labels_agree"] >= 0.999


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_training_form_exports_as_its_reparameterised_plain_convolutions(tmp_path):
    """deploy=False exports exactly what the reparameterised network (deploy=True) exports: the same
    operations and the same weights; no initializer is the BFM and no Mul scales a kernel."""
    architecture = NETWORKS["repuxnet"]
    training = random_network(architecture)
    package = save_package(tmp_path / "training", small_card(architecture, "training"), [training.state_dict()])
    deployed = {**architecture, "deploy": True}
    inference = save_package(tmp_path / "inference", small_card(deployed, "inference"),
                             [training.reparameterize().state_dict()])
    export_onnx(package, tmp_path / "training.onnx", verify=False)
    export_onnx(inference, tmp_path / "inference.onnx", verify=False)

    ops = [[n.op_type for n in onnx.load(str(tmp_path / f"{form}.onnx")).graph.node]
           for form in ("training", "inference")]
    assert ops[0] == ops[1]
    got, expected = _initializers(tmp_path / "training.onnx"), _initializers(tmp_path / "inference.onnx")
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)

    bfm = bayesian_frequency_matrix(KS, architecture.get("a", 1)).numpy()
    kernels = {name for name, v in got.items() if v.shape[-3:] == (KS, KS, KS)}
    assert len(kernels) == 1 + sum(architecture["depths"])  # the stem's, and one depthwise kernel per block
    assert not any(v.size == bfm.size and np.allclose(v.reshape(bfm.shape), bfm) for v in got.values())
    graph = onnx.load(str(tmp_path / "training.onnx")).graph
    assert not [n.name for n in graph.node if n.op_type == "Mul" and kernels & set(n.input)]
    convolved = {n.input[1] for n in graph.node if n.op_type == "Conv"}
    assert kernels <= convolved


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_segment_backend_onnx_labels_a_case_as_torch_does(exported, home, tmp_path):
    package, path = exported
    images, _ = phantom(shape=(32, 44, 32), seed=3)  # two overlapping windows: blending included
    images[3] += np.random.default_rng(3).standard_normal(images[3].shape).astype(np.float32)  # texture
    case = write_case(tmp_path / "case", images, np.eye(4))[0].parent
    labels = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / f"{backend}.nii.gz"
        result = runner.invoke(app, ["segment", str(case), "-o", str(out), "--model", str(package.root),
                                     "--backend", backend, "--device", "cpu", "--quiet"])
        assert result.exit_code == 0, result.output
        labels[backend] = _labels(out)
    assert list((home / "onnx" / package.card.name).rglob("*.onnx")) == [path]  # the verified export, reused
    counts = np.bincount(labels["torch"].ravel(), minlength=3)
    assert (counts > 0).sum() >= 2, f"a constant label map would agree trivially: {counts}"
    agree = float((labels["onnx"] == labels["torch"]).mean())
    assert agree >= 0.999, f"labels agree on {agree:.4%} of voxels"
