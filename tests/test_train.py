"""`factorizer train`: targets on the inference grid, packages written, and resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from factorizer_cli.cli import app
from factorizer_cli.pipeline.segment import Segmenter
from factorizer_cli.train.data import find_training_cases, load_case, region_labels, targets_of
from factorizer_cli.train.state import STATE_FILE
from factorizer_cli.zoo.card import ModelCard
from factorizer_cli.zoo.package import open_package
from factorizer_cli.zoo.registry import zoo_card
from tests.oracle import BRATS_INPUTS, phantom, reorient, write_case

TINY_ARCHITECTURE = {
    "class": "SegmentationFactorizer", "in_channels": 4, "out_channels": 3, "spatial_size": [16, 16, 16],
    "encoder_depth": [1, 1], "encoder_width": [4, 8], "strides": [1, 2], "decoder_depth": [1],
    "stem": {"class": "Conv3d", "kernel_size": 3, "padding": 1, "bias": False},
    "downsample": {"class": "Conv3d", "kernel_size": 2, "bias": False},
    "upsample": {"class": "ConvTranspose3d", "kernel_size": 2},
    "head": {"class": "Conv3d", "kernel_size": 1}, "pos_embed": False, "num_deep_supr": 2,
    "nmf": {"class": "FactorizerSubblock", "tensorize": {"class": "SWMatricize", "head_dim": 4,
            "patch_size": 2, "shifts": [None, 1]}, "act": {"class": "ReLU"}, "factorize": {"class": "NMF"},
            "rank": 1, "num_iters": 3, "init": "uniform", "solver": "hals"},
    "mlp": {"class": "MLP", "ratio": 2},
}


@pytest.fixture(autouse=True)
def _private_home(tmp_path, monkeypatch):
    """The training cache (``FACTORIZER_HOME/train-cache``) of each test in its own folder, never ~/.cache."""
    monkeypatch.setenv("FACTORIZER_HOME", str(tmp_path / "home"))


def tiny_card(path: Path) -> Path:
    card = {
        "name": "tiny", "task": "test", "inputs": BRATS_INPUTS, "spacing": [1.0, 1.0, 1.0], "roi": [16, 16, 16],
        "outputs": ["WT", "TC", "ET"], "crop_margin_mm": 2.0,
        "labels": [{"region": "WT", "label": 2}, {"region": "TC", "label": 1}, {"region": "ET", "label": 3}],
        "label_conventions": {"brats2021": {"ET": 4}}, "architecture": TINY_ARCHITECTURE,
    }
    path.write_text(json.dumps(card))
    return path


def with_spacing(card: ModelCard, spacing: float) -> ModelCard:
    """``card`` resampling to ``spacing`` mm (the preprocessing block wins over a top-level spacing)."""
    data = card.to_dict()
    return ModelCard.from_dict({**data, "preprocessing": {**data["preprocessing"], "spacing": [spacing] * 3}})


def write_dataset(root: Path, cases: int = 4, codes: str = "RAS") -> Path:
    for i in range(cases):
        images, labels = phantom((24, 26, 22), seed=i)
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
        folder = root / f"BraTS-GLI-{i:05d}-000"
        oriented = [reorient(v, affine, codes) for v in (*images, labels)]
        paths = write_case(folder, np.stack([v for v, _ in oriented[:4]]), oriented[0][1])
        seg = nib.Nifti1Image(oriented[4][0].astype(np.uint8), oriented[0][1])
        nib.save(seg, folder / paths[0].name.replace("-t1n", "-seg"))
    return root


def test_regions_of_a_brats_card_include_the_brats2021_label():
    assert region_labels(zoo_card("demo")) == [{1, 2, 3, 4}, {1, 3, 4}, {3, 4}]


@pytest.mark.parametrize("codes, spacing", [("RAS", 1.0), ("LPS", 1.0), ("PIR", 1.0), ("LPS", 1.5)])
def test_targets_land_on_the_inference_grid(tmp_path, codes, spacing):
    """The oracle phantom's FLAIR is bright exactly on WT: after preprocessing both must coincide."""
    card = ModelCard.load(tiny_card(tmp_path / "card.json"))
    card = with_spacing(card, spacing)
    name, files, label = find_training_cases(write_dataset(tmp_path / "data", 1, codes), card)[0]
    case = load_case(name, files, label, card, targets_of(card))
    assert case.image.shape[1:] == case.target.shape[1:]
    if spacing != 1.0:
        assert case.image.shape[1] < 20  # resampled: 1.5 mm voxels of a cropped 24 mm side
    wt, flair = case.target[0], case.image[3]
    if spacing == 1.0:  # same voxels: bright exactly where the label says
        assert wt.any() and flair[wt].min() > flair[~wt].max()
    else:  # both resampled linearly: they meet at the edges only
        bright = flair > (flair[wt].mean() + flair[~wt & (flair != 0)].mean()) / 2
        assert 2 * (bright & wt).sum() / (bright.sum() + wt.sum()) > 0.95
    assert (case.target[2] <= case.target[1]).all() and (case.target[1] <= case.target[0]).all()


def test_missing_label_map_is_one_line(tmp_path):
    data = write_dataset(tmp_path / "data", 2)
    next((data / "BraTS-GLI-00001-000").glob("*-seg.nii.gz")).unlink()
    result = CliRunner().invoke(app, ["train", str(data), "--card", str(tiny_card(tmp_path / "c.json")),
                                      "-o", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 2
    assert "no label map for case BraTS-GLI-00001-000" in result.output
    assert not (tmp_path / "run").exists()


def test_train_writes_segmenting_packages(tmp_path):
    card = tiny_card(tmp_path / "card.json")
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(write_dataset(tmp_path / "data")), "--card", str(card),
                                      "-o", str(run), "--steps", "6", "--validate-every", "3",
                                      "--validation-cases", "1", "--warmup-steps", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "trained 6 steps" in result.output
    log = (run / "train-log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss,lr,seconds,dice_WT") and len(log) == 7
    for kind in ("best", "last"):
        package = open_package(run / kind)
        assert "validation_dice" in package.card.metrics
        segmentation = Segmenter(package)(sorted((tmp_path / "data" / "BraTS-GLI-00000-000").glob("*-t*")))
        assert segmentation.labels.shape == (24, 26, 22)
    again = CliRunner().invoke(app, ["train", str(tmp_path / "data"), "--card", str(card), "-o", str(run)])
    assert again.exit_code == 2 and "--resume" in again.output


def _train_command(data: Path, card: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "factorizer_cli.cli", "train", str(data), "--card", str(card), "-o", str(run),
            "--steps", "150", "--checkpoint-every", "10", "--validate-every", "50", "--validation-cases", "1",
            "--threads", "1", "--quiet", *extra]


def _saved_step(run: Path) -> int:
    try:
        with safe_open(str(run / STATE_FILE), framework="pt") as f:
            return json.loads(f.metadata()["run"])["step"]
    except Exception:  # not written yet
        return 0


@pytest.mark.slow
def test_resume_after_kill_ends_where_an_uninterrupted_run_ends(tmp_path):
    data, card = write_dataset(tmp_path / "data"), tiny_card(tmp_path / "card.json")
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(_train_command(data, card, tmp_path / "whole"), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_train_command(data, card, killed), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _saved_step(killed) < 30 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stopped_at = _saved_step(killed)
    assert 30 <= stopped_at < 150, "the run was not killed mid-way"

    # Other options on the resume call are ignored: the run goes on with the settings it started with.
    resume = _train_command(data, card, killed, "--resume", "--validation-cases", "2", "--steps", "99")
    subprocess.run(resume, check=True, env=env, capture_output=True)
    whole = [line.split(",") for line in (tmp_path / "whole" / "train-log.csv").read_text().splitlines()[1:]]
    resumed = [line.split(",") for line in (killed / "train-log.csv").read_text().splitlines()[1:]]
    assert [row[0] for row in resumed] == [str(s) for s in range(1, 151)]  # every step once, none lost
    np.testing.assert_allclose([float(r[1]) for r in resumed], [float(r[1]) for r in whole], rtol=1e-4)
    assert [r[2] for r in resumed] == [r[2] for r in whole]  # learning rates
    for a, b in zip(resumed, whole):  # validation Dice, where it ran
        assert (a[4:] == ["", "", ""]) == (b[4:] == ["", "", ""])
        if a[4]:
            np.testing.assert_allclose([float(x) for x in a[4:]], [float(x) for x in b[4:]], atol=1e-3)
    assert _saved_step(killed) == 150


def _touch_nifti(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), path)
    return path


def test_isles_and_nnunet_layouts_find_their_labels(tmp_path):
    isles, case = tmp_path / "isles", "sub-strokecase0001"
    for modality, folder in (("dwi", "dwi"), ("adc", "dwi"), ("flair", "anat")):
        _touch_nifti(isles / "rawdata" / case / "ses-0001" / folder / f"{case}_ses-0001_{modality}.nii.gz")
    mask = _touch_nifti(isles / "derivatives" / case / "ses-0001" / f"{case}_ses-0001_msk.nii.gz")
    ((name, files, label),) = find_training_cases(isles / "rawdata", zoo_card("isles22-swin-factorizer"))
    assert name == case and label == mask and [f.name.split("_")[-1] for f in files] == [
        "dwi.nii.gz", "adc.nii.gz", "flair.nii.gz"]

    nnunet = tmp_path / "Dataset001"
    for channel in range(4):
        _touch_nifti(nnunet / "imagesTr" / f"case7_{channel:04d}.nii.gz")
    truth = _touch_nifti(nnunet / "labelsTr" / "case7.nii.gz")
    card = ModelCard.load(tiny_card(tmp_path / "card.json"))
    ((name, files, label),) = find_training_cases(nnunet, card)
    assert name == "case7" and label == truth and len(files) == 4
