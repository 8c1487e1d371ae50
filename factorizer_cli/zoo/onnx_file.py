"""The ``.onnx`` files that ``factorizer export-onnx`` writes: metadata names, reading, signature checks.

One module for the format, imported by the exporter (which writes it) and by the ONNX Runtime
predictor (which reads it), so neither imports the other. A file carries its model card
(``factorizer.card``), whether its output is logits or averaged probabilities, the values of its
family's inference knobs it was exported with (``factorizer.<knob>``, e.g. ``factorizer.nmf_iters``),
and, if it was verified, how closely ONNX Runtime matched PyTorch (``factorizer.verification``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, one_line
from .card import ModelCard

FORMAT_VERSION = "1"
INPUT_NAME = "image"
META_CARD, META_OUTPUT, META_FORMAT = "factorizer.card", "factorizer.output", "factorizer.format"
META_FOLDS, META_SOURCE, META_EXPORTED_BY = "factorizer.folds", "factorizer.source_sha256", "factorizer.exported_by"
META_VERIFICATION = "factorizer.verification"  # per verification input: max_abs_diff, allowed, labels_agree
KNOB_PREFIX = "factorizer."  # + a family knob's name: its values in the graph, e.g. factorizer.nmf_iters


def knob_key(name: str) -> str:
    return KNOB_PREFIX + name


@dataclass(frozen=True)
class OnnxModel:
    """An exported graph and the card it carries (or was given)."""

    card: ModelCard
    path: Path
    output: str = "logits"  # or "probabilities" (an averaged ensemble)
    metadata: dict[str, str] = field(default_factory=dict)

    def knob_values(self, name: str) -> list[int]:
        """The values of a family knob the graph was exported with (``[]`` if it does not say)."""
        try:
            return [int(v) for v in json.loads(self.metadata.get(knob_key(name), "[]"))]
        except (json.JSONDecodeError, TypeError, ValueError):
            return []


def is_onnx_path(spec: str | Path) -> bool:
    return str(spec).lower().endswith(".onnx")


def open_onnx(path: str | Path, card: ModelCard | None = None) -> OnnxModel:
    """Read an exported ``.onnx`` file's card and check its input and output against it.

    ``card`` stands in for the metadata of a graph exported elsewhere (its output taken as logits).
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a readable ONNX model ({one_line(err)}); export it again "
                              "with `factorizer export-onnx`") from None
    if not model.graph.node:
        raise CheckpointError(f"{path}: not an ONNX model (no graph); export it with `factorizer export-onnx`")
    metadata = {p.key: p.value for p in model.metadata_props}
    if card is None:
        if META_CARD not in metadata:
            raise ConfigError(f"{path}: this ONNX model has no Factorizer model card in its metadata (not "
                              "written by `factorizer export-onnx`); export it with that command, or give --card")
        try:
            card = ModelCard.from_dict(json.loads(metadata[META_CARD]))
        except (json.JSONDecodeError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{path}: the model card in its metadata is unreadable ({err})") from None
        output = metadata.get(META_OUTPUT, "logits")
    else:
        output = "logits"
    _check_signature(model.graph, card, path)
    return OnnxModel(card, path, output, metadata)


def _dims(value_info: Any) -> list[int | str]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def _check_signature(graph: Any, card: ModelCard, path: Path) -> None:
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    expected_in = [card.in_channels, *card.roi]
    expected_out = [len(card.outputs), *card.roi]
    if len(inputs) != 1 or not graph.output:
        raise ConfigError(f"{path}: the graph takes {len(inputs)} inputs and gives {len(graph.output)} outputs; "
                          "a segmentation model takes one image (batch, channels, *roi) and gives one output")
    got_in, got_out = _dims(inputs[0]), _dims(graph.output[0])
    if len(got_in) != len(expected_in) + 1 or got_in[1:] != expected_in:
        raise ConfigError(
            f"{path}: the graph's input {tuple(got_in)} does not match its model card {card.name!r}: "
            f"(batch, {card.in_channels} channels, roi {', '.join(map(str, card.roi))})")
    if len(got_out) != len(expected_out) + 1 or got_out[1:] != expected_out:
        raise ConfigError(
            f"{path}: the graph's output {tuple(got_out)} does not match its model card {card.name!r}: "
            f"(batch, {len(card.outputs)} outputs {', '.join(card.outputs)}, roi {', '.join(map(str, card.roi))})")
