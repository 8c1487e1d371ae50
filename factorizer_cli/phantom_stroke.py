"""Procedural clinical T1 scans with chronic stroke lesions, on the real anatomy of the MNI152 template.

Real ATLAS scans cannot ship with the tool, so the SPiN demo model is trained and checked on these. A
phantom is one T1 volume and a binary lesion map (0 background, 1 lesion) on the grid of a clinical
scan, built in four steps:

* anatomy: the MNI152 2009a template (``atlas.template``: 197×233×189, 1 mm, skull-stripped), inside a
  head drawn around it: a CSF gap, a skull of dark cortical bone with brighter marrow, and scalp
  (a thin muscle layer, then fat), each of random, smoothly varying thickness. Why not keep the
  background at 0: clinical T1 scans are not skull-stripped, and what the tool does to them first
  (affine registration to the template by mutual information, sampled on the template's brain grown by
  a few mm, then intensities matched on the brain median: ``atlas.registration``) is built for a scalp
  around the brain; a stripped phantom would make registration easier than real scans make it.
* lesions: 1 to 3 chronic infarcts, T1-hypointense (CSF-like cavity, partial volume at the edge and a
  mildly dark gliotic halo), irregular (smoothed noise bending a rotated ellipsoid, as the glioma
  phantoms do), inside the brain mask. Cortical ones are centred a few mm below the brain surface (a
  distance-to-surface map) and reach it; subcortical ones sit deep, away from the ventricles. Sizes
  run from a few voxels (lacunes) to tens of cm³ (territorial infarcts); about a third of the cases
  hold small lesions only (at most ~4 mm radius), so small-lesion metrics have data.
* a clinical grid: the head at a random rigid pose in scanner coordinates (rotation up to 15° about a
  random axis, shift up to 20 mm), a voxel size from those of clinical T1 protocols (1 mm isotropic,
  0.9×0.9×3, 1×1×5, ...), axial, sagittal or coronal slices stored in the axis order and signs DICOM
  converters write, the slices square to the scanner, planned along the head, or oblique, and a field
  of view that covers the head. The image is resampled linearly with a box slice profile (samples 1 mm
  apart across a thick slice are averaged, as a slice of that thickness integrates the tissue); the
  label map takes nearest-neighbour samples at the same points and marks the voxels the lesion fills
  at least half (on 1 mm grids: plain nearest neighbour), so a lesion thinner than a slice is
  labelled only where the image shows it.
* the scanner: a smooth multiplicative bias field, Rician noise (also in the air), and a random global
  scale, stored as int16 (scanners share no intensity scale; the registration step rescales).

Geometry: ``affine`` maps the grid's voxels to scanner RAS millimetres, and ``pose`` maps template RAS
millimetres to scanner millimetres, so the template point ``p`` lies at ``pose @ p`` in the phantom's
world: a lesion's centroid on the template grid, moved by ``pose``, is its centroid on the clinical grid
(tested). Image and label share one grid and one affine, so they line up in world space as read.

Everything is drawn from ``numpy.random.default_rng([seed, index, step])``, one stream per step (head,
grid, lesions, scanner): case ``index`` of ``seed`` is the same on every machine, and a change to one
step leaves the others' draws alone. Generation is pure (arrays in, arrays out); ``write_case`` does the
I/O. One case takes about a second on two cores (the template's distance maps, once per process: 0.4 s).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from . import phantom
from .atlas.template import MNI152_2009A, template, template_path
from .io import geometry

MODALITY = "t1"  # the ATLAS / SPiN input (the atlas-spin card lists t1 among the names of t1n)
LESION = 1
WHITE = 220.0  # white matter on the template's 0..255 scale: the reference of every contrast below
SMALL_RADIUS_MM = (1.2, 4.0)  # lacunes and small emboli: a few voxels to ~270 mm³
MEDIUM_RADIUS_MM = (4.0, 12.0)
LARGE_RADIUS_MM = (12.0, 26.0)  # territorial infarcts: ~7 to ~75 cm³ before clipping to the brain
MAX_DEEP_RADIUS_MM = 15.0  # deep (striatocapsular) infarcts stay below ~15 cm³
SMALL_ONLY_SHARE = 0.3  # cases that hold small lesions only
MAX_TILT_DEG = 15.0  # the head's rotation in the scanner
MAX_SHIFT_MM = 20.0
# Clinical T1 voxel sizes (mm, in-plane, in-plane, slice) and how often each is drawn.
VOXEL_SIZES = (((1.0, 1.0, 1.0), 0.3), ((0.9, 0.9, 3.0), 0.25), ((1.0, 1.0, 5.0), 0.2),
               ((0.8, 0.8, 4.0), 0.1), ((1.2, 1.2, 1.2), 0.15))
# Directions of the array axes i, j, k in scanner RAS as converters write them (k: the slice axis).
_PLANES = {
    "axial (DICOM)": ((-1, 0, 0), (0, -1, 0), (0, 0, 1)),  # i to the left, j posterior
    "axial (RAS)": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
    "sagittal": ((0, -1, 0), (0, 0, -1), (1, 0, 0)),
    "coronal": ((-1, 0, 0), (0, 0, -1), (0, 1, 0)),
}
_PLANE_ODDS = (0.4, 0.2, 0.2, 0.2)
_STREAMS = {"head": 0, "grid": 1, "lesions": 2, "scanner": 3}


@dataclass(frozen=True)
class Lesion:
    """One drawn infarct, before the clinical grid: where and how large it is on the template."""

    centre_mm: tuple[float, float, float]  # template RAS mm
    radius_mm: float  # the radius of a sphere of the drawn ellipsoid's volume (before irregularity)
    kind: str  # "cortical" or "subcortical"
    voxels: int  # 1 mm template voxels it covers (its own, before lesions merge)


@dataclass(frozen=True)
class StrokePhantom:
    t1: np.ndarray  # int16 on the clinical grid
    labels: np.ndarray  # uint8 on the same grid: 0 background, 1 lesion
    affine: np.ndarray  # clinical voxel (i, j, k) → scanner RAS mm
    pose: np.ndarray  # template RAS mm → scanner RAS mm (the head's rigid pose)
    truth: np.ndarray  # uint8 lesion map on the template grid, which ``labels`` samples
    lesions: tuple[Lesion, ...]
    protocol: str  # e.g. "axial (DICOM) 0.9×0.9×3.0 mm, planned": how the grid was drawn


@dataclass(frozen=True)
class _Anatomy:
    """Template maps that every case shares (computed once per process)."""

    image: np.ndarray  # float32 0..255 (read-only)
    affine: np.ndarray
    brain: np.ndarray  # bool
    depth2: np.ndarray  # mm below the brain surface on every 2nd voxel (0 outside the brain)
    tissue2: np.ndarray  # bool on every 2nd voxel: brain tissue (not ventricles or sulcal CSF)
    outside: np.ndarray  # signed mm from the closed brain surface (the inner skull), positive outside
    centre_mm: np.ndarray  # the brain's centroid (template RAS mm): the head turns about it


def case_id(seed: int, index: int) -> str:
    """``STROKE-PHT-SSSSS-III``: BraTS-style folder naming, which every layout reader here understands."""
    return f"STROKE-PHT-{seed:05d}-{index:03d}"


@lru_cache(maxsize=1)
def _anatomy(name: str = MNI152_2009A) -> _Anatomy:
    """Distances are computed on every second voxel (a 2 mm grid) and, for the head, interpolated back:
    an eighth of the work, and smooth layers are all they are used for."""
    atlas = template(name)
    image, brain = atlas.array, atlas.array > 0
    brain2 = brain[::2, ::2, ::2]
    depth2 = (ndimage.distance_transform_edt(brain2) * 2.0).astype(np.float32)
    tissue2 = brain2 & (image[::2, ::2, ::2] > 0.6 * WHITE)
    # The inner skull follows the brain's envelope, not its sulci: close the mask by a blur.
    closed = ndimage.gaussian_filter(brain2.astype(np.float32), 1.5) > 0.3
    signed2 = 2.0 * (ndimage.distance_transform_edt(~closed) - ndimage.distance_transform_edt(closed))
    outside = _upsample(signed2.astype(np.float32), image.shape)
    centre_mm = atlas.affine[:3, :3] @ (2.0 * np.argwhere(brain2).mean(0)) + atlas.affine[:3, 3]
    return _Anatomy(image, atlas.affine.copy(), brain, depth2, tissue2, outside, centre_mm)


def _upsample(coarse: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A map sampled on every second voxel back on the full grid (trilinear; voxel 0 stays voxel 0)."""
    grid = torch.from_numpy(coarse)[None, None]
    full = F.interpolate(grid, size=tuple(2 * (n - 1) + 1 for n in coarse.shape), mode="trilinear",
                         align_corners=True)[0, 0]
    return full[tuple(slice(0, n) for n in shape)].numpy()


# ----------------------------------------------------------------------------------------- the head


def _head(rng: np.random.Generator, anatomy: _Anatomy) -> np.ndarray:
    """The template inside a drawn head: CSF gap, skull (bone, marrow, bone), scalp (muscle, fat)."""
    shape = anatomy.image.shape
    distance = anatomy.outside * (1 + 0.12 * phantom.smooth_noise(rng, shape, 6))
    texture = phantom.smooth_noise(rng, shape, 40)
    csf, skull, scalp = rng.uniform(1.5, 3.0), rng.uniform(5.0, 8.0), rng.uniform(4.0, 8.0)
    level = {name: WHITE * rng.uniform(lo, hi) for name, lo, hi in (
        ("csf", 0.30, 0.40), ("bone", 0.04, 0.10), ("marrow", 0.45, 0.70), ("muscle", 0.35, 0.50),
        ("fat", 0.95, 1.12))}
    head = np.zeros(shape, np.float32)
    head[distance < csf + skull + scalp] = level["fat"]
    head[distance < csf + skull + 0.25 * scalp] = level["muscle"]
    head[distance < csf + skull] = level["bone"]
    in_skull = (distance - csf) / skull
    head[(in_skull > 0.3) & (in_skull < 0.7)] = level["marrow"]
    head[distance < csf] = level["csf"]
    head *= 1 + 0.08 * texture
    return np.where(anatomy.brain, anatomy.image, head)


# -------------------------------------------------------------------------------------------- lesions


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rotation by ``degrees`` about ``axis`` (Rodrigues)."""
    axis = axis / np.linalg.norm(axis)
    angle = math.radians(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def _random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    return _rotation(rng.standard_normal(3), rng.uniform(0, max_degrees))


def _radii(rng: np.random.Generator, small_only: bool, min_radius: float) -> list[float]:
    """Equivalent radii (mm) of 1 to 3 lesions, log-uniform within small, medium or large bands."""
    count = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    bands = [SMALL_RADIUS_MM] * count if small_only else [
        (SMALL_RADIUS_MM, MEDIUM_RADIUS_MM, LARGE_RADIUS_MM)[rng.choice(3, p=[0.35, 0.4, 0.25])]
        for _ in range(count)]
    return [float(np.exp(rng.uniform(np.log(max(lo, min_radius)), np.log(max(hi, min_radius)))))
            for lo, hi in bands]


def _centre(rng: np.random.Generator, anatomy: _Anatomy, radius: float, cortical: bool) -> np.ndarray:
    """A voxel (float indices) in brain tissue at a depth that suits the kind and size of lesion."""
    if cortical:  # a few mm deep, so the lesion reaches the surface and the white matter below
        low, high = 1.0 + 0.1 * radius, 3.0 + 0.45 * radius
    else:
        low, high = min(8.0 + 0.8 * radius, 30.0), 60.0
    candidates = np.flatnonzero((anatomy.depth2 >= low) & (anatomy.depth2 <= high) & anatomy.tissue2)
    voxel = np.array(np.unravel_index(candidates[rng.integers(len(candidates))], anatomy.depth2.shape))
    return 2.0 * voxel + rng.uniform(-1, 1, 3)


def _lesion_mask(rng: np.random.Generator, anatomy: _Anatomy, centre: np.ndarray,
                 radius: float) -> tuple[tuple[slice, ...], np.ndarray]:
    """An irregular rotated ellipsoid around ``centre``, clipped to the brain: its box and mask there."""
    ratios = np.exp(rng.uniform(-0.35, 0.35, 3))
    radii = radius * ratios / np.prod(ratios) ** (1 / 3)  # same volume as the sphere of ``radius``
    amplitude = rng.uniform(0.15, 0.35)
    reach = radii.max() * (1 + 3 * amplitude) + 1
    shape = anatomy.brain.shape
    box = tuple(slice(max(0, int(c - reach)), min(n, int(c + reach) + 2)) for c, n in zip(centre, shape))
    offsets = np.stack(np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) - np.float32(c)
                                     for s, c in zip(box, centre)], indexing="ij"), -1)
    turn = _random_rotation(rng, 180.0).astype(np.float32)
    local = offsets @ turn / radii.astype(np.float32)  # the ellipsoid's own axes, unit radius
    size = tuple(s.stop - s.start for s in box)
    bumps = 1 + amplitude * phantom.smooth_noise(rng, size, max(2, round(max(size) / max(radius, 2.0))))
    mask = (np.linalg.norm(local, axis=-1) < bumps) & anatomy.brain[box]
    pieces, count = ndimage.label(mask, np.ones((3, 3, 3)))
    if count > 1:  # one infarct, one piece: islands cut off by the bumps or the brain's edge go
        mask = pieces == 1 + np.argmax(np.bincount(pieces.ravel())[1:])
    return box, mask


def _draw_lesions(rng: np.random.Generator, anatomy: _Anatomy,
                  min_radius: float) -> tuple[np.ndarray, list[tuple[Lesion, tuple[slice, ...], np.ndarray]]]:
    """The lesion map on the template grid and each lesion with its box and mask."""
    truth = np.zeros(anatomy.brain.shape, np.uint8)
    drawn = []
    small_only = rng.uniform() < SMALL_ONLY_SHARE
    for radius in _radii(rng, small_only, min_radius):
        cortical = rng.uniform() < (0.8 if radius > LARGE_RADIUS_MM[0] else 0.45)
        if not cortical:
            radius = min(radius, MAX_DEEP_RADIUS_MM)
        centre = _centre(rng, anatomy, radius, cortical)
        box, mask = _lesion_mask(rng, anatomy, centre, radius)
        truth[box][mask] = LESION
        centre_mm = anatomy.affine[:3, :3] @ centre + anatomy.affine[:3, 3]
        record = Lesion(tuple(float(v) for v in centre_mm), radius, "cortical" if cortical else "subcortical",
                        int(mask.sum()))
        drawn.append((record, box, mask))
    return truth, drawn


def _darken(rng: np.random.Generator, image: np.ndarray, anatomy: _Anatomy,
            drawn: list[tuple[Lesion, tuple[slice, ...], np.ndarray]]) -> None:
    """Chronic infarct contrast, in place: each lesion pulled toward a CSF-like level (a cavity) over its
    whole extent, with a partial-volume fall-off just outside its edge and a mildly dark gliotic halo
    a few mm wide."""
    shape = image.shape
    for _, box, mask in drawn:
        pad = 6
        outer = tuple(slice(max(0, s.start - pad), min(n, s.stop + pad)) for s, n in zip(box, shape))
        local = np.zeros(tuple(s.stop - s.start for s in outer), np.float32)
        local[tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(box, outer))] = mask
        severity = rng.uniform(0.8, 1.0)
        edge = np.maximum(local, phantom._blur(local, 0.7))  # whole inside (small ones too), soft outside
        weight = np.maximum(severity * edge, rng.uniform(0.1, 0.25) * phantom._blur(local, 2.0))
        weight *= 1 + 0.08 * phantom.smooth_noise(rng, local.shape, max(2, max(local.shape) // 4))
        weight = np.where(anatomy.brain[outer], weight.clip(0, 1), 0)
        cavity = WHITE * rng.uniform(0.26, 0.36)
        image[outer] = image[outer] * (1 - weight) + cavity * weight


# ------------------------------------------------------------------------------------ clinical grid


def _clinical_grid(rng: np.random.Generator, anatomy: _Anatomy,
                   head_points: np.ndarray) -> tuple[tuple[int, ...], np.ndarray, np.ndarray, str]:
    """The grid's shape, its affine, the head's pose (template mm → scanner mm) and a description.

    ``head_points``: template voxel indices (3 × N) of the head, which the field of view must cover.
    """
    tilt = _random_rotation(rng, MAX_TILT_DEG)
    shift = rng.standard_normal(3)
    shift *= MAX_SHIFT_MM * rng.uniform() ** (1 / 3) / np.linalg.norm(shift)  # uniform in the ball
    pose = np.eye(4)
    pose[:3, :3] = tilt
    pose[:3, 3] = anatomy.centre_mm + shift - tilt @ anatomy.centre_mm
    sizes, odds = zip(*VOXEL_SIZES)
    voxel = np.array(sizes[rng.choice(len(sizes), p=odds)])
    voxel[:2] *= rng.uniform(0.95, 1.05)  # the in-plane size follows the field of view and matrix
    plane = list(_PLANES)[rng.choice(len(_PLANES), p=_PLANE_ODDS)]
    axes = np.array(_PLANES[plane], np.float64).T  # columns: directions of i, j, k
    if rng.uniform() < 0.5:
        axes[:, 2] *= -1  # slices stored in the other order
    planning = str(rng.choice(["square to the scanner", "planned along the head", "oblique"], p=[0.35, 0.4, 0.25]))
    if planning == "planned along the head":
        axes = tilt @ _random_rotation(rng, 5.0) @ axes
    elif planning == "oblique":
        axes = _random_rotation(rng, 20.0) @ axes
    # The field of view: the head's box in the grid's own axes, with a random margin.
    scanner = pose[:3, :3] @ (anatomy.affine[:3, :3] @ head_points + anatomy.affine[:3, 3:4]) + pose[:3, 3:4]
    along = axes.T @ scanner
    low = along.min(1) - rng.uniform(0, 15, 3)
    high = along.max(1) + rng.uniform(0, 15, 3)
    shape = tuple(int(n) for n in np.ceil((high - low) / voxel) + 1)
    affine = np.eye(4)
    affine[:3, :3] = axes * voxel
    affine[:3, 3] = axes @ low
    protocol = f"{plane} {'×'.join(f'{v:.2g}' for v in voxel)} mm, {planning}"
    return shape, affine, pose, protocol


def _resample(volume: np.ndarray, out_to_in: np.ndarray, shape: tuple[int, ...], nearest: bool,
              supersample: int = 1) -> np.ndarray:
    """``volume`` sampled at ``out_to_in @ (i, j, k, 1)`` for each voxel of ``shape`` (0 outside).

    With ``supersample`` n > 1 each output voxel averages n samples spread evenly across its extent
    along k: the box profile of a slice n input voxels thick (float32 out; for a label map, the
    fraction of the voxel it fills).
    """
    if supersample > 1:
        fine = np.diag([1.0, 1.0, 1.0 / supersample, 1.0])
        fine[2, 3] = (1.0 / supersample - 1) / 2  # fine sample m lies at k = (m + 0.5) / n - 0.5
        samples = _resample(volume, out_to_in @ fine, (*shape[:2], shape[2] * supersample), nearest)
        return samples.reshape(*shape, supersample).mean(-1, dtype=np.float32)
    return geometry.resample_voxels(volume, out_to_in, shape, nearest)


def template_to_grid(volume: np.ndarray, case: StrokePhantom, nearest: bool = True,
                     name: str = MNI152_2009A) -> np.ndarray:
    """A map on the template grid (e.g. ``brain_mask()``) onto ``case``'s clinical grid, through its pose:
    nearest neighbour (dtype kept; bool becomes uint8) or linear (float32)."""
    anatomy = _anatomy(name)
    out_to_in = np.linalg.inv(anatomy.affine) @ np.linalg.inv(case.pose) @ case.affine
    dtype = (np.uint8 if volume.dtype == bool else volume.dtype) if nearest else np.float32
    return _resample(volume.astype(dtype), out_to_in, case.labels.shape, nearest)


# -------------------------------------------------------------------------------------------- a case


def generate(seed: int, index: int = 0, name: str = MNI152_2009A) -> StrokePhantom:
    """Case ``index`` of the stroke phantom series ``seed``: same numbers on every machine.

    Raises ``ConfigError`` (naming the extra to install) when the template is not installed.
    """
    template_path(name)  # the one-line error for a missing nilearn, even when the anatomy is cached
    anatomy = _anatomy(name)
    streams = {key: np.random.default_rng([seed, index, stream]) for key, stream in _STREAMS.items()}
    image = _head(streams["head"], anatomy)
    head_points = np.argwhere(image[::3, ::3, ::3] > 0).T * 3.0  # template voxels, thinned
    shape, affine, pose, protocol = _clinical_grid(streams["grid"], anatomy, head_points)
    out_to_in = np.linalg.inv(anatomy.affine) @ np.linalg.inv(pose) @ affine
    thickness = float(np.linalg.norm(affine[:3, 2]))
    samples = max(1, round(thickness))  # per slice, 1 mm apart: the template's resolution
    # A lesion thinner than half a slice fills no voxel to half; draw again if none does.
    for _ in range(10):
        truth, drawn = _draw_lesions(streams["lesions"], anatomy, min_radius=0.5 * thickness)
        labels = _resample(truth, out_to_in, shape, nearest=True, supersample=samples) >= 0.5
        if labels.any():
            break
    _darken(streams["lesions"], image, anatomy, drawn)
    signal = _resample(image, out_to_in, shape, nearest=False, supersample=samples)
    rng = streams["scanner"]
    signal *= np.exp(rng.uniform(0.08, 0.2) * phantom.smooth_noise(rng, shape, 3))  # receive-coil bias
    sigma = np.float32(WHITE * rng.uniform(0.015, 0.045))
    noisy = np.hypot(signal + sigma * rng.standard_normal(shape, np.float32),
                     sigma * rng.standard_normal(shape, np.float32))
    scale = rng.uniform(300, 2500) / WHITE  # white matter lands anywhere in 300..2500 scanner units
    t1 = np.rint(noisy * scale).clip(0, np.iinfo(np.int16).max).astype(np.int16)
    return StrokePhantom(t1, labels.astype(np.uint8), affine, pose, truth, tuple(r for r, _, _ in drawn), protocol)


def write_case(case: StrokePhantom, folder: str | os.PathLike[str], name: str) -> dict[str, Path]:
    """Write ``folder/name/name-{t1,seg}.nii.gz`` atomically (the glioma phantoms' writer); the paths."""
    return phantom.write_case(phantom.Phantom({MODALITY: case.t1}, case.labels, case.affine), folder, name)


def generate_dataset(folder: str | os.PathLike[str], cases: int, seed: int,
                     progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Cases ``0 .. cases-1`` of stroke series ``seed``, one folder each; returns the case folders."""
    return phantom.write_series(folder, cases, seed, lambda index: write_case(generate(seed, index), folder,
                                                                              case_id(seed, index)), case_id, progress)
