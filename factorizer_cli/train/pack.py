"""Fold runs of ``factorizer train`` assembled into one ensemble package that ``segment`` averages.

Each run folder holds ``best/`` (a model package) and, when trained with ``--folds``, ``split.json``
(its fold). The runs must describe the same model: the same network, preprocessing, window and
outputs; only what training wrote (metrics, provenance) may differ. The ensemble's card records each
fold's validation figures, so that the package says how it was validated.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError
from ..zoo.card import ModelCard
from ..zoo.package import CARD_FILE, ModelPackage, open_package, save_package
from .folds import SPLIT_FILE, Split

# What training writes into a run's card; everything else must agree between the folds.
_PER_RUN = ("metrics", "provenance", "weights", "description")


def _model_description(card: ModelCard) -> dict:
    return {k: v for k, v in card.to_dict().items() if k not in _PER_RUN}


def _cross_validation(split: Split) -> tuple:
    """What the folds of one cross-validation share: fold count, seed, stratification, cases."""
    return split.folds, split.seed, split.stratify, sorted(split.training + split.validation)


def _split_of(run: Path) -> Split | None:
    """The run's cross-validation split; ``None`` for a run trained without ``--folds``."""
    split = Split.load(run) if (run / SPLIT_FILE).is_file() else None
    return split if split is not None and split.folds else None


def pack_runs(runs: Sequence[str | Path], output: str | Path, which: str = "best") -> ModelPackage:
    """The ``which`` (best or last) package of every run, as the folds of one package at ``output``."""
    runs = [Path(r) for r in runs]
    if not runs:
        raise ConfigError("no runs to pack; pass the run folders of factorizer train")
    out = Path(output)
    if (out / CARD_FILE).exists():
        raise ConfigError(f"{out}: holds a model package already; choose another output folder")
    packages: list[ModelPackage] = []
    for run in runs:
        if not (run / which / CARD_FILE).is_file():
            raise ConfigError(f"{run}: no {which}/ model package; pass the output folder of a factorizer train run")
        packages.append(open_package(run / which))
    reference = _model_description(packages[0].card)
    for run, package in zip(runs[1:], packages[1:]):
        described = _model_description(package.card)
        differing = sorted(k for k in set(reference) | set(described) if reference.get(k) != described.get(k))
        if differing:
            raise ConfigError(f"{run}: trains another model than {runs[0]} (differs in {', '.join(differing)}); "
                              "pack runs of one card only")
    if len({r.resolve() for r in runs}) != len(runs):
        raise ConfigError("a run is listed twice; pass each fold's run folder once")
    splits = [_split_of(run) for run in runs]
    cross_validated = [s for s in splits if s is not None]
    if cross_validated and len(cross_validated) != len(runs):
        raise ConfigError("some runs were trained with --folds and some without; pack the runs of one "
                          "cross-validation")
    records, seen = [], {}
    for run, package, split in zip(runs, packages, splits):
        record = {"run": run.name, **package.card.metrics}
        if split is not None:
            if _cross_validation(split) != _cross_validation(cross_validated[0]):
                raise ConfigError(f"{run}: split by other settings or cases than {runs[0]} (folds, seed, "
                                  "stratification and cases must match); pack the runs of one cross-validation")
            if split.fold in seen:
                raise ConfigError(f"{run}: fold {split.fold} again (also {seen[split.fold]}); pack one run per fold")
            seen[split.fold] = run
            record.update(fold=split.fold, folds=split.folds, validation_cases=len(split.validation))
        records.append(record)
    metrics: dict = {"folds": records}
    scored = [r["validation_dice"] for r in records if r.get("validation_dice")]
    if scored:
        metrics["mean_validation_dice"] = {name: round(sum(s[name] for s in scored) / len(scored), 4)
                                           for name in scored[0]}
    card = ModelCard.from_dict({
        **reference, "metrics": metrics, "weights": [],
        "description": f"An ensemble of {len(runs)} runs of factorizer train, averaged at inference.",
        "provenance": f"factorizer models pack {' '.join(r.name for r in runs)}",
    })
    state_dicts = [weights for package in packages for _, weights in package.state_dicts()]
    return save_package(out, card, state_dicts)
