"""``factorizer pretrain``: Semantic Genesis self-supervised pretraining on unlabelled volumes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app
from .console import error_console, friendly_errors, progress_bar

PRETRAIN_EXAMPLES = """
**Examples**

Pretrain on 40 unlabelled T1 scans (any grid: each is registered to the MNI152 template), then
fine-tune a U-Net on a few labelled cases from the result:

    factorizer pretrain data/unlabelled -o runs/genesis --steps 2000
    factorizer train data/labelled --card unet-card.json -o runs/finetune --init runs/genesis

Volumes aligned already (same grid, e.g. the glioma phantoms), four modalities, a smaller network
and cube for a CPU:

    factorizer phantom data/phantoms --cases 40 --seed 3
    factorizer pretrain data/phantoms -o runs/genesis --no-register --modality t1n --modality t1c \\
        --modality t2w --modality t2f --base-width 16 --cube-size 32 32 32 --classes 20 --steps 600

Continue a run that was stopped or killed (same settings, same losses as an uninterrupted run):

    factorizer pretrain data/unlabelled -o runs/genesis --resume

The fine-tuning card's network is a `UNet3D` of the same `base_width` (`norm` "batch"), its
preprocessing the package's (`runs/genesis/model/card.json`: percentiles 0.5..99.5 to [0, 1], and the
registration unless --no-register), its `roi` any multiple of 8.
"""


@app.command(epilog=PRETRAIN_EXAMPLES)
@friendly_errors
def pretrain(
    data_dir: Annotated[Path, typer.Argument(help="Unlabelled volumes: a folder per case (BraTS, BIDS), "
                                             "nnU-Net style, or (one modality) NIfTI files in the folder.")],
    out_dir: Annotated[Path, typer.Option("--output", "-o", help="Run folder: model/ (the package to "
                                          "--init from), patterns.json, pretrain-log.csv, the resumable state.")],
    modality: Annotated[list[str] | None, typer.Option("--modality", help="A modality to read (repeat for "
                                                       "several, in order; the first is registered, a T1). "
                                                       "Names find their aliases: t1 finds t1n and t1w files. "
                                                       "[default: t1]")] = None,
    register: Annotated[bool, typer.Option("--register/--no-register", help="Register each case's first "
                                           "modality to the MNI152 2009a template (the 'atlas' extra), or "
                                           "take volumes that share one grid already.")] = True,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps in all.")] = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Cubes per step.")] = 4,
    cube_size: Annotated[tuple[int, int, int], typer.Option(help="Cube sides in voxels (1 mm when registered), "
                                                            "multiples of 8, at least 16 (upstream: 64 64 32).")
                         ] = (64, 64, 32),
    classes: Annotated[int, typer.Option(min=2, help="Pattern classes C to discover and classify.")] = 44,
    neighbours: Annotated[int, typer.Option(min=1, help="Volumes per class: the reference patient and its "
                                            "nearest neighbours (at most all volumes).")] = 200,
    min_distance: Annotated[float | None, typer.Option(min=0.0, help="Voxels between pattern centres (and "
                                                       "their left-right mirror images) [default: a quarter "
                                                       "of the cube's longest side].")] = None,
    base_width: Annotated[int, typer.Option(min=1, help="U-Net width (upstream: 32; 19 M parameters).")] = 32,
    learning_rate: Annotated[float, typer.Option(min=0.0, help="Adam's initial learning rate.")] = 1e-3,
    halve_every: Annotated[int | None, typer.Option(min=1, help="Halve the rate every N steps [default: a "
                                                    "quarter of --steps].")] = None,
    classification_weight: Annotated[float, typer.Option(min=0.0, help="Weight of the self-classification "
                                                         "cross-entropy.")] = 0.01,
    restoration_weight: Annotated[float, typer.Option(min=0.0, help="Weight of the self-restoration "
                                                      "MSE.")] = 1.0,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Save the package and the resumable state every "
                                                  "N steps.")] = 25,
    seed: Annotated[int, typer.Option(min=0, help="Seeds the patterns, weights, cubes and corruptions.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the output folder with the "
                                         "settings it started with (the options above are ignored).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda[:N] or mps.")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for PyTorch [default: all cores].")
                       ] = None,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader processes that cut and corrupt the cubes (0: "
                                         "this one); the batches are the same whatever the number.")] = 0,
    cache: Annotated[Path | None, typer.Option("--cache", file_okay=False, help="Folder of preprocessed "
                                               "volumes, reused across runs [default: "
                                               "FACTORIZER_HOME/pretrain-cache]")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Pretrain a 3D U-Net without labels (Semantic Genesis), to start `factorizer train --init` from.

    Self-discovery: every volume is brought onto one grid (registered to the MNI152 template, or
    aligned already with `--no-register`) and embedded (its intensities at 8 mm); each of C classes is a
    place in the brain (kept apart from the others and from their left-right mirror images) seen in a
    reference patient and its nearest neighbours. Each step cuts cubes there on the fly (the cube, or a
    rescaled and shifted crop), corrupts them (elastic deformation, then local shuffling, a non-linear
    intensity map, in- or out-painting) and trains the network to classify the place (cross-entropy)
    and restore the original cube (MSE). Adam, its rate halved every `--halve-every` steps.

    The run resumes after a crash (`--resume`) and logs the same losses as an uninterrupted one (on the
    CPU). The result, `RUN/model`, is a model package of the two-headed network (YNet3D); `train --init
    RUN` copies its encoder and decoder into the card's UNet3D, inflating the first convolution to the
    card's modalities, and drops the classification head.
    """
    from ..api import PretrainConfig, set_threads
    from ..api import pretrain as run_pretraining

    set_threads(threads)
    config = PretrainConfig(steps=steps, batch_size=batch_size, cube_size=cube_size, classes=classes,
                            neighbours=neighbours, min_distance=min_distance, base_width=base_width,
                            learning_rate=learning_rate, halve_every=halve_every,
                            classification_weight=classification_weight, restoration_weight=restoration_weight,
                            checkpoint_every=checkpoint_every, seed=seed, modalities=tuple(modality or ("t1",)),
                            register="mni152-2009a" if register else None)
    with progress_bar(quiet) as bar:
        preparing = bar.add_task("registering volumes" if register else "preparing volumes", total=None)
        training = bar.add_task("pretraining", total=steps, visible=False)

        def on_volume(done: int, total: int) -> None:
            bar.update(preparing, completed=done, total=total)

        def on_step(step: int, total: int, loss: float, accuracy: float) -> None:
            bar.update(preparing, visible=False)
            bar.update(training, completed=step, total=total, visible=True,
                       description=f"pretraining · loss {loss:.4f} · accuracy {accuracy:.2f}")

        result = run_pretraining(data_dir, out_dir, config, resume=resume, device=device, on_step=on_step,
                                 on_volume=on_volume, workers=workers, cache=cache)
    if not quiet:
        error_console().print(f"classification accuracy {result.accuracy:.3f}, restoration MSE "
                              f"{result.restoration:.5f} (means of the last steps)", highlight=False)
    typer.echo(f"pretrained {result.steps} steps in {result.seconds / 60:.1f} min; package: {result.package} "
               f"(fine-tune with: factorizer train DATA --card CARD --init {out_dir})")
