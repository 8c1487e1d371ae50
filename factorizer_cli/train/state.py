"""The training state in one safetensors file: weights, optimizer moments, step, history.

One file written atomically, so a run killed at any moment resumes from the last complete state. The
JSON part (step, run settings, history) rides in the safetensors metadata; nothing in the file is
executable, unlike a pickled ``torch.save``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError
from ..io.atomic import atomic_path
from ..zoo.package import load_state_dict_checked

STATE_FILE = "train-state.safetensors"


@dataclass
class RunState:
    step: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)  # one row per logged step
    best_dice: float = -1.0
    scaler: dict[str, Any] | None = None  # fp16's gradient scaler (its scale and growth count)


def save_state(folder: Path, network: nn.Module, optimizer: torch.optim.Optimizer, run: RunState) -> None:
    tensors = {f"net.{k}": v.detach().contiguous() for k, v in network.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    for index, slots in optimizer_state["state"].items():
        for key, value in slots.items():
            tensors[f"opt.{index}.{key}"] = torch.as_tensor(value).detach().contiguous()
    metadata = {
        "run": json.dumps({"step": run.step, "settings": run.settings, "history": run.history,
                           "best_dice": run.best_dice, "scaler": run.scaler}),
        "param_groups": json.dumps(optimizer_state["param_groups"]),
    }
    with atomic_path(folder / STATE_FILE) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def saved_settings(folder: Path) -> dict[str, Any]:
    """The settings a saved run started with (read before building anything, to resume alike)."""
    return json.loads(_read(folder / STATE_FILE, tensors=False)[0]["run"])["settings"]


def _read(path: Path, tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            loaded = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: cannot read the training state ({err}); delete it to start over, "
                              "or train into another folder") from None
    if "run" not in metadata:
        raise CheckpointError(f"{path}: not a factorizer training state; delete it to start over, "
                              "or train into another folder")
    return metadata, loaded


def load_state(folder: Path, network: nn.Module, optimizer: torch.optim.Optimizer) -> RunState:
    path = folder / STATE_FILE
    metadata, tensors = _read(path)
    load_state_dict_checked(network, {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, path)
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": json.loads(metadata["param_groups"])})
    run = json.loads(metadata["run"])
    return RunState(run["step"], run["settings"], run["history"], run["best_dice"], run.get("scaler"))
