"""Parity of SPiN with upstream (alexklwong/subpixel-embedding-segmentation at aa3ac95), through the one
door (``zoo.load_upstream``).

Fixtures made by running upstream (``../shared/fixtures/spin``, beside ``FIXTURES``; its README says
how): a small configuration at ATLAS's odd slice size 197×233 with trained BatchNorm statistics, its
checkpoint exactly as upstream writes it, both outputs; and the published configuration's state-dict
keys, shapes and parameter count.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from safetensors.torch import load_file

from factorizer_cli.errors import CheckpointError, ConfigError
from factorizer_cli.families import build, family_of
from factorizer_cli.families.spin import MODULES
from factorizer_cli.nn.spin import SPiNModel
from factorizer_cli.safe_pickle import load_checkpoint
from factorizer_cli.zoo import load_upstream

from .conftest import FIXTURES

SPIN = FIXTURES.parent / "spin"  # ../shared/fixtures/spin by default, like the other upstream fixtures
ARGS = tuple(inspect.signature(SPiNModel).parameters)


def _meta(name: str) -> dict:
    path = SPIN / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"SPiN parity fixtures not found at {SPIN} (they sit beside the clone in CI; set "
                    "FACTORIZER_FIXTURES to their sibling 'upstream' folder to run these tests)")
    return json.loads(path.read_text())


def _config(meta: dict, **changes) -> dict:
    return {"class": "SPiNModel", **{k: meta[k] for k in ARGS}, **changes}


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.detach() - b).abs().max().item()


def test_small_fixture_matches_both_outputs():
    meta = _meta("spin_small_seed0")
    model = load_upstream(SPIN / meta["checkpoint"], _config(meta))
    assert isinstance(model, SPiNModel) and not model.training
    assert family_of(model).name == "spin"
    assert sum(p.numel() for p in model.parameters()) == meta["num_parameters"]
    io = load_file(SPIN / "spin_small_seed0.io.safetensors")
    assert list(io["input"].shape) == meta["input_shape"]
    with torch.no_grad():
        out2x, out1x = model(io["input"])
        predicted = model.predict(io["input"])
    errors = {"output0": _err(out2x, io["output0"]), "output1": _err(out1x, io["output1"])}
    assert list(out1x.shape) == meta["output_shape"]
    assert max(errors.values()) <= 1e-4, f"max abs errors {errors}"
    assert torch.equal(predicted, out1x)


def test_published_configuration_has_upstreams_keys_shapes_and_parameter_count():
    meta = _meta("spin_published_keys")
    model = build(_config(meta))
    assert sum(p.numel() for p in model.parameters()) == meta["num_parameters"] == 5_263_808
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = {f"{name}.{k}": shape for name in MODULES for k, shape in meta[f"{name}_state_dict"].items()}
    assert ours == theirs


def test_published_configuration_runs_at_atlas_slice_size():
    meta = _meta("spin_published_keys")
    model = build(_config(meta)).eval()
    with torch.no_grad():
        out2x, out1x = model(torch.randn(1, 5, 1, 197, 233))  # upstream's N × C × 1 × H × W is taken too
    assert out2x.shape == (1, 1, 394, 466) and out1x.shape == (1, 1, 197, 233)


@pytest.mark.parametrize(("change", "blocks"), [({"encoder_type_segmentation": ["resnet34"]}, "blocks5.2."),
                                                ({"encoder_type_subpixel_embedding": ["resnet7_subpixel_embedding"]},
                                                 "blocks.2.")])
def test_named_alternatives_build_and_run(change, blocks):
    meta = _meta("spin_small_seed0")
    model = build(_config(meta, **change)).eval()
    assert any(blocks in k for k in model.state_dict())
    with torch.no_grad():
        out2x, out1x = model(torch.randn(1, 5, 37, 45))
    assert out2x.shape == (1, 1, 74, 90) and out1x.shape == (1, 1, 37, 45)


@pytest.mark.parametrize("change", [{"encoder_type_segmentation": ["resnet50"]},
                                    {"activation_func": "relu"},
                                    {"use_batch_norm": False},
                                    {"decoder_type_segmentation": ["subpixel_guidance"]},
                                    {"n_filters_decoder_segmentation": [8, 8]},
                                    {"resolutions_subpixel_guidance": [0, 0]}])
def test_unsupported_options_are_refused_in_one_line(change):
    meta = _meta("spin_small_seed0")
    with pytest.raises(ConfigError) as err:
        build(_config(meta, **change))
    message = str(err.value)
    assert "\n" not in message and next(iter(change)) in message


def _write_checkpoint(tmp_path, edit) -> str:
    checkpoint = load_checkpoint(SPIN / "spin_small_seed0.pth")
    edit(checkpoint)
    path = tmp_path / "edited.pth"
    torch.save(checkpoint, path)
    return path


def _widen_output(checkpoint: dict) -> None:
    checkpoint["decoder_segmentation_state_dict"]["output.conv.weight"] = torch.zeros(2, 8, 3, 3)


def _drop_guidance(checkpoint: dict) -> None:
    del checkpoint["subpixel_guidance_state_dict"]


@pytest.mark.parametrize(("edit", "says"), [(_widen_output, "decoder_segmentation.output.conv.weight"),
                                            (_drop_guidance, "subpixel_guidance_state_dict missing")])
def test_checkpoint_that_does_not_fit_is_refused_naming_the_file(tmp_path, edit, says):
    meta = _meta("spin_small_seed0")
    path = _write_checkpoint(tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        load_upstream(path, _config(meta))
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)) and says in message
