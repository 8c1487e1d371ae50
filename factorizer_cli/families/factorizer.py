"""The Factorizer family (pashtari/factorizer): U-shaped networks of NMF layers.

Registers the seed API's classes, upstream's three checkpoint formats, the ``nmf_iters`` inference
knob (fewer NMF iterations at inference: the paper's speed-up), the channels-last export formulation,
and NMF component maps.

Upstream checkpoint formats:

- tag 0.0.1, PyTorch Lightning ``.ckpt`` (the published ISLES'22 models): ``{"state_dict": {"net.<key>":
  tensor}, "hyper_parameters": {"network": [Class, {kwargs}], ...}}``. Its encoder and decoder stages
  were ``nn.Sequential``s (``encoder.blocks.1.blocks.0`` is the downsampling conv), so keys are renamed
  to the 0.0.2 layout; the network description can be read from the hyper-parameters.
- tag 0.0.2, a plain ``state_dict`` ``.pt``.
- the 2025 MONAI bundles, ``{"model": state_dict}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..nn import blocks, factorization, layers, matricize, networks
from ..nn.components import capture
from ..nn.export_graph import ExportGraph
from ..nn.factorization import NMF
from ..safe_pickle import Reference
from .registry import Family, Knob, UpstreamFormat, register

_V001_STAGE_KEY = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.blocks\.(\d+)\.(.*)$")


def _set_nmf_iterations(network: nn.Module, num_iters: int) -> None:
    for module in network.modules():
        if isinstance(module, NMF):
            module.num_iters = num_iters


def _nmf_iterations(network: nn.Module) -> list[int]:
    return sorted({m.num_iters for m in network.modules() if isinstance(m, NMF)})


# --- upstream checkpoints ------------------------------------------------------------------------

def _tensors(state_dict: Mapping[str, Any]) -> bool:
    return bool(state_dict) and all(isinstance(v, torch.Tensor) for v in state_dict.values())


def _is_lightning(checkpoint: Any) -> bool:
    return isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping)


def _is_bundle(checkpoint: Any) -> bool:
    return isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping)


def _is_state_dict(checkpoint: Any) -> bool:
    return isinstance(checkpoint, Mapping) and _tensors(checkpoint)


def _checked(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if not _tensors(state_dict):
        raise CheckpointError(
            "not a Factorizer checkpoint (expected a state dict of tensors, or {'state_dict': ...} / "
            f"{{'model': ...}}; found keys {list(state_dict)[:5]})"
        )
    return dict(state_dict)


def _from_lightning(checkpoint: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    state_dict = dict(checkpoint["state_dict"])
    if state_dict and all(k.startswith("net.") for k in state_dict):
        state_dict = {k[len("net."):]: v for k, v in state_dict.items()}
    state_dict = _checked(state_dict)
    if any(_V001_STAGE_KEY.match(k) for k in state_dict):
        state_dict = rename_v001_keys(state_dict, set(model.state_dict()))
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


def config_from_hparams(checkpoint: Any) -> dict[str, Any] | None:
    """The network description recorded in a 0.0.1 Lightning checkpoint's ``hyper_parameters``."""
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    network = hparams.get("network") if isinstance(hparams, Mapping) else None
    config = None if network is None else _as_config(network)
    return config if isinstance(config, dict) and "class" in config else None


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


UPSTREAM = (
    UpstreamFormat("lightning-ckpt (0.0.1)", _is_lightning, _from_lightning, config_from_hparams),
    UpstreamFormat("bundle (2025)", _is_bundle, lambda checkpoint, model: _checked(checkpoint["model"])),
    UpstreamFormat("state-dict (0.0.2)", _is_state_dict, lambda checkpoint, model: _checked(checkpoint)),
)

FAMILY = register(Family(
    name="factorizer",
    title="Factorizer",
    classes={
        cls.__name__: cls
        for cls in (
            networks.SegmentationFactorizer, networks.Factorizer, networks.UNet,
            blocks.FactorizerSubblock, blocks.FactMixer, blocks.FactorizerBlock, blocks.FactMixerBlock,
            blocks.FactorizerStage,
            factorization.NMF, matricize.Matricize, matricize.SWMatricize,
            layers.Linear, layers.LayerNorm, layers.MLP, layers.PositionalEmbedding,
        )
    },
    upstream=UPSTREAM,
    knobs={"nmf_iters": Knob("nmf_iters", "NMF iterations at inference (fewer is faster; default: as trained)",
                             _set_nmf_iterations, _nmf_iterations)},
    export_module=ExportGraph,
    components=capture,
))
