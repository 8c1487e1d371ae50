"""The ``factorizer`` command: parses arguments, calls the Python API, renders results.

Each command lives in its own module and stays a thin layer over ``factorizer_cli.api``; the library
raises typed errors that ``console.friendly_errors`` turns into one line on stderr and exit code 2.
Commands import the API when they run, never at module level: ``factorizer --help`` then starts without
loading PyTorch, and ``cli/`` imports no torch, numpy, nibabel or SimpleITK itself.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__

app = typer.Typer(
    name="factorizer",
    help=(
        "Segment brain MRI with Factorizer networks (differentiable NMF).\n\n"
        "Run `factorizer COMMAND --help` for the options and examples of each command."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from ..api import torch_version

        typer.echo(f"factorizer-cli {__version__} (torch {torch_version()})")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool | None,
        typer.Option("--version", "-V", help="Print the version and exit.", callback=_print_version,
                     is_eager=True),
    ] = None,
) -> None:
    """Segment brain MRI with Factorizer networks (differentiable NMF)."""


@app.command()
def info() -> None:
    """Show the installed versions and the compute devices this machine offers.

    Example: factorizer info
    """
    from ..api import environment

    env = environment()
    typer.echo(f"factorizer-cli {env.version}")
    typer.echo(f"torch {env.torch}, {env.cpu_threads} CPU threads")
    typer.echo(f"CUDA: {'yes, ' + env.cuda_device if env.cuda_device else 'not available'}")
    typer.echo(f"onnxruntime {env.onnxruntime}: {', '.join(env.onnx_providers)}")

from . import components as _components  # noqa: E402,F401
from . import demo as _demo  # noqa: E402,F401
from . import evaluate as _evaluate  # noqa: E402,F401
from . import export as _export  # noqa: E402,F401
from . import models as _models  # noqa: E402,F401  (register the commands on ``app``)
from . import pretrain as _pretrain  # noqa: E402,F401
from . import segment as _segment  # noqa: E402,F401
from . import train as _train  # noqa: E402,F401


def main() -> None:
    """Console entry point."""
    app()
