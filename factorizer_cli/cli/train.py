"""``factorizer phantom`` and ``factorizer train``: data with known truth, and a model trained on it."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from . import app
from .console import ACCEPT_LICENSE_HELP, error_console, friendly_errors, progress_bar


class PhantomKind(str, Enum):
    glioma = "glioma"
    stroke = "stroke"


class TrainingPrecision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


TRAIN_EXAMPLES = """
**Examples**

Train the demo model's architecture on 44 phantoms (the last 4 validate), as its card records:

    factorizer phantom data/phantoms --cases 44 --seed 1
    factorizer train data/phantoms --card demo -o runs/demo --steps 900

Continue a run that was stopped or killed (same settings, same steps as an uninterrupted run):

    factorizer train data/phantoms --card demo -o runs/demo --resume

Then segment with the best checkpoint: `factorizer segment CASE -o seg.nii.gz --model runs/demo/best`

Fine-tune from pretrained weights: a `factorizer pretrain` run, a model package, a zoo name or an
upstream checkpoint (the card's network a `UNet3D` of the pretrained width):

    factorizer train data/phantoms --card unet-card.json -o runs/ft --init runs/genesis
    factorizer train data/ct --card ct-unet.json -o runs/ft --init semantic-genesis-chest-ct --accept-license

Two processes on this machine (gloo on CPUs, NCCL on GPUs; the same run as one process with
--batch-size 4), or 4 GPUs on each of 2 machines (see examples/slurm-train.sh):

    torchrun --nproc_per_node 2 -m factorizer_cli train data/phantoms --card demo -o runs/ddp --batch-size 2
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m factorizer_cli train data/brats --card examples/brats23-factorizer.json -o runs/brats --precision bf16

Five-fold cross-validation, then one ensemble that segment averages:

    for i in 0 1 2 3 4; do factorizer train data/phantoms --card demo -o runs/fold$i --folds 5 --fold $i; done
    factorizer models pack runs/fold0 runs/fold1 runs/fold2 runs/fold3 runs/fold4 -o demo-5fold
"""


@app.command()
@friendly_errors
def phantom(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the cases into (created).")],
    cases: Annotated[int, typer.Option("--cases", "-n", min=1, help="How many cases.")] = 10,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Series seed: case i of seed S is always the same.")] = 0,
    kind: Annotated[PhantomKind, typer.Option("--kind", help="glioma: four 1 mm modalities with a BraTS label "
                                              "map; stroke: one clinical T1 with chronic stroke lesions "
                                              "(needs the MNI152 template: the 'atlas' extra).")
                    ] = PhantomKind.glioma,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Generate synthetic brain MRI cases whose truth is known: gliomas (BraTS) or chronic strokes (T1).

    `--kind glioma` (default): each case folder `BraTS-PHT-SSSSS-III/` holds `t1n`, `t1c`, `t2w`, `t2f`
    (int16, 1 mm) and `seg` (1 necrotic core, 2 oedema, 3 enhancing tumour, as BraTS 2023).

    `--kind stroke`: each case folder `STROKE-PHT-SSSSS-III/` holds `t1` and `seg` (1 lesion): the real
    anatomy of the MNI152 2009a template inside a drawn scalp and skull, with 1 to 3 dark chronic
    infarcts (cortical or deep, from a few voxels to tens of cm³; about a third of the cases hold only
    small ones), at a random head pose on a clinical grid (1 mm, 0.9×0.9×3 mm, 1×1×5 mm, ...; axial,
    sagittal or coronal; some oblique), with bias field, noise and a random intensity scale.

    Use them to try the tool, to train (`factorizer train`) and to evaluate (`factorizer evaluate`).

    Examples: `factorizer phantom data/phantoms --cases 20 --seed 7`,
    `factorizer phantom data/strokes --kind stroke --cases 40 --seed 1`
    """
    from ..api import generate_phantoms

    with progress_bar(quiet) as bar:
        task = bar.add_task(f"{kind.value} phantoms", total=cases)
        folders = generate_phantoms(out_dir, cases, seed, lambda done, total: bar.update(task, completed=done),
                                    kind=kind.value)
    if not quiet:
        error_console().print(f"wrote {len(folders)} cases to {out_dir}")


@app.command(epilog=TRAIN_EXAMPLES)
@friendly_errors
def train(
    data_dir: Annotated[Path, typer.Argument(help="Labelled cases: BraTS, ISLES (BIDS) or nnU-Net layout.")],
    card: Annotated[str, typer.Option("--card", help="Model card (JSON file or zoo name): architecture, "
                                      "inputs, spacing, ROI, outputs.")],
    out_dir: Annotated[Path, typer.Option("--output", "-o", help="Run folder: best/ and last/ model "
                                          "packages, train-log.csv, the resumable state.")],
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps in all.")] = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Crops per micro-batch and process (the global batch: "
                                            "this × --accumulate × processes).")] = 2,
    accumulate: Annotated[int, typer.Option(min=1, help="Micro-batches per optimizer step, their gradients "
                                            "summed: a larger batch in the same memory (the sigmoid Dice "
                                            "still pools each micro-batch alone).")] = 1,
    precision: Annotated[TrainingPrecision, typer.Option(help="fp32, or mixed precision for the forward pass: "
                                                         "bf16 (CPU or CUDA), fp16 (CUDA, with loss scaling).")
                         ] = TrainingPrecision.fp32,
    learning_rate: Annotated[float, typer.Option(min=0.0, help="Peak AdamW learning rate.")] = 2e-3,
    weight_decay: Annotated[float, typer.Option(min=0.0)] = 1e-5,
    warmup_steps: Annotated[int, typer.Option(min=0, help="Linear warm-up, then cosine decay.")] = 50,
    foreground: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of crops centred on a "
                                              "labelled voxel.")] = 0.5,
    validation_cases: Annotated[int, typer.Option(min=0, help="The last N cases (by name) validate "
                                                  "(without --folds).")] = 4,
    folds: Annotated[int, typer.Option(min=0, help="Cross-validation: split the cases into K folds "
                                       "(0: no cross-validation).")] = 0,
    fold: Annotated[int, typer.Option(min=0, help="With --folds: the fold (0-based) that validates.")] = 0,
    stratify: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="With --folds: a CSV "
                                                  "with one row per case ('case' column, else the first).")
                        ] = None,
    stratify_column: Annotated[str | None, typer.Option(help="The --stratify column whose values are spread "
                                                        "evenly over the folds (e.g. grade).")] = None,
    validate_every: Annotated[int, typer.Option(min=1, help="Validation Dice every N steps.")] = 100,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Save the resumable state every N steps.")] = 25,
    seed: Annotated[int, typer.Option(min=0, help="Seeds weights, crops and augmentations.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the output folder with the "
                                         "settings it started with (the options above are ignored).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda[:N] or mps.")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for PyTorch [default: all cores, "
                                                "shared among the processes torchrun starts on a machine].")
                       ] = None,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader processes that make the batches (0: this "
                                         "one); the batches are the same whatever the number.")] = 0,
    cache: Annotated[Path | None, typer.Option("--cache", file_okay=False, help="Folder of preprocessed cases, "
                                               "reused across runs [default: FACTORIZER_HOME/train-cache]"
                                               )] = None,
    init: Annotated[str | None, typer.Option("--init", help="Start from pretrained weights: a `factorizer "
                                             "pretrain` run or its model/ package, a model folder, a zoo name "
                                             "(semantic-genesis-chest-ct), hf://ORG/REPO or a checkpoint file. "
                                             "Tensors matching by name and shape are copied, a one-channel "
                                             "first convolution inflated to the card's modalities, the rest "
                                             "(e.g. a classification head) left out; refused when under half "
                                             "the network fits.")] = None,
    accept_license: Annotated[bool, typer.Option("--accept-license", help="With --init: " + ACCEPT_LICENSE_HELP)
                              ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train a model card's network on a labelled dataset folder.

    Random ROI crops (a share centred on the tumour), mirror and intensity augmentation, AdamW with
    warm-up and cosine decay. Sigmoid region cards: Dice + BCE over the deep-supervision heads,
    validation Dice per region; softmax class cards (3D UX-Net, RepUX-Net): Dice + cross-entropy,
    validation Dice per class but the background. The best and the last networks are model packages
    (`--model RUN/best`), in their inference form (a RepUX-Net trained with BFR is saved
    reparameterised, `"deploy": true`); the run resumes after a
    crash from its last saved state (`--resume`) and ends exactly where it would have (on the CPU; on
    a GPU up to the nondeterminism of its kernels). Each case is preprocessed once into an on-disk
    cache (`--cache`) and read back a crop at a time, so memory does not grow with the dataset;
    `--workers N` makes the batches in N processes, without changing them. Under `torchrun` the run is
    shared by several processes or machines (DistributedDataParallel: gloo on CPUs, NCCL on GPUs), each
    taking `--batch-size` crops of every step, process 0 writing; it trains as one process with the whole
    batch would. `--accumulate K` sums K micro-batches' gradients per step; `--precision bf16` (CPU or
    CUDA) or `fp16` (CUDA) trains in mixed precision. Cross-validation:
    `--folds 5 --fold 0` (then 1 .. 4, each in its own run folder) splits the cases the same way on every
    machine (saved in the run as split.json), optionally spreading a CSV column's values over the folds;
    `factorizer models pack RUN...` makes the fold runs one ensemble. `--init` starts from pretrained
    weights (`factorizer pretrain`, Semantic Genesis) and reports what it transferred.
    """
    from ..api import TrainConfig, is_writer, set_threads, threads_per_process
    from ..api import train as run_training

    set_threads(threads or threads_per_process())
    quiet = quiet or not is_writer()  # under torchrun, process 0 shows the progress
    config = TrainConfig(steps, batch_size, learning_rate, weight_decay, warmup_steps, foreground,
                         validation_cases, validate_every, checkpoint_every, seed, folds, fold,
                         None if stratify is None else str(stratify), stratify_column, accumulate, precision.value)
    console = error_console()
    with progress_bar(quiet) as bar:
        loading = bar.add_task("preparing cases", total=None)
        training = bar.add_task("training", total=steps, visible=False)
        validating = bar.add_task("validating", total=None, visible=False)

        def on_case(done: int, total: int) -> None:
            bar.update(loading, completed=done, total=total)

        def on_validation(done: int, total: int) -> None:
            if done == 1:
                bar.reset(validating, total=total, visible=True)
            bar.update(validating, completed=done, visible=done < total)

        def on_step(step: int, total: int, loss: float, validation: dict | None) -> None:
            bar.update(loading, visible=False)
            bar.update(training, completed=step, total=total, visible=True,
                       description=f"training · loss {loss:.3f}")
            if validation:
                dice = "  ".join(f"{k} {v:.3f}" for k, v in validation.items())
                console.print(f"step {step}: validation Dice {dice}", highlight=False)

        def on_init(transfer) -> None:
            if is_writer():
                for line in transfer.summary():
                    console.print(line, highlight=False, soft_wrap=True)

        result = run_training(data_dir, card, out_dir, config, resume=resume, device=device, on_step=on_step,
                              on_case=on_case, workers=workers, cache=cache, on_validation=on_validation,
                              init=init, accept_license=accept_license, on_init=on_init)
    if not is_writer():
        return
    dice = "  ".join(f"{k} {v:.3f}" for k, v in result.validation.items())
    typer.echo(f"trained {result.steps} steps in {result.seconds / 60:.1f} min; last validation Dice {dice}; "
               f"best model: {out_dir / 'best'}")
