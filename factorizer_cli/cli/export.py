"""``factorizer export-onnx``: a model as an ONNX graph that ONNX Runtime runs without PyTorch."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import ConfigError
from . import app
from .console import ACCEPT_LICENSE_HELP, error_console, friendly_errors

if TYPE_CHECKING:
    from ..api import ExportedFile, ModelCard

EXAMPLES = """
**Examples**

A zoo model, verified against PyTorch, then used without PyTorch's weights:

    factorizer export-onnx isles22-swin-factorizer -o isles22.onnx

    factorizer segment CASE_DIR -o seg.nii.gz --model isles22.onnx

Three NMF iterations instead of five (faster), half precision for a GPU, any batch size:

    factorizer export-onnx MODEL_DIR -o model.onnx --nmf-iters 3 --fp16 --batch-size dynamic
"""


class Ensemble(str, Enum):
    average = "average"
    folds = "folds"


def parse_batch_size(value: str) -> int | None:
    if value.strip().lower() == "dynamic":
        return None
    try:
        size = int(value)
    except ValueError:
        raise ConfigError(f"--batch-size takes a number or 'dynamic', got {value!r}") from None
    if size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {size}")
    return size


@app.command("export-onnx", epilog=EXAMPLES)
@friendly_errors
def export_onnx_command(
    model: Annotated[str, typer.Argument(
        help="Zoo name, model folder, hf://ORG/REPO[@REV], or a checkpoint with --card.", show_default=False)],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="The .onnx file to write (with --ensemble folds: NAME.foldK.onnx beside it).",
        show_default=False)],
    opset: Annotated[int, typer.Option(min=17, help="ONNX opset version (20 has GELU as one op).")] = 20,
    nmf_iters: Annotated[int | None, typer.Option(
        min=1, help="NMF iterations unrolled into the graph (default: as trained).", show_default=False)] = None,
    fp16: Annotated[bool, typer.Option(
        "--fp16", help="Half-precision weights and activations (for GPUs; NMF runs in float32).")] = False,
    batch_size: Annotated[str, typer.Option(help="Windows per run: a number, or 'dynamic'.")] = "1",
    ensemble: Annotated[Ensemble, typer.Option(
        help="Several folds: one graph averaging their probabilities, or one file per fold (logits).",
        case_sensitive=False)] = Ensemble.average,
    card: Annotated[str | None, typer.Option(
        help="Model card (JSON file or zoo name) for a checkpoint given as MODEL.", show_default=False)] = None,
    offline: Annotated[bool, typer.Option("--offline", help="Use only cached weights.")] = False,
    accept_license: Annotated[bool, typer.Option("--accept-license", help=ACCEPT_LICENSE_HELP)] = False,
    verify: Annotated[bool, typer.Option(
        "--verify/--no-verify",
        help="Compare ONNX Runtime with PyTorch before writing: outputs within 1e-4 + 1e-3 × their largest "
             "magnitude (fp32), labels agreeing on 99.9% of voxels.")] = True,
) -> None:
    """Export a model to ONNX at its card's window size, the NMF iterations unrolled.

    The graph computes the full-resolution output only; the model card is embedded in its metadata,
    so the `.onnx` file alone is enough for `factorizer segment --model FILE.onnx`. The graph passes
    `onnx.checker`, and is run with ONNX Runtime against PyTorch on a random and a brain-like input:
    the file is written (whole, atomically) only if they agree, within rounding (1e-4 + 1e-3 × the
    largest output magnitude in float32) and on the labels of at least 99.9% of the voxels.
    """
    from .. import api

    options = api.ExportOptions(opset=opset, knobs={} if nmf_iters is None else {"nmf_iters": nmf_iters}, fp16=fp16,
                                batch_size=parse_batch_size(batch_size), ensemble=ensemble.value)
    console = error_console()

    def announce(opened: ModelCard) -> None:
        if len(opened.weights) > 1:
            what = ("one graph averaging their probabilities" if ensemble is Ensemble.average
                    else "one file per fold, each giving its logits")
            console.print(f"{opened.name}: {len(opened.weights)} folds, exported as {what}", highlight=False)

    with console.status("exporting") as status:
        results = api.export_onnx(model, output, options, card=card, offline=offline, verify=verify,
                                  progress=status.update, on_open=announce, accept_license=accept_license)
    for r in results:
        typer.echo(f"{r.path}: {r.size_bytes / 2**20:.1f} MiB, {r.output}, exported in {r.seconds:.1f} s; "
                   + describe_verification(r))


def describe_verification(result: ExportedFile) -> str:
    """How the graph matched PyTorch: per input, the largest difference (and what was allowed), and the
    share of voxels whose labels agree."""
    if not result.verification:
        return "not verified"
    diffs = ", ".join(f"{name} input {a.max_abs_diff:.2e} (allowed {a.allowed:.1e})"
                      for name, a in result.verification.items())
    agree = ", ".join(f"{name} {a.labels_agree:.3%}" for name, a in result.verification.items())
    return f"largest |ONNX Runtime - PyTorch|: {diffs}; labels agree on {agree} of voxels"
