"""Segment one case: read → preprocess → infer → postprocess, as a Python API the CLI calls.

``Segmenter`` loads a model once (all folds, on the chosen device) and segments any number of cases;
``Segmentation`` holds one case's label map in the reference image's geometry, and writes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from ..families import family_of
from ..io.images import Image, read_image, write_nifti
from ..zoo.card import ModelCard
from ..zoo.onnx_file import OnnxModel
from ..zoo.package import ModelPackage
from .components import ComponentCapture, ComponentMaps, ComponentRequest
from .postprocess import labels_from_probabilities, volumes_ml
from .predictors import TorchPredictor, onnx_predictor
from .preprocess import Prepared, preprocess
from .sliding_window import mirror_tta, reuse_constant_windows, sliding_window_inference

Progress = Callable[[int, int], None]
# Slices per network call for slice-wise (2D) models. SPiN's published network on 2 CPU cores, a whole
# 197×233×189 volume (benchmarks/spin.py --batch): 32.1 s at 1, 25.0 s at 4, 23.6 s at 8, 24.9 s at 16.
SLICES_PER_CALL = 8


@dataclass(frozen=True)
class InferenceOptions:
    """How to run the network; ``None`` means the model card's value."""

    overlap: float | None = None
    sw_batch_size: int | None = None  # None: 1 window, or SLICES_PER_CALL slices for a slice-wise model
    tta: bool = False
    device: str = "auto"
    precision: str = "auto"
    knobs: Mapping[str, int] = field(default_factory=dict)  # the family's, e.g. {"nmf_iters": 2}
    label_convention: str | None = None
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


class Segmenter:
    """A loaded model, ready to segment cases with fixed inference options.

    A model package runs in PyTorch; an exported ``OnnxModel`` in ONNX Runtime (``factorizer_cli.api``
    exports a package on request). Both predict windows for the same sliding window, TTA and
    postprocessing.
    """

    def __init__(self, model: ModelPackage | OnnxModel, options: InferenceOptions = InferenceOptions()) -> None:
        self.card, self.options = model.card, options
        if self.card.role == "initialisation":
            raise ConfigError(f"model {self.card.name!r} holds pretrained weights to start a training from, not a "
                              f"segmentation model; use it with `factorizer train DATA --card CARD --init "
                              f"{self.card.name}`")
        self.family = family_of(self.card.architecture)
        self.card.label_rules(options.label_convention)  # validate the convention now
        if isinstance(model, OnnxModel):
            self.predictor = onnx_predictor(model, options.device, options.precision, options.knobs, options.threads)
            self.networks: list = []
        else:
            self.predictor = TorchPredictor(model, options.device, options.precision, options.knobs)
            self.networks = self.predictor.networks
        self.device = self.predictor.device

    @property
    def runs_on(self) -> str:
        """Where the windows run, for messages: the PyTorch device, or ONNX Runtime's."""
        return self.predictor.runs_on

    @property
    def warnings(self) -> list[str]:
        return self.predictor.warnings

    def check_components(self, request: ComponentRequest) -> None:
        """Refuse a component request this model cannot serve, before any work."""
        with self._capture(request):
            pass

    def _capture(self, request: ComponentRequest):
        """The family's recorders on fold 0's chosen blocks, for a ``with`` block (``ConfigError`` if none)."""
        if not self.networks:
            raise ConfigError("NMF component maps need the PyTorch backend (--backend torch and a model package)")
        return self.family.capture_components(self.networks[0], request.blocks)

    def predict_window(self, x: Tensor) -> Tensor:
        """Mean probability over the folds for a batch of windows (B, C, *roi)."""
        return self.predictor(x)

    def infer(self, prepared: Prepared, progress: Progress | None = None,
              capture: ComponentCapture | None = None) -> np.ndarray:
        """Probabilities on the network grid (channels first); ``capture`` also gets its maps blended."""
        predictor = self.predict_window if capture is None else capture.wrap(self.predict_window)
        slice_wise = self.card.slice_wise
        batch = self.options.sw_batch_size or (SLICES_PER_CALL if slice_wise else 1)
        if self.options.tta:
            predictor = mirror_tta(predictor, spatial_dims=len(self.card.roi), mirrored_dims=2 if slice_wise else None)
        if slice_wise and capture is None:  # a 2D network's windows are independent of their batch
            predictor = reuse_constant_windows(predictor)
        overlap = self.card.overlap if self.options.overlap is None else self.options.overlap
        with torch.inference_mode():
            image = torch.from_numpy(prepared.array)
            probabilities = sliding_window_inference(
                image, self.card.roi, predictor, overlap=overlap,
                sw_batch_size=batch, window_device=self.device,
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
                              self.card.preprocessing)
        prepared.seconds = time.perf_counter() - start
        return prepared

    def finish(self, prepared: Prepared, progress: Progress | None = None,
               keep_probabilities: bool = False, components: ComponentRequest | None = None) -> Segmentation:
        """Inference and postprocessing of a prepared case; ``components``: NMF maps of fold 0 too."""
        seconds = {"preprocess": prepared.seconds}
        capture = None
        start = time.perf_counter()
        if components is None:
            probabilities = self.infer(prepared, progress)
        else:
            with self._capture(components) as recorders:
                capture = ComponentCapture(recorders, components, folds=len(self.networks), tta=self.options.tta)
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
