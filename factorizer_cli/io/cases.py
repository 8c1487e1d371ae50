"""Where the images and label maps of a dataset are: the folder layouts of the field, in one place.

Pure path logic (names and folders, no voxels), shared by segmentation, batches, training and
evaluation, so that every command understands the same layouts:

* BraTS: one folder per case, ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1c.nii.gz`` (2023) or
  ``BraTS2021_00000_flair.nii.gz`` (2021), the label map ``*-seg.nii.gz`` beside the images;
* ISLES'22 BIDS: ``sub-strokecase0001/ses-0001/{dwi,anat}/sub-..._dwi.nii.gz``, the masks in
  ``derivatives/sub-X/ses-Y/*_msk.nii.gz`` (a ``derivatives/`` folder is never a case);
* nnU-Net: ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ... directly in the folder (or ``imagesTr/``), the
  channel index being the position in the model card's input order; labels in ``labelsTr/CASE.nii.gz``;
* plain ``flair.nii.gz``, and case folders picked by a glob (``--pattern '*/ses-*'``).

Modalities: a model card lists its inputs as (canonical name, aliases), e.g. ``("t2f", ["flair"])``.
A file belongs to a modality when its name without ``.nii``/``.nii.gz``, lower-cased, *is* one of the
modality's names or ends with ``-``, ``_`` or ``.`` followed by one; an nnU-Net name ends with its
4-digit channel index instead. Label maps carry a marker at the end of the name (``seg``, ``msk``,
``mask``, ``label``, ``labels``, ``gt``) or sit in ``labelsTr/``. Files that match nothing are ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

ModalitySpec = tuple[str, Sequence[str]]
"""(canonical name, aliases) of one model input, in the model card's order."""

NIFTI_SUFFIXES = (".nii.gz", ".nii")
NNUNET_CHANNEL = re.compile(r"(.+)_(\d{4})")  # CASE_0001: the case, then the channel index
LABEL_MARKER = re.compile(r"(?:(.+?)[-_.])?(seg|msk|mask|label|labels|gt)", re.IGNORECASE)  # the case, then it
DERIVATIVES = "derivatives"  # BIDS: processed data and masks, never a case
IMAGE_FOLDERS = {"imagestr", "imagests"}  # nnU-Net, lower-cased
LABEL_FOLDERS = {"labelstr", "labelsts"}
_NAMING_FOLDERS = {DERIVATIVES, *LABEL_FOLDERS}  # folders that hold cases but name none
_SEPARATORS = "-_."
# case/ses-0001/anat/file: deep enough for BIDS, shallow enough not to walk a whole dataset
_MAX_DEPTH = 3
_MAX_LABEL_DEPTH = 4  # derivatives/sub-X/ses-Y/file
_MAX_LISTED = 8
_DISPLAY = {
    "t1": "T1", "t1n": "T1", "t1c": "T1c", "t1ce": "T1c", "t1gd": "T1c", "t2": "T2", "t2w": "T2",
    "t2f": "FLAIR", "flair": "FLAIR", "dwi": "DWI", "adc": "ADC",
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One case of a dataset folder: its name, and its images in the model's modality order."""

    name: str
    files: tuple[Path, ...] = ()  # empty when they could not be found
    problem: str = ""  # why the files could not be found (reported, not dropped)


@dataclass(frozen=True)
class LabelMap:
    """One label map found in a folder: its case id, and other names a prediction of it may carry."""

    case: str
    path: Path
    aliases: tuple[str, ...] = ()


def nifti_suffix(path: Path) -> str | None:
    """The NIfTI suffix of ``path`` (``.nii.gz`` or ``.nii``, lower case), or None."""
    name = path.name.lower()
    return next((suffix for suffix in NIFTI_SUFFIXES if name.endswith(suffix)), None)


def nifti_stem(path: Path) -> str:
    """The name of a NIfTI file without ``.nii``/``.nii.gz`` (case kept)."""
    return path.name[: len(path.name) - len(nifti_suffix(path) or "")]


def label_marker(stem: str) -> tuple[bool, str | None]:
    """Whether a file name (without suffix) marks a label map, and the case it names if any.

    ``BraTS-GLI-00000-000-seg`` → (True, ``BraTS-GLI-00000-000``); a bare ``seg`` → (True, None): the
    case is its folder's; ``BraTS-GLI-00000-000-t1c`` → (False, None).
    """
    marked = LABEL_MARKER.fullmatch(stem)
    return (marked is not None, marked.group(1) if marked else None)


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


def resolve_inputs(
    inputs: Sequence[str | os.PathLike[str]], names: Sequence[str], specs: Sequence[ModalitySpec]
) -> list[Path]:
    """The image paths of one case in the model's modality order.

    ``inputs``: one case folder (modalities found by name), or one file (or DICOM folder) per modality,
    ``names`` saying which is which; a one-input model needs no names. Raises ``InputError`` for a
    missing path, a count that does not fit, or names the model does not know.
    """
    files = [Path(f) for f in inputs]
    if not files:
        raise InputError("no input images given; pass a case folder or one file per modality")
    for file in files:
        if not file.exists():
            raise InputError(f"{file}: no such file or folder; check the path")
    if len(files) == 1 and files[0].is_dir() and not names:
        return list(find_modalities(files[0], specs).values())
    if not names:
        if len(specs) == 1:
            return [files[0]]
        expected = " ".join(name for name, _ in specs)
        raise InputError(
            f"{len(files)} input files but no --modality; say which is which, e.g. --modality "
            f"{expected}, or pass the case folder"
        )
    canonical = match_modalities(names, specs)
    if len(files) != len(canonical):
        raise InputError(
            f"{len(files)} input files but {len(canonical)} modality names ({' '.join(names)}); give one "
            "file per modality, in the same order"
        )
    by_name = dict(zip(canonical, files))
    return [by_name[name] for name, _ in specs]


def find_cases(
    folder: str | os.PathLike[str], specs: Sequence[ModalitySpec], pattern: str | None = None
) -> list[Case]:
    """The cases of a dataset folder, sorted by name.

    Each subfolder is a case (BraTS ``BraTS-GLI-00000-000/``, ISLES ``sub-strokecase0001/``), its
    modalities found by name; NIfTI files directly in the folder are nnU-Net style, grouped by the
    part before ``_0000``. ``pattern`` (a glob relative to ``folder``, e.g. ``"*/ses-*"``) picks the
    case folders instead; nested ones are named by their path with ``_`` (``sub-01_ses-1``). A case
    whose files cannot be matched is kept, with the problem, so that it is reported, not dropped.
    """
    folder = Path(folder)
    if pattern:
        folders = sorted(p for p in folder.glob(pattern) if p.is_dir())
    else:
        folders = sorted(p for p in folder.iterdir()
                         if p.is_dir() and not p.name.startswith(".") and p.name.lower() != DERIVATIVES)
    cases = []
    for sub in folders:
        name = "_".join(sub.relative_to(folder).parts)
        try:
            cases.append(Case(name, tuple(find_modalities(sub, specs).values())))
        except InputError as err:
            cases.append(Case(name, problem=str(err)))
    if pattern:
        return cases
    channels: dict[str, dict[int, Path]] = {}
    for file in sorted(folder.iterdir()):
        match = NNUNET_CHANNEL.fullmatch(nifti_stem(file)) if nifti_suffix(file) and file.is_file() else None
        if match and not file.name.startswith("."):
            channels.setdefault(match.group(1), {})[int(match.group(2))] = file
    for name, files in channels.items():
        if sorted(files) == list(range(len(specs))):
            cases.append(Case(name, tuple(files[i] for i in sorted(files))))
        else:
            cases.append(Case(name, problem=(
                f"{folder}: case {name} has {len(files)} channel files ({', '.join(files[i].name for i in sorted(files))}); "
                f"the model takes {len(specs)}: {name}_0000 to {name}_{len(specs) - 1:04d}")))
    return sorted(cases, key=lambda c: c.name)


def find_label(case_folder: Path, dataset: Path, name: str) -> Path:
    """The label map of case ``name`` of ``dataset``: ``*-seg`` beside the images (BraTS), ``*_msk`` in
    ``derivatives/`` (ISLES, also beside a ``rawdata/`` dataset), ``labelsTr/CASE`` (nnU-Net)."""
    candidates = sorted(p for p in case_folder.glob("*") if nifti_suffix(p)) if case_folder.is_dir() else []
    subject = name.split("_")[0]  # BIDS: sub-X (and its sessions)
    for derivatives in (dataset / DERIVATIVES, dataset.parent / DERIVATIVES):
        candidates += sorted(derivatives.glob(f"{subject}/**/*.nii*"))
    candidates += [p for p in (dataset.parent / "labelsTr" / f"{name}.nii.gz",
                               dataset.parent / "labelsTr" / f"{name}.nii") if p.is_file()]
    for path in candidates:
        if path.parent.name.lower() in LABEL_FOLDERS or label_marker(nifti_stem(path))[0]:
            return path
    raise InputError(f"{case_folder}: no label map for case {name} (expected *-seg.nii.gz, *_msk.nii.gz "
                     "or labelsTr/CASE.nii.gz); add it or remove the case")


def find_labelled_cases(
    folder: str | os.PathLike[str], specs: Sequence[ModalitySpec]
) -> list[tuple[Case, Path]]:
    """Every case of a dataset folder (``imagesTr/`` if it has one) with its label map, for training.

    Raises ``InputError`` for the first case whose images or label map cannot be found, and for a
    folder without cases: a training set with a hole in it is refused, not trained on quietly.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such dataset folder; check the path")
    images = folder / "imagesTr" if (folder / "imagesTr").is_dir() else folder
    found = []
    for case in find_cases(images, specs):
        if case.problem:
            raise InputError(case.problem)
        found.append((case, find_label(images / case.name, images, case.name)))
    if not found:
        raise InputError(f"{folder}: no cases found; expected BraTS, ISLES or nnU-Net layout")
    return found


def find_label_maps(folder: str | os.PathLike[str], what: str = "ground truth") -> list[LabelMap]:
    """Every label map under ``folder``, in any layout of the module notes, sorted by case id.

    A file is a label map when its name carries a label marker, when it sits in ``labelsTr/``, or when
    it lies directly in ``folder`` (label maps named after their cases). Raises ``InputError`` for a
    missing folder and for two label maps of one case.
    """
    folder = _existing_folder(folder, what)
    found: dict[str, LabelMap] = {}
    for root, dirs, names in os.walk(folder):
        relative = Path(root).relative_to(folder).parts
        dirs[:] = sorted(d for d in dirs if len(relative) < _MAX_LABEL_DEPTH and not d.startswith(".")
                         and d.lower() not in IMAGE_FOLDERS)
        in_labels = bool(relative) and relative[-1].lower() in LABEL_FOLDERS
        folders = [p for p in relative if p.lower() not in _NAMING_FOLDERS]
        for name in sorted(names):
            path = Path(root, name)
            if name.startswith(".") or nifti_suffix(path) is None:
                continue
            stem = nifti_stem(path)
            marked, case = label_marker(stem)
            if not (marked or in_labels or not relative):
                continue  # an image of a case folder (t1c, flair, ...), not a label map
            case = case or ("_".join(folders) if marked and folders else stem)
            if case in found:
                raise InputError(f"two {what}s for case {case}: {found[case].path} and {path}; keep one")
            found[case] = LabelMap(case, path, _aliases(case, folders))
    return sorted(found.values(), key=lambda t: t.case)


def find_flat_label_maps(folder: str | os.PathLike[str], what: str = "prediction") -> dict[str, Path]:
    """Case id -> label map, for the NIfTI files directly in ``folder`` (as batch segmentation names them).

    Raises ``InputError`` for a missing folder and for two files of one case.
    """
    folder = _existing_folder(folder, what)
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or nifti_suffix(path) is None or not path.is_file():
            continue
        stem = nifti_stem(path)
        case = label_marker(stem)[1] or stem
        if case in found:
            raise InputError(f"two {what}s for case {case}: {found[case].name} and {path.name} in {folder}; "
                             "keep one")
        found[case] = path
    return found


def _aliases(case: str, folders: Sequence[str]) -> tuple[str, ...]:
    """Other names of a case: its folder (BraTS case folder, BIDS subject), folder path, BIDS subject."""
    aliases = []
    if folders:
        aliases += ["_".join(folders), folders[0]]
    if case.startswith("sub-"):
        aliases.append(case.split("_")[0])
    return tuple(dict.fromkeys(a for a in aliases if a != case))


def _existing_folder(path: str | os.PathLike[str], what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such {what.replace(' ', '-')} folder; check the path")
    if not path.is_dir():
        raise InputError(f"{path} is a file; give the {what.replace(' ', '-')} folder")
    return path


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
            if depth < _MAX_DEPTH and not d.startswith(".") and d.lower() != DERIVATIVES
        )
        files.extend(
            Path(root, n) for n in sorted(names) if not n.startswith(".") and nifti_suffix(Path(n))
        )
    return files


def _modality_of(
    file: Path, specs: Sequence[ModalitySpec], lookup: dict[str, str], folder: Path
) -> str | None:
    """The canonical modality ``file`` holds, or None when its name matches no input."""
    stem = nifti_stem(file).lower()
    indexed = NNUNET_CHANNEL.fullmatch(stem)
    if indexed:
        index = int(indexed.group(2))
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
