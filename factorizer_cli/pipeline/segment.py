"""Segment one case: read → preprocess → infer → postprocess, as a Python API the CLI calls.

``Segmenter`` loads a model once (all folds, on the chosen device) and segments any number of cases;
``Segmentation`` holds one case's label map in the reference image's geometry, and writes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..io.images import Image, read_image, write_nifti
from ..nn.factorization import NMF
from ..zoo.card import ModelCard
from ..zoo.package import ModelPackage
from .backends import OnnxModel, onnx_predictor
from .components import ComponentCapture, ComponentMaps, ComponentRequest
from .device import autocast, resolve_device
from .postprocess import labels_from_probabilities, volumes_ml
from .preprocess import Prepared, preprocess
from .sliding_window import mirror_tta, sliding_window_inference

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class InferenceOptions:
    """How to run the network; ``None`` means the model card's value."""

    overlap: float | None = None
    sw_batch_size: int = 1
    tta: bool = False
    device: str = "auto"
    precision: str = "auto"
    nmf_iters: int | None = None
    label_convention: str | None = None
    backend: str = "torch"  # or "onnx": ONNX Runtime runs the windows (``pipeline.backends``)
    threads: int | None = None  # ONNX Runtime's threads (PyTorch's are the caller's to set)


@dataclass
class Segmentation:
    labels: np.ndarray  # uint8, on the reference image's voxels
    probabilities: np.ndarray | None  # (channels, *reference shape) float32, if kept
    reference: Image
    card: ModelCard
    label_convention: str | None
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    components: ComponentMaps | None = None  # NMF component maps, if asked for (``write(folder)``)

    def volumes(self) -> dict[str, dict[str, float]]:
        rules = self.card.label_rules(self.label_convention)
        return volumes_ml(self.labels, self.reference.affine, rules, dict(self.card.label_names),
                          nested_regions=self.card.activation == "sigmoid")

    def write(self, path: str | Path) -> None:
        """The label map as uint8 NIfTI with the reference's shape, affine and qform/sform codes."""
        write_nifti(path, self.labels, self.reference, np.uint8)

    def write_probabilities(self, path: str | Path) -> None:
        if self.probabilities is None:
            raise ValueError("probabilities were not kept; segment with keep_probabilities=True")
        write_nifti(path, np.moveaxis(self.probabilities, 0, -1), self.reference, np.float32)


def full_resolution_logits(network: nn.Module, x: Tensor) -> Tensor:
    """The full-resolution output only: ``predict`` where the network has it, else the first head."""
    out = network.predict(x) if hasattr(network, "predict") else network(x)
    return out[0] if isinstance(out, (list, tuple)) else out


def set_nmf_iterations(network: nn.Module, num_iters: int) -> None:
    """Run fewer (or more) NMF iterations than trained with: the paper's inference speed-up."""
    if num_iters < 1:
        raise ConfigError(f"--nmf-iters must be at least 1, got {num_iters}")
    for module in network.modules():
        if isinstance(module, NMF):
            module.num_iters = num_iters


class Segmenter:
    """A loaded model, ready to segment cases with fixed inference options."""

    def __init__(self, package: ModelPackage | OnnxModel, options: InferenceOptions = InferenceOptions()) -> None:
        self.card, self.options = package.card, options
        self.onnx = None
        if options.backend == "onnx":  # one sliding window for both: ONNX Runtime takes CPU windows
            self.onnx, self.device, self.networks = onnx_predictor(package, options), torch.device("cpu"), []
            self.card.label_rules(options.label_convention)
            return
        if options.backend != "torch" or isinstance(package, OnnxModel):
            raise ConfigError(f"backend {options.backend!r} cannot run {getattr(package, 'path', 'this model')}; "
                              "an .onnx model runs with --backend onnx, a model package with torch or onnx")
        self.device = resolve_device(options.device)
        self._autocast = lambda: autocast(self.device, options.precision)
        self._autocast()  # validate the precision for this device now, not after preprocessing
        self.networks = package.load_networks(self.device)
        for network in self.networks:
            size = getattr(network, "spatial_size", None)
            if size is not None and tuple(size) != tuple(self.card.roi):
                raise ConfigError(
                    f"model card {self.card.name!r}: roi {tuple(self.card.roi)} differs from the "
                    f"network's spatial_size {tuple(size)}"
                )
            if options.nmf_iters is not None:
                set_nmf_iterations(network, options.nmf_iters)
        self.card.label_rules(options.label_convention)  # validate the convention now

    @property
    def runs_on(self) -> str:
        """Where the windows run, for messages: the PyTorch device, or ONNX Runtime's."""
        return str(self.device) if self.onnx is None else f"{self.onnx.device_name} (onnxruntime)"

    def predict_window(self, x: Tensor) -> Tensor:
        """Mean probability over the folds for a batch of windows (B, C, *roi)."""
        if self.onnx is not None:
            return self.onnx(x)
        total = None
        with self._autocast():
            for network in self.networks:
                logits = full_resolution_logits(network, x).float()
                probs = torch.sigmoid(logits) if self.card.activation == "sigmoid" else logits.softmax(1)
                total = probs if total is None else total.add_(probs)
        return total / len(self.networks)

    def infer(self, prepared: Prepared, progress: Progress | None = None,
              capture: ComponentCapture | None = None) -> np.ndarray:
        """Probabilities on the network grid (channels first); ``capture`` also gets its maps blended."""
        predictor = self.predict_window if capture is None else capture.wrap(self.predict_window)
        if self.options.tta:
            predictor = mirror_tta(predictor, spatial_dims=len(self.card.roi))
        overlap = self.card.overlap if self.options.overlap is None else self.options.overlap
        with torch.inference_mode():
            image = torch.from_numpy(prepared.array)
            probabilities = sliding_window_inference(
                image, self.card.roi, predictor, overlap=overlap,
                sw_batch_size=self.options.sw_batch_size, window_device=self.device,
                output_device="cpu", progress=progress,
                extra_dtype=torch.float32 if capture is None else capture.dtype,
            )
        if capture is not None:
            probabilities, capture.blended = probabilities
        return probabilities.numpy()

    def prepare(self, images: Sequence[Image | str | Path]) -> Prepared:
        """Read (if given paths) and preprocess one case; images in the card's modality order.

        Separate from ``finish`` so that a batch can prepare the next case while this one runs.
        Given paths, the voxels are released once preprocessed instead of staying beside the network.
        """
        if len(images) != len(self.card.modalities):
            names = ", ".join(m.name for m in self.card.modalities)
            raise ConfigError(f"model {self.card.name!r} takes {len(self.card.modalities)} images ({names}), "
                              f"got {len(images)}")
        start = time.perf_counter()
        prepared = preprocess([i if isinstance(i, Image) else read_image(i) for i in images],
                              self.card.spacing, self.card.crop_margin_mm)
        prepared.seconds = time.perf_counter() - start
        return prepared

    def finish(self, prepared: Prepared, progress: Progress | None = None,
               keep_probabilities: bool = False, components: ComponentRequest | None = None) -> Segmentation:
        """Inference and postprocessing of a prepared case; ``components``: NMF maps of fold 0 too."""
        seconds = {"preprocess": prepared.seconds}
        if components is not None and self.onnx is not None:
            raise ConfigError("NMF component maps need the PyTorch backend (--backend torch)")
        capture = None if components is None else ComponentCapture(
            self.networks[0], components, folds=len(self.networks), tta=self.options.tta)
        start = time.perf_counter()
        probabilities = self.infer(prepared, progress, capture)
        seconds["inference"] = time.perf_counter() - start

        start = time.perf_counter()
        probabilities = prepared.inverse.invert(probabilities, fill=0.0)
        labels = labels_from_probabilities(
            probabilities, self.card.outputs, self.card.label_rules(self.options.label_convention),
            self.card.activation, self.card.threshold,
        )
        seconds["postprocess"] = time.perf_counter() - start
        return Segmentation(
            labels=labels,
            probabilities=probabilities if keep_probabilities else None,
            reference=prepared.reference,
            card=self.card,
            label_convention=self.options.label_convention,
            notes=prepared.notes,
            seconds=seconds,
            components=None if capture is None else capture.result(prepared.inverse, prepared.reference,
                                                                    self.card.name),
        )

    def __call__(self, images: Sequence[Image | str | Path], progress: Progress | None = None,
                 keep_probabilities: bool = False, components: ComponentRequest | None = None) -> Segmentation:
        """Segment one case: images or their paths, in the card's modality order (first: reference)."""
        return self.finish(self.prepare(images), progress, keep_probabilities, components)
