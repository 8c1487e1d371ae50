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
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from factorizer_cli.examples.seed_network import seed_network


def seed_readme_network(ft: types.ModuleType, size: int) -> nn.Module:
    """The seed README's network, built with either implementation's module ``ft``."""
    return seed_network(size, patch_size=8, ft=ft)


def import_upstream(path: str) -> types.ModuleType:
    """Import upstream ``factorizer`` from a checkout, with stubs for its unused optional imports."""

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


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> None:
    """One implementation in this fresh process: load weights, warm up, time, record peak memory."""
    torch.set_num_threads(args.threads)
    ft = import_upstream(args.upstream) if args.worker == "upstream" else __import__("factorizer_cli")
    net = seed_readme_network(ft, args.size).eval()
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
        "times_s": times, "peak_mib": peak - rss_before,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", help="checkout of pashtari/factorizer at 72d3636")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", choices=["ours", "upstream"], help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import factorizer_cli as ft

    impls = ["upstream", "ours"] if args.upstream else ["ours"]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        state, inp = f"{tmp}/state.safetensors", f"{tmp}/input.safetensors"
        save_file(seed_readme_network(ft, args.size).state_dict(), state)
        save_file({"input": torch.rand(1, 4, *(args.size,) * 3, generator=torch.Generator().manual_seed(1))}, inp)
        results = {impl: {"times_s": [], "peak_mib": []} for impl in impls}
        for round_ in range(args.rounds):
            for impl in impls:
                out = f"{tmp}/{impl}.safetensors"
                cmd = [sys.executable, __file__, "--worker", impl, "--state", state, "--input", inp,
                       "--out", out, "--size", str(args.size), "--repeats", str(args.repeats),
                       "--threads", str(args.threads)] + (["--upstream", args.upstream] if args.upstream else [])
                subprocess.run(cmd, check=True)
                measured = json.loads(Path(out + ".json").read_text())
                results[impl]["times_s"] += measured["times_s"]
                results[impl]["peak_mib"].append(measured["peak_mib"])
                print(f"round {round_ + 1} {impl:>8}: " + ", ".join(f"{t:.2f}" for t in measured["times_s"])
                      + f" s, peak +{measured['peak_mib']:.0f} MiB", flush=True)
        outputs = {impl: load_file(f"{tmp}/{impl}.safetensors") for impl in impls}

    print(f"\nseed README Swin Factorizer, {args.size}³, batch 1, CPU, {args.threads} threads, "
          f"torch {torch.__version__}")
    print(f"{'':>10} {'median s':>9} {'peak MiB':>9}")
    for impl in impls:
        r = results[impl]
        r["median_s"], r["max_peak_mib"] = statistics.median(r["times_s"]), max(r["peak_mib"])
        print(f"{impl:>10} {r['median_s']:>9.2f} {r['max_peak_mib']:>9.0f}")
    if args.upstream:
        up, ours = results["upstream"], results["ours"]
        diffs = [(outputs["ours"][k] - outputs["upstream"][k]).abs().max().item() for k in outputs["ours"]]
        results["speedup"] = up["median_s"] / ours["median_s"]
        results["memory_ratio"] = ours["max_peak_mib"] / up["max_peak_mib"]
        results["max_abs_diff_per_head"] = diffs
        print(f"speed-up {results['speedup']:.2f}x, peak memory {results['memory_ratio']:.2f}x of upstream, "
              f"max |ours - upstream| per head: " + ", ".join(f"{d:.1e}" for d in diffs))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
