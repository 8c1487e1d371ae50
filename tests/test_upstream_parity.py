"""Parity with upstream Factorizer: every fixture checkpoint, every output head, within 1e-4."""

import pytest
import torch
from safetensors.torch import load_file

from factorizer_cli.families.factorizer import config_from_hparams
from factorizer_cli.safe_pickle import load_checkpoint
from factorizer_cli.zoo import load_upstream

from .conftest import FIXTURE_NAMES, FIXTURES, fixture_meta


def _outputs(model, x):
    out = model(x)
    return out if isinstance(out, list) else [out]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("autograd", [False, True], ids=["inference", "autograd"])
def test_fixture_outputs_and_parameter_count(name, autograd):
    meta = fixture_meta(name)
    model = load_upstream(FIXTURES / meta["checkpoint"], meta["config"])
    assert sum(p.numel() for p in model.parameters()) == meta["num_parameters"]
    io = load_file(FIXTURES / f"{name}.io.safetensors")
    with torch.set_grad_enabled(autograd):
        outputs = _outputs(model, io["input"])
    assert [tuple(o.shape) for o in outputs] == [tuple(s) for s in meta["outputs"]]
    for i, out in enumerate(outputs):
        expected = io[f"output{i}"]
        err = (out.detach() - expected).abs().max().item()
        assert err <= 1e-4, f"{name} head {i}: max abs error {err:.3g}"


def test_lightning_checkpoint_describes_its_own_network():
    meta = fixture_meta("v001_small_seed0")
    config = config_from_hparams(load_checkpoint(FIXTURES / meta["checkpoint"]))
    assert config["class"] == "SegmentationFactorizer"
    assert config["nmf"]["tensorize"] == {"class": "SWMatricize", "head_dim": 8, "patch_size": 4,
                                          "shifts": [None, 1, 2, 3]}
    model = load_upstream(FIXTURES / meta["checkpoint"])  # no config given
    io = load_file(FIXTURES / "v001_small_seed0.io.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(io["input"])[0], io["output0"], atol=1e-4, rtol=0)
