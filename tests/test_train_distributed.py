"""Training at scale: two CPU processes under `torchrun` (gloo) train exactly as one process with the same
global batch, a run killed under torchrun resumes exactly, micro-batches accumulate into a batch, and
bf16 mixed precision trains on the CPU."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from factorizer_cli.api import TrainConfig
from factorizer_cli.api import train as run_training
from factorizer_cli.cli import app
from factorizer_cli.errors import ConfigError
from factorizer_cli.train.loop import _per_process
from factorizer_cli.train.precision import cpu_has_native_bf16, gradient_scaler
from factorizer_cli.zoo.card import ModelCard
from tests.test_train import TINY_ARCHITECTURE, _saved_step, tiny_card, write_dataset

SETTINGS = ["--validation-cases", "1", "--warmup-steps", "2", "--validate-every", "10", "--seed", "3"]


@pytest.fixture(autouse=True)
def _private_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORIZER_HOME", str(tmp_path / "home"))


def _torchrun(data: Path, card: Path, run: Path, steps: int, *extra: str) -> list[str]:
    """Two processes on this machine, each with batch 2 (a global batch of 4)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "factorizer_cli", "train", str(data), "--card", str(card), "-o", str(run), "--steps", str(steps),
            "--batch-size", "2", "--device", "cpu", "--quiet", *SETTINGS, *extra]


def _environment(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "FACTORIZER_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}


def _one_process(data: Path, card: Path, run: Path, steps: int, checkpoint_every: int = 25):
    config = TrainConfig(steps=steps, batch_size=4, validation_cases=1, warmup_steps=2, validate_every=10, seed=3,
                         checkpoint_every=checkpoint_every)
    return run_training(data, card, run, config, device="cpu")


def _log(run: Path) -> list[dict[str, str]]:
    with open(run / "train-log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_run(log: list[dict[str, str]], history: list[dict]) -> None:
    assert [int(row["step"]) for row in log] == [row["step"] for row in history]
    np.testing.assert_allclose([float(row["loss"]) for row in log], [row["loss"] for row in history], rtol=1e-4)
    assert [float(row["lr"]) for row in log] == pytest.approx([row["lr"] for row in history], rel=1e-5)  # logged to 6 digits
    for row, reference in zip(log, history):
        if "validation" in reference:
            got = [float(row[f"dice_{k}"]) for k in reference["validation"]]
            np.testing.assert_allclose(got, list(reference["validation"].values()), atol=2e-3)


def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path):
    data, card = write_dataset(tmp_path / "data"), tiny_card(tmp_path / "card.json")
    alone = _one_process(data, card, tmp_path / "alone", 20)
    finished = subprocess.run(_torchrun(data, card, tmp_path / "ddp", 20), env=_environment(tmp_path),
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("trained 20 steps") == 1  # one writer
    _assert_same_run(_log(tmp_path / "ddp"), alone.history)
    assert any("validation" in row for row in alone.history)


def test_two_processes_accumulating_micro_batches_train_as_one(tmp_path):
    """Batch 1 × 2 micro-batches in each of 2 processes (under no_sync but the last) = batch 2 × 2 alone:
    the same crops in each micro-batch, the sigmoid Dice pooled over the processes."""
    data, card = write_dataset(tmp_path / "data"), tiny_card(tmp_path / "card.json")
    config = TrainConfig(steps=8, batch_size=2, accumulate=2, validation_cases=1, warmup_steps=2, validate_every=8,
                         seed=3)
    alone = run_training(data, card, tmp_path / "alone", config, device="cpu")
    command = _torchrun(data, card, tmp_path / "ddp", 8, "--accumulate", "2", "--validate-every", "8")
    command[command.index("--batch-size") + 1] = "1"
    finished = subprocess.run(command, env=_environment(tmp_path), capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    _assert_same_run(_log(tmp_path / "ddp"), alone.history)


class _Crash(Exception):
    pass


def test_a_one_process_run_resumes_under_torchrun_with_its_global_batch(tmp_path):
    """Started alone with batch 4, crashed, resumed by 2 processes (batch 2 each): the uninterrupted run."""
    data, card = write_dataset(tmp_path / "data"), tiny_card(tmp_path / "card.json")
    whole = _one_process(data, card, tmp_path / "whole", 8, checkpoint_every=2)

    def crash(step, total, loss, validation):
        if step == 5:  # after the state of step 4 was saved
            raise _Crash

    config = TrainConfig(steps=8, batch_size=4, validation_cases=1, warmup_steps=2, validate_every=10, seed=3,
                         checkpoint_every=2)
    with pytest.raises(_Crash):
        run_training(data, card, tmp_path / "crashed", config, device="cpu", on_step=crash)
    resumed = subprocess.run(_torchrun(data, card, tmp_path / "crashed", 8, "--resume"), env=_environment(tmp_path),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(_log(tmp_path / "crashed"), whole.history)


def test_the_fp16_loss_scale_is_saved_with_the_state(tmp_path):
    from factorizer_cli.train.state import RunState, load_state, save_state

    network = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(network.parameters())
    scaler = {"scale": 8192.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 17}
    save_state(tmp_path, network, optimizer, RunState(step=3, settings={"steps": 9}, scaler=scaler))
    assert load_state(tmp_path, network, optimizer).scaler == scaler
    assert gradient_scaler(torch.device("cpu"), "fp16", scaler).state_dict() == scaler  # what the loop restores


@pytest.mark.slow
def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc): torchrun starts its workers in sessions of their own, so
    a signal to its process group misses them, and a surviving worker would go on writing the run."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants, as a node failure would."""
    for target in [pid, *_descendants(pid)]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_run_killed_under_torchrun_resumes_exactly(tmp_path):
    data, card = write_dataset(tmp_path / "data"), tiny_card(tmp_path / "card.json")
    steps, killed = 60, tmp_path / "killed"
    alone = _one_process(data, card, tmp_path / "alone", steps)
    env = _environment(tmp_path)
    process = subprocess.Popen(_torchrun(data, card, killed, steps, "--checkpoint-every", "5"), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while _saved_step(killed) < 10 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    _kill_tree(process.pid)  # torchrun and both of its processes, at once
    process.wait()
    stopped_at = _saved_step(killed)
    assert 10 <= stopped_at < steps, "the run was not killed mid-way"

    resumed = subprocess.run(_torchrun(data, card, killed, 5, "--resume"), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _saved_step(killed) == steps
    _assert_same_run(_log(killed), alone.history)


def test_a_resumed_run_keeps_its_global_batch_over_other_process_counts():
    started = TrainConfig(batch_size=2, processes=2)
    assert _per_process(TrainConfig(batch_size=3), 2, resume=False).processes == 2
    assert _per_process(started, 1, resume=True).batch_size == 4
    assert _per_process(started, 4, resume=True).batch_size == 1
    with pytest.raises(ConfigError, match="divides 4"):
        _per_process(started, 3, resume=True)


def test_accumulated_micro_batches_train_as_one_batch(tmp_path):
    """Softmax losses are per crop, and the tiny Factorizer has no batch statistics: 2 micro-batches
    of 2 crops are the batch of 4, step after step."""
    from tests.test_train_softmax import softmax_card

    card = softmax_card(outputs=["background", "NCR", "ED", "ET"],
                        architecture={**TINY_ARCHITECTURE, "out_channels": 4})
    card = ModelCard.from_dict({**card.to_dict(), "roi": [16, 16, 16]})
    data = write_dataset(tmp_path / "data")
    common = {"steps": 6, "validation_cases": 1, "warmup_steps": 2, "validate_every": 6, "seed": 5}
    whole = run_training(data, card, tmp_path / "whole", TrainConfig(batch_size=4, **common), device="cpu")
    micro = run_training(data, card, tmp_path / "micro", TrainConfig(batch_size=2, accumulate=2, **common),
                         device="cpu")
    np.testing.assert_allclose([r["loss"] for r in micro.history], [r["loss"] for r in whole.history], rtol=1e-4)
    assert micro.validation == pytest.approx(whole.validation, abs=2e-3)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16 (bf16 training is refused)")
def test_bf16_training_on_the_cpu_follows_fp32(tmp_path):
    data, card = write_dataset(tmp_path / "data"), tiny_card(tmp_path / "card.json")
    common = {"steps": 4, "validation_cases": 1, "warmup_steps": 2, "validate_every": 4, "batch_size": 2}
    full = run_training(data, card, tmp_path / "fp32", TrainConfig(**common), device="cpu")
    mixed = run_training(data, card, tmp_path / "bf16", TrainConfig(precision="bf16", **common), device="cpu")
    losses = [r["loss"] for r in mixed.history]
    assert np.isfinite(losses).all() and losses != [r["loss"] for r in full.history]  # bf16 did run
    np.testing.assert_allclose(losses, [r["loss"] for r in full.history], rtol=2e-2)


def test_bf16_is_refused_on_a_cpu_without_it(tmp_path, monkeypatch):
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    result = CliRunner().invoke(app, ["train", str(tmp_path), "--card", "demo", "-o", str(tmp_path / "run"),
                                      "--device", "cpu", "--precision", "bf16"])
    assert result.exit_code == 2 and "no native bfloat16" in result.output


@pytest.mark.parametrize("precision, problem", [("fp16", "CUDA GPUs only"), ("fp8", "'fp8' is not one of")])
def test_precisions_the_cpu_cannot_train_in_are_one_line(tmp_path, precision, problem):
    result = CliRunner().invoke(app, ["train", str(tmp_path), "--card", "demo", "-o", str(tmp_path / "run"),
                                      "--device", "cpu", "--precision", precision])
    assert result.exit_code != 0 and problem in result.output
    assert not (tmp_path / "run").exists()


def test_the_slurm_training_example_starts_torchrun_on_every_node(tmp_path):
    """examples/slurm-train.sh with stand-ins for srun and scontrol: one torchrun per node meeting at the
    first node, a factorizer train command our CLI takes, and --resume once the run has a state."""
    from tests.test_docker import _stub, check_command

    bash = shutil.which("bash")
    if bash is None or os.name == "nt":
        pytest.skip("needs bash")
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    _stub(bin_dir, "srun", log)
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-07\\ngpu-08\\n'\n")
    (bin_dir / "scontrol").chmod(0o755)
    run = tmp_path / "run"
    environment = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DATA_DIR": "/data/brats", "RUN_DIR": str(run),
                   "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "77",
                   "EXTRA": "--folds 5 --fold 2 --precision bf16", "RUN_OPTIONS": "--workers 2 --cache /scratch/cache",
                   "SLURM_CPUS_PER_TASK": "16"}
    script = Path(__file__).parents[1] / "examples" / "slurm-train.sh"

    def launched() -> list[str]:
        log.unlink(missing_ok=True)
        result = subprocess.run([bash, str(script)], env=environment, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        argv = log.read_text().splitlines()[:-1]
        assert argv[:2] == ["srun", "--kill-on-bad-exit=1"] and argv[2] == "--cpus-per-task=16"
        assert argv[3:6] == ["python", "-m", "torch.distributed.run"]
        launcher = argv[6:argv.index("factorizer_cli")]
        assert launcher[launcher.index("--nnodes") + 1] == "2" and launcher[launcher.index("--nproc_per_node") + 1] == "4"
        assert launcher[launcher.index("--rdzv-endpoint") + 1] == "gpu-07:29500"
        command = argv[argv.index("factorizer_cli") + 1:]
        assert check_command(command) == ["train"] and command[1] == "/data/brats"
        # the whole command line parses: required options present, values valid
        typer.main.get_command(app).make_context("factorizer", command)
        return command

    started = launched()
    assert started[started.index("--fold") + 1] == "2" and "--resume" not in started
    assert started[started.index("--cache") + 1] == "/scratch/cache"
    run.mkdir()
    (run / "train-state.safetensors").write_bytes(b"")
    resumed = launched()
    assert "--resume" in resumed and "--fold" not in resumed  # the run's own settings come back from its state
    assert resumed[resumed.index("--cache") + 1] == "/scratch/cache"  # how the job runs is kept


def test_the_readme_brats_training_commands_run_on_our_cli():
    """The "Train on BraTS 2023" commands: every option exists, and the card they name builds upstream's
    BraTS 2023 bundle network (7.6 M parameters)."""
    import shlex

    from factorizer_cli.families import build
    from tests.test_docker import check_command

    root = Path(__file__).parents[1]
    text = (root / "README.md").read_text()
    section = text[text.index("### Train on BraTS 2023"):]
    block = section[section.index("```bash") + 7:section.index("```", section.index("```bash") + 7)]
    lines = block.replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        tokens = shlex.split(line.split("#")[0])
        for start, word in enumerate(tokens):
            if word in ("factorizer", "factorizer_cli"):
                commands.append(tokens[start + 1:])
                break
    assert [c[:1] for c in commands] == [["train"], ["models"], ["segment"]]
    assert [check_command(c) for c in commands] == [["train"], ["models", "pack"], ["segment"]]
    card = ModelCard.load(root / commands[0][commands[0].index("--card") + 1])
    assert card.roi == (128, 128, 128) and not card.weights
    assert sum(p.numel() for p in build(dict(card.architecture)).parameters()) == 7_603_459
