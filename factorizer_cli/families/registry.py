"""The registry of architecture families, and the one build path from a card's network description.

A *family* is one kind of network (Factorizer, RepUX-Net, SPiN, ...). Everything the rest of the tool
asks of a network, beyond ``forward``, is answered by its family, registered in the family's own
module (``factorizer_cli/families/<family>.py``) and nowhere else:

- ``classes``: the names a card's ``architecture`` may use (the family's networks and building blocks);
- ``upstream``: the checkpoint formats of the family's upstream code, read into our state dicts;
- ``knobs``: inference options the family understands (Factorizer: ``nmf_iters``); a knob given to a
  model of a family without it is an error, never silently ignored;
- ``prepare``: what turns a trained module into its inference form (e.g. a re-parameterisation);
- ``export_module``: the module the ONNX exporter traces (default: the prepared network's
  full-resolution logits);
- ``components``: where interpretable component maps can be recorded (default: none, refused);
- ``training_heads``: the outputs training supervises (default: everything ``forward`` returns, the
  full-resolution head first, deep-supervision heads after it).

A description is data: only registered classes can be built, never an arbitrary callable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class Knob:
    """An inference option of a family: a whole number set on a loaded network (e.g. NMF iterations).

    ``apply`` sets it on a network; ``read`` gives the values a network has now (for an export's
    metadata, ``factorizer.<name>``); ``option`` is the command-line spelling, for messages.
    """

    name: str
    help: str
    apply: Callable[[nn.Module, int], None]
    read: Callable[[nn.Module], list[int]]
    minimum: int = 1

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class UpstreamFormat:
    """One checkpoint format of a family's upstream code.

    ``detect(checkpoint)`` says whether an unpickled checkpoint is in this format; ``state_dict``
    turns it into our keys for ``model`` (the network built from the config); ``config`` reads the
    network description a checkpoint carries, if it carries one (else ``None``).
    """

    name: str
    detect: Callable[[Any], bool]
    state_dict: Callable[[Any, nn.Module], dict[str, Tensor]]
    config: Callable[[Any], dict[str, Any] | None] = lambda checkpoint: None


ComponentCapture = Callable[[nn.Module, Sequence[str] | None], AbstractContextManager]


def _unchanged(module: nn.Module) -> nn.Module:
    return module


def full_resolution_logits(network: nn.Module, x: Tensor) -> Tensor:
    """The full-resolution output only: ``predict`` where the network has it, else the first head."""
    out = network.predict(x) if hasattr(network, "predict") else network(x)
    return out[0] if isinstance(out, (list, tuple)) else out


def window_logits(network: nn.Module, x: Tensor, slice_wise: bool = False) -> Tensor:
    """Full-resolution logits of windows ``(B, C, *roi)``; a slice-wise 2D network (windows ``[H, W, 1]``)
    sees ``(B, C, H, W)`` and its logits get the slice axis back."""
    if slice_wise:
        return full_resolution_logits(network, x[..., 0]).unsqueeze(-1)
    return full_resolution_logits(network, x)


def activate(logits: Tensor, activation: str) -> Tensor:
    """Probabilities from logits: a sigmoid per channel (nested regions) or a softmax over the channels."""
    return torch.sigmoid(logits) if activation == "sigmoid" else logits.softmax(1)


def label_decisions(probabilities: Tensor, activation: str, threshold: float) -> Tensor:
    """What a label map is made of, per voxel of ``(B, C, *spatial)`` probabilities: the winning class
    ``(B, 1, *spatial)`` for softmax models, each output above ``threshold`` ``(B, C, *spatial)`` for
    sigmoid models."""
    if activation == "softmax":
        return probabilities.argmax(1, keepdim=True)
    return probabilities > threshold


class SliceWindow(nn.Module):
    """A slice-wise 2D module seen as one for windows ``[H, W, 1]``, like the 3D models (for export)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return window_logits(self.module, x, slice_wise=True)


def all_heads(network: nn.Module, x: Tensor) -> Tensor | Sequence[Tensor]:
    """The default training heads: the full ``forward`` (deep supervision included)."""
    return network(x)


class TrainingView(nn.Module):
    """What training calls (and DistributedDataParallel wraps): the family's training heads for windows
    ``(B, C, *roi)``; a slice-wise 2D network sees ``(B, C, H, W)`` and its heads get the slice axis back."""

    def __init__(self, network: nn.Module, slice_wise: bool = False) -> None:
        super().__init__()
        self.network = network
        self.slice_wise = slice_wise
        self.heads = family_of(network).training_heads

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if not self.slice_wise:
            return self.heads(self.network, x)
        heads = self.heads(self.network, x[..., 0])
        if isinstance(heads, Tensor):
            return heads.unsqueeze(-1)
        return [head.unsqueeze(-1) for head in heads]


class LogitsModule(nn.Module):
    """A network seen as ``x -> full-resolution logits``: the default module a family exports."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: Tensor) -> Tensor:
        return full_resolution_logits(self.network, x)


@dataclass(frozen=True)
class Family:
    name: str  # short, lower case: "factorizer"
    title: str  # for people: "Factorizer (NMF)"
    classes: Mapping[str, type]
    upstream: tuple[UpstreamFormat, ...] = ()
    knobs: Mapping[str, Knob] = field(default_factory=dict)
    prepare: Callable[[nn.Module], nn.Module] = _unchanged
    export_module: Callable[[nn.Module], nn.Module] = LogitsModule
    components: ComponentCapture | None = None  # (network, block names) -> context yielding recorders
    training_heads: Callable[[nn.Module, Tensor], Tensor | Sequence[Tensor]] = all_heads

    def set_knobs(self, network: nn.Module, knobs: Mapping[str, int]) -> None:
        """Apply inference knobs; one the family does not have is a ``ConfigError`` naming the option."""
        for name, value in knobs.items():
            knob = self.knob(name)
            if value < knob.minimum:
                raise ConfigError(f"{knob.option} must be at least {knob.minimum}, got {value}")
            knob.apply(network, value)

    def knob(self, name: str) -> Knob:
        if name not in self.knobs:
            option = "--" + name.replace("_", "-")
            have = ", ".join(k.option for k in self.knobs.values()) or "none"
            raise ConfigError(f"{option} does not apply to {self.title} models (their inference options: "
                              f"{have}); leave it out")
        return self.knobs[name]

    def knob_values(self, networks: Sequence[nn.Module]) -> dict[str, list[int]]:
        """Every knob's values over ``networks`` (sorted, distinct): what an export records."""
        return {name: sorted({v for n in networks for v in knob.read(n)}) for name, knob in self.knobs.items()}

    def capture_components(self, network: nn.Module, blocks: Sequence[str] | None) -> AbstractContextManager:
        if self.components is None:
            raise ConfigError(f"{self.title} models have no NMF component maps (--components works with "
                              "Factorizer models); leave --components out")
        return self.components(network, blocks)


_FAMILIES: dict[str, Family] = {}
_OWNER: dict[str, Family] = {}  # class name -> the family that registered it


def register(family: Family) -> Family:
    """Add a family; a name or class name already taken is an error (two meanings for one word)."""
    if family.name in _FAMILIES:
        raise ConfigError(f"architecture family {family.name!r} is registered twice")
    taken = [n for n in family.classes if n in _OWNER]
    if taken:
        raise ConfigError(f"family {family.name!r} registers class names already taken: {', '.join(taken)}")
    _FAMILIES[family.name] = family
    _OWNER.update(dict.fromkeys(family.classes, family))
    return family


def unregister(name: str) -> None:
    """Remove a family (tests register throw-away families)."""
    family = _FAMILIES.pop(name)
    for cls in family.classes:
        _OWNER.pop(cls, None)


def family_of(config: Mapping[str, Any] | nn.Module) -> Family:
    """The family of a network description (by its top ``class``) or of a built network."""
    if isinstance(config, nn.Module):
        name = type(config).__name__
        family = _OWNER.get(name)
        if family is None or family.classes[name] is not type(config):
            raise ConfigError(f"{name} belongs to no registered architecture family")
        return family
    name = config.get("class") if isinstance(config, Mapping) else None
    if name not in _OWNER:
        raise ConfigError(f"network class {name!r} belongs to no architecture family; known classes: "
                          f"{', '.join(sorted(_OWNER))}")
    return _OWNER[name]


def all_classes() -> dict[str, type]:
    """Every class a description may name, whichever family registered it: a Factorizer's stem is a
    ``Conv3d`` of the plain-layers family."""
    return {name: family.classes[name] for name, family in _OWNER.items()}


def resolve(value: Any, path: str = "config") -> Any:
    """Turn nested ``{"class": ...}`` dicts into ``(class, kwargs)`` tuples (a bare class if no kwargs).

    This is the seed API's convention: a nested class receives its remaining arguments from the
    network that uses it.
    """
    if isinstance(value, dict):
        if "class" in value:
            cls = _lookup(value["class"], path)
            kwargs = {k: resolve(v, f"{path}.{k}") for k, v in value.items() if k != "class"}
            return (cls, kwargs) if kwargs else cls
        return {k: resolve(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def build(config: Mapping[str, Any]) -> nn.Module:
    """Instantiate the network described by ``config`` (``{"class": NAME, **kwargs}``)."""
    if not isinstance(config, Mapping) or "class" not in config:
        raise ConfigError('a network description must be a dict with a "class" key')
    cls = _lookup(config["class"], "config")
    kwargs = {k: resolve(v, f"config.{k}") for k, v in config.items() if k != "class"}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError, AssertionError) as err:  # arguments the classes do not take
        raise ConfigError(f"cannot build {config['class']}: {err}") from err


def read_upstream(checkpoint: Any, model: nn.Module, source: Any = "checkpoint") -> dict[str, Tensor]:
    """Our state dict for ``model`` from an upstream checkpoint of its family, in any known format."""
    family = family_of(model)
    for fmt in family.upstream:
        if fmt.detect(checkpoint):
            return fmt.state_dict(checkpoint, model)
    known = ", ".join(f.name for f in family.upstream) or "none"
    raise CheckpointError(f"{source}: not a {family.title} checkpoint in a known format ({known})")


def upstream_config(checkpoint: Any) -> dict[str, Any] | None:
    """The network description an upstream checkpoint carries, from the first format that has one."""
    for family in _FAMILIES.values():
        for fmt in family.upstream:
            if fmt.detect(checkpoint):
                config = fmt.config(checkpoint)
                if config is not None:
                    return config
    return None


def _lookup(name: Any, path: str) -> type:
    classes = all_classes()
    if name not in classes:
        raise ConfigError(f"unknown class {name!r} at {path}; expected one of: {', '.join(sorted(classes))}")
    return classes[name]
