"""The console command: version and help work, in process and as a real subprocess."""

import subprocess
import sys

from typer.testing import CliRunner

from factorizer_cli import __version__
from factorizer_cli.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert f"factorizer-cli {__version__}" in result.output


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "Factorizer" in result.output and "info" in result.output


def test_console_script_runs_as_a_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "factorizer_cli.cli", "--version"], capture_output=True, text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert __version__ in result.stdout
