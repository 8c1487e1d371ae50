"""Run a Swin Factorizer (the seed README's network at 64³, windows of 4³) on a generated volume.

Checks an install end to end on the CPU in a few seconds: builds the network, runs one forward pass,
and prints the output shapes and the time it took.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

import factorizer_cli as ft


def seed_network(size: int = 128, patch_size: int = 8, ft: Any = ft) -> ft.SegmentationFactorizer:
    """The seed README's Swin Factorizer (4 → 3 channels, widths 32-512, rank-1 HALS).

    ``ft`` is the module that provides the classes: ours by default, or upstream's (benchmarks).
    """
    return ft.SegmentationFactorizer(
        in_channels=4, out_channels=3, spatial_size=(size,) * 3,
        encoder_depth=(1, 1, 1, 1, 1), encoder_width=(32, 64, 128, 256, 512),
        strides=(1, 2, 2, 2, 2), decoder_depth=(1, 1, 1, 1),
        stem=(nn.Conv3d, {"kernel_size": 3, "padding": 1, "bias": False}),
        downsample=(nn.Conv3d, {"kernel_size": 2, "bias": False}),
        upsample=(nn.ConvTranspose3d, {"kernel_size": 2}),
        head=(nn.Conv3d, {"kernel_size": 1}),
        num_deep_supr=3, dropout=0.1,
        nmf=(ft.FactorizerSubblock, {
            "tensorize": (ft.SWMatricize, {"head_dim": 8, "patch_size": patch_size}),
            "act": nn.ReLU, "factorize": ft.NMF, "rank": 1, "num_iters": 5,
            "init": "uniform", "solver": "hals", "dropout": 0.1,
        }),
        mlp=(ft.MLP, {"ratio": 2, "dropout": 0.1}),
    )


def main() -> None:
    torch.manual_seed(0)
    net = seed_network(64, patch_size=4).eval()
    volume = torch.rand(1, 4, 64, 64, 64)
    start = time.perf_counter()
    with torch.inference_mode():
        outputs = net(volume)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in net.parameters())
    print(f"Swin Factorizer, {params / 1e6:.1f} M parameters, input {tuple(volume.shape)}")
    for i, out in enumerate(outputs):
        print(f"  head {i}: {tuple(out.shape)}")
    print(f"forward pass: {seconds:.2f} s on {torch.get_num_threads()} CPU threads")


if __name__ == "__main__":
    main()
