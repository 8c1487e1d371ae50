"""Load checkpoints saved by upstream Factorizer (pashtari/factorizer) into our networks.

Three formats are in the wild:

- tag 0.0.1, PyTorch Lightning ``.ckpt`` (the published ISLES'22 models): ``{"state_dict": {"net.<key>":
  tensor}, "hyper_parameters": {"network": [Class, {kwargs}], ...}}``. Its encoder and decoder stages
  were ``nn.Sequential``s (``encoder.blocks.1.blocks.0`` is the downsampling conv), so keys are renamed
  to the 0.0.2 layout; the network description can be read from the hyper-parameters.
- tag 0.0.2, a plain ``state_dict`` ``.pt``.
- the 2025 MONAI bundles, ``{"model": state_dict}``.

Pickles are read by ``safe_pickle``: no upstream install is needed and no code from the file runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..nn.config import build
from .package import load_state_dict_checked
from .safe_pickle import Reference, load_checkpoint

_V001_STAGE_KEY = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.blocks\.(\d+)\.(.*)$")


def load_upstream(path: str | Path, config: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the network described by ``config`` and load the upstream checkpoint at ``path`` into it.

    ``config`` is the declarative description (``{"class": NAME, ...}``); for a Lightning ``.ckpt`` it
    may be omitted and is then read from the checkpoint's hyper-parameters. Returns the network in eval
    mode. Raises ``CheckpointError`` (``UnsafeCheckpointError`` for a pickle that would run code) or
    ``ConfigError``.
    """
    checkpoint = load_checkpoint(path)
    if config is None:
        config = config_from_hparams(checkpoint, path)
    model = build(dict(config))
    state_dict = extract_state_dict(checkpoint, path)
    if any(_V001_STAGE_KEY.match(k) for k in state_dict):
        state_dict = rename_v001_keys(state_dict, set(model.state_dict()))
    load_state_dict_checked(model, state_dict, path)
    return model.eval()


def extract_state_dict(checkpoint: Any, path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The network's tensors from any of the three formats, with Lightning's ``net.`` prefix removed."""
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        state_dict = dict(checkpoint["state_dict"])
        if state_dict and all(k.startswith("net.") for k in state_dict):
            state_dict = {k[len("net."):]: v for k, v in state_dict.items()}
    elif isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping):
        state_dict = dict(checkpoint["model"])
    elif isinstance(checkpoint, Mapping):
        state_dict = dict(checkpoint)
    else:
        raise CheckpointError(f"{path}: expected a state dict, found {type(checkpoint).__name__}")
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not state_dict or not_tensors:
        raise CheckpointError(
            f"{path}: not a Factorizer checkpoint (expected a state dict of tensors, or "
            f"{{'state_dict': ...}} / {{'model': ...}}; found keys {list(state_dict)[:5]})"
        )
    return state_dict


def rename_v001_keys(state_dict: Mapping[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Map 0.0.1's ``Sequential`` stage layout onto ours.

    0.0.1 stage ``i`` is ``blocks = Sequential([downsample,] block0, block1, ...)`` and each block
    carries its own ``adapter`` (``Sequential(Linear, Dropout)``) and ``pos_embed``; ours has
    ``downsample`` / ``upsample`` beside a ``FactorizerStage`` that holds the adapter, the embedding and
    ``blocks``.
    """
    renamed = {}
    for key, value in state_dict.items():
        match = _V001_STAGE_KEY.match(key)
        if not match:
            renamed[key] = value
            continue
        path, level, index, rest = match.group(1), match.group(2), int(match.group(3)), match.group(4)
        stage = f"{path}.blocks.{level}"
        if path == "encoder" and f"{stage}.downsample.weight" in model_keys:
            if index == 0:
                renamed[f"{stage}.downsample.{rest}"] = value
                continue
            index -= 1
        if rest.startswith("adapter.0."):
            renamed[f"{stage}.block.adapter.{rest[len('adapter.0.'):]}"] = value
        elif rest.startswith("pos_embed."):
            renamed[f"{stage}.block.{rest}"] = value
        else:
            renamed[f"{stage}.block.blocks.{index}.{rest}"] = value
    return renamed


def config_from_hparams(checkpoint: Any, path: str | Path = "checkpoint") -> dict[str, Any]:
    """The network description recorded in a 0.0.1 Lightning checkpoint's ``hyper_parameters``."""
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    network = hparams.get("network") if isinstance(hparams, Mapping) else None
    if network is None:
        raise CheckpointError(
            f"{path}: the checkpoint does not describe its network; pass the network config"
        )
    config = _as_config(network)
    if not isinstance(config, dict) or "class" not in config:
        raise CheckpointError(f"{path}: cannot read the network description from its hyper-parameters")
    return config


def _as_config(value: Any) -> Any:
    if isinstance(value, type) and issubclass(value, Reference):
        return {"class": value.__name__}
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], type) and issubclass(value[0], Reference):
        config: dict[str, Any] = {"class": value[0].__name__}
        for extra in value[1:]:
            if isinstance(extra, Mapping):
                config.update({k: _as_config(v) for k, v in extra.items()})
        return config
    if isinstance(value, Mapping):
        return {k: _as_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_config(v) for v in value]
    return value
