"""Self-discovery: the pattern classes of Semantic Genesis, found in brain MRI volumes on one grid.

Upstream (chest CT, no registration) draws, for each class, a reference patient not used before, takes
its ``K`` nearest neighbours in an embedding space, and one random coordinate that it then crops in
each neighbour: the class is "this place in patients like this one". Here the volumes are on one grid
(``volumes``: registered to the MNI152 template, or aligned already), so a coordinate means the same
anatomy in every volume, and:

- **references**: class ``c``'s reference is entry ``c mod n`` of a random order of the ``n`` volumes,
  a new order for each round (upstream never reuses a reference; with fewer volumes than classes a
  volume is the reference of several classes);
- **neighbours**: the reference first, then the others by Euclidean distance of their embeddings
  (``volumes.embed``), ``K`` in all (``min(K, n)``);
- **coordinates**: a cube centre drawn among the brain voxels where the whole cube fits in the grid
  and at least half of it is brain, at least ``min_distance`` voxels from every earlier class's centre
  *and from its left-right mirror image*: the two hemispheres look alike, and two classes that are
  mirror images of each other could not be told apart by anything but the side. A centre near the
  midline may lie near its own mirror image (such a pattern is nearly symmetric, no other class
  resembles it). Up to ``TRIES`` draws per class; failing that, a ``ConfigError`` asks for fewer
  classes or a smaller distance (upstream's retry flag was never reset: after one rejected draw it
  rejected every later one until it gave up).

The brain is the template's brain mask when the volumes were registered, else the voxels nonzero in
at least half of the volumes. The mirror plane is the middle of the brain's extent along the first
axis (left-right, the volumes being in RAS): x = 0 of the symmetric MNI152 2009a template.

Everything is drawn from one ``numpy`` Generator, so a run's patterns are a function of its seed and
its volumes. They are saved in the run (``patterns.json``) and read back on resume.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, InputError
from ..io.atomic import write_json_atomic

PATTERNS_FILE = "patterns.json"
TRIES = 4000  # candidate centres drawn per class before giving up
MIN_BRAIN = 0.5  # share of a cube that must be brain


@dataclass(frozen=True)
class Patterns:
    """The classes of a run: class ``c`` is the cube centred at ``centres[c]`` in any of the volumes
    ``neighbours[c]`` (indices into ``volumes``, the reference first)."""

    volumes: tuple[str, ...]
    centres: tuple[tuple[int, int, int], ...]
    references: tuple[int, ...]
    neighbours: tuple[tuple[int, ...], ...]
    mirror: float  # the left-right mirror plane, as a coordinate along the first axis
    min_distance: float

    @property
    def classes(self) -> int:
        return len(self.centres)

    def save(self, folder: Path) -> None:
        write_json_atomic(folder / PATTERNS_FILE, asdict(self))

    @classmethod
    def load(cls, folder: Path) -> Patterns:
        path = folder / PATTERNS_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(tuple(data["volumes"]), tuple(tuple(int(v) for v in c) for c in data["centres"]),
                       tuple(int(r) for r in data["references"]),
                       tuple(tuple(int(v) for v in n) for n in data["neighbours"]), float(data["mirror"]),
                       float(data["min_distance"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(f"{path}: cannot read this run's patterns ({err}); restore the file to resume, "
                             "or start a new run in another folder") from None


def brain_of(volumes: Sequence, template: str | None) -> np.ndarray:
    """Where patterns may be: the template's brain mask, or the voxels nonzero (first channel) in at
    least half of the ``volumes`` (objects with an ``image`` array, read one at a time)."""
    if template is not None:
        from ..atlas.template import brain_mask

        return brain_mask(template)
    count = None
    for volume in volumes:
        nonzero = np.asarray(volume.image[0]) > 0
        count = nonzero.astype(np.int32) if count is None else count + nonzero
    return count * 2 >= len(volumes)


def mirror_plane(mask: np.ndarray) -> float:
    """The middle of the mask's extent along the first (left-right) axis."""
    along = np.flatnonzero(mask.any(axis=(1, 2)))
    if along.size == 0:
        raise InputError("no brain voxels to place patterns in: the volumes are empty where they overlap")
    return (float(along[0]) + float(along[-1])) / 2


def candidate_centres(mask: np.ndarray, cube: Sequence[int], min_brain: float = MIN_BRAIN) -> np.ndarray:
    """``(n, 3)`` brain voxels that can centre a cube: the whole cube in the grid (its origin is
    ``centre - cube // 2``), at least ``min_brain`` of it brain (box sums of a summed-volume table)."""
    cube = np.asarray(cube)
    if (cube > np.array(mask.shape)).any():
        raise ConfigError(f"cubes of {tuple(int(c) for c in cube)} voxels do not fit the volumes' grid "
                          f"{mask.shape}; choose a smaller --cube-size")
    table = np.zeros(tuple(n + 1 for n in mask.shape), np.int32)  # a 1 mm head has under 2^31 voxels
    table[1:, 1:, 1:] = mask
    for axis in range(3):
        np.cumsum(table, axis=axis, out=table)
    centres = np.argwhere(mask)
    lo = centres - cube // 2
    inside = ((lo >= 0) & (lo + cube <= np.array(mask.shape))).all(axis=1)
    centres, lo = centres[inside], lo[inside]
    hi = lo + cube
    x0, y0, z0 = lo.T
    x1, y1, z1 = hi.T
    brain = (table[x1, y1, z1] - table[x0, y1, z1] - table[x1, y0, z1] - table[x1, y1, z0]
             + table[x0, y0, z1] + table[x0, y1, z0] + table[x1, y0, z0] - table[x0, y0, z0])
    return centres[brain >= min_brain * int(np.prod(cube))]


def nearest_neighbours(embeddings: np.ndarray, reference: int, count: int) -> tuple[int, ...]:
    """The reference, then the ``count - 1`` volumes nearest to it (Euclidean; ties by index)."""
    distances = np.linalg.norm(embeddings - embeddings[reference], axis=1)
    distances[reference] = -1.0  # first, whatever duplicates there are
    return tuple(int(i) for i in np.argsort(distances, kind="stable")[:count])


def discover(names: Sequence[str], embeddings: np.ndarray, mask: np.ndarray, cube: Sequence[int], classes: int,
             neighbours: int, min_distance: float, rng: np.random.Generator) -> Patterns:
    """Draw the ``classes`` patterns (see the module) of volumes ``names`` with ``embeddings`` (one row
    each) on a grid whose brain is ``mask``."""
    n = len(names)
    if classes < 1 or neighbours < 1:
        raise ConfigError(f"--classes and --neighbours must be at least 1, got {classes} and {neighbours}")
    candidates = candidate_centres(mask, cube)
    if len(candidates) == 0:
        raise ConfigError(f"no place in the brain holds a cube of {tuple(cube)} voxels that is at least half brain; "
                          "choose a smaller --cube-size")
    mirror = mirror_plane(mask)
    references: list[int] = []
    while len(references) < classes:
        references.extend(int(i) for i in rng.permutation(n))
    references = references[:classes]
    centres: list[np.ndarray] = []
    for c in range(classes):
        drawn = candidates[rng.integers(len(candidates), size=TRIES)].astype(np.float64)
        if centres:
            placed = np.array(centres, np.float64)
            mirrored = placed.copy()
            mirrored[:, 0] = 2 * mirror - mirrored[:, 0]
            others = np.concatenate([placed, mirrored])
            nearest = np.sqrt(((drawn[:, None, :] - others[None]) ** 2).sum(-1)).min(1)
            fine = np.flatnonzero(nearest >= min_distance)
        else:
            fine = np.arange(len(drawn))
        if fine.size == 0:
            raise ConfigError(f"cannot place pattern {c + 1} of {classes} at least {min_distance:g} voxels from the "
                              "others and from their mirror images inside the brain; lower --classes or "
                              "--min-distance")
        centres.append(drawn[fine[0]])
    count = min(neighbours, n)
    return Patterns(tuple(names), tuple(tuple(int(v) for v in c) for c in centres), tuple(references),
                    tuple(nearest_neighbours(embeddings, r, count) for r in references), mirror, float(min_distance))
