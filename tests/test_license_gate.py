"""The licence gate: a model whose licence is not permissive is shown and refused until accepted.

Refused (one line naming the model, the licence and the fix; exit 2) by ``models download`` and
``segment`` and by the Python API, before any weight is fetched or read; accepted with
``--accept-license``, ``accept_license=True`` or ``FACTORIZER_ACCEPT_LICENSE=1``. Permissive cards,
every bundled card but the non-commercial ones (``NON_PERMISSIVE``) among them, and cards that state no
licence, need nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
from rich.cells import cell_len
from typer.testing import CliRunner

from factorizer_cli import api
from factorizer_cli.cli import app
from factorizer_cli.errors import LicenseError
from factorizer_cli.zoo.license import PERMISSIVE, license_terms, require_accepted
from factorizer_cli.zoo.package import save_package
from factorizer_cli.zoo.registry import zoo_card, zoo_names

from .oracle import oracle_card, oracle_weights, phantom, write_case
from .test_zoo_downloads import _package_files

runner = CliRunner()
ATLAS_LICENSE = "LicenseRef-UCLA-Academic-NonCommercial"
NON_PERMISSIVE = {"atlas-spin", "semantic-genesis-chest-ct"}  # the bundled cards whose licence must be accepted
FIX = ("--accept-license", "FACTORIZER_ACCEPT_LICENSE=1")


@pytest.fixture(autouse=True)
def factorizer_home(tmp_path, monkeypatch):
    """An empty cache, no acceptance from the environment, and no real network for Google Drive."""
    monkeypatch.setenv("FACTORIZER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FACTORIZER_ACCEPT_LICENSE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "home"


def _refusal(result, name: str, licence: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    line = lines[0]
    assert line.startswith("error: ") and name in line and licence in line, line
    assert all(fix in line for fix in FIX), line
    return line


# ------------------------------------------------------------------------------------- the decision


@pytest.mark.parametrize(("text", "permissive", "needs_acceptance"), [
    ("Apache-2.0", True, False),
    ("Apache-2.0 (code and weights, as released by pashtari/factorizer-isles22)", True, False),
    ("Code: MIT, as stated by the README. Weights: no license stated upstream; FeTA 2021 data terms apply.",
     True, False),
    ("BSD-3-Clause AND CC0-1.0", True, False),
    ("CC-BY-4.0", True, False),
    ("Code: MIT. Weights: CC-BY-NC-4.0.", False, True),  # one restrictive id is enough
    ("GPL-3.0-or-later", False, True),
    (f"{ATLAS_LICENSE}: research only", False, True),
    ("research use only, ask the authors", False, True),  # stated, but no id on the allow-list
    ("nur mit Genehmigung", False, True),  # a word is not an id: SPDX spelling, case included
    ("", False, False),  # nothing stated (your own model): nothing to accept
])
def test_what_counts_as_permissive(text, permissive, needs_acceptance):
    terms = license_terms(text)
    assert (terms.permissive, terms.needs_acceptance) == (permissive, needs_acceptance)


def test_the_refusal_names_the_restrictive_identifier():
    assert license_terms("Code: MIT. Weights: CC-BY-NC-4.0.").label == "CC-BY-NC-4.0"
    assert license_terms("research use only").label == '"research use only"'
    assert set(PERMISSIVE) >= {"MIT", "Apache-2.0"}


@pytest.mark.parametrize("name", zoo_names())
def test_every_bundled_card_but_the_non_commercial_ones_is_usable_without_accepting(name):
    terms = license_terms(zoo_card(name).license)
    assert terms.stated, f"{name}: a zoo card states its licence"
    assert terms.needs_acceptance == (name in NON_PERMISSIVE), (name, terms)


def test_atlas_spin_states_its_non_commercial_licence():
    card = zoo_card("atlas-spin")
    terms = license_terms(card.license)
    assert terms.identifiers == (ATLAS_LICENSE,) and "no commercial use" in card.license
    with pytest.raises(LicenseError, match=f"atlas-spin is licensed {ATLAS_LICENSE}.*--accept-license"):
        require_accepted(card)
    require_accepted(card, accept_license=True)


# ---------------------------------------------------------------------------------- the zoo card


def test_download_of_atlas_spin_is_refused_without_accepting(factorizer_home):
    _refusal(runner.invoke(app, ["models", "download", "atlas-spin"]), "atlas-spin", ATLAS_LICENSE)
    assert not (factorizer_home / "downloads").exists()


@pytest.mark.parametrize("accept", [["--accept-license"], []])
def test_download_of_atlas_spin_goes_past_the_gate_once_accepted(accept, factorizer_home):
    """Accepted by the option or the environment, the download starts: offline here, so the error is
    the cache's, not the licence's."""
    env = {} if accept else {"FACTORIZER_ACCEPT_LICENSE": "1"}
    result = runner.invoke(app, ["models", "download", "atlas-spin", *accept], env=env)
    assert result.exit_code == 2 and "offline" in result.output, result.output
    assert ATLAS_LICENSE not in result.output


def test_segment_with_atlas_spin_is_refused_without_accepting(tmp_path):
    out = tmp_path / "seg.nii.gz"
    result = runner.invoke(app, ["segment", str(tmp_path / "t1.nii.gz"), "-m", "t1", "-o", str(out),
                                 "--model", "atlas-spin"])
    _refusal(result, "atlas-spin", ATLAS_LICENSE)
    assert not out.exists()
    result = runner.invoke(app, ["segment", str(tmp_path / "t1.nii.gz"), "-m", "t1", "-o", str(out),
                                 "--model", "atlas-spin", "--accept-license", "--offline"])
    assert result.exit_code == 2 and "offline" in result.output and "licence" not in result.output


# ---------------------------------------------------------------- a model that can run end to end


@pytest.fixture()
def case(tmp_path):
    images, expected = phantom()
    write_case(tmp_path / "case", images, np.eye(4))
    return tmp_path / "case", expected


def _package(tmp_path, licence: str):
    return save_package(tmp_path / "model", replace(oracle_card(), license=licence), [oracle_weights()])


@pytest.mark.parametrize("how", ["option", "environment"])
def test_segment_runs_once_the_licence_is_accepted(tmp_path, case, how):
    folder, expected = case
    package = _package(tmp_path, "CC-BY-NC-4.0")
    out = tmp_path / "seg.nii.gz"
    args = ["segment", str(folder), "-o", str(out), "--model", str(package.root), "--quiet"]
    _refusal(runner.invoke(app, args), "oracle", "CC-BY-NC-4.0")
    assert not out.exists()
    if how == "option":
        result = runner.invoke(app, [*args, "--accept-license"])
    else:
        result = runner.invoke(app, args, env={"FACTORIZER_ACCEPT_LICENSE": "1"})
    assert result.exit_code == 0, result.output
    assert "licence: oracle is licensed CC-BY-NC-4.0 (accepted)" in " ".join(result.output.split())
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), expected)


def test_permissive_and_unstated_licences_need_nothing(tmp_path, case):
    folder, expected = case
    for licence in ("MIT", ""):
        package = save_package(tmp_path / f"model-{licence or 'none'}", replace(oracle_card(), license=licence),
                               [oracle_weights()])
        out = tmp_path / f"seg-{licence or 'none'}.nii.gz"
        result = runner.invoke(app, ["segment", str(folder), "-o", str(out), "--model", str(package.root),
                                     "--quiet"])
        assert result.exit_code == 0 and "licence" not in result.output, result.output
        np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), expected)


def test_python_api_refuses_until_accepted(tmp_path):
    package = _package(tmp_path, f"{ATLAS_LICENSE}: research only")
    with pytest.raises(LicenseError, match=f"oracle is licensed {ATLAS_LICENSE}"):
        api.load_segmenter(package.root)
    with pytest.raises(LicenseError):
        api.open_model(package.root)
    segmenter = api.load_segmenter(package.root, accept_license=True)
    assert segmenter.card.name == "oracle"


def test_download_of_a_served_card_waits_for_acceptance(tmp_path, hub_server, monkeypatch, factorizer_home):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # (the hub_server fixture unsets it too)
    blob = _package_files()["model.safetensors"]
    hub_server.create_repo("org/files").add_commit({"model.safetensors": blob})
    card = oracle_card().to_dict()
    card.update(name="served-nc", license="CC-BY-NC-SA-4.0 (weights)")
    card["weights"] = [{"source": "url", "url": f"{hub_server.url}/org/files/resolve/main/model.safetensors",
                        "filename": "model.safetensors", "format": "safetensors",
                        "sha256": hashlib.sha256(blob).hexdigest()}]
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card))
    _refusal(runner.invoke(app, ["models", "download", str(path)]), "served-nc", "CC-BY-NC-SA-4.0")
    assert hub_server.requests == [], "refused before any request"
    result = runner.invoke(app, ["models", "download", str(path), "--accept-license"])
    assert result.exit_code == 0, result.output
    assert "served-nc is licensed CC-BY-NC-SA-4.0 (accepted)" in " ".join(result.output.split())
    assert (factorizer_home / "downloads" / "served-nc" / "model.safetensors").read_bytes() == blob


# ------------------------------------------------------------------------------------ the tables


def _lines(*args: str) -> list[str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(cell_len(line.rstrip()) for line in lines) <= 80, result.output
    return lines


def test_models_list_marks_the_cards_that_need_accepting_within_80_columns():
    lines = _lines("models", "list")
    rows = {line.split()[0]: line for line in lines[1:] if line[:1].strip()}
    assert set(rows) == set(zoo_names())
    assert all(rows[name].split()[1] == "*" for name in NON_PERMISSIVE)
    assert all(row.split()[1] != "*" for name, row in rows.items() if name not in NON_PERMISSIVE)
    assert lines[-1].strip() == "* licence not permissive: use needs --accept-license"


def test_models_info_shows_the_licence_and_the_gate_within_80_columns():
    text = " ".join(" ".join(_lines("models", "info", "atlas-spin")).split())
    assert ATLAS_LICENSE in text and "not permissive: `models download` and `segment` need --accept-license" in text
    assert "SPiNModel" in text and "5.3 M" in text and "unverified" in text
    assert "need --accept-license" not in " ".join(_lines("models", "info", "isles22-swin-factorizer"))


def test_a_hub_package_is_refused_before_its_weights_are_fetched(hub_server, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    files = _package_files()
    card = json.loads(files["card.json"])
    card["license"] = "CC-BY-NC-4.0"
    sha = hub_server.create_repo("org/nc").add_commit({**files, "card.json": json.dumps(card).encode()})
    with pytest.raises(LicenseError, match="oracle is licensed CC-BY-NC-4.0"):
        api.open_model(f"hf://org/nc@{sha}")
    assert not hub_server.requests_for("GET", "model.safetensors"), "only the card was read"
    opened = api.open_model(f"hf://org/nc@{sha}", accept_license=True)
    assert opened.card.license == "CC-BY-NC-4.0" and hub_server.requests_for("GET", "model.safetensors")
