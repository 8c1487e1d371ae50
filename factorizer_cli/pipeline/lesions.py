"""Lesion-wise evaluation of binary lesion masks, as pure functions on arrays (no file is read here).

What a Dice of 0.7 hides is whether the small lesions were found: one large infarct dominates the
voxel count. So besides per-patient overlap we count lesions (connected components) found and
missed, by size, and score the slices that hold only small lesions, as the SPiN paper does (Wong et
al., MICCAI BrainLes 2021). ``factorizer_cli.pipeline.evaluate`` reads the files and calls these.

Conventions, the same in the library, the CLI and its reports:

* The lesion mask is every nonzero label (for BraTS label maps that is the whole tumour).
* **Per-patient overlap**: Dice, IOU, precision |P∩T|/|P| and recall |P∩T|/|T| over voxels; a
  dataset's figure is the mean over patients, as the paper reports (upstream averages per scan).
* **Empty masks, one rule for every ratio**: with both masks empty every ratio is 1 (nothing to
  find, nothing found, as ``metrics.dice``); a ratio whose own denominator is empty while the other
  mask is not is undefined (NaN: precision of an empty prediction, recall on an empty truth), shown
  as missing and left out of means, whose ``n`` says how many values they used; Dice and IOU are
  then 0. Upstream SPiN scores all four as 0 whenever a denominator is 0; on cases where both masks
  hold a lesion the two agree.
* **Lesions** are connected components with full connectivity: 26 neighbours in 3D (faces, edges
  and corners), 8 in 2D; ``scipy.ndimage.label`` with a 3×3×3 structure of ones finds the same.
* **Detection**: a true lesion is *detected* when any voxel of it is predicted (any overlap, no
  minimum fraction: a small lesion touched is found; the overlap's quality is Dice's business). A
  predicted component is a *hit* when any voxel of it is a true lesion's; otherwise it is a false
  positive. Detection recall = detected / true lesions; detection precision = hits / predicted
  components; F1 = their harmonic mean, 0 when either is 0 (the undefined one then included), 1
  when there are neither true nor predicted lesions. A lesion split into two predicted pieces is one
  detection and two hits; two lesions merged by one prediction are two detections and one hit.
  ISLES'22's count form 2·TP / (2·TP + FP + FN) is recoverable from the counts reported
  (TP = detected, FP = predicted − hits, FN = true − detected).
* **Size bins** by volume in mm³ (voxel count × voxel volume), so a bin means the same on a 1 mm
  grid and on a 1×1×3 mm one; on ATLAS's 1 mm grid mm³ are voxels. Default bins ≤ 100, (100, 1000],
  > 1000 mm³. Each component is binned by its own volume: true lesions for recall, predicted
  components for precision, so a small lesion found by a large blob is a small-bin detection and a
  large-bin hit.
* **Dataset detection figures pool the counts** over all cases (sum of detected / sum of true
  lesions, ...), so a case with one lesion weighs one lesion, not one patient.
* **Small-lesion subset** (the paper's): the axial slices (along the last array axis) whose truth
  holds at least one lesion and whose 2D lesions (8-connected in the slice) are all ≤ 100 pixels, as
  upstream selects them (in pixels, not mm², as the paper). Its Dice is pooled: the qualifying slices
  of every case stacked into one volume, 2·Σ|P∩T| / (Σ|P| + Σ|T|), as upstream computes it;
  the per-case value is the same over that case's slices only (NaN when it has none).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from . import metrics

DEFAULT_BIN_EDGES_MM3: tuple[float, ...] = (100.0, 1000.0)
SMALL_LESION_PIXELS = 100
OVERLAP_METRICS = ("dice", "iou", "precision", "recall")

# ------------------------------------------------------------------------------- size bins


@dataclass(frozen=True)
class SizeBin:
    """Component volumes in (low, high] mm³; ``key`` names it in CSV and JSON, ``label`` in tables."""

    low: float
    high: float

    @property
    def key(self) -> str:
        if self.low <= 0:
            return f"le{self.high:g}"
        if math.isinf(self.high):
            return f"gt{self.low:g}"
        return f"{self.low:g}-{self.high:g}"

    @property
    def label(self) -> str:
        if self.low <= 0:
            return f"≤{self.high:g}"
        if math.isinf(self.high):
            return f">{self.low:g}"
        return f"{self.low:g}–{self.high:g}"

    def holds(self, volume: float | np.ndarray) -> bool | np.ndarray:
        """Whether ``volume`` (mm³; or each of an array of them) falls in this bin."""
        return (volume > self.low) & (volume <= self.high)


def size_bins(edges: Sequence[float] = DEFAULT_BIN_EDGES_MM3) -> tuple[SizeBin, ...]:
    """The bins cut at ``edges`` (mm³, increasing, each bin's upper edge inclusive), the last open."""
    edges = [float(e) for e in edges]
    if not edges or any(e <= 0 or not math.isfinite(e) for e in edges) or sorted(set(edges)) != edges:
        raise ValueError(f"bin edges must be positive, finite and increasing, got {edges}")
    bounds = [0.0, *edges, math.inf]
    return tuple(SizeBin(low, high) for low, high in zip(bounds[:-1], bounds[1:]))


# ------------------------------------------------------------------------------- components


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a 2D or 3D mask with full connectivity (8 in 2D, 26 in 3D).

    Returns the label array (0 background, 1..n components) and n. SimpleITK (already a dependency)
    does the labelling; the tests check it against ``scipy.ndimage.label`` with a structure of ones.
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.uint32), 0
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(image, True))
    return labels, int(labels.max())


# ------------------------------------------------------------------------------- ratios


def ratio(numerator: int, denominator: int, other: int) -> float:
    """``numerator / denominator`` under the module's empty-mask rule.

    ``other`` is the size of the other side (the truth for precision, the prediction for recall):
    an empty denominator gives 1 when the other side is empty too and NaN when it is not.
    """
    if denominator:
        return numerator / denominator
    return 1.0 if other == 0 else float("nan")


def f1(precision: float, recall: float) -> float:
    """Harmonic mean; 0 when either is 0 (whatever the other), NaN when one is NaN and the other is not 0
    (which lesion counts never give: an undefined recall comes with precision 0, and the reverse)."""
    if precision == 0 or recall == 0:
        return 0.0
    if math.isnan(precision) or math.isnan(recall):
        return float("nan")
    return 2 * precision * recall / (precision + recall)


def overlap(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Per-patient Dice, IOU, precision and recall of two binary masks (see the empty-mask rule)."""
    pred, true = _masks(pred, true)
    p, t = int(np.count_nonzero(pred)), int(np.count_nonzero(true))
    both = int(np.count_nonzero(pred & true))
    return {
        "dice": ratio(2 * both, p + t, 0),
        "iou": ratio(both, p + t - both, 0),
        "precision": ratio(both, p, t),
        "recall": ratio(both, t, p),
    }


# ------------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Counts:
    """Lesion counts of one case, or pooled over many (``+``), for one size bin or all."""

    true: int = 0  # true lesions
    detected: int = 0  # true lesions that a predicted component overlaps
    predicted: int = 0  # predicted components
    hits: int = 0  # predicted components that overlap a true lesion

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.true + other.true, self.detected + other.detected,
                      self.predicted + other.predicted, self.hits + other.hits)

    @property
    def recall(self) -> float:
        return ratio(self.detected, self.true, self.predicted)

    @property
    def precision(self) -> float:
        return ratio(self.hits, self.predicted, self.true)

    @property
    def f1(self) -> float:
        return f1(self.precision, self.recall)

    def to_dict(self) -> dict[str, float | int]:
        return {"true": self.true, "detected": self.detected, "predicted": self.predicted, "hits": self.hits,
                "recall": self.recall, "precision": self.precision, "f1": self.f1}


def detect(
    pred: np.ndarray,
    true: np.ndarray,
    spacing: Sequence[float] | None = None,
    bins: Sequence[SizeBin] | None = None,
) -> dict[str, Counts]:
    """Lesion counts, all sizes together (``"all"``) and per size bin (by ``SizeBin.key``).

    ``spacing`` is the voxel size in mm along each array axis (default 1), for the volumes that bin
    the components.
    """
    pred, true = _masks(pred, true)
    bins = tuple(bins) if bins is not None else size_bins()
    voxel_mm3 = float(np.prod(metrics._spacing(spacing, pred.ndim)))
    both = pred & true
    true_labels, n_true = label_components(true)
    pred_labels, n_pred = label_components(pred)
    true_volumes = np.bincount(true_labels.ravel(), minlength=n_true + 1)[1:] * voxel_mm3
    pred_volumes = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)[1:] * voxel_mm3
    detected = np.zeros(n_true, dtype=bool)
    detected[np.unique(true_labels[both]).astype(np.int64) - 1] = True
    hit = np.zeros(n_pred, dtype=bool)
    hit[np.unique(pred_labels[both]).astype(np.int64) - 1] = True

    def counts(true_in: np.ndarray, pred_in: np.ndarray) -> Counts:
        return Counts(int(true_in.sum()), int((detected & true_in).sum()), int(pred_in.sum()),
                      int((hit & pred_in).sum()))

    result = {"all": counts(np.ones(n_true, bool), np.ones(n_pred, bool))}
    for b in bins:
        result[b.key] = counts(b.holds(true_volumes), b.holds(pred_volumes))
    return result


# ------------------------------------------------------------------------------- small lesions


@dataclass(frozen=True)
class SliceOverlap:
    """Voxel sums over a set of slices, kept as sums so that cases pool into one Dice (``+``)."""

    slices: int = 0
    both: int = 0  # |P∩T|
    predicted: int = 0  # |P|
    true: int = 0  # |T|

    def __add__(self, other: SliceOverlap) -> SliceOverlap:
        return SliceOverlap(self.slices + other.slices, self.both + other.both,
                            self.predicted + other.predicted, self.true + other.true)

    @property
    def dice(self) -> float:
        """Dice of the stacked slices; NaN without slices (each slice holds a true lesion)."""
        return 2 * self.both / (self.predicted + self.true) if self.slices else float("nan")

    def to_dict(self) -> dict[str, float | int]:
        return {"slices": self.slices, "both": self.both, "predicted": self.predicted, "true": self.true,
                "dice": self.dice}


def small_lesion_slices(true: np.ndarray, max_pixels: int = SMALL_LESION_PIXELS) -> np.ndarray:
    """Indices along the last axis of the slices whose lesions are all ≤ ``max_pixels`` (at least one).

    Lesions here are the 8-connected components of each 2D slice, as upstream SPiN selects them.
    """
    true = np.asarray(true).astype(bool, copy=False)
    chosen = []
    for k in np.flatnonzero(true.reshape(-1, true.shape[-1]).any(axis=0)):
        labels, n = label_components(true[..., k])
        if np.bincount(labels.ravel(), minlength=n + 1)[1:].max() <= max_pixels:
            chosen.append(int(k))
    return np.asarray(chosen, dtype=np.int64)


def small_lesion_overlap(pred: np.ndarray, true: np.ndarray, max_pixels: int = SMALL_LESION_PIXELS) -> SliceOverlap:
    """The voxel sums of prediction and truth over the truth's small-lesion slices."""
    pred, true = _masks(pred, true)
    k = small_lesion_slices(true, max_pixels)
    p, t = pred[..., k], true[..., k]
    return SliceOverlap(int(k.size), int(np.count_nonzero(p & t)), int(np.count_nonzero(p)),
                        int(np.count_nonzero(t)))


# ------------------------------------------------------------------------------- one case, a dataset


@dataclass(frozen=True)
class LesionScore:
    """Everything lesion-wise about one case."""

    overlap: dict[str, float]
    detection: dict[str, Counts]
    small_lesions: SliceOverlap

    def to_dict(self) -> dict:
        return {"overlap": dict(self.overlap),
                "detection": {key: c.to_dict() for key, c in self.detection.items()},
                "small_lesions": self.small_lesions.to_dict()}


def score_case(
    pred_labels: np.ndarray,
    true_labels: np.ndarray,
    spacing: Sequence[float] | None = None,
    bins: Sequence[SizeBin] | None = None,
    max_pixels: int = SMALL_LESION_PIXELS,
) -> LesionScore:
    """Overlap, detection by size and small-lesion sums of one case; lesions are the nonzero labels."""
    pred, true = _masks(np.asarray(pred_labels) != 0, np.asarray(true_labels) != 0)
    return LesionScore(overlap(pred, true), detect(pred, true, spacing, bins),
                       small_lesion_overlap(pred, true, max_pixels))


@dataclass(frozen=True)
class LesionSummary:
    """A dataset's lesion-wise figures: per-patient overlap statistics, pooled counts and small-lesion Dice."""

    overlap: dict[str, dict[str, float | int]]  # metric -> metrics.summarize(...)
    detection: dict[str, Counts]  # "all" and each bin key -> pooled counts
    small_lesions: SliceOverlap
    small_lesion_cases: int  # cases with at least one small-lesion slice
    bins: tuple[SizeBin, ...] = field(default_factory=size_bins)

    def to_dict(self) -> dict:
        return {"overlap": self.overlap,
                "detection": {key: c.to_dict() for key, c in self.detection.items()},
                "small_lesions": {**self.small_lesions.to_dict(), "cases": self.small_lesion_cases},
                "bins_mm3": [{"key": b.key, "low": b.low, "high": b.high} for b in self.bins]}


def summarize(scores: Iterable[LesionScore], bins: Sequence[SizeBin] | None = None) -> LesionSummary:
    """Pool the cases' counts and small-lesion sums; ``metrics.summarize`` of the per-patient overlap.

    ``bins`` must be those the cases were scored with (default: the default bins).
    """
    scores = list(scores)
    bins = tuple(bins) if bins is not None else size_bins()
    keys = ["all", *(b.key for b in bins)]
    detection = {key: sum((s.detection[key] for s in scores), Counts()) for key in keys}
    small = sum((s.small_lesions for s in scores), SliceOverlap())
    return LesionSummary(
        overlap={m: metrics.summarize([s.overlap[m] for s in scores]) for m in OVERLAP_METRICS},
        detection=detection,
        small_lesions=small,
        small_lesion_cases=sum(1 for s in scores if s.small_lesions.slices),
        bins=bins,
    )


def _masks(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, true = np.asarray(pred).astype(bool, copy=False), np.asarray(true).astype(bool, copy=False)
    if pred.shape != true.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} and {true.shape}")
    return pred, true

