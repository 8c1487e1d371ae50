"""The training loop: crops → network → loss → AdamW, validated and checkpointed as it goes.

The loss follows the card's activation: Dice + BCE for sigmoid regions, Dice + cross-entropy for
softmax classes (as 3D UX-Net and RepUX-Net train). Validation scores the regions, or the classes but
the background. Packages hold the network's inference form (``inference_form``: a RepUX-Net trained
with BFR is saved folded); the resumable state holds the training form.

Every crop of a step is drawn from ``default_rng([seed, step, item])`` and torch is seeded per step,
so a run resumed from its saved state repeats exactly the steps an uninterrupted run would have taken,
whatever the number of DataLoader workers that make the batches or of processes that share them
(``loader``, ``distributed``). The learning rate is a function of the step alone (linear warm-up,
cosine decay). A step may accumulate several micro-batches' gradients, and run in mixed precision
(``precision``).

Cases are preprocessed once into an on-disk cache (``cache``) and read back as memory maps, a crop at a
time and a validation volume at a time, so memory does not grow with the number of cases.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..families import TrainingView, activate, build, label_decisions, window_logits
from ..io.atomic import write_text_atomic
from ..pipeline.metrics import dice
from ..pipeline.sliding_window import sliding_window_inference
from ..zoo.card import ModelCard
from ..zoo.package import save_package
from .cache import CachedCase, CaseCache
from .data import Targets, TrainingCase, find_training_cases, targets_of
from .distributed import Processes, process_group
from .folds import SPLIT_FILE, Split, read_strata, split_cases
from .inference_form import inference_form
from .loader import Share, step_batches
from .loss import deep_supervision_loss
from .precision import gradient_scaler, training_autocast
from .state import STATE_FILE, RunState, load_state, save_state, saved_settings


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 2
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 50
    foreground_fraction: float = 0.5
    validation_cases: int = 4
    validate_every: int = 100
    checkpoint_every: int = 25
    seed: int = 0
    folds: int = 0  # 0: the last validation_cases validate; K: cross-validation, fold ``fold`` validates
    fold: int = 0
    stratify_csv: str | None = None  # a CSV with a column per case to spread over the folds
    stratify_column: str | None = None
    accumulate: int = 1  # micro-batches of batch_size crops per optimizer step (gradients accumulated)
    precision: str = "fp32"  # fp32, or bf16 / fp16 mixed precision (``precision``)
    processes: int = 1  # the processes the run was started with (torchrun); batch_size is per process
    init: str | None = None  # --init: the pretrained weights the run started from (recorded, not re-read)


@dataclass
class TrainResult:
    steps: int
    best_dice: float
    validation: dict[str, float]  # the last validation's Dice per region (softmax: per foreground class)
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


# (step, total steps, last loss, last validation Dice per region or None)
Progress = Callable[[int, int, float, dict[str, float] | None], None]
CaseProgress = Callable[[int, int], None]


def learning_rate(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def validate(network: torch.nn.Module, cases: Sequence[TrainingCase | CachedCase], card: ModelCard,
             targets: Targets | None = None, processes: Processes = Processes(),
             progress: CaseProgress | None = None) -> dict[str, float]:
    """Mean Dice per region (sigmoid) or per class but the background (softmax, argmax), over the
    validation cases, on the model's grid (whole volumes, read one case at a time). With several
    processes each scores every ``count``-th case and the sums are shared, so all get the same means."""
    targets = targets or targets_of(card)
    network.eval()
    scored = [c for c in range(len(card.outputs)) if c != targets.background]
    scores = np.zeros(len(scored))
    device = next(network.parameters()).device
    mine = cases[processes.rank::processes.count]
    with torch.inference_mode():
        for done, case in enumerate(mine, 1):
            image, target = np.array(case.image), np.array(case.target)  # in memory for this case only
            probabilities = sliding_window_inference(
                torch.from_numpy(image), card.roi,
                lambda x: activate(window_logits(network, x, card.slice_wise), card.activation), overlap=card.overlap,
                window_device=device, output_device="cpu")
            decisions = label_decisions(probabilities[None], card.activation, card.threshold)[0].numpy()
            if targets.background is None:
                masks = ((decisions[c], target[c]) for c in scored)
            else:
                masks = ((decisions[0] == c, target[0] == c) for c in scored)
            for i, (predicted, truth) in enumerate(masks):
                scores[i] += dice(predicted, truth)
            if progress is not None:
                progress(done, len(mine))
    network.train()
    totals = processes.sum_numbers([float(s) for s in scores])
    return {name: round(total / len(cases), 4) for name, total in zip(targets.scored, totals)}


def train(data_dir: str | Path, card: ModelCard, out_dir: str | Path, config: TrainConfig = TrainConfig(),
          resume: bool = False, device: torch.device | str = "cpu", progress: Progress | None = None,
          case_progress: CaseProgress | None = None, workers: int = 0,
          cache_dir: str | Path | None = None, validation_progress: CaseProgress | None = None,
          initialise: Callable[[torch.nn.Module], object] | None = None) -> TrainResult:
    """Train ``card``'s architecture on ``data_dir``; write ``best/`` and ``last/`` model packages.

    With ``resume`` the run continues from ``out_dir`` with the settings it started with (``config``
    is ignored), so it ends exactly where an uninterrupted run would. ``workers`` DataLoader processes
    make the batches (0: this process); they change the speed, never the batches. Cases are
    preprocessed into ``cache_dir`` (default ``FACTORIZER_HOME/train-cache``) unless already there.

    Started by ``torchrun``, the run is one of several processes (``distributed``): each takes its
    share of every step's crops (``config.batch_size`` per micro-batch), the gradients are averaged,
    and process 0 writes; a resumed run may have another number of processes if the global batch
    divides among them. Random masks drawn inside the network (dropout, drop path: 0 in the zoo's
    cards) come from the step's seed in each process, so with them a run depends on its process count.

    ``initialise`` (``train --init``: ``genesis.transfer``) is called on the freshly built network of a
    new run, before the optimizer sees it; a resumed run takes its weights from its state instead.
    """
    if workers < 0:
        raise ConfigError(f"workers must be 0 (in this process) or more, got {workers}")
    if config.accumulate < 1:
        raise ConfigError(f"accumulate must be 1 or more micro-batches per step, got {config.accumulate}")
    out = Path(out_dir)
    if resume and not (out / STATE_FILE).is_file():
        raise ConfigError(f"{out / STATE_FILE}: no training state to resume; start without --resume")
    if not resume and (out / STATE_FILE).is_file():
        raise ConfigError(f"{out}: holds a training run already; add --resume to continue it, "
                          "or choose another output folder")
    if resume:
        config = TrainConfig(**saved_settings(out))  # the same split, steps and schedule as before
    training_autocast(torch.device(device), config.precision)  # refuse what the device cannot do, now
    with process_group(torch.device(device)) as (processes, device):
        config = _per_process(config, processes.count, resume)
        return _train(data_dir, card, out, config, resume, device, processes, progress, case_progress,
                      validation_progress, workers, cache_dir, initialise)


def _per_process(config: TrainConfig, count: int, resume: bool) -> TrainConfig:
    """``config`` for ``count`` processes: a new run records the count; a resumed one keeps its global
    batch, split anew over the processes it now has."""
    if not resume:
        return replace(config, processes=count)
    crops = config.batch_size * config.processes
    if crops % count:
        raise ConfigError(f"this run takes {crops} crops per micro-batch ({config.processes} process(es) × "
                          f"{config.batch_size}); resume it with a number of processes that divides {crops}")
    return replace(config, batch_size=crops // count, processes=count)


def _train(data_dir: str | Path, card: ModelCard, out: Path, config: TrainConfig, resume: bool,
           device: torch.device, processes: Processes, progress: Progress | None, case_progress: CaseProgress | None,
           validation_progress: CaseProgress | None, workers: int, cache_dir: str | Path | None,
           initialise: Callable[[torch.nn.Module], object] | None = None) -> TrainResult:
    targets = targets_of(card)
    found = find_training_cases(data_dir, card)
    training_names, validating_names = _split_names(data_dir, [name for name, _, _ in found], config, out,
                                                    resume, write=processes.writer)
    cache, prepared = CaseCache(cache_dir), {}
    mine = found[processes.rank::processes.count]  # each process prepares its share, then opens them all
    for i, (name, files, label) in enumerate(mine):
        prepared[name] = cache.case(name, files, label, card, targets)
        if case_progress is not None and processes.writer:
            case_progress(i + 1, len(mine))
    processes.wait_for_preparation()
    cases = [prepared.get(name) or cache.case(name, files, label, card, targets) for name, files, label in found]
    held_out = [c for c in cases if c.name in validating_names]
    training = [c for c in cases if c.name in training_names]

    torch.manual_seed(config.seed)  # the initial weights
    network = build(dict(card.architecture)).to(device).train()
    if initialise is not None and not resume:
        initialise(network)  # pretrained weights (--init); what does not fit keeps the seeded values
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    run = RunState(settings=asdict(config))
    if resume:
        run = load_state(out, network, optimizer)
        run.settings = asdict(config)
    model = _replicated(TrainingView(network, card.slice_wise), device, processes)
    autocast = training_autocast(device, config.precision)
    scaler = gradient_scaler(device, config.precision, run.scaler)
    if processes.writer:
        out.mkdir(parents=True, exist_ok=True)
    validation = next((row["validation"] for row in reversed(run.history) if "validation" in row), {})
    start = time.perf_counter()
    elapsed_before = run.history[-1]["seconds"] if run.history else 0.0
    share = Share(config.batch_size, config.accumulate, processes.rank, processes.count)
    batches = step_batches(training, card.roi, share, config.foreground_fraction, config.seed, run.step,
                           config.steps, workers, pin_memory=device.type == "cuda")
    while run.step < config.steps:
        step = run.step
        torch.manual_seed(config.seed * 1_000_003 + step)
        rate = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = rate
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for micro_batch in range(config.accumulate):
            image, target = next(batches)
            last = micro_batch == config.accumulate - 1
            with (model.no_sync() if not last and hasattr(model, "no_sync") else nullcontext()):
                with autocast:
                    heads = model(image.to(device))
                    _check_outputs(heads, card)
                    loss = deep_supervision_loss(heads, target.to(device), card.activation, pooled=processes.sum)
                scaled = loss / config.accumulate
                (scaled if scaler is None else scaler.scale(scaled)).backward()
            losses.append(float(loss.detach()))
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
            run.scaler = scaler.state_dict()
        loss_value = processes.mean(float(np.mean(losses)))
        run.step = step + 1
        row: dict = {"step": run.step, "loss": round(loss_value, 5), "lr": rate,
                     "seconds": round(elapsed_before + time.perf_counter() - start, 1)}
        validating = bool(held_out) and (run.step % config.validate_every == 0 or run.step == config.steps)
        if validating:
            processes.share_buffers(network)
            validation = validate(network, held_out, card, targets, processes,
                                  validation_progress if processes.writer else None)
            row["validation"] = validation
        run.history.append(row)
        if processes.writer:
            _save(out, network, optimizer, card, run, validation, validating, bool(held_out), config, targets)
        if progress is not None and processes.writer:
            progress(run.step, config.steps, loss_value, validation if validating else None)
    seconds = run.history[-1]["seconds"] if run.history else 0.0
    processes.wait()  # the writer's last files are complete when any process returns
    return TrainResult(run.step, run.best_dice, validation, seconds, run.history)


def _replicated(network: torch.nn.Module, device: torch.device, processes: Processes) -> torch.nn.Module:
    """``network`` (the training view) itself for one process; for several, wrapped in DistributedDataParallel (gradients
    averaged after each step's backward), its BatchNorms synchronised on GPUs. On CPUs BatchNorm
    statistics stay per process (PyTorch's SyncBatchNorm runs on GPUs only)."""
    if processes.count == 1:
        return network
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
    return DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)


def _check_outputs(heads: torch.Tensor | Sequence[torch.Tensor], card: ModelCard) -> None:
    channels = (heads if isinstance(heads, torch.Tensor) else heads[0]).shape[1]
    if channels != len(card.outputs):
        raise ConfigError(f"model card {card.name!r}: the network gives {channels} output channels, the "
                          f"card names {len(card.outputs)} outputs; make them agree")


def _save(out: Path, network: torch.nn.Module, optimizer: torch.optim.Optimizer, card: ModelCard, run: RunState,
          validation: dict[str, float], validating: bool, held_out: bool, config: TrainConfig,
          targets: Targets) -> None:
    """The writer's files after a step: the best package when validation improved, the last package,
    the resumable state and the log at checkpoints."""
    if validating and float(np.mean(list(validation.values()))) > run.best_dice:
        run.best_dice = float(np.mean(list(validation.values())))
        _save_model(out / "best", network, card, run, validation)
    if run.step % config.checkpoint_every == 0 or run.step == config.steps or validating:
        _save_model(out / "last", network, card, run, validation)
        if not held_out:  # nothing to choose by: the best is the latest
            _save_model(out / "best", network, card, run, validation)
        save_state(out, network, optimizer, run)
        _write_log(out, run.history, targets.scored)


def _split_names(data_dir: str | Path, names: list[str], config: TrainConfig, out: Path,
                 resume: bool, write: bool = True) -> tuple[set[str], set[str]]:
    """The cases that train and those that validate: the last ``validation_cases`` by name validate,
    or, with ``folds``, fold ``fold`` of a deterministic split.

    Every run writes its split (``split.json``) and a resumed one reads it back and uses exactly its
    cases, so that cases added to the folder, or a changed CSV, cannot change the run mid-way.
    """
    if resume and (out / SPLIT_FILE).is_file():
        split = Split.load(out)
        missing = sorted(set(split.training + split.validation) - set(names))
        if missing:
            raise ConfigError(f"{data_dir}: case(s) {', '.join(missing[:3])} of this run's split are gone; "
                              "restore them to resume")
        return set(split.training), set(split.validation)
    if config.folds and resume:
        raise ConfigError(f"{out / SPLIT_FILE}: this cross-validation run's split is missing; restore it "
                          "to resume (recomputing it could move cases between training and validation)")
    if not config.folds:
        if config.fold or config.stratify_csv or config.stratify_column:
            raise ConfigError("--fold, --stratify and --stratify-column need --folds K (cross-validation)")
        if len(names) <= config.validation_cases:
            raise ConfigError(f"{data_dir}: {len(names)} cases, but {config.validation_cases} are held out for "
                              "validation; add cases or lower --validation-cases")
        cut = len(names) - config.validation_cases
        split = Split(0, 0, config.seed, None, tuple(names[:cut]), tuple(names[cut:]))
    else:
        strata, stratify = None, None
        if config.stratify_csv:
            if not config.stratify_column:
                raise ConfigError("--stratify needs --stratify-column (the CSV column to spread over the folds)")
            strata = read_strata(config.stratify_csv, config.stratify_column, names)
            stratify = f"{config.stratify_csv}:{config.stratify_column}"
        split = split_cases(names, config.folds, config.fold, config.seed, strata, stratify)
    if not resume and write:  # a run resumed from before splits were saved keeps recomputing its own
        out.mkdir(parents=True, exist_ok=True)
        split.save(out)
    return set(split.training), set(split.validation)


def _save_model(folder: Path, network: torch.nn.Module, card: ModelCard, run: RunState,
                validation: dict[str, float]) -> None:
    """A model package of ``network`` in its inference form, the card describing that form."""
    metrics: dict = {"training_step": run.step}  # not the template card's figures: they were not ours
    if validation:
        metrics["validation_dice"] = validation
    provenance = f"factorizer train, settings {json.dumps(run.settings, sort_keys=True)}"
    weights, architecture = inference_form(network, card.architecture)
    trained = ModelCard.from_dict({**card.to_dict(), "metrics": metrics, "provenance": provenance,
                                   "description": f"Trained by factorizer train from card {card.name!r}.",
                                   "architecture": architecture, "weights": []})
    save_package(folder, trained, [weights])


def _write_log(out: Path, history: list[dict], outputs) -> None:
    """``train-log.csv``: one row per step; validation Dice on the rows where it ran."""
    text = io.StringIO()
    writer = csv.writer(text)  # "\r\n" line ends, as the csv module writes by default
    writer.writerow(["step", "loss", "lr", "seconds", *(f"dice_{o}" for o in outputs)])
    for row in history:
        dice = row.get("validation") or {}
        writer.writerow([row["step"], row["loss"], f"{row['lr']:.6g}", row["seconds"],
                         *(dice.get(o, "") for o in outputs)])
    write_text_atomic(out / "train-log.csv", text.getvalue())
