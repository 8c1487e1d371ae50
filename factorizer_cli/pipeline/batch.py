"""Segment every case of a dataset folder: find, shard, skip what is done, survive bad cases.

A batch is safe to stop and start again, and to split across machines without a coordinator: each
output appears whole or not at all (atomic writes, the label map last), finished cases are skipped,
and ``--shard K/N`` gives every worker a fixed share of the cases, decided by the case name alone.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FactorizerError, InputError
from ..io import find_modalities
from ..io.images import nifti_suffix, remove_stale_temporaries
from .segment import Segmenter

_NNUNET_CHANNEL = re.compile(r"(.+)_(\d{4})$")


@dataclass(frozen=True)
class Case:
    name: str
    files: tuple[Path, ...] = ()  # in the model's modality order; empty when they could not be found
    problem: str = ""  # why the files could not be found


@dataclass
class CaseResult:
    name: str
    status: str  # "done", "skipped" or "failed"
    seconds: float = 0.0
    output: str = ""
    volumes: dict = field(default_factory=dict)
    error: str = ""


def find_cases(folder: str | Path, specs, pattern: str | None = None) -> list[Case]:
    """The cases of a dataset folder, sorted by name.

    Each subfolder is a case (BraTS ``BraTS-GLI-00000-000/``, ISLES ``sub-strokecase0001/``), its
    modalities found by name; NIfTI files directly in the folder are nnU-Net style, grouped by the
    part before ``_0000``. ``pattern`` (a glob relative to ``folder``, e.g. ``"*/ses-*"``) picks the
    case folders instead; nested ones are named by their path with ``_`` (``sub-01_ses-1``). A case
    whose files cannot be matched is kept, with the problem, so that it is reported, not dropped.
    """
    folder = Path(folder)
    cases = []
    if pattern:
        folders = sorted(p for p in folder.glob(pattern) if p.is_dir())
    else:
        folders = sorted(p for p in folder.iterdir()  # derivatives/ holds labels (BIDS), not cases
                         if p.is_dir() and not p.name.startswith(".") and p.name != "derivatives")
    for sub in folders:
        name = "_".join(sub.relative_to(folder).parts)
        try:
            cases.append(Case(name, tuple(find_modalities(sub, specs).values())))
        except InputError as err:
            cases.append(Case(name, problem=str(err)))
    if pattern:
        return cases
    flat: dict[str, list[Path]] = {}
    for file in sorted(folder.iterdir()):
        suffix = nifti_suffix(file)
        match = _NNUNET_CHANNEL.fullmatch(file.name[: -len(suffix)]) if suffix and file.is_file() else None
        if match:
            flat.setdefault(match.group(1), []).append(file)
    for name, files in flat.items():
        if len(files) == len(specs):
            cases.append(Case(name, tuple(sorted(files))))
        else:
            cases.append(Case(name, problem=f"{folder}: case {name} has {len(files)} channel files "
                                            f"({', '.join(f.name for f in files)}); the model takes {len(specs)}"))
    return sorted(cases, key=lambda c: c.name)


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` (1 ≤ K ≤ N) → (K, N)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise InputError(f"--shard {text!r}: write K/N with 1 <= K <= N, e.g. --shard 2/8")
    return int(match.group(1)), int(match.group(2))


def in_shard(name: str, k: int, n: int) -> bool:
    """Worker K of N takes the cases whose name hashes to K − 1 modulo N: stable as cases come and go."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % n == k - 1


def output_path(output_dir: Path, case: Case) -> Path:
    """The case's label map, named after the case as its dataset names it (BraTS-GLI-00000-000.nii.gz)."""
    return output_dir / f"{case.name}.nii.gz"


def run_batch(
    cases: Sequence[Case],
    segmenter: Segmenter,
    output_dir: Path,
    overwrite: bool = False,
    stop: threading.Event | None = None,
    on_result: Callable[[CaseResult, int, int], None] | None = None,
    read_ahead: bool = True,
) -> list[CaseResult]:
    """Segment ``cases`` into ``output_dir``; one failure is recorded and the batch goes on.

    With ``read_ahead`` the next case is read and preprocessed on a second thread while this one
    runs on the network. ``stop`` (set from a SIGTERM handler) ends the batch after the current case.
    """
    remove_stale_temporaries(output_dir)  # what a killed earlier run was writing
    todo = [c for c in cases if overwrite or not output_path(output_dir, c).exists()]
    results = [CaseResult(c.name, "skipped", output=str(output_path(output_dir, c)))
               for c in cases if c not in todo]
    with ThreadPoolExecutor(max_workers=1) as pool:
        def prepare(case: Case) -> Future | None:
            if not case.files:
                return None
            return pool.submit(segmenter.prepare, case.files) if read_ahead else None

        ahead = prepare(todo[0]) if todo else None
        for i, case in enumerate(todo):
            if stop is not None and stop.is_set():
                break
            current, ahead = ahead, (prepare(todo[i + 1]) if i + 1 < len(todo) else None)
            start = time.perf_counter()
            result = CaseResult(case.name, "failed", output=str(output_path(output_dir, case)))
            try:
                if case.problem:
                    raise InputError(case.problem)
                prepared = current.result() if current is not None else segmenter.prepare(case.files)
                segmentation = segmenter.finish(prepared)
                segmentation.write(output_path(output_dir, case))
                result.status, result.volumes = "done", segmentation.volumes()
            except FactorizerError as err:
                result.error = str(err)
            except Exception as err:  # a bug must not sink the other cases; keep its trace for the report
                result.error = f"unexpected {type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"
            result.seconds = round(time.perf_counter() - start, 3)
            results.append(result)
            if on_result:
                on_result(result, len(results), len(cases))
        if ahead is not None:
            ahead.cancel()
    return results
