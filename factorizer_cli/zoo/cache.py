"""Where downloaded and converted weights live, and which unverified downloads the user trusts.

``FACTORIZER_HOME`` (default ``~/.cache/factorizer``) holds URL downloads, converted model packages and
``trusted.json``; files from the Hugging Face hub stay in the hub's own cache (``HF_HUB_CACHE`` /
``HF_HOME``), shared with other tools. Copying these folders to another machine makes it work offline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io.atomic import write_json_atomic

_TRUE = {"1", "true", "yes", "on"}


def home() -> Path:
    return Path(os.environ.get("FACTORIZER_HOME") or Path.home() / ".cache" / "factorizer")


def offline(requested: bool = False) -> bool:
    """``--offline``, or ``HF_HUB_OFFLINE`` set as the hub's own tools understand it."""
    return requested or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_cache_dir() -> str | None:
    """The hub cache as configured *now* (huggingface_hub reads its variables once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def source_key(entry: Mapping[str, Any]) -> str:
    """A stable name for one weight source, for trust records and messages."""
    if entry.get("source") == "hub":
        return f"hf://{entry['repo']}@{entry['revision']}/{entry['filename']}"
    if entry.get("source") == "url":  # a file inside a zip archive: the archive's URL, then "#member"
        return f"{entry['url']}#{entry['member']}" if entry.get("member") else entry["url"]
    return f"package:{entry.get('path') or entry.get('file')}"


def trusted_hashes() -> dict[str, str]:
    path = home() / "trusted.json"
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: unreadable trust records ({err}); delete the file and verify again") from None
    return records if isinstance(records, dict) else {}


def trust(key: str, sha256: str) -> None:
    """Record the hash of a download the user chose to trust (``factorizer models verify``)."""
    _write_trusted({**trusted_hashes(), key: sha256})


def forget(keys: list[str]) -> None:
    records = trusted_hashes()
    if any(k in records for k in keys):
        _write_trusted({k: v for k, v in records.items() if k not in keys})


def _write_trusted(records: dict[str, str]) -> None:
    path = home() / "trusted.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, records, sort_keys=True)
