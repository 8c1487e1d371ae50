"""Find the modality images of one case in a folder, whatever the dataset's naming layout.

A model card lists its inputs as (canonical name, aliases), e.g. ``("t2f", ["flair"])``. The layouts
of the field all put the modality at the end of the file name, so one rule covers them:

* BraTS 2023 ``BraTS-GLI-00000-000-t1c.nii.gz`` and BraTS 2021 ``BraTS2021_00000_flair.nii.gz``;
* ISLES'22 BIDS ``sub-strokecase0001_ses-0001_dwi.nii.gz``, possibly in ``ses-0001/dwi/`` and
  ``ses-0001/anat/`` subfolders (``derivatives/`` folders, which hold masks, are skipped);
* plain ``flair.nii.gz``.

A file belongs to a modality when its name without ``.nii``/``.nii.gz``, lower-cased, *is* one of the
modality's names or ends with ``-``, ``_`` or ``.`` followed by one. nnU-Net names (``CASE_0000``) end
with a 4-digit channel index instead: the position in the card's order. Files that match no modality
(segmentations, labels, JSON sidecars) are ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from .images import nifti_suffix

ModalitySpec = tuple[str, Sequence[str]]
"""(canonical name, aliases) of one model input, in the model card's order."""

_SEPARATORS = "-_."
_NNUNET_INDEX = re.compile(r".+_(\d{4})")
_SKIPPED_FOLDERS = {"derivatives"}
# case/ses-0001/anat/file: deep enough for BIDS, shallow enough not to walk a whole dataset
_MAX_DEPTH = 3
_MAX_LISTED = 8
_DISPLAY = {
    "t1": "T1", "t1n": "T1", "t1c": "T1c", "t1ce": "T1c", "t1gd": "T1c", "t2": "T2", "t2w": "T2",
    "t2f": "FLAIR", "flair": "FLAIR", "dwi": "DWI", "adc": "ADC",
}  # fmt: skip


def find_modalities(
    folder: str | os.PathLike[str], specs: Sequence[ModalitySpec]
) -> dict[str, Path]:
    """Map each modality of ``specs`` (canonical name) to its NIfTI file in ``folder``, in spec order.

    Raises ``InputError`` naming the folder when it holds no NIfTI image, when a modality has no file
    or several, or when an nnU-Net channel index exceeds the model's inputs.
    """
    folder = Path(folder)
    lookup = _lookup(specs)
    aliases_of = {name: aliases for name, aliases in specs}
    if not folder.exists():
        raise InputError(f"{folder}: no such folder; check the path")
    if not folder.is_dir():
        raise InputError(f"{folder} is a file, not a case folder; give the folder of one case")
    files = _nifti_files(folder)
    if not files:
        raise InputError(
            f"no NIfTI images (.nii, .nii.gz) in {folder}; give the folder that holds one case"
        )
    matches: dict[str, list[Path]] = {name: [] for name, _ in specs}
    for file in files:
        name = _modality_of(file, specs, lookup, folder)
        if name is not None:
            matches[name].append(file)

    missing = [name for name, found in matches.items() if not found]
    if missing:
        wanted = " or ".join(_describe(name, aliases_of[name]) for name in missing)
        index = {name: i for i, (name, _) in enumerate(specs)}
        first = missing[0]
        raise InputError(
            f"no {wanted} image in {folder}; found: {_listing(files, folder)}; name it like "
            f"CASE_{first}.nii.gz or CASE_{index[first]:04d}.nii.gz"
        )
    for name, found in matches.items():
        if len(found) > 1:
            raise InputError(
                f"{len(found)} files in {folder} match {_describe(name, aliases_of[name])}: "
                f"{_listing(found, folder)}; keep one file per modality in the case folder"
            )
    return {name: found[0] for name, found in matches.items()}


def match_modalities(names: Sequence[str], specs: Sequence[ModalitySpec]) -> list[str]:
    """The canonical names of user-given modality ``names`` (aliases, any case), in the order given.

    Raises ``InputError`` for an unknown name, two names meaning the same modality, or a count that
    differs from the model's inputs; each message lists what the model expects.
    """
    lookup = _lookup(specs)
    expected = ", ".join(
        f"{name} ({'/'.join(aliases)})" if aliases else name for name, aliases in specs
    )
    canonical: list[str] = []
    given: dict[str, str] = {}
    for raw in names:
        name = lookup.get(raw.strip().lower())
        if name is None:
            raise InputError(f"unknown modality '{raw}'; the model expects {expected}")
        if name in given:
            raise InputError(
                f"modality {name} given twice ('{given[name]}' and '{raw}'); the model expects "
                f"{expected}"
            )
        given[name] = raw
        canonical.append(name)
    if len(canonical) != len(specs):
        raise InputError(
            f"{len(canonical)} modalities given ({' '.join(names) or 'none'}) but the model takes "
            f"{len(specs)}: {expected}"
        )
    return canonical


def _lookup(specs: Sequence[ModalitySpec]) -> dict[str, str]:
    """Lower-cased name or alias -> canonical name; a name claimed twice is a model-card bug."""
    lookup: dict[str, str] = {}
    for name, aliases in specs:
        for key in (name, *aliases):
            key = key.lower()
            if lookup.setdefault(key, name) != name:
                raise ValueError(f"modality name '{key}' belongs to both {lookup[key]} and {name}")
    return lookup


def _nifti_files(folder: Path) -> list[Path]:
    """NIfTI files under ``folder`` (up to ``_MAX_DEPTH`` levels), without hidden or derivative ones."""
    files: list[Path] = []
    for root, dirs, names in os.walk(folder):
        depth = len(Path(root).relative_to(folder).parts)
        dirs[:] = sorted(
            d
            for d in dirs
            if depth < _MAX_DEPTH and not d.startswith(".") and d.lower() not in _SKIPPED_FOLDERS
        )
        files.extend(
            Path(root, n) for n in sorted(names) if not n.startswith(".") and nifti_suffix(Path(n))
        )
    return files


def _modality_of(
    file: Path, specs: Sequence[ModalitySpec], lookup: dict[str, str], folder: Path
) -> str | None:
    """The canonical modality ``file`` holds, or None when its name matches no input."""
    stem = file.name[: -len(nifti_suffix(file) or "")].lower()
    indexed = _NNUNET_INDEX.fullmatch(stem)
    if indexed:
        index = int(indexed.group(1))
        if index >= len(specs):
            raise InputError(
                f"{file.relative_to(folder)} in {folder} is channel {index} but the model takes "
                f"{len(specs)} inputs ({', '.join(name for name, _ in specs)}); check the model"
            )
        return specs[index][0]
    matching = [
        (len(key), name)
        for key, name in lookup.items()
        if stem == key or (stem.endswith(key) and stem[-len(key) - 1] in _SEPARATORS)
    ]
    return max(matching)[1] if matching else None  # longest name wins: "t1-ce" over "ce"


def _describe(name: str, aliases: Sequence[str]) -> str:
    """``FLAIR (t2f/flair)``: a reader's name and every file-name token that is accepted."""
    display = _DISPLAY.get(name.lower(), name.upper())
    return f"{display} ({'/'.join([name, *aliases])})"


def _listing(files: Sequence[Path], folder: Path) -> str:
    names = [f.relative_to(folder).as_posix() for f in files]
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")
