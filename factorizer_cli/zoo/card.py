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


@dataclass(frozen=True)
class ModelCard:
    name: str
    task: str
    modalities: tuple[Modality, ...]
    spacing: tuple[float, ...]
    roi: tuple[int, ...]
    outputs: tuple[str, ...]
    labels: tuple[LabelRule, ...]
    architecture: Mapping[str, Any]
    activation: str = "sigmoid"
    threshold: float = 0.5
    overlap: float = 0.5
    crop_margin_mm: float = 10.0
    description: str = ""
    license: str = ""
    citation: str = ""
    provenance: str = ""
    label_conventions: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    label_names: Mapping[str, str] = field(default_factory=dict)
    weights: tuple[Mapping[str, Any], ...] = ()
    metrics: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if not SAFE_NAME.fullmatch(self.name) or ".." in self.name:
            problems.append("name must be letters, digits, '.', '_', '-' or '=' (it names cache folders)")
        for entry in self.weights:
            for key in ("file", "filename"):
                if key in entry and (not SAFE_NAME.fullmatch(str(entry[key])) or ".." in str(entry[key])):
                    problems.append(f"weight {key} {entry[key]!r} must be a plain file name")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not (len(self.spacing) == len(self.roi) == 3):
            problems.append("spacing and roi need 3 values each")
        if not 0 <= self.overlap < 1:
            problems.append(f"overlap must be in [0, 1), got {self.overlap}")
        unknown = [r.region for r in self.labels if r.region not in self.outputs]
        if unknown:
            problems.append(f"labels refer to unknown outputs {unknown}; outputs are {list(self.outputs)}")
        if problems:
            raise ConfigError(f"model card {self.name!r}: " + "; ".join(problems))

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
                spacing=tuple(float(s) for s in data["spacing"]),
                roi=tuple(int(r) for r in data["roi"]),
                outputs=tuple(data["outputs"]),
                labels=tuple(LabelRule(r["region"], int(r["label"])) for r in data["labels"]),
                architecture=data["architecture"],
                activation=data.get("activation", "sigmoid"),
                threshold=float(data.get("threshold", 0.5)),
                overlap=float(data.get("overlap", 0.5)),
                crop_margin_mm=float(data.get("crop_margin_mm", 10.0)),
                description=data.get("description", ""),
                license=data.get("license", ""),
                citation=data.get("citation", ""),
                provenance=data.get("provenance", ""),
                label_conventions=dict(data.get("label_conventions", {})),
                label_names=dict(data.get("label_names", {})),
                weights=tuple(data.get("weights", ())),
                metrics=dict(data.get("metrics", {})),
            )
        except KeyError as err:
            raise ConfigError(f"model card is missing the field {err.args[0]!r}") from None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"] = data.pop("modalities")
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

