"""The console command: version and help work, in process and as a real subprocess; cli/ stays thin."""

import ast
import subprocess
import sys
from pathlib import Path

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


# --- a thin CLI: it parses, calls factorizer_cli.api and renders -------------------------------

CLI = Path(__file__).resolve().parents[1] / "factorizer_cli" / "cli"
LIBRARIES = {"torch", "numpy", "nibabel", "SimpleITK", "onnx", "onnxruntime", "safetensors", "huggingface_hub"}
ALLOWED = {"factorizer_cli.__version__", "factorizer_cli.api", "factorizer_cli.errors", "factorizer_cli.__main__"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a cli module, at any level (functions included)."""
    package = "factorizer_cli.cli"
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            if node.module:
                found.append((node.lineno, ".".join(p for p in (base, node.module) if p)))
            else:  # from .. import api: the names are modules (or attributes) of the package
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def test_cli_modules_import_only_the_api_and_rendering_libraries():
    files = sorted(CLI.glob("*.py"))
    assert len(files) >= 8
    bad = []
    for path in files:
        for line, module in _imports(path):
            top = module.split(".")[0]
            if top in LIBRARIES or (top == "factorizer_cli" and module not in ALLOWED
                                    and not module.startswith("factorizer_cli.cli")):
                bad.append(f"{path.name}:{line} imports {module}")
            elif top not in {"factorizer_cli", "typer", "rich", "click", "__future__"} | sys.stdlib_module_names:
                bad.append(f"{path.name}:{line} imports {module}")
    assert bad == [], bad


def test_importing_the_cli_loads_no_numerical_library():
    """``factorizer --help`` starts fast: PyTorch and friends load when a command runs, not before."""
    code = ("import sys, factorizer_cli.cli; "
            "print(sorted(m for m in ('torch', 'numpy', 'nibabel', 'SimpleITK', 'onnxruntime') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    result = runner.invoke(app, ["segment", "--help"])
    assert result.exit_code == 0 and "--nmf-iters" in result.output
