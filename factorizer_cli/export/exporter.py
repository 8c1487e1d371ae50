"""Export a model package to ONNX: one self-describing ``.onnx`` file per model (or per fold).

The graph is ``ExportGraph`` (the full-resolution head, NMF iterations unrolled), exported with
PyTorch's ``torch.export``-based exporter at the card's ROI. The model card goes into the ONNX
metadata (``factorizer.card``), so the file alone is enough to segment; ``onnx.checker`` must pass
before anything is written, and the file is written whole or not at all.

An ensemble (one network per fold) becomes either one graph that averages the folds' probabilities
(``ensemble="average"``, the default: the graph outputs probabilities) or one file per fold
(``ensemble="folds"``: each outputs its logits, as a single model does).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__
from ..errors import ConfigError, ExportError, one_line
from ..io.images import atomic_path
from ..pipeline.backends import META_CARD, META_NMF_ITERS, META_OUTPUT
from ..pipeline.segment import full_resolution_logits, set_nmf_iterations
from ..zoo import cache
from ..zoo.card import ModelCard
from ..zoo.package import ModelPackage, sha256_of
from .graph import ExportGraph

FORMAT_VERSION = "1"
DEFAULT_OPSET = 20  # 20: ONNX has GELU (opset 18 spells it out as Erf, Div, Add, Mul)
ENSEMBLES = ("average", "folds")
INPUT_NAME = "image"
META_FOLDS, META_FORMAT = "factorizer.folds", "factorizer.format"
TOLERANCE_FP32, TOLERANCE_FP16 = 1e-4, 5e-2  # largest |ONNX Runtime - PyTorch| accepted


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    nmf_iters: int | None = None  # None: as trained
    fp16: bool = False
    batch_size: int | None = 1  # None: dynamic
    ensemble: str = "average"


@dataclass
class ExportedFile:
    path: Path
    fold: int | None  # None: the whole model (one network, or the averaged folds)
    output: str  # "logits" or "probabilities"
    seconds: float
    size_bytes: int
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # per verification input


class EnsembleGraph(nn.Module):
    """The folds' mean probability (sigmoid or softmax of each fold's logits)."""

    def __init__(self, networks: Sequence[nn.Module], activation: str) -> None:
        super().__init__()
        self.folds = nn.ModuleList(ExportGraph(n) for n in networks)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        total = None
        for fold in self.folds:
            logits = fold(x).float()
            p = torch.sigmoid(logits) if self.activation == "sigmoid" else logits.softmax(1)
            total = p if total is None else total + p
        return total / len(self.folds)


def export_onnx(
    package: ModelPackage,
    output: str | Path,
    options: ExportOptions = ExportOptions(),
    verify: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[ExportedFile]:
    """Export ``package`` to ``output`` (``.onnx``); with ``ensemble="folds"`` one ``NAME.foldK.onnx`` each."""
    output = Path(output)
    if output.suffix.lower() != ".onnx":
        raise ConfigError(f"{output}: the ONNX file name must end in .onnx")
    if options.ensemble not in ENSEMBLES:
        raise ConfigError(f"unknown ensemble mode {options.ensemble!r}; use one of {', '.join(ENSEMBLES)}")
    if options.batch_size is not None and options.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1 or 'dynamic', got {options.batch_size}")
    networks = package.load_networks("cpu")
    if options.nmf_iters is not None:
        for network in networks:
            set_nmf_iterations(network, options.nmf_iters)
    card = package.card
    source = [entry.get("sha256") or sha256_of(path) for entry, path in zip(card.weights, package.weight_files)]
    if options.ensemble == "folds" and len(networks) > 1:
        jobs = [(output.with_name(f"{output.stem}.fold{i}.onnx"), i, [n]) for i, n in enumerate(networks)]
    else:
        jobs = [(output, None, networks)]
    results = []
    for path, fold, nets in jobs:
        if progress:
            progress(f"exporting {path.name}")
        module = ExportGraph(nets[0]) if len(nets) == 1 else EnsembleGraph(nets, card.activation)
        kind = "logits" if len(nets) == 1 else "probabilities"
        metadata = {
            META_FORMAT: FORMAT_VERSION,
            META_CARD: json.dumps({**card.to_dict(), "weights": []}),
            META_OUTPUT: kind,
            META_NMF_ITERS: json.dumps(_nmf_iterations(nets)),
            META_FOLDS: json.dumps([fold] if fold is not None else list(range(len(nets)))),
            "factorizer.source_sha256": json.dumps(source if fold is None else [source[fold]]),
            "factorizer.exported_by": f"factorizer-cli {__version__}, torch {torch.__version__}",
        }
        start = time.perf_counter()
        model = to_onnx(module, card, options, metadata)
        seconds = time.perf_counter() - start
        result = ExportedFile(path, fold, kind, seconds, model.ByteSize())
        if verify:
            if progress:
                progress(f"verifying {path.name} with ONNX Runtime")
            result.max_abs_diff = verify_model(model.SerializeToString(), nets, card, kind, options)
        _save(model, path)
        result.size_bytes = path.stat().st_size
        results.append(result)
    return results


def to_onnx(module: nn.Module, card: ModelCard, options: ExportOptions, metadata: dict[str, str]):
    """Export ``module`` at the card's ROI, add ``metadata``, check it: an ``onnx.ModelProto``."""
    import onnx

    module = module.eval()
    dtype = torch.float16 if options.fp16 else torch.float32
    module = module.to(dtype)
    batch = options.batch_size or 2  # a dynamic batch is traced at 2 (1 would be specialized)
    example = torch.zeros(batch, len(card.modalities), *card.roi, dtype=dtype)
    dynamic = None if options.batch_size else ({0: torch.export.Dim("batch", min=1, max=1024)},)
    log, logger = io.StringIO(), logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)  # not its notes on optional packages (torchvision) it skips
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, (example,), dynamo=True, opset_version=options.opset, input_names=[INPUT_NAME],
                output_names=["logits" if metadata[META_OUTPUT] == "logits" else "probabilities"],
                dynamic_shapes=dynamic, external_data=False, optimize=True, verbose=False,
            )
            model = program.model_proto  # serialized now: the weights are about to go back to float32
    except Exception as err:  # the exporter's own error types vary between torch versions
        raise ExportError(f"the ONNX exporter failed ({one_line(err)})") from err
    finally:
        module.float()
        logger.setLevel(level)
    model.doc_string = f"{card.name}: {card.task}"[:200]
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:
        raise ExportError(f"the exported graph fails onnx.checker ({one_line(err)})") from err
    return model


def _save(model, path: Path) -> None:
    import onnx

    try:
        with atomic_path(path) as tmp:
            onnx.save_model(model, str(tmp))
    except OSError as err:
        from ..errors import OutputError

        raise OutputError(f"{path}: cannot write ({err.strerror or err}); check free space and permissions") from None


def _nmf_iterations(networks: Sequence[nn.Module]) -> list[int]:
    from ..nn.factorization import NMF

    return sorted({m.num_iters for n in networks for m in n.modules() if isinstance(m, NMF)})


# --- verification --------------------------------------------------------------------------------

def verification_inputs(card: ModelCard, batch: int, seed: int = 0) -> dict[str, Tensor]:
    """A random input and a real-looking one (a z-scored brain-like ellipsoid with a lesion, zero outside)."""
    rng = np.random.default_rng(seed)
    shape = (batch, len(card.modalities), *card.roi)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in card.roi], indexing="ij"))
    brain = (grid**2).sum(0) < 0.7
    lesion = ((grid - np.array([0.3, -0.2, 0.1])[:, None, None, None]) ** 2).sum(0) < 0.04
    realistic = np.zeros(shape, np.float32)
    for b in range(batch):
        for c in range(shape[1]):
            volume = rng.standard_normal(card.roi).astype(np.float32) * 0.3
            volume += np.where(lesion, rng.uniform(-2, 3), 0).astype(np.float32)
            realistic[b, c] = np.where(brain, volume, 0)
    return {
        "random": torch.from_numpy(rng.standard_normal(shape).astype(np.float32)),
        "realistic": torch.from_numpy(realistic),
    }


def verify_model(model: bytes | str | Path, networks: Sequence[nn.Module], card: ModelCard, output: str,
                 options: ExportOptions = ExportOptions()) -> dict[str, float]:
    """Run the graph with ONNX Runtime (CPU) and the networks with PyTorch; the largest differences.

    Raises ``ExportError`` above the tolerance (1e-4 in float32; 5e-2 for float16 graphs).
    """
    import onnxruntime as ort

    session_options = ort.SessionOptions()
    session_options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), session_options,
                                       providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ExportError(f"ONNX Runtime cannot load the exported graph ({one_line(err)})") from err
    dtype = np.float16 if options.fp16 else np.float32
    diffs = {}
    for name, x in verification_inputs(card, options.batch_size or 2).items():
        with torch.inference_mode():
            outs = [full_resolution_logits(n, x).float() for n in networks]
            if output == "probabilities":
                outs = [torch.sigmoid(o) if card.activation == "sigmoid" else o.softmax(1) for o in outs]
            expected = torch.stack(outs).mean(0).numpy()
        try:
            got = session.run(None, {session.get_inputs()[0].name: x.numpy().astype(dtype)})[0]
        except Exception as err:
            raise ExportError(f"ONNX Runtime failed to run the exported graph ({one_line(err)})") from err
        diffs[name] = float(np.abs(got.astype(np.float32) - expected).max())
    tolerance = TOLERANCE_FP16 if options.fp16 else TOLERANCE_FP32
    worst = max(diffs.values(), key=lambda d: (math.isnan(d), d))
    if not worst <= tolerance:  # also NaN
        raise ExportError(f"ONNX Runtime and PyTorch disagree by up to {worst:.3g} (tolerance {tolerance:g}); "
                          "the graph was not written")
    return diffs


# --- exports made on demand (segment --backend onnx with a model package) ------------------------

def cached_onnx(package: ModelPackage, nmf_iters: int | None = None, opset: int = DEFAULT_OPSET) -> Path:
    """The package exported once (averaged folds, float32, batch 1) into the cache; its path."""
    weights = [e.get("sha256") or sha256_of(p) for e, p in zip(package.card.weights, package.weight_files)]
    described = json.dumps({**package.card.to_dict(), "weights": weights, "nmf_iters": nmf_iters,
                            "opset": opset, "format": FORMAT_VERSION, "torch": torch.__version__},
                           sort_keys=True)
    key = hashlib.sha256(described.encode()).hexdigest()[:16]
    path = cache.home() / "onnx" / package.card.name / key / "model.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        options = ExportOptions(opset=opset, nmf_iters=nmf_iters)
        export_onnx(package, path, options, verify=True)
    return path
