"""``factorizer segment``: one case in, a label map in the input's exact geometry out."""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from ..errors import InputError, OutputError
from ..io import check_output_path, find_modalities, match_modalities, read_image
from ..io.images import Image, atomic_path, nifti_suffix
from ..nn.components import select_sites
from ..pipeline.backends import is_onnx_path, open_onnx
from ..pipeline.components import ComponentRequest
from ..pipeline.preview import write_preview
from ..pipeline.segment import InferenceOptions, Segmentation, Segmenter
from ..zoo.resolve import load_card, resolve_model
from . import app
from .console import error_console, friendly_errors, progress_bar

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
    while inputs and not Path(inputs[0]).exists() and not nifti_suffix(Path(inputs[0])):
        leading.append(inputs.pop(0))
    while inputs and not Path(inputs[-1]).exists() and not nifti_suffix(Path(inputs[-1])):
        trailing.insert(0, inputs.pop())
    # `-m t1 t1ce t2 flair` before the files: the option took t1, the rest lead the inputs.
    return inputs, names + leading + trailing


def resolve_inputs(inputs: list[str], modality: list[str], specs) -> list[Path]:
    """The case's image paths in the model's modality order."""
    files, names = split_modality_names(inputs, modality)
    if not files:
        raise InputError("no input images given; pass a case folder or one file per modality")
    for file in files:
        if not Path(file).exists():
            raise InputError(f"{file}: no such file or folder; check the path")
    if len(files) == 1 and Path(files[0]).is_dir() and not names:
        return list(find_modalities(files[0], specs).values())
    if not names:
        if len(specs) == 1:
            return [Path(files[0])]
        expected = " ".join(name for name, _ in specs)
        raise InputError(
            f"{len(files)} input files but no --modality; say which is which, e.g. --modality "
            f"{expected}, or pass the case folder"
        )
    canonical = match_modalities(names, specs)
    if len(files) != len(canonical):
        raise InputError(
            f"{len(files)} input files but {len(canonical)} modality names ({' '.join(names)}); give one "
            "file per modality, in the same order"
        )
    by_name = dict(zip(canonical, map(Path, files)))
    return [by_name[name] for name, _ in specs]


def _check_outputs(paths: list[tuple[Path, str]], inputs: list[Path]) -> None:
    seen: dict[Path, Path] = {}
    for path, kind in paths:
        if kind == "nifti" and nifti_suffix(path) is None:
            raise OutputError(f"{path}: output name must end in .nii.gz or .nii; rename it")
        if kind == "png" and path.suffix.lower() != ".png":
            raise OutputError(f"{path}: the preview is a PNG; give a name ending in .png")
        check_output_path(path, inputs)
        key = path.resolve()
        if key in seen:
            raise OutputError(f"{path}: given for two outputs; choose distinct names")
        seen[key] = path


def _check_components_folder(folder: Path) -> None:
    """The folder for component maps: an existing folder, or a new one in a writable folder."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: --components takes a folder, and this is a file; choose another name")
    if not folder.is_dir() and not folder.parent.is_dir():
        raise OutputError(f"{folder}: cannot create it, {folder.parent} does not exist; create that first")
    check_output_path((folder if folder.is_dir() else folder.parent) / "components.json", [])


def _preview_background(paths: list[Path], result: Segmentation, card) -> Image:
    """FLAIR when the model takes it and it shares the reference grid, else the reference image."""
    flair = next((i for i, m in enumerate(card.modalities) if m.matches("flair")), 0)
    image = read_image(paths[flair]) if flair else result.reference
    same_grid = (image.array.shape == result.reference.array.shape
                 and np.allclose(image.affine, result.reference.affine, atol=1e-3))
    return image if same_grid else result.reference


def write_stats(path: Path, seg: Segmentation, inputs: list[Path], device: str) -> None:
    report = {
        "model": seg.card.name,
        "inputs": [str(p) for p in inputs],
        "label_convention": seg.label_convention or "default",
        "device": device,
        **seg.volumes(),
        "seconds": {k: round(v, 3) for k, v in seg.seconds.items()},
        "notes": seg.notes,
    }
    write_json(path, report)


def write_json(path: Path, data: dict) -> None:
    """A JSON report, written whole or not at all."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n")
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({err.strerror or err}); check free space and permissions") from None


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
    overlap: Annotated[float | None, typer.Option(
        min=0.0, max=0.95, help="Sliding-window overlap (default: the model's, usually 0.5).",
        rich_help_panel=INFERENCE_PANEL)] = None,
    sw_batch_size: Annotated[int, typer.Option(
        min=1, help="Windows per forward pass.", rich_help_panel=INFERENCE_PANEL)] = 1,
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
    started = time.perf_counter()
    engine = (backend or (Backend.onnx if is_onnx_path(model) else Backend.torch)).value
    if engine == "onnx" and components is not None:
        raise InputError("--components needs the PyTorch backend (--backend torch and a model package)")
    if is_onnx_path(model):
        package, unverified = open_onnx(model, card=load_card(card) if card else None), ()
    else:
        resolved = resolve_model(model, card=card, offline=offline)
        package, unverified = resolved.package, resolved.unverified
    model_card = package.card
    for source in unverified:
        error_console().print(f"[yellow]warning:[/] unverified weights (no published checksum): {source}; "
                              f"`factorizer models verify {model_card.name}` records the hash you trust",
                              highlight=False)
    to_folder = output.is_dir() or (nifti_suffix(output) is None and not output.suffix)
    if to_folder and len(inputs) == 1 and Path(inputs[0]).is_dir():
        if probabilities or stats or preview or components:
            raise InputError("--probabilities, --stats, --preview and --components are for one case "
                             "(-o FILE.nii.gz)")
        options = InferenceOptions(overlap=overlap, sw_batch_size=sw_batch_size, tta=tta, device=device,
                                   precision=precision.value, nmf_iters=nmf_iters,
                                   label_convention=label_convention, backend=engine, threads=threads)
        failed = segment_folder(Path(inputs[0]), output, package, options, overwrite, shard, quiet, threads,
                                pattern)
        raise typer.Exit(1 if failed else 0)
    paths = resolve_inputs(inputs, modality or [], model_card.modality_specs)
    extra = [(p, kind) for p, kind in ((probabilities, "nifti"), (stats, "json"), (preview, "png")) if p]
    _check_outputs([(output, "nifti"), *extra], paths)
    request = None
    if components is not None:
        _check_components_folder(components)
        blocks = None if component_blocks is None else tuple(b for b in component_blocks.split(",") if b.strip())
        request = ComponentRequest(blocks=blocks, dtype=component_dtype.value)

    if threads:
        import torch

        torch.set_num_threads(threads)
    segmenter = Segmenter(package, InferenceOptions(
        overlap=overlap, sw_batch_size=sw_batch_size, tta=tta, device=device,
        precision=precision.value, nmf_iters=nmf_iters, label_convention=label_convention,
        backend=engine, threads=threads,
    ))
    _warn(segmenter)
    if request is not None:
        select_sites(segmenter.networks[0], request.blocks)  # a wrong block name fails now, not after inference
    with progress_bar(quiet) as bar:
        task = bar.add_task(f"segmenting on {segmenter.runs_on}", total=None)
        result = segmenter(paths, progress=lambda done, total: bar.update(task, completed=done, total=total),
                           keep_probabilities=probabilities is not None, components=request)

    # Extras first, the label map last: a label map on disk means the whole case is done.
    if probabilities:
        result.write_probabilities(probabilities)
    if stats:
        write_stats(stats, result, paths, segmenter.runs_on)
    if preview:
        write_preview(preview, _preview_background(paths, result, model_card).array, result.labels,
                      result.reference.affine)
    if result.components is not None:
        result.components.write(components)
    result.write(output)
    if not quiet:
        _summary(result, output, time.perf_counter() - started, segmenter.runs_on)


def _warn(segmenter: Segmenter) -> None:
    for warning in segmenter.onnx.warnings if segmenter.onnx is not None else []:
        error_console().print(f"[yellow]warning:[/] {warning}", highlight=False)


def _summary(result: Segmentation, output: Path, seconds: float, device: str) -> None:
    console = error_console()
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
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


def segment_folder(folder: Path, output_dir: Path, package, options: InferenceOptions, overwrite: bool,
                   shard: str | None, quiet: bool, threads: int | None, pattern: str | None = None) -> int:
    """Batch mode of ``segment``; returns the number of failed cases."""
    import signal
    import threading

    from ..pipeline.batch import find_cases, in_shard, parse_shard, run_batch

    k, n = parse_shard(shard) if shard else (1, 1)
    cases = [c for c in find_cases(folder, package.card.modality_specs, pattern) if in_shard(c.name, k, n)]
    if not cases:
        raise InputError(f"{folder}: no cases found{f' in shard {k}/{n}' if n > 1 else ''}; give a folder of "
                         "case folders (BraTS, ISLES) or of nnU-Net files (CASE_0000.nii.gz)")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{output_dir}: cannot create the output folder ({err.strerror})") from None
    check_output_path(output_dir / "summary.json", [])
    if threads:
        import torch

        torch.set_num_threads(threads)
    segmenter = Segmenter(package, options)
    _warn(segmenter)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console = error_console()
    try:
        with progress_bar(quiet) as bar:
            task = bar.add_task(f"{len(cases)} cases on {segmenter.runs_on}", total=len(cases))

            def report(result, done, total):
                bar.update(task, completed=done)
                if result.status == "failed" and not quiet:
                    console.print(f"[red]failed:[/] {result.name}: {result.error.splitlines()[0]}", highlight=False)

            results = run_batch(cases, segmenter, output_dir, overwrite=overwrite, stop=stop, on_result=report)
    finally:
        signal.signal(signal.SIGTERM, previous)
    name = "summary.json" if n == 1 else f"summary-{k}-of-{n}.json"
    write_json(output_dir / name, {"model": package.card.name, "shard": f"{k}/{n}", "stopped": stop.is_set(),
                                   "cases": [vars(r) for r in results]})
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    if not quiet:
        console.print(f"{counts['done']} done, {counts['skipped']} skipped (already there), {counts['failed']} "
                      f"failed{', stopped by SIGTERM' if stop.is_set() else ''}; summary in {output_dir / name}",
                      highlight=False)
    return counts["failed"]
