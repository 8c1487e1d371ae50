"""Does Semantic Genesis pretraining help here? Fine-tuning from a ``factorizer pretrain`` run against
training from scratch, at the same budget, over several seeds.

Glioma phantoms (``factorizer phantom``'s generator, 240×240×155 at 1 mm, four modalities), three series:
``--unlabelled`` cases whose labels are never read pretrain a ``YNet3D`` (self-discovery of pattern
classes on the aligned volumes, self-classification and self-restoration: ``factorizer pretrain
--no-register``); ``--labelled`` cases fine-tune a ``UNet3D`` of the same width on the WT/TC/ET regions
(``factorizer train --validation-cases 0``, the ``last`` package); ``--held-out`` cases are segmented
and scored (``factorizer segment``, ``factorizer evaluate``). For each seed both arms train with the
same card, steps, crops and learning rate; they differ only in ``--init``. Each seed pretrains its own
run (``--pretrain-seeds shared`` reuses seed 0's), so the spread includes pretraining's own variation.
Pretraining, training, segmentation and scoring run as the command-line tool, each in a fresh process.

Full size (the acceptance of issue 15; about 40 minutes on 2 cores):

    python benchmarks/pretrain.py --json pretrain-bench.json

Smoke (a minute):  python benchmarks/pretrain.py --unlabelled 4 --labelled 1 --held-out 1 --seeds 0 1 \\
    --pretrain-seeds shared --pretrain-steps 2 --finetune-steps 2 --classes 2 --shape 64 64 48 --cube 16 --roi 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from factorizer_cli.phantom import MODALITIES  # the phantoms' four, in BraTS order

UNLABELLED_SERIES, LABELLED_SERIES, HELD_OUT_SERIES = 11, 12, 13


def factorizer(*arguments: str) -> str:
    """Run ``factorizer ARGUMENTS`` in a fresh process; its standard output (exit on failure)."""
    command = [sys.executable, "-m", "factorizer_cli", *arguments]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def make_phantoms(folder: Path, series: int, cases: int, shape: tuple[int, ...]) -> None:
    """Cases ``0 .. cases-1`` of a phantom series (``factorizer phantom``'s generator) at ``shape``, kept
    where they exist already."""
    from factorizer_cli.phantom import case_id, generate, write_case

    for index in range(cases):
        if not (folder / case_id(series, index)).is_dir():
            write_case(generate(series, index, shape), folder, case_id(series, index))


def finetune_card(pretrained_card: Path, args: argparse.Namespace) -> dict:
    """The fine-tuning card: a ``UNet3D`` of the pretrained width, the pretrained package's inputs and
    preprocessing (the same intensities the network learnt from), sigmoid WT/TC/ET regions."""
    pretrained = json.loads(pretrained_card.read_text())
    return {
        "name": "genesis-finetune", "task": "glioma regions (phantoms), Semantic Genesis benchmark",
        "inputs": pretrained["inputs"], "preprocessing": pretrained["preprocessing"],
        "roi": [args.roi] * 3, "overlap": args.overlap, "outputs": ["WT", "TC", "ET"],
        "labels": [{"region": "WT", "label": 2}, {"region": "TC", "label": 1}, {"region": "ET", "label": 3}],
        "architecture": {"class": "UNet3D", "n_class": 3, "in_channels": len(MODALITIES),
                         "base_width": args.base_width, "norm": "batch"},
    }


def pretrain(data: Path, run: Path, seed: int, args: argparse.Namespace) -> dict:
    """One pretraining run; its last logged losses and its time."""
    start = time.perf_counter()
    modality_options = [option for name in MODALITIES for option in ("--modality", name)]
    factorizer("pretrain", str(data), "-o", str(run), "--no-register", *modality_options,
               "--base-width", str(args.base_width), "--cube-size", *[str(args.cube)] * 3,
               "--classes", str(args.classes), "--steps", str(args.pretrain_steps),
               "--batch-size", str(args.pretrain_batch), "--seed", str(seed), "--device", "cpu", "--quiet")
    metrics = json.loads((run / "model" / "card.json").read_text())["metrics"]
    return {"seconds": round(time.perf_counter() - start, 1), **metrics}


def finetune_and_score(labelled: Path, held_out: Path, card: Path, run: Path, seed: int,
                       init: Path | None, args: argparse.Namespace) -> dict:
    """Train one arm, segment the held-out cases with its last package, score them; mean Dice per region."""
    start = time.perf_counter()
    factorizer("train", str(labelled), "--card", str(card), "-o", str(run), "--steps", str(args.finetune_steps),
               "--batch-size", str(args.finetune_batch), "--learning-rate", str(args.learning_rate),
               "--warmup-steps", str(args.finetune_steps // 10), "--validation-cases", "0",
               "--seed", str(seed), "--device", "cpu", "--cache", str(run.parent / "train-cache"), "--quiet",
               *(["--init", str(init)] if init else []))
    trained = time.perf_counter() - start
    predictions = run / "predictions"
    factorizer("segment", str(held_out), "-o", str(predictions), "--model", str(run / "last"),
               "--device", "cpu", "--quiet")
    report = run / "scores.json"
    factorizer("evaluate", str(predictions), str(held_out), "--json", str(report))
    scores = json.loads(report.read_text())
    return {"dice": mean_dice(scores), "train_s": round(trained, 1),
            "total_s": round(time.perf_counter() - start, 1)}


def mean_dice(scores: dict) -> dict[str, float]:
    """Per-region Dice averaged over the held-out cases, from ``factorizer evaluate --json``."""
    per_region: dict[str, list[float]] = {}
    for case in scores["cases"]:
        for region, metrics in case["metrics"].items():
            per_region.setdefault(region, []).append(metrics["dice"])
    dice = {region: statistics.fmean(values) for region, values in per_region.items()}
    dice["mean"] = statistics.fmean(dice.values())
    return {region: round(value, 4) for region, value in dice.items()}


def spread(values: list[float]) -> str:
    """``mean ± standard deviation`` (over seeds)."""
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {deviation:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unlabelled", type=int, default=40, help="phantoms that pretrain (labels unused)")
    parser.add_argument("--labelled", type=int, default=4, help="phantoms that fine-tune")
    parser.add_argument("--held-out", type=int, default=10, help="phantoms that are segmented and scored")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-seeds", choices=("each", "shared"), default="each",
                        help="pretrain once per seed, or once (seed 0) for all")
    parser.add_argument("--base-width", type=int, default=8, help="U-Net width of both arms (upstream: 32)")
    parser.add_argument("--cube", type=int, default=32, help="pretraining cube side (voxels)")
    parser.add_argument("--classes", type=int, default=20, help="pattern classes discovered")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--pretrain-batch", type=int, default=4)
    parser.add_argument("--finetune-steps", type=int, default=250)
    parser.add_argument("--finetune-batch", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="fine-tuning's peak rate (both arms)")
    parser.add_argument("--roi", type=int, default=48, help="fine-tuning crop and inference window side")
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap of the scoring")
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155], help="phantom grid (1 mm voxels)")
    parser.add_argument("--data", type=Path, help="keep the phantoms here (reused by later runs)")
    parser.add_argument("--json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = args.data or work / "phantoms"
        folders = {"unlabelled": (UNLABELLED_SERIES, args.unlabelled), "labelled": (LABELLED_SERIES, args.labelled),
                   "held-out": (HELD_OUT_SERIES, args.held_out)}
        for name, (series, cases) in folders.items():
            print(f"{cases} phantoms of series {series}, {tuple(args.shape)} -> {data / name}", flush=True)
            make_phantoms(data / name, series, cases, tuple(args.shape))

        pretrained: dict[int, Path] = {}
        pretraining: dict[int, dict] = {}
        for seed in args.seeds if args.pretrain_seeds == "each" else args.seeds[:1]:
            run = work / f"pretrain-{seed}"
            pretraining[seed] = pretrain(data / "unlabelled", run, seed, args)
            pretrained[seed] = run
            print(f"pretrained (seed {seed}): {pretraining[seed]}", flush=True)

        card = work / "finetune-card.json"
        card.write_text(json.dumps(finetune_card(pretrained[args.seeds[0]] / "model" / "card.json", args)))
        arms: dict[str, dict[int, dict]] = {"scratch": {}, "pretrained": {}}
        for seed in args.seeds:
            init = pretrained.get(seed, pretrained[args.seeds[0]])
            for arm, start in (("scratch", None), ("pretrained", init)):
                result = finetune_and_score(data / "labelled", data / "held-out", card, work / f"{arm}-{seed}",
                                            seed, start, args)
                arms[arm][seed] = result
                print(f"seed {seed} {arm:>10}: Dice {result['dice']}  ({result['train_s']:.0f} s training)",
                      flush=True)

        regions = list(arms["scratch"][args.seeds[0]]["dice"])
        print(f"\n{len(args.seeds)} seeds; {args.labelled} labelled cases, {args.finetune_steps} fine-tuning steps; "
              f"Dice on {args.held_out} held-out cases (mean ± sd over seeds)")
        print(f"{'':>12}" + "".join(f"{region:>16}" for region in regions))
        for arm in arms:
            print(f"{arm:>12}" + "".join(f"{spread([r['dice'][region] for r in arms[arm].values()]):>16}"
                                         for region in regions))
        gains = [arms["pretrained"][s]["dice"]["mean"] - arms["scratch"][s]["dice"]["mean"] for s in args.seeds]
        print(f"pretrained - scratch, mean Dice, per seed: {[round(g, 4) for g in gains]} ({spread(gains)})")
        if args.json:
            Path(args.json).write_text(json.dumps({"settings": vars(args) | {"data": str(args.data)},
                                                   "pretraining": pretraining, "arms": arms,
                                                   "gain_per_seed": gains}, indent=2))


if __name__ == "__main__":
    main()
