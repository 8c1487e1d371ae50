"""The SPiN family (alexklwong/subpixel-embedding-segmentation): 2D lesion segmentation with a subpixel
embedding, run slice by slice (``nn.spin``).

Registers ``SPiNModel`` (upstream's class and argument names), upstream's checkpoint format and the
inference form (``nn.spin_inference``: BatchNorm folded, channels-last). No knobs, no component maps;
the exported module is the default (``predict``: ``out1x``, the logits at the input's resolution,
which upstream thresholds); training supervises ``out1x`` alone, as upstream's loss does.

Upstream checkpoint format (``SPiNModel.save_model``): one dict with ``train_step``,
``optimizer_state_dict`` and five sub-module state dicts, ``<module>_state_dict``, whose keys are
relative to the module. Our parameters live under the same module names, so each sub-dict is read
under its module's prefix; the training step and the optimizer state are not needed for inference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..nn.spin import SPiNModel
from ..nn.spin_inference import fuse_for_inference
from .registry import Family, UpstreamFormat, register

MODULES = ("encoder_subpixel_embedding", "decoder_subpixel_embedding", "subpixel_guidance",
           "encoder_segmentation", "decoder_segmentation")
_GROUPS = tuple(f"{name}_state_dict" for name in MODULES)


def _is_spin_checkpoint(checkpoint: Any) -> bool:
    """Any of the five sub-dicts marks upstream's format (a missing one is then an error naming it)."""
    return isinstance(checkpoint, Mapping) and any(group in checkpoint for group in _GROUPS)


def _state_dict(checkpoint: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Each ``<module>_state_dict`` under the prefix ``<module>.``; all five are required."""
    missing = [group for group in _GROUPS if group not in checkpoint]
    if missing:
        raise CheckpointError(f"not a whole SPiN checkpoint: {', '.join(missing)} missing (upstream's "
                              f"checkpoints hold all of {', '.join(_GROUPS)})")
    state_dict: dict[str, torch.Tensor] = {}
    for name, group in zip(MODULES, _GROUPS):
        weights = checkpoint[group]
        if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise CheckpointError(f"{group} is not a state dict of tensors")
        state_dict.update({f"{name}.{key}": value for key, value in weights.items()})
    return state_dict


FAMILY = register(Family(
    name="spin",
    title="SPiN (subpixel embedding)",
    classes={"SPiNModel": SPiNModel},
    upstream=(UpstreamFormat("SPiNModel.save_model (five *_state_dict)", _is_spin_checkpoint, _state_dict),),
    prepare=fuse_for_inference,
    training_heads=lambda network, x: network.predict(x),  # out1x, as upstream's loss (not out2x)
))
