"""Read PyTorch checkpoints without running code from them.

A pickle is a small program: every ``GLOBAL`` names a Python object and every ``REDUCE`` calls one. We
let ``torch.load`` parse the zip container (storages, byte order) but hand it this module as its
``pickle_module``, whose unpickler resolves only tensor-rebuilding functions and plain containers.
Any other global (upstream's classes recorded in Lightning hyper-parameters, the optimizer class,
``os.system``) resolves to an inert ``Reference`` class: harmless as a value, while calling,
instantiating or modifying it raises ``UnsafeCheckpointError`` before anything is executed. So a
Lightning ``.ckpt`` loads without upstream installed, and a malicious one is refused.

Only the zip format of ``torch.save`` (PyTorch ≥ 1.6) is read: torch's legacy loaders act on pickled
data themselves (file writes, tar extraction) before our unpickler could refuse anything.
"""

from __future__ import annotations

import collections
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, UnsafeCheckpointError

_CONTAINERS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}
_TENSOR_REBUILDERS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter")}


class _Frozen(type):
    def __setattr__(cls, name: str, value: Any) -> None:
        raise UnsafeCheckpointError(f"the checkpoint would modify {cls.qualified_name}; refusing it")


class Reference(metaclass=_Frozen):
    """Base of the stand-ins for globals the checkpoint names but we do not trust."""

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise UnsafeCheckpointError(
            f"the checkpoint would call {cls.qualified_name}, which is not a tensor or a plain "
            "container; refusing to run it"
        )


def _reference(module: str, name: str) -> type:
    return _Frozen(name, (Reference,), {"qualified_name": f"{module}.{name}", "__module__": module})


def _rebuilder(name: str) -> Any:
    """A fresh wrapper per use, so a pickle cannot alter the real torch function's attributes."""
    target = getattr(torch._utils, name)

    def rebuild(*args: Any) -> Any:
        return target(*args)

    return rebuild


class Unpickler(pickle.Unpickler):
    """Resolves tensor rebuilders and plain containers; everything else becomes a ``Reference``."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CONTAINERS:
            return _CONTAINERS[(module, name)]
        if (module, name) in _TENSOR_REBUILDERS:
            return _rebuilder(name)
        return _reference(module, name)


def load(file: Any, **kwargs: Any) -> Any:
    """Part of the ``pickle_module`` interface torch.load expects."""
    return Unpickler(file, **kwargs).load()


def load_checkpoint(path: str | Path) -> Any:
    """Load a ``torch.save`` / Lightning checkpoint as plain containers and tensors on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (only the zip format of torch.save, PyTorch 1.6 "
            "and later, is read; re-save legacy files with a current PyTorch)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=sys.modules[__name__])
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{path}: {err}") from None
    except Exception as err:  # whatever a damaged or crafted file makes torch or pickle raise
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
