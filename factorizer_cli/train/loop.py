"""The training loop: crops → network → loss → AdamW, validated and checkpointed as it goes.

The loss follows the card's activation: Dice + BCE for sigmoid regions, Dice + cross-entropy for
softmax classes (as 3D UX-Net and RepUX-Net train). Validation scores the regions, or the classes but
the background. Packages hold the network's inference form (``inference_form``: a RepUX-Net trained
with BFR is saved folded); the resumable state holds the training form.

Every step draws its crops and augmentations from ``default_rng([seed, step])`` and seeds torch the
same way, so a run resumed from its saved state repeats exactly the steps an uninterrupted run would
have taken, whatever the number of DataLoader workers that make the batches (``loader``). The learning
rate is a function of the step alone (linear warm-up, cosine decay).

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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..families import activate, build, full_resolution_logits, label_decisions
from ..io.atomic import write_text_atomic
from ..pipeline.metrics import dice
from ..pipeline.sliding_window import sliding_window_inference
from ..zoo.card import ModelCard
from ..zoo.package import save_package
from .cache import CachedCase, CaseCache
from .data import Targets, TrainingCase, find_training_cases, targets_of
from .folds import SPLIT_FILE, Split, read_strata, split_cases
from .inference_form import inference_form
from .loader import step_batches
from .loss import deep_supervision_loss
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
             targets: Targets | None = None) -> dict[str, float]:
    """Mean Dice per region (sigmoid) or per class but the background (softmax, argmax), over the
    validation cases, on the model's grid (whole volumes, read one case at a time)."""
    targets = targets or targets_of(card)
    network.eval()
    scored = [c for c in range(len(card.outputs)) if c != targets.background]
    scores = np.zeros(len(scored))
    device = next(network.parameters()).device
    with torch.inference_mode():
        for case in cases:
            image, target = np.array(case.image), np.array(case.target)  # in memory for this case only
            probabilities = sliding_window_inference(
                torch.from_numpy(image), card.roi,
                lambda x: activate(full_resolution_logits(network, x), card.activation), overlap=card.overlap,
                window_device=device, output_device="cpu")
            decisions = label_decisions(probabilities[None], card.activation, card.threshold)[0].numpy()
            if targets.background is None:
                masks = ((decisions[c], target[c]) for c in scored)
            else:
                masks = ((decisions[0] == c, target[0] == c) for c in scored)
            for i, (predicted, truth) in enumerate(masks):
                scores[i] += dice(predicted, truth)
    network.train()
    return {name: round(float(s / len(cases)), 4) for name, s in zip(targets.scored, scores)}


def train(data_dir: str | Path, card: ModelCard, out_dir: str | Path, config: TrainConfig = TrainConfig(),
          resume: bool = False, device: torch.device | str = "cpu", progress: Progress | None = None,
          case_progress: CaseProgress | None = None, workers: int = 0,
          cache_dir: str | Path | None = None) -> TrainResult:
    """Train ``card``'s architecture on ``data_dir``; write ``best/`` and ``last/`` model packages.

    With ``resume`` the run continues from ``out_dir`` with the settings it started with (``config``
    is ignored), so it ends exactly where an uninterrupted run would. ``workers`` DataLoader processes
    make the batches (0: this process); they change the speed, never the batches. Cases are
    preprocessed into ``cache_dir`` (default ``FACTORIZER_HOME/train-cache``) unless already there.
    """
    if workers < 0:
        raise ConfigError(f"workers must be 0 (in this process) or more, got {workers}")
    out = Path(out_dir)
    if resume and not (out / STATE_FILE).is_file():
        raise ConfigError(f"{out / STATE_FILE}: no training state to resume; start without --resume")
    if not resume and (out / STATE_FILE).is_file():
        raise ConfigError(f"{out}: holds a training run already; add --resume to continue it, "
                          "or choose another output folder")
    if resume:
        config = TrainConfig(**saved_settings(out))  # the same split, steps and schedule as before
    targets = targets_of(card)
    found = find_training_cases(data_dir, card)
    training_names, validating_names = _split_names(data_dir, [name for name, _, _ in found], config, out,
                                                    resume)
    cache, cases = CaseCache(cache_dir), []
    for i, (name, files, label) in enumerate(found):
        cases.append(cache.case(name, files, label, card, targets))
        if case_progress is not None:
            case_progress(i + 1, len(found))
    held_out = [c for c in cases if c.name in validating_names]
    training = [c for c in cases if c.name in training_names]

    torch.manual_seed(config.seed)  # the initial weights
    network = build(dict(card.architecture)).to(device).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    run = RunState(settings=asdict(config))
    if resume:
        run = load_state(out, network, optimizer)
    out.mkdir(parents=True, exist_ok=True)
    validation = next((row["validation"] for row in reversed(run.history) if "validation" in row), {})
    start, loss_value = time.perf_counter(), float("nan")
    elapsed_before = run.history[-1]["seconds"] if run.history else 0.0
    batches = step_batches(training, card.roi, config.batch_size, config.foreground_fraction, config.seed,
                           run.step, config.steps, workers, pin_memory=torch.device(device).type == "cuda")
    for image, target in batches:
        step = run.step
        torch.manual_seed(config.seed * 1_000_003 + step)
        rate = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = rate
        heads = network(image.to(device))
        channels = (heads if isinstance(heads, torch.Tensor) else heads[0]).shape[1]
        if channels != len(card.outputs):
            raise ConfigError(f"model card {card.name!r}: the network gives {channels} output channels, the "
                              f"card names {len(card.outputs)} outputs; make them agree")
        loss = deep_supervision_loss(heads, target.to(device), card.activation)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
        run.step = step + 1
        row: dict = {"step": run.step, "loss": round(loss_value, 5), "lr": rate,
                     "seconds": round(elapsed_before + time.perf_counter() - start, 1)}
        validating = bool(held_out) and (run.step % config.validate_every == 0 or run.step == config.steps)
        if validating:
            validation = validate(network, held_out, card, targets)
            row["validation"] = validation
        run.history.append(row)
        if validating and float(np.mean(list(validation.values()))) > run.best_dice:
            run.best_dice = float(np.mean(list(validation.values())))
            _save_model(out / "best", network, card, run, validation)
        if run.step % config.checkpoint_every == 0 or run.step == config.steps or validating:
            _save_model(out / "last", network, card, run, validation)
            if not held_out:  # nothing to choose by: the best is the latest
                _save_model(out / "best", network, card, run, validation)
            save_state(out, network, optimizer, run)
            _write_log(out, run.history, targets.scored)
        if progress is not None:
            progress(run.step, config.steps, loss_value, validation if validating else None)
    seconds = run.history[-1]["seconds"] if run.history else 0.0
    return TrainResult(run.step, run.best_dice, validation, seconds, run.history)


def _split_names(data_dir: str | Path, names: list[str], config: TrainConfig, out: Path,
                 resume: bool) -> tuple[set[str], set[str]]:
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
    if not resume:  # a run resumed from before splits were saved keeps recomputing its own
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
