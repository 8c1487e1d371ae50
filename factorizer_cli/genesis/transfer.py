"""``train --init``: start a network from pretrained weights, transferring what fits.

The weights may come from a model package (``pretrain``'s ``RUN/model``, or ``RUN`` itself; any
``train`` output), a zoo name or ``hf://`` reference (``semantic-genesis-chest-ct``: downloaded and
converted as ``segment`` would), or a checkpoint file: ``.safetensors``, or a pickled upstream
checkpoint read with the restricted unpickler into our keys by the card's network family (Semantic
Genesis / Models Genesis: ``{"state_dict": {"module.<key>": ...}, ...}``, see ``families.genesis``),
else its plain ``state_dict`` with any ``module.`` prefix stripped.

What is transferred (``plan``): each tensor of the network's state dict (weights and BatchNorm
statistics) whose name is in the checkpoint with the same shape is copied. One more case is
*inflated*: a convolution pretrained on one input channel, the network's taking ``C`` (the first
convolution of a U-Net pretrained on T1 alone, fine-tuned on four modalities) gets the pretrained
kernel in every channel, divided by ``C``; an input whose ``C`` channels are equal then gives exactly
the pretrained response (``Σ_c W/C · x = W · x``), so the network starts where pretraining left it,
and the channels differentiate during fine-tuning. Everything else keeps the values the network was
built with (seeded as for a run from scratch): e.g. a final 1×1 convolution to another number of
outputs. The checkpoint's tensors the network has no place for are left out, e.g. Semantic Genesis'
classification head ``clc_out.*``, which upstream's fine-tuning drops too.

When less than ``MIN_SHARE`` of the network's parameters (counted in numbers, not tensors) would be
transferred, the start is refused with one line: the checkpoint is of another architecture or width
(a Factorizer card given a U-Net, a UNet3D of base width 16 given one of 32), and training from it
would silently be training from scratch. The module is not Genesis-specific; it lives here because
pretraining is its first user.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from ..families import read_upstream
from ..safe_pickle import load_checkpoint
from ..zoo.package import CARD_FILE

MIN_SHARE = 0.5  # of the network's parameters that must be transferred
PRETRAIN_MODEL = "model"  # the package inside a ``pretrain`` run folder
_PREFIXES = ("module.",)  # nn.DataParallel's, on upstream files
_SHOWN = 3  # names listed per line of the summary


@dataclass(frozen=True)
class Transfer:
    """What ``plan`` found: which of the network's tensors come from the checkpoint, and how."""

    source: str
    network: str  # the network's class
    copied: tuple[str, ...]
    inflated: tuple[tuple[str, int, int], ...]  # (name, channels pretrained, channels now)
    kept: tuple[tuple[str, str], ...]  # (name, why): left as the network was built
    unused: tuple[str, ...]  # the checkpoint's tensors the network has no place for
    share: float  # of the network's parameters (numbers) transferred

    @property
    def transferred(self) -> int:
        return len(self.copied) + len(self.inflated)

    def summary(self) -> list[str]:
        """The transfer for people, a line per kind."""
        total = self.transferred + len(self.kept)
        lines = [f"initialised from {self.source}: {self.transferred} of {total} tensors of the {self.network} "
                 f"({self.share:.2%} of its parameters)"]
        for name, before, now in self.inflated:
            lines.append(f"inflated {name} from {before} to {now} input channels (divided by {now}: equal "
                         "channels give the pretrained response)")
        if self.kept:
            lines.append(f"not transferred, kept as initialised ({len(self.kept)}): "
                         + _listed([f"{name} ({why})" for name, why in self.kept]))
        if self.unused:
            groups: dict[str, int] = {}
            for name in self.unused:
                groups[name.split(".")[0]] = groups.get(name.split(".")[0], 0) + 1
            lines.append(f"left out of the checkpoint ({len(self.unused)}, no place in the {self.network}): "
                         + _listed([f"{g}.* ({n})" for g, n in groups.items()]))
        return lines


def _listed(items: list[str]) -> str:
    more = len(items) - _SHOWN
    return ", ".join(items[:_SHOWN]) + (f", and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class Initialisation:
    """Pretrained weights named by ``--init``: ``weights`` (our keys) or an unpickled upstream
    ``checkpoint`` whose keys the network's family maps; ``architecture`` their network's class if known."""

    source: str
    weights: Mapping[str, Tensor] | None = None
    checkpoint: Any = None
    architecture: str | None = None

    def weights_for(self, network: nn.Module) -> dict[str, Tensor]:
        """The checkpoint's tensors under the network's names (nothing loaded yet)."""
        if self.weights is not None:
            return dict(self.weights)
        try:
            return read_upstream(self.checkpoint, network, self.source)
        except CheckpointError:
            plain = _plain_state_dict(self.checkpoint)
            if plain is None:
                raise
            return plain

    def plan(self, network: nn.Module) -> tuple[Transfer, dict[str, Tensor]]:
        """What would be transferred into ``network`` (which may live on the meta device), and the
        tensors to load; ``ConfigError`` when too little fits (see the module)."""
        return plan_transfer(network, self.weights_for(network), self.source, self.architecture)

    def apply(self, network: nn.Module) -> Transfer:
        """Load the transferable tensors into ``network`` (in place); the report."""
        transfer, tensors = self.plan(network)
        network.load_state_dict(tensors, strict=False)
        return transfer


def plan_transfer(network: nn.Module, weights: Mapping[str, Tensor], source: str,
                  architecture: str | None = None) -> tuple[Transfer, dict[str, Tensor]]:
    """Match ``weights`` to ``network``'s state dict by name and shape (and inflate one-channel inputs);
    the report and the tensors to load. ``ConfigError`` below ``MIN_SHARE``."""
    target = network.state_dict()
    parameters = {name: p.numel() for name, p in network.named_parameters()}
    copied, inflated, kept, tensors = [], [], [], {}
    for name, value in target.items():
        pretrained = weights.get(name)
        if pretrained is None:
            kept.append((name, "not in the checkpoint"))
        elif tuple(pretrained.shape) == tuple(value.shape):
            tensors[name] = pretrained.detach().to(value.dtype)
            copied.append(name)
        elif _inflatable(pretrained, value):
            channels = value.shape[1]
            tensors[name] = (pretrained.detach().to(value.dtype).repeat(1, channels, *[1] * (value.dim() - 2))
                             / channels)
            inflated.append((name, 1, channels))
        else:
            kept.append((name, f"{tuple(value.shape)} here, {tuple(pretrained.shape)} there"))
    unused = tuple(k for k in weights if k not in target)
    total = sum(parameters.values())
    share = sum(parameters.get(name, 0) for name in tensors) / total if total else 0.0
    transfer = Transfer(source, type(network).__name__, tuple(copied), tuple(inflated), tuple(kept), unused, share)
    if share < MIN_SHARE:
        of = f"the {architecture} of " if architecture else ""
        raise ConfigError(
            f"--init {source}: only {share:.0%} of the {transfer.network}'s parameters ({transfer.transferred} of "
            f"{len(target)} tensors) match {of}the checkpoint by name and shape, at least {MIN_SHARE:.0%} must; "
            "start from weights of the card's architecture at the same width (e.g. a UNet3D card for a "
            "Semantic Genesis U-Net)")
    return transfer, tensors


def _inflatable(pretrained: Tensor, value: Tensor) -> bool:
    """A convolution kernel pretrained on one input channel, the network's on several."""
    return (pretrained.dim() >= 3 and pretrained.dim() == value.dim() and pretrained.shape[1] == 1
            and value.shape[1] > 1 and pretrained.shape[0] == value.shape[0]
            and tuple(pretrained.shape[2:]) == tuple(value.shape[2:]))


def _plain_state_dict(checkpoint: Any) -> dict[str, Tensor] | None:
    """A checkpoint's tensors by name, from the checkpoint itself or its usual keys; prefixes stripped."""
    for candidate in (checkpoint, *(checkpoint.get(k) for k in ("state_dict", "model", "model_state_dict")
                                    if isinstance(checkpoint, Mapping))):
        if isinstance(candidate, Mapping) and candidate and all(
                isinstance(k, str) and isinstance(v, Tensor) for k, v in candidate.items()):
            out = {}
            for key, value in candidate.items():
                for prefix in _PREFIXES:
                    key = key[len(prefix):] if key.startswith(prefix) else key
                out[key] = value
            return out
    return None


def load_initialisation(spec: str | Path, *, accept_license: bool = False, offline: bool = False) -> Initialisation:
    """The weights ``--init`` names: a model folder (or a ``pretrain`` run folder), a checkpoint file,
    a zoo name or ``hf://ORG/REPO``. A zoo model whose licence is not permissive needs ``accept_license``
    (``LicenseError``), as for ``segment``."""
    from ..zoo.registry import zoo_names
    from ..zoo.resolve import resolve_model

    text = str(spec)
    path = Path(text)
    if path.is_dir() and not (path / CARD_FILE).is_file() and (path / PRETRAIN_MODEL / CARD_FILE).is_file():
        path = path / PRETRAIN_MODEL  # a pretrain run folder: its package
    if path.is_file():
        if path.suffix.lower() == ".safetensors":
            try:
                return Initialisation(text, weights=load_file(path))
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
        return Initialisation(text, checkpoint=load_checkpoint(path))
    if not (path.is_dir() or text.startswith("hf://") or text in zoo_names()):
        raise ConfigError(f"--init {text}: not a model folder, a pretrain run, a checkpoint file, hf://ORG/REPO "
                          f"or a zoo name ({', '.join(zoo_names())})")
    package = resolve_model(path if path.is_dir() else text, offline=offline, accept_license=accept_license).package
    folds = package.state_dicts()
    label = text if len(folds) == 1 else f"{text} (fold 0 of {len(folds)})"
    return Initialisation(label, weights=folds[0][1], architecture=str(package.card.architecture.get("class")))
