"""The zoo cards of upstream's published 3D UX-Net (FeTA) and 3D RepUX-Net (AMOS) weights.

What the cards must get right, since their weights cannot be downloaded here: the network they build
(upstream's published configuration: keys, shapes and parameter counts from the fixtures made by
running upstream, ``../shared/fixtures/{uxnet,repuxnet}``), the preprocessing of upstream's scripts,
softmax outputs turned into labels 0..N-1 with background left unpainted, weight sources that
``models verify`` can record, and ``models list`` / ``info`` within 80 columns.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from factorizer_cli.cli import app
from factorizer_cli.families import build, family_of
from factorizer_cli.pipeline.postprocess import labels_from_probabilities
from factorizer_cli.zoo.card import ModelCard
from factorizer_cli.zoo.registry import zoo_card, zoo_names
from factorizer_cli.zoo.resolve import UPSTREAM_FORMATS
from factorizer_cli.zoo.weights import weight_sources

from .conftest import FIXTURES

ROOT = FIXTURES.parent  # ../shared/fixtures: uxnet/ and repuxnet/ beside the Factorizer fixtures
CARDS = ("feta-uxnet", "amos-repuxnet")
# card -> (fixture folder, published-keys file, key of num_parameters_by_out_chans, parameters, classes)
PUBLISHED = {
    "feta-uxnet": ("uxnet", "uxnet_published_keys", "8 (FeTA)", 53_006_216, 8),
    "amos-repuxnet": ("repuxnet", "repuxnet_published_keys", "16 (AMOS)", 65_828_368, 16),
}
HEAD = ("out.conv.conv.weight", "out.conv.conv.bias")  # the only tensors whose shape follows the classes
runner = CliRunner()


@pytest.fixture(autouse=True)
def factorizer_home(tmp_path, monkeypatch):
    """An empty cache: nothing is downloaded or trusted."""
    monkeypatch.setenv("FACTORIZER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _published(name: str) -> dict:
    folder, stem, *_ = PUBLISHED[name]
    path = ROOT / folder / f"{stem}.json"
    if not path.is_file():
        pytest.skip(f"3D UX-Net / RepUX-Net fixtures not found at {path.parent} (they sit beside the clone in "
                    "CI; set FACTORIZER_FIXTURES to their sibling 'upstream' folder to run this comparison)")
    return json.loads(path.read_text())


def _meta_network(card: ModelCard) -> torch.nn.Module:
    with torch.device("meta"):
        return build(dict(card.architecture))


@pytest.mark.parametrize("name", CARDS)
def test_cards_load_and_describe_softmax_classes(name):
    card = zoo_card(name)
    assert name in zoo_names()
    assert ModelCard.from_dict(card.to_dict()) == card
    classes = PUBLISHED[name][4]
    assert card.activation == "softmax" and len(card.outputs) == classes
    assert card.outputs[0] == "background"
    # Rule k paints class k with k; background (class 0) has no rule: it stays 0.
    assert [(card.outputs.index(r.region), r.label) for r in card.labels] == [(k, k) for k in range(1, classes)]
    assert sorted(card.label_names, key=int) == [str(k) for k in range(1, classes)]
    assert card.in_channels == 1 and not card.slice_wise and card.roi == (96, 96, 96) and card.overlap == 0.5
    assert all(side % 16 == 0 for side in card.roi), "the network halves its input four times"
    assert card.license and card.citation and "models verify" in card.description


def test_preprocessing_follows_upstreams_scripts():
    feta, amos = zoo_card("feta-uxnet").preprocessing, zoo_card("amos-repuxnet").preprocessing
    assert feta.orientation == "RAS" and feta.spacing == (None, None, None)  # FeTA: no resampling
    assert feta.crop_margin_mm is not None and feta.crop_margin_mm <= 5
    assert (feta.normalization.kind, feta.normalization.low, feta.normalization.high) == ("window", 0, 1000)
    assert amos.orientation == "RAS" and amos.spacing == (1.5, 1.5, 2.0)
    assert amos.crop_margin_mm is None  # CT air is -1000 HU, not zero: a nonzero-voxel crop would keep all
    assert (amos.normalization.kind, amos.normalization.low, amos.normalization.high) == ("window", -125, 275)
    assert [m.spec for m in zoo_card("feta-uxnet").modalities] == [("t2w", ("t2",))]
    assert [m.name for m in zoo_card("amos-repuxnet").modalities] == ["ct"]


@pytest.mark.parametrize("name", CARDS)
def test_networks_have_the_published_parameter_counts(name):
    card = zoo_card(name)
    network = _meta_network(card)
    assert sum(p.numel() for p in network.parameters()) == PUBLISHED[name][3]
    assert card.architecture["out_chans"] == PUBLISHED[name][4]
    if card.architecture["class"] == "REPUXNET":
        assert card.architecture["deploy"] is True and network.deploy  # the inference form


@pytest.mark.parametrize("name", CARDS)
def test_networks_have_upstreams_keys_and_shapes(name):
    published, card = _published(name), zoo_card(name)
    assert card.architecture["class"] == published["class"]
    # The card is upstream's published configuration, with the weights' number of classes.
    different = {k for k, v in card.architecture.items() if k != "class" and published.get(k) != v}
    assert different <= {"out_chans"}, f"differs from the published configuration: {sorted(different)}"
    network = _meta_network(card)
    assert sum(p.numel() for p in network.parameters()) \
        == published["num_parameters_by_out_chans"][PUBLISHED[name][2]]
    ours = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in network.state_dict().items()}
    theirs = {k: [shape, dtype] for k, shape, dtype in published["state_dict"]}
    assert list(ours) == list(theirs)
    classes = card.architecture["out_chans"]
    for key, (shape, dtype) in theirs.items():
        expected = [classes, *shape[1:]] if key in HEAD else shape
        assert ours[key] == [expected, dtype], key


@pytest.mark.parametrize("name", CARDS)
def test_weights_come_from_google_drive_unverified_as_an_upstream_state_dict(name):
    card = zoo_card(name)
    (entry,) = card.weights
    assert entry["source"] == "url" and entry["sha256"] is None
    assert entry["url"].startswith(("https://drive.usercontent.google.com/download?id=",
                                    "https://drive.google.com/drive/folders/"))
    # Converted once through the family's upstream reader (not read as our safetensors).
    assert entry["format"] in UPSTREAM_FORMATS and entry["format"] != "safetensors"
    assert any(f.name.startswith(entry["format"]) for f in family_of(card.architecture).upstream)
    (source,) = weight_sources(card)
    assert (source.status, source.path, source.sha256) == ("unverified", None, None)


def test_feta_weights_are_the_file_upstream_links():
    (entry,) = zoo_card("feta-uxnet").weights
    assert "id=1AqJMIM2w8OGGiN1FonmZqNoRHd2x5fTL&" in entry["url"]  # MASILab/3DUX-Net README at 14ea46b


@pytest.mark.parametrize("name", CARDS)
def test_softmax_outputs_become_labels_zero_to_n_minus_one(name):
    """Voxel k has class k winning; a voxel where background wins over classes above the sigmoid threshold
    stays 0, and so does a voxel outside the cropped box (all probabilities 0 after inverting the crop)."""
    card = zoo_card(name)
    classes = len(card.outputs)
    voxels = classes + 2
    probabilities = np.full((classes, voxels, 1, 1), 0.1 / classes, np.float32)
    for k in range(classes):
        probabilities[k, k] = 0.9
    probabilities[:, classes] = 0.6
    probabilities[0, classes] = 0.7  # background wins although every class is above 0.5
    probabilities[:, classes + 1] = 0.0  # outside the crop
    labels = labels_from_probabilities(probabilities, card.outputs, card.label_rules(), card.activation,
                                       card.threshold)
    assert labels.dtype == np.uint8
    assert labels[:, 0, 0].tolist() == [*range(classes), 0, 0]


def _invoke(*args: str):
    result = runner.invoke(app, list(args), env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80, result.output
    return lines


def test_models_list_shows_every_card_within_80_columns():
    lines = _invoke("models", "list")
    names = {line.split()[0] for line in lines[1:] if line[:1].strip()}
    assert set(zoo_names()) <= names and set(CARDS) <= names
    for name in CARDS:
        row = next(line for line in lines if line.startswith(name + " "))
        assert row.split()[-2:] == ["0/1", "no"]  # not downloaded, no published checksum


@pytest.mark.parametrize(("name", "shown"), [
    ("feta-uxnet", ["t2w (t2)", "UXNET", "53.0 M", "window 0..1000", "softmax", "7: Brainstem",
                    "drive.usercontent.google.com", "unverified"]),
    ("amos-repuxnet", ["ct", "REPUXNET", "65.8 M", "1.5 × 1.5 × 2 mm", "no crop", "window -125..275",
                       "15: Prostate", "unverified"]),
])
def test_models_info_within_80_columns(name, shown):
    text = " ".join(" ".join(_invoke("models", "info", name)).split())
    assert text.startswith(f"{name}: ")
    for part in shown:
        assert part in text, part
