"""Score a folder of predicted label maps against a folder of ground truths, case by case.

Pairing is by case id. Predictions are the NIfTI files directly in the prediction folder, named after
their case as ``factorizer segment`` batch mode writes them (``BraTS-GLI-00000-000.nii.gz``). Ground
truths are found in any of the layouts of the field:

* BraTS case folders holding ``<case>-seg.nii.gz`` (or ``_seg``);
* ISLES'22 BIDS derivatives ``derivatives/sub-X/ses-Y/sub-X_ses-Y_msk.nii.gz`` (the case is
  ``sub-X_ses-Y``, or ``sub-X`` when that names one session only);
* nnU-Net ``labelsTr/CASE.nii.gz`` (and ``labelsTs``);
* label maps directly in the folder, named like the predictions.

A ground truth without a prediction is not skipped: it is scored as an empty prediction (Dice 0 for
every region the truth holds) and marked ``missing``, so a mean never hides a failed case. Predictions
without a ground truth are listed and not scored. The math lives in ``metrics``; this module reads.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.atomic import write_json_atomic, write_text_atomic
from ..io.cases import find_flat_label_maps, find_label_maps
from ..io.images import Image, read_label_map
from . import metrics

AFFINE_TOLERANCE_MM = 1e-3
CONVENTIONS = {
    "dice_both_empty": 1.0,
    "hd95_both_empty": 0.0,
    "hd95_one_empty": None,
    "hd95_units": "mm",
    "hd95": "max of the two directed 95th percentiles of surface-to-surface distances (as MONAI)",
    "missing_hd95": "left out of mean, std and median; n counts the values used",
    "missing_prediction": "scored as an empty prediction (Dice 0 wherever the truth has the region)",
}
GROUND_TRUTH_LAYOUTS = ("BraTS case folders with *-seg.nii.gz, ISLES derivatives with *_msk.nii.gz, "
                        "nnU-Net labelsTr/CASE.nii.gz, or label maps named like the predictions")


@dataclass(frozen=True)
class Pair:
    case: str
    truth: Path
    prediction: Path | None  # None: no prediction for this case


@dataclass
class CaseScore:
    case: str
    status: str  # "ok", or "missing" (no prediction: scored as an empty one)
    truth: str
    prediction: str
    metrics: dict[str, dict[str, float]]


@dataclass
class Evaluation:
    """Per-case scores of one prediction folder, their summary, and what could not be paired."""

    regions: str
    cases: list[CaseScore]
    unmatched_predictions: list[Path] = field(default_factory=list)

    @property
    def region_names(self) -> tuple[str, ...]:
        """The regions scored, in report order (``ET, TC, WT`` or ``lesion``)."""
        return tuple(metrics.REGION_SETS[self.regions])

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(metrics.METRICS)

    @property
    def missing(self) -> list[str]:
        return [c.case for c in self.cases if c.status == "missing"]

    def summary(self) -> dict[str, dict[str, dict[str, float | int]]]:
        return metrics.summarize_cases([c.metrics for c in self.cases], self.regions)

    def to_dict(self) -> dict:
        """The JSON report: NaN (an HD95 with one mask empty) becomes ``null``."""
        return _json_safe({
            "regions": self.regions,
            "region_definitions": metrics.REGION_DEFINITIONS[self.regions],
            "conventions": CONVENTIONS,
            "summary": self.summary(),
            "cases": [vars(c) for c in self.cases],
            "missing_predictions": self.missing,
            "unmatched_predictions": [str(p) for p in self.unmatched_predictions],
        })

    def csv_text(self) -> str:
        """One row per case, then rows ``mean``, ``std``, ``median`` (status ``summary``); NaN is blank."""
        names = metrics.REGION_SETS[self.regions]
        columns = [f"{name}_{metric}" for name in names for metric in metrics.METRICS]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["case", "status", *columns, "prediction", "truth"])
        for c in self.cases:
            values = [c.metrics[name][metric] for name in names for metric in metrics.METRICS]
            writer.writerow([c.case, c.status, *map(_csv_number, values), c.prediction, c.truth])
        summary = self.summary()
        for statistic in ("mean", "std", "median"):
            values = [summary[name][metric][statistic] for name in names for metric in metrics.METRICS]
            writer.writerow([statistic, "summary", *map(_csv_number, values), "", ""])
        return out.getvalue()

    def write_csv(self, path: str | os.PathLike[str]) -> None:
        write_text_atomic(path, self.csv_text())

    def write_json(self, path: str | os.PathLike[str]) -> None:
        write_json_atomic(path, self.to_dict())


def pair_cases(pred_dir: str | os.PathLike[str], gt_dir: str | os.PathLike[str]) -> tuple[list[Pair], list[Path]]:
    """Every ground truth with its prediction (or None), and the predictions that match no truth.

    A prediction matches the truth whose case id it bears, else the one truth with that alias.
    Raises ``InputError`` when either folder holds nothing usable or no prediction matches any truth.
    """
    truths = find_label_maps(gt_dir, "ground truth")
    if not truths:
        raise InputError(f"{gt_dir}: no ground truths found; expected {GROUND_TRUTH_LAYOUTS}")
    predictions = find_flat_label_maps(pred_dir, "prediction")
    if not predictions:
        raise InputError(f"{pred_dir}: no predictions (.nii.gz or .nii files) in this folder; give the "
                         "folder that `factorizer segment` wrote")
    alias_count: dict[str, int] = {}
    for truth in truths:
        for alias in set(truth.aliases) - {truth.case}:
            alias_count[alias] = alias_count.get(alias, 0) + 1
    used: set[str] = set()
    pairs = []
    for truth in truths:
        names = [truth.case, *(a for a in truth.aliases if alias_count.get(a) == 1)]
        key = next((n for n in names if n in predictions and n not in used), None)
        if key is not None:
            used.add(key)
        pairs.append(Pair(truth.case, truth.path, predictions[key] if key is not None else None))
    unmatched = [path for key, path in predictions.items() if key not in used]
    if len(unmatched) == len(predictions):
        raise InputError(
            f"no prediction in {pred_dir} matches a ground truth in {gt_dir} (predictions like "
            f"{unmatched[0].name}, truths of cases like {truths[0].case}); name each prediction after its "
            f"case, e.g. {truths[0].case}.nii.gz"
        )
    return pairs, unmatched


def detect_dataset_regions(truth_paths: Sequence[Path]) -> str:
    """``"brats"`` or ``"lesion"`` from the labels of the ground truths.

    Reads truths until a BraTS label (2, 3 or 4) settles it; binary masks are read to the end.
    """
    found: set[int] = set()
    for path in truth_paths:
        found |= {int(v) for v in np.unique(read_label_map(path).array)}
        if metrics.detect_regions(found) == "brats":
            return "brats"
    regions = metrics.detect_regions(found)
    if regions is None:
        shown = ", ".join(map(str, sorted(found))) or "none"
        raise InputError(f"ground-truth labels ({shown}) fit neither BraTS (1, 2, 3 or 4) nor a binary lesion "
                         "mask; say which with --regions brats or --regions lesion")
    return regions


def evaluate_folders(
    pred_dir: str | os.PathLike[str],
    gt_dir: str | os.PathLike[str],
    regions: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Dice and HD95 of every region for every case; ``regions`` is ``auto``, ``brats`` or ``lesion``.

    Voxel spacing comes from each ground truth's affine. Raises ``InputError`` naming the file for a
    prediction whose grid (shape, affine) differs from its truth's, and for unreadable files.
    """
    if regions not in ("auto", *metrics.REGION_SETS):
        raise InputError(f"unknown regions {regions!r}; choose auto, brats or lesion")
    pairs, unmatched = pair_cases(pred_dir, gt_dir)
    if regions == "auto":
        regions = detect_dataset_regions([p.truth for p in pairs])
    scores = []
    for i, pair in enumerate(pairs):
        truth = read_label_map(pair.truth)
        if pair.prediction is None:
            pred_labels = np.zeros(truth.shape, dtype=np.int32)
        else:
            prediction = read_label_map(pair.prediction)
            check_same_grid(prediction, truth)
            pred_labels = prediction.array.astype(np.int32)
        case_metrics = metrics.evaluate_case(pred_labels, truth.array.astype(np.int32), truth.spacing, regions)
        scores.append(CaseScore(pair.case, "ok" if pair.prediction else "missing", str(pair.truth),
                                str(pair.prediction or ""), case_metrics))
        if progress:
            progress(i + 1, len(pairs))
    return Evaluation(regions, scores, unmatched)


def check_same_grid(prediction: Image, truth: Image) -> None:
    """Raise ``InputError`` unless the prediction lies on its truth's voxel grid (shape and affine)."""
    if prediction.shape != truth.shape:
        raise InputError(f"{prediction.path}: shape {prediction.shape} differs from its ground truth "
                         f"{truth.path.name} {truth.shape}; predict on the ground truth's grid")
    if not np.allclose(prediction.affine, truth.affine, atol=AFFINE_TOLERANCE_MM, rtol=0):
        gap = float(np.abs(prediction.affine - truth.affine).max())
        raise InputError(f"{prediction.path}: affine differs from its ground truth {truth.path.name} (by up to "
                         f"{gap:.3g} mm); predict on the ground truth's grid")


def _csv_number(value: float | int) -> str:
    return "" if isinstance(value, float) and math.isnan(value) else f"{value:.6g}"


def _json_safe(value):
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
