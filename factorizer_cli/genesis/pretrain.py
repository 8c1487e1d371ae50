"""``factorizer pretrain``: Semantic Genesis on unlabelled brain MRI, resumable and deterministic.

The steps, each in its module: find the volumes and bring them onto one grid, cached (``volumes``);
discover the pattern classes (``discovery``, saved as ``patterns.json``); cut each step's cubes on the
fly and corrupt them (``cubes``, ``transforms``); train Semantic Genesis' ``YNet3D`` (``nn.unet3d``,
``norm="batch"``: a model trained here for later inference uses running statistics in eval mode) on

    loss = classification_weight · cross-entropy(class logits, pattern)
         + restoration_weight · MSE(sigmoid(restoration logits), original cube)

(upstream: 0.01 and 1), with Adam at ``learning_rate`` halved every ``halve_every`` steps. The rate is a
function of the step alone, so a resumed run continues the schedule where it stopped (upstream's
scheduler restarted from the full rate on every resume).

Like ``train`` (whose state file, atomic writes and per-step seeding this reuses): item ``i`` of step
``s`` is drawn from ``default_rng([seed, s, i])``, torch is seeded per step, and the state (weights,
BatchNorm statistics, Adam's moments, step, history) is saved atomically every ``checkpoint_every``
steps, so a run killed at any moment and resumed (``resume=True``) logs the same losses as one that
ran through, whatever the number of DataLoader ``workers``. One process (no ``torchrun``).

Writes into the run folder: ``model/`` (a model package of the YNet3D, its card describing the
inputs, the preprocessing and the network: what ``train --init`` reads), ``patterns.json``,
``pretrain-log.csv`` and ``train-state.safetensors``.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..atlas.template import MNI152_2009A
from ..errors import ConfigError, FactorizerError, InputError
from ..families import build
from ..io.atomic import make_folder, write_text_atomic
from ..train.state import STATE_FILE, RunState, load_state, save_state, saved_settings
from ..zoo.card import ModelCard
from ..zoo.package import save_package
from .cubes import batch_of_step
from .discovery import PATTERNS_FILE, Patterns, brain_of, discover
from .volumes import find_volumes, modality_specs, prepare_volumes, pretraining_preprocessing

MODEL_FOLDER = "model"
LOG_FILE = "pretrain-log.csv"
DISCOVERY_STREAM = 57164  # default_rng([seed, DISCOVERY_STREAM]) draws the patterns; items use 3 numbers
SUMMARY_STEPS = 50  # the package's metrics: means over the last this many steps


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 1000
    batch_size: int = 4
    cube_size: tuple[int, int, int] = (64, 64, 32)  # upstream's; sides multiples of 8, at least 16
    classes: int = 44  # pattern classes C (upstream: 44)
    neighbours: int = 200  # K volumes per class, the reference's nearest (upstream: 200)
    min_distance: float | None = None  # voxels between pattern centres; None: a quarter of the cube's longest side
    base_width: int = 32  # the U-Net's width (upstream: 32)
    learning_rate: float = 1e-3
    halve_every: int | None = None  # steps; None: a quarter of the steps (the rate halves three times)
    classification_weight: float = 0.01
    restoration_weight: float = 1.0
    checkpoint_every: int = 25
    seed: int = 0
    modalities: tuple[str, ...] = ("t1",)  # the first is registered (a T1)
    register: str | None = MNI152_2009A  # None: the volumes are aligned already

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> PretrainConfig:
        """A config from a run's saved settings (JSON lists back to tuples)."""
        known = {k: v for k, v in settings.items() if k in cls.__dataclass_fields__}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in known.items()})

    def resolved(self) -> PretrainConfig:
        """The config checked (``ConfigError`` naming the option), its defaults that depend on others filled."""
        cube = tuple(int(c) for c in self.cube_size)
        if len(cube) != 3 or any(c < 16 or c % 8 for c in cube):
            raise ConfigError(f"--cube-size needs 3 sides, each a multiple of 8 and at least 16, got {list(cube)}")
        for name, value, minimum in (("steps", self.steps, 1), ("batch-size", self.batch_size, 1),
                                     ("classes", self.classes, 2), ("neighbours", self.neighbours, 1),
                                     ("base-width", self.base_width, 1),
                                     ("checkpoint-every", self.checkpoint_every, 1)):
            if value < minimum:
                raise ConfigError(f"--{name} must be at least {minimum}, got {value}")
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.classification_weight < 0 or self.restoration_weight < 0 or \
                self.classification_weight + self.restoration_weight == 0:
            raise ConfigError("--classification-weight and --restoration-weight must be >= 0, not both 0")
        if not self.modalities:
            raise ConfigError("name at least one modality (--modality)")
        halve = self.halve_every if self.halve_every is not None else max(1, self.steps // 4)
        if halve < 1:
            raise ConfigError(f"--halve-every must be at least 1 step, got {halve}")
        distance = self.min_distance if self.min_distance is not None else max(cube) / 4
        if distance < 0:
            raise ConfigError(f"--min-distance must be >= 0 voxels, got {distance}")
        return replace(self, cube_size=cube, halve_every=int(halve), min_distance=float(distance),
                       modalities=tuple(self.modalities))


@dataclass
class PretrainResult:
    steps: int
    seconds: float
    accuracy: float  # mean classification accuracy of the last SUMMARY_STEPS steps
    restoration: float  # mean restoration MSE of the last SUMMARY_STEPS steps
    package: Path
    history: list[dict[str, float]] = field(default_factory=list)


# (step, total steps, loss, classification accuracy of the step's batch)
Progress = Callable[[int, int, float, float], None]
VolumeProgress = Callable[[int, int], None]


def learning_rate(step: int, config: PretrainConfig) -> float:
    """Adam's rate at ``step``: halved every ``halve_every`` steps (a function of the step alone)."""
    return config.learning_rate * 0.5 ** (step // config.halve_every)


def architecture(config: PretrainConfig, channels: int) -> dict[str, Any]:
    """The YNet3D of a run: one restoration output per input channel, C classes, batch statistics
    only in training."""
    return {"class": "YNet3D", "n_class": channels, "in_channels": channels, "cls_classes": config.classes,
            "base_width": config.base_width, "norm": "batch", "act": "relu", "lst_act": "soft"}


def pretrain(data_dir: str | Path, out_dir: str | Path, config: PretrainConfig = PretrainConfig(),
             resume: bool = False, device: torch.device | str = "cpu", progress: Progress | None = None,
             volume_progress: VolumeProgress | None = None, workers: int = 0,
             cache_dir: str | Path | None = None) -> PretrainResult:
    """Pretrain on the unlabelled volumes of ``data_dir`` into ``out_dir`` (see the module).

    With ``resume`` the run continues from ``out_dir`` with the settings and patterns it started with
    (``config`` is ignored). ``workers`` DataLoader processes make the batches (0: this process); they
    change the speed, never the batches. Volumes are preprocessed into ``cache_dir`` (default
    ``FACTORIZER_HOME/pretrain-cache``) unless already there.
    """
    if workers < 0:
        raise ConfigError(f"workers must be 0 (in this process) or more, got {workers}")
    out = Path(out_dir)
    if resume and not (out / STATE_FILE).is_file():
        raise ConfigError(f"{out / STATE_FILE}: no pretraining state to resume; start without --resume")
    if not resume and (out / STATE_FILE).is_file():
        raise ConfigError(f"{out}: holds a run already; add --resume to continue it, or choose another output folder")
    if resume:
        settings = saved_settings(out)
        if "classes" not in settings:
            raise ConfigError(f"{out}: holds a `factorizer train` run, not a pretraining run; choose another folder")
        config = PretrainConfig.from_settings(settings)
    config = config.resolved()
    device = torch.device(device)
    specs = modality_specs(config.modalities)
    found = find_volumes(data_dir, specs)
    patterns = Patterns.load(out) if resume else None
    if patterns is not None:
        found = _the_run_volumes(found, patterns, data_dir)
    volumes = prepare_volumes(found, pretraining_preprocessing(config.register), cache_dir, volume_progress)
    if patterns is None:
        patterns = _discover(volumes, config)
        make_folder(out, "run folder")
        patterns.save(out)

    torch.manual_seed(config.seed)  # the initial weights
    network = build(architecture(config, len(specs))).to(device).train()
    layout = torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format
    network = network.to(memory_format=layout)  # PyTorch's CPU 3D convolutions: about 15% faster so
    optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    run = RunState(settings=asdict(config))
    if resume:
        run = load_state(out, network, optimizer)
        run.settings = asdict(config)
    start = time.perf_counter()
    elapsed_before = run.history[-1]["seconds"] if run.history else 0.0
    batches = step_batches(volumes, patterns, config, run.step, workers, pin_memory=device.type == "cuda")
    while run.step < config.steps:
        step = run.step
        torch.manual_seed(config.seed * 1_000_003 + step)
        rate = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = rate
        inputs, targets, labels = next(batches)
        labels = labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        restoration, classes = network.forward_logits(inputs.to(device).contiguous(memory_format=layout))
        restoration_loss = F.mse_loss(torch.sigmoid(restoration), targets.to(device))
        classification_loss = F.cross_entropy(classes, labels)
        loss = config.classification_weight * classification_loss + config.restoration_weight * restoration_loss
        loss.backward()
        optimizer.step()
        accuracy = float((classes.detach().argmax(1) == labels).float().mean())
        run.step = step + 1
        run.history.append({"step": run.step, "loss": round(float(loss.detach()), 6),
                            "classification": round(float(classification_loss.detach()), 6),
                            "restoration": round(float(restoration_loss.detach()), 6),
                            "accuracy": round(accuracy, 4), "lr": rate,
                            "seconds": round(elapsed_before + time.perf_counter() - start, 1)})
        if run.step % config.checkpoint_every == 0 or run.step == config.steps:
            _save(out, network, optimizer, run, config, specs)
        if progress is not None:
            progress(run.step, config.steps, float(loss.detach()), accuracy)
    accuracy, restoration_mse = _recent(run.history)
    seconds = run.history[-1]["seconds"] if run.history else 0.0
    return PretrainResult(run.step, seconds, accuracy, restoration_mse, out / MODEL_FOLDER, run.history)


def _the_run_volumes(found: Sequence[tuple[str, tuple[Path, ...]]], patterns: Patterns,
                     data_dir: str | Path) -> list[tuple[str, tuple[Path, ...]]]:
    """The volumes a resumed run started with, in its order (volumes added since are not used)."""
    files = dict(found)
    missing = [name for name in patterns.volumes if name not in files]
    if missing:
        raise InputError(f"{data_dir}: volume(s) {', '.join(missing[:3])} of this run are gone; restore them "
                         "to resume")
    return [(name, files[name]) for name in patterns.volumes]


def _discover(volumes: Sequence, config: PretrainConfig) -> Patterns:
    mask = brain_of(volumes, config.register)
    if mask.shape != tuple(volumes[0].shape[1:]):
        raise InputError(f"the brain mask's grid {mask.shape} is not the volumes' {tuple(volumes[0].shape[1:])}")
    embeddings = np.stack([v.embedding for v in volumes])
    return discover([v.name for v in volumes], embeddings, mask, config.cube_size, config.classes,
                    config.neighbours, config.min_distance, np.random.default_rng([config.seed, DISCOVERY_STREAM]))


class StepBatches(Dataset):
    """Item ``i``: the batch of step ``start + i`` (``cubes.batch_of_step``)."""

    def __init__(self, volumes: Sequence, patterns: Patterns, config: PretrainConfig, start: int):
        self.volumes, self.patterns, self.config, self.start = list(volumes), patterns, config, start

    def __len__(self) -> int:
        return max(0, self.config.steps - self.start)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return batch_of_step(self.volumes, self.patterns, self.config.cube_size, range(self.config.batch_size),
                             self.config.seed, self.start + index)


def step_batches(volumes: Sequence, patterns: Patterns, config: PretrainConfig, start: int, workers: int = 0,
                 pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The batches of steps ``start .. steps - 1`` in order, made by ``workers`` processes (0: here); the
    loader has its own generator, so the global torch RNG the loop seeds per step is left alone."""
    loader = DataLoader(StepBatches(volumes, patterns, config, start), batch_size=None, shuffle=False,
                        num_workers=workers, pin_memory=pin_memory, persistent_workers=False,
                        generator=torch.Generator().manual_seed(config.seed), prefetch_factor=2 if workers else None)
    try:
        yield from loader
    except FactorizerError as err:  # a worker's error arrives with its traceback folded into the message
        lines = str(err).strip().splitlines()
        raise type(err)(lines[-1].partition(f"{type(err).__name__}: ")[2] or lines[-1]) from None


def _recent(history: Sequence[dict[str, float]]) -> tuple[float, float]:
    rows = history[-SUMMARY_STEPS:]
    if not rows:
        return 0.0, 0.0
    return float(np.mean([r["accuracy"] for r in rows])), float(np.mean([r["restoration"] for r in rows]))


def _save(out: Path, network: torch.nn.Module, optimizer: torch.optim.Optimizer, run: RunState,
          config: PretrainConfig, specs: Sequence[tuple[str, Sequence[str]]]) -> None:
    """The package, then the resumable state, then the log: a state on disk always has its package."""
    save_package(out / MODEL_FOLDER, pretrained_card(out, config, specs, run),
                 [{k: v.detach() for k, v in network.state_dict().items()}])
    save_state(out, network, optimizer, run)
    _write_log(out, run.history)


def pretrained_card(out: Path, config: PretrainConfig, specs: Sequence[tuple[str, Sequence[str]]],
                    run: RunState) -> ModelCard:
    """The card of a run's package: the inputs and preprocessing a fine-tuning card should repeat, the
    cube size as its window, one restoration output per modality, the network."""
    accuracy, restoration = _recent(run.history)
    name = re.sub(r"[^A-Za-z0-9._=-]", "-", f"genesis-{out.resolve().name}").strip("-.") or "genesis"
    names = ", ".join(n for n, _ in specs)
    return ModelCard.from_dict({
        "name": name,
        "role": "initialisation",
        "task": "initialisation (self-supervised pretraining): start `factorizer train --init` from it",
        "description": (f"Semantic Genesis pretraining (self-discovery, self-classification of {config.classes} "
                        f"patterns, self-restoration) of a YNet3D on unlabelled {names} volumes. An "
                        "initialisation, not a segmenter: its outputs restore corrupted cubes. Fine-tune with "
                        f"`factorizer train DATA --card CARD --init {out / MODEL_FOLDER}`, CARD's network a "
                        f"UNet3D of base_width {config.base_width}, its preprocessing this card's."),
        "inputs": [{"name": n, "aliases": list(a)} for n, a in specs],
        "preprocessing": pretraining_preprocessing(config.register).to_dict(),
        "roi": list(config.cube_size),
        "outputs": [f"restored_{n}" for n, _ in specs],
        "labels": [],
        "activation": "sigmoid",
        "architecture": architecture(config, len(specs)),
        "metrics": {"pretraining_step": run.step, "classification_accuracy": round(accuracy, 4),
                    "restoration_mse": round(restoration, 6), "over_last_steps": min(SUMMARY_STEPS, run.step)},
        "provenance": f"factorizer pretrain, settings {json.dumps(run.settings, sort_keys=True)}; the patterns "
                      f"in {PATTERNS_FILE} beside this package",
        "citation": ("Haghighi F, Hosseinzadeh Taher MR, Zhou Z, Gotway MB, Liang J. Learning Semantics-enriched "
                     "Representation via Self-discovery, Self-classification, and Self-restoration. MICCAI 2020"),
    })


def _write_log(out: Path, history: Sequence[dict[str, float]]) -> None:
    """``pretrain-log.csv``: one row per step."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["step", "loss", "classification", "restoration", "accuracy", "lr", "seconds"])
    for row in history:
        writer.writerow([row["step"], row["loss"], row["classification"], row["restoration"], row["accuracy"],
                         f"{row['lr']:.6g}", row["seconds"]])
    write_text_atomic(out / LOG_FILE, text.getvalue())
