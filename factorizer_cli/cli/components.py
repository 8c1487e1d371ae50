"""``factorizer components-preview``: the strongest NMF component maps over an image, as one PNG."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from . import app
from .console import error_console, friendly_errors

EXAMPLES = """
**Examples**

Component maps written by segment, then the 8 strongest over FLAIR:

    factorizer segment CASE_DIR -o seg.nii.gz --model demo --components maps/

    factorizer components-preview maps/ --over CASE_DIR/CASE-t2f.nii.gz -o maps.png

Only the bottleneck's 12 strongest:

    factorizer components-preview maps/ --over flair.nii.gz -o bottleneck.png --block bottleneck.0 --top 12
"""


class Ranking(str, Enum):
    contrast = "contrast"
    energy = "energy"


@app.command("components-preview", epilog=EXAMPLES)
@friendly_errors
def components_preview(
    folder: Annotated[Path, typer.Argument(
        help="Folder written by `segment --components` (NIfTI maps and components.json).", show_default=False)],
    over: Annotated[Path, typer.Option(
        "--over", help="Image to draw the maps over, e.g. the FLAIR of the case.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG to write.", show_default=False)],
    top: Annotated[int, typer.Option(min=1, help="How many components, strongest first.")] = 8,
    by: Annotated[Ranking, typer.Option(
        help="Strongest by contrast (peak over median inside the image: focal maps such as a lesion's "
             "first) or by energy share in the block (broad maps first).", case_sensitive=False)] = Ranking.contrast,
    block: Annotated[list[str] | None, typer.Option(
        help="Only these blocks (file names without .nii.gz); repeat for several.", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not list the tiles.")] = False,
) -> None:
    """A montage of the strongest NMF component maps over an image, one tile per component.

    Each tile is the axial slice holding most of the map, in radiological convention (the patient's
    right on the left), the map in black-red-yellow over the image (inside it only), scaled to its own
    99.9th percentile. The tiles are listed in order (left to right, top to bottom).
    """
    from ..api import components_preview as write_preview

    shown = write_preview(output, folder, over, top=top, blocks=block or None, by=by.value)
    if quiet:
        return
    table = Table(title=f"{output}: tiles left to right, top to bottom", title_justify="left", box=None)
    for column in ("tile", "block", "head", "rank", "contrast", "energy share", "axial slice (RAS)"):
        table.add_column(column, justify="right" if column != "block" else "left")
    for n, tile in enumerate(shown, start=1):
        table.add_row(str(n), tile.block, str(tile.head), str(tile.rank_index), f"{tile.contrast:.1f}",
                      f"{tile.energy_share:.3f}", str(tile.slice_index))
    error_console().print(table)
