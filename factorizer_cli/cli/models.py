"""``factorizer models ...``: the model zoo from the command line."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from ..errors import ConfigError
from ..zoo import cache
from ..zoo.card import ModelCard
from ..zoo.registry import zoo_card, zoo_names
from ..zoo.resolve import convert, fetch_weights, load_card
from ..zoo.weights import expected_sha256, local_path, sha256_of
from . import app
from .console import error_console, friendly_errors

models_app = typer.Typer(
    name="models", help="List, download, verify, remove and import models.", no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(models_app)

OFFLINE = typer.Option("--offline", help="Use only the local cache (also: HF_HUB_OFFLINE=1).")


def _parameters(card: ModelCard) -> str:
    import torch

    from ..nn.config import build

    with torch.device("meta"):
        network = build(dict(card.architecture))
    return f"{sum(p.numel() for p in network.parameters()) / 1e6:.1f} M"


def _weight_state(card: ModelCard) -> tuple[str, str]:
    """(cached, verified) for a table: how many folds are here, and how far they are vouched for."""
    here = sum(local_path(entry, card.name) is not None for entry in card.weights)
    statuses = {expected_sha256(entry)[1] for entry in card.weights}
    verified = "yes" if statuses == {"verified"} else "no" if "unverified" in statuses else "trusted"
    return f"{here}/{len(card.weights)}", verified


@models_app.command("list")
@friendly_errors
def list_models() -> None:
    """The models that ship with factorizer-cli, and whether their weights are here.

    *verified*: every weight file has a sha256 in the card; *trusted*: hashes you recorded with
    `factorizer models verify`; *no*: no published checksum yet.
    """
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("name", no_wrap=True)
    for column in ("task", "inputs", "params", "cached", "verified"):
        table.add_column(column, overflow="fold")
    for name in zoo_names():
        card = zoo_card(name)
        cached, verified = _weight_state(card)
        table.add_row(name, card.task, " ".join(m.name for m in card.modalities), _parameters(card),
                      cached, verified)
    Console().print(table)


@models_app.command()
@friendly_errors
def info(name: Annotated[str, typer.Argument(help="Zoo name or a card JSON file.")]) -> None:
    """Everything the card says about a model: inputs, geometry, outputs, labels, weights."""
    card = load_card(name)
    console = Console()
    console.print(f"[bold]{card.name}[/]: {card.task}")
    if card.description:
        console.print(card.description, highlight=False)
    rows = [
        ("inputs", ", ".join(m.name + (f" ({'/'.join(m.aliases)})" if m.aliases else "") for m in card.modalities)),
        ("spacing", " × ".join(f"{s:g}" for s in card.spacing) + " mm"),
        ("window", " × ".join(map(str, card.roi)) + f" voxels, overlap {card.overlap:g}"),
        ("outputs", f"{', '.join(card.outputs)} ({card.activation}, threshold {card.threshold:g})"),
        ("labels", ", ".join(f"{r.label}: {card.label_names.get(str(r.label), r.region)}" for r in card.labels)),
        ("parameters", _parameters(card)),
        ("license", card.license),
        ("citation", card.citation),
    ]
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        if value:
            table.add_row(key, value)
    for i, entry in enumerate(card.weights):
        sha, status = expected_sha256(entry)
        here = "cached" if local_path(entry, card.name) else "not downloaded"
        table.add_row(f"fold {entry.get('fold', i)}", f"{cache.source_key(entry)}\n{entry.get('format', 'safetensors')}, "
                      f"{here}, {status}" + (f" (sha256 {sha[:16]}…)" if sha else ""))
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
) -> None:
    """Download a model's weights into the cache and check their sha256.

    Example: `factorizer models download isles22-swin-factorizer`
    """
    card = load_card(name)
    if revision:
        from dataclasses import replace

        if not any(e.get("source") == "hub" for e in card.weights):
            raise ConfigError(f"{card.name}: --revision applies to Hugging Face hub sources; this model has none")
        card = replace(card, weights=tuple(
            {**e, "revision": revision, "sha256": None} if e.get("source") == "hub" else e for e in card.weights))
    with _download_progress() as bar:
        tasks: dict[str, int] = {}

        def progress(label: str, done: int, total: int | None) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done, total=total)

        fetched = fetch_weights(card, offline=False, progress=progress)
    for entry, weight in zip(card.weights, fetched):
        typer.echo(f"{cache.source_key(entry)}: {weight.status}, sha256 {weight.sha256}")


@models_app.command()
@friendly_errors
def verify(name: Annotated[str, typer.Argument(help="Zoo name (or a model card JSON file).")]) -> None:
    """Check the cached weights of a model against their sha256.

    For weights without a published checksum, records the hash of your download as trusted: later
    loads then refuse a file that changes. Compare the printed hash with a reference you trust first.
    """
    card = load_card(name)
    failed = False
    for entry in card.weights:
        key, path = cache.source_key(entry), local_path(entry, card.name)
        if path is None:
            typer.echo(f"{key}: not downloaded (run `factorizer models download {name}`)")
            failed = True
            continue
        digest = sha256_of(path)
        expected, status = expected_sha256(entry)
        if expected is None:
            cache.trust(key, digest)
            typer.echo(f"{key}: no published checksum; recorded sha256 {digest} as trusted")
        elif digest == expected:
            typer.echo(f"{key}: ok ({status}, sha256 {digest[:16]}…)")
        else:
            typer.echo(f"{key}: MISMATCH, sha256 {digest} but {expected} expected: remove and download again")
            failed = True
    if failed:
        raise typer.Exit(1)


@models_app.command()
@friendly_errors
def remove(name: Annotated[str, typer.Argument(help="Zoo name (or a model card JSON file).")]) -> None:
    """Delete a model's cached weights, converted packages and trust records."""
    card = load_card(name)
    removed = 0
    for entry in card.weights:
        path = local_path(entry, card.name)
        if path is not None and entry.get("source") in ("url", "hub"):
            target = path.resolve()
            path.unlink(missing_ok=True)
            if target != path:
                target.unlink(missing_ok=True)
            removed += 1
    for folder in (cache.home() / "downloads" / card.name, cache.home() / "models" / card.name):
        if folder.is_dir():
            shutil.rmtree(folder)
    cache.forget([cache.source_key(e) for e in card.weights])
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
    package = convert(load_card(card), checkpoints, output)
    typer.echo(f"wrote {output} ({len(package.weight_files)} fold(s)): use it with --model {output}")
