"""`factorizer pretrain` (Semantic Genesis): volumes found and cached, patterns discovered apart from each
other and from their mirror images, items drawn from their seed alone, a package written, and a run
killed mid-way that resumes to the losses of one that ran through."""

from __future__ import annotations

import csv
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
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from factorizer_cli import phantom
from factorizer_cli.cli import app
from factorizer_cli.errors import ConfigError, InputError
from factorizer_cli.genesis.cubes import batch_of_step, pattern_cube, pretraining_item, read_box
from factorizer_cli.genesis.discovery import (
    Patterns,
    brain_of,
    candidate_centres,
    discover,
    mirror_plane,
    nearest_neighbours,
)
from factorizer_cli.genesis.pretrain import PretrainConfig, learning_rate
from factorizer_cli.genesis.volumes import embed, find_volumes, modality_specs
from factorizer_cli.nn.unet3d import YNet3D
from factorizer_cli.train.state import STATE_FILE
from factorizer_cli.zoo.package import open_package

runner = CliRunner()
SHAPE = (40, 48, 36)  # small phantoms: a few seconds for a whole run


@pytest.fixture(autouse=True)
def _private_home(tmp_path, monkeypatch):
    """The pretraining cache (``FACTORIZER_HOME/pretrain-cache``) of each test in its own folder."""
    monkeypatch.setenv("FACTORIZER_HOME", str(tmp_path / "home"))


def write_phantoms(root: Path, cases: int = 4, seed: int = 0) -> Path:
    for i in range(cases):
        phantom.write_case(phantom.generate(seed, i, shape=SHAPE), root, phantom.case_id(seed, i))
    return root


def tiny_options(data: Path, run: Path, *extra: str) -> list[str]:
    return ["pretrain", str(data), "-o", str(run), "--no-register", "--modality", "t1", "--modality", "flair",
            "--cube-size", "16", "16", "16", "--classes", "3", "--base-width", "4", "--batch-size", "2",
            "--threads", "1", "--quiet", *extra]


class _InMemory:
    def __init__(self, image: np.ndarray):
        self.image = image


# ------------------------------------------------------------------------------------------ volumes


def test_modality_names_find_their_aliases_and_label_maps_are_ignored(tmp_path):
    data = write_phantoms(tmp_path / "data", 2)
    specs = modality_specs(["T1", "flair"])
    assert specs == [("t1", ("t1n", "t1w")), ("flair", ("t2f",))]
    found = find_volumes(data, specs)
    assert [name for name, _ in found] == ["BraTS-PHT-00000-000", "BraTS-PHT-00000-001"]
    assert [f.name.split("-")[-1] for f in found[0][1]] == ["t1n.nii.gz", "t2f.nii.gz"]
    with pytest.raises(InputError, match="given twice"):
        modality_specs(["t1", "T1"])
    with pytest.raises(InputError, match=r"no DWI .*\(2 of 2 cases lack a modality"):
        find_volumes(data, modality_specs(["dwi"]))


def test_loose_files_of_one_modality_are_volumes_and_one_is_too_few(tmp_path):
    for i in range(3):
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), tmp_path / f"subject{i}.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), np.eye(4)), tmp_path / "subject0_seg.nii.gz")
    assert [n for n, _ in find_volumes(tmp_path, modality_specs(["t1"]))] == ["subject0", "subject1", "subject2"]
    for i in (1, 2):
        (tmp_path / f"subject{i}.nii.gz").unlink()
    with pytest.raises(InputError, match="at least 2"):
        find_volumes(tmp_path, modality_specs(["t1"]))


def test_the_embedding_is_the_volume_in_8mm_blocks():
    volume = np.zeros((2, 16, 9, 8), np.float32)
    volume[0, :8, :8, :8] = 1.0
    volume[1, 8:, 8:, :] = 2.0
    vector = embed(volume).reshape(2, 2, 2, 1)
    assert vector[0, 0, 0, 0] == 1.0 and vector[0, 1, 0, 0] == 0.0
    assert vector[1, 1, 1, 0] == pytest.approx(2.0 / 8)  # one voxel of eight along Y, the rest padding


# ---------------------------------------------------------------------------------------- discovery


def _ball(shape=(48, 40, 40), radius=16.0) -> np.ndarray:
    grid = np.indices(shape).astype(np.float64)
    centre = (np.array(shape) - 1) / 2
    return ((grid - centre[:, None, None, None]) ** 2).sum(0) <= radius ** 2


def test_patterns_keep_apart_from_each_other_and_from_their_mirror_images():
    mask = _ball()
    embeddings = np.random.default_rng(0).random((6, 10))
    patterns = discover([f"v{i}" for i in range(6)], embeddings, mask, (16, 16, 8), classes=8, neighbours=3,
                        min_distance=6.0, rng=np.random.default_rng(1))
    assert patterns.mirror == pytest.approx(23.5)
    centres = np.array(patterns.centres, float)
    assert all(mask[tuple(c)] for c in patterns.centres)
    mirrored = centres.copy()
    mirrored[:, 0] = 2 * patterns.mirror - mirrored[:, 0]
    for i in range(len(centres)):
        for j in range(i):
            assert np.linalg.norm(centres[i] - centres[j]) >= 6.0
            assert np.linalg.norm(centres[i] - mirrored[j]) >= 6.0
    assert sorted(patterns.references[:6]) == list(range(6))  # each volume once per round
    for reference, members in zip(patterns.references, patterns.neighbours):
        distances = np.linalg.norm(embeddings[list(members)] - embeddings[reference], axis=1)
        assert members[0] == reference and len(members) == 3 and list(distances) == sorted(distances)
        others = np.linalg.norm(embeddings - embeddings[reference], axis=1)
        assert distances[-1] <= np.sort(others)[2]  # the nearest, not any three
    again = discover([f"v{i}" for i in range(6)], embeddings, mask, (16, 16, 8), 8, 3, 6.0, np.random.default_rng(1))
    assert again == patterns


def test_too_many_patterns_for_the_brain_is_one_line():
    with pytest.raises(ConfigError, match="cannot place pattern .* lower --classes or --min-distance"):
        discover(["a", "b"], np.zeros((2, 3)), _ball(), (16, 16, 8), classes=40, neighbours=2, min_distance=12.0,
                 rng=np.random.default_rng(0))
    with pytest.raises(ConfigError, match="do not fit"):
        candidate_centres(_ball((20, 20, 20), 8), (32, 16, 16))


def test_cube_centres_hold_whole_cubes_that_are_mostly_brain():
    mask = _ball()
    centres = candidate_centres(mask, (16, 16, 8))
    lo = centres - np.array([8, 8, 4])
    assert (lo >= 0).all() and (lo + [16, 16, 8] <= np.array(mask.shape)).all()
    shares = [mask[x:x + 16, y:y + 16, z:z + 8].mean() for x, y, z in lo[:: max(1, len(lo) // 50)]]
    assert min(shares) >= 0.5
    assert nearest_neighbours(np.array([[0.0], [5.0], [1.0], [0.0]]), 0, 3) == (0, 3, 2)


def test_the_brain_of_unregistered_volumes_is_where_most_are_nonzero():
    volumes = [_InMemory(np.zeros((1, 4, 4, 4), np.float16)) for _ in range(3)]
    volumes[0].image[0, :2] = 1
    volumes[1].image[0, :3] = 1
    mask = brain_of(volumes, None)
    assert mask[:2].all() and not mask[2:].any()  # in 2 of 3 volumes; a third is not half
    assert mirror_plane(mask) == 0.5


# -------------------------------------------------------------------------------------------- items


def _patterns(centre=(12, 12, 12)) -> Patterns:
    return Patterns(("a", "b"), (tuple(centre), (20, 12, 12)), (0, 1), ((0, 1), (1, 0)), 16.0, 4.0)


def test_an_item_is_a_function_of_its_seed_and_its_target_is_the_cube():
    rng = np.random.default_rng(3)
    volumes = [_InMemory(rng.random((2, 32, 28, 24)).astype(np.float16)) for _ in range(2)]
    patterns = _patterns()
    first = batch_of_step(volumes, patterns, (16, 16, 16), range(4), seed=5, step=7)
    second = batch_of_step(volumes, patterns, (16, 16, 16), range(4), seed=5, step=7)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    inputs, targets, labels = first
    assert inputs.shape == targets.shape == (4, 2, 16, 16, 16) and inputs.dtype == torch.float32
    assert set(labels.tolist()) <= {0, 1} and not torch.equal(inputs, targets)
    other = batch_of_step(volumes, patterns, (16, 16, 16), range(4), seed=5, step=8)
    assert not torch.equal(other[1], targets)
    for seed in range(40):  # the plain view (a third of the draws) is the box at the pattern, exactly
        x, y, label = pretraining_item(volumes, patterns, (16, 16, 16), np.random.default_rng([seed]))
        boxes = [read_box(v.image, [c - 8 for c in patterns.centres[label]], (16, 16, 16)) for v in volumes]
        if any(np.array_equal(y, box) for box in boxes):
            break
    else:
        pytest.fail("no item was the plain cube at its pattern")


def test_multiscale_views_stay_near_the_pattern_and_read_zero_beyond_the_grid():
    image = np.zeros((1, 40, 40, 16), np.float32)
    image[0, 10:30, 10:30, :] = 1.0
    shares = [pattern_cube(image, (20, 20, 8), (16, 16, 16), np.random.default_rng(s)).mean() for s in range(30)]
    assert min(shares) > 0.3  # every view overlaps the pattern's square
    assert len({round(float(s), 4) for s in shares}) > 5  # and they differ (scale, shift)
    edge = read_box(image, (-4, 0, 0), (8, 8, 8))
    assert (edge[:, :4] == 0).all() and edge.shape == (1, 8, 8, 8)


def test_the_rate_halves_on_schedule_and_defaults_follow_the_steps():
    config = PretrainConfig(steps=100, learning_rate=1e-3).resolved()
    assert config.halve_every == 25 and config.min_distance == 16.0
    assert [learning_rate(s, config) for s in (0, 24, 25, 99)] == [1e-3, 1e-3, 5e-4, 1.25e-4]
    with pytest.raises(ConfigError, match="multiple of 8"):
        PretrainConfig(cube_size=(20, 16, 16)).resolved()
    saved = json.loads(json.dumps(config.__dict__))
    assert PretrainConfig.from_settings(saved) == config


# -------------------------------------------------------------------------------------------- a run


def test_pretrain_writes_a_package_the_patterns_and_a_log(tmp_path):
    data, run = write_phantoms(tmp_path / "data"), tmp_path / "run"
    result = runner.invoke(app, tiny_options(data, run, "--steps", "4", "--checkpoint-every", "2"))
    assert result.exit_code == 0, result.output
    assert "pretrained 4 steps" in result.output and "--init" in result.output
    rows = list(csv.DictReader((run / "pretrain-log.csv").read_text().splitlines()))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert all(float(r["loss"]) > 0 and 0 <= float(r["accuracy"]) <= 1 for r in rows)
    package = open_package(run / "model")
    architecture = dict(package.card.architecture)
    assert architecture == {"class": "YNet3D", "n_class": 2, "in_channels": 2, "cls_classes": 3, "base_width": 4,
                            "norm": "batch", "act": "relu", "lst_act": "soft"}
    assert [m.name for m in package.card.modalities] == ["t1", "flair"]
    assert package.card.preprocessing.normalization.kind == "percentile" and package.card.roi == (16, 16, 16)
    assert package.card.metrics["pretraining_step"] == 4
    network = package.load_networks()[0]
    assert isinstance(network, YNet3D)
    patterns = Patterns.load(run)
    assert patterns.classes == 3 and len(patterns.volumes) == 4
    again = runner.invoke(app, tiny_options(data, run))
    assert again.exit_code == 2 and "--resume" in again.output


def test_unaligned_volumes_without_registration_are_refused(tmp_path):
    data = write_phantoms(tmp_path / "data", 2)
    phantom.write_case(phantom.generate(0, 9, shape=(44, 48, 36)), data, "BraTS-PHT-00000-009")
    result = runner.invoke(app, tiny_options(data, tmp_path / "run"))
    assert result.exit_code == 2 and "share one grid" in result.output
    assert not (tmp_path / "run").exists()


def _command(data: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "factorizer_cli.cli", *tiny_options(data, run, "--steps", "24",
                                                                       "--checkpoint-every", "2", *extra)]


def _saved_step(run: Path) -> int:
    try:
        with safe_open(str(run / STATE_FILE), framework="pt") as f:
            return json.loads(f.metadata()["run"])["step"]
    except Exception:  # not written yet
        return 0


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_losses_of_an_uninterrupted_one(tmp_path):
    data = write_phantoms(tmp_path / "data")
    env = {**os.environ, "PYTHONHASHSEED": "0", "FACTORIZER_HOME": str(tmp_path / "home")}
    subprocess.run(_command(data, tmp_path / "whole"), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_command(data, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _saved_step(killed) < 6 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stopped_at = _saved_step(killed)
    assert 6 <= stopped_at < 24, "the run was not killed mid-way"

    # Other options on the resume call are ignored; other DataLoader workers make the same batches.
    resume = _command(data, killed, "--resume", "--classes", "5", "--workers", "1")
    subprocess.run(resume, check=True, env=env, capture_output=True)
    whole = list(csv.DictReader((tmp_path / "whole" / "pretrain-log.csv").read_text().splitlines()))
    resumed = list(csv.DictReader((killed / "pretrain-log.csv").read_text().splitlines()))
    assert [r["step"] for r in resumed] == [str(s) for s in range(1, 25)]  # every step once, none lost
    for column in ("loss", "classification", "restoration", "accuracy"):
        np.testing.assert_allclose([float(r[column]) for r in resumed], [float(r[column]) for r in whole],
                                   rtol=1e-4, atol=1e-6, err_msg=column)
    assert [r["lr"] for r in resumed] == [r["lr"] for r in whole]  # the schedule continued, not restarted
    assert (killed / "patterns.json").read_text() == (tmp_path / "whole" / "patterns.json").read_text()


@pytest.mark.slow
def test_registered_volumes_share_the_template_grid_and_its_brain(tmp_path):
    from factorizer_cli.atlas import template as template_module

    try:
        atlas = template_module.template()
    except ConfigError as exc:
        pytest.skip(f"the MNI152 template is not installed: {exc}")
    data = tmp_path / "data"
    data.mkdir()
    for i, (shift, scale) in enumerate((((4.0, -3.0, 2.0), 3.0), ((-3.0, 2.0, -4.0), 0.5))):
        affine = atlas.affine.copy()
        affine[:3, 3] += shift
        nib.save(nib.Nifti1Image((atlas.array * scale).astype(np.int16), affine), data / f"subject{i}_T1w.nii.gz")
    # loose files of the one (default) modality: one volume each
    run = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(data), "-o", str(run), "--steps", "1", "--cube-size", "16", "16",
                                 "16", "--classes", "6", "--base-width", "2", "--batch-size", "2", "--threads", "1",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    patterns = Patterns.load(run)
    brain = template_module.brain_mask()
    assert all(brain[c] for c in patterns.centres)
    assert abs(patterns.mirror - 98) <= 1  # x = 0 of the symmetric template
    card = open_package(run / "model").card
    assert card.preprocessing.register == "mni152-2009a" and card.preprocessing.spacing == (1.0, 1.0, 1.0)
