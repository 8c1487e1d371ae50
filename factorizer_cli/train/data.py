"""Training cases on the model's grid, and the random crops a training step sees.

A case goes through exactly the preprocessing of inference (``pipeline.preprocess``), and its label map
through the same geometric steps (reorient, crop, resample), so the network is trained on the grid it
will later be asked about. Labels become the card's output regions (BraTS: WT, TC, ET).
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
from ..pipeline.preprocess import preprocess
from ..zoo.card import ModelCard


@dataclass(frozen=True)
class TrainingCase:
    name: str
    image: np.ndarray  # (channels, *grid) float32, z-scored as at inference
    target: np.ndarray  # (regions, *grid) bool
    foreground: np.ndarray  # (n, 3) voxel indices inside the outermost region, subsampled


def region_labels(card: ModelCard) -> list[set[int]]:
    """For each output region, the label values inside it (nested sigmoid regions, any convention)."""
    if card.activation != "sigmoid":
        raise ConfigError(f"model {card.name!r}: training supports sigmoid region models only")
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


def find_training_cases(folder: str | Path, card: ModelCard) -> list[tuple[str, tuple[Path, ...], Path]]:
    """(name, image files in card order, label file) of every case of a dataset folder (``io.cases``)."""
    return [(case.name, case.files, label) for case, label in find_labelled_cases(folder, card.modality_specs)]


def load_case(name: str, files: Sequence[Path], label_file: Path, card: ModelCard,
              regions: list[set[int]]) -> TrainingCase:
    images = [read_image(f) for f in files]
    prepared = preprocess(images, card.preprocessing)
    labels = read_label_map(label_file)  # an empty label map is a valid case
    if labels.shape != images[0].shape or not np.allclose(labels.affine, images[0].affine, atol=1e-3):
        raise InputError(f"{label_file}: label map is not on the grid of {files[0]}; resample it first")
    values = np.rint(labels.array).astype(np.int64)
    target = np.stack([np.isin(values, sorted(r)) for r in regions]).astype(np.float32)
    target = prepared.inverse.apply(target) > 0.5  # the image's own steps, replayed
    foreground = np.argwhere(target[0])
    if len(foreground) > 20000:
        foreground = foreground[:: len(foreground) // 20000]
    return TrainingCase(name, prepared.array, target, foreground)


def _pad_to(array: np.ndarray, roi: Sequence[int]) -> np.ndarray:
    pad = [(0, 0)] + [(0, max(0, r - n)) for r, n in zip(roi, array.shape[1:])]
    return np.pad(array, pad) if any(p[1] for p in pad) else array


def sample_batch(cases: Sequence[TrainingCase], roi: Sequence[int], batch_size: int,
                 foreground_fraction: float, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ROI crops, a ``foreground_fraction`` of them centred on a labelled voxel."""
    images, targets = [], []
    for _ in range(batch_size):
        case = cases[rng.integers(len(cases))]
        image, target = _pad_to(case.image, roi), _pad_to(case.target, roi)
        shape = np.array(image.shape[1:])
        if len(case.foreground) and rng.random() < foreground_fraction:
            centre = case.foreground[rng.integers(len(case.foreground))]
            start = np.clip(centre - np.array(roi) // 2, 0, shape - roi)
        else:
            start = np.array([rng.integers(0, n - r + 1) for n, r in zip(shape, roi)])
        box = (slice(None), *(slice(s, s + r) for s, r in zip(start, roi)))
        images.append(image[box])
        targets.append(target[box])
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(targets)).float()


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
