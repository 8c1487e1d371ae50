"""NMF component capture: inference without it must not be slower than before it existed.

Three measurements, each in a fresh process, rounds alternating to share the machine's noise:

- ``off``: this tree, capture code present but not asked for;
- ``before``: the same run with another tree's ``factorizer_cli`` (the code before component maps,
  e.g. ``git archive HEAD | tar -x -C /tmp/before``), given with ``--before``;
- ``on``: this tree with the default blocks captured (encoder.0 and the bottleneck), for the cost.

Wall time and CPU time (``time.process_time``, all threads) are both reported: on a machine shared
with other work, CPU time with one thread is the steadier measure of the work done.

Two workloads: ``forward`` times one forward pass of the seed README's Swin Factorizer (4 → 3 channels,
widths 32-512, windows of ``--patch``³, rank-1 HALS) at ``--size``³ in inference mode; ``segment`` times
``Segmenter`` on a synthetic 4-channel case with a small Swin Factorizer (widths 8-64, roi 64³, the
demo model's shape) and random weights: preprocessing, sliding window, inverse, labels (and the maps
for ``on``, not written).

    python benchmarks/components.py --before /tmp/before [--workload forward segment] [--rounds 3]
"""

from __future__ import annotations

# ruff: noqa: E402  (the CPU runtime is configured before anything imports torch)
from factorizer_cli.runtime import configure_cpu_runtime

configure_cpu_runtime()  # as the `factorizer` command runs; every worker, ours and the reference, inherits it

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SEGMENT_ARCHITECTURE = {
    "class": "SegmentationFactorizer", "in_channels": 4, "out_channels": 3, "spatial_size": [64, 64, 64],
    "encoder_depth": [1, 1, 1, 1], "encoder_width": [8, 16, 32, 64], "strides": [1, 2, 2, 2],
    "decoder_depth": [1, 1, 1], "stem": {"class": "Conv3d", "kernel_size": 3, "padding": 1, "bias": False},
    "pos_embed": True, "num_deep_supr": 3,
    "nmf": {"class": "FactorizerSubblock",
            "tensorize": {"class": "SWMatricize", "head_dim": 8, "patch_size": 4, "shifts": [None, 2]},
            "act": {"class": "ReLU"}, "factorize": {"class": "NMF"}, "rank": 1, "num_iters": 5},
    "mlp": {"class": "MLP", "ratio": 2},
}


def _card(ModelCard):
    inputs = [{"name": n, "aliases": []} for n in ("t1n", "t1c", "t2w", "t2f")]
    return ModelCard.from_dict({
        "name": "bench", "task": "benchmark", "inputs": inputs, "spacing": [1.5] * 3, "roi": [64] * 3,
        "outputs": ["WT", "TC", "ET"], "labels": [{"region": "WT", "label": 2}, {"region": "TC", "label": 1},
                                                   {"region": "ET", "label": 3}],
        "activation": "sigmoid", "crop_margin_mm": 6.0, "architecture": SEGMENT_ARCHITECTURE,
    })


def _case(shape=(80, 80, 72)):
    import numpy as np

    from factorizer_cli.io.images import Image

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    brain = (grid**2).sum(0) < 0.85
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    return [Image(np.where(brain, 1 + 0.1 * rng.standard_normal(shape), 0).astype(np.float32), affine, None,
                  Path(f"bench-{c}.nii.gz")) for c in range(4)]


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    capture_on = args.worker == "on"
    if args.workload == "forward":
        from factorizer_cli.examples.seed_network import seed_network

        net = seed_network(args.size, patch_size=args.patch).eval()
        x = torch.rand(1, 4, *(args.size,) * 3)

        def run():
            with torch.inference_mode():
                if capture_on:
                    from factorizer_cli.nn.components import capture

                    with capture(net):
                        return net.predict(x)
                return net.predict(x)
    else:
        from factorizer_cli.families import build
        from factorizer_cli.pipeline.segment import InferenceOptions, Segmenter
        from factorizer_cli.zoo.card import ModelCard
        from factorizer_cli.zoo.package import save_package

        folder = tempfile.mkdtemp(prefix="bench-components-")
        card = _card(ModelCard)
        package = save_package(folder, card, [build(dict(SEGMENT_ARCHITECTURE)).state_dict()])
        segmenter = Segmenter(package, InferenceOptions(device="cpu"))
        images = _case()
        kwargs = {}
        if capture_on:
            from factorizer_cli.pipeline.components import ComponentRequest

            kwargs["components"] = ComponentRequest()

        def run():
            return segmenter(images, **kwargs)

    run()  # warm-up
    wall, cpu = [], []
    for _ in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    print(json.dumps({"wall": wall, "cpu": cpu}))


def measure(mode: str, tree: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, __file__, "--worker", mode, "--workload", args.workload, "--size", str(args.size),
               "--patch", str(args.patch), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    out = subprocess.run(command, env=env, cwd=tempfile.gettempdir(), check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="root of a tree with the code before component maps")
    parser.add_argument("--workload", choices=("forward", "segment"), default="forward")
    parser.add_argument("--size", type=int, default=64, help="forward: input size (cube)")
    parser.add_argument("--patch", type=int, default=4, help="forward: window size (must divide size / 16)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="1: CPU time is least disturbed by other load")
    parser.add_argument("--worker", choices=("off", "before", "on"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    trees = {"off": REPO, "on": REPO}
    if args.before:
        trees["before"] = args.before.resolve()
    results = {mode: {"wall": [], "cpu": []} for mode in trees}
    for round_ in range(args.rounds):
        for mode, tree in trees.items():
            times = measure(mode, tree, args)
            for kind in ("wall", "cpu"):
                results[mode][kind] += times[kind]
            print(f"round {round_ + 1}: {mode} wall {min(times['wall']):.3f} s, cpu {min(times['cpu']):.3f} s",
                  file=sys.stderr)
    summary = {
        mode: {f"{kind}_{stat.__name__}_s": round(stat(t[kind]), 3)
               for kind in ("wall", "cpu") for stat in (statistics.median, min)} | {"runs": len(t["wall"])}
        for mode, t in results.items()
    }
    ratios = [("off", "before"), ("on", "off")] if "before" in summary else [("on", "off")]
    for a, b in ratios:
        for key in ("wall_median_s", "wall_min_s", "cpu_median_s", "cpu_min_s"):
            summary[f"{a}/{b} {key[:-2]}"] = round(summary[a][key] / summary[b][key], 3)
    print(json.dumps({"workload": args.workload, "size": args.size, "patch": args.patch, "threads": args.threads,
                      **summary}, indent=2))


if __name__ == "__main__":
    main()
