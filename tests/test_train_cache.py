"""The on-disk cache of preprocessed training cases and the step-indexed batch loader: each case is
preprocessed once, a changed file or card makes a new entry, a killed write is never read, crops from
the memory maps are those of the in-memory arrays, and any number of workers gives the same batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from factorizer_cli.api import TrainConfig
from factorizer_cli.api import train as run_training
from factorizer_cli.cli import app
from factorizer_cli.io.atomic import _HOST
from factorizer_cli.train import data
from factorizer_cli.train.cache import CachedCase, CaseCache, default_cache_dir
from factorizer_cli.train.data import find_training_cases, load_case, sample_batch, targets_of
from factorizer_cli.train.loader import Share, batch_of_step, step_batches
from factorizer_cli.train.state import STATE_FILE
from factorizer_cli.zoo.card import ModelCard
from tests.test_train import tiny_card, with_spacing, write_dataset
from tests.test_train_softmax import softmax_card


@pytest.fixture(autouse=True)
def _private_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORIZER_HOME", str(tmp_path / "home"))


@pytest.fixture
def preprocess_calls(monkeypatch) -> list[int]:
    """Counts the cases ``load_case`` preprocesses (the module function it calls, wrapped)."""
    calls: list[int] = []
    original = data.preprocess

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(data, "preprocess", counting)
    return calls


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith("."))


def _cache_all(cache: CaseCache, folder: Path, card: ModelCard) -> list[CachedCase]:
    targets = targets_of(card)
    return [cache.case(n, f, lab, card, targets) for n, f, lab in find_training_cases(folder, card)]


def test_second_run_reads_the_cache_without_preprocessing(tmp_path, preprocess_calls):
    data_dir, card = write_dataset(tmp_path / "data", 3), tiny_card(tmp_path / "card.json")
    config = TrainConfig(steps=1, validation_cases=1, warmup_steps=1)
    run_training(data_dir, card, tmp_path / "first", config, device="cpu")
    assert len(preprocess_calls) == 3
    entries = _entries(default_cache_dir())
    assert len(entries) == 3
    written = [(e / "image.npy").stat().st_mtime_ns for e in entries]
    run_training(data_dir, card, tmp_path / "second", config, device="cpu")
    assert len(preprocess_calls) == 3  # nothing preprocessed again
    assert _entries(default_cache_dir()) == entries
    assert [(e / "image.npy").stat().st_mtime_ns for e in entries] == written


def test_entries_hold_what_load_case_made(tmp_path):
    card = ModelCard.load(tiny_card(tmp_path / "card.json"))
    data_dir = write_dataset(tmp_path / "data", 1)
    (cached,) = _cache_all(CaseCache(tmp_path / "cache"), data_dir, card)
    name, files, label = find_training_cases(data_dir, card)[0]
    memory = load_case(name, files, label, card, targets_of(card))
    assert isinstance(cached.image, np.memmap) and cached.name == memory.name
    for kind in ("image", "target", "foreground"):
        stored, made = getattr(cached, kind), getattr(memory, kind)
        assert stored.dtype == made.dtype and stored.shape == made.shape
        np.testing.assert_array_equal(stored, made)
    assert cached.pad_value == memory.pad_value


def test_changed_file_or_card_makes_a_new_entry(tmp_path, preprocess_calls):
    base = ModelCard.load(tiny_card(tmp_path / "card.json"))
    data_dir, cache = write_dataset(tmp_path / "data", 2), CaseCache(tmp_path / "cache")
    first = _cache_all(cache, data_dir, base)
    assert len(preprocess_calls) == 2 and len(_entries(cache.folder)) == 2

    flair = next((data_dir / "BraTS-GLI-00001-000").glob("*-t2f.nii.gz"))
    stat = flair.stat()
    os.utime(flair, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched: maybe changed
    second = _cache_all(cache, data_dir, base)
    assert len(preprocess_calls) == 3 and second[0] == first[0] and second[1] != first[1]

    _cache_all(cache, data_dir, with_spacing(base, 1.5))  # another preprocessing: other arrays
    assert len(preprocess_calls) == 5 and len(_entries(cache.folder)) == 5

    same_steps = ModelCard.from_dict({**base.to_dict(), "roi": [8, 8, 8]})  # the crops, not the cases
    assert _cache_all(cache, data_dir, same_steps) == second and len(preprocess_calls) == 5


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_killed_write_is_never_read(tmp_path, preprocess_calls, monkeypatch):
    card = ModelCard.load(tiny_card(tmp_path / "card.json"))
    data_dir, folder = write_dataset(tmp_path / "data", 1), tmp_path / "cache"
    (good,) = _cache_all(CaseCache(folder), data_dir, card)
    entry = good.folder
    for file in entry.iterdir():  # the entry as a killed run of another key would have left it
        file.unlink()
    entry.rmdir()

    # A write killed half-way (here: interrupted after the image) leaves no entry and no temporary.
    saved = []

    def killed_save(path, array):
        if saved:
            raise KeyboardInterrupt
        saved.append(path)
        np.save(path, array)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr("factorizer_cli.train.cache.save_array", killed_save)
        _cache_all(CaseCache(folder), data_dir, card)
    assert list(folder.iterdir()) == [] and len(saved) == 1

    # A process killed outright leaves its temporary folder: a later cache deletes it and never reads it.
    leftover = folder / f".{entry.name}.{_HOST}-{_dead_pid()}.0123abcd.tmp"
    leftover.mkdir()
    np.save(leftover / "image.npy", np.zeros((4, 2, 2, 2), np.float32))
    alive = folder / f".{entry.name}.{_HOST}-{os.getpid()}.4567cdef.tmp"  # a writer still at work
    alive.mkdir()
    calls = len(preprocess_calls)
    (case,) = _cache_all(CaseCache(folder), data_dir, card)
    assert not leftover.exists() and alive.exists()
    assert len(preprocess_calls) == calls + 1 and case.folder == entry
    assert case.image.shape[0] == 4 and case.image.shape[1:] == case.target.shape[1:]


@pytest.mark.parametrize("roi, fraction", [((16, 16, 16), 0.5), ((40, 40, 40), 0.0), ((12, 40, 8), 1.0)])
def test_crops_from_the_cache_equal_crops_from_memory(tmp_path, roi, fraction):
    card = ModelCard.load(tiny_card(tmp_path / "card.json"))
    data_dir = write_dataset(tmp_path / "data", 2)
    cached = _cache_all(CaseCache(tmp_path / "cache"), data_dir, card)
    memory = [load_case(n, f, lab, card, targets_of(card)) for n, f, lab in find_training_cases(data_dir, card)]
    for seed in range(4):
        got = sample_batch(cached, roi, 3, fraction, np.random.default_rng(seed))
        want = sample_batch(memory, roi, 3, fraction, np.random.default_rng(seed))
        old = _whole_volume_crops(memory, roi, 3, fraction, np.random.default_rng(seed))
        for a, b, c in zip(got, want, old):
            assert a.dtype == b.dtype == c.dtype and a.shape == (3, a.shape[1], *roi)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            torch.testing.assert_close(a, c, rtol=0, atol=0)


def _whole_volume_crops(cases, roi, batch_size, fraction, rng):
    """The crops as ``sample_batch`` made them before the cache: pad the whole volume, then cut."""
    def pad(array, value=0):
        widths = [(0, 0)] + [(0, max(0, r - n)) for r, n in zip(roi, array.shape[1:])]
        return np.pad(array, widths, constant_values=value)

    images, targets = [], []
    for _ in range(batch_size):
        case = cases[rng.integers(len(cases))]
        image, target = pad(case.image), pad(case.target, case.pad_value)
        shape = np.array(image.shape[1:])
        if len(case.foreground) and rng.random() < fraction:
            centre = case.foreground[rng.integers(len(case.foreground))]
            start = np.clip(centre - np.array(roi) // 2, 0, shape - roi)
        else:
            start = np.array([rng.integers(0, n - r + 1) for n, r in zip(shape, roi)])
        box = (slice(None), *(slice(s, s + r) for s, r in zip(start, roi)))
        images.append(image[box])
        targets.append(target[box])
    target = torch.from_numpy(np.stack(targets))
    return torch.from_numpy(np.stack(images)), target.float() if target.dtype == torch.bool else target.long()


def test_softmax_targets_pad_with_the_background_from_the_cache(tmp_path):
    card = softmax_card(outputs=["NCR", "background", "ED", "ET"])  # background is class 1, not 0
    data_dir = write_dataset(tmp_path / "data", 1)
    (case,) = _cache_all(CaseCache(tmp_path / "cache"), data_dir, card)
    assert case.pad_value == 1 and case.target.dtype == np.uint8
    _, target = sample_batch([case], (40, 40, 40), 1, 0.0, np.random.default_rng(0))
    assert target.dtype == torch.int64 and (target[0, 0, -1] == 1).all()


def test_workers_make_the_batches_of_their_steps(tmp_path):
    card = ModelCard.load(tiny_card(tmp_path / "card.json"))
    cases = _cache_all(CaseCache(tmp_path / "cache"), write_dataset(tmp_path / "data", 3), card)
    arguments = (cases, card.roi, Share(2), 0.5, 7)
    alone = list(step_batches(*arguments, 0, 5, workers=0))
    pooled = list(step_batches(*arguments, 0, 5, workers=2))
    resumed = list(step_batches(*arguments, 3, 5, workers=2))  # a run resumed at step 3
    assert len(alone) == len(pooled) == 5 and len(resumed) == 2
    for step, (a, b) in enumerate(zip(alone, pooled)):
        for x, y, z in zip(a, b, batch_of_step(cases, card.roi, range(2), 0.5, 7, step)):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
            torch.testing.assert_close(x, z, rtol=0, atol=0)
    for a, b in zip(alone[3:], resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(alone[0][0], alone[1][0])  # steps differ


def test_processes_and_micro_batches_share_the_crops_of_one_global_batch(tmp_path):
    """Batch 4 alone = batch 2 in each of 2 processes = batch 1 × 2 micro-batches × 2 processes."""
    card = ModelCard.load(tiny_card(tmp_path / "card.json"))
    cases = _cache_all(CaseCache(tmp_path / "cache"), write_dataset(tmp_path / "data", 3), card)

    def crops(share: Share) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(step_batches(cases, card.roi, share, 0.5, 7, 0, 2))  # this process's micro-batches

    alone = crops(Share(4))
    two = [crops(Share(2, rank=r, processes=2)) for r in range(2)]
    micro = [crops(Share(1, accumulate=2, rank=r, processes=2)) for r in range(2)]
    assert len(alone) == 2 and len(two[0]) == 2 and len(micro[0]) == 4
    for step in range(2):
        for part in range(2):  # image, target
            want = alone[step][part]
            torch.testing.assert_close(torch.cat([two[0][step][part], two[1][step][part]]), want, rtol=0, atol=0)
            mine = [micro[r][2 * step + a][part] for a in range(2) for r in range(2)]  # item order: (a·P + p)
            torch.testing.assert_close(torch.cat(mine), want, rtol=0, atol=0)
    assert not torch.equal(alone[0][0][0], alone[0][0][1])  # items of a step differ


def test_zero_and_two_workers_train_alike(tmp_path):
    data_dir, card = write_dataset(tmp_path / "data", 3), tiny_card(tmp_path / "card.json")
    config = TrainConfig(steps=3, validation_cases=1, warmup_steps=1, validate_every=3)
    alone = run_training(data_dir, card, tmp_path / "alone", config, device="cpu")
    cache = tmp_path / "chosen-cache"
    result = CliRunner().invoke(app, ["train", str(data_dir), "--card", str(card), "-o", str(tmp_path / "pooled"),
                                      "--steps", "3", "--validation-cases", "1", "--warmup-steps", "1",
                                      "--validate-every", "3", "--workers", "2", "--cache", str(cache),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(_entries(cache)) == 3  # --cache chose the folder
    log = (tmp_path / "pooled" / "train-log.csv").read_text().splitlines()[1:]
    pooled = [float(line.split(",")[1]) for line in log]
    assert pooled == [row["loss"] for row in alone.history]
    assert alone.history[-1]["validation"] == {k: float(v) for k, v in zip(
        ("WT", "TC", "ET"), log[-1].split(",")[4:])}


def test_negative_workers_are_refused(tmp_path):
    result = CliRunner().invoke(app, ["train", str(tmp_path), "--card", "demo", "-o", str(tmp_path / "r"),
                                      "--workers", "-1"])
    assert result.exit_code == 2 and "--workers" in result.output


class _Crash(Exception):
    pass


def test_a_run_crashed_with_workers_resumes_exactly_with_other_workers(tmp_path):
    """Steps 1-2 made by 2 workers, the crash, steps 3-5 by 0 workers: the run of one process, weights and all."""
    data_dir, card = write_dataset(tmp_path / "data", 3), tiny_card(tmp_path / "card.json")
    config = TrainConfig(steps=5, warmup_steps=1, validation_cases=1, validate_every=5, checkpoint_every=2)
    whole = run_training(data_dir, card, tmp_path / "whole", config, device="cpu")

    def crash(step, total, loss, validation):
        if step == 3:  # after the state of step 2 was saved
            raise _Crash

    with pytest.raises(_Crash):
        run_training(data_dir, card, tmp_path / "crashed", config, device="cpu", on_step=crash, workers=2)
    resumed = run_training(data_dir, card, tmp_path / "crashed", config, resume=True, device="cpu", workers=0)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]
    assert resumed.validation == whole.validation
    whole_state, crashed_state = (load_file(tmp_path / r / STATE_FILE) for r in ("whole", "crashed"))
    for key in whole_state:
        torch.testing.assert_close(crashed_state[key], whole_state[key], rtol=0, atol=0)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_workers_error_comes_back_as_one_line(workers):
    from torch.utils.data import DataLoader, Dataset

    from factorizer_cli.errors import InputError
    from factorizer_cli.train.loader import _one_line_errors

    class Failing(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int):
            if index == 1:
                open("/nonexistent/factorizer-cache/image.npy")  # noqa: SIM115
            raise InputError("case.nii.gz: bad file; fix it")

    with pytest.raises(InputError) as raised:
        list(_one_line_errors(iter(DataLoader(Failing(), batch_size=None, num_workers=workers))))
    assert str(raised.value) == "case.nii.gz: bad file; fix it"
