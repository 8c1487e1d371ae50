"""The training items of pretraining, cut on the fly: a pattern's cube, corrupted, and its class.

Upstream stores its cubes (27 GB of float64 for chest CT); here an item is a pure function of the
volumes, the patterns and one ``numpy`` Generator, drawn in this order:

1. the class ``c`` (uniform) and one of its neighbour volumes (uniform);
2. the view, upstream's three resolutions in equal shares: the cube itself at the pattern's centre, or
   (two shares in three) a multi-scale crop: both in-plane sides scaled by one factor in
   ``[50/64, 80/64)`` and shifted by up to ``±10/64`` of the side, the depth as it is, resized
   (trilinear) to the cube (upstream: sides of 50..79 voxels, shifts of -10..9, for 64×64×32 cubes);
   beyond the grid's edge the crop reads 0 (the background);
3. the corruption (``transforms.draw_corruption``: elastic deformation, then one of local pixel
   shuffling, non-linear intensity mapping, in- or out-painting).

The restoration target is the cube as cut (step 2), the input its corrupted copy, the class label
``c``. ``batch_of_step`` makes a step's batch, item ``i`` drawn from ``default_rng([seed, step, i])``,
the same wherever and whenever it is made (any number of DataLoader workers, a resumed run).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .discovery import Patterns
from .transforms import corrupt, draw_corruption

SCALES = (50 / 64, 80 / 64)  # in-plane side of a multi-scale crop, relative to the cube's
SHIFT = 10 / 64  # in-plane shift of a multi-scale crop, relative to the cube's side
VIEWS = 3  # the cube itself, and two multi-scale crops (upstream's three resolutions)


def read_box(image: np.ndarray, origin: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``image[:, origin : origin + size]`` as float32, zero beyond the grid (reads only the box)."""
    shape = image.shape[1:]
    lo = [max(0, o) for o in origin]
    hi = [min(n, o + s) for o, s, n in zip(origin, size, shape)]
    out = np.zeros((image.shape[0], *size), np.float32)
    if all(h > low for low, h in zip(lo, hi)):
        inner = tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, origin))
        out[(slice(None), *inner)] = image[(slice(None), *(slice(low, h) for low, h in zip(lo, hi)))]
    return out


def pattern_cube(image: np.ndarray, centre: Sequence[int], cube: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """One view (see the module) of the pattern at ``centre`` of ``image`` ``(C, X, Y, Z)``, as a
    float32 ``(C, *cube)`` array."""
    cube = tuple(int(c) for c in cube)
    if int(rng.integers(VIEWS)) == 0:
        return read_box(image, [c - s // 2 for c, s in zip(centre, cube)], cube)
    scale = float(rng.uniform(*SCALES))
    size = (max(1, round(cube[0] * scale)), max(1, round(cube[1] * scale)), cube[2])
    shift = [int(rng.integers(-round(SHIFT * s), round(SHIFT * s), endpoint=True)) for s in cube[:2]] + [0]
    origin = [c - s // 2 + d for c, s, d in zip(centre, size, shift)]
    crop = read_box(image, origin, size)
    if size == cube:
        return crop
    resized = F.interpolate(torch.from_numpy(crop)[None], size=cube, mode="trilinear", align_corners=False)
    return resized[0].numpy()


def pretraining_item(volumes: Sequence, patterns: Patterns, cube: Sequence[int],
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """``(corrupted input, restoration target, class)`` drawn as the module says; ``volumes`` are
    objects with an ``image`` array ``(C, X, Y, Z)`` (``volumes.Volume``: a memory map)."""
    label = int(rng.integers(patterns.classes))
    members = patterns.neighbours[label]
    volume = volumes[members[int(rng.integers(len(members)))]]
    target = pattern_cube(volume.image, patterns.centres[label], cube, rng)
    corrupted = corrupt(target, draw_corruption(target.shape, rng, elastic=True))
    return corrupted.astype(np.float32, copy=False), target, label


def batch_of_step(volumes: Sequence, patterns: Patterns, cube: Sequence[int], items: Sequence[int], seed: int,
                  step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs ``(B, C, *cube)``, targets ``(B, C, *cube)`` and class labels ``(B,)`` of ``step``'s ``items``."""
    inputs, targets, labels = [], [], []
    for item in items:
        x, y, label = pretraining_item(volumes, patterns, cube, np.random.default_rng([seed, step, item]))
        inputs.append(x)
        targets.append(y)
        labels.append(label)
    return (torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(targets)),
            torch.tensor(labels, dtype=torch.long))
