"""``factorizer evaluate``: Dice and HD95 per region and case of a prediction folder against ground truths."""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
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

**Conventions**

Dice is 1 and HD95 is 0 mm when prediction and truth are both empty; when only one is empty, Dice is
0 and HD95 is missing (blank in the table and CSV, null in JSON) and means, stds and medians leave it
out, their `n` says how many values they used. HD95 is the larger of the two directed 95th
percentiles of surface distances in mm, as MONAI computes it. A case with a ground truth but no
prediction is scored as an empty prediction and marked `missing`, never skipped.
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
        result = score(pred_dir, gt_dir, regions=regions.value, csv=csv, json=json,
                       progress=lambda done, total: bar.update(task, completed=done, total=total))
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
