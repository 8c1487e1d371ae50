"""Export a model package to ONNX: one self-describing ``.onnx`` file per model (or per fold).

The graph is ``ExportGraph`` (the full-resolution head, NMF iterations unrolled), exported with
PyTorch's ``torch.export``-based exporter at the card's ROI, from the family's inference form
(``Family.prepare``: e.g. a RepUX-Net's W ⊙ BFM folded into plain depthwise convolutions). The model
card goes into the ONNX metadata (``factorizer.card``), so the file alone is enough to segment;
``onnx.checker`` must pass and ONNX Runtime must agree with PyTorch (``verify_model``) before anything
is written, and the file is written whole or not at all.

An ensemble (one network per fold) becomes either one graph that averages the folds' probabilities
(``ensemble="average"``, the default: the graph outputs probabilities) or one file per fold
(``ensemble="folds"``: each outputs its logits, as a single model does).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__
from ..errors import ConfigError, ExportError, one_line
from ..families import Family, SliceWindow, activate, family_of, label_decisions, window_logits
from ..io.atomic import atomic_path
from ..zoo import cache
from ..zoo.card import ModelCard
from ..zoo.onnx_file import (
    FORMAT_VERSION,
    INPUT_NAME,
    META_CARD,
    META_EXPORTED_BY,
    META_FOLDS,
    META_FORMAT,
    META_OUTPUT,
    META_SOURCE,
    META_VERIFICATION,
    knob_key,
)
from ..zoo.package import ModelPackage, sha256_of

DEFAULT_OPSET = 20  # 20: ONNX has GELU (opset 18 spells it out as Erf, Div, Add, Mul)
ENSEMBLES = ("average", "folds")


@dataclass(frozen=True)
class Tolerance:
    """How closely ONNX Runtime must reproduce PyTorch on each verification input.

    Two conditions, both required:

    - *outputs*: ``max |ONNX Runtime - PyTorch| <= atol + rtol * max |PyTorch|``. The graph and the
      network compute the same function but round differently (another summation order, BatchNorm
      folded into the convolution by the graph optimizer, ONNX Runtime's own normalisation kernels);
      that error grows with the magnitudes the network computes with, not with each voxel's own
      value, so the allowance is relative to the largest output of the input. It is also amplified
      where a normalisation divides by a small spread: on the brain-like input (zero outside an
      ellipsoid) ONNX Runtime's InstanceNormalization alone is 5-13x further from float64 than
      PyTorch's once a channel's mean is 100-1000x its standard deviation. Measured on that input:
      1e-5 of the logits' scale for small random 3D UX-Net / RepUX-Net networks at 32³, 3.8e-4 for
      the published RepUX-Net (21³ depthwise kernels, random weights) at 96³: a fixed 1e-4 called
      those correct graphs wrong. ``rtol`` = 1e-3 (a thousandth of the logits' scale) holds them; a
      wrong graph (a missing operation, a wrong weight, BFM applied twice) errs by a sizeable fraction
      of the scale. ``atol`` covers outputs near zero. (The Factorizer exports' own tests still hold
      them to 1e-4 absolute.)
    - *labels*: at least ``labels`` of the voxels get the same label decision: the winning class
      (softmax cards) or every output's probability above the card's threshold (sigmoid cards). This
      is what a segmentation is made of; rounding flips only voxels on a decision boundary.
    """

    atol: float
    rtol: float
    labels: float = 0.999

    def allowed(self, scale: float) -> float:
        """The largest difference accepted for an output whose largest magnitude is ``scale``."""
        return self.atol + self.rtol * scale


TOLERANCE_FP32 = Tolerance(atol=1e-4, rtol=1e-3)
TOLERANCE_FP16 = Tolerance(atol=5e-2, rtol=1e-2)  # float16 graph against PyTorch's float32


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    knobs: Mapping[str, int] = field(default_factory=dict)  # the family's, e.g. {"nmf_iters": 2}; else as trained
    fp16: bool = False
    batch_size: int | None = 1  # None: dynamic
    ensemble: str = "average"


@dataclass(frozen=True)
class Agreement:
    """ONNX Runtime against PyTorch on one verification input."""

    max_abs_diff: float  # largest |ONNX Runtime - PyTorch| over the output
    allowed: float  # the tolerance's atol + rtol * max |PyTorch output|
    labels_agree: float  # fraction of voxels with the same label decision, 0..1

    def to_dict(self) -> dict[str, float]:
        return {"max_abs_diff": self.max_abs_diff, "allowed": self.allowed, "labels_agree": self.labels_agree}


@dataclass
class ExportedFile:
    path: Path
    fold: int | None  # None: the whole model (one network, or the averaged folds)
    output: str  # "logits" or "probabilities"
    seconds: float
    size_bytes: int
    verification: dict[str, Agreement] = field(default_factory=dict)  # per verification input; {}: not verified

    @property
    def max_abs_diff(self) -> dict[str, float]:
        return {name: a.max_abs_diff for name, a in self.verification.items()}

    @property
    def labels_agree(self) -> dict[str, float]:
        return {name: a.labels_agree for name, a in self.verification.items()}


def window_graph(family: Family, network: nn.Module, card: ModelCard) -> nn.Module:
    """The module traced for one network: the family's export form, taking the card's windows."""
    module = family.export_module(family.prepare(network))
    return SliceWindow(module) if card.slice_wise else module


class EnsembleGraph(nn.Module):
    """The folds' mean probability (sigmoid or softmax of each fold's logits)."""

    def __init__(self, folds: Sequence[nn.Module], activation: str) -> None:
        super().__init__()
        self.folds = nn.ModuleList(folds)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        total = None
        for fold in self.folds:
            logits = fold(x).float()
            p = activate(logits, self.activation)
            total = p if total is None else total + p
        return total / len(self.folds)


def export_onnx(
    package: ModelPackage,
    output: str | Path,
    options: ExportOptions = ExportOptions(),
    verify: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[ExportedFile]:
    """Export ``package`` to ``output`` (``.onnx``); with ``ensemble="folds"`` one ``NAME.foldK.onnx`` each.

    With ``verify``, each graph is checked against the networks as the package holds them (before the
    family's ``prepare``), so the check covers the re-parameterisation as well as the export; the
    outcome is in each ``ExportedFile.verification`` and in the file's ``factorizer.verification``.
    """
    output = Path(output)
    if output.suffix.lower() != ".onnx":
        raise ConfigError(f"{output}: the ONNX file name must end in .onnx")
    if options.ensemble not in ENSEMBLES:
        raise ConfigError(f"unknown ensemble mode {options.ensemble!r}; use one of {', '.join(ENSEMBLES)}")
    if options.batch_size is not None and options.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1 or 'dynamic', got {options.batch_size}")
    card = package.card
    family = family_of(card.architecture)
    networks = package.load_networks("cpu")
    for network in networks:
        family.set_knobs(network, options.knobs)
    references = [copy.deepcopy(n) for n in networks] if verify else []  # prepare may change them in place
    graphs = [window_graph(family, n, card) for n in networks]
    source = [entry.get("sha256") or sha256_of(path) for entry, path in zip(card.weights, package.weight_files)]
    if options.ensemble == "folds" and len(networks) > 1:
        jobs = [(output.with_name(f"{output.stem}.fold{i}.onnx"), i, [i]) for i in range(len(networks))]
    else:
        jobs = [(output, None, list(range(len(networks))))]
    results = []
    for path, fold, indices in jobs:
        if progress:
            progress(f"exporting {path.name}")
        module = graphs[indices[0]] if len(indices) == 1 else EnsembleGraph([graphs[i] for i in indices],
                                                                             card.activation)
        kind = "logits" if len(indices) == 1 else "probabilities"
        metadata = {
            META_FORMAT: FORMAT_VERSION,
            META_CARD: json.dumps({**card.to_dict(), "weights": []}),
            META_OUTPUT: kind,
            **{knob_key(name): json.dumps(values)
               for name, values in family.knob_values([networks[i] for i in indices]).items()},
            META_FOLDS: json.dumps([fold] if fold is not None else indices),
            META_SOURCE: json.dumps(source if fold is None else [source[fold]]),
            META_EXPORTED_BY: f"factorizer-cli {__version__}, torch {torch.__version__}",
        }
        start = time.perf_counter()
        model = to_onnx(module, card, options, metadata)
        seconds = time.perf_counter() - start
        result = ExportedFile(path, fold, kind, seconds, model.ByteSize())
        if verify:
            if progress:
                progress(f"verifying {path.name} with ONNX Runtime")
            result.verification = verify_model(model.SerializeToString(), [references[i] for i in indices],
                                               card, kind, options)
            model.metadata_props.add(key=META_VERIFICATION, value=json.dumps(
                {name: a.to_dict() for name, a in result.verification.items()}))
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
    example = torch.zeros(batch, card.in_channels, *card.roi, dtype=dtype)
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

    with atomic_path(path) as tmp:  # an OSError becomes one OutputError naming the file
        onnx.save_model(model, str(tmp))


# --- verification --------------------------------------------------------------------------------

def verification_inputs(card: ModelCard, batch: int, seed: int = 0) -> dict[str, Tensor]:
    """A random input and a real-looking one (a z-scored brain-like ellipsoid with a lesion, zero outside)."""
    rng = np.random.default_rng(seed)
    shape = (batch, card.in_channels, *card.roi)
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


def compare(expected: Tensor, got: Tensor, card: ModelCard, kind: str, tolerance: Tolerance) -> Agreement:
    """``got`` (ONNX Runtime) against ``expected`` (PyTorch): differences, their allowance, label agreement."""
    expected, got = expected.float(), got.float()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    diff = float((got - expected).abs().max()) if expected.numel() else 0.0  # NaN if got has a NaN
    decisions = [label_decisions(o if kind == "probabilities" else activate(o, card.activation), card.activation,
                                 card.threshold) for o in (got, expected)]
    same = (decisions[0] == decisions[1]).all(1)
    return Agreement(diff, tolerance.allowed(scale), float(same.float().mean()) if same.numel() else 1.0)


def verify_model(model: bytes | str | Path, networks: Sequence[nn.Module], card: ModelCard, output: str,
                 options: ExportOptions = ExportOptions()) -> dict[str, Agreement]:
    """Run the graph with ONNX Runtime (CPU) and the networks with PyTorch on ``verification_inputs``.

    Raises ``ExportError`` unless, on every input, the outputs agree within the ``Tolerance``
    (``TOLERANCE_FP32``: 1e-4 + 1e-3 × the largest |output|; ``TOLERANCE_FP16``: 5e-2 + 1e-2 × it)
    and the label decisions agree on at least 99.9% of the voxels.
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
    tolerance = TOLERANCE_FP16 if options.fp16 else TOLERANCE_FP32
    agreements = {}
    for name, x in verification_inputs(card, options.batch_size or 2).items():
        with torch.inference_mode():
            outs = [window_logits(n, x, card.slice_wise).float() for n in networks]
            if output == "probabilities":
                outs = [activate(o, card.activation) for o in outs]
            expected = torch.stack(outs).mean(0)
        try:
            got = session.run(None, {session.get_inputs()[0].name: x.numpy().astype(dtype)})[0]
        except Exception as err:
            raise ExportError(f"ONNX Runtime failed to run the exported graph ({one_line(err)})") from err
        agreement = agreements[name] = compare(expected, torch.from_numpy(got), card, output, tolerance)
        if not (agreement.max_abs_diff <= agreement.allowed and agreement.labels_agree >= tolerance.labels):
            raise ExportError(  # ``not <=``: a NaN fails too
                f"ONNX Runtime and PyTorch disagree on the {name} verification input: largest difference "
                f"{agreement.max_abs_diff:.3g} (allowed {agreement.allowed:.3g} = {tolerance.atol:g} + "
                f"{tolerance.rtol:g} × the largest |{output}|), labels agree on {agreement.labels_agree:.3%} "
                f"of voxels (at least {tolerance.labels:.1%} needed); the graph was not written")
    return agreements


# --- exports made on demand (segment --backend onnx with a model package) ------------------------

def cached_onnx(package: ModelPackage, knobs: Mapping[str, int] | None = None, opset: int = DEFAULT_OPSET) -> Path:
    """The package exported once (averaged folds, float32, batch 1) into the cache; its path."""
    weights = [e.get("sha256") or sha256_of(p) for e, p in zip(package.card.weights, package.weight_files)]
    described = json.dumps({**package.card.to_dict(), "weights": weights, "knobs": dict(knobs or {}),
                            "opset": opset, "format": FORMAT_VERSION, "torch": torch.__version__},
                           sort_keys=True)
    key = hashlib.sha256(described.encode()).hexdigest()[:16]
    path = cache.home() / "onnx" / package.card.name / key / "model.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        options = ExportOptions(opset=opset, knobs=dict(knobs or {}))
        export_onnx(package, path, options, verify=True)
    return path
