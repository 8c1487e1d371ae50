"""`factorizer train` for softmax class models: class targets (postprocessing in reverse), Dice +
cross-entropy, per-class validation, and a RepUX-Net trained with BFR saved in its inference form."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import factorizer_cli
from factorizer_cli.api import TrainConfig
from factorizer_cli.api import train as run_training
from factorizer_cli.cli import app
from factorizer_cli.errors import ConfigError
from factorizer_cli.families import build
from factorizer_cli.nn.uxnet import BFRConv3d
from factorizer_cli.pipeline.postprocess import labels_from_probabilities
from factorizer_cli.train.data import (
    class_labels,
    find_training_cases,
    load_case,
    sample_batch,
    targets_of,
)
from factorizer_cli.train.inference_form import inference_form
from factorizer_cli.train.loss import deep_supervision_loss, dice_ce, one_hot
from factorizer_cli.train.state import STATE_FILE
from factorizer_cli.zoo.card import ModelCard
from factorizer_cli.zoo.package import open_package
from tests.oracle import BRATS_INPUTS
from tests.test_train import tiny_card, with_spacing, write_dataset


@pytest.fixture(autouse=True)
def _private_home(tmp_path, monkeypatch):
    """The training cache of each test in its own folder, never ~/.cache."""
    monkeypatch.setenv("FACTORIZER_HOME", str(tmp_path / "home"))


TINY_REPUXNET = {
    "class": "REPUXNET", "in_chans": 4, "out_chans": 4, "feat_size": [4, 8, 8, 16], "depths": [1, 1, 1, 1],
    "ks": 5, "a": 1, "hidden_size": 16, "deploy": False,
}
OUTPUTS = ["background", "NCR", "ED", "ET"]


def softmax_card(path: Path | None = None, outputs=OUTPUTS, spacing=1.0, crop: float | None = 2.0,
                 architecture=TINY_REPUXNET) -> ModelCard:
    data = {
        "name": "tiny-softmax", "task": "test", "inputs": BRATS_INPUTS, "roi": [32, 32, 32],
        "preprocessing": {"orientation": "RAS", "spacing": [spacing] * 3,
                          "crop_foreground": None if crop is None else {"margin_mm": crop},
                          "normalization": {"kind": "zscore_nonzero"}},
        "activation": "softmax", "outputs": list(outputs),
        "labels": [{"region": "NCR", "label": 1}, {"region": "ED", "label": 2}, {"region": "ET", "label": 3}],
        "label_conventions": {"brats2021": {"ET": 4}}, "architecture": architecture,
    }
    if path is not None:
        path.write_text(json.dumps(data))
    return ModelCard.from_dict(data)


def test_class_labels_invert_the_painting_rules():
    classes, background = class_labels(softmax_card(outputs=["ET", "background", "ED", "NCR"]))
    assert background == 1 and classes == [{3, 4}, set(), {2}, {1}]
    targets = targets_of(softmax_card())
    assert targets.background == 0 and targets.scored == ("NCR", "ED", "ET")


@pytest.mark.parametrize("outputs, problem", [
    (["background", "other", "NCR", "ED", "ET"], "exactly one output without a label rule"),
    (["NCR", "ED", "ET"], "exactly one output without a label rule"),
])
def test_softmax_cards_need_one_background(outputs, problem):
    with pytest.raises(ConfigError, match=problem):
        class_labels(softmax_card(outputs=outputs))


def test_a_label_value_of_two_classes_is_refused():
    card = softmax_card()
    card = ModelCard.from_dict({**card.to_dict(), "labels": [
        {"region": "NCR", "label": 1}, {"region": "ED", "label": 1}, {"region": "ET", "label": 3}]})
    with pytest.raises(ConfigError, match="label 1 is both 'NCR' and 'ED'"):
        class_labels(card)


@pytest.mark.parametrize("outputs", [OUTPUTS, ["ET", "background", "ED", "NCR"]])
def test_class_targets_are_postprocessing_in_reverse(tmp_path, outputs):
    """No crop, 1 mm, RAS: the target is the label map itself; painting it back gives the labels."""
    card = softmax_card(outputs=outputs, crop=None)
    name, files, label = find_training_cases(write_dataset(tmp_path / "data", 1), card)[0]
    case = load_case(name, files, label, card, targets_of(card))
    truth = np.asarray(nib.load(label).dataobj).astype(np.uint8)
    assert case.target.dtype == np.uint8 and case.target.shape == (1, *truth.shape)
    probabilities = one_hot(torch.from_numpy(case.target).long()[None], len(outputs))[0].numpy()
    assert set(np.unique(truth)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(labels_from_probabilities(probabilities, outputs, card.labels, "softmax"), truth)
    background = outputs.index("background")
    assert case.pad_value == background
    assert (case.target[0][tuple(case.foreground.T)] != background).all()


@pytest.mark.parametrize("codes, spacing", [("LPS", 1.0), ("PIR", 1.5)])
def test_class_targets_agree_with_the_region_targets(tmp_path, codes, spacing):
    """Reoriented, cropped and resampled, the classes make the same WT / TC / ET as the sigmoid path."""
    data = write_dataset(tmp_path / "data", 1, codes)
    regions_card = ModelCard.load(tiny_card(tmp_path / "card.json"))
    regions_card = with_spacing(regions_card, spacing)
    card = softmax_card(spacing=spacing)
    name, files, label = find_training_cases(data, card)[0]
    classes = load_case(name, files, label, card, targets_of(card)).target[0]
    regions = load_case(name, files, label, regions_card, targets_of(regions_card)).target
    from_classes = [classes != 0, np.isin(classes, [1, 3]), classes == 3]  # WT, TC, ET
    for made, region in zip(from_classes, regions):
        assert region.any()
        dice = 2 * (made & region).sum() / (made.sum() + region.sum())
        assert dice == 1.0 if spacing == 1.0 else dice > 0.9


def test_crops_beyond_the_volume_are_background(tmp_path):
    card = softmax_card(outputs=["ET", "background", "ED", "NCR"])
    name, files, label = find_training_cases(write_dataset(tmp_path / "data", 1), card)[0]
    case = load_case(name, files, label, card, targets_of(card))
    _, target = sample_batch([case], (40, 40, 40), 1, 0.0, np.random.default_rng(0))
    assert target.dtype == torch.int64 and target.shape == (1, 1, 40, 40, 40)
    grid = case.target.shape[1:]
    assert (target[0, 0, grid[0]:] == 1).all() and (target[0, 0, :, grid[1]:] == 1).all()


def test_dice_ce_is_monai_dice_ce_loss():
    """As 3D UX-Net and RepUX-Net train: DiceCELoss(to_onehot_y=True, softmax=True)."""
    monai_losses = pytest.importorskip("monai.losses")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 5, 7, generator=generator)
    classes = torch.randint(0, 4, (2, 1, 6, 5, 7), generator=generator)
    classes[1][classes[1] == 2] = 0  # a class absent from one crop
    expected = monai_losses.DiceCELoss(to_onehot_y=True, softmax=True)(logits, classes)
    torch.testing.assert_close(dice_ce(logits, one_hot(classes, 4)), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(deep_supervision_loss(logits, classes, "softmax"), expected, rtol=1e-5, atol=1e-6)


def test_softmax_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    network = build(TINY_REPUXNET).train()
    image = torch.randn(2, 4, 32, 32, 32)
    classes = torch.zeros(2, 1, 32, 32, 32, dtype=torch.long)
    classes[:, :, 8:24, 8:24, 8:24] = 2
    classes[:, :, 12:20, 12:20, 12:20] = 1
    classes[:, :, 14:18, 14:18, 14:18] = 3
    image[:, 3:] += 2 * (classes != 0)  # FLAIR bright on the tumour, as in BraTS
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = deep_supervision_loss(network(image), classes, "softmax")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(m.weight.grad is not None for m in network.modules() if isinstance(m, BFRConv3d))


def _training_network(run: Path, card: ModelCard) -> torch.nn.Module:
    """The network the run ended with, in its training form, from the resumable state."""
    network = build(dict(card.architecture))
    state = load_file(run / STATE_FILE)
    network.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
    return network.eval()


def test_a_repuxnet_trained_with_bfr_is_saved_reparameterised(tmp_path):
    card = softmax_card()
    data, run = write_dataset(tmp_path / "data", 2), tmp_path / "run"
    config = TrainConfig(steps=3, batch_size=1, warmup_steps=1, validation_cases=1, validate_every=3)
    result = run_training(data, card, run, config, device="cpu")
    assert result.steps == 3 and set(result.validation) == {"NCR", "ED", "ET"}
    log = (run / "train-log.csv").read_text().splitlines()
    assert log[0] == "step,loss,lr,seconds,dice_NCR,dice_ED,dice_ET" and len(log) == 4

    trained = _training_network(run, card)
    assert any(isinstance(m, BFRConv3d) for m in trained.modules())  # the state keeps the latent W
    x = torch.randn(1, 4, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained(x)
        folded = build(dict(card.architecture))
        folded.load_state_dict(trained.state_dict())
        torch.testing.assert_close(folded.eval().reparameterize()(x), expected, rtol=0, atol=1e-5)
    for kind in ("best", "last"):
        package = open_package(run / kind)
        assert package.card.architecture["deploy"] is True
        assert card.architecture["deploy"] is False  # the template card is left as it was
        (network,) = package.load_networks()
        assert not any(isinstance(m, BFRConv3d) for m in network.modules())
        with torch.no_grad():
            torch.testing.assert_close(network(x), expected, rtol=0, atol=1e-5)
    segmenter = factorizer_cli.load_segmenter(run / "best", overlap=0.25)
    segmentation = segmenter(sorted((data / "BraTS-GLI-00000-000").glob("*-t*")))
    assert segmentation.labels.shape == (24, 26, 22)
    assert set(np.unique(segmentation.labels)) <= {0, 1, 2, 3}


def test_networks_without_a_training_form_are_saved_as_they_are():
    network = build(TINY_REPUXNET | {"deploy": True})
    weights, architecture = inference_form(network, TINY_REPUXNET | {"deploy": True})
    assert architecture["deploy"] is True and weights.keys() == network.state_dict().keys()


class _Crash(Exception):
    pass


def test_a_crashed_softmax_run_resumes_exactly(tmp_path):
    """Killed (here: an exception) after its state at step 2 was saved, the run ends as one that was not."""
    card, data = softmax_card(), write_dataset(tmp_path / "data", 2)
    config = TrainConfig(steps=4, batch_size=1, warmup_steps=1, validation_cases=1, validate_every=2,
                         checkpoint_every=2)
    run_training(data, card, tmp_path / "whole", config, device="cpu")

    def crash(step, total, loss, validation):
        if step == 2:
            raise _Crash

    with pytest.raises(_Crash):
        run_training(data, card, tmp_path / "crashed", config, device="cpu", on_step=crash)
    run_training(data, card, tmp_path / "crashed", TrainConfig(steps=99), resume=True, device="cpu")
    whole, crashed = (load_file(tmp_path / r / STATE_FILE) for r in ("whole", "crashed"))
    assert whole.keys() == crashed.keys()
    for key in whole:
        torch.testing.assert_close(crashed[key], whole[key], rtol=0, atol=1e-6)
    def rows(run: str) -> list[list[str]]:  # every column but the seconds
        lines = (tmp_path / run / "train-log.csv").read_text().splitlines()[1:]
        return [line.split(",")[:3] + line.split(",")[4:] for line in lines]

    assert rows("crashed") == rows("whole") and len(rows("whole")) == 4


def test_a_network_with_other_outputs_than_the_card_is_one_line(tmp_path):
    card = softmax_card(tmp_path / "card.json", architecture=TINY_REPUXNET | {"out_chans": 3})
    result = CliRunner().invoke(app, ["train", str(write_dataset(tmp_path / "data", 2)), "--card",
                                      str(tmp_path / "card.json"), "-o", str(tmp_path / "run"), "--steps", "2",
                                      "--validation-cases", "1", "--quiet"])
    assert card.activation == "softmax" and result.exit_code == 2
    assert "the network gives 3 output channels, the card names 4 outputs" in result.output
