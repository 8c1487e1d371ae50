"""A minimal PNG writer (8-bit RGB), so overlay snapshots need no imaging dependency.

A PNG is a signature followed by chunks (length, type, data, CRC-32 of type and data): IHDR gives the
size and pixel format, IDAT the zlib-compressed rows (each prefixed by a filter byte; we use filter 0,
"none"), IEND closes the file. That is all a viewer needs.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .atomic import atomic_path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_RGB8 = (8, 2, 0, 0, 0)  # bit depth 8, colour type 2 (RGB), deflate, filter method 0, no interlace


def encode_png(rgb: np.ndarray) -> bytes:
    """The PNG bytes of an (H, W, 3) uint8 image."""
    if not (isinstance(rgb, np.ndarray) and rgb.ndim == 3 and rgb.shape[2] == 3):
        raise ValueError(f"expected an (H, W, 3) array, got shape {np.shape(rgb)}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {rgb.dtype}")
    height, width = rgb.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"cannot encode an empty image of shape {rgb.shape}")
    rows = np.empty((height, 1 + 3 * width), dtype=np.uint8)
    rows[:, 0] = 0  # filter type 0 on every row
    rows[:, 1:] = rgb.reshape(height, 3 * width)
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, *_RGB8)),
            _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)),
            _chunk(b"IEND", b""),
        )
    )


def write_png(path: str | os.PathLike[str], rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 image to ``path`` as PNG, atomically.

    Raises ``ValueError`` for an array of another shape or type and ``OutputError`` when the file
    cannot be written.
    """
    path = Path(path)
    data = encode_png(rgb)
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
