"""3D RepUX-Net and 3D UX-Net forward on CPU: our inference form against upstream's module, side by side.

The networks: RepUX-Net's published configuration (1 → 5 channels, feat 48-384, depths 2×4, 21³
kernels, hidden 768; upstream's ``deploy=True`` inference module) and 3D UX-Net's FeTA configuration
(1 → 8 channels, the same widths, 7³ kernels). Batch 1, eval mode, inference mode, one 96³ window.
Both sides get the same weights (ours, seeded, with every norm's affine and running statistics drawn
so that none is an identity, loaded into upstream by key: the keys are upstream's) and the same input.
Ours is what ``factorizer segment`` runs: the family's ``prepare`` (BFR and BatchNorm folded, FFT
for large kernels where it pays, channels-last, in-place norms).

Each measurement runs in a fresh process, so its peak resident memory is its own; rounds alternate
between the sides to share the machine's noise. Every process first applies the ``factorizer``
command's CPU defaults (``factorizer_cli.runtime``) before PyTorch loads, upstream's too.

Upstream is MASILab/RepUX-Net at 3cd20c4 and MASILab/3DUX-Net at 14ea46b: check them out OUTSIDE this
repository. They need MONAI and scipy beside torch; their unused ``timm`` import is replaced by an
inert stub here.

    python benchmarks/repuxnet.py --repuxnet /tmp/RepUX-Net --uxnet /tmp/3DUX-Net [--rounds 2]
    python benchmarks/repuxnet.py --layers     # direct vs FFT depthwise conv per stage (fft_pays)

Without the upstream paths only ours is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

from factorizer_cli.runtime import configure_cpu_runtime  # does not import torch

NETWORKS: dict[str, dict[str, Any]] = {
    "repuxnet": {"class": "REPUXNET", "in_chans": 1, "out_chans": 5, "depths": [2, 2, 2, 2],
                 "feat_size": [48, 96, 192, 384], "ks": 21, "a": 1, "hidden_size": 768, "deploy": True},
    "uxnet": {"class": "UXNET", "in_chans": 1, "out_chans": 8, "depths": [2, 2, 2, 2],
              "feat_size": [48, 96, 192, 384], "hidden_size": 768},
}


def our_network(config: dict[str, Any], seed: int = 0):
    """Our module with seeded weights; norms drawn away from identity (as the parity fixtures do)."""
    import torch

    from factorizer_cli.families import build

    torch.manual_seed(seed)
    network = build(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in network.state_dict().items():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf in ("weight", "running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.75)
            elif "norm" in name and leaf in ("bias", "running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return network


def upstream_network(checkout: str, config: dict[str, Any]):
    """Upstream's module from its checkout (``networks.<X>_3D.network_backbone``), timm stubbed."""
    import torch
    from torch import nn

    layers = types.ModuleType("timm.models.layers")
    layers.trunc_normal_ = nn.init.trunc_normal_

    class DropPath(nn.Identity):  # upstream builds it with rate 0 (identity) in every configuration
        def __init__(self, *args, **kwargs):
            super().__init__()

    layers.DropPath = DropPath
    for name in ("timm", "timm.models"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["timm.models.layers"] = layers
    sys.path.insert(0, checkout)
    kwargs = {k: v for k, v in config.items() if k != "class"}
    if config["class"] == "REPUXNET":
        from networks.RepUXNet_3D.network_backbone import REPUXNET as Upstream
    else:
        from networks.UXNet_3D.network_backbone import UXNET as Upstream
    return Upstream(**kwargs).eval(), torch


def measure(side: str, name: str, checkout: str | None, size: int, repeats: int, out: str) -> dict:
    """One side in this process: build, warm up, time ``repeats`` forwards, save the output."""
    configure_cpu_runtime()
    import torch
    from safetensors.torch import save_file

    config = NETWORKS[name]
    ours = our_network(config)
    if side == "upstream":
        network, _ = upstream_network(checkout, config)
        missing = network.load_state_dict(ours.state_dict(), strict=True)
        assert not missing.missing_keys and not missing.unexpected_keys
    else:
        from factorizer_cli.families import family_of

        network = family_of(ours).prepare(ours)
    del ours
    x = torch.rand(1, config["in_chans"], size, size, size, generator=torch.Generator().manual_seed(7))
    seconds = []
    with torch.inference_mode():
        y = network(x)  # warm-up: oneDNN primitives, FFT plans
        for _ in range(repeats):
            start = time.perf_counter()
            y = network(x)
            seconds.append(time.perf_counter() - start)
    save_file({"output": y.contiguous()}, out)
    return {"seconds": min(seconds), "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_side(side: str, name: str, checkout: str | None, size: int, repeats: int, folder: Path) -> dict:
    out = folder / f"{side}-{name}.safetensors"
    command = [sys.executable, __file__, "--child", side, name, "--size", str(size),
               "--repeats", str(repeats), "--out", str(out)] + (["--checkout", checkout] if checkout else [])
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{side} {name} failed:\n{result.stderr[-3000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "output": out}


def compare(name: str, checkout: str | None, size: int, repeats: int, rounds: int) -> dict:
    from safetensors.torch import load_file

    sides = ["ours"] + (["upstream"] if checkout else [])
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for side in sides:
                runs[side].append(run_side(side, name, checkout, size, repeats, Path(tmp)))
        row = {"network": name, "size": size}
        for side in sides:
            row[f"{side}_s"] = round(statistics.median(r["seconds"] for r in runs[side]), 2)
            row[f"{side}_peak_mib"] = round(max(r["peak_mib"] for r in runs[side]))
        if checkout:
            ours = load_file(runs["ours"][0]["output"])["output"]
            theirs = load_file(runs["upstream"][0]["output"])["output"]
            row["max_abs_diff"] = float((ours - theirs).abs().max())
            row["labels_agree_pct"] = round(float((ours.argmax(1) == theirs.argmax(1)).float().mean()) * 100, 4)
            row["speedup"] = round(row["upstream_s"] / row["ours_s"], 2)
            row["memory_ratio"] = round(row["ours_peak_mib"] / row["upstream_peak_mib"], 2)
    return row


def _best_of(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def layer_table(repeats: int = 3) -> None:
    """Direct against FFT depthwise conv at each RepUX-Net stage of a 96³ window (this machine)."""
    configure_cpu_runtime()
    import functools

    import torch

    from factorizer_cli.nn.large_kernel import LargeKernelDepthwise, _centre_crop, fft_pays

    print(f"{'channels':>8} {'map':>5} {'kernel':>6} {'direct s':>9} {'fft s':>7} {'fft_pays':>8}")
    for channels, side in [(48, 48), (96, 24), (192, 12), (384, 6)]:
        for kernel in (7, 11, 21):
            layer = LargeKernelDepthwise(torch.randn(channels, 1, kernel, kernel, kernel), torch.randn(channels))
            x = torch.randn(1, channels, side, side, side)
            reach = min(kernel // 2, side - 1)
            weight = _centre_crop(layer.weight, [reach] * 3)  # what the layer convolves with
            with torch.inference_mode():
                direct = _best_of(functools.partial(layer._direct, x, weight, [reach] * 3), repeats)
                fft = _best_of(functools.partial(layer._fft, x, weight), repeats)
            print(f"{channels:>8} {side:>4}³ {kernel:>5}³ {direct:>9.3f} {fft:>7.3f} "
                  f"{str(fft_pays((side,) * 3, tuple(weight.shape[-3:]))):>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repuxnet", help="MASILab/RepUX-Net checkout (upstream side of RepUX-Net)")
    parser.add_argument("--uxnet", help="MASILab/3DUX-Net checkout (upstream side of 3D UX-Net)")
    parser.add_argument("--networks", default="repuxnet,uxnet")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="write the table here too")
    parser.add_argument("--layers", action="store_true", help="the per-layer direct/FFT table instead")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "NETWORK"), help=argparse.SUPPRESS)
    parser.add_argument("--checkout", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.checkout, args.size, args.repeats, args.out)))
        return
    if args.layers:
        layer_table()
        return
    checkouts = {"repuxnet": args.repuxnet, "uxnet": args.uxnet}
    rows = [compare(name, checkouts[name], args.size, args.repeats, args.rounds)
            for name in args.networks.split(",")]
    print(f"machine: {os.cpu_count()} CPUs; torch threads default; runtime defaults on both sides")
    for row in rows:
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
