"""ONNX Runtime against PyTorch on the CPU, same model, side by side: per window and per case.

The model: the seed README's Swin Factorizer (4 -> 3 channels, 128³ windows, widths 32-512, rank-1 HALS,
5 iterations; see benchmarks/forward.py), seeded random weights, saved as our model package and
exported with `factorizer export-onnx` (float32, batch 1, opset 18; the export is verified against
PyTorch first and its largest difference printed).

- per window: the segmenter's window predictor (sigmoid probabilities of the full-resolution head) on
  one random 1 x 4 x 128³ window, after a warm-up, `--repeats` times;
- per case: `Segmenter(...)(paths)` then `write`, as `factorizer segment` runs it, on the BraTS-sized
  phantom of benchmarks/segment.py (4 x 240x240x155; 8 windows after the foreground crop).

Each measurement runs in a fresh process with `--threads` threads (torch.set_num_threads and ONNX
Runtime's intra-op threads); rounds alternate between the backends to share the machine's noise.
Wall and CPU seconds are both recorded: on a shared machine the CPU time is the steadier figure.

    python benchmarks/onnx.py [--rounds 2] [--repeats 3] [--threads 2] [--no-case] [--json out.json]
"""

from __future__ import annotations

# ruff: noqa: E402  (the CPU runtime is configured before anything imports torch)
from factorizer_cli.runtime import configure_cpu_runtime

configure_cpu_runtime()  # as the `factorizer` command runs; every worker, ours and the reference, inherits it

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This file is onnx.py: with its folder on sys.path, `import onnx` would find it instead of the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from factorizer_cli.export import ExportOptions, export_onnx  # noqa: E402
from factorizer_cli.pipeline.segment import InferenceOptions, Segmenter  # noqa: E402
from factorizer_cli.zoo.onnx_file import open_onnx  # noqa: E402
from factorizer_cli.zoo.package import open_package  # noqa: E402

BACKENDS = ("torch", "onnx")


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _segmenter(backend: str, folder: str, threads: int) -> Segmenter:
    if backend == "torch":
        return Segmenter(open_package(f"{folder}/model"), InferenceOptions(device="cpu"))
    return Segmenter(open_onnx(f"{folder}/model.onnx"), InferenceOptions(device="cpu",
                                                                           threads=threads))


def worker(args: argparse.Namespace) -> None:
    """One backend, one kind of measurement, in this fresh process."""
    torch.set_num_threads(args.threads)
    segmenter = _segmenter(args.worker, args.folder, args.threads)
    result: dict = {}
    if args.what == "window":
        x = torch.from_numpy(np.random.default_rng(1).random((1, 4, 128, 128, 128), np.float32))
        with torch.inference_mode():
            segmenter.predict_window(x)  # warm-up: allocations, ONNX Runtime's first run
            wall, cpu = [], []
            for _ in range(args.repeats):
                start, start_cpu = time.perf_counter(), _cpu()
                segmenter.predict_window(x)
                wall.append(time.perf_counter() - start)
                cpu.append(_cpu() - start_cpu)
        result = {"wall_s": wall, "cpu_s": cpu}
    else:
        paths = sorted(Path(args.folder, "case").glob("*.nii.gz"))
        order = ["t1n", "t1c", "t2w", "t2f"]
        paths = sorted(paths, key=lambda p: order.index(p.name.split("-")[-1].split(".")[0]))
        start, start_cpu = time.perf_counter(), _cpu()
        segmentation = segmenter(paths)
        segmentation.write(f"{args.folder}/{args.worker}.nii.gz")
        result = {"wall_s": [time.perf_counter() - start], "cpu_s": [_cpu() - start_cpu],
                  "stages_s": segmentation.seconds}
    Path(args.out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-case", action="store_true", help="per-window figures only")
    parser.add_argument("--json", help="write the results here")
    for hidden in ("--worker", "--what", "--folder", "--out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    spec = importlib.util.spec_from_file_location("segment_benchmark", HERE / "segment.py")
    segment_benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(segment_benchmark)  # its phantom case and model package
    make_case, make_package = segment_benchmark.make_case, segment_benchmark.make_package

    kinds = ["window"] + ([] if args.no_case else ["case"])
    with tempfile.TemporaryDirectory() as tmp:
        make_package(Path(tmp) / "model", trivial=False)
        torch.set_num_threads(args.threads)
        (exported,) = export_onnx(open_package(f"{tmp}/model"), f"{tmp}/model.onnx", ExportOptions())
        print(f"export: {exported.seconds:.1f} s, {exported.size_bytes / 2**20:.1f} MiB, largest |ONNX Runtime "
              "- PyTorch|: " + ", ".join(f"{k} {v:.1e}" for k, v in exported.max_abs_diff.items()), flush=True)
        if not args.no_case:
            make_case(Path(tmp) / "case")
        runs = {(kind, b): [] for kind in kinds for b in BACKENDS}
        for round_ in range(args.rounds):
            for kind in kinds:
                for backend in BACKENDS:
                    out = f"{tmp}/{kind}-{backend}.json"
                    subprocess.run([sys.executable, __file__, "--worker", backend, "--what", kind, "--folder", tmp,
                                    "--out", out, "--threads", str(args.threads), "--repeats", str(args.repeats)],
                                   check=True)
                    r = json.loads(Path(out).read_text())
                    runs[kind, backend].append(r)
                    print(f"round {round_ + 1} {kind:>6} {backend:>5}: wall "
                          + ", ".join(f"{t:.2f}" for t in r["wall_s"]) + " s, cpu "
                          + ", ".join(f"{t:.1f}" for t in r["cpu_s"]) + " s", flush=True)
        agreement = None
        if not args.no_case:
            import nibabel as nib

            a, b = (np.asarray(nib.load(f"{tmp}/{k}.nii.gz").dataobj) for k in BACKENDS)
            agreement = float((a == b).mean())

    summary = {"threads": args.threads, "torch": torch.__version__, "export": {
        "seconds": exported.seconds, "mib": exported.size_bytes / 2**20, "max_abs_diff": exported.max_abs_diff}}
    print(f"\nseed README Swin Factorizer, 128³ windows, CPU, {args.threads} threads, torch {torch.__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}")
    print(f"{'':>14} {'torch s':>9} {'onnx s':>9} {'speed-up':>9}   (median wall; CPU seconds in brackets)")
    for kind in kinds:
        med = {b: statistics.median(t for r in runs[kind, b] for t in r["wall_s"]) for b in BACKENDS}
        cpu = {b: statistics.median(t for r in runs[kind, b] for t in r["cpu_s"]) for b in BACKENDS}
        summary[kind] = {"runs": {b: runs[kind, b] for b in BACKENDS}, "median_wall_s": med, "median_cpu_s": cpu,
                         "speedup_wall": med["torch"] / med["onnx"], "speedup_cpu": cpu["torch"] / cpu["onnx"]}
        label = "per window" if kind == "window" else "whole case"
        print(f"{label:>14} {med['torch']:>9.2f} {med['onnx']:>9.2f} {med['torch'] / med['onnx']:>8.2f}x   "
              f"({cpu['torch']:.1f} / {cpu['onnx']:.1f} cpu s, {cpu['torch'] / cpu['onnx']:.2f}x)")
    if agreement is not None:
        summary["label_agreement"] = agreement
        print(f"label maps of the two backends agree on {100 * agreement:.4f}% of voxels")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
