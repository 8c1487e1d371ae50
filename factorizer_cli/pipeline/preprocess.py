"""From the images on disk to the network's input, recording how to go back.

Each step is a pure function returning its result and a record; the records, last in first out, form
the ``Inverse`` that takes anything computed on the network's grid (probabilities, labels, NMF maps)
back onto the voxels of the reference input, so nothing lands in the wrong place::

    co-grid (onto the first modality) → reorient to RAS → crop to the foreground → resample to the
    model spacing → z-score each channel over its nonzero voxels

The reference image (the first modality) defines the output geometry; it is never resampled itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..io import geometry
from ..io.images import Image, check_image

GRID_ATOL_MM = 1e-3  # affines closer than this (mm) are the same grid


@dataclass(frozen=True)
class Reorientation:
    back: np.ndarray

    def invert(self, array: np.ndarray, fill: float = 0.0) -> np.ndarray:
        return geometry.from_canonical(array, self.back)


@dataclass(frozen=True)
class Crop:
    box: tuple[slice, ...]
    shape: tuple[int, ...]

    def invert(self, array: np.ndarray, fill: float = 0.0) -> np.ndarray:
        out = np.full((array.shape[0], *self.shape), fill, dtype=array.dtype)
        out[(slice(None), *self.box)] = array
        return out


@dataclass(frozen=True)
class Resampling:
    shape: tuple[int, ...]  # before

    def invert(self, array: np.ndarray, fill: float = 0.0) -> np.ndarray:
        return geometry.resample_linear(array, self.shape)


@dataclass
class Inverse:
    """The applied steps, in order; ``invert`` undoes them last to first."""

    steps: list[Reorientation | Crop | Resampling] = field(default_factory=list)

    def invert(self, array: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Map a channel-first array on the network grid back onto the reference image's grid.

        ``fill`` is the value outside the cropped region (0 for probabilities and maps).
        """
        for step in reversed(self.steps):
            array = step.invert(array, fill)
        return np.ascontiguousarray(array)


@dataclass
class Prepared:
    """The network input (channel-first, float32) and the way back to the reference grid."""

    array: np.ndarray
    inverse: Inverse
    reference: Image
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # spent reading and preprocessing


def co_grid(images: Sequence[Image]) -> tuple[list[np.ndarray], list[str]]:
    """The images' voxels on the first image's grid; others are resampled there (and it is said)."""
    reference, notes = images[0], []
    volumes = [reference.array]
    ref_lo, ref_hi = geometry.world_bounds(reference.array.shape, reference.affine)
    for image in images[1:]:
        same_shape = image.array.shape == reference.array.shape
        if same_shape and np.allclose(image.affine, reference.affine, atol=GRID_ATOL_MM):
            volumes.append(image.array)
            continue
        lo, hi = geometry.world_bounds(image.array.shape, image.affine)
        overlap = np.minimum(hi, ref_hi) - np.maximum(lo, ref_lo)
        if (overlap <= 0).any():
            raise InputError(
                f"{image.path}: does not overlap {reference.path} in space (no common voxels); "
                "the modalities of a case must be co-registered"
            )
        volumes.append(geometry.resample_to_grid(image.array, image.affine, reference.array.shape,
                                                 reference.affine))
        notes.append(f"resampled {image.path.name} onto the grid of {reference.path.name}")
    return volumes, notes


def foreground_box(array: np.ndarray, margin: Sequence[int]) -> tuple[slice, ...]:
    """Bounding box of the voxels nonzero in any channel, grown by ``margin`` voxels per axis."""
    mask = (array != 0).any(axis=0)
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        lo, hi = int(hit[0]) - margin[axis], int(hit[-1]) + 1 + margin[axis]
        box.append(slice(max(lo, 0), min(hi, mask.shape[axis])))
    return tuple(box)


def zscore_nonzero(array: np.ndarray) -> np.ndarray:
    """Each channel minus its mean, over its std, both over the channel's nonzero voxels; zeros stay."""
    out = np.zeros_like(array, dtype=np.float32)
    for c, channel in enumerate(array):
        mask = channel != 0
        values = channel[mask].astype(np.float64)
        if values.size == 0:
            continue
        std = values.std()
        out[c][mask] = ((values - values.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
    return out


def preprocess(
    images: Sequence[Image],
    spacing: Sequence[float],
    crop_margin_mm: float = 10.0,
) -> Prepared:
    """Bring a case's modalities (first one is the reference) onto the model's grid."""
    for image in images:
        check_image(image)
    reference = images[0]
    volumes, notes = co_grid(images)
    inverse = Inverse()

    array, affine, back = geometry.to_canonical(np.stack(volumes).astype(np.float32, copy=False),
                                                reference.affine)
    inverse.steps.append(Reorientation(back))

    here = geometry.voxel_spacing(affine)
    margin = [math.ceil(crop_margin_mm / s) for s in here]
    box = foreground_box(array, margin)
    inverse.steps.append(Crop(box, tuple(array.shape[1:])))
    array = array[(slice(None), *box)]

    target = np.asarray(spacing, dtype=float)
    if not np.allclose(here, target, rtol=1e-3):
        shape = tuple(max(1, round(n * s / t)) for n, s, t in zip(array.shape[1:], here, target))
        inverse.steps.append(Resampling(tuple(array.shape[1:])))
        array = geometry.resample_linear(np.ascontiguousarray(array), shape)
    return Prepared(zscore_nonzero(array), inverse, reference, notes)
