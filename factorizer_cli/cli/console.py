"""Rich consoles and progress bars shared by the commands (progress and messages go to stderr)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..errors import FactorizerError

F = TypeVar("F", bound=Callable)
EXIT_BAD_INPUT = 2

_stderr: Console | None = None


def error_console() -> Console:
    global _stderr
    if _stderr is None:
        _stderr = Console(stderr=True)
    return _stderr


def progress_bar(quiet: bool = False) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=error_console(),
        transient=True,
        disable=quiet,
    )


def friendly_errors(command: F) -> F:
    """Turn the library's typed errors into ``error: <one line>`` on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FactorizerError as err:
            # escaped: messages name paths and commands such as pip install 'factorizer-cli[atlas]'
            error_console().print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return wrapper  # type: ignore[return-value]


ACCEPT_LICENSE_HELP = ("Accept the model's licence when it is not permissive, e.g. non-commercial "
                       "(also: FACTORIZER_ACCEPT_LICENSE=1).")
