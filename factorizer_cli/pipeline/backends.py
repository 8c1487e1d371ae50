"""The ONNX Runtime backend: an exported graph predicting sliding windows.

``open_onnx`` reads an ``.onnx`` file written by ``factorizer export-onnx`` (its model card is in the
metadata) and checks that the graph's input and output fit the card. ``OnnxPredictor`` maps a batch
of windows ``(B, C, *roi)`` to probabilities ``(B, K, *roi)``, as ``Segmenter.predict_window`` does
with PyTorch, so the same sliding window, TTA and postprocessing serve both backends.

Execution providers: CUDA when onnxruntime-gpu is installed and a GPU answers (TensorRT on request,
``device="tensorrt"``), the CPU otherwise. ``auto`` falls back to the CPU with a warning; an explicit
``cuda`` or ``tensorrt`` that cannot be had is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError, DeviceError, one_line
from ..zoo.card import ModelCard

META_CARD, META_OUTPUT, META_NMF_ITERS = "factorizer.card", "factorizer.output", "factorizer.nmf_iters"
CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
GPU_HINT = ("pip install 'factorizer-cli[gpu]' (onnxruntime-gpu; uninstall the CPU package onnxruntime "
            "first if both are installed)")


@dataclass(frozen=True)
class OnnxModel:
    """An exported graph and the card it carries (or was given)."""

    card: ModelCard
    path: Path
    output: str = "logits"  # or "probabilities" (an averaged ensemble)
    nmf_iters: tuple[int, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)


def is_onnx_path(spec: str | Path) -> bool:
    return str(spec).lower().endswith(".onnx")


def open_onnx(path: str | Path, card: ModelCard | None = None) -> OnnxModel:
    """Read an exported ``.onnx`` file's card and check its input and output against it.

    ``card`` stands in for the metadata of a graph exported elsewhere (its output taken as logits).
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a readable ONNX model ({one_line(err)}); export it again "
                              "with `factorizer export-onnx`") from None
    if not model.graph.node:
        raise CheckpointError(f"{path}: not an ONNX model (no graph); export it with `factorizer export-onnx`")
    metadata = {p.key: p.value for p in model.metadata_props}
    if card is None:
        if META_CARD not in metadata:
            raise ConfigError(f"{path}: this ONNX model has no Factorizer model card in its metadata (not "
                              "written by `factorizer export-onnx`); export it with that command, or give --card")
        try:
            card = ModelCard.from_dict(json.loads(metadata[META_CARD]))
        except (json.JSONDecodeError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{path}: the model card in its metadata is unreadable ({err})") from None
        output = metadata.get(META_OUTPUT, "logits")
    else:
        output = "logits"
    _check_signature(model.graph, card, path)
    try:
        iters = tuple(json.loads(metadata.get(META_NMF_ITERS, "[]")))
    except json.JSONDecodeError:
        iters = ()
    return OnnxModel(card, path, output, iters, metadata)


def _dims(value_info: Any) -> list[int | str]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def _check_signature(graph: Any, card: ModelCard, path: Path) -> None:
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    expected_in = [len(card.modalities), *card.roi]
    expected_out = [len(card.outputs), *card.roi]
    if len(inputs) != 1 or not graph.output:
        raise ConfigError(f"{path}: the graph takes {len(inputs)} inputs and gives {len(graph.output)} outputs; "
                          "a segmentation model takes one image (batch, channels, *roi) and gives one output")
    got_in, got_out = _dims(inputs[0]), _dims(graph.output[0])
    if len(got_in) != len(expected_in) + 1 or got_in[1:] != expected_in:
        raise ConfigError(
            f"{path}: the graph's input {tuple(got_in)} does not match its model card {card.name!r}: "
            f"(batch, {len(card.modalities)} modalities, roi {', '.join(map(str, card.roi))})")
    if len(got_out) != len(expected_out) + 1 or got_out[1:] != expected_out:
        raise ConfigError(
            f"{path}: the graph's output {tuple(got_out)} does not match its model card {card.name!r}: "
            f"(batch, {len(card.outputs)} outputs {', '.join(card.outputs)}, roi {', '.join(map(str, card.roi))})")


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
            y = torch.sigmoid(y) if self.card.activation == "sigmoid" else y.softmax(1)
        return y.to(x.device)


def onnx_predictor(model: Any, options: Any) -> OnnxPredictor:
    """The window predictor for ``InferenceOptions`` ``options``: an ``OnnxModel`` as it is, or a
    model package exported once into the cache (with ``options.nmf_iters``)."""
    if options.precision not in ("auto", "fp32"):
        raise ConfigError(f"--precision {options.precision}: with --backend onnx the graph fixes the precision "
                          "(export a half-precision graph with `factorizer export-onnx --fp16`)")
    if not isinstance(model, OnnxModel):
        from ..export.exporter import cached_onnx

        model = open_onnx(cached_onnx(model, nmf_iters=options.nmf_iters))
    elif options.nmf_iters is not None and model.nmf_iters and set(model.nmf_iters) != {options.nmf_iters}:
        raise ConfigError(f"{model.path}: exported with {', '.join(map(str, model.nmf_iters))} NMF iterations; "
                          f"--nmf-iters {options.nmf_iters} needs a new export (`factorizer export-onnx --nmf-iters`)")
    return OnnxPredictor(model, options.device, options.threads)
