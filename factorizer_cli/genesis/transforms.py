"""The self-restoration corruptions of Models Genesis / Semantic Genesis, as pure functions.

Each corruption is two functions: ``draw_<name>(shape, rng)`` draws its parameters from a NumPy
``Generator`` (the only randomness), and ``<name>(image, params)`` applies them to a ``(C, X, Y, Z)``
array and returns a new array (the input is never modified). Keeping the two apart lets tests replay
the draws upstream recorded and compare with upstream's outputs exactly, and makes a pretraining step
a function of its seed.

The facts, from fhaghighi/SemanticGenesis ``pytorch/utils/purturbation.py`` and ``data_loader.py``
(bed8d90), where upstream works on one ``(1, rows, cols, deps)`` row of its training array:

- *non-linear intensity mapping*: a cubic Bézier curve through (0, 0) and (1, 1) with two random
  control points, 100,000 samples; half the time both coordinates are sorted (a monotone map), else
  only x (an inverted map); ``np.interp`` applies it to every voxel;
- *local pixel shuffling*: 5 blocks of ``randint(1, dim // 10)`` voxels a side, at
  ``randint(0, dim - size)``; each block's voxels, read from the untouched image, are permuted;
- *in-painting*: one box of ``randint(dim // 6, dim // 3)`` a side at ``randint(3, dim - size - 3)``
  filled with uniform noise;
- *out-painting*: uniform noise everywhere but one box of ``dim - randint(3·dim // 7, 4·dim // 7)`` a side
  at ``randint(3, dim - size - 3)``, which keeps the image;
- *elastic deformation*: two uniform fields in [-1, 1), Gaussian-smoothed (σ = 8, zero outside) and
  scaled by α = 991, displace the rows and the columns (not the depth); trilinear resampling with
  mirrored borders;
- a training pair (``data_loader.luna_loader``): elastic deformation, then one of the four with
  probability 1/4 each (``CORRUPTIONS``, in upstream's order of its ``random.random()`` quarters);
  the target is the undeformed original.

Upstream's bugs are not reproduced: its in-painting writes into its input; its elastic deformation
builds the grid with ``meshgrid``'s x-y indexing, which is right only when rows == cols (here: any
shape, identical where upstream works); several channels: upstream shuffles and deforms only the first
(here: every channel alike).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, InputShapeError

__all__ = [
    "Box", "BezierMap", "Shuffle", "InPaint", "OutPaint", "Elastic", "Corruption", "CORRUPTIONS",
    "bezier_curve", "nonlinear_transformation", "local_pixel_shuffling", "image_in_painting",
    "image_out_painting", "elastic_transform", "corrupt",
    "draw_nonlinear", "draw_local_shuffling", "draw_in_painting", "draw_out_painting", "draw_elastic",
    "draw_corruption", "corruption_for",
]

CORRUPTIONS = ("local-shuffle", "non-linear", "in-paint", "out-paint")  # upstream's names, in its order
BEZIER_SAMPLES = 100_000
SHUFFLE_BLOCKS = 5
ELASTIC_ALPHA = 991.0
ELASTIC_SIGMA = 8.0
_MARGIN = 3  # in- and out-painting boxes stay this far from the border


@dataclass(frozen=True)
class Box:
    """A box of the spatial axes: ``origin`` and ``size`` in voxels, (X, Y, Z)."""

    origin: tuple[int, int, int]
    size: tuple[int, int, int]

    @property
    def slices(self) -> tuple[slice, slice, slice, slice]:
        """Index of the box in a ``(C, X, Y, Z)`` array (every channel)."""
        return (slice(None), *(slice(o, o + s) for o, s in zip(self.origin, self.size)))

    def check(self, spatial: tuple[int, ...], what: str) -> None:
        if len(self.origin) != 3 or len(self.size) != 3 or any(
                o < 0 or s < 1 or o + s > d for o, s, d in zip(self.origin, self.size, spatial)):
            raise ConfigError(f"{what}: box at {self.origin} of size {self.size} is not inside {spatial}")


@dataclass(frozen=True)
class BezierMap:
    """Two control points ``((x1, y1), (x2, y2))`` in [0, 1]² between (0, 0) and (1, 1); ``invert``:
    only x is sorted, so the map runs from 1 down to 0 (upstream's flip, drawn with probability 1/2)."""

    control: tuple[tuple[float, float], tuple[float, float]]
    invert: bool
    samples: int = BEZIER_SAMPLES


@dataclass(frozen=True)
class Shuffle:
    """Blocks and, per block, a permutation of its flattened voxels (C order): block ``b`` becomes
    ``original[box].ravel()[permutations[b]]``."""

    boxes: tuple[Box, ...]
    permutations: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class InPaint:
    """One box and its fill: box-sized, ``(X, Y, Z)`` (the same in every channel, as upstream) or ``(C, X, Y, Z)``."""

    box: Box
    fill: np.ndarray


@dataclass(frozen=True)
class OutPaint:
    """The box that keeps the image, and the fill of everything else (the image's shape)."""

    box: Box
    fill: np.ndarray


@dataclass(frozen=True)
class Elastic:
    """Uniform fields in [-1, 1) of the spatial shape, before smoothing: ``col_noise`` displaces the Y
    axis (upstream's ``dx``, drawn first), ``row_noise`` the X axis (its ``dy``)."""

    col_noise: np.ndarray
    row_noise: np.ndarray
    alpha: float = ELASTIC_ALPHA
    sigma: float = ELASTIC_SIGMA


@dataclass(frozen=True)
class Corruption:
    """A training input's corruption: an optional elastic deformation, then one of ``CORRUPTIONS``."""

    kind: str
    params: BezierMap | Shuffle | InPaint | OutPaint
    elastic: Elastic | None = None


def _spatial(image: np.ndarray) -> tuple[int, int, int]:
    if not isinstance(image, np.ndarray) or image.ndim != 4:
        shape = getattr(image, "shape", None)
        raise InputShapeError(f"the corruptions take (C, X, Y, Z) arrays, got shape {shape}")
    return image.shape[1], image.shape[2], image.shape[3]


def _check_draw_shape(shape: tuple[int, ...], minimum: int, what: str) -> tuple[int, int, int]:
    if len(shape) != 4 or any(d < minimum for d in shape[1:]):
        raise InputShapeError(f"{what} needs (C, X, Y, Z) cubes with sides of at least {minimum}, got {tuple(shape)}")
    return shape[1], shape[2], shape[3]


# ------------------------------------------------------------------------------ non-linear mapping


def bezier_curve(points: np.ndarray, samples: int = BEZIER_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` points of the Bézier curve of ``points`` (n × 2), as upstream computes it: point ``i``
    weighted by C(n, i)·t^(n-i)·(1-t)^i for t in linspace(0, 1), so the curve runs from the last point
    to the first."""
    points = np.asarray(points, dtype=np.float64)
    n = len(points) - 1
    t = np.linspace(0.0, 1.0, samples)
    basis = np.array([math.comb(n, i) * t ** (n - i) * (1 - t) ** i for i in range(n + 1)])
    return np.dot(points[:, 0], basis), np.dot(points[:, 1], basis)


def nonlinear_transformation(image: np.ndarray, params: BezierMap) -> np.ndarray:
    """Every voxel mapped through the Bézier intensity curve (values outside [0, 1] clamp to its ends)."""
    _spatial(image)
    (x1, y1), (x2, y2) = params.control
    xvals, yvals = bezier_curve(np.array([[0.0, 0.0], [x1, y1], [x2, y2], [1.0, 1.0]]), params.samples)
    xvals = np.sort(xvals)
    if not params.invert:
        yvals = np.sort(yvals)
    return np.interp(image, xvals, yvals).astype(image.dtype, copy=False)


def draw_nonlinear(rng: np.random.Generator) -> BezierMap:
    x1, y1, x2, y2, flip = rng.random(5)
    return BezierMap(((float(x1), float(y1)), (float(x2), float(y2))), invert=bool(flip < 0.5))


# ------------------------------------------------------------------------------ local pixel shuffling


def local_pixel_shuffling(image: np.ndarray, params: Shuffle) -> np.ndarray:
    """Each block's voxels permuted (every channel alike); blocks read the original image, so a later
    block over an earlier one overwrites it with original voxels."""
    spatial = _spatial(image)
    if len(params.boxes) != len(params.permutations):
        raise ConfigError(f"{len(params.boxes)} shuffle blocks but {len(params.permutations)} permutations")
    out = image.copy()
    for box, permutation in zip(params.boxes, params.permutations):
        box.check(spatial, "local pixel shuffling")
        count = math.prod(box.size)
        permutation = np.asarray(permutation)
        if permutation.shape != (count,) or not np.array_equal(np.sort(permutation), np.arange(count)):
            raise ConfigError(f"local pixel shuffling: a block of {count} voxels needs a permutation of "
                              f"0..{count - 1}, got shape {permutation.shape}")
        window = image[box.slices]
        flat = window.reshape(window.shape[0], count)
        out[box.slices] = flat[:, permutation].reshape(window.shape)
    return out


def draw_local_shuffling(shape: tuple[int, ...], rng: np.random.Generator, blocks: int = SHUFFLE_BLOCKS) -> Shuffle:
    spatial = _check_draw_shape(shape, 10, "local pixel shuffling")
    boxes, permutations = [], []
    for _ in range(blocks):
        size = tuple(int(rng.integers(1, d // 10, endpoint=True)) for d in spatial)
        origin = tuple(int(rng.integers(0, d - s, endpoint=True)) for d, s in zip(spatial, size))
        boxes.append(Box(origin, size))
        permutations.append(rng.permutation(math.prod(size)))
    return Shuffle(tuple(boxes), tuple(permutations))


# ------------------------------------------------------------------------------ in- and out-painting


def image_in_painting(image: np.ndarray, params: InPaint) -> np.ndarray:
    """The box replaced by its fill; a new array (upstream writes into its input)."""
    spatial = _spatial(image)
    params.box.check(spatial, "in-painting")
    out = image.copy()
    try:
        out[params.box.slices] = params.fill
    except ValueError as err:
        raise ConfigError(f"in-painting: a fill of shape {np.shape(params.fill)} does not fit the box of size "
                          f"{params.box.size} in {image.shape[0]} channels") from err
    return out


def draw_in_painting(shape: tuple[int, ...], rng: np.random.Generator) -> InPaint:
    """Geometry first, then the fill (upstream's order); one fill per channel."""
    spatial = _check_draw_shape(shape, 9, "in-painting")
    size = tuple(int(rng.integers(d // 6, d // 3, endpoint=True)) for d in spatial)
    origin = tuple(int(rng.integers(_MARGIN, d - s - _MARGIN, endpoint=True)) for d, s in zip(spatial, size))
    return InPaint(Box(origin, size), rng.random((shape[0], *size)))


def image_out_painting(image: np.ndarray, params: OutPaint) -> np.ndarray:
    """The fill everywhere but the box, which keeps the image."""
    spatial = _spatial(image)
    params.box.check(spatial, "out-painting")
    if np.shape(params.fill) != image.shape:
        raise ConfigError(f"out-painting: the fill has shape {np.shape(params.fill)}, the image {image.shape}")
    out = np.array(params.fill, dtype=image.dtype)
    out[params.box.slices] = image[params.box.slices]
    return out


def draw_out_painting(shape: tuple[int, ...], rng: np.random.Generator) -> OutPaint:
    """The fill first, then the geometry (upstream's order)."""
    spatial = _check_draw_shape(shape, 14, "out-painting")
    fill = rng.random(tuple(shape))
    size = tuple(d - int(rng.integers(3 * d // 7, 4 * d // 7, endpoint=True)) for d in spatial)
    origin = tuple(int(rng.integers(_MARGIN, d - s - _MARGIN, endpoint=True)) for d, s in zip(spatial, size))
    return OutPaint(Box(origin, size), fill)


# ------------------------------------------------------------------------------ elastic deformation


def elastic_transform(image: np.ndarray, params: Elastic) -> np.ndarray:
    """Every channel resampled (trilinear, mirrored borders) at ``(x + dx, y + dy, z)``, the displacements
    being the smoothed, scaled noise fields. Needs SciPy (``scipy.ndimage``)."""
    spatial = _spatial(image)
    if params.col_noise.shape != spatial or params.row_noise.shape != spatial:
        raise ConfigError(f"elastic deformation: noise of shapes {params.col_noise.shape} and "
                          f"{params.row_noise.shape} for an image of spatial shape {spatial}")
    try:
        from scipy.ndimage import gaussian_filter, map_coordinates
    except ImportError as err:
        raise ConfigError("elastic deformation needs SciPy: pip install scipy") from err
    col_shift = gaussian_filter(params.col_noise, params.sigma, mode="constant", cval=0) * params.alpha
    row_shift = gaussian_filter(params.row_noise, params.sigma, mode="constant", cval=0) * params.alpha
    rows, cols, deps = np.meshgrid(*(np.arange(d) for d in spatial), indexing="ij")
    coordinates = np.stack([rows + row_shift, cols + col_shift, deps])
    out = np.empty_like(image)
    for channel in range(image.shape[0]):
        out[channel] = map_coordinates(image[channel], coordinates, order=1, mode="reflect")
    return out


def draw_elastic(shape: tuple[int, ...], rng: np.random.Generator) -> Elastic:
    if len(shape) != 4:
        raise InputShapeError(f"elastic deformation needs (C, X, Y, Z) cubes, got {tuple(shape)}")
    spatial = tuple(shape[1:])
    return Elastic(rng.random(spatial) * 2 - 1, rng.random(spatial) * 2 - 1)


# ------------------------------------------------------------------------------ a training input

_APPLY = {
    "local-shuffle": local_pixel_shuffling,
    "non-linear": nonlinear_transformation,
    "in-paint": image_in_painting,
    "out-paint": image_out_painting,
}


def corruption_for(draw: float) -> str:
    """Upstream's choice from a uniform draw: ≤ 1/4 shuffling, ≤ 1/2 non-linear, ≤ 3/4 in-, else out-painting."""
    if draw <= 0.25:
        return "local-shuffle"
    if draw <= 0.5:
        return "non-linear"
    return "in-paint" if draw <= 0.75 else "out-paint"


def draw_corruption(shape: tuple[int, ...], rng: np.random.Generator, elastic: bool = True) -> Corruption:
    """Elastic noise (if asked), the choice, then the chosen corruption's parameters."""
    deformation = draw_elastic(shape, rng) if elastic else None
    kind = corruption_for(float(rng.random()))
    if kind == "local-shuffle":
        params: BezierMap | Shuffle | InPaint | OutPaint = draw_local_shuffling(shape, rng)
    elif kind == "non-linear":
        params = draw_nonlinear(rng)
    elif kind == "in-paint":
        params = draw_in_painting(shape, rng)
    else:
        params = draw_out_painting(shape, rng)
    return Corruption(kind, params, deformation)


def corrupt(image: np.ndarray, corruption: Corruption) -> np.ndarray:
    """The network's input for the restoration target ``image`` (which is left as it is)."""
    if corruption.kind not in _APPLY:
        raise ConfigError(f"unknown corruption {corruption.kind!r}; known: {', '.join(CORRUPTIONS)}")
    x = elastic_transform(image, corruption.elastic) if corruption.elastic is not None else image
    return _APPLY[corruption.kind](x, corruption.params)
