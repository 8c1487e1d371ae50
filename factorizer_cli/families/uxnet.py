"""The 3D UX-Net / RepUX-Net family (MASILab/3DUX-Net, MASILab/RepUX-Net): large-kernel 3D CNNs.

Registers ``UXNET`` and ``REPUXNET`` (upstream's class and argument names), upstream's checkpoint
format, and the inference form (``nn.uxnet_inference``: BFR and BatchNorm folded, FFT for large
kernels where it pays, channels-last, in-place norms; exported as plain convolutions). No knobs, no
component maps.

Upstream checkpoint format: ``best_metric_model.pth``, ``torch.save(model.state_dict())``: a plain
mapping of upstream's keys to tensors, no prefix. RepUX-Net checkpoints hold the *effective* depthwise
kernels (upstream's training writes W ⊙ BFM back into ``dwconv.weight``), so they load unchanged into
the inference form (``deploy: true``); into the training form (``deploy: false``, BFR) they load as
the latent W = stored / BFM, whose effective kernel is the stored one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..nn.uxnet import REPUXNET, UXNET, BFRConv3d
from ..nn.uxnet_inference import fuse_for_inference
from .registry import Family, UpstreamFormat, register

_PREFIXES = {UXNET: "uxnet_3d.", REPUXNET: "repuxnet_3d."}
_TITLES = {UXNET: "3D UX-Net", REPUXNET: "3D RepUX-Net"}


def _is_state_dict(checkpoint: Any) -> bool:
    return (isinstance(checkpoint, Mapping) and bool(checkpoint)
            and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
            and any(isinstance(k, str) and k.startswith(tuple(_PREFIXES.values())) for k in checkpoint))


def _state_dict(checkpoint: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Upstream's keys are ours; only a training-form RepUX-Net's depthwise kernels change (stored / BFM)."""
    prefix = _PREFIXES[type(model)]
    if not any(k.startswith(prefix) for k in checkpoint):
        found = next(cls for cls, p in _PREFIXES.items() if any(k.startswith(p) for k in checkpoint))
        raise CheckpointError(f"a {_TITLES[found]} checkpoint, but the config describes a {type(model).__name__} "
                              f"({_TITLES[type(model)]}); use \"class\": \"{found.__name__}\"")
    state_dict = dict(checkpoint)
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if isinstance(module, BFRConv3d) and key in state_dict:
            stored = state_dict[key]
            state_dict[key] = stored / module.bfm.to(device=stored.device, dtype=stored.dtype)
    return state_dict


FAMILY = register(Family(
    name="uxnet",
    title="3D UX-Net / RepUX-Net",
    classes={"UXNET": UXNET, "REPUXNET": REPUXNET},
    upstream=(UpstreamFormat("state-dict (best_metric_model.pth)", _is_state_dict, _state_dict),),
    prepare=fuse_for_inference,
))
