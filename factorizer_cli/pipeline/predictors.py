"""Predictors: what runs the network on a batch of windows, for the one sliding window.

A predictor maps windows ``(B, C, *roi)`` to probabilities ``(B, K, *roi)`` (float32): the PyTorch
networks of a model package (folds averaged, under autocast on CUDA), or an exported graph run by
ONNX Runtime. Each says where it runs (``runs_on``, ``device``) and what it has to warn about.

ONNX Runtime's execution providers: CUDA when onnxruntime-gpu is installed and a GPU answers
(TensorRT on request, ``device="tensorrt"``), the CPU otherwise. ``auto`` falls back to the CPU with a
warning; an explicit ``cuda`` or ``tensorrt`` that cannot be had is an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError, DeviceError, one_line
from ..families import Family, activate, family_of, window_logits
from ..zoo.onnx_file import OnnxModel
from ..zoo.package import ModelPackage
from .device import autocast, resolve_device

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
GPU_HINT = ("pip install 'factorizer-cli[gpu]' (onnxruntime-gpu; uninstall the CPU package onnxruntime "
            "first if both are installed)")


class TorchPredictor:
    """The folds of a model package in PyTorch, prepared for inference by their family."""

    def __init__(self, package: ModelPackage, device: str = "auto", precision: str = "auto",
                 knobs: Mapping[str, int] | None = None) -> None:
        self.card = package.card
        self.family: Family = family_of(self.card.architecture)
        self.device = resolve_device(device)
        self._autocast = lambda: autocast(self.device, precision)
        self._autocast()  # validate the precision for this device now, not after preprocessing
        self.networks = []
        for network in package.load_networks(self.device):
            size = getattr(network, "spatial_size", None)
            roi = self.card.roi[:2] if self.card.slice_wise else self.card.roi
            if size is not None and tuple(size) != tuple(roi):
                raise ConfigError(f"model card {self.card.name!r}: roi {tuple(roi)} differs from the network's "
                                  f"spatial_size {tuple(size)}")
            self.family.set_knobs(network, knobs or {})
            self.networks.append(self.family.prepare(network).eval())
        self.runs_on = str(self.device)
        self.warnings: list[str] = []

    def __call__(self, x: Tensor) -> Tensor:
        """Mean probability over the folds for a batch of windows (B, C, *roi)."""
        total = None
        with self._autocast():
            for network in self.networks:
                probs = activate(window_logits(network, x, self.card.slice_wise).float(), self.card.activation)
                total = probs if total is None else total.add_(probs)
        return total / len(self.networks)


def select_providers(device: str = "auto") -> tuple[list[Any], bool]:
    """Execution providers for ``device`` and whether a GPU was asked for explicitly."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    name = device.strip().lower()
    if name == "auto":
        return ([CUDA, CPU] if CUDA in available else [CPU]), False
    if name == "cpu":
        return [CPU], False
    if name == "tensorrt" or name == "cuda" or name.startswith("cuda:"):
        wanted = TENSORRT if name == "tensorrt" else CUDA
        if wanted not in available:
            what = "TensorRT" if wanted == TENSORRT else "CUDA"
            raise DeviceError(f"--device {device}: the {what} execution provider of ONNX Runtime is not installed; "
                              + (GPU_HINT if wanted == CUDA else "install onnxruntime-gpu with TensorRT"))
        index = name.partition(":")[2]
        if index and not index.isdigit():
            raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or tensorrt")
        cuda = (CUDA, {"device_id": int(index or 0)})
        return ([(TENSORRT, {"device_id": int(index or 0)}), cuda] if wanted == TENSORRT else [cuda]) + [CPU], True
    raise DeviceError(f"device {device!r} is not available with --backend onnx; use auto, cpu, cuda, cuda:N "
                      "or tensorrt")


class OnnxPredictor:
    """Probabilities for batches of windows, from an exported graph run by ONNX Runtime."""

    def __init__(self, model: OnnxModel, device: str = "auto", threads: int | None = None) -> None:
        import onnxruntime as ort

        self.model, self.card = model, model.card
        providers, explicit = select_providers(device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's choice (the physical cores)
        options.inter_op_num_threads = 1
        # Memory patterns plan one block for all of a run's tensors from the first run: twice the peak
        # memory (8.6 GB against 4.5 GB for a 128³ Swin Factorizer) and a slow second run.
        options.enable_mem_pattern = False
        # Threads that spin between runs would take the CPU from the sliding window's blending.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only; a provider that fails is reported below
        try:
            self.session = ort.InferenceSession(str(model.path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own (pybind) exception types
            if explicit:
                raise DeviceError(f"--device {device}: ONNX Runtime cannot use it ({one_line(err)})") from None
            raise CheckpointError(f"{model.path}: ONNX Runtime cannot load this model ({one_line(err)})") from None
        self.warnings: list[str] = []
        active = self.session.get_providers()
        gpu_wanted = any((p[0] if isinstance(p, tuple) else p) != CPU for p in providers)
        if gpu_wanted and active[0] == CPU:
            if explicit:
                raise DeviceError(f"--device {device}: ONNX Runtime found no usable GPU (driver or CUDA "
                                  "libraries missing?); use --device cpu")
            self.warnings.append("onnxruntime-gpu is installed but no GPU answered; running on the CPU")
        self.provider = active[0]
        self.device_name = "cpu" if self.provider == CPU else ("tensorrt" if self.provider == TENSORRT else "cuda")
        self.runs_on = f"{self.device_name} (onnxruntime)"
        self.device = torch.device("cpu")  # where the sliding window gives and collects windows
        first_in = self.session.get_inputs()[0]
        self.input_name = first_in.name
        self.input_dtype = np.float16 if first_in.type == "tensor(float16)" else np.float32
        batch = first_in.shape[0]
        self.batch_size = batch if isinstance(batch, int) and batch > 0 else None

    def __call__(self, x: Tensor) -> Tensor:
        """``(B, C, *roi)`` windows to float32 probabilities ``(B, K, *roi)`` on ``x``'s device."""
        array = x.detach().to("cpu", torch.float32).numpy().astype(self.input_dtype, copy=False)
        step = self.batch_size or len(array)
        outputs = []
        for start in range(0, len(array), step):
            chunk = array[start : start + step]
            if len(chunk) < step:  # a graph of fixed batch: pad with copies of the last window
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - len(chunk), axis=0)])
            out = self.session.run(None, {self.input_name: np.ascontiguousarray(chunk)})[0]
            outputs.append(out[: len(array) - start])
        y = torch.from_numpy(np.concatenate(outputs) if len(outputs) > 1 else outputs[0]).float()
        if self.model.output == "logits":
            y = activate(y, self.card.activation)
        return y.to(x.device)


def onnx_predictor(model: OnnxModel, device: str = "auto", precision: str = "auto",
                   knobs: Mapping[str, int] | None = None, threads: int | None = None) -> OnnxPredictor:
    """ONNX Runtime for an exported graph; knobs must be the ones it was exported with."""
    if precision not in ("auto", "fp32"):
        raise ConfigError(f"--precision {precision}: with --backend onnx the graph fixes the precision "
                          "(export a half-precision graph with `factorizer export-onnx --fp16`)")
    family = family_of(model.card.architecture)
    for name, value in (knobs or {}).items():
        knob = family.knob(name)
        exported = model.knob_values(name)
        if exported and set(exported) != {value}:
            raise ConfigError(f"{model.path}: exported with {knob.option} {', '.join(map(str, exported))}; "
                              f"{knob.option} {value} needs a new export (`factorizer export-onnx {knob.option}`)")
    return OnnxPredictor(model, device, threads)
