"""Our model package: a folder with ``card.json`` and one safetensors file per fold.

Safetensors holds tensors only, so loading weights never executes code. The card lists the weight
files with their sha256, checked before use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..families import build
from ..io.atomic import atomic_path
from .card import ModelCard

CARD_FILE = "card.json"


@dataclass(frozen=True)
class ModelPackage:
    card: ModelCard
    weight_files: tuple[Path, ...]
    root: Path

    def state_dicts(self) -> list[tuple[Path, dict[str, torch.Tensor]]]:
        """Each fold's weight file and tensors, the file checked against the card's sha256 first."""
        loaded = []
        for path, entry in zip(self.weight_files, self.card.weights):
            expected = entry.get("sha256")
            if expected and sha256_of(path) != expected:
                raise CheckpointError(
                    f"{path}: sha256 does not match the model card; the file is corrupt or was "
                    "replaced: download or import the model again"
                )
            try:
                loaded.append((path, load_file(path)))
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
        return loaded

    def load_networks(self, device: torch.device | str = "cpu") -> list[nn.Module]:
        """One network per fold, weights verified and loaded, in eval mode on ``device``."""
        networks = []
        for path, state_dict in self.state_dicts():
            network = build(dict(self.card.architecture))
            load_state_dict_checked(network, state_dict, path)
            networks.append(network.eval().to(device))
        return networks


def open_package(path: str | Path) -> ModelPackage:
    """Read a model folder (``card.json`` plus the weight files it lists)."""
    root = Path(path)
    card_path = root / CARD_FILE
    if not card_path.is_file():
        raise ConfigError(f"{root}: not a model folder (no {CARD_FILE}); pass a model folder or a zoo name")
    card = ModelCard.load(card_path)
    if not card.weights:
        raise ConfigError(f"{card_path}: the card lists no weight files")
    files = []
    for entry in card.weights:
        file = root / entry.get("file", "")
        if not file.is_file():
            raise CheckpointError(f"{file}: weight file listed in {card_path} is missing")
        files.append(file)
    return ModelPackage(card, tuple(files), root)


def save_package(directory: str | Path, card: ModelCard, state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> ModelPackage:
    """Write a model folder: one safetensors file per state dict, and the card listing them by hash."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, state_dict in enumerate(state_dicts):
        name = "model.safetensors" if len(state_dicts) == 1 else f"fold{i}.safetensors"
        with atomic_path(root / name) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp))
        entries.append({"file": name, "sha256": sha256_of(root / name), "format": "safetensors"})
    card = ModelCard.from_dict({**card.to_dict(), "weights": entries})
    with atomic_path(root / CARD_FILE) as tmp:
        card.save(tmp)
    return open_package(root)


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: Any) -> None:
    """``load_state_dict(strict=True)`` with an error that says which keys and shapes did not fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: network has {tuple(expected[k].shape)}, checkpoint has {tuple(v.shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[0]})")
        if missing:
            parts.append(f"{len(missing)} weights missing from the checkpoint (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} weights the network does not have (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"{source}: checkpoint does not fit the {type(model).__name__} described by the config: "
            + "; ".join(parts)
        )
    model.load_state_dict(state_dict, strict=True)
