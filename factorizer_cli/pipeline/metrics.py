"""Segmentation metrics: Dice and the 95th-percentile Hausdorff distance, as pure functions on arrays.

No file is read here; ``factorizer_cli.pipeline.evaluate`` pairs the files and calls these.

Conventions, the same in the library, the CLI and its reports:

* A region's mask is a boolean array; its *surface* is the mask minus its erosion by the
  6-neighbourhood, with everything outside the array counted as background.
* ``hd95`` is in millimetres (voxel centres scaled by ``spacing``): the larger of the two directed
  95th percentiles (linear interpolation) of the distances from each surface voxel of one mask to the
  nearest surface voxel of the other. This is what MONAI's ``compute_hausdorff_distance`` with
  ``percentile=95`` and ``spacing`` computes, and the tests check that it agrees.
* Empty masks: both empty gives Dice 1 and HD95 0 (nothing to find, nothing found); exactly one empty
  gives Dice 0 and HD95 NaN, which reports write as missing (``null`` in JSON, blank in CSV) and
  which means and medians leave out, giving the count they used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

# Region name -> the labels it unites. BraTS 2023 labels ET 3; BraTS 2021 and earlier labelled it 4.
BRATS_REGIONS: dict[str, tuple[int, ...]] = {"ET": (3, 4), "TC": (1, 3, 4), "WT": (1, 2, 3, 4)}
REGION_SETS: dict[str, tuple[str, ...]] = {"brats": ("ET", "TC", "WT"), "lesion": ("lesion",)}
REGION_DEFINITIONS: dict[str, dict[str, str]] = {
    "brats": {"ET": "label 3 or 4", "TC": "labels 1, 3, 4", "WT": "labels 1, 2, 3, 4"},
    "lesion": {"lesion": "any nonzero label"},
}
METRICS = ("dice", "hd95")


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice overlap 2|P∩T| / (|P| + |T|) of two boolean masks; 1.0 when both are empty."""
    pred, true = _as_masks(pred, true)
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(true))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & true)) / total


def hd95(pred: np.ndarray, true: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between the surfaces of two masks.

    ``spacing`` is the voxel size along each array axis (default 1). Returns 0.0 when both masks are
    empty and NaN when exactly one is (see the module notes).
    """
    pred, true = _as_masks(pred, true)
    spacing = _spacing(spacing, pred.ndim)
    has_pred, has_true = bool(pred.any()), bool(true.any())
    if not (has_pred or has_true):
        return 0.0
    if not (has_pred and has_true):
        return float("nan")
    box = _bounding_box(pred | true, margin=1)
    surface_pred, surface_true = surface(pred[box]), surface(true[box])
    to_true = distance_to(surface_true, spacing)[surface_pred]
    to_pred = distance_to(surface_pred, spacing)[surface_true]
    return float(max(np.percentile(to_true, 95), np.percentile(to_pred, 95)))


def surface(mask: np.ndarray) -> np.ndarray:
    """The voxels of ``mask`` with at least one face neighbour outside it (the array's outside counts)."""
    padded = np.pad(mask.astype(bool, copy=False), 1, constant_values=False)
    inner = padded[(slice(1, -1),) * mask.ndim].copy()
    for axis in range(mask.ndim):
        for shift in (0, 2):  # the neighbour before and after along this axis
            index = [slice(1, -1)] * mask.ndim
            index[axis] = slice(shift, shift + mask.shape[axis])
            inner &= padded[tuple(index)]
    return mask & ~inner


def distance_to(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Euclidean distance in mm from every voxel centre to the nearest voxel of ``mask`` (0 inside).

    Exact (Maurer's algorithm, SimpleITK). ITK orders numpy axes last-first, hence the reversed spacing.
    """
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing([float(s) for s in reversed(spacing)])
    distances = sitk.SignedMaurerDistanceMap(
        image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    return np.maximum(sitk.GetArrayFromImage(distances), 0.0)


def region_masks(labels: np.ndarray, regions: str) -> dict[str, np.ndarray]:
    """The boolean mask of each region of a label map: ``"brats"`` (ET, TC, WT) or ``"lesion"``."""
    labels = np.asarray(labels)
    if regions == "brats":
        return {name: np.isin(labels, values) for name, values in BRATS_REGIONS.items()}
    if regions == "lesion":
        return {"lesion": labels != 0}
    raise ValueError(f"regions must be one of {sorted(REGION_SETS)}, got {regions!r}")


def evaluate_case(
    pred_labels: np.ndarray,
    true_labels: np.ndarray,
    spacing: Sequence[float] | None,
    regions: str,
) -> dict[str, dict[str, float]]:
    """Dice and HD95 (mm) of every region: ``{"ET": {"dice": 0.91, "hd95": 2.2}, ...}``.

    ``pred_labels`` and ``true_labels`` are label maps on the same grid; ``regions`` is ``"brats"``
    or ``"lesion"``; ``spacing`` is the voxel size along each array axis.
    """
    if np.shape(pred_labels) != np.shape(true_labels):
        raise ValueError(f"label maps differ in shape: {np.shape(pred_labels)} and {np.shape(true_labels)}")
    pred, true = region_masks(pred_labels, regions), region_masks(true_labels, regions)
    return {
        name: {"dice": dice(pred[name], true[name]), "hd95": hd95(pred[name], true[name], spacing)}
        for name in REGION_SETS[regions]
    }


def detect_regions(labels: Iterable[int]) -> str | None:
    """``"brats"`` or ``"lesion"`` from the labels found in ground truths; None when neither fits.

    BraTS: labels among 1-4 with at least one of 2, 3, 4 (edema, enhancing tumour). Lesion: a single
    nonzero label (binary masks stored as 1, or 255).
    """
    found = {int(v) for v in labels} - {0}
    if found & {2, 3, 4} and found <= {1, 2, 3, 4}:
        return "brats"
    if len(found) == 1:
        return "lesion"
    return None


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, sample standard deviation, median, and ``n`` of the defined (non-NaN) values.

    ``missing`` counts the NaN values left out; statistics of no values are NaN.
    """
    array = np.asarray(values, dtype=np.float64)
    defined = array[~np.isnan(array)]
    n = int(defined.size)
    return {
        "mean": float(defined.mean()) if n else float("nan"),
        "std": float(defined.std(ddof=1)) if n > 1 else (0.0 if n == 1 else float("nan")),
        "median": float(np.median(defined)) if n else float("nan"),
        "n": n,
        "missing": int(array.size - n),
    }


def summarize_cases(
    cases: Sequence[Mapping[str, Mapping[str, float]]], regions: str
) -> dict[str, dict[str, dict[str, float | int]]]:
    """``summarize`` of every region and metric over per-case results from ``evaluate_case``."""
    return {
        name: {metric: summarize([case[name][metric] for case in cases]) for metric in METRICS}
        for name in REGION_SETS[regions]
    }


def _as_masks(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, true = np.asarray(pred).astype(bool, copy=False), np.asarray(true).astype(bool, copy=False)
    if pred.shape != true.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} and {true.shape}")
    return pred, true


def _spacing(spacing: Sequence[float] | float | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    values = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=np.float64), (ndim,)))
    if not all(np.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be positive and finite, got {values}")
    return values


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The slices of the smallest box holding ``mask``'s voxels, grown by ``margin`` inside the array."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + margin + 1, mask.shape[axis])))
    return tuple(box)
