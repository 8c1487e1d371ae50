"""``factorizer evaluate`` and its metrics: Dice and HD95 agree with MONAI, folders pair, bad input exits 2."""

from __future__ import annotations

import csv
import json
import math
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from factorizer_cli.cli import app
from factorizer_cli.errors import InputError
from factorizer_cli.io.cases import find_label_maps
from factorizer_cli.pipeline.evaluate import evaluate_folders, pair_cases
from factorizer_cli.pipeline.metrics import (
    detect_regions,
    dice,
    evaluate_case,
    hd95,
    region_masks,
    summarize,
    surface,
)

runner = CliRunner()
SPACINGS = [(1.0, 1.0, 1.0), (0.8, 1.3, 2.5), (3.0, 0.5, 1.1)]


def _ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)):
    grid = np.indices(shape).astype(np.float64)
    distance = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing))
    return distance <= radius**2


def _random_pairs(count=8, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        shape = tuple(int(n) for n in rng.integers(6, 20, 3))
        yield rng.random(shape) < rng.uniform(0.02, 0.4), rng.random(shape) < rng.uniform(0.02, 0.4)


def _shaped_pairs():
    shape = (32, 28, 20)
    yield _ball(shape, (15, 14, 10), 7), _ball(shape, (17, 12, 10), 6)  # shifted, smaller
    cube = np.zeros(shape, bool)
    cube[4:20, 5:15, 3:12] = True
    yield cube, _ball(shape, (12, 10, 8), 5)
    edge = np.zeros(shape, bool)
    edge[0:6, 0:5, 0:4] = True  # touches the array's border: outside counts as background
    yield edge, _ball(shape, (25, 20, 14), 4)  # far apart: HD95 is the distance between them


def _monai_hd95(pred, true, spacing):
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_hausdorff_distance(torch.from_numpy(pred)[None, None], torch.from_numpy(true)[None, None],
                                           percentile=95, spacing=list(spacing))
    return float(value.item())


def _brute_force_hd95(pred, true, spacing):
    """Surfaces by the definition, every pairwise distance, numpy percentiles: slow and obvious."""
    def surface_points(mask):
        padded = np.pad(mask, 1)
        points = []
        for index in np.argwhere(mask):
            i, j, k = index + 1
            neighbours = [padded[i - 1, j, k], padded[i + 1, j, k], padded[i, j - 1, k], padded[i, j + 1, k],
                          padded[i, j, k - 1], padded[i, j, k + 1]]
            if not all(neighbours):
                points.append(index)
        return np.array(points, dtype=np.float64) * np.asarray(spacing)

    a, b = surface_points(pred), surface_points(true)
    distances = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
    return max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95))


# ------------------------------------------------------------------------------------------- math


@pytest.mark.parametrize("spacing", SPACINGS)
def test_hd95_matches_monai(spacing):
    pytest.importorskip("scipy", reason="MONAI's Hausdorff distance needs scipy")
    for pred, true in [*_random_pairs(), *_shaped_pairs()]:
        assert hd95(pred, true, spacing) == pytest.approx(_monai_hd95(pred, true, spacing), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_hd95_matches_the_definition(spacing):
    for pred, true in [*_random_pairs(4, seed=1), *_shaped_pairs()]:
        assert hd95(pred, true, spacing) == pytest.approx(_brute_force_hd95(pred, true, spacing), rel=1e-6)


def test_hd95_of_two_separate_cubes_is_their_gap_in_mm():
    pred, true = np.zeros((20, 10, 10), bool), np.zeros((20, 10, 10), bool)
    pred[2:5, 3:6, 3:6] = True
    true[12:15, 3:6, 3:6] = True
    assert hd95(pred, true, (2.0, 1.0, 1.0)) == pytest.approx(20.0)  # 10 voxels of 2 mm


def test_dice_matches_monai():
    from monai.metrics import compute_dice

    for pred, true in [*_random_pairs(), *_shaped_pairs()]:
        reference = compute_dice(torch.from_numpy(pred)[None, None].float(),
                                 torch.from_numpy(true)[None, None].float(), ignore_empty=False)
        assert dice(pred, true) == pytest.approx(float(reference.item()), rel=1e-6)


def test_empty_masks_follow_the_documented_convention():
    empty, full = np.zeros((8, 8, 8), bool), _ball((8, 8, 8), (4, 4, 4), 2)
    assert dice(empty, empty) == 1.0 and hd95(empty, empty, (1, 1, 2)) == 0.0
    assert dice(full, empty) == 0.0 and math.isnan(hd95(full, empty))
    assert dice(empty, full) == 0.0 and math.isnan(hd95(empty, full))
    assert hd95(full, full, (0.5, 2, 3)) == 0.0


def test_surface_is_the_mask_without_its_interior():
    mask = np.zeros((7, 7, 7), bool)
    mask[1:6, 1:6, 1:6] = True
    assert surface(mask).sum() == 125 - 27
    assert surface(np.ones((3, 3, 3), bool)).sum() == 26  # the array's border is a surface


def test_brats_regions_accept_label_3_or_4_for_et():
    labels = np.array([0, 1, 2, 3, 4])
    masks = region_masks(labels, "brats")
    assert masks["ET"].tolist() == [False, False, False, True, True]
    assert masks["TC"].tolist() == [False, True, False, True, True]
    assert masks["WT"].tolist() == [False, True, True, True, True]
    assert region_masks(np.array([0, 1, 255]), "lesion")["lesion"].tolist() == [False, True, True]


def test_evaluate_case_scores_every_region():
    true = np.zeros((16, 16, 16), np.uint8)
    true[2:14, 2:14, 2:14], true[4:12, 4:12, 4:12], true[6:10, 6:10, 6:10] = 2, 1, 3
    pred = np.where(true == 3, 4, true)  # BraTS 2021 labels for the same map
    scores = evaluate_case(pred, true, (1.0, 1.0, 1.5), "brats")
    assert scores == {r: {"dice": 1.0, "hd95": 0.0} for r in ("ET", "TC", "WT")}
    pred[true == 3] = 0  # ET missed, TC loses its core
    scores = evaluate_case(pred, true, (1.0, 1.0, 1.5), "brats")
    assert scores["ET"]["dice"] == 0.0 and math.isnan(scores["ET"]["hd95"])
    assert scores["TC"]["dice"] == pytest.approx(2 * (512 - 64) / (512 - 64 + 512))
    assert set(evaluate_case(pred, true, None, "lesion")) == {"lesion"}


def test_detect_regions_and_summaries():
    assert detect_regions([0, 1, 2, 4]) == "brats"
    assert detect_regions([0, 1]) == "lesion" and detect_regions([0, 255]) == "lesion"
    assert detect_regions([0, 1, 7]) is None and detect_regions([0]) is None
    stats = summarize([1.0, float("nan"), 3.0])
    assert stats == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "median": 2.0, "n": 2, "missing": 1}


# ------------------------------------------------------------------------------------------ folders

AFFINE = np.array([[-1.0, 0, 0, 90], [0, 1.2, 0, -100], [0, 0, 2.0, -60], [0, 0, 0, 1]])
SHAPE = (24, 24, 16)


def _brats_truth(seed):
    rng = np.random.default_rng(seed)
    centre = rng.integers(8, 14, 3)
    labels = np.zeros(SHAPE, np.uint8)
    labels[_ball(SHAPE, centre, 7)] = 2
    labels[_ball(SHAPE, centre, 4)] = 1
    labels[_ball(SHAPE, centre, 2)] = 3
    return labels


def _save(path, labels, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), path)


@pytest.fixture
def brats(tmp_path):
    """Three BraTS cases: one perfect, one shifted, one without a prediction; plus a stray prediction."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    truths = {}
    for i in range(3):
        case = f"BraTS-GLI-0000{i}-000"
        truths[case] = _brats_truth(i)
        _save(gt / case / f"{case}-seg.nii.gz", truths[case])
        _save(gt / case / f"{case}-t1c.nii.gz", np.ones(SHAPE))  # an image: not a truth
    _save(pred / "BraTS-GLI-00000-000.nii.gz", truths["BraTS-GLI-00000-000"])
    _save(pred / "BraTS-GLI-00001-000.nii.gz", np.roll(truths["BraTS-GLI-00001-000"], 2, axis=1))
    _save(pred / "other-case.nii.gz", truths["BraTS-GLI-00000-000"])
    return gt, pred, truths


def test_cli_writes_table_csv_and_json(brats, tmp_path):
    gt, pred, truths = brats
    report, table = tmp_path / "scores.json", tmp_path / "scores.csv"
    result = runner.invoke(app, ["evaluate", str(pred), str(gt), "--csv", str(table), "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert "BraTS-GLI-00001-000" in result.stdout and "mean" in result.stdout and "WT" in result.stdout
    assert "without a prediction" in result.stderr and "other-case.nii.gz" in result.stderr

    data = json.loads(report.read_text())
    assert data["regions"] == "brats" and data["conventions"]["dice_both_empty"] == 1.0
    assert data["missing_predictions"] == ["BraTS-GLI-00002-000"]
    assert data["unmatched_predictions"][0].endswith("other-case.nii.gz")
    cases = {c["case"]: c for c in data["cases"]}
    expected = evaluate_case(np.roll(truths["BraTS-GLI-00001-000"], 2, axis=1), truths["BraTS-GLI-00001-000"],
                             (1.0, 1.2, 2.0), "brats")
    for region, scores in expected.items():
        assert cases["BraTS-GLI-00001-000"]["metrics"][region] == pytest.approx(scores, rel=1e-5)
    assert cases["BraTS-GLI-00000-000"]["metrics"]["ET"] == {"dice": 1.0, "hd95": 0.0}
    missing = cases["BraTS-GLI-00002-000"]
    assert missing["status"] == "missing" and missing["metrics"]["WT"] == {"dice": 0.0, "hd95": None}
    assert data["summary"]["WT"]["dice"]["n"] == 3 and data["summary"]["WT"]["hd95"]["n"] == 2
    assert data["summary"]["WT"]["dice"]["mean"] == pytest.approx((1.0 + expected["WT"]["dice"] + 0.0) / 3)

    rows = list(csv.DictReader(table.open()))
    assert [r["case"] for r in rows] == [*sorted(truths), "mean", "std", "median"]
    assert float(rows[1]["TC_dice"]) == pytest.approx(expected["TC"]["dice"], abs=1e-5)
    assert rows[2]["status"] == "missing" and rows[2]["ET_hd95"] == ""
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_isles_and_nnunet_layouts_pair_by_case(tmp_path):
    mask = _ball(SHAPE, (12, 12, 8), 5).astype(np.uint8)
    isles = tmp_path / "isles" / "derivatives" / "sub-strokecase0001" / "ses-0001"
    _save(isles / "sub-strokecase0001_ses-0001_msk.nii.gz", mask)
    _save(tmp_path / "isles" / "rawdata" / "sub-strokecase0001" / "ses-0001" / "sub-strokecase0001_ses-0001_dwi.nii.gz",
          np.ones(SHAPE))
    _save(tmp_path / "nnunet" / "labelsTr" / "case_001.nii.gz", mask)
    _save(tmp_path / "nnunet" / "imagesTr" / "case_001_0000.nii.gz", np.ones(SHAPE))
    _save(tmp_path / "pred" / "sub-strokecase0001.nii.gz", mask)  # batch mode names the subject folder
    _save(tmp_path / "pred" / "case_001.nii.gz", mask)

    assert [t.case for t in find_label_maps(tmp_path / "isles")] == ["sub-strokecase0001_ses-0001"]
    pairs, unmatched = pair_cases(tmp_path / "pred", tmp_path / "isles")
    assert pairs[0].prediction.name == "sub-strokecase0001.nii.gz" and len(unmatched) == 1
    result = evaluate_folders(tmp_path / "pred", tmp_path / "nnunet")
    assert result.regions == "lesion" and [c.case for c in result.cases] == ["case_001"]
    assert result.cases[0].metrics == {"lesion": {"dice": 1.0, "hd95": 0.0}}


def test_empty_prediction_and_forced_regions(tmp_path):
    truth = _ball(SHAPE, (12, 12, 8), 5).astype(np.uint8)
    _save(tmp_path / "gt" / "a.nii.gz", truth)
    _save(tmp_path / "pred" / "a.nii.gz", np.zeros(SHAPE))  # an empty prediction is a valid one
    result = evaluate_folders(tmp_path / "pred", tmp_path / "gt", regions="brats")
    assert result.cases[0].status == "ok"
    assert result.cases[0].metrics["ET"] == {"dice": 1.0, "hd95": 0.0}  # no label 3 or 4 in either
    assert result.cases[0].metrics["WT"]["dice"] == 0.0 and math.isnan(result.cases[0].metrics["WT"]["hd95"])


@pytest.mark.parametrize("problem, message", [
    ("missing folder", "no such prediction folder"),
    ("no pairs", "matches a ground truth"),
    ("shape", "shape (24, 24, 15) differs"),
    ("affine", "affine differs"),
    ("no truths", "no ground truths found"),
])
def test_bad_input_is_one_line_and_exit_2(brats, tmp_path, problem, message):
    gt, pred, truths = brats
    case = "BraTS-GLI-00000-000"
    if problem == "missing folder":
        pred = tmp_path / "nowhere"
    elif problem == "no pairs":
        pred = tmp_path / "renamed"
        _save(pred / "case-x.nii.gz", truths[case])
    elif problem == "shape":
        _save(pred / f"{case}.nii.gz", truths[case][..., :15])
    elif problem == "affine":
        shifted = AFFINE.copy()
        shifted[0, 3] += 0.5
        _save(pred / f"{case}.nii.gz", truths[case], shifted)
    elif problem == "no truths":
        gt = tmp_path / "empty"
        gt.mkdir()
    result = runner.invoke(app, ["evaluate", str(pred), str(gt)])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.strip().count("\n") == 0 and "Traceback" not in result.output


def test_undecidable_labels_ask_for_regions(tmp_path):
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:6, 2:6, 2:6], labels[10:14, 10:14, 10:14] = 1, 7
    _save(tmp_path / "gt" / "a.nii.gz", labels)
    _save(tmp_path / "pred" / "a.nii.gz", labels)
    with pytest.raises(InputError, match="--regions"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    assert evaluate_folders(tmp_path / "pred", tmp_path / "gt", regions="lesion").regions == "lesion"


def test_help_documents_the_empty_case_convention():
    result = runner.invoke(app, ["evaluate", "--help"], terminal_width=120)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "factorizer evaluate preds/" in text and "both empty" in text and "scored as an empty prediction" in text
