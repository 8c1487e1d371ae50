"""A PNG montage of axial slices with the label map over an image: a glance at QC, not a viewer.

Slices are shown in radiological convention (patient's right on the left of the picture, anterior at
the top), whatever the orientation of the files, because both volumes are first reoriented to RAS.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..io import geometry
from ..io.images import Image, read_image
from ..io.png import write_png
from ..zoo.card import ModelCard

# BraTS colours: NCR red, ED green, ET yellow; 4 (ET in BraTS 2021) also yellow; others cycle.
COLOURS = {1: (230, 40, 40), 2: (40, 200, 60), 3: (250, 220, 40), 4: (250, 220, 40)}
_CYCLE = [(70, 130, 250), (230, 90, 220), (60, 220, 220), (250, 150, 50)]


def montage(background: np.ndarray, labels: np.ndarray, affine: np.ndarray, slices: int = 12,
            columns: int = 4, alpha: float = 0.45) -> np.ndarray:
    """RGB montage (H, W, 3) uint8 of ``slices`` axial slices through the labelled (else imaged) extent."""
    both = np.stack([background.astype(np.float32), labels.astype(np.float32)])
    canonical, _, _ = geometry.to_canonical(both, affine)
    image, label = canonical[0], canonical[1].astype(np.int64)
    extent = label > 0 if label.any() else image != 0
    zs = np.flatnonzero(extent.any(axis=(0, 1)))
    chosen = np.unique(np.linspace(zs[0], zs[-1], num=min(slices, len(zs))).round().astype(int))

    grey = display_grey(image)

    tiles = []
    for z in chosen:
        g, lab = axial_slice(grey, z), axial_slice(label, z)
        rgb = np.repeat(g[..., None], 3, axis=2)
        for value in np.unique(lab[lab > 0]):
            colour = np.array(COLOURS.get(int(value), _CYCLE[int(value) % len(_CYCLE)]), np.float32)
            mask = lab == value
            rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colour
        tiles.append(rgb.astype(np.uint8))
    return tile_sheet(tiles, columns)


def display_grey(image: np.ndarray) -> np.ndarray:
    """Grey levels 0..255 (float) between the 1st and 99th percentiles of the nonzero voxels."""
    values = image[image != 0]
    lo, hi = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 255


def axial_slice(volume: np.ndarray, z: int) -> np.ndarray:
    """Slice ``z`` of a RAS volume (i: right, j: anterior) as shown: anterior at the top, the
    patient's right on the left."""
    return volume[:, :, z].T[::-1, ::-1]


def tile_sheet(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    """Equal-size RGB tiles in rows of ``columns``, enlarged (nearest neighbour) when small."""
    zoom = max(1, 160 // max(tiles[0].shape[:2]))  # small volumes: enlarge, nearest neighbour
    tiles = [tile.repeat(zoom, axis=0).repeat(zoom, axis=1) for tile in tiles]
    rows = -(-len(tiles) // columns)
    h, w = tiles[0].shape[:2]
    sheet = np.zeros((rows * h, min(columns, len(tiles)) * w, 3), np.uint8)
    for n, tile in enumerate(tiles):
        r, c = divmod(n, columns)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = tile
    return sheet


def write_preview(path: str | Path, background: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> None:
    write_png(path, montage(background, labels, affine))


def preview_background(card: ModelCard, images: Sequence[str | Path], reference: Image) -> Image:
    """What to draw the labels over: FLAIR when the model takes it and it shares the reference grid
    (lesions show best there), else the reference image (the first input)."""
    flair = next((i for i, m in enumerate(card.modalities) if m.matches("flair")), 0)
    if not flair:
        return reference
    image = read_image(images[flair])
    same_grid = image.array.shape == reference.array.shape and np.allclose(image.affine, reference.affine, atol=1e-3)
    return image if same_grid else reference
