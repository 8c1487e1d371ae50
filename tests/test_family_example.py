"""Adding an architecture family is one module plus its cards: a worked example (README, "Add a family").

``TinySliceNet`` is a 2D network run slice-wise on 3D scans: it registers as a family, builds from a
card, segments a case on an oblique grid with thick slices (windows ``[H, W, 1]``, one neighbouring
slice on either side as channels), exports to ONNX with the same labels, and refuses what it does not
have (NMF component maps, ``--nmf-iters``) with one clear line.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from factorizer_cli.errors import ConfigError
from factorizer_cli.export import export_onnx
from factorizer_cli.families import Family, build, family_of, register, unregister
from factorizer_cli.io.images import read_image
from factorizer_cli.pipeline.components import ComponentRequest
from factorizer_cli.pipeline.segment import InferenceOptions, Segmenter
from factorizer_cli.zoo.card import ModelCard
from factorizer_cli.zoo.onnx_file import open_onnx
from factorizer_cli.zoo.package import save_package

from .oracle import oblique, phantom

# --- the family module (what factorizer_cli/families/tiny.py would hold) ---------------------------

class TinySliceNet(nn.Module):
    """Two convolutions over one axial slice and its neighbours (stacked as channels)."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


TINY = Family(name="tiny", title="TinySliceNet", classes={"TinySliceNet": TinySliceNet})

# --- its card (what models/tiny-demo.json would hold) ---------------------------------------------

CARD = {
    "name": "tiny-demo", "task": "whole tumour, slice by slice",
    "inputs": [{"name": "t2f", "aliases": ["flair"]}],
    "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, None], "crop_foreground": {"margin_mm": 4},
                      "normalization": {"kind": "zscore_nonzero"}, "slice_context": 1},
    "roi": [24, 24, 1], "outputs": ["WT"], "labels": [{"region": "WT", "label": 2}],
    "architecture": {"class": "TinySliceNet", "in_channels": 3, "out_channels": 1},
}


@pytest.fixture()
def tiny_family():
    register(TINY)
    yield TINY
    unregister(TINY.name)


@pytest.fixture()
def package(tiny_family, tmp_path):
    card = ModelCard.from_dict(CARD)
    torch.manual_seed(0)
    network = build(card.architecture)
    assert family_of(network) is tiny_family and family_of(card.architecture) is tiny_family
    return save_package(tmp_path / "tiny-demo", card, [network.state_dict()])


@pytest.fixture()
def flair(tmp_path):
    images, _ = phantom(shape=(40, 44, 12))
    affine = oblique(12.0, spacing=(1.0, 1.0, 3.0))
    path = tmp_path / "flair.nii.gz"
    nib.save(nib.Nifti1Image(images[3], affine), path)
    return path


def test_a_new_family_segments_a_case_on_the_input_grid(package, flair, tmp_path):
    segmenter = Segmenter(package, InferenceOptions(device="cpu", sw_batch_size=8))
    result = segmenter([flair], keep_probabilities=True)
    result.write(tmp_path / "seg.nii.gz")
    written, source = nib.load(tmp_path / "seg.nii.gz"), nib.load(flair)
    assert written.shape == source.shape and np.array_equal(written.affine, source.affine)
    assert result.probabilities.shape == (1, *source.shape)
    assert set(np.unique(result.labels)) <= {0, 2}


def test_a_new_family_exports_to_onnx_with_the_same_labels(package, flair, tmp_path):
    (exported,) = export_onnx(package, tmp_path / "tiny.onnx")
    assert max(exported.max_abs_diff.values()) <= 1e-4
    torch_result = Segmenter(package, InferenceOptions(device="cpu"))([flair], keep_probabilities=True)
    onnx_result = Segmenter(open_onnx(tmp_path / "tiny.onnx"), InferenceOptions(device="cpu"))(
        [read_image(flair)], keep_probabilities=True)
    assert np.abs(torch_result.probabilities - onnx_result.probabilities).max() <= 1e-4
    assert (torch_result.labels == onnx_result.labels).mean() >= 0.999


def test_a_new_family_refuses_what_it_does_not_have(package):
    segmenter = Segmenter(package, InferenceOptions(device="cpu"))
    with pytest.raises(ConfigError, match="TinySliceNet models have no NMF component maps"):
        segmenter.check_components(ComponentRequest())
    with pytest.raises(ConfigError, match="--nmf-iters does not apply to TinySliceNet models"):
        Segmenter(package, InferenceOptions(device="cpu", knobs={"nmf_iters": 2}))


def test_family_names_cannot_be_taken_twice(tiny_family):
    with pytest.raises(ConfigError, match="registered twice"):
        register(TINY)
    with pytest.raises(ConfigError, match="already taken: Conv3d"):
        register(Family(name="other", title="Other", classes={"Conv3d": nn.Conv3d}))
