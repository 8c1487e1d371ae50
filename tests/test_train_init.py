"""`factorizer train --init`: a run starts from exactly the pretrained weights (a pretrain package, an
upstream checkpoint, the zoo's Semantic Genesis), one-channel inputs inflated, a mismatch refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from factorizer_cli import phantom
from factorizer_cli.cli import app
from factorizer_cli.errors import ConfigError, LicenseError
from factorizer_cli.genesis.transfer import Initialisation, load_initialisation
from factorizer_cli.nn.unet3d import UNet3D, YNet3D
from factorizer_cli.zoo.card import ModelCard
from factorizer_cli.zoo.package import save_package
from factorizer_cli.zoo.registry import zoo_card
from tests.oracle import BRATS_INPUTS
from tests.test_train import TINY_ARCHITECTURE

runner = CliRunner()
FIRST_CONV = "down_tr64.ops.0.conv1.weight"
PRETRAINED = {"class": "YNet3D", "n_class": 1, "in_channels": 1, "cls_classes": 5, "base_width": 4,
              "norm": "batch", "act": "relu", "lst_act": "soft"}


@pytest.fixture(autouse=True)
def _private_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORIZER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FACTORIZER_ACCEPT_LICENSE", raising=False)


def pretrained_package(folder: Path, seed: int = 1) -> dict[str, torch.Tensor]:
    """A YNet3D package as `pretrain` writes one (random weights, its BatchNorm statistics moved off 0/1)."""
    torch.manual_seed(seed)
    network = YNet3D(1, cls_classes=5, base_width=4, norm="batch")
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    card = ModelCard.from_dict({"name": "pretrained", "inputs": [{"name": "t1"}], "roi": [16, 16, 16],
                                "spacing": [1.0, 1.0, 1.0], "outputs": ["restored_t1"], "labels": [],
                                "architecture": PRETRAINED})
    save_package(folder, card, [network.state_dict()])
    return {k: v.clone() for k, v in network.state_dict().items()}


def unet_card(path: Path, base_width: int = 4, architecture: dict | None = None) -> Path:
    card = {"name": "unet", "task": "test", "inputs": BRATS_INPUTS, "spacing": [1.0, 1.0, 1.0], "roi": [16, 16, 16],
            "outputs": ["WT", "TC", "ET"], "crop_margin_mm": 2.0,
            "labels": [{"region": "WT", "label": 2}, {"region": "TC", "label": 1}, {"region": "ET", "label": 3}],
            "architecture": architecture or {"class": "UNet3D", "n_class": 3, "in_channels": 4,
                                             "base_width": base_width, "norm": "batch"}}
    path.write_text(json.dumps(card))
    return path


def write_cases(root: Path, cases: int = 3) -> Path:
    for i in range(cases):
        phantom.write_case(phantom.generate(0, i, shape=(28, 32, 24)), root, phantom.case_id(0, i))
    return root


def _train(data: Path, card: Path, run: Path, *extra: str):
    return runner.invoke(app, ["train", str(data), "--card", str(card), "-o", str(run), "--steps", "1",
                               "--validation-cases", "1", "--threads", "1", "--quiet", *extra])


def test_a_run_starts_from_exactly_the_pretrained_weights(tmp_path):
    pretrained = pretrained_package(tmp_path / "pre" / "model")
    data, card = write_cases(tmp_path / "data"), unet_card(tmp_path / "card.json")
    # a learning rate of 0: the one step leaves every parameter where the run started
    result = _train(data, card, tmp_path / "run", "--init", str(tmp_path / "pre"), "--learning-rate", "0",
                    "--warmup-steps", "0")
    assert result.exit_code == 0, result.output
    assert f"initialised from {tmp_path / 'pre'}: 104 of 106 tensors of the UNet3D" in result.output
    assert f"inflated {FIRST_CONV} from 1 to 4 input channels" in result.output
    assert "out_tr.final_conv.weight ((3, 8, 1, 1, 1) here, (1, 8, 1, 1, 1) there)" in result.output
    assert "clc_out.* (" in result.output  # the classification head, left out

    trained = load_file(tmp_path / "run" / "last" / "model.safetensors")
    torch.manual_seed(0)  # the run's seed: what it builds before --init
    scratch = UNet3D(3, base_width=4, in_channels=4, norm="batch").state_dict()
    parameters = dict(UNet3D(3, base_width=4, in_channels=4, norm="batch").named_parameters())
    for name in parameters:
        if name == FIRST_CONV:
            expected = pretrained[name].repeat(1, 4, 1, 1, 1) / 4
        elif name.startswith("out_tr."):
            expected = scratch[name]
        else:
            expected = pretrained[name]
        torch.testing.assert_close(trained[name], expected, rtol=0, atol=0, msg=name)
    provenance = json.loads((tmp_path / "run" / "last" / "card.json").read_text())["provenance"]
    assert f'"init": "{tmp_path / "pre"}"' in provenance


def test_inflation_keeps_the_response_to_equal_channels():
    torch.manual_seed(0)
    single = UNet3D(1, base_width=4, norm="batch").eval()
    several = UNet3D(1, base_width=4, in_channels=3, norm="batch").eval()
    transfer = Initialisation("single", weights=single.state_dict()).apply(several)
    assert transfer.inflated == ((FIRST_CONV, 1, 3),) and transfer.share == 1.0 and not transfer.kept
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(several.predict(x.repeat(1, 3, 1, 1, 1)), single.predict(x), rtol=1e-5, atol=1e-5)


def test_a_mismatched_init_is_refused_in_one_line_before_any_case_is_read(tmp_path):
    pretrained_package(tmp_path / "pre" / "model")
    data = write_cases(tmp_path / "data", 2)
    factorizer = unet_card(tmp_path / "factorizer.json", architecture=TINY_ARCHITECTURE)
    result = _train(data, factorizer, tmp_path / "run", "--init", str(tmp_path / "pre" / "model"))
    assert result.exit_code == 2
    assert "only 0% of the SegmentationFactorizer's parameters" in result.output
    assert "the YNet3D of the checkpoint" in result.output and len(result.output.strip().splitlines()) <= 3
    assert not (tmp_path / "run").exists() and not (tmp_path / "home" / "train-cache").exists()

    wider = unet_card(tmp_path / "wide.json", base_width=8)  # the same names, other shapes
    result = _train(data, wider, tmp_path / "run", "--init", str(tmp_path / "pre"))
    assert result.exit_code == 2 and "only 0% of the UNet3D's parameters" in result.output

    result = _train(data, wider, tmp_path / "run", "--init", "no-such-model")
    assert result.exit_code == 2 and "not a model folder, a pretrain run, a checkpoint file" in result.output


def _upstream_checkpoint(path: Path, network: torch.nn.Module) -> Path:
    """The layout of Semantic Genesis' pytorch/train.py: DataParallel keys, NumPy scalars beside them."""
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in network.state_dict().items()},
                "optimizer_state_dict": {}, "num_epoch_no_improvement": 0, "best_loss": np.float64(0.25),
                "best_acc": np.float64(0.5)}, path)
    return path


def test_an_upstream_checkpoint_initialises_a_unet_of_several_modalities(tmp_path):
    torch.manual_seed(2)
    upstream = YNet3D(1, cls_classes=44, base_width=4)  # norm "cont", as upstream trains
    init = load_initialisation(_upstream_checkpoint(tmp_path / "semantic_genesis.pt", upstream))
    network = UNet3D(2, base_width=4, in_channels=2, norm="batch")
    transfer = init.apply(network)
    state = network.state_dict()
    assert transfer.inflated == ((FIRST_CONV, 1, 2),)
    assert [name for name, _ in transfer.kept] == ["out_tr.final_conv.weight", "out_tr.final_conv.bias"]
    assert transfer.unused == ()  # the genesis family's reader drops clc_out.* for a UNet3D itself
    for name, value in upstream.state_dict().items():
        if name in state and not name.startswith(("out_tr.", "down_tr64.ops.0.conv1.weight")):
            assert torch.equal(state[name], value), name


def test_the_zoo_semantic_genesis_card_initialises_once_its_licence_is_accepted(tmp_path):
    card = zoo_card("semantic-genesis-chest-ct")
    assert dict(card.architecture) == {"class": "UNet3D", "n_class": 1, "act": "relu", "base_width": 32,
                                       "in_channels": 1, "norm": "cont"}
    assert card.weights[0]["url"].startswith("https://zenodo.org/record/4625297/files/semantic_genesis_chest_ct.pt")
    assert card.weights[0]["sha256"] is None and "non-commercial" in card.license
    with pytest.raises(LicenseError, match="--accept-license"):
        load_initialisation("semantic-genesis-chest-ct")

    # The published file is not fetched in tests: one of its layout (YNet3D, width 32) waits in the cache.
    torch.manual_seed(3)
    with torch.device("meta"):
        published = YNet3D(1, cls_classes=44, base_width=32)
    weights = {k: torch.rand(v.shape) if v.is_floating_point() else torch.zeros((), dtype=v.dtype)
               for k, v in published.state_dict().items() if not k.startswith("clc_out.")}
    weights["clc_out.fc1.bias"] = torch.rand(44)  # a head that must be dropped
    download = tmp_path / "home" / "downloads" / "semantic-genesis-chest-ct" / "semantic_genesis_chest_ct.pt"
    download.parent.mkdir(parents=True)
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in weights.items()},
                "best_loss": np.float64(0.1)}, download)
    init = load_initialisation("semantic-genesis-chest-ct", accept_license=True)
    assert init.architecture == "UNet3D"
    with torch.device("meta"):
        network = UNet3D(3, base_width=32, in_channels=4, norm="batch")
    transfer, tensors = init.plan(network)
    assert transfer.inflated == ((FIRST_CONV, 1, 4),) and transfer.share > 0.99
    torch.testing.assert_close(tensors[FIRST_CONV], weights[FIRST_CONV].repeat(1, 4, 1, 1, 1) / 4)
    assert torch.equal(tensors["up_tr64.ops.1.conv1.weight"], weights["up_tr64.ops.1.conv1.weight"])


def test_too_little_of_a_network_fitting_is_a_config_error():
    torch.manual_seed(0)
    source = UNet3D(1, base_width=4).state_dict()
    partial = {k: v for k, v in source.items() if k.startswith("down_tr64.")}  # a sliver of the network
    with pytest.raises(ConfigError, match=r"only \d+% of the UNet3D's parameters .* at least 50% must"):
        Initialisation("partial", weights=partial).apply(UNet3D(1, base_width=4))


def test_a_pretrain_run_initialises_a_fine_tuning_run(tmp_path):
    data = write_cases(tmp_path / "data")
    pretrained = runner.invoke(app, ["pretrain", str(data), "-o", str(tmp_path / "pre"), "--no-register",
                                     "--modality", "t1", "--cube-size", "16", "16", "16", "--classes", "2",
                                     "--base-width", "4", "--batch-size", "2", "--steps", "2", "--threads", "1",
                                     "--quiet"])
    assert pretrained.exit_code == 0, pretrained.output
    result = _train(data, unet_card(tmp_path / "card.json"), tmp_path / "run", "--init", str(tmp_path / "pre"))
    assert result.exit_code == 0, result.output
    assert "104 of 106 tensors of the UNet3D" in result.output and "from 1 to 4 input channels" in result.output


def test_segment_refuses_an_initialisation(tmp_path):
    """A pretrained package restores cubes: `segment` says to fine-tune it instead of writing a label map."""
    from factorizer_cli.pipeline.segment import Segmenter
    from factorizer_cli.zoo.package import open_package

    pretrained_package(tmp_path / "pretrained")
    package = open_package(tmp_path / "pretrained")
    card = ModelCard.from_dict({**package.card.to_dict(), "role": "initialisation"})
    assert ModelCard.from_dict(card.to_dict()).role == "initialisation"
    assert "role" not in ModelCard.from_dict({**card.to_dict(), "role": "segmentation"}).to_dict()
    package = save_package(tmp_path / "init", card, [load_file(next((tmp_path / "pretrained").glob("*.safetensors")))])
    with pytest.raises(ConfigError, match="--init pretrained"):
        Segmenter(package)
    assert zoo_card("semantic-genesis-chest-ct").role == "initialisation"
