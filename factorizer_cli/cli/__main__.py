"""``python -m factorizer_cli.cli``: the same entry point as the ``factorizer`` command."""

from ..__main__ import main

main()
