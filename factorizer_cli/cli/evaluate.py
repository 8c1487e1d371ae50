"""``factorizer evaluate``: Dice and HD95 per region and case of a prediction folder against ground truths.

With ``--lesion-wise`` also the lesion-wise figures of ``pipeline.lesions`` (per-patient IOU,
precision, recall; lesions detected by size; the small-lesion slices' Dice), summarised in a second
table.
"""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import app
from .console import error_console, friendly_errors, progress_bar

if TYPE_CHECKING:

    from ..api import Evaluation

OUTPUT_PANEL = "Reports"


class Regions(str, Enum):
    auto = "auto"
    brats = "brats"
    lesion = "lesion"


EXAMPLES = """
**Examples**

Score a batch run against BraTS case folders (regions ET, TC, WT found from the labels):

    factorizer evaluate preds/ BraTS2023-GLI-Training/ --csv scores.csv --json scores.json

ISLES'22 (ground truths in derivatives/, region `lesion`), forced:

    factorizer evaluate preds/ ISLES-2022/ --regions lesion

Stroke lesions lesion by lesion (SPiN's figures; per-lesion counts per case in the CSV):

    factorizer evaluate preds/ ATLAS-test/ --lesion-wise --csv lesions.csv

**Conventions**

Dice is 1 and HD95 is 0 mm when prediction and truth are both empty; when only one is empty, Dice is
0 and HD95 is missing (blank in the table and CSV, null in JSON) and means, stds and medians leave it
out, their `n` says how many values they used. HD95 is the larger of the two directed 95th
percentiles of surface distances in mm, as MONAI computes it. A case with a ground truth but no
prediction is scored as an empty prediction and marked `missing`, never skipped.

Lesion-wise (`--lesion-wise`): lesions are the connected components of the nonzero labels with
26-connectivity (voxels touching by a face, an edge or a corner). A true lesion is found when any
of its voxels is predicted; a predicted component is a hit when any of its voxels is a true
lesion's, else a false positive. Recall = found / true lesions, precision = hits / predicted
components, F1 their harmonic mean, each from counts pooled over all cases; bins by each
component's own volume in mm³. Per-patient precision is missing for an empty prediction and recall
for an empty truth. Small-lesion slices are the axial slices (last array axis) whose lesions are
all ≤ 100 pixels, as the SPiN paper; their Dice is pooled over all such slices of all cases.
"""


@app.command(epilog=EXAMPLES)
@friendly_errors
def evaluate(
    pred_dir: Annotated[Path, typer.Argument(
        help="Folder of predicted label maps named after their cases (`CASE.nii.gz`), as batch mode writes.",
        metavar="PRED_DIR", show_default=False)],
    gt_dir: Annotated[Path, typer.Argument(
        help="Ground truths: BraTS case folders (`*-seg.nii.gz`), ISLES derivatives (`*_msk.nii.gz`), "
             "nnU-Net `labelsTr/`, or label maps named like the predictions.", metavar="GT_DIR",
        show_default=False)],
    regions: Annotated[Regions, typer.Option(
        help="brats: ET (3 or 4), TC (1, ET), WT (1, 2, ET); lesion: any nonzero label; auto: from the "
             "ground-truth labels.", case_sensitive=False)] = Regions.auto,
    csv: Annotated[Path | None, typer.Option(
        "--csv", help="Also write one row per case, then mean, std, median rows, as CSV.", show_default=False,
        rich_help_panel=OUTPUT_PANEL)] = None,
    json: Annotated[Path | None, typer.Option(
        "--json", help="Also write the scores, summary and conventions as JSON.", show_default=False,
        rich_help_panel=OUTPUT_PANEL)] = None,
    lesion_wise: Annotated[bool, typer.Option(
        "--lesion-wise", help="Also score lesion by lesion, for lesion models (stroke, SPiN): per-patient "
             "Dice, IOU, precision, recall; lesions found and false positives by size (≤100, 100-1000, "
             ">1000 mm³) with recall, precision, F1; Dice on slices holding only small lesions. Adds "
             "columns to --csv and --json and a summary table.")] = False,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="No progress bar, warnings or table (reports only).",
        rich_help_panel=OUTPUT_PANEL)] = False,
) -> None:
    """Score predicted label maps against ground truths: Dice and HD95 (mm) per region, per case and mean.

    Predictions and truths are paired by case id; each pair must share its voxel grid (shape and
    affine). The table goes to stdout; `--csv` and `--json` are written whole or not at all.
    """
    from ..api import evaluate as score

    console = error_console()
    with progress_bar(quiet or not console.is_terminal) as bar:  # no bar's blank line in logs
        task = bar.add_task("evaluating", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        result = score(pred_dir, gt_dir, regions=regions.value, csv=csv, json=json, progress=progress,
                       lesion_wise=lesion_wise)
    if not quiet:
        if result.missing:
            console.print(f"[yellow]warning:[/] {len(result.missing)} case(s) without a prediction, scored as "
                          f"empty: {_listing(result.missing)}", highlight=False)
        if result.unmatched_predictions:
            names = [p.name for p in result.unmatched_predictions]
            console.print(f"[yellow]warning:[/] {len(names)} prediction(s) without a ground truth, not scored: "
                          f"{_listing(names)}", highlight=False)
    if not quiet:
        Console(highlight=False).print(_table(result))
        if result.lesion_wise:
            Console(highlight=False).print(_lesion_table(result))


def _lesion_table(result: Evaluation) -> Table:
    """Pooled lesion counts by size, then per-patient overlap and the small-lesion Dice, in 80 columns."""
    summary = result.lesion_summary()
    table = Table(title=f"Lesions of {len(result.cases)} cases, pooled (nonzero labels, 26-connected)",
                  title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for header in ("size mm³", "lesions", "found", "recall", "predicted", "hits", "precision", "F1"):
        table.add_column(header, justify="left" if header == "size mm³" else "right", no_wrap=True)
    labels = {"all": "all", **{b.key: b.label for b in summary.bins}}
    for key, counts in summary.detection.items():
        table.add_row(labels[key], str(counts.true), str(counts.detected), _ratio(counts.recall),
                      str(counts.predicted), str(counts.hits), _ratio(counts.precision), _ratio(counts.f1),
                      end_section=key == "all")
    overlap = summary.overlap
    per_patient = "  ".join(f"{name} {_ratio(overlap[m]['mean'])}" for name, m in
                            (("Dice", "dice"), ("IOU", "iou"), ("precision", "precision"), ("recall", "recall")))
    small = summary.small_lesions
    lines = [f"per patient, mean: {per_patient}"]
    missing = [f"{m} n={overlap[m]['n']}" for m in ("precision", "recall") if overlap[m]["missing"]]
    if missing:
        lines.append("means leave out undefined values (" + ", ".join(missing) + ")")
    lines.append(f"small-lesion slices (all ≤100 px): {small.slices} in {summary.small_lesion_cases} cases, "
                 f"pooled Dice {_ratio(small.dice)}")
    table.caption = "\n".join(lines)
    table.caption_justify = "left"
    return table


def _ratio(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3f}"


def _table(result: Evaluation) -> Table:
    names, measures = result.region_names, result.metric_names
    table = Table(title=f"{len(result.cases)} cases, regions {result.regions} (HD95 in mm)",
                  title_justify="left")
    table.add_column("case", overflow="fold")
    for name in names:
        table.add_column(f"{name}\nDice", justify="right", no_wrap=True, min_width=6)
        table.add_column(f"{name}\nHD95", justify="right", no_wrap=True, min_width=5)
    for case in result.cases:
        label = escape(case.case) + (" [yellow]*[/]" if case.status == "missing" else "")
        table.add_row(label, *(_cell(case.metrics[n][m], m) for n in names for m in measures),
                      end_section=case is result.cases[-1])
    summary = result.summary()
    for statistic in ("mean", "std", "median"):
        table.add_row(f"[bold]{statistic}[/]",
                      *(_cell(summary[n][m][statistic], m) for n in names for m in measures))
    notes = []
    if result.missing:
        notes.append("* no prediction: scored as empty")
    counts = [summary[n]["hd95"] for n in names]
    if any(c["missing"] for c in counts):
        notes.append("HD95 statistics leave out cases with one mask empty (" + ", ".join(
            f"{n} n={c['n']}" for n, c in zip(names, counts)) + ")")
    table.caption = "; ".join(notes) or None
    table.caption_justify = "left"
    return table


def _cell(value: float, metric: str) -> str:
    if math.isnan(value):
        return "—"
    return f"{value:.4f}" if metric == "dice" else f"{value:.2f}"


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
