"""K-fold cross-validation splits: which cases validate in fold i, the same on every machine.

A split is a pure function of the case names, K, the seed and (optionally) a stratum per case: the
names are sorted, shuffled with ``default_rng(seed)``, and dealt round-robin into K folds, stratum
after stratum, so that each fold gets its share of every stratum (e.g. tumour grade or scanner from a
CSV) and the fold sizes differ by at most one. A run writes its split to ``split.json``; resuming
reads it back instead of recomputing, so a changed folder or CSV cannot move cases between folds
mid-run.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, InputError
from ..io.atomic import write_json_atomic

SPLIT_FILE = "split.json"


@dataclass(frozen=True)
class Split:
    folds: int  # 0: no cross-validation (the last cases by name validate)
    fold: int
    seed: int
    stratify: str | None  # "FILE:COLUMN" it was stratified by, for the record
    training: tuple[str, ...]
    validation: tuple[str, ...]

    def save(self, folder: Path) -> None:
        write_json_atomic(folder / SPLIT_FILE, asdict(self))

    @classmethod
    def load(cls, folder: Path) -> Split:
        path = folder / SPLIT_FILE
        try:
            data = json.loads(path.read_text())
            return cls(**{**data, "training": tuple(data["training"]), "validation": tuple(data["validation"])})
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ConfigError(f"{path}: not a readable split of factorizer train ({type(err).__name__}: {err}); "
                              "restore it from the run that wrote it") from None


def fold_of_each(names: Sequence[str], folds: int, seed: int = 0,
                 strata: Mapping[str, str] | None = None) -> dict[str, int]:
    """Every case's fold, 0 .. folds-1 (see the module docstring for how they are dealt)."""
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    if len(set(names)) < folds:
        raise ConfigError(f"{len(set(names))} cases cannot fill {folds} folds; lower --folds or add cases")
    groups: dict[str, list[str]] = {}
    for name in sorted(set(names)):
        groups.setdefault("" if strata is None else strata[name], []).append(name)
    rng = np.random.default_rng(seed)
    assigned, dealt = {}, 0
    for stratum in sorted(groups):
        for name in rng.permutation(groups[stratum]).tolist():
            assigned[name] = dealt % folds
            dealt += 1
    return assigned


def split_cases(names: Sequence[str], folds: int, fold: int, seed: int = 0,
                strata: Mapping[str, str] | None = None, stratify: str | None = None) -> Split:
    """The training and validation cases of ``fold`` (0-based) among ``folds``."""
    if not 0 <= fold < max(folds, 1):
        raise ConfigError(f"--fold must be 0 .. {folds - 1} with --folds {folds}, got {fold}")
    assigned = fold_of_each(names, folds, seed, strata)
    validation = tuple(n for n in sorted(assigned) if assigned[n] == fold)
    training = tuple(n for n in sorted(assigned) if assigned[n] != fold)
    return Split(folds, fold, seed, stratify, training, validation)


def read_strata(path: str | Path, column: str, names: Sequence[str]) -> dict[str, str]:
    """Each case's value in ``column`` of a CSV whose ``case`` column (else its first) names the cases."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{path}: cannot read the stratification CSV ({err})") from None
    header = list(rows[0]) if rows else []
    if column not in header:
        raise InputError(f"{path}: no column {column!r} (columns: {', '.join(header) or 'none'}); "
                         "pass one of them to --stratify-column")
    key = "case" if "case" in header else header[0]
    values = {(row[key] or "").strip(): (row[column] or "").strip() for row in rows}
    missing = [n for n in names if n not in values]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise InputError(f"{path}: no row for case(s) {', '.join(missing[:3])}{more} (looked in column "
                         f"{key!r}); add them, or leave stratification out")
    return {n: values[n] for n in names}
