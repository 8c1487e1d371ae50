"""The Python API: what each ``factorizer`` command does, as functions that return results.

The command (``factorizer_cli.cli``) parses its arguments, calls these functions and renders what
they return; a Python program calls the same ones::

    from factorizer_cli import load_segmenter, segment_case, segment_dataset

    segmenter = load_segmenter("isles22-swin-factorizer", device="cuda", tta=True)
    result = segment_case(segmenter, "sub-01/", "sub-01-seg.nii.gz", stats="sub-01.json")
    report = segment_dataset(segmenter, "rawdata/", "predictions/")
    report.write()  # predictions/summary.json

The commands split each job in two, ``plan_case`` / ``plan_dataset`` (inputs found, outputs checked)
before ``load_segmenter`` (weights loaded, maybe an ONNX export) and ``plan.run(segmenter)``, so that a
bad input or output is refused before any work; ``segment_case`` and ``segment_dataset`` are both
steps at once. Every failure is one of the typed errors of ``factorizer_cli.errors`` with a one-line
message naming the file and the fix; nothing here exits or changes the environment.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .demo import DemoResult
from .demo import run_demo as _run_demo
from .errors import ConfigError, InputError
from .export import ExportedFile, ExportOptions
from .export import export_onnx as _export_onnx
from .export.exporter import cached_onnx
from .families import build, family_of
from .genesis.pretrain import PretrainConfig, PretrainResult
from .genesis.pretrain import pretrain as _pretrain
from .genesis.transfer import Transfer, load_initialisation
from .io.atomic import write_json_atomic
from .io.cases import resolve_inputs
from .io.images import check_output_folder, check_outputs
from .phantom import generate_dataset
from .pipeline.batch import CaseResult, DatasetPlan, DatasetReport, plan_dataset, segment_dataset
from .pipeline.components import ComponentRequest, PreviewTile, write_components_preview
from .pipeline.device import resolve_device
from .pipeline.evaluate import Evaluation, evaluate_folders
from .pipeline.preview import preview_background, write_preview
from .pipeline.segment import InferenceOptions, Segmentation, Segmenter
from .train import TrainConfig, TrainResult
from .train import train as _train
from .train.distributed import is_writer, threads_per_process
from .train.pack import pack_runs as _pack_runs
from .zoo.card import ModelCard
from .zoo.license import LicenseTerms, acceptance_note, license_terms, require_accepted
from .zoo.onnx_file import OnnxModel, is_onnx_path, open_onnx
from .zoo.package import ModelPackage
from .zoo.registry import zoo_card, zoo_names
from .zoo.resolve import convert, fetch_weights, load_card, resolve_model
from .zoo.weights import (
    FetchedWeight,
    Verification,
    WeightSource,
    remove_cached,
    verify_cached,
    weight_sources,
    with_revision,
)

__all__ = [
    "CasePlan", "CaseResult", "DatasetPlan", "DatasetReport", "DemoResult", "Environment", "Evaluation",
    "ExportOptions", "ExportedFile", "FetchedWeight", "InferenceOptions", "LicenseTerms", "ModelCard", "OpenedModel",
    "Segmentation", "Segmenter", "TrainConfig", "TrainResult", "Verification", "WeightSource",
    "acceptance_note", "components_preview", "download_weights", "environment", "evaluate", "export_onnx", "family_title", "generate_phantoms",
    "import_checkpoints", "is_writer", "license_terms", "load_card", "load_segmenter", "open_model", "parameter_count", "plan_case",
    "plan_dataset", "remove_cached", "run_demo", "segment_case", "segment_dataset", "set_threads",
    "threads_per_process", "torch_version", "train", "verify_cached", "weight_sources", "zoo_models",
    "PretrainConfig", "PretrainResult", "Transfer", "pretrain",
]

BACKENDS = ("torch", "onnx")
PathLike = str | os.PathLike[str]

# ------------------------------------------------------------------------------------------ models


@dataclass(frozen=True)
class OpenedModel:
    """A model found and checked, its networks not built yet: a model package or an exported graph."""

    source: ModelPackage | OnnxModel
    backend: str  # "torch" or "onnx": what will run it
    unverified: tuple[str, ...] = ()  # weight sources used without a known checksum

    @property
    def card(self) -> ModelCard:
        return self.source.card


def open_model(model: PathLike, *, card: PathLike | None = None, offline: bool = False,
               backend: str | None = None, accept_license: bool = False) -> OpenedModel:
    """Find ``model``: a zoo name, a model folder, ``hf://ORG/REPO[@REV]``, an upstream checkpoint with
    ``card``, or an ``.onnx`` file from ``export-onnx``. Weights are downloaded (unless ``offline``)
    and checked; no network is built yet. ``backend``: ``torch``, or ``onnx`` (the default for an
    ``.onnx`` file; a model package is then exported once into the cache by ``load_segmenter``).
    A model whose licence is not permissive raises ``LicenseError`` before anything is fetched, unless
    ``accept_license`` (or ``FACTORIZER_ACCEPT_LICENSE=1``).
    """
    if backend not in (None, *BACKENDS):
        raise ConfigError(f"unknown backend {backend!r}; choose {' or '.join(BACKENDS)}")
    if is_onnx_path(model):
        if backend == "torch":
            raise ConfigError(f"backend 'torch' cannot run {model}; an .onnx model runs with --backend onnx, "
                              "a model package with torch or onnx")
        graph = open_onnx(model, card=load_card(card) if card else None)
        require_accepted(graph.card, accept_license)
        return OpenedModel(graph, "onnx")
    resolved = resolve_model(model, card=card, offline=offline, accept_license=accept_license)
    return OpenedModel(resolved.package, backend or "torch", resolved.unverified)


def load_segmenter(model: PathLike | OpenedModel, *, card: PathLike | None = None, offline: bool = False,
                   backend: str | None = None, accept_license: bool = False, **options: Any) -> Segmenter:
    """A ``Segmenter`` for ``model``: anything ``open_model`` takes (with ``card``, ``offline``,
    ``backend`` and ``accept_license`` as there), or what it returned.

    ``options`` are the fields of ``InferenceOptions``: ``overlap``, ``sw_batch_size``, ``tta``,
    ``device``, ``precision``, ``knobs`` (the family's, e.g. ``{"nmf_iters": 3}``), ``label_convention``,
    ``threads`` (ONNX Runtime's; PyTorch's: ``set_threads``). With the ``onnx`` backend a model package
    is exported once into the cache (``export.cached_onnx``) and that graph runs.
    """
    opened = model if isinstance(model, OpenedModel) else open_model(
        model, card=card, offline=offline, backend=backend, accept_license=accept_license)
    inference = InferenceOptions(**options)
    source = opened.source
    if opened.backend == "onnx" and isinstance(source, ModelPackage):
        source = open_onnx(cached_onnx(source, knobs=inference.knobs))
    return Segmenter(source, inference)


def set_threads(threads: int | None) -> None:
    """PyTorch's CPU threads in this process (the commands' ``--threads``); None keeps its default."""
    if threads:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------- one case


@dataclass(frozen=True)
class CasePlan:
    """One case to segment: its images in the model's order and its outputs, checked before any work."""

    images: tuple[Path, ...]
    output: Path
    probabilities: Path | None = None
    stats: Path | None = None
    preview: Path | None = None
    components: Path | None = None
    request: ComponentRequest | None = None

    def run(self, segmenter: Segmenter, progress: Callable[[int, int], None] | None = None) -> Segmentation:
        """Segment the case and write its outputs: the extras first, the label map last, so that a label
        map on disk means the whole case is done. Every file is written whole or not at all."""
        if self.request is not None:
            segmenter.check_components(self.request)  # a wrong block name fails now, not after inference
        images = list(self.images)
        result = segmenter(images, progress=progress, keep_probabilities=self.probabilities is not None,
                           components=self.request)
        if self.probabilities:
            result.write_probabilities(self.probabilities)
        if self.stats:
            write_json_atomic(self.stats, case_stats(result, images, segmenter.runs_on))
        if self.preview:
            background = preview_background(result.card, images, result.reference)
            write_preview(self.preview, background.array, result.labels, result.reference.affine)
        if result.components is not None and self.components is not None:
            result.components.write(self.components)
        result.write(self.output)
        return result


def plan_case(card: ModelCard, inputs: PathLike | Sequence[PathLike], output: PathLike, *,
              modalities: Sequence[str] = (), probabilities: PathLike | None = None,
              stats: PathLike | None = None, preview: PathLike | None = None, components: PathLike | None = None,
              component_blocks: Sequence[str] | None = None, component_dtype: str = "float32",
              backend: str = "torch") -> CasePlan:
    """Find the case's images and check every output, for a model with ``card``.

    ``inputs``: a case folder, or one image per modality with ``modalities`` naming them (aliases
    accepted, any order). Outputs: the label map ``output`` (``.nii.gz``), and on request the
    probabilities (4D ``.nii.gz``), volumes (``stats`` JSON), a PNG ``preview``, NMF component maps
    (a ``components`` folder; ``component_blocks`` as ``segment --component-blocks``, ``component_dtype``
    float32 or float16). Raises ``InputError``/``OutputError`` before anything is read or written.
    """
    if components is not None and backend == "onnx":
        raise InputError("--components needs the PyTorch backend (--backend torch and a model package)")
    images = resolve_inputs([inputs] if isinstance(inputs, str | os.PathLike) else list(inputs), modalities,
                            card.modality_specs)
    extras = [(p, kind) for p, kind in ((probabilities, "nifti"), (stats, "json"), (preview, "png")) if p]
    check_outputs([(output, "nifti"), *extras], images)
    request = None
    if components is not None:
        check_output_folder(components, "--components", "components.json")
        request = ComponentRequest(blocks=None if component_blocks is None else tuple(component_blocks),
                                   dtype=component_dtype)
    return CasePlan(tuple(images), Path(output), _path(probabilities), _path(stats), _path(preview),
                    _path(components), request)


def segment_case(segmenter: Segmenter, inputs: PathLike | Sequence[PathLike], output: PathLike, *,
                 modalities: Sequence[str] = (), probabilities: PathLike | None = None,
                 stats: PathLike | None = None, preview: PathLike | None = None, components: PathLike | None = None,
                 component_blocks: Sequence[str] | None = None, component_dtype: str = "float32",
                 progress: Callable[[int, int], None] | None = None) -> Segmentation:
    """Segment one case and write its outputs (``plan_case``, then ``CasePlan.run``)."""
    plan = plan_case(segmenter.card, inputs, output, modalities=modalities, probabilities=probabilities,
                     stats=stats, preview=preview, components=components, component_blocks=component_blocks,
                     component_dtype=component_dtype)
    return plan.run(segmenter, progress)


def _path(path: PathLike | None) -> Path | None:
    return Path(path) if path else None


def case_stats(result: Segmentation, inputs: Sequence[Path], device: str) -> dict[str, Any]:
    """The ``--stats`` report of one case: volumes per label and region (mL), timings, notes."""
    return {
        "model": result.card.name,
        "inputs": [str(p) for p in inputs],
        "label_convention": result.label_convention or "default",
        "device": device,
        **result.volumes(),
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
        "notes": result.notes,
    }


# ----------------------------------------------------------------------------- the other commands


def run_demo(out_dir: PathLike, *, device: str = "auto") -> DemoResult:
    """The bundled demo model on a generated phantom case in ``out_dir``, scored against its truth."""
    return _run_demo(out_dir, InferenceOptions(device=device))


def generate_phantoms(out_dir: PathLike, cases: int, seed: int = 0,
                      progress: Callable[[int, int], None] | None = None, kind: str = "glioma") -> list[Path]:
    """Synthetic cases ``0 .. cases-1`` of series ``seed``; the case folders. ``kind``: ``"glioma"`` (four
    modalities in BraTS layout) or ``"stroke"`` (a clinical-grid T1 with chronic lesions, ``phantom_stroke``)."""
    if kind == "stroke":
        from .phantom_stroke import generate_dataset as generate_strokes

        return generate_strokes(out_dir, cases, seed, progress)
    if kind != "glioma":
        raise ConfigError(f"unknown phantom kind {kind!r}; use glioma or stroke")
    return generate_dataset(out_dir, cases, seed, progress)


def train(data_dir: PathLike, card: PathLike | ModelCard, out_dir: PathLike, config: TrainConfig = TrainConfig(),
          *, resume: bool = False, device: str = "auto", on_step: Callable | None = None,
          on_case: Callable[[int, int], None] | None = None, workers: int = 0,
          cache: PathLike | None = None, on_validation: Callable[[int, int], None] | None = None,
          init: PathLike | None = None, accept_license: bool = False,
          on_init: Callable[[Transfer], None] | None = None) -> TrainResult:
    """Train ``card``'s network on a labelled dataset folder into ``out_dir`` (``train.train``); cases are
    preprocessed once into ``cache`` (default ``FACTORIZER_HOME/train-cache``), batches made by
    ``workers`` DataLoader processes (0: this one). Under ``torchrun`` each process runs this, process 0
    writes and reports. ``on_step``, ``on_case`` (cases prepared) and ``on_validation`` (cases
    validated) report progress.

    ``init`` starts a new run from pretrained weights (``genesis.transfer``: a model package, a
    ``pretrain`` run, a zoo name, ``hf://`` or a checkpoint file; ``accept_license`` as for ``segment``);
    a checkpoint that fits too little of the card's network is refused here, before any case is
    prepared, and ``on_init`` gets the report of what was transferred. A resumed run ignores it."""
    card = card if isinstance(card, ModelCard) else load_card(card)
    initialise = None
    if init is not None and not resume:
        initialisation = load_initialisation(init, accept_license=accept_license)
        with torch.device("meta"):
            initialisation.plan(build(dict(card.architecture)))  # a mismatch refused now, not after the cases
        config = replace(config, init=str(init))

        def initialise(network: torch.nn.Module) -> None:
            transfer = initialisation.apply(network)
            if on_init is not None:
                on_init(transfer)

    return _train(data_dir, card, Path(out_dir), config, resume, resolve_device(device), on_step, on_case,
                  workers=workers, cache_dir=cache, validation_progress=on_validation, initialise=initialise)


def pretrain(data_dir: PathLike, out_dir: PathLike, config: PretrainConfig = PretrainConfig(), *,
             resume: bool = False, device: str = "auto", on_step: Callable | None = None,
             on_volume: Callable[[int, int], None] | None = None, workers: int = 0,
             cache: PathLike | None = None) -> PretrainResult:
    """Semantic Genesis pretraining on the unlabelled volumes of ``data_dir`` into ``out_dir``
    (``genesis.pretrain``): its ``model/`` package is what ``train(..., init=...)`` starts from. Volumes
    are preprocessed once into ``cache`` (default ``FACTORIZER_HOME/pretrain-cache``); ``on_volume``
    (volumes prepared) and ``on_step(step, steps, loss, accuracy)`` report progress."""
    return _pretrain(data_dir, Path(out_dir), config, resume, resolve_device(device), on_step, on_volume,
                     workers=workers, cache_dir=cache)


def evaluate(pred_dir: PathLike, gt_dir: PathLike, *, regions: str = "auto", csv: PathLike | None = None,
             json: PathLike | None = None, progress: Callable[[int, int], None] | None = None,
             lesion_wise: bool = False) -> Evaluation:
    """Score a prediction folder against its ground truths; also write the CSV and JSON reports asked
    for (their paths are checked before any scoring). ``lesion_wise`` adds the lesion-by-lesion scores
    of ``pipeline.lesions`` (stroke models)."""
    check_outputs([(path, "report") for path in (csv, json) if path is not None], [])
    result = evaluate_folders(pred_dir, gt_dir, regions=regions, progress=progress, lesion_wise=lesion_wise)
    if csv:
        result.write_csv(csv)
    if json:
        result.write_json(json)
    return result


def export_onnx(model: PathLike | OpenedModel, output: PathLike, options: ExportOptions = ExportOptions(), *,
                card: PathLike | None = None, offline: bool = False, verify: bool = True,
                progress: Callable[[str], None] | None = None,
                on_open: Callable[[ModelCard], None] | None = None, accept_license: bool = False
                ) -> list[ExportedFile]:
    """Export a model package to ONNX at ``output``, verified against PyTorch before it is written.

    ``output`` is checked before the model is opened; ``on_open(card)`` is called once it is.
    """
    check_outputs([(output, "onnx")], [])
    opened = model if isinstance(model, OpenedModel) else open_model(model, card=card, offline=offline,
                                                                       accept_license=accept_license)
    if not isinstance(opened.source, ModelPackage):
        raise ConfigError(f"{opened.source.path} is an ONNX model already; export a zoo name, a model folder or "
                          "a checkpoint with --card")
    if on_open is not None:
        on_open(opened.card)
    return _export_onnx(opened.source, output, options, verify=verify, progress=progress)


def components_preview(output: PathLike, folder: PathLike, over: PathLike, *, top: int = 8,
                       blocks: Sequence[str] | None = None, by: str = "contrast") -> list[PreviewTile]:
    """A PNG montage of the strongest component maps of a ``segment --components`` folder over an image."""
    check_outputs([(output, "png")], [over])
    return write_components_preview(output, folder, over, top=top, blocks=blocks or None, by=by)


def zoo_models() -> list[ModelCard]:
    """The cards of the models that ship with the package, by name."""
    return [zoo_card(name) for name in zoo_names()]


def family_title(card: ModelCard) -> str:
    """The architecture family of a card's network, for people: ``Factorizer``, ``plain PyTorch layer``."""
    return family_of(card.architecture).title


def parameter_count(card: ModelCard) -> int:
    """The number of parameters of one fold of ``card``'s network (built without memory)."""
    with torch.device("meta"):
        network = build(dict(card.architecture))
    return sum(p.numel() for p in network.parameters())


def download_weights(card: ModelCard, *, revision: str | None = None,
                     progress: Callable[[str, int, int | None], None] | None = None,
                     accept_license: bool = False) -> list[tuple[WeightSource, FetchedWeight]]:
    """Fetch a card's weights into the cache and check them; ``revision`` overrides hub revisions.
    ``LicenseError`` first for a licence that is not permissive, unless ``accept_license``."""
    if revision:
        card = with_revision(card, revision)
    fetched = fetch_weights(card, offline=False, progress=progress, accept_license=accept_license)
    return list(zip(weight_sources(card), fetched))


def import_checkpoints(checkpoints: Sequence[PathLike], card: PathLike | ModelCard, output: PathLike) -> ModelPackage:
    """Upstream checkpoints (one per fold) converted into a model package at ``output``."""
    card = card if isinstance(card, ModelCard) else load_card(card)
    return convert(card, [Path(c) for c in checkpoints], Path(output))


def pack_runs(runs: Sequence[PathLike], output: PathLike, which: str = "best") -> ModelPackage:
    """Fold runs of ``train`` (their ``best/`` or ``last/`` packages) as one ensemble package."""
    return _pack_runs([Path(r) for r in runs], Path(output), which)


# ------------------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class Environment:
    """Versions and compute devices, for ``factorizer info``."""

    version: str
    torch: str
    cpu_threads: int
    cuda_device: str | None  # the first GPU's name, or None
    onnxruntime: str
    onnx_providers: tuple[str, ...]


def torch_version() -> str:
    return torch.__version__


def environment() -> Environment:
    import onnxruntime  # here only: the other commands do without its import time

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return Environment(__version__, torch.__version__, torch.get_num_threads(), cuda, onnxruntime.__version__,
                       tuple(onnxruntime.get_available_providers()))

