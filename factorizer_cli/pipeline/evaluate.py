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
without a ground truth are listed and not scored. With ``lesion_wise`` every case is also scored
lesion by lesion (``lesions``: per-patient IOU, precision, recall, lesions detected by size, the
small-lesion slices), over its nonzero labels. The math lives in ``metrics`` and ``lesions``; this
module reads.
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
from . import lesions, metrics

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
LESION_CONVENTIONS = {
    "lesion_mask": "nonzero labels",
    "overlap": "per-patient Dice, IOU, precision, recall over voxels; dataset: mean over patients",
    "overlap_both_empty": 1.0,
    "overlap_one_empty": "Dice and IOU 0; precision (empty prediction) or recall (empty truth) null",
    "connectivity": "26 in 3D (faces, edges, corners); 8 in 2D slices",
    "detected": "a true lesion with any voxel predicted (any overlap)",
    "hit": "a predicted component with any voxel in a true lesion",
    "detection_recall": "detected / true lesions",
    "detection_precision": "hits / predicted components",
    "detection_f1": "harmonic mean of the two; 0 when either is 0; 1 with no true and no predicted lesion",
    "size_bins": "component volume in mm3 (voxels x voxel volume), each component by its own volume",
    "dataset_detection": "counts pooled over cases, then the ratios",
    "small_lesion_slices": "slices along the last array axis whose truth has lesions, all <= 100 pixels "
                           "(8-connected in the slice)",
    "small_lesion_dice": "pooled: 2 sum|P&T| / (sum|P| + sum|T|) over the small-lesion slices of all cases",
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
    lesions: lesions.LesionScore | None = None  # with lesion_wise only

    def to_dict(self) -> dict:
        """The case's JSON record; ``lesions`` only when it was scored lesion-wise."""
        record = {k: v for k, v in vars(self).items() if k != "lesions"}
        if self.lesions is not None:
            record["lesions"] = self.lesions.to_dict()
        return record


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

    @property
    def lesion_wise(self) -> bool:
        """Whether the cases were scored lesion by lesion as well."""
        return bool(self.cases) and all(c.lesions is not None for c in self.cases)

    def summary(self) -> dict[str, dict[str, dict[str, float | int]]]:
        return metrics.summarize_cases([c.metrics for c in self.cases], self.regions)

    def lesion_summary(self) -> lesions.LesionSummary:
        """Per-patient overlap statistics, pooled lesion counts by size, pooled small-lesion Dice."""
        if not self.lesion_wise:
            raise ValueError("the cases were not scored lesion-wise; evaluate with lesion_wise=True")
        return lesions.summarize([c.lesions for c in self.cases])

    def to_dict(self) -> dict:
        """The JSON report: NaN (an HD95 with one mask empty) becomes ``null``."""
        report = {
            "regions": self.regions,
            "region_definitions": metrics.REGION_DEFINITIONS[self.regions],
            "conventions": CONVENTIONS,
            "summary": self.summary(),
            "cases": [c.to_dict() for c in self.cases],
            "missing_predictions": self.missing,
            "unmatched_predictions": [str(p) for p in self.unmatched_predictions],
        }
        if self.lesion_wise:
            report["lesion_conventions"] = LESION_CONVENTIONS
            report["lesion_summary"] = self.lesion_summary().to_dict()
        return _json_safe(report)

    def csv_text(self) -> str:
        """One row per case, then rows ``mean``, ``std``, ``median`` (status ``summary``); NaN is blank.

        Lesion-wise, each row also holds the ``lesion_columns``, and a last
        row ``pooled`` holds the dataset's pooled lesion counts, detection ratios and small-lesion
        Dice (blank where pooling means nothing).
        """
        names = metrics.REGION_SETS[self.regions]
        columns = [f"{name}_{metric}" for name in names for metric in metrics.METRICS]
        extra = lesion_columns() if self.lesion_wise else []
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["case", "status", *columns, *extra, "prediction", "truth"])
        rows = [lesion_row(c.lesions) for c in self.cases] if extra else [{} for _ in self.cases]
        for c, row in zip(self.cases, rows):
            values = [c.metrics[name][metric] for name in names for metric in metrics.METRICS]
            values += [row[column] for column in extra]
            writer.writerow([c.case, c.status, *map(_csv_number, values), c.prediction, c.truth])
        summary = self.summary()
        for statistic in ("mean", "std", "median"):
            values = [summary[name][metric][statistic] for name in names for metric in metrics.METRICS]
            values += [metrics.summarize([row[column] for row in rows])[statistic] for column in extra]
            writer.writerow([statistic, "summary", *map(_csv_number, values), "", ""])
        if extra:
            pooled = lesion_row(self.lesion_summary())
            values = [math.nan] * len(columns) + [pooled.get(column, math.nan) for column in extra]
            writer.writerow(["pooled", "summary", *map(_csv_number, values), "", ""])
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
    lesion_wise: bool = False,
) -> Evaluation:
    """Dice and HD95 of every region for every case; ``regions`` is ``auto``, ``brats`` or ``lesion``.

    ``lesion_wise`` also scores each case's nonzero labels lesion by lesion (``lesions.score_case``,
    default size bins). Voxel spacing comes from each ground truth's affine. Raises ``InputError``
    naming the file for a prediction whose grid (shape, affine) differs from its truth's, and for
    unreadable files.
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
        true_labels = truth.array.astype(np.int32)
        case_metrics = metrics.evaluate_case(pred_labels, true_labels, truth.spacing, regions)
        lesion_score = lesions.score_case(pred_labels, true_labels, truth.spacing) if lesion_wise else None
        scores.append(CaseScore(pair.case, "ok" if pair.prediction else "missing", str(pair.truth),
                                str(pair.prediction or ""), case_metrics, lesion_score))
        if progress:
            progress(i + 1, len(pairs))
    return Evaluation(regions, scores, unmatched)


def lesion_columns(bins: tuple[lesions.SizeBin, ...] | None = None) -> list[str]:
    """The CSV columns of a lesion-wise report, in order.

    ``overlap_dice`` ... ``overlap_recall`` (per-patient, over voxels), ``lesions_true``, ``_detected``,
    ``_predicted``, ``_hits`` and ``detection_recall``, ``_precision``, ``_f1`` (all sizes), the four
    counts per size bin (``lesions_le100_true``, ...), and ``small_lesion_slices``, ``small_lesion_dice``.
    """
    bins = bins if bins is not None else lesions.size_bins()
    counts = ("true", "detected", "predicted", "hits")
    return [*(f"overlap_{m}" for m in lesions.OVERLAP_METRICS), *(f"lesions_{c}" for c in counts),
            "detection_recall", "detection_precision", "detection_f1",
            *(f"lesions_{b.key}_{c}" for b in bins for c in counts), "small_lesion_slices", "small_lesion_dice"]


def lesion_row(score: lesions.LesionScore | lesions.LesionSummary) -> dict[str, float | int]:
    """The ``lesion_columns`` values of one case, or of a dataset (pooled; no per-patient overlap)."""
    row: dict[str, float | int] = {}
    if isinstance(score, lesions.LesionScore):
        row.update({f"overlap_{m}": score.overlap[m] for m in lesions.OVERLAP_METRICS})
    for key, counts in score.detection.items():
        prefix = "lesions" if key == "all" else f"lesions_{key}"
        row.update({f"{prefix}_true": counts.true, f"{prefix}_detected": counts.detected,
                    f"{prefix}_predicted": counts.predicted, f"{prefix}_hits": counts.hits})
    whole = score.detection["all"]
    row.update({"detection_recall": whole.recall, "detection_precision": whole.precision, "detection_f1": whole.f1,
                "small_lesion_slices": score.small_lesions.slices, "small_lesion_dice": score.small_lesions.dice})
    return row


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
