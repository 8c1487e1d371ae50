"""Segment every case of a dataset folder: find, shard, skip what is done, survive bad cases.

A batch is safe to stop and start again, and to split across machines without a coordinator: each
output appears whole or not at all (atomic writes, the label map last), finished cases are skipped,
and ``--shard K/N`` gives every worker a fixed share of the cases, decided by the case name alone.

``plan_dataset`` finds the cases and checks the output folder before any model is loaded; its
``run`` (or ``segment_dataset``, both steps at once) segments them and returns a ``DatasetReport``,
which writes ``summary.json`` (``summary-K-of-N.json`` for a shard).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FactorizerError, InputError
from ..io.atomic import make_folder, remove_stale_temporaries, write_json_atomic
from ..io.cases import Case, find_cases
from ..io.images import check_output_path
from ..zoo.card import ModelCard
from .segment import Segmenter

__all__ = ["Case", "CaseResult", "DatasetPlan", "DatasetReport", "find_cases", "in_shard", "output_path",
           "parse_shard", "plan_dataset", "run_batch", "segment_dataset", "summary_name"]

OnResult = Callable[["CaseResult", int, int], None]  # (result, cases reported so far, cases in all)


@dataclass
class CaseResult:
    name: str
    status: str  # "done", "skipped" or "failed"
    seconds: float = 0.0
    output: str = ""
    volumes: dict = field(default_factory=dict)
    error: str = ""


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


def summary_name(shard: tuple[int, int]) -> str:
    """``summary.json``, or ``summary-K-of-N.json`` for one worker's share: workers never clash."""
    k, n = shard
    return "summary.json" if n == 1 else f"summary-{k}-of-{n}.json"


@dataclass
class DatasetReport:
    """What a batch did, case by case; ``write`` records it as ``summary.json``."""

    model: str
    output_dir: Path
    shard: tuple[int, int]
    stopped: bool  # by ``stop_event`` (SIGTERM in the command) before every case was done
    results: list[CaseResult]

    @property
    def counts(self) -> dict[str, int]:
        """How many cases were done, skipped (their label map was there) and failed."""
        return {s: sum(r.status == s for r in self.results) for s in ("done", "skipped", "failed")}

    @property
    def failed(self) -> int:
        return self.counts["failed"]

    @property
    def summary_path(self) -> Path:
        return self.output_dir / summary_name(self.shard)

    def to_dict(self) -> dict:
        return {"model": self.model, "shard": f"{self.shard[0]}/{self.shard[1]}", "stopped": self.stopped,
                "cases": [vars(r) for r in self.results]}

    def write(self, path: str | os.PathLike[str] | None = None) -> Path:
        """The report as JSON, whole or not at all; by default at ``summary_path``. Returns the path."""
        path = Path(path) if path is not None else self.summary_path
        write_json_atomic(path, self.to_dict())
        return path


@dataclass(frozen=True)
class DatasetPlan:
    """The cases of one batch run and where they go, checked before any model is loaded."""

    folder: Path
    output_dir: Path
    cases: tuple[Case, ...]
    shard: tuple[int, int] = (1, 1)
    overwrite: bool = False

    def run(self, segmenter: Segmenter, *, stop_event: threading.Event | None = None,
            on_result: OnResult | None = None, read_ahead: bool = True) -> DatasetReport:
        """Segment the cases; ``stop_event`` set (e.g. from a SIGTERM handler) ends after the current one."""
        results = run_batch(self.cases, segmenter, self.output_dir, overwrite=self.overwrite, stop=stop_event,
                            on_result=on_result, read_ahead=read_ahead)
        stopped = stop_event is not None and stop_event.is_set()
        return DatasetReport(segmenter.card.name, self.output_dir, self.shard, stopped, results)


def plan_dataset(card: ModelCard, folder: str | os.PathLike[str], output_dir: str | os.PathLike[str], *,
                 overwrite: bool = False, shard: str | tuple[int, int] | None = None,
                 pattern: str | None = None) -> DatasetPlan:
    """Find this worker's cases (``shard`` ``"K/N"``) for a model with ``card``; create the output folder.

    Raises ``InputError`` when there are no cases (in this shard) and ``OutputError`` when the output
    folder cannot be created or its summary written.
    """
    folder, output_dir = Path(folder), Path(output_dir)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such dataset folder; check the path")
    k, n = parse_shard(shard) if isinstance(shard, str) else (shard or (1, 1))
    cases = tuple(c for c in find_cases(folder, card.modality_specs, pattern) if in_shard(c.name, k, n))
    if not cases:
        raise InputError(f"{folder}: no cases found{f' in shard {k}/{n}' if n > 1 else ''}; give a folder of "
                         "case folders (BraTS, ISLES) or of nnU-Net files (CASE_0000.nii.gz)")
    make_folder(output_dir)
    check_output_path(output_dir / summary_name((k, n)), [])
    return DatasetPlan(folder, output_dir, cases, (k, n), overwrite)


def segment_dataset(segmenter: Segmenter, folder: str | os.PathLike[str], output_dir: str | os.PathLike[str], *,
                    overwrite: bool = False, shard: str | tuple[int, int] | None = None,
                    pattern: str | None = None, stop_event: threading.Event | None = None,
                    on_result: OnResult | None = None) -> DatasetReport:
    """Segment every case of ``folder`` (this worker's share) into ``output_dir/<case>.nii.gz``.

    Cases whose label map exists are skipped unless ``overwrite``; a failed case is recorded and the
    rest go on. Write the returned report with ``report.write()``.
    """
    plan = plan_dataset(segmenter.card, folder, output_dir, overwrite=overwrite, shard=shard, pattern=pattern)
    return plan.run(segmenter, stop_event=stop_event, on_result=on_result)
