"""``factorizer segment DATASET -o FOLDER``: many cases, bad ones reported, shards, restarts."""

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
from typer.testing import CliRunner

from factorizer_cli.cli import app
from factorizer_cli.errors import InputError
from factorizer_cli.pipeline.batch import find_cases, in_shard, parse_shard

from .oracle import BRATS_INPUTS, oracle_package, phantom, write_case

runner = CliRunner()
SPECS = [(m["name"], tuple(m["aliases"])) for m in BRATS_INPUTS]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    oracle_package(root)
    return root


def _dataset(root: Path, good: int, bad: int = 0) -> tuple[Path, np.ndarray]:
    images, expected = phantom(shape=(30, 32, 28))
    data = root / "dataset"
    for i in range(good):
        paths = write_case(data / f"BraTS-GLI-{i:05d}-000", images, np.eye(4))
        for p in paths:  # BraTS names carry the case id
            p.rename(p.with_name(p.name.replace("00001", f"{i:05d}")))
    for i in range(bad):
        case = data / f"BraTS-GLI-{900 + i:05d}-000"
        write_case(case, images, np.eye(4))
        (case / "BraTS-GLI-00001-000-t2f.nii.gz").write_bytes(b"not an image")
    return data, expected


def test_mixed_good_and_bad_cases(tmp_path, model_dir):
    data, expected = _dataset(tmp_path, good=3, bad=1)
    (data / "BraTS-GLI-00950-000").mkdir()  # no images at all
    out = tmp_path / "out"
    result = runner.invoke(app, ["segment", str(data), "-o", str(out), "--model", str(model_dir)])
    assert result.exit_code == 1, result.output
    summary = json.loads((out / "summary.json").read_text())
    status = {c["name"]: c["status"] for c in summary["cases"]}
    assert status == {"BraTS-GLI-00000-000": "done", "BraTS-GLI-00001-000": "done", "BraTS-GLI-00002-000": "done",
                      "BraTS-GLI-00900-000": "failed", "BraTS-GLI-00950-000": "failed"}
    errors = {c["name"]: c["error"] for c in summary["cases"] if c["error"]}
    assert "t2f.nii.gz" in errors["BraTS-GLI-00900-000"] and "no NIfTI" in errors["BraTS-GLI-00950-000"]
    for i in range(3):
        labels = np.asarray(nib.load(out / f"BraTS-GLI-{i:05d}-000.nii.gz").dataobj)
        np.testing.assert_array_equal(labels, expected)
    assert sorted(p.name for p in out.iterdir()) == [f"BraTS-GLI-{i:05d}-000.nii.gz" for i in range(3)] + ["summary.json"]

    again = runner.invoke(app, ["segment", str(data), "-o", str(out), "--model", str(model_dir)])
    status = {c["name"]: c["status"] for c in json.loads((out / "summary.json").read_text())["cases"]}
    assert status["BraTS-GLI-00000-000"] == "skipped" and status["BraTS-GLI-00900-000"] == "failed"
    assert "3 skipped" in again.output
    forced = runner.invoke(app, ["segment", str(data), "-o", str(out), "--model", str(model_dir), "--overwrite",
                                 "--quiet"])
    status = {c["name"]: c["status"] for c in json.loads((out / "summary.json").read_text())["cases"]}
    assert forced.exit_code == 1 and status["BraTS-GLI-00000-000"] == "done"


def test_nnunet_flat_folder(tmp_path, model_dir):
    images, expected = phantom(shape=(30, 32, 28))
    data = tmp_path / "imagesTs"
    data.mkdir()
    for case in ("case_001", "case_002"):
        for c, volume in enumerate(images):
            nib.save(nib.Nifti1Image(volume, np.eye(4)), data / f"{case}_{c:04d}.nii.gz")
    cases = find_cases(data, SPECS)
    assert [c.name for c in cases] == ["case_001", "case_002"] and all(len(c.files) == 4 for c in cases)
    result = runner.invoke(app, ["segment", str(data), "-o", str(tmp_path / "out"), "--model", str(model_dir)])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "out" / "case_002.nii.gz").dataobj), expected)


# Each case's worker for N = 2, 3 and 8, computed once and written down: workers on other machines, other
# Python versions or after a restart must agree, which one process calling the function twice cannot show.
PINNED_SHARDS = {
    "BraTS-GLI-00000-000": (2, 1, 2),
    "BraTS-GLI-00001-000": (1, 2, 1),
    "BraTS-GLI-00002-000": (1, 2, 7),
    "BraTS-GLI-00003-000": (2, 1, 8),
    "BraTS-GLI-00004-000": (2, 1, 4),
    "BraTS-GLI-00005-000": (2, 1, 8),
    "BraTS-GLI-00006-000": (1, 1, 1),
    "BraTS-GLI-00007-000": (1, 3, 1),
    "case_001": (1, 1, 3),
    "case_002": (1, 2, 3),
    "sub-01_ses-1": (2, 1, 4),
    "sub-02_ses-1": (1, 3, 3),
    "patient-é": (2, 1, 2),  # non-ASCII names hash their UTF-8 bytes
}


@pytest.mark.parametrize("name", PINNED_SHARDS)
def test_each_case_keeps_its_pinned_shard(name):
    for n, expected in zip((2, 3, 8), PINNED_SHARDS[name]):
        assert [k for k in range(1, n + 1) if in_shard(name, k, n)] == [expected], (name, n)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
def test_shards_partition_the_cases(n):
    names = [f"BraTS-GLI-{i:05d}-000" for i in range(200)]
    shares = [[name for name in names if in_shard(name, k, n)] for k in range(1, n + 1)]
    assert sorted(sum(shares, [])) == sorted(names)  # every case in exactly one shard
    assert all(shares)  # 200 names leave no worker idle


def test_bad_shard_text():
    for text in ("0/3", "4/3", "a/b", "2"):
        with pytest.raises(InputError, match="K/N"):
            parse_shard(text)
    assert parse_shard(" 2 / 8 ") == (2, 8)


def _segment_process(data: Path, out: Path, model: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "factorizer_cli.cli", "segment", str(data), "-o", str(out),
                             "--model", str(model), "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_shards_at_once_cover_every_case_once(tmp_path, model_dir):
    data, _ = _dataset(tmp_path, good=6)
    out = tmp_path / "out"
    workers = [_segment_process(data, out, model_dir, "--shard", f"{k}/2") for k in (1, 2)]
    for worker in workers:
        assert worker.wait(timeout=300) == 0, worker.stderr.read().decode()
    done = []
    for k in (1, 2):
        done += [c["name"] for c in json.loads((out / f"summary-{k}-of-2.json").read_text())["cases"]
                 if c["status"] == "done"]
    assert sorted(done) == sorted(p.name for p in data.iterdir())


def _label_maps(out: Path) -> list[Path]:
    """The finished label maps: a write in progress is a hidden temporary file, which pathlib's glob matches too."""
    return [p for p in out.glob("*.nii.gz") if not p.name.startswith(".")]


def _wait_for_first_output(out: Path, worker: subprocess.Popen, seconds: float = 120) -> None:
    """Until the first label map lands; fails the test on timeout or if the worker exits first."""
    deadline = time.monotonic() + seconds
    while True:
        exited = worker.poll() is not None  # asked before looking, so a last write before exit is seen
        if out.exists() and _label_maps(out):
            return
        if exited:
            pytest.fail(f"the worker exited ({worker.returncode}) before writing a label map: "
                        f"{worker.stderr.read().decode()}")
        if time.monotonic() > deadline:
            worker.kill()
            worker.wait()
            pytest.fail(f"no label map in {out} after {seconds:.0f} s")
        time.sleep(0.05)


def _no_partial_files(out: Path) -> None:
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers
    for label_map in _label_maps(out):
        assert np.asarray(nib.load(label_map).dataobj).shape == (30, 32, 28)


def test_killed_batch_resumes_with_no_partial_output(tmp_path, model_dir):
    data, expected = _dataset(tmp_path, good=6)
    out = tmp_path / "out"
    worker = _segment_process(data, out, model_dir)
    _wait_for_first_output(out, worker)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=60)
    assert worker.returncode == -signal.SIGKILL
    for label_map in _label_maps(out):  # whatever is there is whole (a killed write is a hidden file)
        assert np.asarray(nib.load(label_map).dataobj).shape == (30, 32, 28)
    resumed = _segment_process(data, out, model_dir)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    _no_partial_files(out)
    names = sorted(p.name for p in data.iterdir())
    assert sorted(p.name for p in _label_maps(out)) == [f"{n}.nii.gz" for n in names]
    for name in names:
        np.testing.assert_array_equal(np.asarray(nib.load(out / f"{name}.nii.gz").dataobj), expected)


def test_sigterm_stops_after_the_current_case(tmp_path, model_dir):
    data, _ = _dataset(tmp_path, good=8)
    out = tmp_path / "out"
    worker = _segment_process(data, out, model_dir)
    _wait_for_first_output(out, worker)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=120) == 0, worker.stderr.read().decode()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] is True
    _no_partial_files(out)
    done = [c for c in summary["cases"] if c["status"] == "done"]
    assert 1 <= len(done) < 8 and len(_label_maps(out)) == len(done)


def test_a_case_whose_output_cannot_be_written_fails_alone(tmp_path, model_dir):
    data, _ = _dataset(tmp_path, good=3)
    out = tmp_path / "out"
    (out / "BraTS-GLI-00001-000.nii.gz").mkdir(parents=True)  # something that is not a file sits there
    result = runner.invoke(app, ["segment", str(data), "-o", str(out), "--model", str(model_dir), "--overwrite"])
    assert result.exit_code == 1
    cases = {c["name"]: c for c in json.loads((out / "summary.json").read_text())["cases"]}
    assert cases["BraTS-GLI-00001-000"]["status"] == "failed"
    assert "cannot write" in cases["BraTS-GLI-00001-000"]["error"]
    assert cases["BraTS-GLI-00000-000"]["status"] == cases["BraTS-GLI-00002-000"]["status"] == "done"


def test_input_folder_is_only_read(tmp_path, model_dir):
    data, _ = _dataset(tmp_path, good=2)
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    data.chmod(0o555)
    for case in data.iterdir():
        case.chmod(0o555)
    try:
        result = runner.invoke(app, ["segment", str(data), "-o", str(tmp_path / "out"), "--model", str(model_dir)])
    finally:
        for p in [data, *data.iterdir()]:
            p.chmod(0o755)
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == before


def test_leftovers_of_killed_writers_are_removed_and_nothing_else(tmp_path):
    from factorizer_cli.io.atomic import _HOST, remove_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    files = {
        "dead": tmp_path / f".case.{_HOST}-{dead}.0123abcd.tmp.nii.gz",
        "alive": tmp_path / f".case.{_HOST}-{os.getpid()}.0123abcd.tmp.nii.gz",
        "other host": tmp_path / f".case.elsewhere-{dead}.0123abcd.tmp.nii.gz",
        "output": tmp_path / "case.nii.gz",
    }
    for file in files.values():
        file.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == 1
    assert [name for name, file in files.items() if not file.exists()] == ["dead"]


def test_pattern_picks_nested_case_folders(tmp_path, model_dir):
    images, expected = phantom(shape=(30, 32, 28))
    for subject in ("sub-01", "sub-02"):
        write_case(tmp_path / "bids" / subject / "ses-1", images, np.eye(4))
    (tmp_path / "bids" / "derivatives").mkdir()
    cases = find_cases(tmp_path / "bids", SPECS, pattern="sub-*/ses-*")
    assert [c.name for c in cases] == ["sub-01_ses-1", "sub-02_ses-1"]
    result = runner.invoke(app, ["segment", str(tmp_path / "bids"), "-o", str(tmp_path / "out"), "--model",
                                 str(model_dir), "--pattern", "sub-*/ses-*", "--quiet"])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "out" / "sub-02_ses-1.nii.gz").dataobj), expected)
