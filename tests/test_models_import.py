"""``factorizer models import``: upstream checkpoints become our package and give upstream's outputs."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from factorizer_cli.cli import app
from factorizer_cli.families import build, window_logits
from factorizer_cli.zoo import open_package
from factorizer_cli.zoo.card import ModelCard
from factorizer_cli.zoo.registry import zoo_card, zoo_names

from .conftest import FIXTURE_NAMES, FIXTURES, fixture_meta

runner = CliRunner()


def _card_for(meta: dict) -> dict:
    config = meta["config"]
    return {
        "name": f"fixture-{meta['reference']}", "task": "parity test",
        "inputs": [{"name": f"c{i}"} for i in range(config["in_channels"])],
        "spacing": [1, 1, 1], "roi": config["spatial_size"],
        "outputs": [f"o{i}" for i in range(config["out_channels"])],
        "labels": [{"region": f"o{i}", "label": i + 1} for i in range(config["out_channels"])],
        "architecture": config,
    }


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_import_reproduces_upstream_outputs(tmp_path, name):
    meta = fixture_meta(name)
    card_path = tmp_path / "card.json"
    card_path.write_text(json.dumps(_card_for(meta)))
    out = tmp_path / "package"
    result = runner.invoke(app, ["models", "import", str(FIXTURES / meta["checkpoint"]), "--card",
                                 str(card_path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["card.json", "model.safetensors"]
    package = open_package(out)
    assert package.card.weights[0]["sha256"] and package.card.weights[0]["format"] == "safetensors"
    (network,) = package.load_networks()
    assert sum(p.numel() for p in network.parameters()) == meta["num_parameters"]
    io = load_file(FIXTURES / f"{name}.io.safetensors")
    with torch.no_grad():
        outputs = network(io["input"])
    outputs = outputs if isinstance(outputs, list) else [outputs]
    for i, output in enumerate(outputs):
        assert (output - io[f"output{i}"]).abs().max().item() <= 1e-4


def test_import_refuses_a_checkpoint_that_does_not_fit_the_card(tmp_path):
    meta, other = fixture_meta("v002_small_seed0"), fixture_meta("head_small_seed0")
    card_path = tmp_path / "card.json"
    card_path.write_text(json.dumps(_card_for(other)))
    result = runner.invoke(app, ["models", "import", str(FIXTURES / meta["checkpoint"]), "--card",
                                 str(card_path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "does not fit" in result.output
    assert not (tmp_path / "out" / "card.json").exists()


@pytest.mark.parametrize("name", zoo_names())
def test_every_zoo_card_builds_and_names_real_sources(name):
    card = zoo_card(name)
    with torch.device("meta"):
        network = build(dict(card.architecture)).eval()
        if hasattr(network, "spatial_size"):  # sized at construction (Factorizer): the roi must be that size
            assert tuple(network.spatial_size) == tuple(card.roi)
        else:  # any size it can take: a window of the card's roi must give one output per voxel
            with torch.no_grad():
                out = window_logits(network, torch.empty(1, card.in_channels, *card.roi), card.slice_wise)
            assert tuple(out.shape) == (1, len(card.outputs), *card.roi)
    assert card.weights, "a zoo card must list its weights"
    for entry in card.weights:
        assert entry["source"] in ("hub", "url", "package")
        if entry["source"] == "hub":
            assert len(entry["revision"]) == 40, "hub sources are pinned to a commit"
        if entry["source"] == "url":
            assert entry["url"].startswith("https://")
    assert ModelCard.from_dict(card.to_dict()) == card
