"""Read PyTorch checkpoints without running code from them.

A pickle is a small program: every ``GLOBAL`` names a Python object and every ``REDUCE`` calls one. We
let ``torch.load`` parse the zip container (storages, byte order) but hand it this module as its
``pickle_module``, whose unpickler resolves only tensor-rebuilding functions and plain containers.
Any other global (upstream's classes recorded in Lightning hyper-parameters, the optimizer class,
``os.system``) resolves to an inert ``Reference`` class: harmless as a value, while calling,
instantiating or modifying it raises ``UnsafeCheckpointError`` before anything is executed. So a
Lightning ``.ckpt`` loads without upstream installed, and a malicious one is refused.

NumPy *scalars* (a training script's ``best_loss = np.average(...)``) are the one exception: they
are rebuilt here from their bytes for the numeric dtypes only (``numpy.dtype`` and
``numpy._core.multiarray.scalar`` resolve to our own checked stand-ins, and ``_codecs.encode``, which
protocol 2 uses for the bytes, to a Latin-1-only encoder). No NumPy function is ever called with the
pickle's arguments, and arrays (``_reconstruct``), object dtypes and every other NumPy global stay refused.

Only the zip format of ``torch.save`` (PyTorch ≥ 1.6) is read: torch's legacy loaders act on pickled
data themselves (file writes, tar extraction) before our unpickler could refuse anything.
"""

from __future__ import annotations

import collections
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
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


_NUMERIC_DTYPE = re.compile(r"[biufc]\d{1,2}")  # how numpy pickles a numeric dtype: 'f8', 'i4', 'b1', 'c16'


class _ScalarType:
    """What ``numpy.dtype(spec, align, copy)`` and its pickled state describe, checked and inert."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(spec, str) or not _NUMERIC_DTYPE.fullmatch(spec) or align is not False:
            raise UnsafeCheckpointError(f"the checkpoint would build numpy.dtype{(spec, align, copy)!r}, which "
                                        "is not a numeric scalar type; refusing it")
        self.spec = spec
        self.order = "="

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise UnsafeCheckpointError(f"the checkpoint gives a numeric dtype the state {state!r}; refusing it")
        self.order = state[1]

    def dtype(self) -> np.dtype:
        try:
            return np.dtype(self.spec).newbyteorder(self.order)
        except TypeError as err:  # a spec the pattern lets through but numpy does not know ('f3')
            raise UnsafeCheckpointError(f"the checkpoint names an unknown numeric dtype {self.spec!r}") from err


def _numpy_dtype(*args: Any) -> _ScalarType:
    return _ScalarType(*args)


def _numpy_scalar(scalar_type: Any, data: Any = None) -> Any:
    """``numpy._core.multiarray.scalar(dtype, bytes)`` for a checked numeric dtype: a NumPy scalar."""
    if not isinstance(scalar_type, _ScalarType) or not isinstance(data, bytes):
        raise UnsafeCheckpointError("the checkpoint would call numpy's scalar constructor with other than a "
                                    "numeric dtype and its bytes; refusing it")
    dtype = scalar_type.dtype()
    if len(data) != dtype.itemsize:
        raise UnsafeCheckpointError(f"a {dtype} scalar needs {dtype.itemsize} bytes, the checkpoint gives {len(data)}")
    return np.frombuffer(data, dtype=dtype)[0]


def _latin1(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode`` as pickle protocol 2 uses it for bytes (``encode(str, 'latin1')``), nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafeCheckpointError("the checkpoint would call _codecs.encode other than for Latin-1 bytes; refusing it")
    return text.encode("latin1")


_NUMPY_SCALARS = {
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # NumPy 2
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,  # NumPy 1
    ("_codecs", "encode"): _latin1,
}


def _fresh(function: Any) -> Any:
    """A new wrapper per use, so a pickle cannot alter what another lookup resolves to."""

    def call(*args: Any) -> Any:
        return function(*args)

    return call


class Unpickler(pickle.Unpickler):
    """Resolves tensor rebuilders, plain containers and NumPy scalars; everything else becomes a ``Reference``."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CONTAINERS:
            return _CONTAINERS[(module, name)]
        if (module, name) in _TENSOR_REBUILDERS:
            return _rebuilder(name)
        if (module, name) in _NUMPY_SCALARS:
            return _fresh(_NUMPY_SCALARS[(module, name)])
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
