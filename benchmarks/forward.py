"""Forward pass of the seed README's Swin Factorizer on CPU: ours against upstream, side by side.

The network: 4 -> 3 channels, 128³, widths 32-512, SWMatricize (head_dim 8, patch 8), rank-1 HALS,
5 iterations, 3 deep-supervision heads; eval mode, batch 1, inference mode. Both implementations get
the same weights (ours, seeded, loaded into upstream by key) and the same input. Each measurement runs
in a fresh process, so its peak memory is its own; rounds alternate between the two to share the
machine's noise.

Upstream is pashtari/factorizer at commit 72d3636 (the seed README's API). Check it out OUTSIDE this
repository; it needs `pip install opt-einsum sympy networkx` beside torch and einops. Its unused
optional imports (torchvision, performer_pytorch, plotly) are replaced by inert stubs here.

    python benchmarks/forward.py --upstream /tmp/factorizer-72d3636 [--size 128] [--rounds 2] [--repeats 3]

Without --upstream only ours is measured.

A shared machine: ``--load N`` measures every side twice, idle and then beside N busy processes
(``yes > /dev/null``, started for that phase and killed however the run ends), and prints each side's
time under load over its idle time. Every process (both sides, and this one) first applies the
``factorizer`` command's CPU defaults (``factorizer_cli.runtime``: ``GOMP_SPINCOUNT=10000`` unless
the wait is set) before PyTorch loads, so upstream runs in the same environment as ours; ``--no-runtime-defaults``
leaves the environment as given (to see what the defaults change). Run it at normal priority (no
``nice``), so that the network competes with the load on equal terms:

    python benchmarks/forward.py --upstream /tmp/factorizer-72d3636 --rounds 2 --repeats 3 --load 2
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from factorizer_cli.runtime import configure_cpu_runtime  # does not import torch

# torch is imported inside the functions: each process sets the CPU runtime's environment first,
# because libgomp reads it once, when torch loads it.
REPORTED_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "OMP_PROC_BIND")


def seed_readme_network(ft: types.ModuleType, size: int, patch_size: int = 8) -> Any:
    """The seed README's network, built with either implementation's module ``ft``.

    Its windows (``patch_size``, 8 in the README) must divide every stage: ``size`` a multiple of
    16 × ``patch_size`` (smoke runs: ``--size 32 --patch-size 2``).
    """
    from factorizer_cli.examples.seed_network import seed_network

    return seed_network(size, patch_size=patch_size, ft=ft)


def import_upstream(path: str) -> types.ModuleType:
    """Import upstream ``factorizer`` from a checkout, with stubs for its unused optional imports."""
    from torch import nn

    class Unavailable(nn.Module):
        def __init__(self, *args, **kwargs):
            raise RuntimeError(f"stubbed dependency used: {type(self).__name__}")

    stubs = {
        "torchvision": {}, "plotly": {},
        "torchvision.ops": {"StochasticDepth": type("StochasticDepth", (Unavailable,), {})},
        "performer_pytorch": {"SelfAttention": type("SelfAttention", (Unavailable,), {})},
        "plotly.io": {"show": lambda *a, **k: None},
    }
    for name, attrs in stubs.items():
        module = sys.modules.setdefault(name, types.ModuleType(name))
        module.__dict__.update(attrs)
    sys.modules["torchvision"].ops = sys.modules["torchvision.ops"]
    sys.modules["plotly"].io = sys.modules["plotly.io"]
    sys.path.insert(0, path)
    import factorizer

    return factorizer


def runtime_environment(defaults: bool) -> dict[str, Any]:
    """Apply the ``factorizer`` command's CPU defaults (if ``defaults``) and describe the result.

    Call before torch is imported; children started afterwards inherit the same environment.
    """
    before_torch = configure_cpu_runtime() if defaults else None
    return {"defaults": defaults, "set_before_torch": before_torch,
            "vars": {name: os.environ.get(name) for name in REPORTED_ENV}}


def describe_environment(env: dict[str, Any]) -> str:
    values = ", ".join(f"{k}={v}" for k, v in env["vars"].items() if v is not None) or "no OpenMP variables"
    if not env["defaults"]:
        return f"{values} (as given, --no-runtime-defaults)"
    when = "before torch loaded" if env["set_before_torch"] else "AFTER torch loaded: no effect"
    return f"{values} (the `factorizer` command's CPU defaults, set {when})"


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child die with this process, even if this one is SIGKILLed (Linux)."""
    parent = os.getpid()

    def preexec() -> None:
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before prctl: go now
                os._exit(1)
    return preexec


def busy_command() -> list[str]:
    """One CPU-bound process: ``yes`` (output to /dev/null), or a Python spin loop where there is none."""
    return [shutil.which("yes")] if shutil.which("yes") else [sys.executable, "-c", "while True: pass"]


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[list[subprocess.Popen]]:
    """``count`` busy processes for the duration of the block, killed however it ends."""
    processes: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            processes.append(subprocess.Popen(busy_command(), stdout=subprocess.DEVNULL,
                                              stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent()))
        yield processes
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait()


def worker(args: argparse.Namespace) -> None:
    """One implementation in this fresh process: load weights, warm up, time, record peak memory."""
    env = runtime_environment(not args.no_runtime_defaults)  # before torch loads
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(args.threads)
    ft = import_upstream(args.upstream) if args.worker == "upstream" else __import__("factorizer_cli")
    net = seed_readme_network(ft, args.size, args.patch_size).eval()
    net.load_state_dict(load_file(args.state), strict=True)
    x = load_file(args.input)["input"]
    with torch.inference_mode():
        rss_before = _rss_mib()
        outputs = net(x)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        times = []
        for _ in range(args.repeats):
            del outputs
            start = time.perf_counter()
            outputs = net(x)
            times.append(time.perf_counter() - start)
    save_file({f"output{i}": o.contiguous() for i, o in enumerate(outputs)}, args.out)
    Path(args.out + ".json").write_text(json.dumps({
        "times_s": times, "peak_mib": peak - rss_before, "env": env,
    }))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", help="checkout of pashtari/factorizer at 72d3636")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--patch-size", type=int, default=8, help="SWMatricize windows; the README's 8 "
                        "needs --size 128 or more (a smoke run: --size 32 --patch-size 2)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="also measure beside N busy processes (`yes > /dev/null`); 0: idle only")
    parser.add_argument("--no-runtime-defaults", action="store_true",
                        help="leave the OpenMP environment as given instead of the `factorizer` command's defaults")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", choices=["ours", "upstream"], help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load < 0:
        parser.error("--load must be 0 or more")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    env = runtime_environment(not args.no_runtime_defaults)  # before torch; the workers inherit it
    # SIGTERM ends the run through the `finally` blocks (busy processes killed, temporaries removed).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    import torch
    from safetensors.torch import load_file, save_file

    import factorizer_cli as ft

    impls = ["upstream", "ours"] if args.upstream else ["ours"]
    phases = ["idle", "load"] if args.load else ["idle"]
    results: dict[str, Any] = {"env_parent": env, "load": args.load, "busy_command": busy_command()}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        state, inp = f"{tmp}/state.safetensors", f"{tmp}/input.safetensors"
        save_file(seed_readme_network(ft, args.size, args.patch_size).state_dict(), state)
        save_file({"input": torch.rand(1, 4, *(args.size,) * 3, generator=torch.Generator().manual_seed(1))}, inp)
        for phase in phases:
            results[phase] = {impl: {"times_s": [], "peak_mib": []} for impl in impls}
            with busy_processes(args.load if phase == "load" else 0):
                for round_ in range(args.rounds):
                    for impl in impls:
                        out = f"{tmp}/{impl}.safetensors"
                        cmd = [sys.executable, __file__, "--worker", impl, "--state", state, "--input", inp,
                               "--out", out, "--size", str(args.size), "--patch-size", str(args.patch_size),
                               "--repeats", str(args.repeats),
                               "--threads", str(args.threads)]
                        cmd += ["--upstream", args.upstream] if args.upstream else []
                        cmd += ["--no-runtime-defaults"] if args.no_runtime_defaults else []
                        subprocess.run(cmd, check=True, preexec_fn=_die_with_parent())
                        measured = json.loads(Path(out + ".json").read_text())
                        r = results[phase][impl]
                        r["times_s"] += measured["times_s"]
                        r["peak_mib"].append(measured["peak_mib"])
                        r["env"] = measured["env"]
                        print(f"{phase} round {round_ + 1} {impl:>8}: "
                              + ", ".join(f"{t:.2f}" for t in measured["times_s"])
                              + f" s, peak +{measured['peak_mib']:.0f} MiB", flush=True)
        outputs = {impl: load_file(f"{tmp}/{impl}.safetensors") for impl in impls}

    load = f"; load: {args.load} x `{' '.join(busy_command())} > /dev/null`" if args.load else ""
    patch = "" if args.patch_size == 8 else f" (windows of {args.patch_size}³, not the README's 8³)"
    print(f"\nseed README Swin Factorizer, {args.size}³{patch}, batch 1, CPU, {args.threads} threads, "
          f"torch {torch.__version__}{load}")
    print(f"{'':>10} {'idle s':>8}" + (f" {'load s':>8} {'load/idle':>9}" if args.load else "")
          + f" {'peak MiB':>9}")
    for impl in impls:
        for phase in phases:
            r = results[phase][impl]
            r["median_s"], r["max_peak_mib"] = statistics.median(r["times_s"]), max(r["peak_mib"])
        idle = results["idle"][impl]
        row = f"{impl:>10} {idle['median_s']:>8.2f}"
        if args.load:
            under = results["load"][impl]
            under["ratio_to_idle"] = under["median_s"] / idle["median_s"]
            row += f" {under['median_s']:>8.2f} {under['ratio_to_idle']:>8.2f}x"
        print(row + f" {idle['max_peak_mib']:>9.0f}")
    for impl in impls:
        print(f"environment, {impl}: {describe_environment(results['idle'][impl]['env'])}")
    if args.upstream:
        up, ours = results["idle"]["upstream"], results["idle"]["ours"]
        diffs = [(outputs["ours"][k] - outputs["upstream"][k]).abs().max().item() for k in outputs["ours"]]
        results["speedup"] = up["median_s"] / ours["median_s"]
        results["memory_ratio"] = ours["max_peak_mib"] / up["max_peak_mib"]
        results["max_abs_diff_per_head"] = diffs
        under = ""
        if args.load:
            results["speedup_under_load"] = results["load"]["upstream"]["median_s"] / results["load"]["ours"]["median_s"]
            under = f" ({results['speedup_under_load']:.2f}x under load)"
        print(f"speed-up {results['speedup']:.2f}x{under}, peak memory {results['memory_ratio']:.2f}x of upstream, "
              f"max |ours - upstream| per head: " + ", ".join(f"{d:.1e}" for d in diffs))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
