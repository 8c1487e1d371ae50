"""Parity of 3D UX-Net and 3D RepUX-Net with upstream, through the one door (``zoo.load_upstream``).

Fixtures made by running upstream (``../shared/fixtures/uxnet`` and ``../shared/fixtures/repuxnet``,
beside ``FIXTURES``; their READMEs say how): outputs and encoder stage outputs of every fixture,
parameter counts, the published configurations' state-dict keys, and RepUX-Net's training form with
Bayesian frequency re-parameterisation as intended (the same kernel W ⊙ BFM on every call, the
gradient reaching W, ``reparameterize()`` giving upstream's effective weights).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import factorizer_cli.families.uxnet  # noqa: F401  (registers the family until families/__init__ does)
from factorizer_cli.errors import CheckpointError
from factorizer_cli.families import build, family_of
from factorizer_cli.nn.uxnet import REPUXNET, UXNET, BFRConv3d
from factorizer_cli.safe_pickle import load_checkpoint
from factorizer_cli.zoo import load_upstream

from .conftest import FIXTURES

ROOT = FIXTURES.parent  # ../shared/fixtures: the upstream Factorizer fixtures' siblings
UXNET_ARGS = ("in_chans", "out_chans", "depths", "feat_size", "drop_path_rate", "layer_scale_init_value",
              "hidden_size", "norm_name", "conv_block", "res_block", "spatial_dims")
REPUXNET_ARGS = (*UXNET_ARGS, "ks", "a", "deploy")


def _meta(folder: str, name: str) -> dict:
    path = ROOT / folder / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"3D UX-Net / RepUX-Net parity fixtures not found at {path.parent} (they sit beside the "
                    "clone in CI; set FACTORIZER_FIXTURES to their sibling 'upstream' folder to run these tests)")
    return json.loads(path.read_text())


def _config(meta: dict, **changes) -> dict:
    names = UXNET_ARGS if meta["class"] == "UXNET" else REPUXNET_ARGS
    return {"class": meta["class"], **{k: meta[k] for k in names}, **changes}


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs error relative to the expected tensor's largest magnitude.

    Relative because float32 rounding grows with the values: the same code on another CPU (other
    SIMD width, other reduction order) lands a few ulps of the output's scale away from the fixture."""
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return ((a.detach() - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def _check_fixture(folder: str, name: str, tol: float) -> None:
    meta = _meta(folder, name)
    model = load_upstream(ROOT / folder / meta["checkpoint"], _config(meta))
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == meta["num_parameters"]
    io = load_file(ROOT / folder / meta["io"])
    with torch.no_grad():
        stages = model.backbone(io["input"])
        out = model(io["input"])
    assert list(out.shape) == meta["output_shape"]
    errors = {f"encoder_out{i}": _err(s, io[f"encoder_out{i}"]) for i, s in enumerate(stages)
              if f"encoder_out{i}" in io}
    errors["output"] = _err(out, io["output"])
    assert max(errors.values()) <= tol, f"{name}: max errors relative to scale {errors}"


@pytest.mark.parametrize("name", ["uxnet_small_seed0", "uxnet_feta_seed0"])
def test_uxnet_fixtures(name):
    _check_fixture("uxnet", name, 1e-5)  # CI measured 1.9e-6 of the output scale


@pytest.mark.parametrize("name", ["repuxnet_small_seed0", "repuxnet_k21_seed0"])
def test_repuxnet_inference_fixtures(name):
    _check_fixture("repuxnet", name, 1e-4)


@pytest.mark.parametrize(("folder", "deploy"), [("uxnet", None), ("repuxnet", True), ("repuxnet", False)])
def test_published_configurations_have_upstreams_keys_and_parameter_counts(folder, deploy):
    meta = _meta(folder, f"{folder}_published_keys")
    changes = {} if deploy is None else {"deploy": deploy}
    with torch.device("meta"):
        model = build(_config(meta, **changes))
        by_classes = {label: build(_config(meta, out_chans=int(label.split()[0]), **changes))
                      for label in meta["num_parameters_by_out_chans"]}
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert ours == meta["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == meta["num_parameters"]
    assert {label: sum(p.numel() for p in m.parameters()) for label, m in by_classes.items()} \
        == meta["num_parameters_by_out_chans"]


# --- RepUX-Net's training form (Bayesian frequency re-parameterisation) ------------------------------

BFR = "repuxnet_bfr_train_seed0"


@pytest.fixture()
def bfr():
    meta = _meta("repuxnet", BFR)
    assert meta["deploy"] is False
    io = load_file(ROOT / "repuxnet" / meta["io"])
    # Upstream checkpoints hold effective kernels: upstream's state after its first call is W0 ⊙ BFM.
    model = load_upstream(ROOT / "repuxnet" / meta["reparam_checkpoint"], _config(meta))
    return meta, io, model


def _dwconvs(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if name.endswith(".dwconv")}


def test_training_form_matches_upstreams_first_call_on_every_call(bfr):
    meta, io, model = bfr
    convs = _dwconvs(model)
    assert convs and all(isinstance(m, BFRConv3d) for m in convs.values())
    assert all(torch.equal(m.bfm[0, 0], io["bfm"]) for m in convs.values())
    latent = {name: m.weight.detach().clone() for name, m in convs.items()}
    with torch.no_grad():
        first, second = model(io["input"]), model(io["input"])
    assert _err(first, io["output"]) <= 1e-5
    assert torch.equal(second, first)  # no compounding: upstream's second call differs
    assert _err(io["output_second_call"], io["output"]) > 1e-3  # (which this fixture would show)
    assert all(torch.equal(m.weight, latent[name]) for name, m in convs.items())
    # Loaded as latent W = stored / BFM: upstream's own W0, up to rounding.
    w0 = load_checkpoint(ROOT / "repuxnet" / meta["checkpoint"])
    for name, m in convs.items():
        torch.testing.assert_close(m.weight.detach(), w0[f"{name}.weight"], rtol=1e-6, atol=1e-12)


def test_training_form_from_latent_weights_matches_upstream(bfr):
    meta, io, _ = bfr
    model = build(_config(meta))
    model.load_state_dict(load_checkpoint(ROOT / "repuxnet" / meta["checkpoint"]))  # W0, our own layout
    with torch.no_grad():
        assert _err(model.eval()(io["input"]), io["output"]) <= 1e-5


def test_reparameterize_gives_upstreams_effective_weights_and_output(bfr):
    meta, io, model = bfr
    with torch.no_grad():
        trained = model(io["input"])
    prepared = family_of(model).prepare(copy.deepcopy(model))  # the fastest form, checked below
    assert model.reparameterize() is model and model.deploy
    assert not any(isinstance(m, BFRConv3d) for m in model.modules())
    expected = load_checkpoint(ROOT / "repuxnet" / meta["reparam_checkpoint"])
    state = model.state_dict()
    assert list(state) == list(expected)
    for key in _dwconvs(model):
        assert _err(state[f"{key}.weight"], expected[f"{key}.weight"]) <= 1e-6, key
    with torch.no_grad():
        out = model(io["input"])
    assert _err(out, trained) <= 1e-5 and _err(out, io["output"]) <= 1e-5
    with torch.no_grad():  # BatchNorm folded, FFT, channels-last, in-place norms: the same function
        assert _err(prepared(io["input"]), io["output"]) <= 1e-5
    # the inference form loads upstream's checkpoint unchanged and computes the same
    deployed = load_upstream(ROOT / "repuxnet" / meta["reparam_checkpoint"], _config(meta, deploy=True))
    with torch.no_grad():
        assert _err(deployed(io["input"]), io["output"]) <= 1e-5


def test_backward_reaches_the_latent_depthwise_weights(bfr):
    _, io, model = bfr
    plain = copy.deepcopy(model).reparameterize()  # the same function with the effective kernels as weights
    convs, plain_convs = _dwconvs(model), _dwconvs(plain)
    params = {id(p) for p in model.parameters()}
    for network in (model, plain):
        network.train()(io["input"]).square().mean().backward()
    for name, m in convs.items():
        assert id(m.weight) in params, f"{name}: the optimiser's parameter was replaced"
        grad, centre = m.weight.grad, m.kernel_size[0] // 2
        assert grad is not None and grad[..., centre + 1, centre, centre].abs().min() > 0, name
        # d loss / d W = BFM ⊙ d loss / d (W ⊙ BFM)
        torch.testing.assert_close(grad, m.bfm * plain_convs[name].weight.grad, rtol=1e-4, atol=1e-9)
    assert {id(p) for p in model.parameters()} == params


def test_prepare_computes_the_same_function_for_uxnet_and_deployed_repuxnet():
    meta = _meta("uxnet", "uxnet_small_seed0")
    small = {**_config(meta), "depths": [1, 1, 1, 1], "feat_size": [8, 8, 8, 8], "hidden_size": 8}
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    for config in (small, {**small, "class": "REPUXNET", "ks": 21, "a": 1, "deploy": True},
                   {**small, "res_block": False}):  # basic blocks: the decoder concatenates as upstream
        model = build(config).eval()
        family = family_of(model)
        assert family.name == "uxnet" and family_of(config) is family
        with torch.no_grad():
            for name, tensor in model.state_dict().items():  # no norm may be an identity
                if "norm" in name and name.endswith(("running_mean", "bias")):
                    tensor.normal_(0, 0.1)
            expected = model(x)
            prepared = family.prepare(model)
            assert _err(prepared(x), expected) <= 1e-5
    assert isinstance(build(small), UXNET) and isinstance(build({**small, "class": "REPUXNET"}), REPUXNET)


def test_a_checkpoint_of_the_other_network_is_refused_with_one_line():
    meta = _meta("uxnet", "uxnet_small_seed0")
    path: Path = ROOT / "uxnet" / meta["checkpoint"]
    config = {**_config(meta), "class": "REPUXNET", "ks": 7, "a": 1, "deploy": True}
    with pytest.raises(CheckpointError, match='3D UX-Net checkpoint.*"class": "UXNET"'):
        load_upstream(path, config)
