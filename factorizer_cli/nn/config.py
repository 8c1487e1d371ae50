"""Build a network from its declarative description: ``{"class": NAME, **kwargs}``.

This is the format of model cards and of the upstream parity fixtures. A dict with a ``"class"`` key
at the top is instantiated; one nested as an argument becomes the seed API's ``(class, kwargs)`` tuple,
so the class receives its remaining arguments from the network that uses it. Only the classes named in
``CLASSES`` can be built: a description is data, never a way to call arbitrary code.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError
from . import blocks, factorization, layers, matricize, networks

CLASSES: dict[str, Any] = {
    cls.__name__: cls
    for cls in (
        networks.SegmentationFactorizer,
        networks.Factorizer,
        networks.UNet,
        blocks.FactorizerSubblock,
        blocks.FactMixer,
        blocks.FactorizerBlock,
        blocks.FactMixerBlock,
        blocks.FactorizerStage,
        factorization.NMF,
        matricize.Matricize,
        matricize.SWMatricize,
        layers.Linear,
        layers.LayerNorm,
        layers.MLP,
        layers.PositionalEmbedding,
        nn.Conv1d, nn.Conv2d, nn.Conv3d,
        nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
        nn.ReLU, nn.GELU, nn.LeakyReLU, nn.Identity,
    )
}


def resolve(value: Any, path: str = "config") -> Any:
    """Turn nested ``{"class": ...}`` dicts into ``(class, kwargs)`` tuples (a bare class if no kwargs)."""
    if isinstance(value, dict):
        if "class" in value:
            cls = _lookup(value["class"], path)
            kwargs = {k: resolve(v, f"{path}.{k}") for k, v in value.items() if k != "class"}
            return (cls, kwargs) if kwargs else cls
        return {k: resolve(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def build(config: dict[str, Any]) -> nn.Module:
    """Instantiate the network described by ``config``."""
    if not isinstance(config, dict) or "class" not in config:
        raise ConfigError('a network description must be a dict with a "class" key')
    cls = _lookup(config["class"], "config")
    kwargs = {k: resolve(v, f"config.{k}") for k, v in config.items() if k != "class"}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError, AssertionError) as err:  # arguments the classes do not take
        raise ConfigError(f"cannot build {config['class']}: {err}") from err


def _lookup(name: Any, path: str) -> Any:
    if name not in CLASSES:
        raise ConfigError(
            f"unknown class {name!r} at {path}; expected one of: {', '.join(sorted(CLASSES))}"
        )
    return CLASSES[name]
