"""The seed README's snippets, verbatim but for the import, with their documented results.

They run at the README's 128³ size, so they are marked slow (a minute or two on 2 cores).
"""

import pytest
import torch
from torch import nn

import factorizer_cli as ft

pytestmark = pytest.mark.slow


def test_nmf_snippet():
    nmf = ft.NMF(size=(8, 512), rank=2, num_iters=5, init="uniform", solver="mu")
    x = torch.rand((1, 8, 512), requires_grad=True)
    y = nmf(x)
    assert y.shape == (1, 8, 512)
    assert nmf.flops == {"init": 0, "decompose": 226240, "reconstruct": 16384}


def test_sw_matricize_snippet():
    sw_matricize = ft.SWMatricize((None, 32, 128, 128, 128), head_dim=8, patch_size=8)
    x = torch.rand((1, 32, 128, 128, 128), requires_grad=True)
    y = sw_matricize(x)
    assert y.shape == (8, 4096, 8, 512)
    z = sw_matricize.inverse_forward(y)
    assert torch.equal(x, z)


def test_subblock_block_and_stage_snippets():
    swin_wrapped_nmf = ft.FactorizerSubblock(
        in_channels=32, out_channels=32, spatial_size=(128, 128, 128),
        tensorize=(ft.SWMatricize, {"head_dim": 8, "patch_size": 8}),
        act=nn.ReLU, factorize=ft.NMF, rank=1, num_iters=5, init="uniform", solver="mu",
    )
    x = torch.rand((1, 32, 128, 128, 128), requires_grad=True)
    assert swin_wrapped_nmf(x).shape == (1, 32, 128, 128, 128)

    subblock = (ft.FactorizerSubblock, {
        "tensorize": (ft.SWMatricize, {"head_dim": 8, "patch_size": 8}), "act": nn.ReLU,
        "factorize": ft.NMF, "rank": 1, "num_iters": 5, "num_grad_steps": None, "init": "uniform",
        "solver": "mu", "dropout": 0.1,
    })
    factorizer_block = ft.FactorizerBlock(
        channels=32, spatial_size=(128, 128, 128), nmf=subblock, mlp=(ft.MLP, {"ratio": 2, "dropout": 0.1}),
    )
    assert factorizer_block(x).shape == (1, 32, 128, 128, 128)

    factorizer_stage = ft.FactorizerStage(
        in_channels=32, out_channels=32, spatial_size=(128, 128, 128), depth=2, nmf=subblock,
        mlp=(ft.MLP, {"ratio": 2, "dropout": 0.1}),
    )
    assert factorizer_stage(x).shape == (1, 32, 128, 128, 128)


def test_swin_factorizer_for_segmentation_snippet():
    swin_factorizer = ft.SegmentationFactorizer(
        in_channels=4, out_channels=3, spatial_size=(128, 128, 128),
        encoder_depth=(1, 1, 1, 1, 1), encoder_width=(32, 64, 128, 256, 512),
        strides=(1, 2, 2, 2, 2), decoder_depth=(1, 1, 1, 1),
        stem=(nn.Conv3d, {"kernel_size": 3, "padding": 1, "bias": False},),
        downsample=(nn.Conv3d, {"kernel_size": 2, "bias": False}),
        upsample=(nn.ConvTranspose3d, {"kernel_size": 2}),
        head=(nn.Conv3d, {"kernel_size": 1}),
        num_deep_supr=3, dropout=0.1,
        nmf=(ft.FactorizerSubblock, {
            "tensorize": (ft.SWMatricize, {"head_dim": 8, "patch_size": 8}), "act": nn.ReLU,
            "factorize": ft.NMF, "rank": 1, "num_iters": 5, "init": "uniform", "solver": "hals",
            "dropout": 0.1,
        }),
        mlp=(ft.MLP, {"ratio": 2, "dropout": 0.1}),
    )
    x = torch.rand((1, 4, 128, 128, 128))
    with torch.no_grad():  # the README runs it with autograd on; the shapes are what it documents
        y = swin_factorizer(x)
    assert len(y) == 3
    assert (y[0].shape, y[1].shape, y[2].shape) == (
        torch.Size([1, 3, 128, 128, 128]), torch.Size([1, 3, 64, 64, 64]), torch.Size([1, 3, 32, 32, 32]),
    )
