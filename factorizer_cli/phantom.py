"""Procedural brain MRI cases with gliomas, in BraTS layout: data whose truth is known.

Real BraTS data cannot ship with the tool, so the demo model is trained and checked on phantoms. A
phantom is a skull-stripped head at 1 mm with four co-registered modalities (``t1n``, ``t1c``,
``t2w``, ``t2f``) and a BraTS 2023 label map (1 necrotic core, 2 oedema, 3 enhancing tumour):

* anatomy: an irregular ellipsoidal brain with a cortical grey-matter ribbon of varying thickness,
  white matter inside, deep grey nuclei, lateral ventricles and a thin outer CSF layer;
* a glioma at a random place, of random size and lobulated shape: a necrotic core (dark on T1c),
  an enhancing rim (bright on T1c), and peritumoral oedema spreading irregularly (bright on T2 and
  FLAIR, dark on T1);
* tissue contrasts per modality that follow the clinical sequences (CSF bright on T2, dark on
  FLAIR), jittered per case, with texture, partial-volume blur, a smooth bias field, Rician noise
  and a random scanner scale, stored as int16 like many scanners write.

Everything is drawn from ``numpy.random.default_rng([seed, index])``, so case ``index`` of ``seed``
is the same on every machine. Generation is pure (arrays in, arrays out); ``write_case`` does the I/O.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .io.atomic import make_folder
from .io.images import Image, header_from_affine, write_nifti

MODALITIES = ("t1n", "t1c", "t2w", "t2f")
SHAPE = (160, 192, 144)  # 1 mm voxels; axes run left-right, posterior-anterior, inferior-superior
NECROSIS, OEDEMA, ENHANCING = 1, 2, 3

# Mean intensity of each tissue per modality, relative to white matter on T1 (jittered per case).
_TISSUES = ("csf", "grey", "white", "oedema", "enhancing", "necrosis")
_CONTRAST = {
    "t1n": (0.35, 0.70, 1.00, 0.62, 0.74, 0.36),
    "t1c": (0.35, 0.72, 1.00, 0.62, 1.55, 0.30),
    "t2w": (1.60, 0.95, 0.70, 1.30, 1.02, 1.45),
    "t2f": (0.25, 1.00, 0.78, 1.45, 1.12, 0.85),
}


@dataclass(frozen=True)
class Phantom:
    images: dict[str, np.ndarray]  # modality → int16 volume (zero outside the brain)
    labels: np.ndarray  # uint8, BraTS 2023 labels
    affine: np.ndarray  # 1 mm voxels, stored like BraTS (x and y flipped)


def case_id(seed: int, index: int) -> str:
    """``BraTS-PHT-SSSSS-III``: BraTS-style, so every BraTS tool finds the files."""
    return f"BraTS-PHT-{seed:05d}-{index:03d}"


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Unit-variance random field varying over about ``max(shape) / cells`` voxels."""
    coarse = [max(2, round(cells * n / max(shape))) + 1 for n in shape]
    grid = torch.from_numpy(rng.standard_normal(coarse).astype(np.float32))[None, None]
    field = F.interpolate(grid, size=shape, mode="trilinear", align_corners=True)[0, 0].numpy()
    return field / max(float(field.std()), 1e-6)


def _blur(volume: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (voxels), for partial-volume edges."""
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    out = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        padding = [0, 0, 0]
        padding[axis] = radius
        out = F.conv3d(out, kernel.view(shape), padding=tuple(padding))
    return out[0, 0].numpy()


def _coordinates(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Millimetres from the volume centre along each axis (broadcastable, not materialized)."""
    return [(np.arange(n, dtype=np.float32) - (n - 1) / 2).reshape([-1 if a == i else 1 for a in range(3)])
            for i, n in enumerate(shape)]


def _ellipsoid(coords: list[np.ndarray], centre, radii) -> np.ndarray:
    """Normalized radius: below 1 inside the ellipsoid."""
    return np.sqrt(sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii)))


def _anatomy(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Tissue index map (0 background, 1 CSF, 2 grey, 3 white) and the brain's depth in mm."""
    coords = _coordinates(shape)
    radii = np.array([66.0, 82.0, 60.0]) * rng.uniform(0.92, 1.06, 3)
    radius = _ellipsoid(coords, (0.0, 0.0, rng.uniform(-4, 4)), radii)
    radius = radius * (1 + 0.035 * smooth_noise(rng, shape, 5))
    depth = (1 - radius) * float(radii.mean())  # mm below the brain surface (negative outside)
    tissue = np.zeros(shape, np.uint8)
    inside = depth > 0
    tissue[inside] = 3
    gyri = smooth_noise(rng, shape, 18)  # folding: the ribbon reaches deeper where gyri dip
    cortex = depth < rng.uniform(2.5, 3.5) + 7.0 * np.maximum(gyri, 0)
    tissue[inside & cortex] = 2
    tissue[inside & (depth < 1.2 + 1.5 * np.maximum(gyri - 1.2, 0))] = 1  # outer CSF and sulci
    for side in (-1, 1):  # deep grey nuclei, then the lateral ventricles
        nucleus = _ellipsoid(coords, (side * 12, -4, 2), (8, 11, 8) * rng.uniform(0.85, 1.15, 3))
        tissue[nucleus < 1] = 2
        ventricle = _ellipsoid(coords, (side * rng.uniform(5, 8), 6, 12), (4.5, 22, 8) * rng.uniform(0.8, 1.2, 3))
        tissue[ventricle < 1] = 1
    return tissue, depth


def _tumour(rng: np.random.Generator, shape: tuple[int, ...], depth: np.ndarray) -> np.ndarray:
    """BraTS labels of a glioma placed inside the brain, at least a little below the surface."""
    coords = _coordinates(shape)
    candidates = np.argwhere(depth[::4, ::4, ::4] > 25) * 4
    centre = candidates[rng.integers(len(candidates))] - (np.array(shape) - 1) / 2
    whole = rng.uniform(14, 32)  # oedema reach, mm
    core = whole * rng.uniform(0.35, 0.65)
    rim = rng.uniform(3.0, 6.0)
    distance = np.sqrt(sum((c - m) ** 2 for c, m in zip(coords, centre)))
    lobes = 1 + 0.22 * smooth_noise(rng, shape, 10)
    fingers = 1 + 0.30 * smooth_noise(rng, shape, 8) * (distance / whole).clip(0, 1)
    labels = np.zeros(shape, np.uint8)
    brain = depth > 0
    labels[(distance < whole * fingers) & brain] = OEDEMA
    core_distance = distance / lobes
    labels[(core_distance < core) & brain] = ENHANCING
    labels[(core_distance < core - rim) & brain] = NECROSIS
    return labels


def generate(seed: int, index: int = 0, shape: tuple[int, ...] = SHAPE) -> Phantom:
    """Case ``index`` of the phantom series ``seed``: same numbers on every machine."""
    rng = np.random.default_rng([seed, index])
    tissue, depth = _anatomy(rng, shape)
    labels = _tumour(rng, shape, depth)
    brain = depth > 0
    # Tissue class per voxel: the tumour overrides the anatomy.
    classes = tissue.astype(np.int64) - 1  # -1 background, 0 csf, 1 grey, 2 white
    for label, index_ in ((OEDEMA, 3), (ENHANCING, 4), (NECROSIS, 5)):
        classes[labels == label] = index_
    texture = 0.04 * smooth_noise(rng, shape, 24)
    oedema_grade = 0.12 * smooth_noise(rng, shape, 8)
    images = {}
    for name in MODALITIES:
        means = np.asarray(_CONTRAST[name], np.float32) * rng.uniform(0.93, 1.07, len(_TISSUES))
        signal = np.where(classes >= 0, means[classes.clip(0)], 0).astype(np.float32)
        signal *= 1 + texture
        signal[labels == OEDEMA] *= (1 + oedema_grade[labels == OEDEMA])
        signal = _blur(signal, 0.7)
        signal *= np.exp(0.12 * smooth_noise(rng, shape, 3))  # receive-coil bias field
        sigma = rng.uniform(0.02, 0.045)
        noisy = np.hypot(signal + sigma * rng.standard_normal(shape, np.float32),
                         sigma * rng.standard_normal(shape, np.float32))
        scale = rng.uniform(300, 1500)
        images[name] = np.where(brain, np.rint(noisy * scale), 0).astype(np.int16)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [(shape[0] - 1) / 2, (shape[1] - 1) / 2, -(shape[2] - 1) / 2]
    return Phantom(images, labels, affine)


def write_case(phantom: Phantom, folder: str | os.PathLike[str], name: str) -> dict[str, Path]:
    """Write ``folder/name/name-{t1n,t1c,t2w,t2f,seg}.nii.gz`` atomically; returns the paths."""
    case = Path(folder) / name
    make_folder(case, "case folder")
    reference = Image(phantom.labels, phantom.affine, header_from_affine(phantom.affine, phantom.labels.shape),
                      case / name)
    paths = {}
    for modality, volume in (*phantom.images.items(), ("seg", phantom.labels)):
        paths[modality] = case / f"{name}-{modality}.nii.gz"
        write_nifti(paths[modality], volume, reference, volume.dtype)
    return paths


def generate_dataset(folder: str | os.PathLike[str], cases: int, seed: int,
                     progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Cases ``0 .. cases-1`` of series ``seed`` in BraTS layout; returns the case folders."""
    return write_series(folder, cases, seed, lambda index: write_case(generate(seed, index), folder,
                                                                      case_id(seed, index)), case_id, progress)


def write_series(folder: str | os.PathLike[str], cases: int, seed: int, write: Callable[[int], object],
                 name: Callable[[int, int], str], progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """``write(index)`` for cases ``0 .. cases-1``, reporting ``progress``; the folders ``name(seed, index)``."""
    folders = []
    for index in range(cases):
        write(index)
        folders.append(Path(folder) / name(seed, index))
        if progress is not None:
            progress(index + 1, cases)
    return folders
