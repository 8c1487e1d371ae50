"""Shared test helpers: hypothesis profiles, where the upstream parity fixtures live, and a skip when they do not."""

from __future__ import annotations

import json
import locale
import os
from pathlib import Path

import pytest
from hypothesis import settings

from .hub_server import hub_server, no_retry_sleep  # noqa: F401  (fixtures for every test module)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("FACTORIZER_FIXTURES", REPO.parent / "shared" / "fixtures" / "upstream"))
FIXTURE_NAMES = ("v001_small_seed0", "v002_small_seed0", "head_small_seed0")

# Hypothesis: a quick profile for the edit-test loop, and the full counts in CI (`.ci/run` sets CI=true).
# Tests scale their example counts from the loaded profile's max_examples (tests/test_fuzz_inputs.py),
# so one number here sets the size of every fuzz run. Both are derandomized: a failure seen once is seen
# again on the next run and on every machine, and no example database is written into the clone.
settings.register_profile("dev", max_examples=10, derandomize=True, database=None)
settings.register_profile("ci", settings.get_profile("ci"), max_examples=100, derandomize=True, database=None)
settings.load_profile("ci" if os.environ.get("CI", "").lower() == "true" else "dev")


def fixture_meta(name: str) -> dict:
    """The fixture's JSON (config, checkpoint name, output shapes, parameter count), or skip."""
    path = FIXTURES / f"{name}.json"
    if not path.is_file():
        pytest.skip(
            f"upstream parity fixtures not found at {FIXTURES} (they sit beside the clone in CI; "
            "set FACTORIZER_FIXTURES to run these tests)"
        )
    return json.loads(path.read_text())


@pytest.fixture(autouse=True)
def _restore_locale():
    """Writing DICOM test data with SimpleITK (GDCM) switches the process to the C locale."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)
