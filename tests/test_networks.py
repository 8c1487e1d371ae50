"""Blocks and networks: the seed README's API, shapes, and errors that name what was expected."""

import pytest
import torch
from torch import nn

import factorizer_cli as ft
from factorizer_cli.errors import ConfigError, InputShapeError

NMF_SPEC = (
    ft.FactorizerSubblock,
    {
        "tensorize": (ft.SWMatricize, {"head_dim": 8, "patch_size": 4}),
        "act": nn.ReLU,
        "factorize": ft.NMF,
        "rank": 1,
        "num_iters": 5,
        "init": "uniform",
        "solver": "hals",
        "dropout": 0.1,
    },
)


def small_segmentation_factorizer(**overrides):
    kwargs = dict(
        in_channels=4, out_channels=3, spatial_size=(32, 32, 32), encoder_depth=(1, 1, 1, 1),
        encoder_width=(8, 16, 32, 64), strides=(1, 2, 2, 2), decoder_depth=(1, 1, 1),
        stem=(nn.Conv3d, {"kernel_size": 3, "padding": 1, "bias": False}),
        downsample=(nn.Conv3d, {"kernel_size": 2, "bias": False}),
        upsample=(nn.ConvTranspose3d, {"kernel_size": 2}), head=(nn.Conv3d, {"kernel_size": 1}),
        num_deep_supr=3, dropout=0.1, nmf=NMF_SPEC, mlp=(ft.MLP, {"ratio": 2, "dropout": 0.1}),
    )
    kwargs.update(overrides)
    return ft.SegmentationFactorizer(**kwargs)


def test_deep_supervision_heads_and_predict():
    torch.manual_seed(0)
    net = small_segmentation_factorizer().eval()
    x = torch.rand(2, 4, 32, 32, 32)
    with torch.no_grad():
        y = net(x)
        full = net.predict(x)
    assert [t.shape for t in y] == [(2, 3, 32, 32, 32), (2, 3, 16, 16, 16), (2, 3, 8, 8, 8)]
    torch.testing.assert_close(full, y[0])


def test_training_step_reaches_every_parameter():
    torch.manual_seed(0)
    net = small_segmentation_factorizer(num_deep_supr=2).train()
    y = net(torch.rand(1, 4, 32, 32, 32))
    sum(t.mean() for t in y).backward()
    without_grad = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert without_grad == []


def test_inference_path_matches_training_path_in_eval_mode():
    torch.manual_seed(0)
    net = small_segmentation_factorizer().eval()
    x = torch.rand(1, 4, 32, 32, 32)
    with torch.no_grad():
        fast = net.predict(x)
    slow = net.predict(x)  # grad enabled: textbook NMF iterations, out-of-place sums
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-4, atol=1e-5)


def test_fewer_nmf_iterations_at_inference_changes_the_output_but_keeps_shapes():
    torch.manual_seed(0)
    net = small_segmentation_factorizer().eval()
    x = torch.rand(1, 4, 32, 32, 32)
    with torch.no_grad():
        five = net.predict(x)
        for module in net.modules():
            if isinstance(module, ft.NMF):
                module.num_iters = 1
        one = net.predict(x)
    assert one.shape == five.shape and not torch.allclose(one, five)


def test_wrong_input_names_the_expected_shape():
    net = small_segmentation_factorizer().eval()
    with pytest.raises(InputShapeError, match=r"4 channels, spatial size \(32, 32, 32\)"):
        net(torch.rand(1, 3, 32, 32, 32))
    with pytest.raises(InputShapeError, match=r"expects input of shape \(batch, 4, 32, 32, 32\)"):
        net(torch.rand(1, 4, 48, 32, 32))


def test_spatial_size_that_the_strides_cannot_take():
    with pytest.raises(ConfigError, match="multiple of the total stride 8"):
        small_segmentation_factorizer(spatial_size=(36, 32, 32))


def test_factorizer_bundle_network_single_head():
    torch.manual_seed(0)
    net = ft.Factorizer(
        in_channels=4, out_channels=3, spatial_size=(32, 32, 32), encoder_width=(8, 16, 32, 64),
        encoder_depth=(1, 1, 1, 1), strides=(1, 2, 2, 2), decoder_depth=(1, 1, 1),
        reshape=(ft.SWMatricize, {"head_dim": 8, "patch_size": 4}), act=nn.ReLU, factorize=ft.NMF,
        rank=1, mlp_ratio=4,
    ).eval()
    with torch.no_grad():
        y = net(torch.rand(1, 4, 32, 32, 32))
    assert isinstance(y, torch.Tensor) and y.shape == (1, 3, 32, 32, 32)
    keys = net.state_dict().keys()
    assert "encoder.blocks.0.block.blocks.0.fact.factorize.init.u0" in keys and "head.weight" in keys


def test_config_builder_rejects_unknown_classes_with_the_known_ones():
    with pytest.raises(ConfigError, match="unknown class 'Transformer' at config.nmf.*SegmentationFactorizer"):
        ft.build({"class": "SegmentationFactorizer", "in_channels": 1, "out_channels": 1,
                  "spatial_size": [32, 32, 32], "nmf": {"class": "Transformer"}})
    with pytest.raises(ConfigError, match="cannot build NMF"):
        ft.build({"class": "NMF", "size": [8, 8], "ranks": 3})


def test_half_precision_inputs_stay_finite_where_a_window_is_all_zero():
    nmf = ft.NMF((8, 64), rank=1, solver="hals")
    nmf.input_is_nonnegative = True
    x = torch.rand(4, 8, 64)
    x[1] = 0  # eps underflows to 0 in fp16: 0/0 unless NMF runs in float32
    for dtype in (torch.float16, torch.bfloat16):
        with torch.no_grad():
            y = nmf(x.to(dtype))
        assert y.dtype == dtype and torch.isfinite(y).all()
        torch.testing.assert_close(y.float(), nmf(x), atol=1e-2, rtol=1e-2)


def test_network_runs_under_autocast():
    """Mixed precision (bf16 autocast on the CPU stands in for CUDA's fp16): no dtype clashes."""
    torch.manual_seed(0)
    net = small_segmentation_factorizer().eval()
    x = torch.rand(1, 4, 32, 32, 32)
    with torch.no_grad():
        reference = net.predict(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = net.predict(x)
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed.float(), reference, atol=0.1, rtol=0.1)


def test_dropout_still_acts_in_training_mode_without_autograd():
    torch.manual_seed(0)
    net = small_segmentation_factorizer().train()
    x = torch.rand(1, 4, 32, 32, 32)
    with torch.no_grad():
        a, b = net.predict(x), net.predict(x)
    assert not torch.allclose(a, b), "MC dropout: two passes in train mode must differ"
