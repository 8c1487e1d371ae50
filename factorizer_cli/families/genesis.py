"""The Genesis family (MrGiovanni/ModelsGenesis, fhaghighi/SemanticGenesis): the 3D U-Net that Models
Genesis and Semantic Genesis pretrain without labels (``nn.unet3d``).

Registers ``UNet3D`` and ``YNet3D`` (upstream's class and argument names, plus ``base_width``,
``in_channels`` and ``norm``) and upstream's checkpoint formats. No knobs, no component maps, no
inference form of its own; the exported module is the default (``predict``: the logits before
upstream's sigmoid).

Upstream checkpoint formats, both read with upstream's keys after stripping ``nn.DataParallel``'s
``module.`` prefix (which upstream's files carry and its READMEs strip):

- the training scripts' checkpoint, ``{"epoch", "state_dict": {"module.<key>": tensor},
  "optimizer_state_dict", ...}`` (Models Genesis ``Genesis_Chest_CT.pt``; Semantic Genesis
  ``pytorch/train.py`` adds ``num_epoch_no_improvement`` and NumPy-scalar ``best_loss`` / ``best_acc``,
  which ``safe_pickle`` reads); only ``state_dict`` is used;
- a plain state dict (``torch.save(model.state_dict())``), prefixed or not.

A ``YNet3D`` checkpoint (Semantic Genesis' published weights) read into a ``UNet3D`` loses its
classification head ``clc_out.*``, as upstream's fine-tuning recipe does; every other key must fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..nn.unet3d import UNet3D, YNet3D
from .registry import Family, UpstreamFormat, register

_PARALLEL = "module."
_HEAD = "clc_out."
_MARK = "down_tr64."  # the first encoder block: every checkpoint of the family has it


def _unprefixed(key: str) -> str:
    return key[len(_PARALLEL):] if key.startswith(_PARALLEL) else key


def _is_genesis_state_dict(weights: Any) -> bool:
    return (isinstance(weights, Mapping) and bool(weights)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items())
            and any(_unprefixed(k).startswith(_MARK) for k in weights))


def _is_training_checkpoint(checkpoint: Any) -> bool:
    return isinstance(checkpoint, Mapping) and _is_genesis_state_dict(checkpoint.get("state_dict"))


def _our_keys(weights: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Upstream's keys without ``module.``; ``clc_out.*`` dropped for a network without the head; a
    ``num_batches_tracked`` missing from an old checkpoint filled with 0 (never read: momentum is fixed)."""
    state_dict = {_unprefixed(k): v for k, v in weights.items()}
    if len(state_dict) != len(weights):
        raise CheckpointError("the state dict holds the same key with and without the 'module.' prefix")
    if not isinstance(model, YNet3D):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_HEAD)}
    for key, value in model.state_dict().items():
        if key.endswith(".num_batches_tracked") and key not in state_dict \
                and key.replace("num_batches_tracked", "running_mean") in state_dict:
            state_dict[key] = torch.zeros_like(value)
    return state_dict


def _training_state_dict(checkpoint: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    return _our_keys(checkpoint["state_dict"], model)


def _plain_state_dict(checkpoint: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    return _our_keys(checkpoint, model)


FAMILY = register(Family(
    name="genesis",
    title="Models Genesis / Semantic Genesis 3D U-Net",
    classes={"UNet3D": UNet3D, "YNet3D": YNet3D},
    upstream=(
        UpstreamFormat("training checkpoint ({'state_dict': {'module.<key>': ...}, 'epoch', ...})",
                       _is_training_checkpoint, _training_state_dict),
        UpstreamFormat("state dict (torch.save(model.state_dict()))", _is_genesis_state_dict, _plain_state_dict),
    ),
))
