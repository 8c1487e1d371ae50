"""From probabilities to a label map, and the numbers users ask of it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..zoo.card import LabelRule


def labels_from_probabilities(
    probabilities: np.ndarray,
    outputs: Sequence[str],
    rules: Sequence[LabelRule],
    activation: str = "sigmoid",
    threshold: float = 0.5,
) -> np.ndarray:
    """Paint a uint8 label map from per-channel probabilities.

    Sigmoid models predict overlapping regions (BraTS: WT ⊇ TC ⊇ ET); each rule paints its label where
    its region's probability exceeds ``threshold``, in order, so the innermost region ends on top
    (WT→2, then TC→1, then ET→3). Softmax models paint each rule's label where its class wins.
    """
    labels = np.zeros(probabilities.shape[1:], dtype=np.uint8)
    if activation == "softmax":
        winner = probabilities.argmax(axis=0)
        for rule in rules:
            labels[winner == outputs.index(rule.region)] = rule.label
        return labels
    for rule in rules:
        labels[probabilities[outputs.index(rule.region)] > threshold] = rule.label
    return labels


def volumes_ml(labels: np.ndarray, affine: np.ndarray, rules: Sequence[LabelRule],
               label_names: dict[str, str] | None = None,
               nested_regions: bool = True) -> dict[str, dict[str, float]]:
    """Volume in mL of each label and, for nested regions, of each region.

    Sigmoid models predict nested regions painted outermost first, so a region is its rule's label
    and every label painted after it (BraTS: WT = NCR + ED + ET, TC = NCR + ET). Softmax classes do not
    nest: ``nested_regions=False`` reports labels only.
    """
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3].astype(np.float64)))) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=256)
    names = label_names or {}
    by_label = {
        names.get(str(rule.label), str(rule.label)): round(float(counts[rule.label] * voxel_ml), 4)
        for rule in rules
    }
    by_region = {}
    for i, rule in enumerate(rules if nested_regions else []):
        later = {r.label for r in rules[i:]}
        by_region[rule.region] = round(float(sum(counts[label] for label in later) * voxel_ml), 4)
    return {"labels_ml": by_label, "regions_ml": by_region}
