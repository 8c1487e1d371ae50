"""Lesion-wise evaluation: hand-made masks with known lesions and known answers, and `evaluate --lesion-wise`."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from factorizer_cli.cli import app
from factorizer_cli.pipeline.evaluate import evaluate_folders, lesion_columns
from factorizer_cli.pipeline.lesions import (
    Counts,
    SizeBin,
    detect,
    label_components,
    overlap,
    score_case,
    size_bins,
    small_lesion_overlap,
    small_lesion_slices,
    summarize,
)

runner = CliRunner()
SHAPE = (20, 20, 10)


def _scene():
    """Truth: a 6×6×6 lesion A (216 voxels) and a 2×2×2 lesion B (8). Prediction: A in two pieces
    (6×6×2 = 72 and 6×6×3 = 108, slice z=3 left out), B missed, a 3×3×3 false-positive blob (27)."""
    true, pred = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    true[1:7, 1:7, 1:7] = 1
    true[12:14, 12:14, 2:4] = 1
    pred[1:7, 1:7, 1:3] = 1
    pred[1:7, 1:7, 4:7] = 1
    pred[15:18, 1:4, 1:4] = 1
    return pred, true


# ------------------------------------------------------------------------------- components


def test_components_are_26_connected_where_6_connectivity_splits():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    mask = np.zeros((6, 6, 6), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # touching by a corner only
    mask[4, 4, 1] = mask[5, 5, 1] = True  # by an edge only
    labels, n = label_components(mask)
    assert n == 2 and labels[1, 1, 1] == labels[2, 2, 2] != labels[4, 4, 1] == labels[5, 5, 1]
    assert scipy_ndimage.label(mask)[1] == 4  # scipy's default (faces only) sees four

    pred = np.zeros_like(mask)
    pred[1, 1, 1] = True  # one voxel of the corner-joined lesion
    counts = detect(pred, mask)["all"]
    assert (counts.true, counts.detected, counts.predicted, counts.hits) == (2, 1, 1, 1)


@pytest.mark.parametrize("ndim", [2, 3])
def test_components_match_scipy_with_a_structure_of_ones(ndim):
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(ndim)
    for density in (0.05, 0.2, 0.35):
        mask = rng.random((17, 13, 11)[:ndim]) < density
        labels, n = label_components(mask)
        reference, m = scipy_ndimage.label(mask, np.ones((3,) * ndim))
        pairs = set(zip(labels[mask].tolist(), reference[mask].tolist()))
        assert n == m and len(pairs) == n  # the same partition, whatever the numbering
    assert label_components(np.zeros((4, 4, 4)))[1] == 0


# ------------------------------------------------------------------------------- overlap and detection


def test_overlap_of_the_scene():
    pred, true = _scene()
    both, p, t = 180, 207, 224
    scores = overlap(pred, true)
    assert scores["dice"] == pytest.approx(2 * both / (p + t))
    assert scores["iou"] == pytest.approx(both / (p + t - both))
    assert scores["precision"] == pytest.approx(both / p) and scores["recall"] == pytest.approx(both / t)


def test_missed_lesion_split_lesion_and_false_positive():
    pred, true = _scene()
    found = detect(pred, true)
    # A found (by two pieces, both hits), B missed, the blob a false positive.
    assert found["all"] == Counts(true=2, detected=1, predicted=3, hits=2)
    assert found["all"].recall == 0.5 and found["all"].precision == pytest.approx(2 / 3)
    assert found["all"].f1 == pytest.approx(4 / 7)
    # ≤100: B (8) missed; piece 72 a hit, blob 27 not. 100-1000: A (216) found, piece 108 a hit.
    assert found["le100"] == Counts(true=1, detected=0, predicted=2, hits=1)
    assert found["100-1000"] == Counts(true=1, detected=1, predicted=1, hits=1)
    assert found["gt1000"] == Counts()
    assert found["gt1000"].f1 == 1.0  # nothing to find, nothing found


def test_bins_are_by_volume_in_mm3():
    pred, true = _scene()
    found = detect(pred, true, spacing=(1.0, 1.0, 4.0))  # volumes ×4: B 32, blob 108, pieces 288 and 432
    assert found["le100"] == Counts(true=1, detected=0, predicted=0, hits=0)
    assert found["le100"].recall == 0.0 and math.isnan(found["le100"].precision) and found["le100"].f1 == 0.0
    assert found["100-1000"] == Counts(true=1, detected=1, predicted=3, hits=2)
    big = detect(pred, true, spacing=(2.0, 2.0, 2.0))  # A 1728 mm³
    assert big["gt1000"].true == 1 and big["gt1000"].detected == 1


def test_size_bins():
    bins = size_bins()
    assert [b.key for b in bins] == ["le100", "100-1000", "gt1000"]
    assert [b.label for b in bins] == ["≤100", "100–1000", ">1000"]
    assert bins[0].holds(100) and not bins[0].holds(100.5) and bins[1].holds(100.5) and bins[2].holds(1e9)
    assert [b.key for b in size_bins([50])] == ["le50", "gt50"]
    assert SizeBin(10, 20).key == "10-20"
    for bad in ([], [100, 100], [1000, 100], [0], [math.inf]):
        with pytest.raises(ValueError, match="bin edges"):
            size_bins(bad)
    pred, true = _scene()
    custom = detect(pred, true, bins=size_bins([10]))
    assert set(custom) == {"all", "le10", "gt10"} and custom["le10"] == Counts(true=1)


@pytest.mark.parametrize("which", ["truth", "prediction", "both"])
def test_empty_masks_follow_one_rule(which):
    blob = np.zeros((8, 8, 8), bool)
    blob[2:5, 2:5, 2:5] = True
    empty = np.zeros_like(blob)
    pred, true = {"truth": (blob, empty), "prediction": (empty, blob), "both": (empty, empty)}[which]
    scores, found = overlap(pred, true), detect(pred, true)["all"]
    if which == "both":
        assert scores == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}
        assert (found.recall, found.precision, found.f1) == (1.0, 1.0, 1.0)
        return
    assert scores["dice"] == 0.0 and scores["iou"] == 0.0 and found.f1 == 0.0
    if which == "truth":  # a false positive on a lesion-free case: nothing to recall
        assert scores["precision"] == 0.0 and math.isnan(scores["recall"])
        assert found == Counts(predicted=1) and found.precision == 0.0 and math.isnan(found.recall)
    else:  # a lesion missed by an empty prediction: nothing predicted to be precise about
        assert scores["recall"] == 0.0 and math.isnan(scores["precision"])
        assert found == Counts(true=1) and found.recall == 0.0 and math.isnan(found.precision)


# ------------------------------------------------------------------------------- small-lesion slices


def _slices():
    """Six slices: 0 empty; 1 one 25-px lesion; 2 one 110-px lesion; 3 lesions of 9 and exactly 100 px;
    4 lesions of 9 and 121 px; 5 two 64-px squares touching at a corner (one 128-px 8-connected lesion)."""
    true, pred = np.zeros((30, 30, 6), np.uint8), np.zeros((30, 30, 6), np.uint8)
    pred[0:3, 0:3, 0] = 1  # no truth in this slice: not counted
    true[2:7, 2:7, 1] = 1
    pred[2:7, 2:6, 1] = 1  # 20 of 25
    true[2:13, 2:12, 2] = 1
    true[2:5, 2:5, 3] = 1
    true[10:20, 10:20, 3] = 1
    pred[2:5, 2:5, 3] = 1  # the 9-px lesion
    pred[25:27, 25:27, 3] = 1  # and a 4-px false positive
    true[2:5, 2:5, 4] = 1
    true[10:21, 10:21, 4] = 1
    true[0:8, 0:8, 5] = 1
    true[8:16, 8:16, 5] = 1
    return pred, true


def test_small_lesion_slices_and_their_dice():
    pred, true = _slices()
    assert small_lesion_slices(true).tolist() == [1, 3]
    sums = small_lesion_overlap(pred, true)
    assert (sums.slices, sums.both, sums.predicted, sums.true) == (2, 29, 33, 134)
    assert sums.dice == pytest.approx(58 / 167)
    assert small_lesion_slices(true, max_pixels=64).tolist() == [1]
    assert small_lesion_slices(true, max_pixels=200).tolist() == [1, 2, 3, 4, 5]
    none = small_lesion_overlap(pred, np.zeros_like(true))
    assert none.slices == 0 and math.isnan(none.dice)


def test_small_lesion_dice_is_pooled_over_cases():
    pred, true = _slices()
    missed = np.zeros((30, 30, 6), np.uint8)
    missed[5:7, 5:7, 2] = 1  # a 4-px lesion, not predicted: one slice, Dice 0
    first = score_case(pred, true)
    second = score_case(np.zeros_like(missed), missed * 2)  # any nonzero label is lesion
    summary = summarize([first, second])
    assert second.small_lesions.dice == 0.0 and summary.small_lesion_cases == 2
    assert summary.small_lesions.slices == 3
    assert summary.small_lesions.dice == pytest.approx(2 * 29 / (33 + 134 + 4))  # not the mean of 0.347 and 0
    assert summary.overlap["precision"]["n"] == 1 and summary.overlap["precision"]["missing"] == 1
    assert summary.detection["all"] == first.detection["all"] + second.detection["all"]


# ------------------------------------------------------------------------------- the command


def _save(path, labels, spacing):
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = (40.0, -20.0, 10.0)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), path)


@pytest.fixture
def cases(tmp_path):
    """Case a: the scene, 1 mm. Case b: one 3×3×3 lesion predicted exactly, on a 2 mm grid (216 mm³)."""
    pred, true = _scene()
    _save(tmp_path / "gt" / "a.nii.gz", true, (1.0, 1.0, 1.0))
    _save(tmp_path / "pred" / "a.nii.gz", pred, (1.0, 1.0, 1.0))
    lesion = np.zeros(SHAPE, np.uint8)
    lesion[5:8, 5:8, 5:8] = 1
    _save(tmp_path / "gt" / "b.nii.gz", lesion, (2.0, 2.0, 2.0))
    _save(tmp_path / "pred" / "b.nii.gz", lesion, (2.0, 2.0, 2.0))
    return tmp_path / "pred", tmp_path / "gt"


def test_cli_lesion_wise_writes_columns_summary_and_table(cases, tmp_path):
    pred, gt = cases
    table, report = tmp_path / "lesions.csv", tmp_path / "lesions.json"
    result = runner.invoke(app, ["evaluate", str(pred), str(gt), "--lesion-wise", "--csv", str(table),
                                 "--json", str(report)], terminal_width=200)
    assert result.exit_code == 0, result.output

    # Pooled: true A, B, b; found A, b; predicted two pieces, blob, b; hits the pieces and b.
    recall, precision = 2 / 3, 3 / 4
    f1 = 2 * recall * precision / (recall + precision)
    data = json.loads(report.read_text())
    pooled = data["lesion_summary"]["detection"]
    assert pooled["all"] == {"true": 3, "detected": 2, "predicted": 4, "hits": 3, "recall": pytest.approx(recall),
                             "precision": pytest.approx(precision), "f1": pytest.approx(f1)}
    assert (pooled["le100"]["true"], pooled["le100"]["detected"], pooled["le100"]["predicted"]) == (1, 0, 2)
    assert (pooled["100-1000"]["true"], pooled["100-1000"]["hits"]) == (2, 2)  # b is 27 voxels of 8 mm³
    small = data["lesion_summary"]["small_lesions"]
    assert (small["slices"], small["cases"]) == (9, 2)  # a: z 1-6; b: z 5-7
    assert small["dice"] == pytest.approx(2 * (180 + 27) / (207 + 27 + 224 + 27))
    assert data["lesion_summary"]["overlap"]["dice"]["mean"] == pytest.approx((360 / 431 + 1.0) / 2)
    assert data["lesion_conventions"]["connectivity"].startswith("26")
    by_case = {c["case"]: c for c in data["cases"]}
    assert by_case["a"]["lesions"]["detection"]["all"]["f1"] == pytest.approx(4 / 7)
    assert by_case["a"]["metrics"]["lesion"]["dice"] == pytest.approx(by_case["a"]["lesions"]["overlap"]["dice"])

    header = table.read_text().splitlines()[0].split(",")
    assert len(header) == len(set(header))  # no lesion-wise column shadows a region's (`lesion_dice`)
    rows = list(csv.DictReader(table.open()))
    assert [r["case"] for r in rows] == ["a", "b", "mean", "std", "median", "pooled"]
    assert set(lesion_columns()) <= set(rows[0])
    assert (rows[0]["lesions_true"], rows[0]["lesions_detected"], rows[0]["lesions_hits"]) == ("2", "1", "2")
    assert float(rows[0]["detection_f1"]) == pytest.approx(4 / 7, abs=1e-5)
    assert rows[0]["lesions_gt1000_true"] == "0" and rows[1]["lesions_100-1000_true"] == "1"
    assert float(rows[2]["overlap_dice"]) == pytest.approx((360 / 431 + 1.0) / 2, abs=1e-5)
    assert rows[5]["lesions_true"] == "3" and float(rows[5]["detection_f1"]) == pytest.approx(f1, abs=1e-5)
    assert rows[5]["overlap_dice"] == "" and rows[5]["lesion_hd95"] == ""  # per patient only: no pooled value

    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Lesions of 2 cases"))
    lesion_table = lines[start:]
    assert max(len(line) for line in lesion_table) <= 80
    text = "\n".join(lesion_table)
    assert "≤100" in text and ">1000" in text and f"{f1:.3f}" in text
    assert f"{2 * 207 / 485:.3f}" in text and "9 in 2 cases" in text


def test_without_the_option_reports_are_unchanged(cases, tmp_path):
    pred, gt = cases
    table, report = tmp_path / "plain.csv", tmp_path / "plain.json"
    result = runner.invoke(app, ["evaluate", str(pred), str(gt), "--csv", str(table), "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert "Lesions of" not in result.stdout
    header = table.read_text().splitlines()[0]
    assert header == "case,status,lesion_dice,lesion_hd95,prediction,truth"
    data = json.loads(report.read_text())
    assert "lesion_summary" not in data and all("lesions" not in c for c in data["cases"])
    assert not evaluate_folders(pred, gt).lesion_wise


def test_help_teaches_the_lesion_wise_rules():
    result = runner.invoke(app, ["evaluate", "--help"], terminal_width=120)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--lesion-wise" in text and "26-connectivity" in text and "any of its voxels is predicted" in text
