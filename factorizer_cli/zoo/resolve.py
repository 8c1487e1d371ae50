"""From what a user types after ``--model`` to a loaded-ready model package.

Accepted: a zoo name (``isles22-swin-factorizer``), a model folder (``card.json`` + safetensors),
``hf://ORG/REPO[@REVISION]`` (a model package published on the Hugging Face hub), or an upstream
checkpoint file together with a card. Upstream checkpoints are converted once into our package format
(safetensors) in the cache, so later runs load tensors only. A model whose licence is not permissive
is refused before its weights are fetched or read, unless the licence is accepted (``zoo.license``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import CheckpointError, ConfigError, DownloadError, one_line
from . import cache
from .card import ModelCard
from .license import require_accepted
from .package import CARD_FILE, ModelPackage, open_package, save_package, sha256_of
from .registry import zoo_card, zoo_names
from .upstream import load_upstream
from .weights import FetchedWeight, fetch, is_network_error, offline_hint

Progress = Callable[[str, int, int | None], None]  # (file label, bytes so far, total)
UPSTREAM_FORMATS = ("lightning-ckpt", "state-dict", "bundle", "SPiNModel.save_model")


@dataclass(frozen=True)
class ResolvedModel:
    package: ModelPackage
    unverified: tuple[str, ...] = ()  # weight sources used without a known hash


def resolve_model(spec: str | Path, card: str | Path | None = None, offline: bool = False,
                  progress: Progress | None = None, accept_license: bool = False) -> ResolvedModel:
    offline = cache.offline(offline)
    text = str(spec)
    if text.startswith("hf://"):
        return _from_hub_package(text[len("hf://"):], offline, progress, accept_license)
    path = Path(text)
    if path.is_dir():
        package = open_package(path)
        require_accepted(package.card, accept_license)
        return ResolvedModel(package)
    if path.is_file():
        if card is None:
            raise ConfigError(f"{path}: a checkpoint needs a model card: add --card CARD.json (or a zoo name)")
        described = load_card(card)
        require_accepted(described, accept_license)
        return ResolvedModel(import_cached(path, described))
    if text in zoo_names():
        return fetch_zoo_model(zoo_card(text), offline, progress, accept_license)
    raise ConfigError(
        f"model {text!r} is not a model folder, a checkpoint file, hf://ORG/REPO or a zoo name "
        f"({', '.join(zoo_names())})"
    )


def load_card(card: str | Path) -> ModelCard:
    """A card from a JSON file, or a zoo name (its architecture and metadata)."""
    return ModelCard.load(Path(card)) if Path(card).is_file() else zoo_card(str(card))


def fetch_weights(card: ModelCard, offline: bool = False, progress: Progress | None = None,
                  accept_license: bool = False) -> list[FetchedWeight]:
    """The card's weight files, one per fold, downloaded if needed and checked; ``LicenseError`` first
    for a licence that is not permissive and not accepted."""
    require_accepted(card, accept_license)
    fetched = []
    for i, entry in enumerate(card.weights):
        label = f"{card.name} fold {entry.get('fold', i)}"
        fetched.append(fetch(entry, card.name, offline,
                             (lambda done, total, label=label: progress(label, done, total)) if progress else None))
    return fetched


def fetch_zoo_model(card: ModelCard, offline: bool = False, progress: Progress | None = None,
                    accept_license: bool = False) -> ResolvedModel:
    """Download (or find) a zoo model's weights, check them, convert upstream formats once."""
    if not card.weights:
        raise ConfigError(f"model card {card.name!r} lists no weights")
    fetched = fetch_weights(card, offline, progress, accept_license)
    unverified = tuple(cache.source_key(e) for e, f in zip(card.weights, fetched) if f.status == "unverified")
    formats = {e.get("format", "safetensors") for e in card.weights}
    if formats <= {"safetensors"}:
        entries = tuple({**e, "sha256": f.sha256} for e, f in zip(card.weights, fetched))
        package = ModelPackage(replace(card, weights=entries), tuple(f.path for f in fetched), fetched[0].path.parent)
        return ResolvedModel(package, unverified)
    folder = cache.home() / "models" / card.name / _cache_key(card, [f.sha256 for f in fetched])
    if (folder / CARD_FILE).is_file():
        return ResolvedModel(open_package(folder), unverified)
    try:
        return ResolvedModel(convert(card, [f.path for f in fetched], folder), unverified)
    except CheckpointError as err:
        if not unverified:
            raise
        raise CheckpointError(f"{err}; the unverified download may be a web page rather than the file: "
                              f"`factorizer models remove {card.name}` and download it again") from None


def _cache_key(card: ModelCard, hashes: Sequence[str]) -> str:
    """Names a conversion by its inputs: the weights' hashes and the card (any edit converts anew)."""
    described = json.dumps({**card.to_dict(), "weights": None}, sort_keys=True)
    return hashlib.sha256((described + "".join(hashes)).encode()).hexdigest()[:16]


def convert(card: ModelCard, checkpoints: Sequence[Path], folder: Path) -> ModelPackage:
    """Upstream checkpoints (one per fold) into our package at ``folder``, through the safe loader."""
    state_dicts = [load_upstream(path, card.architecture).state_dict() for path in checkpoints]
    return save_package(folder, card, state_dicts)


def import_cached(checkpoint: Path, card: ModelCard) -> ModelPackage:
    """A checkpoint given with ``--card``: converted once, cached by the checkpoint's hash."""
    folder = cache.home() / "imports" / card.name / _cache_key(card, [sha256_of(checkpoint)])
    if (folder / CARD_FILE).is_file():
        return open_package(folder)
    return convert(card, [checkpoint], folder)


def _from_hub_package(reference: str, offline: bool, progress: Progress | None,
                      accept_license: bool = False) -> ResolvedModel:
    """``ORG/REPO[@REV]``: the repo holds ``card.json`` and the safetensors files it lists."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    repo, _, revision = reference.partition("@")
    try:
        card_path = Path(hf_hub_download(repo, CARD_FILE, revision=revision or "main",
                                         endpoint=os.environ.get("HF_ENDPOINT"),
                                         cache_dir=cache.hub_cache_dir(), local_files_only=offline))
    except HFValidationError as err:
        raise ConfigError(f"hf://{reference}: not a hub model reference ({one_line(err)}); write "
                          "hf://ORG/REPO or hf://ORG/REPO@REVISION") from None
    except LocalEntryNotFoundError:
        if not offline:
            raise DownloadError(f"hf://{reference}: cannot reach the hub and it is not in the cache") from None
        raise DownloadError(offline_hint(f"hf://{reference}", f"factorizer segment ... --model hf://{reference}")) from None
    except Exception as err:
        if not is_network_error(err):
            raise
        raise DownloadError(f"hf://{reference}: cannot get its {CARD_FILE} ({one_line(err)})") from None
    commit = card_path.parent.name  # snapshots/<commit>/card.json: pin the weights to the same commit
    card = ModelCard.load(card_path)
    if any("file" not in e for e in card.weights):
        raise ConfigError(f"hf://{reference}: its {CARD_FILE} lists weights without a \"file\"")
    entries = tuple({"source": "hub", "repo": repo, "filename": e["file"], "revision": commit,
                     "sha256": e.get("sha256"), "format": e.get("format", "safetensors")}
                    for e in card.weights)
    return fetch_zoo_model(replace(card, weights=entries), offline, progress, accept_license)
