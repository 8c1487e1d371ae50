"""Runnable examples: ``python -m factorizer_cli.examples.NAME``."""
