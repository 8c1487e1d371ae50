"""``factorizer demo``: the whole pipeline on a generated case, offline, scored against its truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import app
from .console import error_console, friendly_errors


@app.command()
@friendly_errors
def demo(
    out_dir: Annotated[Path, typer.Option("--output", "-o", help="Folder for the case, label map and "
                                          "preview.")] = Path("factorizer-demo"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda[:N] or mps.")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for PyTorch.")] = None,
) -> None:
    """Segment a generated brain MRI case with the bundled demo model and score it against the truth.

    Needs no download and no data: a phantom glioma case (BraTS naming) is written to the output
    folder, segmented, and its label map, volumes (JSON) and an axial preview written beside it; the
    Dice per region is printed next to the one recorded in the model card. The demo model was trained
    on phantoms only: it shows the tool working, it is not for patients.

    Example: `factorizer demo -o /tmp/demo`
    """
    from ..api import run_demo, set_threads

    set_threads(threads)
    with error_console().status("generating a phantom case and segmenting it with the demo model"):
        result = run_demo(out_dir, device=device)
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("region", "Dice", "card", "HD95 mm"):
        table.add_column(column, justify="left" if column == "region" else "right")
    for region in sorted(result.dice, key=lambda r: "WT TC ET".find(r)):  # outermost first
        value = result.dice[region]
        recorded = result.card_dice.get(region)
        table.add_row(region, f"{value:.3f}", "-" if recorded is None else f"{recorded:.3f}",
                      f"{result.hd95[region]:.1f}")
    console = Console()
    console.print(f"case:         {result.case_dir}")
    console.print(f"segmentation: {result.segmentation}")
    console.print(f"preview:      {result.preview}")
    console.print(f"stats:        {result.stats}")
    console.print(table)
    total = sum(result.seconds.values())
    console.print(f"done in {total:.1f} s (phantom {result.seconds['phantom']:.1f} s, "
                  f"segmentation {result.seconds['segment']:.1f} s)")
