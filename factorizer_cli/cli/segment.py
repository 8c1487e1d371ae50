"""``factorizer segment``: one case in, a label map in the input's exact geometry out."""

from __future__ import annotations

import signal
import threading
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import InputError
from . import app
from .console import ACCEPT_LICENSE_HELP, error_console, friendly_errors, progress_bar

if TYPE_CHECKING:
    from ..api import CaseResult, DatasetPlan, DatasetReport, Segmentation, Segmenter

IO_PANEL, INFERENCE_PANEL, EXTRA_PANEL = "Inputs and outputs", "Inference", "Extra outputs"
BATCH_PANEL = "Folders of cases"


class ComponentDtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


class Backend(str, Enum):
    torch = "torch"
    onnx = "onnx"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


EXAMPLES = """
**Examples**

Four BraTS modalities, named explicitly:

    factorizer segment t1.nii.gz t1ce.nii.gz t2.nii.gz flair.nii.gz --modality t1 t1ce t2 flair -o seg.nii.gz --model MODEL_DIR

A case folder (modalities found by BraTS, ISLES BIDS or nnU-Net _0000 naming), with volumes and a picture:

    factorizer segment BraTS-GLI-00001-000/ -o seg.nii.gz --model MODEL_DIR --stats seg.json --preview seg.png

GPU, mixed precision, mirror test-time augmentation, BraTS 2021 labels (enhancing tumour = 4):

    factorizer segment CASE_DIR -o seg.nii.gz --model MODEL_DIR --device cuda --tta --label-convention brats2021
"""


def split_modality_names(inputs: list[str], modality: list[str]) -> tuple[list[str], list[str]]:
    """Accept ``--modality t1 t1ce t2 flair`` although options take one value each.

    The parser hands the first name to ``--modality`` and the others to the positional inputs, before
    or after the files. Names that are not existing paths, at either end of the inputs, go back to the
    modality list in order; ``--modality t1,t1ce`` and repeated ``--modality`` also work.
    """
    names = [n for value in modality for n in value.replace(",", " ").split()]
    if not names:
        return inputs, names
    inputs = list(inputs)
    leading, trailing = [], []
    while inputs and not _names_a_file(inputs[0]):
        leading.append(inputs.pop(0))
    while inputs and not _names_a_file(inputs[-1]):
        trailing.insert(0, inputs.pop())
    # `-m t1 t1ce t2 flair` before the files: the option took t1, the rest lead the inputs.
    return inputs, names + leading + trailing


def _names_a_file(text: str) -> bool:
    """An existing path, or a NIfTI name (a missing file is reported as such, not as a modality)."""
    return Path(text).exists() or text.lower().endswith((".nii", ".nii.gz"))


@app.command(epilog=EXAMPLES)
@friendly_errors
def segment(
    inputs: Annotated[list[str], typer.Argument(
        help="A case folder, or one image per modality (.nii/.nii.gz, or a DICOM series folder).",
        show_default=False)],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Label map to write (.nii.gz): uint8, the input's exact geometry.",
        show_default=False, rich_help_panel=IO_PANEL)],
    model: Annotated[str, typer.Option(
        "--model", help="Zoo name, model folder, hf://ORG/REPO[@REV], or a checkpoint with --card.",
        show_default=False, rich_help_panel=IO_PANEL)],
    modality: Annotated[list[str] | None, typer.Option(
        "--modality", "-m", help="Modality of each input file, in order: e.g. t1 t1ce t2 flair.",
        show_default=False, rich_help_panel=IO_PANEL)] = None,
    card: Annotated[str | None, typer.Option(
        help="Model card (JSON file or zoo name) for a checkpoint given as --model.", show_default=False,
        rich_help_panel=IO_PANEL)] = None,
    offline: Annotated[bool, typer.Option(
        "--offline", help="Use only cached weights (also: HF_HUB_OFFLINE=1).", rich_help_panel=IO_PANEL)] = False,
    accept_license: Annotated[bool, typer.Option(
        "--accept-license", help=ACCEPT_LICENSE_HELP, rich_help_panel=IO_PANEL)] = False,
    overlap: Annotated[float | None, typer.Option(
        min=0.0, max=0.95, help="Sliding-window overlap (default: the model's, usually 0.5).",
        rich_help_panel=INFERENCE_PANEL)] = None,
    sw_batch_size: Annotated[int | None, typer.Option(
        min=1, help="Windows per forward pass (default: 1; slices of a slice-wise model: 8).",
        rich_help_panel=INFERENCE_PANEL)] = None,
    tta: Annotated[bool, typer.Option(
        "--tta/--no-tta", help="Mirror test-time augmentation (8 flips: slower, a little better).",
        rich_help_panel=INFERENCE_PANEL)] = False,
    device: Annotated[str, typer.Option(
        help="auto, cpu, cuda, cuda:N or mps (--backend onnx: tensorrt too).",
        rich_help_panel=INFERENCE_PANEL)] = "auto",
    threads: Annotated[int | None, typer.Option(
        min=1, help="CPU threads (default: PyTorch's or ONNX Runtime's choice).", rich_help_panel=INFERENCE_PANEL)] = None,
    backend: Annotated[Backend | None, typer.Option(
        help="torch, or onnx (ONNX Runtime; the default for an .onnx --model; a model package is exported "
             "once into the cache).", show_default=False, case_sensitive=False,
        rich_help_panel=INFERENCE_PANEL)] = None,
    precision: Annotated[Precision, typer.Option(
        help="auto: fp16 mixed precision on CUDA, fp32 elsewhere.", rich_help_panel=INFERENCE_PANEL,
        case_sensitive=False)] = Precision.auto,
    nmf_iters: Annotated[int | None, typer.Option(
        min=1, help="NMF iterations at inference, fewer is faster (default: as trained).",
        rich_help_panel=INFERENCE_PANEL)] = None,
    label_convention: Annotated[str | None, typer.Option(
        help="Relabelling named by the model, e.g. brats2021 (enhancing tumour = 4).",
        rich_help_panel=INFERENCE_PANEL)] = None,
    probabilities: Annotated[Path | None, typer.Option(
        help="Also write the probabilities (4D .nii.gz, one volume per output).", show_default=False,
        rich_help_panel=EXTRA_PANEL)] = None,
    stats: Annotated[Path | None, typer.Option(
        help="Also write volumes (mL) per label and region as JSON.", show_default=False,
        rich_help_panel=EXTRA_PANEL)] = None,
    preview: Annotated[Path | None, typer.Option(
        help="Also write a PNG montage of axial slices, labels over FLAIR.", show_default=False,
        rich_help_panel=EXTRA_PANEL)] = None,
    components: Annotated[Path | None, typer.Option(
        help="Also write NMF component maps into this folder: a 4D .nii.gz per block, components.json.",
        show_default=False, rich_help_panel=EXTRA_PANEL)] = None,
    component_blocks: Annotated[str | None, typer.Option(
        help="Blocks for --components, comma-separated: encoder.N, bottleneck, decoder.N, or STAGE.BLOCK "
             "(default: encoder.0,bottleneck).", show_default=False, rich_help_panel=EXTRA_PANEL)] = None,
    component_dtype: Annotated[ComponentDtype, typer.Option(
        help="float16 halves memory and files (stored as int16 with a scale factor).",
        rich_help_panel=EXTRA_PANEL, case_sensitive=False)] = ComponentDtype.float32,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="No progress bar or summary.", rich_help_panel=EXTRA_PANEL)] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Batch: segment cases whose label map already exists.", rich_help_panel=BATCH_PANEL)] = False,
    pattern: Annotated[str | None, typer.Option(
        help="Batch: glob of the case folders inside INPUT, e.g. '*/ses-*' (default: every subfolder).",
        show_default=False, rich_help_panel=BATCH_PANEL)] = None,
    shard: Annotated[str | None, typer.Option(
        help="Batch: this worker's share K/N of the cases (a fixed split by case name).",
        show_default=False, rich_help_panel=BATCH_PANEL)] = None,
) -> None:
    """Segment one case, or every case of a folder, in the exact geometry of the input.

    With `-o FOLDER` (an existing folder, or a name without a suffix) the input is a dataset folder: every case in it is
    segmented to `FOLDER/<case>.nii.gz`, cases already done are skipped, a failed case is reported
    and the rest go on, and `summary.json` records each case. SIGTERM stops after the current case.

    The images are reoriented, cropped, resampled and normalized as the model card says; the network
    runs over sliding windows; every step is undone on the probabilities before thresholding, so the
    label map has the input's shape, affine and qform/sform codes. Bad inputs and unwritable outputs
    are refused before any work; every file is written whole (temporary file, then rename), the label
    map last.
    """
    from .. import api

    started = time.perf_counter()
    opened = api.open_model(model, card=card, offline=offline, backend=backend.value if backend else None,
                            accept_license=accept_license)
    note = api.acceptance_note(opened.card)
    if note:
        error_console().print(f"[yellow]licence:[/] {escape(note)}", highlight=False)
    for source in opened.unverified:
        error_console().print(f"[yellow]warning:[/] unverified weights (no published checksum): {escape(str(source))}; "
                              f"`factorizer models verify {opened.card.name}` records the hash you trust",
                              highlight=False)
    to_folder = output.is_dir() or not output.suffix  # -o FOLDER: a dataset in, a label map per case out
    dataset = to_folder and len(inputs) == 1 and Path(inputs[0]).is_dir()
    if dataset:
        if probabilities or stats or preview or components:
            raise InputError("--probabilities, --stats, --preview and --components are for one case "
                             "(-o FILE.nii.gz)")
        plan = api.plan_dataset(opened.card, inputs[0], output, overwrite=overwrite, shard=shard, pattern=pattern)
    else:
        files, names = split_modality_names(inputs, modality or [])
        blocks = None if component_blocks is None else [b.strip() for b in component_blocks.split(",") if b.strip()]
        plan = api.plan_case(opened.card, files, output, modalities=names, probabilities=probabilities, stats=stats,
                             preview=preview, components=components, component_blocks=blocks,
                             component_dtype=component_dtype.value, backend=opened.backend)

    api.set_threads(threads)
    knobs = {} if nmf_iters is None else {"nmf_iters": nmf_iters}
    segmenter = api.load_segmenter(opened, overlap=overlap, sw_batch_size=sw_batch_size, tta=tta, device=device,
                                   precision=precision.value, knobs=knobs, label_convention=label_convention,
                                   threads=threads)
    for warning in segmenter.warnings:
        error_console().print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if dataset:
        report = _run_dataset(plan, segmenter, quiet)
        raise typer.Exit(1 if report.failed else 0)
    with progress_bar(quiet) as bar:
        task = bar.add_task(f"segmenting on {segmenter.runs_on}", total=None)
        result = plan.run(segmenter, progress=lambda done, total: bar.update(task, completed=done, total=total))
    if not quiet:
        _summary(result, output, time.perf_counter() - started, segmenter.runs_on)


def _summary(result: Segmentation, output: Path, seconds: float, device: str) -> None:
    console = error_console()
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    volumes = result.volumes()
    table = Table(title=f"{result.card.name} → {output}", title_justify="left", box=None)
    table.add_column("")
    table.add_column("volume (mL)", justify="right")
    for name, ml in volumes["labels_ml"].items():
        table.add_row(f"label {name}", f"{ml:.2f}")
    for name, ml in volumes["regions_ml"].items():
        table.add_row(f"[bold]region {name}[/]", f"{ml:.2f}")
    console.print(table)
    console.print(f"done in {seconds:.1f} s on {device}", highlight=False)


def _run_dataset(plan: DatasetPlan, segmenter: Segmenter, quiet: bool) -> DatasetReport:
    """Batch mode: a progress bar, failures as they come, SIGTERM ends after the current case."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console = error_console()
    try:
        with progress_bar(quiet) as bar:
            task = bar.add_task(f"{len(plan.cases)} cases on {segmenter.runs_on}", total=len(plan.cases))

            def report_case(result: CaseResult, done: int, total: int) -> None:
                bar.update(task, completed=done)
                if result.status == "failed" and not quiet:
                    console.print(f"[red]failed:[/] {escape(result.name)}: {escape(result.error.splitlines()[0])}", highlight=False)

            report = plan.run(segmenter, stop_event=stop, on_result=report_case)
    finally:
        signal.signal(signal.SIGTERM, previous)
    path = report.write()
    counts = report.counts
    if not quiet:
        console.print(f"{counts['done']} done, {counts['skipped']} skipped (already there), {counts['failed']} "
                      f"failed{', stopped by SIGTERM' if report.stopped else ''}; summary in {path}",
                      highlight=False)
    return report
