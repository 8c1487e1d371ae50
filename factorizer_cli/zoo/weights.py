"""Fetch a model card's weight files and check them before anything reads them.

A weight entry names its source: the Hugging Face hub (``repo``, ``filename``, ``revision`` pinned to a
commit), an HTTPS ``url``, or a ``path`` inside the installed package; and its ``sha256``. A file whose
hash differs from the card's (or from the one the user recorded with ``models verify``) is deleted and
refused. A source the card cannot vouch for (no published hash, not yet trusted) is used but reported
as unverified.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

from ..errors import DownloadError, one_line
from . import cache
from .download import download_url
from .package import sha256_of

Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class FetchedWeight:
    path: Path
    sha256: str
    status: str  # "verified" (the card's hash), "trusted" (the user's record) or "unverified"


def expected_sha256(entry: Mapping[str, Any]) -> tuple[str | None, str]:
    """The hash a file must have, and why: the card's, the user's trust record, or none."""
    if entry.get("sha256"):
        return entry["sha256"], "verified"
    recorded = cache.trusted_hashes().get(cache.source_key(entry))
    return (recorded, "trusted") if recorded else (None, "unverified")


def local_path(entry: Mapping[str, Any], model: str) -> Path | None:
    """Where the file is when it is already here (no network), else None."""
    source = entry.get("source")
    if source == "url":
        path = cache.home() / "downloads" / model / entry["filename"]
        return path if path.is_file() else None
    if source == "package":
        with as_file(files("factorizer_cli.models") / entry["path"]) as path:
            return Path(path) if Path(path).is_file() else None
    if source == "hub":
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(entry["repo"], entry["filename"], revision=entry["revision"],
                                       cache_dir=cache.hub_cache_dir())
        return Path(found) if isinstance(found, str) else None
    raise DownloadError(f"unknown weight source {source!r} in the model card of {model}")


def fetch(entry: Mapping[str, Any], model: str, offline: bool = False,
          progress: Progress | None = None) -> FetchedWeight:
    """The weight file on disk, downloaded if needed (unless offline), with its hash checked."""
    offline = cache.offline(offline)
    path = local_path(entry, model)
    if path is None:
        if offline:
            raise DownloadError(offline_hint(f"{model}: weights {cache.source_key(entry)}",
                                             f"factorizer models download {model}"))
        path = _download(entry, model, progress)
    digest = sha256_of(path)
    expected, status = expected_sha256(entry)
    if expected and digest != expected:
        if entry.get("source") == "package":
            raise DownloadError(f"{model}: the packaged weights {path} are corrupt (sha256 mismatch); reinstall "
                                "factorizer-cli")
        _delete(path)
        raise DownloadError(
            f"{model}: {cache.source_key(entry)} has sha256 {digest[:12]}… but {expected[:12]}… was expected; "
            "the corrupt file was deleted, download it again"
        )
    return FetchedWeight(path, digest, status)


def offline_hint(what: str, fetch_command: str) -> str:
    """The message for something missing from the cache while offline: how to bring it here."""
    return (
        f"{what} not in the cache and offline; on a connected machine run `{fetch_command}` and copy "
        f"{cache.home()} and the Hugging Face cache ({cache.hub_cache_dir() or '~/.cache/huggingface/hub'}) "
        "here, or convert a local checkpoint with `factorizer models import`"
    )


def is_network_error(err: BaseException) -> bool:
    """Errors of the hub client and its HTTP library (httpx or httpx2, by version) and of sockets."""
    from huggingface_hub.errors import HfHubHTTPError

    return isinstance(err, (HfHubHTTPError, OSError)) or type(err).__module__.split(".")[0].startswith("httpx")


def _download(entry: Mapping[str, Any], model: str, progress: Progress | None) -> Path:
    if entry["source"] == "url":
        return download_url(entry["url"], cache.home() / "downloads" / model / entry["filename"], progress)
    if entry["source"] == "hub":
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(
                entry["repo"], entry["filename"], revision=entry["revision"],
                endpoint=os.environ.get("HF_ENDPOINT"), cache_dir=cache.hub_cache_dir(),
            ))
        except Exception as err:
            if not is_network_error(err):
                raise
            raise DownloadError(
                f"{model}: cannot download {cache.source_key(entry)} ({one_line(err)}); check the network "
                "and run again"
            ) from None
    raise DownloadError(f"{model}: the packaged weight file {entry.get('path')} is missing; reinstall")


def _delete(path: Path) -> None:
    """Remove a bad file; for the hub cache, the blob behind the snapshot link as well."""
    target = path.resolve()
    path.unlink(missing_ok=True)
    if target != path:
        target.unlink(missing_ok=True)
