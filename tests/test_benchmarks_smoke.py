"""The benchmark scripts run: the GPU check end to end on the CPU (``--dry-run``), the forward benchmark at
a tiny size, and the busy processes of ``forward.py --load`` die with the benchmark, however it ends."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _forward_module():
    spec = importlib.util.spec_from_file_location("forward_benchmark", BENCHMARKS / "forward.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_with_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gpu.py"), "--dry-run", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert "agree %" in result.stdout and "max |dp|" in result.stdout
    for row in rows:
        gpu = "cuda" in row["runtime"] or "tensorrt" in row["runtime"]
        if gpu:
            assert row["status"].startswith("skipped: no CUDA"), row
        elif row["check"].startswith("export") and row["model"] == "seed":
            assert row["status"].startswith("skipped: not in --onnx-models"), row  # one export: time
        elif row["runtime"] == "onnxruntime cpu fp32" and row["model"] == "seed":
            assert row["status"].startswith("skipped"), row
        else:
            assert row["status"] == "ok", row
            assert row["seconds"] > 0
    by = {(r["check"].split()[0], r["model"], r["runtime"]): r for r in rows}
    assert {"window", "case", "train"} <= {k[0] for k in by}
    onnx_cpu = by[("window", "demo", "onnxruntime cpu fp32")]
    assert onnx_cpu["agreement_pct"] > 99.9 and onnx_cpu["max_abs_dp"] < 1e-4


def test_forward_benchmark_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "forward.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "forward.py"), "--size", "32", "--patch-size", "2", "--rounds", "1",
         "--repeats", "1", "--json", str(out)], capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["idle"]["ours"]["median_s"] > 0
    env = results["idle"]["ours"]["env"]  # the worker ran with the command's defaults, set before torch
    assert env["vars"]["GOMP_SPINCOUNT"] == "10000" and env["set_before_torch"] is True
    assert "GOMP_SPINCOUNT=10000" in result.stdout


def test_busy_processes_end_with_the_block_and_with_a_killed_benchmark():
    forward = _forward_module()
    with forward.busy_processes(2) as processes:
        pids = [p.pid for p in processes]
        assert all(_alive(pid) for pid in pids)
    assert not any(_alive(pid) for pid in pids)

    if not sys.platform.startswith("linux"):
        pytest.skip("dying with the parent (PR_SET_PDEATHSIG) is Linux only")
    code = ("import importlib.util, os, signal, sys\n"
            f"spec = importlib.util.spec_from_file_location('f', {str(BENCHMARKS / 'forward.py')!r})\n"
            "f = importlib.util.module_from_spec(spec); spec.loader.exec_module(f)\n"
            "with f.busy_processes(2) as ps:\n"
            "    print(' '.join(str(p.pid) for p in ps), flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL
    pids = [int(p) for p in result.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids), "busy processes outlived a SIGKILLed benchmark"


@pytest.mark.slow
def test_repuxnet_benchmark_runs_at_a_tiny_size(tmp_path):
    """Our side only (upstream checkouts are not here): the published networks at 32³, one forward."""
    out = tmp_path / "repuxnet.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "repuxnet.py"), "--size", "32", "--rounds", "1", "--repeats", "1",
         "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["network"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"repuxnet", "uxnet"}
    assert all(row["ours_s"] > 0 and row["ours_peak_mib"] > 0 for row in rows.values())


@pytest.mark.slow
def test_train_benchmark_runs_at_a_tiny_size(tmp_path):
    """Two small phantoms, two steps: the process-tree memory sampler and the throughput runs (workers,
    and two processes under torchrun) work."""
    out = tmp_path / "train.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train.py"), "--cases", "2", "--steps", "2", "--shape", "64", "64", "48",
         "--json", str(out)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "FACTORIZER_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"2-cold", "2-warm"} <= set(results["memory"])
    assert all(run["peak_tree_rss_gb"] > 0 and run["tree_processes"] >= 1 for run in results["memory"].values())
    assert results["processes"]["2"]["processes"] == 2 and results["processes"]["2"]["patches_per_s"] > 0


@pytest.mark.slow
def test_pretrain_benchmark_runs_at_a_tiny_size(tmp_path):
    """Small phantoms, two steps each: pretrain, both fine-tuning arms over two seeds, segment, score."""
    out = tmp_path / "pretrain.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "pretrain.py"), "--unlabelled", "4", "--labelled", "1", "--held-out", "1",
         "--seeds", "0", "1", "--pretrain-seeds", "shared", "--pretrain-steps", "2", "--finetune-steps", "2",
         "--classes", "2", "--shape", "64", "64", "48", "--cube", "16", "--roi", "16", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "FACTORIZER_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert list(results["pretraining"]) == ["0"] and results["pretraining"]["0"]["pretraining_step"] == 2
    for arm in ("scratch", "pretrained"):
        assert list(results["arms"][arm]) == ["0", "1"]
        assert all(set(run["dice"]) == {"WT", "TC", "ET", "mean"} for run in results["arms"][arm].values())
    assert len(results["gain_per_seed"]) == 2
    assert "pretrained - scratch, mean Dice, per seed" in result.stdout
