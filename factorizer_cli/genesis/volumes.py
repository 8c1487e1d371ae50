"""The unlabelled volumes ``pretrain`` learns from: found in a folder, brought onto one grid, cached.

Self-discovery compares the same place in different patients, so every volume must be on one grid.
By default each case's first modality (a T1) is affinely registered to the MNI152 2009a template and
every modality moved with it (``pipeline.preprocess`` with ``register``: the template's 197×233×189
1 mm grid, intensities matched to the template's brain median); ``register=None`` takes volumes that
are aligned already (same grid after RAS reorientation, e.g. the glioma phantoms or a dataset
registered beforehand) and checks that their shapes agree.

Intensities then go to [0, 1], per channel: the 0.5th and 99.5th percentiles of its nonzero voxels
become 0 and 1, clipped (the card's ``percentile`` normalisation, so a fine-tuning card can repeat it
exactly). Why [0, 1]: the restoration head ends in a sigmoid and the corruptions assume it (the
Bézier intensity map clamps outside [0, 1], in- and out-painting fill with uniform [0, 1) noise), as
upstream's chest CT windowed to [0, 1].

Each volume is preprocessed once into a cache entry (``CACHE/<name>-<key>/``: ``image.npy`` as
float16, ``embedding.npy``, ``volume.json``), read back as a memory map a cube at a time, so memory does
not grow with the number of volumes. float16 halves the disk and the reads; on [0, 1] its step is at
most 2^-11, far below the corruptions' scale. The key hashes the files (path, size, modification
time), the preprocessing and ``CACHE_FORMAT``. Entries are written into a temporary folder and renamed
into place whole, as the training cache does (``train.cache``).

The **embedding** (``embed``) that self-discovery compares patients by is the volume itself at 8 mm:
the mean of each 8×8×8 block, every channel, as one vector (about 18,000 numbers on the template
grid). Upstream embeds each patient by an auto-encoder's features; here every volume is already on one
grid with one intensity scale, so what tells patients apart at the scale of a pattern (ventricle and
sulcal width, atrophy, lesions, residual differences of head shape) is in the low-resolution
intensities themselves, and only the order of the distances matters (nearest neighbours). An
auto-encoder would cost its own training run and another model to keep deterministic (upstream's
auto-encoder script does not run as committed) for a representation of the same images.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputError
from ..io.atomic import make_folder, remove_stale_temporaries
from ..io.cases import find_cases, label_marker, nifti_stem, nifti_suffix
from ..io.images import read_image
from ..pipeline.preprocess import preprocess
from ..train.cache import file_identity, safe_name, write_entry
from ..zoo.cache import home
from ..zoo.card import Normalization, Preprocessing

CACHE_FORMAT = 1  # bump when the layout or the meaning of an entry changes
EMBEDDING_MM = 8  # block size of the embedding, in voxels of the (1 mm) grid
PERCENTILES = (0.5, 99.5)
_ENTRY_FILES = ("image.npy", "embedding.npy", "volume.json")

# Names a modality goes by; a name given to ``pretrain --modality`` finds files named by any of its group.
_GROUPS = (("t1", "t1n", "t1w"), ("t1c", "t1ce", "t1gd"), ("t2", "t2w"), ("flair", "t2f"), ("dwi",), ("adc",),
           ("pd", "pdw"))

Progress = Callable[[int, int], None]


def modality_specs(names: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """``(name, aliases)`` for each modality name, its aliases the other names of its group (``t1``:
    ``t1n``, ``t1w``); an unknown name has none. Names are lower-cased; a repeated one is an error."""
    specs, seen = [], set()
    for raw in names:
        name = raw.strip().lower()
        if not name or name in seen:
            raise InputError(f"modality {raw!r} {'given twice' if name else 'is empty'}; name each modality once")
        seen.add(name)
        group = next((g for g in _GROUPS if name in g), (name,))
        specs.append((name, tuple(n for n in group if n != name)))
    return specs


def find_volumes(folder: str | os.PathLike[str], specs: Sequence[tuple[str, Sequence[str]]]
                 ) -> list[tuple[str, tuple[Path, ...]]]:
    """``(name, files in modality order)`` of every case in ``folder``, sorted by name.

    Any layout ``io.cases`` reads (a folder per case, BIDS sessions, nnU-Net ``CASE_0000``); with one
    modality, also NIfTI files lying directly in the folder, one volume each. Label maps are ignored.
    A case lacking a modality is an ``InputError`` (the first such case named), as are fewer than two
    volumes.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder; give the folder of the unlabelled volumes")
    cases = find_cases(folder, specs)
    broken = [c for c in cases if c.problem]
    if broken:
        raise InputError(f"{broken[0].problem} ({len(broken)} of {len(cases)} cases lack a modality; name the "
                         "modalities to read with --modality)")
    found = [(c.name, c.files) for c in cases]
    if not found and len(specs) == 1:
        loose = sorted(p for p in folder.iterdir() if p.is_file() and nifti_suffix(p) and not p.name.startswith(".")
                       and not label_marker(nifti_stem(p))[0])
        found = [(nifti_stem(p), (p,)) for p in loose]
    if len(found) < 2:
        wanted = ", ".join(name for name, _ in specs)
        raise InputError(f"{folder}: {len(found)} volume(s) of {wanted} found; pretraining compares patients "
                         "and needs at least 2 (name the modalities with --modality)")
    return found


def pretraining_preprocessing(register: str | None) -> Preprocessing:
    """The steps of every volume: registration to ``register`` (or none), RAS, 1 mm where registered
    (else the native spacing), no crop, percentiles 0.5..99.5 to [0, 1]."""
    low, high = PERCENTILES
    spacing = (1.0, 1.0, 1.0) if register is not None else (None, None, None)
    return Preprocessing(spacing=spacing, orientation="RAS", crop_margin_mm=None,
                         normalization=Normalization("percentile", low=low, high=high), register=register)


def embed(array: np.ndarray, block: int = EMBEDDING_MM) -> np.ndarray:
    """The volume ``(C, X, Y, Z)`` as the means of its ``block``³ blocks (edges padded with 0), flattened:
    the vector patients are compared by (see the module)."""
    padded = np.pad(array.astype(np.float32, copy=False),
                    [(0, 0)] + [(0, -n % block) for n in array.shape[1:]])
    c, x, y, z = padded.shape
    blocks = padded.reshape(c, x // block, block, y // block, block, z // block, block)
    return blocks.mean(axis=(2, 4, 6), dtype=np.float64).astype(np.float32).ravel()


@dataclass(frozen=True)
class Volume:
    """A preprocessed volume in the cache; ``image`` opens a fresh read-only map on every access (no map
    outlives a cube, and the object crosses to DataLoader workers as a path)."""

    name: str
    folder: Path
    shape: tuple[int, ...]  # (C, X, Y, Z)

    @property
    def image(self) -> np.ndarray:
        return np.load(self.folder / "image.npy", mmap_mode="r")

    @property
    def embedding(self) -> np.ndarray:
        return np.load(self.folder / "embedding.npy")


def default_cache_dir() -> Path:
    """``FACTORIZER_HOME/pretrain-cache`` (``~/.cache/factorizer/pretrain-cache`` by default)."""
    return home() / "pretrain-cache"


def prepare_volumes(found: Sequence[tuple[str, Sequence[Path]]], steps: Preprocessing,
                    cache_dir: str | os.PathLike[str] | None = None, progress: Progress | None = None) -> list[Volume]:
    """Every volume of ``found`` from the cache, preprocessed into it first where missing; all on one grid.

    Raises ``InputError`` when two volumes end on grids of different shapes (unregistered volumes that
    are not aligned: register them, or resample them beforehand).
    """
    cache = VolumeCache(cache_dir)
    volumes = []
    for i, (name, files) in enumerate(found):
        volumes.append(cache.volume(name, files, steps))
        if progress is not None:
            progress(i + 1, len(found))
    first = volumes[0]
    odd = next((v for v in volumes if v.shape[1:] != first.shape[1:]), None)
    if odd is not None:
        how = "they were registered to the same template" if steps.register else "--no-register takes aligned volumes"
        raise InputError(f"volume {odd.name} has grid {odd.shape[1:]}, {first.name} {first.shape[1:]}; patterns are "
                         f"cut at the same voxels of every volume, so all must share one grid ({how}); "
                         "drop --no-register to register them to the MNI152 template")
    return volumes


def volume_key(files: Sequence[Path], steps: Preprocessing) -> str:
    """The hex digest naming a volume's entry: its files as they are now, the steps and the format."""
    described = {"format": CACHE_FORMAT, "files": [file_identity(f) for f in files],
                 "preprocessing": steps.to_dict(), "embedding_mm": EMBEDDING_MM}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


class VolumeCache:
    """A folder of preprocessed volumes (``default_cache_dir()`` unless given)."""

    def __init__(self, folder: str | os.PathLike[str] | None = None):
        self.folder = make_folder(folder if folder is not None else default_cache_dir(), "pretraining cache")
        remove_stale_temporaries(self.folder)

    def volume(self, name: str, files: Sequence[Path], steps: Preprocessing) -> Volume:
        """The cached volume, preprocessing and storing it first if no complete entry exists."""
        entry = self.folder / f"{safe_name(name, 'volume')}-{volume_key(files, steps)[:24]}"
        if entry.exists():
            cached = _open(entry)
            if cached is not None:
                return cached
            shutil.rmtree(entry, ignore_errors=True)  # damaged since it was renamed into place
        prepared = preprocess([read_image(f) for f in files], steps)
        self._write(entry, name, prepared.array)
        cached = _open(entry)
        if cached is None:
            raise OutputError(f"{entry}: the cache entry vanished as it was written; check that nothing else "
                              "cleans the pretraining cache while a run uses it")
        return cached

    def _write(self, entry: Path, name: str, array: np.ndarray) -> None:
        write_entry(entry, {"image.npy": array.astype(np.float16), "embedding.npy": embed(array)}, "volume.json",
                    {"format": CACHE_FORMAT, "name": name, "shape": list(array.shape)},
                    lambda: _open(entry) is not None)


def _open(entry: Path) -> Volume | None:
    try:
        meta = json.loads((entry / "volume.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    except OSError as err:
        raise InputError(f"{entry}: cannot read the pretraining cache entry ({err}); check its permissions "
                         "or pass another --cache folder") from None
    if meta.get("format") != CACHE_FORMAT or not all((entry / f).is_file() for f in _ENTRY_FILES):
        return None
    return Volume(meta["name"], entry, tuple(int(n) for n in meta["shape"]))

