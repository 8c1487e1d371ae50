"""``factorizer segment`` end to end: outputs, and every bad input refused cleanly with nothing written."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from factorizer_cli.cli import app

from .oracle import oblique, oracle_package, phantom, write_case

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    oracle_package(root)
    return root


@pytest.fixture
def case(tmp_path):
    images, expected = phantom()
    paths = write_case(tmp_path / "case", images, oblique(8.0))
    return tmp_path, paths, expected


def invoke(*args):
    return runner.invoke(app, ["segment", *map(str, args)])


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_case_folder_with_every_output(model_dir, case):
    root, paths, expected = case
    out = root / "out"
    out.mkdir()
    result = invoke(root / "case", "-o", out / "seg.nii.gz", "--model", model_dir,
                    "--probabilities", out / "prob.nii.gz", "--stats", out / "seg.json",
                    "--preview", out / "seg.png")
    assert result.exit_code == 0, result.output
    assert files_under(out) == {"seg.nii.gz", "prob.nii.gz", "seg.json", "seg.png"}
    np.testing.assert_array_equal(np.asarray(nib.load(out / "seg.nii.gz").dataobj), expected)
    prob = nib.load(out / "prob.nii.gz")
    assert prob.shape == (*expected.shape, 3) and prob.get_data_dtype() == np.float32
    stats = json.loads((out / "seg.json").read_text())
    assert stats["regions_ml"]["WT"] == pytest.approx((expected > 0).sum() / 1000, rel=1e-4)
    assert (out / "seg.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "region WT" in result.output and "done in" in result.output


def test_files_named_with_modality_aliases_in_any_order(model_dir, case):
    root, paths, expected = case
    t1n, t1c, t2w, t2f = paths
    result = invoke(t2f, t1n, t2w, t1c, "--modality", "flair", "t1", "t2", "t1ce", "-o",
                    root / "seg.nii.gz", "--model", model_dir, "--quiet")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == ""
    np.testing.assert_array_equal(np.asarray(nib.load(root / "seg.nii.gz").dataobj), expected)


def _bad_input_cases(root: Path, paths: list[Path]) -> dict[str, tuple[list, str]]:
    """name -> (segment arguments before -o, text the one-line error must contain)."""
    t1n, t1c, t2w, t2f = paths
    bad = root / "bad"
    bad.mkdir()
    good = nib.load(t1n)

    def save(name, data, affine=good.affine):
        path = bad / name
        nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), path)
        return path

    volume = np.asarray(good.dataobj)
    nan = volume.copy()
    nan[3, 4, 5] = np.nan
    far = good.affine.copy()
    far[:3, 3] += 1000.0
    truncated = bad / "truncated.nii.gz"
    truncated.write_bytes(t1n.read_bytes()[: len(t1n.read_bytes()) // 2])
    text = bad / "notes.txt"
    text.write_text("not an image")
    fake = bad / "fake.nii.gz"
    fake.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    return {
        "missing file": ([bad / "nope.nii.gz", t1c, t2w, t2f, "-m", "t1,t1ce,t2,flair"], "nope.nii.gz"),
        "wrong count": ([t1n, t1c, t2w, "-m", "t1,t1ce,t2"], "takes 4"),
        "unknown name": ([t1n, t1c, t2w, t2f, "-m", "t1,t1ce,t2,pd"], "unknown modality 'pd'"),
        "duplicate name": ([t1n, t1c, t2w, t2f, "-m", "t1,t1,t2,flair"], "given twice"),
        "not a NIfTI": ([text, t1c, t2w, t2f, "-m", "t1,t1ce,t2,flair"], "notes.txt"),
        "corrupt content": ([fake, t1c, t2w, t2f, "-m", "t1,t1ce,t2,flair"], "fake.nii.gz"),
        "truncated gzip": ([truncated, t1c, t2w, t2f, "-m", "t1,t1ce,t2,flair"], "truncated.nii.gz"),
        "4D image": ([save("four_d.nii.gz", np.stack([volume] * 3, -1)), t1c, t2w, t2f,
                      "-m", "t1,t1ce,t2,flair"], "one 3D file per modality"),
        "2D image": ([save("two_d.nii.gz", volume[:, :, 10]), t1c, t2w, t2f, "-m", "t1,t1ce,t2,flair"],
                     "two_d.nii.gz"),
        "NaN voxels": ([save("nan.nii.gz", nan), t1c, t2w, t2f, "-m", "t1,t1ce,t2,flair"], "NaN or Inf"),
        "all zeros": ([save("zeros.nii.gz", np.zeros_like(volume)), t1c, t2w, t2f,
                       "-m", "t1,t1ce,t2,flair"], "zeros.nii.gz"),
        "grids that cannot be matched": ([t1n, save("far.nii.gz", volume, far), t2w, t2f,
                                          "-m", "t1,t1ce,t2,flair"], "does not overlap"),
        "case folder missing a modality": ([_folder_without_flair(root, paths)], "FLAIR"),
    }


def _folder_without_flair(root: Path, paths: list[Path]) -> Path:
    folder = root / "incomplete"
    folder.mkdir()
    for p in paths[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


BAD_INPUTS = ["missing file", "wrong count", "unknown name", "duplicate name", "not a NIfTI",
              "corrupt content", "truncated gzip", "4D image", "2D image", "NaN voxels", "all zeros",
              "grids that cannot be matched", "case folder missing a modality"]


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_one_line_exit_2_nothing_written(model_dir, case, name):
    root, paths, _ = case
    args, message = _bad_input_cases(root, paths)[name]
    out = root / "out"
    out.mkdir()
    result = invoke(*args, "-o", out / "seg.nii.gz", "--model", model_dir, "--stats", out / "s.json")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert message in lines[0], lines[0]
    assert files_under(out) == set()


def test_output_path_equal_to_an_input(model_dir, case):
    root, paths, _ = case
    before = paths[0].read_bytes()
    result = invoke(root / "case", "-o", paths[0], "--model", model_dir)
    assert result.exit_code == 2 and "would overwrite the input" in result.output
    assert paths[0].read_bytes() == before


@pytest.mark.parametrize("target, message", [
    ("/proc/sys/seg.nii.gz", "not writable"),  # not writable, even for root
    ("{root}/no/such/folder/seg.nii.gz", "does not exist"),
    ("{root}/seg.txt", "must end in .nii.gz"),
])
def test_output_that_cannot_be_written(model_dir, case, target, message):
    root, paths, _ = case
    before = files_under(root)
    result = invoke(root / "case", "-o", target.format(root=root), "--model", model_dir)
    assert result.exit_code == 2 and message in result.output, result.output
    assert files_under(root) == before


def test_explicit_cuda_without_a_gpu_is_refused(model_dir, case):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    root, _, _ = case
    result = invoke(root / "case", "-o", root / "seg.nii.gz", "--model", model_dir, "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA GPU is available" in result.output
    assert not (root / "seg.nii.gz").exists()


def test_runs_as_a_real_subprocess(model_dir, case):
    root, _, expected = case
    env = {**os.environ, "COLUMNS": "100"}
    done = subprocess.run(
        [sys.executable, "-m", "factorizer_cli.cli", "segment", str(root / "case"), "-o",
         str(root / "seg.nii.gz"), "--model", str(model_dir)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.asarray(nib.load(root / "seg.nii.gz").dataobj), expected)
    bad = subprocess.run(
        [sys.executable, "-m", "factorizer_cli.cli", "segment", str(root / "missing"), "-o",
         str(root / "seg2.nii.gz"), "--model", str(model_dir)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "missing" in bad.stderr


def test_modality_names_may_come_before_the_files(model_dir, case):
    root, paths, expected = case
    t1n, t1c, t2w, t2f = paths
    result = invoke("--modality", "flair", "t1", "t2", "t1ce", t2f, t1n, t2w, t1c, "-o", root / "seg.nii.gz",
                    "--model", model_dir, "--quiet")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.asarray(nib.load(root / "seg.nii.gz").dataobj), expected)


def test_split_modality_names_unit():
    from factorizer_cli.cli.segment import split_modality_names

    files = ["a.nii.gz", "b.nii.gz"]
    assert split_modality_names(files + ["t2"], ["t1"]) == (files, ["t1", "t2"])
    assert split_modality_names(["t2"] + files, ["t1"]) == (files, ["t1", "t2"])
    assert split_modality_names(files, ["t1,t2"]) == (files, ["t1", "t2"])
    assert split_modality_names(files, ["t1", "t2"]) == (files, ["t1", "t2"])
