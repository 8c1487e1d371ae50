"""The ``factorizer`` command's entry point (console script, and ``python -m factorizer_cli``).

It sets the CPU runtime's defaults (``runtime.configure_cpu_runtime``) before anything imports
PyTorch, then runs the Typer app; importing ``factorizer_cli.cli`` first would load PyTorch's OpenMP
runtime with its default busy-waiting, which slows the network by up to 5x beside other busy jobs.
"""

from .runtime import configure_cpu_runtime


def main() -> None:
    """Console entry point: configure the CPU runtime, then parse and run the command."""
    configure_cpu_runtime()
    from .cli import main as cli_main  # only now: it may import torch

    cli_main()


if __name__ == "__main__":
    main()
