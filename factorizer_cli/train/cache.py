"""Training cases preprocessed once, kept on disk, read back as memory maps.

``train`` used to hold every case on the model's grid in memory (BraTS 2023: about 143 GB). Here each
case goes once through ``data.load_case`` (the card's preprocessing, the code inference runs) and is
stored as ``.npy`` files; training opens them with ``np.load(mmap_mode="r")`` for each crop, so a
crop reads only the pages it touches and no map outlives its crop: resident memory stays that of one
case's pages whatever the number of cases.

An entry is the folder ``CACHE/<case>-<key>/`` holding ``image.npy`` (float32 ``(C, *grid)``),
``target.npy`` (sigmoid: bool ``(R, *grid)``; softmax: uint8 ``(1, *grid)``), ``foreground.npy``
(int64 ``(n, 3)``) and ``case.json`` (name, pad value, what the key was made of). The key hashes the
case's files (resolved path, size, modification time in ns), the card's preprocessing and its target
definition (activation, outputs, label values per output, background), and ``CACHE_FORMAT``: a changed
file, a changed card or a new layout gives a new entry, and runs and folds on the same data share one.

Entries are written whole or not at all: into a hidden temporary folder beside the entry (named as
``io.atomic`` names its temporaries: by host and process), renamed into place once complete. Readers
only ever open a renamed entry; temporaries that killed writers of this host left are deleted when a
cache is opened, those of writers still at work (here or on another machine) are left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputError, one_line
from ..io.atomic import cannot_write, make_folder, remove_stale_temporaries, temporary_sibling
from ..zoo.cache import home
from ..zoo.card import ModelCard
from . import data
from .data import Targets

CACHE_FORMAT = 1  # bump when the layout or the meaning of an entry changes
_ENTRY_FILES = ("image.npy", "target.npy", "foreground.npy", "case.json")


def default_cache_dir() -> Path:
    """``FACTORIZER_HOME/train-cache`` (``~/.cache/factorizer/train-cache`` by default)."""
    return home() / "train-cache"


@dataclass(frozen=True)
class CachedCase:
    """A training case whose arrays live in a cache entry; each access opens a fresh read-only map.

    The same attributes as ``data.TrainingCase``, so ``sample_batch`` and validation read either.
    Holding no map between accesses keeps resident memory flat, and lets the object cross to
    DataLoader workers (fork or spawn) as a path.
    """

    name: str
    folder: Path
    pad_value: int = 0

    @property
    def image(self) -> np.ndarray:
        return np.load(self.folder / "image.npy", mmap_mode="r")

    @property
    def target(self) -> np.ndarray:
        return np.load(self.folder / "target.npy", mmap_mode="r")

    @property
    def foreground(self) -> np.ndarray:
        return np.load(self.folder / "foreground.npy", mmap_mode="r")


def case_key(files: Sequence[Path], label_file: Path, card: ModelCard, targets: Targets) -> str:
    """The hex digest naming a case's entry: its files as they are now, the card's preprocessing and
    target definition (nothing the ROI or the network changes), and the cache format."""
    described = {
        "format": CACHE_FORMAT,
        "files": [file_identity(f) for f in (*files, label_file)],
        "preprocessing": card.preprocessing.to_dict(),
        "targets": {"activation": targets.activation, "outputs": list(targets.outputs),
                    "labels": [sorted(values) for values in targets.labels], "background": targets.background},
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


class CaseCache:
    """A folder of preprocessed cases (``default_cache_dir()`` unless given)."""

    def __init__(self, folder: str | os.PathLike[str] | None = None):
        self.folder = make_folder(folder if folder is not None else default_cache_dir(), "training cache")
        self.remove_stale_temporaries()

    def case(self, name: str, files: Sequence[Path], label_file: Path, card: ModelCard,
             targets: Targets) -> CachedCase:
        """The cached case, preprocessing and storing it first if no complete entry exists."""
        entry = self.folder / f"{safe_name(name)}-{case_key(files, label_file, card, targets)[:24]}"
        # An entry appears only by rename, whole: one that exists but does not open was damaged since
        # (files deleted by hand) and is written anew. Checking existence first means a complete entry
        # another run renames into place meanwhile is never taken for a damaged one.
        if entry.exists():
            cached = _open(entry)
            if cached is not None:
                return cached
            shutil.rmtree(entry, ignore_errors=True)
        self._write(entry, data.load_case(name, files, label_file, card, targets))
        cached = _open(entry)
        if cached is None:  # renamed into place a moment ago: only a concurrent deletion gets here
            raise OutputError(f"{entry}: the cache entry vanished as it was written; check that nothing "
                              "else cleans the training cache while a run uses it")
        return cached

    def remove_stale_temporaries(self) -> int:
        """Delete the temporary entries that killed writers of this host left; returns how many."""
        return remove_stale_temporaries(self.folder)

    def _write(self, entry: Path, case: data.TrainingCase) -> None:
        write_entry(entry, {"image.npy": case.image, "target.npy": case.target, "foreground.npy": case.foreground},
                    "case.json", {"format": CACHE_FORMAT, "name": case.name, "pad_value": int(case.pad_value)},
                    lambda: _open(entry) is not None)


def write_entry(entry: Path, arrays: dict[str, np.ndarray], meta_file: str, meta: dict,
                complete: Callable[[], bool]) -> None:
    """A cache entry folder written whole or not at all: the arrays, then ``meta_file`` (an entry is
    complete with it), in a temporary sibling renamed into place. Another process that wrote the same
    entry first wins (``complete()`` says so); anything else is an ``OutputError``. Shared by the
    training and pretraining caches."""
    temporary = temporary_sibling(entry)
    try:
        temporary.mkdir()
        for file, array in arrays.items():
            save_array(temporary / file, np.ascontiguousarray(array))
        with open(temporary / meta_file, "w", encoding="utf-8") as f:  # last: an entry is complete with it
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(temporary, entry)
        except OSError:
            if not complete():  # not another writer's complete entry: a real failure
                raise
            shutil.rmtree(temporary, ignore_errors=True)  # another process wrote the same entry first
    except OSError as err:
        shutil.rmtree(temporary, ignore_errors=True)
        raise OutputError(cannot_write(entry, err)) from err
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _open(entry: Path) -> CachedCase | None:
    """The entry as a case, or ``None`` if it is absent or not one this version wrote whole."""
    try:
        meta = json.loads((entry / "case.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    except OSError as err:  # unreadable, not absent: never delete what may be a good entry
        raise InputError(f"{entry}: cannot read the training cache entry ({err}); check its permissions "
                         "or pass another --cache folder") from None
    if meta.get("format") != CACHE_FORMAT or not all((entry / f).is_file() for f in _ENTRY_FILES):
        return None
    return CachedCase(meta["name"], entry, int(meta["pad_value"]))


def save_array(path: Path, array: np.ndarray) -> None:
    """An array as .npy, flushed to disk before the entry it belongs to is renamed into place."""
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def file_identity(path: Path) -> list:
    """What a cache key knows of an input file: its resolved path, size and modification time (ns)."""
    try:
        stat = Path(path).stat()
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror or one_line(err)})") from err
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def safe_name(name: str, empty: str = "case") -> str:
    """A case name as a folder name part (case names are folder or file names already; belt and braces)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".")[:80] or empty

