"""From the images on disk to the network's input, recording how to go back.

Each step is a pure function returning its result and a record; the records, last in first out, form
the ``Inverse`` that takes anything computed on the network's grid (probabilities, labels, NMF maps)
back onto the voxels of the reference input, so nothing lands in the wrong place::

    co-grid (onto the first modality) → (atlas models) register to the template → reorient to RAS →
    crop to the foreground → resample to the model spacing → normalize intensities → (slice-wise
    models) neighbouring slices as channels

The card's ``Preprocessing`` says which of these run and how. Each geometric step is a record that
can ``apply`` itself (to a label map, for training) and ``invert`` itself (for the outputs). The
reference image (the first modality) defines the output geometry; it is never resampled itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..atlas.registration import Registration, match_template_scale
from ..errors import InputError
from ..io import geometry
from ..io.images import Image, check_image
from ..zoo.card import Normalization, Preprocessing

GRID_ATOL_MM = 1e-3  # affines closer than this (mm) are the same grid


@dataclass(frozen=True)
class Reorientation:
    """Axes flipped and permuted to the closest RAS directions (no interpolation)."""

    affine: np.ndarray  # the grid before
    back: np.ndarray  # the orientation that undoes it

    @classmethod
    def fit(cls, affine: np.ndarray, shape: Sequence[int]) -> tuple[Reorientation, np.ndarray]:
        """The step for an image on ``affine``, and the affine after it."""
        _, after, back = geometry.to_canonical(np.zeros((1, *shape), np.uint8), affine)
        return cls(affine, back), after

    def apply(self, array: np.ndarray) -> np.ndarray:
        return geometry.to_canonical(array, self.affine)[0]

    def invert(self, array: np.ndarray, fill: float = 0.0) -> np.ndarray:
        return geometry.from_canonical(array, self.back)


@dataclass(frozen=True)
class Crop:
    """A box of the grid (the foreground and its margin)."""

    box: tuple[slice, ...]
    shape: tuple[int, ...]  # before

    def apply(self, array: np.ndarray) -> np.ndarray:
        return array[(slice(None), *self.box)]

    def invert(self, array: np.ndarray, fill: float = 0.0) -> np.ndarray:
        out = np.full((array.shape[0], *self.shape), fill, dtype=array.dtype)
        out[(slice(None), *self.box)] = array
        return out


@dataclass(frozen=True)
class Resampling:
    """The same field of view on another number of voxels (corner-aligned, linear)."""

    shape: tuple[int, ...]  # before
    target: tuple[int, ...]  # after

    def apply(self, array: np.ndarray) -> np.ndarray:
        return geometry.resample_linear(np.ascontiguousarray(array, dtype=np.float32), self.target)

    def invert(self, array: np.ndarray, fill: float = 0.0) -> np.ndarray:
        return geometry.resample_linear(array, self.shape)


Step = Reorientation | Crop | Resampling | Registration


@dataclass
class Inverse:
    """The geometric steps applied to a case, in order: ``apply`` replays them on another array of the
    same grid (a label map, as one-hot channels), ``invert`` undoes them last to first."""

    steps: list[Step] = field(default_factory=list)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """A channel-first array on the reference grid, brought onto the network grid.

        Resampling is linear: give labels as one-hot (or region) channels and threshold at 0.5.
        """
        for step in self.steps:
            array = step.apply(array)
        return np.ascontiguousarray(array)

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


def normalize(array: np.ndarray, how: Normalization) -> np.ndarray:
    """Scale intensities as the card says (see ``Normalization``); float32, channel-first."""
    if how.kind == "zscore_nonzero":
        return zscore_nonzero(array)
    if how.kind == "fixed":
        return ((array - np.float32(how.mean)) / np.float32(how.std)).astype(np.float32)
    if how.kind == "window":
        low, high = how.low, how.high
    else:  # percentile, per channel over its nonzero voxels
        out = np.zeros_like(array, dtype=np.float32)
        for c, channel in enumerate(array):
            values = channel[channel != 0]
            if values.size:
                low, high = np.percentile(values, [how.low, how.high])
                out[c] = _window(channel, low, high)
        return out
    return _window(array, low, high)


def _window(array: np.ndarray, low: float, high: float) -> np.ndarray:
    scale = np.float32(1.0 / (high - low)) if high > low else np.float32(0.0)
    scaled = (array.astype(np.float32, copy=False) - np.float32(low)) * scale
    return np.clip(scaled, 0.0, 1.0, out=scaled)  # clipped after scaling: exactly 0 and 1 at the ends


def stack_slices(array: np.ndarray, context: int) -> np.ndarray:
    """Each slice of the last axis with ``context`` neighbours on either side, as channels.

    ``(C, I, J, K)`` becomes ``(C·(2k+1), I, J, K)``, channel ``c·(2k+1) + j`` holding slice ``z + j - k``
    of channel ``c``; beyond the volume it is 0 (the normalized background). Stored slice by slice
    (the last axis slowest): one slice's stack is then one block of memory, as the sliding window
    reads it (in the usual order, reading a slice's window touched a cache line per voxel).
    """
    channels, depth = array.shape[0], array.shape[-1]
    width = 2 * context + 1
    by_slice = np.ascontiguousarray(np.moveaxis(array, -1, 1))  # (C, K, I, J)
    stacked = np.zeros((depth, channels * width, *array.shape[1:-1]), array.dtype)
    for c in range(channels):
        for j in range(width):
            shift = j - context  # slice z's channel c·width + j is slice z + shift
            first, end = max(0, -shift), min(depth, depth - shift)
            stacked[first:end, c * width + j] = by_slice[c, first + shift : end + shift]
    return np.moveaxis(stacked, 0, -1)


def target_shape(shape: Sequence[int], here: Sequence[float], spacing: Sequence[float | None]) -> tuple[int, ...]:
    """Voxels per axis at the target ``spacing`` over the same field of view.

    An axis stays as it is where the target is ``None`` or within 0.1% of the spacing it has.
    """
    return tuple(n if t is None or abs(s - t) <= 1e-3 * t else max(1, round(n * s / t))
                 for n, s, t in zip(shape, here, spacing))


def preprocess(images: Sequence[Image], steps: Preprocessing) -> Prepared:
    """Bring a case's modalities (first one is the reference) onto the model's grid, as ``steps`` say."""
    for image in images:
        check_image(image)
    reference = images[0]
    volumes, notes = co_grid(images)
    inverse = Inverse()
    array, affine = np.stack(volumes).astype(np.float32, copy=False), reference.affine

    if steps.register is not None:  # every modality moves with the reference's transform
        step = Registration.fit(reference, steps.register)
        inverse.steps.append(step)
        array, factors = match_template_scale(step.apply(array), steps.register,
                                              [str(image.path) for image in images])
        affine = step.template_affine
        notes.append(f"registered {reference.path.name} to {steps.register} (affine); intensities scaled by "
                     + ", ".join(f"{f:.3g}" for f in factors))

    if steps.orientation == "RAS":
        step, affine = Reorientation.fit(affine, array.shape[1:])
        inverse.steps.append(step)
        array = step.apply(array)

    here = geometry.voxel_spacing(affine)
    if steps.crop_margin_mm is not None:
        margin = [math.ceil(steps.crop_margin_mm / s) for s in here]
        step = Crop(foreground_box(array, margin), tuple(array.shape[1:]))
        inverse.steps.append(step)
        array = step.apply(array)

    shape = target_shape(array.shape[1:], here, steps.spacing)
    if shape != tuple(array.shape[1:]):
        step = Resampling(tuple(array.shape[1:]), shape)
        inverse.steps.append(step)
        array = step.apply(array)
    array = normalize(array, steps.normalization)
    if steps.slice_context is not None:
        array = stack_slices(array, steps.slice_context)
    return Prepared(array, inverse, reference, notes)
