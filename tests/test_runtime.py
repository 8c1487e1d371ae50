"""The CPU runtime defaults reach PyTorch's OpenMP: the package imports lazily, the entry point sets the
environment before torch loads, and the user's own settings win."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

import factorizer_cli as ft
from factorizer_cli import runtime

WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def run_python(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A fresh interpreter, with the OpenMP waiting variables cleared unless ``env`` sets them."""
    base = {k: v for k, v in os.environ.items() if k not in WAIT_VARS}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                            env={**base, **(env or {})})
    assert result.returncode == 0, result.stderr
    return result


def test_importing_the_package_does_not_import_torch():
    code = ("import sys, factorizer_cli, factorizer_cli.runtime, factorizer_cli.__main__; "
            "print(factorizer_cli.__version__, 'torch' in sys.modules)")
    assert run_python("-c", code).stdout.split() == [ft.__version__, "False"]


def test_the_seed_api_loads_on_first_use():
    from factorizer_cli import SegmentationFactorizer
    from factorizer_cli import nn as ft_nn

    assert ft.NMF is ft_nn.NMF and SegmentationFactorizer is ft_nn.SegmentationFactorizer
    assert set(ft_nn.__all__) <= set(ft.__all__), "a name of factorizer_cli.nn is missing from the package API"
    assert callable(ft.build) and "build" in ft.__all__
    assert all(hasattr(ft, name) for name in ft.__all__)
    assert set(ft.__all__) <= set(dir(ft))
    namespace: dict = {}
    exec("from factorizer_cli import *", namespace)
    assert set(ft.__all__) <= set(namespace)
    assert ft.nn is ft_nn  # subpackages as attributes, as before
    with pytest.raises(AttributeError, match="no_such_name"):
        ft.no_such_name  # noqa: B018


def test_defaults_never_override_the_user():
    env: dict[str, str] = {}
    runtime.configure_cpu_runtime(env)
    assert env == {"GOMP_SPINCOUNT": "10000"}
    env = {"OMP_WAIT_POLICY": "PASSIVE"}  # the user chose libgomp's waiting: no spin count added beside it
    runtime.configure_cpu_runtime(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"GOMP_SPINCOUNT": "500"}
    runtime.configure_cpu_runtime(env)
    assert env == {"GOMP_SPINCOUNT": "500"}


def test_says_whether_it_can_still_take_effect():
    code = ("from factorizer_cli.runtime import configure_cpu_runtime as c; before = c({}); "
            "import torch; print(before, c({}))")
    assert run_python("-c", code).stdout.split() == ["True", "False"]
    import torch  # noqa: F401  (loaded here too: too late for this process)

    assert runtime.configure_cpu_runtime({}) is False


def _spin_count(stderr: str) -> str:
    """libgomp's effective busy-wait count, from its OMP_DISPLAY_ENV=verbose report."""
    for line in stderr.splitlines():
        if line.strip().startswith("GOMP_SPINCOUNT"):
            return line.split("=", 1)[1].strip().strip("'")
    pytest.skip("PyTorch's OpenMP is not GNU libgomp here (no GOMP_SPINCOUNT in OMP_DISPLAY_ENV)")


def test_the_command_makes_openmp_threads_spin_briefly_before_sleeping():
    verbose = {"OMP_DISPLAY_ENV": "verbose"}
    plain = _spin_count(run_python("-c", "import torch", env=verbose).stderr)
    assert plain not in ("0", "10000")  # libgomp's own default (300000)
    assert _spin_count(run_python("-m", "factorizer_cli", "--version", env=verbose).stderr) == "10000"
    user = run_python("-m", "factorizer_cli", "--version", env={**verbose, "OMP_WAIT_POLICY": "PASSIVE"})
    assert _spin_count(user.stderr) == "0"  # the user's choice: sleep at once


def test_the_console_script_is_the_configuring_entry_point():
    scripts = importlib.metadata.entry_points(group="console_scripts", name="factorizer")
    if not scripts:
        pytest.skip("factorizer-cli is not installed (no console script)")
    assert [s.value for s in scripts] == ["factorizer_cli.__main__:main"]


FAULTS = """
import resource, sys
import numpy as np
from factorizer_cli import runtime
print(runtime.tune_allocator() if sys.argv[1] == "tuned" else False)

def buffers_of_a_forward():
    arrays = [np.ones(3 << 20, np.float32) for _ in range(3)]  # three 12 MiB maps alive at once
    del arrays

buffers_of_a_forward(); buffers_of_a_forward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    buffers_of_a_forward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_the_allocator_keeps_freed_buffers_instead_of_faulting_them_in_again():
    """glibc by default trims the heap's freed top (36 MiB here) and faults it in again on every round."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt: Linux only")
    plain = run_python("-c", FAULTS, "plain").stdout.split()
    tuned = run_python("-c", FAULTS, "tuned").stdout.split()
    if tuned[0] != "True":
        pytest.skip("the C library is not glibc, or a malloc setting is in the environment")
    assert int(plain[1]) > 1000  # ~9,000 pages: 36 MiB refaulted each round
    assert int(tuned[1]) < 100


def test_the_users_allocator_settings_win():
    assert runtime.tune_allocator({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) is False
    assert runtime.tune_allocator({"MALLOC_TRIM_THRESHOLD_": "0"}) is False
