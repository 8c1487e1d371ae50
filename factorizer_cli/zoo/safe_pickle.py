"""Read PyTorch checkpoints without running code from them.

A pickle is a small program: every ``GLOBAL`` names a Python object and every ``REDUCE`` calls one. We
let ``torch.load`` parse the zip container (storages, byte order) but hand it this module as its
``pickle_module``, whose unpickler resolves only an allowlist of tensor-rebuilding functions and plain
containers. Any other global (upstream's classes recorded in Lightning hyper-parameters, the optimizer
class, ``os.system``) resolves to an inert ``Reference`` class: harmless as a value, and calling or
instantiating it raises ``UnsafeCheckpointError`` before anything is executed. So a Lightning ``.ckpt`` loads without upstream
installed, and a malicious one is refused.
"""

from __future__ import annotations

import collections
import pickle
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, UnsafeCheckpointError

_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}
_STORAGE_TYPES = {
    name
    for name in dir(torch)
    if name.endswith("Storage") and isinstance(getattr(torch, name, None), type)
}


class Reference:
    """Base of the stand-ins for globals the checkpoint names but we do not trust.

    Each stand-in is a class (so the pickle opcodes that instantiate classes reach it too) whose
    construction raises instead of running anything.
    """

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise UnsafeCheckpointError(
            f"the checkpoint would call {cls.qualified_name}, which is not a tensor or a plain "
            "container; refusing to run it"
        )


def _reference(module: str, name: str) -> type:
    return type(name, (Reference,), {"qualified_name": f"{module}.{name}", "__module__": module})


class Unpickler(pickle.Unpickler):
    """Resolves allowlisted globals; everything else becomes a ``Reference``."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_TYPES:
            return getattr(torch, name)
        return _reference(module, name)


def load(file: Any, **kwargs: Any) -> Any:
    """Legacy (non-zip) checkpoints go through here too, with the same restrictions."""
    return Unpickler(file, **kwargs).load()


def load_checkpoint(path: str | Path) -> Any:
    """Load a ``torch.save`` / Lightning checkpoint as plain containers and tensors on the CPU."""
    import sys

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=sys.modules[__name__]
        )
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{path}: {err}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})"
        ) from None
