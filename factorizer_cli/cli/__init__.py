"""The ``factorizer`` command: parses arguments, calls the Python API, renders results.

Each command lives in its own module and stays a thin layer over a library function; the library
raises typed errors that ``console.friendly_errors`` turns into one line on stderr and exit code 2.
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
        import torch

        typer.echo(f"factorizer-cli {__version__} (torch {torch.__version__})")
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
    import torch

    typer.echo(f"factorizer-cli {__version__}")
    typer.echo(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    cuda = torch.cuda.is_available()
    typer.echo(f"CUDA: {'yes, ' + torch.cuda.get_device_name(0) if cuda else 'not available'}")
    import onnxruntime

    typer.echo(f"onnxruntime {onnxruntime.__version__}: {', '.join(onnxruntime.get_available_providers())}")


from . import components as _components  # noqa: E402,F401
from . import demo as _demo  # noqa: E402,F401
from . import evaluate as _evaluate  # noqa: E402,F401
from . import export as _export  # noqa: E402,F401
from . import models as _models  # noqa: E402,F401  (register the commands on ``app``)
from . import segment as _segment  # noqa: E402,F401
from . import train as _train  # noqa: E402,F401


def main() -> None:
    """Console entry point."""
    app()
