"""The GPU paths, checked and timed in one run: one table of agreement, speed and GPU memory.

Two models: the bundled ``demo`` (trained on phantoms: real probabilities, so label agreement means
something) and the seed README's Swin Factorizer (128³ windows, seeded random weights: the network of
the README's speed figures; its probabilities sit near 0.5, so its labels flip at the smallest change
and its max |Δp| is the telling column). For each model:

- windows: preprocessed windows of a phantom case, PyTorch CPU fp32 as the reference, against PyTorch
  CUDA fp32 / fp16 / bf16 (autocast, as ``--precision``), and the model exported to ONNX run by ONNX
  Runtime on the CPU, CUDA and TensorRT providers (TensorRT in a child process with a time limit:
  building its engine can take minutes). Agreement: % of voxels whose label (every sigmoid channel
  thresholded, or the softmax argmax) equals the reference's; max |Δp|: largest probability difference;
  time: median per window after a warm-up;
- case: a BraTS-sized phantom (4 x 240x240x155, int16 .nii.gz) read to written through the Python
  API (``Segmenter.prepare``/``finish``, ``Segmentation.write``), on the CPU (reference), CUDA fp32
  and fp16, and ONNX Runtime CUDA; agreement over the whole label map;
- train step (seed network only: the BraTS 2023 bundle's size, 128³ crops): one optimizer step of
  ``factorizer train``'s loss and AdamW on a batch of 2 random crops, CUDA fp32 / bf16 / fp16 (as
  ``train --precision``), median seconds per step after a warm-up and peak GPU memory: the figures
  the README's BraTS training time is estimated from.

Peak GPU memory is ``torch.cuda.max_memory_allocated`` per row (PyTorch rows); for ONNX Runtime rows,
which PyTorch cannot see, it is the drop of the device's free memory (``~``). A row that cannot run
says why (``skipped: ...``); a row that breaks says ``FAILED: ...`` and the exit code is 1. Rows past
``--budget-s`` (270 s) are skipped, so the run ends in time: estimated 3 to 4 minutes on an H200 with
16 CPU cores, most of it the CPU reference and the two ONNX exports.

    python benchmarks/gpu.py [--json gpu.json]         # on a CUDA machine
    python benchmarks/gpu.py --dry-run                 # tiny sizes on the CPU, every GPU row skipped

ONNX Runtime on CUDA needs onnxruntime-gpu (``pip install "factorizer-cli[gpu]"``), TensorRT its
libraries as well; without them those rows are skipped with the reason.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]  # benchmarks/onnx.py would stand in for the onnx package the exporter imports

from factorizer_cli.runtime import configure_cpu_runtime  # noqa: E402

configure_cpu_runtime()  # before torch loads, as the `factorizer` command does: the CPU rows run like it

import numpy as np  # noqa: E402
import torch  # noqa: E402

# The project's API, all in one place: these names may move; fix them here only.
from factorizer_cli.errors import DeviceError  # noqa: E402
from factorizer_cli.export import ExportOptions, export_onnx  # noqa: E402
from factorizer_cli.families import build  # noqa: E402
from factorizer_cli.phantom import MODALITIES, generate, write_case  # noqa: E402
from factorizer_cli.pipeline.segment import InferenceOptions, Segmenter  # noqa: E402
from factorizer_cli.train.loss import deep_supervision_loss  # noqa: E402
from factorizer_cli.train.precision import gradient_scaler, training_autocast  # noqa: E402
from factorizer_cli.zoo.card import ModelCard  # noqa: E402
from factorizer_cli.zoo.onnx_file import open_onnx  # noqa: E402
from factorizer_cli.zoo.package import save_package  # noqa: E402
from factorizer_cli.zoo.resolve import resolve_model  # noqa: E402

CPU_EP, CUDA_EP, TENSORRT_EP = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
UNAVAILABLE_EXIT = 3  # the ONNX Runtime worker's exit code for "this provider cannot run here"


class Unavailable(Exception):
    """What a row needs is not on this machine (a provider that fell back, a missing library): skipped."""


@dataclass(frozen=True)
class Sizes:
    case_shape: tuple[int, int, int]  # the phantom case, 1 mm voxels
    seed_roi: int  # the seed network's window (its spatial_size)
    seed_patch: int  # its SWMatricize window
    windows: int  # windows per model in the window rows
    repeats: int  # timed runs per window (GPU and ONNX Runtime rows; the CPU reference runs once)


FULL = Sizes(case_shape=(240, 240, 155), seed_roi=128, seed_patch=8, windows=2, repeats=5)
DRY = Sizes(case_shape=(64, 64, 64), seed_roi=64, seed_patch=4, windows=1, repeats=1)  # 1 window a case


def seed_architecture(roi: int, patch: int) -> dict[str, Any]:
    """The seed README's Swin Factorizer as card data (as benchmarks/segment.py has it)."""
    conv = {"class": "Conv3d"}
    return {
        "class": "SegmentationFactorizer", "in_channels": 4, "out_channels": 3, "spatial_size": [roi] * 3,
        "encoder_depth": [1] * 5, "encoder_width": [32, 64, 128, 256, 512], "strides": [1, 2, 2, 2, 2],
        "decoder_depth": [1] * 4, "stem": {**conv, "kernel_size": 3, "padding": 1, "bias": False},
        "downsample": {**conv, "kernel_size": 2, "bias": False}, "head": {**conv, "kernel_size": 1},
        "upsample": {"class": "ConvTranspose3d", "kernel_size": 2}, "num_deep_supr": 3, "dropout": 0.1,
        "nmf": {"class": "FactorizerSubblock", "act": {"class": "ReLU"}, "factorize": {"class": "NMF"},
                "tensorize": {"class": "SWMatricize", "head_dim": 8, "patch_size": patch}, "rank": 1,
                "num_iters": 5, "init": "uniform", "solver": "hals", "dropout": 0.1},
        "mlp": {"class": "MLP", "ratio": 2, "dropout": 0.1},
    }


def seed_package(folder: Path, roi: int, patch: int) -> Any:
    """The seed network with seeded random weights, saved as our model package (BraTS inputs, 1 mm)."""
    torch.manual_seed(0)
    architecture = seed_architecture(roi, patch)
    network = build(architecture)
    inputs = [{"name": n, "aliases": [a]} for n, a in zip(MODALITIES, ("t1", "t1ce", "t2", "flair"))]
    labels = [{"region": r, "label": n} for r, n in (("WT", 2), ("TC", 1), ("ET", 3))]
    card = ModelCard.from_dict({
        "name": f"seed-readme-{roi}", "task": "brats", "inputs": inputs, "spacing": [1.0] * 3,
        "roi": [roi] * 3, "outputs": ["TC", "WT", "ET"], "labels": labels, "activation": "sigmoid",
        "overlap": 0.5, "architecture": architecture,
    })
    return save_package(folder, card, [network.state_dict()])


@dataclass
class Row:
    check: str  # "window ..." or "case ..."
    model: str
    runtime: str
    status: str = "ok"  # or "skipped: why" or "FAILED: why"
    agreement_pct: float | None = None
    max_abs_dp: float | None = None
    seconds: float | None = None  # per window, or per case read to written
    gpu_mib: float | None = None
    gpu_mib_approx: bool = False  # ONNX Runtime: free-memory drop, not PyTorch's peak
    detail: dict[str, Any] | None = None


class Budget:
    """Wall-clock allowance: rows that would start past it are skipped."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.perf_counter()

    def spent(self) -> float:
        return time.perf_counter() - self.start

    def over(self) -> bool:
        return self.spent() > self.seconds


# --- what can run here --------------------------------------------------------------------------------

def ort_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return onnxruntime.get_available_providers()


def unavailable(runtime: str, cuda: bool, dry_run: bool) -> str | None:
    """Why ``runtime`` cannot run on this machine, or None."""
    if "cuda" in runtime or "tensorrt" in runtime:
        if not cuda:
            return "no CUDA" + (" (--dry-run)" if dry_run and torch.cuda.is_available() else "")
        if "bf16" in runtime and not torch.cuda.is_bf16_supported():
            return "this GPU has no bfloat16"
        if runtime.startswith("onnxruntime cuda") and CUDA_EP not in ort_providers():
            return "onnxruntime has no CUDA provider (pip install 'factorizer-cli[gpu]': onnxruntime-gpu)"
        if runtime.startswith("onnxruntime tensorrt") and TENSORRT_EP not in ort_providers():
            return "onnxruntime has no TensorRT provider (onnxruntime-gpu built with TensorRT)"
    return None


# --- measuring ----------------------------------------------------------------------------------------

def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def release() -> None:
    """Let go of the last row's GPU memory, so each row's peak is its own."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gpu_free_bytes() -> int | None:
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None


def labels_of(probabilities: np.ndarray, activation: str, threshold: float) -> np.ndarray:
    """A code per voxel (channels first): thresholded sigmoid channels as bits, or the softmax argmax."""
    if activation == "sigmoid":
        bits = probabilities > threshold
        return sum(bits[c].astype(np.int64) << c for c in range(len(bits)))
    return probabilities.argmax(0)


def compare(row: Row, reference: Sequence[np.ndarray], got: Sequence[np.ndarray], card: Any) -> None:
    agree = total = 0
    worst = 0.0
    for ref, out in zip(reference, got):
        a, b = (labels_of(p, card.activation, card.threshold) for p in (ref, out))
        agree, total = agree + int((a == b).sum()), total + a.size
        worst = max(worst, float(np.abs(ref.astype(np.float64) - out).max()))
    row.agreement_pct, row.max_abs_dp = 100.0 * agree / total, worst


def compare_cases(row: Row, reference: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray]) -> None:
    """Label maps as written (agreement) and probabilities on the case's voxels (max |Δp|)."""
    (ref_labels, ref_probabilities), (labels, probabilities) = reference, got
    row.agreement_pct = 100.0 * float((ref_labels == labels).mean())
    row.max_abs_dp = float(np.abs(ref_probabilities.astype(np.float64) - probabilities).max())


def cut_windows(array: np.ndarray, roi: Sequence[int], count: int) -> list[torch.Tensor]:
    """``count`` windows of ``roi`` from a preprocessed case (C, *spatial), spread along its diagonal."""
    pad = [(0, 0)] + [(0, max(0, r - s)) for r, s in zip(roi, array.shape[1:])]
    array = np.pad(array, pad)
    fractions = [0.5] if count == 1 else np.linspace(0.3, 0.7, count)
    windows = []
    for f in fractions:
        start = [round((s - r) * f) for s, r in zip(array.shape[1:], roi)]
        box = tuple(slice(a, a + r) for a, r in zip(start, roi))
        windows.append(torch.from_numpy(np.ascontiguousarray(array[(slice(None), *box)])))
    return windows


def time_windows(segmenter: Any, windows: Sequence[torch.Tensor], repeats: int) -> tuple[list[np.ndarray], float]:
    """Probabilities per window and the median seconds per window, after one warm-up."""
    device = segmenter.device
    with torch.inference_mode():
        segmenter.predict_window(windows[0][None].to(device))  # warm-up: CUDA context, kernels, engines
        sync()
        outputs, times = [], []
        for window in windows:
            x = window[None].to(device)
            for _ in range(repeats):
                sync()
                start = time.perf_counter()
                y = segmenter.predict_window(x)
                sync()
                times.append(time.perf_counter() - start)
            outputs.append(y[0].float().cpu().numpy())
    return outputs, statistics.median(times)


def torch_window_row(row: Row, package: Any, device: str, precision: str, windows: Sequence[torch.Tensor],
                     repeats: int) -> list[np.ndarray]:
    release()
    segmenter = Segmenter(package, InferenceOptions(device=device, precision=precision))
    outputs, row.seconds = time_windows(segmenter, windows, repeats)
    if segmenter.device.type == "cuda":
        row.gpu_mib = torch.cuda.max_memory_allocated() / 2**20
    return outputs


def train_step_row(row: Row, card: Any, device: str, precision: str, batch: int, steps: int) -> None:
    """Seconds per training step (median of ``steps`` after one warm-up) and peak GPU memory."""
    release()
    place = torch.device(device)
    torch.manual_seed(0)
    network = build(dict(card.architecture)).to(place).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    autocast, scaler = training_autocast(place, precision), gradient_scaler(place, precision)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(batch, len(card.modalities), *card.roi, generator=generator).to(place)
    target = (torch.rand(batch, len(card.outputs), *card.roi, generator=generator) < 0.1).float().to(place)
    times = []
    for _ in range(steps + 1):
        sync()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = deep_supervision_loss(network(image), target, card.activation)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        sync()
        times.append(time.perf_counter() - start)
    if not np.isfinite(float(loss)):
        raise RuntimeError(f"the loss is {float(loss)}")
    row.seconds = statistics.median(times[1:])
    row.detail = {"loss": float(loss), "batch": batch}
    if place.type == "cuda":
        row.gpu_mib = torch.cuda.max_memory_allocated() / 2**20


def onnx_segmenter(model: Any, device: str) -> Any:
    """A Segmenter running ``model`` in ONNX Runtime on ``device``; a provider it cannot have is a skip."""
    try:
        return Segmenter(model, InferenceOptions(device=device))
    except DeviceError as err:  # the provider is not installed, or no GPU answered it
        raise Unavailable(str(err)) from None


def ort_window_row(row: Row, onnx_path: Path, device: str, windows: Sequence[torch.Tensor],
                   repeats: int) -> list[np.ndarray]:
    release()
    free_before = gpu_free_bytes() if device != "cpu" else None
    segmenter = onnx_segmenter(open_onnx(onnx_path), device)
    if segmenter.runs_on.split()[0] != device:  # e.g. TensorRT's libraries missing: CUDA took over
        raise Unavailable(f"asked for {device}, ONNX Runtime fell back to {segmenter.runs_on}")
    outputs, row.seconds = time_windows(segmenter, windows, repeats)
    if free_before is not None:
        row.gpu_mib, row.gpu_mib_approx = (free_before - gpu_free_bytes()) / 2**20, True
    del segmenter
    return outputs


def isolated_ort_window_row(row: Row, onnx_path: Path, device: str, windows: Sequence[torch.Tensor],
                            repeats: int, timeout: float, tmp: Path) -> list[np.ndarray]:
    """``ort_window_row`` in a child process that is stopped after ``timeout`` seconds."""
    np.savez(tmp / "windows.npz", *[w.numpy() for w in windows])
    cmd = [sys.executable, __file__, "--ort-worker", str(onnx_path), "--ort-device", device,
           "--windows", str(tmp / "windows.npz"), "--repeats", str(repeats), "--out", str(tmp / "ort.npz")]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"not done within {timeout:.0f} s (engine build?); --isolated-timeout-s") from None
    if done.returncode == UNAVAILABLE_EXIT:
        raise Unavailable(done.stdout.strip())
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip().splitlines() or ["exit code " + str(done.returncode)])[-1])
    result = np.load(tmp / "ort.npz")
    row.seconds, row.gpu_mib, row.gpu_mib_approx = float(result["seconds"]), float(result["gpu_mib"]), True
    return [result[f"out{i}"] for i in range(len(windows))]


def ort_worker(args: argparse.Namespace) -> int:
    windows = np.load(args.windows)
    row = Row("", "", "")
    try:
        outputs = ort_window_row(row, Path(args.ort_worker), args.ort_device,
                                 [torch.from_numpy(windows[k]) for k in windows.files], args.repeats)
    except Unavailable as err:
        print(err)
        return UNAVAILABLE_EXIT
    np.savez(args.out, seconds=row.seconds, gpu_mib=row.gpu_mib or 0.0,
             **{f"out{i}": o for i, o in enumerate(outputs)})
    return 0


def case_row(row: Row, model: Any, device: str, precision: str, paths: Sequence[Path],
             out: Path) -> tuple[np.ndarray, np.ndarray]:
    """One case read to written; returns its label map and probabilities on the case's voxels."""
    release()
    free_before = gpu_free_bytes() if device != "cpu" else None
    if isinstance(model, Path):
        segmenter = onnx_segmenter(open_onnx(model), device)
    else:
        segmenter = Segmenter(model, InferenceOptions(device=device, precision=precision))
    sync()
    start = time.perf_counter()
    segmentation = segmenter.finish(segmenter.prepare(paths), keep_probabilities=True)
    segmentation.write(out)
    sync()
    row.seconds = time.perf_counter() - start
    row.detail = {"stages_s": {k: round(v, 3) for k, v in segmentation.seconds.items()}}
    if device != "cpu" and segmenter.networks:
        row.gpu_mib = torch.cuda.max_memory_allocated() / 2**20
    elif free_before is not None:
        row.gpu_mib, row.gpu_mib_approx = (free_before - gpu_free_bytes()) / 2**20, True
    return segmentation.labels, segmentation.probabilities


# --- the run ------------------------------------------------------------------------------------------

def run_row(rows: list[Row], row: Row, budget: Budget, cuda: bool, dry_run: bool,
            needs: Sequence[Any] = (), fn: Callable[[], Any] | None = None) -> Any:
    """Run ``fn`` for ``row`` unless it cannot or should not; record the outcome; return its result."""
    rows.append(row)
    reason = unavailable(row.runtime, cuda, dry_run)
    if reason is None and any(n is None for n in needs):
        reason = "its reference or export did not run"
    if reason is None and budget.over():
        reason = f"over the time budget ({budget.seconds:.0f} s)"
    if reason is not None:
        row.status = f"skipped: {reason}"
        return None
    try:
        return fn()
    except Unavailable as err:  # the machine lacks it: not a failure of the code
        row.status = f"skipped: {err}"[:200]
        return None
    except Exception as err:  # a broken path is a row of the table, not the end of the run
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        row.status = f"FAILED: {type(err).__name__}: {first}"[:200]
        row.detail = {"traceback": traceback.format_exc(limit=4)}
        return None
    finally:
        print(f"  {row.check} {row.model} {row.runtime}: {row.status}"
              + (f", {row.seconds:.3f} s" if row.seconds is not None else ""), file=sys.stderr, flush=True)


def measure_model(rows: list[Row], name: str, package: Any, paths: Sequence[Path], sizes: Sizes,
                  args: argparse.Namespace, budget: Budget, cuda: bool, tmp: Path) -> None:
    card = package.card
    roi = "x".join(map(str, card.roi))
    dry = args.dry_run

    def row(check: str, runtime: str) -> Row:
        return Row(check, name, runtime)

    # Windows: the reference, PyTorch on the GPU, ONNX Runtime.
    reference_segmenter = Segmenter(package, InferenceOptions(device="cpu", precision="fp32"))
    windows = cut_windows(reference_segmenter.prepare(paths).array, card.roi, sizes.windows)
    del reference_segmenter
    check = f"window {roi}"
    r = row(check, "torch cpu fp32 (reference)")
    ref = run_row(rows, r, budget, cuda, dry, (),
                  lambda r=r: torch_window_row(r, package, "cpu", "fp32", windows, 1))
    if ref is not None:
        r.agreement_pct, r.max_abs_dp = 100.0, 0.0
    for precision in ("fp32", "fp16", "bf16"):
        r = row(check, f"torch cuda {precision}")
        out = run_row(rows, r, budget, cuda, dry, [ref],
                      lambda r=r, p=precision: torch_window_row(r, package, "cuda", p, windows, sizes.repeats))
        if out is not None:
            compare(r, ref, out, card)

    onnx_path = tmp / f"{name}.onnx"
    export = row(f"export {roi}", "torch.onnx -> onnx (fp32)")
    exported = None
    if name in args.onnx_models:
        def do_export(export: Row = export) -> Path:
            start = time.perf_counter()
            export_onnx(package, onnx_path, ExportOptions(), verify=False)
            export.seconds = time.perf_counter() - start
            return onnx_path
        exported = run_row(rows, export, budget, cuda, dry, (), do_export)
    else:
        rows.append(export)
        export.status = f"skipped: not in --onnx-models ({','.join(args.onnx_models) or 'none'})"
    for device, runtime in (("cpu", "onnxruntime cpu fp32"), ("cuda", "onnxruntime cuda fp32"),
                            ("tensorrt", "onnxruntime tensorrt fp32")):
        r = row(check, runtime)
        if device == "tensorrt":
            def fn(r: Row = r) -> list[np.ndarray]:
                left = max(30.0, budget.seconds - budget.spent())  # an engine build must not outrun the budget
                return isolated_ort_window_row(r, onnx_path, "tensorrt", windows, sizes.repeats,
                                               min(args.isolated_timeout_s, left), tmp)
        else:
            def fn(r: Row = r, device: str = device) -> list[np.ndarray]:
                return ort_window_row(r, onnx_path, device, windows, sizes.repeats)
        out = run_row(rows, r, budget, cuda, dry, [ref, exported], fn)
        if out is not None:
            compare(r, ref, out, card)

    # The whole case, read to written.
    check = "case " + "x".join(map(str, sizes.case_shape))
    r = row(check, "torch cpu fp32 (reference)")
    case_ref = run_row(rows, r, budget, cuda, dry, (),
                       lambda r=r: case_row(r, package, "cpu", "fp32", paths, tmp / "ref.nii.gz"))
    if case_ref is not None:
        r.agreement_pct, r.max_abs_dp = 100.0, 0.0
    for runtime, model, device, precision in (
        ("torch cuda fp32", package, "cuda", "fp32"),
        ("torch cuda fp16", package, "cuda", "fp16"),
        ("onnxruntime cuda fp32", "onnx", "cuda", "auto"),
    ):
        r = row(check, runtime)

        def fn(r: Row = r, model: Any = model, device: str = device,
               precision: str = precision) -> tuple[np.ndarray, np.ndarray]:
            return case_row(r, onnx_path if model == "onnx" else model, device, precision, paths,
                            tmp / "out.nii.gz")
        out = run_row(rows, r, budget, cuda, dry, [case_ref] + ([exported] if model == "onnx" else []), fn)
        if out is not None:
            compare_cases(r, case_ref, out)

    if name != "seed":
        return
    # Training steps: the CUDA rows; a dry run checks the row itself on the CPU.
    batch = 1 if dry else 2
    check = f"train step {batch}x{roi}"
    runtimes = [("cpu", "fp32")] if dry else [("cuda", p) for p in ("fp32", "bf16", "fp16")]
    for device, precision in runtimes:
        r = row(check, f"torch {device} {precision}")
        run_row(rows, r, budget, cuda, dry, (),
                lambda r=r, d=device, p=precision: train_step_row(r, card, d, p, batch, sizes.repeats))


def render(rows: Sequence[Row]) -> str:
    header = (f"{'check':<22} {'model':<17} {'runtime':<27} {'agree %':>9} {'max |dp|':>9} "
              f"{'time s':>8} {'GPU MiB':>8}  status")
    lines = [header, "-" * len(header)]
    for r in rows:
        mib = "" if r.gpu_mib is None else ("~" if r.gpu_mib_approx else "") + f"{r.gpu_mib:.0f}"
        lines.append(
            f"{r.check:<22} {r.model:<17} {r.runtime:<27} "
            f"{'' if r.agreement_pct is None else f'{r.agreement_pct:.4f}':>9} "
            f"{'' if r.max_abs_dp is None else f'{r.max_abs_dp:.1e}':>9} "
            f"{'' if r.seconds is None else f'{r.seconds:.3f}':>8} {mib:>8}  {r.status}")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on the CPU; every GPU row is skipped (checks the script itself)")
    parser.add_argument("--models", default="demo,seed", help="which of demo,seed to measure")
    parser.add_argument("--onnx-models", default=None,
                        help="which models to export to ONNX (default: all; with --dry-run: demo)")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="rows that would start after this many seconds are skipped (default 270)")
    parser.add_argument("--isolated-timeout-s", type=float, default=150.0,
                        help="limit for the TensorRT rows, run in a child process (engine build)")
    parser.add_argument("--json", help="write the rows here")
    for hidden in ("--ort-worker", "--ort-device", "--windows", "--out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    if set(args.models) - {"demo", "seed"}:
        parser.error("--models: choose from demo, seed")
    onnx = args.onnx_models if args.onnx_models is not None else ("demo" if args.dry_run else "demo,seed")
    args.onnx_models = [m for m in onnx.split(",") if m]
    return args


def main() -> int:
    args = parse_args()
    if args.ort_worker:
        return ort_worker(args)
    sizes = DRY if args.dry_run else FULL
    cuda = torch.cuda.is_available() and not args.dry_run
    budget = Budget(args.budget_s)
    rows: list[Row] = []
    import onnxruntime

    gpu = torch.cuda.get_device_name(0) if cuda else "none" + (" (--dry-run)" if args.dry_run else "")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.get_num_threads()} CPU threads; "
          f"GPU: {gpu}; onnxruntime {onnxruntime.__version__}: {', '.join(ort_providers())}; TF32 in fp32 "
          f"rows: convolutions {torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32}",
          flush=True)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        start = time.perf_counter()
        phantom = generate(2, 0, sizes.case_shape)
        files = write_case(phantom, tmp / "case", "BraTS-PHT-00002-000")
        paths = [files[m] for m in MODALITIES]
        print(f"phantom case {sizes.case_shape}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        for name in args.models:
            if name == "demo":
                package = resolve_model("demo", offline=True).package
            else:
                package = seed_package(tmp / "seed", sizes.seed_roi, sizes.seed_patch)
            measure_model(rows, name, package, paths, sizes, args, budget, cuda, tmp)
    print(render(rows))
    failed = [r for r in rows if r.status.startswith("FAILED")]
    print(f"{len(rows)} rows: {sum(r.status == 'ok' for r in rows)} ok, "
          f"{sum(r.status.startswith('skipped') for r in rows)} skipped, {len(failed)} failed; "
          f"{budget.spent():.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"sizes": asdict(sizes), "rows": [asdict(r) for r in rows]},
                                              indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
