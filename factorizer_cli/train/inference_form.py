"""What a trained network's package holds: its inference form where training used another.

A RepUX-Net trains with BFR (``deploy: false``: latent kernels W, used as W ⊙ BFM); its package holds
the folded plain depthwise kernels and says ``deploy: true``, so that segmenting and exporting load a
plain CNN and never the training-only re-parameterisation. The fold runs on a copy: the training
network (and the resumable state, which keeps W) goes on unchanged.

The rule is generic: a network with ``reparameterize()`` and ``deploy`` False is folded and its
description gets ``deploy: true``. This is not the family's ``prepare``, which may go further than any
card can describe (folding BatchNorm, trimming kernels, at load time): a package holds exactly what
``build(card.architecture)`` loads, checked here.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..families import build


def needs_folding(network: nn.Module) -> bool:
    """A training form with an inference form: ``deploy`` False and a ``reparameterize()``."""
    return getattr(network, "deploy", None) is False and callable(getattr(network, "reparameterize", None))


def inference_form(network: nn.Module,
                   architecture: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The weights and network description a package of ``network`` should hold."""
    if not needs_folding(network):
        return network.state_dict(), dict(architecture)
    folded = copy.deepcopy(network)
    folded.reparameterize()
    described = {**architecture, "deploy": True}
    weights = folded.state_dict()
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build(described).state_dict().items()}
    if expected != {k: tuple(v.shape) for k, v in weights.items()}:
        raise ConfigError(f"{described.get('class')}: the reparameterised network does not fit its own "
                          "description with \"deploy\": true; it cannot be saved as a package")
    return weights, described
