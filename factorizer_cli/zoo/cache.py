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
    if entry.get("source") == "url":
        return entry["url"]
    return f"package:{entry.get('path') or entry.get('file')}"


def trusted_hashes() -> dict[str, str]:
    path = home() / "trusted.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def trust(key: str, sha256: str) -> None:
    """Record the hash of a download the user chose to trust (``factorizer models verify``)."""
    records = trusted_hashes()
    records[key] = sha256
    path = home() / "trusted.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".trusted.json.tmp")
    tmp.write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def forget(keys: list[str]) -> None:
    records = {k: v for k, v in trusted_hashes().items() if k not in keys}
    path = home() / "trusted.json"
    if path.is_file():
        path.write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")
