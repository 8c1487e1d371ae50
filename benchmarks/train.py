"""Peak resident memory of ``factorizer train`` against the number of cases, and patches per second
with 0 versus N DataLoader workers and with 1 versus P training processes (``torchrun``, CPU).

BraTS-sized phantoms (``factorizer phantom``'s generator at 240×240×155, 4 modalities, 1 mm) and the
demo card. For each case count the same run (same steps, batch, workers, one validation case at
the end) trains twice in a fresh process: ``cold`` (an empty cache: every case is preprocessed) and
``warm`` (the cache that run filled). A polling thread samples the whole process tree (the ``train``
process and its DataLoader workers) every ``--interval`` s from ``/proc``: the peak of the summed RSS
(shared pages of forked workers counted once per process: an upper bound) and of the summed PSS
(shared pages split between the processes that map them). Throughput is patches (crops) per second
of the training loop alone, from the run's own log (the ``seconds`` column starts after the cases are
ready), with 0 and with ``--workers`` workers on the warm cache of the largest case count, then with
``--processes`` processes under ``torchrun`` (gloo), each with ``--batch-size / P`` crops and
``--threads / P`` threads, so that the global batch and the cores used stay those of one process.

Full size (the acceptance of issue 16: 8 vs 32 cases differ by < 15 %, under 4 GB with 2 workers):

    python benchmarks/train.py --cases 8 32 --steps 20 --workers 2 --json train-bench.json

Smoke (seconds to minutes):  python benchmarks/train.py --cases 2 --steps 2 --shape 96 96 64
"""

from __future__ import annotations

# ruff: noqa: E402  (the CPU runtime is configured before anything imports torch)
from factorizer_cli.runtime import configure_cpu_runtime

configure_cpu_runtime()

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BRATS_SHAPE = (240, 240, 155)


def make_dataset(root: Path, cases: int, shape: tuple[int, ...]) -> list[Path]:
    """Phantom cases 0 .. cases-1 of series 0 at ``shape`` (BraTS layout); the case folders."""
    from factorizer_cli.phantom import case_id, generate, write_case

    folders = []
    for index in range(cases):
        name = case_id(0, index)
        if not (root / name).is_dir():
            write_case(generate(0, index, shape), root, name)
        folders.append(root / name)
        print(f"  phantom {index + 1}/{cases}", end="\r", flush=True)
    print()
    return folders


def subset(folders: list[Path], root: Path) -> Path:
    """A dataset folder of the first cases, as links (the files, and so the cache keys, stay the same)."""
    root.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        (root / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
    return root


def tree(root: int) -> list[int]:
    """``root`` and its descendants now."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def _kib(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory(threading.Thread):
    """Samples the summed RSS and PSS of a process tree until it ends; keeps the peaks (bytes)."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        self.peak_processes = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            pids = tree(self.pid)
            rss = sum(_kib(f"/proc/{p}/status", "VmRSS") for p in pids) * 1024
            pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss") for p in pids) * 1024
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(pids))
            self.done.wait(self.interval)


def train(data: Path, out: Path, cache: Path, args: argparse.Namespace, workers: int, processes: int = 1) -> dict:
    """One ``factorizer train`` run in a fresh process (or ``processes`` under ``torchrun``): its peak tree
    memory and loop throughput."""
    launcher = ["-m", "factorizer_cli"] if processes == 1 else \
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m", "factorizer_cli"]
    command = [sys.executable, *launcher, "train", str(data), "--card", args.card, "-o", str(out),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size // processes),
               "--validation-cases", "1", "--validate-every", str(args.steps), "--checkpoint-every", str(args.steps),
               "--workers", str(workers), "--cache", str(cache), "--threads", str(max(1, args.threads // processes)),
               "--device", "cpu", "--quiet"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(process.pid, args.interval)
    memory.start()
    stdout, stderr = process.communicate()
    memory.done.set()
    memory.join()
    if process.returncode != 0:
        raise SystemExit(f"train failed ({process.returncode}):\n{stdout}\n{stderr}")
    with open(out / "train-log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    loop_seconds = float(rows[-1]["seconds"])
    return {"workers": workers, "processes": processes, "wall_s": round(time.perf_counter() - start, 1), "loop_s": loop_seconds,
            "patches_per_s": round(args.steps * args.batch_size / max(loop_seconds, 1e-9), 3),
            "peak_tree_rss_gb": round(memory.peak_rss / 2**30, 3), "peak_tree_pss_gb": round(memory.peak_pss / 2**30, 3),
            "tree_processes": memory.peak_processes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, nargs="+", default=[8, 32], help="case counts to compare")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads of the training process(es) in all")
    parser.add_argument("--processes", type=int, default=2, help="training processes (torchrun) to compare with 1")
    parser.add_argument("--shape", type=int, nargs=3, default=list(BRATS_SHAPE), help="phantom grid (1 mm voxels)")
    parser.add_argument("--card", default="demo")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between memory samples")
    parser.add_argument("--data", type=Path, help="keep the phantoms here (reused by later runs)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if min(args.cases) < 2:
        parser.error("--cases: at least 2 (one trains, one validates)")
    if args.batch_size % args.processes:
        parser.error("--batch-size must divide among --processes (the same global batch on each side)")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = args.data or work / "phantoms"
        print(f"{max(args.cases)} phantoms of {tuple(args.shape)}, 4 modalities -> {data}", flush=True)
        folders = make_dataset(data, max(args.cases), tuple(args.shape))
        memory = {}
        for count in args.cases:
            cases = subset(folders[:count], work / f"data-{count}")
            cache = work / f"cache-{count}"
            for phase in ("cold", "warm"):
                result = train(cases, work / f"run-{count}-{phase}", cache, args, args.workers)
                memory[f"{count}-{phase}"] = result
                print(f"{count:>3} cases, {phase}, {args.workers} workers: peak tree RSS "
                      f"{result['peak_tree_rss_gb']:.2f} GB, PSS {result['peak_tree_pss_gb']:.2f} GB, "
                      f"{result['patches_per_s']:.2f} patches/s, {result['wall_s']:.0f} s", flush=True)
        largest = max(args.cases)
        throughput = {}
        for workers in sorted({0, args.workers}):
            result = train(work / f"data-{largest}", work / f"run-speed-{workers}", work / f"cache-{largest}",
                           args, workers)
            throughput[workers] = result
            print(f"{workers} workers: {result['patches_per_s']:.2f} patches/s "
                  f"({args.steps} steps × {args.batch_size} patches in {result['loop_s']:.1f} s)", flush=True)
        processes = {1: throughput[0]}
        if args.processes > 1:
            result = train(work / f"data-{largest}", work / f"run-processes-{args.processes}", work / f"cache-{largest}",
                           args, 0, args.processes)
            processes[args.processes] = result
        for count, result in processes.items():
            print(f"{count} process(es), {max(1, args.threads // count)} thread(s) each: "
                  f"{result['patches_per_s']:.2f} patches/s, peak tree RSS {result['peak_tree_rss_gb']:.2f} GB",
                  flush=True)

    small, large = min(args.cases), max(args.cases)
    summary = {}
    for phase in ("cold", "warm"):
        a, b = memory[f"{small}-{phase}"], memory[f"{large}-{phase}"]
        for kind in ("rss", "pss"):
            key = f"peak_tree_{kind}_gb"
            summary[f"{phase}_{kind}_growth"] = round(b[key] / a[key] - 1, 4) if a[key] else None
    print(f"\n{small} -> {large} cases, {args.steps} steps, batch {args.batch_size}, {args.workers} workers, "
          f"card {args.card}, phantoms {tuple(args.shape)}:")
    for key, value in summary.items():
        print(f"  {key}: {'n/a' if value is None else f'{100 * value:+.1f} %'}")
    peak = max(r["peak_tree_rss_gb"] for r in memory.values())
    print(f"  highest peak tree RSS: {peak:.2f} GB (acceptance: growth < 15 %, under 4 GB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "data"},
                                               "memory": memory, "growth": summary,
                                               "throughput": {str(k): v for k, v in throughput.items()},
                                               "processes": {str(k): v for k, v in processes.items()}}, indent=1))


if __name__ == "__main__":
    main()
