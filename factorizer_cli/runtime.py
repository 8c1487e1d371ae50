"""Process-wide CPU settings for entry points (the CLI, benchmarks), applied before PyTorch loads.

Why: PyTorch's CPU wheels parallelize with GNU OpenMP (``libgomp``; ``torch.__config__.parallel_info()``
says "ATen parallel backend: OpenMP", and MKL and oneDNN run on the same runtime). By default a
libgomp thread that reaches the end of a parallel region spins for about 300,000 iterations before it
sleeps. Our inference path runs many short parallel regions (per-slab NMF, chunked 1×1 layers), so
its threads spend their gaps spinning. On an idle machine that costs nothing; beside other busy
processes the spinning threads burn the time slices the working thread needs, and a thread that was
descheduled holds the others at the next barrier. Measured on 2 cores with two ``yes > /dev/null``
beside it, the seed README network's 128³ forward went from 7.6 s (idle) to 38.9 s; with
``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep at once) it took 13.4 s, and idle was unchanged.

Sleeping at once has its own cost where parallel regions follow each other closely: a 2D network run
slice by slice (SPiN: about 100 small convolutions per call) pays a wake-up at every one. So the
default is a short spin, ``GOMP_SPINCOUNT=10000`` (a thirtieth of libgomp's own; well under a
millisecond), not ``PASSIVE``. Measured on 2 cores (AVX2, 2026-12-01, each figure one run of
``benchmarks/forward.py --rounds 2 --repeats 2 --load 2`` or ``benchmarks/spin.py --rounds 1``):

====================================  ===================  =====================
                                      ``PASSIVE``          ``GOMP_SPINCOUNT=10000``
Factorizer 128³ forward, idle         3.76, 4.19, 3.97 s   3.55, 3.33, 4.47 s
the same beside 2 busy processes      7.62, 7.19, 9.49 s   8.44, 8.58, 9.71 s
SPiN volume, ours / upstream's loop   18.35 / 31.48 s      14.21 / 25.69 s
====================================  ===================  =====================

Under load the short spin costs the Factorizer about a tenth (far from the default spin's fivefold);
idle it gains a little there and a quarter on SPiN. 30000 did no better on SPiN (13.23 s against
10000's 13.26 s over three rounds) and cost the Factorizer more under load (11.73 s).

Capping the thread count is not done: the kernel shares the CPU per thread, so fewer threads only
shrink our share under load and slow the idle case. ``KMP_*`` variables are for Intel's ``libiomp``
and do nothing to ``libgomp``.

libgomp reads its environment once, when it is loaded (with ``import torch``), so these settings must
be in ``os.environ`` before that: call :func:`configure_cpu_runtime` first thing in an entry point.
Library code never calls it (it does not touch the environment of a program that imports it).

The second setting is glibc's allocator (:func:`tune_allocator`). By default a freed block above the
mmap threshold (at most 32 MiB), and any free space above 128 KiB-64 MiB at the top of the heap, go
back to the kernel at once; the next forward asks for the same sizes again and the kernel faults every
page in, zeroed. Measured on 2 cores, window after window: SPiN's whole-volume benchmark spent 46 s of
system time of 257 s CPU (13 s with the setting below: ours 32.7 → 26.9 s, upstream's loop 51.1 →
44.5 s, the same settings on both sides); the Factorizer forward's system time fell from 19-24 s to
17 s over a run. Keeping the top of the heap (trim threshold 1 GiB) and a fixed 32 MiB mmap threshold
ends the refaulting of every buffer below 32 MiB; larger ones are still mapped each time (turning mmap
off altogether cut more system time but raised the forward's peak memory by a third).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import MutableMapping

# Our defaults; a variable the user set keeps the user's value.
CPU_DEFAULTS: dict[str, str] = {"GOMP_SPINCOUNT": "10000"}
# Variables that decide libgomp's waiting themselves: if the user set one, we add none of ours, since
# GOMP_SPINCOUNT would override the spin count that the user's OMP_WAIT_POLICY implies.
_USER_WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# glibc mallopt parameters (malloc.h) and our values; any of the user's own malloc settings wins.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
ALLOCATOR_DEFAULTS: dict[int, int] = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 1 << 30}
_USER_ALLOCATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                            "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES", "LD_PRELOAD")


def openmp_loaded() -> bool:
    """Whether an OpenMP runtime (or PyTorch, which brings one) is already in this process.

    On Linux the process's memory map says it exactly (a library other than torch may have loaded
    libgomp); elsewhere, whether ``torch`` was imported.
    """
    if "torch" in sys.modules:
        return True
    try:
        with open("/proc/self/maps") as maps:
            return any(name in line for line in maps for name in ("libgomp", "libiomp", "libomp."))
    except OSError:
        return False


def configure_cpu_runtime(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set the CPU defaults of :data:`CPU_DEFAULTS` where the user has not; True if they can take effect.

    Only ``setdefault``: the user's own ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` wins. Returns False
    (the variables are still set, for child processes) when an OpenMP runtime is already loaded,
    since it read its environment when it loaded and will not read it again.
    """
    env = os.environ if environ is None else environ
    if not any(name in env for name in _USER_WAIT_SETTINGS):
        for name, value in CPU_DEFAULTS.items():
            env.setdefault(name, value)
    if environ is None:
        tune_allocator()
    return not openmp_loaded()


def tune_allocator(environ: MutableMapping[str, str] | None = None) -> bool:
    """Keep freed memory in this process instead of returning it to the kernel (see the module's
    docstring); True if glibc took the settings. Nothing is changed where the user set any malloc
    variable or preloads another allocator (jemalloc, tcmalloc), or where the C library is not glibc."""
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or any(name in env for name in _USER_ALLOCATOR_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(param, value) == 1 for param, value in ALLOCATOR_DEFAULTS.items()])
