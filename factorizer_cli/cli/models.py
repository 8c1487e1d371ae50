"""``factorizer models ...``: the model zoo from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from . import app
from .console import ACCEPT_LICENSE_HELP, error_console, friendly_errors

if TYPE_CHECKING:
    from ..api import ModelCard, WeightSource

models_app = typer.Typer(
    name="models", help="List, download, verify, remove and import models.", no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(models_app)

OFFLINE = typer.Option("--offline", help="Use only the local cache (also: HF_HUB_OFFLINE=1).")
RESTRICTED = "*"  # marks, in `models list`, a model whose licence must be accepted


def _parameters(card: ModelCard) -> str:
    from ..api import parameter_count

    return f"{parameter_count(card) / 1e6:.1f} M"


def _weight_state(sources: list[WeightSource]) -> tuple[str, str]:
    """(cached, verified) for a table: how many folds are here, and how far they are vouched for."""
    statuses = {s.status for s in sources}
    verified = "yes" if statuses == {"verified"} else "no" if "unverified" in statuses else "trusted"
    return f"{sum(s.path is not None for s in sources)}/{len(sources)}", verified


@models_app.command("list")
@friendly_errors
def list_models() -> None:
    """The models that ship with factorizer-cli, and whether their weights are here.

    *verified*: every weight file has a sha256 in the card; *trusted*: hashes you recorded with
    `factorizer models verify`; *no*: no published checksum yet. A `*` after a name: its licence is
    not permissive (e.g. non-commercial), and `models download` and `segment` need `--accept-license`.
    """
    table = Table(box=None, pad_edge=False, header_style="bold", padding=(0, 1, 0, 0))
    table.add_column("name", no_wrap=True)
    table.add_column("task", min_width=16)  # whole words at 80 columns, beside the longest name
    table.add_column("inputs", max_width=11)
    for column in ("params", "cached", "verified"):
        table.add_column(column, overflow="fold")
    from ..api import license_terms, weight_sources, zoo_models

    restricted = False
    for card in zoo_models():
        cached, verified = _weight_state(weight_sources(card))
        marked = license_terms(card.license).needs_acceptance
        restricted |= marked
        table.add_row(card.name + (f" {RESTRICTED}" if marked else ""), card.task,
                      " ".join(m.name for m in card.modalities), _parameters(card), cached, verified)
    if restricted:
        table.caption = f"{RESTRICTED} licence not permissive: use needs --accept-license"
    Console().print(table)


@models_app.command()
@friendly_errors
def info(name: Annotated[str, typer.Argument(help="Zoo name or a card JSON file.")]) -> None:
    """Everything the card says about a model: inputs, geometry, outputs, labels, weights."""
    from ..api import family_title, license_terms, load_card, weight_sources

    card = load_card(name)
    terms = license_terms(card.license)
    console = Console()
    console.print(f"[bold]{card.name}[/]: {card.task}")
    if card.description:
        console.print(card.description, highlight=False)
    rows = [
        ("inputs", ", ".join(m.name + (f" ({'/'.join(m.aliases)})" if m.aliases else "") for m in card.modalities)),
        ("network", f"{card.architecture.get('class')} ({family_title(card)})"),
        ("preprocessing", card.preprocessing.describe()),
        ("window", " × ".join(map(str, card.roi)) + f" voxels, overlap {card.overlap:g}"),
        ("outputs", f"{', '.join(card.outputs)} ("
                    + ("softmax, the most probable class" if card.activation == "softmax"
                       else f"sigmoid, threshold {card.threshold:g}") + ")"),
        ("labels", ", ".join(f"{r.label}: {card.label_names.get(str(r.label), r.region)}" for r in card.labels)),
        ("parameters", _parameters(card)),
        ("license", card.license + ("\nnot permissive: `models download` and `segment` need --accept-license"
                                    if terms.needs_acceptance else "")),
        ("citation", card.citation),
    ]
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        if value:
            table.add_row(key, value)
    for source in weight_sources(card):
        here = "cached" if source.path else "not downloaded"
        table.add_row(f"fold {source.fold}", f"{source.key}\n{source.format}, {here}, {source.status}"
                      + (f" (sha256 {source.sha256[:16]}…)" if source.sha256 else ""))
    console.print(table)


def _download_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    console=error_console(), transient=True)


@models_app.command()
@friendly_errors
def download(
    name: Annotated[str, typer.Argument(help="Zoo name (or a model card JSON file).")],
    revision: Annotated[str | None, typer.Option(
        help="Hub revision (commit, branch or tag) instead of the card's pinned one.")] = None,
    accept_license: Annotated[bool, typer.Option("--accept-license", help=ACCEPT_LICENSE_HELP)] = False,
) -> None:
    """Download a model's weights into the cache and check their sha256.

    A model whose licence is not permissive is refused unless you accept it (`--accept-license`).

    Example: `factorizer models download isles22-swin-factorizer`
    """
    from ..api import acceptance_note, download_weights, load_card

    card = load_card(name)
    with _download_progress() as bar:
        tasks: dict[str, int] = {}

        def progress(label: str, done: int, total: int | None) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done, total=total)

        fetched = download_weights(card, revision=revision, progress=progress, accept_license=accept_license)
    note = acceptance_note(card)
    if note:
        error_console().print(f"[yellow]licence:[/] {escape(note)}", highlight=False)
    for source, weight in fetched:
        typer.echo(f"{source.key}: {weight.status}, sha256 {weight.sha256}")


@models_app.command()
@friendly_errors
def verify(name: Annotated[str, typer.Argument(help="Zoo name (or a model card JSON file).")]) -> None:
    """Check the cached weights of a model against their sha256.

    For weights without a published checksum, records the hash of your download as trusted: later
    loads then refuse a file that changes. Compare the printed hash with a reference you trust first.
    """
    from ..api import load_card, verify_cached

    failed = False
    for check in verify_cached(load_card(name)):
        if check.outcome == "missing":
            typer.echo(f"{check.key}: not downloaded (run `factorizer models download {name}`)")
        elif check.outcome == "recorded":
            typer.echo(f"{check.key}: no published checksum; recorded sha256 {check.sha256} as trusted")
        elif check.outcome == "ok":
            typer.echo(f"{check.key}: ok ({check.status}, sha256 {check.sha256[:16]}…)")
        else:
            typer.echo(f"{check.key}: MISMATCH, sha256 {check.sha256} but {check.expected} expected: remove and "
                       "download again")
        failed |= check.outcome in ("missing", "mismatch")
    if failed:
        raise typer.Exit(1)


@models_app.command()
@friendly_errors
def remove(name: Annotated[str, typer.Argument(help="Zoo name (or a model card JSON file).")]) -> None:
    """Delete a model's cached weights, converted packages and trust records."""
    from ..api import load_card, remove_cached

    card = load_card(name)
    removed = remove_cached(card)
    typer.echo(f"{card.name}: removed {removed} weight file(s) and cached conversions")


@models_app.command("import")
@friendly_errors
def import_checkpoints(
    checkpoints: Annotated[list[Path], typer.Argument(
        help="Upstream checkpoints, one per fold: Lightning .ckpt, state-dict .pt or bundle .pt.",
        exists=True, dir_okay=False)],
    card: Annotated[str, typer.Option(help="Model card JSON (or a zoo name) describing the network.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the model package to.")],
) -> None:
    """Convert upstream Factorizer checkpoints into a model package (card + safetensors).

    Pickles are read with a restricted unpickler: nothing in them is executed.

    Example: `factorizer models import fold0.ckpt fold1.ckpt --card isles22-swin-factorizer -o my-model/`
    """
    from ..api import import_checkpoints as convert

    package = convert(checkpoints, card, output)
    typer.echo(f"wrote {output} ({len(package.weight_files)} fold(s)): use it with --model {output}")


@models_app.command()
@friendly_errors
def pack(
    runs: Annotated[list[Path], typer.Argument(help="Run folders of factorizer train, one per fold.",
                                               exists=True, file_okay=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the ensemble package to.")],
    last: Annotated[bool, typer.Option("--last", help="Pack each run's last/ package instead of best/.")] = False,
) -> None:
    """Assemble cross-validation runs into one ensemble package; segment averages its folds.

    The runs must train the same card (network, preprocessing, window, outputs); the package's card
    records each fold's validation Dice and their mean.

    Example: `factorizer models pack runs/fold0 runs/fold1 runs/fold2 runs/fold3 runs/fold4 -o brats-5fold/`
    """
    from ..api import pack_runs

    package = pack_runs(runs, output, "last" if last else "best")
    mean = package.card.metrics.get("mean_validation_dice")
    summary = "; mean validation Dice " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()) if mean else ""
    typer.echo(f"wrote {output} ({len(package.weight_files)} folds{summary}): use it with --model {output}")
