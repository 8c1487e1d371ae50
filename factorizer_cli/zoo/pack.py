"""Fold runs of ``factorizer train`` assembled into one ensemble package that ``segment`` averages.

Each run folder holds ``best/`` (a model package) and, when trained with ``--folds``, ``split.json``
(its fold). The runs must describe the same model: the same network, preprocessing, window and
outputs; only what training wrote (metrics, provenance) may differ. The ensemble's card records each
fold's validation figures, so that the package says how it was validated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import load_file

from ..errors import ConfigError
from .card import ModelCard
from .package import ModelPackage, open_package, save_package

# What training writes into a run's card; everything else must agree between the folds.
_PER_RUN = ("metrics", "provenance", "weights", "description")


def _model_description(card: ModelCard) -> dict:
    return {k: v for k, v in card.to_dict().items() if k not in _PER_RUN}


def _fold_record(run: Path) -> dict | None:
    split = run / "split.json"
    if not split.is_file():
        return None
    data = json.loads(split.read_text())
    return {"fold": data["fold"], "folds": data["folds"], "validation_cases": len(data["validation"])}


def pack_runs(runs: Sequence[str | Path], output: str | Path, which: str = "best") -> ModelPackage:
    """The ``which`` (best or last) package of every run, as the folds of one package at ``output``."""
    runs = [Path(r) for r in runs]
    if not runs:
        raise ConfigError("no runs to pack; pass the run folders of factorizer train")
    out = Path(output)
    if (out / "card.json").exists():
        raise ConfigError(f"{out}: holds a model package already; choose another output folder")
    packages: list[ModelPackage] = []
    for run in runs:
        if not (run / which / "card.json").is_file():
            raise ConfigError(f"{run}: no {which}/ model package; pass the output folder of a factorizer train run")
        packages.append(open_package(run / which))
    reference = _model_description(packages[0].card)
    for run, package in zip(runs[1:], packages[1:]):
        differing = sorted(k for k in set(reference) | set(_model_description(package.card))
                           if reference.get(k) != _model_description(package.card).get(k))
        if differing:
            raise ConfigError(f"{run}: trains another model than {runs[0]} (differs in {', '.join(differing)}); "
                              "pack runs of one card only")
    records, seen = [], {}
    for run, package in zip(runs, packages):
        record = {"run": run.name, **(_fold_record(run) or {}), **package.card.metrics}
        fold = record.get("fold")
        if fold is not None:
            if fold in seen:
                raise ConfigError(f"{run}: fold {fold} again (also {seen[fold]}); pack one run per fold")
            seen[fold] = run
        records.append(record)
    folds = {r.get("folds") for r in records}
    if len(folds) > 1:
        raise ConfigError(f"the runs were split into different numbers of folds ({sorted(map(str, folds))}); "
                          "pack the runs of one cross-validation")
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
    state_dicts = [load_file(path) for package in packages for path in package.weight_files]
    return save_package(out, card, state_dicts)
