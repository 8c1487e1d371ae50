"""Fetch a model card's weight files and check them before anything reads them.

A weight entry names its source: the Hugging Face hub (``repo``, ``filename``, ``revision`` pinned to a
commit), an HTTPS ``url`` (with ``member`` when the URL serves a zip archive holding the weights: that
file is taken out and kept as ``filename``, the archive deleted), or a ``path`` inside the installed
package; and its ``sha256`` (of the weight file itself, not of an archive). A file whose
hash differs from the card's (or from the one the user recorded with ``models verify``) is deleted and
refused. A source the card cannot vouch for (no published hash, not yet trusted) is used but reported
as unverified.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DownloadError, one_line
from . import cache
from .card import ModelCard
from .download import download_url, extract_member
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


@dataclass(frozen=True)
class WeightSource:
    """One weight file of a card as this machine knows it: where from, whether here, how vouched for."""

    fold: int
    key: str  # ``cache.source_key``: hf://..., a URL, or package:...
    format: str
    path: Path | None  # the file when it is here
    sha256: str | None  # the hash it must have, if any is known
    status: str  # "verified", "trusted" or "unverified" (see ``expected_sha256``)


def weight_sources(card: ModelCard) -> list[WeightSource]:
    """The card's weight files, one per fold, without downloading anything."""
    sources = []
    for i, entry in enumerate(card.weights):
        sha256, status = expected_sha256(entry)
        sources.append(WeightSource(entry.get("fold", i), cache.source_key(entry), entry.get("format", "safetensors"),
                                    local_path(entry, card.name), sha256, status))
    return sources


def with_revision(card: ModelCard, revision: str) -> ModelCard:
    """``card`` with its hub weights at another revision (commit, branch or tag); their pinned hashes
    no longer apply. ``ConfigError`` for a card without hub weights."""
    if not any(e.get("source") == "hub" for e in card.weights):
        raise ConfigError(f"{card.name}: --revision applies to Hugging Face hub sources; this model has none")
    return replace(card, weights=tuple({**e, "revision": revision, "sha256": None} if e.get("source") == "hub" else e
                                       for e in card.weights))


@dataclass(frozen=True)
class Verification:
    """What ``verify_cached`` found for one weight file."""

    key: str
    outcome: str  # "missing", "recorded" (no published hash: this one is now trusted), "ok" or "mismatch"
    sha256: str | None = None  # of the file here
    expected: str | None = None
    status: str = ""  # how the expected hash is vouched for: "verified" or "trusted"


def verify_cached(card: ModelCard) -> list[Verification]:
    """Check the cached weights of ``card`` against their hashes.

    A file without a published hash has its hash recorded as trusted (``cache.trust``): later loads
    then refuse a file that changes.
    """
    found = []
    for entry in card.weights:
        key, path = cache.source_key(entry), local_path(entry, card.name)
        if path is None:
            found.append(Verification(key, "missing"))
            continue
        digest = sha256_of(path)
        expected, status = expected_sha256(entry)
        if expected is None:
            cache.trust(key, digest)
            found.append(Verification(key, "recorded", digest))
        else:
            found.append(Verification(key, "ok" if digest == expected else "mismatch", digest, expected, status))
    return found


def remove_cached(card: ModelCard) -> int:
    """Delete a model's downloaded weights, converted packages and trust records; the files removed."""
    removed = 0
    for entry in card.weights:
        path = local_path(entry, card.name)
        if path is not None and entry.get("source") in ("url", "hub"):
            _delete(path)
            removed += 1
    for folder in (cache.home() / "downloads" / card.name, cache.home() / "models" / card.name):
        if folder.is_dir():
            shutil.rmtree(folder)
    cache.forget([cache.source_key(e) for e in card.weights])
    return removed


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
        destination = cache.home() / "downloads" / model / entry["filename"]
        if not entry.get("member"):
            return download_url(entry["url"], destination, progress)
        archive = destination.with_name(destination.name + ".zip")
        if not archive.is_file():  # else an earlier run got the archive and stopped before extracting
            download_url(entry["url"], archive, progress)
        try:
            return extract_member(archive, entry["member"], destination)
        finally:
            archive.unlink(missing_ok=True)  # the weights are out, or the archive is not what was expected
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
