"""Cases per minute of ``factorizer segment DATASET -o FOLDER`` on the CPU, with and without read-ahead.

Ten generated BraTS-layout cases (4 modalities, 120×144×112 at 1 mm, gzip NIfTI) and a small Swin
Factorizer (64³ windows, widths 16-128, random weights) in our package format. With read-ahead the
next case is read and preprocessed on a second thread while the network runs; without, one after
the other. Each mode runs in a fresh process, rounds alternate.

    python benchmarks/batch.py [--cases 10] [--rounds 2] [--json results.json]
"""

from __future__ import annotations

# ruff: noqa: E402  (the CPU runtime is configured before anything imports torch)
from factorizer_cli.runtime import configure_cpu_runtime

configure_cpu_runtime()  # as the `factorizer` command runs; every worker, ours and the reference, inherits it

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

SHAPE = (120, 144, 112)
NETWORK = {
    "class": "SegmentationFactorizer", "in_channels": 4, "out_channels": 3, "spatial_size": [64, 64, 64],
    "encoder_depth": [1, 1, 1, 1], "encoder_width": [16, 32, 64, 128], "strides": [1, 2, 2, 2],
    "decoder_depth": [1, 1, 1], "stem": {"class": "Conv3d", "kernel_size": 3, "padding": 1, "bias": False},
    "num_deep_supr": 1,
    "nmf": {"class": "FactorizerSubblock", "tensorize": {"class": "SWMatricize", "head_dim": 8, "patch_size": 4},
            "factorize": {"class": "NMF"}, "rank": 1, "num_iters": 5, "solver": "hals"},
    "mlp": {"class": "MLP", "ratio": 2},
}


def make_dataset(root: Path, cases: int) -> Path:
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in SHAPE], indexing="ij"))
    brain = ((grid[0] / 0.8) ** 2 + (grid[1] / 0.85) ** 2 + (grid[2] / 0.8) ** 2) < 1
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for i in range(cases):
        folder = root / f"BraTS-GLI-{i:05d}-000"
        folder.mkdir(parents=True)
        for c, name in enumerate(["t1n", "t1c", "t2w", "t2f"]):
            volume = np.zeros(SHAPE, np.float32)
            volume[brain] = rng.normal(100 + 30 * c, 15, int(brain.sum()))
            nib.save(nib.Nifti1Image(volume, affine), folder / f"{folder.name}-{name}.nii.gz")
    return root


def make_model(root: Path) -> Path:
    from factorizer_cli.families import build
    from factorizer_cli.zoo.card import ModelCard
    from factorizer_cli.zoo.package import save_package

    card = ModelCard.from_dict({
        "name": "batch-bench", "task": "benchmark",
        "inputs": [{"name": "t1n"}, {"name": "t1c"}, {"name": "t2w"}, {"name": "t2f"}],
        "spacing": [1, 1, 1], "roi": [64, 64, 64], "outputs": ["TC", "WT", "ET"],
        "labels": [{"region": "WT", "label": 2}, {"region": "TC", "label": 1}, {"region": "ET", "label": 3}],
        "architecture": NETWORK,
    })
    torch.manual_seed(0)
    save_package(root, card, [build(NETWORK).state_dict()])
    return root


def worker(dataset: str, model: str, read_ahead: bool, threads: int) -> float:
    from factorizer_cli.pipeline.batch import find_cases, run_batch
    from factorizer_cli.pipeline.segment import InferenceOptions, Segmenter
    from factorizer_cli.zoo.package import open_package

    torch.set_num_threads(threads)
    package = open_package(model)
    segmenter = Segmenter(package, InferenceOptions(device="cpu"))
    cases = find_cases(dataset, package.card.modality_specs)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        results = run_batch(cases, segmenter, Path(out), read_ahead=read_ahead)
        seconds = time.perf_counter() - start
    assert all(r.status == "done" for r in results), [r.error for r in results if r.error]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--worker", nargs=3, metavar=("DATASET", "MODEL", "READ_AHEAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(worker(args.worker[0], args.worker[1], args.worker[2] == "1", args.threads))
        return
    with tempfile.TemporaryDirectory() as tmp:
        dataset, model = make_dataset(Path(tmp) / "data", args.cases), make_model(Path(tmp) / "model")
        timings: dict[str, list[float]] = {"read-ahead": [], "sequential": []}
        for round_ in range(args.rounds):
            for mode, flag in (("sequential", "0"), ("read-ahead", "1")):
                done = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--worker",
                                       str(dataset), str(model), flag], capture_output=True, text=True, check=True)
                seconds = float(done.stdout.strip().splitlines()[-1])
                timings[mode].append(seconds)
                print(f"round {round_ + 1} {mode:>10}: {seconds:.1f} s, {60 * args.cases / seconds:.2f} cases/min",
                      flush=True)
    results = {mode: {"median_s": statistics.median(t), "cases_per_min": 60 * args.cases / statistics.median(t)}
               for mode, t in timings.items()}
    print(f"\n{args.cases} cases of {SHAPE}, CPU, {args.threads} threads, torch {torch.__version__}")
    for mode, r in results.items():
        print(f"{mode:>10}: {r['median_s']:.1f} s, {r['cases_per_min']:.2f} cases/min")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
