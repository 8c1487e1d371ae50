"""``factorizer models`` commands: tables that fit 80 columns, and download/verify/remove for real."""

import hashlib
import json

import pytest
from rich.cells import cell_len
from typer.testing import CliRunner

from factorizer_cli.cli import app
from factorizer_cli.zoo.registry import zoo_names

from .oracle import oracle_card, phantom, write_case
from .test_zoo_downloads import _package_files

runner = CliRunner()


@pytest.fixture(autouse=True)
def factorizer_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORIZER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.parametrize("args", [["models", "list"], ["models", "info", "isles22-swin-factorizer"]])
def test_tables_fit_an_80_column_terminal(args):
    result = runner.invoke(app, args, env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "isles22-swin-factorizer" in result.output
    assert max(len(line.rstrip()) for line in result.output.splitlines()) <= 80
    if args[1] == "list":
        header, *rows = result.output.splitlines()
        assert header.split() == ["name", "task", "inputs", "params", "cached", "verified"]
        row = next(r for r in rows if r.startswith("isles22-swin-factorizer"))
        assert row.split()[-2:] == ["0/5", "no"]
        demo = next(r for r in rows if r.startswith("demo "))
        assert demo.split()[-2:] == ["1/1", "yes"]  # bundled in the package, hash in the card
    else:
        assert "dwi, adc, flair" in result.output and "2 × 2 × 2 mm" in result.output


def _within_80_columns(args: list[str]) -> list[str]:
    """The command's lines at COLUMNS=80, each checked to take at most 80 terminal cells."""
    result = runner.invoke(app, args, env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    wide = [line for line in lines if cell_len(line.rstrip()) > 80]
    assert not wide, f"{' '.join(args)}: {len(wide)} line(s) wider than 80 columns:\n" + "\n".join(wide)
    return lines


def test_models_list_shows_every_zoo_card_within_80_columns():
    lines = _within_80_columns(["models", "list"])
    listed = {line.split()[0] for line in lines[1:] if line[:1].strip()}  # continuation lines start blank
    assert listed == set(zoo_names())


@pytest.mark.parametrize("name", zoo_names())
def test_models_info_of_every_zoo_card_fits_80_columns(name):
    lines = _within_80_columns(["models", "info", name])
    assert lines[0].startswith(f"{name}: ")
    assert any(line.startswith("network ") for line in lines) and any(line.startswith("fold 0 ") for line in lines)


def test_unknown_model_names_the_known_ones():
    result = runner.invoke(app, ["models", "info", "brats-unet"])
    assert result.exit_code == 2 and "isles22-swin-factorizer" in result.output


def _card_file(tmp_path, server, blob, sha256):
    server.create_repo("org/files").add_commit({"model.safetensors": blob})
    card = oracle_card().to_dict()
    card["name"] = "served-oracle"
    card["weights"] = [{"source": "url", "url": f"{server.url}/org/files/resolve/main/model.safetensors",
                        "filename": "model.safetensors", "format": "safetensors", "sha256": sha256}]
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card))
    return path


def test_download_verify_remove(tmp_path, hub_server, factorizer_home):
    blob = _package_files()["model.safetensors"]
    digest = hashlib.sha256(blob).hexdigest()
    card = _card_file(tmp_path, hub_server, blob, None)
    result = runner.invoke(app, ["models", "download", str(card)])
    assert result.exit_code == 0, result.output
    assert f"unverified, sha256 {digest}" in result.output
    result = runner.invoke(app, ["models", "verify", str(card)])
    assert result.exit_code == 0 and f"recorded sha256 {digest} as trusted" in result.output
    assert digest in (factorizer_home / "trusted.json").read_text()
    result = runner.invoke(app, ["models", "verify", str(card)])
    assert "ok (trusted" in result.output
    result = runner.invoke(app, ["models", "remove", str(card)])
    assert result.exit_code == 0 and "removed 1 weight file" in result.output
    assert not (factorizer_home / "downloads" / "served-oracle").exists()
    assert digest not in (factorizer_home / "trusted.json").read_text()
    result = runner.invoke(app, ["models", "verify", str(card)])
    assert result.exit_code == 1 and "not downloaded" in result.output


def test_segment_with_a_model_published_on_the_hub(tmp_path, hub_server):
    sha = hub_server.create_repo("org/oracle").add_commit(_package_files())
    images, expected = phantom()
    write_case(tmp_path / "case", images, __import__("numpy").eye(4))
    out = tmp_path / "seg.nii.gz"
    result = runner.invoke(app, ["segment", str(tmp_path / "case"), "-o", str(out), "--model",
                                 f"hf://org/oracle@{sha}", "--quiet"])
    assert result.exit_code == 0, result.output
    import nibabel as nib
    import numpy as np

    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), expected)
    hub_server.reset_log()
    result = runner.invoke(app, ["segment", str(tmp_path / "case"), "-o", str(out), "--model",
                                 f"hf://org/oracle@{sha}", "--quiet", "--offline"])
    assert result.exit_code == 0 and hub_server.requests == []
