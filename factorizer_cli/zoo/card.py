"""Model cards: everything a model needs besides its weights, in one JSON file.

The card is the single place where a model's preprocessing facts live (input modalities, spacing, ROI,
overlap), how to read its outputs (activation, channel meaning, the label map rebuilt from them), and
its network as data (``{"class": ...}``, see ``factorizer_cli.nn.config``). The CLI and the Python API
read the same card.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from ..errors import ConfigError

ACTIVATIONS = ("sigmoid", "softmax")
ROLES = ("segmentation", "initialisation")
# Names become folder and file names in the cache: no separators, no "..", nothing hidden.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]*")


@dataclass(frozen=True)
class Modality:
    """One input channel: canonical name (BraTS 2023 / ISLES naming) and the names users also write."""

    name: str
    aliases: tuple[str, ...] = ()
    description: str = ""

    def matches(self, text: str) -> bool:
        text = text.lower()
        return text == self.name.lower() or text in (a.lower() for a in self.aliases)

    @property
    def spec(self) -> tuple[str, tuple[str, ...]]:
        """``(name, aliases)``, the form ``factorizer_cli.io`` takes."""
        return self.name, self.aliases


@dataclass(frozen=True)
class LabelRule:
    """Paint ``label`` where output ``region`` is on. Rules are painted in order, later ones on top."""

    region: str
    label: int


NORMALIZATIONS = ("zscore_nonzero", "fixed", "window", "percentile")


@dataclass(frozen=True)
class Normalization:
    """How intensities are scaled, per channel, after the geometric steps.

    - ``zscore_nonzero``: minus the mean, over the std, both over the channel's nonzero voxels; zeros
      stay zero (skull-stripped MRI: BraTS, ISLES).
    - ``fixed``: ``(x - mean) / std`` with constants of the training set (SPiN on ATLAS).
    - ``window``: clipped to ``[low, high]`` and scaled to ``[0, 1]`` (CT in HU, e.g. -125..275).
    - ``percentile``: the ``low`` and ``high`` percentiles (over nonzero voxels) go to 0 and 1, clipped.
    """

    kind: str = "zscore_nonzero"
    mean: float | None = None
    std: float | None = None
    low: float | None = None
    high: float | None = None

    def problems(self) -> list[str]:
        if self.kind not in NORMALIZATIONS:
            return [f"normalization kind must be one of {NORMALIZATIONS}, got {self.kind!r}"]
        needs = {"fixed": ("mean", "std"), "window": ("low", "high"), "percentile": ("low", "high")}
        missing = [f for f in needs.get(self.kind, ()) if getattr(self, f) is None]
        if missing:
            return [f"normalization {self.kind!r} needs {' and '.join(missing)}"]
        if self.kind == "fixed" and not self.std > 0:
            return [f"normalization std must be positive, got {self.std}"]
        if self.kind in ("window", "percentile") and not self.low < self.high:
            return [f"normalization {self.kind!r} needs low < high, got {self.low}, {self.high}"]
        if self.kind == "percentile" and not (0 <= self.low and self.high <= 100):
            return ["normalization percentiles must lie in [0, 100]"]
        return []

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def describe(self) -> str:
        """For people, on a few words (``factorizer models info``)."""
        if self.kind == "zscore_nonzero":
            return "z-score over nonzero voxels"
        if self.kind == "fixed":
            return f"(x − {self.mean:g}) / {self.std:g}"
        return f"{'window' if self.kind == 'window' else 'percentiles'} {self.low:g}..{self.high:g} → 0..1"


@dataclass(frozen=True)
class Preprocessing:
    """The steps from a case's images to the network's input, in this order (see ``pipeline.preprocess``).

    ``orientation``: ``"RAS"`` (reorient to the closest RAS axes) or ``None`` (keep the stored axes).
    ``spacing``: target mm per axis after reorientation; ``None`` on an axis keeps the native spacing
    there (slice-wise 2D models keep their slices). ``crop_margin_mm``: crop to the nonzero voxels
    plus this margin; ``None`` does not crop. ``slice_context``: ``None`` for a 3D network; ``k`` for a
    2D network that sees each slice of the last axis with ``k`` neighbours on either side as extra
    channels (windows of size ``[H, W, 1]``; neighbours beyond the volume are 0 after normalization).
    ``register``: ``None``, or the name of a template (``"mni152-2009a"``) the reference modality is
    affinely registered to before the other steps, every modality then on the template's grid with
    its intensities scaled to the template's (``atlas.registration``); outputs go back through the
    inverse transform. Such a card normally keeps RAS (the template's own axes), no crop and 1 mm.
    """

    spacing: tuple[float | None, ...]
    orientation: str | None = "RAS"
    crop_margin_mm: float | None = 10.0
    normalization: Normalization = Normalization()
    slice_context: int | None = None
    register: str | None = None

    def problems(self) -> list[str]:
        problems = list(self.normalization.problems())
        if len(self.spacing) != 3 or any(s is not None and not s > 0 for s in self.spacing):
            problems.append("spacing needs 3 positive values (or null to keep an axis native)")
        if self.orientation not in ("RAS", None):
            problems.append(f"orientation must be \"RAS\" or null, got {self.orientation!r}")
        if self.crop_margin_mm is not None and self.crop_margin_mm < 0:
            problems.append(f"crop margin must be >= 0 mm, got {self.crop_margin_mm}")
        if self.slice_context is not None and self.slice_context < 0:
            problems.append(f"slice_context must be >= 0, got {self.slice_context}")
        if self.register is not None:  # the names only: nothing is read, nilearn is not needed here
            from ..atlas.template import TEMPLATES

            if not isinstance(self.register, str) or self.register not in TEMPLATES:
                problems.append(f"register must be null or one of {', '.join(TEMPLATES)}, got {self.register!r}")
        return problems

    @classmethod
    def from_card(cls, data: Mapping[str, Any]) -> Preprocessing:
        """From a card's ``preprocessing`` block, or from the first cards' top-level ``spacing`` and
        ``crop_margin_mm`` (which mean: RAS, that spacing, that crop, z-score over nonzero voxels)."""
        block = data.get("preprocessing")
        if block is None:
            return cls(spacing=tuple(float(s) for s in data["spacing"]),
                       crop_margin_mm=float(data.get("crop_margin_mm", 10.0)))
        crop = block.get("crop_foreground", {"margin_mm": 10.0})
        return cls(
            spacing=tuple(None if s is None else float(s) for s in block["spacing"]),
            orientation=block.get("orientation", "RAS"),
            crop_margin_mm=None if crop is None else float(crop.get("margin_mm", 10.0)),
            normalization=Normalization(**block.get("normalization", {})),
            slice_context=block.get("slice_context"),
            register=block.get("register"),
        )

    def describe(self) -> str:
        """The steps on one line, for people (``factorizer models info``)."""
        spacing = ("native spacing" if all(s is None for s in self.spacing) else
                   "spacing " + " × ".join("native" if s is None else f"{s:g}" for s in self.spacing) + " mm")
        parts = [f"affine registration to {self.register}"] if self.register is not None else []
        parts += [
            "RAS" if self.orientation == "RAS" else "stored axes",
            spacing,
            "no crop" if self.crop_margin_mm is None else f"crop to foreground + {self.crop_margin_mm:g} mm",
            self.normalization.describe(),
        ]
        if self.slice_context is not None:
            parts.append(f"2D slices with {self.slice_context} neighbours each side")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"register": self.register} if self.register is not None else {}
        data |= {
            "orientation": self.orientation,
            "spacing": list(self.spacing),
            "crop_foreground": None if self.crop_margin_mm is None else {"margin_mm": self.crop_margin_mm},
            "normalization": self.normalization.to_dict(),
        }
        if self.slice_context is not None:
            data["slice_context"] = self.slice_context
        return data


@dataclass(frozen=True)
class ModelCard:
    name: str
    task: str
    modalities: tuple[Modality, ...]
    preprocessing: Preprocessing
    roi: tuple[int, ...]
    outputs: tuple[str, ...]
    labels: tuple[LabelRule, ...]
    architecture: Mapping[str, Any]
    activation: str = "sigmoid"
    threshold: float = 0.5
    overlap: float = 0.5
    description: str = ""
    license: str = ""
    citation: str = ""
    provenance: str = ""
    label_conventions: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    label_names: Mapping[str, str] = field(default_factory=dict)
    weights: tuple[Mapping[str, Any], ...] = ()
    metrics: Mapping[str, Any] = field(default_factory=dict)
    # "segmentation", or "initialisation": pretrained weights (Semantic Genesis) that only start a
    # training (`train --init`); `segment` refuses them, their outputs being no label map
    role: str = "segmentation"

    def __post_init__(self) -> None:
        problems = []
        if self.role not in ROLES:
            problems.append(f"role must be one of {ROLES}, got {self.role!r}")
        if not SAFE_NAME.fullmatch(self.name) or ".." in self.name:
            problems.append("name must be letters, digits, '.', '_', '-' or '=' (it names cache folders)")
        for entry in self.weights:
            for key in ("file", "filename"):
                if key in entry and (not SAFE_NAME.fullmatch(str(entry[key])) or ".." in str(entry[key])):
                    problems.append(f"weight {key} {entry[key]!r} must be a plain file name")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        problems += self.preprocessing.problems()
        if len(self.roi) != 3 or any(r < 1 for r in self.roi):
            problems.append("roi needs 3 positive values")
        if self.slice_wise and self.roi[-1] != 1:
            problems.append(f"a slice-wise model (slice_context) takes windows [H, W, 1], got roi {list(self.roi)}")
        if not 0 <= self.overlap < 1:
            problems.append(f"overlap must be in [0, 1), got {self.overlap}")
        unknown = [r.region for r in self.labels if r.region not in self.outputs]
        if unknown:
            problems.append(f"labels refer to unknown outputs {unknown}; outputs are {list(self.outputs)}")
        if problems:
            raise ConfigError(f"model card {self.name!r}: " + "; ".join(problems))

    @property
    def slice_wise(self) -> bool:
        """Whether the network is 2D, run slice by slice with neighbouring slices as channels."""
        return self.preprocessing.slice_context is not None

    @property
    def in_channels(self) -> int:
        """Channels of the network input: the modalities, times the slices a slice-wise model sees."""
        context = self.preprocessing.slice_context
        return len(self.modalities) * (1 if context is None else 2 * context + 1)

    @property
    def modality_specs(self) -> list[tuple[str, tuple[str, ...]]]:
        return [m.spec for m in self.modalities]

    def label_rules(self, convention: str | None = None) -> list[LabelRule]:
        """The painting rules, with a named convention's relabelling (e.g. ``brats2021``: ET is 4)."""
        if convention is None:
            return list(self.labels)
        if convention not in self.label_conventions:
            known = ", ".join(sorted(self.label_conventions)) or "none"
            raise ConfigError(f"model {self.name!r} has no label convention {convention!r} (known: {known})")
        relabel = self.label_conventions[convention]
        return [LabelRule(r.region, relabel.get(r.region, r.label)) for r in self.labels]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        try:
            return cls(
                name=data["name"],
                task=data.get("task", ""),
                modalities=tuple(
                    Modality(m["name"], tuple(m.get("aliases", ())), m.get("description", ""))
                    for m in data["inputs"]
                ),
                preprocessing=Preprocessing.from_card(data),
                roi=tuple(int(r) for r in data["roi"]),
                outputs=tuple(data["outputs"]),
                labels=tuple(LabelRule(r["region"], int(r["label"])) for r in data["labels"]),
                architecture=data["architecture"],
                activation=data.get("activation", "sigmoid"),
                threshold=float(data.get("threshold", 0.5)),
                overlap=float(data.get("overlap", 0.5)),
                description=data.get("description", ""),
                license=data.get("license", ""),
                citation=data.get("citation", ""),
                provenance=data.get("provenance", ""),
                label_conventions=dict(data.get("label_conventions", {})),
                label_names=dict(data.get("label_names", {})),
                weights=tuple(data.get("weights", ())),
                metrics=dict(data.get("metrics", {})),
                role=data.get("role", "segmentation"),
            )
        except KeyError as err:
            raise ConfigError(f"model card is missing the field {err.args[0]!r}") from None
        except TypeError as err:  # e.g. an unknown key in the normalization block
            raise ConfigError(f"model card {data.get('name', '?')!r}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.role == "segmentation":  # the default: cards (and package hashes) stay as they were
            del data["role"]
        data["inputs"] = data.pop("modalities")
        data["preprocessing"] = self.preprocessing.to_dict()
        return data

    @classmethod
    def load(cls, path: str | Path | Traversable) -> ModelCard:
        """Read a card from a file (or an installed resource)."""
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: cannot read the model card ({err})") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

