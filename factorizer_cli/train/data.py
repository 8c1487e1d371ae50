"""Training cases on the model's grid, and the random crops a training step sees.

A case goes through exactly the preprocessing of inference (``pipeline.preprocess``), and its label map
through the same geometric steps (reorient, crop, resample), so the network is trained on the grid it
will later be asked about. Labels become the card's outputs, as the card reads them back at inference
(``pipeline.postprocess``), in reverse:

- sigmoid cards: one bool channel per output region, nested (BraTS: WT ⊇ TC ⊇ ET);
- softmax cards: one channel of class indices (uint8 on the grid, int64 in a batch): the output
  channel whose class a voxel belongs to. A label value becomes the class its card rule names;
  voxels no rule names (0, or values the card does not know) are the background class, the one
  output no rule paints. Indices, not one-hot, keep a case at one byte a voxel whatever the number of
  classes; the loss makes the one-hot it needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, InputError
from ..io.cases import find_labelled_cases
from ..io.images import read_image, read_label_map
from ..pipeline.preprocess import Inverse, preprocess
from ..zoo.card import ModelCard


@dataclass(frozen=True)
class TrainingCase:
    name: str
    image: np.ndarray  # (channels, *grid) float32, normalized as at inference
    target: np.ndarray  # sigmoid: (regions, *grid) bool; softmax: (1, *grid) uint8 class indices
    foreground: np.ndarray  # (n, 3) voxel indices inside the outermost region / of a non-background class
    pad_value: int = 0  # what a crop beyond the volume's edge is: outside every region, or the background


@dataclass(frozen=True)
class Targets:
    """How a card's outputs are read off a label map: the label values of each output channel.

    ``background`` is the softmax channel of every voxel no other channel claims (``None`` for sigmoid
    regions, which may all be off).
    """

    activation: str
    outputs: tuple[str, ...]
    labels: tuple[frozenset[int], ...]  # per output channel
    background: int | None = None

    @property
    def scored(self) -> tuple[str, ...]:
        """The outputs validation scores: every region, or every class but the background."""
        return tuple(o for i, o in enumerate(self.outputs) if i != self.background)


def region_labels(card: ModelCard) -> list[set[int]]:
    """For each output region, the label values inside it (nested sigmoid regions, any convention)."""
    if card.activation != "sigmoid":
        raise ConfigError(f"model {card.name!r}: region_labels reads sigmoid region models only")
    rules = card.label_rules()
    regions = []
    for region in card.outputs:
        first = next((i for i, r in enumerate(rules) if r.region == region), None)
        if first is None:
            raise ConfigError(f"model {card.name!r}: output {region!r} has no label rule; add one to the card")
        values = {r.label for r in rules[first:]}
        for relabel in card.label_conventions.values():  # e.g. BraTS 2021 wrote ET as 4
            values |= {relabel.get(r.region, r.label) for r in rules[first:]}
        regions.append(values)
    return regions


def class_labels(card: ModelCard) -> tuple[list[set[int]], int]:
    """For each softmax class, the label values that are it; and the background class's index.

    The inverse of ``labels_from_probabilities``: a class is painted with its rule's label, so that
    label (and its relabelling in any named convention) is the class. The one output without a rule is
    the background.
    """
    if card.activation != "softmax":
        raise ConfigError(f"model {card.name!r}: class_labels reads softmax class models only")
    if len(card.outputs) > 255:
        raise ConfigError(f"model {card.name!r}: {len(card.outputs)} classes; training takes at most 255")
    classes: list[set[int]] = [set() for _ in card.outputs]
    for rule in card.label_rules():
        classes[card.outputs.index(rule.region)].add(rule.label)
        for relabel in card.label_conventions.values():
            classes[card.outputs.index(rule.region)].add(relabel.get(rule.region, rule.label))
    unpainted = [o for o, values in zip(card.outputs, classes) if not values]
    if len(unpainted) != 1:
        raise ConfigError(f"model {card.name!r}: a softmax card needs exactly one output without a label rule "
                          f"(the background); found {len(unpainted)}: {unpainted}")
    owner: dict[int, str] = {}
    for output, values in zip(card.outputs, classes):
        for value in values:
            if owner.setdefault(value, output) != output:
                raise ConfigError(f"model {card.name!r}: label {value} is both {owner[value]!r} and {output!r}")
    if 0 in owner:
        raise ConfigError(f"model {card.name!r}: label 0 is the unlabelled background; no rule may paint it")
    return classes, card.outputs.index(unpainted[0])


def targets_of(card: ModelCard) -> Targets:
    """The card's outputs as training targets (sigmoid regions or softmax classes)."""
    if card.activation == "softmax":
        classes, background = class_labels(card)
        return Targets("softmax", card.outputs, tuple(frozenset(c) for c in classes), background)
    return Targets("sigmoid", card.outputs, tuple(frozenset(r) for r in region_labels(card)))


def find_training_cases(folder: str | Path, card: ModelCard) -> list[tuple[str, tuple[Path, ...], Path]]:
    """(name, image files in card order, label file) of every case of a dataset folder (``io.cases``)."""
    return [(case.name, case.files, label) for case, label in find_labelled_cases(folder, card.modality_specs)]


def load_case(name: str, files: Sequence[Path], label_file: Path, card: ModelCard,
              targets: Targets) -> TrainingCase:
    images = [read_image(f) for f in files]
    prepared = preprocess(images, card.preprocessing)
    labels = read_label_map(label_file)  # an empty label map is a valid case
    if labels.shape != images[0].shape or not np.allclose(labels.affine, images[0].affine, atol=1e-3):
        raise InputError(f"{label_file}: label map is not on the grid of {files[0]}; resample it first")
    values = np.rint(labels.array).astype(np.int64)
    if targets.background is not None:
        target = class_indices(values, targets, prepared.inverse)
        foreground = np.argwhere(target[0] != targets.background)
        pad_value = targets.background
    else:
        target = np.stack([np.isin(values, sorted(r)) for r in targets.labels]).astype(np.float32)
        target = prepared.inverse.apply(target) > 0.5  # the image's own steps, replayed
        foreground = np.argwhere(target[0])
        pad_value = 0
    if len(foreground) > 20000:
        foreground = foreground[:: len(foreground) // 20000]
    return TrainingCase(name, prepared.array, target, foreground, pad_value)


def class_indices(values: np.ndarray, targets: Targets, steps: Inverse) -> np.ndarray:
    """``(1, *grid)`` uint8 class indices on the network grid: each class's one-hot channel goes through
    the image's steps (linear where they resample) and the largest wins, one channel at a time so that
    a case with many classes never holds them all at once."""
    claimed = np.isin(values, sorted(set().union(*targets.labels)))
    best = winner = None
    for index, labels in enumerate(targets.labels):
        mask = ~claimed if index == targets.background else np.isin(values, sorted(labels))
        channel = steps.apply(mask[None].astype(np.float32))[0]
        if best is None:
            best, winner = channel, np.full(channel.shape, index, np.uint8)
        else:
            better = channel > best  # ties keep the earlier class
            best = np.where(better, channel, best)
            winner[better] = index
    return winner[None]


def _crop(array: np.ndarray, start: Sequence[int], roi: Sequence[int], value: int = 0) -> np.ndarray:
    """``array[:, start : start + roi]`` as a new array, padded with ``value`` past the volume's far edges.

    Reads only the box (a memory-mapped array reads only the pages it touches), never the whole volume.
    """
    box = (slice(None), *(slice(s, min(s + r, n)) for s, r, n in zip(start, roi, array.shape[1:])))
    crop = np.array(array[box])
    pad = [(0, 0)] + [(0, r - n) for r, n in zip(roi, crop.shape[1:])]
    return np.pad(crop, pad, constant_values=value) if any(p[1] for p in pad) else crop


def sample_batch(cases: Sequence[TrainingCase], roi: Sequence[int], batch_size: int,
                 foreground_fraction: float, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ROI crops, a ``foreground_fraction`` of them centred on a labelled voxel.

    A volume smaller than the ROI along an axis is padded at its far end (the image with 0, the target
    with the case's pad value). Cases may be in memory or memory-mapped (``cache.CachedCase``): only
    the crops are read. Targets come as float regions (sigmoid) or int64 class indices
    ``(B, 1, *roi)`` (softmax).
    """
    images, targets = [], []
    for _ in range(batch_size):
        case = cases[rng.integers(len(cases))]
        image, target, foreground = case.image, case.target, case.foreground
        shape = np.maximum(np.array(image.shape[1:]), roi)  # the padded volume's
        if len(foreground) and rng.random() < foreground_fraction:
            centre = np.asarray(foreground[rng.integers(len(foreground))])
            start = np.clip(centre - np.array(roi) // 2, 0, shape - roi)
        else:
            start = np.array([rng.integers(0, n - r + 1) for n, r in zip(shape, roi)])
        images.append(_crop(image, start, roi))
        targets.append(_crop(target, start, roi, case.pad_value))
        del image, target, foreground  # a memory map is let go as soon as its crop is read
    target = torch.from_numpy(np.stack(targets))
    return torch.from_numpy(np.stack(images)), target.float() if target.dtype == torch.bool else target.long()


def augment(image: torch.Tensor, target: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror flips, per-channel intensity scale and shift on the brain, a little noise."""
    for axis in range(2, image.dim()):
        if rng.random() < 0.5:
            image, target = image.flip(axis), target.flip(axis)
    shape = (image.shape[0], image.shape[1]) + (1,) * (image.dim() - 2)
    scale = torch.from_numpy(rng.uniform(0.9, 1.1, shape).astype(np.float32))
    shift = torch.from_numpy(rng.uniform(-0.1, 0.1, shape).astype(np.float32))
    brain = (image != 0).float()
    image = image * scale + shift * brain
    if rng.random() < 0.2:
        noise = torch.from_numpy(rng.standard_normal(image.shape, dtype=np.float32))
        image = image + 0.05 * noise * brain
    return image.contiguous(), target.contiguous()
